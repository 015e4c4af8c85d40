"""One hook around every FUSE request handler: duration, result, caller and paths.

:meth:`Observer.install` replaces the handlers of one :class:`CasOperations` instance
with wrappers that time the call (ns, ``time.perf_counter_ns``), take its result (0,
or the errno of the ``FUSEError`` it raised), the caller's uid/gid/pid from the request
context, and -- only for the requests the audit log records -- the path(s) the
request names, resolved just before it runs. Two consumers read what the hook takes:

* the metrics (fusefront/metrics.py): a latency histogram and error counts per
  operation (bytes read and written are the engine's counters,
  ``Filesystem.bytes_read``/``bytes_written``, which run/stats.json shows too);
* the audit log (cas/config/audit.py): one JSON line per request of the chosen level.

With metrics and the audit log both off nothing is installed: the handlers are the
class's own, and the hook costs nothing. With only the audit log at ``changes``, only
the handlers of that level are wrapped (reads, writes and lookups stay unwrapped).

Callers of read and write: pyfuse3 passes no request context to read, write, flush,
fsync, release and readdir, so their audit records carry the uid/gid/pid of the
last process that opened the inode through this mount (file handles are inode numbers,
see fusefront/operations.py). Paths: a path of the inode (one of its hard links), built
from a RAM map inode -> (parent inode, name) that the hook keeps up to date from the
requests it sees (lookup, mkdir, mknod, symlink, create and link add names, and so does
every entry a readdir hands to the kernel (readdirplus: the kernel holds those inodes
without a lookup, so a tree walked by ``os.walk``/``find`` is opened by inode, never
looked up); rename moves one; unlink and rmdir drop one; a lost group transaction
empties the map), so an open, setattr, read or write of a known inode
runs no query; an inode not in the map is found through its dentry
(:meth:`cas.engine.fs.Filesystem.dentry_of`, one indexed query per unknown level) and
remembered. The walk to the root is a loop capped at MAX_DEPTH levels (a deeper path,
or a loop in damaged metadata, gives ``null``), ``null`` also when the inode has no
name left. docs/monitoring.md describes the records.

The hook cannot fail a request: an exception in its own bookkeeping (paths, counters,
the audit record) is logged once (logger ``fusefront.observe``) and dropped, and the
request's own result or FUSEError is passed on unchanged (tests/test_observe.py::
test_deep_tree_does_not_kill_the_mount).
"""
from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3

from cas.config.audit import ALL, CHANGES, LOGGER, OFF
from cas.counters import Histogram
from cas.errors import CasError
from cas.engine.fs import RENAME_EXCHANGE, Filesystem
from cas.db.database import ROOT_INODE

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
NAMES_MAX = 100_000       # inodes whose (parent, name) is remembered (about 250 bytes each;
                          # when full, the oldest learned goes)
MAX_DEPTH = 10_000        # levels a path walk climbs before it gives up (None)
#: handlers whose success adds, moves or drops a name in the path map
TRACKS = frozenset(("lookup", "mknod", "mkdir", "symlink", "create", "link", "rename", "unlink", "rmdir"))
OPENERS_MAX = 100_000     # inodes whose last opener is remembered (level all)
_SETATTR_FIELDS = (("update_mode", "mode", "st_mode"), ("update_uid", "uid", "st_uid"),
                   ("update_gid", "gid", "st_gid"), ("update_size", "size", "st_size"),
                   ("update_atime", "atime_ns", "st_atime_ns"), ("update_mtime", "mtime_ns", "st_mtime_ns"))


def errno_name(code: int) -> str | int:
    """0 for success, else the errno's symbolic name ("ENOTEMPTY"), else the number."""
    return 0 if not code else errno.errorcode.get(code, code)


class Observer:
    """What the hook collects for one mount. ``metrics``: keep latency and error counts;
    ``audit_level``: cas.config.audit.OFF, CHANGES or ALL. Everything runs on the trio loop
    thread; the metrics collector reads the counters from its own thread (plain ints
    and :class:`cas.counters.Histogram`, safe to read there)."""

    def __init__(self, fs: Filesystem, *, metrics: bool = False, audit_level: str = OFF) -> None:
        self.fs = fs
        self.metrics = metrics
        self.audit_level = audit_level
        self.latency: dict[str, Histogram] = {}        # op -> duration histogram
        self.errors: dict[tuple[str, str], int] = {}   # (op, errno name) -> requests
        self._names: dict[int, tuple[int, bytes]] = {}   # inode -> (parent inode, name)
        self._inos: dict[tuple[int, bytes], int] = {}    # (parent inode, name) -> inode
        self._openers: dict[int, tuple[int, int, int]] = {}
        self.hook_errors = 0     # exceptions of the hook's own bookkeeping, dropped
        self.path_queries = 0    # dentry queries of path walks (names missing from the map)

    @property
    def enabled(self) -> bool:
        """True when metrics or the audit log are on (else nothing is installed)."""
        return self.metrics or self.audit_level != OFF

    def audited(self, op: str) -> bool:
        """True when FUSE operation ``op`` is written to the audit log at this level."""
        level = AUDIT_LEVEL.get(op)
        return level is not None and (self.audit_level == ALL or (self.audit_level == CHANGES and level == CHANGES))

    def install(self, ops: pyfuse3.Operations) -> None:
        """Wrap the handlers of ``ops`` (instance attributes shadow the class's methods,
        which is what pyfuse3 calls) that metrics or the audit log need."""
        for op in HANDLERS:
            if self.metrics or self.audited(op) or (self.audit_level != OFF and op in TRACKS):
                setattr(ops, op, self._wrap(op, getattr(ops, op)))
        if self.audit_level == OFF:
            return
        if hasattr(ops, "entry_seen"):   # CasOperations: the names readdir hands out
            setattr(ops, "entry_seen", self._entry_seen)
        forget_tables = getattr(ops, "_forget_tables", None)
        if forget_tables is not None:
            # a lost group transaction rolled namespace changes back behind the hook's
            # back: the FUSE layer forgets its tables (on the loop thread), so does the map
            def forget_all() -> None:
                forget_tables()
                self.forget_names()
            setattr(ops, "_forget_tables", forget_all)

    def forget_names(self) -> None:
        """Empty the path map (its names are asked for again on demand)."""
        self._names.clear()
        self._inos.clear()

    def _entry_seen(self, parent: int, name: bytes, ino: int) -> None:
        """A readdir handed the kernel ``name`` in ``parent`` as inode ``ino``: learn it.
        Never raises (the hook cannot fail a request)."""
        try:
            self._learn(parent, name, ino)
        except Exception as exc:
            self._trouble("readdir", exc)

    # -- the hook ----------------------------------------------------------------------
    def _wrap(self, op: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        audited = self.audited(op)
        hist = self.latency.setdefault(op, Histogram()) if self.metrics else None
        tracks = op in TRACKS and self.audit_level != OFF
        remembers_opener = op in ("open", "create") and self.audit_level == ALL

        async def hooked(*args: Any) -> Any:
            before = None
            if audited:
                try:
                    before = self._before(op, args)
                except Exception as exc:   # the hook must not fail the request
                    self._trouble(op, exc)
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
                try:
                    dt = time.perf_counter_ns() - t0
                    if hist is not None:
                        hist.observe_ns(dt)
                        self._count(op, code, result)
                    if tracks and not code:
                        self._track(op, args, result)
                    if remembers_opener and not code:
                        self._remember_opener(op, args, result)
                    if before is not None:
                        self._audit(op, args, before, code, result)
                except Exception as exc:   # the request's own result stands
                    self._trouble(op, exc)
        hooked.__name__ = op
        return hooked

    def _trouble(self, op: str, exc: Exception) -> None:
        """An exception of the hook's own bookkeeping: logged the first time, counted."""
        self.hook_errors += 1
        if self.hook_errors == 1:
            logging.getLogger(__name__).error("audit/metrics hook failed in %s (logged once, dropped): %r",
                                              op, exc, exc_info=exc)

    def _count(self, op: str, code: int, result: Any) -> None:
        if code:   # bytes read and written: cas.engine.fs.Filesystem counts them (one set for stats.json and /metrics)
            key = (op, str(errno_name(code)))
            self.errors[key] = self.errors.get(key, 0) + 1

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

    # -- the path map --------------------------------------------------------------------
    def _learn(self, parent: int, name: bytes, ino: int) -> None:
        """Remember that ``name`` in directory ``parent`` is inode ``ino``."""
        if ino == ROOT_INODE or not ino:
            return
        key = (parent, bytes(name))
        if self._inos.get(key) == ino:
            return                 # known already (a listing read again)
        self._drop(key)
        old = self._names.get(ino)
        if old is not None:
            self._inos.pop(old, None)
        elif len(self._names) >= NAMES_MAX:
            # full: the oldest learned name goes (the two maps are each other's
            # inverse, so one entry leaves each); the dentries give it back on demand
            gone_ino, gone_key = next(iter(self._names.items()))
            del self._names[gone_ino]
            self._inos.pop(gone_key, None)
        self._names[ino] = key
        self._inos[key] = ino

    def _drop(self, key: tuple[int, bytes]) -> int | None:
        """Forget the name ``key`` (parent, name); returns the inode it named, if known."""
        ino = self._inos.pop(key, None)
        if ino is not None and self._names.get(ino) == key:
            del self._names[ino]
        return ino

    def _track(self, op: str, args: tuple[Any, ...], result: Any) -> None:
        """Keep the path map in step with a request that succeeded."""
        if op in ("lookup", "mknod", "mkdir", "symlink"):
            self._learn(args[0], args[1], result.st_ino)
        elif op == "create":
            self._learn(args[0], args[1], result[1].st_ino)
        elif op == "link":
            self._learn(args[1], args[2], args[0])
        elif op in ("unlink", "rmdir"):
            self._drop((args[0], bytes(args[1])))
        elif op == "rename":
            old, new, flags = (args[0], bytes(args[1])), (args[2], bytes(args[3])), args[4]
            moved = self._drop(old)
            replaced = self._drop(new)
            if moved is not None:
                self._learn(new[0], new[1], moved)
            if replaced is not None and flags & RENAME_EXCHANGE:
                self._learn(old[0], old[1], replaced)

    def _dir_path(self, ino: int) -> str | None:
        """Path of directory ``ino``. Raises MetaError."""
        return self.path(ino)

    def path(self, ino: int) -> str | None:
        """A path of inode ``ino`` ("/a/b"), or None when it has no name left or lies
        deeper than MAX_DEPTH levels. No query for the levels in the path map, one
        indexed query per other level. Raises MetaError."""
        parts: list[bytes] = []
        cur = ino
        for _ in range(MAX_DEPTH):
            if cur == ROOT_INODE:
                return "/" + b"/".join(reversed(parts)).decode(errors="replace")
            hit = self._names.get(cur)
            if hit is None:
                self.path_queries += 1
                hit = self.fs.dentry_of(cur)
                if hit is None:
                    return None
                self._learn(hit[0], hit[1], cur)
            parts.append(hit[1])
            cur = hit[0]
        return None
