"""Metadata search (`casfs find`): one SQL query over a volume's namespace.

A :class:`Query` names a start directory (an inode) and tests that must all hold for an
entry to be printed, like find(1)'s expression with implicit ``-a``:

- ``name``: a shell glob on the entry's last component (fnmatch(3) without flags, as
  find(1)'s ``-name``): ``*`` any bytes, ``?`` one byte, ``[abc]``, ``[a-z]``, ``[!a]``
  (or ``[^a]``, as glibc) one byte of (not of) a set, a reversed range matching nothing,
  ``\\x`` the byte ``x``. Case-sensitive: names are
  VARBINARY (schema.sql), so LIKE and REGEXP compare bytes. A non-ASCII character is
  several bytes, so ``?`` and ``[...]`` do not match it; ``*`` does.
- ``size``: (op, bytes) with op ``>``, ``<`` or ``=``; exact bytes (find(1)'s ``-size``
  rounds up to its unit; ``-size +Nc``/``-Nc`` are the exact equivalents).
- ``mtime``: (op, ns) with op ``>`` (modified after ns since the epoch) or ``<``.
- ``ftype``: ``f``, ``d`` or ``l`` (regular file, directory, symlink).
- ``xattrs``: (name, value or None) pairs; the entry has the attribute (with that value).
- ``duplicates_of``: an inode; regular files other than it with the same size and the
  same chunk in every manifest slot (so byte-identical content, holes in the same places).
- ``status``: ``synced`` (every chunk of the file is confirmed in a pack on the cloud
  tier), ``pending`` (some chunk is not yet), ``cloud-only`` (some chunk has no local
  copy: it was evicted). Regular files only; a file with no chunks is synced.

The search runs on the committed database: with a mount running, what it has not yet
committed (at most WRITEBACK_INTERVAL_S for closed files, WRITEBACK_AGE_S for open ones,
docs/writeback.md) is not seen. It needs MariaDB >= 10.2 / MySQL 8 (WITH RECURSIVE).

Plan (docs/find.md): below a start directory other than the root, a recursive CTE walks
down the directories (only directories: each step joins ``dentries`` on its primary key
(parent, name) and ``inodes`` on its primary key), then the entries of those directories
are filtered (a name glob with a literal prefix uses the (parent, name) range). From the
root, the entries are filtered first (an xattr test drives from ``xattrs.name_idx``) and
the paths of the directories holding matches are built upward from them, so the cost is
that of the matches, not of the volume.
"""
from __future__ import annotations

import errno
import re
import stat as S
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pymysql.cursors

from .errors import FsError, MetaError, NotFound
from .meta import ROOT_INODE, Database

# bytes of a path the query can build: a column type that cannot truncate in practice
# (Linux's PATH_MAX, 4096, binds path arguments, not the depth of a tree: a tree
# made through relative paths can hold longer paths)
PATH_BYTES = 65535
_FMT, _DIR, _REG, _LNK = S.S_IFMT(0o170000), S.S_IFDIR, S.S_IFREG, S.S_IFLNK
TYPES = {"f": _REG, "d": _DIR, "l": _LNK}
STATUSES = ("synced", "pending", "cloud-only")
_SIZE_UNITS = {"": 1, "c": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# '' typed as a binary string of PATH_BYTES: a recursive CTE's column takes its type
# from the anchor row, and CAST('' AS BINARY(n)) would pad the value with n zero bytes
_EMPTY_PATH = f"IF(0, REPEAT(_binary' ', {PATH_BYTES}), _binary'')"
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Query:
    """What to look for; see the module docstring. ``start`` is a directory inode."""

    start: int = ROOT_INODE
    name: str | None = None
    size: tuple[str, int] | None = None
    mtime: tuple[str, int] | None = None
    ftype: str | None = None
    xattrs: tuple[tuple[bytes, bytes | None], ...] = ()
    duplicates_of: int | None = None
    status: str | None = None


@dataclass(frozen=True)
class Hit:
    """One entry found: its path relative to the start directory (bytes, no leading
    '/'), inode, st_mode, size (bytes) and mtime (ns since the epoch)."""

    path: bytes
    inode: int
    mode: int
    size: int
    mtime_ns: int

    @property
    def kind(self) -> str:
        """``f``, ``d``, ``l`` or ``o`` (other: device, fifo, socket)."""
        return next((k for k, v in TYPES.items() if self.mode & _FMT == v), "o")


def parse_size_test(text: str) -> tuple[str, int]:
    """``+1G`` -> ('>', 2**30), ``-10M`` -> ('<', 10 * 2**20), ``4096`` -> ('=', 4096).

    Units: none or c (bytes), k, M, G, T (powers of 1024, case-insensitive). Raises
    ValueError."""
    m = re.fullmatch(r"([+-]?)(\d+)([a-zA-Z]?)", text.strip())
    if not m or m.group(3).lower() not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size test (examples: +1G, -10M, 4096, +100k)")
    op = {"+": ">", "-": "<", "": "="}[m.group(1)]
    return op, int(m.group(2)) * _SIZE_UNITS[m.group(3).lower()]


def parse_age_test(text: str, now_ns: int | None = None) -> tuple[str, int]:
    """``-7d`` (modified less than 7 days ago) -> ('>', now - 7 d in ns); ``+1h`` (more
    than an hour ago) -> ('<', now - 1 h). Units s, m, h, d, w; none means days, as
    find(1)'s -mtime. Raises ValueError."""
    m = re.fullmatch(r"([+-])(\d+(?:\.\d+)?)([smhdw]?)", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not an age test (examples: -7d, +1h, -30m; + older, - newer)")
    now = time.time_ns() if now_ns is None else now_ns
    cutoff = now - int(float(m.group(2)) * _AGE_UNITS[m.group(3) or "d"] * 1_000_000_000)
    return (">" if m.group(1) == "-" else "<"), cutoff


def glob_to_sql(glob: str) -> tuple[bytes, bytes | None]:
    """A shell glob as (LIKE pattern, REGEXP or None), both on bytes.

    The LIKE pattern (escape character ``\\``) is exact for ``*``/``?`` globs; a glob with
    ``[...]`` gets ``_`` there and a REGEXP that is exact (PCRE, anchored). An unclosed
    ``[`` is a literal ``[`` (as fnmatch(3)).
    """
    g = glob.encode("utf-8", "surrogateescape")
    like, rx, exact = bytearray(), bytearray(b"(?s)^"), True
    i = 0
    while i < len(g):
        c = g[i:i + 1]
        if c == b"*":
            like += b"%"
            rx += b".*"
        elif c == b"?":
            like += b"_"
            rx += b"."
        elif c == b"[" and (end := _bracket_end(g, i)) > 0:
            body = g[i + 1:end]
            neg = body[:1] in (b"!", b"^")
            if neg:
                body = body[1:]
            like += b"_"
            # every byte but ranges' '-' escaped: PCRE reads "[." "[:" "[=" in a set as
            # POSIX collating elements and classes, which fnmatch here does not support
            cls = b"[" + (b"^" if neg else b"") + re.sub(rb"([^A-Za-z0-9-])", rb"\\\1", body) + b"]"
            try:
                re.compile(cls)
            except re.error:     # a reversed range such as [z-a]: the set is empty
                cls = b"(?!)"
            rx += cls
            exact = False
            i = end
        else:
            if c == b"\\" and i + 1 < len(g):
                i += 1
                c = g[i:i + 1]
            like += b"\\" + c if c in (b"%", b"_", b"\\") else c
            rx += re.escape(c)
        i += 1
    return bytes(like), None if exact else bytes(rx + b"$")


def _bracket_end(g: bytes, i: int) -> int:
    """Index of the ``]`` closing the bracket expression opened at ``g[i]``, or -1. A
    ``]`` right after ``[`` or ``[!`` belongs to the set (POSIX)."""
    j = i + 1
    if g[j:j + 1] in (b"!", b"^"):
        j += 1
    if g[j:j + 1] == b"]":
        j += 1
    end = g.find(b"]", j)
    return end


def resolve(db: Database, path: str | bytes) -> tuple[int, int]:
    """(inode, st_mode) of ``path`` relative to the volume root ('' or '/' is the root).

    Symlinks are not followed (a symlink in the middle is ENOTDIR). Raises NotFound,
    FsError(ENOTDIR)."""
    raw = path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")
    ino, mode = ROOT_INODE, _DIR
    for part in (p for p in raw.split(b"/") if p and p != b"."):
        if mode & _FMT != _DIR:
            raise FsError(f"{raw.decode(errors='replace')}: not a directory", errno.ENOTDIR)
        if part == b"..":
            rows = db.query("SELECT parent FROM dentries WHERE inode = %s LIMIT 1", (ino,))
            ino = int(rows[0][0]) if rows else ROOT_INODE
            mode = _DIR
            continue
        rows = db.query("SELECT i.id, i.mode FROM dentries d JOIN inodes i ON i.id = d.inode "
                        "WHERE d.parent = %s AND d.name = %s", (ino, part))
        if not rows:
            raise NotFound(f"{raw.decode(errors='replace')}: no such file or directory in the volume")
        ino, mode = int(rows[0][0]), int(rows[0][1])
    return ino, mode


@dataclass
class _Sql:
    where: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)

    def add(self, cond: str, *args: Any) -> None:
        self.where.append(cond)
        self.args.extend(args)


def _filters(q: Query) -> _Sql:
    """The WHERE conditions on ``d`` (dentries) and ``i`` (inodes) for ``q``."""
    s = _Sql()
    if q.name is not None:
        like, rx = glob_to_sql(q.name)
        s.add("d.name LIKE %s", like)
        if rx is not None:
            s.add("d.name REGEXP %s", rx)
    if q.ftype is not None:
        s.add("i.mode & %s = %s", _FMT, TYPES[q.ftype])
    if q.size is not None:
        s.add(f"i.size {q.size[0]} %s", q.size[1])
    if q.mtime is not None:
        s.add(f"i.mtime_ns {q.mtime[0]} %s", q.mtime[1])
    for name, value in q.xattrs:
        if value is None:
            s.add("i.id IN (SELECT x.inode FROM xattrs x WHERE x.name = %s)", name)
        else:
            s.add("i.id IN (SELECT x.inode FROM xattrs x WHERE x.name = %s AND x.value = %s)", name, value)
    if q.duplicates_of is not None:
        f = q.duplicates_of
        # same size, same number of slots, and each of f's slots holds the same chunk
        s.add("i.mode & %s = %s AND i.id <> %s AND i.size = (SELECT size FROM inodes WHERE id = %s) "
              "AND (SELECT COUNT(*) FROM manifests c WHERE c.inode = i.id) = "
              "(SELECT COUNT(*) FROM manifests c WHERE c.inode = %s) "
              "AND NOT EXISTS (SELECT 1 FROM manifests a WHERE a.inode = %s AND NOT EXISTS "
              "(SELECT 1 FROM manifests b WHERE b.inode = i.id AND b.slot = a.slot AND b.chunk = a.chunk))",
              _FMT, _REG, f, f, f, f)
    if q.status is not None:
        s.add("i.mode & %s = %s", _FMT, _REG)
        unconfirmed = ("EXISTS (SELECT 1 FROM manifests m LEFT JOIN pack_entries e ON e.chunk = m.chunk "
                       "WHERE m.inode = i.id AND e.chunk IS NULL)")
        if q.status == "synced":
            s.add("NOT " + unconfirmed)
        elif q.status == "pending":
            s.add(unconfirmed)
        elif q.status == "cloud-only":
            s.add("EXISTS (SELECT 1 FROM manifests m JOIN chunks c ON c.id = m.chunk "
                  "WHERE m.inode = i.id AND c.is_local = 0)")
        else:
            raise ValueError(f"status {q.status!r}: one of {', '.join(STATUSES)}")
    return s


def sql(q: Query) -> tuple[str, list[Any]]:
    """The one statement that answers ``q`` and its arguments. Rows: (path relative to
    q.start, inode, mode, size, mtime_ns)."""
    f = _filters(q)
    where = " AND ".join(["1"] + f.where)
    cols = "i.id, i.mode, i.size, i.mtime_ns"
    if q.start != ROOT_INODE:
        text = (
            "WITH RECURSIVE dirs (ino, path) AS ("
            f" SELECT %s, {_EMPTY_PATH}"
            " UNION ALL"
            " SELECT d.inode, CONCAT(t.path, d.name, '/') FROM dirs t"
            " JOIN dentries d ON d.parent = t.ino JOIN inodes i ON i.id = d.inode"
            f" WHERE i.mode & {_FMT} = {_DIR})"
            f" SELECT CONCAT(t.path, d.name), {cols} FROM dirs t"
            f" JOIN dentries d ON d.parent = t.ino JOIN inodes i ON i.id = d.inode WHERE {where}")
        return text, [q.start, *f.args]
    # with only inode tests (type, size, mtime: no index can serve `mode & m`), scanning
    # inodes and looking their entries up costs a fifth of the other order (measured at
    # 1,000,000 files); otherwise the optimizer picks (a name glob scans dentries, an
    # xattr test drives from xattrs.name_idx)
    inode_only = q.name is None and not q.xattrs and q.duplicates_of is None and q.status is None
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
    return text, f.args


def search(db: Database, q: Query) -> Iterator[Hit]:
    """Run ``q`` on ``db`` and yield its hits as the server streams them (unordered; an
    unbuffered cursor, so a million hits take no more RAM than one). Raises MetaError
    (converted by the caller's Database helpers when the server fails)."""
    text, args = sql(q)
    try:
        with db.conn.cursor(pymysql.cursors.SSCursor) as cur:
            cur.execute(text, args)
            for path, ino, mode, size, mtime in cur:
                yield Hit(bytes(path), int(ino), int(mode), int(size), int(mtime))
    except pymysql.err.MySQLError as exc:
        raise MetaError(f"search failed on {db.target.describe()}: {exc}") from exc
