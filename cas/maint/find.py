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
from dataclasses import dataclass
from typing import Any

from cas.db import namespace as ns
from cas.db import reports
from cas.errors import FsError, NotFound
from cas.db.database import ROOT_INODE, Database

# bytes of a path the query can build (cas.db.reports.PATH_BYTES, docs/find.md)
PATH_BYTES = reports.PATH_BYTES
_FMT, _DIR, _REG, _LNK = S.S_IFMT(0o170000), S.S_IFDIR, S.S_IFREG, S.S_IFLNK
TYPES = {"f": _REG, "d": _DIR, "l": _LNK}
STATUSES = reports.FIND_STATUSES
_SIZE_UNITS = {"": 1, "c": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
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
            up = ns.parent_of(db, ino)
            ino = up if up is not None else ROOT_INODE
            mode = _DIR
            continue
        row = ns.lookup(db, ino, part)
        if row is None:
            raise NotFound(f"{raw.decode(errors='replace')}: no such file or directory in the volume")
        ino, mode = row.id, row.mode
    return ino, mode


def _filter(q: Query) -> reports.FindFilter:
    """The tests of ``q`` resolved for the statement: the glob as LIKE/REGEXP patterns,
    the type as an S_IFMT value."""
    like, rx = glob_to_sql(q.name) if q.name is not None else (None, None)
    return reports.FindFilter(like=like, regexp=rx, ftype_mode=None if q.ftype is None else TYPES[q.ftype],
                              size=q.size, mtime=q.mtime, xattrs=q.xattrs, duplicates_of=q.duplicates_of,
                              status=q.status)


def sql(q: Query) -> tuple[str, list[Any]]:
    """The one statement that answers ``q`` and its arguments
    (:func:`cas.db.reports.find_statement`). Rows: (path relative to q.start, inode,
    mode, size, mtime_ns)."""
    return reports.find_statement(q.start, _filter(q))


def search(db: Database, q: Query) -> Iterator[Hit]:
    """Run ``q`` on ``db`` and yield its hits as the server streams them (unordered; an
    unbuffered cursor, so a million hits take no more RAM than one). Raises MetaError
    (converted by the caller's Database helpers when the server fails)."""
    for r in reports.find(db, q.start, _filter(q)):
        yield Hit(r.path, r.inode, r.mode, r.size, r.mtime_ns)
