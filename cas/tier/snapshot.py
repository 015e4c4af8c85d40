"""Metadata snapshots on the cloud store: Drive as a complete backup of a volume.

A *snapshot* is a consistent dump of every table needed to rebuild the volume's
database, taken inside one ``START TRANSACTION WITH CONSISTENT SNAPSHOT`` (REPEATABLE
READ), zstd-compressed (and sealed with the volume key in an encrypted volume), and
uploaded to the volume's Drive folder as ``casfs-meta-<generation:08d>-<UTC>.zst``.
The object ``casfs-volume.json`` next to it holds what a fresh machine needs to
recreate ``volume.toml`` (uuid, chunk size, compression, the ``[encryption]`` table).
docs/backup.md describes the format, the rules and the tests that guard them.

Format (after decompression; one JSON document per line, UTF-8):

- a header object: ``{"format": "casfs-snapshot", "version": 1, "schema_version": "4",
  "volume_uuid": ..., "generation": G, "created": "<UTC ISO 8601>", "ctime_mark": NS,
  "lacking_chunks": N, "tables": [...]}``;
- per table, in :data:`TABLES` order: ``{"table": T, "columns": [...], "binary": [i...]}``,
  then one JSON array per row (the columns listed in ``binary`` as base64 text, DATETIME
  values as ``YYYY-MM-DD HH:MM:SS.ffffff`` text), then ``{"end": T, "rows": N}``;
- a trailer ``{"end_of_snapshot": true, "rows": {T: N, ...}}``: a dump without it is
  truncated and is refused.

Consistency (docs/backup.md):

- only *confirmed* packs are dumped, and ``pack_entries`` rows only ever name confirmed
  packs (cas.tier.cloud: entries are written by the commit that confirms a pack), so every
  pack the snapshot names was confirmed on Drive (size and md5 compared) before it is
  uploaded;
- the packs a generation names are recorded in ``snapshot_packs (generation, pack name)``
  in a transaction that takes a shared lock on each named pack row and checks it is
  still there; gc deletes a pack row under an exclusive lock only when no generation
  pins it (cas.maint.gc.collect_cloud), so a pack a kept generation names is never deleted;
- chunks whose only copy is local when the dump is taken (live chunks with no
  ``pack_entries`` row) are counted in the header (``lacking_chunks``); the mount and
  ``casfs drive push`` drain the upload queue first, so that count is normally 0.

``meta`` keys written here: ``snapshot_generation`` (last generation number handed
out), ``snapshot_last_generation`` (newest generation confirmed on the store),
``snapshot_confirmed_at`` (UTC ISO time it was confirmed), ``snapshot_ctime_mark`` (the
largest inode ctime in it, ns: inodes with a larger ctime changed after it),
``snapshot_dump_started`` (wall-clock ns taken just before the dump's transaction began:
a mount that committed anything later snapshots again), ``snapshot_lacking_chunks``,
``snapshot_object`` (its object name).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import IO, Any, Protocol

import pymysql
import pymysql.cursors
import zstandard

from cas.tier.cloud import VOLUME_PROPERTY, CloudTier, matches, owned, set_meta
from cas.db import chunks as chunk_rows
from cas.db import namespace as namespace_rows
from cas.db import packs as pack_rows
from cas.db import tables
from cas.db import volume as meta_rows
from cas.db.batch import batches
from cas.errors import CasError, MetaError
from cas.db.database import SCHEMA_VERSION, Database
from cas.tier.objstore import ObjectInfo, ObjectNotFound, ObjectStore, ObjectStoreError
from cas.config.volume import Volume

log = logging.getLogger(__name__)

FORMAT = "casfs-snapshot"
FORMAT_VERSION = 1
SNAPSHOT_PREFIX = "casfs-meta-"
VOLUME_OBJECT = "casfs-volume.json"
SNAPSHOT_PROPERTY = "casfs_snapshot"   # app property: the generation number of a snapshot object
#: dumped tables, in load order; packs first, so that the packs a generation names can be
#: read without decompressing the rest (:func:`pack_names`)
#: (which rows of each table a dump takes: cas.db.tables.ROW_FILTER)
#: schema versions whose snapshots load exactly into this release's tables: schema 5 only
#: added tables and a column snapshots do not carry, and the loaded meta row
#: ``schema_version`` makes the next connect run the (idempotent) migration to 5
RESTORABLE_SCHEMAS = ("4", str(SCHEMA_VERSION))
TABLES = ("packs", "meta", "inodes", "dentries", "symlinks", "xattrs", "chunks", "manifests", "pack_entries")
_BINARY_TYPES = {"binary", "varbinary", "tinyblob", "blob", "mediumblob", "longblob"}
#: meta keys of the source volume that a restored volume does not take over (they describe
#: the old machine's uploader, or are set by the restore itself)
_LOCAL_META = ("drive_paused_until", "drive_last_error", "drive_last_error_at", "drive_folder_id",
               "drive_folder_key", "snapshot_generation", "snapshot_last_generation", "snapshot_confirmed_at",
               "snapshot_ctime_mark", "snapshot_lacking_chunks", "snapshot_object", "snapshot_dump_started")
_NAME_RE = re.compile(r"^casfs-meta-(\d{8,})-(\d{8}T\d{6}Z)\.zst$")
ZSTD_LEVEL = 3
LOAD_BATCH = 1000   # rows per INSERT batch (and per transaction) when loading
RACE_RETRIES = 3    # dumps taken again when gc deleted a named pack meanwhile
#: How long (s) a working mount holds a change in RAM before committing it: an open
#: file's dirty buffer is written back once older than WRITEBACK_AGE_S (5 s) at the next
#: writeback tick (WRITEBACK_INTERVAL_S, 0.5 s; both fusefront/daemon.py), plus 2 s of
#: margin for the commit. A write's ctime is taken when it reaches RAM, so a change
#: committed after a dump can carry a ctime up to this much older than the dump's start
#: (longer while writeback fails): "changes since" does not count it, and the mount
#: snapshots again on its commit time instead (Snapshotter, docs/backup.md).
CTIME_SLACK_S = 5.0 + 0.5 + 2.0


class SnapshotError(CasError):
    """A snapshot cannot be taken, found, read or loaded (one-line message)."""


class Sealer(Protocol):
    """What a snapshot needs of an encrypted volume's keys (cas.config.keys.VolumeKeys)."""

    def seal_blob(self, data: bytes, aad: bytes) -> bytes:
        """``data`` sealed (AES-256-GCM) with ``aad`` authenticated."""
        ...

    def open_blob(self, blob: bytes, aad: bytes) -> bytes:
        """The data of ``blob``; IntegrityError when it or ``aad`` was changed."""
        ...


def snapshot_aad(volume_uuid: str, generation: int) -> bytes:
    """The associated data a snapshot is sealed with: binds it to its volume and
    generation (a sealed snapshot renamed to another generation does not open)."""
    return b"casfs-snapshot:" + volume_uuid.encode() + str(generation).encode()


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- dumping -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DumpInfo:
    """What :func:`dump` wrote: rows per table, the names of the packs it names, the
    largest inode ctime (ns), live chunks with no cloud copy, compressed bytes, and
    ``started_ns``: time.time_ns() just before the dump's transaction began (every
    COMMIT that returned before it is in the dump)."""

    rows: dict[str, int]
    packs: list[str]
    ctime_mark: int
    lacking_chunks: int
    compressed_bytes: int
    started_ns: int = 0


def _text(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(v, date):
        return v.isoformat()
    return v


def dump(db: Database, out: IO[bytes], volume_uuid: str, generation: int,
         progress: Callable[[str, int], None] | None = None) -> DumpInfo:
    """Write a consistent snapshot of the volume's tables to ``out`` (zstd-compressed
    JSON lines, see the module docstring). Rows are streamed from the server (an
    unbuffered cursor) into the compressor: RAM holds one row at a time, never the dump.
    ``progress(table, rows)`` is called at the end of each table. Uses ``db``'s
    connection for one REPEATABLE READ read-only transaction. Raises MetaError."""
    conn = db.conn
    packs: list[str] = []
    rows: dict[str, int] = {}
    start = out.tell()
    # the frame's content checksum (XXH64) makes any damage of an unsealed dump fail to
    # decompress instead of loading other values
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
    try:
        with conn.cursor() as cur:
            t0 = time.time_ns()
            tables.begin_consistent(cur)
            schema = meta_rows.get(cur, "schema_version")
            mark = namespace_rows.max_ctime(cur)
            lacking = chunk_rows.count_lacking(cur)
            columns: dict[str, list[tables.Column]] = {}
            for t in TABLES:
                columns[t] = tables.columns(cur, t)
                if not columns[t]:
                    raise SnapshotError(f"the database has no table {t}")
        with cctx.stream_writer(out, closefd=False) as zw:
            def line(obj: Any) -> None:
                zw.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
            line({"format": FORMAT, "version": FORMAT_VERSION, "schema_version": schema,
                  "volume_uuid": volume_uuid, "generation": generation, "created": _iso(_utc_now()),
                  "ctime_mark": mark, "lacking_chunks": lacking, "tables": list(TABLES)})
            for t in TABLES:
                cols = [c for c, _ in columns[t]]
                binary = [i for i, (_, ty) in enumerate(columns[t]) if ty in _BINARY_TYPES]
                line({"table": t, "columns": cols, "binary": binary})
                name_at = cols.index("name") if t == "packs" else -1
                n = 0
                for row in tables.stream_rows(conn, t, cols):
                    vals = [_text(v) for v in row]
                    for i in binary:
                        if vals[i] is not None:
                            vals[i] = base64.b64encode(bytes(vals[i])).decode()
                    if name_at >= 0:
                        packs.append(str(vals[name_at]))
                    line(vals)
                    n += 1
                line({"end": t, "rows": n})
                rows[t] = n
                if progress is not None:
                    progress(t, n)
            line({"end_of_snapshot": True, "rows": rows})
        conn.commit()
    except pymysql.err.MySQLError as exc:
        db._rollback()
        raise MetaError(f"snapshot dump failed: {exc}") from exc
    except BaseException:
        db._rollback()
        raise
    return DumpInfo(rows, packs, mark, lacking, out.tell() - start, t0)


# -- reading -------------------------------------------------------------------------------

def _lines(blob: bytes) -> Iterator[Any]:
    """The JSON documents of a (decompressed on the fly) snapshot blob."""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
    try:
        for raw in io.TextIOWrapper(reader, encoding="utf-8"):
            if raw.strip():
                yield json.loads(raw)
    except (zstandard.ZstdError, ValueError) as exc:
        raise SnapshotError(f"the snapshot is damaged: {exc}") from exc


def read_header(blob: bytes) -> dict[str, Any]:
    """The header object of a snapshot blob (decompressed, opened). Raises SnapshotError."""
    for doc in _lines(blob):
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise SnapshotError("not a casfs snapshot")
        return doc
    raise SnapshotError("the snapshot is empty")


def pack_names(blob: bytes) -> list[str]:
    """Names of the packs a snapshot blob names (reads only as far as its packs table).
    Raises SnapshotError for a damaged snapshot."""
    try:
        return _pack_names(blob)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"the snapshot is damaged: {exc!r}") from exc


def _pack_names(blob: bytes) -> list[str]:
    it = _lines(blob)
    read_header_doc = next(it, None)
    if not isinstance(read_header_doc, dict) or read_header_doc.get("format") != FORMAT:
        raise SnapshotError("not a casfs snapshot")
    names: list[str] = []
    at = -1
    for doc in it:
        if isinstance(doc, dict):
            if doc.get("table") == "packs":
                at = list(doc["columns"]).index("name")
            elif doc.get("end") == "packs":
                return names
        elif at >= 0:
            names.append(str(doc[at]))
    raise SnapshotError("the snapshot has no packs table")


@dataclass(frozen=True)
class LoadInfo:
    """What :func:`load` loaded: the header, and rows per table."""

    header: dict[str, Any]
    rows: dict[str, int]


def load(db: Database, blob: bytes, progress: Callable[[str, int], None] | None = None) -> LoadInfo:
    """Load a snapshot blob (zstd JSON lines, already opened) into ``db``, a database
    freshly created from schema.sql. Rows go in batches of LOAD_BATCH, each batch one
    transaction; ``meta`` rows replace the ones schema.sql inserted. Raises
    SnapshotError for a snapshot of another schema version, a damaged or truncated
    one (row counts are checked against each table's end line and the trailer; column
    names against the table's real columns), and MetaError."""
    try:
        return _load(db, blob, progress)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"the snapshot is damaged: {exc!r}") from exc


def _load(db: Database, blob: bytes, progress: Callable[[str, int], None] | None) -> LoadInfo:
    it = _lines(blob)
    header = next(it, None)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SnapshotError("not a casfs snapshot")
    if int(header.get("version", 0)) != FORMAT_VERSION:
        raise SnapshotError(f"snapshot format version {header.get('version')} is not supported")
    if str(header.get("schema_version")) not in RESTORABLE_SCHEMAS:
        raise SnapshotError(f"the snapshot is of schema version {header.get('schema_version')}, this casfs "
                            f"speaks {SCHEMA_VERSION}: restore with a matching casfs release")
    rows: dict[str, int] = {}
    table = ""
    cols: list[str] = []
    binary: list[int] = []
    batch: list[list[Any]] = []
    n = 0

    def flush() -> None:
        if not batch:
            return
        data, t, c = list(batch), table, list(cols)
        db.transaction(lambda cur: tables.insert_rows(cur, t, c, data, replace=t == "meta"))
        batch.clear()

    for doc in it:
        if isinstance(doc, list):
            if not table:
                raise SnapshotError("the snapshot is damaged: a row outside a table")
            if len(doc) != len(cols):
                raise SnapshotError(f"the snapshot is damaged: a row of {table} has {len(doc)} values, "
                                    f"not {len(cols)}")
            for i in binary:
                if doc[i] is not None:
                    doc[i] = base64.b64decode(doc[i], validate=True)
            batch.append(doc)
            n += 1
            if len(batch) >= LOAD_BATCH:
                flush()
            continue
        if "table" in doc:
            table, cols, binary, n = str(doc["table"]), list(doc["columns"]), list(doc["binary"]), 0
            if table not in TABLES:
                raise SnapshotError(f"the snapshot names an unknown table {table}")
            real = tables.column_names(db, table)
            unknown = [c for c in cols if not isinstance(c, str) or c not in real]
            if unknown or len(set(cols)) != len(cols):
                raise SnapshotError(f"the snapshot is damaged: table {table} has no columns {unknown!r} "
                                    "(or names one twice)")
            if any(not isinstance(i, int) or not 0 <= i < len(cols) for i in binary):
                raise SnapshotError(f"the snapshot is damaged: table {table}'s binary columns {binary!r}")
        elif "end" in doc:
            flush()
            if doc["end"] != table or int(doc["rows"]) != n:
                raise SnapshotError(f"the snapshot is damaged: table {table} has {n} rows, "
                                    f"its end line says {doc.get('rows')}")
            rows[table] = n
            if progress is not None:
                progress(table, n)
            table = ""
        elif doc.get("end_of_snapshot"):
            if dict(doc.get("rows", {})) != rows:
                raise SnapshotError("the snapshot is damaged: the trailer's row counts differ")
            return LoadInfo(header, rows)
    raise SnapshotError("the snapshot is truncated (no trailer)")


# -- the objects on the store --------------------------------------------------------------

@dataclass(frozen=True)
class SnapshotObject:
    """One snapshot object on the store: generation, name, object id, size (bytes),
    its creation time (aware UTC), and the hex md5 the store's listing gives ("" when
    it gives none)."""

    generation: int
    name: str
    id: str
    size: int
    created: datetime
    md5: str = ""


def snapshot_name(generation: int, when: datetime) -> str:
    """``casfs-meta-<generation:08d>-<YYYYmmddTHHMMSSZ>.zst``."""
    return f"{SNAPSHOT_PREFIX}{generation:08d}-{when.astimezone(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.zst"


def is_backup_object(name: str) -> bool:
    """True for the names of snapshot objects and of the volume object (gc's orphan sweep
    leaves them alone: they are not packs)."""
    return name == VOLUME_OBJECT or name.startswith(SNAPSHOT_PREFIX)


def generations(objects: ObjectStore, volume_uuid: str | None = None,
                listing: list[ObjectInfo] | None = None) -> list[SnapshotObject]:
    """The snapshot objects in the store's folder, oldest generation first; with
    ``volume_uuid``, only objects carrying that volume's id. Raises the cas.tier.objstore
    errors."""
    out = []
    for o in (listing if listing is not None else objects.list()):
        m = _NAME_RE.match(o.name)
        if not m or (volume_uuid is not None and not owned(o, volume_uuid)):
            continue
        out.append(SnapshotObject(int(m.group(1)), o.name, o.id, o.size, o.created, o.md5 or ""))
    return sorted(out, key=lambda s: (s.generation, s.created))


def volume_document(volume: Volume, encryption: dict[str, Any] | None = None) -> bytes:
    """The volume object's bytes: what a fresh machine needs to recreate volume.toml
    (uuid, name, chunk size, compression, the [drive] settings other than the endpoint
    and credentials, and the [encryption] table of an encrypted volume)."""
    drive = {k: v for k, v in volume.drive.items() if k not in ("endpoint", "credentials")}
    doc: dict[str, Any] = {"format": 1, "uuid": volume.uuid, "name": volume.name,
                           "chunk_size": volume.chunk_size, "compression": volume.compression, "drive": drive}
    if volume.s3:   # an S3 store: its tier settings and bucket, prefix, region (not where, not who)
        doc["s3"] = {k: v for k, v in volume.s3.items() if k not in ("endpoint_url", "credentials_file", "profile")}
    if encryption:
        doc["encryption"] = encryption
    return json.dumps(doc, sort_keys=True, indent=1).encode()


def put_confirmed(objects: ObjectStore, name: str, blob: bytes, properties: dict[str, str]) -> ObjectInfo:
    """Upload ``blob`` as ``name`` and confirm it (cas.tier.cloud.matches: size and md5, and
    sha256 when reported); a mismatching object is deleted and SnapshotError raised."""
    info = objects.put(name, blob, properties)
    if not matches(info, len(blob), hashlib.md5(blob).hexdigest(), hashlib.sha256(blob).hexdigest()):
        try:
            objects.delete(info.id)
        except ObjectStoreError:
            pass
        raise SnapshotError(f"{name}: the store reports {info.size} bytes md5 {info.md5}, we sent "
                            f"{len(blob)} bytes md5 {hashlib.md5(blob).hexdigest()}")
    return info


# -- taking one ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SnapshotResult:
    """A snapshot confirmed on the store: its generation, object name, compressed size
    (bytes, as stored), rows per table, live chunks it lacks, generations deleted by
    retention."""

    generation: int
    name: str
    size: int
    rows: dict[str, int]
    lacking_chunks: int
    deleted: list[int]


def _next_generation(db: Database) -> int:
    def body(cur: pymysql.cursors.Cursor) -> int:
        gen = int(meta_rows.lock_value(cur, "snapshot_generation", "0")) + 1
        meta_rows.set_value(cur, "snapshot_generation", str(gen))
        return gen
    return db.transaction(body)


def _pin(db: Database, generation: int, names: list[str]) -> bool:
    """Record that ``generation`` names packs ``names``, under a shared lock on each pack
    row; False when one of them is gone (gc deleted it after the dump read it)."""
    unique = sorted(set(names))

    def body(cur: pymysql.cursors.Cursor) -> bool:
        found = 0
        for part in batches(unique):
            found += pack_rows.lock_confirmed_names(cur, part)
            pack_rows.insert_pins(cur, generation, part)
        if found != len(unique):
            pack_rows.delete_pins(cur, generation)
            return False
        return True
    return db.transaction(body)


def _insert_pins(db: Database, generation: int, names: list[str]) -> None:
    """Pin ``names`` for ``generation`` in one transaction of its own."""
    def body(cur: pymysql.cursors.Cursor) -> None:
        pack_rows.insert_pins(cur, generation, names)
    db.transaction(body)


def unpin(db: Database, generation: int) -> None:
    """Forget which packs ``generation`` names (it was never uploaded, or was deleted)."""
    pack_rows.unpin(db, generation)


def pinned_names(db: Database) -> set[str]:
    """Names of the packs some kept generation names (gc must not delete them)."""
    return pack_rows.pinned_names(db)


def take(tier: CloudTier, keep: int, keys: Sealer | None = None,
         progress: Callable[[str, int], None] | None = None) -> SnapshotResult:
    """Take a snapshot of ``tier``'s volume and upload it; apply retention (keep the newest
    ``keep`` generations). Does not drain the upload queue: callers do that first
    (:func:`drain_then_take`). The compressed dump goes to a buffer in RAM, never to
    disk (the store's put takes bytes anyway): RAM holds the compressed snapshot about
    twice while it is taken and sealed. Raises
    SnapshotError, MetaError, and the cas.tier.objstore errors."""
    vol = tier.volume
    if keys is None:
        keys = getattr(vol, "keys", None)   # an unlocked encrypted volume's keys (cas.config.keys)
    if _encryption_table(vol) and keys is None:
        # never plaintext metadata of an encrypted volume on the store
        raise SnapshotError(f"volume {vol.name} is encrypted and not unlocked: no snapshot")
    db = tier.db
    gen = _next_generation(db)
    put_started = False
    try:
        for attempt in range(RACE_RETRIES):
            reader = Database(tier.target)
            try:
                # in RAM, never a file: in an encrypted volume the dump is plaintext until
                # sealed below (docs/encryption.md)
                buf = io.BytesIO()
                info = dump(reader, buf, vol.uuid, gen, progress)
                blob = buf.getvalue()
                del buf
            finally:
                reader.close()
            if _pin(db, gen, info.packs):
                break
            log.info("snapshot %d: a pack it names was deleted meanwhile; dumping again", gen)
        else:
            raise SnapshotError(f"snapshot {gen}: packs kept disappearing while it was taken (gc running?)")
        if keys is not None:
            blob = keys.seal_blob(blob, snapshot_aad(vol.uuid, gen))
        name = snapshot_name(gen, _utc_now())
        # from here on the object may reach the store even when the call fails (a lost
        # reply, a failed delete after a mismatch): its pins stay, so gc keeps its packs;
        # retain() drops them once the generation is older than every kept one
        put_started = True
        put_confirmed(tier.objects, name, blob, {VOLUME_PROPERTY: vol.uuid[:60], SNAPSHOT_PROPERTY: str(gen)})
    except BaseException:
        if not put_started:
            try:
                unpin(db, gen)
            except MetaError:
                pass
        raise

    def record(cur: pymysql.cursors.Cursor) -> None:
        if int(meta_rows.lock_value(cur, "snapshot_last_generation", "0")) > gen:
            return   # a newer one (another process) was confirmed first
        for k, v in (("snapshot_last_generation", str(gen)), ("snapshot_confirmed_at", _iso(_utc_now())),
                     ("snapshot_ctime_mark", str(info.ctime_mark)),
                     ("snapshot_lacking_chunks", str(info.lacking_chunks)), ("snapshot_object", name),
                     ("snapshot_dump_started", str(info.started_ns))):
            meta_rows.set_value(cur, k, v)
    db.transaction(record)
    listing = list(tier.objects.list())
    _ensure_volume_object(tier, listing, keys)
    deleted = retain(tier, keep, listing)
    log.info("snapshot %d uploaded as %s (%d bytes, %d live chunks not on the store)",
             gen, name, len(blob), info.lacking_chunks)
    return SnapshotResult(gen, name, len(blob), info.rows, info.lacking_chunks, deleted)


def _encryption_table(vol: Volume) -> dict[str, Any] | None:
    table = getattr(vol, "encryption", None)
    return dict(table) if table else None


def _volume_on_disk(vol: Volume) -> Volume:
    """``vol`` as its volume.toml says now: `casfs key passwd` rewrites the [encryption]
    table there while a mount keeps the table it started with in RAM. Falls back to
    ``vol`` when the file cannot be read or names another volume."""
    from cas.errors import VolumeError
    from cas.config.volume import open_volume
    try:
        disk = open_volume(str(vol.path.resolve()) + "/")
    except VolumeError as exc:
        log.warning("volume object: cannot read %s/volume.toml (%s); using the mount's copy", vol.path, exc)
        return vol
    return disk if disk.uuid == vol.uuid else vol


def refresh_volume_object(tier: CloudTier) -> None:
    """Upload the volume object when the store's copy is missing or differs from what
    volume.toml on disk says now (`casfs drive push` calls it every time). Raises
    SnapshotError and the cas.tier.objstore errors."""
    _ensure_volume_object(tier, list(tier.objects.list()), None)


def _ensure_volume_object(tier: CloudTier, listing: list[ObjectInfo], keys: Sealer | None) -> None:
    """Upload the volume object when it is missing or differs; then delete older copies.
    The document is built from volume.toml on disk (:func:`_volume_on_disk`), so the
    [encryption] table on the store follows `casfs key passwd`."""
    vol = _volume_on_disk(tier.volume)
    doc = volume_document(vol, _encryption_table(vol))
    md5 = hashlib.md5(doc).hexdigest()
    mine = [o for o in listing if o.name == VOLUME_OBJECT and owned(o, vol.uuid)]
    if any(o.md5 == md5 and o.size == len(doc) for o in mine):
        return
    info = put_confirmed(tier.objects, VOLUME_OBJECT, doc, {VOLUME_PROPERTY: vol.uuid[:60]})
    for o in mine:
        if o.id != info.id:
            try:
                tier.objects.delete(o.id)
            except ObjectNotFound:
                pass


def retain(tier: CloudTier, keep: int, listing: list[ObjectInfo] | None = None) -> list[int]:
    """Delete this volume's snapshot objects beyond the newest ``keep`` generations, then
    the pins of generations older than the oldest one kept (objects first: a crash in
    between leaves extra pins, dropped by the next run, never a kept generation without
    its packs). Returns the generations deleted."""
    snaps = generations(tier.objects, tier.volume.uuid, listing)
    by_gen: dict[int, list[SnapshotObject]] = {}
    for s in snaps:
        by_gen.setdefault(s.generation, []).append(s)
    kept = sorted(by_gen)[-max(keep, 1):]
    deleted = []
    for gen in sorted(by_gen):
        if gen in kept:
            continue
        for s in by_gen[gen]:
            try:
                tier.objects.delete(s.id)
            except ObjectNotFound:
                pass
        deleted.append(gen)
    if kept:
        pack_rows.unpin_older(tier.db, kept[0])
    return deleted


def drain_then_take(tier: CloudTier, keep: int, keys: Sealer | None = None, drain_s: float | None = None,
                    progress: Callable[[str, int], None] | None = None) -> SnapshotResult:
    """Upload every queued chunk (for at most ``drain_s`` seconds: what is still queued
    then is counted as lacking), then :func:`take`. Raises as :func:`take` and
    CloudTier.drain (DailyLimit, ObjectStoreError)."""
    from cas.tier.objstore import TryAgain
    try:
        tier.drain(drain_s)
    except TryAgain as exc:
        log.warning("snapshot: the upload queue did not drain in time (%s); the snapshot lacks what is "
                    "still queued", exc)
    return take(tier, keep, keys, progress)


# -- the recovery point --------------------------------------------------------------------

@dataclass(frozen=True)
class RecoveryPoint:
    """The newest snapshot confirmed on the store, as recorded in ``meta``:
    ``generation`` (0: none yet), ``confirmed_at`` (UTC ISO text, "" if none),
    ``changes_since``: inodes (files, directories, symlinks) whose ctime is later than
    the newest ctime in that snapshot, i.e. created, written, renamed, chmod'ed, given
    an xattr, or whose directory gained or lost an entry since (a deletion counts
    through its parent directory); ``lacking_chunks``: live chunks that had no cloud
    copy when it was taken (lost in a total loss)."""

    generation: int
    confirmed_at: str
    changes_since: int
    lacking_chunks: int
    object_name: str

    def as_dict(self) -> dict[str, object]:
        """The recovery point as `drive status --json` / `stats --json` show it (key ``snapshot``)."""
        return {"generation": self.generation, "confirmed_at": self.confirmed_at,
                "changes_since": self.changes_since, "lacking_chunks": self.lacking_chunks,
                "object": self.object_name}


def changes_since(db: Database, mark: int) -> int:
    """Inodes with ctime_ns > ``mark`` (one scan of the inodes table)."""
    return namespace_rows.count_changed_since(db, mark)


def recovery_point(db: Database) -> RecoveryPoint:
    """The volume's recovery point (works while mounted). Raises MetaError."""
    m = meta_rows.values_with_prefix(db, "snapshot")
    gen = int(m.get("snapshot_last_generation", "0") or 0)
    mark = int(m.get("snapshot_ctime_mark", "0") or 0) if gen else -1
    return RecoveryPoint(gen, m.get("snapshot_confirmed_at", ""), changes_since(db, mark),
                         int(m.get("snapshot_lacking_chunks", "0") or 0), m.get("snapshot_object", ""))


# -- the mount's snapshots -----------------------------------------------------------------

class Snapshotter:
    """A mount's snapshots: run by the cloud tier's thread when it has nothing to upload
    (CloudTier.on_idle). A snapshot is due when ``interval_s`` seconds have passed since
    the last one (or since the mount started) and something changed since the last
    snapshot (:func:`changes_since`, checked at most once per interval); the queue is
    drained first (the thread uploads one pack per round, ignoring the pack age, for up
    to ``drain_s`` seconds). :meth:`final` takes the unmount's snapshot, bounded in time.
    """

    def __init__(self, tier: CloudTier, interval_s: float, keep: int, keys: Sealer | None = None,
                 drain_s: float = 60.0, last_commit_ns: Callable[[], int] | None = None) -> None:
        self.tier = tier
        # when the mount's Filesystem last committed (cas.db.database.Database.last_commit_ns,
        # wall-clock ns; 0: never): a commit after the last dump started may be missing
        # from it whatever its ctimes say
        self.last_commit_ns = last_commit_ns
        self.interval_s = interval_s
        self.keep = keep
        self.keys = keys
        self.drain_s = drain_s
        self._last = time.monotonic()
        self._draining_since: float | None = None
        self._lock = threading.Lock()
        self.taken = 0

    def _changed(self) -> bool:
        """Whether a snapshot is due: an inode's ctime is above the last snapshot's
        ``snapshot_ctime_mark``; or the mount committed something after that snapshot's
        dump started (``snapshot_dump_started``; a buffered write committed late keeps
        its older ctime); or the last snapshot lacked chunks (then queued)."""
        m = meta_rows.values_of(self.tier.db, ("snapshot_last_generation", "snapshot_ctime_mark",
                                                "snapshot_dump_started", "snapshot_lacking_chunks"))
        if not m.get("snapshot_last_generation"):
            return changes_since(self.tier.db, -1) > 0
        started = int(m.get("snapshot_dump_started") or 0)
        if self.last_commit_ns is not None and self.last_commit_ns() >= started:
            return True
        mark = int(m.get("snapshot_ctime_mark") or 0)
        return changes_since(self.tier.db, mark) > 0 or int(m.get("snapshot_lacking_chunks", "0") or 0) > 0

    def tick(self) -> bool:
        """One step, on the tier's thread; True when it did work (uploaded a pack or took
        a snapshot). Raises the errors of uploads and of :func:`take` (the tier's thread
        records them and backs off)."""
        now = time.monotonic()
        if self._draining_since is None:
            if now - self._last < self.interval_s:
                return False
            if not self._changed():
                self._last = now
                return False
            self._draining_since = now
        if self.tier.ready_to_upload(True) and now - self._draining_since < self.drain_s:
            self.tier.upload_one(force=True)
            return True
        with self._lock:
            take(self.tier, self.keep, self.keys)
            self.taken += 1
        self._draining_since = None
        self._last = time.monotonic()
        return True

    def final(self, timeout_s: float) -> SnapshotResult | None:
        """The unmount's snapshot: stop the tier's thread; then, when something changed
        since the last snapshot, drain the queue (for at most ``timeout_s`` seconds) and
        take one. Errors are logged, not raised: the unmount goes on, and the recovery
        point stays the previous snapshot. Returns the snapshot or None."""
        thread = self.tier._thread
        self.tier.stop()
        if thread is not None and thread.is_alive():   # stuck in a request: its connection is busy
            log.error("no snapshot at unmount: the uploader thread did not stop in time")
            return None
        try:
            if not self._changed():
                return None
            # one cheap call first: with the store unreachable the unmount does not spend
            # its whole bound on retries
            self.tier.objects.find(VOLUME_OBJECT)
            with self._lock:
                return drain_then_take(self.tier, self.keep, self.keys, drain_s=timeout_s)
        except (CasError, ObjectStoreError) as exc:
            log.error("no snapshot at unmount: %s", exc)
            self.tier.note_error(exc)
            return None


# -- restoring a volume from the store -------------------------------------------------------

@dataclass(frozen=True)
class RestorePlan:
    """What a restore from the store will use: the volume object's document, the chosen
    snapshot, every snapshot of the volume on the store (oldest first)."""

    volume: dict[str, Any]
    chosen: SnapshotObject
    snapshots: list[SnapshotObject]


def plan_restore(objects: ObjectStore, generation: int | None = None) -> RestorePlan:
    """Read the volume object in the store's folder and choose a snapshot: generation
    ``generation``, else the newest. Raises SnapshotError (no volume object, no
    snapshot, no such generation: the message lists those there are) and the
    cas.tier.objstore errors."""
    listing = list(objects.list())
    vols = sorted((o for o in listing if o.name == VOLUME_OBJECT), key=lambda o: o.created)
    if not vols:
        raise SnapshotError("the folder holds no casfs-volume.json: no metadata snapshot was ever uploaded "
                            "(or this is not a casfs volume's folder)")
    owners = sorted({o.properties.get(VOLUME_PROPERTY, "") for o in vols})
    if len(owners) > 1:
        raise SnapshotError(f"the folder holds the volume objects of several volumes ({', '.join(owners)}); "
                            "it was shared by mistake: restore is not possible from it automatically")
    try:
        doc = json.loads(objects.get(vols[-1].id))
        uuid = str(doc["uuid"])
        int(doc["chunk_size"]), str(doc["compression"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"casfs-volume.json is damaged: {exc}") from exc
    snaps = generations(objects, uuid, listing)
    if not snaps:
        raise SnapshotError(f"the folder holds no metadata snapshot of volume {uuid}")
    if generation is None:
        chosen = snaps[-1]
    else:
        match = [s for s in snaps if s.generation == generation]
        if not match:
            raise SnapshotError(f"no generation {generation} on the store; there are "
                                f"{', '.join(str(s.generation) for s in snaps)}")
        chosen = match[-1]
    return RestorePlan(doc, chosen, snaps)


def _open_blob(objects: ObjectStore, snap: SnapshotObject, uuid: str, keys: Sealer | None) -> bytes:
    from cas.tier.objstore import retrying
    blob = retrying(lambda: objects.get(snap.id), 5, initial_s=0.5, cap_s=4.0)
    if len(blob) != snap.size:
        raise SnapshotError(f"{snap.name}: got {len(blob)} of {snap.size} bytes")
    if snap.md5 and hashlib.md5(blob).hexdigest() != snap.md5.lower():
        raise SnapshotError(f"{snap.name}: the bytes downloaded have md5 {hashlib.md5(blob).hexdigest()}, "
                            f"the store lists {snap.md5}: damaged on the store or on the way")
    if keys is not None:
        try:
            blob = keys.open_blob(blob, snapshot_aad(uuid, snap.generation))
        except Exception as exc:  # noqa: BLE001 - any failure to open is "not authentic"
            raise SnapshotError(f"{snap.name} does not open with the volume key (damaged or not "
                                f"this volume's): {exc}") from exc
    return blob


def create_database(volume: Volume) -> bool:
    """Create the volume's empty database from schema.sql (no root inode, no meta rows
    but the schema version): the target of :func:`load`. Starts and releases the
    embedded server of an embedded volume. Returns True when it created the database
    (False: it existed, empty). Raises MetaError when the database exists and holds
    tables."""
    from cas.db.database import create_schema
    return create_schema(volume)


def _undo_database(volume: Volume, created: bool) -> None:
    """After a failed restore into an external (``--meta``) database: drop it when the
    restore created it, else drop the tables it made (it was empty before), so that no
    half-loaded database is left. Errors are logged: the restore's own error is the one
    the user sees. (An embedded volume's datadir goes with its directory.)"""
    from cas.db.database import _target_for
    if volume.embedded:
        return
    target = _target_for(volume, None)
    try:
        admin = Database(target, database="")
        try:
            if created:
                tables.drop_database(admin, target.database)
            else:
                tables.drop_tables(admin, target.database)
        finally:
            admin.close()
    except CasError as exc:
        log.error("cannot remove the half-loaded database %s: %s", target.describe(), exc)


@dataclass(frozen=True)
class VolumeRestore:
    """What :func:`restore_into` did: the generation and its creation time (UTC ISO),
    rows per table, inodes, live chunks (all cloud-only after a lazy restore),
    chunks downloaded (eager), live chunks the snapshot has no cloud copy of (``lost``,
    hex ids), chunks Drive did not give (eager; hex ids) and those packs."""

    generation: int
    created: str
    rows: dict[str, int]
    inodes: int
    live_chunks: int
    downloaded: int
    downloaded_bytes: int
    lost: list[str]
    unreadable: list[str]
    failed_packs: list[str]


def restore_into(volume: Volume, objects: ObjectStore, cfg: Any, folder_id: str, plan: RestorePlan,
                 keys: Sealer | None = None, eager: bool = False,
                 progress: Callable[[str], None] | None = None,
                 chunk_progress: Callable[[int], None] | None = None,
                 chunk_total: Callable[[int], None] | None = None) -> VolumeRestore:
    """Rebuild ``volume``'s database (created here, empty; :func:`create_database`) from
    snapshot ``plan.chosen``, with ``volume.uuid`` etc. already taken from the plan.

    Every chunk is marked cloud-only (``is_local = 0``: reads fetch it from its pack,
    cas.tier.cloud); with ``eager`` every live chunk is downloaded (cas.tier.cloud.restore). The
    packs of every snapshot kept on the store are pinned (``snapshot_packs``), so gc on
    the restored volume deletes none of them. Meta keys describing the old machine's
    uploader are dropped; ``snapshot_generation`` continues after the newest generation
    on the store. ``progress`` gets one line per step; with ``eager``,
    ``chunk_progress`` gets the envelope bytes of each chunk downloaded and
    ``chunk_total`` the bytes to download, first (default: a line per 8 MiB through
    ``progress``). Raises SnapshotError,
    MetaError and the cas.tier.objstore errors. After a failure the database is removed
    again (:func:`_undo_database`): no half-loaded database is left behind."""

    def say(text: str) -> None:
        if progress is not None:
            progress(text)
    snap = plan.chosen
    blob = _open_blob(objects, snap, volume.uuid, keys)
    say(f"downloaded snapshot generation {snap.generation} ({snap.size} bytes)")
    header = read_header(blob)
    try:
        hgen = int(header.get("generation", -1))
        int(header.get("ctime_mark", 0)), int(header.get("lacking_chunks", 0))
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"{snap.name}: the snapshot's header is damaged: {exc}") from exc
    if header.get("volume_uuid") != volume.uuid or hgen != snap.generation:
        raise SnapshotError(f"{snap.name} is generation {header.get('generation')} of volume "
                            f"{header.get('volume_uuid')}, not generation {snap.generation} of {volume.uuid}")
    created = create_database(volume)
    try:
        return _restore_loaded(volume, objects, cfg, folder_id, plan, keys, eager, say, blob, header,
                               chunk_progress, chunk_total)
    except BaseException:
        _undo_database(volume, created)
        raise


def _restore_loaded(volume: Volume, objects: ObjectStore, cfg: Any, folder_id: str, plan: RestorePlan,
                    keys: Sealer | None, eager: bool, say: Callable[[str], None], blob: bytes,
                    header: dict[str, Any], chunk_progress: Callable[[int], None] | None = None,
                    chunk_total: Callable[[int], None] | None = None) -> VolumeRestore:
    """The part of :func:`restore_into` after the database was created."""
    from cas.tier import cloud as cloud_mod
    from cas.db.database import _server_for, _target_for, connect
    snap = plan.chosen
    server = _server_for(volume)
    if server is not None:
        server.acquire()
    try:
        raw = Database(_target_for(volume, server))
        try:
            info = load(raw, blob, lambda t, n: say(f"loaded {t}: {n} rows"))
            # the volume object gave volume.chunk_size; the database's own must agree
            # (slot numbers are offsets // chunk size: another size reads wrong bytes)
            size = meta_rows.get(raw, "chunk_size")
            if size is None or size != str(volume.chunk_size):
                raise SnapshotError(f"{snap.name}: the snapshot's chunk size {size if size is not None else '(none)'} "
                                    f"differs from casfs-volume.json's {volume.chunk_size}: damaged or mixed up")
        finally:
            raw.close()
    finally:
        if server is not None:
            server.release()
    with connect(volume) as meta:
        db = meta.db
        meta_rows.delete_keys(db, _LOCAL_META)
        newest = max(s.generation for s in plan.snapshots)
        set_meta(db, {"drive_folder_id": folder_id, "drive_folder_key": cloud_mod.folder_key(cfg),
                      "snapshot_generation": str(newest), "snapshot_last_generation": str(snap.generation),
                      "snapshot_confirmed_at": _iso(snap.created),
                      "snapshot_ctime_mark": str(int(header.get("ctime_mark", 0))),
                      "snapshot_lacking_chunks": str(int(header.get("lacking_chunks", 0))),
                      "snapshot_object": snap.name})
        chunk_rows.mark_all_remote(db)
        pack_rows.pin_every_pack(db, snap.generation)
        for other in plan.snapshots:
            if other.generation == snap.generation:
                continue
            try:
                names = pack_names(_open_blob(objects, other, volume.uuid, keys))
            except SnapshotError as exc:
                # it cannot be read now, but may be later (or by hand): keep every pack of
                # the folder for it rather than fail the restore of the chosen one
                log.warning("generation %d cannot be read (%s): all packs of the folder kept for it",
                            other.generation, exc)
                say(f"warning: generation {other.generation} cannot be read ({exc}); every pack in the "
                    "folder is kept safe from gc for it")
                names = sorted({o.name for o in objects.list() if not is_backup_object(o.name)})
            for part in batches(names):
                _insert_pins(db, other.generation, list(part))
            say(f"kept the {len(names)} packs of generation {other.generation} safe from gc")
        lost = [c.hex() for c in chunk_rows.lacking(db)]
        live = chunk_rows.count_live(db)
        inodes = namespace_rows.inode_count(db)
        downloaded = downloaded_bytes = 0
        unreadable: list[str] = []
        failed: list[str] = []
        if eager:
            volume.chunk_dir.mkdir(parents=True, exist_ok=True)
            tier = cloud_mod.CloudTier(meta, objects, cfg)
            got = [0]

            def tick(n: int) -> None:
                got[0] += n
                if got[0] >= 8 << 20:
                    say(f"downloaded {got[0]} bytes of chunks")
                    got[0] = 0
            try:
                r = cloud_mod.restore(tier, everything=True, progress=chunk_progress or tick, on_total=chunk_total)
            finally:
                tier.close()
            downloaded, downloaded_bytes = r.restored, r.restored_bytes
            unreadable, failed = r.unreadable, r.failed_packs
            say(f"downloaded {downloaded} chunks ({downloaded_bytes} bytes)")
    return VolumeRestore(snap.generation, _iso(snap.created), info.rows, inodes, live, downloaded,
                         downloaded_bytes, lost, unreadable, failed)

