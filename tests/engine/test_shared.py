"""Engine tests of shared mode (docs/sharing.md): two Filesystem objects in shared mode
on one volume database stand for two machines, each with its own connection, RAM
caches and session id (set by hand: the sessions table need not have the rows). They
share one chunk store directory here (the engine test's shortcut: the data plane across
stores is not what these tests look at). Expected refcounts are computed from the bytes
the test wrote (hashlib), never taken from the engine.
"""
from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

import cas.db.database
import cas.db.manifests
import cas.db.namespace
import cas.maint.fsck
from cas.db.changes import POLL_ROWS
from cas.db.server import EmbeddedServer
from cas.engine.coherence import PRUNE_EVERY_S, ChangeFeed
from cas.engine.fs import Filesystem
from cas.errors import FsError
from tests.engine.test_fs import CS, ROOT, UID, GID, Engine, expected_refs, sha
from tests.waiting import wait_for

MODE = 0o644


class Shared:
    """An engine-test volume with two shared-mode Filesystems, A (session 1) and B
    (session 2)."""

    def __init__(self, tmp_path: Path, server: EmbeddedServer) -> None:
        self.eng = Engine(tmp_path, server)
        self.eng.fs.close()          # the plain one: not used here
        self.eng.opened.clear()
        self.a = self._open(1)
        self.b = self._open(2)

    def _open(self, session: int) -> Filesystem:
        meta = cas.db.database.connect(self.eng.vol)
        meta.db.session_id = session
        fs = Filesystem(meta, cache_bytes=16 << 20, shared=True)
        self.eng.opened.append(fs)
        return fs

    def q(self, sql: str, args: object = None) -> list[tuple[object, ...]]:
        with self.eng.admin.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def refcounts(self) -> dict[bytes, int]:
        return {bytes(r[0]): int(r[1]) for r in self.q("SELECT id, refcount FROM chunks") if int(r[1]) > 0}

    def fsck(self) -> cas.maint.fsck.FsckReport:
        with self.eng.other() as m:
            return cas.maint.fsck.check(m)


@pytest.fixture
def two(tmp_path: Path, mysql_server: EmbeddedServer) -> Iterator[Shared]:
    s = Shared(tmp_path, mysql_server)
    try:
        yield s
    finally:
        s.eng.close()


def _write_file(fs: Filesystem, ino: int, content: bytes) -> None:
    fs.write(ino, 0, content)
    fs.fsync(ino)


def test_refcount_deltas_come_from_the_manifest_rows(two: Shared) -> None:
    """B loaded the manifest of f, then A replaced slot 0 and committed; B then replaces
    slot 0 too (and truncates slot 2 away). The decrements must hit the chunk A wrote
    (what the rows name), not the one B's RAM manifest names: refcounts stay exact and
    fsck is clean. On the old code (decrements from RAM) chunk X0 went to -1 (clamped) and
    Y0 kept a reference no row makes."""
    a, b = two.a, two.b
    x = [os.urandom(CS) for _ in range(3)]
    f = a.create(ROOT, b"f", MODE, UID, GID).ino
    _write_file(a, f, b"".join(x))
    b.open(f)                        # B's RAM manifest: slots 0, 1, 2 -> X0, X1, X2
    y0 = os.urandom(CS)
    a.write(f, 0, y0)
    a.fsync(f)                       # committed: slot 0 -> Y0, X0 has no reference
    z0 = os.urandom(CS)
    b.write(f, 0, z0)                # B has not polled: it still thinks slot 0 is X0
    b.setattr(f, size=2 * CS)        # and cuts slot 2 (X2) off
    b.fsync(f)
    final = z0 + x[1]
    assert two.refcounts() == dict(expected_refs(final))
    assert sha(y0) not in two.refcounts() and sha(x[0]) not in two.refcounts()
    report = two.fsck()
    assert report.refcount_mismatches == [] and report.clean, report
    # both sides read the committed file after a poll
    a.poll_changes()
    a.open(f)
    assert a.read(f, 0, 3 * CS) == final
    assert b.read(f, 0, 3 * CS) == final


def test_change_log_window_sees_a_row_committed_after_a_later_one(two: Shared) -> None:
    """A change row whose id was handed out before a poll but whose transaction commits
    after it (ids are not commit order) is still seen by the next poll, once, and what it
    names is dropped from RAM."""
    a = two.a
    d = a.mkdir(ROOT, b"d", 0o755, UID, GID).ino
    assert a.getattr(d).mode & 0o777 == 0o755      # cached in A's RAM now
    a.poll_changes()
    slow = pymysql.connect(unix_socket=str(two.eng.server.socket), user="root", password="",
                           database=two.eng.dbname, autocommit=False)
    try:
        with slow.cursor() as cur:   # another machine's chmod, its change row not committed yet
            cur.execute("UPDATE inodes SET mode = %s WHERE id = %s", (0o40700, d))
            cur.execute("INSERT INTO changes (session, inode) VALUES (7, %s)", (d,))
            cur.execute("SELECT LAST_INSERT_ID()")
            early = int(cur.fetchone()[0])
        two.q("INSERT INTO changes (session, inode) VALUES (7, %s)", (ROOT,))   # a later id, committed
        late = int(two.q("SELECT MAX(id) FROM changes")[0][0])
        assert late > early
        seen: list[int] = []
        a.on_changes = lambda rows: seen.extend(c.id for c in rows)
        assert a.poll_changes() == 1 and seen == [late]
        assert a.getattr(d).mode & 0o777 == 0o755     # not committed: the old mode
        slow.commit()
    finally:
        slow.close()
    assert a.poll_changes() == 1 and seen == [late, early]
    assert a.getattr(d).mode & 0o777 == 0o700     # dropped from RAM, read again
    assert a.poll_changes() == 0 and seen == [late, early]   # never twice


class FakeClock:
    """A monotonic clock (seconds) the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _slow_change(two: Shared, inode: int) -> tuple[pymysql.connections.Connection, int]:
    """Another machine's transaction that inserted a change row for ``inode`` and has not
    committed: (its connection, the row's id)."""
    slow = pymysql.connect(unix_socket=str(two.eng.server.socket), user="root", password="",
                           database=two.eng.dbname, autocommit=False)
    with slow.cursor() as cur:
        cur.execute("INSERT INTO changes (session, inode) VALUES (7, %s)", (inode,))
        cur.execute("SELECT LAST_INSERT_ID()")
        return slow, int(cur.fetchone()[0])


def test_polls_further_apart_than_the_window_see_a_row_committed_late(two: Shared) -> None:
    """At `eventual` polls are 10 s apart, twice the window: a row whose id was handed
    out before the poll at 100 s and that commits just after it is returned by the poll
    at 110 s (the old feed raised ``low`` past it before reading), once. And a mount
    that writes while the others are idle moves ``low`` past its own rows."""
    a = two.a
    clock = FakeClock(90.0)
    a.feed = ChangeFeed(clock=clock)
    a.feed.start(a.db, a.db.session_id)
    seen: list[int] = []
    a.on_changes = lambda rows: seen.extend(c.id for c in rows)
    slow, early = _slow_change(two, ROOT)
    try:
        two.q("INSERT INTO changes (session, inode) VALUES (7, %s)", (ROOT,))
        late = int(two.q("SELECT MAX(id) FROM changes")[0][0])
        clock.now = 100.0
        assert a.poll_changes() == 1 and seen == [late]
        slow.commit()                # at 100.01 s
    finally:
        slow.close()
    clock.now = 110.0
    assert a.poll_changes() == 1 and seen == [late, early]
    clock.now = 120.0
    assert a.poll_changes() == 0 and seen == [late, early]   # never twice
    # a lone writer: A's own rows are never returned, and ``low`` passes them
    for i in range(3):
        a.mkdir(ROOT, b"lone%d" % i, 0o755, UID, GID)
    mine = int(two.q("SELECT MAX(id) FROM changes")[0][0])
    assert mine > late
    for t in (130.0, 140.0, 150.0):
        clock.now = t
        assert a.poll_changes() == 0
    assert a.feed.low >= mine and not a.feed.seen


def test_a_mount_sees_a_lower_id_that_commits_after_it_started(two: Shared) -> None:
    """A mount starting while a change row with a lower id than the latest is not yet
    committed sees it once it commits (the old feed started at the latest id)."""
    slow, early = _slow_change(two, ROOT)
    try:
        two.q("INSERT INTO changes (session, inode) VALUES (7, %s)", (ROOT,))
        late = int(two.q("SELECT MAX(id) FROM changes")[0][0])
        c = two._open(3)             # starts now: late is committed, early is not
        seen: list[int] = []
        c.on_changes = lambda rows: seen.extend(ch.id for ch in rows)
        assert c.poll_changes() == 0
        slow.commit()
    finally:
        slow.close()
    assert late > early
    assert c.poll_changes() == 1 and seen == [early]


def test_prune_deletes_every_old_row_without_the_engine_lock(two: Shared) -> None:
    """Pruning deletes every row older than CHANGES_KEEP_S, more than one batch, and
    runs on a connection of its own while another thread holds the engine lock (the old
    prune deleted at most one batch a minute, under the lock)."""
    a = two.a
    with two.eng.admin.cursor() as cur:
        cur.executemany("INSERT INTO changes (session, inode, at) VALUES (%s, %s, NOW(6) - INTERVAL 10 MINUTE)",
                        [(9, i) for i in range(2 * POLL_ROWS + 7)])
        cur.execute("INSERT INTO changes (session, inode) VALUES (9, 1)")   # recent: kept
    done: list[int] = []
    with a.lock:
        t = threading.Thread(target=lambda: done.append(a.prune_changes()), daemon=True)
        t.start()
        t.join(timeout=120)
    assert done == [2 * POLL_ROWS + 7]
    assert two.q("SELECT COUNT(*) FROM changes")[0][0] == 1
    # the background poll's path: due after PRUNE_EVERY_S
    with two.eng.admin.cursor() as cur:
        cur.executemany("INSERT INTO changes (session, inode, at) VALUES (%s, %s, NOW(6) - INTERVAL 10 MINUTE)",
                        [(9, i) for i in range(POLL_ROWS + 1)])
    clock = FakeClock(0.0)
    a.feed = ChangeFeed(clock=clock)
    a.feed.start(a.db, a.db.session_id)
    clock.now = PRUNE_EVERY_S + 1
    a.poll_changes(prune=True)
    assert two.q("SELECT COUNT(*) FROM changes")[0][0] == 1


def test_a_file_state_is_read_from_one_commit(two: Shared, monkeypatch: pytest.MonkeyPatch) -> None:
    """B's refresh and load of a file's state read its size and manifest in one
    consistent read: A's commit (cut to one slot, slot 0 rewritten) landing right after
    B's first statement leaves B with the old commit's pair or the new one's, never the
    old size over the new manifest (the old code's two statements). The commit is run
    from inside B's first statement's read helper, after it returned."""
    a, b = two.a, two.b
    f = a.create(ROOT, b"f", MODE, UID, GID).ino
    x = [os.urandom(CS) for _ in range(2)]
    _write_file(a, f, b"".join(x))
    b.open(f)
    old = (2 * CS, {0: sha(x[0]), 1: sha(x[1])})
    real = {mod: mod.rows for mod in (cas.db.namespace, cas.db.manifests)}

    def commit_on_a_after_the_first_read() -> list[bool]:
        fired: list[bool] = []

        def hooked(mod: Any) -> Callable[..., list[tuple[Any, ...]]]:
            def call(src: Any, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
                got = real[mod](src, sql, args)
                if not fired and "inodes" in sql:
                    fired.append(True)
                    y = os.urandom(CS)
                    a.setattr(f, size=CS)
                    a.write(f, 0, y)
                    a.fsync(f)
                    news.append((CS, {0: sha(y)}))
                return got
            return call
        for mod in real:
            monkeypatch.setattr(mod, "rows", hooked(mod))
        return fired

    news: list[tuple[int, dict[int, bytes]]] = []
    st = b.data.states[f]
    fired = commit_on_a_after_the_first_read()
    b.data.refresh(st)
    assert fired and (st.size, st.manifest) in [old, news[-1]], news
    for mod, fn in real.items():
        monkeypatch.setattr(mod, "rows", fn)
    b.data.states.pop(f)                     # B loads the file's state afresh
    fired = commit_on_a_after_the_first_read()
    st2 = b.data.load_state(f)
    assert fired and (st2.size, st2.manifest) in [news[-2], news[-1]], news


def test_namespace_operations_are_checked_in_the_database(two: Shared) -> None:
    """What another machine did is checked under row locks, whatever this one has in
    RAM: a name it created is EEXIST here, a name it removed is ENOENT, a directory it
    filled is ENOTEMPTY, a directory it removed takes no new entries (ENOENT); change
    rows name each change for the other side."""
    a, b = two.a, two.b
    d = a.mkdir(ROOT, b"d", 0o755, UID, GID).ino
    with pytest.raises(FsError) as exc:      # B looked nothing up: the database says EEXIST
        b.mkdir(ROOT, b"d", 0o755, UID, GID)
    assert exc.value.errno == errno.EEXIST
    with pytest.raises(FsError) as exc:       # a lookup that found nothing is not remembered
        b.lookup(d, b"x")
    assert exc.value.errno == errno.ENOENT
    a.create(d, b"x", MODE, UID, GID)
    assert b.lookup(d, b"x").mode & 0o777 == MODE
    with pytest.raises(FsError) as exc:      # B's RAM knows d as empty: the rows do not
        b.rmdir(ROOT, b"d")
    assert exc.value.errno == errno.ENOTEMPTY
    a.unlink(d, b"x")
    with pytest.raises(FsError) as exc:
        b.unlink(d, b"x")
    assert exc.value.errno == errno.ENOENT
    a.rmdir(ROOT, b"d")
    # d's row is gone (A freed it): ESTALE, on which the kernel walks the path again and
    # tells the caller ENOENT; while the row lives, the parent check says ENOENT itself
    gone = errno.ESTALE if not two.q("SELECT id FROM inodes WHERE id = %s", (d,)) else errno.ENOENT
    with pytest.raises(FsError) as exc:      # B's attribute cache still has d as a directory
        b.create(d, b"y", MODE, UID, GID)
    assert exc.value.errno == gone
    with pytest.raises(FsError) as exc:      # nor a subdirectory (its nlink count must not revive d)
        b.mkdir(d, b"sub", 0o755, UID, GID)
    assert exc.value.errno == gone
    b.mkdir(ROOT, b"r", 0o755, UID, GID)
    with pytest.raises(FsError) as exc:      # nor a directory renamed into it
        b.rename(ROOT, b"r", d, b"z")
    assert exc.value.errno == gone
    seen: list[tuple[int, int | None, bytes | None]] = []
    b.on_changes = lambda rows: seen.extend((c.inode, c.parent, c.name) for c in rows)
    b.poll_changes()
    assert (d, ROOT, b"d") in seen and any(p == d and n == b"x" for _, p, n in seen)
    assert not two.q("SELECT * FROM dentries WHERE parent = %s", (d,))
    report = two.fsck()
    assert report.clean, report


def test_a_poll_reloads_an_open_file_under_its_dirty_slots(two: Shared) -> None:
    """B has f open with a dirty slot 1 when A commits a new slot 0: B's poll reloads
    the committed manifest under B's dirty slot (B then reads A's slot 0 and its own
    slot 1, its size stays its own), and B's commit keeps A's slot 0."""
    a, b = two.a, two.b
    x0, x1 = os.urandom(CS), os.urandom(CS)
    f = a.create(ROOT, b"f", MODE, UID, GID).ino
    _write_file(a, f, x0 + x1)
    b.poll_changes()
    b.open(f)
    z1 = os.urandom(CS)
    b.write(f, CS, z1)               # dirty here, not written back
    y0 = os.urandom(CS)
    a.write(f, 0, y0)
    a.fsync(f)
    assert b.read(f, 0, CS) == x0    # not polled yet: what B loaded
    assert b.poll_changes() >= 1
    assert b.read(f, 0, 2 * CS) == y0 + z1
    assert b.getattr(f).size == 2 * CS
    b.fsync(f)
    assert two.refcounts() == dict(expected_refs(y0 + z1))
    a.poll_changes()
    assert a.read(f, 0, 2 * CS) == y0 + z1
    assert two.fsck().clean


def test_consistency_option_sources(tmp_path: Path, mysql_server: EmbeddedServer) -> None:
    """--consistency, -o consistency=..., [mount] consistency (checked: a bad level is a
    one-line VolumeError), default session; an unknown level is refused by the engine."""
    from tools.cli import mount as mount_cmd
    from tools.cli.fstab import expand_options
    from tools.cli.mountcmd import MountOptions, consistency_of
    from cas.errors import InvalidArgument, VolumeError
    assert expand_options(mount_cmd, "consistency=strong") == ["--consistency", "strong"]
    eng = Engine(tmp_path, mysql_server)
    try:
        vol = eng.vol
        assert consistency_of(vol, MountOptions()) == "session"
        vol.mount["consistency"] = "eventual"
        assert consistency_of(vol, MountOptions()) == "eventual"
        assert consistency_of(vol, MountOptions(consistency="strong")) == "strong"
        vol.mount["consistency"] = "sometimes"
        with pytest.raises(VolumeError, match="consistency 'sometimes'"):
            consistency_of(vol, MountOptions())
        with eng.other() as m, pytest.raises(InvalidArgument):
            Filesystem(m, consistency="sometimes")
    finally:
        eng.close()


def test_the_last_commit_is_one_file_size_and_slots(two: Shared) -> None:
    """A grows f to 4 slots while B, which loaded it at 2 slots, rewrites slot 0: B's
    commit (the last) is the file: its size, its slots, no rows past its size (their
    references dropped), and data_bytes from the rows (invariant 14); growing the file
    again shows zeros there, not A's old slots."""
    a, b = two.a, two.b
    x = [os.urandom(CS) for _ in range(4)]
    f = a.create(ROOT, b"f", MODE, UID, GID).ino
    _write_file(a, f, x[0] + x[1])
    b.poll_changes()
    b.open(f)                          # B: 2 slots
    a.write(f, 2 * CS, x[2] + x[3])
    a.fsync(f)                         # committed: 4 slots
    z0 = os.urandom(CS)
    b.write(f, 0, z0)
    b.fsync(f)                         # the last commit: 2 slots, slot 0 rewritten
    assert two.refcounts() == dict(expected_refs(z0 + x[1]))
    assert two.q("SELECT size, data_bytes FROM inodes WHERE id = %s", (f,)) == [(2 * CS, 2 * CS)]
    assert two.fsck().clean
    b.setattr(f, size=4 * CS)
    assert b.read(f, 0, 4 * CS) == z0 + x[1] + bytes(2 * CS)
    a.poll_changes()
    a.open(f)
    assert a.read(f, 0, 4 * CS) == z0 + x[1] + bytes(2 * CS)


def test_crossing_renames_of_two_machines_never_fail(two: Shared) -> None:
    """A moves files from d1 to d2 while B moves others from d2 to d1, both creating and
    removing files there: their bodies lock the two directories in opposite orders, and
    InnoDB rolls one back as a deadlock victim now and then. A shared mount runs that
    body again (it was alone in its transaction: nothing else is lost), so no operation
    fails, and every name and link count is right afterwards (fsck clean)."""
    import threading
    a, b = two.a, two.b
    d1 = a.mkdir(ROOT, b"d1", 0o755, UID, GID).ino
    d2 = a.mkdir(ROOT, b"d2", 0o755, UID, GID).ino
    n = 40
    for i in range(n):
        for fs, d, tag in ((a, d1, b"a"), (b, d2, b"b")):
            fs.release(fs.create(d, tag + b"%d" % i, MODE, UID, GID).ino)
    errors: list[BaseException] = []

    def run(fs: Filesystem, src: int, dst: int, tag: bytes) -> None:
        try:
            for i in range(n):
                fs.rename(src, tag + b"%d" % i, dst, tag + b"%d" % i)
                fs.release(fs.create(src, tag + b"new%d" % i, MODE, UID, GID).ino)
                fs.unlink(src, tag + b"new%d" % i)
                fs.mkdir(dst, tag + b"dir%d" % i, 0o755, UID, GID)
        except BaseException as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a, d1, d2, b"a")),
               threading.Thread(target=run, args=(b, d2, d1, b"b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    names = {(int(p), bytes(nm)) for p, nm in two.q("SELECT parent, name FROM dentries WHERE parent IN (%s, %s)",
                                                     (d1, d2))}
    want = ({(d2, b"a%d" % i) for i in range(n)} | {(d1, b"b%d" % i) for i in range(n)}
            | {(d2, b"adir%d" % i) for i in range(n)} | {(d1, b"bdir%d" % i) for i in range(n)})
    assert names == want
    assert two.fsck().clean


def _lock_waits(two: Shared) -> int:
    """How many statements on this test's database have been running for over half a
    second (blocked on a row lock: each of these is a single-row statement)."""
    return int(two.q("SELECT COUNT(*) FROM information_schema.processlist WHERE db = %s AND command = 'Query' "
                     "AND time_ms > 500 AND info NOT LIKE %s", (two.eng.dbname, "%processlist%"))[0][0])


def test_two_machines_cannot_move_directories_into_each_other(two: Shared) -> None:
    """A moves /P to /Q/q1/P while B moves /Q to /P/p1/Q. Each check that the target is
    not below the moved directory reads the parent chain before the other rename
    commits; a third connection holds the root's row (both renames touch it) so that
    both bodies are in flight at once. With the volume-wide rename lock (taken first
    by every cross-directory rename of a shared mount) the second waits for the first
    and then finds the cycle: exactly one rename is done, the other is EINVAL, every
    directory stays reachable from the root (fsck clean)."""
    a, b = two.a, two.b
    p = a.mkdir(ROOT, b"P", 0o755, UID, GID).ino
    p1 = a.mkdir(p, b"p1", 0o755, UID, GID).ino
    q = a.mkdir(ROOT, b"Q", 0o755, UID, GID).ino
    q1 = a.mkdir(q, b"q1", 0o755, UID, GID).ino
    a.release(a.create(ROOT, b"f", MODE, UID, GID).ino)
    a.rename(ROOT, b"f", p, b"f")   # a cross-directory rename: a waiter on its lock's row is a lock wait
    results: dict[str, BaseException | None] = {}

    def run(fs: Filesystem, tag: str, old: bytes, new_parent: int) -> None:
        try:
            fs.rename(ROOT, old, new_parent, old)
            results[tag] = None
        except BaseException as exc:   # noqa: BLE001 - checked below
            results[tag] = exc

    holder = pymysql.connect(unix_socket=str(two.eng.server.socket), user="root", password="",
                             database=two.eng.dbname, autocommit=False)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT id FROM inodes WHERE id = %s FOR UPDATE", (ROOT,))
        threads = [threading.Thread(target=run, args=(a, "A", b"P", q1)),
                   threading.Thread(target=run, args=(b, "B", b"Q", p1))]
        for t in threads:
            t.start()
        # both bodies in flight: waiting for a row lock
        wait_for(lambda: _lock_waits(two) >= 2, "the two renames both waiting for a row lock", 30)
    finally:
        holder.rollback()
        holder.close()
    for t in threads:
        t.join(timeout=60)
    assert set(results) == {"A", "B"}
    failed = [exc for exc in results.values() if exc is not None]
    assert len(failed) == 1, results
    assert isinstance(failed[0], FsError) and failed[0].errno == errno.EINVAL
    parents = {int(i): int(par) for par, i in two.q("SELECT parent, inode FROM dentries WHERE inode IN (%s, %s)",
                                                   (p, q))}
    assert parents in ({p: q1, q: ROOT}, {p: ROOT, q: p1})
    report = two.fsck()
    assert report.clean, report


def test_fsck_reports_directories_cut_off_from_the_root(two: Shared) -> None:
    """A dentry cycle (P in Q and Q in P, made here by hand in the rows) leaves both
    directories and everything below them unreachable from the root: fsck lists them
    and is not clean (`casfs fsck` exits 1)."""
    a = two.a
    p = a.mkdir(ROOT, b"P", 0o755, UID, GID).ino
    p1 = a.mkdir(p, b"p1", 0o755, UID, GID).ino
    q = a.mkdir(ROOT, b"Q", 0o755, UID, GID).ino
    assert two.fsck().clean
    two.q("UPDATE dentries SET parent = %s WHERE inode = %s", (q, p))
    two.q("UPDATE dentries SET parent = %s WHERE inode = %s", (p1, q))
    report = two.fsck()
    assert report.unreachable_dirs == sorted([p, p1, q])
    assert not report.clean


def test_open_o_creat_of_a_name_another_machine_created_opens_it(two: Shared) -> None:
    """B's kernel may send FUSE CREATE for a name A created after B last looked (a
    negative entry it cached): without O_EXCL that is an open of the existing file
    (POSIX open(2)), with O_TRUNC applied; O_EXCL stays EEXIST and a directory EISDIR.
    A shared mount's negative lookups are not cached by the kernel at all."""
    import types
    import pyfuse3
    import trio
    from fusefront.operations import CasOperations
    a, b = two.a, two.b
    ops = CasOperations(b)
    ops.invalidator = None                    # no kernel here to send invalidations to
    b.on_changes = lambda rows: None
    ctx = types.SimpleNamespace(uid=UID, gid=GID, umask=0o022, pid=os.getpid())
    f = a.create(ROOT, b"log", MODE, UID, GID).ino
    _write_file(a, f, b"hello")
    a.release(f)
    a.mkdir(ROOT, b"dir", 0o755, UID, GID)

    async def main() -> None:
        e = await ops.lookup(ROOT, b"nope")
        assert e.st_ino == 0 and e.entry_timeout == 0, "a negative entry the kernel would cache"
        fi, e = await ops.create(ROOT, b"log", MODE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, ctx)
        assert fi.fh == f and e.st_ino == f and e.st_size == 5
        b.release(f)
        fi, e = await ops.create(ROOT, b"log", MODE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, ctx)
        assert fi.fh == f and e.st_size == 0
        b.release(f)
        for name, flags, err in ((b"log", os.O_CREAT | os.O_EXCL, errno.EEXIST), (b"dir", os.O_CREAT, errno.EISDIR)):
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await ops.create(ROOT, name, MODE, os.O_WRONLY | flags, ctx)
            assert exc.value.errno == err

    trio.run(main)
    assert f not in b.data.states            # every open was released
    a.poll_changes()                          # B's truncation, committed at its release
    assert a.getattr(f).size == 0
    assert two.fsck().clean


def test_a_namespace_change_waiting_for_a_row_lock_leaves_the_loop_free(two: Shared) -> None:
    """On a shared volume a mkdir is its own commit and may wait for another machine's
    row lock (here a third connection holds the parent's row): the FUSE layer runs it
    in a worker thread, so the trio loop serves other requests meanwhile (here: a task
    that sees the wait and releases the lock). On the loop thread the wait would block
    that task until a watchdog released the lock. A shared mount's row lock waits end
    after SHARED_LOCK_WAIT_S (10 s), not the server's 50 s."""
    import threading
    import time
    import types
    import trio
    from cas.engine.fs import SHARED_LOCK_WAIT_S
    from fusefront.operations import CasOperations
    b = two.b
    assert int(b.db.query("SELECT @@SESSION.innodb_lock_wait_timeout")[0][0]) == SHARED_LOCK_WAIT_S
    ops = CasOperations(b)
    ops.invalidator = None                    # no kernel here to send invalidations to
    b.on_changes = lambda rows: None
    ctx = types.SimpleNamespace(uid=UID, gid=GID, umask=0o022, pid=os.getpid())
    holder = pymysql.connect(unix_socket=str(two.eng.server.socket), user="root", password="",
                             database=two.eng.dbname, autocommit=False)
    guard = threading.Lock()
    released_by: list[str] = []

    def release(who: str) -> None:
        with guard:
            if not released_by:
                released_by.append(who)
                holder.rollback()

    with holder.cursor() as cur:
        cur.execute("SELECT id FROM inodes WHERE id = %s FOR UPDATE", (ROOT,))
    watchdog = threading.Timer(SHARED_LOCK_WAIT_S / 2, release, args=("watchdog",))
    watchdog.start()

    async def releaser() -> None:
        deadline = time.monotonic() + SHARED_LOCK_WAIT_S / 2
        while await trio.to_thread.run_sync(_lock_waits, two) < 1:
            if time.monotonic() > deadline:
                return   # never seen waiting: the assertion below reports it
            await trio.sleep(0.05)
        await trio.to_thread.run_sync(release, "loop")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(releaser)
            await ops.mkdir(ROOT, b"m", 0o755, ctx)

    try:
        trio.run(main)
    finally:
        watchdog.cancel()
        release("cleanup")
        holder.close()
    assert released_by == ["loop"], "the mkdir's lock wait blocked the trio loop"
    assert b.lookup(ROOT, b"m").mode & 0o7777 == 0o755


def test_an_inode_another_machine_freed_is_estale(two: Shared) -> None:
    """B's kernel holds inode f; A unlinks and frees it. An inode-number operation on B
    (getattr, open, setattr) is ESTALE, not ENOENT: Linux then walks the path again
    and finds what the name is now."""
    a, b = two.a, two.b
    f = a.create(ROOT, b"f", MODE, UID, GID).ino
    a.release(f)
    assert b.lookup(ROOT, b"f").ino == f
    a.unlink(ROOT, b"f")
    a.forget([(f, 1)])                        # A's kernel lets go: A frees the inode
    assert not two.q("SELECT id FROM inodes WHERE id = %s", (f,))
    b.poll_changes()                          # drops f from B's caches
    for call in (lambda: b.getattr(f, fresh=True), lambda: b.open(f), lambda: b.setattr(f, mode=0o600)):
        with pytest.raises(FsError) as exc:
            call()
        assert exc.value.errno == errno.ESTALE
