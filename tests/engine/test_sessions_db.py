"""Sessions at the engine level, on a real MariaDB (cas/db/sessions.py,
cas/engine/sessions.py; docs/sharing.md "Sessions", "Reaping"): registrations that start at
once, the reaper's exact frees, lease expiry, and sessions it must leave alone.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

import cas.db.changes
import cas.db.database
import cas.db.sessions
from cas.engine import sessions
from cas.maint import sessioncheck
from cas.errors import VolumeError
from tests.engine.test_fs import ROOT, Engine, eng, make_file  # noqa: F401 - the fixture
from tests.waiting import wait_for


@pytest.fixture
def keepers() -> Iterator[list[sessions.SessionKeeper]]:
    """Keepers a test started; stopped (sessions ended) at teardown."""
    started: list[sessions.SessionKeeper] = []
    try:
        yield started
    finally:
        for k in started:
            k.stop()


def test_two_exclusive_mounts_starting_at_once_one_is_refused(
        eng: Engine, keepers: list[sessions.SessionKeeper]) -> None:
    metas = [cas.db.database.connect(eng.vol) for _ in range(4)]
    barrier = threading.Barrier(len(metas))
    got: list[object] = []
    lock = threading.Lock()

    def go(meta: cas.db.database.Metadata) -> None:
        barrier.wait()
        try:
            k: object = sessions.start(meta)
        except VolumeError as exc:
            k = exc
        with lock:
            got.append(k)

    threads = [threading.Thread(target=go, args=(m,)) for m in metas]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        keepers.extend(k for k in got if isinstance(k, sessions.SessionKeeper))
        for m in metas:
            m.close()
    assert len(got) == 4
    assert len(keepers) == 1, got
    assert all("already mounted by" in str(e) for e in got if isinstance(e, VolumeError))
    assert eng.q("SELECT mode FROM sessions", sync=False) == [("exclusive",)]


def test_reaper_frees_exactly_expires_leases_and_spares_live_sessions(
        eng: Engine, keepers: list[sessions.SessionKeeper], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASFS_SESSION_TIMEOUT_S", "2")
    eng.q("INSERT INTO meta (k, v) VALUES ('shared', '1')")
    ins = "INSERT INTO sessions (host, pid, store, mode, consistency, heartbeat) VALUES (%s, %s, %s, 'shared', 'session', "
    eng.q(ins + "UTC_TIMESTAMP(6))", ("elsewhere", 4242, "a" * 32))
    eng.q(ins + "UTC_TIMESTAMP(6) + INTERVAL 1 HOUR)", ("elsewhere2", 4242, "b" * 32))   # live throughout
    (dead,), (live,) = eng.q("SELECT id FROM sessions ORDER BY id")
    # the dead session's mount: files unlinked while open there (sustained), then a crash
    fs = eng.fs
    fs.sustain_open = True
    fs.db.session_id = dead
    solo = make_file(fs, b"solo", bytes(range(256)) * 800, release=False)       # 4 slots of 64 KiB
    both = make_file(fs, b"both", b"b" * 150_000, release=False)
    make_file(fs, b"keep", bytes(range(256)) * 256)                               # solo's first chunk
    fs.unlink(ROOT, b"solo")
    fs.unlink(ROOT, b"both")
    eng.q("INSERT INTO sustained (session, inode) VALUES (%s, %s)", (live, both))
    assert sorted(eng.q("SELECT session, inode FROM sustained")) == sorted([(dead, solo), (dead, both), (live, both)])
    refs = eng.refcounts()
    slots = eng.manifest_counts()
    solo_chunks = [bytes(r[0]) for r in eng.q("SELECT chunk FROM manifests WHERE inode = %s", (solo,))]
    assert len(solo_chunks) == 4
    eng.abandon(fs)
    eng.fs = eng.new_fs()
    eng.q("INSERT INTO packs (name, state, size, md5, sha256, owner, lease_until) VALUES "
          "('p-dead', 'uploading', 0, %s, %s, 'elsewhere:4242:ab', NOW(6) + INTERVAL 1 HOUR), "
          "('p-live', 'uploading', 0, %s, %s, 'elsewhere2:4242:cd', NOW(6) + INTERVAL 1 HOUR)",
          (bytes(16), bytes(32), bytes(16), bytes(32)))
    meta = eng.other()
    try:
        keeper = sessions.start(meta)
    finally:
        meta.close()
    keepers.append(keeper)
    keeper._stop.set()          # this test drives the reaper itself
    assert keeper.reap() == 0   # both heartbeats are fresh: nobody is reaped
    eng.q("UPDATE sessions SET heartbeat = UTC_TIMESTAMP(6) - INTERVAL 10 SECOND WHERE id = %s", (dead,))
    assert keeper.reap() == 1
    assert sorted(r[0] for r in eng.q("SELECT id FROM sessions")) == sorted([live, keeper.session_id])
    # solo freed with exact decrements; both kept (a live session sustains it), its row alone left
    assert eng.q("SELECT COUNT(*) FROM inodes WHERE id = %s", (solo,)) == [(0,)]
    assert eng.q("SELECT nlink FROM inodes WHERE id = %s", (both,)) == [(0,)]
    assert eng.q("SELECT session, inode FROM sustained") == [(live, both)]
    after = eng.refcounts()
    lost = {c: solo_chunks.count(c) for c in solo_chunks}
    assert after == {c: refs[c] - lost.get(c, 0) for c in refs}
    assert sum(after.values()) == sum(slots.values()) - 4
    assert eng.fsck(verify=False).refcount_mismatches == []
    leases = dict(eng.q("SELECT name, lease_until <= NOW(6) FROM packs"))
    assert leases == {"p-dead": 1, "p-live": 0}


def test_a_reaped_mount_registers_again_under_its_id(
        eng: Engine, keepers: list[sessions.SessionKeeper]) -> None:
    # a machine that slept past the timeout: another mount reaped its session meanwhile
    meta = eng.other()
    try:
        keeper = sessions.start(meta)
    finally:
        meta.close()
    keepers.append(keeper)
    keeper._stop.set()          # this test drives the heartbeat itself
    sid = keeper.session_id
    eng.q("DELETE FROM sessions WHERE id = %s", (sid,), sync=False)
    keeper.beat()
    assert eng.q("SELECT id, mode FROM sessions", sync=False) == [(sid, "exclusive")]
    # ... unless another mount took the volume meanwhile: then it stays out, and says so
    eng.q("DELETE FROM sessions WHERE id = %s", (sid,), sync=False)
    eng.q("INSERT INTO sessions (host, pid, store, mode, consistency) VALUES "
          "('elsewhere', 1, %s, 'exclusive', 'session')", ("c" * 32,), sync=False)
    keeper.beat()
    assert [r[0] for r in eng.q("SELECT host FROM sessions", sync=False)] == ["elsewhere"]


def test_fsck_repair_frees_inodes_sustained_by_vanished_sessions(eng: Engine) -> None:
    fs = eng.fs
    fs.sustain_open = True
    fs.db.session_id = 777      # a session whose row is gone (ended or reaped half-way)
    ino = make_file(fs, b"f", b"x" * 100_000, release=False)
    fs.unlink(ROOT, b"f")
    eng.fs.sync()
    eng.abandon(fs)
    eng.fs = eng.new_fs()
    assert eng.q("SELECT session, inode FROM sustained", sync=False) == [(777, ino)]
    with eng.other() as m:
        r = sessioncheck.check(m)
    assert r.orphan_sustained == [(777, ino)] and not r.clean
    with eng.other() as m:
        r = sessioncheck.check(m, repair=True)
    assert r.freed == 1 and r.clean
    assert eng.q("SELECT COUNT(*) FROM inodes WHERE id = %s", (ino,)) == [(0,)]
    assert eng.q("SELECT COUNT(*) FROM sustained") == [(0,)]
    report = eng.fsck(verify=False)
    assert report.refcount_mismatches == [] and report.nlink_mismatches == []


def test_no_reaping_by_heartbeat_age_right_after_an_outage_or_a_stall(
        eng: Engine, keepers: list[sessions.SessionKeeper], monkeypatch: pytest.MonkeyPatch) -> None:
    # after the database was away (or this machine slept) every live mount's heartbeat is
    # old: the first keeper back must not reap the others before they could beat again
    monkeypatch.setenv("CASFS_SESSION_TIMEOUT_S", "30")
    meta = eng.other()
    try:
        keeper = sessions.start(meta)
    finally:
        meta.close()
    keepers.append(keeper)
    keeper._stop.set()
    eng.q("INSERT INTO sessions (host, pid, store, mode, consistency, heartbeat) VALUES "
          "('elsewhere', 1, %s, 'shared', 'session', UTC_TIMESTAMP(6) - INTERVAL 100 SECOND)", ("d" * 32,), sync=False)
    keeper.beat()               # up for less than a timeout: no reaping by age
    assert len(eng.q("SELECT id FROM sessions", sync=False)) == 2
    keeper._healthy_since = (keeper._healthy_since or 0) - 31    # a timeout of beats without a gap
    keeper._last_ok -= 100      # ... but then a stall (suspend, outage) before this beat
    keeper.beat()
    assert len(eng.q("SELECT id FROM sessions", sync=False)) == 2
    keeper._healthy_since = (keeper._healthy_since or 0) - 31    # healthy for a timeout again
    keeper.beat()
    assert eng.q("SELECT id FROM sessions", sync=False) == [(keeper.session_id,)]


# -- review findings (issue 12): the keeper's mode, clocks, long reaps, stop, fsck's lock --

def _start(eng: Engine, **kw: Any) -> sessions.SessionKeeper:
    meta = eng.other()
    try:
        return sessions.start(meta, **kw)
    finally:
        meta.close()


class _Clock:
    """A fake CLOCK_BOOTTIME (seconds) a test advances."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_a_mount_whose_volume_became_shared_while_mounting_is_refused(
        eng: Engine, keepers: list[sessions.SessionKeeper]) -> None:
    # the mount built its engine for a volume that was not shared; a `casfs join` on
    # another machine marked it shared before the session registered: refused, no row
    eng.q("INSERT INTO meta (k, v) VALUES ('shared', '1')")
    with pytest.raises(VolumeError, match="became shared while mounting; mount again"):
        keepers.append(_start(eng, shared=False))
    assert eng.q("SELECT COUNT(*) FROM sessions", sync=False) == [(0,)]
    k = _start(eng, shared=True)
    keepers.append(k)
    assert k.shared and eng.q("SELECT mode FROM sessions", sync=False) == [("shared",)]


def test_a_slow_heartbeat_counts_as_a_gap_and_is_written_when_it_runs(
        eng: Engine, keepers: list[sessions.SessionKeeper], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASFS_SESSION_TIMEOUT_S", "30")
    clock = _Clock()
    monkeypatch.setattr(sessions, "_boottime", clock)
    keeper = _start(eng)
    keepers.append(keeper)
    keeper._stop.set()          # this test drives the heartbeat itself
    eng.q("INSERT INTO sessions (host, pid, store, mode, consistency, heartbeat) VALUES "
          "('elsewhere', 1, %s, 'shared', 'session', UTC_TIMESTAMP(6) - INTERVAL 100 SECOND)", ("d" * 32,), sync=False)
    clock.t += 31               # a timeout of beats without a gap ...
    keeper._healthy_since, keeper._last_ok = clock.t - 31, clock.t
    real = sessions.dbsessions.heartbeat

    def slow(src: Any, session: int, timeout: float | None = None) -> bool:
        clock.t += 40           # ... then a heartbeat statement that blocked past the timeout
        return real(src, session, timeout)
    monkeypatch.setattr(sessions.dbsessions, "heartbeat", slow)
    keeper.beat()
    assert not keeper.may_reap_by_age()
    assert len(eng.q("SELECT id FROM sessions", sync=False)) == 2      # nobody reaped
    monkeypatch.setattr(sessions.dbsessions, "heartbeat", real)
    clock.t += keeper.interval
    keeper.beat()               # the next beat: still less than a timeout since the gap
    assert len(eng.q("SELECT id FROM sessions", sync=False)) == 2
    # the heartbeat is the time the row was written, not the statement's start: hold the
    # row's lock, let the UPDATE wait, then release it after reading the server's time
    hold = pymysql.connect(unix_socket=str(eng.server.socket), user="root", password="", database=eng.dbname)
    try:
        with hold.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("SELECT id FROM sessions WHERE id = %s FOR UPDATE", (keeper.session_id,))
            t = threading.Thread(target=keeper.beat)
            t.start()
            _wait_lock_waits(eng, 0, "a waiting UPDATE")
            cur.execute("SELECT UTC_TIMESTAMP(6)")
            released = cur.fetchone()[0]
            hold.commit()
        t.join(timeout=60)
    finally:
        hold.close()
    (beat,), = eng.q("SELECT heartbeat FROM sessions WHERE id = %s", (keeper.session_id,), sync=False)
    assert beat >= released


def test_heartbeats_and_change_rows_are_utc_whatever_the_time_zone(
        eng: Engine, keepers: list[sessions.SessionKeeper]) -> None:
    # a connection's time zone moving (a DST change) must not age or rejuvenate anything
    keeper = _start(eng)
    keepers.append(keeper)
    keeper._stop.set()
    keeper.db.execute("SET time_zone = '-05:00'")
    keeper.beat()
    with eng.other() as m:
        (row,) = cas.db.sessions.list_sessions(m.db, counts=False)
        assert row.live and row.age_s < keeper.timeout
        m.db.execute("SET time_zone = '-05:00'")
        m.db.transaction(lambda cur: cas.db.changes.record(cur, keeper.session_id, [(ROOT, None, None)]))
    # from a connection in the server's own time zone the change row is seconds old
    with eng.other() as m:
        assert cas.db.changes.prune(m.db, 300) == 0
    assert eng.q("SELECT COUNT(*) FROM changes", sync=False) == [(1,)]


def test_a_long_reap_keeps_beating(
        eng: Engine, keepers: list[sessions.SessionKeeper], monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(sessions, "_boottime", clock)
    keeper = _start(eng)
    keepers.append(keeper)
    keeper._stop.set()
    eng.q("INSERT INTO sessions (host, pid, store, mode, consistency, heartbeat) VALUES "
          "('elsewhere', 1, %s, 'shared', 'session', UTC_TIMESTAMP(6) - INTERVAL 1000 SECOND)", ("d" * 32,),
          sync=False)
    (dead,), = eng.q("SELECT id FROM sessions WHERE host = 'elsewhere'", sync=False)
    eng.q("INSERT INTO sustained (session, inode) VALUES (%s, 900001), (%s, 900002), (%s, 900003), (%s, 900004)",
          (dead,) * 4, sync=False)
    keeper._healthy_since = clock.t - keeper.timeout - 1
    beats = []
    real_beat, real_free = sessions.dbsessions.heartbeat, sessions.dbsessions.free_unlinked

    def counted(src: Any, session: int, timeout: float | None = None) -> bool:
        beats.append(clock.t)
        return real_beat(src, session, timeout)

    def slow_free(cur: Any, ino: int, session: int = 0, timeout: float | None = None) -> bool:
        clock.t += keeper.interval      # each free takes a heartbeat interval
        return real_free(cur, ino, session, timeout)
    monkeypatch.setattr(sessions.dbsessions, "heartbeat", counted)
    monkeypatch.setattr(sessions.dbsessions, "free_unlinked", slow_free)
    keeper.beat()
    assert eng.q("SELECT id FROM sessions", sync=False) == [(keeper.session_id,)]
    # one beat before the reap, one after each interval the reap took (the last one's free
    # is followed by the row's delete, not by another beat)
    assert len(beats) == 4, beats


def _wait_lock_waits(eng: Engine, n: int, what: str) -> None:
    """Wait until more than ``n`` transactions of the test's server wait for a row lock.
    Polled every 0.25 s: InnoDB refreshes INNODB_TRX only when it was last read over
    0.1 s ago (polled faster, it would show the same old rows for ever)."""
    wait_for(lambda: _lock_waits(eng) > n, what, interval=0.25)


def _lock_waits(eng: Engine) -> int:
    """Transactions of the test's server waiting for a row lock now."""
    return int(eng.q("SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'",
                     sync=False)[0][0])


def test_stop_ends_the_session_on_a_fresh_connection_while_the_thread_is_busy(
        eng: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASFS_SESSION_TIMEOUT_S", "2")
    keeper = _start(eng)
    keeper.join_timeout_s = 0.2
    hold = pymysql.connect(unix_socket=str(eng.server.socket), user="root", password="", database=eng.dbname)
    try:
        with hold.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("SELECT id FROM sessions WHERE id = %s FOR UPDATE", (keeper.session_id,))
            # the thread's next heartbeat waits for the row
            _wait_lock_waits(eng, 0, "a waiting heartbeat")
            stopper = threading.Thread(target=keeper.stop)
            stopper.start()
            # stop() gave up waiting for the thread and ends the session on a new connection,
            # which waits for the row too; the keeper's own connection is left to its thread
            _wait_lock_waits(eng, 1, "stop's DELETE")
            assert keeper._thread is not None and keeper._thread.is_alive()
            hold.commit()
        stopper.join(timeout=60)
        assert not stopper.is_alive()
        keeper._thread.join(timeout=60)
    finally:
        hold.close()
    assert eng.q("SELECT COUNT(*) FROM sessions", sync=False) == [(0,)]   # ended, not registered again


def test_fsck_repair_session_is_exclusive_on_a_shared_volume(
        eng: Engine, keepers: list[sessions.SessionKeeper]) -> None:
    eng.q("INSERT INTO meta (k, v) VALUES ('shared', '1')")
    repair = _start(eng, exclusive=True)
    keepers.append(repair)
    assert eng.q("SELECT mode FROM sessions", sync=False) == [("exclusive",)]
    with pytest.raises(VolumeError, match="mounted exclusively"):
        keepers.append(_start(eng, shared=True))
    repair.stop()
    keepers.remove(repair)
    keepers.append(_start(eng, shared=True))
    with pytest.raises(VolumeError, match="already mounted by"):     # and no repair beside a mount
        keepers.append(_start(eng, exclusive=True))


def test_a_failed_nowait_of_mysql_8_is_retried(eng: Engine) -> None:
    # MySQL 8 reports a failed NOWAIT as 3572 (MariaDB: 1205); the reaper's chunk locks
    # rely on Database.transaction retrying it
    calls: list[int] = []

    def body(cur: Any) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise pymysql.err.OperationalError(3572, "Statement aborted because lock(s) could not be "
                                                     "acquired immediately and NOWAIT is set.")
        cur.execute("SELECT 1")
        return int(cur.fetchone()[0])
    with eng.other() as m:
        assert m.db.transaction(body) == 1
    assert len(calls) == 2
