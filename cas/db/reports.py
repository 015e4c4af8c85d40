"""Read-only statements across table groups, for what operators read: `casfs find`,
`casfs du`, `casfs stats` and the sync status of a file (docs/find.md, docs/status.md).

None of them takes a lock: each is one statement, so under READ COMMITTED it reads one
consistent snapshot (of the committed database when run on a connection of its own, as
the CLI does; a mount's own connection also sees its open group's rows). The figures are
defined in the modules that present them (cas/maint/find.py, cas/maint/du.py, cas/maint/stats.py,
cas/engine/syncstatus.py); invariant 22 (docs/design.md) is the rule they keep.
"""
from __future__ import annotations

import stat as S
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import pymysql.cursors

from cas.errors import MetaError
from cas.db.database import ROOT_INODE, Database
from cas.db.namespace import Dentry
from cas.db.source import Source, rows

_FMT, _DIR, _REG, _LNK = S.S_IFMT(0o170000), S.S_IFDIR, S.S_IFREG, S.S_IFLNK
# bytes of a path the find statement can build: a column type that cannot truncate in
# practice (Linux's PATH_MAX, 4096, binds path arguments, not the depth of a tree: a tree
# made through relative paths can hold longer paths)
PATH_BYTES = 65535
# '' typed as a binary string of PATH_BYTES: a recursive CTE's column takes its type
# from the anchor row, and CAST('' AS BINARY(n)) would pad the value with n zero bytes
_EMPTY_PATH = f"IF(0, REPEAT(_binary' ', {PATH_BYTES}), _binary'')"
#: the sync states `casfs find --status` knows (cas/maint/find.py)
FIND_STATUSES = ("synced", "pending", "cloud-only")


# -- find --------------------------------------------------------------------------------

class FoundRow(NamedTuple):
    """One hit of the find statement: path relative to the start directory (bytes),
    inode, st_mode, size (bytes), mtime (ns since the epoch)."""

    path: bytes
    inode: int
    mode: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FindFilter:
    """The tests of a search, all of which must hold (cas.maint.find.Query, resolved):
    ``like``/``regexp`` on the entry's name (bytes patterns, cas.maint.find.glob_to_sql),
    ``ftype_mode`` an S_IFMT value, ``size`` and ``mtime`` (op, value) with op one of
    ``>``, ``<``, ``=`` (bytes; ns), ``xattrs`` (name, value or None) pairs,
    ``duplicates_of`` an inode, ``status`` one of FIND_STATUSES."""

    like: bytes | None = None
    regexp: bytes | None = None
    ftype_mode: int | None = None
    size: tuple[str, int] | None = None
    mtime: tuple[str, int] | None = None
    xattrs: tuple[tuple[bytes, bytes | None], ...] = ()
    duplicates_of: int | None = None
    status: str | None = None


@dataclass
class _Sql:
    where: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)

    def add(self, cond: str, *args: Any) -> None:
        self.where.append(cond)
        self.args.extend(args)


_OPS = (">", "<", "=")


def _filters(f: FindFilter) -> _Sql:
    """The WHERE conditions on ``d`` (dentries) and ``i`` (inodes) for ``f``. Raises
    ValueError for an unknown status or comparison."""
    s = _Sql()
    if f.like is not None:
        s.add("d.name LIKE %s", f.like)
        if f.regexp is not None:
            s.add("d.name REGEXP %s", f.regexp)
    if f.ftype_mode is not None:
        s.add("i.mode & %s = %s", _FMT, f.ftype_mode)
    for col, test in (("size", f.size), ("mtime_ns", f.mtime)):
        if test is not None:
            if test[0] not in _OPS:
                raise ValueError(f"comparison {test[0]!r}: one of {', '.join(_OPS)}")
            s.add(f"i.{col} {test[0]} %s", test[1])
    for name, value in f.xattrs:
        if value is None:
            s.add("i.id IN (SELECT x.inode FROM xattrs x WHERE x.name = %s)", name)
        else:
            s.add("i.id IN (SELECT x.inode FROM xattrs x WHERE x.name = %s AND x.value = %s)", name, value)
    if f.duplicates_of is not None:
        d = f.duplicates_of
        # same size, same number of slots, and each of d's slots holds the same chunk
        s.add("i.mode & %s = %s AND i.id <> %s AND i.size = (SELECT size FROM inodes WHERE id = %s) "
              "AND (SELECT COUNT(*) FROM manifests c WHERE c.inode = i.id) = "
              "(SELECT COUNT(*) FROM manifests c WHERE c.inode = %s) "
              "AND NOT EXISTS (SELECT 1 FROM manifests a WHERE a.inode = %s AND NOT EXISTS "
              "(SELECT 1 FROM manifests b WHERE b.inode = i.id AND b.slot = a.slot AND b.chunk = a.chunk))",
              _FMT, _REG, d, d, d, d)
    if f.status is not None:
        s.add("i.mode & %s = %s", _FMT, _REG)
        unconfirmed = ("EXISTS (SELECT 1 FROM manifests m LEFT JOIN pack_entries e ON e.chunk = m.chunk "
                       "WHERE m.inode = i.id AND e.chunk IS NULL)")
        if f.status == "synced":
            s.add("NOT " + unconfirmed)
        elif f.status == "pending":
            s.add(unconfirmed)
        elif f.status == "cloud-only":
            s.add("EXISTS (SELECT 1 FROM manifests m JOIN chunks c ON c.id = m.chunk "
                  "WHERE m.inode = i.id AND c.is_local = 0)")
        else:
            raise ValueError(f"status {f.status!r}: one of {', '.join(FIND_STATUSES)}")
    return s


def find_statement(start: int, f: FindFilter) -> tuple[str, list[Any]]:
    """The one statement that finds the entries below directory ``start`` passing ``f``,
    and its arguments. Rows: (path relative to start, inode, mode, size, mtime_ns).

    Plan (docs/find.md): below a start directory other than the root, a recursive CTE
    walks down the directories, then their entries are filtered; from the root, the
    entries are filtered first and the paths of the directories holding matches are
    built upward from them, so the cost is that of the matches, not of the volume.
    Builds the statement only (no lock; :func:`find` runs it, taking none either).
    Raises ValueError for an unknown status or comparison."""
    flt = _filters(f)
    where = " AND ".join(["1"] + flt.where)
    cols = "i.id, i.mode, i.size, i.mtime_ns"
    if start != ROOT_INODE:
        text = (
            "WITH RECURSIVE dirs (ino, path) AS ("
            f" SELECT %s, {_EMPTY_PATH}"
            " UNION ALL"
            " SELECT d.inode, CONCAT(t.path, d.name, '/') FROM dirs t"
            " JOIN dentries d ON d.parent = t.ino JOIN inodes i ON i.id = d.inode"
            f" WHERE i.mode & {_FMT} = {_DIR})"
            f" SELECT CONCAT(t.path, d.name), {cols} FROM dirs t"
            f" JOIN dentries d ON d.parent = t.ino JOIN inodes i ON i.id = d.inode WHERE {where}")
        return text, [start, *flt.args]
    # with only inode tests (type, size, mtime: no index can serve `mode & m`), scanning
    # inodes and looking their entries up costs a fifth of the other order (measured at
    # 1,000,000 files); otherwise the optimizer picks (a name glob scans dentries, an
    # xattr test drives from xattrs.name_idx)
    inode_only = f.like is None and not f.xattrs and f.duplicates_of is None and f.status is None
    join = ("inodes i STRAIGHT_JOIN dentries d ON d.inode = i.id" if inode_only
            else "dentries d JOIN inodes i ON i.id = d.inode")
    text = (
        "WITH RECURSIVE hits AS ("
        f" SELECT d.parent, d.name, {cols} FROM {join} WHERE {where}),"
        " up (dir, cur, path) AS ("
        f" SELECT p.parent, p.parent, {_EMPTY_PATH} FROM (SELECT DISTINCT parent FROM hits) p"
        " UNION ALL"
        " SELECT u.dir, d.parent, CONCAT(d.name, '/', u.path) FROM up u"
        f" JOIN dentries d ON d.inode = u.cur WHERE u.cur <> {ROOT_INODE})"
        " SELECT CONCAT(u.path, h.name), h.id, h.mode, h.size, h.mtime_ns FROM hits h"
        f" JOIN up u ON u.dir = h.parent AND u.cur = {ROOT_INODE}")
    return text, flt.args


def find(db: Database, start: int, f: FindFilter) -> Iterator[FoundRow]:
    """Run :func:`find_statement` on ``db`` and yield its rows as the server streams them
    (unordered; an unbuffered cursor, so a million hits take no more RAM than one). No
    lock. Raises MetaError."""
    text, args = find_statement(start, f)
    try:
        with db.conn.cursor(pymysql.cursors.SSCursor) as cur:
            cur.execute(text, args)
            for path, ino, mode, size, mtime in cur:
                yield FoundRow(bytes(path), int(ino), int(mode), int(size), int(mtime))
    except pymysql.err.MySQLError as exc:
        raise MetaError(f"search failed on {db.target.describe()}: {exc}") from exc


# -- du ----------------------------------------------------------------------------------

class SubtreeUsage(NamedTuple):
    """The raw figures of one subtree (cas.maint.du.Usage defines them): regular files,
    their sizes, their bytes outside holes, directories below the start, then the
    plaintext and envelope bytes of the chunks referenced only inside (unique) and also
    outside (shared) the subtree, and the number of distinct chunks."""

    files: int
    logical: int
    data: int
    directories: int
    unique: int
    unique_stored: int
    shared: int
    shared_stored: int
    chunks: int


def subtree_usage(src: Source, inode: int) -> SubtreeUsage:
    """The figures of the subtree at directory (or regular file) ``inode``, in one
    statement. For the root every linked inode is in the subtree: the inodes are scanned
    instead of walking the tree (docs/find.md gives both times at 1,000,000 files). No
    lock."""
    if inode == ROOT_INODE:
        tree = (f"tree (ino) AS (SELECT id FROM inodes WHERE nlink > 0 AND mode & {_FMT} = {_DIR}),"
                " files AS (SELECT i.id, i.size, i.data_bytes FROM inodes i"
                f" WHERE i.nlink > 0 AND i.mode & {_FMT} = {_REG}),")
        args: tuple[int, ...] = ()
    else:
        tree = (
            "tree (ino) AS ("
            " SELECT %s"
            " UNION ALL"
            " SELECT d.inode FROM tree t JOIN dentries d ON d.parent = t.ino JOIN inodes i ON i.id = d.inode"
            f" WHERE i.mode & {_FMT} = {_DIR}),"
            " files AS ("
            " SELECT i.id, i.size, i.data_bytes FROM inodes i WHERE i.id = %s AND i.mode & %s = %s"
            " UNION"
            " SELECT i.id, i.size, i.data_bytes FROM tree t JOIN dentries d ON d.parent = t.ino"
            f" JOIN inodes i ON i.id = d.inode WHERE i.mode & {_FMT} = {_REG}),")
        args = (inode, inode, _FMT, _REG)
    text = (
        f"WITH RECURSIVE {tree}"
        " refs AS (SELECT m.chunk, COUNT(*) AS n FROM files f JOIN manifests m ON m.inode = f.id GROUP BY m.chunk)"
        " SELECT f.n, f.logical, f.data, (SELECT COUNT(*) - 1 FROM tree), c.* FROM"
        " (SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS logical, COALESCE(SUM(LEAST(data_bytes, size)), 0) AS data"
        "  FROM files) f CROSS JOIN"
        " (SELECT COALESCE(SUM(IF(r.n >= c.refcount, c.length, 0)), 0),"
        "  COALESCE(SUM(IF(r.n >= c.refcount, c.stored_length, 0)), 0),"
        "  COALESCE(SUM(IF(r.n < c.refcount, c.length, 0)), 0),"
        "  COALESCE(SUM(IF(r.n < c.refcount, c.stored_length, 0)), 0), COUNT(*)"
        "  FROM refs r JOIN chunks c ON c.id = r.chunk) c")
    return SubtreeUsage(*(int(v) for v in rows(src, text, args)[0]))


def subdirectories(src: Source, inode: int) -> list[Dentry]:
    """The entries of directory ``inode`` that name directories, by name. No lock."""
    return [Dentry(inode, bytes(n), int(i)) for n, i in rows(
        src, "SELECT d.name, d.inode FROM dentries d JOIN inodes i ON i.id = d.inode "
             "WHERE d.parent = %s AND i.mode & %s = %s ORDER BY d.name", (inode, _FMT, _DIR))]


# -- sync status -------------------------------------------------------------------------

class FileChunks(NamedTuple):
    """Where the distinct chunks of one file are: how many, how many have a local file,
    how many a confirmed cloud copy (a ``pack_entries`` row, invariant 18), and the
    envelope bytes of those without one."""

    chunks: int
    local: int
    in_cloud: int
    queued_bytes: int


def file_chunks(src: Source, ino: int) -> FileChunks:
    """The :class:`FileChunks` of inode ``ino``, in one statement. No lock."""
    r = rows(src,
             "SELECT COUNT(*), COALESCE(SUM(c.is_local <> 0), 0), COALESCE(SUM(e.chunk IS NOT NULL), 0), "
             "COALESCE(SUM(IF(e.chunk IS NULL, c.stored_length, 0)), 0) "
             "FROM (SELECT DISTINCT chunk FROM manifests WHERE inode = %s) m "
             "JOIN chunks c ON c.id = m.chunk LEFT JOIN pack_entries e ON e.chunk = m.chunk", (ino,))[0]
    return FileChunks(*(int(v) for v in r))


# -- stats -------------------------------------------------------------------------------

class NamespaceFigures(NamedTuple):
    """Linked inodes by type, the logical bytes of the regular files and the bytes of
    them in holes (cas.maint.stats defines them)."""

    files: int
    directories: int
    symlinks: int
    logical: int
    sparse: int


class ChunkFigures(NamedTuple):
    """Bytes the manifests reference (plaintext, per slot), chunk rows, their envelope
    bytes, live chunks (refcount > 0), their plaintext and envelope bytes."""

    referenced: int
    chunks: int
    stored: int
    live: int
    unique: int
    live_stored: int


class CloudFigures(NamedTuple):
    """Envelope bytes with a local file; live chunks local only, cloud only, both;
    confirmed packs and their bytes; queued uploads."""

    local_bytes: int
    local_only: int
    cloud_only: int
    both: int
    packs: int
    cloud_bytes: int
    queued: int


def namespace_figures(src: Source) -> NamespaceFigures:
    """The :class:`NamespaceFigures` of the volume (two scans of inodes). No lock."""
    fmt, reg, dir_, lnk = _FMT, _REG, _DIR, _LNK
    files, dirs, links, logical = rows(
        src, "SELECT COALESCE(SUM(mode & %s = %s), 0), COALESCE(SUM(mode & %s = %s), 0), "
             "COALESCE(SUM(mode & %s = %s), 0), COALESCE(SUM(IF(mode & %s = %s, size, 0)), 0) "
             "FROM inodes WHERE nlink > 0", (fmt, reg, fmt, dir_, fmt, lnk, fmt, reg))[0]
    sparse = rows(src, "SELECT COALESCE(SUM(GREATEST(CAST(size AS SIGNED) - CAST(data_bytes AS SIGNED), 0)), 0) "
                       "FROM inodes WHERE nlink > 0 AND mode & %s = %s", (fmt, reg))[0][0]
    return NamespaceFigures(int(files), int(dirs), int(links), int(logical), int(sparse))


def chunk_figures(src: Source) -> ChunkFigures:
    """The :class:`ChunkFigures` of the volume (a join of manifests and chunks, a scan of
    chunks). No lock."""
    referenced = rows(src, "SELECT COALESCE(SUM(c.length), 0) FROM manifests m JOIN chunks c ON c.id = m.chunk")[0][0]
    chunks, stored, live, unique, live_stored = rows(
        src, "SELECT COUNT(*), COALESCE(SUM(stored_length), 0), COALESCE(SUM(refcount > 0), 0), "
             "COALESCE(SUM(IF(refcount > 0, length, 0)), 0), COALESCE(SUM(IF(refcount > 0, stored_length, 0)), 0) "
             "FROM chunks")[0]
    return ChunkFigures(int(referenced), int(chunks), int(stored), int(live), int(unique), int(live_stored))


def cloud_figures(src: Source) -> CloudFigures:
    """The :class:`CloudFigures` of the volume (chunks joined to pack_entries, packs,
    upload_queue). No lock."""
    local_bytes, local_only, cloud_only, both = rows(
        src, "SELECT COALESCE(SUM(IF(c.is_local = 1, c.stored_length, 0)), 0), "
             "COALESCE(SUM(c.refcount > 0 AND c.is_local = 1 AND e.chunk IS NULL), 0), "
             "COALESCE(SUM(c.refcount > 0 AND c.is_local = 0), 0), "
             "COALESCE(SUM(c.refcount > 0 AND c.is_local = 1 AND e.chunk IS NOT NULL), 0) "
             "FROM chunks c LEFT JOIN pack_entries e ON e.chunk = c.id")[0]
    packs, cloud_bytes = rows(src, "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM packs WHERE state = 'confirmed'")[0]
    queued = rows(src, "SELECT COUNT(*) FROM upload_queue")[0][0]
    return CloudFigures(int(local_bytes), int(local_only), int(cloud_only), int(both), int(packs),
                        int(cloud_bytes), int(queued))



# -- the server's clock ------------------------------------------------------------------

def server_utc_now(src: Source) -> datetime:
    """The database server's UTC wall clock (``UTC_TIMESTAMP()``, whole seconds, naive
    datetime): what ages of timestamps the server or a snapshot wrote in UTC are
    measured against (the metrics' last-snapshot age). No lock (no table)."""
    value = rows(src, "SELECT UTC_TIMESTAMP()")[0][0]
    if not isinstance(value, datetime):
        raise MetaError(f"UTC_TIMESTAMP() returned {value!r}")
    return value
