"""Encrypted volumes end to end (docs/security.md, docs/format.md): real mounts, the
real casfs CLI, the session MariaDB, and drivesim for the Drive copy.

What is on disk and on Drive is read raw by the test (chunk files, drivesim objects,
the database's pack entries); what the user sees comes through the mount and the CLI.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymysql
import pytest

from tests.conftest import CasEnv
from tests.drivesim_fixture import drive_sim  # noqa: F401
from tests.treeutil import compare_trees
from tests.test_writeback import _close_errno, _grow, _write, store_tmpfs  # noqa: F401
from tests.test_drive import fsync_tree
from tests.waiting import wait_exit, wait_for
from tools.drivesim import FOLDER_MIME, DriveSim

CHUNK = 64 * 1024
PASS = "correct horse battery staple"
_dbs = itertools.count()


def init_encrypted(casenv: CasEnv, *extra: str) -> str:
    """Create volume "vol" (64 KiB chunks, on the session server), encrypted with the
    passphrase in $CASFS_PASSPHRASE of ``casenv.env``; returns its database name."""
    db = f"tenc{os.getpid()}_{next(_dbs)}"
    out = casenv.run("init", "--encrypt", "--chunk-size", "64KiB", "--meta", casenv.meta_url(db),
                     *extra, "vol").stdout
    assert "encrypted" in out
    return db


def query(casenv: CasEnv, db: str, sql: str) -> list[tuple[Any, ...]]:
    conn = pymysql.connect(unix_socket=str(casenv.server.socket), user="root", database=db, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        conn.close()


def make_tree(root: Path) -> dict[str, bytes]:
    """A few MiB: random data, repetitive (compressible) text, a duplicate of the random
    file, and small files. Returns relative path -> bytes."""
    rnd = random.Random(9)
    rand = rnd.randbytes(24 * CHUNK + 1234)
    text = b"".join(b"line %07d of a repetitive file, the same words again and again\n" % i
                    for i in range(20000))
    files = {"rand": rand, "d/text": text, "d/copy_of_rand": rand}
    files.update({f"small/s{i}": rnd.randbytes(rnd.randrange(1, 3000)) for i in range(20)})
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def plaintext_runs_found(inputs: list[bytes], stored: list[bytes]) -> list[str]:
    """Where a 32-byte run of any input occurs in any stored blob.

    Every 16-byte block of the stored bytes at a 16-aligned offset is indexed. A 32-byte
    run of an input at stored offset p contains the aligned block at q = ceil(p/16)*16
    (q + 16 <= p + 32), and that block equals the input's 16 bytes at the matching
    offset: so checking the 16 bytes at *every* input offset against the index finds
    every 32-byte run (and also most 16-byte ones: a stricter check)."""
    index: set[bytes] = set()
    for blob in stored:
        index.update(blob[q:q + 16] for q in range(0, len(blob) - 15, 16))
    found = []
    for n, data in enumerate(inputs):
        for i in range(len(data) - 15):
            if data[i:i + 16] in index:
                found.append(f"input {n} offset {i}")
                if len(found) > 5:
                    return found
    return found


def test_encrypted_volume_keeps_no_plaintext_locally_or_on_drive(casenv: CasEnv, drive_sim: DriveSim) -> None:  # noqa: F811
    casenv.env["CASFS_PASSPHRASE"] = PASS
    db = init_encrypted(casenv)
    casenv.run("drive", "auth", "--endpoint", drive_sim.url, "--pack-size", "256KiB", "--pack-age", "0", "vol")
    mp = casenv.mount("vol")
    src = casenv.tmp / "src"
    files = make_tree(src)
    shutil.copytree(src, mp / "t")
    fsync_tree(mp)
    casenv.run("drive", "push", "vol")
    wait_for(lambda: json.loads(casenv.run("drive", "status", "--json", "vol").stdout)["queued_chunks"] == 0,
             "the upload queue to drain", timeout=120)
    casenv.umount(mp)

    chunk_files = [p for p in (casenv.data_home / "vol" / "chunks").rglob("*") if p.is_file()]
    objects = [f for f in drive_sim.files() if f["mimeType"] != FOLDER_MIME]
    assert chunk_files and objects
    local = [p.read_bytes() for p in chunk_files]
    remote = [drive_sim.file_bytes(f["id"]) for f in objects]
    assert all(b[:4] == b"CASC" and b[6:8] == b"\x00\x01" for b in local)   # FLAG_AEAD set
    assert not plaintext_runs_found(list(files.values()), local + remote)

    # no name on disk, on Drive or in a pack entry is the SHA-256 of an input chunk
    sha = {hashlib.sha256(d[i:i + CHUNK]).hexdigest() for d in files.values() for i in range(0, len(d), CHUNK)}
    names = {p.name for p in (casenv.data_home / "vol").rglob("*")} | {str(f["name"]) for f in objects}
    entries = {bytes(r[0]).hex() for r in query(casenv, db, "SELECT chunk FROM pack_entries")}
    ids = {bytes(r[0]).hex() for r in query(casenv, db, "SELECT id FROM chunks")}
    assert entries and entries <= ids
    assert not sha & (names | entries | ids)
    assert {p.name for p in chunk_files} == ids            # chunk files are named by keyed id

    st = json.loads(casenv.run("stats", "--json", "vol").stdout)
    assert st["unique_bytes"] == st["logical_bytes"] - len(files["rand"])   # the copy deduplicated
    assert st["stored_bytes"] < st["unique_bytes"] - len(files["d/text"]) // 2   # compressed, then encrypted

    mp = casenv.mount("vol")                               # cold cache: every chunk from disk
    assert compare_trees(src, mp / "t", mtimes=False) == []
    casenv.umount(mp)
    assert json.loads(casenv.run("fsck", "--json", "vol").stdout)["clean"]
    scrubbed = json.loads(casenv.run("scrub", "--cloud", "--rate", "0", "--json", "vol").stdout)
    assert scrubbed["local"]["checked"] == len(ids) and not scrubbed["local"]["bad"], scrubbed
    assert scrubbed["cloud"]["checked"] == len(entries) and not scrubbed["cloud"]["bad"], scrubbed

    # every local chunk evicted: reads open the envelopes inside Drive's packs
    mp = casenv.mount("vol", mp, "--local-limit", "0")
    wait_for(lambda: json.loads(casenv.run("stats", "--json", "vol").stdout)["local_bytes"] == 0,
             "eviction of every local chunk", timeout=120, interval=0.3)
    assert compare_trees(src, mp / "t", mtimes=False) == []
    casenv.umount(mp)


def one_line_error(r: Any) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return str(lines[0])


def audit_lines(casenv: CasEnv) -> list[str]:
    log = casenv.data_home / "vol" / "log" / "mount.log"
    text = log.read_text() if log.exists() else ""
    return [ln for ln in text.splitlines() if "casfs.audit" in ln and "authentication failed" in ln]


def test_wrong_passphrase_passwd_key_file_and_a_damaged_chunk(casenv: CasEnv) -> None:
    key_file = casenv.tmp / "vol.key"
    casenv.env["CASFS_PASSPHRASE"] = PASS
    init_encrypted(casenv, "--key-file", str(key_file))          # created: 0600, a new key
    assert key_file.stat().st_mode & 0o077 == 0
    mp = casenv.mount("vol")
    data = os.urandom(3 * CHUNK)
    (mp / "a").write_bytes(data)
    casenv.umount(mp)
    toml = casenv.data_home / "vol" / "volume.toml"
    before = toml.read_bytes()

    # (b) a wrong passphrase: one line, exit 1, nothing changed, an audit event
    casenv.env["CASFS_PASSPHRASE"] = "wrong"
    msg = one_line_error(casenv.run("mount", str(mp), "vol", check=False))
    assert "wrong passphrase" in msg
    assert not os.path.ismount(mp)
    bad = casenv.tmp / "bad-pass"
    bad.write_text("also wrong\n")
    del casenv.env["CASFS_PASSPHRASE"]
    assert "wrong passphrase" in one_line_error(casenv.run("fsck", "--passphrase-file", str(bad), "vol",
                                                           check=False))
    # no secret at all (no terminal): one line, not an authentication attempt
    assert "is encrypted" in one_line_error(casenv.run("fsck", "vol", check=False))
    assert toml.read_bytes() == before
    events = audit_lines(casenv)
    assert len(events) == 2 and all("op=unlock result=EACCES volume=vol" in ln for ln in events)
    # ... and in the volume's audit log (cas/config/audit.py), one JSON line each
    records = [json.loads(ln) for ln in (casenv.data_home / "vol" / "log" / "audit.jsonl").read_text().splitlines()]
    unlocks = [r for r in records if r.get("op") == "unlock"]
    assert len(unlocks) == 2 and all(r["result"] == "EACCES" and r["uid"] == os.getuid() for r in unlocks)

    # the key file alone unlocks it
    assert json.loads(casenv.run("fsck", "--json", "--key-file", str(key_file), "vol").stdout)["clean"]

    # (c) key passwd: the new passphrase only; the key file still works
    casenv.env["CASFS_PASSPHRASE"] = PASS
    casenv.env["CASFS_NEW_PASSPHRASE"] = "a new passphrase"
    out = casenv.run("key", "passwd", "vol").stdout
    assert "no chunk rewritten" in out
    del casenv.env["CASFS_NEW_PASSPHRASE"]
    assert toml.stat().st_mode & 0o077 == 0
    assert "wrong passphrase" in one_line_error(casenv.run("mount", str(mp), "vol", check=False))
    casenv.env["CASFS_PASSPHRASE"] = "a new passphrase"
    mp = casenv.mount("vol", mp)
    assert (mp / "a").read_bytes() == data
    casenv.umount(mp)
    exported = casenv.run("key", "export", "vol").stdout
    assert "[encryption]" in exported and "wrapped" in exported and "a new passphrase" not in exported

    # (d) one flipped byte in an encrypted chunk file: EIO through the mount, scrub finds it
    chunk_files = sorted(p for p in (casenv.data_home / "vol" / "chunks").rglob("*") if p.is_file())
    victim = chunk_files[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    mp = casenv.mount("vol", mp)
    with pytest.raises(OSError) as ei:
        (mp / "a").read_bytes()
    assert ei.value.errno == errno.EIO
    casenv.umount(mp)
    r = casenv.run("scrub", "--restart", "--json", "--key-file", str(key_file), "vol", check=False)
    assert r.returncode == 1, r.stderr
    assert victim.name in json.dumps(json.loads(r.stdout))


def test_rescue_records_of_an_encrypted_volume_hold_no_plaintext(
        casenv: CasEnv, store_tmpfs: Callable[[str, str], Path]) -> None:
    casenv.env["CASFS_PASSPHRASE"] = PASS
    init_encrypted(casenv)
    t = store_tmpfs("vol", "4m")
    mp = casenv.mount("vol")
    big = os.urandom(8 << 20)
    fd = _write(mp / "big.bin", big)
    assert _close_errno(fd) == errno.ENOSPC           # the store is full: the data stays in RAM
    pid = casenv.daemon_pid(mp)
    os.kill(pid, signal.SIGTERM)                      # exits spilling it to the rescue area
    wait_exit(pid)
    records = list((casenv.data_home / "vol" / "rescue").iterdir())
    assert len(records) == 1 and records[0].name.endswith(".rec"), records
    blob = records[0].read_bytes()
    assert len(blob) > len(big)
    # every offset of the first 256 KiB, and 4096 windows spread over the rest
    probes = [big[:256 << 10]] + [big[i:i + 32] for i in range(256 << 10, len(big) - 32, len(big) // 4096)]
    assert not plaintext_runs_found(probes, [blob])
    _grow(t, "64m")
    r = casenv.run("mount", str(mp), "vol")
    assert "replayed 1 files" in r.stderr, r.stderr
    assert (mp / "big.bin").read_bytes() == big
    casenv.umount(mp)
