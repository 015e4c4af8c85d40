"""Small files on a real mount: creates cost at most one MySQL round trip amortised and
survive a crash whole or not at all (docs/smallfiles.md)."""
from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pymysql
import pytest

from tests.conftest import CasEnv
from tests.waiting import wait_exit

N = 1000


def server_questions(casenv: CasEnv) -> int:
    """Statements the test's MariaDB server received from all clients so far."""
    conn = pymysql.connect(unix_socket=str(casenv.server.socket), user="root", password="")
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS LIKE 'Questions'")
            return int(cur.fetchone()[1])
    finally:
        conn.close()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_create_round_trips_and_names(casenv: CasEnv) -> None:
    """1,000 O_CREAT|O_EXCL creates (empty files: no writeback) in a new directory and
    its fsyncdir cost at most one statement each at the server, counting everything the
    mount sends (lookups, creates, releases, the commit); EEXIST and ENOENT answer
    right while creates are held, and a remount shows them all."""
    casenv.init("sf")
    mp = casenv.mount("sf")
    d = mp / "d"
    d.mkdir()
    fsync_dir(d)
    before = server_questions(casenv)
    for i in range(N):
        os.close(os.open(d / f"f{i:04d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    fsync_dir(d)
    trips = server_questions(casenv) - before - 1
    print(f"{trips} statements for {N} creates through the mount")
    assert trips <= N, f"{trips} MySQL statements for {N} creates"
    with pytest.raises(FileExistsError):
        os.open(d / "f0000", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.close(os.open(d / "held", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    with pytest.raises(FileExistsError):
        os.mkdir(d / "held")
    with pytest.raises(FileNotFoundError):
        os.stat(d / "nothing")
    (d / "sub").mkdir()
    with pytest.raises(OSError) as exc:
        os.rmdir(d)
    assert exc.value.errno == errno.ENOTEMPTY
    os.symlink("f0001", d / "sl")
    assert os.readlink(d / "sl") == "f0001"
    casenv.umount(mp)
    casenv.mount("sf", mp)
    names = set(os.listdir(d))
    assert names == {f"f{i:04d}" for i in range(N)} | {"held", "sub", "sl"}
    assert os.stat(d).st_nlink == 3
    r = casenv.run("fsck", "sf", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kill_after_fsyncdir_keeps_names_and_loses_only_whole_creates(casenv: CasEnv) -> None:
    """kill -9 of the daemon: every name created before an fsyncdir is there after the
    remount; of names created after it, a crash keeps each whole or drops it whole
    (fsck finds no dentry without its inode, no inode without its dentry)."""
    casenv.init("sfk")
    mp = casenv.mount("sfk")
    kept, maybe = mp / "kept", mp / "maybe"
    kept.mkdir()
    for i in range(300):
        (kept / f"k{i}").write_bytes(b"")
    (kept / "dir").mkdir()
    os.symlink("k0", kept / "sl")
    fsync_dir(kept)
    maybe.mkdir()
    made = []
    for i in range(300):
        os.close(os.open(maybe / f"m{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        made.append(f"m{i}")
        if i % 50 == 0:
            (maybe / f"sub{i}").mkdir()
            made.append(f"sub{i}")
    pid = casenv.daemon_pid(mp)
    os.kill(pid, signal.SIGKILL)
    wait_exit(pid)
    casenv.mount("sfk", mp)   # the next mount cleans the dead mountpoint and recovers
    assert set(os.listdir(kept)) == {f"k{i}" for i in range(300)} | {"dir", "sl"}
    assert os.readlink(kept / "sl") == "k0"
    if maybe.exists():
        left = os.listdir(maybe)
        assert set(left) <= set(made)
        for name in left:
            os.lstat(maybe / name)
        subs = sum(1 for n in left if n.startswith("sub"))
        assert os.stat(maybe).st_nlink == 2 + subs
    r = casenv.run("fsck", "sfk", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
