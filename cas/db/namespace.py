"""The namespace tables: inodes, dentries, symlinks, xattrs (schema.sql).

Every statement casfs's engine runs on these tables is a function here. Functions that
write take the cursor of the caller's transaction (``Database.transaction`` body: under
group commit a savepoint of the mount's open group); reads take a :data:`Source` (that
cursor, or the :class:`cas.db.database.Database` for a single read). Each docstring names the
row locks the statement takes and the rule it serves; docs/metadata.md gives the lock
order of the transactions that combine them.

Locking background (InnoDB, READ COMMITTED, the session level of cas.db.database): a plain
SELECT takes no lock (a consistent read); UPDATE and DELETE take exclusive (X) locks on
the index records they change (READ COMMITTED releases the locks of rows that did not
match); INSERT takes an X lock on the new record, and on a duplicate key a shared (S)
lock on the existing one; ``SELECT ... FOR UPDATE`` takes X locks on the rows read. All
locks are held until the transaction ends: for a mount, until the group commits.

The mount is the only writer of its volume's namespace (a volume mounts once), so these
locks serialize the mount with the tools that read or repair a volume (fsck, gc), never
two writers of one namespace (invariant "single writer of a namespace",
docs/metadata.md).
"""
from __future__ import annotations

import stat as S
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any, NamedTuple

import pymysql.cursors
import pymysql.err
from pymysql.cursors import Cursor

from cas.errors import Exists
from cas.db.database import Database
from cas.db.batch import batches, values
from cas.db.source import Source, rows
from cas.db import volume

#: the columns of an inodes row, in :class:`InodeRow` order
INODE_COLUMNS = ("id", "mode", "uid", "gid", "nlink", "size", "rdev", "atime_ns", "mtime_ns",
                 "ctime_ns", "data_bytes")
_COLS = ", ".join(INODE_COLUMNS)
_ICOLS = ", ".join("i." + c for c in INODE_COLUMNS)   # the same, of alias i
#: the columns :func:`update_inode` may set (never id: the primary key)
WRITABLE_COLUMNS = frozenset(INODE_COLUMNS) - {"id"}


class InodeRow(NamedTuple):
    """One ``inodes`` row: sizes in bytes, times in ns since the epoch; ``data_bytes``
    the bytes in stored (non-hole) slots (invariant 14, docs/design.md)."""

    id: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    data_bytes: int


class Dentry(NamedTuple):
    """One ``dentries`` row as the engine reads it: entry ``name`` of directory ``parent``
    names inode ``inode``."""

    parent: int
    name: bytes
    inode: int


class DirEntry(NamedTuple):
    """One entry of a directory listing: its name, its readdir offset (``dentries.id``,
    stable across additions and removals) and the inode it names."""

    name: bytes
    offset: int
    inode: InodeRow


def _inode(r: Sequence[Any]) -> InodeRow:
    return InodeRow(*(int(v) for v in r))


# -- inodes ------------------------------------------------------------------------------

def inode(src: Source, ino: int) -> InodeRow | None:
    """The row of inode ``ino``, or None. No lock (a consistent read)."""
    r = rows(src, f"SELECT {_COLS} FROM inodes WHERE id = %s", (ino,))
    return _inode(r[0]) if r else None


def inode_size(src: Source, ino: int) -> int | None:
    """The committed size (bytes) of ``ino``, or None when it has no row. No lock."""
    r = rows(src, "SELECT size FROM inodes WHERE id = %s", (ino,))
    return int(r[0][0]) if r else None


def unlinked_inodes(src: Source) -> list[int]:
    """Inodes with nlink 0 (unlinked while open, left by a crash: freed at the next start,
    docs/posix.md). No lock; uses ``nlink_idx``."""
    return [int(r[0]) for r in rows(src, "SELECT id FROM inodes WHERE nlink = 0")]


def inode_count(src: Source) -> int:
    """Number of inode rows (statfs's used files). No lock."""
    return int(rows(src, "SELECT COUNT(*) FROM inodes")[0][0])


def existing_inodes(cur: Cursor, inos: Sequence[int]) -> set[int]:
    """Which of ``inos`` have a row. No lock, but run inside the flush's transaction:
    a flush never writes manifest rows for an inode whose row was lost with a group
    (invariant 7, docs/design.md). One statement per BATCH_ROWS inodes."""
    found: set[int] = set()
    for batch in batches(list(inos)):
        found.update(int(r[0]) for r in rows(cur, "SELECT id FROM inodes WHERE id IN %s", (batch,)))
    return found


def mode_for_update(cur: Cursor, ino: int) -> int:
    """st_mode of ``ino``, X-locking its row (unlink, rmdir, rename: the inode's type
    cannot change under the operation). Raises LookupError when the row is missing (the
    caller found it through a dentry it holds locked, so it is there)."""
    cur.execute("SELECT mode FROM inodes WHERE id = %s FOR UPDATE", (ino,))
    row = cur.fetchone()
    if row is None:
        raise LookupError(f"inode {ino} has no row")
    return int(row[0])


def nlink_for_update(cur: Cursor, ino: int) -> int | None:
    """nlink of ``ino`` X-locking its row, or None when the row is gone. Freeing an
    inode re-checks nlink 0 under this lock (a link made meanwhile keeps it)."""
    cur.execute("SELECT nlink FROM inodes WHERE id = %s FOR UPDATE", (ino,))
    row = cur.fetchone()
    return None if row is None else int(row[0])


def update_inode(cur: Cursor, ino: int, cols: Mapping[str, int]) -> None:
    """Set columns ``cols`` (name -> value, in the order given; names from
    WRITABLE_COLUMNS, others raise ValueError) of inode ``ino``. X-locks its row.
    setattr (chmod, chown, utimens) and the flush (size, times, data_bytes: invariant 14,
    committed with the manifest) use it."""
    if not cols:
        raise ValueError("no columns to set")
    bad = set(cols) - WRITABLE_COLUMNS
    if bad:
        raise ValueError(f"not writable inode columns: {sorted(bad)}")
    cur.execute("UPDATE inodes SET " + ", ".join(f"{c} = %s" for c in cols) + " WHERE id = %s",
                [*cols.values(), ino])


def touch_dir(cur: Cursor, ino: int, now: int, nlink_delta: int = 0) -> None:
    """Directory ``ino`` changed: mtime and ctime become ``now`` (ns), nlink changes by
    ``nlink_delta`` (a subdirectory added or removed: POSIX link count 2 + subdirs).
    X-locks its row."""
    cur.execute("UPDATE inodes SET mtime_ns = %s, ctime_ns = %s, nlink = nlink + %s WHERE id = %s",
                (now, now, nlink_delta, ino))


def add_link(cur: Cursor, ino: int, now: int) -> None:
    """One more link to ``ino`` (link(2)): nlink + 1, ctime ``now``. X-locks its row."""
    cur.execute("UPDATE inodes SET nlink = nlink + 1, ctime_ns = %s WHERE id = %s", (now, ino))


def drop_link(cur: Cursor, ino: int, now: int) -> None:
    """One link less to non-directory ``ino``: nlink - 1 (never below 0), ctime ``now``.
    X-locks its row."""
    cur.execute("UPDATE inodes SET nlink = nlink - 1, ctime_ns = %s WHERE id = %s AND nlink > 0", (now, ino))


def set_unlinked(cur: Cursor, ino: int, now: int) -> None:
    """Directory ``ino`` was removed: nlink 0 (freed when nothing references it),
    ctime ``now``. X-locks its row."""
    cur.execute("UPDATE inodes SET nlink = 0, ctime_ns = %s WHERE id = %s", (now, ino))


def set_ctime(cur: Cursor, now: int, *inos: int) -> None:
    """ctime of every inode of ``inos`` (one or two: rename, xattr changes) becomes
    ``now``. X-locks their rows."""
    if not inos:
        raise ValueError("no inodes")
    if len(inos) == 1:
        cur.execute("UPDATE inodes SET ctime_ns = %s WHERE id = %s", (now, inos[0]))
    else:
        cur.execute("UPDATE inodes SET ctime_ns = %s WHERE id IN (" + ", ".join(["%s"] * len(inos)) + ")",
                    (now, *inos))


def delete_inode(cur: Cursor, ino: int) -> None:
    """Delete inode ``ino``'s symlink target, xattrs and row, in that order (its manifest
    goes first, cas.db.manifests). X-locks those rows. Only for an inode whose nlink 0
    the caller checked under :func:`nlink_for_update`."""
    for table, col in (("symlinks", "inode"), ("xattrs", "inode"), ("inodes", "id")):
        cur.execute(f"DELETE FROM {table} WHERE {col} = %s", (ino,))


# -- dentries ----------------------------------------------------------------------------

def entry(src: Source, parent: int, name: bytes) -> int | None:
    """Inode named by entry ``name`` of ``parent``, or None. No lock (primary key
    (parent, name))."""
    r = rows(src, "SELECT inode FROM dentries WHERE parent = %s AND name = %s", (parent, name))
    return int(r[0][0]) if r else None


def entry_for_update(cur: Cursor, parent: int, name: bytes) -> int | None:
    """Inode of entry ``name`` in ``parent``, X-locking the entry, or None (nothing is
    locked then: READ COMMITTED takes no gap locks). unlink, rmdir and rename lock
    their entries first, then the inodes they name."""
    cur.execute("SELECT inode FROM dentries WHERE parent = %s AND name = %s FOR UPDATE", (parent, name))
    row = cur.fetchone()
    return int(row[0]) if row else None


def lookup(src: Source, parent: int, name: bytes) -> InodeRow | None:
    """The inode row named by entry ``name`` of ``parent`` (one join on primary keys),
    or None. No lock."""
    r = rows(src, f"SELECT {_ICOLS} FROM dentries d JOIN inodes i ON i.id = d.inode "
                  "WHERE d.parent = %s AND d.name = %s", (parent, name))
    return _inode(r[0]) if r else None


def parent_of(src: Source, ino: int) -> int | None:
    """The parent of directory ``ino`` (what its '..' names), or None for the root and
    for a removed directory. No lock (``inode_idx``); a directory has one entry."""
    r = rows(src, "SELECT parent FROM dentries WHERE inode = %s LIMIT 1", (ino,))
    return int(r[0][0]) if r else None


RENAME_LOCK_KEY = "rename_lock"   # meta row: the volume's cross-directory rename lock


def lock_renames(cur: Cursor) -> None:
    """Take the volume-wide rename lock (the ``rename_lock`` meta row, exclusive, held
    to the caller's COMMIT): a shared volume's cross-directory renames run one at a
    time across all machines, so the ancestry check of a directory move reads a parent
    chain no other rename is changing (what Linux's s_vfs_rename_mutex gives on one
    machine). Guarded by
    tests/engine/test_shared.py::test_two_machines_cannot_move_directories_into_each_other."""
    volume.lock_value(cur, RENAME_LOCK_KEY, "0")


def dentry_of(src: Source, ino: int) -> Dentry | None:
    """One entry naming ``ino``, or None (unlinked; the root). No lock (``inode_idx``)."""
    r = rows(src, "SELECT parent, name FROM dentries WHERE inode = %s LIMIT 1", (ino,))
    return Dentry(int(r[0][0]), bytes(r[0][1]), ino) if r else None


def has_entries(cur: Cursor, ino: int) -> bool:
    """Whether directory ``ino`` has any entry (rmdir, rename over a directory: ENOTEMPTY).
    No lock: the mount is the only writer of its namespace, and it is serialized."""
    cur.execute("SELECT 1 FROM dentries WHERE parent = %s LIMIT 1", (ino,))
    return cur.fetchone() is not None


def delete_entry(cur: Cursor, parent: int, name: bytes) -> None:
    """Delete entry ``name`` of ``parent``. X-locks it (locked already by
    :func:`entry_for_update`)."""
    cur.execute("DELETE FROM dentries WHERE parent = %s AND name = %s", (parent, name))


def repoint_entry(cur: Cursor, parent: int, name: bytes, ino: int) -> None:
    """Entry ``name`` of ``parent`` names ``ino`` from now on (RENAME_EXCHANGE). X-locks
    the entry."""
    cur.execute("UPDATE dentries SET inode = %s WHERE parent = %s AND name = %s", (ino, parent, name))


def move_entry(cur: Cursor, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes) -> None:
    """Entry ``old_name`` of ``old_parent`` becomes ``new_name`` of ``new_parent``,
    keeping its readdir offset (rename). X-locks the entry (old and new key)."""
    cur.execute("UPDATE dentries SET parent = %s, name = %s WHERE parent = %s AND name = %s",
                (new_parent, new_name, old_parent, old_name))


def list_dir(src: Source, ino: int, after: int, limit: int) -> list[DirEntry]:
    """At most ``limit`` entries of directory ``ino`` with readdir offset > ``after``, in
    offset order, with their inode rows. No lock.

    The plan is forced: a range scan of (parent, id) joined to inodes by primary key
    reads O(limit) rows. Left to itself, MariaDB 10.11 with stale statistics (rows
    added in bulk) chose a full scan of inodes and a filesort of the whole directory
    for every batch: listing cost grew with the square of its size (invariant 14)."""
    r = rows(src, f"SELECT d.name, d.id, {_ICOLS} "
                  "FROM dentries d FORCE INDEX (parent_id_idx) "
                  "STRAIGHT_JOIN inodes i FORCE INDEX (PRIMARY) ON i.id = d.inode "
                  "WHERE d.parent = %s AND d.id > %s ORDER BY d.id LIMIT %s", (ino, after, limit))
    return [DirEntry(bytes(x[0]), int(x[1]), _inode(x[2:])) for x in r]


# -- symlinks ----------------------------------------------------------------------------

def symlink_target(src: Source, ino: int) -> bytes | None:
    """The target of symlink ``ino``, or None (not a symlink, or no such inode). No lock."""
    r = rows(src, "SELECT target FROM symlinks WHERE inode = %s", (ino,))
    return bytes(r[0][0]) if r else None


# -- xattrs ------------------------------------------------------------------------------

def xattrs_of(src: Source, ino: int) -> dict[bytes, bytes]:
    """The extended attributes of ``ino``: name -> value. No lock."""
    return {bytes(n): bytes(v) for n, v in rows(src, "SELECT name, value FROM xattrs WHERE inode = %s", (ino,))}


def inodes_with_xattrs(src: Source, inos: Iterable[int]) -> set[int]:
    """Which of ``inos`` have at least one extended attribute (a listing learns, with one
    statement per BATCH_ROWS inodes, which entries have none: docs/posix.md). No lock."""
    found: set[int] = set()
    for batch in batches(list(inos)):
        found.update(int(r[0]) for r in rows(src, "SELECT DISTINCT inode FROM xattrs WHERE inode IN %s",
                                             (batch,)))
    return found


def set_xattr(cur: Cursor, ino: int, name: bytes, value: bytes) -> None:
    """Create or replace extended attribute ``name`` of ``ino``. X-locks the
    (inode, name) row."""
    cur.execute("REPLACE INTO xattrs (inode, name, value) VALUES (%s, %s, %s)", (ino, name, value))


def delete_xattr(cur: Cursor, ino: int, name: bytes) -> None:
    """Remove extended attribute ``name`` of ``ino`` (absent: nothing). X-locks the row."""
    cur.execute("DELETE FROM xattrs WHERE inode = %s AND name = %s", (ino, name))


# -- used by gc, the cloud tier and maintenance
# The statements on ``inodes`` and ``dentries`` that fsck, fsck --cloud, repair and
# snapshots run: reads (paths of damaged files, counts) and fsck --repair's link
# counts. docs/metadata-packs.md.


class NameOf(NamedTuple):
    """A directory entry naming an inode: the parent directory's inode and the name."""

    parent: int
    name: bytes


class NlinkMismatch(NamedTuple):
    """A non-directory inode whose nlink differs from its directory entries."""

    inode: int
    stored: int
    actual: int


class Dangling(NamedTuple):
    """A directory entry whose inode has no row: the parent and the name (bytes)."""

    parent: int
    name: bytes


def names_of(db: Database, inode: int) -> list[NameOf]:
    """Every directory entry naming ``inode`` (hard links: several). No lock."""
    return [NameOf(int(p), bytes(n)) for p, n in db.query(
        "SELECT parent, name FROM dentries WHERE inode = %s", (inode,))]


def nlink_mismatches(cur: pymysql.cursors.Cursor) -> list[NlinkMismatch]:
    """Linked non-directory inodes whose nlink differs from their entries. A plain read
    of the caller's snapshot (fsck). No lock."""
    cur.execute("SELECT i.id, i.nlink, COUNT(d.inode) FROM inodes i LEFT JOIN dentries d ON d.inode = i.id "
                "WHERE i.mode & %s <> %s AND i.nlink > 0 GROUP BY i.id, i.nlink "
                "HAVING i.nlink <> COUNT(d.inode)", (S.S_IFMT(0o170000), S.S_IFDIR))
    return [NlinkMismatch(int(r[0]), int(r[1]), int(r[2])) for r in cur.fetchall()]


def dangling(cur: pymysql.cursors.Cursor) -> list[Dangling]:
    """Directory entries whose inode has no row. A plain read of the caller's snapshot. No lock."""
    cur.execute("SELECT d.parent, d.name FROM dentries d LEFT JOIN inodes i ON i.id = d.inode "
                "WHERE i.id IS NULL")
    return [Dangling(int(r[0]), bytes(r[1])) for r in cur.fetchall()]


def unreachable_dirs(cur: pymysql.cursors.Cursor, root: int = 1) -> list[int]:
    """Linked directories (with an entry) that the root does not reach through the
    entries: a dentry cycle (say P in Q's subtree and Q in P's) cut off from the root.
    One recursive query over directory entries; a plain read of the caller's snapshot
    (fsck). No lock. Ascending inode numbers."""
    cur.execute("WITH RECURSIVE reach (id) AS (SELECT %s UNION "
                "SELECT d.inode FROM dentries d JOIN reach r ON d.parent = r.id "
                "JOIN inodes i ON i.id = d.inode WHERE i.mode & %s = %s) "
                "SELECT DISTINCT d.inode FROM dentries d JOIN inodes i ON i.id = d.inode "
                "WHERE i.mode & %s = %s AND d.inode NOT IN (SELECT id FROM reach) ORDER BY d.inode",
                (root, 0o170000, S.S_IFDIR, 0o170000, S.S_IFDIR))
    return [int(r[0]) for r in cur.fetchall()]


def recount_nlink(cur: pymysql.cursors.Cursor, inode: int) -> None:
    """Set ``inode``'s nlink to its directory entries (``fsck --repair``, unmounted). Locks the
    inode row (exclusive) to the caller's COMMIT."""
    cur.execute("UPDATE inodes SET nlink = (SELECT COUNT(*) FROM dentries WHERE inode = %s) "
                "WHERE id = %s", (inode, inode))


def max_ctime(cur: pymysql.cursors.Cursor) -> int:
    """The largest inode ctime in ns (0 without inodes). A plain read of the caller's
    snapshot (a metadata snapshot's ctime mark). No lock."""
    cur.execute("SELECT COALESCE(MAX(ctime_ns), 0) FROM inodes")
    return int(cur.fetchone()[0])


def count_changed_since(db: Database, mark: int) -> int:
    """Inodes with ctime_ns > ``mark`` (one scan of the inodes table). No lock."""
    return int(db.query("SELECT COUNT(*) FROM inodes WHERE ctime_ns > %s", (mark,))[0][0])


# -- creates -----------------------------------------------------------
# A create (mknod, mkdir, symlink, create) is held in RAM (:class:`HeldCreates`) and
# written with the other creates held with it, by multi-row INSERTs, in one savepoint
# of the group transaction, before the next statement on the mount's connection and
# before every commit (cas.db.database.Database.write_held; docs/smallfiles.md). Locks: the
# INSERTs take the new rows' locks only; the UPDATE of a parent directory takes that
# inode row's lock. All inside the mount's group transaction, the only writer of the
# namespace (docs/concurrency.md).

#: the columns a held create writes: every inodes column but data_bytes (0 for a new inode)
INODE_COLS = INODE_COLUMNS[:INODE_COLUMNS.index("data_bytes")]


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
        to 500 creates. Raises pymysql errors (1062 for a name taken: cas.engine.fs checks names
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
            touch_dir(cur, parent, now, d)


#: meta key: every inode number a mount may hand out is below it (committed first)
INODE_NEXT_KEY = "inode_next"


def reserve_inodes(db: Database, at_least: int, n: int) -> int:
    """Reserve ``n`` inode numbers for a mount: returns the first, ``start`` = the
    greatest of ``at_least``, MAX(inodes.id) + 1 and the meta row ``inode_next``, and
    commits ``inode_next`` = ``start + n`` before it returns. ``db`` must be a connection
    of its own (not the mount's, whose group transaction is open): the reservation is
    durable even when the group that uses the numbers is lost, so that no later mount
    hands out a number of a lost create again (the rescue area names files by inode,
    cas/engine/rescue.py). Locks the meta row (``cas.db.volume.lock_value``, created if
    absent), reads inodes without locks.
    Raises MetaError."""
    def body(cur: Cursor) -> int:
        reserved = int(volume.lock_value(cur, INODE_NEXT_KEY, "0"))
        cur.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM inodes")
        start = max(at_least, int(cur.fetchone()[0]), reserved)
        volume.set_value(cur, INODE_NEXT_KEY, str(start + n))
        return start
    return db.transaction(body)


def entry_inode(db: Database, parent: int, name: bytes) -> int | None:
    """The inode that ``name`` in directory ``parent`` names, or None (primary key read,
    no lock), as committed or written into the group: the caller has checked that the
    name is not held (:attr:`HeldCreates.names`). Raises MetaError."""
    rows = db.query("SELECT inode FROM dentries WHERE parent = %s AND name = %s", (parent, name),
                    see_held=False)
    return int(rows[0][0]) if rows else None


def lookup_rows(db: Database, parent: int, name: bytes, small_bytes: int
                ) -> tuple[InodeRow, dict[int, bytes]] | None:
    """The inode row that ``name`` in directory ``parent`` names, and its manifest (slot
    -> chunk id) when it is a regular file of at most ``small_bytes`` bytes ({} for any
    other inode, or a file without manifest rows); None when the name is absent. One
    round trip (a cold open of a small file needs no other). Runs without writing held
    creates (see_held=False): the caller has checked that the name is not held. No lock.
    Raises MetaError."""
    found = db.query(
        f"SELECT {_ICOLS}, m.slot, m.chunk FROM dentries d JOIN inodes i ON i.id = d.inode "
        "LEFT JOIN manifests m ON m.inode = i.id AND (i.mode & 0xF000) = 0x8000 AND i.size <= %s "
        "WHERE d.parent = %s AND d.name = %s", (small_bytes, parent, name), see_held=False)
    if not found:
        return None
    width = len(InodeRow._fields)
    return _inode(found[0][:width]), {int(r[width]): bytes(r[width + 1]) for r in found if r[width] is not None}


def listing_extras(db: Database, no_xattrs_unknown: list[int], small: list[int]
                   ) -> tuple[set[int], dict[int, dict[int, bytes]]]:
    """For a listing batch, in one statement per :data:`cas.db.batch.BATCH_ROWS` inodes:
    which of ``no_xattrs_unknown`` have extended attributes (a set), and the manifests
    (slot -> chunk id; {} for none) of the small regular files ``small``. A UNION ALL
    of the two reads (xattr rows come with a NULL slot; inode 0 stands in for an empty
    list, no inode has it). No lock (plain reads). Raises MetaError."""
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


def insert_entry(cur: Cursor, parent: int, name: bytes, ino: int) -> None:
    """Insert the directory entry ``name`` of ``parent`` naming ``ino`` (link, rename
    into a new name); raises Exists (EEXIST) if ``name`` is taken (the primary key).
    X-locks the new row."""
    try:
        cur.execute("INSERT INTO dentries (parent, name, inode) VALUES (%s, %s, %s)", (parent, name, ino))
    except pymysql.err.IntegrityError as exc:
        if exc.args and exc.args[0] == 1062:
            raise Exists(name.decode(errors="replace")) from None
        raise




def create_one(cur: Cursor, row: Sequence[int], parent: int, name: bytes, target: bytes | None) -> None:
    """Write one create at once (a shared volume holds no creates in RAM,
    docs/sharing.md): the entry ``name`` of ``parent`` naming inode ``row[0]`` (raises
    Exists, EEXIST, when the name is taken, by this or another machine: nothing is
    written then), the inode row (``row`` in INODE_COLS order) and a symlink's
    ``target``. The caller updates the parent's row (:func:`touch_dir`) after. Locks: X
    on the new entry (a shared lock on an existing one), the new inode and symlink rows."""
    insert_entry(cur, parent, name, int(row[0]))
    cur.execute(f"INSERT INTO inodes ({', '.join(INODE_COLS)}) VALUES ({', '.join(['%s'] * len(INODE_COLS))})",
                list(row))
    if target is not None:
        cur.execute("INSERT INTO symlinks (inode, target) VALUES (%s, %s)", (int(row[0]), target))
