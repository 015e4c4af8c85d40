"""Concurrent stress: several threads of random operations at once on one casfs mount.

Threads, all started together on one mount of a volume with 64 KiB chunks:

- **Workers** (``CASFS_STRESS_WORKERS``, 4): each owns a subtree of the mount
  (``wK/``) and a model directory on the local disk, and runs ``CASFS_STRESS_OPS``
  (400) random operations drawn from ``random.Random(seed + K)``: create and pwrite at
  random offsets (1 B to 3 chunks, across slot boundaries, all-zero data that casfs
  stores as holes, small repeated patterns and whole chunks from a palette shared by
  every thread so that chunks deduplicate across threads), append, truncate (grow and
  shrink), 1 MiB sequential streams, stores through a shared mmap, pread and whole
  reads, stat, listdir, rename of files and directories (within the subtree; plain,
  RENAME_NOREPLACE, RENAME_EXCHANGE), unlink, mkdir, rmdir, hard links, symlinks, chmod, utime,
  user.* xattrs, fsync of a file or a directory, a copy of a file with sendfile(2)
  (dedup), and file descriptors held open across operations (pwrite, pread, ftruncate,
  fsync through them while their file is renamed or unlinked, so the writeback tick
  flushes them while the thread keeps writing). Every operation runs on the model,
  then on the mount; the outcome (return value, or errno) must be the same. Every 100
  operations a worker compares its whole subtree with its model while the other
  threads keep going.
- **A writer, a syncer and a reader sharing files** (``shared/``, outside the
  subtrees): the writer writes whole aligned 4 KiB blocks (O_DIRECT, 1 to 4 blocks at
  a time, so writes cross chunk slots) whose every byte is determined by (file, block
  number, version), and fsyncs now and then; the syncer fsyncs the same files through
  handles of its own while the writer writes on (the kernel serializes a file's fsync
  with its writes, so this overlaps a file's fsync with writes from the other thread
  right before and after it). One file (s0) is never fsynced before the end: the
  writer closes and reopens it often, and the engine's own writeback writes it back
  while it is being written. Both record, under a lock, the version of every block as
  of each completed fsync. The reader reads runs of blocks (O_DIRECT, or through the
  page cache) and checks that each block is well formed (never torn inside a block),
  that its version is at least the one fsynced before the read began (never older
  than fsynced data) and at least the one whose write had returned before the read
  began (POSIX read-after-write), and at most the last one the writer started.

The mount's writeback timer runs every 0.1 s and writes back open files' buffers once
they are 0.2 s old (``CASFS_WRITEBACK_INTERVAL_S``, ``CASFS_WRITEBACK_AGE_S``; defaults
0.5 s and 5 s), so that the engine's own writeback overlaps with the threads' writes to
the very files it writes back.

At the end: every subtree is compared with its model byte-exact (names, types, modes,
link counts and hard-link grouping, sizes, contents read through the page cache and
with O_DIRECT, symlink targets, xattrs), and every shared block with its last version;
then the volume is unmounted, checked with `casfs fsck` (refcounts, link counts, chunk
files), collected with `casfs gc --grace 0` (which must free nothing still referenced),
`casfs stats` must count exactly the live data (files, bytes, unique chunks, no
garbage), and after a remount everything is compared again.

Reproducing a failure: the seed is printed at the start and in every failure
(``CASFS_STRESS_SEED=N`` replays it). A seed fixes each thread's sequence of
operations and data; the interleaving of the threads is up to the machine, so a race
may need a few runs (or more operations, ``CASFS_STRESS_OPS=5000``) to show again.
Each thread's operations are logged with their start time (seconds since the run
began) to ``ops-*.log`` under the test's tmp directory (paths in the failure message);
``ops-all.log`` merges them in time order. A thread stuck in one operation for longer
than ``CASFS_STRESS_TIMEOUT`` seconds is reported with that operation (a deadlock in
the mount). ``CASFS_STRESS_MOUNT_ARGS`` passes extra `casfs mount` arguments (e.g.
``--durability immediate``).

Deliberately not compared (as in tests/test_posix_model.py): directory sizes, st_blocks,
inode numbers, uid/gid, and times other than right after utime.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import random
import re
import shlex
import shutil
import signal
import stat
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CasEnv
from tests.test_posix_details import data_bytes_mismatches
from tests.test_posix_model import (RENAME_EXCHANGE, RENAME_NOREPLACE, compare_trees, errname, mount_log,
                                    mmap_store, read_direct, renameat2, tree_entries)
from tests.treeutil import unique_chunk_bytes

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="needs /dev/fuse and fusermount3"),
]

CS = 64 * 1024                      # chunk size of the volume under test
OPS = int(os.environ.get("CASFS_STRESS_OPS", "400"))            # operations per thread
WORKERS = int(os.environ.get("CASFS_STRESS_WORKERS", "4"))
TIMEOUT = float(os.environ.get("CASFS_STRESS_TIMEOUT", "300"))  # s one operation may take
MOUNT_ARGS = shlex.split(os.environ.get("CASFS_STRESS_MOUNT_ARGS", ""))
# the mount's writeback timer (default 0.5 s) and the age at which it writes back an open
# file's buffers (default 5 s), shortened so that the engine's own writeback overlaps
# with writes to the files it writes back
WRITEBACK_INTERVAL_S = os.environ.get("CASFS_STRESS_WRITEBACK_INTERVAL_S", "0.1")
WRITEBACK_AGE_S = os.environ.get("CASFS_STRESS_WRITEBACK_AGE_S", "0.2")
CHECK_EVERY = 100                   # a worker compares its subtree every this many operations

NAMES = ["a", "b", "c", "d", "e"]
MAX_DEPTH = 2                       # directories nest at most this deep below a subtree
# relative and without "..": a symlink never leads out of its thread's subtree
SYMLINK_TARGETS = ["a", "b", "c/d", "a/b", "nowhere", "e" * 100]
XATTR_NAMES = ["user.a", "user.b", "user.stress." + "x" * 30]
MODES = [0o644, 0o600, 0o755, 0o700, 0o444, 0o000, 0o1777, 0o4755, 0o2750]
XATTR_CREATE = getattr(os, "XATTR_CREATE", 1)
XATTR_REPLACE = getattr(os, "XATTR_REPLACE", 2)

# shared files: whole aligned blocks stamped with (file, block, version)
BS = 4096                           # block size (one page: O_DIRECT alignment)
SHARED_FILES = 3
SHARED_BLOCKS = 3 * CS // BS        # blocks per shared file (3 chunks)
ENGINE_ONLY = 0                     # the shared file nobody fsyncs before the end


def seed_from_env() -> int:
    """``CASFS_STRESS_SEED`` if set, else a fresh random seed (printed by the test)."""
    s = os.environ.get("CASFS_STRESS_SEED")
    return int(s) if s else random.SystemRandom().randrange(1 << 32)


# -- the log of one thread ----------------------------------------------------------------

class StopRun(Exception):
    """Raised inside a thread when another thread has failed: stop quietly."""


@dataclass
class Log:
    """What one thread did: operations with their start times, and the current one."""

    name: str
    t0: float
    lines: list[str] = field(default_factory=list)
    current: str | None = None        # the operation in progress (None between operations)
    current_since: float = 0.0

    def begin(self, i: int, what: str) -> None:
        self.current, self.current_since = f"#{i} {what}", time.monotonic()

    def end(self, outcome: str) -> None:
        assert self.current is not None
        self.lines.append(f"{self.current_since - self.t0:9.3f} {self.name} {self.current} -> {outcome}")
        self.current = None

    def tail(self, n: int = 25) -> str:
        return "\n".join("  " + line for line in self.lines[-n:])


def clip(value: Any) -> str:
    """A short printable form of an operation's result."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) > 40:
            return f"<{len(value)} bytes {bytes(value[:16])!r}...>"
        return repr(bytes(value))
    if isinstance(value, tuple):
        return "(" + ", ".join(clip(v) for v in value) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(clip(v) for v in value) + "]"
    return repr(value)


def first_difference(a: bytes, b: bytes) -> str:
    """Where two byte strings first differ, with the chunk slot of that offset."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"model has {len(a)} bytes, casfs {len(b)}; first difference at {i} (slot {i // CS}+{i % CS}): "
            f"model {a[i:i + 12]!r} casfs {b[i:i + 12]!r}")


def describe_mismatch(ref: tuple[str, Any], cas: tuple[str, Any]) -> str:
    if ref[0] == cas[0] == "ok" and isinstance(ref[1], bytes) and isinstance(cas[1], bytes):
        return first_difference(ref[1], cas[1])
    return f"model -> {ref[0]} {clip(ref[1])}, casfs -> {cas[0]} {clip(cas[1])}"


class Mismatch(AssertionError):
    """The mount and the model disagreed about one operation."""


# -- data ---------------------------------------------------------------------------------

def palette(seed: int) -> list[bytes]:
    """Whole-chunk contents every thread draws from, so chunks dedup across threads."""
    rng = random.Random(f"palette-{seed}")
    return [rng.randbytes(CS), bytes([7]) * CS, (b"casfs" * CS)[:CS], rng.randbytes(64) * (CS // 64)]


def pattern(p: bytes, n: int) -> bytes:
    return (p * (n // len(p) + 1))[:n]


class Worker:
    """One thread's random operations on its subtree of the mount and on its model."""

    def __init__(self, k: int, seed: int, ref: Path, cas: Path, chunks: list[bytes],
                 stop: threading.Event, t0: float) -> None:
        self.k, self.seed = k, seed
        self.rng = random.Random(seed + k)
        self.roots = (ref, cas)
        self.chunks = chunks
        self.stop = stop
        self.log = Log(f"w{k}", t0)
        self.held: list[tuple[str, tuple[int, int]]] = []   # (path at open, (model fd, casfs fd))
        self.outcomes: dict[str, int] = {}

    # -- choosing paths and data (from the model tree, so a seed gives one sequence) ---
    def entries(self) -> list[tuple[str, int]]:
        """(relative path, S_IFMT) of everything in the model subtree."""
        return tree_entries(self.roots[0])

    def existing(self, prefer: int | None = stat.S_IFREG) -> str:
        """An existing path (usually of type ``prefer``); a missing name if the tree is empty."""
        ents = self.entries()
        if not ents:
            return self.rng.choice(NAMES)
        preferred = [p for p, k in ents if k == prefer]
        if preferred and self.rng.random() < 0.85:
            return self.rng.choice(preferred)
        return self.rng.choice(ents)[0]

    def any_path(self) -> str:
        """An existing path, or a (maybe new) name in an existing directory or symlink."""
        ents = self.entries()
        if ents and self.rng.random() < 0.3:
            return self.rng.choice(ents)[0]
        parents = [""] + [p for p, k in ents if k in (stat.S_IFDIR, stat.S_IFLNK) and p.count("/") < MAX_DEPTH]
        parent = self.rng.choice(parents)
        name = self.rng.choice(NAMES)
        return f"{parent}/{name}" if parent else name

    def offset(self) -> int:
        r = self.rng.random()
        if r < 0.25:
            return self.rng.randrange(0, 101)
        if r < 0.6:
            return max(0, self.rng.randrange(0, 7) * CS + self.rng.randrange(-3, 4))
        return self.rng.randrange(0, 6 * CS)

    def length(self) -> int:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.randrange(1, 65)
        if r < 0.55:
            return max(1, self.rng.randrange(1, 4) * CS + self.rng.randrange(-3, 4))
        return self.rng.randrange(1, 3 * CS + 1)

    def data(self, n: int) -> bytes:
        r = self.rng.random()
        if r < 0.15:
            return bytes(n)                                   # all zeros: holes in casfs
        if r < 0.45:
            return pattern(self.rng.choice([b"\x01", b"ab", b"xyz12", self.rng.randbytes(3)]), n)
        return self.rng.randbytes(n)

    # -- running one operation on both sides ------------------------------------------
    def both(self, i: int, what: str, fn: Callable[[Path, int], Any]) -> tuple[str, Any]:
        """``fn(root, side)`` on the model (side 0), then on the mount (side 1).

        Both must return the same value or raise OSError with the same errno; raises
        Mismatch otherwise. Returns ("ok", value) or ("error", errno name)."""
        if self.stop.is_set():
            raise StopRun()
        self.log.begin(i, what)
        results: list[tuple[str, Any]] = []
        for side, root in enumerate(self.roots):
            try:
                results.append(("ok", fn(root, side)))
            except OSError as e:
                results.append(("error", errname(e)))
        if results[0] != results[1]:
            self.log.end("MISMATCH " + describe_mismatch(results[0], results[1]))
            raise Mismatch(f"{what}: {describe_mismatch(results[0], results[1])}")
        kind, value = results[0]
        self.log.end(f"{kind} {clip(value)}")
        key = f"{what.split()[0]} {'ok' if kind == 'ok' else value}"
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        return results[0]

    def run(self) -> None:
        ops: list[tuple[int, Callable[[int], None]]] = [
            (14, self.op_write), (5, self.op_append), (6, self.op_truncate), (10, self.op_pread),
            (4, self.op_read_whole), (4, self.op_stat), (3, self.op_listdir), (7, self.op_rename),
            (5, self.op_unlink), (5, self.op_mkdir), (3, self.op_rmdir), (4, self.op_link),
            (3, self.op_symlink), (3, self.op_chmod), (3, self.op_utime), (3, self.op_setxattr),
            (3, self.op_getxattr), (1, self.op_removexattr), (4, self.op_fsync), (3, self.op_copy),
            (3, self.op_open_held), (6, self.op_held_io), (2, self.op_close_held), (1, self.op_stream),
            (2, self.op_mmap_write),
        ]
        weights = [w for w, _ in ops]
        try:
            for i in range(OPS):
                fn = self.rng.choices([f for _, f in ops], weights)[0]
                fn(i)
                if (i + 1) % CHECK_EVERY == 0:
                    self.check_tree(i)
        finally:
            for _, pair in self.held:
                for fd in pair:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self.held = []

    def check_tree(self, i: int) -> None:
        if self.stop.is_set():
            raise StopRun()
        self.log.begin(i, "compare the whole subtree with the model")
        try:
            compare_trees(*self.roots, context=f" (w{self.k} after op #{i}, other threads running)")
        except AssertionError as e:
            self.log.end("MISMATCH")
            raise Mismatch(str(e)) from None
        self.log.end("same")

    # -- the operations ----------------------------------------------------------------
    def op_write(self, i: int) -> None:
        path = self.any_path() if self.rng.random() < 0.4 else self.existing()
        if self.rng.random() < 0.2:      # a whole chunk from the shared palette, slot aligned
            off, payload = self.rng.randrange(0, 5) * CS, self.rng.choice(self.chunks)
        else:
            off, payload = self.offset(), self.data(self.length())
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if self.rng.random() < 0.15 else 0)
        mode = self.rng.choice([0o644, 0o600, 0o755])

        def op(root: Path, side: int) -> int:
            fd = os.open(root / path, flags, mode)
            try:
                return os.pwrite(fd, payload, off)
            finally:
                os.close(fd)
        self.both(i, f"pwrite {path} at {off} {len(payload)} bytes {payload[:6]!r} "
                     f"{'O_TRUNC' if flags & os.O_TRUNC else ''}", op)

    def op_append(self, i: int) -> None:
        path = self.existing()
        payload = self.data(self.length())

        def op(root: Path, side: int) -> tuple[int, int]:
            fd = os.open(root / path, os.O_WRONLY | os.O_APPEND)
            try:
                return os.write(fd, payload), os.fstat(fd).st_size
            finally:
                os.close(fd)
        self.both(i, f"append {path} {len(payload)} bytes {payload[:6]!r}", op)

    def op_truncate(self, i: int) -> None:
        path = self.existing()
        size = self.offset()
        self.both(i, f"truncate {path} {size}", lambda root, side: os.truncate(root / path, size))

    def op_pread(self, i: int) -> None:
        path = self.existing()
        off, n = self.offset(), self.length()
        # O_DIRECT (straight from the daemon) for regular files only: open(2) of a
        # directory with O_DIRECT fails with EINVAL on FUSE
        direct = self.rng.random() < 0.3 and (self.roots[0] / path).is_file()

        def op(root: Path, side: int) -> bytes:
            if direct and side == 1:
                return read_direct(root / path, off + n)[off:off + n]
            fd = os.open(root / path, os.O_RDONLY)
            try:
                return os.pread(fd, n, off)
            finally:
                os.close(fd)
        self.both(i, f"pread {path} {n} at {off}{' O_DIRECT' if direct else ''}", op)

    def op_read_whole(self, i: int) -> None:
        path = self.existing()

        def op(root: Path, side: int) -> bytes:
            with open(root / path, "rb", buffering=0) as f:
                return f.read()
        self.both(i, f"read {path}", op)

    def op_stat(self, i: int) -> None:
        path = self.existing(prefer=None)

        def op(root: Path, side: int) -> tuple[Any, ...]:
            s = os.lstat(root / path)
            kind = stat.S_IFMT(s.st_mode)
            size = None if kind == stat.S_IFDIR else s.st_size     # directory sizes differ by design
            target = os.readlink(root / path) if kind == stat.S_IFLNK else None
            return kind, oct(stat.S_IMODE(s.st_mode)), s.st_nlink, size, target
        self.both(i, f"lstat {path}", op)

    def op_listdir(self, i: int) -> None:
        ents = self.entries()
        dirs = [""] + [p for p, k in ents if k == stat.S_IFDIR]
        path = self.rng.choice(dirs)
        self.both(i, f"listdir {path or '.'}", lambda root, side: sorted(os.listdir(root / path)))

    def op_rename(self, i: int) -> None:
        src = self.existing(prefer=self.rng.choice([stat.S_IFREG, stat.S_IFDIR, None]))
        dst = self.any_path()
        how = self.rng.choices(["rename", "NOREPLACE", "EXCHANGE"], [6, 1, 1])[0]

        def op(root: Path, side: int) -> None:
            if how == "rename":
                os.rename(root / src, root / dst)
            else:
                renameat2(root / src, root / dst, RENAME_NOREPLACE if how == "NOREPLACE" else RENAME_EXCHANGE)
        self.both(i, f"rename {src} -> {dst}{'' if how == 'rename' else ' ' + how}", op)

    def op_stream(self, i: int) -> None:
        """Write 1 MiB sequentially in 128 KiB writes through one handle (a writer that
        keeps going while earlier slots are written back), then read it back."""
        path, start = self.any_path(), self.rng.choice([0, CS, 100])
        payload = self.rng.randbytes(16 * CS)

        def op(root: Path, side: int) -> bytes:
            fd = os.open(root / path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                for k in range(0, len(payload), 2 * CS):
                    os.pwrite(fd, payload[k:k + 2 * CS], start + k)
                return os.pread(fd, len(payload), start)
            finally:
                os.close(fd)
        self.both(i, f"stream {path} 1 MiB from {start}", op)

    def op_mmap_write(self, i: int) -> None:
        """Store through a shared writable mapping (FUSE writepage from the kernel's
        writeback), msync, unmap."""
        path, off, payload = self.existing(), self.offset(), self.data(self.length())

        def op(root: Path, side: int) -> int:
            return mmap_store(root / path, off, payload)
        self.both(i, f"mmap-write {path} at {off} up to {len(payload)} bytes {payload[:6]!r}", op)

    def op_unlink(self, i: int) -> None:
        path = self.existing(prefer=self.rng.choice([stat.S_IFREG, stat.S_IFLNK]))
        self.both(i, f"unlink {path}", lambda root, side: os.unlink(root / path))

    def op_mkdir(self, i: int) -> None:
        path = self.any_path()
        mode = self.rng.choice([0o755, 0o700, 0o777, 0o1777])
        self.both(i, f"mkdir {path} {mode:o}", lambda root, side: os.mkdir(root / path, mode))

    def op_rmdir(self, i: int) -> None:
        path = self.existing(prefer=stat.S_IFDIR)
        self.both(i, f"rmdir {path}", lambda root, side: os.rmdir(root / path))

    def op_link(self, i: int) -> None:
        src, dst = self.existing(), self.any_path()
        self.both(i, f"link {src} -> {dst}",
                  lambda root, side: os.link(root / src, root / dst, follow_symlinks=False))

    def op_symlink(self, i: int) -> None:
        path, target = self.any_path(), self.rng.choice(SYMLINK_TARGETS)
        self.both(i, f"symlink {path} -> {target}", lambda root, side: os.symlink(target, root / path))

    def op_chmod(self, i: int) -> None:
        path, mode = self.existing(prefer=None), self.rng.choice(MODES)

        def op(root: Path, side: int) -> str:
            os.chmod(root / path, mode)
            return oct(stat.S_IMODE(os.stat(root / path).st_mode))
        self.both(i, f"chmod {path} {mode:o}", op)

    def op_utime(self, i: int) -> None:
        path = self.existing(prefer=None)
        times = (self.rng.randrange(1 << 33) * 10**9 + self.rng.randrange(10**9),
                 self.rng.randrange(1 << 33) * 10**9 + self.rng.randrange(10**9))

        def op(root: Path, side: int) -> tuple[int, int]:
            os.utime(root / path, ns=times)
            s = os.stat(root / path)
            return s.st_atime_ns, s.st_mtime_ns
        self.both(i, f"utime {path} ns={times}", op)

    def op_setxattr(self, i: int) -> None:
        path, name = self.existing(), self.rng.choice(XATTR_NAMES)
        value = self.rng.choice([b"", self.rng.randbytes(self.rng.randrange(1, 40)),
                                 pattern(b"v" + self.rng.randbytes(1), self.rng.randrange(1, 600))])
        flags = self.rng.choice([0, XATTR_CREATE, XATTR_REPLACE])
        self.both(i, f"setxattr {path} {name}={value[:8]!r}({len(value)}) flags {flags}",
                  lambda root, side: os.setxattr(root / path, name, value, flags, follow_symlinks=False))

    def op_getxattr(self, i: int) -> None:
        path, name = self.existing(), self.rng.choice(XATTR_NAMES)

        def op(root: Path, side: int) -> tuple[list[str], bytes | str]:
            names = sorted(os.listxattr(root / path, follow_symlinks=False))
            try:
                value: bytes | str = os.getxattr(root / path, name, follow_symlinks=False)
            except OSError as e:
                value = errname(e)
            return names, value
        self.both(i, f"getxattr {path} {name}", op)

    def op_removexattr(self, i: int) -> None:
        path, name = self.existing(), self.rng.choice(XATTR_NAMES)
        self.both(i, f"removexattr {path} {name}",
                  lambda root, side: os.removexattr(root / path, name, follow_symlinks=False))

    def op_fsync(self, i: int) -> None:
        """fsync a file (then read it back with O_DIRECT: what the daemon holds) or a directory."""
        if self.rng.random() < 0.2:
            ents = self.entries()
            path = self.rng.choice([""] + [p for p, k in ents if k == stat.S_IFDIR])

            def opdir(root: Path, side: int) -> None:
                fd = os.open(root / path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self.both(i, f"fsync directory {path or '.'}", opdir)
            return
        path = self.existing()

        def op(root: Path, side: int) -> bytes:
            fd = os.open(root / path, os.O_RDONLY)
            try:
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if side == 1 and stat.S_ISREG(st.st_mode):
                size = st.st_size
                return read_direct(root / path, size)
            with open(root / path, "rb") as f:
                return f.read()
        self.both(i, f"fsync {path}, then read it (casfs: O_DIRECT)", op)

    def op_copy(self, i: int) -> None:
        """Copy a file of the subtree with sendfile(2): the copy's chunks dedup."""
        src, dst = self.existing(), self.any_path()

        def op(root: Path, side: int) -> int:
            fin = os.open(root / src, os.O_RDONLY)
            try:
                fout = os.open(root / dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    total = 0
                    while (n := os.sendfile(fout, fin, total, 1 << 20)) > 0:
                        total += n
                    return total
                finally:
                    os.close(fout)
            finally:
                os.close(fin)
        self.both(i, f"copy {src} -> {dst}", op)

    def op_open_held(self, i: int) -> None:
        if len(self.held) >= 2:
            return self.op_held_io(i)
        create = self.rng.random() < 0.3
        path = self.any_path() if create else self.existing()
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fds: list[int] = []

        def op(root: Path, side: int) -> None:
            fds.append(os.open(root / path, flags, 0o644))
        try:
            self.both(i, f"open {path} O_RDWR{'|O_CREAT' if create else ''} (held)", op)
        finally:
            if len(fds) == 2:
                self.held.append((path, (fds[0], fds[1])))
            else:
                for fd in fds:
                    os.close(fd)

    def op_held_io(self, i: int) -> None:
        if not self.held:
            return self.op_open_held(i)
        path, pair = self.rng.choice(self.held)
        r = self.rng.random()
        if r < 0.5:
            off, payload = self.offset(), self.data(self.length())
            self.both(i, f"pwrite held fd of {path} at {off} {len(payload)} bytes {payload[:6]!r}",
                      lambda root, side: os.pwrite(pair[side], payload, off))
        elif r < 0.75:
            off, n = self.offset(), self.length()
            self.both(i, f"pread held fd of {path} {n} at {off}",
                      lambda root, side: os.pread(pair[side], n, off))
        elif r < 0.9:
            size = self.offset()
            self.both(i, f"ftruncate held fd of {path} {size}",
                      lambda root, side: os.ftruncate(pair[side], size))
        else:
            def op(root: Path, side: int) -> tuple[int, int, bytes]:
                os.fsync(pair[side])
                s = os.fstat(pair[side])
                return s.st_nlink, s.st_size, os.pread(pair[side], s.st_size + 1, 0)
            self.both(i, f"fsync+fstat+read held fd of {path}", op)

    def op_close_held(self, i: int) -> None:
        if not self.held:
            return self.op_open_held(i)
        path, pair = self.held.pop(self.rng.randrange(len(self.held)))
        self.both(i, f"close held fd of {path}", lambda root, side: os.close(pair[side]))


# -- the shared files ---------------------------------------------------------------------

STAMP = re.compile(rb"f(\d+) b(\d+) v(\d+)\.*\n")


def block(f: int, b: int, v: int) -> bytes:
    """Block ``b`` of shared file ``f`` at version ``v``: a 32-byte stamp, repeated."""
    stamp = f"f{f} b{b:04d} v{v:08d}".ljust(31, ".").encode() + b"\n"
    return stamp * (BS // len(stamp))


def parse_block(data: bytes) -> tuple[int, int, int] | None:
    """(file, block, version) of a well-formed block, or None (torn or garbage)."""
    m = STAMP.fullmatch(data[:32])
    if m is None:
        return None
    f, b, v = (int(x) for x in m.groups())
    return (f, b, v) if data == block(f, b, v) else None


def aligned(n: int) -> mmap.mmap:
    """A page-aligned buffer of ``n`` bytes (O_DIRECT needs aligned buffers)."""
    return mmap.mmap(-1, n)


@dataclass
class Shared:
    """The versions of the shared blocks the writer has started, written and fsynced."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    started: dict[tuple[int, int], int] = field(default_factory=dict)
    written: dict[tuple[int, int], int] = field(default_factory=dict)
    fsynced: dict[tuple[int, int], int] = field(default_factory=dict)


def shared_path(mp: Path, f: int) -> Path:
    return mp / "shared" / f"s{f}"


def setup_shared(mp: Path, sh: Shared) -> None:
    (mp / "shared").mkdir()
    for f in range(SHARED_FILES):
        with open(shared_path(mp, f), "wb") as fh:
            fh.write(b"".join(block(f, b, 0) for b in range(SHARED_BLOCKS)))
            fh.flush()
            os.fsync(fh.fileno())
        for b in range(SHARED_BLOCKS):
            sh.started[(f, b)] = sh.written[(f, b)] = sh.fsynced[(f, b)] = 0


def fsync_and_record(fd: int, f: int, sh: Shared, log: Log, i: int) -> None:
    """fsync(2) shared file ``f`` through ``fd``; then every block's version written
    before the fsync began counts as fsynced (POSIX: fsync makes durable the data
    written before it, not the writes that race with it)."""
    with sh.lock:
        before = {b: sh.written[(f, b)] for b in range(SHARED_BLOCKS)}
    log.begin(i, f"fsync s{f}")
    os.fsync(fd)
    log.end("ok")
    with sh.lock:
        for b, v in before.items():
            sh.fsynced[(f, b)] = max(sh.fsynced[(f, b)], v)


def writer(mp: Path, seed: int, sh: Shared, log: Log, stop: threading.Event) -> None:
    """OPS writes of 1-4 whole blocks (O_DIRECT) at random aligned places; fsyncs a
    fifth of them itself (the syncer fsyncs too, while this thread keeps writing)."""
    rng = random.Random(seed + 1000)
    fds = [os.open(shared_path(mp, f), os.O_RDWR | os.O_DIRECT) for f in range(SHARED_FILES)]
    buf = aligned(4 * BS)
    try:
        for i in range(OPS):
            if stop.is_set():
                raise StopRun()
            f = rng.randrange(SHARED_FILES)
            n = rng.randint(1, 4)
            b0 = rng.randrange(SHARED_BLOCKS - n + 1)
            with sh.lock:
                versions = [sh.started[(f, b)] + 1 for b in range(b0, b0 + n)]
                for b, v in zip(range(b0, b0 + n), versions):
                    sh.started[(f, b)] = v
            data = b"".join(block(f, b, v) for b, v in zip(range(b0, b0 + n), versions))
            buf[:len(data)] = data
            log.begin(i, f"pwrite O_DIRECT s{f} blocks {b0}..{b0 + n - 1} versions {versions}")
            got = os.pwritev(fds[f], [memoryview(buf)[:len(data)]], b0 * BS)
            log.end(str(got))
            if got != len(data):
                raise AssertionError(f"short O_DIRECT write to s{f}: {got} of {len(data)} bytes")
            with sh.lock:
                for b, v in zip(range(b0, b0 + n), versions):
                    sh.written[(f, b)] = v
            if f == ENGINE_ONLY:
                # no fsync; closing the only handle releases the file, which the engine
                # then writes back on its own timer while this thread writes on
                if rng.random() < 0.3:
                    log.begin(i, f"close and reopen s{f}")
                    os.close(fds[f])
                    fds[f] = os.open(shared_path(mp, f), os.O_RDWR | os.O_DIRECT)
                    log.end("ok")
            elif rng.random() < 0.2:
                fsync_and_record(fds[f], f, sh, log, i)
        for f in range(SHARED_FILES):     # everything written is fsynced at the end
            fsync_and_record(fds[f], f, sh, log, OPS)
    finally:
        for fd in fds:
            os.close(fd)
        buf.close()


def syncer(mp: Path, seed: int, sh: Shared, log: Log, stop: threading.Event,
           writing: Callable[[], bool]) -> None:
    """fsync the shared files through handles of its own while the writer writes to
    them, so that a file's writeback overlaps with writes to that same file."""
    rng = random.Random(seed + 3000)
    fds = {f: os.open(shared_path(mp, f), os.O_RDONLY) for f in range(SHARED_FILES) if f != ENGINE_ONLY}
    try:
        i = 0
        while writing():
            if stop.is_set():
                raise StopRun()
            f = rng.choice(sorted(fds))
            fsync_and_record(fds[f], f, sh, log, i)
            i += 1
    finally:
        for fd in fds.values():
            os.close(fd)


def reader(mp: Path, seed: int, sh: Shared, log: Log, stop: threading.Event) -> None:
    """2*OPS reads of 1-16 blocks; each block must be well formed, and its version at
    least the one fsynced and the one whose write returned before the read began (the
    writer writes with O_DIRECT, which drops the written range from the page cache, so
    buffered reads must see it too), and at most the last one the writer started."""
    rng = random.Random(seed + 2000)
    buf = aligned(16 * BS)
    try:
        for i in range(2 * OPS):
            if stop.is_set():
                raise StopRun()
            f = rng.randrange(SHARED_FILES)
            n = rng.randint(1, 16)
            b0 = rng.randrange(SHARED_BLOCKS - n + 1)
            direct = rng.random() < 0.5
            with sh.lock:
                floor = [sh.fsynced[(f, b)] for b in range(b0, b0 + n)]
                done = [sh.written[(f, b)] for b in range(b0, b0 + n)]
            log.begin(i, f"pread{' O_DIRECT' if direct else ''} s{f} blocks {b0}..{b0 + n - 1} "
                         f"(fsynced versions {floor}, written {done})")
            fd = os.open(shared_path(mp, f), os.O_RDONLY | (os.O_DIRECT if direct else 0))
            try:
                got = os.preadv(fd, [memoryview(buf)[:n * BS]], b0 * BS)
            finally:
                os.close(fd)
            data = bytes(buf[:got])
            with sh.lock:
                ceiling = [sh.started[(f, b)] for b in range(b0, b0 + n)]
            problems = []
            if got != n * BS:
                problems.append(f"short read: {got} of {n * BS} bytes")
            seen = []
            for j in range(got // BS):
                b = b0 + j
                piece = data[j * BS:(j + 1) * BS]
                stamp = parse_block(piece)
                if stamp is None:
                    problems.append(f"block {b} is torn or garbage: starts {piece[:40]!r}, "
                                    f"stamps inside: {sorted(set(piece[k:k + 32] for k in range(0, BS, 32)))[:4]}")
                elif stamp[:2] != (f, b):
                    problems.append(f"block {b} holds the stamp of file s{stamp[0]} block {stamp[1]}")
                elif stamp[2] < floor[j]:
                    problems.append(f"block {b} has version {stamp[2]}, older than version {floor[j]} "
                                    f"fsynced before the read began")
                elif stamp[2] < done[j]:
                    problems.append(f"block {b} has version {stamp[2]}, older than version {done[j]} whose "
                                    f"write had returned before the read began (POSIX read-after-write)")
                elif stamp[2] > ceiling[j]:
                    problems.append(f"block {b} has version {stamp[2]}, newer than any write started "
                                    f"({ceiling[j]})")
                seen.append(stamp[2] if stamp else None)
            log.end(f"versions {seen}" + (" PROBLEM" if problems else ""))
            if problems:
                raise Mismatch(f"reader: pread{' O_DIRECT' if direct else ''} of s{f} blocks "
                               f"{b0}..{b0 + n - 1}:\n  " + "\n  ".join(problems))
    finally:
        buf.close()


def check_shared(mp: Path, sh: Shared, context: str) -> None:
    """Every shared block holds its last written (and fsynced) version, both read ways."""
    assert sh.fsynced == sh.written, "the writer fsyncs everything it wrote before it ends"
    for f in range(SHARED_FILES):
        want = b"".join(block(f, b, sh.written[(f, b)]) for b in range(SHARED_BLOCKS))
        for how, got in (("cached", shared_path(mp, f).read_bytes()),
                         ("O_DIRECT", read_direct(shared_path(mp, f), len(want)))):
            if got != want:
                bad = [b for b in range(SHARED_BLOCKS) if got[b * BS:(b + 1) * BS] != want[b * BS:(b + 1) * BS]]
                raise AssertionError(f"shared file s{f} ({how} read{context}): blocks {bad[:10]} differ; "
                                     f"first: {first_difference(want, got)}")


def write_expected_shared(dest: Path, sh: Shared) -> None:
    """The shared files as they must be, on the local disk (for the stats cross-check)."""
    dest.mkdir()
    for f in range(SHARED_FILES):
        (dest / f"s{f}").write_bytes(b"".join(block(f, b, sh.written[(f, b)]) for b in range(SHARED_BLOCKS)))


# -- running the threads ------------------------------------------------------------------

@dataclass
class Run:
    seed: int
    logs: list[Log]
    failures: list[tuple[str, str]] = field(default_factory=list)   # (thread, message)
    hung: list[str] = field(default_factory=list)


def run_threads(targets: list[tuple[Log, Callable[[], None]]], stop: threading.Event, seed: int) -> Run:
    """Start every target at once; the first failure stops the others; a thread that stays
    in one operation longer than TIMEOUT seconds is reported as hung."""
    run = Run(seed, [log for log, _ in targets])
    lock = threading.Lock()

    def wrap(log: Log, fn: Callable[[], None]) -> None:
        try:
            fn()
        except StopRun:
            pass
        except BaseException as e:   # a mismatch, or an unexpected error in the thread
            msg = str(e) if isinstance(e, Mismatch) else "".join(traceback.format_exception(e))
            with lock:
                where = log.current or (log.lines[-1] if log.lines else "(before the first operation)")
                run.failures.append((log.name, f"{where}\n{msg}"))
            stop.set()

    threads = [threading.Thread(target=wrap, args=(log, fn), name=f"stress-{log.name}", daemon=True)
               for log, fn in targets]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=1.0)
        now = time.monotonic()
        stuck = [f"{log.name}: {log.current} (running for {now - log.current_since:.0f} s)"
                 for (log, _), t in zip(targets, threads)
                 if t.is_alive() and log.current is not None and now - log.current_since > TIMEOUT]
        if stuck:
            run.hung = stuck
            stop.set()
            break
    return run


def write_logs(run: Run, dest: Path) -> list[Path]:
    paths = []
    for log in run.logs:
        p = dest / f"ops-{log.name}.log"
        p.write_text("\n".join(log.lines) + "\n")
        paths.append(p)
    merged = sorted((line for log in run.logs for line in log.lines), key=lambda s: float(s.split()[0]))
    p = dest / "ops-all.log"
    p.write_text("\n".join(merged) + "\n")
    return paths + [p]


def daemon_threads(pid: int) -> str:
    """The kernel wait channel of each thread of process ``pid`` (where a hang sits)."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            lines.append(f"  {(task / 'comm').read_text().strip()}: {(task / 'wchan').read_text().strip() or '-'}")
        except OSError:
            pass
    return "\n".join(lines)


def abort_hung_mount(casenv: CasEnv, mp: Path) -> str:
    """SIGKILL the daemon of a hung mount, by its pid: the requests it left unanswered
    fail (ECONNABORTED), so the stuck threads return and the fixtures can unmount (a
    process that closes a file of a hung FUSE mount, e.g. a child forked to run
    `casfs umount`, waits forever). Returns what it did, for the failure message."""
    try:
        pid = casenv.daemon_pid(mp)
    except (OSError, ValueError, KeyError) as e:
        return f"could not find the daemon's pid ({e}): the mount stays hung"
    threads = daemon_threads(pid)
    os.kill(pid, signal.SIGKILL)
    return f"the daemon's threads (kernel wait channels):\n{threads}\nkilled the hung daemon (pid {pid})"


def report(run: Run, casenv: CasEnv, volume: str, logs: list[Path], mp: Path) -> str:
    out = [f"stress run with seed {run.seed} failed (replay: CASFS_STRESS_SEED={run.seed} "
           f"CASFS_STRESS_OPS={OPS} CASFS_STRESS_WORKERS={WORKERS} pytest tests/test_stress.py)"]
    if run.hung:
        out.append(f"threads stuck in one operation for more than {TIMEOUT:.0f} s (a hang in the mount?):")
        out += ["  " + h for h in run.hung]
    for name, msg in run.failures:
        out.append(f"--- {name} failed at {msg}")
        log = next(lg for lg in run.logs if lg.name == name)
        out.append(f"last operations of {name} (start time in s, thread, op number, operation -> outcome):")
        out.append(log.tail())
    if logs:
        out.append("operation logs: " + " ".join(str(p) for p in logs))
    out.append("--- mount log tail ---\n" + mount_log(casenv, volume))
    if run.hung:
        out.append(abort_hung_mount(casenv, mp))
    return "\n".join(out)


def model_figures(roots: list[Path]) -> tuple[int, int]:
    """(regular files, the sum of their sizes), a hard-linked file counted once."""
    seen: set[tuple[int, int]] = set()
    files = size = 0
    for root in roots:
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                s = os.lstat(Path(dirpath) / name)
                if stat.S_ISREG(s.st_mode) and (s.st_dev, s.st_ino) not in seen:
                    seen.add((s.st_dev, s.st_ino))
                    files += 1
                    size += s.st_size
    return files, size


def guarded(what: str, fn: Callable[[], None], seed: int, casenv: CasEnv, mp: Path) -> None:
    """``fn()`` in a thread of its own, so that a mount that hangs is reported (after
    TIMEOUT seconds) instead of hanging the test; fails the test if ``fn`` fails."""
    log = Log(what.split()[0], time.monotonic())

    def body() -> None:
        log.begin(0, what)
        fn()
        log.end("done")
    run = run_threads([(log, body)], threading.Event(), seed)
    if run.failures or run.hung:
        pytest.fail(report(run, casenv, "stress", [], mp), pytrace=False)


# -- the test -------------------------------------------------------------------------------

def test_concurrent_random_operations_on_one_mount(casenv: CasEnv, tmp_path: Path) -> None:
    seed = seed_from_env()
    print(f"stress seed {seed} (replay with CASFS_STRESS_SEED={seed}); {WORKERS} workers, {OPS} ops each")
    casenv.init("stress", chunk_size="64KiB")
    # the engine's own writeback runs often, so that it overlaps with the threads' writes
    # to the very files it writes back (open files included)
    casenv.env.setdefault("CASFS_WRITEBACK_INTERVAL_S", WRITEBACK_INTERVAL_S)
    casenv.env.setdefault("CASFS_WRITEBACK_AGE_S", WRITEBACK_AGE_S)
    mp = casenv.mount("stress", None, *MOUNT_ARGS)
    model = tmp_path / "model"
    model.mkdir()
    stop = threading.Event()
    t0 = time.monotonic()
    chunks = palette(seed)
    workers = [Worker(k, seed, model / f"w{k}", mp / f"w{k}", chunks, stop, t0) for k in range(WORKERS)]
    sh = Shared()

    def setup() -> None:
        for w in workers:
            for root in w.roots:
                root.mkdir()
        setup_shared(mp, sh)
    guarded("make the subtrees and the shared files", setup, seed, casenv, mp)
    wlog, rlog, slog = Log("writer", t0), Log("reader", t0), Log("syncer", t0)
    writer_done = threading.Event()

    def write_shared() -> None:
        try:
            writer(mp, seed, sh, wlog, stop)
        finally:
            writer_done.set()
    targets: list[tuple[Log, Callable[[], None]]] = [(w.log, w.run) for w in workers]
    targets += [(wlog, write_shared), (rlog, lambda: reader(mp, seed, sh, rlog, stop)),
                (slog, lambda: syncer(mp, seed, sh, slog, stop, lambda: not writer_done.is_set()))]

    run = run_threads(targets, stop, seed)
    elapsed = time.monotonic() - t0
    logs = write_logs(run, tmp_path)
    if run.failures or run.hung:
        pytest.fail(report(run, casenv, "stress", logs, mp), pytrace=False)
    outcomes: dict[str, int] = {}
    for w in workers:
        for key, n in w.outcomes.items():
            outcomes[key] = outcomes.get(key, 0) + n
    print(f"threads done in {elapsed:.1f} s; operations (outcome): {dict(sorted(outcomes.items()))}")

    def check_all(context: str) -> None:
        def check() -> None:
            try:
                for k in range(WORKERS):
                    compare_trees(model / f"w{k}", mp / f"w{k}", context=f" (w{k}{context})")
                check_shared(mp, sh, context)
            except AssertionError as e:
                raise Mismatch(f"{e}\noperation logs: {' '.join(map(str, logs))}") from None
        guarded(f"compare everything{context}", check, seed, casenv, mp)

    check_all(", all threads done")
    casenv.umount(mp)
    fsck = casenv.run("fsck", "--json", "stress", check=False)
    assert fsck.returncode == 0, f"seed {seed}: fsck after the run:\n{fsck.stdout}\n{fsck.stderr}"
    assert data_bytes_mismatches("stress", CS) == [], f"seed {seed}: data_bytes disagree with the manifests"
    casenv.run("gc", "--grace", "0", "stress")
    # after gc, stats counts exactly what the model holds: every chunk still stored is
    # referenced, and every referenced chunk is there (refcounts neither leaked nor lost)
    expected_shared = tmp_path / "shared-expected"
    write_expected_shared(expected_shared, sh)
    roots = [model / f"w{k}" for k in range(WORKERS)] + [expected_shared]
    files, logical = model_figures(roots)
    _, unique = unique_chunk_bytes(roots, CS)
    s = json.loads(casenv.run("stats", "--json", "stress").stdout)
    got = {k: s[k] for k in ("files", "logical_bytes", "unique_bytes", "garbage_chunks")}
    want = {"files": files, "logical_bytes": logical, "unique_bytes": unique, "garbage_chunks": 0}
    assert got == want, f"seed {seed}: casfs stats after gc {got}, the model says {want}"
    mp = casenv.mount("stress", mp, *MOUNT_ARGS)
    check_all(", after unmount, fsck, gc and remount")
    print(f"whole test {time.monotonic() - t0:.1f} s after the threads started")
