"""casfs against a real directory: the same random POSIX operations on both, compared.

A Hypothesis state machine applies every operation to a casfs mount and to a plain
directory on the local disk (the reference), at the same relative paths. Each operation
must succeed on both or fail on both with the same errno, return the same result, and
after every step the two trees must agree: the same relative paths, file types,
permission bits, sizes of files and symlinks, contents, symlink targets, link counts,
the same grouping of paths into hard-linked inodes, and the same extended attributes.

Deliberately not compared: directory st_size (casfs reports 0), st_blocks, times,
inode numbers, uid/gid.

The mount reads file contents through the page cache (``keep_cache``); the tree
comparison reads each casfs file a second time with O_DIRECT so that what the daemon
holds is checked too, not only the kernel's cached copy. One mount serves the whole
Hypothesis run (each example works in a fresh subdirectory); at the end the volume is
unmounted, checked with `casfs fsck` (refcounts, link counts, chunk files), collected
with `casfs gc --grace 0` (which must delete nothing still referenced), remounted and
compared again: everything was flushed, persisted, and counted right.

Operations: create (O_EXCL, O_TRUNC), pwrite at any offset (holes past EOF, writes
across 64 KiB chunk boundaries, all-zero data that casfs stores as holes, repeated
patterns that deduplicate), append, writes through a shared mmap, truncate and
ftruncate (shrink and grow), rename (plain, over a file, RENAME_NOREPLACE,
RENAME_EXCHANGE), hard links, unlink, mkdir, rmdir, symlink and readlink (also as path
components), chmod (all 12 mode bits), user.* xattrs (set with XATTR_CREATE/REPLACE,
get, remove, list), names of 255 and 256 bytes, and file descriptors held open across
steps (read, write, ftruncate, fstat, fsync through them while their file is renamed,
replaced or unlinked).

The deterministic tests replay fixed sequences that matter (multi-chunk overwrite after
reopen, truncate into a chunk and regrow, sparse files, data buffered across the
writeback timer) and two regressions (open with O_TRUNC; fstat of a directory removed
while open).
"""
from __future__ import annotations

import collections
import ctypes
import errno
import itertools
import mmap
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from tests.test_posix_details import data_bytes_mismatches

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="needs /dev/fuse and fusermount3"),
]

CS = 64 * 1024                  # chunk size of the volumes under test
# size of the random run; raise them for a longer search, e.g. CASFS_MODEL_EXAMPLES=500
EXAMPLES = int(os.environ.get("CASFS_MODEL_EXAMPLES", "200"))
STEPS = int(os.environ.get("CASFS_MODEL_STEPS", "50"))
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
XATTR_CREATE = getattr(os, "XATTR_CREATE", 1)
XATTR_REPLACE = getattr(os, "XATTR_REPLACE", 2)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int


def renameat2(src: str | Path, dst: str | Path, flags: int) -> None:
    """renameat2(2) through libc; raises OSError with the errno."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(src), None, str(dst))


# -- reading and comparing trees ----------------------------------------------------------

def read_all(path: Path) -> bytes:
    """Whole contents of ``path`` through an ordinary open (may come from the page cache)."""
    with open(path, "rb", buffering=0) as f:
        return f.read()


def read_direct(path: Path, size: int) -> bytes:
    """Whole contents of ``path`` read with O_DIRECT (FUSE: straight from the daemon)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = max(4096, -(-(size + 1) // 4096) * 4096)
        buf = mmap.mmap(-1, n)  # page aligned
        try:
            got = 0
            while True:
                r = os.preadv(fd, [memoryview(buf)[got:]], got)
                if r <= 0:
                    break
                got += r
                if got >= n:
                    break
            return bytes(buf[:got])
        finally:
            buf.close()
    finally:
        os.close(fd)


def snapshot(root: Path, direct: bool = False) -> dict[str, Any]:
    """Everything compared about the tree below ``root``, keyed by relative path."""
    out: dict[str, Any] = {}
    first_of_ino: dict[int, str] = {}

    def walk(d: Path, rel: str) -> None:
        names = sorted(os.listdir(d))
        for name in names:
            p = d / name
            r = f"{rel}/{name}" if rel else name
            s = os.lstat(p)
            kind = stat.S_IFMT(s.st_mode)
            info: dict[str, Any] = {"type": kind, "mode": oct(stat.S_IMODE(s.st_mode)),
                                    "nlink": s.st_nlink}
            try:
                info["xattrs"] = {n: os.getxattr(p, n, follow_symlinks=False)
                                  for n in sorted(os.listxattr(p, follow_symlinks=False))}
            except OSError as e:
                info["xattrs"] = f"error {errname(e)}"
            if stat.S_ISREG(kind):
                info["size"] = s.st_size
                info["data"] = read_all(p)
                if direct:
                    info["data_direct"] = read_direct(p, s.st_size)
                info["link_group"] = first_of_ino.setdefault(s.st_ino, r)
            elif stat.S_ISLNK(kind):
                info["size"] = s.st_size
                info["target"] = os.readlink(p)
            out[r] = info
            if stat.S_ISDIR(kind):
                walk(p, r)

    walk(root, "")
    return out


def describe_diff(ref: dict[str, Any], cas: dict[str, Any]) -> str:
    """Human-readable differences between two snapshots (the reference first)."""
    lines = []
    for path in sorted(set(ref) | set(cas)):
        if path not in cas:
            lines.append(f"{path}: missing on casfs (reference: {short(ref[path])})")
        elif path not in ref:
            lines.append(f"{path}: extra on casfs ({short(cas[path])})")
        else:
            a, b = ref[path], cas[path]
            for k in sorted(set(a) | set(b)):
                if k == "data_direct":
                    if b.get(k) != a.get("data"):
                        lines.append(f"{path}: O_DIRECT read {describe_bytes(a.get('data'), b.get(k))}")
                elif a.get(k) != b.get(k):
                    if k == "data":
                        lines.append(f"{path}: data {describe_bytes(a[k], b[k])}")
                    else:
                        lines.append(f"{path}: {k} reference={a.get(k)!r} casfs={b.get(k)!r}")
    return "\n".join(lines)


def short(info: dict[str, Any]) -> str:
    return repr({k: (f"<{len(v)} bytes>" if isinstance(v, bytes) else v) for k, v in info.items()})


def describe_bytes(a: bytes | None, b: bytes | None) -> str:
    if a is None or b is None:
        return f"reference={a!r:.60} casfs={b!r:.60}"
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"reference has {len(a)} bytes, casfs {len(b)}; first difference at offset {first} "
            f"(chunk {first // CS}+{first % CS}): reference {a[first:first + 16]!r} "
            f"casfs {b[first:first + 16]!r}")


def compare_trees(ref_root: Path, cas_root: Path, context: str = "") -> None:
    ref = snapshot(ref_root)
    cas = snapshot(cas_root, direct=True)
    for info in cas.values():
        if "data_direct" in info and info["data_direct"] == info.get("data"):
            del info["data_direct"]
    if ref != cas:
        raise AssertionError(f"trees differ{context}:\n{describe_diff(ref, cas)}")


# -- strategies ---------------------------------------------------------------------------

NAMES = ["a", "b", "c", "d", "n" * 255, "m" * 256]   # 255 bytes is NAME_MAX; 256 is too long
MAX_DEPTH = 2                         # directories nest at most this deep
SYMLINK_TARGETS = ["a", "b", "c", "d", "a/b", "b/a", "nowhere", "x" * 200]
XATTR_NAMES = ["user.a", "user.b", "user.cas." + "n" * 40]

boundary = st.builds(lambda k, d: max(0, k * CS + d), st.integers(0, 6), st.integers(-3, 3))
offsets = st.one_of(st.integers(0, 100), st.integers(0, 6 * CS), boundary)
lengths = st.one_of(st.integers(0, 64), st.integers(0, 3 * CS), boundary.filter(lambda n: n <= 3 * CS))


def _payload(pattern: bytes, n: int) -> bytes:
    return (pattern * (n // len(pattern) + 1))[:n]


# zero patterns matter: casfs stores all-zero slots as holes; repeated patterns dedup
payloads = st.builds(_payload, st.one_of(st.just(b"\0"), st.binary(min_size=1, max_size=7)), lengths)
modes = st.one_of(st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o000, 0o444]), st.integers(0, 0o7777))
xattr_values = st.one_of(st.just(b""), st.binary(max_size=40), st.builds(_payload, st.binary(min_size=1, max_size=3),
                                                                        st.integers(0, 600)))


class PosixModel(RuleBasedStateMachine):
    """Operations applied to a casfs directory and a reference directory, compared."""

    ref_top: Path | None = None   # set by the test: parent of the per-example directories
    cas_top: Path | None = None
    counter = itertools.count()
    outcomes: collections.Counter[str] = collections.Counter()   # "op ok" / "op ENOENT" ...

    def __init__(self) -> None:
        super().__init__()
        assert self.ref_top is not None and self.cas_top is not None
        name = f"ex{next(self.counter)}"
        self.roots = (self.ref_top / name, self.cas_top / name)
        for r in self.roots:
            r.mkdir()
        # open handles: (relative path at open time, open flags, (ref fd, casfs fd))
        self.fds: list[tuple[str, str, tuple[int, int]]] = []

    def teardown(self) -> None:
        for _, _, pair in self.fds:
            for fd in pair:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fds = []

    # -- helpers ------------------------------------------------------------------------
    def both(self, what: str, fn: Callable[[Path, int], Any]) -> Any:
        """Run ``fn(root, side)`` on the reference (side 0) then casfs (side 1); compare."""
        result = run_both(self.roots, what, fn)
        self.outcomes[f"{what.split()[0]} {result[0] if result[0] == 'ok' else result[1]}"] += 1
        return result

    def entries(self) -> list[tuple[str, int]]:
        """(relative path, S_IFMT of lstat) of everything in the reference tree."""
        return tree_entries(self.roots[0])

    def existing(self, data: st.DataObject, prefer: int | None = stat.S_IFREG) -> str:
        """A path that exists in the reference tree (preferably of type ``prefer``).

        With an empty tree, a name that does not exist.
        """
        ents = self.entries()
        if not ents:
            return data.draw(st.sampled_from(NAMES), label="path")
        every = st.sampled_from([p for p, _ in ents])
        preferred = [p for p, k in ents if k == prefer]
        if preferred:
            return data.draw(st.one_of(st.sampled_from(preferred), every), label="path")
        return data.draw(every, label="path")

    def any_path(self, data: st.DataObject) -> str:
        """An existing path, or a (maybe new) name inside an existing directory."""
        ents = self.entries()
        # symlinks are parents too: the kernel resolves them through casfs readlink
        parents = [""] + [p for p, k in ents if k in (stat.S_IFDIR, stat.S_IFLNK) and p.count("/") < MAX_DEPTH]
        fresh = st.builds(lambda parent, name: f"{parent}/{name}" if parent else name,
                          st.sampled_from(parents), st.sampled_from(NAMES))
        if not ents:
            return data.draw(fresh, label="path")
        return data.draw(st.one_of(fresh, st.sampled_from([p for p, _ in ents])), label="path")

    def pick_fd(self, data: st.DataObject) -> tuple[int, tuple[str, str, tuple[int, int]]]:
        i = data.draw(st.integers(0, len(self.fds) - 1), label="fd index")
        return i, self.fds[i]

    @initialize(name=st.sampled_from(NAMES[:5]), payload=payloads, mkdir=st.booleans())
    def start(self, name: str, payload: bytes, mkdir: bool) -> None:
        """Start from one file (and maybe a directory holding a copy of it)."""
        def op(root: Path, side: int) -> None:
            (root / name).write_bytes(payload)
            if mkdir:
                (root / "sub").mkdir()
                (root / "sub" / name).write_bytes(payload)
        self.both(f"start {name} with {len(payload)} bytes", op)

    # -- files --------------------------------------------------------------------------
    @rule(data=st.data(), flags=st.sampled_from(["O_CREAT", "O_CREAT|O_EXCL", "O_CREAT|O_TRUNC"]),
          mode=modes, payload=payloads)
    def create_file(self, data: st.DataObject, flags: str, mode: int, payload: bytes) -> None:
        path = self.any_path(data)
        fl = os.O_WRONLY | eval_flags(flags)

        def op(root: Path, side: int) -> int:
            fd = os.open(root / path, fl, mode)
            try:
                return os.write(fd, payload)
            finally:
                os.close(fd)
        self.both(f"create {path} {flags} mode {mode:o} with {len(payload)} bytes", op)

    @rule(data=st.data(), offset=offsets, payload=payloads)
    def pwrite(self, data: st.DataObject, offset: int, payload: bytes) -> None:
        path = self.existing(data)

        def op(root: Path, side: int) -> int:
            fd = os.open(root / path, os.O_WRONLY)
            try:
                return os.pwrite(fd, payload, offset)
            finally:
                os.close(fd)
        self.both(f"pwrite {path} at {offset} of {len(payload)} bytes {payload[:8]!r}", op)

    @rule(data=st.data(), payload=payloads)
    def append(self, data: st.DataObject, payload: bytes) -> None:
        path = self.existing(data)

        def op(root: Path, side: int) -> int:
            fd = os.open(root / path, os.O_WRONLY | os.O_APPEND)
            try:
                return os.write(fd, payload)
            finally:
                os.close(fd)
        self.both(f"append to {path} {len(payload)} bytes", op)

    @rule(data=st.data(), offset=offsets, payload=payloads)
    def mmap_write(self, data: st.DataObject, offset: int, payload: bytes) -> None:
        """Store through a shared writable mapping (FUSE writepage), msync, unmap."""
        path = self.existing(data)

        def op(root: Path, side: int) -> int:
            return mmap_store(root / path, offset, payload)
        self.both(f"mmap-write {path} at {offset} up to {len(payload)} bytes", op)

    @rule(data=st.data(), size=offsets)
    def truncate(self, data: st.DataObject, size: int) -> None:
        path = self.existing(data)
        self.both(f"truncate {path} to {size}", lambda root, side: os.truncate(root / path, size))

    @rule(data=st.data(), offset=offsets, length=lengths)
    def read_range(self, data: st.DataObject, offset: int, length: int) -> None:
        path = self.existing(data)

        def op(root: Path, side: int) -> bytes:
            fd = os.open(root / path, os.O_RDONLY)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)
        self.both(f"pread {path} {length} bytes at {offset}", op)

    @rule(data=st.data())
    def read_whole(self, data: st.DataObject) -> None:
        path = self.existing(data)
        self.both(f"read {path}", lambda root, side: read_all(root / path))

    # -- namespace ----------------------------------------------------------------------
    @rule(data=st.data(), how=st.sampled_from(["rename", "renameat2-0", "NOREPLACE", "EXCHANGE"]))
    def rename(self, data: st.DataObject, how: str) -> None:
        src = self.existing(data, prefer=None)
        dst = self.any_path(data)

        def op(root: Path, side: int) -> None:
            if how == "rename":
                os.rename(root / src, root / dst)
            else:
                flags = {"renameat2-0": 0, "NOREPLACE": RENAME_NOREPLACE, "EXCHANGE": RENAME_EXCHANGE}[how]
                renameat2(root / src, root / dst, flags)
        self.both(f"{how} {src} -> {dst}", op)

    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        src = self.existing(data)
        dst = self.any_path(data)
        self.both(f"link {src} -> {dst}",
                  lambda root, side: os.link(root / src, root / dst, follow_symlinks=False))

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        path = self.existing(data)
        self.both(f"unlink {path}", lambda root, side: os.unlink(root / path))

    @rule(data=st.data(), mode=modes)
    def mkdir(self, data: st.DataObject, mode: int) -> None:
        path = self.any_path(data)
        self.both(f"mkdir {path} {mode:o}", lambda root, side: os.mkdir(root / path, mode))

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        path = self.existing(data, prefer=stat.S_IFDIR)
        self.both(f"rmdir {path}", lambda root, side: os.rmdir(root / path))

    @rule(data=st.data(), link_target=st.sampled_from(SYMLINK_TARGETS))
    def symlink(self, data: st.DataObject, link_target: str) -> None:
        path = self.any_path(data)
        self.both(f"symlink {path} -> {link_target}", lambda root, side: os.symlink(link_target, root / path))

    @rule(data=st.data())
    def readlink(self, data: st.DataObject) -> None:
        path = self.existing(data, prefer=stat.S_IFLNK)
        self.both(f"readlink {path}", lambda root, side: os.readlink(root / path))

    @rule(data=st.data(), mode=modes)
    def chmod(self, data: st.DataObject, mode: int) -> None:
        path = self.existing(data, prefer=None)
        self.both(f"chmod {path} {mode:o}", lambda root, side: os.chmod(root / path, mode))

    # -- xattrs -------------------------------------------------------------------------
    @rule(data=st.data(), name=st.sampled_from(XATTR_NAMES), value=xattr_values,
          flags=st.sampled_from([0, XATTR_CREATE, XATTR_REPLACE]))
    def setxattr(self, data: st.DataObject, name: str, value: bytes, flags: int) -> None:
        path = self.existing(data)
        self.both(f"setxattr {path} {name}={value[:16]!r}({len(value)}) flags {flags}",
                  lambda root, side: os.setxattr(root / path, name, value, flags, follow_symlinks=False))

    @rule(data=st.data(), name=st.sampled_from(XATTR_NAMES))
    def getxattr(self, data: st.DataObject, name: str) -> None:
        path = self.existing(data)
        self.both(f"getxattr {path} {name}",
                  lambda root, side: os.getxattr(root / path, name, follow_symlinks=False))

    @rule(data=st.data(), name=st.sampled_from(XATTR_NAMES))
    def removexattr(self, data: st.DataObject, name: str) -> None:
        path = self.existing(data)
        self.both(f"removexattr {path} {name}",
                  lambda root, side: os.removexattr(root / path, name, follow_symlinks=False))

    @rule(data=st.data())
    def listxattr(self, data: st.DataObject) -> None:
        path = self.existing(data)
        self.both(f"listxattr {path}",
                  lambda root, side: sorted(os.listxattr(root / path, follow_symlinks=False)))

    # -- open handles -------------------------------------------------------------------
    @rule(data=st.data(), offset=offsets, length=lengths, payload=payloads, woff=offsets)
    def open_unlink_read(self, data: st.DataObject, offset: int, length: int, payload: bytes,
                         woff: int) -> None:
        """Open a file, unlink it, read (and write, read again) through the handle."""
        path = self.existing(data)

        def op(root: Path, side: int) -> Any:
            fd = os.open(root / path, os.O_RDWR)
            try:
                before = os.pread(fd, length, offset)
                os.unlink(root / path)
                s = os.fstat(fd)
                after = os.pread(fd, length, offset)
                os.pwrite(fd, payload, woff)
                s2 = os.fstat(fd)
                whole = os.pread(fd, s2.st_size + 1, 0)
                return (before, after, s.st_nlink, s.st_size, s2.st_nlink, s2.st_size, whole)
            finally:
                os.close(fd)
        self.both(f"open-unlink-read {path}: read {length} at {offset}, unlink, read, "
                  f"write {len(payload)} at {woff}", op)

    @precondition(lambda self: len(self.fds) < 4)
    @rule(data=st.data(), flags=st.sampled_from(["O_RDWR", "O_RDONLY", "O_WRONLY|O_APPEND", "O_RDWR|O_CREAT",
                                                "O_RDWR|O_TRUNC"]))
    def open_fd(self, data: st.DataObject, flags: str) -> None:
        path = self.any_path(data) if "CREAT" in flags else self.existing(data)
        fl = eval_flags(flags)
        fds: list[int] = []

        def op(root: Path, side: int) -> None:
            fds.append(os.open(root / path, fl, 0o644))
        try:
            self.both(f"open {path} {flags}", op)
        except AssertionError:
            for fd in fds:
                os.close(fd)
            raise
        if len(fds) == 2:
            self.fds.append((path, flags, (fds[0], fds[1])))

    @precondition(lambda self: self.fds)
    @rule(data=st.data())
    def close_fd(self, data: st.DataObject) -> None:
        i, (path, flags, pair) = self.pick_fd(data)
        del self.fds[i]
        self.both(f"close fd of {path} ({flags})", lambda root, side: os.close(pair[side]))

    @precondition(lambda self: self.fds)
    @rule(data=st.data(), offset=offsets, payload=payloads, positional=st.booleans())
    def fd_write(self, data: st.DataObject, offset: int, payload: bytes, positional: bool) -> None:
        i, (path, flags, pair) = self.pick_fd(data)
        if positional:
            self.both(f"pwrite fd of {path} ({flags}) at {offset} {len(payload)} bytes",
                      lambda root, side: os.pwrite(pair[side], payload, offset))
        else:
            self.both(f"write fd of {path} ({flags}) {len(payload)} bytes",
                      lambda root, side: (os.write(pair[side], payload), os.lseek(pair[side], 0, os.SEEK_CUR)))

    @precondition(lambda self: self.fds)
    @rule(data=st.data(), offset=offsets, length=lengths)
    def fd_read(self, data: st.DataObject, offset: int, length: int) -> None:
        i, (path, flags, pair) = self.pick_fd(data)
        self.both(f"pread fd of {path} ({flags}) {length} at {offset}",
                  lambda root, side: os.pread(pair[side], length, offset))

    @precondition(lambda self: self.fds)
    @rule(data=st.data(), size=offsets)
    def fd_truncate(self, data: st.DataObject, size: int) -> None:
        i, (path, flags, pair) = self.pick_fd(data)
        self.both(f"ftruncate fd of {path} ({flags}) to {size}",
                  lambda root, side: os.ftruncate(pair[side], size))

    @precondition(lambda self: self.fds)
    @rule(data=st.data())
    def fd_stat_fsync(self, data: st.DataObject) -> None:
        i, (path, flags, pair) = self.pick_fd(data)

        def op(root: Path, side: int) -> Any:
            fd = pair[side]
            s = os.fstat(fd)
            try:
                os.fsync(fd)
                synced = "ok"
            except OSError as e:
                synced = errname(e)
            try:
                whole: bytes | str = os.pread(fd, s.st_size + 1, 0)
            except OSError as e:   # EBADF (write-only), EISDIR
                whole = errname(e)
            size = s.st_size if stat.S_ISREG(s.st_mode) else None   # directory sizes differ by design
            return (stat.S_IFMT(s.st_mode), oct(stat.S_IMODE(s.st_mode)), s.st_nlink, size, synced, whole)
        self.both(f"fstat+fsync fd of {path} ({flags})", op)

    # -- the comparison -----------------------------------------------------------------
    @invariant()
    def trees_agree(self) -> None:
        compare_trees(*self.roots)


def run_both(roots: tuple[Path, Path], what: str, fn: Callable[[Path, int], Any]) -> tuple[str, Any]:
    """``fn(root, side)`` on the reference (side 0) then on casfs (side 1).

    Both must return the same value or raise OSError with the same errno; returns
    ("ok", value) or ("error", errno name).
    """
    results: list[tuple[str, Any]] = []
    for side, root in enumerate(roots):
        try:
            results.append(("ok", fn(root, side)))
        except OSError as e:
            results.append(("error", errname(e)))
    if results[0] != results[1]:
        raise AssertionError(f"{what}: reference -> {clip(results[0])}, casfs -> {clip(results[1])}")
    return results[0]




def mmap_store(path: Path, offset: int, payload: bytes) -> int:
    """Store ``payload`` into the existing bytes of file ``path`` at ``offset`` (clamped to
    the last byte) through a shared writable mmap, then msync; returns the bytes stored
    (0 for an empty file: an mmap cannot grow a file). Raises OSError."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        start = min(offset, size - 1)
        piece = payload[:size - start]
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[start:start + len(piece)] = piece
            m.flush()
        return len(piece)
    finally:
        os.close(fd)

def tree_entries(root: Path) -> list[tuple[str, int]]:
    """(path relative to ``root``, S_IFMT of lstat) of everything below ``root``, in
    sorted order, depth first (a directory before its contents)."""
    out: list[tuple[str, int]] = []

    def walk(d: Path, rel: str) -> None:
        for name in sorted(os.listdir(d)):
            r = f"{rel}/{name}" if rel else name
            kind = stat.S_IFMT(os.lstat(d / name).st_mode)
            out.append((r, kind))
            if kind == stat.S_IFDIR:
                walk(d / name, r)

    walk(root, "")
    return out

def errname(e: OSError) -> str:
    """The symbolic errno of ``e`` (ENOENT, ...)."""
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def eval_flags(spec: str) -> int:
    fl = 0
    for part in spec.split("|"):
        fl |= getattr(os, part)
    return fl


def clip(result: tuple[str, Any]) -> str:
    kind, value = result
    if isinstance(value, (bytes, bytearray)) and len(value) > 48:
        return f"{kind} <{len(value)} bytes {bytes(value[:24])!r}...>"
    if isinstance(value, tuple):
        return f"{kind} " + repr(tuple(f"<{len(v)} bytes>" if isinstance(v, bytes) and len(v) > 48 else v
                                       for v in value))
    return f"{kind} {value!r}"


def mount_log(casenv: Any, volume: str) -> str:
    p = casenv.data_home / volume / "log" / "mount.log"
    try:
        return p.read_text(errors="replace")[-4000:]
    except OSError:
        return "(no mount log)"


# -- tests ------------------------------------------------------------------------------------

def test_random_operations_match_a_real_directory(casenv: Any, tmp_path: Path) -> None:
    casenv.init("model", chunk_size="64KiB")
    mp = casenv.mount("model")
    ref_top = tmp_path / "reference"
    ref_top.mkdir()
    PosixModel.ref_top, PosixModel.cas_top = ref_top, mp
    try:
        run_state_machine_as_test(PosixModel, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
            report_multiple_bugs=False, phases=[p for p in Phase if p != Phase.explain],
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large]))
    except BaseException:
        print("--- mount log tail ---\n" + mount_log(casenv, "model"))
        raise
    finally:
        PosixModel.ref_top = PosixModel.cas_top = None
        print("operations (casfs outcome):", dict(sorted(PosixModel.outcomes.items())))
    # everything written must have been flushed, with consistent refcounts and link
    # counts (fsck); gc must free nothing still referenced; all of it survives a remount
    casenv.umount(mp)
    casenv.run("fsck", "model")
    assert data_bytes_mismatches("model", CS) == []   # st_blocks' source (docs/posix.md)
    casenv.run("gc", "--grace", "0", "model")
    casenv.run("fsck", "model")
    mp = casenv.mount("model", mp)
    compare_trees(ref_top, mp, " after remount, fsck and gc")


def _write(path: Path, offset: int, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def _sequences(root: Path) -> None:
    """The same fixed sequences of operations, run in ``root``."""
    # 1. multi-chunk file: write, close, reopen, overwrite across the middle chunk boundaries
    f = root / "multi"
    _write(f, 0, bytes(range(251)) * (5 * CS // 251 + 1))
    _write(f, 2 * CS - 100, b"M" * (CS + 200), os.O_WRONLY)
    # 2. truncate down into the middle of a chunk, then grow: the cut bytes read as zeros
    t = root / "trunc"
    _write(t, 0, b"T" * (3 * CS + 1234))
    os.truncate(t, CS + 500)
    os.truncate(t, 3 * CS + 4000)
    _write(t, 3 * CS + 100, b"after", os.O_WRONLY)    # write into the regrown tail
    # the same through one open handle (buffered writes before the truncates)
    t2 = root / "trunc_fd"
    fd = os.open(t2, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"U" * (2 * CS + 77), 0)
        os.ftruncate(fd, CS // 2)
        os.ftruncate(fd, 2 * CS + 10)
        os.pwrite(fd, b"v", CS + 3)
    finally:
        os.close(fd)
    # 3. sparse file with a hole in the middle (whole chunks and a partial one)
    s = root / "sparse"
    _write(s, 0, b"head" * 10)
    _write(s, 4 * CS + 17, b"tail" * 10, os.O_WRONLY)
    # 4. overwrite a middle chunk of a reopened file with zeros (a hole in casfs)
    z = root / "zeroed"
    _write(z, 0, b"Z" * (3 * CS))
    _write(z, CS, bytes(CS), os.O_WRONLY)
    # 5. two files with the same chunks; unlinking one keeps the other's data
    for name in ("dup1", "dup2"):
        _write(root / name, 0, b"D" * (2 * CS + 5))
    os.unlink(root / "dup1")


def _ranges(root: Path, name: str) -> list[bytes]:
    """Reads of ``name`` at and around every chunk boundary."""
    fd = os.open(root / name, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return [os.pread(fd, n, max(0, k * CS + d)) for k in range(size // CS + 2)
                for d, n in ((-7, 14), (0, 1), (-1, 1), (-100, 300))]
    finally:
        os.close(fd)


def test_fixed_sequences_match_a_real_directory(casenv: Any, tmp_path: Path) -> None:
    casenv.init("fixed", chunk_size="64KiB")
    mp = casenv.mount("fixed")
    ref = tmp_path / "reference"
    ref.mkdir()
    roots = (ref, mp)
    _sequences(ref)
    _sequences(mp)
    compare_trees(ref, mp)
    for name in ("multi", "trunc", "trunc_fd", "sparse", "zeroed", "dup2"):
        run_both(roots, f"reads around chunk boundaries of {name}", lambda root, side: _ranges(root, name))

    # 6. data buffered in an open file across the daemon's writeback timer (5 s), then
    #    changed again through the same handle
    fds = [os.open(r / "held", os.O_RDWR | os.O_CREAT, 0o644) for r in roots]
    try:
        run_both(roots, "write held", lambda root, side: os.pwrite(fds[side], b"W" * (2 * CS + 10), 100))
        time.sleep(7)
        compare_trees(ref, mp, " with buffered data older than the writeback age")
        run_both(roots, "overwrite held", lambda root, side: os.pwrite(fds[side], b"x" * 10, CS - 5))
        run_both(roots, "ftruncate held", lambda root, side: os.ftruncate(fds[side], CS + 1))
        run_both(roots, "read held", lambda root, side: os.pread(fds[side], 3 * CS, 0))
    finally:
        for fd in fds:
            os.close(fd)
    compare_trees(ref, mp)
    casenv.umount(mp)
    assert data_bytes_mismatches("fixed", CS) == []   # truncations, holes, zeroed slots
    mp = casenv.mount("fixed", mp)
    compare_trees(ref, mp, " after remount")


def test_open_with_o_trunc_matches_a_real_directory(casenv: Any, tmp_path: Path) -> None:
    """open(O_TRUNC) of an existing file empties it (open(path, "w") relies on it)."""
    casenv.init("otrunc", chunk_size="64KiB")
    mp = casenv.mount("otrunc")
    ref = tmp_path / "reference"
    ref.mkdir()
    roots = (ref, mp)

    def rewrite(root: Path, side: int) -> bytes:
        _write(root / "f", 0, b"old contents " * (CS // 6))    # two chunks
        with open(root / "f", "wb") as f:                      # O_WRONLY|O_CREAT|O_TRUNC
            f.write(b"new")
        return read_all(root / "f")
    run_both(roots, "write 2 chunks, then open(path, 'wb') and write b'new'", rewrite)

    def trunc_open(root: Path, side: int) -> tuple[int, bytes]:
        fd = os.open(root / "f", os.O_RDWR | os.O_TRUNC)
        try:
            return os.fstat(fd).st_size, os.pread(fd, 100, 0)
        finally:
            os.close(fd)
    run_both(roots, "open(O_RDWR|O_TRUNC): fstat size and contents", trunc_open)
    compare_trees(ref, mp)


def test_removed_directory_open_fd_matches_a_real_directory(casenv: Any, tmp_path: Path) -> None:
    """A directory removed while open stays usable through the open fd (st_nlink 0)."""
    casenv.init("rmdiropen", chunk_size="64KiB")
    mp = casenv.mount("rmdiropen")
    ref = tmp_path / "reference"
    ref.mkdir()
    roots = (ref, mp)
    fds: list[int] = []

    def op(root: Path, side: int) -> tuple[Any, ...]:
        os.mkdir(root / "d")
        fds.append(os.open(root / "d", os.O_RDONLY | os.O_DIRECTORY))
        os.rmdir(root / "d")
        s = os.fstat(fds[side])
        return stat.S_IFMT(s.st_mode), s.st_nlink, os.listdir(fds[side])
    try:
        run_both(roots, "mkdir d, open it, rmdir d, fstat + listdir through the fd", op)
    finally:
        for fd in fds:
            os.close(fd)
    compare_trees(ref, mp)
