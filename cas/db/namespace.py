# -- used by gc, the cloud tier and maintenance (part B)
# The statements on ``inodes`` and ``dentries`` that fsck, fsck --cloud, repair and
# snapshots run: reads (paths of damaged files, counts) and fsck --repair's link
# counts. docs/metadata-packs.md.
from __future__ import annotations

import stat as S
from typing import TYPE_CHECKING, NamedTuple

import pymysql.cursors

if TYPE_CHECKING:
    from cas.meta import Database


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


def first_name(db: Database, inode: int) -> NameOf | None:
    """One directory entry naming ``inode`` (any), or None. No lock."""
    rows = db.query("SELECT parent, name FROM dentries WHERE inode = %s LIMIT 1", (inode,))
    return None if not rows else NameOf(int(rows[0][0]), bytes(rows[0][1]))


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


def count_inodes(db: Database) -> int:
    """Inode rows. No lock."""
    return int(db.query("SELECT COUNT(*) FROM inodes")[0][0])
