"""Side-by-side benchmark: a native directory, the null pyfuse3 filesystem, casfs.

Usage::

    python -m tools.bench [--size-mib 1024] [--files 10000] [--out FILE]
                          [--only native,null,casfs] [--chunk-size N] [--extra] [--encrypt]
                          [--latency-samples N] [--small-files [--tree DIR]]
                          [--profile [--profile-rate HZ] [--profile-dir DIR]]

One run measures three targets with the same workloads and the same data:

``native``
    a plain directory on the same disk as the benchmark's scratch directory;
``null``
    ``tools/bench/nullfs.py`` -- a pyfuse3 filesystem that stores nothing, i.e. the
    ceiling of any pyfuse3 filesystem on this machine -- started as a
    subprocess and unmounted with ``fusermount3 -u``;
``casfs``
    driven only through its CLI (``python -m tools.cli``) with ``XDG_DATA_HOME``
    pointing into the scratch directory: ``casfs init bench``, ``casfs mount MP
    bench``, ``casfs umount MP``.  If ``casfs init`` fails the column is skipped
    with a "casfs: not available: <error>" line.

Workloads (all "higher is better"):

* sequential write of SIZE MiB of new incompressible data (1 MiB ``write()``
  calls, ending with ``fsync``), MiB/s;
* the same data written again to a second file (all duplicates for casfs);
* sequential read, cold (native: ``posix_fadvise(DONTNEED)`` after ``fsync``;
  null: remount; casfs: unmount + remount, and its data directory's files are
  evicted from the page cache the same way as the native file), 1 MiB reads;
* sequential read, warm (the file is re-opened and read again right away);
* creation of N 4 KiB files in one directory followed by ``fsync`` of the
  directory, files/s;
* ``lstat`` of every entry of that directory (``os.scandir`` +
  ``entry.stat(follow_symlinks=False)``, after one untimed warm-up pass),
  entries/s, and ``ls -l`` of it (subprocess), entries/s;
* rename of each of those files within the directory, then ``fsync`` of the
  directory, files/s; then unlink of each, then ``fsync`` of the directory, files/s.

casfs then remounts with ``--durability immediate`` (each namespace operation
committed before it returns; docs/durability.md) and runs the create, rename and
unlink rows again in a new directory; a line under the table gives each as a ratio
of the same row on the default mount (group durability) of the same run. Last,
casfs creates N files with the audit log off and on (level changes, the default),
each on a fresh mount, and the ratio of the two is printed (:func:`audit_rows`).

With ``--extra``, two more:

* re-read of an unchanged file: a file of min(SIZE, 256) MiB is written, closed
  and read once (untimed), then re-opened and read three times; the median,
  MiB/s. The null filesystem is remounted without ``keep_cache`` for this row, so
  every read reaches its process: the ceiling of reads served by any pyfuse3
  filesystem, which casfs beats only from the kernel page cache;
* ``cp -a`` of the interpreter's standard library (site-packages excluded, a
  snapshot in the scratch directory, read once beforehand) into the target
  twice, files/s; the seconds are printed under the table.

With ``--encrypt``: new write, cold read and small-file creation on fresh unencrypted
and encrypted (``casfs init --encrypt``) casfs volumes, two of each in ABBA order, the
best of each kind and the ratio encrypted / plain (docs/encryption.md).

Latency rows (``--latency-samples N``, default 2,000; 0 leaves them out): p50 and p99
(nearest rank, ``time.perf_counter_ns``, in ms) of ``stat`` of a cached file, ``open`` +
``read`` of 4 KiB + ``close`` of it, and ``create`` + ``close`` of a new file, interleaved,
N samples each: idle, then while another process rewrites a SIZE MiB file with 1 MiB
writes of new random data and ``fsync`` over and over. Lower is better; casfs/null
above 1 is slower than null.

With ``--small-files`` (``--tree DIR`` for another tree than the standard library):
``ls -lR`` of the tree after a remount (entries/s), reading every file of it after a
remount (files/s), ``tar -xf`` of a tarball of it (files/s), and ``git clone`` via
``file://`` of a bare clone of this repository (files checked out/s; not on the null fs,
whose files read back as zeros). The null fs is restarted with ``--populate`` for the cold
rows (it forgets everything at unmount); native drops file pages only.

With ``--profile``: after the table, the goal rows (new and duplicate write, cold read,
create, ``cp -a`` of the tree, cold ``ls -lR`` and cold read of every file of it) run again
on a fresh casfs volume with py-spy attached to the mount daemon, and for each row the
share of the trio loop thread's time in MySQL, hashing, compression, chunk file I/O,
syncfs, FUSE, lock waits ..., the other threads' busy time and the top functions are
printed (tools/bench/profiling.py, docs/performance.md). Needs py-spy.

The benchmark only measures and prints; it asserts nothing about speed.  Every
mount is unmounted and every subprocess ended in ``finally`` blocks, also on
errors, Ctrl-C and SIGTERM.  Processes are only ever signalled by the PID this
script started them with.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from cas.chunk.store import fsync_dir

MiB = 1 << 20
SMALL_FILE_SIZE = 4096
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
TARGETS = ("native", "null", "casfs")
TARGET_LABELS = {"native": "native", "null": "null pyfuse3", "casfs": "casfs"}

MOUNT_TIMEOUT = 30.0        # seconds to wait for a mount to appear
PROC_EXIT_TIMEOUT = 30.0    # seconds to wait for a FUSE daemon to exit after unmount


class NotAvailable(Exception):
    """The target cannot be benchmarked at all (e.g. ``casfs init`` failed)."""


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    key: str
    label: str


REREAD_MAX_MIB = 256       # size cap of the re-read row's file
REREAD_ROUNDS = 3
TREE_IGNORED = shutil.ignore_patterns("site-packages", "dist-packages")
IMMEDIATE_ROWS = ("create", "rename", "unlink")   # run again by casfs with --durability immediate
IMMEDIATE_SUFFIX = "_imm"


def workloads(size_mib: int, files: int, tree_files: int | None = None) -> list[Workload]:
    """The rows of the report; the two extra ones when ``tree_files`` is given."""
    rows = [
        Workload("write_new", f"seq write {size_mib} MiB, new data (MiB/s)"),
        Workload("write_dup", f"seq write {size_mib} MiB, same data again (MiB/s)"),
        Workload("read_cold", f"seq read {size_mib} MiB, cold (MiB/s)"),
        Workload("read_warm", f"seq read {size_mib} MiB, warm (MiB/s)"),
    ]
    if tree_files is not None:
        rows.append(Workload("reread", f"re-read unchanged {min(size_mib, REREAD_MAX_MIB)} MiB file (MiB/s)"))
    rows += [
        Workload("create", f"create {files} x 4 KiB files + fsync dir (files/s)"),
        Workload("stat", f"scandir + lstat {files} entries, warm (entries/s)"),
        Workload("ls", f"ls -l {files} entries (entries/s)"),
        Workload("rename", f"rename {files} files + fsync dir (files/s)"),
        Workload("unlink", f"unlink {files} files + fsync dir (files/s)"),
    ]
    if tree_files is not None:
        rows.append(Workload("copy", f"cp -a stdlib twice, 2 x {tree_files} files (files/s)"))
    rows += [  # casfs only: the IMMEDIATE_ROWS again on a mount with --durability immediate
        Workload("create_imm", f"create {files} x 4 KiB files + fsync dir, --durability immediate (files/s)"),
        Workload("rename_imm", f"rename {files} files + fsync dir, --durability immediate (files/s)"),
        Workload("unlink_imm", f"unlink {files} files + fsync dir, --durability immediate (files/s)"),
    ]
    rows += audit_workloads(files)
    return rows


def audit_workloads(files: int) -> list[Workload]:
    """The rows of :func:`audit_rows` (casfs only)."""
    return [Workload("create_audit_off", f"create {files} x 4 KiB files + fsync dir, --audit off (files/s)"),
            Workload("create_audit", f"create {files} x 4 KiB files + fsync dir, --audit changes (files/s)")]


@dataclass
class TargetResult:
    name: str
    values: dict[str, float] = field(default_factory=dict)
    error: str | None = None       # set when the target failed part-way
    unavailable: str | None = None  # set when the target could not start at all
    skipped: bool = False          # not selected with --only


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def bench_write(path: Path, blocks: Sequence[bytes]) -> float:
    """Write *blocks* (1 MiB each) to a new file, fsync, close; return MiB/s."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for block in blocks:
            _write_all(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    return len(blocks) / elapsed


def bench_read(path: Path, size: int, buf: bytearray) -> float:
    """Read *path* sequentially with 1 MiB reads; return MiB/s."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    total = 0
    try:
        while True:
            n = os.readv(fd, [buf])
            if n == 0:
                break
            total += n
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    if total != size:
        raise RuntimeError(f"read {total} bytes from {path}, expected {size}")
    return size / MiB / elapsed


def check_content(path: Path, blocks: Sequence[bytes], zeros: bool) -> None:
    """Untimed sanity check of the first and last block of a big file."""
    with open(path, "rb", buffering=0) as f:
        for idx in sorted({0, len(blocks) - 1}):
            f.seek(idx * MiB)
            got = f.read(MiB)
            want = bytes(len(blocks[idx])) if zeros else blocks[idx]
            if got != want:
                raise RuntimeError(f"{path}: block {idx} does not read back as written")


def bench_reread(path: Path, blocks: Sequence[bytes], buf: bytearray) -> float:
    """Write *blocks* to *path*, close, read it once; then the median MiB/s of
    REREAD_ROUNDS re-opens and full reads of the unchanged file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for block in blocks:
            _write_all(fd, block)
    finally:
        os.close(fd)
    size = len(blocks) * MiB
    bench_read(path, size, buf)
    rates = sorted(bench_read(path, size, buf) for _ in range(REREAD_ROUNDS))
    return rates[len(rates) // 2]


def count_files(root: Path) -> tuple[int, int]:
    """(regular files and symlinks, bytes of the regular files) below *root*."""
    n = size = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            n += 1
            size += st.st_size if not os.path.islink(os.path.join(dirpath, name)) else 0
    return n, size


def bench_copy(src: Path, directory: Path, files: int) -> tuple[float, float]:
    """``cp -a`` *src* into *directory* twice; (files/s, seconds). Dirty pages of earlier
    rows are written out first (untimed), so that no target pays for another's."""
    os.sync()
    t0 = time.perf_counter()
    for k in (1, 2):
        subprocess.run(["cp", "-a", str(src), str(directory / f"copy{k}")], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, check=True, timeout=3600)
    elapsed = time.perf_counter() - t0
    return 2 * files / elapsed, elapsed


def bench_create(directory: Path, n: int, payload: bytes) -> float:
    """Create *n* 4 KiB files (distinct content) in *directory*, fsync it; files/s."""
    view = memoryview(payload)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    names = [os.path.join(directory, f"f{i:06d}") for i in range(n)]
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        fd = os.open(name, flags, 0o644)
        try:
            _write_all(fd, view[i * SMALL_FILE_SIZE:(i + 1) * SMALL_FILE_SIZE])
        finally:
            os.close(fd)
    fsync_dir(directory)
    elapsed = time.perf_counter() - t0
    return n / elapsed


def bench_rename(directory: Path, n: int) -> float:
    """Rename the *n* files of bench_create within *directory* (f* -> g*), fsync it; files/s."""
    pairs = [(os.path.join(directory, f"f{i:06d}"), os.path.join(directory, f"g{i:06d}")) for i in range(n)]
    t0 = time.perf_counter()
    for old, new in pairs:
        os.rename(old, new)
    fsync_dir(directory)
    return n / (time.perf_counter() - t0)


def bench_unlink(directory: Path, n: int) -> float:
    """Unlink the *n* files that bench_rename left in *directory*, fsync it; files/s."""
    names = [os.path.join(directory, f"g{i:06d}") for i in range(n)]
    t0 = time.perf_counter()
    for name in names:
        os.unlink(name)
    fsync_dir(directory)
    return n / (time.perf_counter() - t0)


def _stat_pass(directory: Path) -> int:
    count = 0
    with os.scandir(directory) as it:
        for entry in it:
            entry.stat(follow_symlinks=False)
            count += 1
    return count


def bench_stat(directory: Path, n: int) -> float:
    """lstat every entry of *directory* (after an untimed warm-up pass); entries/s."""
    _stat_pass(directory)
    t0 = time.perf_counter()
    count = _stat_pass(directory)
    elapsed = time.perf_counter() - t0
    if count != n:
        raise RuntimeError(f"{directory} has {count} entries, expected {n}")
    return n / elapsed


def bench_ls(directory: Path, n: int) -> float:
    """Time ``ls -l DIR`` (output discarded); entries/s."""
    env = dict(os.environ, LC_ALL="C")
    t0 = time.perf_counter()
    subprocess.run(["ls", "-l", str(directory)], stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, env=env, check=True, timeout=600)
    elapsed = time.perf_counter() - t0
    return n / elapsed


# --------------------------------------------------------------------- mount helpers


def _unescape_mount_field(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounted_fstype(mountpoint: Path) -> str | None:
    """Filesystem type mounted exactly on *mountpoint* (per /proc/self/mounts)."""
    target = os.path.realpath(mountpoint)
    found: str | None = None
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and _unescape_mount_field(parts[1]) == target:
                found = parts[2]  # the last one listed is the topmost
    return found


def is_fuse_mounted(mountpoint: Path) -> bool:
    fstype = mounted_fstype(mountpoint)
    return fstype is not None and fstype.startswith("fuse")


def fs_of(path: Path) -> str:
    """'<device> (<fstype>)' of the filesystem holding *path*."""
    target = os.path.realpath(path)
    best = ("?", "?", "")
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            mp = _unescape_mount_field(parts[1])
            if (target == mp or target.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[2]):
                best = (parts[0], parts[2], mp)
    return f"{best[0]} ({best[1]}, mounted on {best[2]})"


def wait_mounted(mountpoint: Path, proc: subprocess.Popen[bytes] | None = None,
                 timeout: float = MOUNT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not is_fuse_mounted(mountpoint):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"filesystem process exited with status {proc.returncode} before mounting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mountpoint} not mounted after {timeout:.0f} s")
        time.sleep(0.02)


def fusermount_u(mountpoint: Path, lazy: bool = False) -> bool:
    """``fusermount3 -u [-z] MP``; True on success."""
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mountpoint)]
    try:
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        warn(f"{' '.join(cmd)}: {e}")
        return False
    if r.returncode != 0:
        warn(f"{' '.join(cmd)}: {r.stderr.decode(errors='replace').strip()}")
    return r.returncode == 0


def close_fds_under(mountpoint: Path) -> None:
    """Close this process's own descriptors that point into *mountpoint*.

    An interrupt (Ctrl-C, SIGTERM) can arrive between ``os.open()`` returning and
    the ``finally`` that would close the descriptor; such a leaked descriptor
    would keep the mount busy.
    """
    prefix = os.path.realpath(mountpoint)
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target == prefix or target.startswith(prefix + "/"):
            with contextlib.suppress(OSError):
                os.close(int(name))


def force_unmount(mountpoint: Path) -> None:
    """Last resort: fusermount3 -u with retries, then a lazy unmount."""
    close_fds_under(mountpoint)
    for _ in range(5):
        if not is_fuse_mounted(mountpoint):
            return
        if fusermount_u(mountpoint):
            return
        time.sleep(0.5)
    if is_fuse_mounted(mountpoint):
        fusermount_u(mountpoint, lazy=True)


def end_process(proc: subprocess.Popen[bytes], timeout: float = PROC_EXIT_TIMEOUT) -> None:
    """Wait for a process we started; SIGTERM then SIGKILL it (by its PID) if it hangs."""
    if proc.poll() is not None:
        return
    try:
        proc.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        warn(f"pid {proc.pid} still running {timeout:.0f} s after unmount; sending SIGTERM")
    proc.terminate()
    try:
        proc.wait(timeout=10)
        return
    except subprocess.TimeoutExpired:
        warn(f"pid {proc.pid} ignored SIGTERM; sending SIGKILL")
    proc.kill()
    proc.wait()


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Hold off SIGINT/SIGTERM while cleaning up (cleanup steps all have timeouts)."""
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def warn(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def drop_file_cache(path: Path) -> None:
    """fsync *path* and evict its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_tree_cache(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            try:
                if p.is_file() and not p.is_symlink():
                    drop_file_cache(p)
            except OSError:
                pass


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    return env


# --------------------------------------------------------------------------- targets


class Target:
    """A place to run the workloads in; subclasses know how to set it up and tear it down."""

    name = "?"

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch

    def start(self) -> Path:
        """Prepare the target; return the directory the workloads run in."""
        raise NotImplementedError

    def make_cold(self, path: Path, size: int) -> None:
        """Make the next read of *path* cold."""
        raise NotImplementedError

    def stop(self) -> None:
        """Undo start(): must be idempotent and must not raise."""
        raise NotImplementedError

    def begin_reread(self) -> None:
        """Set up for the re-read row (the null fs: remount without keep_cache)."""

    def end_reread(self) -> None:
        """Undo begin_reread()."""

    def begin_immediate(self) -> bool:
        """Switch to immediate namespace durability (casfs: remount with --durability
        immediate); False if the target has no such mode."""
        return False

    def make_tree_cold(self, src: Path, tree: Path) -> None:
        """Make the next listing and reads of *tree* (a copy of *src*) cold."""
        raise NotImplementedError

    content_is_zero = False


class NativeTarget(Target):
    name = "native"

    def start(self) -> Path:
        self.dir = self.scratch / "native"
        self.dir.mkdir()
        return self.dir

    def make_cold(self, path: Path, size: int) -> None:
        drop_file_cache(path)

    def make_tree_cold(self, src: Path, tree: Path) -> None:
        # file pages only: dropping dentries and inodes would take the whole machine's
        # caches (drop_caches), so native lists and opens warm
        drop_tree_cache(tree)

    def stop(self) -> None:
        shutil.rmtree(self.scratch / "native", ignore_errors=True)


class NullTarget(Target):
    name = "null"
    content_is_zero = True

    def __init__(self, scratch: Path) -> None:
        super().__init__(scratch)
        self.mp = scratch / "null-mnt"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = scratch / "nullfs.log"
        self.keep_cache = True
        self.populate: list[str] = []   # --populate NAME=DIR arguments

    def _spawn(self) -> None:
        flags = ([] if self.keep_cache else ["--no-keep-cache"]) + self.populate
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools.bench.nullfs", *flags, str(self.mp)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env=child_env(), start_new_session=True)
        try:
            wait_mounted(self.mp, self.proc)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; log: {self._log_tail()}") from None

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-5:]) or "(empty log)"

    def _unmount(self) -> None:
        close_fds_under(self.mp)
        if is_fuse_mounted(self.mp):
            force_unmount(self.mp)
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None

    def start(self) -> Path:
        self.mp.mkdir()
        self._spawn()
        return self.mp

    def make_cold(self, path: Path, size: int) -> None:
        self._unmount()
        self._spawn()
        # The null fs forgets everything on unmount: recreate the file (sparse,
        # no data transfer) so that there is something of the right size to read.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def make_tree_cold(self, src: Path, tree: Path) -> None:
        # the null fs forgets everything on unmount: start it again with *src*'s
        # namespace (no data) in place, never looked up by the kernel
        if tree.parent != self.mp:
            raise RuntimeError(f"{tree}: the null fs can only populate its root")
        self._unmount()
        self.populate = ["--populate", f"{tree.name}={src}"]
        self._spawn()

    def begin_reread(self) -> None:
        # the null fs forgets everything on unmount; the row writes its file afresh
        self._unmount()
        self.keep_cache = False
        self._spawn()

    def end_reread(self) -> None:
        self._unmount()
        self.keep_cache = True
        self._spawn()

    def stop(self) -> None:
        try:
            self._unmount()
        except Exception as e:  # noqa: BLE001 - stop() must not raise
            warn(f"null: cleanup: {e}")


class CasfsTarget(Target):
    name = "casfs"

    def __init__(self, scratch: Path, chunk_size: str | None, init_args: Sequence[str],
                 timeout: float) -> None:
        super().__init__(scratch)
        self.mp = scratch / "casfs-mnt"
        self.data_home = scratch / "casfs-data"
        self.chunk_size = chunk_size
        self.init_args = list(init_args)
        self.timeout = timeout
        self.env = child_env()
        self.env["XDG_DATA_HOME"] = str(self.data_home)

    def _cli(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "tools.cli", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env, timeout=timeout or self.timeout)

    @staticmethod
    def _why(r: subprocess.CompletedProcess[bytes]) -> str:
        text = (r.stderr or b"").decode(errors="replace").strip() or \
            (r.stdout or b"").decode(errors="replace").strip()
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return f"exit status {r.returncode}" + (f": {lines[-1].strip()}" if lines else "")

    def _mount(self, *extra: str) -> None:
        r = self._cli("mount", str(self.mp), "bench", *extra)
        if r.returncode != 0:
            raise RuntimeError(f"casfs mount failed: {self._why(r)}")
        wait_mounted(self.mp, timeout=10)

    def _umount(self) -> None:
        if not is_fuse_mounted(self.mp):
            return
        close_fds_under(self.mp)
        try:
            r = self._cli("umount", str(self.mp))
            if r.returncode != 0:
                warn(f"casfs umount failed: {self._why(r)}")
        except (OSError, subprocess.TimeoutExpired) as e:
            warn(f"casfs umount: {e}")
        if is_fuse_mounted(self.mp):
            warn("casfs still mounted after 'casfs umount'; trying fusermount3 -u")
            force_unmount(self.mp)

    def start(self) -> Path:
        self.data_home.mkdir()
        self.mp.mkdir()
        args = ["init", "bench", *self.init_args]
        if self.chunk_size:
            args += ["--chunk-size", self.chunk_size]
        try:
            r = self._cli(*args)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NotAvailable(str(e)) from None
        if r.returncode != 0:
            raise NotAvailable(f"casfs init: {self._why(r)}")
        self._mount()
        return self.mp

    def make_cold(self, path: Path, size: int) -> None:
        self._umount()
        if is_fuse_mounted(self.mp):
            raise RuntimeError("could not unmount casfs for the cold read")
        drop_tree_cache(self.data_home)
        self._mount()

    def make_tree_cold(self, src: Path, tree: Path) -> None:
        self.make_cold(tree, 0)

    def begin_immediate(self) -> bool:
        self._umount()
        if is_fuse_mounted(self.mp):
            raise RuntimeError("could not unmount casfs to remount it with --durability immediate")
        self._mount("--durability", "immediate")
        return True

    def stop(self) -> None:
        try:
            self._umount()
        except Exception as e:  # noqa: BLE001 - stop() must not raise
            warn(f"casfs: cleanup: {e}")


# ------------------------------------------------------- latency and small-file rows

LATENCY_SAMPLES = 2000      # default samples per operation and phase
LATENCY_OPS = {"stat": "stat of a cached file", "read4k": "open + read 4 KiB + close, cached file",
               "create": "create + close of a new file"}
WRITER_START_TIMEOUT = 60.0  # seconds for the background writer to write its first MiB


def latency_workloads(size_mib: int) -> list[Workload]:
    """The latency rows: p50 and p99 of each LATENCY_OPS operation, idle and while
    another process streams SIZE MiB writes (ms, lower is better)."""
    rows = []
    for phase, what in (("idle", "idle"), ("busy", f"during a {size_mib} MiB streaming write")):
        for op, label in LATENCY_OPS.items():
            for q in ("p50", "p99"):
                rows.append(Workload(f"lat_{op}_{phase}_{q}", f"{label}, {what}, {q} (ms, lower is better)"))
    return rows


def percentile_ms(samples_ns: Sequence[int], q: float) -> float:
    """The q-quantile (0 < q <= 1, nearest rank) of samples in ns, in ms."""
    s = sorted(samples_ns)
    rank = max(1, -(-len(s) * q // 1))   # ceil(n q), nearest-rank definition
    return s[int(rank) - 1] / 1e6


def _latency_samples(directory: Path, n: int, tag: str) -> dict[str, list[int]]:
    """*n* timed samples (perf_counter_ns) of each LATENCY_OPS operation, interleaved;
    the files created are left in *directory*."""
    cached = directory / "cached"
    out: dict[str, list[int]] = {op: [] for op in LATENCY_OPS}
    clock = time.perf_counter_ns
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for i in range(n):
        t0 = clock()
        os.stat(cached)
        t1 = clock()
        fd = os.open(cached, os.O_RDONLY)
        try:
            got = os.read(fd, SMALL_FILE_SIZE)
        finally:
            os.close(fd)
        t2 = clock()
        fd = os.open(directory / f"{tag}{i:06d}", flags, 0o644)
        os.close(fd)
        t3 = clock()
        if len(got) != SMALL_FILE_SIZE:
            raise RuntimeError(f"{cached}: read {len(got)} bytes, expected {SMALL_FILE_SIZE}")
        out["stat"].append(t1 - t0)
        out["read4k"].append(t2 - t1)
        out["create"].append(t3 - t2)
    return out


def stream_writer(path: str, size_mib: int, stop: str) -> None:
    """The background writer of the latency rows (run in its own process): write
    *size_mib* MiB of new random data to *path* in 1 MiB writes, fsync, and start over
    (O_TRUNC) until the file *stop* exists."""
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(size_mib):
                _write_all(fd, os.urandom(MiB))
                if os.path.exists(stop):
                    return
            os.fsync(fd)
        finally:
            os.close(fd)


def bench_latency(directory: Path, size_mib: int, samples: int) -> dict[str, float]:
    """The latency rows (see latency_workloads) in *directory*: key -> ms."""
    directory.mkdir()
    cached = directory / "cached"
    cached.write_bytes(os.urandom(SMALL_FILE_SIZE))
    cached.read_bytes()                       # now cached
    res: dict[str, float] = {}

    def record(phase: str, got: dict[str, list[int]]) -> None:
        for op, ns in got.items():
            res[f"lat_{op}_{phase}_p50"] = percentile_ms(ns, 0.50)
            res[f"lat_{op}_{phase}_p99"] = percentile_ms(ns, 0.99)

    record("idle", _latency_samples(directory, samples, "i"))
    big, stop = directory / "stream", directory.parent / "stream.stop"
    stop.unlink(missing_ok=True)
    code = "import sys; from tools.bench import stream_writer; stream_writer(sys.argv[1], int(sys.argv[2]), sys.argv[3])"
    writer = subprocess.Popen([sys.executable, "-c", code, str(big), str(size_mib), str(stop)],
                              stdin=subprocess.DEVNULL, env=child_env(), cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + WRITER_START_TIMEOUT
        while not (big.exists() and big.stat().st_size >= MiB):
            if writer.poll() is not None:
                raise RuntimeError(f"background writer exited with status {writer.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("background writer wrote nothing")
            time.sleep(0.01)
        got = _latency_samples(directory, samples, "b")
        if writer.poll() is not None:
            raise RuntimeError(f"background writer exited with status {writer.returncode} during the samples")
        record("busy", got)
    finally:
        stop.touch()
        end_process(writer, timeout=600)   # our own child, by PID
        stop.unlink(missing_ok=True)
    big.unlink()
    return res


def small_file_workloads(tree_files: int, tree_name: str = "stdlib") -> list[Workload]:
    """The small-file rows (--small-files), all higher is better."""
    return [
        Workload("lsr_cold", f"ls -lR of the {tree_name} tree ({tree_files} files), cold (entries/s)"),
        Workload("readall_cold", f"read every file of the {tree_name} tree ({tree_files} files), cold (files/s)"),
        Workload("untar", f"tar -xf of the {tree_name} tree ({tree_files} files) (files/s)"),
        Workload("git_clone", "git clone of a local bare repository (files checked out/s)"),
    ]


@dataclass
class SmallFileData:
    tree: Path           # the tree snapshot (on the scratch disk)
    tarball: Path        # tar of it
    repo: Path           # a bare git repository
    tree_files: int
    tree_entries: int    # files, symlinks and directories below the tree's root
    repo_files: int      # files of the repository's HEAD


def prepare_small_files(scratch: Path, tree_src: Path) -> SmallFileData:
    """Snapshot *tree_src* into *scratch*, tar it, and make a bare clone of this
    repository (git is needed). Untimed."""
    tree = scratch / "sf-tree"
    shutil.copytree(tree_src, tree, symlinks=True, ignore=TREE_IGNORED)
    files, _ = count_files(tree)
    entries = sum(len(d) + len(f) for _, d, f in os.walk(tree))
    tarball = scratch / "sf-tree.tar"
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(tree), "."], check=True, timeout=600)
    repo = scratch / "sf-repo.git"
    subprocess.run(["git", "clone", "-q", "--bare", "--no-local", str(REPO_ROOT), str(repo)],
                   check=True, timeout=600, stdout=subprocess.DEVNULL)
    ls = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", "HEAD"],
                        check=True, timeout=60, capture_output=True, text=True)
    return SmallFileData(tree, tarball, repo, files, entries, len(ls.stdout.splitlines()))


def _timed_run(cmd: list[str], cwd: Path | None = None) -> float:
    """Seconds of one run of *cmd* (output discarded; raises on a non-zero exit)."""
    env = dict(os.environ, LC_ALL="C")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, timeout=3600)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.decode(errors='replace').strip()}")
    return elapsed


def read_every_file(root: Path) -> int:
    """Open, read whole (1 MiB reads) and close every regular file below *root*; count."""
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                while os.read(fd, MiB):
                    pass
            finally:
                os.close(fd)
            n += 1
    return n


def bench_small_files(target: "Target", workdir: Path, sf: SmallFileData,
                      progress: Callable[[str], None]) -> dict[str, float]:
    """The small-file rows on *target*: key -> rate (see small_file_workloads)."""
    res: dict[str, float] = {}
    tree = workdir / "sf-tree"
    progress(f"{target.name}: small files: copying the tree in (untimed)")
    subprocess.run(["cp", "-a", str(sf.tree), str(tree)], check=True, timeout=3600)
    target.make_tree_cold(sf.tree, tree)
    progress(f"{target.name}: ls -lR, cold")
    res["lsr_cold"] = sf.tree_entries / _timed_run(["ls", "-lR", str(tree)])
    target.make_tree_cold(sf.tree, tree)
    progress(f"{target.name}: read every file, cold")
    t0 = time.perf_counter()
    n = read_every_file(tree)
    res["readall_cold"] = n / (time.perf_counter() - t0)
    untar = workdir / "sf-untar"
    untar.mkdir()
    os.sync()
    progress(f"{target.name}: tar -xf")
    res["untar"] = sf.tree_files / _timed_run(["tar", "-xf", str(sf.tarball), "-C", str(untar)])
    if not target.content_is_zero:    # git reads back the pack it writes: not on the null fs
        progress(f"{target.name}: git clone")
        res["git_clone"] = sf.repo_files / _timed_run(
            ["git", "clone", "-q", f"file://{sf.repo}", str(workdir / "sf-clone")])
    return res


def run_speed_rows(target: "Target", workdir: Path, data: "BenchData", res: TargetResult,
                   progress: Callable[[str], None]) -> None:
    """The latency rows (unless --latency-samples 0) and the small-file rows (with
    --small-files) on *target*, into ``res.values``. Raises RuntimeError naming the row."""
    if data.latency_samples:
        progress(f"{target.name}: latency, {data.latency_samples} samples per operation, idle and busy")
        try:
            res.values.update(bench_latency(workdir / "latency", len(data.blocks), data.latency_samples))
        except Exception as e:
            raise RuntimeError(f"latency: {type(e).__name__}: {e}") from e
    if data.small is not None:
        try:
            res.values.update(bench_small_files(target, workdir, data.small, progress))
        except Exception as e:
            raise RuntimeError(f"small files: {type(e).__name__}: {e}") from e


def speed_report(args: argparse.Namespace, data: "BenchData") -> tuple[list[Workload], list[str]]:
    """The latency and small-file rows of this run, and the notes under the table."""
    rows: list[Workload] = []
    notes: list[str] = []
    if data.latency_samples:
        rows += latency_workloads(args.size_mib)
        notes.append(f"latency: {data.latency_samples} samples per operation and phase (perf_counter_ns), "
                     f"interleaved; busy = while another process rewrites a {args.size_mib} MiB file "
                     "with 1 MiB writes of new data + fsync, over and over; ratios > 1 are slower than null.")
    if data.small is not None:
        rows += small_file_workloads(data.small.tree_files, "stdlib" if args.tree is None else "--tree")
        notes.append(f"small files: tree {args.tree or 'stdlib'} ({data.small.tree_entries} entries); cold = "
                     "remount (casfs: + DONTNEED on its data dir; null: restarted with the tree's namespace, "
                     "never looked up); native: DONTNEED of the files only (dentries stay cached); "
                     f"git clone of a {data.small.repo_files}-file repository via file:// (not on null: git "
                     "reads back what it writes).")
    return rows, notes


# ------------------------------------------------------------------------------ run


@dataclass
class BenchData:
    blocks: list[bytes]
    small_payload: bytes
    size: int
    files: int
    tree: Path | None = None   # the tree of the copy row (--extra)
    tree_files: int = 0
    latency_samples: int = 0   # samples per op and phase of the latency rows (0: none)
    small: SmallFileData | None = None   # the small-file rows (--small-files)


def run_target(target: Target, data: BenchData, progress: Callable[[str], None]) -> TargetResult:
    res = TargetResult(target.name)
    step = "start"
    try:
        try:
            workdir = target.start()
        except NotAvailable as e:
            res.unavailable = str(e)
            return res
        buf = bytearray(MiB)
        big1, big2 = workdir / "big1", workdir / "big2"

        step = "write_new"
        progress(f"{target.name}: sequential write, new data")
        res.values["write_new"] = bench_write(big1, data.blocks)
        step = "write_dup"
        progress(f"{target.name}: sequential write, same data again")
        res.values["write_dup"] = bench_write(big2, data.blocks)
        step = "read_cold"
        progress(f"{target.name}: sequential read, cold")
        target.make_cold(big1, data.size)
        res.values["read_cold"] = bench_read(big1, data.size, buf)
        step = "read_warm"
        progress(f"{target.name}: sequential read, warm")
        res.values["read_warm"] = bench_read(big1, data.size, buf)
        step = "check"
        check_content(big1, data.blocks, zeros=target.content_is_zero)
        if data.tree is not None:
            step = "reread"
            progress(f"{target.name}: re-read of an unchanged file")
            target.begin_reread()
            res.values["reread"] = bench_reread(workdir / "reread", data.blocks[:REREAD_MAX_MIB], buf)
            target.end_reread()

        small = workdir / "small"
        small.mkdir()
        step = "create"
        progress(f"{target.name}: create {data.files} small files")
        res.values["create"] = bench_create(small, data.files, data.small_payload)
        step = "stat"
        progress(f"{target.name}: stat {data.files} entries")
        res.values["stat"] = bench_stat(small, data.files)
        step = "ls"
        progress(f"{target.name}: ls -l")
        res.values["ls"] = bench_ls(small, data.files)
        step = "rename"
        progress(f"{target.name}: rename {data.files} files")
        res.values["rename"] = bench_rename(small, data.files)
        step = "unlink"
        progress(f"{target.name}: unlink {data.files} files")
        res.values["unlink"] = bench_unlink(small, data.files)
        step = "latency and small-file rows"
        run_speed_rows(target, workdir, data, res, progress)
        if data.tree is not None:
            step = "copy"
            progress(f"{target.name}: cp -a of the standard library, twice")
            copies = workdir / "copies"
            copies.mkdir()
            res.values["copy"], res.values["copy_s"] = bench_copy(data.tree, copies, data.tree_files)
        step = "remount with --durability immediate"
        if target.begin_immediate():
            imm = workdir / "small-immediate"
            imm.mkdir()
            step = "create" + IMMEDIATE_SUFFIX
            progress(f"{target.name}: create {data.files} small files, --durability immediate")
            res.values[step] = bench_create(imm, data.files, data.small_payload)
            step = "rename" + IMMEDIATE_SUFFIX
            progress(f"{target.name}: rename {data.files} files, --durability immediate")
            res.values[step] = bench_rename(imm, data.files)
            step = "unlink" + IMMEDIATE_SUFFIX
            progress(f"{target.name}: unlink {data.files} files, --durability immediate")
            res.values[step] = bench_unlink(imm, data.files)
        step = "audit"
        audit_rows(target, data, progress, res)
    except Exception as e:  # noqa: BLE001 - report and go on with the next target
        res.error = f"{step}: {type(e).__name__}: {e}"
    finally:
        with no_interrupts():
            target.stop()
    return res


def audit_rows(target: Target, data: BenchData, progress: Callable[[str], None], res: TargetResult) -> None:
    """casfs only: create ``data.files`` small files on a mount with the audit log off,
    then on one with it at level changes (every create logged), in the same run."""
    if not isinstance(target, CasfsTarget):
        return
    for level, key in (("off", "create_audit_off"), ("changes", "create_audit")):
        target._umount()
        if is_fuse_mounted(target.mp):
            raise RuntimeError("could not unmount casfs to remount it with --audit")
        target._mount("--audit", level)
        d = target.mp / f"small-audit-{level}"
        d.mkdir()
        progress(f"{target.name}: create {data.files} small files, --audit {level}")
        res.values[key] = bench_create(d, data.files, data.small_payload)


# ------------------------------------------------------------------------ --encrypt

ENCRYPT_ROUNDS = 2          # volumes per kind; the best of them is reported
ENCRYPT_PASSPHRASE = "casfs-bench passphrase"   # a benchmark volume's throwaway passphrase
ENCRYPT_ROWS = ("write_new", "read_cold", "create")


def bench_encrypt(scratch: Path, data: BenchData, args: argparse.Namespace,
                  progress: Callable[[str], None]) -> list[str]:
    """The ``--encrypt`` rows: new write, cold read and small-file creation on unencrypted
    and encrypted (`casfs init --encrypt`) casfs volumes in the same run, ENCRYPT_ROUNDS
    fresh volumes of each kind in ABBA order (drift on a shared machine cancels), the
    best of each kind reported with the ratio encrypted / plain. Returns report lines."""
    best: dict[tuple[bool, str], float] = {}
    order = [False, True, True, False] * ((ENCRYPT_ROUNDS + 1) // 2)
    errors: list[str] = []
    for i, enc in enumerate(order[:2 * ENCRYPT_ROUNDS]):
        kind = "encrypted" if enc else "plain"
        sub = scratch / f"enc-{i}"
        sub.mkdir()
        target = CasfsTarget(sub, args.chunk_size, [*args.casfs_init_arg, *(["--encrypt"] if enc else [])],
                             args.casfs_timeout)
        target.env["CASFS_PASSPHRASE"] = ENCRYPT_PASSPHRASE
        step = "start"
        try:
            try:
                workdir = target.start()
            except NotAvailable as e:
                return [f"--encrypt: casfs not available: {e}"]
            vals: dict[str, float] = {}
            step = "write_new"
            progress(f"--encrypt round {i + 1}: {kind}: sequential write, new data")
            vals[step] = bench_write(workdir / "big1", data.blocks)
            step = "read_cold"
            progress(f"--encrypt round {i + 1}: {kind}: sequential read, cold")
            target.make_cold(workdir / "big1", data.size)
            vals[step] = bench_read(workdir / "big1", data.size, bytearray(MiB))
            check_content(workdir / "big1", data.blocks, zeros=False)
            step = "create"
            progress(f"--encrypt round {i + 1}: {kind}: create {data.files} small files")
            (workdir / "small").mkdir()
            vals[step] = bench_create(workdir / "small", data.files, data.small_payload)
            for k, v in vals.items():
                best[(enc, k)] = max(best.get((enc, k), 0.0), v)
        except Exception as e:  # noqa: BLE001 - report and go on
            errors.append(f"--encrypt round {i + 1} ({kind}): error during {step}: {type(e).__name__}: {e}")
        finally:
            with no_interrupts():
                target.stop()
    labels = {w.key: w.label for w in workloads(args.size_mib, args.files)}
    rows = [["workload", "casfs", "casfs --encrypt", "encrypted/plain"]]
    for k in ENCRYPT_ROWS:
        a, b = best.get((True, k)), best.get((False, k))
        rows.append([labels[k], _fmt(b), _fmt(a), _ratio(a, b)])
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    table = ["| " + " | ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]) + " |"
             for r in rows]
    table.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return ["", f"encrypted vs unencrypted casfs, same run: {ENCRYPT_ROUNDS} fresh volumes of each kind "
                "(ABBA order), best of each:", *errors, *table]


# ------------------------------------------------------------------------ --profile


def add_profile_args(p: argparse.ArgumentParser) -> None:
    """The ``--profile`` options (tools/bench/profiling.py, docs/performance.md)."""
    p.add_argument("--profile", action="store_true",
                   help="after the table, run the goal rows on a fresh casfs volume with py-spy attached to "
                        "the mount daemon and print where each row's time goes")
    p.add_argument("--profile-rate", type=int, default=100, metavar="HZ",
                   help="py-spy samples per second and thread (default 100)")
    p.add_argument("--profile-dir", type=Path, default=None, metavar="DIR",
                   help="keep py-spy's raw stacks of each row as DIR/ROW.raw")


def profile_pass(scratch: Path, data: BenchData, args: argparse.Namespace,
                 progress: Callable[[str], None]) -> list[str]:
    """The ``--profile`` report lines (tools/bench/profiling.py), or one line saying why not."""
    from tools.bench.profiling import profile_rows
    try:
        return profile_rows(scratch, data, args, progress)
    except RuntimeError as e:
        return ["", f"--profile: {e}"]


# --------------------------------------------------------------------------- report


def machine_info(scratch: Path) -> list[str]:
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import pyfuse3
        pyfuse3_version = pyfuse3.__version__
    except Exception:  # noqa: BLE001
        pyfuse3_version = "not importable"
    try:
        fm = subprocess.run(["fusermount3", "-V"], capture_output=True, text=True, timeout=10)
        fuse_version = (fm.stdout + fm.stderr).strip().split()[-1]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        fuse_version = "?"
    naff = len(os.sched_getaffinity(0))
    return [
        f"date:    {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: nproc={naff} (cpu_count={os.cpu_count()}), memory={mem_kib / 1024 / 1024:.1f} GiB, cpu={cpu}",
        f"system:  {platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"pyfuse3 {pyfuse3_version}, fusermount3 {fuse_version}",
        f"disk:    {fs_of(scratch)}",
    ]


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if v >= 1 else f"{v:.3g}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def format_table(wls: list[Workload], results: dict[str, TargetResult]) -> list[str]:
    header = ["workload", "native", "null pyfuse3", "casfs", "casfs/null", "casfs/native"]
    rows = [header]
    for w in wls:
        vals = {t: results[t].values.get(w.key) if t in results else None for t in TARGETS}
        rows.append([w.label, _fmt(vals["native"]), _fmt(vals["null"]), _fmt(vals["casfs"]),
                     _ratio(vals["casfs"], vals["null"]), _ratio(vals["casfs"], vals["native"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return [line(rows[0]), sep] + [line(r) for r in rows[1:]]


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench",
                                description="Benchmark native vs null pyfuse3 vs casfs.")
    p.add_argument("--size-mib", type=int, default=1024, help="size of the big file (MiB, default 1024)")
    p.add_argument("--files", type=int, default=10000, help="number of small files (default 10000)")
    p.add_argument("--out", type=Path, help="also write the report to this file")
    p.add_argument("--only", default=",".join(TARGETS),
                   help="comma-separated targets to run, from: native,null,casfs (default all)")
    p.add_argument("--chunk-size", help="passed to 'casfs init --chunk-size'")
    p.add_argument("--extra", action="store_true",
                   help="also the re-read and standard-library copy rows")
    p.add_argument("--latency-samples", type=int, default=LATENCY_SAMPLES, metavar="N",
                   help=f"samples per operation of the latency rows (default {LATENCY_SAMPLES}; 0: no latency rows)")
    p.add_argument("--small-files", action="store_true",
                   help="also the small-file rows: cold ls -lR and read of a tree, tar -xf, git clone")
    p.add_argument("--tree", type=Path, default=None,
                   help="the tree of the small-file rows (default: the standard library)")
    p.add_argument("--casfs-init-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for 'casfs init' (repeatable)")
    p.add_argument("--casfs-timeout", type=float, default=1800.0,
                   help="timeout (s) of each casfs CLI call (default 1800)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where to create the scratch directory (default: the system temp dir)")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p.add_argument("--encrypt", action="store_true",
                   help="also new write, cold read and create on unencrypted vs encrypted casfs volumes")
    add_profile_args(p)
    p.add_argument("--two-mounts", action="store_true",
                   help="instead of the table: aggregate write and create on two mounts of one shared volume "
                        "against one mount (tools/bench/twomounts.py; needs casfs join)")
    args = p.parse_args(argv)
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    bad = [t for t in only if t not in TARGETS]
    if bad or not only:
        p.error(f"--only: unknown target(s) {','.join(bad) or '(none)'}; choose from {','.join(TARGETS)}")
    if args.size_mib < 1 or args.files < 1:
        p.error("--size-mib and --files must be >= 1")
    if args.latency_samples < 0 or (args.tree is not None and not args.tree.is_dir()):
        p.error("--latency-samples must be >= 0 and --tree an existing directory")
    if args.profile:
        from tools.bench.profiling import find_py_spy
        if find_py_spy() is None:
            p.error("--profile needs py-spy (pip install py-spy)")
        if args.profile_rate < 1:
            p.error("--profile-rate must be >= 1")
        if args.profile_dir is not None:
            args.profile_dir.mkdir(parents=True, exist_ok=True)
    args.only = only
    return args


def sigterm_to_interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: raise KeyboardInterrupt so the finally blocks unmount and clean up."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, sigterm_to_interrupt)
    if args.two_mounts:   # tools/bench/twomounts.py: a report of its own
        from tools.bench.twomounts import two_mounts
        return two_mounts(args)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"bench: {msg}", file=sys.stderr, flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="casfs-bench-", dir=args.workdir))
    targets: list[Target] = []
    results: dict[str, TargetResult] = {}
    enc_lines: list[str] = []
    prof_lines: list[str] = []
    try:
        progress(f"scratch directory {scratch}; generating {args.size_mib} MiB of random data")
        data = BenchData(
            blocks=[os.urandom(MiB) for _ in range(args.size_mib)],
            small_payload=os.urandom(SMALL_FILE_SIZE * args.files),
            size=args.size_mib * MiB,
            files=args.files,
        )
        if args.extra:
            import sysconfig
            data.tree = scratch / "stdlib"
            progress(f"snapshot of the standard library in {data.tree}")
            shutil.copytree(sysconfig.get_paths()["stdlib"], data.tree, symlinks=True, ignore=TREE_IGNORED)
            data.tree_files, tree_bytes = count_files(data.tree)
        data.latency_samples = args.latency_samples
        if args.small_files:
            import sysconfig
            progress("small files: snapshot of the tree, its tarball, a bare clone of this repository")
            data.small = prepare_small_files(scratch, args.tree or Path(sysconfig.get_paths()["stdlib"]))
        for name in TARGETS:
            if name not in args.only:
                results[name] = TargetResult(name, skipped=True)
                continue
            target: Target
            if name == "native":
                target = NativeTarget(scratch)
            elif name == "null":
                target = NullTarget(scratch)
            else:
                target = CasfsTarget(scratch, args.chunk_size, args.casfs_init_arg, args.casfs_timeout)
            targets.append(target)
            results[name] = run_target(target, data, progress)
            del target
        enc_lines = bench_encrypt(scratch, data, args, progress) if args.encrypt else []
        prof_lines = profile_pass(scratch, data, args, progress) if args.profile else []
    finally:
        with no_interrupts():
            for t in targets:
                t.stop()  # idempotent; already done in run_target on the normal path
            leftover = [mp for mp in (scratch / "null-mnt", scratch / "casfs-mnt",
                                      *scratch.glob("enc-*/casfs-mnt"), scratch / "profile" / "casfs-mnt")
                        if is_fuse_mounted(mp)]
            if leftover:
                warn(f"still mounted, not removing {scratch}: {', '.join(map(str, leftover))}")
            else:
                shutil.rmtree(scratch, ignore_errors=True)

    wls = workloads(args.size_mib, args.files, data.tree_files if args.extra else None)
    speed_rows, speed_notes = speed_report(args, data)
    wls += speed_rows
    lines = machine_info(Path(tempfile.gettempdir()) if args.workdir is None else args.workdir)
    lines.append(f"params:  --size-mib {args.size_mib} --files {args.files} --only {','.join(args.only)}"
                 + (f" --chunk-size {args.chunk_size}" if args.chunk_size else "")
                 + (" --extra" if args.extra else "") + (" --encrypt" if args.encrypt else "")
                 + f" --latency-samples {args.latency_samples}" + (" --small-files" if args.small_files else ""))
    lines.append("")
    for name in TARGETS:
        r = results.get(name)
        if r is None or r.skipped:
            lines.append(f"{name}: skipped (not in --only)")
        elif r.unavailable is not None:
            lines.append(f"{name}: not available: {r.unavailable}")
        elif r.error is not None:
            lines.append(f"{name}: error during {r.error}")
    if lines[-1] != "":
        lines.append("")
    lines += format_table(wls, results)
    lines += [
        "",
        "MiB/s = 2^20 bytes/s; all figures higher-is-better but the latency rows (ms); "
        "ratios are casfs divided by the other column.",
        "cold read: native = fsync + POSIX_FADV_DONTNEED; null = remount; casfs = umount + mount "
        "+ DONTNEED on its data dir. warm read = re-open and read again right away.",
    ]
    cas_vals = results["casfs"].values if "casfs" in results else {}
    if any(k + IMMEDIATE_SUFFIX in cas_vals for k in IMMEDIATE_ROWS):
        lines.append("casfs --durability immediate / default (group) mount, same run: " + ", ".join(
            f"{k} {_ratio(cas_vals.get(k + IMMEDIATE_SUFFIX), cas_vals.get(k))}" for k in IMMEDIATE_ROWS) + ".")
    if "create_audit" in cas_vals:
        lines.append(f"casfs create with the audit log on (changes) / off, same run: "
                     f"{_ratio(cas_vals.get('create_audit'), cas_vals.get('create_audit_off'))}.")
    if args.extra:
        secs = {t: results[t].values.get("copy_s") for t in TARGETS if t in results}
        lines += [
            "re-read: written, closed, read once, then 3 re-opens + full reads (median); the null fs "
            "runs without keep_cache for this row (every read reaches its process).",
            f"cp -a stdlib twice ({data.tree_files} files, {tree_bytes / MiB:,.0f} MiB each time), seconds: "
            + ", ".join(f"{TARGET_LABELS[t]} {_fmt(v)}" for t, v in secs.items())
            + f"; casfs/native time {_ratio(secs.get('casfs'), secs.get('native'))}.",
        ]
    lines += speed_notes
    lines += enc_lines
    lines += prof_lines
    report = "\n".join(lines) + "\n"
    sys.stdout.write(report)
    sys.stdout.flush()
    if args.out:
        args.out.write_text(report)
    failed = [r for r in results.values() if r.error is not None]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
