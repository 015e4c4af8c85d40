"""Unmount and close never drop data silently (issue 8, item 1; docs/writeback.md).

Real mounts, a real MariaDB, a real full disk (a tmpfs under the chunk store):
- a failed writeback reaches close(2) as ENOSPC/EIO, the bytes stay readable;
- `casfs umount` refuses (non-zero, naming the file, mount left in place) while data is
  uncommitted, and succeeds once space is freed; the file is then byte-exact;
- a daemon forced out with uncommitted data (SIGTERM, `fusermount3 -u` with a dead
  database) spills it to VOLUME/rescue/, and the next mount replays it;
- a rescue record whose inode is gone lands in /lost+found;
- `casfs stats` shows uncommitted bytes and the rescue area.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cas.engine import rescue
from cas.db.server import EmbeddedServer
from fusefront.mountpoint import find_mount
from tests.conftest import CasEnv
from tests.treeutil import tmpfs
from tests.waiting import wait_exit

MiB = 1 << 20


@pytest.fixture
def store_tmpfs(casenv: CasEnv, tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """make(volume, size): a tmpfs of ``size`` as ``volume``'s chunk store (the volume
    must exist); unmounted at teardown, after casenv's mounts are gone."""
    made: list[Path] = []
    stack: list[object] = []

    def make(volume: str, size: str) -> Path:
        cm = tmpfs(tmp_path / f"tmpfs{len(made)}", size)
        d = cm.__enter__()
        stack.append(cm)
        made.append(d)
        chunks = casenv.data_home / volume / "chunks"
        chunks.rmdir()
        (d / "chunks").mkdir()
        chunks.symlink_to(d / "chunks")
        return d

    try:
        yield make
    finally:
        casenv.cleanup()
        for cm in reversed(stack):
            cm.__exit__(None, None, None)  # type: ignore[attr-defined]


def _grow(d: Path, size: str) -> None:
    r = subprocess.run(["mount", "-o", f"remount,size={size}", str(d)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _write(path: Path, data: bytes, *, create: bool = True, offset: int = 0) -> int:
    """Write ``data`` at ``offset`` in 1 MiB write(2)s; returns the open fd (not closed)."""
    fd = os.open(path, os.O_WRONLY | (os.O_CREAT if create else 0), 0o644)
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        pos += os.pwrite(fd, view[pos:pos + MiB], offset + pos)
    return fd


def _close_errno(fd: int) -> int:
    try:
        os.close(fd)
    except OSError as exc:
        return exc.errno or -1
    return 0


def _stats(casenv: CasEnv, vol: str = "vol") -> dict[str, object]:
    return dict(json.loads(casenv.run("stats", "--json", vol).stdout))


def _live_until(casenv: CasEnv, want: Callable[[dict[str, object]], bool]) -> dict[str, object]:
    """The mount's live figures (`casfs stats --json`) once ``want`` holds (60 s at most)."""
    deadline = time.monotonic() + 60
    while True:
        live = _stats(casenv)["mount"]
        if isinstance(live, dict) and want(live):
            return live
        assert time.monotonic() < deadline, f"live stats never reached the expected state: {live}"
        time.sleep(0.5)


def _fsck_clean(casenv: CasEnv, vol: str = "vol") -> None:
    r = casenv.run("fsck", vol, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_full_store_close_reports_enospc_umount_refuses_then_commits(
        casenv: CasEnv, store_tmpfs: Callable[[str, str], Path]) -> None:
    casenv.init("vol")
    t = store_tmpfs("vol", "16m")
    mp = casenv.mount("vol")
    data = os.urandom(63 * MiB)
    fd = _write(mp / "big.bin", data)
    assert _close_errno(fd) == errno.ENOSPC          # was 0, and the file was lost
    # the bytes are kept: still readable through the mount (from the daemon's RAM); every
    # close reports the failure as long as it is true, a read-only one too
    fd = os.open(mp / "big.bin", os.O_RDONLY)
    assert os.read(fd, len(data) + 1) == data
    assert _close_errno(fd) == errno.ENOSPC
    r = casenv.run("umount", "--timeout", "3", str(mp), check=False)
    assert r.returncode != 0, r.stderr
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and "/big.bin" in msg and "not committed" in msg, msg
    assert find_mount(mp) is not None                # the mount is left in place
    _grow(t, "256m")
    # the next close writes the file back itself and, the disk freed, reports success
    fd = os.open(mp / "big.bin", os.O_RDONLY)
    assert _close_errno(fd) == 0
    live = _live_until(casenv, lambda m: m.get("dirty_files") == 0)
    assert live["dirty_bytes"] == 0 and live["writeback_error"] == "", live
    r = casenv.run("umount", "--timeout", "120", str(mp), check=False)
    assert r.returncode == 0, r.stderr
    assert find_mount(mp) is None
    casenv.mount("vol", mp)
    with open(mp / "big.bin", "rb") as f:
        assert f.read() == data
    casenv.umount(mp)
    _fsck_clean(casenv)


def test_sigterm_with_full_store_spills_to_rescue_and_remount_replays(
        casenv: CasEnv, store_tmpfs: Callable[[str, str], Path]) -> None:
    casenv.init("vol")
    t = store_tmpfs("vol", "8m")
    mp = casenv.mount("vol")
    old = os.urandom(3 * MiB)
    fd = _write(mp / "old.bin", old)
    os.fsync(fd)
    assert _close_errno(fd) == 0
    big = os.urandom(20 * MiB)
    fd = _write(mp / "big.bin", big)
    assert _close_errno(fd) == errno.ENOSPC
    patch = os.urandom(MiB + 12345)                   # an uncommitted change of a committed file
    fd = _write(mp / "old.bin", patch, create=False, offset=MiB // 2)
    assert _close_errno(fd) == errno.ENOSPC           # the store is full: close writes back
    new_old = old[:MiB // 2] + patch + old[MiB // 2 + len(patch):]

    # run/stats.json is rewritten within 0.75 s of a change: wait for the figures of now
    live = _live_until(casenv, lambda m: m.get("dirty_files") == 2)
    assert int(live["dirty_bytes"]) >= len(big) + len(patch), live  # type: ignore[call-overload]
    assert "full" in str(live["writeback_error"]), live
    text = casenv.run("stats", "vol").stdout
    assert "uncommitted" in text and "writeback failing" in text, text

    pid = casenv.daemon_pid(mp)
    os.kill(pid, signal.SIGTERM)
    wait_exit(pid)
    assert find_mount(mp) is None
    area = casenv.data_home / "vol" / "rescue"
    assert os.stat(area).st_mode & 0o777 == 0o700
    records = sorted(p.name for p in area.iterdir())
    assert len(records) == 2 and all(n.endswith(".rec") for n in records), records
    s = _stats(casenv)
    assert s["mount"] is None
    assert s["rescue_files"] == 2 and int(s["rescue_bytes"]) > len(big) + len(patch), s  # type: ignore[call-overload]
    assert "rescue area" in casenv.run("stats", "vol").stdout
    log = (casenv.data_home / "vol" / "log" / "mount.log").read_text()
    assert "exiting with uncommitted data" in log

    # a remount onto the still-full store refuses (one line) and keeps the records
    r = casenv.run("mount", str(mp), "vol", check=False)
    assert r.returncode != 0 and "rescue area" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in area.iterdir()) == records
    _grow(t, "256m")
    r = casenv.run("mount", str(mp), "vol")
    assert "replayed 2 files" in r.stderr, r.stderr
    assert find_mount(mp) is not None
    assert list(area.iterdir()) == []
    assert (mp / "big.bin").read_bytes() == big
    assert (mp / "old.bin").read_bytes() == new_old
    assert _stats(casenv)["rescue_files"] == 0
    casenv.umount(mp)
    _fsck_clean(casenv)
    casenv.mount("vol", mp)                           # committed: survives another remount
    assert (mp / "big.bin").read_bytes() == big
    assert (mp / "old.bin").read_bytes() == new_old


def test_dead_database_umount_refuses_and_rescue_survives_exit(casenv: CasEnv) -> None:
    casenv.init("db", embedded=True)
    vol = casenv.data_home / "db"
    # hold the volume's server from here, and mount with no mariadbd binary to find:
    # once killed, nothing can restart it (a mount that restarts its server must still
    # pass this test; the full-store test covers the same path without a database)
    srv = EmbeddedServer(vol / "mysql", vol / "run", vol / "log")
    srv.acquire()
    try:
        env = dict(casenv.env)
        casenv.env["CASFS_MARIADBD"] = ""
        try:
            mp = casenv.mount("db")
        finally:
            casenv.env.clear()
            casenv.env.update(env)
        data = os.urandom(20 * MiB)
        fd = _write(mp / "f.bin", data[:MiB])
        os.fsync(fd)                                  # the file's creation is committed
        view = memoryview(data)
        for pos in range(MiB, len(data), MiB):
            os.pwrite(fd, view[pos:pos + MiB], pos)
        mysqld = srv.pid()
        assert mysqld is not None
        os.kill(mysqld, signal.SIGKILL)
        wait_exit(mysqld)
        assert _close_errno(fd) == errno.EIO          # was 0, and the file was gone
        r = casenv.run("umount", "--timeout", "2", str(mp), check=False)
        assert r.returncode != 0 and "not committed" in r.stderr, r.stderr
        assert find_mount(mp) is not None
        pid = casenv.daemon_pid(mp)
        subprocess.run(["fusermount3", "-u", str(mp)], check=True)
        wait_exit(pid)
        records = list((vol / "rescue").iterdir())
        assert len(records) == 1, records
    finally:
        srv.release()
    r = casenv.run("mount", str(mp), "db")
    assert "replayed 1 files" in r.stderr, r.stderr
    assert (mp / "f.bin").read_bytes() == data
    assert list((vol / "rescue").iterdir()) == []
    casenv.umount(mp)
    _fsck_clean(casenv, "db")


def test_rescue_record_of_a_vanished_inode_lands_in_lost_found(casenv: CasEnv) -> None:
    casenv.init("vol", chunk_size="64KiB")
    mp = casenv.mount("vol")
    (mp / "kept").write_bytes(b"x" * 1000)
    casenv.umount(mp)
    cs = 64 * 1024
    payload = {0: os.urandom(cs), 2: os.urandom(500)}
    header = {"ino": 987654, "path": "/gone/report.txt", "size": 2 * cs + 500, "chunk_size": cs,
              "truncate_from": None, "attrs": {"mtime_ns": 1_700_000_000_000_000_000},
              "mode": 0o100640, "uid": os.getuid(), "gid": os.getgid(), "error": "test",
              "time_ns": time.time_ns()}
    area = rescue.rescue_dir(casenv.data_home / "vol")
    area.mkdir(mode=0o700)
    (area / f"987654.{header['time_ns']}.rec").write_bytes(rescue.encode(header, payload))
    r = casenv.run("mount", str(mp), "vol")
    assert "/lost+found/987654-report.txt" in r.stderr, r.stderr
    got = (mp / "lost+found" / "987654-report.txt").read_bytes()
    assert got == payload[0] + bytes(cs) + payload[2]
    st = os.stat(mp / "lost+found" / "987654-report.txt")
    assert st.st_mode == 0o100640 and st.st_mtime_ns == header["attrs"]["mtime_ns"]  # type: ignore[index]
    assert os.stat(mp / "lost+found").st_mode & 0o777 == 0o700
    assert (mp / "kept").read_bytes() == b"x" * 1000
    assert list(area.iterdir()) == []
    casenv.umount(mp)
    _fsck_clean(casenv)
