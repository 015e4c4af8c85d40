"""Kernel-facing caches of the FUSE layer: which files may keep their page cache across
opens (``keep_cache``), recently listed directories (pyfuse3 cannot ask the kernel to
cache listings), and the mode an access ACL implies (the kernel leaves setting it to
the filesystem; fusefront/acl.py). See fusefront/operations.py for how they are used.
"""
from __future__ import annotations

import struct
from collections import OrderedDict

import pyfuse3

from cas.errors import InvalidArgument
from cas.engine.fs import Attr

PAGE_GUARD_ENTRIES = 50_000    # inodes whose last-seen (size, mtime) is remembered
LISTING_ENTRIES = 30_000       # directory entries kept by _Listings, all directories together
LISTING_TAILS = 64             # directories whose unsent rest of an engine batch is kept


_ACL_PERMS = {0x01: 6, 0x04: 3, 0x20: 0}   # ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER: mode shift
_ACL_MASK = 0x10
_ACL_NAMED = (0x02, 0x08)                  # ACL_USER, ACL_GROUP


def acl_mode(value: bytes) -> tuple[int, bool]:
    """The permission bits a POSIX access ACL (the kernel's xattr form: version 2, then
    (tag, perm, id) entries) gives a file, and whether the ACL says no more than those
    bits (only the owner, group and other entries), as posix_acl_equiv_mode(). Raises
    InvalidArgument for a malformed ACL."""
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value)[0] != 2:
        raise InvalidArgument("malformed POSIX ACL")
    mode = 0
    equivalent = True
    for tag, perm, _ in struct.iter_unpack("<HHI", value[4:]):
        perm &= 0o7
        if tag in _ACL_PERMS:
            mode |= perm << _ACL_PERMS[tag]
        elif tag == _ACL_MASK:  # with named entries, the mask is what the group bits show
            mode = (mode & ~0o070) | perm << 3
            equivalent = False
        elif tag in _ACL_NAMED:
            equivalent = False
        else:
            raise InvalidArgument(f"POSIX ACL entry tag {tag:#x}")
    return mode, equivalent


class PageCacheGuard:
    """Decides ``keep_cache`` for each open: keep the kernel's cached pages of a file only
    if nothing changed the file since it was last opened or closed.

    The kernel keeps its page cache coherent for writes and truncations made through the
    mount; this guard is the second line: a file whose contents changed (write,
    truncate, O_TRUNC) since its last open or close, or whose size or mtime in the
    engine is not what it was then (a change the kernel cannot have seen), is opened
    without ``keep_cache`` and the kernel drops its pages. An inode it knows nothing
    about (never seen, forgotten by the kernel, or pushed out of the bounded table) is
    treated as changed.
    """

    def __init__(self, limit: int = PAGE_GUARD_ENTRIES) -> None:
        self.limit = limit
        self.seen: dict[int, int] = {}  # ino -> hash((size, mtime)), oldest first

    def changed(self, ino: int) -> None:
        """The contents of ``ino`` changed through the mount."""
        self.seen.pop(ino, None)

    def record(self, attr: Attr) -> None:
        """``attr`` is what the kernel now holds pages of (an open or a close)."""
        self.seen.pop(attr.ino, None)
        self.seen[attr.ino] = hash((attr.size, attr.mtime_ns))
        if len(self.seen) > self.limit:
            del self.seen[next(iter(self.seen))]

    def keep(self, attr: Attr) -> bool:
        """Whether an open of ``attr.ino`` may keep the kernel's cached pages."""
        return self.seen.get(attr.ino) == hash((attr.size, attr.mtime_ns))

    def times_changed(self, attr: Attr) -> None:
        """Only the times or mode of ``attr.ino`` changed (setattr without a size)."""
        if attr.ino in self.seen:
            self.record(attr)

    def clear(self) -> None:
        self.seen.clear()


class Listings:
    """Recently listed directories: (name, inode, offset) rows from offset 0, in order.

    Rows are appended as a listing proceeds (``complete`` once the end is reached) and a
    directory's rows are dropped by any change of its entries (:meth:`drop`). At most
    ``limit`` rows are kept over all directories (least recently used go first; a
    directory larger than that is not kept). Attributes are not kept: the engine's
    write-through attribute cache is asked for each entry. Offsets are the engine's
    (dentry ids); the FUSE layer adds '.' and '..' and shifts them (docs/posix.md).

    A directory not kept (too large, or listed from an offset other than 0) is still
    read from the database once: the kernel takes one reply buffer of entries per
    readdir request (a page on older kernels, up to the reader's buffer on newer ones),
    the engine returns batches of 256 rows, and the rows a reply had no room for are
    kept as the directory's *tail* (:meth:`keep_tail`, at most ``LISTING_TAILS``
    directories) for the request that continues from there.
    """

    class Rows:
        __slots__ = ("names", "inos", "offs", "replies", "complete")

        def __init__(self) -> None:
            self.names: list[bytes] = []
            self.inos: list[int] = []
            self.offs: list[int] = []
            # the last reply built for each row, with the engine's Attr it was built from
            self.replies: list[tuple[Attr, pyfuse3.EntryAttributes]] = []
            self.complete = False

    def __init__(self, limit: int = LISTING_ENTRIES) -> None:
        self.limit = limit
        self.dirs: OrderedDict[int, Listings.Rows] = OrderedDict()
        self.total = 0
        # ino -> (engine offset the rows follow, rows, replies built for them)
        self.tails: OrderedDict[int, tuple[int, list[tuple[bytes, Attr, int]],
                                           list[tuple[Attr, pyfuse3.EntryAttributes]]]] = OrderedDict()

    def get(self, ino: int, start: bool) -> Rows | None:
        """The rows of ``ino`` (most recently used now); new ones if ``start`` (offset 0)."""
        rows = self.dirs.get(ino)
        if rows is not None:
            self.dirs.move_to_end(ino)
        elif start:
            rows = self.dirs[ino] = self.Rows()
        return rows

    def append(self, ino: int, rows: Rows, batch: list[tuple[bytes, Attr, int]],
               replies: list[tuple[Attr, pyfuse3.EntryAttributes]]) -> bool:
        """Append ``batch`` (the next rows after ``rows.offs[-1]``) and the replies built
        for it to ``ino``'s rows. Returns False (and drops the directory) when it would
        exceed the limit."""
        if self.dirs.get(ino) is not rows:
            return False
        if len(rows.offs) + len(batch) > self.limit:
            self.drop(ino)
            return False
        for name, attr, off in batch:
            rows.names.append(name)
            rows.inos.append(attr.ino)
            rows.offs.append(off)
        rows.replies.extend(replies)
        self.total += len(batch)
        while self.total > self.limit:
            _, dropped = self.dirs.popitem(last=False)
            self.total -= len(dropped.offs)
        return ino in self.dirs

    def keep_tail(self, ino: int, after: int, batch: list[tuple[bytes, Attr, int]],
                  replies: list[tuple[Attr, pyfuse3.EntryAttributes]]) -> None:
        """Keep ``batch`` (engine rows following offset ``after``, not sent yet) and their
        replies for the next readdir of ``ino`` from ``after``."""
        self.tails[ino] = (after, batch, replies)
        self.tails.move_to_end(ino)
        if len(self.tails) > LISTING_TAILS:
            self.tails.popitem(last=False)

    def take_tail(self, ino: int, after: int) -> tuple[list[tuple[bytes, Attr, int]],
                                                       list[tuple[Attr, pyfuse3.EntryAttributes]]] | None:
        """The rows kept by :meth:`keep_tail` if they follow offset ``after``, else None."""
        tail = self.tails.pop(ino, None)
        if tail is None or tail[0] != after:
            return None
        return tail[1], tail[2]

    def drop(self, ino: int) -> None:
        self.tails.pop(ino, None)
        rows = self.dirs.pop(ino, None)
        if rows is not None:
            self.total -= len(rows.offs)

    def clear(self) -> None:
        self.dirs.clear()
        self.tails.clear()
        self.total = 0
