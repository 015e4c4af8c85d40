"""Chunks: loading verified plaintext, storing new chunks, and reference counting.

This module owns the dedup protocol between writers and gc (invariants 1-3 and 8, docs/design.md):

1. Before a transaction, :meth:`ChunkManager.store_unknown` writes durable files for the
   chunks whose id has no row (a chunk already recorded is never stored again).
2. Inside the transaction, :meth:`ChunkManager.apply_deltas` takes the row lock of every
   chunk gaining references (``SELECT ... FOR UPDATE`` in id order). For each one whose
   row is missing or at refcount 0 (a gc candidate) it checks the file is present, and
   rewrites it when gc got there first. gc deletes a file only under that same row lock.
3. Refcount changes are applied as net deltas per chunk, in the caller's transaction,
   together with the manifest change; ``zero_since`` records when a refcount hit 0.
4. A bad chunk gets no new references (docs/integrity.md): a chunk whose local file
   failed verification, or is missing while its row says ``is_local = 1``, is marked
   ``bad = 1`` (:meth:`ChunkManager.note_corrupt` / :meth:`ChunkManager.note_missing`
   collect the ids in any thread, :meth:`ChunkManager.apply_marks` writes them on the
   caller's connection). :meth:`~ChunkManager.store_unknown` treats a bad or missing
   chunk like an unknown one and writes its file again; :meth:`~ChunkManager.apply_deltas`
   clears ``bad`` in the transaction that references the rewritten chunk, so the write
   that brings the same bytes again heals the volume.

Hashing and compression run in a thread pool (hashlib and zstandard release the GIL).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import pymysql.cursors

from cas.chunk.cache import LFUCache
from cas.db import chunks as dbchunks
from cas.db import queue as dbqueue
from cas.chunk.envelope import PLAIN, ChunkCodec
from cas.errors import ChunkMissing, ChunkPending, FsError, IntegrityError
from cas.db.database import Database
from cas.chunk.store import LocalStore

if TYPE_CHECKING:
    from cas.chunk.remote import RemoteChunks

log = logging.getLogger(__name__)
Plain = bytes | bytearray  # chunk plaintext as buffered (never modified while in use)
READAHEAD_MAX = 16  # chunk loads under way or waiting to be collected
REMOTE_AHEAD_BYTES = 64 << 20  # bytes of a file offered to the cloud read-ahead (cas.tier.cloud.AHEAD_MAX)
FROM_CLOUD_MAX = 4096  # chunk ids in ChunkManager.from_cloud before it starts over
REMOTE_RECENT_S = 5.0  # a file read from the cloud this recently (s): its sequential reads offer slots ahead


class ChunkManager:
    """The local store, the RAM cache and the refcount protocol of one volume."""

    def __init__(self, store: LocalStore, cache: LFUCache, codec: int, level: int,
                 pool: ThreadPoolExecutor, io_pool: ThreadPoolExecutor | None = None,
                 envelope: ChunkCodec = PLAIN) -> None:
        self.store = store
        self.envelope = envelope  # chunk ids, seal and open of this volume (plain or encrypted)
        self.cache = cache
        self.codec = codec
        self.level = level
        self.pool = pool          # CPU: hashing and compression
        self.io_pool = io_pool    # disk: chunk writes and read-ahead
        self._readahead: dict[bytes, Future[bytes]] = {}
        # chunks loaded from the cloud tier (any thread) that no read has claimed yet:
        # the read that returns one marks its file as read from the cloud (cas/engine/filedata.py)
        self.from_cloud: set[bytes] = set()
        # The cloud tier (set by a mount that has one): reads of evicted chunks go to it.
        self.cloud: RemoteChunks | None = None
        # Queue new chunks for upload in the transaction that creates their row.
        self.enqueue = False
        # This side's local store (cas.config.volume.Volume.store): queue rows name it.
        # None writes NULL (engine tests without a volume: the first store).
        self.store_id: str | None = None
        self.first_store = ""   # the volume's first store (uuid hex): owns NULL queue rows
        # A shared volume (meta key shared): other machines' stores hold chunks this one
        # lacks; dedup and bad marks look at where a chunk is (docs/sharing.md, "Data").
        self.shared = False
        # Chunks found bad by reads (any thread), not yet marked in the database.
        self._marks_lock = threading.Lock()
        self._corrupt: set[bytes] = set()
        self._missing: set[bytes] = set()

    # -- bad marks -------------------------------------------------------------------
    def note_corrupt(self, cid: bytes) -> None:
        """Remember that chunk ``cid`` failed verification (marked at :meth:`apply_marks`).
        Thread-safe: read-ahead threads have no database connection."""
        with self._marks_lock:
            self._corrupt.add(cid)

    def note_missing(self, cid: bytes) -> None:
        """Remember that chunk ``cid`` could be read from neither the local store nor the
        cloud; it is marked bad at :meth:`apply_marks` if its row says ``is_local = 1``
        (a file that should be there). Thread-safe."""
        with self._marks_lock:
            self._missing.add(cid)

    def unnote_missing(self, cids: Iterable[bytes]) -> None:
        """Forget that ``cids`` were found missing: a read found them gone because a
        flush of the same file dropped their last reference meanwhile (gc then deleted
        them), not because a live chunk is lost (cas.engine.fs.Filesystem.read_finish).
        Thread-safe."""
        with self._marks_lock:
            self._missing.difference_update(cids)

    def apply_marks(self, db: Database) -> int:
        """Mark the noted chunks ``bad = 1`` in one transaction on ``db`` (under group
        commit it joins the open group, so this connection's next dedup check sees the
        mark at once). Returns how many ids were noted. Raises MetaError (the ids are
        noted again, to be marked by a later call)."""
        with self._marks_lock:
            corrupt, missing = sorted(self._corrupt), sorted(self._missing)
            self._corrupt, self._missing = set(), set()
        if not corrupt and not missing:
            return 0

        def body(cur: pymysql.cursors.Cursor) -> None:
            dbchunks.mark_bad(cur, corrupt)
            if self.shared and self.store_id:
                # a file this store never had is no damage: only our own unconfirmed
                # chunks (their queue row names this store) are lost when missing
                dbchunks.mark_bad_if_held(cur, missing, self.store_id, self.first_store)
            else:
                dbchunks.mark_bad_if_local(cur, missing)
        try:
            db.transaction(body)
        except BaseException:
            with self._marks_lock:
                self._corrupt.update(corrupt)
                self._missing.update(missing)
            raise
        for cid in corrupt:
            log.error("integrity: chunk %s marked bad: the next write of its bytes rewrites it, "
                      "`casfs fsck --repair` can replace it from the cloud", cid.hex())
        for cid in missing:
            log.error("integrity: chunk %s could not be read from anywhere; marked bad if its "
                      "local file should exist", cid.hex())
        return len(corrupt) + len(missing)

    # -- reading ---------------------------------------------------------------------
    def load(self, cid: bytes) -> bytes:
        """Plaintext of chunk ``cid``, verified against its id (and AEAD tag, if encrypted).

        Served from the RAM cache, a read-ahead already under way, the store, or (for a
        chunk evicted from the store) the cloud tier, which keeps a local copy again.
        Raises ChunkMissing or IntegrityError (both EIO); a mismatch is logged.
        """
        if self.cloud is not None:
            self.cloud.counts.touch(cid)
        data = self.cache.get(cid)
        if data is not None:
            return data
        fut = self._readahead.pop(cid, None)
        if fut is not None:
            try:
                return fut.result()
            except ChunkPending:
                pass   # the read-ahead did not wait for another machine's upload; this read does
        return self._load_from_store(cid)

    def prefetch(self, cids: Iterable[bytes]) -> None:
        """Start loading ``cids`` in the I/O threads (read-ahead); :meth:`load` collects
        them. At most READAHEAD_MAX loads are kept; finished ones not yet collected
        are dropped first. Call from the engine's thread only."""
        if self.io_pool is None:
            return
        for cid in cids:
            if cid in self._readahead or cid in self.cache:
                continue
            if len(self._readahead) >= READAHEAD_MAX:
                for old in [c for c, f in list(self._readahead.items()) if f.done()]:
                    self._readahead.pop(old, None)   # load() in a worker may have taken it
                if len(self._readahead) >= READAHEAD_MAX:
                    return
            # no wait for another machine's upload in the I/O threads: a flush needs them
            self._readahead[cid] = self.io_pool.submit(self._load_from_store, cid, False)

    def remote_room(self) -> bool:
        """True when the cloud tier overlaps its GETs and its read-ahead has room for
        another GET: the cheap gate (no list, no stat, no query) before
        :meth:`offer_remote`."""
        cloud = self.cloud
        return cloud is not None and cloud.cfg.fetch_ahead > 0 and cloud.ahead_room()

    def evicted(self, cid: bytes | None) -> bool:
        """True when chunk ``cid`` would come from the cloud tier (not in the RAM cache,
        no local file) and the tier overlaps its GETs: a read of a file's start that
        will miss, so :meth:`prefetch_remote` can start before its own fetch. One stat."""
        cloud = self.cloud
        return (cid is not None and cloud is not None and cloud.cfg.fetch_ahead > 0
                and cid not in self.cache and self.store.stat(cid) is None)

    def prefetch_remote(self, cids: Iterable[bytes]) -> int:
        """Overlapped cold reads: offer the chunks a sequential reader needs next (file
        order, up to REMOTE_AHEAD_BYTES) to :meth:`RemoteChunks.fetch_ahead`, which keeps
        several ranged GETs in flight for the evicted ones. Chunks in the RAM cache or
        under local read-ahead are skipped. Their envelopes are verified, kept locally
        and cached by :meth:`load` as for any cloud read. Returns the GETs started."""
        if self.cloud is None:
            return 0
        return self.cloud.fetch_ahead(c for c in cids if c not in self.cache and c not in self._readahead)

    def offer_remote(self, slots: list[tuple[int, bytes]], end: int) -> int:
        """:meth:`prefetch_remote` for ``slots`` ((slot, chunk id), file order, ending
        before slot ``end``): returns the first slot the read-ahead did not take (all
        before it are cached, local, buffered, downloading or have no cloud copy), or
        ``end`` when it took them all."""
        if self.cloud is None or not slots:
            return end
        cand = [(s, c) for s, c in slots if c not in self.cache and c not in self._readahead]
        _, taken = self.cloud.fetch_ahead_prefix([c for _, c in cand])
        return cand[taken][0] if taken < len(cand) else end

    def _load_from_store(self, cid: bytes, wait: bool = True) -> bytes:
        """Load and verify ``cid`` from the local store, else from the cloud tier. A chunk
        that fails verification, or cannot be found, is noted for a bad mark
        (:meth:`apply_marks`) and the error (EIO) raised. A corrupt local file whose
        chunk has a verified cloud copy is replaced by that copy instead."""
        try:
            blob = self.store.get(cid)
        except ChunkMissing:
            if self.cloud is None:
                self.note_missing(cid)
                raise
            try:
                return self._load_from_cloud(cid, wait)
            except ChunkPending:
                raise   # not lost: another store holds it (``wait`` False: a read-ahead)
            except ChunkMissing:
                self.note_missing(cid)
                raise
        try:
            data = self.envelope.open(blob, cid)
        except IntegrityError:
            log.error("integrity: chunk %s in %s fails verification", cid.hex(), self.store.path(cid))
            if self.cloud is not None:
                try:
                    data = self._load_from_cloud(cid)
                except FsError:
                    pass
                else:
                    log.warning("integrity: chunk %s replaced by its cloud copy", cid.hex())
                    return data
            self.note_corrupt(cid)
            raise
        self.cache.put(cid, data)
        return data

    def _load_from_cloud(self, cid: bytes, wait: bool = True) -> bytes:
        assert self.cloud is not None
        blob = self.cloud.fetch(cid, wait)
        try:
            data = self.envelope.open(blob, cid)
        except IntegrityError:
            log.error("integrity: chunk %s read from the cloud fails verification", cid.hex())
            self.note_corrupt(cid)
            raise
        self.cloud.keep_local(cid, blob)
        self.cache.put(cid, data)
        if len(self.from_cloud) >= FROM_CLOUD_MAX:
            self.from_cloud.clear()
        self.from_cloud.add(cid)
        return data

    # -- writing ---------------------------------------------------------------------
    def ids_of(self, datas: list[Plain]) -> list[bytes]:
        """Chunk ids of ``datas`` (SHA-256, keyed BLAKE3 in an encrypted volume), computed in parallel."""
        if len(datas) <= 1:
            return [self.envelope.chunk_id(d) for d in datas]
        return list(self.pool.map(self.envelope.chunk_id, datas))

    def store_unknown(self, db: Database, chunks: Mapping[bytes, Plain]) -> dict[bytes, int]:
        """Durably store the chunks of ``chunks`` (id -> plaintext) that have no usable copy:
        no row, a row marked bad, or a row saying ``is_local = 1`` whose file is missing or
        has another size than recorded (invariant 8: a bad chunk gets no new references;
        the file is written again and :meth:`apply_deltas` clears the mark).

        A chunk with a usable row is stored already (a row is written only after its file
        is durable); one at refcount 0 may be collected before our commit, which
        :meth:`apply_deltas` detects under the row lock and repairs. Bad marks noted by
        reads are written first (:meth:`apply_marks`).

        Returns id -> envelope length in bytes for the chunks written. Raises NoSpace
        (ENOSPC) or FsError(EIO) from the store; nothing is committed by this call.
        """
        return self.write_chunks(chunks, self.unusable(db, chunks))

    def unusable(self, db: Database, chunks: Mapping[bytes, Plain]) -> list[bytes]:
        """The first half of :meth:`store_unknown`, on the caller's connection (so under
        the engine lock): write the noted bad marks, then return the ids of ``chunks``
        that have no usable copy (no row, bad, or a local file missing or of the wrong
        size). Raises MetaError."""
        if not chunks:
            return []
        self.apply_marks(db)
        if self.shared:
            return self._unusable_shared(db, chunks)
        usable: set[bytes] = set()
        for cid, bad, is_local, slen in dbchunks.states(db, chunks):
            if bad:
                continue
            if is_local:
                st = self.store.stat(cid)
                if st is None or (slen and st.size != slen):
                    log.warning("integrity: chunk %s: local file %s; writing it again", cid.hex(),
                                "missing" if st is None else "of the wrong size")
                    continue
            usable.add(cid)
        return [cid for cid in chunks if cid not in usable]

    def _unusable_shared(self, db: Database, chunks: Mapping[bytes, Plain]) -> list[bytes]:
        """:meth:`unusable` on a shared volume (docs/sharing.md, "Data"): a chunk is
        usable when it is not bad and either this store has its file (of the recorded
        size) or a confirmed cloud copy is recorded (nothing is stored: reads fetch it,
        and Drive never gets it twice). A chunk another store holds unconfirmed is
        written here too: this side keeps its own copy so that it can read its own data
        without waiting for the other machine's upload, and queues nothing (that
        store's queue row stays the one upload). Raises MetaError."""
        usable: set[bytes] = set()
        for p in dbchunks.places(db, chunks, self.first_store):
            if p.bad:
                continue
            st = self.store.stat(p.id)
            if st is not None and (not p.stored_length or st.size == p.stored_length):
                usable.add(p.id)
            elif p.confirmed:
                usable.add(p.id)
            elif not p.is_local and p.holder is None:
                usable.add(p.id)   # marked cloud-only with no copy recorded: as unusable() does
            elif p.holder == self.store_id:
                log.warning("integrity: chunk %s: local file %s; writing it again", p.id.hex(),
                            "missing" if st is None else "of the wrong size")
        return [cid for cid in chunks if cid not in usable]

    def write_chunks(self, chunks: Mapping[bytes, Plain], todo: list[bytes]) -> dict[bytes, int]:
        """The second half of :meth:`store_unknown`: seal (compress, encrypt) the chunks
        ``todo`` of ``chunks`` in the CPU pool, write them in the I/O pool and make them
        durable with one syncfs(2). Uses no database connection and takes no engine
        lock: a flush runs it without the engine lock (docs/concurrency.md). Thread-safe:
        the store writes each file under a temporary name unique to the writing thread
        and renames it into place. Returns id -> envelope length in bytes. Raises
        NoSpace or FsError(EIO)."""
        if not todo:
            return {}
        blobs = list(self.pool.map(lambda c: self.envelope.seal(chunks[c], self.codec, self.level, c), todo))
        self.store.put_many(zip(todo, blobs), self.io_pool)
        return {cid: len(b) for cid, b in zip(todo, blobs)}

    def apply_deltas(self, cur: pymysql.cursors.Cursor, deltas: Mapping[bytes, int], chunks: Mapping[bytes, Plain],
                     stored: Mapping[bytes, int]) -> None:
        """Apply net refcount ``deltas`` (id -> +/-n) inside the caller's transaction.

        ``chunks`` must hold the plaintext of every id with a positive delta; ``stored``
        the envelope length of those written by :meth:`store_unknown`. Takes the row
        locks of gaining chunks and makes sure their files exist (invariant 3); a chunk
        whose file was written again (it was bad, missing, or collected) gets
        ``bad = 0, is_local = 1`` and its new length in this transaction (invariant 8).
        """
        gain = sorted(c for c, d in deltas.items() if d > 0)
        rows = dbchunks.lock_gaining(cur, gain)
        values: list[dbchunks.ChunkRef] = []
        rewritten: list[tuple[int, bytes]] = []   # (envelope length, id): files written again
        for cid in gain:
            row = rows.get(cid)
            slen = row.stored_length if row else stored.get(cid, 0)
            if row is not None and cid in stored:
                # store_unknown wrote it again (bad, missing or wrong size): this write heals it
                slen = stored[cid]
                rewritten.append((slen, cid))
            elif row is not None and row.bad:
                # marked bad after store_unknown looked (a scrub): never reference the bad file
                blob = self.envelope.seal(chunks[cid], self.codec, self.level, cid)
                self.store.put(cid, blob)
                slen = len(blob)
                rewritten.append((slen, cid))
            elif row is None or row.refcount <= 0:
                st = self.store.stat(cid)
                if st is None:  # gc (or eviction) removed it after our pre-check: write it again
                    blob = self.envelope.seal(chunks[cid], self.codec, self.level, cid)
                    self.store.put(cid, blob)
                    slen = len(blob)
                    if row is not None:
                        rewritten.append((slen, cid))
                elif not slen:
                    slen = st.size
            values.append(dbchunks.ChunkRef(cid, len(chunks[cid]), slen, deltas[cid]))
        dbchunks.add_refs(cur, values)
        # A chunk with no row had no row lock to take before add_refs: an orphan sweep
        # (cas.chunk.sweep; on a shared volume the mount's own, for rows another
        # machine's gc deleted) may have deleted the old file this write relies on
        # between the stat above and the insert. From the insert on the row lock is ours
        # (a sweep's placeholder now finds the row), so a file present now stays. That
        # includes the files this flush wrote itself (``stored``): a sweep with a short
        # grace period may take them too.
        for cid in gain:
            if cid not in rows and self.store.stat(cid) is None:
                blob = self.envelope.seal(chunks[cid], self.codec, self.level, cid)
                self.store.put(cid, blob)
                rewritten.append((len(blob), cid))
        for slen, cid in rewritten:
            dbchunks.mark_rewritten(cur, cid, slen)
        if self.enqueue:
            # new chunks, and rewritten ones (a bad chunk left the queue unuploaded; one
            # already confirmed in a pack is dropped from the queue at the next claim)
            new = [cid for cid in gain if cid not in rows] + [cid for _, cid in rewritten]
            dbqueue.enqueue(cur, new, self.store_id)
        by_delta: dict[int, list[bytes]] = {}
        for cid, d in deltas.items():
            if d < 0:
                by_delta.setdefault(d, []).append(cid)
        for d, ids in by_delta.items():
            dbchunks.drop_refs(cur, d, ids)


def net_deltas(gained: Iterable[bytes], lost: Iterable[bytes]) -> dict[bytes, int]:
    """Net refcount change per chunk id: +1 per gained reference, -1 per lost one."""
    out: dict[bytes, int] = {}
    for c in gained:
        out[c] = out.get(c, 0) + 1
    for c in lost:
        out[c] = out.get(c, 0) - 1
    return {c: d for c, d in out.items() if d}
