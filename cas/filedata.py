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
    dirty: dict[int, bytearray] = field(default_factory=dict)
    dirty_bytes: int = 0
    truncate_from: int | None = None   # slots >= this lose their manifest rows at flush
    times_dirty: bool = False
    mtime_ns: int = 0
    ctime_ns: int = 0
    dirty_since: float = 0.0       # time.monotonic() of the oldest unflushed change

    @property
    def needs_flush(self) -> bool:
        return bool(self.dirty) or self.times_dirty or self.truncate_from is not None


class FileData:
    """Reads and writes file contents through dirty buffers and the chunk manager."""

    def __init__(self, db: Database, chunks: ChunkManager, chunk_size: int,
                 inode_dirty_limit: int = 64 << 20) -> None:
        self.db = db
        self.chunks = chunks
        self.cs = chunk_size
        self.inode_dirty_limit = inode_dirty_limit
        self.states: dict[int, InodeData] = {}
        self._zeros = bytes(chunk_size)

    # -- state -----------------------------------------------------------------------
    def load_state(self, ino: int) -> InodeData:
        """The RAM state of ``ino``, created from the database if absent. Raises NotFound."""
        st = self.states.get(ino)
        if st is not None:
            return st
        rows = self.db.query("SELECT size FROM inodes WHERE id = %s", (ino,))
        if not rows:
            raise NotFound(f"inode {ino}")
        manifest = {int(s): bytes(c) for s, c in
                    self.db.query("SELECT slot, chunk FROM manifests WHERE inode = %s", (ino,))}
        st = InodeData(ino=ino, size=int(rows[0][0]), manifest=manifest)
        self.states[ino] = st
        return st

    def drop_state(self, ino: int) -> None:
        """Forget the RAM state of ``ino`` (it must be flushed)."""
        self.states.pop(ino, None)

    def pending_size(self, ino: int) -> tuple[int, int, int] | None:
        """(size, mtime_ns, ctime_ns) not yet committed for ``ino``, or None."""
        st = self.states.get(ino)
        if st is None or not st.needs_flush:
            return None
        return st.size, st.mtime_ns, st.ctime_ns

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
        """Buffer ``data`` at ``offset``; flush when the inode's buffers pass the limit.

        Returns the number of bytes written (all of them). Raises NoSpace/FsError only
        from a flush forced by the buffer limit; the data then stays buffered.
        """
        st = self.load_state(ino)
        if not st.needs_flush:
            st.dirty_since = time.monotonic()
        cs = self.cs
        n = len(data)
        view = memoryview(data)
        pos = 0
        while pos < n:
            slot, so = divmod(offset + pos, cs)
            take = min(cs - so, n - pos)
            buf = st.dirty.get(slot)
            if buf is None:
                if so == 0 and take == cs:
                    st.dirty[slot] = bytearray(view[pos:pos + take])
                    st.dirty_bytes += cs
                    pos += take
                    continue
                valid = max(0, min(cs, st.size - slot * cs))
                buf = bytearray(memoryview(self._slot_content(st, slot))[:valid])
                st.dirty[slot] = buf
                st.dirty_bytes += len(buf)
            before = len(buf)
            if before < so:
                buf.extend(self._zeros[:so - before])
            buf[so:so + take] = view[pos:pos + take]
            st.dirty_bytes += len(buf) - before
            pos += take
        st.size = max(st.size, offset + n)
        self._touch(st)
        if st.dirty_bytes >= self.inode_dirty_limit:
            self.flush(st)
        return n

    @staticmethod
    def _touch(st: InodeData) -> None:
        """Record a content change: mtime and ctime become now (POSIX write/truncate)."""
        st.mtime_ns = st.ctime_ns = time.time_ns()
        st.times_dirty = True

    def truncate(self, ino: int, size: int) -> None:
        """Set the size of ``ino`` to ``size`` bytes (POSIX truncate) and commit it."""
        st = self.load_state(ino)
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
        self._touch(st)
        self.flush(st)

    # -- flush -----------------------------------------------------------------------
    def flush(self, st: InodeData) -> None:
        """Commit ``st``'s dirty slots, truncation and size/times in one transaction.

        New chunk files are made durable first. Raises NoSpace/FsError (nothing is
        committed and the buffers are kept) or MetaError.
        """
        if not st.needs_flush:
            return
        cs = self.cs
        slots = sorted(st.dirty)
        datas: list[bytes] = []
        for slot in slots:
            valid = max(0, min(cs, st.size - slot * cs))
            buf = st.dirty[slot]
            d = bytes(buf[:valid])
            if len(d) < valid:
                d += self._zeros[:valid - len(d)]
            datas.append(d)
        new: dict[int, bytes | None] = {}
        nonzero = [(s, d) for s, d in zip(slots, datas) if d and d != self._zeros[:len(d)]]
        ids = self.chunks.ids_of([d for _, d in nonzero])
        chunk_data = {cid: d for cid, (_, d) in zip(ids, nonzero)}
        for slot in slots:
            new[slot] = None
        for cid, (slot, _) in zip(ids, nonzero):
            new[slot] = cid
        stored = self.chunks.store_unknown(self.db, chunk_data)
        trunc = st.truncate_from

        def body(cur: Any) -> dict[int, bytes]:
            old: dict[int, bytes] = {}
            if slots:
                cur.execute("SELECT slot, chunk FROM manifests WHERE inode = %s AND slot IN %s FOR UPDATE",
                            (st.ino, slots))
                old.update({int(s): bytes(c) for s, c in cur.fetchall()})
            if trunc is not None:
                cur.execute("SELECT slot, chunk FROM manifests WHERE inode = %s AND slot >= %s FOR UPDATE",
                            (st.ino, trunc))
                old.update({int(s): bytes(c) for s, c in cur.fetchall()})
            gained = [c for c in new.values() if c is not None]
            self.chunks.apply_deltas(cur, net_deltas(gained, old.values()), chunk_data, stored)
            if trunc is not None:
                cur.execute("DELETE FROM manifests WHERE inode = %s AND slot >= %s", (st.ino, trunc))
            holes = [s for s, c in new.items() if c is None and s in old]
            if holes:
                cur.execute("DELETE FROM manifests WHERE inode = %s AND slot IN %s", (st.ino, holes))
            rows = [(st.ino, s, c) for s, c in new.items() if c is not None]
            for i in range(0, len(rows), 500):
                batch = rows[i:i + 500]
                cur.execute("REPLACE INTO manifests (inode, slot, chunk) VALUES "
                            + ",".join(["(%s,%s,%s)"] * len(batch)), [v for r in batch for v in r])
            if st.times_dirty:
                cur.execute("UPDATE inodes SET size = %s, mtime_ns = %s, ctime_ns = %s WHERE id = %s",
                            (st.size, st.mtime_ns, st.ctime_ns, st.ino))
            else:
                cur.execute("UPDATE inodes SET size = %s WHERE id = %s", (st.size, st.ino))
            return old

        self.db.transaction(body)
        # committed: bring the RAM state in line
        if trunc is not None:
            for s in [s for s in st.manifest if s >= trunc]:
                del st.manifest[s]
        for slot, cid in new.items():
            if cid is None:
                st.manifest.pop(slot, None)
            else:
                st.manifest[slot] = cid
        st.dirty.clear()
        st.dirty_bytes = 0
        st.truncate_from = None
        st.times_dirty = False

    def flush_due(self, older_than_s: float) -> None:
        """Flush every inode whose oldest unflushed change is older than ``older_than_s``."""
        now = time.monotonic()
        for st in list(self.states.values()):
            if st.needs_flush and now - st.dirty_since >= older_than_s:
                self.flush(st)

    def flush_all(self) -> None:
        """Flush every inode with unflushed changes."""
        for st in list(self.states.values()):
            self.flush(st)

    def free_manifest(self, cur: Any, ino: int) -> None:
        """Inside a transaction: drop ``ino``'s manifest and its chunks' references."""
        cur.execute("SELECT chunk FROM manifests WHERE inode = %s FOR UPDATE", (ino,))
        lost = [bytes(r[0]) for r in cur.fetchall()]
        if lost:
            self.chunks.apply_deltas(cur, net_deltas([], lost), {}, {})
            cur.execute("DELETE FROM manifests WHERE inode = %s", (ino,))
