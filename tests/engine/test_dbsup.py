"""Engine tests of a database that goes away: the bounded wait for the server, the
supervisor that restarts it, and what a lost group transaction keeps (docs/database.md).

A lost group is made with ``KILL CONNECTION`` of the engine's session, which the engine
sees exactly as a dead server (error 2013/2006, the open transaction rolled back); the
server tests use a private mariadbd in ``tmp_path``.
"""
from __future__ import annotations

import errno
import os
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from cas.errors import CasError, FsError, MetaError
from cas.db.database import Database, MetaTarget
from cas.db.server import EmbeddedServer, ServerSupervisor, pid_running
from tests.engine.test_fs import CS, FILE_MODE, GID, ROOT, UID, Engine, eng, make_file, read_name  # noqa: F401
from tests.conftest import running_server
from tests.waiting import wait_for

__all__ = ["eng"]


def _kill_session(e: Engine) -> None:
    """Drop the engine's connection behind its back: its open group is rolled back."""
    e.q(f"KILL CONNECTION {e.fs.db.conn.thread_id()}", sync=False)


def test_lost_group_gives_flushed_bytes_back(eng: Engine) -> None:
    """Bytes a flush put into the group transaction come back as buffers when the group
    is lost: the next fsync writes them (old code: they were gone, fsync returned 0)."""
    fs = eng.fs
    rng = random.Random(91)
    x, y = rng.randbytes(2 * CS + 100), rng.randbytes(CS)
    a = make_file(fs, b"A", x[:10], release=False)    # committed: 10 bytes, still open
    fs.write(a, 0, x)
    fs.setattr(a, size=len(x))                        # a truncate flushes: x joins the group
    fs.write(a, len(x), y)                            # newer bytes, only in RAM
    _kill_session(eng)
    try:
        fs.fsync(a)             # finds the group lost; may write everything back at once
    except CasError:
        pass
    fs.fsync(a)                 # must succeed: every byte is durable now
    assert fs.getattr(a).size == len(x) + len(y)
    fs.release(a)
    report = eng.fsck()
    assert report.clean, report
    fs = eng.reopen(cache_bytes=0)
    assert read_name(fs, b"A") == x + y


def test_lost_truncate_of_a_closed_file_comes_back(eng: Engine) -> None:
    """A closed file's state dropped after a flush into the group stays until the commit,
    and comes back (to be written again) when the group is lost."""
    fs = eng.fs
    data = random.Random(92).randbytes(3 * CS)
    c = make_file(fs, b"C", data)                     # committed and closed
    fs.setattr(c, size=CS // 2)                       # flushed into the group, state dropped
    _kill_session(eng)
    try:
        fs.flush_all()          # the commit finds the group lost: EIO is fair here
    except CasError:
        pass
    assert fs.getattr(c).size == CS // 2              # but the truncate is not undone
    fs.flush_all()
    report = eng.fsck()
    assert report.clean, report
    fs = eng.reopen(cache_bytes=0)
    assert read_name(fs, b"C") == data[:CS // 2]


def test_file_created_in_a_lost_group_is_never_written_back(eng: Engine) -> None:
    """An open file whose inode row was lost: fsync fails with EIO (again and again),
    no manifest row is written for the missing inode, its bytes stay readable in RAM,
    the writeback tick goes on for the other files, and no new file gets its number."""
    fs = eng.fs
    rng = random.Random(93)
    z, w = rng.randbytes(CS + 7), rng.randbytes(CS)
    fs.sync()
    c = fs.create(ROOT, b"lost", FILE_MODE, UID, GID).ino   # only in the group
    fs.write(c, 0, z)
    assert fs.dentry_of(c) == (ROOT, b"lost")  # a statement: the held create joins the group
    _kill_session(eng)
    # a server that died may come back with its inode counter behind the lost rows
    eng.q("ALTER TABLE inodes AUTO_INCREMENT = 1", sync=False)
    for _ in range(2):
        with pytest.raises(FsError) as ei:
            fs.fsync(c)
        assert ei.value.errno == errno.EIO
    assert fs.read(c, 0, len(z)) == z                  # the buffers are kept
    b = make_file(fs, b"B", w, release=False)          # other files work
    fs.write(b, CS, w)
    fs.release(c)
    fs.release(b)
    fs.writeback(0.0)                                  # the tick skips the lost file
    assert eng.q("SELECT COUNT(*) FROM manifests WHERE inode = %s", (c,)) == [(0,)]
    assert eng.q("SELECT COUNT(*) FROM manifests m LEFT JOIN inodes i ON i.id = m.inode "
                 "WHERE i.id IS NULL") == [(0,)]
    assert fs.create(ROOT, b"new", FILE_MODE, UID, GID).ino > c   # never the lost file's number
    report = eng.fsck()
    assert report.clean, report
    assert read_name(fs, b"B") == w + w


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A mariadbd of this test's own (it gets killed); stopped by pid at teardown."""
    with running_server(tmp_path) as srv:
        yield srv


def _kill_server(srv: EmbeddedServer) -> int:
    pid = srv.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_running(pid), "the killed server to exit", 30, interval=0.02)
    return pid


def test_database_waits_for_the_server_bounded(private_server: EmbeddedServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    srv = private_server
    db = Database(MetaTarget(user="root", password="", database="", unix_socket=str(srv.socket)))
    try:
        assert db.query("SELECT 1") == [(1,)]
        _kill_server(srv)
        tries: list[int] = []
        connect = db._connect

        def counting() -> pymysql.connections.Connection:
            tries.append(1)
            return connect()
        monkeypatch.setattr(db, "_connect", counting)
        restarted: list[bool] = []

        def restart() -> None:   # once the query is seen waiting, bring the server back
            wait_for(lambda: len(tries) >= 2, "the query to wait", 60, interval=0.02)
            restarted.append(srv.restart_if_dead())
        t = threading.Thread(target=restart)
        t.start()
        try:
            assert db.query("SELECT 1") == [(1,)]   # waited, reconnected, ran
        finally:
            t.join(timeout=120)
        assert restarted == [True] and len(tries) >= 2

        db.reconnect_wait_s = 0.5
        _kill_server(srv)
        with pytest.raises(MetaError, match="waited"):   # the wait is bounded
            db.query("SELECT 1")
        assert srv.restart_if_dead()
        assert db.query("SELECT 1") == [(1,)]
    finally:
        db._close_conn()


def test_supervisor_restarts_a_killed_server(private_server: EmbeddedServer) -> None:
    srv = private_server
    sup = ServerSupervisor(srv, interval_s=0.05)
    sup.start()
    try:
        old = _kill_server(srv)
        wait_for(lambda: sup.restarts >= 1 and srv.alive(), "the supervisor's restart", 120, interval=0.02)
        new = srv.pid()
        assert new is not None and new != old and sup.last_error == ""
    finally:
        sup.stop()
    # a released server is not restarted: the last user stops it on purpose
    sup = ServerSupervisor(srv, interval_s=0.05)
    sup.start()
    try:
        srv.release()
        assert not srv.alive()
        assert not srv.restart_if_dead()
    finally:
        sup.stop()
    assert sup.restarts == 0 and not srv.alive()
