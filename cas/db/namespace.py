"""Statements of the namespace tables: inodes, dentries, symlinks."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

from ..meta import Database
from .batch import batches, values


# -- creates (smallfiles) -----------------------------------------------------------
# A create (mknod, mkdir, symlink, create) is held in RAM (:class:`HeldCreates`) and
# written with the other creates held with it, by multi-row INSERTs, in one savepoint
# of the group transaction, before the next statement on the mount's connection and
# before every commit (cas.meta.Database.write_held; docs/smallfiles.md). Locks: the
# INSERTs take the new rows' locks only; the UPDATE of a parent directory takes that
# inode row's lock. All inside the mount's group transaction, the only writer of the
# namespace (docs/concurrency.md).

INODE_COLS = ("id", "mode", "uid", "gid", "nlink", "size", "rdev", "atime_ns", "mtime_ns", "ctime_ns")


@dataclass
class HeldCreates:
    """Rows of creates not yet sent to the database.

    ``inodes``: inode -> its row in :data:`INODE_COLS` order (a list: a later create in
    a held directory updates its nlink and times in place); ``dentries``: (parent, name,
    inode) in create order (their ``id``, the readdir offset, grows in that order);
    ``symlinks``: (inode, target); ``touches``: parent directory that is not held ->
    (time in ns for its mtime and ctime, nlink delta); ``names``: (parent, name) -> inode
    of every held dentry (a read of any other name needs none of the held rows)."""

    inodes: dict[int, list[int]] = field(default_factory=dict)
    dentries: list[tuple[int, bytes, int]] = field(default_factory=list)
    symlinks: list[tuple[int, bytes]] = field(default_factory=list)
    touches: dict[int, tuple[int, int]] = field(default_factory=dict)
    names: dict[tuple[int, bytes], int] = field(default_factory=dict)

    def __len__(self) -> int:
        """Held creates (one dentry each)."""
        return len(self.dentries)

    def add(self, row: list[int], parent: int, name: bytes, target: bytes | None, now: int,
            nlink_delta: int) -> None:
        """Hold the create of inode ``row[0]`` (``row`` in INODE_COLS order) as ``name`` in
        ``parent``, whose mtime and ctime become ``now`` (ns) and whose nlink changes by
        ``nlink_delta`` (1 for a new subdirectory)."""
        ino = row[0]
        self.inodes[ino] = row
        self.dentries.append((parent, name, ino))
        self.names[(parent, name)] = ino
        if target is not None:
            self.symlinks.append((ino, target))
        prow = self.inodes.get(parent)
        if prow is not None:   # the parent is held itself: change its row
            prow[4] += nlink_delta
            prow[8] = prow[9] = now
        else:
            _, d = self.touches.get(parent, (now, 0))
            self.touches[parent] = (now, d + nlink_delta)

    def clear(self) -> None:
        """Forget every held row (written, or lost with the group)."""
        self.inodes.clear()
        self.dentries.clear()
        self.symlinks.clear()
        self.touches.clear()
        self.names.clear()

    def write(self, cur: Any) -> None:
        """Send every held row through ``cur`` (a transaction body): multi-row INSERTs of
        at most :data:`cas.db.batch.BATCH_ROWS` rows into inodes, dentries, symlinks, and
        one UPDATE per parent directory that is not held. 3 + parents statements for up
        to 500 creates. Raises pymysql errors (1062 for a name taken: cas.fs checks names
        before holding a create, so that is a broken invariant, and the group is lost)."""
        for part in batches(list(self.inodes.values())):
            sql, args = values(part)
            cur.execute(f"INSERT INTO inodes ({', '.join(INODE_COLS)}) VALUES {sql}", args)
        for dpart in batches(self.dentries):
            sql, args = values(dpart)
            cur.execute(f"INSERT INTO dentries (parent, name, inode) VALUES {sql}", args)
        for spart in batches(self.symlinks):
            sql, args = values(spart)
            cur.execute(f"INSERT INTO symlinks (inode, target) VALUES {sql}", args)
        for parent, (now, d) in self.touches.items():
            cur.execute("UPDATE inodes SET mtime_ns = %s, ctime_ns = %s, nlink = nlink + %s WHERE id = %s",
                        (now, now, d, parent))


#: meta key: every inode number a mount may hand out is below it (committed first)
INODE_NEXT_KEY = "inode_next"


def reserve_inodes(db: Database, at_least: int, n: int) -> int:
    """Reserve ``n`` inode numbers for a mount: returns the first, ``start`` = the
    greatest of ``at_least``, MAX(inodes.id) + 1 and the meta row ``inode_next``, and
    commits ``inode_next`` = ``start + n`` before it returns. ``db`` must be a connection
    of its own (not the mount's, whose group transaction is open): the reservation is
    durable even when the group that uses the numbers is lost, so that no later mount
    hands out a number of a lost create again (the rescue area names files by inode,
    cas/rescue.py). Locks the meta row (FOR UPDATE), reads inodes without locks.
    Raises MetaError."""
    def body(cur: Any) -> int:
        cur.execute("SELECT v FROM meta WHERE k = %s FOR UPDATE", (INODE_NEXT_KEY,))
        row = cur.fetchone()
        cur.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM inodes")
        start = max(at_least, int(cur.fetchone()[0]), int(row[0]) if row else 0)
        cur.execute("REPLACE INTO meta (k, v) VALUES (%s, %s)", (INODE_NEXT_KEY, str(start + n)))
        return start
    return db.transaction(body)


def entry_inode(db: Database, parent: int, name: bytes) -> int | None:
    """The inode that ``name`` in directory ``parent`` names, or None (primary key read,
    no lock), as committed or written into the group: the caller has checked that the
    name is not held (:attr:`HeldCreates.names`). Raises MetaError."""
    rows = db.query("SELECT inode FROM dentries WHERE parent = %s AND name = %s", (parent, name),
                    see_held=False)
    return int(rows[0][0]) if rows else None


def lookup_rows(db: Database, parent: int, name: bytes, small_bytes: int) -> list[tuple[Any, ...]]:
    """The inode row that ``name`` in directory ``parent`` names, in INODE_COLS order
    plus ``data_bytes``, then (slot, chunk) of its manifest when it is a regular file of
    at most ``small_bytes`` bytes: one row per manifest row, or one row with (None,
    None) (no manifest row, a large file, not a file); no rows when the name is absent.
    One round trip (a cold open of a small file needs no other). Runs without writing
    held creates (see_held=False): the caller has checked that the name is not held.
    Raises MetaError."""
    return db.query(
        "SELECT i.id, i.mode, i.uid, i.gid, i.nlink, i.size, i.rdev, i.atime_ns, i.mtime_ns, i.ctime_ns, "
        "i.data_bytes, m.slot, m.chunk FROM dentries d JOIN inodes i ON i.id = d.inode "
        "LEFT JOIN manifests m ON m.inode = i.id AND (i.mode & 0xF000) = 0x8000 AND i.size <= %s "
        "WHERE d.parent = %s AND d.name = %s", (small_bytes, parent, name), see_held=False)


def listing_extras(db: Database, no_xattrs_unknown: list[int], small: list[int]
                   ) -> tuple[set[int], dict[int, dict[int, bytes]]]:
    """For a listing batch, in one statement per :data:`cas.db.batch.BATCH_ROWS` inodes:
    which of ``no_xattrs_unknown`` have extended attributes (a set), and the manifests
    (slot -> chunk id; {} for none) of the small regular files ``small``. A UNION ALL
    of the two reads (xattr rows come with a NULL slot; inode 0 stands in for an empty
    list, no inode has it). Raises MetaError."""
    having: set[int] = set()
    manifests: dict[int, dict[int, bytes]] = {i: {} for i in small}
    for xs, ms in zip_longest(batches(no_xattrs_unknown), batches(small), fillvalue=[0]):
        for ino, slot, chunk in db.query(
                "SELECT inode, NULL, NULL FROM xattrs WHERE inode IN %s GROUP BY inode "
                "UNION ALL SELECT inode, slot, chunk FROM manifests WHERE inode IN %s",
                (list(xs), list(ms))):
            if slot is None:
                having.add(int(ino))
            else:
                manifests[int(ino)][int(slot)] = bytes(chunk)
    return having, manifests
