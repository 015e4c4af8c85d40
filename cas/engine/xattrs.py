"""Extended attribute limits and the engine's bounded xattr cache (docs/security.md).

Any user who can write a file can set ``user.*`` xattrs on it, so their RAM and
database cost must be bounded: one inode holds at most :data:`XATTR_INODE_MAX` bytes of
names and values together (ENOSPC beyond, as ext4 does when an inode's xattr space is
full), one value at most ``XATTR_SIZE_MAX`` (E2BIG, Linux xattr(7)), and the engine's
write-through cache of xattrs holds at most :data:`XATTR_CACHE_BYTES` (least recently
used inodes are dropped and re-read from the database when needed).
"""
from __future__ import annotations

import errno
from collections import OrderedDict

from cas.errors import FsError, InvalidArgument

XATTR_NAME_MAX = 255               # bytes, Linux limits.h
XATTR_INODE_MAX = 128 * 1024       # bytes of names + values of one inode
XATTR_CACHE_BYTES = 16 * 1024 * 1024  # RAM of the xattr cache, all inodes together
ENTRY_OVERHEAD = 100               # bytes counted per cached name/value pair (dict slot, objects)
INODE_OVERHEAD = 250               # bytes counted per cached inode (its dict, the table slot)
# namespaces (xattr(7)); a name that is just a prefix names nothing: EINVAL as on ext4
PREFIXES = (b"user.", b"trusted.", b"security.", b"system.")


def check_name(name: bytes) -> None:
    """Raise FsError: ERANGE for an empty name or one over 255 bytes (Linux xattr(7)),
    EINVAL for a bare namespace prefix such as ``user.`` (Linux xattr_resolve_name)."""
    if len(name) > XATTR_NAME_MAX or not name:
        raise FsError("xattr name", errno.ERANGE)
    if name in PREFIXES:
        raise InvalidArgument(f"xattr name {name!r} has an empty suffix")


def space(x: dict[bytes, bytes]) -> int:
    """Bytes of names and values in ``x`` (what XATTR_INODE_MAX bounds)."""
    return sum(len(n) + len(v) for n, v in x.items())


def check_space(current: dict[bytes, bytes], name: bytes, value: bytes) -> None:
    """Raise FsError(ENOSPC) if setting ``name`` to ``value`` would take the inode's
    names and values past XATTR_INODE_MAX."""
    old = current.get(name)
    after = space(current) + len(name) + len(value) - (0 if old is None else len(name) + len(old))
    if after > XATTR_INODE_MAX:
        raise FsError(f"xattrs of one inode are limited to {XATTR_INODE_MAX} bytes", errno.ENOSPC)


class XattrCache(OrderedDict[int, dict[bytes, bytes]]):
    """inode -> {name: value}, least recently used first, bounded in bytes.

    An OrderedDict (callers use get, pop, clear and item assignment) that counts the
    bytes of what it holds (:func:`_cost`) and drops the least recently used inodes
    when past ``max_bytes``. A caller that changes a cached dict in place calls
    :meth:`changed` afterwards.
    """

    def __init__(self, max_bytes: int = XATTR_CACHE_BYTES) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.bytes = 0
        self._costs: dict[int, int] = {}

    @staticmethod
    def _cost(x: dict[bytes, bytes]) -> int:
        return INODE_OVERHEAD + sum(ENTRY_OVERHEAD + len(n) + len(v) for n, v in x.items())

    def __setitem__(self, ino: int, x: dict[bytes, bytes]) -> None:
        self._forget(ino)
        super().__setitem__(ino, x)
        self._costs[ino] = c = self._cost(x)
        self.bytes += c
        self._trim(keep=ino)

    def changed(self, ino: int) -> None:
        """The cached dict of ``ino`` was changed in place: count it again."""
        x = super().get(ino)
        if x is not None:
            self.bytes -= self._costs.get(ino, 0)
            self._costs[ino] = c = self._cost(x)
            self.bytes += c
            self._trim(keep=ino)

    def _forget(self, ino: int) -> None:
        self.bytes -= self._costs.pop(ino, 0)

    def _trim(self, keep: int) -> None:
        while self.bytes > self.max_bytes and len(self) > 1:
            oldest = next(iter(self))
            if oldest == keep:
                self.move_to_end(keep)
                continue
            self.pop(oldest)

    def __delitem__(self, ino: int) -> None:
        super().__delitem__(ino)
        self._forget(ino)

    def pop(self, ino: int, *default: object) -> object:  # type: ignore[override]
        if ino in self:
            self._forget(ino)
        return super().pop(ino, *default)

    def popitem(self, last: bool = True) -> tuple[int, dict[bytes, bytes]]:
        ino, x = super().popitem(last)
        self._forget(ino)
        return ino, x

    def clear(self) -> None:
        super().clear()
        self._costs.clear()
        self.bytes = 0
