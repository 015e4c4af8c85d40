"""POSIX ACLs as the filesystem's part of FUSE_POSIX_ACL (see docs/security.md).

With FUSE_POSIX_ACL the kernel enforces ACLs itself (with default_permissions it reads
``system.posix_acl_access`` through getxattr and caches it) and checks who may set them,
but leaves to the filesystem what a local filesystem does around them (Linux
fs/posix_acl.c): an access ACL also sets the mode (``acl_mode`` in kernelcache.py), a
chmod rewrites the owner, mask (or group) and other entries of the access ACL
(:func:`acl_chmod`, posix_acl_chmod), and a new inode in a directory with a default ACL
inherits it (:func:`acl_create`, posix_acl_create). ACLs are in the kernel's xattr form:
a little-endian u32 version 2, then (u16 tag, u16 perm, u32 id) entries sorted by tag.
"""
from __future__ import annotations

import struct

from cas.errors import InvalidArgument

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_HEADER = struct.pack("<I", 2)


def _entries(value: bytes) -> list[list[int]]:
    if len(value) < 4 or (len(value) - 4) % 8 or value[:4] != _HEADER:
        raise InvalidArgument("malformed POSIX ACL")
    out = [list(e) for e in struct.iter_unpack("<HHI", value[4:])]
    for tag, _, _ in out:
        if tag not in (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER):
            raise InvalidArgument(f"POSIX ACL entry tag {tag:#x}")
    return out


def _pack(entries: list[list[int]]) -> bytes:
    return _HEADER + b"".join(struct.pack("<HHI", *e) for e in entries)


def acl_create(default_acl: bytes, mode: int) -> tuple[int, bytes | None]:
    """A new inode of ``mode`` in a directory whose default ACL is ``default_acl``:
    the mode it gets and its access ACL (None when the ACL says no more than the mode),
    as posix_acl_create_masq() in Linux: each entry is limited by the requested mode,
    and the mode by the entries; with a mask entry the group bits are the mask's.
    The umask does not apply (POSIX.1e: a default ACL replaces it). Raises
    InvalidArgument for a malformed ACL."""
    entries = _entries(default_acl)
    perm = mode & 0o777
    not_equiv = False
    group_obj: list[int] | None = None
    mask: list[int] | None = None
    for e in entries:
        tag = e[0]
        if tag == USER_OBJ:
            e[1] &= (perm >> 6) & 7
            perm &= (e[1] << 6) | ~0o700
        elif tag in (USER, GROUP):
            not_equiv = True
        elif tag == GROUP_OBJ:
            group_obj = e
        elif tag == OTHER:
            e[1] &= perm & 7
            perm &= e[1] | ~0o007
        elif tag == MASK:
            mask = e
            not_equiv = True
    target = mask if mask is not None else group_obj
    if target is None:
        raise InvalidArgument("POSIX ACL without a group entry")
    target[1] &= (perm >> 3) & 7
    perm &= (target[1] << 3) | ~0o070
    return (mode & ~0o777) | (perm & 0o777), (_pack(entries) if not_equiv else None)


def acl_chmod(access_acl: bytes, mode: int) -> bytes:
    """``access_acl`` after a chmod to ``mode`` (posix_acl_chmod() in Linux): the owner
    and other entries take the mode's bits, and the mask entry (or the group entry when
    there is no mask) the group bits. Raises InvalidArgument for a malformed ACL."""
    entries = _entries(access_acl)
    has_mask = any(e[0] == MASK for e in entries)
    for e in entries:
        if e[0] == USER_OBJ:
            e[1] = (mode >> 6) & 7
        elif e[0] == OTHER:
            e[1] = mode & 7
        elif e[0] == MASK or (e[0] == GROUP_OBJ and not has_mask):
            e[1] = (mode >> 3) & 7
    return _pack(entries)
