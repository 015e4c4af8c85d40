"""File contents: per-inode write buffers, reads, flushes and truncation.

A file of N bytes has ceil(N / chunk_size) slots; slot i covers bytes
[i*cs, (i+1)*cs). Writes land in per-inode dirty slot buffers (bytearrays) in RAM and
are turned into chunks by :meth:`FileData.flush`, which commits the manifest rows, the
refcount deltas and the inode's size/mtime in ONE transaction after the new chunk files
are durable (invariants 1 and 2, docs/design.md). A slot whose bytes are all zero is stored as a
hole: no manifest row, no chunk.

Under group commit a flush only joins the open group transaction: until that commits,
the flushed slots' bytes are kept (``InodeData.unsynced``) so that a lost group (the
server died) gives them back as dirty buffers instead of losing them; a file whose inode
row itself was lost is marked ``lost`` and never flushed (docs/database.md).

Concurrency (docs/concurrency.md): every method runs under the engine lock
(:attr:`FileData.lock`, the re-entrant lock of :class:`cas.engine.fs.Filesystem`). A flush
holds it only for its short steps: it *takes* the dirty slots of its files (they become
the file's in-flight slots, ``InodeData.flying``), releases the lock while it hashes,
compresses and writes the chunk files, and takes it again to join the rows to the group
transaction. Meanwhile reads see the in-flight slots, and writes go to fresh dirty
buffers that win over them. At most one flight per inode runs at a time.
"""
from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pymysql.cursors

from cas.chunk.manager import REMOTE_AHEAD_BYTES, REMOTE_RECENT_S, ChunkManager, net_deltas
from cas.db import manifests as dbmanifests
from cas.db import namespace as ns
from cas.errors import CasError, FsError, NotFound
from cas.db.database import Database

log = logging.getLogger(__name__)


@dataclass
class InodeData:
    """In-RAM state of a file that is open (or being truncated)."""

    ino: int
    size: int                      # logical size in bytes, including unflushed writes
    manifest: dict[int, bytes]     # committed slot -> chunk id
    opens: int = 0
    # slot -> current bytes; a bytes object is a whole slot kept as the kernel gave it
    # (no copy), turned into a bytearray when a partial write modifies it
    dirty: dict[int, bytes | bytearray] = field(default_factory=dict)
    dirty_bytes: int = 0
    truncate_from: int | None = None   # slots >= this lose their manifest rows at flush
    attrs: dict[str, int] = field(default_factory=dict)  # inode columns to write at flush
    dirty_since: float = 0.0       # time.monotonic() of the oldest unflushed change
    read_end: int = -1             # where the last read ended (sequential detection)
    remote_at: float = 0.0         # time.monotonic() a read of this file last got a chunk from the cloud
    ahead_slot: int = 0            # slots below this were offered to the cloud read-ahead already
    # the last failed writeback of this file's buffers (docs/writeback.md): its errno
    # (ENOSPC, EIO; 0 = none), message and time.monotonic(); cleared when a flush commits
    wb_error: int = 0
    wb_message: str = ""
    wb_failed_at: float = 0.0
    wb_failures: int = 0           # failed writebacks in a row (the retry backs off)
    # flushed into the open group transaction, not committed yet (kept until the group
    # commits, given back as dirty buffers if it is lost): slot -> the slot's bytes
    # at the flush (b"": a hole), the lowest truncation, the inode columns written
    unsynced: dict[int, bytes | bytearray] = field(default_factory=dict)
    unsynced_trunc: int | None = None
    unsynced_attrs: dict[str, int] = field(default_factory=dict)
    lost: bool = False             # its inode row was lost with a group: never flushed
    # The flight (docs/concurrency.md): what a flush took from the fields above and is
    # storing now, without the engine lock: slot -> canonical bytes of the slot, the
    # truncation, the inode columns and the size (bytes) it writes, when its oldest
    # change was made. Reads see these slots under newer dirty ones; a failed or
    # replanned flight gives them back as dirty buffers (under newer ones).
    flying: dict[int, bytes | bytearray] = field(default_factory=dict)
    flying_trunc: int | None = None
    flying_attrs: dict[str, int] = field(default_factory=dict)
    flying_size: int = 0
    flying_since: float = 0.0
    busy: bool = False             # a flight of this inode runs (never two at once)
    queued: bool = False           # a flush of this inode waits for the flush-behind thread

    @property
    def holds_unsynced(self) -> bool:
        return bool(self.unsynced) or bool(self.unsynced_attrs) or self.unsynced_trunc is not None

    @property
    def needs_flush(self) -> bool:
        return bool(self.dirty) or bool(self.attrs) or self.truncate_from is not None

    @property
    def flying_bytes(self) -> int:
        """Bytes of the slots in flight (0 when no flush of this file runs)."""
        return sum(len(d) for d in self.flying.values())

    def mark(self) -> None:
        """Note that a change is about to be buffered (starts the writeback clock)."""
        if not self.needs_flush:
            self.dirty_since = time.monotonic()

    def set_attrs(self, **cols: int) -> None:
        """Buffer inode column changes (mode, uid, gid, atime_ns, mtime_ns, ctime_ns)."""
        self.mark()
        self.attrs.update(cols)


READAHEAD_SLOTS = 4  # slots loaded ahead of a sequential reader
WRITEBACK_RETRY_S = 2.0      # a failed writeback is retried after this, doubling per failure
WRITEBACK_RETRY_MAX_S = 30.0 # ... up to this (fsync, close and `casfs umount` retry at once)


class FileData:
    """Reads and writes file contents through dirty buffers and the chunk manager."""

    def __init__(self, db: Database, chunks: ChunkManager, chunk_size: int,
                 inode_dirty_limit: int = 64 << 20, total_dirty_limit: int = 256 << 20,
                 lock: threading.RLock | None = None, flush_behind: bool = False) -> None:
        self.db = db
        # the engine lock (cas.engine.fs.Filesystem's), and the condition flights end on
        self.lock = lock if lock is not None else threading.RLock()
        self.flights = threading.Condition(self.lock)
        # flush-behind: a write that passes inode_dirty_limit hands the file's flush to
        # this thread and returns (docs/writeback.md, "Back-pressure")
        self.behind = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="casfs-flush")
                       if flush_behind else None)
        self.chunks = chunks
        self.cs = chunk_size
        self.inode_dirty_limit = inode_dirty_limit   # bytes buffered per file before a flush
        self.total_dirty_limit = total_dirty_limit   # bytes buffered in all files together
        self.states: dict[int, InodeData] = {}
        self._zeros = bytes(chunk_size)
        # after a flush joined the transaction: (state, the size and the columns it wrote)
        self.on_commit: Callable[[InodeData, int, dict[str, int]], None] | None = None
        # running sum of every state's dirty_bytes (O(1) per write; issue 8 item 7)
        self.total_dirty = 0
        self.total_flying = 0     # bytes of all flights (InodeData.flying) running now
        self.last_error = ""     # message of the last failed writeback ("" = none since start)
        self.failing = False     # the last writeback attempt failed (cleared by a success)
        self.retry_s = WRITEBACK_RETRY_S
        self.retired: dict[int, InodeData] = {}  # dropped states holding unsynced bytes
        self.unsynced_bytes = 0   # bytes held in InodeData.unsynced, all states
        self._holding: dict[int, InodeData] = {}  # states with unsynced changes (by inode)
        self.epoch = 0            # counts reload_all calls (a flush must not span one)
        # plaintext bytes of the non-hole slots that writebacks committed: those whose
        # chunk had no usable copy and was written to the store (new), and those that
        # found their chunk stored already (deduplicated); read by the metrics collector
        self.new_bytes = 0
        self.dedup_bytes = 0
        # shared mode (cas.engine.fs.Filesystem._share, docs/sharing.md): a flush locks
        # its inode rows and derives refcount decrements from the manifest rows it
        # replaces, and writes change rows through ``log_changes`` (cursor, items)
        self.shared = False
        self.log_changes: Callable[[pymysql.cursors.Cursor, list[tuple[int, int | None, bytes | None]]],
                                   None] | None = None

    def _add_dirty(self, st: InodeData, n: int) -> None:
        """Change ``st.dirty_bytes`` by ``n`` bytes, keeping :attr:`total_dirty` in step."""
        st.dirty_bytes += n
        self.total_dirty += n

    # -- state -----------------------------------------------------------------------
    def new_state(self, ino: int) -> InodeData:
        """RAM state for a file just created (size 0, no manifest): no query needed."""
        self.retired.pop(ino, None)
        st = self.states[ino] = InodeData(ino=ino, size=0, manifest={})
        return st

    def load_state(self, ino: int) -> InodeData:
        """The RAM state of ``ino``, created from the database if absent. Raises NotFound."""
        st = self.states.get(ino)
        if st is not None:
            return st
        st = self.retired.pop(ino, None)
        if st is not None:  # dropped, but its last flush is not committed: it is the truth
            self.states[ino] = st
            return st
        size, manifest = self._committed(ino)
        if size is None:
            raise NotFound(f"inode {ino}")
        st = self.states[ino] = InodeData(ino=ino, size=size, manifest=manifest)
        return st

    def _committed(self, ino: int) -> tuple[int | None, dict[int, bytes]]:
        """The committed size (None: no such inode) and manifest of ``ino``. Shared mode:
        in one statement (one consistent read), so that another machine's commit
        between two reads cannot pair one commit's size with another's manifest."""
        if self.shared:
            return dbmanifests.size_and_manifest(self.db, ino)
        size = ns.inode_size(self.db, ino)
        manifest = dbmanifests.manifest_of(self.db, ino)
        return size, manifest

    def reload_all(self) -> list[int]:
        """After a lost group transaction: reload every state's committed manifest from
        the database, and turn what its lost flushes wrote (``unsynced``) back into
        dirty buffers, under the newer ones, so that nothing written is lost; the RAM
        size stays (it is what the file's users saw). A file whose inode row is gone
        (created in the lost group) is marked ``lost``: it keeps its buffers and is
        never flushed (they go to the rescue area at exit). Dropped states with
        unsynced bytes come back into ``states``.

        Returns the inodes that came back from ``retired`` (now with opens 0 and dirty
        buffers: the caller writes them back like released files). Raises MetaError.
        """
        self.epoch += 1
        revived = list(self.retired)
        for ino, st in self.retired.items():
            self.states.setdefault(ino, st)
        self.retired.clear()
        for st in self.states.values():
            self._restore(st)
        self.unsynced_bytes = 0
        self._holding.clear()
        return [ino for ino in revived if ino in self.states]

    def _restore(self, st: InodeData) -> None:
        committed, st.manifest = self._committed(st.ino)
        for slot, d in st.unsynced.items():
            if slot not in st.dirty and slot not in st.flying:  # in flight: newer, given back by the flight
                st.dirty[slot] = d
                self._add_dirty(st, len(d))
        if st.unsynced_trunc is not None:
            st.truncate_from = (st.unsynced_trunc if st.truncate_from is None
                                else min(st.truncate_from, st.unsynced_trunc))
        for col, v in st.unsynced_attrs.items():
            st.attrs.setdefault(col, v)
        if st.holds_unsynced:
            st.dirty_since = 0.0  # due at the next writeback tick
        st.unsynced = {}
        st.unsynced_trunc = None
        st.unsynced_attrs = {}
        if committed is None:
            if not st.lost:
                log.error("inode %d was created in the lost metadata transaction: its %d buffered "
                          "bytes stay in RAM and are not written back", st.ino, st.dirty_bytes)
            st.lost = True
        elif not st.needs_flush and not st.busy:
            st.size = committed

    def refresh(self, st: InodeData) -> None:
        """Shared mode: another machine committed a change of ``st``'s file. Reload its
        committed manifest (dirty and in-flight slots stay in front of it: a flight's
        slots join it when the flight lands) and, unless the file has changes of its own
        here, its size. A file whose row is gone is left as it is (its next flush finds
        it missing). Raises MetaError."""
        size, manifest = self._committed(st.ino)
        if size is None:
            return
        st.manifest = manifest
        if not st.needs_flush and not st.busy:
            st.size = size

    def group_committed(self) -> None:
        """The group transaction committed: unsynced bytes are durable now, drop them."""
        for st in self._holding.values():
            st.unsynced = {}
            st.unsynced_trunc = None
            st.unsynced_attrs = {}
        self._holding.clear()
        self.retired.clear()
        self.unsynced_bytes = 0

    def discard(self, st: InodeData) -> None:
        """Throw away ``st``'s uncommitted changes (its file was unlinked and closed)."""
        st.dirty.clear()
        self._add_dirty(st, -st.dirty_bytes)
        st.wb_error = st.wb_failures = 0
        st.attrs.clear()
        st.truncate_from = None
        self.unsynced_bytes -= sum(len(d) for d in st.unsynced.values())
        st.unsynced = {}
        st.unsynced_trunc = None
        st.unsynced_attrs = {}

    def adopt(self, ino: int, size: int, slots: dict[int, bytes], truncate_from: int | None,
              attrs: dict[str, int]) -> InodeData:
        """Install buffers kept outside RAM (a rescue record, cas/engine/rescue.py) as the dirty
        state of ``ino``: ``slots`` (slot -> canonical bytes) become dirty, the size
        becomes ``size`` bytes, slots >= ``truncate_from`` lose their manifest rows at the
        next flush, ``attrs`` are buffered. Raises NotFound."""
        st = self.load_state(ino)
        st.mark()
        for slot, b in slots.items():
            old = st.dirty.get(slot)
            self._add_dirty(st, len(b) - (len(old) if old is not None else 0))
            st.dirty[slot] = b
        st.size = size
        if truncate_from is not None:
            st.truncate_from = truncate_from if st.truncate_from is None else min(st.truncate_from, truncate_from)
        st.attrs.update(attrs)
        return st

    def drop_state(self, ino: int) -> None:
        """Forget the RAM state of ``ino`` (it must be flushed). One whose last flush is
        not committed yet is kept in ``retired`` until the group commits."""
        st = self.states.pop(ino, None)
        if st is not None:
            self.total_dirty -= st.dirty_bytes
            if st.holds_unsynced:
                self.retired[ino] = st

    def pending(self, ino: int) -> InodeData | None:
        """The state of ``ino`` if it holds changes not yet committed (buffered or in
        flight), else None."""
        st = self.states.get(ino)
        return st if st is not None and (st.needs_flush or st.busy) else None

    # -- flights ---------------------------------------------------------------------
    @contextmanager
    def unlocked(self) -> Iterator[None]:
        """Release the engine lock (every level this thread holds) for the body, and take
        it back after (what threading.Condition.wait does with an RLock)."""
        lock: Any = self.lock
        if not lock._is_owned():
            yield
            return
        saved = lock._release_save()
        try:
            yield
        finally:
            lock._acquire_restore(saved)

    def wait_idle(self, states: list[InodeData]) -> None:
        """Wait (the engine lock released meanwhile) until no flight of ``states`` runs
        or is queued for the flush-behind thread. Call with the engine lock held."""
        with self.lock:
            while any(st.busy or st.queued for st in states):
                self.flights.wait()

    # -- reads -----------------------------------------------------------------------
    def _slot_content(self, st: InodeData, slot: int) -> bytes | bytearray:
        """The current bytes of ``slot`` (may be shorter than the slot: zeros follow)."""
        src = self._slot_source(st, slot)
        return self.chunks.load(src.cid) if isinstance(src, ChunkRef) else src

    @staticmethod
    def _slot_source(st: InodeData, slot: int) -> bytes | bytearray | ChunkRef:
        """Where the current bytes of ``slot`` are: a dirty buffer, else (unless a pending
        truncation cut the slot off: zeros) the slot in flight, else (unless the
        flight's truncation cut it off) the committed chunk (a :class:`ChunkRef`)."""
        buf = st.dirty.get(slot)
        if buf is not None:
            return buf
        if st.truncate_from is not None and slot >= st.truncate_from:
            return b""
        buf = st.flying.get(slot)
        if buf is not None:
            return buf
        if st.flying_trunc is not None and slot >= st.flying_trunc:
            return b""
        cid = st.manifest.get(slot)
        return b"" if cid is None else ChunkRef(cid)

    def read(self, ino: int, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short at end of file). Raises EIO errors."""
        plan = self.read_plan(ino, offset, length)
        out = self.assemble(plan)
        self.note_read(plan)
        return out

    def read_plan(self, ino: int, offset: int, length: int) -> ReadPlan:
        """Under the engine lock: resolve the read of up to ``length`` bytes at ``offset``
        of ``ino`` into buffers and committed chunk ids (:class:`ReadPlan`), and start
        the read-ahead. :meth:`assemble` then loads the chunks without the lock.
        Raises NotFound, MetaError."""
        st = self.load_state(ino)
        end = min(st.size, offset + length)
        plan = ReadPlan(ino, offset, max(offset, end), [])
        if offset >= end:
            return plan
        cs = self.cs
        if offset == st.read_end:  # sequential: load the next slots in the background
            first = (end - 1) // cs + 1
            self.chunks.prefetch(st.manifest[s] for s in range(first, first + READAHEAD_SLOTS)
                                 if s in st.manifest and s not in st.dirty)
            # evicted chunks: GETs ahead (docs/cloud.md), only for a file whose reads went
            # to the cloud lately, only when the read-ahead has room, each slot once
            if st.remote_at and time.monotonic() - st.remote_at < REMOTE_RECENT_S and self.chunks.remote_room():
                self._offer_remote(st, max(first, st.ahead_slot), first + REMOTE_AHEAD_BYTES // cs + 1)
        else:
            st.ahead_slot = 0   # a seek: the window starts again
            if offset == 0 and self.chunks.evicted(st.manifest.get(0)):   # a cold read from the start
                st.remote_at = time.monotonic()
                if self.chunks.remote_room():
                    self._offer_remote(st, 0, REMOTE_AHEAD_BYTES // cs + 1)
        st.read_end = end
        pos = offset
        while pos < end:
            slot, so = divmod(pos, cs)
            take = min(cs - so, end - pos)
            src = self._slot_source(st, slot)
            if isinstance(src, ChunkRef):
                plan.parts.append((src, so, take))
                if src.cid not in self.chunks.cache:
                    plan.in_ram = False
            elif isinstance(src, bytearray):  # a later write may change it: copy the piece now
                plan.parts.append((bytes(memoryview(src)[so:so + take]), 0, take))
            else:   # immutable: a view
                plan.parts.append((memoryview(src)[so:so + take], 0, take))
            pos += take
        return plan

    def assemble(self, plan: ReadPlan) -> bytes:
        """The bytes of ``plan``: its buffers, and its chunks loaded through the RAM
        cache, the local store or the cloud tier (:meth:`ChunkManager.load`). Needs no
        engine lock (the chunk manager is thread-safe; docs/concurrency.md). Raises
        ChunkMissing, IntegrityError (EIO; the chunk is noted for a bad mark)."""
        parts: list[bytes | bytearray | memoryview] = []
        for src, so, take in plan.parts:
            content = memoryview(self.chunks.load(src.cid))[so:so + take] if isinstance(src, ChunkRef) else src
            parts.append(content)
            if len(content) < take:
                parts.append(self._zeros[:take - len(content)])
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)

    def note_read(self, plan: ReadPlan) -> None:
        """Under the engine lock, after :meth:`assemble`: mark the file as read from the
        cloud when one of the plan's chunks came from there."""
        st = self.states.get(plan.ino)
        if st is not None and self.chunks.from_cloud and plan.end > plan.offset:
            self._note_remote(st, plan.offset // self.cs, (plan.end - 1) // self.cs + 1)

    def _offer_remote(self, st: InodeData, lo: int, hi: int) -> None:
        """Offer slots [lo, hi) of ``st`` to the cloud read-ahead and remember how far
        it took them (``st.ahead_slot``), so the next sequential read offers only new
        slots."""
        if lo >= hi:
            return
        st.ahead_slot = self.chunks.offer_remote(
            [(s, st.manifest[s]) for s in range(lo, hi) if s in st.manifest and s not in st.dirty], hi)

    def _note_remote(self, st: InodeData, lo: int, hi: int) -> None:
        """Mark ``st`` as read from the cloud when one of slots [lo, hi) was loaded from
        there (claimed from :attr:`ChunkManager.from_cloud`)."""
        fc = self.chunks.from_cloud
        for s in range(lo, hi):
            cid = st.manifest.get(s)
            if cid is not None and cid in fc:
                fc.discard(cid)
                st.remote_at = time.monotonic()

    # -- writes ----------------------------------------------------------------------
    def write(self, ino: int, offset: int, data: bytes) -> int:
        """Buffer ``data`` at ``offset``; flush when the file's buffers pass
        ``inode_dirty_limit`` or all files' buffers pass ``total_dirty_limit``.

        Returns the number of bytes written (all of them). A failed flush after the
        bytes were buffered is recorded on the file (``wb_error``), not raised: the bytes
        stay buffered and the error reaches the next fsync/close. Raises NoSpace/FsError
        (nothing buffered) when the buffers are over their limit and their writeback
        failed: a retry after :meth:`retry_delay`, the recorded error meanwhile.
        Cost: O(bytes written), independent of the number of open files.
        """
        st = self.load_state(ino)
        if self.chunks.shared and self._preload(st, offset, len(data)):
            st = self.load_state(ino)
        if st.wb_error and (st.dirty_bytes >= self.inode_dirty_limit
                            or self.total_dirty >= self.total_dirty_limit):
            self._retry_before_write(st)
        st.mark()
        cs = self.cs
        n = len(data)
        if offset + n > st.size:
            self._grow(st, offset + n)
        view = memoryview(data)
        pos = 0
        while pos < n:
            slot, so = divmod(offset + pos, cs)
            take = min(cs - so, n - pos)
            old = st.dirty.get(slot)
            if so == 0 and take == cs:  # the whole slot is replaced
                whole = data if take == n and type(data) is bytes else bytes(view[pos:pos + take])
                st.dirty[slot] = whole
                self._add_dirty(st, cs - (len(old) if old is not None else 0))
                pos += take
                continue
            if old is None:
                valid = max(0, min(cs, st.size - slot * cs))
                buf = bytearray(memoryview(self._slot_content(st, slot))[:valid])
                self._add_dirty(st, len(buf))
            elif isinstance(old, bytearray):
                buf = old
            else:
                buf = bytearray(old)
            st.dirty[slot] = buf
            before = len(buf)
            if before < so:
                buf.extend(self._zeros[:so - before])
            buf[so:so + take] = view[pos:pos + take]
            self._add_dirty(st, len(buf) - before)
            pos += take
        self._touch(st)
        try:
            if st.dirty_bytes >= self.inode_dirty_limit:
                self.flush_behind(st)
            elif self.total_dirty + self.total_flying >= self.total_dirty_limit:
                self.flush_all()
        except CasError:
            pass  # recorded on the states (wb_error): the bytes stay buffered and are retried
        return n

    def _preload(self, st: InodeData, offset: int, n: int) -> bool:
        """Shared volume (docs/sharing.md, "Data"): load, with the engine lock released,
        the committed chunks a write of ``n`` bytes at ``offset`` will read (the slots it
        writes in part, and the old short last slot of a growing file) that are not in
        the RAM cache: such a chunk may be another machine's, not uploaded yet, and its
        load may wait for that upload (up to CASFS_REMOTE_WAIT_S), which must not hold
        the engine. Afterwards the write's own loads find them in the RAM cache or the
        local store. Returns whether the lock was released (the caller looks its state
        up again). Errors are left to the write's own load, under the lock."""
        if n <= 0:
            return False
        cs = self.cs
        end = offset + n
        slots = {s for s in (offset // cs, (end - 1) // cs) if not (offset <= s * cs and end >= (s + 1) * cs)}
        if end > st.size and st.size % cs:
            slots.add(st.size // cs)
        cids = []
        for slot in sorted(slots):
            if slot in st.dirty:
                continue
            src = self._slot_source(st, slot)
            if isinstance(src, ChunkRef) and src.cid not in self.chunks.cache:
                cids.append(src.cid)
        if not cids:
            return False
        with self.unlocked():
            for cid in cids:
                try:
                    self.chunks.load(cid)
                except CasError:
                    pass   # the write's own load reports it
        return True

    def flush_behind(self, st: InodeData) -> None:
        """Start the flush of ``st`` in the flush-behind thread and return (without that
        thread: flush now). Back-pressure: first wait until the file's previous flight
        (and a queued one) ended, so a file holds at most one flight and the dirty
        buffers written meanwhile (each about ``inode_dirty_limit``). A failure is
        recorded on ``st`` (``wb_error``) and reaches its next write, fsync or close."""
        if self.behind is None:
            self.flush(st)
            return
        with self.lock:
            self.wait_idle([st])
            if not st.needs_flush or st.lost:
                return
            st.queued = True
            try:
                self.behind.submit(self._flush_queued, st)
            except RuntimeError:   # shut down (the engine is closing): flush here
                st.queued = False
                self.flush(st)

    def _flush_queued(self, st: InodeData) -> None:
        """The flush-behind thread's job: flush ``st`` under the engine lock (released
        while its chunks are stored). Errors are recorded on ``st`` by :meth:`flush_many`."""
        with self.lock:
            try:
                st.queued = False
                self.flush_many([st])
            except CasError:
                pass   # recorded on st (wb_error): the bytes stay buffered
            except Exception:
                log.exception("flush-behind of inode %d failed", st.ino)
            finally:
                self.flights.notify_all()

    def _retry_before_write(self, st: InodeData) -> None:
        """``st``'s buffers are full and their last writeback failed: retry it (at most
        after :meth:`retry_delay`) before buffering more. Raises the failure."""
        if time.monotonic() - st.wb_failed_at < self.retry_delay(st):
            raise FsError(st.wb_message, st.wb_error)
        if st.dirty_bytes >= self.inode_dirty_limit:
            self.flush(st)
        else:
            self.flush_all()

    def _grow(self, st: InodeData, size: int) -> None:
        """Extend ``st`` to ``size`` bytes. The old last slot, if it was short, becomes
        dirty so that its chunk is cut again to the slot's full bytes (zeros follow the
        old end): a slot's chunk depends on its bytes only, never on the file's history.
        """
        cs = self.cs
        if st.size % cs:
            last = st.size // cs
            if last not in st.dirty and (last in st.manifest or last in st.flying) and size > st.size:
                buf = bytearray(self._slot_content(st, last))
                st.dirty[last] = buf
                self._add_dirty(st, len(buf))
        st.size = size

    @staticmethod
    def _touch(st: InodeData) -> None:
        """Record a content change: mtime and ctime become now (POSIX write/truncate)."""
        now = time.time_ns()
        st.set_attrs(mtime_ns=now, ctime_ns=now)

    def truncate(self, ino: int, size: int) -> None:
        """Set the size of ``ino`` to ``size`` bytes (POSIX truncate) and commit it."""
        st = self.load_state(ino)
        st.mark()
        cs = self.cs
        if size < st.size:
            keep = -(-size // cs)
            for slot in [s for s in st.dirty if s >= keep]:
                self._add_dirty(st, -len(st.dirty.pop(slot)))
            for slot in [s for s in st.unsynced if s >= keep]:  # cut off: must not come
                self.unsynced_bytes -= len(st.unsynced.pop(slot))  # back after a lost group
            if size % cs:
                last = keep - 1
                content = bytearray(memoryview(self._slot_content(st, last))[:size % cs])
                old = st.dirty.get(last)
                self._add_dirty(st, len(content) - (len(old) if old is not None else 0))
                st.dirty[last] = content
            st.truncate_from = keep if st.truncate_from is None else min(st.truncate_from, keep)
            st.size = size
        elif size > st.size:
            self._grow(st, size)
        self._touch(st)
        self.flush(st)

    # -- flush -----------------------------------------------------------------------
    def _slot_bytes(self, st: InodeData, slot: int) -> bytes | bytearray:
        """The canonical bytes of dirty ``slot``: exactly the slot's part of the file.

        Returns the buffer itself when it has the right length (no copy).
        """
        valid = max(0, min(self.cs, st.size - slot * self.cs))
        d = st.dirty[slot]
        if len(d) == valid:
            return d
        if len(d) > valid:
            return bytes(memoryview(d)[:valid])
        return bytes(d) + self._zeros[:valid - len(d)]

    def _is_zero(self, d: bytes | bytearray) -> bool:
        return d == self._zeros if len(d) == self.cs else d == self._zeros[:len(d)]

    def flush(self, st: InodeData) -> None:
        """Commit one inode's changes; see :meth:`flush_many`."""
        self.flush_many([st])

    def flush_many(self, states: list[InodeData]) -> None:
        """Commit the dirty slots, truncations and size/times of ``states`` in ONE transaction.

        New chunk files are made durable first (invariant 1); manifest rows, refcount
        deltas and inode rows then commit together (invariant 2). Raises NoSpace or
        FsError (nothing is committed and the buffers are kept) or MetaError; a failure
        is recorded on every state of the batch (``wb_error``, :meth:`_failed`).
        """
        with self.lock:
            self._flush_waiting(states)

    def _flush_waiting(self, states: list[InodeData]) -> None:
        """:meth:`flush_many` under the engine lock: wait for the flights of ``states``
        (an fsync waits for the file's flight and then runs its own), then flush."""
        self.wait_idle(states)
        states = [st for st in states if st.needs_flush]
        if not states:
            return
        try:
            self._flush_many([st for st in states if not st.lost])
        except Exception as exc:
            self._failed(states, exc)
            raise
        lost = [st for st in states if st.lost]
        if lost:
            # a lost group transaction took the file's creation with it: its bytes stay
            # here (and go to the rescue area at exit, then /lost+found); never write
            # manifest rows for an inode that does not exist
            err = FsError(f"inode {lost[0].ino} was lost with the database's last transaction "
                          f"({len(lost)} files; their buffers stay in RAM)", errno.EIO)
            self._failed(lost, err)
            raise err
        self.failing = False

    def _failed(self, states: list[InodeData], exc: Exception) -> None:
        """Record a failed writeback on ``states`` (Linux keeps writeback errors on the
        file for the next fsync/close, see errseq(9)); their buffers stay."""
        err = exc.errno if isinstance(exc, FsError) else errno.EIO
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        now = time.monotonic()
        for st in states:
            if st.needs_flush:
                st.wb_error, st.wb_message, st.wb_failed_at = err, msg, now
                st.wb_failures += 1
        self.last_error = msg
        self.failing = True

    def _flush_many(self, states: list[InodeData]) -> None:
        """The flush itself, of idle states not marked ``lost``, under the engine lock;
        one found without its inode row inside the transaction is marked ``lost`` and
        the others are flushed again.

        Three steps (docs/concurrency.md): (a) under the lock, take the files' dirty
        slots, truncation, columns and size as their flight; (b) without the lock, hash
        the slots, and (after one query under the lock: which chunks have no usable
        copy) seal and write the new chunk files, durable (syncfs); (c) under the lock,
        join the rows to the group transaction (invariant 1: the chunk files are
        durable before) and make the flight the committed RAM state. A failure, or a
        lost group recovered during (b), gives the flight back as dirty buffers under
        the newer ones: exactly the state the old serialized flush left.
        """
        if not states:
            return
        epoch = self.epoch
        plan: list[tuple[InodeData, dict[int, bytes | None]]] = []
        canons: list[dict[int, bytes | bytearray]] = []
        nonzero: list[bytes | bytearray] = []
        where: list[tuple[int, int]] = []
        chunk_data: dict[bytes, bytes | bytearray] = {}
        retry = False
        self._take(states)   # (a)
        try:
            # slot contents -> chunk ids (all-zero slots are holes: None)
            for k, st in enumerate(states):
                new: dict[int, bytes | None] = {}
                canon = st.flying
                for slot in sorted(canon):
                    d = canon[slot]
                    new[slot] = None
                    if d and not self._is_zero(d):
                        nonzero.append(d)
                        where.append((k, slot))
                plan.append((st, new))
                canons.append(canon)
            with self.unlocked():   # (b)
                ids = self.chunks.ids_of(nonzero)
            for cid, d, (k, slot) in zip(ids, nonzero, where):
                plan[k][1][slot] = cid
                chunk_data[cid] = d
            for st, new in plan:  # written by the UPDATE inodes below, with the other columns
                st.flying_attrs["data_bytes"] = self.stored_bytes(st, new, flight=True)
            todo = self.chunks.unusable(self.db, chunk_data)
            with self.unlocked():
                stored = self.chunks.write_chunks(chunk_data, todo)
            if self.epoch != epoch:  # a lost group was recovered meanwhile: plan again
                raise _Replan()

            def body(cur: pymysql.cursors.Cursor) -> None:   # (c)
                # never manifest rows for an inode whose row is missing (a lost group)
                if self.shared:   # lock the inode rows, in id order: one flush of a file at a time
                    found = {i for i in sorted({st.ino for st, _ in plan})
                             if ns.nlink_for_update(cur, i) is not None}
                else:
                    found = ns.existing_inodes(cur, [st.ino for st, _ in plan])
                missing = [st for st, _ in plan if st.ino not in found]
                if missing:
                    for st in missing:
                        st.lost = True
                    raise _RowsMissing()
                gained: list[bytes] = []
                lost: list[bytes] = []
                manifest_rows: list[dbmanifests.ManifestRow] = []
                for st, new in plan:
                    # this mount is the only writer of its open inodes' manifests, and
                    # one flight of an inode runs at a time: the RAM manifest is the
                    # committed one
                    trunc = st.flying_trunc
                    if self.shared:
                        # another machine may have changed the slots since this mount
                        # loaded the manifest: the decrements come from the rows
                        # (docs/sharing.md), read under the inode's row lock; rows past
                        # this commit's size (another machine's longer file) go, so the
                        # last commit's size and slots are one file
                        end = -(-st.flying_size // self.cs)
                        trunc = end if trunc is None else min(trunc, end)
                        old = dbmanifests.slots_for_update(cur, st.ino, list(new), trunc)
                    else:
                        old = {s: st.manifest[s] for s in new if s in st.manifest}
                        if trunc is not None:
                            old.update({s: c for s, c in st.manifest.items() if s >= trunc})
                    if trunc is not None:
                        dbmanifests.delete_from(cur, st.ino, trunc)
                    lost.extend(old.values())
                    holes = [s for s, c in new.items() if c is None and s in old]
                    if holes:
                        dbmanifests.delete_slots(cur, st.ino, holes)
                    for s, c in new.items():
                        if c is not None:
                            gained.append(c)
                            manifest_rows.append(dbmanifests.ManifestRow(st.ino, s, c))
                    attrs = st.flying_attrs
                    cols = sorted(attrs)
                    ns.update_inode(cur, st.ino, {**{c: attrs[c] for c in cols}, "size": st.flying_size})
                self.chunks.apply_deltas(cur, net_deltas(gained, lost), chunk_data, stored)
                dbmanifests.put(cur, manifest_rows)
                if self.shared:   # data_bytes from the rows: RAM may miss another machine's slots
                    for st, _ in plan:
                        st.flying_attrs["data_bytes"] = dbmanifests.stored_bytes(cur, st.ino, st.flying_size, self.cs)
                        ns.update_inode(cur, st.ino, {"data_bytes": st.flying_attrs["data_bytes"]})
                if self.log_changes is not None:
                    self.log_changes(cur, [(st.ino, None, None) for st, _ in plan])

            self.db.transaction(body)
        except (_RowsMissing, _Replan):
            self._give_back(states)
            retry = True
        except BaseException:
            self._give_back(states)
            raise
        else:
            self._landed(plan, canons, chunk_data, stored, nonzero)
        finally:
            for st in states:
                st.busy = False
            self.flights.notify_all()
        if retry:
            self._flush_many([st for st in states if not st.lost])
            return
        if self.db.group_open and self.unsynced_bytes >= self.total_dirty_limit:
            self.db.commit()  # bounds the RAM held for a lost group

    def _take(self, states: list[InodeData]) -> None:
        """Step (a) of a flush: move each state's dirty slots (canonical bytes),
        truncation, columns and size into its flight, and mark it busy."""
        for st in states:
            assert not st.busy, f"two flights of inode {st.ino}"
            st.busy = True
            st.flying = {slot: self._slot_bytes(st, slot) for slot in st.dirty}
            st.flying_trunc, st.flying_attrs = st.truncate_from, st.attrs
            st.flying_size, st.flying_since = st.size, st.dirty_since
            st.dirty = {}
            self.total_flying += st.flying_bytes
            self._add_dirty(st, -st.dirty_bytes)
            st.truncate_from = None
            st.attrs = {}

    def _give_back(self, states: list[InodeData]) -> None:
        """A flight failed (or must be planned again): its slots, truncation and columns
        become dirty again, under the changes made since it was taken; a slot that a
        truncation since cut off stays cut off."""
        for st in states:
            self.total_flying -= st.flying_bytes
            for slot, d in st.flying.items():
                if slot in st.dirty or (st.truncate_from is not None and slot >= st.truncate_from):
                    continue
                st.dirty[slot] = d
                self._add_dirty(st, len(d))
            if st.flying_trunc is not None:
                st.truncate_from = (st.flying_trunc if st.truncate_from is None
                                    else min(st.truncate_from, st.flying_trunc))
            st.flying_attrs.pop("data_bytes", None)   # computed again by the next flush
            for col, v in st.flying_attrs.items():
                st.attrs.setdefault(col, v)
            if st.needs_flush:
                st.dirty_since = min(st.dirty_since, st.flying_since) if st.dirty_since else st.flying_since
            st.flying, st.flying_trunc, st.flying_attrs = {}, None, {}

    def _landed(self, plan: list[tuple[InodeData, dict[int, bytes | None]]],
                canons: list[dict[int, bytes | bytearray]], chunk_data: dict[bytes, bytes | bytearray],
                stored: dict[bytes, int], nonzero: list[bytes | bytearray]) -> None:
        """Step (c), after the rows joined the transaction: the flights become the
        committed RAM state (manifest; unsynced bytes while the group is open)."""
        pending = self.db.group_open  # joined the open group: keep the bytes until it commits
        new_bytes = sum(len(chunk_data[c]) for c in stored)
        self.new_bytes += new_bytes
        self.dedup_bytes += sum(len(d) for d in nonzero) - new_bytes
        for (st, new), canon in zip(plan, canons):
            trunc, attrs = st.flying_trunc, st.flying_attrs
            if pending:
                self._keep_unsynced(st, canon, trunc, attrs)
            if trunc is not None:
                for s in [s for s in st.manifest if s >= trunc]:
                    del st.manifest[s]
            for slot, maybe in new.items():
                if maybe is None:
                    st.manifest.pop(slot, None)
                else:
                    st.manifest[slot] = maybe
            if self.shared:   # rows past the committed size went with the flush (_flush_many)
                end = -(-st.flying_size // self.cs)
                for s in [s for s in st.manifest if s >= end]:
                    del st.manifest[s]
            self.total_flying -= st.flying_bytes
            st.flying, st.flying_trunc, st.flying_attrs = {}, None, {}
            st.wb_error = st.wb_failures = 0
            st.wb_message = ""
            if self.on_commit is not None:
                self.on_commit(st, st.flying_size, attrs)

    def _keep_unsynced(self, st: InodeData, canon: dict[int, bytes | bytearray],
                       trunc: int | None, attrs: dict[str, int]) -> None:
        """Record what a flush that joined the open group wrote (see ``unsynced``):
        its slots ``canon``, truncation ``trunc`` and columns ``attrs``."""
        self._holding[st.ino] = st
        if trunc is not None:
            for slot in [s for s in st.unsynced if s >= trunc]:
                self.unsynced_bytes -= len(st.unsynced.pop(slot))
            st.unsynced_trunc = (trunc if st.unsynced_trunc is None
                                 else min(st.unsynced_trunc, trunc))
        for slot, d in canon.items():
            old = st.unsynced.get(slot)
            self.unsynced_bytes += len(d) - (len(old) if old is not None else 0)
            st.unsynced[slot] = d
        st.unsynced_attrs.update(attrs)

    def stored_bytes(self, st: InodeData, new: dict[int, bytes | None] | None = None,
                     flight: bool = False) -> int:
        """Bytes of ``st``'s file that lie in stored (non-hole) slots: ``inodes.data_bytes``,
        from which st_blocks is reported (docs/posix.md). A stored slot counts its bytes
        below the file's size (the last slot may be short).

        With ``new`` (slot -> chunk id, or None for a hole: the outcome of a flush of
        every slot in flight; ``flight``: the flight's truncation and size) the figure is
        exact once that flush commits. Without it, an estimate for a file with buffered
        changes: every dirty or in-flight slot counts as stored (a slot that turns out
        all zeros becomes a hole at writeback). Cost: O(dirty slots), plus O(manifest)
        while a truncation is pending.
        """
        cs, manifest = self.cs, st.manifest
        if flight:
            tf, size = st.flying_trunc, st.flying_size
        else:
            tf, size = st.truncate_from, st.size
            if st.flying_trunc is not None:
                tf = st.flying_trunc if tf is None else min(tf, st.flying_trunc)
        slots = len(manifest)
        if tf is not None:
            slots -= sum(1 for s in manifest if s >= tf)
        changes: dict[int, bytes | None] = (new if new is not None else
                                            dict.fromkeys([*st.flying, *st.dirty], b""))
        for s, c in changes.items():
            slots += (c is not None) - (s in manifest and (tf is None or s < tf))
        if slots <= 0 or size <= 0:
            return 0
        last = (size - 1) // cs
        if last in changes:
            last_stored = changes[last] is not None
        else:
            last_stored = last in manifest and (tf is None or last < tf)
        return slots * cs - (cs - (size - last * cs) if last_stored else 0)

    def flush_due(self, older_than_s: float, also: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        """Flush, in one transaction, every inode whose oldest unflushed change is older
        than ``older_than_s`` seconds, and the inodes in ``also``; an inode whose last
        writeback failed less than :meth:`retry_delay` ago waits for a later call."""
        now = time.monotonic()
        self.flush_many([st for st in self.states.values()  # a lost file cannot be written back
                         if st.needs_flush and not st.lost
                         and (st.ino in also or now - st.dirty_since >= older_than_s)
                         and (not st.wb_error or now - st.wb_failed_at >= self.retry_delay(st))])

    def retry_delay(self, st: InodeData) -> float:
        """Seconds after a failed writeback of ``st`` before the tick (or a write over
        the buffer limit) tries again: ``retry_s`` doubling per failure in a row, at
        most WRITEBACK_RETRY_MAX_S, so a full disk does not cost a hash of every buffer
        every tick."""
        return min(WRITEBACK_RETRY_MAX_S, self.retry_s * 2 ** min(16, max(0, st.wb_failures - 1)))

    def flush_all(self) -> None:
        """Flush every inode with unflushed changes, in one transaction."""
        self.flush_many(list(self.states.values()))

    def free_manifest(self, cur: pymysql.cursors.Cursor, ino: int) -> None:
        """Inside a transaction: drop ``ino``'s manifest and its chunks' references."""
        lost = dbmanifests.chunks_for_update(cur, ino)
        if lost:
            self.chunks.apply_deltas(cur, net_deltas([], lost), {}, {})
            dbmanifests.delete_all(cur, ino)


@dataclass(frozen=True)
class ChunkRef:
    """A slot's committed chunk, by id (loaded later, maybe without the engine lock)."""

    cid: bytes


@dataclass
class ReadPlan:
    """A read resolved under the engine lock (:meth:`FileData.read_plan`): bytes
    [offset, end) of inode ``ino``, as parts (source, offset in it, length): a buffer
    piece (offset 0, may be shorter than its length: zeros follow) or a
    :class:`ChunkRef`. ``in_ram``: every chunk was in the RAM cache when resolved."""

    ino: int
    offset: int
    end: int
    parts: list[tuple[ChunkRef | bytes | memoryview, int, int]]
    in_ram: bool = True
    data: bytes | None = None     # the bytes, once assembled


class _Replan(Exception):
    """Inside a flush: a lost group was recovered while it stored its chunks."""


class _RowsMissing(Exception):
    """Inside a flush: some inode rows are gone (their files are marked lost)."""
