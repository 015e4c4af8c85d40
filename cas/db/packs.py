"""The cloud tier's pack tables: ``packs``, ``pack_entries`` and ``snapshot_packs``.

- ``packs``: one row per pack object, 'uploading' (owned by one uploader until its
  lease ends) or 'confirmed' (the store's size and md5 equal ours; object_id set).
- ``pack_entries``: where a chunk's confirmed cloud copy is (pack, offset, length);
  one row per chunk at most, written only by the COMMIT that confirms a pack (so an
  entry always names a confirmed pack: invariant 5 of docs/design.md, and what
  metadata snapshots rely on, docs/backup.md).
- ``snapshot_packs``: the packs (by name) a kept snapshot generation names; gc never
  deletes or rewrites a pack named here.

Lock order (docs/metadata-packs.md): chunk row -> queue rows -> pack row -> entry rows.
The uploader locks queue rows and then its pack row; gc locks one pack row
(``FOR UPDATE``) and then reads its entries and pins; a snapshot pins under shared
locks on the pack rows it names (``LOCK IN SHARE MODE``), so gc's delete of a pack row
and a pin of it serialize. Functions taking a cursor run in the caller's transaction;
those taking the Database are autocommitted statements (reads take no lock).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import pymysql.cursors

from cas.db.batch import batches, values

if TYPE_CHECKING:
    from cas.db.database import Database


class PackClaim(NamedTuple):
    """A pack row read under its lock: its state ('uploading' / 'confirmed') and owner
    (host:pid:token; None once confirmed)."""

    state: str
    owner: str | None


class Checksums(NamedTuple):
    """What an 'uploading' pack row says its object must be: bytes, md5 and sha256
    (raw digests; zero digests: not built yet)."""

    size: int
    md5: bytes
    sha256: bytes


class UploadingPack(NamedTuple):
    """An 'uploading' pack: id, name, owner (None: none recorded) and whether its lease
    has expired (server clock)."""

    id: int
    name: str
    owner: str | None
    expired: bool


class PackFigures(NamedTuple):
    """For ``casfs drive status``: packs uploading, packs confirmed and their bytes, and
    the bytes of the chunk copies still located in them (live bytes)."""

    uploading: int
    confirmed: int
    confirmed_bytes: int
    live_bytes: int


class Location(NamedTuple):
    """A chunk's confirmed cloud copy: the pack's object id and row id, offset and
    length (bytes) in it."""

    object_id: str
    pack: int
    pos: int
    length: int


class ObjectRange(NamedTuple):
    """Bytes ``[pos, pos + length)`` of pack object ``object_id``."""

    object_id: str
    pos: int
    length: int


class Follower(NamedTuple):
    """A chunk stored after another in the same pack: id, offset, length, and whether a
    local file of it is recorded (``chunks.is_local``)."""

    chunk: bytes
    pos: int
    length: int
    is_local: bool


class PackFill(NamedTuple):
    """A confirmed pack's size and the bytes and number of chunk copies located in it."""

    id: int
    size: int
    live: int
    entries: int


class DeadPack(NamedTuple):
    """A confirmed pack with no entry left: id, object id, size in bytes."""

    id: int
    object_id: str
    size: int


class RepackEntry(NamedTuple):
    """A chunk copy to move out of a sparse pack: chunk, pack, offset, length, and the
    pack's object id."""

    chunk: bytes
    pack: int
    pos: int
    length: int
    object_id: str


class PackRecord(NamedTuple):
    """A confirmed pack as recorded: id, name, object id, size (bytes), md5 (raw)."""

    id: int
    name: str
    object_id: str
    size: int
    md5: bytes


class PackRef(NamedTuple):
    """A confirmed pack: id, name, object id."""

    id: int
    name: str
    object_id: str


class Entry(NamedTuple):
    """One chunk copy in a pack: chunk id, offset, length (bytes)."""

    chunk: bytes
    pos: int
    length: int


class EntryCounts(NamedTuple):
    """A pack's entries and how many of their chunks have no local file."""

    chunks: int
    cloud_only: int


class Totals(NamedTuple):
    """A number of packs and their bytes."""

    packs: int
    bytes: int


# -- the uploader: claim, confirm, release, recover (cas.tier.cloud) -----------------------------

def insert_uploading(cur: pymysql.cursors.Cursor, name: str, size: int, md5: bytes, sha256: bytes,
                     owner: str, lease_s: int) -> int:
    """Insert pack ``name`` (``size`` bytes) as 'uploading', owned by ``owner`` until
    ``lease_s`` seconds from now (server clock); returns its id. Locks the new row to
    the caller's COMMIT (the claim's transaction, after its queue rows: lock order
    queue -> pack)."""
    cur.execute("INSERT INTO packs (name, state, size, md5, sha256, owner, lease_until) "
                "VALUES (%s, 'uploading', %s, %s, %s, %s, NOW(6) + INTERVAL %s SECOND)",
                (name, size, md5, sha256, owner, lease_s))
    return int(cur.lastrowid)


def set_checksums(db: Database, pack: int, md5: bytes, sha256: bytes) -> None:
    """Record the digests of the bytes built for pack ``pack`` before its upload starts
    (recovery adopts an object only when it matches them). Autocommitted. Locks the pack row for
    that statement only (the uploader owns the row)."""
    db.execute("UPDATE packs SET md5 = %s, sha256 = %s WHERE id = %s", (md5, sha256, pack))


def lock_claim(cur: pymysql.cursors.Cursor, pack: int) -> PackClaim | None:
    """Pack ``pack``'s state and owner under its exclusive row lock (``FOR UPDATE``), or
    None when the row is gone (released by a recovery). Confirmation and recovery of
    one pack thus serialize: one confirms, the other finds it confirmed or gone."""
    cur.execute("SELECT state, owner FROM packs WHERE id = %s FOR UPDATE", (pack,))
    row = cur.fetchone()
    return None if row is None else PackClaim(str(row[0]), None if row[1] is None else str(row[1]))


def mark_confirmed(cur: pymysql.cursors.Cursor, pack: int, object_id: str) -> None:
    """Make pack ``pack`` 'confirmed' as object ``object_id`` (owner and lease cleared).
    The caller holds the row's lock (:func:`lock_claim`, or its own insert) and writes
    the entries in the same transaction: from its COMMIT on the copies count."""
    cur.execute("UPDATE packs SET state = 'confirmed', object_id = %s, confirmed = NOW(6), "
                "owner = NULL, lease_until = NULL WHERE id = %s", (object_id, pack))


def enter_claimed(cur: pymysql.cursors.Cursor, pack: int) -> int:
    """Give every chunk claimed for ``pack`` (its queue rows) that still has a chunk row
    its ``pack_entries`` row (``INSERT IGNORE``: a chunk confirmed elsewhere first keeps
    that copy: invariant 5). Reads the queue rows the caller's claim holds; returns the
    entries added. Then :func:`cas.db.queue.delete_claims`. Locks the entry rows it inserts
    (exclusive) to the COMMIT; the caller holds the pack row (lock_claim) and the queue rows (its
    claim)."""
    return int(cur.execute("INSERT IGNORE INTO pack_entries (chunk, pack, pos, length) "
                           "SELECT q.chunk, q.pack, q.pos, q.length FROM upload_queue q "
                           "JOIN chunks c ON c.id = q.chunk WHERE q.pack = %s", (pack,)))


def delete_uploading(cur: pymysql.cursors.Cursor, pack: int) -> None:
    """Delete pack ``pack``'s row if it is still 'uploading' (a confirmed pack stays).
    After :func:`cas.db.queue.release` (lock order queue -> pack)."""
    cur.execute("DELETE FROM packs WHERE id = %s AND state = 'uploading'", (pack,))


def uploading_checksums(db: Database, pack: int) -> Checksums | None:
    """The recorded size and digests of pack ``pack`` while it is 'uploading', else
    None. No lock: the recovery's later :func:`lock_claim` decides."""
    rows = db.query("SELECT size, md5, sha256 FROM packs WHERE id = %s AND state = 'uploading'", (pack,))
    return None if not rows else Checksums(int(rows[0][0]), bytes(rows[0][1]), bytes(rows[0][2]))


def uploading(db: Database) -> list[UploadingPack]:
    """Every 'uploading' pack (one indexed read; no lock)."""
    return [UploadingPack(int(i), str(n), None if o is None else str(o), bool(e)) for i, n, o, e in db.query(
        "SELECT id, name, owner, lease_until < NOW(6) FROM packs WHERE state = 'uploading'")]


def any_uploading(db: Database) -> bool:
    """Whether some pack is 'uploading'. No lock."""
    return bool(db.query("SELECT 1 FROM packs WHERE state = 'uploading' LIMIT 1"))


def figures(db: Database) -> PackFigures:
    """:class:`PackFigures`. No lock."""
    up = db.query("SELECT COUNT(*) FROM packs WHERE state = 'uploading'")[0][0]
    pn, pb = db.query("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM packs WHERE state = 'confirmed'")[0]
    live = db.query("SELECT COALESCE(SUM(length), 0) FROM pack_entries")[0][0]
    return PackFigures(int(up), int(pn), int(pb), int(live))


# -- reading evicted chunks (cas.tier.cloud.CloudTier.fetch / fetch_ahead) ------------------------

def locate(db: Database, chunk: bytes) -> Location | None:
    """``chunk``'s confirmed cloud copy, or None. No lock."""
    rows = db.query("SELECT p.object_id, e.pack, e.pos, e.length FROM pack_entries e JOIN packs p ON p.id = e.pack "
                    "WHERE e.chunk = %s AND p.state = 'confirmed'", (chunk,))
    if not rows:
        return None
    oid, pack, pos, length = rows[0]
    return Location(str(oid), int(pack), int(pos), int(length))


def following(db: Database, pack: int, pos: int, span: int) -> list[Follower]:
    """The chunk copies of ``pack`` that start after offset ``pos`` and before
    ``pos + span``, in offset order, with their local marks (pack read-ahead). No lock."""
    return [Follower(bytes(c), int(p), int(n), bool(loc)) for c, p, n, loc in db.query(
        "SELECT e.chunk, e.pos, e.length, c.is_local FROM pack_entries e JOIN chunks c ON c.id = e.chunk "
        "WHERE e.pack = %s AND e.pos > %s AND e.pos < %s ORDER BY e.pos", (pack, pos, pos + span))]


def locate_many(db: Database, chunks: Sequence[bytes]) -> dict[bytes, ObjectRange]:
    """chunk id -> :class:`ObjectRange` of the confirmed copies of ``chunks`` (ids
    without one are left out); one query per batch. No lock."""
    out: dict[bytes, ObjectRange] = {}
    for part in batches(chunks):
        for c, oid, pos, length in db.query(
                "SELECT e.chunk, p.object_id, e.pos, e.length FROM pack_entries e "
                "JOIN packs p ON p.id = e.pack WHERE p.state = 'confirmed' AND e.chunk IN %s", (list(part),)):
            out[bytes(c)] = ObjectRange(str(oid), int(pos), int(length))
    return out


def delete_entry(cur: pymysql.cursors.Cursor, chunk: bytes) -> None:
    """Delete ``chunk``'s location (gc deletes its chunk row; the caller holds that
    row's lock: lock order chunk -> entry)."""
    cur.execute("DELETE FROM pack_entries WHERE chunk = %s", (chunk,))


# -- gc of packs (cas.maint.gc.collect_cloud) -------------------------------------------------------

def fill(db: Database) -> list[PackFill]:
    """:class:`PackFill` of every confirmed pack. No lock."""
    return [PackFill(int(i), int(s), int(live), int(n)) for i, s, live, n in db.query(
        "SELECT p.id, p.size, COALESCE(SUM(e.length), 0), COUNT(e.chunk) FROM packs p "
        "LEFT JOIN pack_entries e ON e.pack = p.id WHERE p.state = 'confirmed' GROUP BY p.id, p.size")]


def dead(db: Database) -> list[DeadPack]:
    """Confirmed packs with no entry. No lock: :func:`lock_confirmed_name` and
    :func:`has_entries` decide again under the pack row's lock before a delete."""
    return [DeadPack(int(i), str(o), int(s)) for i, o, s in db.query(
        "SELECT p.id, p.object_id, p.size FROM packs p LEFT JOIN pack_entries e ON e.pack = p.id "
        "WHERE p.state = 'confirmed' AND e.chunk IS NULL")]


def lock_confirmed_name(cur: pymysql.cursors.Cursor, pack: int) -> str | None:
    """The name of confirmed pack ``pack`` under its exclusive row lock (``FOR UPDATE``),
    or None. A pin (:func:`lock_confirmed_names`, shared lock) of it waits for the
    caller's COMMIT, and the caller waits for a pin under way."""
    cur.execute("SELECT name FROM packs WHERE id = %s AND state = 'confirmed' FOR UPDATE", (pack,))
    row = cur.fetchone()
    return None if row is None else str(row[0])


def has_entries(cur: pymysql.cursors.Cursor, pack: int) -> bool:
    """Whether some chunk copy is located in ``pack`` (a plain read in the caller's
    transaction; a confirmed pack never gains entries, except by repack moving them
    into a new pack's row, which nobody else locks)."""
    cur.execute("SELECT 1 FROM pack_entries WHERE pack = %s LIMIT 1", (pack,))
    return cur.fetchone() is not None


def delete_pack(cur: pymysql.cursors.Cursor, pack: int) -> None:
    """Delete pack ``pack``'s row in the caller's transaction (the caller holds its lock
    and checked it has no entry and no pin)."""
    cur.execute("DELETE FROM packs WHERE id = %s", (pack,))


def discard(db: Database, pack: int) -> None:
    """Delete pack ``pack``'s row at once (autocommitted): a repack's new pack whose
    upload failed; it was never confirmed, so nothing names it. Locks the row for that statement only."""
    db.execute("DELETE FROM packs WHERE id = %s", (pack,))


def repack_entries(db: Database, packs: Sequence[int]) -> list[RepackEntry]:
    """The chunk copies located in ``packs``, ordered by pack, then offset. No lock:
    :func:`move_entry` moves a copy only if it is still where it was read."""
    out = [RepackEntry(bytes(c), int(p), int(pos), int(n), str(oid))
           for part in batches(packs) for c, p, pos, n, oid in db.query(
               "SELECT e.chunk, e.pack, e.pos, e.length, p.object_id FROM pack_entries e "
               "JOIN packs p ON p.id = e.pack WHERE e.pack IN %s ORDER BY e.pack, e.pos", (list(part),))]
    return sorted(out, key=lambda e: (e.pack, e.pos))


def move_entry(cur: pymysql.cursors.Cursor, chunk: bytes, old: int, new: int, pos: int) -> None:
    """Move ``chunk``'s location from pack ``old`` to offset ``pos`` of pack ``new``, if it
    is still in ``old`` (gc may have dropped it meanwhile). In the transaction that
    confirms ``new``: the copy counts in the new pack from that COMMIT on. Locks the entry row
    (exclusive) to the caller's COMMIT; the caller holds no chunk row lock (gc deleting the chunk
    meanwhile deletes its entry under the chunk's lock, and this UPDATE then changes nothing)."""
    cur.execute("UPDATE pack_entries SET pack = %s, pos = %s WHERE chunk = %s AND pack = %s",
                (new, pos, chunk, old))


def confirmed_object_ids(db: Database) -> set[str]:
    """Object ids of the confirmed packs (the orphan sweep keeps them). No lock."""
    return {str(r[0]) for r in db.query("SELECT object_id FROM packs WHERE state = 'confirmed'")}


def uploading_names(db: Database) -> set[str]:
    """Names of the packs being uploaded (the orphan sweep keeps their objects). No lock."""
    return {str(r[0]) for r in db.query("SELECT name FROM packs WHERE state = 'uploading'")}


# -- fsck --cloud and scrub (cas.maint.cloudcheck, cas.maint.scrub) --------------------------------------

def confirmed(db: Database) -> list[PackRecord]:
    """Every confirmed pack, by id. No lock."""
    return [PackRecord(int(i), str(n), str(o), int(s), bytes(m)) for i, n, o, s, m in db.query(
        "SELECT id, name, object_id, size, md5 FROM packs WHERE state = 'confirmed' ORDER BY id")]


def confirmed_after(db: Database, after: int) -> list[PackRef]:
    """The confirmed packs with an id above ``after``, by id (scrub's cursor). No lock."""
    return [PackRef(int(i), str(n), str(o)) for i, n, o in db.query(
        "SELECT id, name, object_id FROM packs WHERE state = 'confirmed' AND id > %s ORDER BY id", (after,))]


def totals_after(db: Database, after: int) -> Totals:
    """How many confirmed packs have an id above ``after``, and their bytes. No lock."""
    n, size = db.query("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM packs WHERE state = 'confirmed' "
                       "AND id > %s", (after,))[0]
    return Totals(int(n), int(size))


def entries(db: Database, pack: int) -> list[Entry]:
    """The chunk copies located in ``pack``, by offset. No lock."""
    return [Entry(bytes(c), int(p), int(n)) for c, p, n in db.query(
        "SELECT chunk, pos, length FROM pack_entries WHERE pack = %s ORDER BY pos", (pack,))]


def entry_counts(db: Database, pack: int) -> EntryCounts:
    """:class:`EntryCounts` of ``pack``. No lock."""
    n, remote = db.query("SELECT COUNT(*), COALESCE(SUM(c.is_local = 0), 0) FROM pack_entries e "
                         "JOIN chunks c ON c.id = e.chunk WHERE e.pack = %s", (pack,))[0]
    return EntryCounts(int(n), int(remote))


def drop_entry(cur: pymysql.cursors.Cursor, chunk: bytes, pack: int) -> None:
    """Forget ``chunk``'s copy in ``pack`` (scrub found it bad), if that is where it is.
    The caller holds the chunk row's lock (lock order chunk -> entry)."""
    cur.execute("DELETE FROM pack_entries WHERE chunk = %s AND pack = %s", (chunk, pack))


# -- snapshot pins (cas.tier.snapshot, cas.maint.gc) -----------------------------------------------------

def lock_confirmed_names(cur: pymysql.cursors.Cursor, names: Sequence[str]) -> int:
    """How many of ``names`` (distinct, at most one batch) name a confirmed pack, each
    such row under a shared lock (``LOCK IN SHARE MODE``) held to the caller's COMMIT:
    gc's :func:`lock_confirmed_name` of one of them waits, so a pin is never written
    for a pack row being deleted."""
    return int(cur.execute("SELECT id FROM packs WHERE name IN %s AND state = 'confirmed' "
                           "LOCK IN SHARE MODE", (list(names),)))


def insert_pins(cur: pymysql.cursors.Cursor, generation: int, names: Sequence[str]) -> None:
    """Pin ``names`` for ``generation`` (``INSERT IGNORE``: pins already there stay), in
    batches of :data:`cas.db.batch.BATCH_ROWS`. Locks the pin rows it inserts."""
    for part in batches(names):
        sql, params = values([(generation, n) for n in part])
        cur.execute(f"INSERT IGNORE INTO snapshot_packs (generation, pack) VALUES {sql}", params)


def delete_pins(cur: pymysql.cursors.Cursor, generation: int) -> None:
    """Drop ``generation``'s pins in the caller's transaction. Locks the generation's pin rows
    (exclusive) to the caller's COMMIT."""
    cur.execute("DELETE FROM snapshot_packs WHERE generation = %s", (generation,))


def unpin(db: Database, generation: int) -> None:
    """Drop ``generation``'s pins at once (autocommitted). Locks the pin rows for that statement only."""
    db.execute("DELETE FROM snapshot_packs WHERE generation = %s", (generation,))


def unpin_older(db: Database, generation: int) -> None:
    """Drop the pins of every generation below ``generation`` (retention, after their
    snapshot objects were deleted). Autocommitted. Locks the pin rows for that statement only."""
    db.execute("DELETE FROM snapshot_packs WHERE generation < %s", (generation,))


def pin_every_pack(db: Database, generation: int) -> None:
    """Pin every pack row for ``generation`` (a restored volume: the packs its snapshot
    names are exactly its pack rows). Autocommitted. Reads packs without lock (nothing else runs on
    a volume being restored); locks the pins it inserts for that statement."""
    db.execute("INSERT IGNORE INTO snapshot_packs (generation, pack) SELECT %s, name FROM packs", (generation,))


def is_pinned(cur: pymysql.cursors.Cursor, name: str) -> bool:
    """Whether some kept generation pins pack ``name`` (a plain read in the caller's
    transaction, after it locked the pack row: a pin under way holds a shared lock on
    that row, so it committed before this read or waits for the caller)."""
    cur.execute("SELECT 1 FROM snapshot_packs WHERE pack = %s LIMIT 1", (name,))
    return cur.fetchone() is not None


def pinned_names(db: Database) -> set[str]:
    """Names of the packs some kept generation pins. No lock."""
    return {str(r[0]) for r in db.query("SELECT DISTINCT pack FROM snapshot_packs")}


def pinned_ids(db: Database) -> set[int]:
    """Ids of the pack rows some kept generation pins. No lock."""
    return {int(r[0]) for r in db.query("SELECT DISTINCT p.id FROM packs p JOIN snapshot_packs s ON s.pack = p.name")}
