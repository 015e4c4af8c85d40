"""The pyfuse3 Operations of casfs: check arguments, call the engine, map errors.

This layer only translates between the FUSE protocol and :class:`cas.fs.Filesystem`.
Engine errors become ``FUSEError(errno)`` in one place (:func:`_translate`); anything
unexpected is logged and reported as EIO. File handles are inode numbers: the engine
keeps one open count per inode.

Concurrency: pyfuse3 runs these coroutines on the trio loop thread. The engine is
synchronous and serializes itself with one lock; its calls are made directly from the
loop (no thread hop), which keeps per-request overhead low. Hashing and compression
inside a flush use the engine's worker threads. See docs/concurrency.md.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3

from cas.errors import CasError, FsError
from cas.fs import Attr, Filesystem

log = logging.getLogger(__name__)
ENTRY_TIMEOUT_S = 1.0
ATTR_TIMEOUT_S = 1.0
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _translate(fn: F) -> F:
    """Turn engine errors into FUSEError with the right errno (EIO for the unexpected)."""
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            if exc.errno == errno.EIO:
                log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except CasError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper  # type: ignore[return-value]


def entry(attr: Attr, blksize: int) -> pyfuse3.EntryAttributes:
    """pyfuse3 EntryAttributes for engine attributes ``attr``."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr.ino
    e.generation = 0
    e.entry_timeout = ENTRY_TIMEOUT_S
    e.attr_timeout = ATTR_TIMEOUT_S
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = attr.rdev
    e.st_size = attr.size
    e.st_blksize = blksize
    e.st_blocks = (attr.size + 511) // 512
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    return e


class CasOperations(pyfuse3.Operations):
    """FUSE request handlers for one mounted :class:`~cas.fs.Filesystem`."""

    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: Filesystem) -> None:
        super().__init__()
        self.fs = fs
        self.blksize = min(fs.chunk_size, 1 << 20)

    def _e(self, attr: Attr) -> pyfuse3.EntryAttributes:
        return entry(attr, self.blksize)

    @_translate
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._e(self.fs.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.fs.forget(list(inode_list))

    @_translate
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._e(self.fs.getattr(inode))

    @_translate
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        a = self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._e(a)

    @_translate
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.fs.readlink(inode)

    @_translate
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._e(self.fs.mknod(parent_inode, name, mode & ~ctx.umask, rdev, ctx.uid, ctx.gid))

    @_translate
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._e(self.fs.mkdir(parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid))

    @_translate
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.fs.unlink(parent_inode, name)

    @_translate
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.fs.rmdir(parent_inode, name)

    @_translate
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._e(self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_translate
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_translate
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._e(self.fs.link(inode, new_parent_inode, new_name))

    @_translate
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        # pyfuse3 asks for FUSE_ATOMIC_O_TRUNC: the kernel leaves O_TRUNC to us
        self.fs.open(inode, truncate=bool(flags & os.O_TRUNC))
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_translate
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        a = self.fs.create(parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=a.ino, keep_cache=True), self._e(a)

    @_translate
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.fs.read(fh, off, size)

    @_translate
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.fs.write(fh, off, buf)

    @_translate
    async def flush(self, fh: int) -> None:
        # close(2) does not promise durability (POSIX); buffers are committed at release
        # (batched) or fsync. Errors of a later commit are logged; the data stays buffered.
        return None

    @_translate
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.fs.fsync(fh)

    @_translate
    async def release(self, fh: int) -> None:
        self.fs.release(fh)

    @_translate
    async def opendir(self, inode: int, ctx: Any) -> int:
        self.fs.opendir(inode)
        return inode

    @_translate
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        after = start_id
        while True:
            batch = self.fs.readdir(fh, after)
            if not batch:
                return
            for name, attr, off in batch:
                if not pyfuse3.readdir_reply(token, name, self._e(attr), off):
                    return
                self.fs.count_lookup(attr.ino)  # readdirplus replies count as lookups
                after = off

    @_translate
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @_translate
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.fs.sync()

    @_translate
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = self.fs.statfs()
        d = pyfuse3.StatvfsData()
        d.f_bsize = s.bsize
        d.f_frsize = s.bsize
        d.f_blocks = s.blocks
        d.f_bfree = s.bfree
        d.f_bavail = s.bavail
        d.f_files = s.files
        d.f_ffree = s.ffree
        d.f_favail = s.ffree
        d.f_namemax = s.namemax
        return d

    @_translate
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return self.fs.getxattr(inode, name)

    @_translate
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self.fs.setxattr(inode, name, value)

    @_translate
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return self.fs.listxattr(inode)

    @_translate
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self.fs.removexattr(inode, name)

    @_translate
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        # default_permissions: the kernel checks permissions before calling us
        self.fs.getattr(inode)
        return True

