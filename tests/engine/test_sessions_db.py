"""Sessions at the engine level, on a real MariaDB (cas/db/sessions.py,
cas/engine/sessions.py; docs/sharing.md "Sessions", "Reaping"): registrations that start at
once, the reaper's exact frees, lease expiry, and sessions it must leave alone.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import cas.db.database
from cas.engine import sessions
from cas.maint import sessioncheck
from cas.errors import VolumeError
from tests.engine.test_fs import ROOT, Engine, eng, make_file  # noqa: F401 - the fixture


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
    eng.q(ins + "NOW(6))", ("elsewhere", 4242, "a" * 32))
    eng.q(ins + "NOW(6) + INTERVAL 1 HOUR)", ("elsewhere2", 4242, "b" * 32))   # live throughout
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
    eng.q("UPDATE sessions SET heartbeat = NOW(6) - INTERVAL 10 SECOND WHERE id = %s", (dead,))
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
          "('elsewhere', 1, %s, 'shared', 'session', NOW(6) - INTERVAL 100 SECOND)", ("d" * 32,), sync=False)
    keeper.beat()               # up for less than a timeout: no reaping by age
    assert len(eng.q("SELECT id FROM sessions", sync=False)) == 2
    keeper._healthy_since = (keeper._healthy_since or 0) - 31    # a timeout of beats without a gap
    keeper._last_ok -= 100      # ... but then a stall (suspend, outage) before this beat
    keeper.beat()
    assert len(eng.q("SELECT id FROM sessions", sync=False)) == 2
    keeper._healthy_since = (keeper._healthy_since or 0) - 31    # healthy for a timeout again
    keeper.beat()
    assert eng.q("SELECT id FROM sessions", sync=False) == [(keeper.session_id,)]
