"""A "null" pyfuse3 filesystem: the throughput ceiling of any pyfuse3 filesystem.

It stores no file data at all.  ``write()`` accepts and discards the bytes but
tracks the file size; ``read()`` returns zeros up to the file's size, sliced from
one preallocated zero buffer (and the slices themselves are cached, so a read
allocates nothing beyond what pyfuse3 itself needs).  The namespace is a minimal
in-memory one -- a dict ``inode -> attributes`` and a dict ``(parent, name) ->
inode`` -- enough for benchmarks to create files, mkdir, lookup, getattr,
setattr (size / mode / owner / times), readdir (stable offsets), rename, unlink,
rmdir, symlink/link, create/open/release/flush/fsync, xattrs and statfs.

Everything a real filesystem would spend time on (hashing, compression,
metadata database, disk I/O) is absent, so what remains is the cost of the
kernel <-> libfuse <-> pyfuse3/trio round trips.  ``tools/bench/__init__.py`` uses it as
the "null pyfuse3" column next to a native directory and casfs.

For a fair comparison it is mounted with the options a serious filesystem would
use: pyfuse3's defaults (``default_permissions``; max_write / big writes as
pyfuse3 + libfuse negotiate them by default, no writeback cache) plus
``fsname=nullfs``, entry / attribute timeouts of 60 s and ``keep_cache`` on
open -- the values casfs uses.  ``--no-keep-cache`` opens every file without
``keep_cache``: each open drops the file's pages and every read goes to this
process (the pyfuse3 read ceiling; the benchmark's re-read row uses it).

Run in the foreground::

    python -m tools.bench.nullfs [--no-keep-cache] [--populate NAME=DIR] MOUNTPOINT

``--populate NAME=DIR`` starts with a copy of DIR's namespace (sizes, no data) as
``/NAME``, which the kernel has never looked up: a cold tree for the benchmark's
small-file rows.

SIGTERM / SIGINT (Ctrl-C) unmount cleanly; ``fusermount3 -u MOUNTPOINT`` also
ends the process.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys
import time
from bisect import bisect_right
from typing import Sequence

import pyfuse3
import trio
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    FUSEError,
    InodeT,
    ModeT,
    RequestContext,
    SetattrFields,
    StatvfsData,
    XAttrNameT,
)

log = logging.getLogger("nullfs")

#: Entry and attribute cache timeouts (seconds) -- the same as casfs
#: (fusefront/operations.py): this process is the only writer of the namespace.
ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 60.0

#: Size of the shared zero buffer.  FUSE reads are at most max_read (<= 1 MiB
#: with max_pages=256); larger requests fall back to a fresh allocation.
ZERO_BUFFER_SIZE = 4 * 1024 * 1024

BLOCK_SIZE = 4096
NAME_MAX = 255
#: Pretend capacity reported by statfs (1 TiB, 1 G inodes).
FAKE_BLOCKS = (1 << 40) // BLOCK_SIZE
FAKE_FILES = 1 << 30


class Inode:
    """Attributes of one inode (no data: only the size is tracked)."""

    __slots__ = (
        "ino", "mode", "nlink", "uid", "gid", "rdev", "size",
        "atime_ns", "mtime_ns", "ctime_ns",
        "lookups", "opens", "target", "xattrs", "dir",
    )

    def __init__(self, ino: int, mode: int, uid: int, gid: int, rdev: int = 0) -> None:
        now = time.time_ns()
        self.ino = ino
        self.mode = mode
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.size = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = now
        self.lookups = 0          # kernel lookup count
        self.opens = 0            # open file / directory handles
        self.target = b""         # symlink target
        self.xattrs: dict[bytes, bytes] | None = None
        self.dir: Directory | None = Directory(ino) if stat.S_ISDIR(mode) else None


class Directory:
    """Listing of one directory with stable readdir offsets.

    Every entry gets a cookie from a per-directory, strictly increasing counter
    when it is linked in.  ``cookies`` is append-only (so it stays sorted) and
    may contain cookies of removed entries; ``by_cookie`` holds the live ones.
    readdir(start_id) bisects ``cookies`` for the first cookie > start_id, so
    entries added or removed during a listing never make others be skipped or
    repeated.
    """

    __slots__ = ("parent", "cookies", "by_cookie", "names", "next_cookie")

    def __init__(self, parent: int) -> None:
        self.parent = parent
        self.cookies: list[int] = []
        self.by_cookie: dict[int, bytes] = {}
        self.names: dict[bytes, int] = {}      # name -> cookie
        # Cookies 1 and 2 are never used for entries; start above them.
        self.next_cookie = 3

    def add(self, name: bytes) -> None:
        cookie = self.next_cookie
        self.next_cookie += 1
        self.cookies.append(cookie)
        self.by_cookie[cookie] = name
        self.names[name] = cookie

    def remove(self, name: bytes) -> None:
        cookie = self.names.pop(name)
        del self.by_cookie[cookie]
        if len(self.cookies) > 64 and len(self.cookies) > 2 * len(self.by_cookie):
            # Compact; cookie values are unchanged so open listings stay valid.
            self.cookies = [c for c in self.cookies if c in self.by_cookie]

    def __len__(self) -> int:
        return len(self.names)


class NullFS(pyfuse3.Operations):
    """The null filesystem's request handlers."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, keep_cache: bool = True) -> None:
        super().__init__()
        #: Keep the kernel page cache across opens (FOPEN_KEEP_CACHE), as casfs does
        #: for unchanged files. Contents only change through this mount, so cached
        #: pages stay valid.
        self.keep_cache = keep_cache
        self.inodes: dict[int, Inode] = {}
        self.entries: dict[tuple[int, bytes], int] = {}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        root = Inode(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, os.getuid(), os.getgid())
        assert root.dir is not None
        root.dir.parent = pyfuse3.ROOT_INODE
        root.lookups = 1  # the kernel never forgets the root
        self.inodes[pyfuse3.ROOT_INODE] = root
        self.zeros = memoryview(bytes(ZERO_BUFFER_SIZE))
        self._zero_slices: dict[int, memoryview] = {}

    # ----------------------------------------------------------------- helpers

    def _get(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def _dir(self, ino: int) -> Inode:
        node = self._get(ino)
        if node.dir is None:
            raise FUSEError(errno.ENOTDIR)
        return node

    @staticmethod
    def _attr(node: Inode) -> EntryAttributes:
        a = EntryAttributes()
        a.st_ino = InodeT(node.ino)
        a.generation = 0
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = ModeT(node.mode)
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = BLOCK_SIZE
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = node.atime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        return a

    def _maybe_free(self, node: Inode) -> None:
        if node.nlink == 0 and node.lookups <= 0 and node.opens <= 0:
            self.inodes.pop(node.ino, None)

    def _touch_dir(self, parent: Inode) -> None:
        parent.mtime_ns = parent.ctime_ns = time.time_ns()

    def _new_entry(self, parent_ino: int, name: bytes, mode: int,
                   ctx: RequestContext, rdev: int = 0) -> Inode:
        parent = self._dir(parent_ino)
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        if name in (b".", b"..") or (parent_ino, name) in self.entries:
            raise FUSEError(errno.EEXIST)
        if parent.nlink == 0:
            raise FUSEError(errno.ENOENT)  # directory was removed
        ino = self.next_ino
        self.next_ino += 1
        node = Inode(ino, mode, ctx.uid, ctx.gid, rdev)
        if node.dir is not None:
            node.dir.parent = parent_ino
            parent.nlink += 1
        self.inodes[ino] = node
        self.entries[(parent_ino, name)] = ino
        assert parent.dir is not None
        parent.dir.add(name)
        self._touch_dir(parent)
        node.lookups += 1
        return node

    def populate(self, name: bytes, src: str) -> int:
        """Copy the namespace of the directory ``src`` (names, modes, sizes, symlink
        targets, times; no data) under the root as ``name``, before mounting: the
        kernel has never seen these entries, so a listing or read of them after the
        mount is cold on the kernel side. The benchmark's cold small-file rows use it,
        since the null fs forgets everything at unmount. Returns the entries added."""
        uid, gid = os.getuid(), os.getgid()
        count = 0

        def add(parent_ino: int, entry_name: bytes, path: str) -> None:
            nonlocal count
            st = os.lstat(path)
            ino = self.next_ino
            self.next_ino += 1
            node = Inode(ino, st.st_mode, uid, gid)
            node.size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
            node.atime_ns, node.mtime_ns, node.ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
            parent = self.inodes[parent_ino]
            assert parent.dir is not None
            if node.dir is not None:
                node.dir.parent = parent_ino
                parent.nlink += 1
            if stat.S_ISLNK(st.st_mode):
                node.target = os.fsencode(os.readlink(path))
            self.inodes[ino] = node
            self.entries[(parent_ino, entry_name)] = ino
            parent.dir.add(entry_name)
            count += 1
            if node.dir is not None:
                with os.scandir(path) as it:
                    for e in sorted(it, key=lambda e: e.name):
                        add(ino, os.fsencode(e.name), e.path)

        add(pyfuse3.ROOT_INODE, name, src)
        return count

    def _unlink_entry(self, parent: Inode, name: bytes, node: Inode) -> None:
        del self.entries[(parent.ino, name)]
        assert parent.dir is not None
        parent.dir.remove(name)
        self._touch_dir(parent)
        node.ctime_ns = time.time_ns()
        if node.dir is not None:
            node.nlink = 0
            parent.nlink -= 1
        else:
            node.nlink -= 1
        self._maybe_free(node)

    # ---------------------------------------------------------------- namespace

    async def lookup(self, parent_inode: InodeT, name: FileNameT,
                     ctx: RequestContext) -> EntryAttributes:
        parent = self._dir(parent_inode)
        if name == b".":
            node = parent
        elif name == b"..":
            assert parent.dir is not None
            node = self._get(parent.dir.parent)
        else:
            ino = self.entries.get((parent_inode, name))
            if ino is None:
                raise FUSEError(errno.ENOENT)
            node = self.inodes[ino]
        node.lookups += 1
        return self._attr(node)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for ino, n in inode_list:
            node = self.inodes.get(ino)
            if node is None or ino == pyfuse3.ROOT_INODE:
                continue
            node.lookups -= n
            self._maybe_free(node)

    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        return self._attr(self._get(inode))

    async def setattr(self, inode: InodeT, attr: EntryAttributes, fields: SetattrFields,
                      fh: FileHandleT | None, ctx: RequestContext) -> EntryAttributes:
        node = self._get(inode)
        now = time.time_ns()
        if fields.update_size:
            if node.dir is not None:
                raise FUSEError(errno.EISDIR)
            node.size = attr.st_size
            node.mtime_ns = now
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else now
        return self._attr(node)

    async def mknod(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int,
                    ctx: RequestContext) -> EntryAttributes:
        return self._attr(self._new_entry(parent_inode, name, mode, ctx, rdev))

    async def mkdir(self, parent_inode: InodeT, name: FileNameT, mode: ModeT,
                    ctx: RequestContext) -> EntryAttributes:
        mode = ModeT(stat.S_IFDIR | stat.S_IMODE(mode))
        return self._attr(self._new_entry(parent_inode, name, mode, ctx))

    async def symlink(self, parent_inode: InodeT, name: FileNameT, target: FileNameT,
                      ctx: RequestContext) -> EntryAttributes:
        node = self._new_entry(parent_inode, name, stat.S_IFLNK | 0o777, ctx)
        node.target = bytes(target)
        node.size = len(node.target)
        return self._attr(node)

    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        node = self._get(inode)
        if not stat.S_ISLNK(node.mode):
            raise FUSEError(errno.EINVAL)
        return FileNameT(node.target)

    async def link(self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT,
                   ctx: RequestContext) -> EntryAttributes:
        node = self._get(inode)
        if node.dir is not None:
            raise FUSEError(errno.EPERM)
        parent = self._dir(new_parent_inode)
        if (new_parent_inode, new_name) in self.entries:
            raise FUSEError(errno.EEXIST)
        self.entries[(new_parent_inode, new_name)] = node.ino
        assert parent.dir is not None
        parent.dir.add(new_name)
        self._touch_dir(parent)
        node.nlink += 1
        node.ctime_ns = time.time_ns()
        node.lookups += 1
        return self._attr(node)

    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        parent = self._dir(parent_inode)
        ino = self.entries.get((parent_inode, name))
        if ino is None:
            raise FUSEError(errno.ENOENT)
        node = self.inodes[ino]
        if node.dir is not None:
            raise FUSEError(errno.EISDIR)
        self._unlink_entry(parent, name, node)

    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        parent = self._dir(parent_inode)
        ino = self.entries.get((parent_inode, name))
        if ino is None:
            raise FUSEError(errno.ENOENT)
        node = self.inodes[ino]
        if node.dir is None:
            raise FUSEError(errno.ENOTDIR)
        if len(node.dir):
            raise FUSEError(errno.ENOTEMPTY)
        self._unlink_entry(parent, name, node)

    async def rename(self, parent_inode_old: InodeT, name_old: FileNameT,
                     parent_inode_new: InodeT, name_new: FileNameT, flags: FlagT,
                     ctx: RequestContext) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FUSEError(errno.EINVAL)
        old_parent = self._dir(parent_inode_old)
        new_parent = self._dir(parent_inode_new)
        ino = self.entries.get((parent_inode_old, name_old))
        if ino is None:
            raise FUSEError(errno.ENOENT)
        node = self.inodes[ino]
        if len(name_new) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        if node.dir is not None:
            # Refuse to move a directory below itself.
            p = parent_inode_new
            while True:
                if p == ino:
                    raise FUSEError(errno.EINVAL)
                if p == pyfuse3.ROOT_INODE:
                    break
                pdir = self.inodes[p].dir
                assert pdir is not None
                p = pdir.parent
        victim_ino = self.entries.get((parent_inode_new, name_new))
        if victim_ino is not None:
            if victim_ino == ino:
                return
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            victim = self.inodes[victim_ino]
            if victim.dir is not None:
                if node.dir is None:
                    raise FUSEError(errno.EISDIR)
                if len(victim.dir):
                    raise FUSEError(errno.ENOTEMPTY)
            elif node.dir is not None:
                raise FUSEError(errno.ENOTDIR)
            self._unlink_entry(new_parent, name_new, victim)
        del self.entries[(parent_inode_old, name_old)]
        assert old_parent.dir is not None and new_parent.dir is not None
        old_parent.dir.remove(name_old)
        self.entries[(parent_inode_new, name_new)] = ino
        new_parent.dir.add(name_new)
        if node.dir is not None and old_parent is not new_parent:
            node.dir.parent = parent_inode_new
            old_parent.nlink -= 1
            new_parent.nlink += 1
        self._touch_dir(old_parent)
        self._touch_dir(new_parent)
        node.ctime_ns = time.time_ns()

    # -------------------------------------------------------------------- files

    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        node = self._get(inode)
        if node.dir is not None:
            raise FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:  # not passed by the kernel, but be safe
            node.size = 0
        node.opens += 1
        return FileInfo(fh=FileHandleT(node.ino), keep_cache=self.keep_cache)

    async def create(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT,
                     ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        node = self._new_entry(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        node.opens += 1
        return FileInfo(fh=FileHandleT(node.ino), keep_cache=self.keep_cache), self._attr(node)

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        node = self.inodes[fh]
        n = min(size, node.size - off)
        if n <= 0:
            return b""
        view = self._zero_slices.get(n)
        if view is None:
            if n > ZERO_BUFFER_SIZE:
                return bytes(n)
            view = self.zeros[:n]
            if len(self._zero_slices) < 256:
                self._zero_slices[n] = view
        # pyfuse3 only needs the buffer protocol (PyObject_GetBuffer).
        return view  # type: ignore[return-value]

    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        node = self.inodes[fh]
        n = len(buf)
        end = off + n
        if end > node.size:
            node.size = end
        node.mtime_ns = node.ctime_ns = time.time_ns()
        return n

    async def flush(self, fh: FileHandleT) -> None:
        pass

    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        pass

    async def release(self, fh: FileHandleT) -> None:
        node = self.inodes.get(fh)
        if node is not None:
            node.opens -= 1
            self._maybe_free(node)

    # -------------------------------------------------------------- directories

    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        node = self._dir(inode)
        node.opens += 1
        return FileHandleT(inode)

    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self.inodes[fh]
        d = node.dir
        assert d is not None
        # "." and ".." get cookies 1 and 2; their lookup counts are not increased.
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, FileNameT(b"."), self._attr(node), 1):
                return
        if start_id < 2:
            dotdot = self.inodes.get(d.parent, node)
            if not pyfuse3.readdir_reply(token, FileNameT(b".."), self._attr(dotdot), 2):
                return
        cookies = d.cookies
        i = bisect_right(cookies, start_id)
        by_cookie = d.by_cookie
        while i < len(cookies):
            cookie = cookies[i]
            i += 1
            name = by_cookie.get(cookie)
            if name is None:
                continue
            child = self.inodes[self.entries[(fh, name)]]
            if not pyfuse3.readdir_reply(token, FileNameT(name), self._attr(child), cookie):
                break
            child.lookups += 1

    async def releasedir(self, fh: FileHandleT) -> None:
        node = self.inodes.get(fh)
        if node is not None:
            node.opens -= 1
            self._maybe_free(node)

    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        pass

    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        s = StatvfsData()
        used = sum((n.size + BLOCK_SIZE - 1) // BLOCK_SIZE for n in self.inodes.values())
        s.f_bsize = BLOCK_SIZE
        s.f_frsize = BLOCK_SIZE
        s.f_blocks = FAKE_BLOCKS
        s.f_bfree = s.f_bavail = max(FAKE_BLOCKS - used, 0)
        s.f_files = FAKE_FILES
        s.f_ffree = s.f_favail = FAKE_FILES - len(self.inodes)
        s.f_namemax = NAME_MAX
        return s

    # ------------------------------------------------------------------- xattrs
    # Implemented (rather than ENOSYS) so that tools such as `ls -l`, which probe
    # security.* / system.posix_acl_* per entry, cost the same round trips as on
    # a filesystem with xattr support.

    async def setxattr(self, inode: InodeT, name: XAttrNameT, value: bytes,
                       ctx: RequestContext) -> None:
        node = self._get(inode)
        if node.xattrs is None:
            node.xattrs = {}
        node.xattrs[bytes(name)] = bytes(value)
        node.ctime_ns = time.time_ns()

    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        node = self._get(inode)
        if node.xattrs is None or name not in node.xattrs:
            raise FUSEError(pyfuse3.ENOATTR)
        return node.xattrs[name]

    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        node = self._get(inode)
        return [XAttrNameT(k) for k in (node.xattrs or {})]

    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        node = self._get(inode)
        if node.xattrs is None or name not in node.xattrs:
            raise FUSEError(pyfuse3.ENOATTR)
        del node.xattrs[name]
        node.ctime_ns = time.time_ns()


def mount_options() -> set[str]:
    """pyfuse3's default options (``default_permissions``) plus ``fsname=nullfs``
    (and ``subtype=nullfs``, mirroring casfs's ``subtype=casfs``)."""
    opts = set(pyfuse3.default_options)
    opts.add("fsname=nullfs")
    opts.add("subtype=nullfs")
    return opts


async def _serve() -> None:
    """Run the FUSE main loop; SIGTERM/SIGINT end it gracefully."""
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("nullfs: got signal %d, unmounting", signum)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(watch_signals)
        await pyfuse3.main()
        # main() returned (terminate() or external unmount): stop the watcher.
        nursery.cancel_scope.cancel()


def run(mountpoint: str, debug: bool = False, keep_cache: bool = True,
        populate: Sequence[tuple[str, str]] = ()) -> None:
    """Mount the null filesystem on *mountpoint* and serve until unmounted;
    ``populate``: (name, source directory) pairs for :meth:`NullFS.populate`."""
    ops = NullFS(keep_cache=keep_cache)
    for name, src in populate:
        ops.populate(os.fsencode(name), src)
    opts = mount_options()
    if debug:
        opts.add("debug")
    pyfuse3.init(ops, mountpoint, opts)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.nullfs", description=__doc__.split("\n\n")[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--debug", action="store_true", help="libfuse debug output")
    parser.add_argument("--no-keep-cache", action="store_true",
                        help="open files without keep_cache (every read reaches this process)")
    parser.add_argument("--populate", action="append", default=[], metavar="NAME=DIR",
                        help="start with a copy of DIR's namespace (no data) as /NAME (repeatable)")
    args = parser.parse_args(argv)
    populate = []
    for item in args.populate:
        name, sep, src = item.partition("=")
        if not sep or not name or "/" in name or not os.path.isdir(src):
            parser.error(f"--populate {item!r}: want NAME=DIR with DIR an existing directory")
        populate.append((name, src))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        run(args.mountpoint, debug=args.debug, keep_cache=not args.no_keep_cache, populate=populate)
    except KeyboardInterrupt:
        # A SIGINT that arrived before the signal watcher was installed.
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
