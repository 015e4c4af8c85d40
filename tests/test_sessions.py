"""Sessions, `casfs join` and exclusive vs shared mounts, on real mounts of two simulated
machines (tests/machines.py; docs/sharing.md "Sessions", "Joining a machine", "Reaping").

Both sides run with a 6 s session timeout and their own host name in their session rows
(``CASFS_SESSION_HOST``), so a killed mount of A is found dead by B through its heartbeat's
age, as across real machines.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

import pymysql
import tomli_w
import tomllib

from tests.machines import Machines, two_machines  # noqa: F401 - the fixture
from tests.waiting import wait_exit, wait_for


def sql(m: Machines, query: str, args: Any = None) -> list[tuple[Any, ...]]:
    """Rows of ``query`` on the volume's database (a connection of the test's own)."""
    conn = pymysql.connect(unix_socket=str(m.a.server.socket), user="root", database=m.database,
                           autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return list(cur.fetchall())
    finally:
        conn.close()


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The error line of a failed `casfs` run (exit != 0, one line on stderr)."""
    assert r.returncode != 0, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def side_b_by_copy(m: Machines, name: str) -> None:
    """B's side of a volume that was NOT joined: A's volume.toml with a fresh store_id
    (what a user copying the config by hand gets)."""
    src = m.a.data_home / name
    dst = m.b.data_home / name
    dst.mkdir(parents=True, mode=0o700)
    for sub in ("chunks", "run", "log"):
        (dst / sub).mkdir(mode=0o700)
    cfg = tomllib.loads((src / "volume.toml").read_text())
    cfg["store_id"] = os.urandom(16).hex()
    (dst / "volume.toml").write_text(tomli_w.dumps(cfg))
    os.chmod(dst / "volume.toml", 0o600)


def test_two_shared_mounts_listed_and_an_exclusive_mount_refused_elsewhere(two_machines: Machines) -> None:
    m = two_machines
    m.shared_volume("vol")
    cfg_a = tomllib.loads((m.a.data_home / "vol" / "volume.toml").read_text())
    cfg_b = tomllib.loads((m.b.data_home / "vol" / "volume.toml").read_text())
    assert cfg_b["uuid"] == cfg_a["uuid"] and cfg_b["chunk_size"] == cfg_a["chunk_size"]
    assert cfg_b["compression"] == cfg_a["compression"]
    assert len(cfg_b["store_id"]) == 32 and "store_id" not in cfg_a
    mp_a = m.a.mount("vol")
    mp_b = m.b.mount("vol")
    # both mounts work at once, each with its own store
    (mp_a / "from-a").write_bytes(b"a" * 5000)
    (mp_b / "from-b").write_bytes(b"b" * 7000)
    assert (mp_a / "from-a").read_bytes() == b"a" * 5000
    assert (mp_b / "from-b").read_bytes() == b"b" * 7000
    listed = m.sessions(m.b)
    assert sorted(s["host"] for s in listed) == ["machine-A", "machine-B"]
    assert all(s["live"] and s["mode"] == "shared" for s in listed)
    assert len({s["store"] for s in listed}) == 2
    assert {s["pid"] for s in listed} == {m.a.daemon_pid(mp_a), m.b.daemon_pid(mp_b)}
    text = m.a.run("sessions", "vol").stdout
    assert "volume vol: shared, 2 sessions" in text and "machine-B" in text
    m.a.umount(mp_a)
    listed = m.sessions(m.b)
    assert [s["host"] for s in listed] == ["machine-B"]
    # A's side is not mounted, B's is: a repair from A would rewrite counts B is changing
    r = m.a.run("fsck", "--repair", "vol", check=False)
    assert "is mounted by machine-B:" in one_line_error(r)
    m.b.umount(mp_b)
    assert m.sessions(m.a) == []

    # a volume that is not shared: mounted on A (exclusive), refused on B, and join refused
    m.a.run("init", "--chunk-size", "1MiB", "--meta", m.a.meta_url(m.database + "_x"), "solo")
    mp_solo = m.a.mount("solo")
    assert [s["mode"] for s in m.sessions(m.a, "solo")] == ["exclusive"]
    side_b_by_copy(m, "solo")
    mp = m.b.tmp / "solo-b"
    mp.mkdir()
    r = m.b.run("mount", str(mp), "solo", check=False)
    assert "already mounted by machine-A:" in one_line_error(r)
    r = m.b.run("join", "solo2", "--meta", m.a.meta_url(m.database + "_x"), check=False)
    assert "is mounted exclusively by machine-A:" in one_line_error(r)
    assert not (m.b.data_home / "solo2").exists()
    m.a.umount(mp_solo)


def test_kill_9_of_a_mount_is_reaped_and_its_unlinked_open_file_freed(two_machines: Machines) -> None:
    m = two_machines
    m.shared_volume("vol")
    mp_a = m.a.mount("vol")
    data = os.urandom(3 * (1 << 20) + 12345)
    f = mp_a / "kept-open"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)     # its manifest and chunks are committed: freeing it drops 4 references
        os.unlink(f)
        dfd = os.open(mp_a, os.O_RDONLY)
        try:
            os.fsync(dfd)    # fsyncdir: the unlink and its sustained row are committed
        finally:
            os.close(dfd)
        (ino,) = [r[0] for r in sql(m, "SELECT id FROM inodes WHERE nlink = 0")]
        assert sql(m, "SELECT COUNT(*) FROM sustained WHERE inode = %s", (ino,))[0][0] == 1
        # B's start-up recovery frees nlink-0 inodes, but not one a live session sustains
        mp_b = m.b.mount("vol")
        assert sql(m, "SELECT COUNT(*) FROM manifests WHERE inode = %s", (ino,))[0][0] == 4
        assert os.pread(fd, len(data), 0) == data   # still readable through A's open handle
        a = [s for s in m.sessions(m.b) if s["host"] == "machine-A"]
        assert len(a) == 1 and a[0]["sustained"] == 1 and a[0]["live"]
        pid_a = m.a.daemon_pid(mp_a)
        os.kill(pid_a, signal.SIGKILL)
        wait_exit(pid_a)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    subprocess.run(["fusermount3", "-u", "-z", str(mp_a)], capture_output=True)
    # B keeps working while A is dead
    more = os.urandom((1 << 20) + 777)
    (mp_b / "on-b").write_bytes(more)
    (mp_b / "dir-b").mkdir()
    assert (mp_b / "on-b").read_bytes() == more
    assert sorted(os.listdir(mp_b)) == ["dir-b", "on-b"]
    # B's heartbeat thread reaps A (heartbeat older than 6 s) and frees its sustained inode
    wait_for(lambda: [s["host"] for s in m.sessions(m.b)] == ["machine-B"], "A's session reaped", timeout=90)
    assert sql(m, "SELECT COUNT(*) FROM inodes WHERE id = %s", (ino,))[0][0] == 0
    assert sql(m, "SELECT COUNT(*) FROM manifests WHERE inode = %s", (ino,))[0][0] == 0
    assert sql(m, "SELECT COUNT(*) FROM sustained")[0][0] == 0
    fd2 = os.open(mp_b / "on-b", os.O_RDONLY)
    try:
        os.fsync(fd2)
    finally:
        os.close(fd2)
    m.b.umount(mp_b)
    # refcounts exact: fsck from A's side (its store holds A's chunks; B's are B's)
    out = json.loads(m.a.run("fsck", "vol", "--json", "--no-verify", check=False).stdout)
    assert out["refcount_mismatches"] == [] and out["nlink_mismatches"] == []
    assert out["missing_rows"] == [] and out["dangling_entries"] == []
    assert out["sessions"]["sessions"] == [] and out["sessions"]["orphan_sustained"] == []
    # A's chunks lost every reference with the freed inode (the only file that named them)
    assert sql(m, "SELECT COUNT(*) FROM chunks WHERE refcount > 0")[0][0] == 2


def test_join_and_init_shared_errors(two_machines: Machines) -> None:
    m = two_machines
    # no such database
    r = m.b.run("join", "vol", "--meta", m.a.meta_url(m.database + "_none"), check=False)
    assert "does not exist" in one_line_error(r)
    # a database that holds no casfs volume
    conn = pymysql.connect(unix_socket=str(m.a.server.socket), user="root", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{m.database}_other`")
            cur.execute(f"CREATE TABLE `{m.database}_other`.t (x INT)")
        r = m.b.run("join", "vol", "--meta", m.a.meta_url(m.database + "_other"), check=False)
        assert "holds no casfs volume" in one_line_error(r)
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{m.database}_other`")
        conn.close()
    assert not (m.b.data_home / "vol").exists()
    # --shared needs an external server
    r = m.a.run("init", "--shared", "emb", check=False)
    assert "--shared needs --meta" in one_line_error(r)
    assert not (m.a.data_home / "emb").exists()
    # a volume made before join settings existed (rows deleted), with a cloud tier: join
    # says what to do; the first side's next mount records them; join copies [drive]
    m.init_a("vol", "1MiB", False)
    objects = m.a.tmp / "objects"
    m.a.run("drive", "auth", "vol", "--endpoint", f"file:{objects}", "--pack-age", "7")
    sql(m, "DELETE FROM meta WHERE k LIKE 'join_config%%'")
    r = m.join_b("vol", check=False)
    assert "no join settings yet" in one_line_error(r)
    assert not (m.b.data_home / "vol").exists()
    assert sql(m, "SELECT COUNT(*) FROM meta WHERE k = 'shared'") == [(0,)]
    m.a.umount(m.a.mount("vol"))
    m.join_b("vol")
    drive_a = tomllib.loads((m.a.data_home / "vol" / "volume.toml").read_text())["drive"]
    drive_b = tomllib.loads((m.b.data_home / "vol" / "volume.toml").read_text())["drive"]
    assert drive_b == drive_a and drive_b["endpoint"] == f"file:{objects}" and drive_b["pack_age_s"] == 7
    assert sql(m, "SELECT v FROM meta WHERE k = 'shared'") == [("1",)]
    # a volume name that exists on this machine
    r = m.join_b("vol", check=False)
    assert "already exists" in one_line_error(r)

