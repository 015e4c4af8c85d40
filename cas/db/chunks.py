"""The chunks table: one row per stored chunk, its refcount and its marks (schema.sql).

The statements of the dedup protocol between writers and gc (invariants 1-3 and 8,
docs/design.md; the protocol itself is in cas/chunks.py and cas/gc.py):

- :func:`lock_gaining` takes the X row lock of every chunk a transaction is about to
  reference, in id order (so two writers can only wait for each other, never deadlock
  over these rows); gc deletes a chunk's file and row only under the same lock.
- :func:`add_refs` and :func:`drop_refs` apply net refcount deltas in the caller's
  transaction, with the manifest change (invariant 2); ``zero_since`` records when a
  refcount reached 0 (gc's grace period counts from it).
- :func:`mark_bad` / :func:`mark_bad_if_local` / :func:`mark_rewritten`: a bad chunk
  gets no new reference until a write brings its bytes again (invariant 8).

Multi-row statements run in batches of BATCH_ROWS ids (cas.db.batch). Locks: InnoDB,
READ COMMITTED (see cas.db.namespace for the background).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from pymysql.cursors import Cursor

from .batch import batches, values
from .source import Source, rows


class ChunkState(NamedTuple):
    """What the dedup check needs of a chunk row: whether it is marked bad, whether its
    row says the local store has its file, and the file's envelope length (bytes; 0 =
    not recorded)."""

    id: bytes
    bad: bool
    is_local: bool
    stored_length: int


class LockedChunk(NamedTuple):
    """A chunk row read under its X lock by :func:`lock_gaining`: refcount (slots naming
    it), envelope length in bytes, bad mark."""

    refcount: int
    stored_length: int
    bad: bool


class ChunkRef(NamedTuple):
    """One refcount upsert of :func:`add_refs`: chunk ``id`` of ``length`` plaintext
    bytes and ``stored_length`` envelope bytes gains ``delta`` (> 0) references."""

    id: bytes
    length: int
    stored_length: int
    delta: int


def recorded(src: Source, ids: Iterable[bytes]) -> set[bytes]:
    """The ids among ``ids`` that have a chunk row, any refcount. No lock."""
    found: set[bytes] = set()
    for batch in batches(sorted(set(ids))):
        found.update(bytes(r[0]) for r in rows(src, "SELECT id FROM chunks WHERE id IN %s", (batch,)))
    return found


def states(src: Source, ids: Iterable[bytes]) -> list[ChunkState]:
    """The rows among ``ids`` that exist, for the dedup check before a flush's
    transaction (cas.chunks.ChunkManager.store_unknown). No lock: the check is repeated
    under the row lock (:func:`lock_gaining`) for every chunk at refcount 0."""
    out: list[ChunkState] = []
    for batch in batches(sorted(ids)):
        out.extend(ChunkState(bytes(c), bool(bad), bool(loc), int(slen)) for c, bad, loc, slen in rows(
            src, "SELECT id, bad, is_local, stored_length FROM chunks WHERE id IN %s", (batch,)))
    return out


def lock_gaining(cur: Cursor, ids: Sequence[bytes]) -> dict[bytes, LockedChunk]:
    """The rows of ``ids`` (sorted: the lock order) that exist, X-locking them (``FOR
    UPDATE``, in id order, one statement per BATCH_ROWS ids). Invariant 3: gc deletes a
    chunk only under this lock, so a chunk found here at refcount 0 either still has its
    file or the caller writes it again before committing. Raises ValueError when ``ids``
    are not sorted and distinct: every writer locks chunk rows in id order, so two
    writers never wait for each other in a cycle (docs/metadata.md, lock order)."""
    if any(a >= b for a, b in zip(ids, ids[1:])):
        raise ValueError("chunk ids must be sorted and distinct: the lock order")
    out: dict[bytes, LockedChunk] = {}
    for batch in batches(ids):
        for r in rows(cur, "SELECT id, refcount, stored_length, bad FROM chunks WHERE id IN %s "
                           "ORDER BY id FOR UPDATE", (batch,)):
            out[bytes(r[0])] = LockedChunk(int(r[1]), int(r[2]), bool(r[3]))
    return out


def add_refs(cur: Cursor, refs: Sequence[ChunkRef]) -> None:
    """Insert the rows of new chunks and add ``delta`` to the refcount of existing ones
    (clearing ``zero_since`` of a chunk that is referenced again). X-locks the rows
    (already locked by :func:`lock_gaining`: call that first). Invariant 2: in the
    transaction of the manifest change."""
    for batch in batches(refs):
        text, args = values(batch)
        cur.execute(
            "INSERT INTO chunks (id, length, stored_length, refcount) VALUES " + text
            + " ON DUPLICATE KEY UPDATE zero_since = IF(refcount + VALUES(refcount) > 0, NULL, zero_since),"
              " refcount = refcount + VALUES(refcount)", args)


def drop_refs(cur: Cursor, delta: int, ids: Sequence[bytes]) -> None:
    """Add ``delta`` (< 0) to the refcount of every chunk of ``ids``; a chunk reaching 0
    gets ``zero_since = NOW(6)`` (gc's grace period starts). X-locks the rows, in id
    order (``ids`` are sorted here). Invariant 2."""
    for batch in batches(sorted(ids)):
        cur.execute("UPDATE chunks SET zero_since = IF(refcount + %s <= 0, NOW(6), zero_since), "
                    "refcount = refcount + %s WHERE id IN %s", (delta, delta, batch))


def mark_rewritten(cur: Cursor, cid: bytes, stored_length: int) -> None:
    """Chunk ``cid``'s file was written again (it was bad, missing or collected): clear
    ``bad``, set ``is_local`` and its new envelope length (bytes). X-locks the row
    (locked already by :func:`lock_gaining`). Invariant 8: the write that brings a bad
    chunk's bytes again heals it."""
    cur.execute("UPDATE chunks SET bad = 0, is_local = 1, stored_length = %s WHERE id = %s", (stored_length, cid))


def mark_bad(cur: Cursor, ids: Sequence[bytes]) -> None:
    """Mark ``ids`` bad (their local file failed verification). X-locks the rows.
    Invariant 8."""
    for batch in batches(ids):
        cur.execute("UPDATE chunks SET bad = 1 WHERE id IN %s", (batch,))


def mark_bad_if_local(cur: Cursor, ids: Sequence[bytes]) -> None:
    """Mark bad those of ``ids`` whose row says the local store holds their file
    (``is_local = 1``) though it could not be read. X-locks the rows. Invariant 8."""
    for batch in batches(ids):
        cur.execute("UPDATE chunks SET bad = 1 WHERE is_local = 1 AND id IN %s", (batch,))


def queue_uploads(cur: Cursor, ids: Sequence[bytes]) -> None:
    """Queue ``ids`` for upload to the cloud tier (``upload_queue``, a table of the cloud
    tier's group: this is the one statement the chunk layer runs on it), in the
    transaction that creates (or heals) their chunk rows, so no pending upload is ever
    lost. ``INSERT IGNORE``: a chunk queued already stays as it is. X-locks the new
    queue records; the lock order is chunk rows first, then queue rows
    (docs/metadata.md)."""
    for batch in batches(ids):
        text, args = values([(cid,) for cid in batch])
        cur.execute("INSERT IGNORE INTO upload_queue (chunk) VALUES " + text, args)
