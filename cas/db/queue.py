"""The ``upload_queue`` table: chunks stored locally and not yet confirmed in the cloud.

A row is added in the transaction that creates its chunk row (cas.chunk.manager, when the
tier is enabled), or by :func:`queue_unconfirmed` / :func:`requeue`. An uploader
*claims* rows for a pack (:func:`claim`: ``FOR UPDATE SKIP LOCKED``, then
:func:`assign` writes the pack, offset and length into them); the rows leave with
:func:`delete_claims` in the transaction that confirms the pack, or go back to the
queue with :func:`release`. Invariant 5 (docs/design.md): a chunk is in at most one
pack being uploaded, and leaves the queue only when a confirmed pack holds it.

Stores (schema 5, docs/sharing.md "Data"): every row names the local chunk store that
holds the chunk's bytes until the upload (``store``, cas.config.volume.Volume.store);
rows queued before schema 5 have NULL, which means the volume's first store (the one
whose id is the volume uuid's hex). An uploader sees and claims only the rows of its
own store (:class:`Scope`): another machine's bytes are not in its store.

Lock order (docs/metadata-packs.md): chunk row, then its queue row (writers, gc);
queue rows, then the pack row (the uploader). Functions taking a cursor run in the
caller's transaction; those taking the Database are autocommitted reads.
"""
from __future__ import annotations

from collections.abc import Sequence
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

import pymysql.cursors

from cas.db.batch import batches, values
from cas.db.source import Source, rows

if TYPE_CHECKING:
    from cas.db.database import Database


def first_store(volume_uuid: str) -> str:
    """The id of a volume's first store (the one ``casfs init`` made): the hex digits
    of its uuid (cas.config.volume.Volume.store). Queue rows with a NULL store are its.
    No statement, no lock."""
    return uuid.UUID(volume_uuid).hex


class Scope(NamedTuple):
    """The queue rows one local store owns: ``store`` (32 hex, this side's
    cas.config.volume.Volume.store) and ``first`` (the volume's first store: the volume
    uuid's hex, which also owns the rows whose store is NULL)."""

    store: str
    first: str

    @classmethod
    def of(cls, volume_uuid: str, store: str) -> "Scope":
        """The scope of store ``store`` of the volume with uuid ``volume_uuid``."""
        return cls(store, first_store(volume_uuid))

    def where(self, alias: str = "") -> tuple[str, tuple[str, ...]]:
        """An SQL condition (and its parameter) selecting this store's rows of
        ``upload_queue`` (``alias``: the table's alias with its dot, or "")."""
        if self.store == self.first:
            return f"({alias}store = %s OR {alias}store IS NULL)", (self.store,)
        return f"{alias}store = %s", (self.store,)


class StoreQueue(NamedTuple):
    """The queue rows of one store (NULL counted as the first store's): store id, rows,
    rows claimed for a pack, envelope bytes."""

    store: str
    chunks: int
    claimed: int
    bytes: int


class QueuedChunk(NamedTuple):
    """A claimed queue row: chunk id and when it was queued (server time)."""

    chunk: bytes
    queued: datetime


class Placement(NamedTuple):
    """Where a claimed chunk goes in its pack: chunk id, offset and length in bytes."""

    chunk: bytes
    pos: int
    length: int


class Backlog(NamedTuple):
    """The unclaimed queue: rows, envelope bytes (``chunks.stored_length``), and whether
    its oldest row is older than the pack age asked for."""

    chunks: int
    bytes: int
    old: bool


class QueueFigures(NamedTuple):
    """The whole queue (claimed or not) for ``casfs drive status``: rows, envelope
    bytes, and the age of its oldest row in microseconds (0 when empty)."""

    chunks: int
    bytes: int
    oldest_us: int


def queue_unconfirmed(cur: pymysql.cursors.Cursor, store: str | None = None) -> int:
    """Queue every chunk that has no ``pack_entries`` row (``INSERT IGNORE``: rows already
    queued stay as they are), as held by store ``store`` (the store of the side that
    enables the tier; None: NULL, the first store). Returns the rows added. Reads
    chunks and pack_entries without locks; locks the queue rows it inserts. Used when
    the tier is enabled."""
    return int(cur.execute(
        "INSERT IGNORE INTO upload_queue (chunk, store) SELECT c.id, %s FROM chunks c "
        "LEFT JOIN pack_entries p ON p.chunk = c.id WHERE p.chunk IS NULL", (store,)))


def unqueued_unconfirmed(src: Source) -> list[bytes]:
    """The chunks with neither a ``pack_entries`` row nor a queue row (nothing confirms
    or will upload them), by id: on a shared volume each side queues those whose file
    its store holds (cas.tier.cloud.queue_held; docs/sharing.md, "Data"). A plain read
    (cursor: the caller's snapshot; Database: no lock)."""
    return [bytes(r[0]) for r in rows(
        src, "SELECT c.id FROM chunks c LEFT JOIN pack_entries p ON p.chunk = c.id "
             "LEFT JOIN upload_queue q ON q.chunk = c.id WHERE p.chunk IS NULL AND q.chunk IS NULL "
             "ORDER BY c.id")]


def enqueue_existing(cur: pymysql.cursors.Cursor, chunks: Sequence[bytes], store: str) -> int:
    """Queue those of ``chunks`` that still have a chunk row and no ``pack_entries`` row
    as held by ``store`` (``INSERT IGNORE``: rows already queued stay). Takes a shared
    lock on each chunk row first (lock order chunk -> queue, so gc, which deletes the row
    under its exclusive lock, never leaves a queue row behind), to the caller's COMMIT.
    Returns the rows added. One pair of statements per batch."""
    added = 0
    for part in batches(sorted(chunks)):
        cur.execute("SELECT id FROM chunks WHERE id IN %s ORDER BY id LOCK IN SHARE MODE", (list(part),))
        live = [bytes(r[0]) for r in cur.fetchall()]
        if not live:
            continue
        added += int(cur.execute(
            "INSERT IGNORE INTO upload_queue (chunk, store) SELECT c.id, %s FROM chunks c "
            "LEFT JOIN pack_entries p ON p.chunk = c.id WHERE c.id IN %s AND p.chunk IS NULL",
            (store, live)))
    return added


def others_unclaimed(src: Source, scope: Scope) -> list[bytes]:
    """The chunks whose unclaimed queue row names a store other than ``scope``'s, by
    id (a shared mount adopts those whose file its store holds: cas.tier.cloud.queue_held).
    A plain read (cursor: the caller's snapshot; Database: no lock)."""
    cond, args = scope.where()
    return [bytes(r[0]) for r in rows(
        src, f"SELECT chunk FROM upload_queue WHERE pack IS NULL AND NOT {cond} ORDER BY chunk", args)]


def adopt(cur: pymysql.cursors.Cursor, chunks: Sequence[bytes], store: str) -> int:
    """Make ``store`` the holder of the unclaimed queue rows of ``chunks`` (its files
    are there; the store the rows named may lack them). A row another uploader has
    claimed meanwhile is left alone (``pack IS NULL``; its claim holds the row lock, so
    this waits for that COMMIT). Locks the rows it changes. Returns the rows changed."""
    n = 0
    for part in batches(sorted(chunks)):
        n += int(cur.execute("UPDATE upload_queue SET store = %s WHERE chunk IN %s AND pack IS NULL",
                             (store, list(part))))
    return n


def unclaimed_ids(src: Source, scope: Scope) -> list[bytes]:
    """The chunk ids of ``scope``'s unclaimed queue rows. A plain read, no lock."""
    cond, args = scope.where()
    return [bytes(r[0]) for r in rows(src, f"SELECT chunk FROM upload_queue WHERE pack IS NULL AND {cond}", args)]


def to_back(cur: pymysql.cursors.Cursor, chunk: bytes) -> None:
    """Move ``chunk``'s unclaimed queue row to the back of the queue (``queued`` = now,
    server time): a shared volume's uploader keeps a row whose file its store lacks
    rather than dropping it (docs/sharing.md, "Data"), without letting it hold up the
    rows behind it. Locks the row (the caller's claim holds it already)."""
    cur.execute("UPDATE upload_queue SET queued = NOW(6) WHERE chunk = %s AND pack IS NULL", (chunk,))


def enqueue(cur: pymysql.cursors.Cursor, chunks: Sequence[bytes], store: str | None = None) -> None:
    """Queue ``chunks`` (new chunk rows, and bad ones just rewritten) in the transaction
    that creates or rewrites their chunk rows (cas.chunk.manager.ChunkManager.apply_deltas,
    with the tier enabled): no pending upload is ever lost (invariant 5). ``INSERT
    IGNORE``: rows already queued stay (another store's row keeps naming that store: its
    bytes go to the cloud from there, once). ``store``: the local store that holds the
    new files (the writer's Volume.store; None writes NULL, the first store). The caller
    holds the chunk rows' locks (lock order chunk -> queue); locks the queue rows it
    inserts to its COMMIT. One statement per batch of :data:`cas.db.batch.BATCH_ROWS`."""
    for part in batches(chunks):
        sql, params = values([(c, store) for c in part])
        cur.execute(f"INSERT IGNORE INTO upload_queue (chunk, store) VALUES {sql}", params)


def requeue(cur: pymysql.cursors.Cursor, chunk: bytes, store: str | None = None) -> None:
    """Queue ``chunk`` again (its cloud copy was found bad and forgotten) as held by
    ``store`` (the store whose verified file will be uploaded; None: NULL, the first
    store); a row already there stays. The caller holds the chunk row's lock (lock
    order: chunk, queue)."""
    cur.execute("INSERT IGNORE INTO upload_queue (chunk, store) VALUES (%s, %s)", (chunk, store))


def dequeue(cur: pymysql.cursors.Cursor, chunk: bytes) -> None:
    """Delete ``chunk``'s queue row, claimed or not (gc collected the chunk, or its file
    is gone or bad: nothing to upload). Locks that row until the caller's COMMIT."""
    cur.execute("DELETE FROM upload_queue WHERE chunk = %s", (chunk,))


def backlog(db: Database, pack_age_us: int, scope: Scope | None = None) -> Backlog:
    """:class:`Backlog` of the unclaimed rows (``pack IS NULL``) of ``scope``'s store
    (None: every store), age measured against ``pack_age_us`` microseconds on the
    server's clock. No lock (READ COMMITTED)."""
    cond, args = scope.where("q.") if scope is not None else ("1", ())
    n, size, old = db.query(
        "SELECT COUNT(*), COALESCE(SUM(c.stored_length), 0), "
        "COALESCE(MIN(q.queued) <= NOW(6) - INTERVAL %s MICROSECOND, 0) "
        f"FROM upload_queue q JOIN chunks c ON c.id = q.chunk WHERE q.pack IS NULL AND {cond}",
        (pack_age_us, *args))[0]
    return Backlog(int(n), int(size), bool(old))


def figures(db: Database) -> QueueFigures:
    """:class:`QueueFigures` of the whole queue. No lock."""
    n, size = db.query("SELECT COUNT(*), COALESCE(SUM(c.stored_length), 0) FROM upload_queue q "
                       "JOIN chunks c ON c.id = q.chunk")[0]
    oldest = db.query("SELECT COALESCE(TIMESTAMPDIFF(MICROSECOND, MIN(queued), NOW(6)), 0) "
                      "FROM upload_queue")[0][0]
    return QueueFigures(int(n), int(size), max(int(oldest), 0))


def drop_confirmed(cur: pymysql.cursors.Cursor, scope: Scope | None = None) -> None:
    """Delete the unclaimed rows (of ``scope``'s store; None: every store) of chunks
    that already have a confirmed cloud copy (a ``pack_entries`` row: another uploader
    confirmed them first, or a healing write queued a chunk that was in a pack). Locks
    the rows it deletes. The first statement of a claim."""
    cond, args = scope.where("q.") if scope is not None else ("1", ())
    cur.execute("DELETE q FROM upload_queue q JOIN pack_entries e ON e.chunk = q.chunk "
                f"WHERE q.pack IS NULL AND {cond}", args)


def claim(cur: pymysql.cursors.Cursor, limit: int, scope: Scope | None = None) -> list[QueuedChunk]:
    """Up to ``limit`` unclaimed rows of ``scope``'s store (None: any store: tests and
    tools), oldest first (then by chunk id), each locked
    ``FOR UPDATE SKIP LOCKED``: rows another transaction holds (another uploader's
    claim under way, a writer's insert not yet committed) are skipped, never waited
    for, so two uploaders sharing the database never claim the same chunk
    (invariant 5). The locks last until the caller's COMMIT, which follows
    :func:`assign`."""
    cond, args = scope.where() if scope is not None else ("1", ())
    cur.execute(f"SELECT chunk, queued FROM upload_queue WHERE pack IS NULL AND {cond} ORDER BY queued, chunk "
                "LIMIT %s FOR UPDATE SKIP LOCKED", (*args, limit))
    return [QueuedChunk(bytes(c), q) for c, q in cur.fetchall()]


def assign(cur: pymysql.cursors.Cursor, pack: int, layout: Sequence[Placement]) -> None:
    """Write pack ``pack`` and each chunk's offset and length into the claimed rows of
    ``layout`` (one UPDATE per row, on rows the caller's :func:`claim` locked)."""
    for p in layout:
        cur.execute("UPDATE upload_queue SET pack = %s, pos = %s, length = %s WHERE chunk = %s",
                    (pack, p.pos, p.length, p.chunk))


def release(cur: pymysql.cursors.Cursor, pack: int) -> None:
    """Give pack ``pack``'s claims back to the queue (pack, pos, length NULL). Locks
    those rows; the caller then deletes the 'uploading' pack row (lock order: queue,
    pack)."""
    cur.execute("UPDATE upload_queue SET pack = NULL, pos = NULL, length = NULL WHERE pack = %s", (pack,))


def delete_claims(cur: pymysql.cursors.Cursor, pack: int) -> None:
    """Delete pack ``pack``'s claimed rows: the last statement of the confirmation, after
    :func:`cas.db.packs.enter_claimed` gave them their locations (invariant 5). Locks the rows it
    deletes (the caller's claim holds them already, or a recovery under the pack row's lock)."""
    cur.execute("DELETE FROM upload_queue WHERE pack = %s", (pack,))


# -- stores (docs/sharing.md, "Data") -------------------------------------------------------

def claimed_any(db: Database, scope: Scope) -> bool:
    """Whether some row of ``scope``'s store is claimed for a pack (an upload of that
    store not settled yet). No lock."""
    cond, args = scope.where()
    return bool(db.query(f"SELECT 1 FROM upload_queue WHERE pack IS NOT NULL AND {cond} LIMIT 1", args))


def holder(db: Database, chunk: bytes, first: str) -> str | None:
    """The store whose queue row holds ``chunk`` (NULL read as ``first``), or None when
    it has no queue row (confirmed, collected, or the tier is off). No lock."""
    got = db.query("SELECT COALESCE(store, %s) FROM upload_queue WHERE chunk = %s", (first, chunk))
    return None if not got else str(got[0][0])


def pack_store(db: Database, pack: int, first: str) -> str | None:
    """The store of the rows claimed for pack ``pack`` (NULL read as ``first``; an
    uploader claims only its own store's rows, so a pack has one), or None when no row
    names the pack any more. No lock."""
    got = db.query("SELECT COALESCE(store, %s) FROM upload_queue WHERE pack = %s LIMIT 1", (first, pack))
    return None if not got else str(got[0][0])


def per_store(src: Source, first: str) -> list[StoreQueue]:
    """:class:`StoreQueue` of every store with queue rows, by store id (fsck). On a
    cursor: a plain read of the caller's snapshot; on the Database: no lock."""
    return [StoreQueue(str(s), int(n), int(c), int(b)) for s, n, c, b in rows(
        src, "SELECT COALESCE(q.store, %s) s, COUNT(*), COALESCE(SUM(q.pack IS NOT NULL), 0), "
             "COALESCE(SUM(c.stored_length), 0) FROM upload_queue q LEFT JOIN chunks c ON c.id = q.chunk "
             "GROUP BY s ORDER BY s", (first,))]


def session_stores(src: Source) -> set[str]:
    """The stores named by a row of ``sessions`` (live or not yet reaped): the stores
    some mount serves or served lately (fsck tells a queue row of a store no session
    names). A plain read (cursor: the caller's snapshot; Database: no lock)."""
    return {str(r[0]) for r in rows(src, "SELECT DISTINCT store FROM sessions")}


def holders(src: Source, first: str) -> dict[bytes, str]:
    """chunk id -> the store its queue row names (NULL read as ``first``), for every
    queue row of a referenced chunk (fsck on a shared volume). A plain read, no lock
    (cursor: the caller's snapshot)."""
    return {bytes(c): str(s) for c, s in rows(
        src, "SELECT q.chunk, COALESCE(q.store, %s) FROM upload_queue q JOIN chunks c ON c.id = q.chunk "
             "WHERE c.refcount > 0", (first,))}
