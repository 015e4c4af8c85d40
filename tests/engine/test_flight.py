"""A flush in flight (docs/concurrency.md): the engine lock is released while a flush
hashes, seals and writes its chunk files, so other threads read, write, truncate,
unlink, fsync and lose the group transaction meanwhile. Each case must end exactly as
the old serialized flush would have: nothing written is lost, nothing truncated comes
back, reads see the newest bytes, fsck stays clean.

Real MariaDB; the flush's store step (ChunkManager.write_chunks) is where the other
thread acts, from inside that step (the flushing thread waits for it there, so an
engine lock held across the step would deadlock: the join below would time out).
"""
from __future__ import annotations

import errno
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest

from cas.errors import CasError, NoSpace
from cas.engine.fs import Filesystem
from tests.engine.test_fs import CS, GID, ROOT, UID, Engine, eng  # noqa: F401 - the fixture
from tests.engine.test_writeback import _kill_session

JOIN_S = 60.0   # deadline for the other thread (it never waits for the flushing one)


def during_store(fs: Filesystem, action: Callable[[], object], *, wait: bool = True,
                 then_raise: BaseException | None = None) -> list[threading.Thread]:
    """Run ``action`` in another thread during the next flush's store step (once). With
    ``wait`` the step waits for it (it must not need the flush to end), else it runs on.
    Returns the list that will hold the thread (join it after the flush)."""
    orig = fs.chunks.write_chunks
    threads: list[threading.Thread] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:  # reported by the test through `errors`
            errors.append(exc)

    def hooked(chunks: Any, todo: list[bytes]) -> dict[bytes, int]:
        fs.chunks.write_chunks = orig  # type: ignore[method-assign]
        t = threading.Thread(target=run)
        threads.append(t)
        t.start()
        if wait:
            t.join(JOIN_S)
            assert not t.is_alive(), "the other thread is blocked: the flush holds the engine lock"
            assert not errors, errors
        if then_raise is not None:
            raise then_raise
        return orig(chunks, todo)

    fs.chunks.write_chunks = hooked  # type: ignore[method-assign]
    setattr(fs, "_flight_errors", errors)
    return threads


def joined(fs: Filesystem, threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(JOIN_S)
        assert not t.is_alive()
    assert not getattr(fs, "_flight_errors"), getattr(fs, "_flight_errors")


def read_all(fs: Filesystem, ino: int) -> bytes:
    return fs.read(ino, 0, fs.getattr(ino).size + 10)


def reread(eng: Engine, ino: int) -> bytes:
    fs = eng.reopen()
    fs.open(ino)
    try:
        return read_all(fs, ino)
    finally:
        fs.release(ino)


def test_reads_and_writes_during_a_flight(eng: Engine) -> None:
    """While slots 0-2 are in flight: a read sees them; a write to slot 0 and one past
    the end go to fresh buffers that win; the flight commits the old slot 0, the next
    flush the new one; after a remount the file is the newest bytes."""
    fs = eng.fs
    rng = random.Random(1)
    a = fs.create(ROOT, b"f", 0o644, UID, GID)
    first = rng.randbytes(3 * CS)
    fs.write(a.ino, 0, first)
    newer, tail = rng.randbytes(CS // 2), rng.randbytes(100)
    seen: list[bytes] = []

    def other() -> None:
        seen.append(read_all(fs, a.ino))          # the bytes in flight
        fs.write(a.ino, 10, newer)                # copy-on-write of in-flight slot 0
        fs.write(a.ino, 3 * CS, tail)             # grows the file
        seen.append(read_all(fs, a.ino))
        seen.append(bytes([fs.getattr(a.ino).size == 3 * CS + 100]))

    threads = during_store(fs, other)
    fs.data.flush(fs.data.states[a.ino])
    joined(fs, threads)
    want = bytearray(first)
    want[10:10 + len(newer)] = newer
    want += tail
    assert seen == [first, bytes(want), b"\x01"]
    st = fs.data.states[a.ino]
    assert sorted(st.dirty) == [0, 3] and not st.flying and not st.busy and fs.data.total_flying == 0
    assert read_all(fs, a.ino) == bytes(want)
    fs.fsync(a.ino)
    fs.release(a.ino)
    assert reread(eng, a.ino) == bytes(want)
    assert eng.fsck().clean


def test_truncate_unlink_and_fsync_wait_for_the_flight(eng: Engine) -> None:
    """A truncate and an fsync started during a flight wait for it (never two flights
    of one inode) and then do their own; an unlinked file released during a flight is
    freed after it: no leaked reference, no resurrected bytes."""
    fs = eng.fs
    rng = random.Random(2)
    a = fs.create(ROOT, b"a", 0o644, UID, GID)
    b = fs.create(ROOT, b"b", 0o644, UID, GID)
    data_a, data_b = rng.randbytes(4 * CS + 7), rng.randbytes(2 * CS)
    fs.write(a.ino, 0, data_a)
    fs.write(b.ino, 0, data_b)
    fs.fsync(b.ino)
    fs.write(b.ino, 0, rng.randbytes(CS))        # b: dirty again, flushed with a below
    fs.close_file(b.ino)
    after_fsync: list[tuple[bool, int]] = []

    def truncate() -> None:
        fs.setattr(a.ino, size=CS + 5)

    def fsync() -> None:
        fs.fsync(a.ino)
        st = fs.data.states[a.ino]
        after_fsync.append((st.busy or bool(st.flying), fs.getattr(a.ino).size))

    def unlink_b() -> None:
        fs.unlink(ROOT, b"b")
        fs.release(b.ino)

    threads = during_store(fs, truncate, wait=False)
    fs.data.flush_many([fs.data.states[a.ino], fs.data.states[b.ino]])
    joined(fs, threads)
    assert read_all(fs, a.ino) == data_a[:CS + 5]

    fs.write(a.ino, 2 * CS, b"z" * 10)             # a hole in slot 1's rest, then z
    fs.write(b.ino, CS, rng.randbytes(CS))
    inner: list[threading.Thread] = [threading.Thread(target=fsync), threading.Thread(target=unlink_b)]
    def start_both() -> None:
        for t in inner:
            t.start()

    threads = during_store(fs, start_both, wait=False)
    fs.data.flush_many([fs.data.states[a.ino], fs.data.states[b.ino]])
    joined(fs, threads + inner)
    assert after_fsync == [(False, 2 * CS + 10)]
    assert b.ino not in fs.data.states
    want = data_a[:CS + 5] + bytes(CS - 5) + b"z" * 10
    assert read_all(fs, a.ino) == want
    fs.fsync(a.ino)
    fs.release(a.ino)
    assert reread(eng, a.ino) == want
    assert eng.fsck().clean


def test_failed_flight_gives_its_slots_back_under_newer_writes(eng: Engine) -> None:
    """The store step fails (ENOSPC) after another thread wrote slot 0 anew: slot 0
    keeps the newer bytes, slots 1-2 come back dirty, the error is recorded and
    raised; the next flush commits the newest bytes."""
    fs = eng.fs
    rng = random.Random(3)
    a = fs.create(ROOT, b"f", 0o644, UID, GID)
    first = rng.randbytes(3 * CS)
    fs.write(a.ino, 0, first)
    newer = rng.randbytes(CS)

    threads = during_store(fs, lambda: fs.write(a.ino, 0, newer), then_raise=NoSpace("store full (test)"))
    with pytest.raises(NoSpace):
        fs.fsync(a.ino)
    joined(fs, threads)
    st = fs.data.states[a.ino]
    assert sorted(st.dirty) == [0, 1, 2] and bytes(st.dirty[0]) == newer and not st.busy
    assert st.wb_error == errno.ENOSPC and fs.data.total_dirty == 3 * CS and fs.data.total_flying == 0
    want = newer + first[CS:]
    assert read_all(fs, a.ino) == want
    fs.fsync(a.ino)
    assert st.wb_error == 0
    fs.release(a.ino)
    assert reread(eng, a.ino) == want
    assert eng.fsck().clean


def test_lost_group_during_a_flight_replans(eng: Engine) -> None:
    """The group transaction is lost while a flight stores its chunks (another
    thread's commit finds out and resyncs): the flight is given back and planned again
    on the new connection, under a write made during it; nothing is lost."""
    fs = eng.fs
    rng = random.Random(4)
    a = fs.create(ROOT, b"f", 0o644, UID, GID)
    first = rng.randbytes(3 * CS)
    fs.write(a.ino, 0, first)
    fs.fsync(a.ino)                                   # committed: version A
    g = fs.create(ROOT, b"g", 0o644, UID, GID)        # opens the group
    second = rng.randbytes(2 * CS)
    fs.write(a.ino, 0, second)                        # version B of slots 0-1, in flight below
    third = rng.randbytes(CS)
    lost: list[BaseException] = []

    def other() -> None:
        fs.write(a.ino, CS, third)                    # version C of slot 1, newer than B
        _kill_session(eng, fs)
        try:
            fs.sync()
        except CasError as exc:                       # the group is gone: resync
            lost.append(exc)

    epoch = fs.data.epoch
    threads = during_store(fs, other)
    fs.fsync(a.ino)
    joined(fs, threads)
    assert len(lost) == 1 and fs.data.epoch > epoch
    want = second[:CS] + third + first[2 * CS:]
    assert read_all(fs, a.ino) == want
    fs.release(a.ino)
    assert fs.data.states[g.ino].lost                 # created in the lost group
    fs.data.discard(fs.data.states.pop(g.ino))
    assert reread(eng, a.ino) == want
    assert eng.fsck().clean
