"""Corruption heals instead of spreading (docs/integrity.md): bad marks, healing writes,
`casfs fsck --repair` and `casfs scrub`, on real mounts, a real MariaDB and drivesim.

A chunk file is damaged on disk by the test (one flipped byte, or the file deleted);
what casfs believes is read from its database and its CLI, what the user sees through
the mount.
"""
from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from tests.conftest import CasEnv
from tests.waiting import wait_for
from tools.drivesim import FOLDER_MIME, DriveSim

CHUNK = 64 * 1024


def db_of(casenv: CasEnv, vol: str = "vol") -> pymysql.connections.Connection:
    """An autocommit connection to the volume's database on the session server."""
    import tomllib
    from urllib.parse import parse_qs, urlparse
    url = urlparse(tomllib.loads((casenv.data_home / vol / "volume.toml").read_text())["meta_url"])
    return pymysql.connect(unix_socket=parse_qs(url.query)["unix_socket"][0], user="root",
                           database=url.path.lstrip("/"), autocommit=True)


def query(casenv: CasEnv, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    conn = db_of(casenv)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())
    finally:
        conn.close()


def chunks_of(casenv: CasEnv, path_in_mount: str) -> list[bytes]:
    """Chunk ids of the file called ``path_in_mount`` (a name in the root), slot order."""
    return [bytes(r[0]) for r in query(
        casenv, "SELECT m.chunk FROM manifests m JOIN dentries d ON d.inode = m.inode "
                "WHERE d.parent = 1 AND d.name = %s ORDER BY m.slot", (path_in_mount.encode(),))]


def chunk_file(casenv: CasEnv, cid: bytes) -> Path:
    h = cid.hex()
    return casenv.data_home / "vol" / "chunks" / h[:2] / h[2:4] / h


def flip_byte(path: Path, offset: int = 100) -> None:
    """Flip one bit pattern of the byte at ``offset`` (past the 16-byte envelope header)."""
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def is_bad(casenv: CasEnv, cid: bytes) -> bool:
    return bool(query(casenv, "SELECT bad FROM chunks WHERE id = %s", (cid,))[0][0])


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_eio(path: Path) -> None:
    with pytest.raises(OSError) as ei:
        path.read_bytes()
    assert ei.value.errno == errno.EIO


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_bad_chunk_is_marked_and_a_rewrite_of_its_bytes_heals_it(casenv: CasEnv, damage: str) -> None:
    casenv.init("vol", chunk_size="64KiB")
    mp = casenv.mount("vol")
    data = os.urandom(3 * CHUNK)                         # incompressible: stored raw
    write_synced(mp / "a", data)
    casenv.umount(mp)                                    # empty the RAM cache
    victim = chunks_of(casenv, "a")[1]
    if damage == "flip":
        flip_byte(chunk_file(casenv, victim))
    else:
        chunk_file(casenv, victim).unlink()
    mp = casenv.mount("vol", mp)
    read_eio(mp / "a")
    wait_for(lambda: is_bad(casenv, victim), "the bad mark to commit", interval=0.1)
    write_synced(mp / "b", data)                         # the same bytes again: heals
    assert (mp / "b").read_bytes() == data
    assert (mp / "a").read_bytes() == data
    assert not is_bad(casenv, victim)
    casenv.umount(mp)
    mp = casenv.mount("vol", mp)                         # from disk, not from RAM
    assert (mp / "a").read_bytes() == data and (mp / "b").read_bytes() == data
    casenv.umount(mp)
    assert json.loads(casenv.run("fsck", "--json", "vol").stdout)["clean"]


def test_fsck_repair_without_a_cloud_copy_lists_every_path_and_fails(casenv: CasEnv) -> None:
    casenv.init("vol", chunk_size="64KiB")
    mp = casenv.mount("vol")
    data = os.urandom(2 * CHUNK)
    (mp / "d").mkdir()
    (mp / "e" / "f").mkdir(parents=True)
    write_synced(mp / "a", data)
    os.link(mp / "a", mp / "d" / "x")                     # a hard link: both names are damaged
    write_synced(mp / "e" / "f" / "copy", data[:CHUNK])   # shares the first chunk
    write_synced(mp / "fine", os.urandom(CHUNK))
    casenv.umount(mp)
    victim = chunks_of(casenv, "a")[0]
    flip_byte(chunk_file(casenv, victim))
    r = casenv.run("fsck", "--repair", "vol", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    damaged = [line.split("damaged file ", 1)[1] for line in r.stdout.splitlines() if "damaged file " in line]
    assert damaged == ["/a", "/d/x", "/e/f/copy"]
    assert "0 replaced from the cloud" in r.stdout and "1 unrepaired" in r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and "1 chunks stay unrepaired: 3 files" in r.stderr
    assert is_bad(casenv, victim)
    r = casenv.run("fsck", "--repair", "--json", "vol", check=False)
    assert r.returncode == 1
    rep = json.loads(r.stdout)["chunk_repair"]
    assert rep["unrepaired"] == [victim.hex()] and rep["damaged_files"] == ["/a", "/d/x", "/e/f/copy"]
    assert rep["paths"] == {victim.hex(): ["/a", "/d/x", "/e/f/copy"]}
    mp = casenv.mount("vol", mp)                          # the bytes come back: the volume heals
    write_synced(mp / "again", data[:CHUNK])
    casenv.umount(mp)
    assert casenv.run("fsck", "--repair", "vol").returncode == 0
    mp = casenv.mount("vol", mp)
    assert (mp / "d" / "x").read_bytes() == data


@pytest.fixture
def disk_sim(tmp_path: Path) -> Iterator[DriveSim]:
    """A DriveSim keeping its files under tmp_path/drive (so a test can damage them)."""
    sim = DriveSim(data_dir=tmp_path / "drive", seed=8)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


def upload(casenv: CasEnv, sim: DriveSim, files: dict[str, bytes]) -> Path:
    """A volume with a Drive tier on ``sim``, mounted, holding ``files``, all uploaded."""
    from tests.test_drive import drained, fsync_tree, setup_volume
    setup_volume(casenv, sim)
    mp = casenv.mount("vol")
    for name, data in files.items():
        (mp / name).write_bytes(data)
    fsync_tree(mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain", 120, interval=0.1)
    return mp


def test_fsck_repair_refetches_bad_and_missing_chunks_from_drive(casenv: CasEnv, disk_sim: DriveSim) -> None:
    files = {"a": os.urandom(3 * CHUNK), "b": os.urandom(2 * CHUNK)}
    mp = upload(casenv, disk_sim, files)
    casenv.umount(mp)
    flipped, deleted = chunks_of(casenv, "a")[1], chunks_of(casenv, "b")[0]
    flip_byte(chunk_file(casenv, flipped))
    chunk_file(casenv, deleted).unlink()
    rep = json.loads(casenv.run("fsck", "--json", "vol", check=False).stdout)
    assert rep["corrupt_chunks"] == [flipped.hex()] and rep["missing_files"] == [deleted.hex()]
    r = casenv.run("fsck", "--repair", "--json", "vol")
    fixed = json.loads(r.stdout)["chunk_repair"]
    assert sorted(fixed["replaced"]) == sorted([flipped.hex(), deleted.hex()]) and fixed["unrepaired"] == []
    assert json.loads(casenv.run("fsck", "--json", "vol").stdout)["clean"]
    assert chunk_file(casenv, deleted).exists()
    mp = casenv.mount("vol", mp)
    for name, data in files.items():
        assert (mp / name).read_bytes() == data


def scrub(casenv: CasEnv, *args: str) -> tuple[int, dict[str, Any]]:
    r = casenv.run("scrub", "--json", *args, "vol", check=False)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


def test_scrub_marks_a_flipped_byte_and_resumes_from_its_cursor(casenv: CasEnv) -> None:
    casenv.init("vol", chunk_size="64KiB")
    mp = casenv.mount("vol")
    write_synced(mp / "a", os.urandom(6 * CHUNK))
    write_synced(mp / "b", os.urandom(2 * CHUNK))
    ids = sorted(chunks_of(casenv, "a") + chunks_of(casenv, "b"))
    victim = ids[-1]                                     # verified last (id order)
    flip_byte(chunk_file(casenv, victim))                # while mounted: scrub is safe then
    code, first = scrub(casenv, "--stop-after", "3")
    assert code == 0 and not first["complete"] and first["local"]["checked"] == 3
    cursor = query(casenv, "SELECT v FROM meta WHERE k = 'scrub_local_cursor'")
    assert json.loads(cursor[0][0])["at"] == ids[2].hex()
    assert not is_bad(casenv, victim)
    code, second = scrub(casenv)                         # continues after the third chunk
    assert code == 1 and second["complete"] and second["local"]["resumed"]
    assert second["local"]["checked"] == len(ids) - 3 and second["local"]["pass_checked"] == len(ids)
    assert second["local"]["bad"] == [victim.hex()]
    assert is_bad(casenv, victim)
    assert not query(casenv, "SELECT v FROM meta WHERE k = 'scrub_local_cursor'")
    code, third = scrub(casenv, "--restart", "--rate", "1")  # from the start, paced at 1 MiB/s
    assert code == 1 and third["local"]["checked"] == len(ids) and not third["local"]["resumed"]
    r = casenv.run("scrub", "vol", check=False)          # not a terminal: plain report lines
    assert r.returncode == 1 and f"bad chunk {victim.hex()}" in r.stdout
    assert f"local: verified {len(ids)} chunks" in r.stdout


def test_scrub_cloud_reports_a_corrupted_pack(casenv: CasEnv, disk_sim: DriveSim) -> None:
    files = {"a": os.urandom(3 * CHUNK), "b": os.urandom(3 * CHUNK)}
    mp = upload(casenv, disk_sim, files)
    code, clean = scrub(casenv, "--cloud")
    assert code == 0 and clean["cloud"]["complete"] and clean["cloud"]["checked"] == 6
    victim = chunks_of(casenv, "a")[2]
    pack, pos = query(casenv, "SELECT p.name, e.pos FROM pack_entries e JOIN packs p ON p.id = e.pack "
                              "WHERE e.chunk = %s", (victim,))[0]
    obj = next(f for f in disk_sim.files() if f["mimeType"] != FOLDER_MIME and f["name"] == pack)
    flip_byte(disk_sim.data_dir / "blobs" / obj["id"], int(pos) + 100)   # type: ignore[operator]
    casenv.umount(mp)                                    # so that the re-upload waits for us
    code, found = scrub(casenv, "--cloud")
    assert code == 1 and found["cloud"]["bad_packs"] == {pack: [victim.hex()]}
    assert found["local"]["bad"] == [] and not is_bad(casenv, victim)   # the local copy is good
    assert found["cloud"]["requeued"] == [victim.hex()]  # the bad copy is forgotten ...
    assert not query(casenv, "SELECT 1 FROM pack_entries WHERE chunk = %s", (victim,))
    assert query(casenv, "SELECT 1 FROM upload_queue WHERE chunk = %s", (victim,))
    mp = casenv.mount("vol", mp)                         # ... and a good one uploaded again
    wait_for(lambda: bool(query(casenv, "SELECT 1 FROM pack_entries WHERE chunk = %s", (victim,))),
             "the re-upload", 120, interval=0.1)
    r = casenv.run("scrub", "--cloud", "vol", check=False)
    assert r.returncode == 0 and "cloud: verified 6 chunks" in r.stdout, r.stdout + r.stderr
    assert (mp / "a").read_bytes() == files["a"]


def test_a_corrupt_chunk_is_never_uploaded_and_its_healing_write_queues_it(
        casenv: CasEnv, drive_sim: DriveSim) -> None:
    from tests.test_drive import drained, status
    casenv.init("vol", chunk_size="64KiB")
    mp = casenv.mount("vol")
    data = os.urandom(4 * CHUNK)
    write_synced(mp / "a", data)
    casenv.umount(mp)
    victim = chunks_of(casenv, "a")[3]
    flip_byte(chunk_file(casenv, victim))
    casenv.run("drive", "auth", "--endpoint", drive_sim.url, "--pack-size", "256KiB", "--pack-age", "0", "vol")
    casenv.run("drive", "push", "--timeout", "120", "vol")   # ends: the bad chunk leaves the queue
    in_cloud = {bytes(r[0]) for r in query(casenv, "SELECT chunk FROM pack_entries")}
    assert in_cloud == set(chunks_of(casenv, "a")) - {victim}  # the damage did not spread
    assert is_bad(casenv, victim) and status(casenv)["queued_chunks"] == 0
    mp = casenv.mount("vol", mp)
    write_synced(mp / "b", data)                               # heals it, and queues it again
    wait_for(lambda: drained(casenv) and bool(
        query(casenv, "SELECT 1 FROM pack_entries WHERE chunk = %s", (victim,))),
        "the healed chunk's upload", 120, interval=0.1)
    assert (mp / "a").read_bytes() == data


def test_a_read_replaces_a_corrupt_local_file_by_its_drive_copy(casenv: CasEnv, drive_sim: DriveSim) -> None:
    files = {"a": os.urandom(3 * CHUNK)}
    mp = upload(casenv, drive_sim, files)
    casenv.umount(mp)
    victim = chunks_of(casenv, "a")[0]
    flip_byte(chunk_file(casenv, victim))
    mp = casenv.mount("vol", mp)
    assert (mp / "a").read_bytes() == files["a"]        # from Drive, verified
    casenv.umount(mp)
    rep = json.loads(casenv.run("fsck", "--json", "vol").stdout)
    assert rep["clean"] and rep["corrupt_chunks"] == []  # the local file was replaced
    assert not is_bad(casenv, victim)
