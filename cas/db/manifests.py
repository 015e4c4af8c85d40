# -- used by gc, the cloud tier and maintenance (part B)
# The statements on the ``manifests`` table that the cloud tier (pack order), fsck,
# fsck --cloud and repair run. All are reads; docs/metadata-packs.md.
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import pymysql.cursors

from .batch import batches

if TYPE_CHECKING:
    from cas.meta import Database


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
