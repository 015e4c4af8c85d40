"""The chunks table: one row per stored chunk, its refcount and its marks (schema.sql).

The statements of the dedup protocol between writers and gc (invariants 1-3 and 8,
docs/design.md; the protocol itself is in cas/chunk/manager.py and cas/maint/gc.py):

- :func:`lock_gaining` takes the X row lock of every chunk a transaction is about to
  reference, in id order (so two writers can only wait for each other, never deadlock
  over these rows); gc deletes a chunk's file and row only under the same lock.
- :func:`add_refs` and :func:`drop_refs` apply net refcount deltas in the caller's
  transaction, with the manifest change (invariant 2); ``zero_since`` records when a
  refcount reached 0 (gc's grace period counts from it).
- :func:`mark_bad` / :func:`mark_bad_if_local` / :func:`mark_rewritten`: a bad chunk
  gets no new reference until a write brings its bytes again (invariant 8). The two
  bad marks take a cursor (the caller's transaction) or the Database (autocommitted).

Multi-row statements run in batches of BATCH_ROWS ids (cas.db.batch). Locks: InnoDB,
READ COMMITTED (see cas.db.namespace for the background).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple, TYPE_CHECKING

from pymysql.cursors import Cursor
import pymysql.cursors

from cas.db.batch import batches, values
from cas.db.source import Source, execute, rows

if TYPE_CHECKING:
    from cas.db.database import Database


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
    transaction (cas.chunk.manager.ChunkManager.store_unknown). No lock: the check is repeated
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
    """Chunk ``cid``'s file was written again and verifies (a writer brought its bytes
    again after it was bad, missing or collected; repair wrote a verified copy): clear
    ``bad``, set ``is_local`` and its new envelope length (bytes). X-locks the row
    (locked already by :func:`lock_gaining` or :func:`lock_exists`). Invariant 8: the
    write that brings a bad chunk's bytes again heals it."""
    cur.execute("UPDATE chunks SET bad = 0, is_local = 1, stored_length = %s WHERE id = %s", (stored_length, cid))


def mark_bad(src: Source, ids: Sequence[bytes]) -> None:
    """Mark ``ids`` bad (their local file failed verification or could not be read),
    one statement per batch: in the caller's transaction on a cursor, each batch
    autocommitted on the Database (scrub, repair). X-locks the rows, in id order, to
    the COMMIT. Invariant 8."""
    for batch in batches(sorted(ids)):
        execute(src, "UPDATE chunks SET bad = 1 WHERE id IN %s", (list(batch),))


def mark_bad_if_local(src: Source, ids: Sequence[bytes]) -> None:
    """Mark bad those of ``ids`` whose row still says the local store holds their file
    (``is_local = 1``) though it could not be read (an eviction meanwhile is no
    damage), as :func:`mark_bad` does (cursor or Database). X-locks the rows, in id
    order, to the COMMIT. Invariant 8."""
    for batch in batches(sorted(ids)):
        execute(src, "UPDATE chunks SET bad = 1 WHERE is_local = 1 AND id IN %s", (list(batch),))


# -- a shared volume: several local stores (docs/sharing.md, "Data") -----------------------
# chunks.is_local with several stores: 1 = some local store holds a file of the chunk
# that must be there (while the chunk is not confirmed in the cloud, the store its
# upload_queue row names holds its only copy); 0 = every read goes to the confirmed
# cloud copy. Which store holds a file is known to that store only (a stat), and for an
# unconfirmed chunk from its queue row; so a store that lacks a file never reads
# is_local = 1 as "my file is damaged" unless the queue row names that store.


class ChunkPlace(NamedTuple):
    """What the dedup check of a shared volume needs of a chunk row: the fields of
    :class:`ChunkState`, whether a confirmed cloud copy is recorded (a ``pack_entries``
    row), and the store whose queue row holds it (None: no queue row)."""

    id: bytes
    bad: bool
    is_local: bool
    stored_length: int
    confirmed: bool
    holder: str | None


def places(src: Source, ids: Iterable[bytes], first: str) -> list[ChunkPlace]:
    """:class:`ChunkPlace` of the rows among ``ids`` that exist (a queue row's NULL store
    read as ``first``). No lock: as :func:`states`, the check is repeated under the row
    lock for chunks at refcount 0."""
    out: list[ChunkPlace] = []
    for batch in batches(sorted(ids)):
        out.extend(ChunkPlace(bytes(c), bool(bad), bool(loc), int(slen), bool(conf), None if h is None else str(h))
                   for c, bad, loc, slen, conf, h in rows(
            src, "SELECT c.id, c.bad, c.is_local, c.stored_length, e.chunk IS NOT NULL, "
                 "IF(q.chunk IS NULL, NULL, COALESCE(q.store, %s)) FROM chunks c "
                 "LEFT JOIN pack_entries e ON e.chunk = c.id LEFT JOIN upload_queue q ON q.chunk = c.id "
                 "WHERE c.id IN %s", (first, batch)))
    return out


def mark_bad_if_held(src: Source, ids: Sequence[bytes], store: str, first: str) -> None:
    """Shared volume: mark bad those of ``ids`` whose queue row names store ``store``
    (NULL read as ``first``): that store's file is the chunk's only copy and it could
    not be read. A chunk held by another store, or confirmed, is not damaged because
    this store lacks it. Cursor or Database, as :func:`mark_bad`. X-locks the rows to
    the COMMIT. Invariant 8."""
    for batch in batches(sorted(ids)):
        execute(src, "UPDATE chunks c JOIN upload_queue q ON q.chunk = c.id SET c.bad = 1 "
                     "WHERE c.id IN %s AND COALESCE(q.store, %s) = %s", (list(batch), first, store))


def confirmed_among(db: Database, ids: Sequence[bytes]) -> set[bytes]:
    """The ids among ``ids`` that have a confirmed cloud copy (a ``pack_entries`` row of a
    confirmed pack): a shared mount's evictor may delete its files of them. No lock."""
    out: set[bytes] = set()
    for part in batches(sorted(set(ids))):
        out.update(bytes(r[0]) for r in db.query(
            "SELECT e.chunk FROM pack_entries e JOIN packs p ON p.id = e.pack "
            "WHERE p.state = 'confirmed' AND e.chunk IN %s", (list(part),)))
    return out


def lock_confirmed(cur: pymysql.cursors.Cursor, ids: Sequence[bytes]) -> list[bytes]:
    """Those of ``ids`` still located in a pack, each chunk row under an exclusive row
    lock (``FOR UPDATE SKIP LOCKED``, in id order, to the caller's COMMIT): a shared
    mount's evictor deletes its files of them after the COMMIT, without touching
    ``is_local`` (other stores keep theirs). Skips rows others hold, as
    :func:`lock_evictable`."""
    out: list[bytes] = []
    for part in batches(sorted(set(ids))):
        cur.execute("SELECT c.id FROM chunks c JOIN pack_entries e ON e.chunk = c.id "
                    "WHERE c.id IN %s ORDER BY c.id FOR UPDATE SKIP LOCKED", (list(part),))
        out.extend(bytes(r[0]) for r in cur.fetchall())
    return out


# -- used by gc, the cloud tier and maintenance
# The statements on the ``chunks`` table that gc (cas.maint.gc), the cloud tier (cas.tier.cloud:
# eviction, local marks, restore), scrub, repair, fsck and snapshots run. Lock order
# and transaction scopes: docs/metadata-packs.md. A function taking a cursor runs in
# the caller's transaction; one taking the Database is autocommitted (reads: no lock).


class GcRow(NamedTuple):
    """A gc candidate read under its row lock: refcount, envelope bytes, and whether its
    refcount has been 0 for longer than the grace period (server clock)."""

    refcount: int
    stored_length: int
    expired: bool


class StoredChunk(NamedTuple):
    """A chunk id and its envelope bytes in the local store."""

    id: bytes
    stored_length: int


class CloudCopy(NamedTuple):
    """A chunk's confirmed cloud copy: pack row id, offset and length in it (bytes), the
    pack's object id, size (bytes) and name."""

    pack: int
    pos: int
    length: int
    object_id: str
    pack_size: int
    pack_name: str


class ChunkCopies(NamedTuple):
    """Where a chunk (local, or live) may be read from, for ``casfs restore``: its local
    mark, and its confirmed cloud copy (None without one)."""

    id: bytes
    is_local: bool
    cloud: CloudCopy | None


class LiveChunk(NamedTuple):
    """A referenced chunk for fsck: id, whether it has a cloud copy (a ``pack_entries``
    row), its local mark and its bad mark."""

    id: bytes
    in_cloud: bool
    is_local: bool
    bad: bool


class RefcountMismatch(NamedTuple):
    """A chunk whose stored refcount differs from the manifest slots naming it."""

    chunk: bytes
    stored: int
    actual: int


class LocalTotals(NamedTuple):
    """Chunks marked local and their envelope bytes."""

    chunks: int
    bytes: int


# gc (cas.maint.gc.collect): invariant 3 of docs/design.md

def collectable(db: Database, grace_us: int) -> list[bytes]:
    """Ids of chunks at refcount <= 0 for longer than ``grace_us`` microseconds (server
    clock). No lock: :func:`lock_for_gc` decides again under the row lock."""
    return [bytes(r[0]) for r in db.query(
        "SELECT id FROM chunks WHERE refcount <= 0 AND zero_since <= NOW(6) - INTERVAL %s MICROSECOND",
        (grace_us,))]


def lock_for_gc(cur: pymysql.cursors.Cursor, chunk: bytes, grace_us: int) -> GcRow | None:
    """``chunk``'s :class:`GcRow` under its exclusive row lock (``FOR UPDATE``), or None
    when the row is gone. A writer's new reference takes the same lock, so it commits
    before this read (refcount > 0) or after the caller's delete (and rewrites the
    file): invariant 3."""
    cur.execute("SELECT refcount, stored_length, zero_since <= NOW(6) - INTERVAL %s MICROSECOND "
                "FROM chunks WHERE id = %s FOR UPDATE", (grace_us, chunk))
    row = cur.fetchone()
    return None if row is None else GcRow(int(row[0]), int(row[1]), bool(row[2]))


def delete_row(cur: pymysql.cursors.Cursor, chunk: bytes) -> None:
    """Delete ``chunk``'s row (the caller holds its lock: :func:`lock_for_gc`, or the
    placeholder it inserted)."""
    cur.execute("DELETE FROM chunks WHERE id = %s", (chunk,))


def insert_placeholder(cur: pymysql.cursors.Cursor, chunk: bytes) -> bool:
    """Insert a placeholder row for an orphan file's id (refcount 0, sizes 0), holding
    the row lock a writer recording that id would take; False when a row exists (a
    writer recorded it meanwhile). The caller deletes it again in the same
    transaction (invariant 3, orphan sweep)."""
    cur.execute("INSERT IGNORE INTO chunks (id, length, stored_length, refcount, zero_since) "
                "VALUES (%s, 0, 0, 0, NOW(6))", (chunk,))
    return int(cur.rowcount) == 1


# the cloud tier (cas.tier.cloud): local marks, eviction, restore

def exists(cur: pymysql.cursors.Cursor, chunk: bytes) -> bool:
    """Whether ``chunk`` has a row: a plain read in the caller's transaction, no lock."""
    cur.execute("SELECT 1 FROM chunks WHERE id = %s", (chunk,))
    return cur.fetchone() is not None


def mark_local(db: Database, ids: Sequence[bytes]) -> None:
    """Record ``is_local = 1`` for ``ids`` (fetched chunks kept locally again), one
    autocommitted statement per batch. Locks each batch's rows only for its own statement. Serves
    eviction: a chunk marked local is a candidate again."""
    for part in batches(ids):
        db.execute("UPDATE chunks SET is_local = 1 WHERE id IN %s", (list(part),))


def mark_remote(db: Database, chunk: bytes) -> None:
    """Record ``is_local = 0`` for ``chunk`` (its file is missing; reads fetch it from
    its cloud copy). Autocommitted. Locks the row for that statement only."""
    db.execute("UPDATE chunks SET is_local = 0 WHERE id = %s", (chunk,))


def mark_all_remote(db: Database) -> None:
    """Record ``is_local = 0`` for every chunk (a volume restored from a snapshot has no
    local files yet). Autocommitted. Locks every chunk row for that one statement (the restored
    volume is not mounted yet)."""
    db.execute("UPDATE chunks SET is_local = 0")


def local_bytes(db: Database) -> int:
    """Envelope bytes of the chunks marked local. No lock."""
    return int(db.query("SELECT COALESCE(SUM(stored_length), 0) FROM chunks WHERE is_local = 1")[0][0])


def evictable(db: Database, limit: int) -> list[StoredChunk]:
    """Up to ``limit`` chunks marked local that have a confirmed cloud copy. No lock:
    :func:`lock_evictable` decides under the row locks."""
    return [StoredChunk(bytes(c), int(n)) for c, n in db.query(
        "SELECT c.id, c.stored_length FROM chunks c JOIN pack_entries e ON e.chunk = c.id "
        "JOIN packs p ON p.id = e.pack WHERE c.is_local = 1 AND p.state = 'confirmed' LIMIT %s", (limit,))]


def lock_evictable(cur: pymysql.cursors.Cursor, ids: Sequence[bytes]) -> list[bytes]:
    """Those of ``ids`` (any order: the caller's LFU order) still marked local and still
    located in a pack, each chunk row and its ``pack_entries`` row under an exclusive
    row lock (``FOR UPDATE SKIP LOCKED``, to the caller's COMMIT), in id order, one
    statement per BATCH_ROWS ids. Rows another transaction holds (a writer's group
    gaining references, gc, a pack confirmation) are skipped, not waited for: eviction
    is opportunistic (a skipped chunk stays local until a later round), so the evictor
    never waits for a lock and can never close a lock cycle with the mount's group
    transaction (docs/metadata.md, lock order). A chunk is evicted only while its
    confirmed copy is recorded (invariant 5)."""
    out: list[bytes] = []
    for part in batches(sorted(set(ids))):
        cur.execute("SELECT c.id FROM chunks c JOIN pack_entries e ON e.chunk = c.id "
                    "WHERE c.id IN %s AND c.is_local = 1 ORDER BY c.id FOR UPDATE SKIP LOCKED", (list(part),))
        out.extend(bytes(r[0]) for r in cur.fetchall())
    return out


def mark_evicted(cur: pymysql.cursors.Cursor, ids: Sequence[bytes]) -> None:
    """Record ``is_local = 0`` for ``ids`` (locked by :func:`lock_evictable`); the files
    are deleted after the COMMIT."""
    for part in batches(ids):
        cur.execute("UPDATE chunks SET is_local = 0 WHERE id IN %s", (list(part),))


def copies(db: Database) -> list[ChunkCopies]:
    """:class:`ChunkCopies` of every chunk that is referenced or marked local. No lock."""
    return [ChunkCopies(bytes(c), bool(loc),
                        None if oid is None else CloudCopy(int(pk), int(pos), int(n), str(oid), int(ps), str(pn)))
            for c, loc, pk, pos, n, oid, ps, pn in db.query(
                "SELECT c.id, c.is_local, e.pack, e.pos, e.length, p.object_id, p.size, p.name "
                "FROM chunks c LEFT JOIN pack_entries e ON e.chunk = c.id "
                "LEFT JOIN packs p ON p.id = e.pack AND p.state = 'confirmed' "
                "WHERE c.refcount > 0 OR c.is_local = 1")]


# bad marks: scrub, repair, the uploader (invariant 8 of docs/design.md; the marks
# themselves: mark_bad, mark_bad_if_local, mark_rewritten above)

def is_local(db: Database, chunk: bytes) -> bool:
    """Whether ``chunk``'s row says ``is_local = 1`` (False without a row). No lock."""
    return bool(db.query("SELECT 1 FROM chunks WHERE id = %s AND is_local = 1", (chunk,)))


def lock_is_local(cur: pymysql.cursors.Cursor, chunk: bytes) -> bool | None:
    """``chunk``'s local mark under its exclusive row lock (``FOR UPDATE``), or None
    without a row (collected)."""
    cur.execute("SELECT is_local FROM chunks WHERE id = %s FOR UPDATE", (chunk,))
    row = cur.fetchone()
    return None if row is None else bool(row[0])


def lock_exists(cur: pymysql.cursors.Cursor, chunk: bytes) -> bool:
    """Whether ``chunk`` has a row, taking its exclusive lock (``FOR UPDATE``) when it
    does: gc cannot delete it before the caller's COMMIT."""
    cur.execute("SELECT 1 FROM chunks WHERE id = %s FOR UPDATE", (chunk,))
    return cur.fetchone() is not None


def clear_bad(cur: pymysql.cursors.Cursor, chunk: bytes) -> None:
    """Clear ``chunk``'s bad mark (its local file verifies). Caller holds the row lock."""
    cur.execute("UPDATE chunks SET bad = 0 WHERE id = %s", (chunk,))


def bad_referenced(db: Database) -> list[bytes]:
    """Ids of referenced chunks marked bad. No lock."""
    return [bytes(r[0]) for r in db.query("SELECT id FROM chunks WHERE bad = 1 AND refcount > 0")]


def local_totals_after(db: Database, after: bytes) -> LocalTotals:
    """Chunks marked local with an id above ``after``, and their bytes. No lock."""
    n, size = db.query("SELECT COUNT(*), COALESCE(SUM(stored_length), 0) FROM chunks "
                       "WHERE is_local = 1 AND id > %s", (after,))[0]
    return LocalTotals(int(n), int(size))


def local_after(db: Database, after: bytes, limit: int) -> list[StoredChunk]:
    """Up to ``limit`` chunks marked local with an id above ``after``, by id (scrub's
    cursor). No lock."""
    return [StoredChunk(bytes(c), int(n)) for c, n in db.query(
        "SELECT id, stored_length FROM chunks WHERE is_local = 1 AND id > %s ORDER BY id LIMIT %s",
        (after, limit))]


# fsck (cas.maint.fsck.check, in its REPEATABLE READ snapshot)

def refcount_mismatches(cur: pymysql.cursors.Cursor) -> list[RefcountMismatch]:
    """Chunks whose refcount differs from the manifest slots naming them (invariant 2).
    A plain read of the caller's snapshot. No lock."""
    cur.execute("SELECT c.id, c.refcount, COUNT(m.chunk) FROM chunks c "
                "LEFT JOIN manifests m ON m.chunk = c.id GROUP BY c.id, c.refcount "
                "HAVING c.refcount <> COUNT(m.chunk)")
    return [RefcountMismatch(bytes(r[0]), int(r[1]), int(r[2])) for r in cur.fetchall()]


def live(cur: pymysql.cursors.Cursor) -> list[LiveChunk]:
    """:class:`LiveChunk` of every referenced chunk. A plain read of the caller's snapshot. No lock."""
    cur.execute("SELECT c.id, e.chunk IS NOT NULL, c.is_local, c.bad FROM chunks c "
                "LEFT JOIN pack_entries e ON e.chunk = c.id WHERE c.refcount > 0")
    return [LiveChunk(bytes(r[0]), bool(r[1]), bool(r[2]), bool(r[3])) for r in cur.fetchall()]


def all_ids(cur: pymysql.cursors.Cursor) -> set[bytes]:
    """Every chunk id. A plain read of the caller's snapshot. No lock."""
    cur.execute("SELECT id FROM chunks")
    return {bytes(r[0]) for r in cur.fetchall()}


def recount(cur: pymysql.cursors.Cursor, chunk: bytes) -> None:
    """Set ``chunk``'s refcount to the manifest slots naming it (zero_since set when that
    is 0 and it was not, cleared otherwise). ``fsck --repair``, volume unmounted. Locks the chunk
    row (exclusive) to the caller's COMMIT. Invariant 2."""
    cur.execute("UPDATE chunks SET refcount = (SELECT COUNT(*) FROM manifests WHERE chunk = %s), "
                "zero_since = IF((SELECT COUNT(*) FROM manifests WHERE chunk = %s) = 0, "
                "COALESCE(zero_since, NOW(6)), NULL) WHERE id = %s", (chunk, chunk, chunk))


# snapshots (cas.tier.snapshot)

def count_lacking(cur: pymysql.cursors.Cursor) -> int:
    """Referenced chunks with no cloud copy (a plain read of the caller's snapshot). No lock."""
    cur.execute("SELECT COUNT(*) FROM chunks c LEFT JOIN pack_entries e ON e.chunk = c.id "
                "WHERE c.refcount > 0 AND e.chunk IS NULL")
    return int(cur.fetchone()[0])


def lacking(db: Database) -> list[bytes]:
    """Ids of referenced chunks with no cloud copy. No lock."""
    return [bytes(r[0]) for r in db.query(
        "SELECT c.id FROM chunks c LEFT JOIN pack_entries e ON e.chunk = c.id "
        "WHERE c.refcount > 0 AND e.chunk IS NULL")]


def count_live(db: Database) -> int:
    """Referenced chunks. No lock."""
    return int(db.query("SELECT COUNT(*) FROM chunks WHERE refcount > 0")[0][0])
