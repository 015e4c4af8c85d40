"""Metrics and the audit log on real mounts (docs/monitoring.md).

`casfs mount --metrics` is scraped over HTTP while files are copied in; the audit log
of a scripted run, one step of it by an unprivileged user, is read back after the
unmount; the Grafana dashboard and the alert rules in docs/ name only metrics that a
live mount exports.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pymysql
import pytest
import tomli_w
import yaml

from cas.db.database import parse_meta_url
from tests.conftest import ROOT, CasEnv
from tests.waiting import wait_for
from tools.drivesim import DriveSim

MIB = 1 << 20
NOBODY = 65534
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
METRIC_NAME = re.compile(r"\bcasfs_[a-z0-9_]+\b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """The samples of http://127.0.0.1:PORT/metrics: 'name{labels}' -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def names(samples: dict[str, float]) -> set[str]:
    return {k.split("{", 1)[0] for k in samples}


def read_direct(path: Path) -> bytes:
    """Read ``path`` with O_DIRECT, so the kernel page cache cannot answer for casfs."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        out = bytearray()
        while piece := os.read(fd, MIB):
            out += piece
        return bytes(out)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_metrics_move_with_a_copy(casenv: CasEnv) -> None:
    casenv.init("vol", chunk_size="64KiB")
    # a taken port is a one-line error and no mount
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        mp = casenv.tmp / "mnt"
        mp.mkdir()
        r = casenv.run("mount", str(mp), "vol", "--metrics", str(busy), check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"Error: --metrics 127.0.0.1:{busy}: cannot listen: "
                                             "Address already in use"], r.stderr
    bad = casenv.run("mount", str(mp), "vol", "--metrics", "localhost:http", check=False)
    assert bad.returncode == 1 and "expected [HOST:]PORT" in bad.stderr

    port = free_port()
    casenv.mount("vol", mp, "--metrics", str(port))
    m0 = scrape(port)
    assert m0["casfs_snapshot_age_seconds"] != m0["casfs_snapshot_age_seconds"]   # NaN: no snapshot yet
    data = os.urandom(8 * MIB)
    seen_written = []
    with open(mp / "a", "wb", buffering=0) as f:
        for step in range(8):
            f.write(data[step * MIB:(step + 1) * MIB])
            m = scrape(port)   # during the copy
            moved = m["casfs_written_bytes_total"] - m0["casfs_written_bytes_total"]
            seen_written.append(moved)
            assert moved == (step + 1) * MIB
            # every byte written is either still buffered or written back into a chunk
            stored = (m["casfs_new_chunk_bytes_total"] - m0["casfs_new_chunk_bytes_total"]
                      + m["casfs_dedup_bytes_total"] - m0["casfs_dedup_bytes_total"])
            assert m["casfs_dirty_bytes"] + stored >= moved
        os.fsync(f.fileno())
    m1 = scrape(port)
    assert m1['casfs_fuse_operations_total{op="create"}'] - m0.get('casfs_fuse_operations_total{op="create"}', 0) == 1
    assert m1['casfs_fuse_operations_total{op="write"}'] - m0.get('casfs_fuse_operations_total{op="write"}', 0) >= 8
    assert m1['casfs_fuse_operation_seconds_count{op="write"}'] == m1['casfs_fuse_operations_total{op="write"}']
    assert m1['casfs_new_chunk_bytes_total'] - m0['casfs_new_chunk_bytes_total'] == 8 * MIB   # random: all new
    assert m1['casfs_dedup_bytes_total'] == m0['casfs_dedup_bytes_total']
    assert m1["casfs_dirty_bytes"] == 0
    assert m1['casfs_mysql_transaction_seconds_count{kind="transaction"}'] > \
        m0['casfs_mysql_transaction_seconds_count{kind="transaction"}']
    assert m1["casfs_local_store_bytes"] > 8 * MIB * 0.9   # random data barely compresses
    assert m1["casfs_local_free_bytes"] > 0

    # a duplicate copy: every byte deduplicated, nothing new stored
    shutil.copyfile(mp / "a", mp / "b")
    fsync_file(mp / "b")
    m2 = scrape(port)
    assert m2["casfs_written_bytes_total"] - m1["casfs_written_bytes_total"] == 8 * MIB
    assert m2["casfs_dedup_bytes_total"] - m1["casfs_dedup_bytes_total"] == 8 * MIB
    assert m2["casfs_new_chunk_bytes_total"] == m1["casfs_new_chunk_bytes_total"]

    # reads: a cold O_DIRECT read misses the RAM cache at most once per chunk; a second hits
    assert read_direct(mp / "b") == data
    m3 = scrape(port)
    assert m3["casfs_read_bytes_total"] - m2["casfs_read_bytes_total"] == 8 * MIB
    # one set of counters: run/stats.json (casfs stats --watch) shows the same bytes
    live = casenv.data_home / "vol" / "run" / "stats.json"

    def same_bytes() -> bool:
        st = json.loads(live.read_text())
        return bool(st["written_bytes"] == m3["casfs_written_bytes_total"]
                    and st["read_bytes"] == m3["casfs_read_bytes_total"])
    wait_for(same_bytes, "run/stats.json to show the bytes /metrics shows")
    lookups = (m3["casfs_cache_hits_total"] + m3["casfs_cache_misses_total"]
               - m2["casfs_cache_hits_total"] - m2["casfs_cache_misses_total"])
    assert lookups >= 8 * MIB // (64 << 10)
    assert read_direct(mp / "b") == data
    m4 = scrape(port)
    assert m4["casfs_cache_misses_total"] == m3["casfs_cache_misses_total"]
    assert m4["casfs_cache_hits_total"] - m3["casfs_cache_hits_total"] >= 8 * MIB // (64 << 10)
    assert m4["casfs_cache_bytes"] >= 8 * MIB

    # an error answered to the application is counted by operation and errno
    os.mkdir(mp / "d")
    (mp / "d" / "x").write_bytes(b"x")
    with pytest.raises(OSError):
        os.rmdir(mp / "d")
    m5 = scrape(port)
    assert m5['casfs_fuse_errors_total{errno="ENOTEMPTY",op="rmdir"}'] == 1
    assert m5["casfs_eio_errors_total"] == 0

    # the age of the last metadata snapshot, once another process records one
    vol = casenv.data_home / "vol"
    target = parse_meta_url(tomllib.loads((vol / "volume.toml").read_text())["meta_url"])
    conn = pymysql.connect(unix_socket=target.unix_socket, user=target.user, database=target.database,
                           autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("REPLACE INTO meta (k, v) VALUES ('snapshot_confirmed_at', "
                        "DATE_FORMAT(UTC_TIMESTAMP() - INTERVAL 90 SECOND, '%Y-%m-%d %H:%i:%s'))")
    finally:
        conn.close()
    age = scrape(port)["casfs_snapshot_age_seconds"]
    assert 90 <= age < 3600


def test_dashboard_and_alerts_name_live_metrics(casenv: CasEnv) -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((ROOT / "docs" / "prometheus-alerts.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    # the alerts the operators asked for are there
    assert {"CasfsUploadsStalled", "CasfsUploadQueueOld", "CasfsLowCacheHitRatio", "CasfsEIOErrors",
            "CasfsLocalStoreFull"} <= set(alerts)
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for word in ("operations/s", "p99", "throughput", "dedup", "hit ratio", "dirty", "queue", "upload", "errors"):
        assert word in titles
    wanted = {n for e in exprs + list(alerts.values()) for n in METRIC_NAME.findall(e)}
    assert len(wanted) >= 20

    casenv.init("vol")
    port = free_port()
    mp = casenv.mount("vol", None, "--metrics", f"127.0.0.1:{port}")
    os.mkdir(mp / "d")
    (mp / "d" / "x").write_bytes(b"x")
    with pytest.raises(OSError):
        os.rmdir(mp / "d")   # one FUSE error, so casfs_fuse_errors_total has a sample
    live = names(scrape(port))
    assert wanted - live == set()


# the directory comes as an open fd: the test's own ancestors are not searchable by nobody
AUDIT_SCRIPT = r"""
import os, sys
fd = os.open("n", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=int(sys.argv[1]))
os.write(fd, b"by nobody")
os.close(fd)
"""


def audit_records(casenv: CasEnv) -> list[dict[str, Any]]:
    text = (casenv.data_home / "vol" / "log" / "audit.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_audit_log_of_a_scripted_run(casenv: CasEnv) -> None:
    casenv.init("vol")
    mp = casenv.mount("vol", None, "--allow-other")   # default level: changes
    log = casenv.data_home / "vol" / "log" / "audit.jsonl"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    d = mp / "d"
    os.mkdir(d)
    os.chmod(d, 0o777)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        sys.executable, "-c", AUDIT_SCRIPT, str(dfd)],
                       pass_fds=(dfd,), check=True, capture_output=True, timeout=60)
    finally:
        os.close(dfd)
    (d / "f").write_bytes(b"0123456789")
    os.rename(d / "f", d / "g")
    os.unlink(d / "g")
    os.chmod(d / "n", 0o600)
    os.setxattr(d / "n", "user.k", b"v")
    with pytest.raises(OSError):
        os.rmdir(d)
    casenv.umount(mp)

    recs = audit_records(casenv)
    got = [(r["op"], r["path"], r.get("path2"), r["uid"], r["gid"], r["result"]) for r in recs]
    assert got == [
        ("mkdir", "/d", None, 0, 0, 0),
        ("setattr", "/d", None, 0, 0, 0),
        ("create", "/d/n", None, NOBODY, NOBODY, 0),
        ("create", "/d/f", None, 0, 0, 0),
        ("rename", "/d/f", "/d/g", 0, 0, 0),
        ("unlink", "/d/g", None, 0, 0, 0),
        ("setattr", "/d/n", None, 0, 0, 0),
        ("setxattr", "/d/n", None, 0, 0, 0),
        ("rmdir", "/d", None, 0, 0, "ENOTEMPTY"),
    ], got
    assert recs[1]["attrs"] == {"mode": "0777"} and recs[6]["attrs"] == {"mode": "0600"}
    assert recs[7]["name"] == "user.k"
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]) for r in recs)
    assert all(isinstance(r["pid"], int) and r["pid"] > 0 for r in recs)
    assert len({r["pid"] for r in recs}) > 1   # each command its own process
    assert stat.S_IMODE(log.stat().st_mode) == 0o600

    # level all: reads and writes with their byte counts, by the process that opened
    mp = casenv.mount("vol", mp, "--audit", "all")
    body = os.urandom(300_000)
    (mp / "big").write_bytes(body)
    assert read_direct(mp / "big") == body
    casenv.umount(mp)
    recs = audit_records(casenv)[len(got):]
    writes = [r for r in recs if r["op"] == "write"]
    reads = [r for r in recs if r["op"] == "read"]
    assert sum(r["bytes"] for r in writes) == len(body) and sum(r["bytes"] for r in reads) == len(body)
    assert {(r["path"], r["uid"], r["result"]) for r in writes + reads} == {("/big", 0, 0)}
    assert any(r["op"] == "lookup" and r["path"] == "/big" for r in recs)

    # level off (volume.toml [audit]): nothing more is written
    cfg_file = casenv.data_home / "vol" / "volume.toml"
    cfg = tomllib.loads(cfg_file.read_text())
    cfg["audit"] = {"level": "off"}
    cfg_file.write_text(tomli_w.dumps(cfg))
    size = log.stat().st_size
    mp = casenv.mount("vol", mp)
    os.mkdir(mp / "quiet")
    (mp / "quiet" / "f").write_bytes(b"x")
    os.rename(mp / "quiet" / "f", mp / "quiet" / "g")
    casenv.umount(mp)
    assert log.stat().st_size == size


def test_refused_drive_credentials_are_audited(casenv: CasEnv, drive_sim: DriveSim) -> None:
    casenv.init("vol", chunk_size="64KiB")
    casenv.run("drive", "auth", "--endpoint", drive_sim.url, "--pack-size", "256KiB", "--pack-age", "0", "vol")
    # Drive answers every upload with 401 authError (what an expired or revoked token gets)
    drive_sim.inject("server_error", status=401, reason="authError", message="Invalid Credentials",
                     match="upload_multipart", times=1000)
    port = free_port()
    mp = casenv.mount("vol", None, "--metrics", str(port))
    (mp / "f").write_bytes(os.urandom(300_000))
    fsync_file(mp / "f")

    def refused() -> list[dict[str, Any]]:
        log = casenv.data_home / "vol" / "log" / "audit.jsonl"
        return [r for r in audit_records(casenv) if r["op"] == "drive_credentials"] if log.exists() else []
    wait_for(refused, "the refused credentials in the audit log", timeout=120)
    rec = refused()[0]
    assert rec["result"] == "EACCES" and "credentials refused" in rec["detail"] and rec["uid"] == os.getuid()
    m = scrape(port)
    assert m['casfs_drive_errors_total{kind="credentials"}'] >= 1
    assert m["casfs_drive_queue_chunks"] > 0 and m["casfs_drive_packs_uploaded_total"] == 0


def test_command_events_and_rotation(casenv: CasEnv) -> None:
    """A CLI command's events (cas.config.audit.attach) land in the volume's audit log, with the
    process's uid/gid/pid filled in; rotation keeps every file 0600."""
    from cas.config import audit
    from cas.config.volume import open_volume
    casenv.init("vol")
    vol = open_volume("vol")
    logger = logging.getLogger(audit.LOGGER)
    h = audit.attach(vol)
    assert h is not None
    try:
        logger.warning("authentication failed", extra={"audit": {"op": "unlock", "result": "EACCES"}})
    finally:
        logger.removeHandler(h)
        h.close()
        logger.propagate = True   # attach() turned it off for this process
        logger.setLevel(logging.NOTSET)
    (rec,) = audit_records(casenv)
    assert (rec["op"], rec["result"], rec["uid"], rec["gid"], rec["pid"]) == \
        ("unlock", "EACCES", os.getuid(), os.getgid(), os.getpid())

    small = audit.open_handler(vol, audit.AuditConfig(level="all", max_bytes=400, backups=2), buffered=True)
    logger.addHandler(small)
    logger.setLevel(logging.INFO)
    try:
        for i in range(20):
            logger.info("mkdir", extra={"audit": {"uid": 1, "gid": 1, "pid": 1, "op": "mkdir",
                                                  "path": f"/d{i}", "result": 0}})
            small.flush()
    finally:
        logger.removeHandler(small)
        logger.setLevel(logging.NOTSET)
        small.close()
    files = sorted((casenv.data_home / "vol" / "log").glob("audit.jsonl*"))
    assert [f.name for f in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    last = [json.loads(line)["path"] for f in reversed(files) for line in f.read_text().splitlines()]
    assert last[-1] == "/d19" and last == sorted(last, key=lambda p: int(p[2:]))


def test_unusable_credentials_file_is_audited_at_mount(casenv: CasEnv, drive_sim: DriveSim) -> None:
    casenv.init("vol", chunk_size="64KiB")
    casenv.run("drive", "auth", "--endpoint", drive_sim.url, "vol")
    vol = casenv.data_home / "vol"
    (vol / "token.json").write_text('{"installed": {"client_id": "x"}}')   # client secrets, not a token
    cfg = tomllib.loads((vol / "volume.toml").read_text())
    cfg["drive"]["credentials"] = "token.json"
    (vol / "volume.toml").write_text(tomli_w.dumps(cfg))
    mp = casenv.mount("vol")   # the mount goes on without its cloud tier (uploads stay queued)
    (mp / "f").write_bytes(b"still writable")
    casenv.umount(mp)
    (rec,) = [r for r in audit_records(casenv) if r["op"] == "drive_credentials"]
    assert rec["result"] == "EACCES" and "client-secrets" in rec["detail"]


DEPTH = 600   # deeper than the old recursive path walk survived (~500 levels)


def test_deep_tree_does_not_kill_the_mount(casenv: CasEnv) -> None:
    """A create 600 directories down, after a rename, is audited with its full path and
    the mount lives on (the recursive path walk raised RecursionError out of the hook,
    which ended pyfuse3.main)."""
    casenv.init("vol")
    mp = casenv.mount("vol")
    (mp / "a").write_bytes(b"a")
    fd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEPTH):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.rename(mp / "a", mp / "b")          # moves a name; the old hook dropped its path cache
        os.rename(mp / "d", mp / "e")          # a directory above the bottom moves
        f = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        os.write(f, b"bottom")
        os.close(f)
        os.chmod("f", 0o600, dir_fd=fd)
    finally:
        os.close(fd)
    assert sorted(os.listdir(mp)) == ["b", "e"]     # still mounted
    casenv.umount(mp)
    recs = audit_records(casenv)
    deep = "/e" + "/d" * (DEPTH - 1) + "/f"
    assert [(r["op"], r["path"], r["result"]) for r in recs[-2:]] == [("create", deep, 0), ("setattr", deep, 0)]
    assert [(r["op"], r["path"], r.get("path2")) for r in recs if r["op"] == "rename"] == [
        ("rename", "/a", "/b"), ("rename", "/d", "/e")]
    assert sum(r["op"] == "mkdir" for r in recs) == DEPTH


def test_audit_paths_from_listed_names_and_renames(casenv: CasEnv) -> None:
    """The audit log names paths from what the mount handed the kernel, readdir's entries
    included: after a remount, a tree walked with os.walk (readdirplus: the kernel holds
    every inode without a lookup) and every file opened runs no dentry query for the
    audit log; a directory renamed afterwards gives its new path to the next open below
    it, and a file moved to another directory its new parent (docs/monitoring.md)."""
    casenv.init("vol")
    mp = casenv.mount("vol")
    files = [f"{d}/f{i}" for d in ("a", "a/b", "a/b/c", "e") for i in range(3)]
    for rel in files:
        (mp / rel).parent.mkdir(parents=True, exist_ok=True)
        (mp / rel).write_bytes(rel.encode())
    casenv.umount(mp)
    port = free_port()
    mp = casenv.mount("vol", mp, "--metrics", f"127.0.0.1:{port}")
    seen = []
    for dirpath, _dirs, names_ in os.walk(mp):
        for name in sorted(names_):
            p = Path(dirpath) / name
            assert p.read_bytes() == str(p.relative_to(mp)).encode()
            seen.append("/" + str(p.relative_to(mp)))
    assert sorted(seen) == sorted("/" + f for f in files)
    assert scrape(port)["casfs_audit_path_queries_total"] == 0   # every name was known
    os.rename(mp / "a" / "b", mp / "e" / "x")     # a directory moves to another parent
    os.rename(mp / "a", mp / "z")                 # and one is renamed in place
    os.rename(mp / "e" / "f0", mp / "z" / "g")    # a file moves
    assert (mp / "e" / "x" / "c" / "f1").read_bytes() == b"a/b/c/f1"
    assert (mp / "z" / "f2").read_bytes() == b"a/f2"
    assert (mp / "z" / "g").read_bytes() == b"e/f0"
    assert scrape(port)["casfs_audit_path_queries_total"] == 0
    casenv.umount(mp)
    opens = [r["path"] for r in audit_records(casenv) if r["op"] == "open"]
    assert sorted(opens[-len(files) - 3:-3]) == sorted(seen)
    assert opens[-3:] == ["/e/x/c/f1", "/z/f2", "/z/g"]
