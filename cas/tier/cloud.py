"""The cloud tier: packs, the persistent upload queue, reads of evicted chunks, eviction.

Model (schema.sql: packs, pack_entries, upload_queue; docs/cloud.md):

- With the tier enabled (meta key ``cloud_enabled``), every new chunk row gets an
  ``upload_queue`` row in the same transaction (cas.chunk.manager.ChunkManager.apply_deltas), so
  no pending upload is ever lost: the queue is in MySQL, not in RAM.
- An uploader (:meth:`CloudTier.upload_one`, run by a mount's thread or `casfs drive
  push`) claims queued chunks (``FOR UPDATE SKIP LOCKED``, so several uploaders sharing
  a database never claim the same chunk), writes a ``packs`` row
  ('uploading', owner, lease) and the layout into the claimed queue rows, builds the pack
  from the chunk envelopes in the local store, uploads it, and *confirms* it: the store's
  size and md5 must equal ours, and its sha256 when it reports one. Only then, in one
  transaction, the pack becomes 'confirmed', its chunks get ``pack_entries`` rows (``INSERT IGNORE``: a chunk already
  confirmed elsewhere keeps its first copy) and their queue rows go (invariant 5, docs/design.md).
- A pack whose uploader died is *recovered*: when the object it names already exists
  with the recorded size and md5 (and sha256, if reported) it is adopted (confirmed
  without a second upload); otherwise any partial objects of that name are deleted and the claims released.
- :meth:`CloudTier.fetch` reads an evicted chunk with a ranged GET on its pack, with
  bounded retries, so an unreachable store gives EIO, not a hang.
- :meth:`CloudTier.evict` keeps the local store under ``local_limit`` bytes by deleting
  the files of chunks that have a confirmed copy, least frequently used first (the
  access counts of :class:`AccessCounts`). A chunk still in the queue is never evicted.

Object-store errors (cas.tier.objstore) drive the uploader: TryAgain backs off exponentially
with jitter, at least Retry-After; DailyLimit pauses uploads for ``pause_s`` and says
so in ``casfs drive status``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pymysql.cursors

from cas.db import chunks as chunk_rows
from cas.db import manifests as manifest_rows
from cas.db import packs as pack_rows
from cas.db import queue as queue_rows
from cas.db import volume as meta_rows
from cas.db.sessions import this_host
from cas.chunk.envelope import codec_for
from cas.errors import CasError, ChunkMissing, ChunkPending, FsError, MetaError, VolumeError
from cas.errors import IntegrityError
from cas.db.database import Database, Metadata
from cas.config import audit
from cas.tier.objstore import (CredentialsRefused, DailyLimit, ObjectInfo, ObjectNotFound, ObjectStore, ObjectStoreError,
                       TryAgain, retrying)
from cas.db.server import pid_running
from cas.chunk.store import LocalStore
from cas.chunk.sweep import sweep_orphans
from cas.config.volume import Volume

log = logging.getLogger(__name__)

PACK_PREFIX = "casfs-pack-"
AHEAD_MAX = 64 << 20    # bytes of pack read-ahead kept in RAM
AHEAD_STALE_S = 30.0    # read-ahead bytes unread this long are dropped (they hold the budget)
EVICT_INTERVAL_S = 2.0  # how often the mount's thread checks the local limit
LEASE_S = 600            # an uploading pack belongs to its owner this long without renewal
_CLAIM_BATCH = 5000
# a shared volume (docs/sharing.md, "Data"): readers on other machines wait for our uploads
SHARED_PACK_AGE_S = 2.0       # most seconds a queued chunk waits to fill a pack
REMOTE_WAIT_S = 120.0         # most seconds a read waits for another store's upload (env CASFS_REMOTE_WAIT_S)
REMOTE_POLL_S = 0.5           # how often that read looks for the confirmed copy
LEFT_RETRY_S = 60.0           # another store's stale 'uploading' pack is looked at again after this
SWEEP_INTERVAL_S = 600.0      # a shared mount sweeps its store's orphan files this often (env CASFS_STORE_SWEEP_S)
SWEEP_GRACE_S = 3600.0        # ... older than this (cas.maint.safety.DEFAULT_GRACE_S; env CASFS_STORE_SWEEP_GRACE_S)


def _env_seconds(name: str, default: float) -> float:
    """Seconds from environment variable ``name`` (a number >= 0), else ``default``."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        log.warning("ignoring %s=%r: not a number of seconds", name, raw)
        return default
    return max(0.0, value)


def remote_wait_s() -> float:
    """How long a read waits for a chunk another store holds and has not uploaded yet:
    env CASFS_REMOTE_WAIT_S, else REMOTE_WAIT_S (seconds)."""
    return _env_seconds("CASFS_REMOTE_WAIT_S", REMOTE_WAIT_S)


S3_KEYS = ("endpoint_url", "bucket", "prefix", "region", "profile", "credentials_file")
DRIVE_ONLY_KEYS = ("endpoint", "credentials", "folder", "upload_chunk")


@dataclass
class CloudConfig:
    """The ``[drive]`` table of volume.toml, or its ``[s3]`` table (a volume has one
    store). Sizes in bytes, times in seconds.

    ``endpoint``: "" for Google Drive; ``http://HOST:PORT/`` for a Drive-compatible server
    (tools/drivesim/); ``file:/PATH`` for a directory (cas.tier.objstore.DirObjectStore);
    for S3 the ``endpoint_url`` of an S3-compatible server ("" = AWS).
    ``credentials``: file in the volume directory holding an OAuth token or a
    service-account key ("" = none, only for a test endpoint).
    ``s3``: the location keys of an ``[s3]`` table (:data:`S3_KEYS`: bucket, prefix,
    region, profile, credentials_file, endpoint_url), {} for Drive; the tier keys (pack
    size, ages, limits) are shared by both tables (docs/cloud.md, "S3-compatible stores").
    """

    endpoint: str = ""
    credentials: str = ""
    folder: str = ""
    pack_size: int = 32 << 20
    pack_age_s: float = 60.0
    bwlimit: int = 0
    repack_threshold: float = 0.5
    timeout_s: float = 30.0
    read_attempts: int = 3
    pause_s: float = 3600.0
    upload_chunk: int = 8 << 20
    fetch_span: int = 8 << 20
    fetch_ahead: int = 16  # ranged GETs kept in flight for a sequential reader (0: none ahead)
    snapshot_interval_s: float = 600.0   # metadata snapshots: at most one per interval (cas.tier.snapshot)
    keep_generations: int = 7            # snapshot generations kept on the store
    unmount_snapshot_s: float = 30.0     # bound on the unmount's queue drain before its snapshot
    s3: dict[str, str] = field(default_factory=dict)   # [s3] location keys; {} = Google Drive

    @classmethod
    def from_volume(cls, volume: Volume) -> "CloudConfig":
        """The volume's config, from ``[s3]`` when volume.toml has one, else from
        ``[drive]``; raises VolumeError on a bad value, on both tables at once, and on an
        ``[s3]`` table without a bucket or with a Drive-only key."""
        if volume.s3 and volume.drive:
            raise VolumeError(f"volume {volume.name}: volume.toml has both [drive] and [s3]; a volume "
                              "has one cloud store: remove one table")
        section = "s3" if volume.s3 else "drive"
        raw = dict(volume.s3 or volume.drive)
        location: dict[str, str] = {}
        if section == "s3":
            location = {k: str(raw.pop(k)) for k in S3_KEYS if k in raw}
            for k in DRIVE_ONLY_KEYS:
                if k in raw:
                    raise VolumeError(f"volume {volume.name}: unknown [s3] key {k!r}"
                                      + (" (the S3 server is endpoint_url)" if k == "endpoint" else ""))
            if not location.get("bucket"):
                raise VolumeError(f"volume {volume.name}: [s3] names no bucket")
        known = {f.name: f.type for f in fields(cls) if f.name != "s3"}
        cfg = cls()
        for k, v in raw.items():
            if k not in known:
                raise VolumeError(f"volume {volume.name}: unknown [{section}] key {k!r}")
            cur = getattr(cfg, k)
            try:
                setattr(cfg, k, type(cur)(v))
            except (TypeError, ValueError) as exc:
                raise VolumeError(f"volume {volume.name}: bad [{section}] {k} = {v!r}") from exc
        if (cfg.pack_size < 1 or not 0 <= cfg.repack_threshold <= 1 or cfg.read_attempts < 1
                or cfg.fetch_ahead < 0 or cfg.keep_generations < 1 or cfg.snapshot_interval_s < 0):
            raise VolumeError(f"volume {volume.name}: bad [{section}] values {raw}")
        if not cfg.folder:
            cfg.folder = f"casfs-{volume.uuid}"
        if location:
            location.setdefault("prefix", default_prefix(volume.uuid))
            cfg.s3 = location
            cfg.endpoint = location.get("endpoint_url", "")
        return cfg

    def as_table(self) -> dict[str, object]:
        """Non-default values, for volume.toml: the ``[drive]`` table, or for an S3
        store the ``[s3]`` table (its location keys, ``endpoint`` as ``endpoint_url``)."""
        d = CloudConfig()
        table = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name != "s3" and getattr(self, f.name) != getattr(d, f.name)}
        if self.s3:
            for k in DRIVE_ONLY_KEYS:
                table.pop(k, None)
            table.update({k: v for k, v in self.s3.items()
                          if (v != "" or k == "prefix") and k != "endpoint_url"})   # "" = the bucket's root
            if self.endpoint:
                table["endpoint_url"] = self.endpoint
        return table

    @property
    def kind(self) -> str:
        """"s3" or "drive": which store the config names."""
        return "s3" if self.s3 else "drive"

    def label(self) -> str:
        """The store in a few words, for `drive status` and messages: ``Google Drive``,
        the Drive-compatible endpoint, or ``s3://BUCKET/PREFIX`` (``at URL``)."""
        if self.s3:
            where = f"s3://{self.s3.get('bucket', '')}/{self.s3.get('prefix', '')}"
            return f"{where} at {self.endpoint}" if self.endpoint else where
        return self.endpoint or "Google Drive"


def default_prefix(volume_uuid: str) -> str:
    """The key prefix of a volume's objects in an S3 bucket when [s3] names none."""
    return f"casfs-{volume_uuid}/"


def enabled(db: Database) -> bool:
    """Whether the volume's cloud tier is enabled (meta key cloud_enabled = 1)."""
    return meta_rows.cloud_enabled(db)


def enable(db: Database, store: str | None = None, local: LocalStore | None = None) -> int:
    """Enable the cloud tier: queue every chunk not yet confirmed in a pack, as held by
    local store ``store`` (the enabling side's Volume.store; None: the first store).
    On a shared volume give ``local`` (this side's LocalStore): only the chunks whose
    file it holds are queued (a stat each); the other sides queue theirs at their next
    mount (:func:`queue_held`; docs/sharing.md, "Data"). Returns the number of chunks
    queued. Idempotent."""
    if local is not None and store is not None:
        held = [c for c in queue_rows.unqueued_unconfirmed(db) if local.stat(c) is not None]

        def held_body(cur: pymysql.cursors.Cursor) -> int:
            meta_rows.enable_cloud(cur)
            return queue_rows.enqueue_existing(cur, held, store)
        return db.transaction(held_body)

    def body(cur: pymysql.cursors.Cursor) -> int:
        meta_rows.enable_cloud(cur)
        return queue_rows.queue_unconfirmed(cur, store)
    return db.transaction(body)


def queue_held(db: Database, local: LocalStore, store: str, volume_uuid: str) -> int:
    """Queue, as held by ``store``, the chunks that are neither confirmed nor queued and
    whose file ``local`` (that store) holds, and adopt the unclaimed queue rows of other
    stores whose file ``local`` holds (a row queued under a store that lacks the file
    would never be uploaded): a shared mount does it at start, so files written before
    the tier was enabled on another side are uploaded from here (docs/sharing.md,
    "Data"). Reads, a stat per candidate, then one transaction (chunk rows
    share-locked, then the queue rows). Returns the rows added or adopted. Raises
    MetaError."""
    held = [c for c in queue_rows.unqueued_unconfirmed(db) if local.stat(c) is not None]
    scope = queue_rows.Scope.of(volume_uuid, store)
    theirs = [c for c in queue_rows.others_unclaimed(db, scope) if local.stat(c) is not None]
    if not held and not theirs:
        return 0
    return int(db.transaction(lambda cur: queue_rows.enqueue_existing(cur, held, store)
                              + queue_rows.adopt(cur, theirs, store)))


def forget_sql(cur: pymysql.cursors.Cursor, cid: bytes) -> None:
    """Drop a deleted chunk's queue row and cloud location (caller holds its row lock)."""
    queue_rows.dequeue(cur, cid)
    pack_rows.delete_entry(cur, cid)


def file_order(cur: pymysql.cursors.Cursor, queued: list[queue_rows.QueuedChunk]) -> list[bytes]:
    """The chunk ids of ``queued`` ((chunk id, queued time) in queue order) ordered by
    queued time, then by the first place a file holds them (inode, slot; chunks no file
    holds last): the chunks one writeback queued together go into packs in file order,
    so a sequential read of an evicted file finds its chunks back to back in a pack and
    fetches them with few, large ranged GETs (docs/cloud.md, "Reading evicted
    chunks"). Without it they would be in chunk id (hash) order. One query on ``cur``."""
    if len(queued) <= 1:
        return [c for c, _ in queued]
    where = manifest_rows.first_places(cur, [c for c, _ in queued])
    last = manifest_rows.Place(1 << 64, 0)
    return [c for _, _, c in sorted((q, where.get(c, last), c) for c, q in queued)]


def owner_id() -> str:
    """host:pid:token, naming this process as the owner of packs it uploads. The host is
    the one session rows give this machine (cas.db.sessions.this_host), so that reaping a
    dead session expires its packs' leases (cas.db.sessions.expire_leases)."""
    return f"{this_host()}:{os.getpid()}:{secrets.token_hex(4)}"


def _owner_dead(owner: str | None) -> bool:
    """True when ``owner`` names a process of this host that no longer runs."""
    if not owner:
        return True
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != this_host():
        return False
    try:
        return not pid_running(int(parts[1]))
    except ValueError:
        return True


class AccessCounts:
    """Approximate access frequency per chunk id, bounded to ``max_entries`` entries.

    When full, every count is halved and zeros are dropped (aging, as in the RAM LFU),
    so the counts follow a changing working set. Thread-safe.
    """

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._counts: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def touch(self, cid: bytes) -> None:
        with self._lock:
            self._counts[cid] = self._counts.get(cid, 0) + 1
            if len(self._counts) > self.max_entries:
                self._counts = {k: v >> 1 for k, v in self._counts.items() if v > 1}

    def get(self, cid: bytes) -> int:
        with self._lock:
            return self._counts.get(cid, 0)


@dataclass
class TierStatus:
    """What ``casfs drive status`` shows of a volume's cloud tier (bytes, counts)."""

    enabled: bool
    queued_chunks: int
    queued_bytes: int
    uploading_packs: int
    packs: int
    cloud_bytes: int
    live_cloud_bytes: int
    last_error: str
    last_error_at: str
    paused_until: str
    last_upload_at: str
    extra: dict[str, object] = field(default_factory=dict)
    oldest_queued_s: float = 0.0   # age in seconds of the oldest chunk not yet confirmed (0: none)


def status(db: Database) -> TierStatus:
    """The tier's figures from the database (works while mounted)."""
    meta = meta_rows.values_with_prefix(db, "cloud", "drive")
    q = queue_rows.figures(db)
    p = pack_rows.figures(db)
    paused = meta.get("drive_paused_until", "")
    if paused and float(paused) < time.time():
        paused = ""
    return TierStatus(
        enabled=meta.get("cloud_enabled") == "1", queued_chunks=q.chunks, queued_bytes=q.bytes,
        uploading_packs=p.uploading, packs=p.confirmed, cloud_bytes=p.confirmed_bytes, live_cloud_bytes=p.live_bytes,
        last_error=meta.get("drive_last_error", ""), last_error_at=meta.get("drive_last_error_at", ""),
        paused_until=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(paused))) if paused else "",
        last_upload_at=meta.get("drive_last_upload_at", ""), oldest_queued_s=q.oldest_us / 1e6)


def set_meta(db: Database, values: dict[str, str]) -> None:
    """Upsert meta keys (values cut to the column's 255 characters)."""
    meta_rows.set_values(db, values)


def _now_text() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


class PackMismatch(ObjectStoreError):
    """The store's size or checksum of an uploaded pack differs from ours."""


VOLUME_PROPERTY = "casfs_volume"   # app property naming the volume (uuid) an object belongs to


def owned(obj: ObjectInfo, volume_uuid: str) -> bool:
    """True when object ``obj`` carries volume ``volume_uuid``'s id in its ``casfs_volume``
    app property. Only such objects may ever be deleted or adopted by that volume: a
    folder shared by mistake with another volume must not lose the other's packs
    (docs/cloud.md, "A volume touches only its own objects")."""
    return obj.properties.get(VOLUME_PROPERTY) == volume_uuid[:60]


def foreign_object(objects: ObjectStore, volume_uuid: str) -> ObjectInfo | None:
    """The first object in the store's folder that does not belong to volume
    ``volume_uuid`` (another volume's pack, or anything without our id), or None.
    Lists the folder (stops at the first hit). Raises the cas.tier.objstore errors."""
    for obj in objects.list():
        if not owned(obj, volume_uuid):
            return obj
    return None


def matches(info: ObjectInfo, size: int, md5_hex: str, sha256_hex: str) -> bool:
    """True when the store's account of an object agrees with ours: the same size and
    md5 (Drive documents ``size`` and ``md5Checksum`` for every binary file), and the
    same sha256 when the store gives one (Drive's ``sha256Checksum`` is documented as
    "if available": confirmation never depends on it; the chunk envelopes inside a pack
    verify each chunk's content when it is read back)."""
    return (info.size == size and info.md5 == md5_hex
            and (not info.sha256 or info.sha256 == sha256_hex))


def put_checked(objects: ObjectStore, name: str, blob: bytes, volume_uuid: str) -> ObjectInfo:
    """Upload ``blob`` as object ``name`` and confirm it (:func:`matches`: size and md5,
    and sha256 when the store reports one), else the object is deleted and PackMismatch
    raised."""
    info = objects.put(name, blob, {VOLUME_PROPERTY: volume_uuid[:60], "casfs_pack": name})
    if not matches(info, len(blob), hashlib.md5(blob).hexdigest(), hashlib.sha256(blob).hexdigest()):
        try:
            objects.delete(info.id)
        except ObjectStoreError:
            pass
        raise PackMismatch(f"pack {name}: the store reports {info.size} bytes md5 {info.md5}, "
                           f"we sent {len(blob)} bytes md5 {hashlib.md5(blob).hexdigest()}")
    return info


class CloudTier:
    """A volume's cloud tier as used by a mount (or a CLI command): uploads, fetches of
    evicted chunks, eviction. Uses its own database connections, never the mount's.

    ``local_limit``: bytes the local store may hold (None: no eviction). ``shared``:
    whether the volume is shared (None: read ``is_shared`` now).
    """

    def __init__(self, meta: Metadata, objects: ObjectStore, cfg: CloudConfig,
                 local_limit: int | None = None, owner: str | None = None,
                 shared: bool | None = None) -> None:
        self.volume = meta.volume
        self.target = meta.db.target
        self.objects = objects
        self.cfg = cfg
        self.local_limit = local_limit
        self.owner = owner or owner_id()
        self.store = LocalStore(meta.volume.chunk_dir)
        # the queue rows this side uploads: those of its own store (docs/sharing.md, "Data")
        self.scope = queue_rows.Scope.of(meta.volume.uuid, meta.volume.store)
        # a mount passes its engine's mode (read once, checked by its session's
        # registration); a CLI command reads it here
        self.shared = meta_rows.is_shared(meta.db) if shared is None else shared
        # a shared volume uploads promptly: readers on other machines wait for it
        self.pack_age_s = min(cfg.pack_age_s, SHARED_PACK_AGE_S) if self.shared else cfg.pack_age_s
        self.remote_waits = 0     # reads that waited for another store's upload
        self.swept_files = 0      # orphan files the store sweep deleted
        self._missing_logged: set[bytes] = set()   # shared: queued chunks whose file is not here, logged
        self._left: dict[int, float] = {}   # pack -> when to look again (another store's, not adoptable)
        self.envelope = codec_for(meta.volume)   # opens this volume's envelopes (plain or encrypted)
        self.counts = AccessCounts()
        self._db: Database | None = None       # uploader / evictor thread
        self._read_db: Database | None = None  # fetches (any thread, under _read_lock)
        self._read_lock = threading.Lock()
        self._relocal: list[bytes] = []        # fetched chunks kept locally, not yet marked
        self._ahead: OrderedDict[bytes, bytes] = OrderedDict()   # pack read-ahead (envelopes)
        self._ahead_bytes = 0
        self._inflight: dict[bytes, threading.Event] = {}   # chunk -> download under way
        self._ahead_pool: ThreadPoolExecutor | None = None   # fetch_ahead's GETs
        self._ahead_gets = 0          # fetch_ahead GETs in flight
        self._ahead_pending = 0       # their bytes
        self.ahead_failures = 0       # fetch_ahead GETs that failed (the reads fetched on their own)
        self.last_fetch_at = -1e9     # time.monotonic() of the last fetch (a read that missed locally)
        # (time buffered, chunk), oldest first; bounded: past it the oldest are only
        # dropped by the buffer's own size limit
        self._ahead_log: deque[tuple[float, bytes]] = deque(maxlen=1 << 16)
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None
        self.uploaded_packs = 0
        self.uploaded_bytes = 0
        self.fetches = 0
        # for the metrics (docs/monitoring.md): errors met, by kind (:func:`error_kind`),
        # and what evict() removed from the local store (chunks, envelope bytes)
        self.errors: dict[str, int] = {}
        self._errors_lock = threading.Lock()
        self.evicted_chunks = 0
        self.evicted_bytes = 0
        # called by the thread when a round uploaded nothing; returns True when it did
        # work (cas.tier.snapshot.Snapshotter.tick: metadata snapshots)
        self.on_idle: Callable[[], bool] | None = None
        self.snapshots: Any = None   # a mount's cas.tier.snapshot.Snapshotter (None: no snapshots)

    # -- connections -------------------------------------------------------------------
    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database(self.target)
        return self._db

    def close(self) -> None:
        """Stop the background thread, record pending local marks, close the connections."""
        self.stop()
        if self._ahead_pool is not None:
            self._ahead_pool.shutdown(wait=True, cancel_futures=True)
            self._ahead_pool = None
        try:
            self.flush_local_marks()
        except CasError as exc:
            log.warning("could not record chunks kept locally: %s", exc)
        for d in (self._db, self._read_db):
            if d is not None:
                d.close()
        self._db = self._read_db = None

    # -- reading evicted chunks --------------------------------------------------------
    def locate(self, cid: bytes) -> tuple[str, list[tuple[bytes, int, int]]] | None:
        """Where chunk ``cid``'s confirmed cloud copy is: (object id, [(chunk id, offset,
        length in bytes)]) for ``cid`` followed by the evicted chunks stored right after
        it in the same pack, up to ``fetch_span`` bytes in all (pack read-ahead: files
        written in order sit in packs in order)."""
        with self._read_lock:
            if self._read_db is None:
                self._read_db = Database(self.target)
            loc = pack_rows.locate(self._read_db, cid)
            if loc is None:
                return None
            oid, pack, pos, length = loc
            span = [(cid, pos, length)]
            if self.cfg.fetch_span > length:
                after = pack_rows.following(self._read_db, pack, pos, self.cfg.fetch_span)
                end = pos + length
                for c, p, n, is_local in after:
                    if self.shared:   # is_local says "some store": ask ours
                        is_local = self.store.stat(c) is not None
                    if p != end or is_local or p + n - pos > self.cfg.fetch_span:
                        break
                    span.append((c, p, n))
                    end += n
        return oid, span

    def read_object(self, object_id: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of a pack object (ranged when ``length`` is given), retrying transient
        errors ``read_attempts`` times with short backoff (0.5-4 s), so that a store that
        cannot answer gives an error in bounded time. Raises the cas.tier.objstore errors."""
        return retrying(lambda: self.objects.get(object_id, offset, length), self.cfg.read_attempts,
                        initial_s=0.5, cap_s=4.0)

    def fetch(self, cid: bytes, wait: bool = True) -> bytes:
        """The envelope of chunk ``cid`` from its pack (ranged GET), not yet verified.

        One GET also brings the evicted chunks that follow ``cid`` in its pack (see
        :meth:`locate`); they wait in a bounded RAM buffer for the reads that usually
        follow, and a fetch of a chunk whose span is already being downloaded by another
        thread (read-ahead) waits for that download instead of starting its own.
        Retries transient errors ``read_attempts`` times with short backoff; raises
        ChunkMissing (EIO) when the chunk has no cloud copy or the store cannot give it.
        A chunk another store holds unconfirmed is waited for (:meth:`_await_upload`)
        when ``wait``, else ChunkPending is raised at once.
        """
        self.last_fetch_at = time.monotonic()
        while True:
            with self._read_lock:
                blob = self._ahead.pop(cid, None)
                if blob is not None:
                    self._ahead_bytes -= len(blob)
                    return blob
                pending = self._inflight.get(cid)
            if pending is None:
                break
            pending.wait(self.cfg.timeout_s * self.cfg.read_attempts)
            if cid not in self._ahead:   # that download failed or was cut short: our own GET
                break
        loc = self.locate(cid)
        if loc is None:
            got = self._await_upload(cid, wait)
            if isinstance(got, bytes):
                return got
            loc = got
        oid, span = loc
        done = threading.Event()
        with self._read_lock:
            keep = span[:1]
            for e in span[1:]:   # stop where another download or the buffer has it already
                if e[0] in self._inflight or e[0] in self._ahead:
                    break
                keep.append(e)
            span = keep
            for c, _, _ in span[1:]:
                self._inflight[c] = done
        try:
            start = span[0][1]
            total = span[-1][1] + span[-1][2] - start
            try:
                data = self.read_object(oid, start, total)
            except ObjectStoreError as exc:
                self.count_error(exc)
                log.error("cloud read of chunk %s (pack object %s) failed: %s", cid.hex(), oid, exc)
                raise ChunkMissing(f"chunk {cid.hex()}: cloud read failed: {exc}") from exc
            if len(data) != total:
                raise ChunkMissing(f"chunk {cid.hex()}: cloud returned {len(data)} of {total} bytes")
            self.fetches += 1
            with self._read_lock:
                self._buffer_ahead(span[1:], data, start)
            return data[:span[0][2]]
        finally:
            with self._read_lock:
                for c, _, _ in span[1:]:
                    if self._inflight.get(c) is done:
                        del self._inflight[c]
            done.set()

    def _holder(self, cid: bytes) -> str | None:
        """The store whose queue row holds ``cid`` (None: no queue row). Raises MetaError."""
        with self._read_lock:
            if self._read_db is None:
                self._read_db = Database(self.target)
            return queue_rows.holder(self._read_db, cid, self.scope.first)

    def _await_upload(self, cid: bytes, wait: bool = True) -> tuple[str, list[tuple[bytes, int, int]]] | bytes:
        """A chunk with no confirmed cloud copy: when another store holds it (its queue
        row names that store: a machine of a shared volume wrote it and has not uploaded
        it yet), wait for its upload, looking every REMOTE_POLL_S for the copy, for at
        most :func:`remote_wait_s` seconds (docs/sharing.md, "Data"). Runs in the reading
        thread: a worker without the engine lock, never the FUSE loop (docs/concurrency.md).
        Returns the copy's location, or the envelope when a file of it appeared in this
        store meanwhile (a write here brought the same bytes). Raises ChunkMissing (EIO)
        when no store holds it, when this store should and does not, or when the wait
        ends, with a log line naming the chunk and the store that holds it; ChunkPending
        at once when not ``wait`` (a read-ahead)."""
        holder = self._holder(cid)
        if holder is None or holder == self.scope.store:
            raise ChunkMissing(f"chunk {cid.hex()} is neither in the local store nor in the cloud")
        if not wait:
            raise ChunkPending(f"chunk {cid.hex()}: held by store {holder}, not uploaded yet")
        wait_s = remote_wait_s()
        self.remote_waits += 1
        log.info("chunk %s is held by store %s and not uploaded yet: waiting up to %.0f s",
                 cid.hex(), holder, wait_s)
        end = time.monotonic() + wait_s
        while True:
            if self.store.stat(cid) is not None:
                try:
                    return self.store.get(cid)
                except ChunkMissing:
                    pass
            loc = self.locate(cid)
            if loc is not None:
                return loc
            if self._holder(cid) is None:   # confirmed meanwhile (or collected): look once more
                loc = self.locate(cid)
                if loc is not None:
                    return loc
                raise ChunkMissing(f"chunk {cid.hex()} is neither in the local store nor in the cloud")
            if time.monotonic() >= end:
                log.error("chunk %s: its only copy is in store %s (another machine), which did not "
                          "upload it within %.0f s: EIO", cid.hex(), holder, wait_s)
                raise ChunkMissing(f"chunk {cid.hex()}: held by store {holder}, not uploaded within {wait_s:.0f} s")
            time.sleep(min(REMOTE_POLL_S, max(0.0, end - time.monotonic())))

    def fetch_ahead(self, cids: Iterable[bytes]) -> int:
        """Start ranged GETs, in background threads, for the evicted chunks among ``cids``
        (the chunks a sequential reader needs next, in file order): the overlapped cold
        read of docs/cloud.md, "Reading evicted chunks".

        The chunks not local, not buffered and not already downloading are located in
        one query; those that sit back to back in one pack are merged into one ranged
        GET of at most ``fetch_span`` bytes; the GETs start in file order. Bounds: at
        most ``fetch_ahead`` GETs in flight, and their bytes plus the read-ahead buffer
        at most AHEAD_MAX; nothing starts until ``fetch_span`` bytes of that budget are
        free, so that a steady reader is served by large GETs. The bytes land in that
        buffer as unverified envelopes; :meth:`fetch` hands them out and the caller
        verifies them as any fetched envelope. A GET that fails is tried once only and dropped: a read that needed
        it does its own :meth:`fetch`, with its retries. Returns the GETs started.
        Never raises for a store or database error (logged)."""
        return self.fetch_ahead_prefix(list(cids))[0]

    def ahead_room(self) -> bool:
        """True when :meth:`fetch_ahead` would start a GET now: fewer than ``fetch_ahead``
        GETs in flight and ``fetch_span`` bytes (at most AHEAD_MAX / 2) of the read-ahead
        budget free. Drops stale read-ahead bytes first. No list, no stat, no query."""
        with self._read_lock:
            self._drop_stale()
            # refill in steps of fetch_span: waiting until that much of the budget is free
            # lets the GETs be large (one small GET per chunk read would make the link's
            # latency, not its bandwidth, the bound)
            return (self.cfg.fetch_ahead > 0 and self._ahead_gets < self.cfg.fetch_ahead
                    and AHEAD_MAX - self._ahead_pending - self._ahead_bytes
                    >= min(self.cfg.fetch_span, AHEAD_MAX // 2))

    def fetch_ahead_prefix(self, cids: list[bytes]) -> tuple[int, int]:
        """:meth:`fetch_ahead` for ``cids`` (file order); returns (GETs started, how many
        leading ``cids`` it dealt with: local, buffered, downloading, without a cloud
        copy, or in a GET it started). The caller offers the rest again later."""
        limit = self.cfg.fetch_ahead
        cand = list(dict.fromkeys(cids))
        if not self.ahead_room():
            return 0, 0
        with self._read_lock:
            wanted = [c for c in cand if c not in self._inflight and c not in self._ahead]
        wanted = [c for c in wanted if self.store.stat(c) is None]   # local ones need no GET
        if not wanted:
            return 0, len(cids)
        try:
            where = self._locate_many(wanted)
        except CasError as exc:
            log.warning("cloud read-ahead: %s", exc)
            return 0, len(cids)   # the reads fetch on their own
        at = {(oid, pos): (cid, length) for cid, (oid, pos, length) in where.items()}
        runs: list[tuple[str, list[tuple[bytes, int, int]]]] = []
        taken: set[bytes] = set()
        for cid in wanted:   # file order: each run starts at the first chunk not yet taken
            if cid in taken or cid not in where:
                continue
            oid, pos, length = where[cid]
            run = [(cid, pos, length)]
            taken.add(cid)
            end = pos + length
            while (oid, end) in at and at[(oid, end)][0] not in taken \
                    and end + at[(oid, end)][1] - pos <= self.cfg.fetch_span:
                nxt, n = at[(oid, end)]
                run.append((nxt, end, n))
                taken.add(nxt)
                end += n
            runs.append((oid, run))
        started = 0
        stopped_at: bytes | None = None   # the first chunk of the first run not started
        for oid, run in runs:
            total = run[-1][1] + run[-1][2] - run[0][1]
            done = threading.Event()
            with self._read_lock:
                if self._ahead_gets >= limit or self._ahead_pending + self._ahead_bytes + total > AHEAD_MAX:
                    stopped_at = run[0][0]
                    break
                if any(c in self._inflight or c in self._ahead for c, _, _ in run):
                    continue   # a read's own fetch got there meanwhile
                for c, _, _ in run:
                    self._inflight[c] = done
                self._ahead_gets += 1
                self._ahead_pending += total
                if self._ahead_pool is None:
                    self._ahead_pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="casfs-fetch")
                pool = self._ahead_pool
            pool.submit(self._get_ahead, oid, run, done)
            started += 1
        if stopped_at is None:
            return started, len(cids)
        return started, cids.index(stopped_at)

    def _buffer_ahead(self, span: list[tuple[bytes, int, int]], data: bytes, start: int) -> None:
        """Put the envelopes of ``span`` ((chunk id, offset in the pack, length)), cut
        from ``data`` (the pack's bytes from offset ``start``), into the read-ahead
        buffer, then drop its oldest entries past AHEAD_MAX bytes. Caller holds
        ``_read_lock``."""
        for c, p, n in span:
            if c not in self._ahead:
                self._ahead[c] = data[p - start:p - start + n]
                self._ahead_bytes += n
                self._ahead_log.append((time.monotonic(), c))
        while self._ahead_bytes > AHEAD_MAX:
            _, old = self._ahead.popitem(last=False)
            self._ahead_bytes -= len(old)

    def _drop_stale(self) -> None:
        """Drop read-ahead bytes buffered more than AHEAD_STALE_S ago (a reader that
        stopped, or span tails nobody needed), so they do not hold the budget of
        :meth:`fetch_ahead` forever. Caller holds ``_read_lock``."""
        old = time.monotonic() - AHEAD_STALE_S
        while self._ahead_log and self._ahead_log[0][0] < old:
            _, c = self._ahead_log.popleft()
            blob = self._ahead.pop(c, None)
            if blob is not None:
                self._ahead_bytes -= len(blob)

    def _locate_many(self, cids: list[bytes]) -> dict[bytes, pack_rows.ObjectRange]:
        """chunk id -> (pack object id, offset, length in bytes) of the confirmed cloud
        copies of ``cids`` (ids without one are left out). Raises MetaError."""
        with self._read_lock:
            if self._read_db is None:
                self._read_db = Database(self.target)
            return dict(pack_rows.locate_many(self._read_db, cids))

    def _get_ahead(self, oid: str, span: list[tuple[bytes, int, int]], done: threading.Event) -> None:
        """One GET of :meth:`fetch_ahead` (a background thread): the span's envelopes go
        into the read-ahead buffer; on any error nothing does (one attempt, logged)."""
        start = span[0][1]
        total = span[-1][1] + span[-1][2] - start
        data: bytes | None = None
        try:
            data = self.objects.get(oid, start, total)
            if len(data) != total:
                raise ObjectStoreError(f"got {len(data)} of {total} bytes")
        except Exception as exc:  # noqa: BLE001 - a failed read-ahead only costs the reads a GET
            log.info("cloud read-ahead of pack object %s (%d bytes at %d) failed, the reads "
                     "fetch on their own: %s", oid, total, start, exc)
            data = None
        with self._read_lock:
            if data is not None:
                self.fetches += 1
                self._buffer_ahead(span, data, start)
            else:
                self.ahead_failures += 1
            for c, _, _ in span:
                if self._inflight.get(c) is done:
                    del self._inflight[c]
            self._ahead_gets -= 1
            self._ahead_pending -= total
        done.set()

    def keep_local(self, cid: bytes, blob: bytes) -> None:
        """Store a verified fetched envelope locally again (no fsync: the cloud holds the
        durable copy) and mark the chunk local at the next :meth:`flush_local_marks`
        (until then the evictor does not see the file, which is harmless)."""
        try:
            self.store.put_cached(cid, blob)
        except FsError as exc:
            log.warning("could not keep chunk %s locally: %s", cid.hex(), exc)
            return
        with self._read_lock:
            self._relocal.append(cid)

    def flush_local_marks(self) -> None:
        """Record ``is_local = 1`` for the chunks :meth:`keep_local` wrote (one statement)."""
        with self._read_lock:
            ids, self._relocal = self._relocal, []
        chunk_rows.mark_local(self.db, ids)

    # -- eviction ----------------------------------------------------------------------
    def local_bytes(self) -> int:
        """Envelope bytes of the chunks marked local."""
        return chunk_rows.local_bytes(self.db)

    def evict(self, limit: int) -> tuple[int, int]:
        """Delete local files of chunks confirmed in the cloud, least frequently used first,
        until the local store holds at most ``limit`` bytes (or nothing evictable is
        left). Returns (chunks evicted, bytes freed). On a shared volume: see
        :meth:`evict_shared`."""
        if self.shared:
            return self.evict_shared(limit)
        excess = self.local_bytes() - limit
        done = freed = 0
        while excess > 0:
            rows = chunk_rows.evictable(self.db, _CLAIM_BATCH)
            if not rows:
                break
            cands = sorted(rows, key=lambda x: self.counts.get(x.id))
            victims: list[bytes] = []
            for cid, n in cands:
                if excess <= 0:
                    break
                victims.append(cid)
                excess -= n
                freed += n

            def body(cur: pymysql.cursors.Cursor) -> list[bytes]:
                ids = chunk_rows.lock_evictable(cur, victims)
                if ids:
                    chunk_rows.mark_evicted(cur, ids)
                # the files go while the row locks are held (before the COMMIT), as in the
                # sweep: gc cannot delete a row and a writer re-create it relying on a file
                # this is about to delete; a reader that misses the file fetches it
                for cid in ids:
                    self.store.delete(cid)
                return ids
            ids = self.db.transaction(body)
            done += len(ids)
            sizes = {c.id: c.stored_length for c in cands}
            self.evicted_chunks += len(ids)
            self.evicted_bytes += sum(sizes.get(cid, 0) for cid in ids)
            if len(rows) < _CLAIM_BATCH and not ids:
                break
        return done, freed

    def evict_shared(self, limit: int) -> tuple[int, int]:
        """:meth:`evict` of a shared volume (docs/sharing.md, "Data"): ``chunks.is_local``
        cannot tell which store holds a file, so this store's bytes are its files' sizes
        (one listing of the store and a stat per file), the candidates its files of
        chunks with a confirmed cloud copy, least frequently used first; each is deleted
        while its row lock is held, before the COMMIT (``FOR UPDATE SKIP LOCKED``: rows a
        writer or gc holds are left for a later round). ``is_local`` is left as it is: other
        stores may still hold their files. A chunk not confirmed is never evicted (its
        file may be the only copy). Returns (chunks evicted, bytes freed)."""
        sizes: dict[bytes, int] = {}
        for cid in self.store.iter_ids():
            st = self.store.stat(cid)
            if st is not None:
                sizes[cid] = st.size
        excess = sum(sizes.values()) - limit
        if excess <= 0:
            return 0, 0
        cands = sorted(chunk_rows.confirmed_among(self.db, list(sizes)), key=self.counts.get)
        done = freed = 0
        for i in range(0, len(cands), _CLAIM_BATCH):
            if excess <= 0:
                break
            victims: list[bytes] = []
            for cid in cands[i:i + _CLAIM_BATCH]:
                if excess <= 0:
                    break
                victims.append(cid)
                excess -= sizes[cid]

            gone: set[bytes] = set()

            def body(cur: pymysql.cursors.Cursor, v: list[bytes] = victims,
                     gone: set[bytes] = gone) -> list[bytes]:
                ids = chunk_rows.lock_confirmed(cur, v)
                # delete under the row locks (before the COMMIT), as the sweep does: gc
                # on another machine cannot delete the row meanwhile and a writer here
                # re-create it relying on the file this then deletes
                for cid in ids:
                    if self.store.delete(cid):
                        gone.add(cid)
                return ids
            ids = self.db.transaction(body)
            for cid in ids:
                if cid in gone:
                    done += 1
                    freed += sizes[cid]
            excess += sum(sizes[c] for c in victims) - sum(sizes[c] for c in ids)
        self.evicted_chunks += done
        self.evicted_bytes += freed
        return done, freed

    def sweep(self, grace_s: float | None = None) -> int:
        """Delete this store's chunk files whose row is gone and that are older than
        ``grace_s`` seconds (None: env CASFS_STORE_SWEEP_GRACE_S, else SWEEP_GRACE_S),
        under the placeholder-lock protocol of cas.chunk.sweep: gc run on another
        machine deletes rows volume-wide but files only in its own store. Returns the
        files deleted. Raises MetaError."""
        grace = _env_seconds("CASFS_STORE_SWEEP_GRACE_S", SWEEP_GRACE_S) if grace_s is None else grace_s
        n = sweep_orphans(self.db, self.store, grace).files
        self.swept_files += n
        if n:
            log.info("store sweep: deleted %d chunk files whose rows are gone", n)
        return n

    # -- uploading ---------------------------------------------------------------------
    def ready_to_upload(self, force: bool) -> bool:
        """True when this store's unclaimed queue rows hold a pack's worth of bytes, or
        the oldest is older than the pack age (:attr:`pack_age_s`), or ``force``."""
        n, size, old = queue_rows.backlog(self.db, int(self.pack_age_s * 1e6), self.scope)
        return n > 0 and (force or size >= self.cfg.pack_size or old)

    def _claim(self) -> tuple[int, str, list[tuple[bytes, int, int]]] | None:
        """Claim up to pack_size bytes of queued chunks for a new pack.
        Returns (pack id, name, [(chunk id, pos, length)]) or None."""
        name = PACK_PREFIX + secrets.token_hex(12)

        def body(cur: pymysql.cursors.Cursor) -> tuple[int, str, list[tuple[bytes, int, int]]] | None:
            queue_rows.drop_confirmed(cur, self.scope)
            ids = file_order(cur, queue_rows.claim(cur, _CLAIM_BATCH, self.scope))
            layout: list[tuple[bytes, int, int]] = []
            pos = 0
            missing: list[bytes] = []
            for cid in ids:
                st = self.store.stat(cid)
                if st is None:
                    missing.append(cid)
                    continue
                if pos and pos + st.size > self.cfg.pack_size:
                    break
                layout.append((cid, pos, st.size))
                pos += st.size
            for cid in missing:
                # gc deleted the chunk (and its queue row) after our SELECT, or its only
                # copy is lost (disk damage): nothing to upload either way; fsck reports it
                if chunk_rows.exists(cur, cid):
                    if self.shared:
                        # another machine's store may hold it (a row queued under the
                        # wrong store): keep the row, at the back of the queue, never
                        # drop another store's only copy from the upload queue
                        if cid not in self._missing_logged:
                            self._missing_logged.add(cid)
                            log.error("chunk %s is queued for upload by store %s (this store) but "
                                      "its file is not here: the row is kept (casfs fsck lists it)",
                                      cid.hex(), self.scope.store)
                        queue_rows.to_back(cur, cid)
                        continue
                    log.error("chunk %s was queued for upload but its local file is gone: "
                              "dropped from the queue (casfs fsck lists it)", cid.hex())
                queue_rows.dequeue(cur, cid)
            if not layout:
                return None
            pack = self.insert_pack(cur, name, pos)
            queue_rows.assign(cur, pack, [queue_rows.Placement(*e) for e in layout])
            return pack, name, layout
        return self.db.transaction(body)

    def insert_pack(self, cur: pymysql.cursors.Cursor, name: str, size: int, md5: bytes = b"\0" * 16,
                    sha256: bytes = b"\0" * 32) -> int:
        """Record pack ``name`` (``size`` bytes) as 'uploading', owned by this tier for
        LEASE_S seconds, in the caller's transaction; returns its id. Zero checksums
        mean "not built yet" (recovery then finds nothing to adopt)."""
        return pack_rows.insert_uploading(cur, name, size, md5, sha256, self.owner, LEASE_S)

    def _build(self, layout: list[tuple[bytes, int, int]]) -> bytes | None:
        parts = []
        for cid, pos, n in layout:
            try:
                blob = self.store.get(cid)
            except FsError:
                return None
            if len(blob) != n:
                return None
            try:
                self.envelope.open(blob, cid)
            except IntegrityError:
                self._drop_bad(cid)
                return None
            parts.append(blob)
        return b"".join(parts)

    def _drop_bad(self, cid: bytes) -> None:
        """A queued chunk's file fails verification: never upload it (corruption must not
        spread to the cloud). Mark it bad and take it out of the queue; the write that
        heals it queues it again (cas.chunk.manager.ChunkManager.apply_deltas)."""
        log.error("cloud tier: chunk %s fails verification: marked bad, not uploaded", cid.hex())

        def body(cur: pymysql.cursors.Cursor) -> None:
            chunk_rows.mark_bad(cur, [cid])
            queue_rows.dequeue(cur, cid)
        self.db.transaction(body)

    def _release(self, pack: int) -> None:
        """Give a pack's claims back to the queue and delete its row."""
        def body(cur: pymysql.cursors.Cursor) -> None:
            queue_rows.release(cur, pack)
            pack_rows.delete_uploading(cur, pack)
        self.db.transaction(body)

    def _confirm(self, pack: int, info: ObjectInfo, owner: str | None) -> bool:
        """Make ``pack`` confirmed with object ``info``: its chunks' cloud copies count
        from this commit on. False if the pack is no longer ours (recovered by another)."""
        def body(cur: pymysql.cursors.Cursor) -> bool:
            row = pack_rows.lock_claim(cur, pack)
            if row is None or row.state != "uploading" or (owner is not None and row.owner != owner):
                return False
            # md5/sha256 stay those we computed from the bytes we built (equal to the
            # store's, :func:`matches`; the store may not report a sha256)
            pack_rows.mark_confirmed(cur, pack, info.id)
            pack_rows.enter_claimed(cur, pack)
            queue_rows.delete_claims(cur, pack)
            return True
        return self.db.transaction(body)

    def upload_one(self, force: bool = False) -> int:
        """Build, upload and confirm one pack if the queue is ready; return its size in
        bytes (0 when nothing was uploaded). Raises TryAgain / DailyLimit /
        ObjectStoreError from the store; the claim is released first."""
        if not self.ready_to_upload(force):
            return 0
        claim = self._claim()
        if claim is None:
            return 0
        pack, name, layout = claim
        blob = self._build(layout)
        if blob is None:   # a file changed or went away under us: try again with a fresh claim
            self._release(pack)
            return 0
        pack_rows.set_checksums(self.db, pack, hashlib.md5(blob).digest(), hashlib.sha256(blob).digest())
        try:
            info = put_checked(self.objects, name, blob, self.volume.uuid)
        except BaseException:
            self._release_or_adopt(pack, name)
            raise
        if not self._confirm(pack, info, self.owner):
            log.warning("pack %s was taken over while uploading; its object is left to gc", name)
            return 0
        self.uploaded_packs += 1
        self.uploaded_bytes += len(blob)
        # an upload went through: whatever pause `drive status` shows is over
        set_meta(self.db, {"drive_last_upload_at": _now_text(), "drive_paused_until": ""})
        return len(blob)

    def _release_or_adopt(self, pack: int, name: str) -> None:
        """After a failed put: adopt an object that did arrive complete (the failure hit the
        answer, not the upload), else delete partial ones and release the claims."""
        try:
            self.recover_pack(pack, name)
        except (ObjectStoreError, MetaError) as exc:
            log.warning("pack %s: recovery after a failed upload deferred: %s", name, exc)
            self._note_error(exc)

    def recover_pack(self, pack: int, name: str, adopt_only: bool = False) -> str:
        """Settle an 'uploading' pack whose upload is over (failed or owner dead).
        Returns 'adopted' or 'released'; with ``adopt_only`` (a pack of another store:
        its chunks are not in ours) only a complete object is adopted, and otherwise
        nothing is touched ('left')."""
        sums = pack_rows.uploading_checksums(self.db, pack)
        if sums is None:
            return "released"
        size, md5, sha = sums.size, sums.md5.hex(), sums.sha256.hex()
        found = [o for o in self.objects.find(name) if owned(o, self.volume.uuid)]
        keep = next((o for o in found if matches(o, size, md5, sha)), None)
        if adopt_only:
            if keep is not None and self._confirm(pack, keep, None):
                log.info("pack %s of another store: adopted the upload already in the store", name)
                return "adopted"
            return "left"
        for o in found:
            if o is not keep:
                try:
                    self.objects.delete(o.id)
                except ObjectNotFound:
                    pass
        if keep is not None and self._confirm(pack, keep, None):
            log.info("pack %s: adopted the upload already in the store", name)
            return "adopted"
        self._release(pack)
        return "released"

    def recover(self) -> int:
        """Settle 'uploading' packs whose upload is over: our own (this tier uploads one
        pack at a time, so any left between calls failed and could not be settled then),
        those whose owner died (this host), and those whose lease expired. A pack whose
        claimed rows belong to another store (another machine of a shared volume) is
        only adopted when its object is complete: its chunks' bytes are in that store,
        so only that store re-claims them (docs/sharing.md, "Data").
        Returns how many were looked at."""
        rows = pack_rows.uploading(self.db)
        n = 0
        now = time.monotonic()
        for pack, name, owner, expired in rows:
            if owner == self.owner or _owner_dead(owner) or expired:
                if self._left.get(pack, 0.0) > now:
                    continue   # another store's pack looked at lately: one list call a minute
                store = queue_rows.pack_store(self.db, pack, self.scope.first)
                other = store is not None and store != self.scope.store
                if self.recover_pack(pack, name, adopt_only=other) == "left":
                    self._left[pack] = now + LEFT_RETRY_S
                n += 1
        return n

    def drain(self, deadline_s: float | None = None, on_pack: Callable[[int], None] | None = None) -> int:
        """Upload until the queue is empty (ignoring the pack age), retrying transient
        errors with backoff. Returns bytes uploaded. Raises DailyLimit, ObjectStoreError,
        or TryAgain when ``deadline_s`` (seconds from now) passes."""
        end = None if deadline_s is None else time.monotonic() + deadline_s
        total = 0
        attempt = 0
        self._recover_quietly()
        while True:
            try:
                n = self.upload_one(force=True)
            except TryAgain as exc:
                attempt += 1
                delay = min(self.cfg.timeout_s, 2.0 ** min(attempt, 5) * 0.25)
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                if end is not None and time.monotonic() + delay > end:
                    raise
                time.sleep(delay)
                self._recover_quietly()
                continue
            attempt = 0
            if n == 0:
                if not self.ready_to_upload(True) and not self._uploading_left():
                    return total
                if self._only_missing_left():
                    return total
                if end is not None and time.monotonic() > end:
                    raise TryAgain("queue not drained before the deadline")
                time.sleep(0.2)
                self._recover_quietly()
                continue
            total += n
            if on_pack is not None:
                on_pack(n)

    def _only_missing_left(self) -> bool:
        """Shared volume: whether every unclaimed row of this store is one whose file
        :meth:`_claim` found missing here (kept, not uploadable from here): a drain then
        ends instead of waiting for its deadline. One count, then a list when small."""
        if not self.shared or not self._missing_logged or self._uploading_left():
            return False
        if queue_rows.backlog(self.db, 0, self.scope).chunks > len(self._missing_logged):
            return False
        return all(c in self._missing_logged for c in queue_rows.unclaimed_ids(self.db, self.scope))

    def _uploading_left(self) -> bool:
        """Whether an upload of ours is unsettled: any 'uploading' pack (one store), or
        on a shared volume a pack holding rows of this store (another machine's
        uploads are not ours to wait for)."""
        if self.shared:
            return queue_rows.claimed_any(self.db, self.scope)
        return pack_rows.any_uploading(self.db)

    # -- the background thread of a mount ----------------------------------------------
    def start(self) -> None:
        """Start the uploader/evictor thread (a mount calls this once). A pause recorded
        by an earlier mount is cleared: this mount has not been refused yet (if the daily
        cap still holds, its first upload pauses it again and records that)."""
        try:
            set_meta(self.db, {"drive_paused_until": ""})
        except MetaError as exc:
            log.warning("cloud tier: could not clear the recorded pause: %s", exc)
        self._thread = threading.Thread(target=self._run, name="casfs-cloud", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the thread to stop after the current request and wait for it."""
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def kick(self) -> None:
        """Wake the thread now (e.g. after a flush queued new chunks)."""
        self._kick.set()

    def _wait(self, seconds: float) -> None:
        self._kick.wait(seconds)
        self._kick.clear()

    def _run(self) -> None:
        backoff = 0
        next_evict = 0.0
        sweep_every = _env_seconds("CASFS_STORE_SWEEP_S", SWEEP_INTERVAL_S)
        next_sweep = time.monotonic() + sweep_every
        while not self._stop.is_set():
            try:
                # Every round, not only at start or after an error: a pack whose upload
                # failed and whose recovery failed too (the store's list call erred), or
                # whose owner's lease expired since, is settled as soon as the store
                # answers again (docs/cloud.md, "A pack never stays uploading").
                self._recover_quietly()
                started = time.monotonic()
                n = self.upload_one()
                if n and self.cfg.bwlimit:
                    self._wait(max(0.0, n / self.cfg.bwlimit - (time.monotonic() - started)))
                self.flush_local_marks()
                if self.local_limit is not None and time.monotonic() >= next_evict:
                    began = time.monotonic()
                    self.evict(self.local_limit)   # sums the local bytes: not every round
                    # a shared store is listed to be measured: keep that under 10% of the time
                    next_evict = time.monotonic() + max(EVICT_INTERVAL_S, 10 * (time.monotonic() - began))
                if self.shared and time.monotonic() >= next_sweep:
                    self.sweep()   # files of rows gc deleted from another machine
                    next_sweep = time.monotonic() + sweep_every
                backoff = 0   # the last error stays recorded (with its time) for `drive status`
                if not n and not (self.on_idle is not None and self.on_idle()):
                    self._wait(1.0)
            except DailyLimit as exc:
                until = time.time() + self.cfg.pause_s
                log.error("cloud tier: daily upload limit reached; uploads paused for %.0f s: %s",
                          self.cfg.pause_s, exc)
                self._note_error(exc, paused_until=until)
                self._wait(self.cfg.pause_s)
                self._recover_quietly()
            except TryAgain as exc:
                backoff += 1
                delay = min(32.0, 2.0 ** min(backoff, 5) * 0.5)
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                self._note_error(exc)
                self._wait(delay)
                self._recover_quietly()
            except (ObjectStoreError, CasError) as exc:
                backoff += 1
                log.error("cloud tier: %s", exc)
                self._note_error(exc)
                self._wait(min(60.0, 2.0 ** min(backoff, 6)))
            except Exception as exc:
                backoff += 1
                log.exception("cloud tier: unexpected error")
                self._note_error(exc)
                self._wait(min(60.0, 2.0 ** min(backoff, 6)))

    def _recover_quietly(self) -> None:
        try:
            self.recover()
        except (ObjectStoreError, CasError) as exc:
            log.info("cloud tier: recovery deferred: %s", exc)
            self._note_error(exc)

    def note_error(self, exc: BaseException) -> None:
        """Record ``exc`` as the tier's last error (meta keys drive_last_error and
        drive_last_error_at, read by ``casfs drive status`` from any process)."""
        self._note_error(exc)

    def count_error(self, exc: BaseException) -> None:
        """Count ``exc`` in :attr:`errors` under its :func:`error_kind`; refused
        credentials also go to the audit log (cas.config.audit). Thread-safe."""
        kind = error_kind(exc)
        with self._errors_lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1
        if kind == "credentials":
            audit.event("drive credentials refused", op="drive_credentials", result="EACCES",
                        detail=_first_line(exc))

    def _note_error(self, exc: BaseException, paused_until: float | None = None) -> None:
        self.count_error(exc)
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        try:
            vals = {"drive_last_error": msg, "drive_last_error_at": _now_text()}
            if paused_until is not None:
                vals["drive_paused_until"] = f"{paused_until:.0f}"
            set_meta(self.db, vals)
        except MetaError:
            pass



def error_kind(exc: BaseException) -> str:
    """The kind of a cloud-tier error, a label of the metric casfs_drive_errors_total:
    daily_limit, try_again (rate limits, 5xx, network), credentials, not_found, store
    (other object-store errors), database (MetaError) or other."""
    if isinstance(exc, DailyLimit):
        return "daily_limit"
    if isinstance(exc, TryAgain):
        return "try_again"
    if isinstance(exc, CredentialsRefused):
        return "credentials"
    if isinstance(exc, ObjectNotFound):
        return "not_found"
    if isinstance(exc, ObjectStoreError):
        return "store"
    if isinstance(exc, MetaError):
        return "database"
    return "other"


# -- opening the store -------------------------------------------------------------------

def folder_key(cfg: CloudConfig) -> str:
    """What a recorded folder id (meta key drive_folder_id) was made for: endpoint and
    folder name (meta key drive_folder_key)."""
    return f"{cfg.endpoint}|{cfg.folder}"


def open_objects(volume: Volume, cfg: CloudConfig, db: Database, *,
                 credentials_file: Path | None = None, record: bool = True) -> ObjectStore:
    """The object store the volume's config names, its folder created on first use
    (the folder id is kept in meta key drive_folder_id, shared by all mounts).

    ``credentials_file`` overrides the config's credentials file (``drive auth`` checks
    new credentials before keeping them). With ``record`` False nothing is written to
    the database: a recorded folder id is used only when it was made for this endpoint
    and folder name, else the folder is found (or created) by name.

    Raises ObjectStoreError (bad credentials, unreachable store) or VolumeError.

    An ``[s3]`` store (:func:`open_s3`) is opened without a request: a missing bucket or
    refused credentials show at its first use (`casfs s3 enable` checks both).
    """
    if cfg.s3:
        return open_s3(volume, cfg, credentials_file)
    if cfg.endpoint.startswith("file:"):
        from cas.tier.objstore import DirObjectStore
        return DirObjectStore(Path(cfg.endpoint[5:]))
    from cas.tier import drive
    cred_path = volume.path / cfg.credentials if cfg.credentials else None
    if credentials_file is not None:
        cred_path = credentials_file
    if cred_path is None and not cfg.endpoint:
        raise VolumeError(f"volume {volume.name}: no Drive credentials; run `casfs drive auth`")
    creds = drive.load_credentials(cred_path)

    def factory() -> Any:
        return drive.build_service(cfg.endpoint or None, creds, timeout=cfg.timeout_s)
    recorded = meta_rows.get(db, "drive_folder_id")
    if not record:
        made_for = meta_rows.get(db, "drive_folder_key")
        if recorded is not None and made_for == folder_key(cfg):
            folder = recorded
        else:
            folder = retrying(lambda: drive.ensure_folder(factory(), cfg.folder), 3, initial_s=0.5, cap_s=4.0)
    elif recorded is not None:
        folder = recorded
    else:
        folder = retrying(lambda: drive.ensure_folder(factory(), cfg.folder), 3, initial_s=0.5, cap_s=4.0)
        meta_rows.add_if_absent(db, "drive_folder_id", folder)
        folder = str(meta_rows.get(db, "drive_folder_id"))
    return drive.DriveObjectStore(factory, folder, chunk_size=cfg.upload_chunk)


def open_s3(volume: Volume, cfg: CloudConfig, credentials_file: Path | None = None) -> ObjectStore:
    """The S3 store of ``cfg.s3`` (cas.tier.s3): bucket and prefix, endpoint ``cfg.endpoint``
    ("" = AWS), region, profile, and credentials from the AWS chain or the
    ``credentials_file`` key (a path; relative to the volume directory), which
    ``credentials_file`` overrides. Raises CredentialsRefused (unreadable credentials
    file, unknown profile), ObjectStoreError."""
    from cas.tier import s3
    loc = cfg.s3
    path: Path | None = None
    if loc.get("credentials_file"):
        path = Path(loc["credentials_file"]).expanduser()
        if not path.is_absolute():
            path = volume.path / path
    if credentials_file is not None:
        path = credentials_file
    return s3.open_store(loc["bucket"], loc.get("prefix", ""), endpoint_url=cfg.endpoint or None,
                         region=loc.get("region") or s3.DEFAULT_REGION, profile=loc.get("profile") or None,
                         credentials_file=path, timeout_s=cfg.timeout_s)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


RESTORE_ATTEMPTS = 5      # tries per pack read in restore (backoff 0.5 s doubling to 4 s)
RESTORE_PASSES = 2        # packs that failed are tried again after all the others


@dataclass(frozen=True)
class RestoreResult:
    """What :func:`restore` did: chunks (and envelope bytes) written back to the local
    store, chunks marked cloud-only instead (``lazy``), chunks found nowhere (``lost``:
    hex ids), live chunks left cloud-only (``cloud_only``: evicted on purpose and not
    asked for, or marked by ``lazy``), chunks whose pack could not be read
    (``unreadable``: hex ids) and those packs (``failed_packs``: "name: error")."""

    restored: int
    restored_bytes: int
    marked_remote: int
    lost: list[str]
    cloud_only: int = 0
    unreadable: list[str] = field(default_factory=list)
    failed_packs: list[str] = field(default_factory=list)


def restore(tier: CloudTier, lazy: bool = False, everything: bool = False,
            progress: Callable[[int], None] | None = None,
            on_total: Callable[[int], None] | None = None) -> RestoreResult:
    """Rebuild a lost or damaged local store from the cloud, given the database.

    Every chunk row whose local file is missing (or, with ``everything``, every chunk
    not local) and that has a confirmed cloud copy is downloaded, verified against its
    id and written to the local store; with ``lazy`` it is only marked cloud-only
    (``is_local = 0``) so that reads fetch it on demand. A pack is read whole when more
    than half of it is needed, else chunk by chunk with ranged GETs. A pack read is
    tried RESTORE_ATTEMPTS times with backoff; a pack that still fails does not stop the
    others: it is tried again after them (RESTORE_PASSES passes in all), and what it
    could not give is returned in ``unreadable`` / ``failed_packs`` (running restore
    again picks it up). Chunks with neither a local file nor a cloud copy are returned
    as ``lost``. ``progress`` is called with the bytes of each chunk handled (envelope
    bytes); ``on_total``, once before the downloads, with the envelope bytes to download
    in all. Raises MetaError; store errors are collected, not raised.
    """
    db = tier.db
    rows = chunk_rows.copies(db)
    need: dict[int, list[tuple[bytes, int, int]]] = {}
    packs: dict[int, tuple[str, int, str]] = {}
    lost: list[str] = []
    marked = cloud_only = 0
    for cid, is_local, copy in rows:
        if is_local and tier.store.exists(cid):
            continue
        if not is_local and not everything:
            cloud_only += copy is not None
            continue
        if copy is None:
            lost.append(cid.hex())
            continue
        if lazy:
            if is_local:
                chunk_rows.mark_remote(db, cid)
                marked += 1
            cloud_only += 1
            continue
        need.setdefault(copy.pack, []).append((cid, copy.pos, copy.length))
        packs[copy.pack] = (copy.object_id, copy.pack_size, copy.pack_name)
    restored = restored_bytes = 0
    done: set[bytes] = set()
    if on_total is not None:
        on_total(sum(n for items in need.values() for _, _, n in items))

    def read(oid: str, offset: int = 0, length: int | None = None) -> bytes:
        return retrying(lambda: tier.objects.get(oid, offset, length),
                        max(RESTORE_ATTEMPTS, tier.cfg.read_attempts), initial_s=0.5, cap_s=4.0)

    def restore_pack(oid: str, psize: int, items: list[tuple[bytes, int, int]]) -> None:
        nonlocal restored, restored_bytes
        whole = read(oid) if sum(n for _, _, n in items) * 2 > psize else None
        for cid, pos, n in items:
            blob = whole[pos:pos + n] if whole is not None else read(oid, pos, n)
            try:
                tier.envelope.open(blob, cid)
            except FsError:
                log.error("restore: chunk %s in pack object %s fails verification", cid.hex(), oid)
                lost.append(cid.hex())
                done.add(cid)
                continue
            tier.store.put(cid, blob)
            chunk_rows.mark_local(db, [cid])
            done.add(cid)
            restored += 1
            restored_bytes += len(blob)
            if progress is not None:
                progress(len(blob))

    pending = list(need)
    errors: dict[int, ObjectStoreError] = {}
    for _ in range(RESTORE_PASSES):
        failed = []
        for pack in pending:
            oid, psize, _name = packs[pack]
            try:
                restore_pack(oid, psize, [e for e in need[pack] if e[0] not in done])
                errors.pop(pack, None)
            except ObjectStoreError as exc:
                log.error("restore: pack %s (object %s) could not be read: %s", _name, oid, exc)
                errors[pack] = exc
                failed.append(pack)
        pending = failed
        if not pending:
            break
    unreadable = [cid.hex() for pack in pending for cid, _, _ in need[pack] if cid not in done]
    failed_packs = [f"{packs[p][2]}: {_first_line(errors[p])}" for p in pending]
    return RestoreResult(restored, restored_bytes, marked, lost, cloud_only, unreadable, failed_packs)
