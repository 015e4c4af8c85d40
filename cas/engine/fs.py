"""The filesystem engine: POSIX namespace and file operations on top of MySQL and chunks.

:class:`Filesystem` is what the FUSE layer (and tests) call. Inode numbers are the
``inodes.id`` column; the root is inode 1. Every public method holds one re-entrant
lock, but only for short steps: a flush stores its chunks and a read loads them without
it, so calls from several threads overlap (see docs/concurrency.md); errors are raised as
:class:`~cas.errors.FsError` subclasses carrying the POSIX errno.

Semantics follow POSIX and Linux: unlink of a file still open keeps its data readable
through the open handles until the last release (the inode row stays with nlink 0 and is
freed then, or at the next start after a crash); an inode the kernel still references
(a removed working directory, an O_PATH descriptor) stays, with nlink 0, until the
kernel forgets it (docs/posix.md); directory link counts are 2 + the
number of subdirectories; mtime/ctime of a directory change when entries are added or
removed.
"""
from __future__ import annotations

import errno
import functools
import logging
import secrets
import stat as S
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, ParamSpec, TypeVar

import pymysql

from cas.chunk.cache import LFUCache
from cas.chunk.manager import ChunkManager
from cas.tier.cloud import CloudTier
from cas.tier.cloud import enabled as cloud_enabled
from cas.db import namespace as ns
from cas.db import sessions as dbsessions
from cas.db import changes as dbchanges
from cas.db.changes import Change
from cas.engine import coherence
from cas.db.queue import first_store as vol_first_store
from cas.db.volume import is_shared as vol_is_shared
from cas.chunk.envelope import codec_for
from cas.errors import ChunkMissing, IntegrityError
from cas.errors import Stale
from cas.errors import (CasError, Exists, FsError, InvalidArgument, IsADirectory, MetaError, NameTooLong,
                     NoData, NotADirectory, NotEmpty, NotFound)
from cas.engine.filedata import ChunkRef, FileData, InodeData, ReadPlan
from cas.db.database import ROOT_INODE, Database, Metadata
from cas.chunk.store import LocalStore
from cas.engine.syncstatus import VIRTUAL_XATTRS, FileSync, file_sync
from cas.engine.xattrs import XattrCache, check_name, check_space

log = logging.getLogger(__name__)

NAME_MAX = 255          # bytes, POSIX NAME_MAX on Linux
XATTR_SIZE_MAX = 65536  # bytes, Linux limits.h
# The largest file size (bytes): 8 PiB = 2**53, so that every size and offset stays exact
# as a double (stats, JSON) and slot numbers (offset // chunk size) stay below 2**37.
# truncate(2) beyond it is EFBIG, write(2) stops there (POSIX); docs/security.md.
MAX_FILE_SIZE = 1 << 53
RENAME_NOREPLACE = 1    # linux/fs.h
RENAME_EXCHANGE = 2
ATTR_CACHE_ENTRIES = 100_000  # inode rows kept in RAM (about 250 bytes each)
# names of the directories this mount made, kept whole (about 100 bytes each), and names
# lookups found absent: what answers lookups and EEXIST checks without a query
DIR_NAMES_MAX = 200_000
ABSENT_MAX = 100_000
# manifests of small files (at most SMALL_SLOTS slots) that lookups and listings read
# with the inode row, so that a cold open needs no query (about 200 bytes each)
SMALL_SLOTS = 4
KNOWN_MANIFESTS_MAX = 50_000
SHARED_LOCK_WAIT_S = 10   # a shared mount's longest wait for one row lock (innodb_lock_wait_timeout)
INODE_RESERVE = 10_000   # inode numbers reserved at a time (cas.db.namespace.reserve_inodes)
IO_THREADS = 8                # threads writing chunk files (fsync waits overlap)
CLOSED_DIRTY_BATCH = 256      # released dirty files flushed together at this count
# When a namespace operation commits (docs/durability.md): with the group transaction
# (at fsync/fsyncdir, the 0.5 s writeback tick, 1,000 operations), or before it returns.
GROUP = "group"
IMMEDIATE = "immediate"
DURABILITY_MODES = (GROUP, IMMEDIATE)
CLOSE_WRITEBACK_BYTES = 8 << 20  # close() writes back a file with this many dirty bytes
CLOSE_SPACE_MARGIN = 64 << 20    # ... or any dirty file when the store's disk is this tight
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Attr:
    """The attributes of one inode; sizes in bytes, times in ns since the epoch.

    ``data_bytes`` is ``inodes.data_bytes`` (bytes of a file in stored slots, holes
    excluded; 0 for directories, symlinks and special files), or for a file with
    buffered changes an estimate from its RAM manifest and dirty slots.
    """

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    data_bytes: int = 0   # bytes in stored (non-hole) slots: st_blocks = ceil(data_bytes / 512)


@dataclass(frozen=True)
class StatFs:
    """statvfs(3) figures: block size and counts in bytes/blocks, inode counts."""

    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int


def _locked(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        self = args[0]
        with self.lock:  # type: ignore[attr-defined]
            return fn(*args, **kwargs)
    return wrapper


V = TypeVar("V")


def _bounded_put(cache: OrderedDict[int, V], key: int, value: V) -> V:
    """Insert ``value`` as the newest entry; drop the oldest past ATTR_CACHE_ENTRIES."""
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > ATTR_CACHE_ENTRIES:
        cache.popitem(last=False)
    return value


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name of {len(name)} bytes")
    if not name or b"/" in name or name in (b".", b".."):
        raise InvalidArgument(f"bad name {name!r}")


class Filesystem:
    """A mounted (or mountable) casfs volume. Close with :meth:`close`.

    ``durability``: GROUP (namespace operations commit with the group transaction) or
    IMMEDIATE (each commits before it returns); see docs/durability.md. Raises
    InvalidArgument for anything else. ``flush_behind``: a write that fills a file's
    buffers hands their flush to a background thread (docs/writeback.md).

    Thread-safe: any thread may call any method (docs/concurrency.md). The engine lock
    is held for short steps only; a flush stores its chunks, and :meth:`read_finish`
    loads chunks, without it.
    """

    def __init__(self, meta: Metadata, cache_bytes: int = 256 << 20, workers: int = 2,
                 group_commit: bool = True, durability: str = GROUP, flush_behind: bool = True,
                 shared: bool = False, consistency: str = coherence.SESSION) -> None:
        vol = meta.volume
        envelope = codec_for(vol)   # VolumeError for an encrypted volume not unlocked: before any thread starts
        self.meta = meta
        self.db = meta.db
        if durability not in DURABILITY_MODES:
            raise InvalidArgument(f"durability {durability!r}: choose one of {', '.join(DURABILITY_MODES)}")
        # IMMEDIATE: every transaction body commits before it returns (docs/durability.md)
        self.immediate = durability == IMMEDIATE
        # shared mode (docs/sharing.md): several machines mount the volume at once
        self.shared = shared
        self.level = coherence.level(consistency)
        if group_commit:  # see Database.start_group_commit and docs/concurrency.md
            if self.immediate or shared:   # shared: every body commits before it returns
                self.db.start_group_commit(max_ops=1)
            else:
                self.db.start_group_commit()
            self.db.on_group_lost = self._resync
            self.db.on_group_commit = self._group_committed
        self.chunk_size = vol.chunk_size
        self.lock = threading.RLock()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="casfs-chunk")
        self.io_pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="casfs-io")
        codec, level = vol.codec
        self.store = LocalStore(vol.chunk_dir)
        self.cache = LFUCache(cache_bytes)
        self.chunks = ChunkManager(self.store, self.cache, codec, level, self.pool, self.io_pool,
                                   envelope=envelope)
        self.data = FileData(self.db, self.chunks, vol.chunk_size, lock=self.lock, flush_behind=flush_behind)
        self.data.on_commit = self._committed
        self.lookups: dict[int, int] = {}   # inode -> references the kernel holds (lookups)
        # inodes with no links left that the kernel still references: freed at its forget
        # (or at close, or by recover() at the next start); see docs/posix.md
        self.held: set[int] = set()
        # whether lookup counts are a kernel's, which forgets them (the FUSE layer sets it);
        # without a kernel (engine tests, tools) nothing would ever forget an inode
        self.keep_referenced = False
        # Write-through cache of inode rows. This mount is the only writer of the
        # namespace of its volume (a volume mounts once), so the cache is never stale.
        self.attrs: OrderedDict[int, Attr] = OrderedDict()
        self.closed_dirty: set[int] = set()  # released files whose flush is batched
        self.dir_opens: dict[int, int] = {}  # directory inode -> open handles
        self.xattr_cache = XattrCache()  # bounded in bytes (cas/engine/xattrs.py)
        # Creates are held in RAM and written together, before the next statement or
        # commit on the connection (docs/smallfiles.md); inode numbers are handed out
        # here (this mount is the only writer of the namespace), never twice a mount.
        self.creates = ns.HeldCreates()
        self.db.before_statement = self._write_creates
        self._next_ino = 0    # the next inode number to hand out, below _ino_limit
        self._ino_limit = 0
        # Every name of the directories made by this mount (they started empty and
        # only this mount changes them), at most DIR_NAMES_MAX names in all; and
        # (parent, name) pairs a lookup found absent. Both emptied when a group is lost.
        self.dir_names: dict[int, dict[bytes, int]] = {}
        self._dir_names_count = 0
        self.absent: OrderedDict[tuple[int, bytes], None] = OrderedDict()
        # committed manifests of small files not open, read by lookup/readdir and taken
        # (removed) by the next open; dropped by a truncate, a free, a lost group
        self.known_manifests: OrderedDict[int, dict[int, bytes]] = OrderedDict()
        self.cloud: CloudTier | None = None
        # since mount, for the rates of `casfs stats --watch`: FUSE requests (counted by
        # the FUSE layer), bytes the applications read and wrote
        self.ops = 0
        self.bytes_read = 0
        self.bytes_written = 0
        # New chunks join the upload queue whenever the volume has a cloud tier, even
        # while this mount cannot reach it (the queue is drained by a later mount).
        self.chunks.enqueue = cloud_enabled(self.db)
        # Shared volume (docs/sharing.md, "Sessions"): an inode unlinked while open here
        # gets a ``sustained`` row of this mount's session (db.session_id) in the unlink's
        # transaction, so that no other mount frees it; set by the mount daemon.
        self.sustain_open = False
        # shared mode: the change feed of the other sessions, and the FUSE layer's hook
        # for what they changed (kernel invalidations); docs/sharing.md
        self.feed: coherence.ChangeFeed | None = None
        self.on_changes: Callable[[list[Change]], None] | None = None
        # queue rows name this side's store; a shared volume's dedup and bad marks know
        # that other machines' stores hold chunks this one lacks (docs/sharing.md, "Data")
        self.chunks.store_id, self.chunks.first_store = vol.store, vol_first_store(vol.uuid)
        self.chunks.shared = shared or vol_is_shared(self.db)
        if shared:
            self._share()

    def _share(self) -> None:
        """Shared mode (docs/sharing.md, "Consistency"): no held creates, no RAM answer
        taken as the truth, every transaction body committed at once (so no row lock
        is held across bodies, and another machine's deadlock can cost only the one
        body, which runs again), refcount deltas from the manifest rows, change rows
        written with every change, and a change feed to poll. A database connection
        with no session id yet (an engine test, or a mount before it registers its
        session) gets a random one so that its own change rows are told apart."""
        if not self.db.session_id:
            self.db.session_id = (1 << 62) | secrets.randbits(61)
        self.db.lone_bodies = True
        self.db.set_lock_wait(SHARED_LOCK_WAIT_S)
        self.data.shared = True
        self.data.log_changes = self._log
        self.feed = coherence.ChangeFeed()
        self.feed.start(self.db, self.db.session_id)

    def _log(self, cur: pymysql.cursors.Cursor, items: list[tuple[int, int | None, bytes | None]]) -> None:
        """Shared mode: record change rows for ``items`` ((inode, dentry parent or None,
        name or None)) in the caller's transaction body, as its last statement
        (cas/db/changes.py). Nothing on a volume that is not shared."""
        if self.shared and items:
            dbchanges.record(cur, self.db.session_id, items)

    def poll_changes(self, prune: bool = False) -> int:
        """Shared mode: read the change rows other sessions committed since the last
        poll and drop what they name from RAM (attributes, xattrs, small manifests;
        an open file reloads its committed manifest under its dirty slots, and its size
        unless it has changes of its own), then hand them to :attr:`on_changes` (the
        FUSE layer's kernel invalidations). With ``prune``, now and then (every
        PRUNE_EVERY_S) delete change rows older than CHANGES_KEEP_S, after the poll and
        outside the engine lock (:meth:`prune_changes`). Returns how many rows were
        applied (0 when not shared). Raises MetaError."""
        applied, due = self._poll_changes(prune)
        if due:
            self.prune_changes()
        return applied

    @_locked
    def _poll_changes(self, prune: bool) -> tuple[int, bool]:
        """:meth:`poll_changes` under the engine lock: (rows applied, whether a prune is
        due)."""
        if self.feed is None:
            return 0, False
        rows = self.feed.poll(self.db, self.db.session_id)
        if rows:
            self._apply_changes(rows)
        return len(rows), prune and self.feed.prune_due()

    def prune_changes(self) -> int:
        """Delete every change row older than CHANGES_KEEP_S (cas.db.changes.prune, in
        batches until none is left) on a connection of its own, without the engine
        lock: requests go on meanwhile. Returns how many rows went. Raises MetaError."""
        other = Database(self.db.target)
        try:
            return dbchanges.prune(other, coherence.CHANGES_KEEP_S)
        finally:
            other.close()

    def _apply_changes(self, rows: list[Change]) -> None:
        refresh: set[int] = set()
        for c in rows:
            self.attrs.pop(c.inode, None)
            self.xattr_cache.pop(c.inode, None)
            self.known_manifests.pop(c.inode, None)
            if c.parent is not None:
                self.attrs.pop(c.parent, None)
                self._names_drop(c.parent)
                if c.name is not None:
                    self.absent.pop((c.parent, c.name), None)
            if c.inode in self.data.states:
                refresh.add(c.inode)
        for ino in refresh:
            st = self.data.states.get(ino)
            if st is not None and not st.lost:
                self.data.refresh(st)
        if self.on_changes is not None:
            self.on_changes(rows)

    def runtime_stats(self) -> dict[str, float | int]:
        """Live counters of this mount, for `casfs stats`: the RAM cache's hits, misses,
        hit ratio, size and capacity (bytes), evictions; cloud uploads and fetches; since
        mount: FUSE requests (``ops``), bytes read and written by applications, bytes
        written back (non-hole slots) and, of those, bytes stored as new chunks (the rest
        was deduplicated). O(open files)."""
        c = self.cache.stats()
        out: dict[str, float | int] = {
            "cache_hits": c.hits, "cache_misses": c.misses, "cache_hit_ratio": round(c.hit_ratio, 6),
            "cache_bytes": c.size_bytes, "cache_capacity_bytes": c.capacity_bytes,
            "cache_entries": c.entries, "cache_evictions": c.evictions}
        if self.cloud is not None:
            out.update(cloud_uploaded_packs=self.cloud.uploaded_packs,
                       cloud_uploaded_bytes=self.cloud.uploaded_bytes, cloud_fetches=self.cloud.fetches)
        out.update(self.writeback_stats())
        out.update(ops=self.ops, read_bytes=self.bytes_read, written_bytes=self.bytes_written,
                   writeback_bytes=self.data.new_bytes + self.data.dedup_bytes,
                   new_chunk_bytes=self.data.new_bytes)
        return out

    def writeback_stats(self) -> dict[str, Any]:
        """Uncommitted data of this mount (RAM reads only, no lock needed): dirty bytes
        buffered, files with uncommitted changes, uncommitted namespace operations, and
        the message of the last failed writeback ("" = none, or a success since)."""
        d = self.data
        files = sum(1 for st in list(d.states.values()) if st.needs_flush)
        return {"dirty_bytes": d.total_dirty + d.total_flying, "dirty_files": files,
                "uncommitted_ops": self.db.uncommitted,
                "writeback_error": d.last_error if d.failing else "",
                "last_writeback_error": d.last_error}

    def attach_cloud(self, tier: CloudTier) -> None:
        """Use ``tier`` for reads of evicted chunks; :meth:`close` stops it."""
        self.cloud = tier
        self.chunks.cloud = tier

    # -- life cycle ------------------------------------------------------------------
    @_locked
    def recover(self) -> int:
        """Free inodes left with nlink 0 by a crash (unlinked while open). Returns count."""
        rows = ns.unlinked_inodes(self.db)
        freed = 0
        for ino in rows:
            # on a shared volume an inode a live session sustains is not freed
            freed += self._free_inode(ino)
        self.db.commit()
        return freed

    @_locked
    def close(self) -> None:
        """Flush everything, free unlinked inodes, release the pool and the database."""
        try:
            self.data.flush_all()
            for ino in list(self.data.states):
                self._drop(ino)
            for ino in list(self.dir_opens):
                self.dir_opens.pop(ino)
                self._maybe_free(ino)
            self.lookups.clear()   # the kernel forgets everything at unmount
            for ino in list(self.held):
                self._maybe_free(ino)
        finally:
            if self.data.behind is not None:
                with self.data.unlocked():   # a queued flush-behind needs the lock
                    self.data.behind.shutdown(wait=True)
            if self.cloud is not None:
                self.cloud.close()
            self.pool.shutdown(wait=True)
            self.io_pool.shutdown(wait=True)
            self.meta.close()

    def _resync(self) -> None:
        """The group transaction was lost: what it held never happened. Drop every RAM
        copy of database state, and reload open files' manifests and sizes (their
        uncommitted buffers stay)."""
        log.error("metadata transaction lost: reloading cached state from the database")
        self.creates.clear()   # lost with the group (the database counted them)
        self.dir_names.clear()
        self._dir_names_count = 0
        self.absent.clear()
        self.known_manifests.clear()
        self.attrs.clear()
        self.xattr_cache.clear()
        # files closed since the last commit come back with their buffers: write them
        # back like released files (docs/database.md)
        # (inode numbers need nothing here: they come from reserve_inodes, committed on
        # a connection of its own before use, and the RAM counter only counts up)
        self.closed_dirty.update(self.data.reload_all())

    def _group_committed(self) -> None:
        self.data.group_committed()

    # -- attributes ------------------------------------------------------------------
    def _attr_row(self, row: ns.InodeRow) -> Attr:
        """Attributes from an inodes row (cached), with unflushed size/times applied."""
        a = None if self.shared else self.attrs.get(row.id)   # shared: the row just read wins
        return self._with_pending(a or self._cache(Attr(*row)))

    def _xattrs(self, ino: int) -> dict[bytes, bytes]:
        """The extended attributes of ``ino`` (write-through cache, like attrs)."""
        x = self.xattr_cache.get(ino)
        if x is None:
            x = _bounded_put(self.xattr_cache, ino, ns.xattrs_of(self.db, ino))
        return x

    def _cache(self, attr: Attr) -> Attr:
        return _bounded_put(self.attrs, attr.ino, attr)

    def _patch(self, ino: int, nlink_delta: int = 0, **changes: int) -> None:
        """Apply a committed change to the cached attributes of ``ino`` (if cached)."""
        a = self.attrs.get(ino)
        if a is not None:
            self.attrs[ino] = replace(a, nlink=max(0, a.nlink + nlink_delta), **changes)

    def _get(self, ino: int) -> Attr:
        a = self.attrs.get(ino)
        if a is None:
            row = ns.inode(self.db, ino)
            if row is None:
                if self.shared:   # freed by another machine: the kernel's handle is stale
                    raise Stale(f"inode {ino}")
                raise NotFound(f"inode {ino}")
            a = self._cache(Attr(*row))
        return self._with_pending(a)

    def _with_pending(self, a: Attr) -> Attr:
        st = self.data.pending(a.ino)
        if st is None:
            return a
        return replace(a, **{**st.flying_attrs, **st.attrs, "size": st.size,
                             "data_bytes": self.data.stored_bytes(st)})

    def _committed(self, st: InodeData, size: int, cols: dict[str, int]) -> None:
        """A flush of ``st`` committed: the ``size`` and columns ``cols`` it wrote are the
        row's now (newer changes stay pending in ``st``)."""
        a = self.attrs.get(st.ino)
        if a is not None:
            self.attrs[st.ino] = replace(a, size=size, **cols)

    def _count(self, ino: int) -> None:
        self.lookups[ino] = self.lookups.get(ino, 0) + 1

    def _remember(self, attr: Attr) -> Attr:
        """Count one kernel lookup reference to ``attr.ino`` and return ``attr``."""
        self._count(attr.ino)
        return attr

    @_locked
    def getattr(self, ino: int, fresh: bool = False) -> Attr:
        """Attributes of ``ino``. ``fresh``: the kernel asks (FUSE GETATTR); under
        strong consistency on a shared volume the change log is read first. Raises
        NotFound, MetaError."""
        if fresh and self.level.poll_at_lookup:
            self.poll_changes()
        return self._get(ino)

    @_locked
    def lookup(self, parent: int, name: bytes) -> Attr:
        """Attributes of entry ``name`` in directory ``parent``; counts a kernel lookup.

        Raises NotFound (ENOENT), NameTooLong.
        """
        if len(name) > NAME_MAX:
            raise NameTooLong(f"name of {len(name)} bytes")
        if self.level.poll_at_lookup:   # strong consistency on a shared volume
            self.poll_changes()
        if name == b".":
            return self._remember(self._get(parent))
        if name == b"..":
            up = ns.parent_of(self.db, parent)
            return self._remember(self._get(up if up is not None else ROOT_INODE))
        if parent in self.dir_names or (parent, name) in self.absent or (parent, name) in self.creates.names:
            known = self._entry_ino(parent, name)   # RAM (docs/smallfiles.md)
            if known is None:
                raise NotFound(name.decode(errors="replace"))
            return self._remember(self._get(known))
        # the name is not held (checked above): its row, and a small file's manifest
        found = ns.lookup_rows(self.db, parent, name, SMALL_SLOTS * self.chunk_size)
        if found is None:
            self._note_absent(parent, name)
            raise NotFound(name.decode(errors="replace"))
        row, manifest = found
        if row.id in self.creates.touches:  # its row awaits a held change: read it after
            return self._remember(self._get(row.id))
        if S.S_ISREG(row.mode) and row.size <= SMALL_SLOTS * self.chunk_size:
            self._know_manifests({row.id: manifest})
        return self._remember(self._attr_row(row))

    def _know_manifests(self, manifests: dict[int, dict[int, bytes]]) -> None:
        """Keep the committed manifests of small files that are not open (a state's
        manifest is the truth for an open file, and a dropped state not yet committed
        is kept in ``data.retired``), for the next open."""
        if self.shared:   # another machine may change them: an open reads the rows
            return
        for ino, m in manifests.items():
            if ino in self.data.states or ino in self.data.retired:
                continue
            self.known_manifests[ino] = m
            self.known_manifests.move_to_end(ino)
        while len(self.known_manifests) > KNOWN_MANIFESTS_MAX:
            self.known_manifests.popitem(last=False)

    @_locked
    def parent_attr(self, ino: int) -> Attr:
        """Attributes of the parent of directory ``ino`` (what its '..' names), without
        counting a kernel lookup: the root's parent is the root, and so is a removed
        directory's. Raises NotFound."""
        up = ns.parent_of(self.db, ino)
        return self._get(up if up is not None else ROOT_INODE)

    @_locked
    def count_lookup(self, ino: int) -> None:
        """Count one kernel reference to ``ino`` handed out outside lookup (readdirplus)."""
        self._count(ino)

    @_locked
    def forget(self, items: list[tuple[int, int]]) -> None:
        """Drop kernel lookup references: (inode, count) pairs (FUSE_FORGET). An inode
        with no links left is freed when the kernel forgets its last reference."""
        for ino, n in items:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)
                if ino in self.held:
                    self._maybe_free(ino)

    @_locked
    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None) -> Attr:
        """Change attributes (chmod, chown, truncate, utimens); ctime becomes now. The
        changes of an open file are committed with its next writeback, or at once under
        IMMEDIATE durability.

        Raises NotFound, IsADirectory (size on a directory), InvalidArgument.
        """
        cur = self._get(ino)
        now = time.time_ns()
        if size is not None:
            if size > MAX_FILE_SIZE:
                raise FsError(f"size {size} is beyond the maximum file size {MAX_FILE_SIZE}", errno.EFBIG)
            if S.S_ISDIR(cur.mode):
                raise IsADirectory("truncate of a directory")
            if not S.S_ISREG(cur.mode):
                raise InvalidArgument("truncate of a special file")
            transient = ino not in self.data.states
            self.known_manifests.pop(ino, None)
            try:
                self.data.truncate(ino, size)
            finally:
                if transient:
                    self._settle_unopened(ino)
        changes: dict[str, int] = {"ctime_ns": now}
        if mode is not None:
            changes["mode"] = (cur.mode & ~0o7777) | (mode & 0o7777)
        for col, val in (("uid", uid), ("gid", gid), ("atime_ns", atime_ns), ("mtime_ns", mtime_ns)):
            if val is not None:
                changes[col] = val
        st = self.data.states.get(ino)
        if st is not None and not (self.immediate or self.shared):  # an open (or release-pending) file: commit with its next flush
            st.set_attrs(**changes)
        else:
            if st is not None:  # IMMEDIATE or shared: commit now; its next flush must not write older values back
                st.attrs.update((c, v) for c, v in changes.items() if c in st.attrs)
            cols = sorted(changes)

            def body(cur: pymysql.cursors.Cursor) -> None:
                ns.update_inode(cur, ino, {c: changes[c] for c in cols})
                self._log(cur, [(ino, None, None)])
            self.db.transaction(body)
            self._patch(ino, **changes)
        return self._get(ino)

    def _settle_unopened(self, ino: int) -> None:
        """After a truncate loaded the state of ``ino`` for itself (the file was not
        open here): decide again what becomes of the state, because the truncate's
        flush released the engine lock and another thread may have opened and written
        the file meanwhile (docs/concurrency.md, "A state loaded for a truncate").
        Opened since: left alone. Changes not written back (the flush failed, or
        columns buffered since): joins the released files (``closed_dirty``), written
        back by the tick. Else dropped through :meth:`_drop` (waits for a flight, frees
        an unlinked inode)."""
        st = self.data.states.get(ino)
        if st is None or st.opens > 0:
            return
        if st.needs_flush and not st.lost:
            self.closed_dirty.add(ino)
        elif not st.needs_flush:
            self._drop(ino)

    # -- namespace -------------------------------------------------------------------
    def _dir(self, ino: int) -> Attr:
        a = self._get(ino)
        if not S.S_ISDIR(a.mode):
            raise NotADirectory(f"inode {ino}")
        return a

    @staticmethod
    def _entry(cur: pymysql.cursors.Cursor, parent: int, name: bytes) -> int | None:
        """Inode of entry ``name`` in ``parent``, row-locked, or None."""
        return ns.entry_for_update(cur, parent, name)

    @staticmethod
    def _touch_dir(cur: pymysql.cursors.Cursor, ino: int, now: int, nlink_delta: int = 0) -> None:
        ns.touch_dir(cur, ino, now, nlink_delta)

    def _make(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
              target: bytes | None = None) -> Attr:
        _check_name(name)
        pdir = self._dir(parent)
        if pdir.mode & S.S_ISGID:  # BSD group semantics of a setgid directory
            gid = pdir.gid
            if S.S_ISDIR(mode):
                mode |= S.S_ISGID
        is_dir = S.S_ISDIR(mode)
        size = len(target) if target is not None else 0

        now = time.time_ns()
        nlink = 2 if is_dir else 1
        if self.shared:
            return self._make_now([self._new_ino(), mode, uid, gid, nlink, size, rdev, now, now, now],
                                  parent, name, target)
        if self._entry_ino(parent, name) is not None:
            raise Exists(name.decode(errors="replace"))
        # held in RAM, written with the creates around it (docs/smallfiles.md)
        ino = self._new_ino()
        self.creates.add([ino, mode, uid, gid, nlink, size, rdev, now, now, now], parent, name, target,
                         now, 1 if is_dir else 0)
        self._patch(parent, 1 if is_dir else 0, mtime_ns=now, ctime_ns=now)
        self._names_set(parent, name, ino)
        if is_dir:
            self.dir_names[ino] = {}   # empty, and only this mount adds to it
        _bounded_put(self.xattr_cache, ino, {})
        attr = self._cache(Attr(ino, mode, uid, gid, nlink, size, rdev, now, now, now))
        self.db.hold_op()   # may write and commit the group; MetaError if it is lost
        return self._remember(attr)

    def _make_now(self, row: list[int], parent: int, name: bytes, target: bytes | None) -> Attr:
        """Shared mode: write a create at once (no held creates): the entry (EEXIST
        when any machine has the name), the inode row, the parent's times and link
        count, checked under the parent's row lock to be a live directory (a directory
        another machine removed meanwhile gives ENOENT, POSIX), and the change row."""
        ino, mode = row[0], row[1]
        is_dir = S.S_ISDIR(mode)

        def body(cur: pymysql.cursors.Cursor) -> None:
            ns.create_one(cur, row, parent, name, target)
            if not ns.nlink_for_update(cur, parent):   # before touch_dir changes nlink
                raise NotFound(f"directory {parent} was removed")
            self._touch_dir(cur, parent, row[7], 1 if is_dir else 0)
            self._log(cur, [(ino, parent, name)])

        self.db.transaction(body)
        self.attrs.pop(parent, None)
        _bounded_put(self.xattr_cache, ino, {})
        return self._remember(self._cache(Attr(*row)))

    def _new_ino(self) -> int:
        """A fresh inode number, counted up in RAM within a range of INODE_RESERVE
        numbers reserved (and committed) on a connection of its own
        (:func:`cas.db.namespace.reserve_inodes`): never handed out twice, by this mount
        (the kernel may still hold the numbers of a lost group's creates) or a later
        one (a rescue record names a lost create's number). Raises MetaError."""
        if self._next_ino >= self._ino_limit:
            other = Database(self.db.target)
            try:
                self._next_ino = ns.reserve_inodes(other, self._next_ino, INODE_RESERVE)
            finally:
                other.close()
            self._ino_limit = self._next_ino + INODE_RESERVE
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _write_creates(self) -> None:
        """Write the held creates (Database.before_statement): one savepoint of multi-row
        INSERTs (cas.db.ns.HeldCreates.write) counted as that many operations.
        If it fails the group is rolled back as a lost one (the creates were answered
        already: the database must not keep the group without them). Raises MetaError."""
        held = self.creates
        if not held:
            return
        try:
            self.db.transaction(held.write, ops=len(held))
        except MetaError as exc:
            if self.db.held_ops:   # not lost yet: the group holds other operations still
                self.db.lose_group(f"writing {len(held)} created inodes failed: {exc}")
            raise
        held.clear()
        self.db.held_ops = 0

    def _entry_ino(self, parent: int, name: bytes) -> int | None:
        """The inode ``name`` in directory ``parent`` names, or None: from RAM when this
        mount knows (its own directories, names found absent), else one query."""
        names = self.dir_names.get(parent)
        if names is not None:
            return names.get(name)
        held = self.creates.names.get((parent, name))
        if held is not None:
            return held
        if (parent, name) in self.absent:
            return None
        return ns.entry_inode(self.db, parent, name)

    def _names_set(self, parent: int, name: bytes, ino: int | None) -> None:
        """Keep the RAM name knowledge right after ``name`` in ``parent`` came to name
        ``ino`` (None: was removed)."""
        names = self.dir_names.get(parent)
        if ino is not None:
            self.absent.pop((parent, name), None)
        if names is None:
            return
        if ino is None:
            if names.pop(name, None) is not None:
                self._dir_names_count -= 1
        elif name not in names and self._dir_names_count >= DIR_NAMES_MAX:
            self._names_drop(parent)   # too many: this directory's names are asked for again
        else:
            self._dir_names_count += name not in names
            names[name] = ino

    def _names_drop(self, parent: int) -> None:
        """Stop answering names of ``parent`` from RAM (removed, or no room)."""
        names = self.dir_names.pop(parent, None)
        if names is not None:
            self._dir_names_count -= len(names)

    def _note_absent(self, parent: int, name: bytes) -> None:
        if self.shared:   # another machine may create it: never answered from RAM
            return
        self.absent[(parent, name)] = None
        if len(self.absent) > ABSENT_MAX:
            self.absent.popitem(last=False)

    @_locked
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        """Create a regular file, fifo, socket or device node. Raises Exists, NotFound."""
        if not (S.S_ISREG(mode) or S.S_ISFIFO(mode) or S.S_ISSOCK(mode) or S.S_ISCHR(mode)
                or S.S_ISBLK(mode)):
            raise InvalidArgument(f"mknod mode {mode:o}")
        return self._make(parent, name, mode, uid, gid, rdev)

    @_locked
    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        """Create a directory. Raises Exists, NotFound, NotADirectory, NameTooLong."""
        return self._make(parent, name, S.S_IFDIR | (mode & 0o7777), uid, gid)

    @_locked
    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        """Create and open a regular file (open count +1). Raises Exists, NotFound."""
        attr = self._make(parent, name, S.S_IFREG | (mode & 0o7777), uid, gid)
        self.data.new_state(attr.ino).opens += 1
        return attr

    @_locked
    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        """Create a symbolic link to ``target`` (at most 4096 bytes, PATH_MAX)."""
        if len(target) > 4096:
            raise NameTooLong("symlink target longer than PATH_MAX")
        return self._make(parent, name, S.S_IFLNK | 0o777, uid, gid, target=target)

    @_locked
    def readlink(self, ino: int) -> bytes:
        """Target of symlink ``ino``. Raises NotFound, InvalidArgument (not a symlink)."""
        target = ns.symlink_target(self.db, ino)
        if target is None:
            self._get(ino)
            raise InvalidArgument("not a symlink")
        return target

    @_locked
    def link(self, ino: int, parent: int, name: bytes) -> Attr:
        """Hard link ``ino`` as ``name`` in ``parent``. Directories cannot be linked (EPERM)."""
        _check_name(name)
        self._dir(parent)
        a = self._get(ino)
        if S.S_ISDIR(a.mode):
            raise FsError("hard link to a directory", errno.EPERM)

        now = time.time_ns()

        def body(cur: pymysql.cursors.Cursor) -> None:
            ns.insert_entry(cur, parent, name, ino)
            if self.shared and not ns.nlink_for_update(cur, ino):   # another machine removed it
                raise NotFound(f"inode {ino}")
            ns.add_link(cur, ino, now)
            self._touch_dir(cur, parent, now)
            if self.shared and not ns.nlink_for_update(cur, parent):
                raise NotFound(f"directory {parent} was removed")
            self._log(cur, [(ino, parent, name)])

        self.db.transaction(body)
        self._names_set(parent, name, ino)
        self._patch(ino, 1, ctime_ns=now)
        self._patch(parent, mtime_ns=now, ctime_ns=now)
        return self._remember(self._get(ino))

    def _drop_link(self, cur: pymysql.cursors.Cursor, ino: int, now: int) -> None:
        ns.drop_link(cur, ino, now)

    @_locked
    def unlink(self, parent: int, name: bytes) -> None:
        """Remove a non-directory entry. Raises NotFound, IsADirectory."""
        self._remove(parent, name, directory=False)

    @_locked
    def rmdir(self, parent: int, name: bytes) -> None:
        """Remove an empty directory. Raises NotFound, NotADirectory, NotEmpty."""
        self._remove(parent, name, directory=True)

    def _remove(self, parent: int, name: bytes, directory: bool) -> None:
        label = name.decode(errors="replace")

        def body(cur: pymysql.cursors.Cursor) -> int:
            ino = self._entry(cur, parent, name)
            if ino is None:
                raise NotFound(label)
            is_dir = S.S_ISDIR(ns.mode_for_update(cur, ino))
            if is_dir and not directory:
                raise IsADirectory(label)
            if directory and not is_dir:
                raise NotADirectory(label)
            now = time.time_ns()
            if is_dir:
                if ns.has_entries(cur, ino):
                    raise NotEmpty(label)
                ns.set_unlinked(cur, ino, now)
            else:
                self._drop_link(cur, ino, now)
            self._sustain_if_open(cur, ino)
            ns.delete_entry(cur, parent, name)
            self._touch_dir(cur, parent, now, -1 if is_dir else 0)
            self._log(cur, [(ino, parent, name)])
            return ino

        ino = self.db.transaction(body)
        self._names_set(parent, name, None)
        self.attrs.pop(ino, None)
        self.attrs.pop(parent, None)
        self._maybe_free(ino)

    @_locked
    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        """rename(2)/renameat2(2) with RENAME_NOREPLACE and RENAME_EXCHANGE.

        Raises NotFound, Exists (NOREPLACE), NotEmpty, IsADirectory, NotADirectory,
        InvalidArgument (unknown flags, or moving a directory below itself).
        """
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise InvalidArgument(f"rename flags {flags}")
        _check_name(new_name)
        self._dir(new_parent)
        if self.immediate:
            self._flush_renamed(old_parent, old_name)
            if flags & RENAME_EXCHANGE:
                self._flush_renamed(new_parent, new_name)

        def mode_of(cur: pymysql.cursors.Cursor, ino: int) -> int:
            return ns.mode_for_update(cur, ino)

        def body(cur: pymysql.cursors.Cursor) -> tuple[int, int | None, int | None]:
            if self.shared and new_parent != old_parent:
                # one cross-directory rename at a time, volume-wide, like Linux's
                # s_vfs_rename_mutex on one machine: else two machines each move a
                # directory below the other's (both pass _check_not_below on the rows
                # before either commits) and cut both off from the root
                ns.lock_renames(cur)
            src = self._entry(cur, old_parent, old_name)
            if src is None:
                raise NotFound(old_name.decode(errors="replace"))
            dst = self._entry(cur, new_parent, new_name)
            if self.shared and not ns.nlink_for_update(cur, new_parent):   # removed by another machine
                raise NotFound(f"directory {new_parent} was removed")
            src_dir = S.S_ISDIR(mode_of(cur, src))
            if src_dir and new_parent != old_parent:
                self._check_not_below(cur, new_parent, src)
            now = time.time_ns()
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise NotFound(new_name.decode(errors="replace"))
                dst_dir = S.S_ISDIR(mode_of(cur, dst))
                if dst_dir and new_parent != old_parent:
                    self._check_not_below(cur, old_parent, dst)
                ns.repoint_entry(cur, old_parent, old_name, dst)
                ns.repoint_entry(cur, new_parent, new_name, src)
                if src_dir != dst_dir and old_parent != new_parent:
                    d = 1 if src_dir else -1
                    self._touch_dir(cur, new_parent, now, d)
                    self._touch_dir(cur, old_parent, now, -d)
                else:
                    self._touch_dir(cur, new_parent, now)
                    self._touch_dir(cur, old_parent, now)
                ns.set_ctime(cur, now, src, dst)
                self._log(cur, [(dst, old_parent, old_name), (src, new_parent, new_name)])
                return src, dst, None
            if dst == src:
                return src, None, None  # same inode: POSIX says do nothing
            freed: int | None = None
            if dst is not None:
                if flags & RENAME_NOREPLACE:
                    raise Exists(new_name.decode(errors="replace"))
                dst_dir = S.S_ISDIR(mode_of(cur, dst))
                if src_dir and not dst_dir:
                    raise NotADirectory(new_name.decode(errors="replace"))
                if dst_dir and not src_dir:
                    raise IsADirectory(new_name.decode(errors="replace"))
                if dst_dir:
                    if ns.has_entries(cur, dst):
                        raise NotEmpty(new_name.decode(errors="replace"))
                    ns.set_unlinked(cur, dst, now)
                    self._touch_dir(cur, new_parent, now, -1)
                else:
                    self._drop_link(cur, dst, now)
                self._sustain_if_open(cur, dst)
                ns.delete_entry(cur, new_parent, new_name)
                freed = dst
            ns.move_entry(cur, old_parent, old_name, new_parent, new_name)
            if src_dir and old_parent != new_parent:
                self._touch_dir(cur, old_parent, now, -1)
                self._touch_dir(cur, new_parent, now, 1)
            else:
                self._touch_dir(cur, old_parent, now)
                if new_parent != old_parent:
                    self._touch_dir(cur, new_parent, now)
            ns.set_ctime(cur, now, src)
            self._log(cur, [(src, old_parent, old_name), (src, new_parent, new_name)]
                      + ([(dst, None, None)] if dst is not None else []))
            return src, dst, freed

        before = self._entry_ino(new_parent, new_name) if new_parent in self.dir_names else None
        src, dst, freed = self.db.transaction(body)
        self._renamed(old_parent, old_name, new_parent, new_name, src, dst, before, flags)
        for ino in (old_parent, new_parent, src, dst):  # changed rows: re-read when needed
            if ino is not None:
                self.attrs.pop(ino, None)
        if freed is not None:
            self._maybe_free(freed)

    def _renamed(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, src: int,
                 dst: int | None, before: int | None, flags: int) -> None:
        """Keep the RAM name knowledge right after a rename (``before``: what the new name
        named before it, if this mount knew)."""
        if flags & RENAME_EXCHANGE:
            self._names_set(old_parent, old_name, dst)
            self._names_set(new_parent, new_name, src)
            return
        if dst is None and before == src:
            return   # both names named the same inode: nothing was done (POSIX)
        if dst is None and new_parent not in self.dir_names:
            # maybe both names named the same inode (then nothing was done): ask again
            self._names_drop(old_parent)
            self.absent.pop((old_parent, old_name), None)
        else:
            self._names_set(old_parent, old_name, None)
        self._names_set(new_parent, new_name, src)

    def _flush_renamed(self, parent: int, name: bytes) -> None:
        """IMMEDIATE durability: commit the buffered contents of the file at ``name`` before
        a rename moves it (docs/durability.md). A crash then never leaves the new name on
        a file whose bytes were still in RAM: write-temp-then-rename yields the old file
        or the whole new one (what ext4's auto_da_alloc gives). Raises what the flush
        raises (NoSpace, FsError, MetaError); the rename is then not done."""
        if not self.data.states:
            return
        target = ns.entry(self.db, parent, name)
        st = self.data.pending(target) if target is not None else None
        if st is not None:
            self.data.flush(st)

    @staticmethod
    def _check_not_below(cur: pymysql.cursors.Cursor, target_parent: int, moved_dir: int) -> None:
        """Raise InvalidArgument if ``target_parent`` is ``moved_dir`` or below it."""
        ino = target_parent
        while ino != ROOT_INODE:
            if ino == moved_dir:
                raise InvalidArgument("cannot move a directory below itself")
            up = ns.parent_of(cur, ino)
            if up is None:
                return
            ino = up

    @_locked
    def readdir(self, ino: int, after: int, limit: int = 256) -> list[tuple[bytes, Attr, int]]:
        """Entries of directory ``ino`` after readdir offset ``after`` (0 = start).

        Returns (name, attributes, offset of this entry) in stable offset order; the
        offsets survive concurrent additions and removals. '.' and '..' are not listed.
        """
        # one statement of O(limit) rows, its plan forced (cas.db.namespace.list_dir)
        rows = ns.list_dir(self.db, ino, after, limit)
        if not rows and after == 0:
            self._dir(ino)
        out = [(e.name, self._attr_row(e.inode), e.offset) for e in rows]
        small = [a.ino for _, a, _ in out if S.S_ISREG(a.mode) and a.size <= SMALL_SLOTS * self.chunk_size
                 and a.ino not in self.known_manifests and a.ino not in self.data.states]
        if not small:
            self._note_no_xattrs([a.ino for _, a, _ in out])
            return out
        # which entries have no xattrs (_note_no_xattrs) and the manifests of the small
        # files, in one query a batch: the next open of each needs none (docs/smallfiles.md)
        todo = [a.ino for _, a, _ in out if a.ino not in self.xattr_cache]
        having, manifests = ns.listing_extras(self.db, todo, small)
        for i in todo:
            if i not in having:
                _bounded_put(self.xattr_cache, i, {})
        self._know_manifests(manifests)
        return out

    def _note_no_xattrs(self, inos: list[int]) -> None:
        """Record, with one query, which of ``inos`` have no extended attributes at all.

        `ls -l` asks for two xattrs of every entry it lists (security.selinux and
        system.posix_acl_access); without this, each entry of a listing cost a query of
        its own (docs/posix.md, "Listing cost"). Inodes with xattrs are left to be
        loaded on demand, so a batch costs one narrow query and about 100 bytes of RAM
        per entry.
        """
        todo = [i for i in inos if i not in self.xattr_cache]
        if not todo:
            return
        having = ns.inodes_with_xattrs(self.db, todo)
        for i in todo:
            if i not in having:
                _bounded_put(self.xattr_cache, i, {})

    # -- open files ------------------------------------------------------------------
    def _open(self, ino: int) -> None:
        known = self.known_manifests.pop(ino, None)
        a = self.attrs.get(ino)
        if (known is not None and a is not None and ino not in self.data.states
                and ino not in self.data.retired):
            # size and manifest read with the inode row (lookup, readdir): no query
            self.data.states[ino] = InodeData(ino=ino, size=a.size, manifest=known)
        self.data.load_state(ino).opens += 1
        self.closed_dirty.discard(ino)

    @_locked
    def open(self, ino: int, truncate: bool = False) -> None:
        """Open ``ino`` (open count +1); with ``truncate`` (O_TRUNC) set its size to 0.
        On a shared volume under session or strong consistency the change log is read
        first (close-to-open: the contents and size another machine committed before
        this open started). Raises NotFound, IsADirectory, MetaError."""
        if self.level.poll_at_open and self.shared:
            self.poll_changes()
        a = self._get(ino)
        if S.S_ISDIR(a.mode):
            raise IsADirectory(f"inode {ino}")
        self._open(ino)
        if truncate:
            self.data.truncate(ino, 0)

    def read(self, ino: int, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` of open file ``ino``. Raises EIO errors;
        a chunk that failed verification or is missing is marked bad first (see
        :meth:`_mark_bad`). :meth:`read_start` then :meth:`read_finish`."""
        return self.read_finish(self.read_start(ino, offset, length))

    @_locked
    def read_start(self, ino: int, offset: int, length: int) -> ReadPlan:
        """First half of :meth:`read`, under the engine lock: resolve the bytes into
        buffers and chunk ids; when every chunk is in the RAM cache the plan's ``data``
        is the answer already (a caller on the FUSE loop thread needs no worker thread),
        else :meth:`read_finish` loads them. Raises NotFound, MetaError, EIO errors."""
        plan = self.data.read_plan(ino, offset, length)
        self.bytes_read += plan.end - plan.offset
        if plan.in_ram:
            plan.data = self._assemble(plan)
            self.data.note_read(plan)
        return plan

    def read_finish(self, plan: ReadPlan) -> bytes:
        """Second half of :meth:`read`: load the plan's chunks (local chunk files, the
        cloud tier) WITHOUT the engine lock, so other requests proceed meanwhile
        (docs/concurrency.md). A chunk evicted or removed meanwhile is read as
        :meth:`ChunkManager.load` does (the cloud copy). Raises EIO errors; bad marks
        are written under the lock."""
        if plan.data is None:
            try:
                plan.data = self.data.assemble(plan)
            except ChunkMissing as exc:
                plan.data = self._read_again(plan, exc)
            except IntegrityError:
                with self.lock:
                    self._mark_bad()
                raise
            if self.chunks.from_cloud:
                with self.lock:
                    self.data.note_read(plan)
        return plan.data

    def _read_again(self, plan: ReadPlan, exc: ChunkMissing) -> bytes:
        """A chunk of ``plan`` was missing: a flight of the same file may have dropped
        its last reference after the plan was resolved, and gc deleted it. Resolve the
        plan again under the lock, once: when it names other chunks, read those (and
        forget the missing notes of the chunks no longer named, which are not bad);
        else (or when the new plan fails too) mark the noted chunks bad and raise ``exc``
        (EIO). Raises ChunkMissing, IntegrityError, NotFound, MetaError."""
        old = {src.cid for src, _, _ in plan.parts if isinstance(src, ChunkRef)}
        with self.lock:
            again = self.data.read_plan(plan.ino, plan.offset, plan.end - plan.offset)
            now = {src.cid for src, _, _ in again.parts if isinstance(src, ChunkRef)}
            if now >= old:      # the same chunks: the missing one is still named
                self._mark_bad()
                raise exc
            self.chunks.unnote_missing(old - now)
        return self._assemble(again)

    def _assemble(self, plan: ReadPlan) -> bytes:
        try:
            return self.data.assemble(plan)
        except (IntegrityError, ChunkMissing):
            with self.lock:
                self._mark_bad()
            raise

    def _mark_bad(self) -> None:
        """Write the bad marks that reads noted (cas.chunk.manager invariant 4) into the group
        transaction; a database failure is logged, never raised over the read's EIO."""
        try:
            self.chunks.apply_marks(self.db)
        except CasError as exc:
            log.error("could not mark bad chunks now (will retry): %s", exc)

    def write_may_block(self, ino: int, n: int, offset: int | None = None) -> bool:
        """Whether a write of ``n`` bytes at ``offset`` to ``ino`` may wait for more than
        RAM work: the file is not loaded, its writeback is failing, the write must load
        a slot's old bytes that are not in the RAM cache (a partial write into a slot
        not buffered, or the short last slot of a growing file: a local chunk file or a
        Drive GET), or its buffers (or all files') reach their limit (a flush, or
        back-pressure). A partial write into a slot not buffered adds the whole slot to
        the buffers, so each such slot counts ``chunk_size`` bytes on top of ``n``;
        without ``offset`` every write counts as touching two such slots. A hint for the
        FUSE layer (a worker thread or the loop); no lock, a racy read of RAM state is
        fine for a hint (docs/concurrency.md)."""
        st = self.data.states.get(ino)
        if st is None or st.wb_error != 0:
            return True
        d = self.data
        cs = self.chunk_size
        grow = 0
        if offset is None:
            grow = 2 * cs
        elif n > 0:
            end = offset + n
            # only the first and the last slot can be written in part (FileData.write)
            partial = {s for s in (offset // cs, (end - 1) // cs)
                       if not (offset <= s * cs and end >= (s + 1) * cs)}
            size = st.size
            if offset + n > size and size % cs:
                partial.add(size // cs)   # the old short last slot is cut again (FileData._grow)
            for s in partial:
                if s in st.dirty:
                    continue
                grow += cs
                if self._slot_not_in_ram(st, s):
                    return True
        return (st.dirty_bytes + n + grow >= d.inode_dirty_limit
                or d.total_dirty + d.total_flying + n + grow >= d.total_dirty_limit)

    def _slot_not_in_ram(self, st: InodeData, slot: int) -> bool:
        """Whether the old bytes of ``slot`` of ``st`` must be loaded from a chunk file or
        the cloud tier: its committed chunk, when no buffer, flight or pending truncation
        stands in front of it, is not in the RAM cache. No lock (a hint)."""
        if slot in st.flying:
            return False
        for tf in (st.truncate_from, st.flying_trunc):
            if tf is not None and slot >= tf:
                return False
        cid = st.manifest.get(slot)
        return cid is not None and cid not in self.chunks.cache

    @_locked
    def write(self, ino: int, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` into open file ``ino``; returns the bytes written:
        len(data), or fewer when the write would pass MAX_FILE_SIZE (POSIX write(2)).
        Raises FsError(EFBIG) for a write that starts at or beyond MAX_FILE_SIZE."""
        if offset + len(data) > MAX_FILE_SIZE:
            if offset >= MAX_FILE_SIZE:
                raise FsError(f"write at {offset}: beyond the maximum file size", errno.EFBIG)
            data = data[:MAX_FILE_SIZE - offset]
        n = self.data.write(ino, offset, data)
        self.bytes_written += n
        return n

    @_locked
    def fsync(self, ino: int) -> None:
        """Make ``ino``'s data and metadata durable before returning (fsync(2))."""
        st = self.data.states.get(ino)
        if st is not None:
            self.data.flush(st)
        self.db.commit()

    @_locked
    def close_file(self, ino: int) -> None:
        """close(2) of a handle of ``ino`` (FUSE_FLUSH): report writeback errors.

        POSIX does not make close() durable, so a healthy small file is left to the
        batched writeback at release. The file's buffers are written back here (not
        committed: that is the group's job) when its last writeback failed, when the
        last writeback of this mount failed, when it holds CLOSE_WRITEBACK_BYTES or more,
        or when the store's disk has less than the buffered bytes + CLOSE_SPACE_MARGIN
        free, or (shared volume, session or strong consistency) always, so that an open
        on another machine after this close sees the contents (docs/sharing.md); a
        failure raises its errno (ENOSPC, EIO), as NFS reports errors at close.
        Buffers are never dropped. See docs/writeback.md.
        """
        st = self.data.pending(ino)
        if st is None:
            return
        self.data.wait_idle([st])   # a flush-behind still running: its error is reported here
        if not (st.wb_error or self.data.failing or st.dirty_bytes >= CLOSE_WRITEBACK_BYTES
                or self._space_tight() or self._commit_at_close(st)):
            return
        try:
            self.data.flush(st)
        except FsError:
            raise
        except CasError as exc:  # the database: EIO, with the message for the log
            raise FsError(str(exc)) from exc

    def close_may_block(self, ino: int) -> bool:
        """Whether :meth:`close_file` of ``ino`` may write back (a hint for the FUSE layer:
        its flight runs, or the conditions of :meth:`close_file` may hold). No lock."""
        st = self.data.states.get(ino)
        return st is not None and (st.busy or st.queued or (st.needs_flush and (
            st.wb_error != 0 or self.data.failing or st.dirty_bytes >= CLOSE_WRITEBACK_BYTES
            or self._space_tight() or self._commit_at_close(st))))

    def _commit_at_close(self, st: InodeData) -> bool:
        """Shared volume, session or strong consistency: a close of a file with changes
        not written back commits them before it returns (close-to-open, docs/sharing.md)."""
        return self.shared and self.level.commit_at_close and st.needs_flush

    def release_may_block(self, ino: int) -> bool:
        """Whether :meth:`release` of ``ino`` may wait for a flight or a flush of the
        released batch (a hint for the FUSE layer). No lock."""
        st = self.data.states.get(ino)
        a = self.attrs.get(ino)   # read once: another thread may drop it meanwhile
        return st is not None and (st.busy or st.queued or st.opens <= 1 and (
            st.needs_flush and len(self.closed_dirty) + 1 >= CLOSED_DIRTY_BATCH
            or a is None or a.nlink == 0))

    def _space_tight(self) -> bool:
        try:
            free, _ = self.store.disk_usage()
        except OSError:
            return True
        return free < self.data.total_dirty + CLOSE_SPACE_MARGIN

    def path_of(self, ino: int) -> str | None:
        """A path of ``ino`` from the root ("/a/b"), or None (unlinked, or the database
        is unreachable). Follows one dentry per level."""
        parts: list[bytes] = []
        cur = ino
        try:
            for _ in range(4096):  # PATH_MAX / 1 byte names: deeper means a loop
                if cur == ROOT_INODE:
                    return "/" + b"/".join(reversed(parts)).decode(errors="replace")
                d = ns.dentry_of(self.db, cur)
                if d is None:
                    return None
                parts.append(d.name)
                cur = d.parent
        except CasError:
            return None
        return None

    @_locked
    def dentry_of(self, ino: int) -> tuple[int, bytes] | None:
        """One dentry naming ``ino``: (parent inode, name), or None when it has none
        (unlinked; the root). One indexed query (dentries.inode_idx); sees this mount's
        uncommitted changes. Raises MetaError."""
        d = ns.dentry_of(self.db, ino)
        return (d.parent, d.name) if d is not None else None

    @_locked
    def uncommitted(self) -> list[tuple[int, str | None, int, str]]:
        """Files holding changes not yet committed: (inode, path or None, dirty bytes,
        message of the last failed writeback or "")."""
        return [(st.ino, self.path_of(st.ino), st.dirty_bytes, st.wb_message if st.wb_error else "")
                for st in list(self.data.states.values()) if st.needs_flush]

    @_locked
    def commit_all(self) -> tuple[list[tuple[int, str | None, int, str]], str]:
        """Write back every buffer and commit the group (what `casfs umount` asks for).

        Returns (files still uncommitted as in :meth:`uncommitted`, error message or
        ""); both empty means everything this mount was given is committed."""
        err = ""
        try:
            self.flush_all()
        except CasError as exc:
            err = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        left = self.uncommitted()
        if not err and self.db.uncommitted:
            err = f"{self.db.uncommitted} namespace operations not committed"
        return left, err

    @_locked
    def sync(self) -> None:
        """Make every namespace change so far durable (fsyncdir(2)); file buffers are
        committed by :meth:`fsync` or :meth:`flush_all`."""
        self.db.commit()

    @_locked
    def release(self, ino: int) -> None:
        """Close one open handle (FUSE_RELEASE).

        At the last close a file with unflushed changes joins the batch of released
        files; the batch commits in one transaction at CLOSED_DIRTY_BATCH files or at
        the next writeback tick (:meth:`writeback`). A clean file is dropped from RAM at
        once, and freed if it was unlinked.
        """
        st = self.data.states.get(ino)
        if st is None:
            return
        self.data.wait_idle([st])   # decide on a file no flight is changing
        st.opens -= 1
        if st.opens > 0:
            return
        if st.lost:  # no inode row to write to: its buffers stay in RAM (docs/database.md)
            return
        if self._get(ino).nlink == 0 and not self._referenced(ino):
            # unlinked, closed and forgotten: nobody can reach its buffered bytes any more
            # (while the kernel references it, an O_PATH descriptor can reopen it through
            # /proc/self/fd: it is flushed like any released file, freed at its forget)
            self.data.discard(st)
            self._drop(ino)
        elif st.needs_flush:
            self.closed_dirty.add(ino)
            if len(self.closed_dirty) >= CLOSED_DIRTY_BATCH:
                self._flush_closed()
        else:
            self._drop(ino)

    def _drop(self, ino: int) -> None:
        st = self.data.states.get(ino)
        if st is not None and (st.busy or st.queued):
            # never drop a state in flight: wait, then decide again (it may have been
            # reopened or written meanwhile)
            self.data.wait_idle([st])
            if st.opens > 0 or self.data.states.get(ino) is not st:
                return
            if st.needs_flush and not st.lost:
                self.closed_dirty.add(ino)
                return
        self.closed_dirty.discard(ino)
        clean = (st is not None and not st.needs_flush and not st.busy and not st.holds_unsynced
                 and not st.lost)
        self.data.drop_state(ino)
        if clean and st is not None and st.size <= SMALL_SLOTS * self.chunk_size:
            # its committed manifest, for the next open of the file: no query then
            self._know_manifests({ino: dict(st.manifest)})
        self._maybe_free(ino)

    def _flush_closed(self, older_than_s: float | None = None) -> None:
        """Flush released files (and, with ``older_than_s``, old open buffers) together."""
        for ino in list(self.closed_dirty):
            st = self.data.states.get(ino)
            if (st is not None and st.opens == 0 and not st.lost and not self._referenced(ino)
                    and self._get(ino).nlink == 0):
                self.data.discard(st)  # unlinked since its release: nothing to keep
                self._drop(ino)
        closed = set(self.closed_dirty)
        self.data.flush_due(float("inf") if older_than_s is None else older_than_s, also=closed)
        for ino in closed:
            st = self.data.states.get(ino)
            if st is not None and st.opens == 0 and not st.needs_flush:
                self._drop(ino)

    @_locked
    def writeback(self, older_than_s: float) -> None:
        """The writeback tick: flush released files, and open files' buffers older than
        ``older_than_s`` seconds, together; then commit the group transaction (also when
        the flush failed: the namespace changes must not wait for a full disk)."""
        try:
            self._mark_bad()   # bad chunks found by read-ahead nobody collected
            self._flush_closed(older_than_s)
        finally:
            self.db.commit()

    @_locked
    def flush_all(self) -> None:
        """Commit every buffer and namespace change (sync(2))."""
        try:
            self.data.flush_all()
            self._flush_closed()
        finally:
            self.db.commit()

    @_locked
    def opendir(self, ino: int) -> None:
        """Open directory ``ino`` (open count +1). Raises NotFound, NotADirectory."""
        self._dir(ino)
        self.dir_opens[ino] = self.dir_opens.get(ino, 0) + 1

    @_locked
    def releasedir(self, ino: int) -> None:
        """Close one handle of directory ``ino``; a removed directory is freed at the last."""
        left = self.dir_opens.get(ino, 0) - 1
        if left > 0:
            self.dir_opens[ino] = left
            return
        self.dir_opens.pop(ino, None)
        self._maybe_free(ino)

    def _referenced(self, ino: int) -> bool:
        """Whether the kernel still holds a reference to ``ino`` (and forgets it later)."""
        return self.keep_referenced and ino in self.lookups

    def _maybe_free(self, ino: int) -> None:
        """Free ``ino`` if it has no links, is not open and the kernel holds no reference
        to it (POSIX unlink/rmdir: the inode lives until its last open handle is closed;
        Linux: a working directory or an O_PATH descriptor still stat()s it, with
        st_nlink 0). An inode kept for the kernel only is *held* (``self.held``) and
        freed at its forget."""
        if ino in self.data.states or ino in self.dir_opens:
            return
        try:
            nlink = self._get(ino).nlink
        except NotFound:
            self.held.discard(ino)
            return
        if nlink == 0:
            if self._referenced(ino):
                self.held.add(ino)
                return
            self._free_inode(ino)
        self.held.discard(ino)

    def _sustain_if_open(self, cur: pymysql.cursors.Cursor, ino: int) -> None:
        """Shared volume: ``ino`` lost a link in this transaction; if it has none left
        while this mount has it open, record it as sustained by this mount's session
        (cas.db.sessions.sustain; docs/sharing.md, "Sessions"), so that no other mount's
        start-up recovery frees it. The inode row is locked already."""
        if not self.sustain_open or not self.db.session_id:
            return
        if ino not in self.data.states and ino not in self.dir_opens:
            return
        if ns.nlink_for_update(cur, ino) == 0:
            dbsessions.sustain(cur, self.db.session_id, ino)

    def _free_inode(self, ino: int) -> bool:
        """Free ``ino`` if its nlink is 0 (checked under its row lock); on a shared
        volume not while another live session sustains it. True when freed."""
        def body(cur: pymysql.cursors.Cursor) -> bool:
            nlink = ns.nlink_for_update(cur, ino)
            if nlink is None or nlink != 0:
                return False
            if self.sustain_open and dbsessions.release_sustained(cur, self.db.session_id, ino):
                return False   # another live session keeps it open (docs/sharing.md)
            self.data.free_manifest(cur, ino)
            ns.delete_inode(cur, ino)
            if self.sustain_open:
                dbsessions.forget_inode(cur, ino)
            self._log(cur, [(ino, None, None)])
            return True
        done = self.db.transaction(body)
        self._names_drop(ino)
        self.known_manifests.pop(ino, None)
        self.attrs.pop(ino, None)
        self.xattr_cache.pop(ino, None)
        self.held.discard(ino)
        return done

    # -- xattrs ----------------------------------------------------------------------
    @_locked
    def getxattr(self, ino: int, name: bytes) -> bytes:
        """Value of extended attribute ``name``. Raises NoData (ENODATA), NotFound,
        FsError (ERANGE, EINVAL: :func:`cas.engine.xattrs.check_name`).
        ``user.casfs.status`` is answered by :meth:`sync_status` (docs/status.md)."""
        check_name(name)
        if name in VIRTUAL_XATTRS:
            return self.sync_status(ino).encode()
        self._get(ino)
        value = self._xattrs(ino).get(name)
        if value is None:
            raise NoData(name.decode(errors="replace"))
        return value

    @_locked
    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        """Set extended attribute ``name`` (at most 255 bytes) to ``value`` (64 KiB max).

        Raises ERANGE for a bad name, EINVAL for a bare namespace prefix, E2BIG for a
        large value (Linux xattr(7)), ENOSPC when the inode's names and values would pass
        XATTR_INODE_MAX (cas/engine/xattrs.py), NotFound; EPERM for a virtual (read-only) name.
        """
        check_name(name)
        _refuse_virtual(name)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError("xattr value too large", errno.E2BIG)
        self._get(ino)
        xattrs = self._xattrs(ino)
        check_space(xattrs, name, value)
        now = time.time_ns()

        def body(cur: pymysql.cursors.Cursor) -> None:
            ns.set_xattr(cur, ino, name, value)
            ns.set_ctime(cur, now, ino)
            self._log(cur, [(ino, None, None)])
        self.db.transaction(body)
        xattrs[name] = bytes(value)
        self.xattr_cache.changed(ino)
        self._patch(ino, ctime_ns=now)

    @_locked
    def listxattr(self, ino: int) -> list[bytes]:
        """Names of ``ino``'s extended attributes, sorted."""
        self._get(ino)
        return sorted(self._xattrs(ino))

    @_locked
    def removexattr(self, ino: int, name: bytes) -> None:
        """Remove extended attribute ``name``. Raises NoData if absent, NotFound,
        FsError (ERANGE, EINVAL: :func:`cas.engine.xattrs.check_name`; EPERM for a virtual name)."""
        check_name(name)
        _refuse_virtual(name)
        self._get(ino)
        xattrs = self._xattrs(ino)
        if name not in xattrs:
            raise NoData(name.decode(errors="replace"))
        now = time.time_ns()

        def body(cur: pymysql.cursors.Cursor) -> None:
            ns.delete_xattr(cur, ino, name)
            ns.set_ctime(cur, now, ino)
            self._log(cur, [(ino, None, None)])
        self.db.transaction(body)
        del xattrs[name]
        self.xattr_cache.changed(ino)
        self._patch(ino, ctime_ns=now)

    @_locked
    def sync_status(self, ino: int) -> FileSync:
        """The Drive sync status of regular file ``ino`` (cas/engine/syncstatus.py): one query on
        this mount's connection, plus the file's bytes still buffered in RAM. Raises
        NotFound, NoData for anything but a regular file (as Linux answers a ``user.*``
        xattr of a special file), MetaError."""
        if not S.S_ISREG(self._get(ino).mode):
            raise NoData("user.casfs.status: not a regular file")
        st = self.data.states.get(ino)
        return file_sync(self.db, ino, self.chunks.enqueue, st.dirty_bytes if st is not None else 0)

    # -- statfs ----------------------------------------------------------------------
    @_locked
    def statfs(self) -> StatFs:
        """Space figures: the chunk store's disk, in blocks of 4096 bytes."""
        free, total = self.store.disk_usage()
        files = ns.inode_count(self.db)
        bs = 4096
        return StatFs(bsize=bs, blocks=total // bs, bfree=free // bs, bavail=free // bs,
                      files=files + (1 << 32), ffree=1 << 32, namemax=NAME_MAX)


def _refuse_virtual(name: bytes) -> None:
    """Raise FsError(EPERM) for a virtual xattr name (docs/status.md): it is computed,
    read-only, and never stored. EPERM is what Linux gives for an xattr a file cannot
    carry (fs/xattr.c xattr_permission, and setxattr(2) for an immutable file)."""
    if name in VIRTUAL_XATTRS:
        raise FsError(f"{name.decode()} is read-only", errno.EPERM)
