"""File contents: per-inode write buffers, reads, flushes and truncation.

A file of N bytes has ceil(N / chunk_size) slots; slot i covers bytes
[i*cs, (i+1)*cs). Writes land in per-inode dirty slot buffers (bytearrays) in RAM and
are turned into chunks by :meth:`FileData.flush`, which commits the manifest rows, the
refcount deltas and the inode's size/mtime in ONE transaction after the new chunk files
are durable (DESIGN invariants 1 and 2). A slot whose bytes are all zero is stored as a
hole: no manifest row, no chunk.

Not thread-safe by itself: :class:`cas.fs.Filesystem` serializes every call.
"""
from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .chunks import ChunkManager, net_deltas
from .errors import CasError, FsError, NotFound
from .meta import Database

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
    # the last failed writeback of this file's buffers (docs/writeback.md): its errno
    # (ENOSPC, EIO; 0 = none), message and time.monotonic(); cleared when a flush commits
    wb_error: int = 0
    wb_message: str = ""
    wb_failed_at: float = 0.0
    wb_failures: int = 0           # failed writebacks in a row (the retry backs off)
    # what flushes put into the open group transaction and it has not committed yet:
    # given back as dirty if the group is lost (FileData.reload_all, docs/writeback.md)
    group_slots: set[int] = field(default_factory=set)
    group_trunc: int | None = None
    group_attrs: dict[str, int] = field(default_factory=dict)

    def clear_group(self) -> None:
        """The group transaction holding this file's flushes committed (or is moot)."""
        self.group_slots.clear()
        self.group_trunc = None
        self.group_attrs.clear()

    @property
    def needs_flush(self) -> bool:
        return bool(self.dirty) or bool(self.attrs) or self.truncate_from is not None

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
                 inode_dirty_limit: int = 64 << 20, total_dirty_limit: int = 256 << 20) -> None:
        self.db = db
        self.chunks = chunks
        self.cs = chunk_size
        self.inode_dirty_limit = inode_dirty_limit   # bytes buffered per file before a flush
        self.total_dirty_limit = total_dirty_limit   # bytes buffered in all files together
        self.states: dict[int, InodeData] = {}
        self._zeros = bytes(chunk_size)
        self.on_commit: Callable[[InodeData], None] | None = None  # after a flush commits
        # running sum of every state's dirty_bytes (O(1) per write; issue 8 item 7)
        self.total_dirty = 0
        self.last_error = ""     # message of the last failed writeback ("" = none since start)
        self.failing = False     # the last writeback attempt failed (cleared by a success)
        self.retry_s = WRITEBACK_RETRY_S
        # states flushed into the open group transaction (a released file's state stays
        # here after drop_state until the group commits: its bytes are not safe before)
        self.in_group: dict[int, InodeData] = {}
        db.on_group_commit = self._group_committed

    def _group_committed(self) -> None:
        for st in self.in_group.values():
            st.clear_group()
        self.in_group.clear()

    def _add_dirty(self, st: InodeData, n: int) -> None:
        """Change ``st.dirty_bytes`` by ``n`` bytes, keeping :attr:`total_dirty` in step."""
        st.dirty_bytes += n
        self.total_dirty += n

    # -- state -----------------------------------------------------------------------
    def new_state(self, ino: int) -> InodeData:
        """RAM state for a file just created (size 0, no manifest): no query needed."""
        st = self.states[ino] = InodeData(ino=ino, size=0, manifest={})
        return st

    def load_state(self, ino: int) -> InodeData:
        """The RAM state of ``ino``, created from the database if absent. Raises NotFound."""
        st = self.states.get(ino)
        if st is not None:
            return st
        st = self.in_group.get(ino)
        if st is not None:  # dropped after a flush the group has not committed: reuse it
            self.states[ino] = st
            return st
        size, manifest = self._committed(ino)
        if size is None:
            raise NotFound(f"inode {ino}")
        st = self.states[ino] = InodeData(ino=ino, size=size, manifest=manifest)
        return st

    def _committed(self, ino: int) -> tuple[int | None, dict[int, bytes]]:
        """The committed size (None: no such inode) and manifest of ``ino``."""
        rows = self.db.query("SELECT size FROM inodes WHERE id = %s", (ino,))
        manifest = {int(s): bytes(c) for s, c in
                    self.db.query("SELECT slot, chunk FROM manifests WHERE inode = %s", (ino,))}
        return (int(rows[0][0]) if rows else None), manifest

    def reload_all(self) -> None:
        """The group transaction was lost: reload every state's committed manifest.

        What flushes had put into the lost group becomes pending again: those slots are
        dirty again (their bytes re-read from the chunk files, durable before the
        flush), with the truncation and columns; released files come back into
        :attr:`states` (the caller schedules their writeback). Sizes stay the RAM ones
        (the file's size as the application made it); buffered slots stay dirty."""
        for ino, st in self.in_group.items():
            self.states.setdefault(ino, st)
            self._restore_group(st)
        self.in_group.clear()
        for st in self.states.values():
            committed, st.manifest = self._committed(st.ino)

    def _restore_group(self, st: InodeData) -> None:
        """Make the flushed-but-uncommitted changes of ``st`` pending again (uses the RAM
        manifest of before the loss)."""
        st.mark()
        for slot in sorted(st.group_slots):
            if slot in st.dirty or slot * self.cs >= st.size:
                continue
            cid = st.manifest.get(slot)
            try:
                content: bytes = self.chunks.load(cid) if cid is not None else b""
            except CasError as exc:
                log.error("inode %d slot %d: cannot re-read its chunk after a lost transaction: %s",
                          st.ino, slot, exc)
                st.wb_error, st.wb_message, st.wb_failed_at = errno.EIO, str(exc), time.monotonic()
                continue
            st.dirty[slot] = content
            self._add_dirty(st, len(content))
        if st.group_trunc is not None:
            st.truncate_from = st.group_trunc if st.truncate_from is None else min(st.truncate_from, st.group_trunc)
        st.attrs = {**st.group_attrs, **st.attrs}
        st.clear_group()

    def discard(self, st: InodeData) -> None:
        """Throw away ``st``'s uncommitted changes (its file was unlinked and closed)."""
        st.dirty.clear()
        self._add_dirty(st, -st.dirty_bytes)
        st.wb_error = st.wb_failures = 0
        st.clear_group()
        self.in_group.pop(st.ino, None)
        st.attrs.clear()
        st.truncate_from = None

    def adopt(self, ino: int, size: int, slots: dict[int, bytes], truncate_from: int | None,
              attrs: dict[str, int]) -> InodeData:
        """Install buffers kept outside RAM (a rescue record, cas/rescue.py) as the dirty
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
        """Forget the RAM state of ``ino`` (it must be flushed)."""
        st = self.states.pop(ino, None)
        if st is not None:
            self.total_dirty -= st.dirty_bytes

    def pending(self, ino: int) -> InodeData | None:
        """The state of ``ino`` if it holds changes not yet committed, else None."""
        st = self.states.get(ino)
        return st if st is not None and st.needs_flush else None

    # -- reads -----------------------------------------------------------------------
    def _slot_content(self, st: InodeData, slot: int) -> bytes | bytearray:
        """The current bytes of ``slot`` (may be shorter than the slot: zeros follow)."""
        buf = st.dirty.get(slot)
        if buf is not None:
            return buf
        cid = st.manifest.get(slot)
        if cid is None:
            return b""
        return self.chunks.load(cid)

    def read(self, ino: int, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short at end of file). Raises EIO errors."""
        st = self.load_state(ino)
        end = min(st.size, offset + length)
        if offset >= end:
            return b""
        cs = self.cs
        if offset == st.read_end:  # sequential: load the next slots in the background
            first = (end - 1) // cs + 1
            self.chunks.prefetch(st.manifest[s] for s in range(first, first + READAHEAD_SLOTS)
                                 if s in st.manifest and s not in st.dirty)
        st.read_end = end
        parts: list[bytes | bytearray | memoryview] = []
        pos = offset
        while pos < end:
            slot, so = divmod(pos, cs)
            take = min(cs - so, end - pos)
            content = self._slot_content(st, slot)
            piece = memoryview(content)[so:so + take]
            parts.append(piece)
            if len(piece) < take:
                parts.append(self._zeros[:take - len(piece)])
            pos += take
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)

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
                self.flush(st)
            elif self.total_dirty >= self.total_dirty_limit:
                self.flush_all()
        except CasError:
            pass  # recorded on the states (wb_error): the bytes stay buffered and are retried
        return n

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
            if last not in st.dirty and last in st.manifest and size > st.size:
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
        states = [st for st in states if st.needs_flush]
        if not states:
            return
        rowless: list[InodeData] = []
        try:
            gone = self._rowless(states)
            if gone:
                rowless = [st for st in states if st.ino in gone]
                states = [st for st in states if st.ino not in gone]
            if states:
                self._flush_many(states)
        except Exception as exc:
            self._failed(states, exc)
            raise
        if gone:
            # a lost group transaction took the file's creation with it: its bytes stay
            # here (and go to the rescue area at exit, then /lost+found); never write
            # manifest rows for an inode that does not exist
            lost = FsError(f"inodes {sorted(gone)} no longer exist in the database (their creation "
                           "was lost with a transaction)")
            self._failed(rowless, lost)
            raise lost
        self.failing = False

    def _rowless(self, states: list[InodeData]) -> set[int]:
        """The inodes of ``states`` that have no inodes row (one query)."""
        inos = [st.ino for st in states]
        found = {int(r[0]) for r in self.db.query("SELECT id FROM inodes WHERE id IN %s", (inos,))}
        return set(inos) - found

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
        # slot contents -> chunk ids (all-zero slots are holes: None)
        plan: list[tuple[InodeData, dict[int, bytes | None]]] = []
        nonzero: list[bytes | bytearray] = []
        where: list[tuple[int, int]] = []
        for k, st in enumerate(states):
            new: dict[int, bytes | None] = {}
            for slot in sorted(st.dirty):
                d = self._slot_bytes(st, slot)
                new[slot] = None
                if d and not self._is_zero(d):
                    nonzero.append(d)
                    where.append((k, slot))
            plan.append((st, new))
        ids = self.chunks.ids_of(nonzero)
        chunk_data: dict[bytes, bytes | bytearray] = {}
        for cid, d, (k, slot) in zip(ids, nonzero, where):
            plan[k][1][slot] = cid
            chunk_data[cid] = d
        stored = self.chunks.store_unknown(self.db, chunk_data)

        def body(cur: Any) -> None:
            gained: list[bytes] = []
            lost: list[bytes] = []
            manifest_rows: list[tuple[int, int, bytes]] = []
            for st, new in plan:
                # this mount is the only writer of its open inodes' manifests: the RAM
                # manifest is the committed one
                old = {s: st.manifest[s] for s in new if s in st.manifest}
                if st.truncate_from is not None:
                    old.update({s: c for s, c in st.manifest.items() if s >= st.truncate_from})
                    cur.execute("DELETE FROM manifests WHERE inode = %s AND slot >= %s",
                                (st.ino, st.truncate_from))
                lost.extend(old.values())
                holes = [s for s, c in new.items() if c is None and s in old]
                if holes:
                    cur.execute("DELETE FROM manifests WHERE inode = %s AND slot IN %s", (st.ino, holes))
                for s, c in new.items():
                    if c is not None:
                        gained.append(c)
                        manifest_rows.append((st.ino, s, c))
                cols = sorted(st.attrs)
                cur.execute("UPDATE inodes SET " + "".join(f"{c} = %s, " for c in cols) + "size = %s WHERE id = %s",
                            [*(st.attrs[c] for c in cols), st.size, st.ino])
            self.chunks.apply_deltas(cur, net_deltas(gained, lost), chunk_data, stored)
            for i in range(0, len(manifest_rows), 500):
                batch = manifest_rows[i:i + 500]
                cur.execute("REPLACE INTO manifests (inode, slot, chunk) VALUES "
                            + ",".join(["(%s,%s,%s)"] * len(batch)), [v for r in batch for v in r])

        self.db.transaction(body)
        grouped = self.db.in_group  # not committed yet: remember what to give back if lost
        # committed: bring the RAM state in line
        for st, new in plan:
            if grouped:
                st.group_slots.update(new)
                if st.truncate_from is not None:
                    st.group_trunc = (st.truncate_from if st.group_trunc is None
                                      else min(st.group_trunc, st.truncate_from))
                st.group_attrs.update(st.attrs)
                self.in_group[st.ino] = st
            if st.truncate_from is not None:
                for s in [s for s in st.manifest if s >= st.truncate_from]:
                    del st.manifest[s]
            for slot, maybe in new.items():
                if maybe is None:
                    st.manifest.pop(slot, None)
                else:
                    st.manifest[slot] = maybe
            st.dirty.clear()
            self._add_dirty(st, -st.dirty_bytes)
            st.wb_error = st.wb_failures = 0
            st.wb_message = ""
            st.truncate_from = None
            if self.on_commit is not None:
                self.on_commit(st)
            st.attrs.clear()

    def flush_due(self, older_than_s: float, also: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        """Flush, in one transaction, every inode whose oldest unflushed change is older
        than ``older_than_s`` seconds, and the inodes in ``also``; an inode whose last
        writeback failed less than :meth:`retry_delay` ago waits for a later call."""
        now = time.monotonic()
        self.flush_many([st for st in self.states.values()
                         if st.needs_flush and (st.ino in also or now - st.dirty_since >= older_than_s)
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

    def free_manifest(self, cur: Any, ino: int) -> None:
        """Inside a transaction: drop ``ino``'s manifest and its chunks' references."""
        cur.execute("SELECT chunk FROM manifests WHERE inode = %s FOR UPDATE", (ino,))
        lost = [bytes(r[0]) for r in cur.fetchall()]
        if lost:
            self.chunks.apply_deltas(cur, net_deltas([], lost), {}, {})
            cur.execute("DELETE FROM manifests WHERE inode = %s", (ino,))
