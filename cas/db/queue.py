"""The ``upload_queue`` table: chunks stored locally and not yet confirmed in the cloud.

A row is added in the transaction that creates its chunk row (cas.chunk.manager, when the
tier is enabled), or by :func:`queue_unconfirmed` / :func:`requeue`. An uploader
*claims* rows for a pack (:func:`claim`: ``FOR UPDATE SKIP LOCKED``, then
:func:`assign` writes the pack, offset and length into them); the rows leave with
:func:`delete_claims` in the transaction that confirms the pack, or go back to the
queue with :func:`release`. Invariant 5 (docs/design.md): a chunk is in at most one
pack being uploaded, and leaves the queue only when a confirmed pack holds it.

Lock order (docs/metadata-packs.md): chunk row, then its queue row (writers, gc);
queue rows, then the pack row (the uploader). Functions taking a cursor run in the
caller's transaction; those taking the Database are autocommitted reads.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

import pymysql.cursors

from cas.db.batch import batches, values

if TYPE_CHECKING:
    from cas.db.database import Database


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


def queue_unconfirmed(cur: pymysql.cursors.Cursor) -> int:
    """Queue every chunk that has no ``pack_entries`` row (``INSERT IGNORE``: rows already
    queued stay as they are). Returns the rows added. Reads chunks and pack_entries
    without locks; locks the queue rows it inserts. Used when the tier is enabled."""
    return int(cur.execute(
        "INSERT IGNORE INTO upload_queue (chunk) SELECT c.id FROM chunks c "
        "LEFT JOIN pack_entries p ON p.chunk = c.id WHERE p.chunk IS NULL"))


def enqueue(cur: pymysql.cursors.Cursor, chunks: Sequence[bytes]) -> None:
    """Queue ``chunks`` (new chunk rows, and bad ones just rewritten) in the transaction
    that creates or rewrites their chunk rows (cas.chunk.manager.ChunkManager.apply_deltas,
    with the tier enabled): no pending upload is ever lost (invariant 5). ``INSERT
    IGNORE``: rows already queued stay. The caller holds the chunk rows' locks (lock
    order chunk -> queue); locks the queue rows it inserts to its COMMIT. One statement
    per batch of :data:`cas.db.batch.BATCH_ROWS`."""
    for part in batches(chunks):
        sql, params = values([(c,) for c in part])
        cur.execute(f"INSERT IGNORE INTO upload_queue (chunk) VALUES {sql}", params)


def requeue(cur: pymysql.cursors.Cursor, chunk: bytes) -> None:
    """Queue ``chunk`` again (its cloud copy was found bad and forgotten); a row already
    there stays. The caller holds the chunk row's lock (lock order: chunk, queue)."""
    cur.execute("INSERT IGNORE INTO upload_queue (chunk) VALUES (%s)", (chunk,))


def dequeue(cur: pymysql.cursors.Cursor, chunk: bytes) -> None:
    """Delete ``chunk``'s queue row, claimed or not (gc collected the chunk, or its file
    is gone or bad: nothing to upload). Locks that row until the caller's COMMIT."""
    cur.execute("DELETE FROM upload_queue WHERE chunk = %s", (chunk,))


def backlog(db: Database, pack_age_us: int) -> Backlog:
    """:class:`Backlog` of the unclaimed rows (``pack IS NULL``), age measured against
    ``pack_age_us`` microseconds on the server's clock. No lock (READ COMMITTED)."""
    n, size, old = db.query(
        "SELECT COUNT(*), COALESCE(SUM(c.stored_length), 0), "
        "COALESCE(MIN(q.queued) <= NOW(6) - INTERVAL %s MICROSECOND, 0) "
        "FROM upload_queue q JOIN chunks c ON c.id = q.chunk WHERE q.pack IS NULL", (pack_age_us,))[0]
    return Backlog(int(n), int(size), bool(old))


def figures(db: Database) -> QueueFigures:
    """:class:`QueueFigures` of the whole queue. No lock."""
    n, size = db.query("SELECT COUNT(*), COALESCE(SUM(c.stored_length), 0) FROM upload_queue q "
                       "JOIN chunks c ON c.id = q.chunk")[0]
    oldest = db.query("SELECT COALESCE(TIMESTAMPDIFF(MICROSECOND, MIN(queued), NOW(6)), 0) "
                      "FROM upload_queue")[0][0]
    return QueueFigures(int(n), int(size), max(int(oldest), 0))


def drop_confirmed(cur: pymysql.cursors.Cursor) -> None:
    """Delete the unclaimed rows of chunks that already have a confirmed cloud copy (a
    ``pack_entries`` row: another uploader confirmed them first, or a healing write
    queued a chunk that was in a pack). Locks the rows it deletes. The first statement
    of a claim."""
    cur.execute("DELETE q FROM upload_queue q JOIN pack_entries e ON e.chunk = q.chunk "
                "WHERE q.pack IS NULL")


def claim(cur: pymysql.cursors.Cursor, limit: int) -> list[QueuedChunk]:
    """Up to ``limit`` unclaimed rows, oldest first (then by chunk id), each locked
    ``FOR UPDATE SKIP LOCKED``: rows another transaction holds (another uploader's
    claim under way, a writer's insert not yet committed) are skipped, never waited
    for, so two uploaders sharing the database never claim the same chunk
    (invariant 5). The locks last until the caller's COMMIT, which follows
    :func:`assign`."""
    cur.execute("SELECT chunk, queued FROM upload_queue WHERE pack IS NULL ORDER BY queued, chunk "
                "LIMIT %s FOR UPDATE SKIP LOCKED", (limit,))
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
