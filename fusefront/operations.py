"""The pyfuse3 Operations of casfs: check arguments, call the engine, map errors.

This layer only translates between the FUSE protocol and :class:`cas.engine.fs.Filesystem`.
Engine errors become ``FUSEError(errno)`` in one place (:func:`_translate`); anything
unexpected is logged and reported as EIO. File handles are inode numbers: the engine
keeps one open count per inode.

Kernel caches. The mount is the only writer of its volume's namespace and contents
(the daemon holds the volume's mount lock), and the kernel keeps its own caches
coherent for every change made through the mount, so this layer lets it cache a lot:

* entries and attributes for :data:`ENTRY_TIMEOUT_S` / :data:`ATTR_TIMEOUT_S`, and
  negative entries (a lookup that finds nothing) as long;
* file pages across opens (``keep_cache``) when the file is unchanged since it was last
  opened or closed (:class:`PageCacheGuard`);
* directory listings: pyfuse3 cannot ask the kernel to cache them (no
  ``cache_readdir`` in its opendir reply), so :class:`Listings` keeps the names, inode
  numbers and offsets of recently listed directories here, dropped by every change to
  the directory. Attributes are always taken fresh from the engine.

POSIX ACLs are enforced: the mount asks for FUSE_POSIX_ACL (``enable_acl``), so the
kernel checks permissions against the ACLs it reads through getxattr, and this layer
does the rest of what a local filesystem does: an access ACL also sets the mode
(:meth:`_set_access_acl`), chmod rewrites the access ACL, and new inodes inherit a
directory's default ACL (fusefront/acl.py, docs/security.md).

Concurrency: pyfuse3 runs these coroutines on the trio loop thread. Engine calls that
may block (a read of a chunk not in RAM, a write that fills the file's buffers, fsync,
a close or release that writes back, fsyncdir, a truncating setattr) run in worker
threads through :func:`offload`, so the loop keeps serving other requests; the engine
holds its lock only for short steps (a flush stores its chunks, and a read loads them,
without it). Quick calls (getattr, lookup, a read of RAM-cached chunks, a small write)
stay on the loop: a thread hand-off costs more than they do. On a shared volume every
namespace change (mknod, mkdir, create, symlink, link, unlink, rmdir, rename), open and
setattr is its own commit that may wait for another machine's row locks, and lookup and
getattr under strong consistency read the change log: those run through
:func:`offload` too (:meth:`CasOperations._engine`). This layer's own tables
(``pages``, ``listings``) are touched on the loop thread only. See docs/concurrency.md.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from cas.errors import CasError, Exists, FsError, IsADirectory, NoData, NotFound
from cas.engine.fs import Attr, Filesystem

from .acl import ACL_DEFAULT, acl_chmod, acl_create
from .coherence import Invalidator
from .kernelcache import Listings, PageCacheGuard, acl_mode

log = logging.getLogger(__name__)
# The kernel drops cached entries and attributes itself on every change made through the
# mount, and nothing else changes the volume while it is mounted: long timeouts are safe.
# They only bound how long the kernel could show state that a lost group transaction
# rolled back (an error path; see docs/concurrency.md); a revalidation a minute costs
# nothing measurable.
ENTRY_TIMEOUT_S = 60.0
ATTR_TIMEOUT_S = 60.0
# RAM bounds of this layer's tables (about 100 and 350 bytes an entry)
ACL_ACCESS = b"system.posix_acl_access"
# readdir offsets 1 and 2 are '.' and '..'; an engine dentry offset d is d + DOT_OFFSETS
DOT_OFFSETS = 2
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
R = TypeVar("R")
# Worker threads for engine calls that may block for long (chunk I/O, a flush, a Drive
# fetch): at most this many at once, so that the loop thread stays free (docs/concurrency.md)
ENGINE_THREADS = 8
# a shared volume's CREATE without O_EXCL of a name that comes and goes on other
# machines: create or open it at most this many times, then EEXIST
CREATE_TRIES = 3
_limiter: trio.CapacityLimiter | None = None


async def offload(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """``fn(*args, **kwargs)`` run in a worker thread (``trio.to_thread.run_sync``, at
    most :data:`ENGINE_THREADS` at once), so that the trio loop keeps serving other FUSE
    requests meanwhile; returns its result or raises its exception. Not cancellable once
    started: the engine call always finishes (a half-done engine call would be worse
    than a late reply)."""
    global _limiter
    if _limiter is None:
        _limiter = trio.CapacityLimiter(ENGINE_THREADS)
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=_limiter)


def _translate(fn: F) -> F:
    """Turn engine errors into FUSEError with the right errno (EIO for the unexpected)."""
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        ops = args[0]
        ops.fs.ops += 1  # the request rate of `casfs stats --watch`
        if ops.token is None:
            ops.token = trio.lowlevel.current_trio_token()
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


def entry(attr: Attr, blksize: int, entry_timeout: float = ENTRY_TIMEOUT_S,
          attr_timeout: float = ATTR_TIMEOUT_S) -> pyfuse3.EntryAttributes:
    """pyfuse3 EntryAttributes for engine attributes ``attr``; the kernel may cache the
    entry for ``entry_timeout`` and the attributes for ``attr_timeout`` seconds."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr.ino
    e.generation = 0
    e.entry_timeout = entry_timeout
    e.attr_timeout = attr_timeout
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = attr.rdev
    e.st_size = attr.size
    e.st_blksize = blksize
    e.st_blocks = (attr.data_bytes + 511) // 512   # stored bytes, not holes (docs/posix.md)
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    return e


class CasOperations(pyfuse3.Operations):
    """FUSE request handlers for one mounted :class:`~cas.engine.fs.Filesystem`.

    ``writeback_cache`` asks the kernel for writeback caching (FUSE_WRITEBACK_CACHE):
    writes collect in the page cache and reach the engine at close, fsync or background
    writeback, in requests of up to 1 MiB; meanwhile the kernel, not the engine, keeps
    the file's size and mtime (it sends the times with a SETATTR at close), and it may
    read pages of a file open only for writing. Off by default: it speeds up small
    write() calls (4 KiB: 1.6-3x) but not 1 MiB ones, and costs small-file creation a
    SETATTR per file.
    """

    enable_acl = True   # FUSE_POSIX_ACL: the kernel enforces ACLs (docs/security.md)

    def __init__(self, fs: Filesystem, *, writeback_cache: bool = False) -> None:
        super().__init__()
        self.fs = fs
        fs.keep_referenced = True   # the kernel forgets what it looked up (docs/posix.md)
        self.blksize = min(fs.chunk_size, 1 << 20)
        self.enable_writeback_cache = writeback_cache
        self.pages = PageCacheGuard()
        self.listings = Listings()
        # called with (directory inode, name, inode) for every entry a readdir hands the
        # kernel (the audit hook learns paths from it; fusefront/observe.py)
        self.entry_seen: Callable[[int, bytes, int], None] | None = None
        self.token: trio.lowlevel.TrioToken | None = None   # the loop's, set by the first request
        # A shared volume (docs/sharing.md, "Consistency"): other machines change it, so
        # the kernel caches entries and attributes only as long as the consistency level
        # says, keeps pages across opens only if it allows, and forgets what the change
        # log names (fusefront/coherence.py). Otherwise the long timeouts above.
        self.entry_timeout = ENTRY_TIMEOUT_S
        self.attr_timeout = ATTR_TIMEOUT_S
        self.keep_cache = True
        self.invalidator: Invalidator | None = None
        self.shared = bool(getattr(fs, "shared", False))
        # strong consistency: every lookup and getattr reads the change log (a worker thread)
        self.strong = self.shared and bool(fs.level.poll_at_lookup)
        if self.shared:
            self.entry_timeout = self.attr_timeout = fs.level.kernel_timeout_s
            self.keep_cache = fs.level.keep_cache
            self.invalidator = Invalidator(self)
            fs.on_changes = self.invalidator.seen
        db = getattr(fs, "db", None)
        if db is not None and hasattr(db, "on_group_lost"):
            # a lost group transaction rolls namespace changes back behind the kernel's
            # back: forget what this layer remembers (the engine reloads its own state)
            engine_hook = db.on_group_lost

            def group_lost() -> None:
                # the engine's resync first, whatever happens to this layer's tables:
                # it gives the lost group's bytes back as buffers (and at unmount, after
                # the loop ended, they reach the rescue area only through it)
                try:
                    if engine_hook is not None:
                        engine_hook()
                finally:
                    self._forget_tables_soon()
            db.on_group_lost = group_lost

    def _forget_tables_soon(self) -> None:
        """Clear this layer's tables after a lost group. They belong to the loop thread:
        a loss found by an engine call in a worker thread (offload) clears them on the
        loop, at its next turn (TrioToken.run_sync_soon does not wait); once the loop
        has ended (a commit at unmount, after serve() returned) no handler can run any
        more, so they are cleared right here."""
        try:
            trio.lowlevel.current_trio_token()
            on_loop = True
        except RuntimeError:
            on_loop = False
        if on_loop or self.token is None:
            self._forget_tables()
            return
        try:
            self.token.run_sync_soon(self._forget_tables)
        except trio.RunFinishedError:
            self.token = None
            self._forget_tables()

    def _engine(self, fn: Callable[..., R], slow: bool | None = None) -> Callable[..., Awaitable[R]]:
        """``fn`` as a coroutine function: in a worker thread (:func:`offload`) when
        ``slow`` (default: the volume is shared, where each namespace change is its own
        commit that may wait for another machine's row locks, and a deadlock retry
        sleeps), else right here on the loop thread (:meth:`_now`)."""
        if self.shared if slow is None else slow:
            return functools.partial(offload, fn)
        return self._now(fn)

    @staticmethod
    def _now(fn: Callable[..., R]) -> Callable[..., Awaitable[R]]:
        """``fn`` as a coroutine function that runs it right here, on the loop thread."""
        async def run(*args: Any, **kwargs: Any) -> R:
            return fn(*args, **kwargs)
        return run

    def _forget_tables(self) -> None:
        self.pages.clear()
        self.listings.clear()

    def _e(self, attr: Attr) -> pyfuse3.EntryAttributes:
        return entry(attr, self.blksize, self.entry_timeout, self.attr_timeout)

    def _drain(self) -> None:
        """After an engine call that may have read the change log (shared volume):
        apply what it found to this layer's tables and the kernel's attributes now."""
        if self.invalidator is not None and self.invalidator.pending:
            self.invalidator.drain()

    @_translate
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        try:
            return self._e(await self._engine(self.fs.lookup, self.strong)(parent_inode, name))
        except NotFound:
            # a negative entry the kernel may cache (st_ino 0): creating the name through
            # the mount replaces it, and nothing else creates names. On a shared volume
            # other machines do: not cached at all (timeout 0), else the kernel sends
            # FUSE CREATE for an open(O_CREAT) of a name another machine made meanwhile
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = 0 if self.shared else self.entry_timeout
            return e
        finally:
            self._drain()

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # the kernel forgets an inode when it evicts it, page cache and all
        for ino, _ in inode_list:
            self.pages.changed(ino)
            self.listings.drop(ino)
        self.fs.forget(list(inode_list))

    @_translate
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        try:
            return self._e(await self._engine(self.fs.getattr, self.strong)(inode, fresh=True))
        finally:
            self._drain()

    @_translate
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            self.pages.changed(inode)
        # a size change flushes (and waits for the file's flight): a worker thread
        call: Any = self._engine(self.fs.setattr, fields.update_size or self.shared)
        a = await call(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        if fields.update_mode:
            self._chmod_acl(inode, a.mode)
        if not fields.update_size:
            self.pages.times_changed(a)
        return self._e(a)

    def _inherit(self, parent_inode: int, mode: int, umask: int) -> tuple[int, bytes | None, bytes | None]:
        """Mode, access ACL and default ACL of a new inode of ``mode`` in ``parent_inode``:
        with a default ACL there, what posix_acl_create() gives (the umask does not
        apply; a directory also inherits the default ACL); else ``mode`` less the umask."""
        try:
            dacl = self.fs.getxattr(parent_inode, ACL_DEFAULT)
        except NoData:
            return mode & ~umask, None, None
        new_mode, access = acl_create(dacl, mode)
        return new_mode, access, (dacl if stat.S_ISDIR(mode) else None)

    def _set_inherited(self, attr: Attr, access: bytes | None, dacl: bytes | None) -> Attr:
        if access is not None:
            self.fs.setxattr(attr.ino, ACL_ACCESS, access)
        if dacl is not None:
            self.fs.setxattr(attr.ino, ACL_DEFAULT, dacl)
        return attr if access is None and dacl is None else self.fs.getattr(attr.ino)

    def _chmod_acl(self, inode: int, mode: int) -> None:
        """A chmod rewrites the owner, mask and other entries of an access ACL (posix_acl_chmod)."""
        try:
            access = self.fs.getxattr(inode, ACL_ACCESS)
        except NoData:
            return
        self.fs.setxattr(inode, ACL_ACCESS, acl_chmod(access, mode))

    @_translate
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.fs.readlink(inode)

    @_translate
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self.listings.drop(parent_inode)
        mode, access, dacl = self._inherit(parent_inode, mode, ctx.umask)
        a = await self._engine(self.fs.mknod)(parent_inode, name, mode, rdev, ctx.uid, ctx.gid)
        self.listings.drop(parent_inode)
        return self._e(await self._engine(self._set_inherited)(a, access, dacl))

    @_translate
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self.listings.drop(parent_inode)
        mode, access, dacl = self._inherit(parent_inode, mode | stat.S_IFDIR, ctx.umask)
        a = await self._engine(self.fs.mkdir)(parent_inode, name, mode, ctx.uid, ctx.gid)
        self.listings.drop(parent_inode)
        return self._e(await self._engine(self._set_inherited)(a, access, dacl))

    @_translate
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.listings.drop(parent_inode)
        await self._engine(self.fs.unlink)(parent_inode, name)
        self.listings.drop(parent_inode)   # a listing made while a worker thread ran it

    @_translate
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.listings.drop(parent_inode)
        await self._engine(self.fs.rmdir)(parent_inode, name)
        self.listings.drop(parent_inode)

    @_translate
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        self.listings.drop(parent_inode)
        a = await self._engine(self.fs.symlink)(parent_inode, name, target, ctx.uid, ctx.gid)
        self.listings.drop(parent_inode)
        return self._e(a)

    @_translate
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self.listings.drop(parent_inode_old)
        self.listings.drop(parent_inode_new)
        await self._engine(self.fs.rename)(parent_inode_old, name_old, parent_inode_new, name_new, flags)
        self.listings.drop(parent_inode_old)
        self.listings.drop(parent_inode_new)

    @_translate
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        self.listings.drop(new_parent_inode)
        a = await self._engine(self.fs.link)(inode, new_parent_inode, new_name)
        self.listings.drop(new_parent_inode)
        return self._e(a)

    @_translate
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        return await self._open(inode, flags)

    async def _open(self, inode: int, flags: int) -> pyfuse3.FileInfo:
        # pyfuse3 asks for FUSE_ATOMIC_O_TRUNC: the kernel leaves O_TRUNC to us
        truncate = bool(flags & os.O_TRUNC)
        if truncate:
            self.pages.changed(inode)
            # a truncation flushes and waits for the file's flight: a worker thread
            await offload(self.fs.open, inode, truncate=True)
        else:
            await self._engine(self.fs.open)(inode)
        self._drain()   # what an open's read of the change log found (shared volume)
        a = self.fs.getattr(inode)
        keep = self.keep_cache and self.pages.keep(a)
        self.pages.record(a)
        return pyfuse3.FileInfo(fh=inode, keep_cache=keep)

    @_translate
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self.listings.drop(parent_inode)
        mode, access, dacl = self._inherit(parent_inode, mode, ctx.umask)
        for _ in range(CREATE_TRIES):
            try:
                made = await self._engine(self.fs.create)(parent_inode, name, mode, ctx.uid, ctx.gid)
            except Exists:
                if not self.shared or flags & os.O_EXCL:
                    raise
                try:
                    return await self._open_existing(parent_inode, name, flags)
                except NotFound:
                    continue   # removed again by another machine meanwhile: create it
            self.listings.drop(parent_inode)
            a = await self._engine(self._set_inherited)(made, access, dacl)
            self.pages.record(a)
            return pyfuse3.FileInfo(fh=a.ino, keep_cache=self.keep_cache), self._e(a)
        raise Exists(name.decode(errors="replace"))

    async def _open_existing(self, parent_inode: int, name: bytes,
                             flags: int) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """Shared volume: FUSE CREATE without O_EXCL for a name that exists. Another
        machine created it after this kernel last looked (a negative entry it cached, or a
        race): POSIX open(2) opens the existing file then (O_TRUNC applies), EISDIR for
        a directory; only O_EXCL gives EEXIST. Something else (a symlink, a device) stays
        EEXIST: the kernel would have followed or opened it, not this layer. Counts one
        kernel lookup, as a create's reply does. Raises NotFound when the name went away
        again."""
        a = await self._engine(self.fs.lookup)(parent_inode, name)
        try:
            if stat.S_ISDIR(a.mode):
                raise IsADirectory(name.decode(errors="replace"))
            if not stat.S_ISREG(a.mode):
                raise Exists(name.decode(errors="replace"))
            fi = await self._open(a.ino, flags)
        except BaseException:
            self.fs.forget([(a.ino, 1)])
            raise
        return fi, self._e(self.fs.getattr(a.ino))

    @_translate
    async def read(self, fh: int, off: int, size: int) -> bytes:
        plan = self.fs.read_start(fh, off, size)
        if plan.data is not None:   # buffers and RAM-cached chunks only
            return plan.data
        return await offload(self.fs.read_finish, plan)

    @_translate
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.pages.changed(fh)
        if self.fs.write_may_block(fh, len(buf), off):
            return await offload(self.fs.write, fh, off, buf)
        return self.fs.write(fh, off, buf)

    @_translate
    async def flush(self, fh: int) -> None:
        # close(2) does not promise durability (POSIX); buffers are committed at release
        # (batched) or fsync. close() reports a failed writeback of the file's buffers
        # (ENOSPC, EIO) and writes back itself when the store is in trouble or the file
        # is large (Filesystem.close_file); the data stays buffered either way.
        # FLUSH is synchronous with close(2) (RELEASE is not): the next open sees this.
        self._closed(fh)
        if self.fs.close_may_block(fh):
            await offload(self.fs.close_file, fh)
        else:
            self.fs.close_file(fh)

    def _closed(self, fh: int) -> None:
        try:
            self.pages.record(self.fs.getattr(fh))
        except NotFound:
            self.pages.changed(fh)

    @_translate
    async def fsync(self, fh: int, datasync: bool) -> None:
        await offload(self.fs.fsync, fh)

    @_translate
    async def release(self, fh: int) -> None:
        self._closed(fh)
        if self.fs.release_may_block(fh):
            await offload(self.fs.release, fh)
        else:
            self.fs.release(fh)

    @_translate
    async def opendir(self, inode: int, ctx: Any) -> int:
        self.fs.opendir(inode)
        return inode

    @_translate
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets (POSIX telldir/seekdir cookies): '.' is replied with next offset 1,
        # '..' with 2, and the entry of engine offset d (dentry id, from 1) with d + 2.
        # The kernel takes no lookup reference for '.' and '..' replies (fuse_direntplus_link
        # skips them), so they are not counted (docs/posix.md).
        if start_id < DOT_OFFSETS:
            dots = ((b".", self.fs.getattr(fh)), (b"..", self.fs.parent_attr(fh)))
            for off, (name, attr) in enumerate(dots[start_id:], start_id + 1):
                if not pyfuse3.readdir_reply(token, name, self._e(attr), off):
                    return
            start_id = DOT_OFFSETS
        rows = self.listings.get(fh, start=start_id == DOT_OFFSETS)
        after = start_id - DOT_OFFSETS   # engine offset
        if rows is not None:
            offs = rows.offs
            i = bisect_right(offs, after)
            while i < len(offs):
                try:
                    attr = self.fs.getattr(rows.inos[i])
                except NotFound:  # cannot happen while drop() is called on every change
                    self.listings.drop(fh)
                    rows = None
                    break
                # the engine's cached Attr objects are immutable and replaced on change
                reply = rows.replies[i]
                if reply[0] is not attr:
                    reply = rows.replies[i] = (attr, self._e(attr))
                if not pyfuse3.readdir_reply(token, rows.names[i], reply[1], offs[i] + DOT_OFFSETS):
                    return
                self.fs.count_lookup(attr.ino)  # readdirplus replies count as lookups
                if self.entry_seen is not None:
                    self.entry_seen(fh, rows.names[i], attr.ino)
                after = offs[i]
                i += 1
            else:
                if rows.complete:
                    return
                if after != (offs[-1] if offs else 0):
                    rows = None  # what follows would not continue the rows: do not keep it
        while True:
            tail = self.listings.take_tail(fh, after)
            if tail is not None:   # the rest of the last batch (attributes refreshed below)
                batch, replies = tail
            else:
                batch = self.fs.readdir(fh, after)
                if not batch:
                    if rows is not None:
                        rows.complete = True
                    return
                replies = [(attr, self._e(attr)) for _, attr, _ in batch]
            if rows is not None and not self.listings.append(fh, rows, batch, replies):
                rows = None
            for k, ((name, attr, off), (was, e)) in enumerate(zip(batch, replies)):
                if tail is not None and (attr := self.fs.getattr(attr.ino)) is not was:
                    replies[k] = (attr, e := self._e(attr))
                if not pyfuse3.readdir_reply(token, name, e, off + DOT_OFFSETS):
                    if rows is None:   # not kept whole: keep what the reply had no room for
                        self.listings.keep_tail(fh, after, batch[k:], replies[k:])
                    return
                self.fs.count_lookup(attr.ino)
                if self.entry_seen is not None:
                    self.entry_seen(fh, name, attr.ino)
                after = off

    @_translate
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @_translate
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await offload(self.fs.sync)

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
        if name == ACL_ACCESS:
            self._set_access_acl(inode, value)
        else:
            self.fs.setxattr(inode, name, value)

    def _set_access_acl(self, inode: int, value: bytes) -> None:
        """With FUSE_POSIX_ACL the kernel checks and caches ACLs but leaves the mode to
        the filesystem (Linux fs/fuse/acl.c), and an access ACL also sets the mode (cp -a,
        tar and rsync set modes this way): do what a local filesystem does
        (posix_acl_update_mode). The mode takes the
        ACL's bits; an ACL that says no more than the mode is not stored."""
        perms, equivalent = acl_mode(value)
        cur = self.fs.getattr(inode)
        self.fs.setattr(inode, mode=(cur.mode & ~0o777) | perms)
        if equivalent:
            try:
                self.fs.removexattr(inode, ACL_ACCESS)
            except NoData:
                pass
        else:
            self.fs.setxattr(inode, ACL_ACCESS, value)
        if cur.mode & 0o777 != perms:
            # the kernel refreshes only ctime after a setxattr: make it re-read the mode
            try:
                pyfuse3.invalidate_inode(inode, attr_only=True)
            except OSError:  # the kernel has no such inode cached: nothing to refresh
                pass

    @_translate
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        names = self.fs.listxattr(inode)
        if ctx.uid != 0:  # trusted.* is visible only to CAP_SYS_ADMIN (Linux xattr(7))
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @_translate
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self.fs.removexattr(inode, name)

    @_translate
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        # default_permissions: the kernel checks permissions before calling us
        self.fs.getattr(inode)
        return True
