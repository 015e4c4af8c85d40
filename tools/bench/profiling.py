"""Profiles of the casfs benchmark rows: where the daemon's time goes, per row.

``python -m tools.bench --profile`` (after the table) runs the rows that the goals of
docs/performance.md are about -- sequential write of new data and of the same data
again, cold sequential read, creation of N small files, ``cp -a`` of a tree, cold
``ls -lR`` and cold read of every file of that tree -- on one fresh casfs volume, each
with py-spy (https://github.com/benfred/py-spy) attached to the mount daemon for
exactly that row::

    py-spy record --pid PID --threads --idle --native --format raw --rate HZ

``--threads`` keeps every thread apart, ``--idle`` keeps the samples of threads that
wait (so that a thread's samples add up to the row's wall time), ``--native`` adds the C
frames (zstd, OpenSSL's SHA-256, libfuse, syncfs, lock waits). Sampling pauses the
daemon for each sample, so the rates under the profiler are lower than in the table;
each row prints its own rate and times so that ms per operation refer to the profiled
run.

Each sample (one thread's stack) goes into one category, decided by the frame closest
to the leaf that a rule of :data:`RULES` claims (:func:`classify`): MySQL round trips
(PyMySQL), hashing, compression, encryption, syncfs/fsync, chunk file I/O
(cas/chunk/store.py), FUSE (pyfuse3 and libfuse), waiting for the casfs engine lock, waiting
for worker threads (futures, queues: the trio loop thread waiting for a pool), waiting
for the GIL, idle (the trio loop in epoll waiting for a request, a worker waiting for
work), trio, casfs Python, other. Per row it prints the trio loop thread's shares of
the row's time (and ms per operation), the busy seconds of the other thread groups by
category, the top functions by cumulative samples of the loop thread and by self
samples of all threads (busy samples only). ``--profile-dir DIR`` keeps the raw stacks
(one ``ROW.raw`` per row, the collapsed-stack format that flamegraph.pl and speedscope
read).

py-spy must be installed (``pip install py-spy``; it is in the ``test`` extra) and be
allowed to ptrace the daemon: as root, or with ``kernel.yama.ptrace_scope = 0`` for a
daemon of the same user (Linux Yama, Documentation/admin-guide/LSM/Yama.rst).
"""
from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Self

from tools.bench import (MiB, TREE_IGNORED, CasfsTarget, bench_copy, bench_create, bench_read, bench_write,
                         count_files, no_interrupts, read_every_file, wait_mounted)

if TYPE_CHECKING:
    import argparse

    from tools.bench import BenchData

PROFILE_RATE = 100          # samples per second and thread (py-spy --rate)
SPY_START_TIMEOUT = 30.0    # s for py-spy to attach and start sampling
SPY_STOP_TIMEOUT = 120.0    # s for py-spy to write its output after SIGINT
TOP_N = 8                   # functions listed per top list

# categories, in the order they are printed
IDLE = "idle"               # the loop in epoll: no request (or CPU starvation); a worker without work
WAIT_WORKERS = "wait: worker threads"
WAIT_LOCK = "wait: casfs lock"
WAIT_GIL = "wait: GIL"
MYSQL = "MySQL (PyMySQL)"
HASH = "hashing"
COMPRESS = "compression"
CRYPT = "encryption"
SYNC = "syncfs/fsync"
CHUNK_IO = "chunk file I/O"
FUSE = "FUSE (pyfuse3, libfuse)"
TRIO = "trio"
CASFS = "casfs Python"
OTHER = "other"
CATEGORIES = (MYSQL, HASH, COMPRESS, CRYPT, SYNC, CHUNK_IO, FUSE, WAIT_LOCK, WAIT_WORKERS,
              WAIT_GIL, TRIO, CASFS, OTHER, IDLE)
NOT_BUSY = frozenset({IDLE})
WAITS = frozenset({IDLE, WAIT_WORKERS, WAIT_LOCK, WAIT_GIL})

# native frames of a thread blocked on a lock (CPython's _thread, its SimpleQueue)
_LOCK_WAIT = re.compile(r"^(lock_PyThread_acquire_lock|rlock_acquire|PyThread_acquire_lock_timed|"
                        r"_queue_SimpleQueue_get\w*) ")
_GIL_WAIT = re.compile(r"^(take_gil|pthread_cond_timedwait|pthread_cond_wait) ")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*)\)$")
_CASFS_FILE = re.compile(r"(^|/)(cas|fusefront|tools)/[\w/]+\.py$")

# (category, pattern on the whole frame "function (file:line)"), first match wins for a frame
RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (WAIT_GIL, _GIL_WAIT),
    (HASH, re.compile(r"sha256|SHA256|_hashlib|hashopenssl|EVP_hash|EVP_Digest|blake3|blake2|"
                      r"^\S*chunk_id \(\S*cas/chunk/envelope\.py")),
    (COMPRESS, re.compile(r"ZSTD|Zstd|zstd\.c|compressor\.c|decompressor\.c|"
                          r"^_(de)?compress \(\S*cas/chunk/envelope\.py")),
    (CRYPT, re.compile(r"AESGCM|aesgcm|aes_gcm|aesni|EVP_(En|De)crypt|EVP_Cipher|cryptography/")),
    (SYNC, re.compile(r"^(syncfs|fsync|fdatasync|os_fsync\w*) |^\S*\._sync \(\S*cas/chunk/store\.py|"
                      r"^fsync_dir \(")),
    (MYSQL, re.compile(r"pymysql/")),
    (IDLE, re.compile(r"get_events \(\S*trio/_core/_io_\w+\.py|^time_sleep |^(select_)?epoll_wait ")),
    (CHUNK_IO, re.compile(r"\(\S*cas/chunk/store\.py:")),
    (FUSE, re.compile(r"\.pyx:|\.pxi:|_pyfuse3\.py:|libfuse3|pyfuse3")),
    (TRIO, re.compile(r"\(\S*trio/")),
    (CASFS, re.compile(r"\(\S*(cas|fusefront)/\S+\.py:")),
)


@dataclass
class Stack:
    """One line of py-spy's raw output: a thread's stack (root first) and its count."""

    thread: str           # "thread (TID): NAME" as py-spy writes it
    frames: list[str]     # "function (file:line)" or "function (library)", root first
    count: int


def parse_raw(text: str) -> list[Stack]:
    """Parse py-spy ``--format raw --threads`` output (collapsed stacks: frames joined by
    ``;``, a space and the sample count). Lines that do not parse are skipped."""
    out = []
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        out.append(Stack(frames[0], frames[1:], int(n)))
    return out


def _is_python(frame: str) -> bool:
    m = _FRAME.match(frame)
    return m is not None and ".py:" in m.group("where") + ":"


def classify(frames: list[str], loop_thread: bool) -> str:
    """The category of one sample (frames root first): the rule that claims the frame
    closest to the leaf. A thread blocked on a lock waits for the casfs lock when the
    Python frame that took it is casfs code (cas/, fusefront/), else it waits for other
    threads (the trio loop thread) or is idle (any other thread: a pool worker waiting
    for work, a timer)."""
    for i in range(len(frames) - 1, -1, -1):
        f = frames[i]
        if _LOCK_WAIT.match(f):
            caller = next((g for g in reversed(frames[:i]) if _is_python(g)), "")
            m = _FRAME.match(caller)
            if m is not None and _CASFS_FILE.search(m.group("where").rsplit(":", 1)[0]):
                return WAIT_LOCK
            return WAIT_WORKERS if loop_thread else IDLE
        for cat, rx in RULES:
            if rx.search(f):
                return cat
    return OTHER


def frame_key(frame: str) -> str:
    """A frame without its line number (``func (file)``); an unnamed native frame
    (``0x7f.. (libc.so.6)``) becomes ``? (libc.so.6)``."""
    m = _FRAME.match(frame)
    if m is None:
        return frame
    func, where = m.group("func"), m.group("where")
    if func.startswith("0x"):
        func = "?"
    if ":" in where:
        where = where.rsplit(":", 1)[0]
    return f"{func} ({where})"


# frames every sample of a thread carries (start-up, click, the trio run loop, Cython
# coroutine plumbing, a pool's bootstrap): left out of the cumulative top list
_PLUMBING = re.compile(r"<frozen runpy>|click/|tools/(cli|common|keycmd|mountcmd)\.py|fusefront/daemon\.py|"
                       r"trio/_core/_run\.py|_pyfuse3\.py|^__Pyx_|threading\.py|concurrent/futures/thread\.py|"
                       r"^\? \(|^thread_run |^_translate\.|^_locked\.")


def is_loop_thread(stacks: list[Stack], thread: str) -> bool:
    """Whether ``thread`` runs the trio loop (a frame of trio.run)."""
    return any(s.thread == thread and any(f.startswith("run (") and "trio/_core/_run.py" in f for f in s.frames)
               for s in stacks)


def thread_group(thread: str) -> str:
    """``thread (123): casfs-io_4`` -> ``casfs-io`` (pool workers grouped by name)."""
    name = thread.split(": ", 1)[1] if ": " in thread else "unnamed"
    return re.sub(r"[_ -]?\d+$", "", name) or name


@dataclass
class RowProfile:
    """The profile of one benchmark row."""

    key: str
    label: str
    ops: int                      # operations of the row (MiB, files, entries)
    unit: str                     # their name ("MiB", "file", "entry")
    seconds: float                # wall time of the row under the profiler
    cpu_daemon: float             # s of CPU (user + system) of the daemon during the row
    cpu_children: float           # s of CPU of its child processes (the embedded mariadbd)
    loop_samples: int = 0
    loop: Counter[str] = field(default_factory=Counter)            # category -> samples
    groups: dict[str, Counter[str]] = field(default_factory=dict)  # thread group -> category -> samples
    group_threads: dict[str, int] = field(default_factory=dict)    # thread group -> threads seen
    top_cum: list[tuple[str, int]] = field(default_factory=list)   # loop thread, busy samples
    top_self: list[tuple[str, int]] = field(default_factory=list)  # all threads, busy samples
    busy_loop: int = 0            # loop samples not idle
    busy_all: int = 0             # samples of all threads neither idle nor waiting
    handlers: dict[str, Counter[str]] = field(default_factory=dict)  # loop: FUSE handler -> category -> samples
    statements: int | None = None  # SQL statements the volume's embedded server ran (None: not embedded)
    commits: int | None = None     # of which COMMIT


def summarize(stacks: list[Stack], row: RowProfile) -> RowProfile:
    """Fill ``row``'s sample counts from the raw stacks of its run."""
    threads = {s.thread for s in stacks}
    loops = {t for t in threads if is_loop_thread(stacks, t)}
    if not loops:   # no trio frame sampled at all: the daemon's main thread runs it
        loops = {t for t in threads if t.endswith(": MainThread")}
    cum: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    seen: dict[str, set[str]] = {}
    for s in stacks:
        loop = s.thread in loops
        cat = classify(s.frames, loop)
        if loop:
            row.loop_samples += s.count
            row.loop[cat] += s.count
            if cat not in NOT_BUSY:
                handler = next((f.split(" ", 1)[0].split(".", 1)[1] for f in s.frames
                                if f.startswith("CasOperations.")), OUTSIDE)
                if handler == OUTSIDE and any(f.startswith("Observer.") for f in s.frames):
                    handler = OBSERVER
                row.handlers.setdefault(handler, Counter())[cat] += s.count
            if cat not in NOT_BUSY:
                row.busy_loop += s.count
                for k in {frame_key(f) for f in s.frames}:
                    if k.endswith(".py)") and not _PLUMBING.search(k):
                        cum[k] += s.count
        else:
            g = thread_group(s.thread)
            row.groups.setdefault(g, Counter())[cat] += s.count
            seen.setdefault(g, set()).add(s.thread)
        if cat not in WAITS:
            row.busy_all += s.count
            leaf = next((frame_key(f) for f in reversed(s.frames) if not f.startswith("0x")), "?")
            self_[leaf] += s.count
    row.group_threads = {g: len(t) for g, t in seen.items()}
    row.top_cum = cum.most_common(TOP_N)
    row.top_self = self_.most_common(TOP_N)
    return row


OUTSIDE = "(no handler)"   # loop samples outside any FUSE handler: writeback tick, trio, pyfuse3
OBSERVER = "(observer)"    # fusefront/observe.py around a handler: audit path, metrics


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


def format_row(row: RowProfile) -> list[str]:
    """The report lines of one row's profile."""
    rate = row.ops / row.seconds if row.seconds > 0 else 0.0
    lines = [(f"{row.key}: {row.label}: {rate:,.1f} {row.unit}s/s under the profiler ({row.seconds:.2f} s, "
             f"{row.ops:,} {row.unit}s); CPU: daemon {row.cpu_daemon:.2f} s, its children (mariadbd) "
             f"{row.cpu_children:.2f} s; {row.loop_samples} samples of the trio loop thread")]
    if row.statements is not None and row.ops:
        lines.append(f"  MySQL: {row.statements:,} statements ({row.statements / row.ops:.3g} per {row.unit}), "
                     f"{row.commits or 0:,} COMMIT")
    if not row.loop_samples:
        return lines + ["  (no samples of the trio loop thread)"]
    per_sample = row.seconds / row.loop_samples      # s of wall time per sample of one thread
    cells = []
    for cat in CATEGORIES:
        n = row.loop.get(cat, 0)
        if n:
            ms_per_op = n * per_sample * 1000 / row.ops if row.ops else 0.0
            cells.append(f"{cat} {_pct(n, row.loop_samples)} ({ms_per_op:.3g} ms/{row.unit})")
    lines.append("  trio loop thread, share of the row's time (ms per " + row.unit + "): " + ", ".join(cells))
    by_handler = sorted(row.handlers.items(), key=lambda kv: -sum(kv[1].values()))
    if by_handler:
        parts = []
        for h, cats in by_handler[:TOP_N]:
            top = ", ".join(f"{c} {_pct(n, row.loop_samples)}" for c, n in cats.most_common(3))
            parts.append(f"{h} {_pct(sum(cats.values()), row.loop_samples)} ({top})")
        lines.append("  trio loop thread by FUSE handler, share of the row's time: " + "; ".join(parts))
    for g in sorted(row.groups, key=lambda g: -sum(n for c, n in row.groups[g].items() if c not in WAITS)):
        busy = {c: n for c, n in row.groups[g].items() if c not in WAITS}
        waits = {c: n for c, n in row.groups[g].items() if c in WAITS - NOT_BUSY}
        if not busy and not waits:
            continue
        parts = [f"{c} {n * per_sample:.2f} s" for c, n in sorted(busy.items(), key=lambda kv: -kv[1])]
        parts += [f"{c} {n * per_sample:.2f} s" for c, n in sorted(waits.items(), key=lambda kv: -kv[1])]
        lines.append(f"  thread {g} (x{row.group_threads.get(g, 1)}), busy: " + ", ".join(parts))
    if row.top_cum:
        lines.append(f"  top cumulative Python functions, trio loop thread (% of its {row.busy_loop} non-idle samples):")
        lines += [f"    {_pct(n, row.busy_loop):>6}  {k}" for k, n in row.top_cum]
    if row.top_self:
        lines.append(f"  top self, all threads (% of {row.busy_all} samples running, not waiting):")
        lines += [f"    {_pct(n, row.busy_all):>6}  {k}" for k, n in row.top_self]
    return lines


# ------------------------------------------------------------------ the daemon and py-spy


def find_py_spy() -> str | None:
    """The py-spy executable: next to this interpreter (a venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    if here.exists():
        return str(here)
    return shutil.which("py-spy")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time (s) of process ``pid`` (/proc/PID/stat fields 14, 15; proc(5)),
    0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_counters(data_home: Path, volume: str) -> tuple[int, int] | None:
    """(Questions, Com_commit) of the volume's embedded MariaDB server (SHOW GLOBAL
    STATUS; MariaDB docs "Server Status Variables"), or None when the volume has none
    (``--meta``: a shared server counts other clients' statements too). The SHOW
    itself counts as one question."""
    from cas.db.server import socket_path_for
    run_dir = data_home / "casfs" / volume / "run"
    sock = socket_path_for(run_dir) if run_dir.is_dir() else None
    if sock is None or not sock.exists():
        return None
    import pymysql
    conn = pymysql.connect(unix_socket=str(sock), user="root", password="", connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions', 'Com_commit')")
            got = {str(k): int(v) for k, v in cur.fetchall()}
    finally:
        conn.close()
    return got.get("Questions", 0), got.get("Com_commit", 0)


def child_pids(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (field 4 of /proc/PID/stat)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(name))
    return out


class Spy:
    """py-spy attached to ``pid`` from ``__enter__`` (once it samples) to ``__exit__``
    (SIGINT to our own py-spy process, which then writes ``out``)."""

    def __init__(self, exe: str, pid: int, out: Path, rate: int) -> None:
        self.cmd = [exe, "record", "--pid", str(pid), "--threads", "--idle", "--native",
                    "--format", "raw", "--rate", str(rate), "--output", str(out)]
        self.out = out
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + SPY_START_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            line = self.proc.stdout.readline() if ready else ""
            if line:
                self.log.append(line.strip())
                if "Sampling process" in line:
                    return self
                continue
            if self.proc.poll() is not None or left <= 0:
                self._end()
                raise RuntimeError("py-spy did not start sampling: " + " | ".join(self.log[-5:]))

    def _end(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)   # our own child, by its pid
        try:
            rest, _ = self.proc.communicate(timeout=SPY_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        self.log += (rest or "").strip().splitlines()
        self.proc = None

    def __exit__(self, *exc: object) -> None:
        self._end()

    def stacks(self) -> list[Stack]:
        """The samples written (RuntimeError when py-spy wrote nothing)."""
        try:
            return parse_raw(self.out.read_text(errors="replace"))
        except OSError as e:
            raise RuntimeError(f"py-spy wrote no profile ({e}): " + " | ".join(self.log[-5:])) from None


# ------------------------------------------------------------------------- the pass


class PidCasfs(CasfsTarget):
    """A casfs target that remembers its mount daemon's pid (from `casfs mount`'s
    "daemon pid N" line), so that py-spy can attach to it."""

    pid = 0

    def _mount(self, *extra: str) -> None:
        r = self._cli("mount", str(self.mp), "bench", *extra)
        if r.returncode != 0:
            raise RuntimeError(f"casfs mount failed: {self._why(r)}")
        m = re.search(rb"daemon pid (\d+)", r.stderr or b"")
        if m is None:
            raise RuntimeError(f"casfs mount did not name its daemon's pid: {self._why(r)}")
        self.pid = int(m.group(1))
        wait_mounted(self.mp, timeout=10)


def _tree_for(scratch: Path, data: BenchData) -> Path:
    """The tree of the cp -a, ls -lR and read-all rows: the small-file rows' (--small-files),
    the copy row's (--extra), else a snapshot of the standard library made now."""
    if data.small is not None:
        return data.small.tree
    if data.tree is not None:
        return data.tree
    import sysconfig
    tree = scratch / "prof-tree"
    shutil.copytree(sysconfig.get_paths()["stdlib"], tree, symlinks=True, ignore=TREE_IGNORED)
    return tree


def profile_rows(scratch: Path, data: BenchData, args: argparse.Namespace,
                 progress: Callable[[str], None]) -> list[str]:
    """The ``--profile`` pass: the profiled rows on one fresh casfs volume under
    ``scratch/profile`` (made and removed here); returns the report lines. Raises
    RuntimeError when py-spy is missing or cannot attach."""
    exe = find_py_spy()
    if exe is None:
        raise RuntimeError("py-spy not found (pip install py-spy)")
    version = subprocess.run([exe, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout.strip()
    rate = args.profile_rate
    raw_dir: Path | None = args.profile_dir
    sub = scratch / "profile"
    sub.mkdir()
    tree = _tree_for(scratch, data)
    tree_files, _ = count_files(tree)
    tree_entries = sum(len(d) + len(f) for _, d, f in os.walk(tree))
    target = PidCasfs(sub, args.chunk_size, args.casfs_init_arg, args.casfs_timeout)
    rows: list[RowProfile] = []
    errors: list[str] = []

    def run(key: str, label: str, ops: int, unit: str, body: Callable[[], object]) -> None:
        progress(f"--profile: {label}")
        out = (raw_dir or sub) / f"{key}.raw"
        pid = target.pid
        kids = child_pids(pid)
        sql0 = server_counters(target.data_home, "bench")
        cpu0, kcpu0 = cpu_seconds(pid), sum(cpu_seconds(k) for k in kids)
        with Spy(exe, pid, out, rate) as spy:
            t0 = time.perf_counter()
            body()
            seconds = time.perf_counter() - t0
        row = RowProfile(key, label, ops, unit, seconds, cpu_seconds(pid) - cpu0,
                         sum(cpu_seconds(k) for k in kids) - kcpu0)
        sql1 = server_counters(target.data_home, "bench")
        if sql0 is not None and sql1 is not None:
            row.statements, row.commits = sql1[0] - sql0[0] - 1, sql1[1] - sql0[1]
        rows.append(summarize(spy.stacks(), row))

    try:
        workdir = target.start()
        size_mib = len(data.blocks)
        big1, big2 = workdir / "big1", workdir / "big2"
        run("write_new", f"seq write {size_mib} MiB, new data + fsync", size_mib, "MiB",
            lambda: bench_write(big1, data.blocks))
        run("write_dup", f"seq write {size_mib} MiB, same data again + fsync", size_mib, "MiB",
            lambda: bench_write(big2, data.blocks))
        target.make_cold(big1, data.size)
        run("read_cold", f"seq read {size_mib} MiB, cold", size_mib, "MiB",
            lambda: bench_read(big1, data.size, bytearray(MiB)))
        (workdir / "small").mkdir()
        run("create", f"create {data.files} x 4 KiB files + fsync dir", data.files, "file",
            lambda: bench_create(workdir / "small", data.files, data.small_payload))
        (workdir / "copies").mkdir()
        run("copy", f"cp -a of the tree twice (2 x {tree_files} files)", 2 * tree_files, "file",
            lambda: bench_copy(tree, workdir / "copies", tree_files))
        cold_tree = workdir / "copies" / "copy1"
        target.make_tree_cold(tree, cold_tree)
        env = dict(os.environ, LC_ALL="C")
        run("lsr_cold", f"ls -lR of the tree ({tree_entries} entries), cold", tree_entries, "entry",
            lambda: subprocess.run(["ls", "-lR", str(cold_tree)], stdout=subprocess.DEVNULL, env=env,
                                   check=True, timeout=3600))
        target.make_tree_cold(tree, cold_tree)
        run("readall_cold", f"read every file of the tree ({tree_files} files), cold", tree_files, "file",
            lambda: read_every_file(cold_tree))
    except Exception as e:  # noqa: BLE001 - report the rows done and the error
        errors.append(f"--profile: error after {len(rows)} rows: {type(e).__name__}: {e}")
    finally:
        with no_interrupts():
            target.stop()
    lines = ["", (f"profile of the casfs daemon per row ({version}, --native --idle --threads at {rate} Hz; "
                 f"one fresh volume; tree {tree} with {tree_files} files):"), *errors]
    for row in rows:
        lines += format_row(row)
    if raw_dir is not None:
        lines.append(f"raw stacks (collapsed, for flamegraph.pl or speedscope): {raw_dir}/ROW.raw")
    return lines
