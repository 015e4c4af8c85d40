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

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .chunks import ChunkManager, net_deltas
from .errors import NotFound
from .meta import Database


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
        """Reload every state's committed manifest and size from the database (after a
        lost transaction). Buffered slots stay dirty; a file whose row is gone keeps
        only its buffers."""
        for st in self.states.values():
            committed, st.manifest = self._committed(st.ino)
            st.size = max([committed or 0] + [s * self.cs + len(b) for s, b in st.dirty.items()])
            st.truncate_from = None

    def discard(self, st: InodeData) -> None:
        """Throw away ``st``'s uncommitted changes (its file was unlinked and closed)."""
        st.dirty.clear()
        st.dirty_bytes = 0
        st.attrs.clear()
        st.truncate_from = None

    def drop_state(self, ino: int) -> None:
        """Forget the RAM state of ``ino`` (it must be flushed)."""
        self.states.pop(ino, None)

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

        Returns the number of bytes written (all of them). Raises NoSpace/FsError only
        from a flush forced by the buffer limit; the data then stays buffered.
        """
        st = self.load_state(ino)
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
                st.dirty_bytes += cs - (len(old) if old is not None else 0)
                pos += take
                continue
            if old is None:
                valid = max(0, min(cs, st.size - slot * cs))
                buf = bytearray(memoryview(self._slot_content(st, slot))[:valid])
                st.dirty_bytes += len(buf)
            elif isinstance(old, bytearray):
                buf = old
            else:
                buf = bytearray(old)
            st.dirty[slot] = buf
            before = len(buf)
            if before < so:
                buf.extend(self._zeros[:so - before])
            buf[so:so + take] = view[pos:pos + take]
            st.dirty_bytes += len(buf) - before
            pos += take
        self._touch(st)
        if st.dirty_bytes >= self.inode_dirty_limit:
            self.flush(st)
        elif sum(s.dirty_bytes for s in self.states.values()) >= self.total_dirty_limit:
            self.flush_all()
        return n

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
                st.dirty_bytes += len(buf)
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
                st.dirty_bytes -= len(st.dirty.pop(slot))
            if size % cs:
                last = keep - 1
                content = bytearray(memoryview(self._slot_content(st, last))[:size % cs])
                old = st.dirty.get(last)
                st.dirty_bytes += len(content) - (len(old) if old is not None else 0)
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
        FsError (nothing is committed and the buffers are kept) or MetaError.
        """
        states = [st for st in states if st.needs_flush]
        if not states:
            return
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
        for st, new in plan:  # written by the UPDATE inodes below, with the other columns
            st.attrs["data_bytes"] = self.stored_bytes(st, new)
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
        # committed: bring the RAM state in line
        for st, new in plan:
            if st.truncate_from is not None:
                for s in [s for s in st.manifest if s >= st.truncate_from]:
                    del st.manifest[s]
            for slot, maybe in new.items():
                if maybe is None:
                    st.manifest.pop(slot, None)
                else:
                    st.manifest[slot] = maybe
            st.dirty.clear()
            st.dirty_bytes = 0
            st.truncate_from = None
            if self.on_commit is not None:
                self.on_commit(st)
            st.attrs.clear()

    def stored_bytes(self, st: InodeData, new: dict[int, bytes | None] | None = None) -> int:
        """Bytes of ``st``'s file that lie in stored (non-hole) slots: ``inodes.data_bytes``,
        from which st_blocks is reported (docs/posix.md). A stored slot counts its bytes
        below the file's size (the last slot may be short).

        With ``new`` (slot -> chunk id, or None for a hole: the outcome of a flush of
        every dirty slot) the figure is exact once that flush commits. Without it, an
        estimate for a file with buffered changes: every dirty slot counts as stored (a
        slot that turns out all zeros becomes a hole at writeback). Cost: O(dirty slots),
        plus O(manifest) while a truncation is pending.
        """
        cs, tf, manifest = self.cs, st.truncate_from, st.manifest
        slots = len(manifest)
        if tf is not None:
            slots -= sum(1 for s in manifest if s >= tf)
        changes: dict[int, bytes | None] = new if new is not None else dict.fromkeys(st.dirty, b"")
        for s, c in changes.items():
            slots += (c is not None) - (s in manifest and (tf is None or s < tf))
        if slots <= 0 or st.size <= 0:
            return 0
        last = (st.size - 1) // cs
        if last in changes:
            last_stored = changes[last] is not None
        else:
            last_stored = last in manifest and (tf is None or last < tf)
        return slots * cs - (cs - (st.size - last * cs) if last_stored else 0)

    def flush_due(self, older_than_s: float, also: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        """Flush, in one transaction, every inode whose oldest unflushed change is older
        than ``older_than_s`` seconds, and the inodes in ``also``."""
        now = time.monotonic()
        self.flush_many([st for st in self.states.values()
                         if st.needs_flush and (st.ino in also or now - st.dirty_since >= older_than_s)])

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
