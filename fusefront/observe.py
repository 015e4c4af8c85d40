"""One hook around every FUSE request handler: duration, result, caller and paths.

:meth:`Observer.install` replaces the handlers of one :class:`CasOperations` instance
with wrappers that time the call (ns, ``time.perf_counter_ns``), take its result (0,
or the errno of the ``FUSEError`` it raised), the caller's uid/gid/pid from the request
context, and -- only for the requests the audit log records -- the path(s) the
request names, resolved just before it runs. Two consumers read what the hook takes:

* the metrics (fusefront/metrics.py): a latency histogram and error counts per
  operation, bytes read and written by applications;
* the audit log (cas/audit.py): one JSON line per request of the chosen level.

With metrics and the audit log both off nothing is installed: the handlers are the
class's own, and the hook costs nothing. With only the audit log at ``changes``, only
the handlers of that level are wrapped (reads, writes and lookups stay unwrapped).

Callers of read and write: pyfuse3 passes no request context to read, write, flush,
fsync, release and readdir, so their audit records carry the uid/gid/pid of the
last process that opened the inode through this mount (file handles are inode numbers,
see fusefront/operations.py). Paths: a path of the inode (one of its hard links),
found through its dentry (:meth:`cas.fs.Filesystem.dentry_of`) and a RAM cache of
directory paths that every rename and rmdir clears; ``null`` when the inode has no name
left. docs/monitoring.md describes the records.
"""
from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3

from cas.audit import ALL, CHANGES, LOGGER, OFF
from cas.counters import Histogram
from cas.errors import CasError
from cas.fs import Filesystem
from cas.meta import ROOT_INODE

audit_log = logging.getLogger(LOGGER)

#: the handlers of pyfuse3.Operations that casfs implements
HANDLERS = ("lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink", "rmdir",
            "symlink", "rename", "link", "open", "create", "read", "write", "flush", "fsync", "release",
            "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "getxattr", "setxattr", "listxattr",
            "removexattr", "access")
#: the audit level that records each handler (absent: never recorded)
AUDIT_LEVEL = {
    **{op: CHANGES for op in ("mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link", "open",
                              "create", "setattr", "setxattr", "removexattr")},
    **{op: ALL for op in ("lookup", "read", "write", "readlink", "opendir", "getxattr", "listxattr")},
}
#: handlers whose last argument is the request context (pyfuse3.RequestContext)
WITH_CTX = frozenset(("lookup", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink", "rmdir",
                      "symlink", "rename", "link", "open", "create", "opendir", "statfs", "getxattr",
                      "setxattr", "listxattr", "removexattr", "access"))
#: handlers naming (parent inode, name) in their first two arguments
BY_NAME = frozenset(("lookup", "mknod", "mkdir", "unlink", "rmdir", "symlink", "create", "rename"))
DIR_CACHE_MAX = 10_000    # directory paths kept (about 200 bytes each)
OPENERS_MAX = 100_000     # inodes whose last opener is remembered (level all)
_SETATTR_FIELDS = (("update_mode", "mode", "st_mode"), ("update_uid", "uid", "st_uid"),
                   ("update_gid", "gid", "st_gid"), ("update_size", "size", "st_size"),
                   ("update_atime", "atime_ns", "st_atime_ns"), ("update_mtime", "mtime_ns", "st_mtime_ns"))


def errno_name(code: int) -> str | int:
    """0 for success, else the errno's symbolic name ("ENOTEMPTY"), else the number."""
    return 0 if not code else errno.errorcode.get(code, code)


class Observer:
    """What the hook collects for one mount. ``metrics``: keep latency and error counts;
    ``audit_level``: cas.audit.OFF, CHANGES or ALL. Everything runs on the trio loop
    thread; the metrics collector reads the counters from its own thread (plain ints
    and :class:`cas.counters.Histogram`, safe to read there)."""

    def __init__(self, fs: Filesystem, *, metrics: bool = False, audit_level: str = OFF) -> None:
        self.fs = fs
        self.metrics = metrics
        self.audit_level = audit_level
        self.latency: dict[str, Histogram] = {}        # op -> duration histogram
        self.errors: dict[tuple[str, str], int] = {}   # (op, errno name) -> requests
        self.read_bytes = 0      # bytes returned by read requests
        self.written_bytes = 0   # bytes accepted by write requests
        self._dirs: dict[int, str] = {ROOT_INODE: "/"}
        self._openers: dict[int, tuple[int, int, int]] = {}

    @property
    def enabled(self) -> bool:
        return self.metrics or self.audit_level != OFF

    def audited(self, op: str) -> bool:
        level = AUDIT_LEVEL.get(op)
        return level is not None and (self.audit_level == ALL or (self.audit_level == CHANGES and level == CHANGES))

    def install(self, ops: pyfuse3.Operations) -> None:
        """Wrap the handlers of ``ops`` (instance attributes shadow the class's methods,
        which is what pyfuse3 calls) that metrics or the audit log need."""
        for op in HANDLERS:
            if self.metrics or self.audited(op):
                setattr(ops, op, self._wrap(op, getattr(ops, op)))

    # -- the hook ----------------------------------------------------------------------
    def _wrap(self, op: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        audited = self.audited(op)
        hist = self.latency.setdefault(op, Histogram()) if self.metrics else None
        clears_dirs = op in ("rename", "rmdir")
        remembers_opener = op in ("open", "create") and self.audit_level == ALL

        async def hooked(*args: Any) -> Any:
            before = self._before(op, args) if audited else None
            t0 = time.perf_counter_ns()
            code = 0
            result: Any = None
            try:
                result = await fn(*args)
                return result
            except pyfuse3.FUSEError as exc:
                code = exc.errno
                raise
            except BaseException:
                code = errno.EIO
                raise
            finally:
                dt = time.perf_counter_ns() - t0
                if hist is not None:
                    hist.observe_ns(dt)
                    self._count(op, code, result)
                if clears_dirs and not code:
                    self._dirs = {ROOT_INODE: "/"}
                if remembers_opener and not code:
                    self._remember_opener(op, args, result)
                if before is not None:
                    self._audit(op, args, before, code, result)
        hooked.__name__ = op
        return hooked

    def _count(self, op: str, code: int, result: Any) -> None:
        if code:
            key = (op, str(errno_name(code)))
            self.errors[key] = self.errors.get(key, 0) + 1
        elif op == "read":
            self.read_bytes += len(result)
        elif op == "write":
            self.written_bytes += int(result)

    def _remember_opener(self, op: str, args: tuple[Any, ...], result: Any) -> None:
        ctx = args[-1]
        ino = args[0] if op == "open" else result[1].st_ino
        if len(self._openers) >= OPENERS_MAX:
            self._openers.clear()
        self._openers[ino] = (ctx.uid, ctx.gid, ctx.pid)

    # -- the audit log -----------------------------------------------------------------
    def _before(self, op: str, args: tuple[Any, ...]) -> dict[str, Any]:
        """The caller and the path(s) of a request about to run."""
        if op in WITH_CTX:
            ctx = args[-1]
            rec: dict[str, Any] = {"uid": ctx.uid, "gid": ctx.gid, "pid": ctx.pid, "op": op}
        else:
            uid, gid, pid = self._openers.get(args[0], (None, None, None))
            rec = {"uid": uid, "gid": gid, "pid": pid, "op": op}
        try:
            if op in BY_NAME:
                rec["path"] = self._join(self._dir_path(args[0]), args[1])
                if op == "rename":
                    rec["path2"] = self._join(self._dir_path(args[2]), args[3])
            else:
                rec["path"] = self.path(args[0])
                if op == "link":
                    rec["path2"] = self._join(self._dir_path(args[1]), args[2])
        except CasError:   # the database is unreachable: the request itself will say so
            rec.setdefault("path", None)
        if op == "setattr":
            attr, fields = args[1], args[2]
            rec["attrs"] = {name: (f"{getattr(attr, a) & 0o7777:04o}" if name == "mode" else getattr(attr, a))
                            for flag, name, a in _SETATTR_FIELDS if getattr(fields, flag)}
        elif op in ("getxattr", "setxattr", "removexattr"):
            rec["name"] = bytes(args[1]).decode(errors="replace")
        elif op == "open":
            rec["flags"] = args[1]
        return rec

    def _audit(self, op: str, args: tuple[Any, ...], rec: dict[str, Any], code: int, result: Any) -> None:
        if not code:
            if op == "read":
                rec["bytes"] = len(result)
            elif op == "write":
                rec["bytes"] = int(result)
        rec["result"] = errno_name(code)
        audit_log.info(op, extra={"audit": rec})

    @staticmethod
    def _join(parent: str | None, name: bytes) -> str | None:
        if parent is None:
            return None
        return parent + ("" if parent.endswith("/") else "/") + bytes(name).decode(errors="replace")

    def _dir_path(self, ino: int) -> str | None:
        """Path of directory ``ino`` (cached until the next rename or rmdir)."""
        hit = self._dirs.get(ino)
        if hit is not None:
            return hit
        path = self.path(ino)
        if path is not None:
            if len(self._dirs) >= DIR_CACHE_MAX:
                self._dirs = {ROOT_INODE: "/"}
            self._dirs[ino] = path
        return path

    def path(self, ino: int) -> str | None:
        """A path of inode ``ino`` ("/a/b"), or None when it has no name left. Raises
        MetaError."""
        if ino in self._dirs:
            return self._dirs[ino]
        found = self.fs.dentry_of(ino)
        if found is None:
            return None
        parent, name = found
        return self._join(self._dir_path(parent), name)
