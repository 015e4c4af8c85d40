"""The manifests table: slot -> chunk of each file (schema.sql).

A file's slot i covers bytes [i*chunk_size, (i+1)*chunk_size); a slot with no row is a
hole. Every change here commits in the same transaction as the refcount deltas of the
chunks it gains and loses (invariant 2, docs/design.md: cas.db.chunks) and, for a new
chunk, only after the chunk's file is durable (invariant 1). The mount is the only
writer of its volume's manifests, so the rows of a file it holds open are what its RAM
manifest says (cas/engine/filedata.py).

Locks (InnoDB, READ COMMITTED; see cas.db.namespace for the background): writes X-lock
the (inode, slot) records they change until the transaction (the group) ends.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, TYPE_CHECKING

from pymysql.cursors import Cursor
import pymysql.cursors

from cas.db.batch import batches, values
from cas.db.source import Source, rows

if TYPE_CHECKING:
    from cas.db.database import Database


class ManifestRow(NamedTuple):
    """One ``manifests`` row: slot ``slot`` of inode ``inode`` holds chunk ``chunk``
    (32 bytes)."""

    inode: int
    slot: int
    chunk: bytes


def manifest_of(src: Source, ino: int) -> dict[int, bytes]:
    """The manifest of ``ino``: slot -> chunk id, holes absent. No lock."""
    return {int(s): bytes(c) for s, c in rows(src, "SELECT slot, chunk FROM manifests WHERE inode = %s", (ino,))}


def size_and_manifest(src: Source, ino: int) -> tuple[int | None, dict[int, bytes]]:
    """The committed size (bytes; None: no such inode) and manifest (slot -> chunk id,
    holes absent) of ``ino``, read in one statement: one consistent read, so the pair is
    one commit's even while another machine commits the file (a shared volume,
    docs/sharing.md). No lock."""
    got = rows(src, "SELECT i.size, m.slot, m.chunk FROM inodes i LEFT JOIN manifests m ON m.inode = i.id "
                    "WHERE i.id = %s", (ino,))
    if not got:
        return None, {}
    return int(got[0][0]), {int(r[1]): bytes(r[2]) for r in got if r[1] is not None}


def chunks_for_update(cur: Cursor, ino: int) -> list[bytes]:
    """The chunk id of every slot of ``ino`` (a chunk once per slot naming it),
    X-locking the manifest rows: the file is being freed and its chunks lose these
    references in the same transaction (invariant 2)."""
    cur.execute("SELECT chunk FROM manifests WHERE inode = %s FOR UPDATE", (ino,))
    return [bytes(r[0]) for r in cur.fetchall()]


def put(cur: Cursor, manifest_rows: Sequence[ManifestRow]) -> None:
    """Insert or replace ``manifest_rows`` (one REPLACE per BATCH_ROWS rows). X-locks
    each (inode, slot) record. The caller applies the refcount deltas in the same
    transaction (invariant 2)."""
    for batch in batches(manifest_rows):
        text, args = values(batch)
        cur.execute("REPLACE INTO manifests (inode, slot, chunk) VALUES " + text, args)


def slots_for_update(cur: Cursor, ino: int, slots: Sequence[int], from_slot: int | None) -> dict[int, bytes]:
    """The committed rows of ``ino`` (slot -> chunk id) for ``slots`` and, unless
    ``from_slot`` is None, every slot >= ``from_slot``, X-locking them: a flush on a
    shared volume derives the refcount decrements of the rows it replaces or deletes
    from these rows, not from its RAM manifest, because another machine may have changed
    the slots since (invariant 2; docs/sharing.md). The caller holds the inode's row
    lock first (cas.db.namespace.nlink_for_update), which serializes the flushes of one
    file. One statement per BATCH_ROWS slots, plus one for the range."""
    out: dict[int, bytes] = {}
    for batch in batches(list(slots)):
        cur.execute("SELECT slot, chunk FROM manifests WHERE inode = %s AND slot IN %s FOR UPDATE", (ino, batch))
        out.update((int(s), bytes(c)) for s, c in cur.fetchall())
    if from_slot is not None:
        cur.execute("SELECT slot, chunk FROM manifests WHERE inode = %s AND slot >= %s FOR UPDATE", (ino, from_slot))
        out.update((int(s), bytes(c)) for s, c in cur.fetchall())
    return out


def stored_bytes(cur: Cursor, ino: int, size: int, chunk_size: int) -> int:
    """The bytes of ``ino``'s manifest slots below ``size`` (``inodes.data_bytes``,
    invariant 14: the 2 -> 3 migration's formula), read in the caller's transaction. A
    flush on a shared volume computes it from the rows (another machine's slots are
    not in its RAM manifest) while it holds the inode's row lock. No lock of its own."""
    cur.execute("SELECT COALESCE(SUM(LEAST(%s, CAST(%s AS SIGNED) - CAST(slot AS SIGNED) * %s)), 0) "
                "FROM manifests WHERE inode = %s", (chunk_size, size, chunk_size, ino))
    return max(0, int(cur.fetchone()[0]))


def delete_from(cur: Cursor, ino: int, first_slot: int) -> None:
    """Delete the rows of slots >= ``first_slot`` of ``ino`` (truncation). X-locks them."""
    cur.execute("DELETE FROM manifests WHERE inode = %s AND slot >= %s", (ino, first_slot))


def delete_slots(cur: Cursor, ino: int, slots: Sequence[int]) -> None:
    """Delete the rows of ``slots`` of ``ino`` (slots rewritten as holes); one statement
    per BATCH_ROWS slots. X-locks them."""
    for batch in batches(list(slots)):
        cur.execute("DELETE FROM manifests WHERE inode = %s AND slot IN %s", (ino, batch))


def delete_all(cur: Cursor, ino: int) -> None:
    """Delete every row of ``ino``'s manifest (the inode is freed). X-locks them (locked
    already by :func:`chunks_for_update`)."""
    cur.execute("DELETE FROM manifests WHERE inode = %s", (ino,))


# -- used by gc, the cloud tier and maintenance
# The statements on the ``manifests`` table that the cloud tier (pack order), fsck,
# fsck --cloud and repair run. All are reads; docs/metadata-packs.md.


class Place(NamedTuple):
    """The first file place holding a chunk: the lowest inode naming it, and that
    inode's lowest slot naming it."""

    inode: int
    slot: int


class ChunkUser(NamedTuple):
    """A chunk and an inode whose manifest names it."""

    chunk: bytes
    inode: int


def first_places(cur: pymysql.cursors.Cursor, ids: Sequence[bytes]) -> dict[bytes, Place]:
    """chunk id -> :class:`Place` for those of ``ids`` some manifest names (one query per
    batch; a plain read in the caller's transaction, the uploader's claim: it locks no
    manifest row, so the claim never waits for the mount's group transaction)."""
    out: dict[bytes, Place] = {}
    for part in batches(ids):
        cur.execute("SELECT m.chunk, m.inode, MIN(m.slot) FROM manifests m JOIN "
                    "(SELECT chunk, MIN(inode) AS ino FROM manifests WHERE chunk IN %s GROUP BY chunk) f "
                    "ON f.chunk = m.chunk AND f.ino = m.inode GROUP BY m.chunk, m.inode", (list(part),))
        for c, ino, slot in cur.fetchall():
            out[bytes(c)] = Place(int(ino), int(slot))
    return out


def inodes_using_pack(db: Database, pack: int) -> list[int]:
    """Inodes whose manifests name a chunk located in pack ``pack``, ascending. No lock."""
    return [int(r[0]) for r in db.query(
        "SELECT DISTINCT m.inode FROM manifests m JOIN pack_entries e ON e.chunk = m.chunk "
        "WHERE e.pack = %s ORDER BY m.inode", (pack,))]


def users(db: Database, ids: Sequence[bytes]) -> list[ChunkUser]:
    """Every (chunk, inode) pair of ``ids`` and the inodes naming them, once each (one
    query per batch). No lock."""
    out: list[ChunkUser] = []
    for part in batches(ids):
        out.extend(ChunkUser(bytes(c), int(i)) for c, i in db.query(
            "SELECT DISTINCT chunk, inode FROM manifests WHERE chunk IN %s", (list(part),)))
    return out


def chunks_without_row(cur: pymysql.cursors.Cursor) -> list[bytes]:
    """Chunk ids some manifest names that have no chunk row (invariant 1 broken). A
    plain read of the caller's snapshot (fsck). No lock."""
    cur.execute("SELECT DISTINCT m.chunk FROM manifests m LEFT JOIN chunks c ON c.id = m.chunk "
                "WHERE c.id IS NULL")
    return [bytes(r[0]) for r in cur.fetchall()]
