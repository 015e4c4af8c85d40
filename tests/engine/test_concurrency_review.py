"""Rules of the concurrent engine found broken by a review (docs/concurrency.md): each
test fails on the engine before its fix.

Real MariaDB; the other thread acts from inside a flush's store step (tests/engine/
test_flight.py, ``during_store``), where the engine lock is released.
"""
from __future__ import annotations

import random

from tests.engine.test_fs import CS, GID, ROOT, UID, Engine, eng  # noqa: F401
from tests.engine.test_flight import during_store, joined, read_all, reread


def test_truncate_of_an_unopened_file_keeps_a_state_opened_during_its_flush(eng: Engine) -> None:
    """setattr(size) of a file not open here loads a state for the truncate; during the
    truncate's flight another thread opens and writes the file. The truncate must not
    drop the state the other thread now holds: its fsynced bytes survive a remount."""
    fs = eng.fs
    rng = random.Random(2)
    a = fs.create(ROOT, b"f", 0o644, UID, GID)
    fs.write(a.ino, 0, rng.randbytes(2 * CS))
    fs.fsync(a.ino)
    fs.release(a.ino)
    assert a.ino not in fs.data.states
    newer = rng.randbytes(1000)

    def other() -> None:
        fs.open(a.ino)
        fs.write(a.ino, 0, newer)

    threads = during_store(fs, other)
    fs.setattr(a.ino, size=CS // 2)        # truncate(1) on a path: the file is not open here
    joined(fs, threads)
    assert fs.data.states[a.ino].opens == 1
    fs.fsync(a.ino)                         # succeeds
    got_before_release = read_all(fs, a.ino)[:1000] == newer if a.ino in fs.data.states else None
    fs.release(a.ino)
    assert reread(eng, a.ino)[:1000] == newer, f"fsynced write lost (state in RAM after fsync: {got_before_release})"


def test_group_lost_after_the_trio_loop_ended_still_resyncs_the_engine(eng: Engine) -> None:
    """At unmount (after trio.run returned) a group lost at the final commit reaches the
    FUSE layer's group_lost hook: the engine's resync must run (it gives the flushed
    bytes back as buffers, which then go to the rescue area), although the loop the
    hook would clear its tables on has ended (trio.RunFinishedError)."""
    import trio
    from fusefront.operations import CasOperations
    from tests.engine.test_writeback import _kill_session
    fs = eng.fs
    ops = CasOperations(fs)

    async def grab() -> None:
        ops.token = trio.lowlevel.current_trio_token()
    trio.run(grab)
    rng = random.Random(3)
    a = fs.create(ROOT, b"g", 0o644, UID, GID)
    fs.write(a.ino, 0, rng.randbytes(100))
    fs.fsync(a.ino)
    data = rng.randbytes(2 * CS)
    fs.write(a.ino, 0, data)
    fs.data.flush(fs.data.states[a.ino])   # joined the open group: bytes in `unsynced`
    fs.release(a.ino)
    _kill_session(eng, fs)
    calls: list[int] = []
    orig = fs.data.reload_all
    fs.data.reload_all = lambda: calls.append(1) or orig()  # type: ignore[method-assign]
    try:
        left, err = fs.commit_all()       # what _close_or_rescue runs after serve() returned
        exc = None
    except BaseException as e:  # noqa: BLE001
        exc = e
        left = []
    assert exc is None or not isinstance(exc, trio.RunFinishedError), exc
    assert a.ino in [ino for ino, _, _, _ in left]     # uncommitted: rescued by the caller
    assert fs.data.states[a.ino].dirty                  # its bytes are buffers again
    assert calls, f"the engine's resync never ran ({type(exc).__name__}); uncommitted files left: {left}"


def test_a_write_kept_on_the_loop_never_flushes_or_loads(eng: Engine) -> None:
    """A 100-byte write into a committed slot not yet buffered adds the whole slot to
    the buffers: write_may_block must count it, so that no write the FUSE layer keeps
    on the trio loop thread runs flush_behind / flush_all (waits and flushes) there;
    and a partial write into a slot whose chunk is not in the RAM cache must not stay
    on the loop (it loads a chunk file, or a Drive GET)."""
    fs = eng.fs
    rng = random.Random(4)
    a = fs.create(ROOT, b"big", 0o644, UID, GID)
    nslots = 40
    fs.write(a.ino, 0, rng.randbytes(nslots * CS))
    fs.fsync(a.ino)
    fs.data.inode_dirty_limit = 8 * CS           # as 64 MiB is to 1 MiB slots, scaled
    calls: list[str] = []
    fb, fa = fs.data.flush_behind, fs.data.flush_all
    fs.data.flush_behind = lambda st: (calls.append("flush_behind"), fb(st))[1]  # type: ignore[method-assign]
    fs.data.flush_all = lambda: (calls.append("flush_all"), fa())[1]  # type: ignore[method-assign]
    on_loop_but_flushed = 0
    for s in range(nslots):
        n0 = len(calls)
        hint = fs.write_may_block(a.ino, 100, s * CS + 10)
        fs.write(a.ino, s * CS + 10, b"x" * 100)
        if not hint and len(calls) > n0:
            on_loop_but_flushed += 1
    assert on_loop_but_flushed == 0, calls
    fs.fsync(a.ino)
    cid = fs.data.states[a.ino].manifest[3]
    assert fs.write_may_block(a.ino, 100, 3 * CS + 10) == (cid not in fs.cache)
    fs.cache.clear()
    assert fs.write_may_block(a.ino, 100, 3 * CS + 10)       # would load slot 3 on the loop
    assert not fs.write_may_block(a.ino, CS, 3 * CS)         # a whole slot: nothing to load
    fs.release(a.ino)


def test_a_read_whose_chunk_a_flush_and_gc_removed_reads_again(eng: Engine) -> None:
    """A read resolved its plan (slot 0 -> chunk X) before a flush of the same file
    replaced slot 0 and dropped X's last reference, and gc (grace 0) deleted X before
    the read loaded it. The read must resolve again and return the file's bytes, not
    EIO, and X (gone, not bad) must not be marked bad."""
    fs = eng.fs
    rng = random.Random(5)
    a = fs.create(ROOT, b"r", 0o644, UID, GID)
    old, new = rng.randbytes(CS), rng.randbytes(CS)
    fs.write(a.ino, 0, old)
    fs.fsync(a.ino)
    x = fs.data.states[a.ino].manifest[0]
    fs.cache.clear()
    plan = fs.read_start(a.ino, 0, CS)          # names chunk x, not in RAM: loaded later
    assert plan.data is None
    fs.write(a.ino, 0, new)
    fs.fsync(a.ino)                              # x has no reference left
    assert eng.gc(0.0) is not None
    assert x not in eng.store_files()            # gc deleted it
    assert fs.read_finish(plan) == new
    fs.sync()
    assert not eng.q("SELECT id FROM chunks WHERE bad = 1")
    fs.release(a.ino)
    assert eng.fsck().clean


def test_a_flush_rewrites_its_own_new_chunk_file_a_sweep_deleted_before_its_row(eng: Engine) -> None:
    """A flush writes the file of a new chunk (no row yet), then an orphan sweep with a
    short grace period (another machine's gc deleted rows; this mount's store sweep)
    deletes it before the flush's row insert. The flush's re-check after the insert must
    cover the chunks it wrote itself: the file is written again, nothing reads EIO."""
    import pytest
    from cas.chunk.sweep import sweep_orphans
    from cas.db import chunks as chunk_rows
    fs = eng.fs
    data = random.Random(4).randbytes(3 * CS)
    a = fs.create(ROOT, b"s", 0o644, UID, GID)
    fs.write(a.ino, 0, data)
    real = chunk_rows.add_refs
    swept: list[int] = []

    def sweep_first(cur, refs):   # type: ignore[no-untyped-def]
        if not swept and refs:   # the files are written and checked, the rows not yet inserted
            with eng.other() as m:
                swept.append(sweep_orphans(m.db, fs.chunks.store, 0.0).files)
        return real(cur, refs)
    mp = pytest.MonkeyPatch()
    mp.setattr(chunk_rows, "add_refs", sweep_first)
    try:
        fs.fsync(a.ino)
    finally:
        mp.undo()
    fs.release(a.ino)
    assert swept and swept[0] >= 3, swept
    ids = [bytes(r[0]) for r in eng.q("SELECT id FROM chunks WHERE refcount > 0")]
    assert len(ids) == 3 and all(fs.chunks.store.stat(c) is not None for c in ids)
    assert reread(eng, a.ino) == data
    assert eng.fsck().clean
