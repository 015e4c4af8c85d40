"""Metadata load per operation, what one MySQL server sustains, Drive limits for N machines.

Usage::

    python -m tools.bench.scaling [--files 300] [--mib 16] [--workers 1,2,4,8] [--seconds 5]
                                  [--machines 1,2,4,8,16,32] [--skip-ops] [--skip-load] [--no-audit-off]
                                  [--workdir DIR] [--out FILE] [--quiet]

Everything runs against one MariaDB server this script starts in its scratch directory
(:class:`cas.db.server.EmbeddedServer`, the kind the tests and embedded volumes use: unix
socket, ``innodb_flush_log_at_trx_commit`` at its default 1, i.e. one redo-log flush per
COMMIT), and it prints four tables (docs/scaling.md holds a run of them):

1. **Statements per operation** on a real mount of a volume on that server (``casfs init
   --meta``): the server's status counters (``SHOW GLOBAL STATUS``: ``Questions`` and the
   ``Com_*`` counters, MariaDB "Server Status Variables") read before and after a loop of
   FILES operations (or MIB MiB) through the mount, divided by the operations. PyMySQL
   sends one statement per round trip, so statements are round trips. Operations: create
   (empty file, ``O_CREAT|O_EXCL`` + close) and create + 4 KiB write + close, each loop
   ended by ``fsync`` of the directory (its COMMIT counted); sequential write of new data
   + fsync (per MiB); after a remount, open + close of each 4 KiB file (cold: the names
   are not known yet), the same again (cached), a sequential read (cold, per MiB), the
   same after ``posix_fadvise(DONTNEED)`` so that every read reaches the daemon again and
   is served from its RAM chunk cache (per MiB = per 1 MiB chunk), ``stat`` of each file,
   then after another remount ``ls -l`` of the directory (cold and again, per entry),
   rename and unlink of each file + fsync of the directory. An idle pause gives the
   mount's background statements per second. Runs once with the default mount and once
   with ``--audit off`` (the audit log resolves paths for its records).
   Beside the measured counts: what a **shared** mount adds per operation at each
   consistency level, **computed** from the lead's design of shared mode
   (docs/sharing.md: change-log rows in each transaction, no negative answers from RAM,
   creates written one by one, the poll before open at ``session``, a change-log read
   before every lookup, getattr and open at ``strong``), not measured: this branch has no
   shared mode yet.
2. **Transactions per second of one server**: N worker processes (N from ``--workers``),
   each with one connection (:class:`cas.db.database.Database`), run the typed layer's
   transactions for SECONDS each: a create as a shared mount writes it (one transaction:
   :class:`cas.db.namespace.HeldCreates` with one create = INSERT inode, INSERT dentry,
   UPDATE parent; plus one INSERT of two ``changes`` rows; COMMIT), in a directory of its
   own and then all in one directory; a lookup (:func:`cas.db.namespace.lookup_rows`, one
   statement); a lookup after a change-log poll (what an open costs at ``session`` and a
   lookup at ``strong``). Processes, not threads: PyMySQL is pure Python and threads of
   one process share one GIL, which would measure the client, not the server.
3. **Machines one server carries**: from 1 and 2, for M machines (``--machines``): the
   background statements of M mounts (heartbeat every 5 s, change-log poll at the level's
   period) and the creates/s and opens/s left for all of them. Computed.
4. **Drive limits for M machines** uploading to one folder under one account: computed from
   the cloud tier's pack size and upload request size (:class:`cas.tier.cloud.CloudConfig`)
   and the Drive API's documented per-user limits (:data:`DRIVE_LIMITS`).

The script only measures and prints. Every mount it makes it unmounts, every process it
starts it ends by pid (also on errors and Ctrl-C), and it removes its scratch directory.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import random
import shutil
import signal
import stat as S
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pymysql

from cas.chunk.store import fsync_dir
from tools.bench import (MiB, child_env, force_unmount, is_fuse_mounted, machine_info, no_interrupts,
                         sigterm_to_interrupt, wait_mounted, warn)

SMALL = 4096                # bytes of each small file
DB_OPS = "scaling_ops"      # database of the measured volume
DB_LOAD = "scaling_load"    # database of the load generator
LEVELS = ("eventual", "session", "strong")
HEARTBEAT_S = 5.0           # a mount's session heartbeat period (docs/sharing.md)
POLL_S = {"eventual": 10.0, "session": 1.0, "strong": 1.0}   # change-log poll period per level
POLL_WINDOW_S = 3.0         # seconds of change log each poll re-reads (the load generator's poll too)
COUNTED = ("select", "insert", "update", "delete", "commit", "savepoint", "begin")


# ----------------------------------------------------------------------------- the server


@contextmanager
def scratch_server(d: Path) -> Iterator[Any]:
    """A MariaDB server of the embedded kind (cas.db.server) with its datadir under ``d``;
    stopped at exit, and killed by its pid if it is still there."""
    from cas.db.server import EmbeddedServer
    srv = EmbeddedServer(d / "data", d / "run", d / "log")
    srv.acquire()
    try:
        yield srv
    finally:
        with no_interrupts():
            srv.release()
            pid = srv.pid()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)


class Counters:
    """The server's global status counters, read on a connection of our own."""

    def __init__(self, sock: str) -> None:
        self.conn = pymysql.connect(unix_socket=sock, user="root", password="", autocommit=True)

    def read(self) -> dict[str, int]:
        """``Questions`` and every ``Com_*`` counter (name without ``Com_``)."""
        with self.conn.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS WHERE Variable_name = 'Questions' OR Variable_name LIKE 'Com\\_%'")
            got = {str(k): int(v) for k, v in cur.fetchall() if str(v).lstrip("-").isdigit()}
        return {("questions" if k == "Questions" else k[4:].lower()): v for k, v in got.items()}

    def variables(self) -> dict[str, str]:
        """The server settings that bound commits (version, redo-log flush, binary log)."""
        with self.conn.cursor() as cur:
            cur.execute("SHOW GLOBAL VARIABLES WHERE Variable_name IN ('version', "
                        "'innodb_flush_log_at_trx_commit', 'sync_binlog', 'log_bin', "
                        "'innodb_buffer_pool_size', 'transaction_isolation', 'tx_isolation')")
            return {str(k): str(v) for k, v in cur.fetchall()}

    def close(self) -> None:
        self.conn.close()


def diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counter deltas; the SHOW that read ``after`` counted itself (one question)."""
    d = {k: after[k] - before.get(k, 0) for k in after}
    d["questions"] -= 1
    d.pop("show_status", None)
    return d


# --------------------------------------------------------------------- 1. per operation


@dataclass
class OpRow:
    """One measured operation: ``n`` units (``unit``), the counter deltas, the wall time."""

    key: str
    label: str
    n: int
    unit: str
    counts: dict[str, int]
    seconds: float

    def per(self, name: str = "questions") -> float:
        return self.counts.get(name, 0) / self.n if self.n else 0.0


class Mount:
    """A volume on the scratch server, driven through the CLI in its own XDG_DATA_HOME."""

    def __init__(self, scratch: Path, url: str, mount_args: list[str]) -> None:
        self.mp = scratch / "mnt"
        self.env = child_env()
        self.env["XDG_DATA_HOME"] = str(scratch / "xdg")
        self.url = url
        self.mount_args = mount_args

    def cli(self, *args: str) -> None:
        r = subprocess.run([sys.executable, "-m", "tools.cli", *args], env=self.env, text=True,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"casfs {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-400:]}")

    def start(self) -> Path:
        Path(self.env["XDG_DATA_HOME"]).mkdir()
        self.mp.mkdir()
        self.cli("init", "--meta", self.url, "ops")
        self.mount()
        return self.mp

    def mount(self) -> None:
        self.cli("mount", *self.mount_args, str(self.mp), "ops")
        wait_mounted(self.mp, timeout=30)

    def umount(self) -> None:
        if is_fuse_mounted(self.mp):
            try:
                self.cli("umount", str(self.mp))
            finally:
                if is_fuse_mounted(self.mp):
                    force_unmount(self.mp)

    def remount(self) -> None:
        self.umount()
        self.mount()


def _create_empty(d: Path, n: int) -> None:
    for i in range(n):
        os.close(os.open(d / f"f{i:05d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    fsync_dir(d)


def _create_small(d: Path, n: int, payload: bytes) -> None:
    for i in range(n):
        fd = os.open(d / f"f{i:05d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, payload[i * SMALL:(i + 1) * SMALL])
        finally:
            os.close(fd)
    fsync_dir(d)


def _write(path: Path, mib: int) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        for _ in range(mib):
            os.write(fd, os.urandom(MiB))
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path, drop: bool) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if drop:   # clean pages go: every read reaches the daemon again (posix_fadvise(2))
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, MiB):
            pass
    finally:
        os.close(fd)


def _open_each(d: Path, names: list[str]) -> None:
    for name in names:
        os.close(os.open(d / name, os.O_RDONLY))


def _stat_each(d: Path, names: list[str]) -> None:
    for name in names:
        os.stat(d / name)


def _ls(d: Path) -> None:
    subprocess.run(["ls", "-l", str(d)], stdout=subprocess.DEVNULL, env=dict(os.environ, LC_ALL="C"),
                   check=True, timeout=600)


def _rename_each(d: Path, names: list[str]) -> None:
    for name in names:
        os.rename(d / name, d / ("g" + name[1:]))
    fsync_dir(d)


def _unlink_each(d: Path, names: list[str]) -> None:
    for name in names:
        os.unlink(d / ("g" + name[1:]))
    fsync_dir(d)


IDLE_S = 3.0   # seconds of the idle pause


def measure_ops(m: Mount, counters: Counters, files: int, mib: int,
                progress: Callable[[str], None]) -> list[OpRow]:
    """Part 1 on a fresh volume (``m`` not started yet): the rows in order; the mount is
    left mounted (the caller unmounts it)."""
    rows: list[OpRow] = []

    def run(key: str, label: str, n: int, unit: str, body: Callable[[], object]) -> None:
        progress(f"statements per operation: {label}")
        before = counters.read()
        t0 = time.perf_counter()
        body()
        seconds = time.perf_counter() - t0
        rows.append(OpRow(key, label, n, unit, diff(before, counters.read()), seconds))

    mp = m.start()
    e, s, big = mp / "e", mp / "s", mp / "big"
    for d in (e, s):
        d.mkdir()
    fsync_dir(mp)
    names = [f"f{i:05d}" for i in range(files)]
    payload = os.urandom(SMALL * files)
    run("create", "create (empty) + close; fsync dir", files, "file", lambda: _create_empty(e, files))
    run("create4k", "create + write 4 KiB + close; fsync dir", files, "file", lambda: _create_small(s, files, payload))
    run("write", f"write {mib} MiB new data + fsync", mib, "MiB", lambda: _write(big, mib))
    m.remount()
    run("open_cold", "open + close, cold (after a remount)", files, "open", lambda: _open_each(s, names))
    run("open_cached", "open + close, cached (again)", files, "open", lambda: _open_each(s, names))
    run("read_cold", f"read {mib} MiB, cold", mib, "MiB", lambda: _read(big, drop=False))
    run("read_cached", f"read {mib} MiB, chunks in the RAM cache", mib, "MiB", lambda: _read(big, drop=True))
    run("stat_cached", "stat, attributes cached", files, "stat", lambda: _stat_each(s, names))
    m.remount()
    run("ls_cold", "ls -l, cold (after a remount)", files, "entry", lambda: _ls(s))
    run("ls_warm", "ls -l, again", files, "entry", lambda: _ls(s))
    run("rename", "rename; fsync dir", files, "rename", lambda: _rename_each(s, names))
    run("unlink", "unlink; fsync dir", files, "unlink", lambda: _unlink_each(s, names))
    run("idle", f"idle mount ({IDLE_S:.0f} s)", int(IDLE_S), "s", lambda: time.sleep(IDLE_S))
    return rows


@dataclass(frozen=True)
class SharedAdd:
    """What a shared mount adds to one operation, per level (statements per unit), and why.
    ``bodies``: the add also counts per transaction body the operation ran (measured: its
    SAVEPOINTs), each body writing one INSERT of change-log rows and, for a flush, one
    ``SELECT ... FOR UPDATE`` of the manifest rows it replaces (``per_body`` statements)."""

    eventual: float
    session: float
    strong: float
    why: str
    per_body: float = 0.0


#: per operation key: the additions of shared mode (docs/sharing.md), computed, not measured
SHARED_ADDS: dict[str, SharedAdd] = {
    "idle": SharedAdd(1 / HEARTBEAT_S + 1 / POLL_S["eventual"], 1 / HEARTBEAT_S + 1 / POLL_S["session"],
                      1 / HEARTBEAT_S + 1 / POLL_S["strong"],
                      "per second and mount: the heartbeat (every 5 s) and the change-log poll (10 s / 1 s / 1 s)"),
    "create": SharedAdd(6, 6, 7, "the kernel's LOOKUP of the new name reaches MySQL (no negative answer from RAM): "
                        "+1; the create is its own body (SAVEPOINT, INSERT inode, INSERT dentry, UPDATE parent) "
                        "instead of a share of a batch: +4; its change-log INSERT: +1; strong: the lookup "
                        "reads the change log first: +1"),
    "create4k": SharedAdd(8, 9, 10, "as create (+6), and the flush at close: its change-log INSERT and "
                          "its SELECT ... FOR UPDATE of the manifest rows it replaces: +2; session and "
                          "strong: close commits the group: +1 COMMIT; strong: +1 change-log read at lookup"),
    "write": SharedAdd(0, 0, 0, "per flush body (its SAVEPOINTs): a change-log INSERT and a SELECT ... FOR "
                       "UPDATE of the manifest rows it replaces; session and strong: +1 COMMIT at close "
                       "(per file, not per MiB)", per_body=2),
    "open_cold": SharedAdd(0, 1, 2, "session: open polls the change log first: +1; strong: the lookup "
                           "and the open each read the change log first: +2"),
    "open_cached": SharedAdd(0, 1, 2, "session: the poll before open: +1 (and a LOOKUP again once the "
                             "1 s kernel entry timeout passed); strong: kernel timeouts 0, so the LOOKUP "
                             "reaches the mount again: change-log read at lookup and at open: +2"),
    "read_cold": SharedAdd(0, 0, 0, "none for chunks of this machine's store; a chunk another machine wrote "
                           "costs its pack location (one SELECT) and a ranged Drive GET"),
    "read_cached": SharedAdd(0, 0, 0, "none: reads of chunks in RAM run no SQL at any level"),
    "stat_cached": SharedAdd(0, 0, 1, "eventual/session: none within the kernel attribute timeout (10 s / 1 s), "
                             "then a GETATTR answered from RAM; strong: every stat reaches the mount and "
                             "reads the change log first: +1"),
    "ls_cold": SharedAdd(0, 0, 1, "the listing itself is unchanged; strong: ls -l's lstat of each entry "
                         "reaches the mount (timeouts 0) and reads the change log: +1 per entry"),
    "ls_warm": SharedAdd(0, 0, 1, "as ls_cold"),
    "rename": SharedAdd(2, 2, 4, "the LOOKUP of the target name reaches MySQL (+1), a change-log INSERT (+1); "
                        "strong: both LOOKUPs read the change log first (+2)"),
    "unlink": SharedAdd(1, 1, 2, "a change-log INSERT (+1; the rows freed are read FOR UPDATE already); "
                        "strong: the LOOKUP reads the change log first (+1)"),
}


def shared_estimate(row: OpRow, level: str) -> float:
    """Statements per unit of ``row`` on a shared mount at ``level``: measured + computed adds."""
    add = SHARED_ADDS.get(row.key)
    if add is None:
        return row.per()
    extra = {"eventual": add.eventual, "session": add.session, "strong": add.strong}[level]
    return row.per() + extra + add.per_body * row.per("savepoint")


def format_ops(rows: list[OpRow], audit_off: list[OpRow] | None) -> list[str]:
    """The table of part 1."""
    off = {r.key: r for r in audit_off or []}
    head = ["operation", "per", "stmts", *(["audit off"] if audit_off else []), "SELECT", "INSERT", "UPDATE",
            "DELETE", "COMMIT", "SAVEPOINT", "other", "ms/op", *(f"shared {lv}*" for lv in LEVELS)]
    table = [head]
    for r in rows:
        named = sum(r.counts.get(c, 0) for c in COUNTED if c != "begin")
        other = r.counts.get("questions", 0) - named
        cells = [r.label, r.unit, f"{r.per():.3g}"]
        if audit_off:
            o = off.get(r.key)
            cells.append(f"{o.per():.3g}" if o else "-")
        cells += [f"{r.per(c):.3g}" for c in ("select", "insert", "update", "delete", "commit", "savepoint")]
        cells += [f"{other / r.n:.3g}" if r.n else "-", f"{1000 * r.seconds / r.n:.3g}" if r.key != "idle" else "-"]
        cells += [f"{shared_estimate(r, lv):.3g}" for lv in LEVELS]
        table.append(cells)
    out = _table(table)
    out.append("stmts = statements (= round trips) the server received per unit, everything the mount sent "
               "(Questions; the counter read itself excluded); idle: per second.")
    out.append("* computed, not measured: measured + what shared mode adds per the design (docs/sharing.md):")
    for k, add in SHARED_ADDS.items():
        out.append(f"  {k}: {add.why}")
    return out


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]) + " |"

    return [line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows[1:])]


# ------------------------------------------------------------------- 2. load generator

KINDS = {
    "create": "create, own directory (INSERT x2, UPDATE parent, INSERT changes, COMMIT)",
    "create_hot": "create, all in one directory (same, one parent row)",
    "lookup": "lookup (one SELECT: dentry + inode + small manifest)",
    "lookup_poll": "change-log poll + lookup (an open at session, a lookup at strong)",
    "poll_busy": "change-log poll alone, its window holding 1,000 rows of other sessions",
}
BUSY_ROWS = 1000          # change-log rows in the window of the poll_busy kind
INO_BASE = 1_000_000      # first inode number the load generator creates
INO_SPAN = 100_000_000    # inode numbers per worker
HOT_DIR = 99              # inode of the one directory every worker creates in (create_hot)


@dataclass
class LoadResult:
    kind: str
    workers: int
    tx: int
    seconds: float
    p50_ms: float
    p99_ms: float
    min_worker_tx: int = 0     # transactions of the worker that ran the fewest
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tx / self.seconds if self.seconds else 0.0


def _dir_ino(w: int) -> int:
    return 100 + w


def setup_load_db(sock: str, workers: int) -> None:
    """The load generator's database: schema.sql, the root, a directory per worker and the
    hot directory (typed layer: HeldCreates)."""
    from cas.db.database import Database, MetaTarget, schema_statements
    from cas.db import namespace as ns
    admin = Database(MetaTarget(user="root", password="", database="", unix_socket=sock))
    try:
        admin.execute(f"DROP DATABASE IF EXISTS {DB_LOAD}")
        admin.execute(f"CREATE DATABASE {DB_LOAD} CHARACTER SET utf8mb4")
    finally:
        admin.close()
    db = Database(MetaTarget(user="root", password="", database=DB_LOAD, unix_socket=sock))
    try:
        for stmt in schema_statements():
            db.execute(stmt)
        now = time.time_ns()
        db.execute("INSERT INTO inodes (id, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns) "
                   "VALUES (1, %s, 0, 0, 2, %s, %s, %s)", (S.S_IFDIR | 0o755, now, now, now))
        held = ns.HeldCreates()
        for ino in [*(_dir_ino(w) for w in range(workers)), HOT_DIR]:
            held.add([ino, S.S_IFDIR | 0o755, 0, 0, 2, 0, 0, now, now, now], 1, f"d{ino}".encode(), None, now, 1)
        db.transaction(held.write)
    finally:
        db.close()


def fill_window(sock: str) -> None:
    """Put BUSY_ROWS change-log rows of a session no worker has into every poll's window
    (dated an hour ahead, so they stay in it for the phase)."""
    from cas.db.database import Database, MetaTarget
    db = Database(MetaTarget(user="root", password="", database=DB_LOAD, unix_socket=sock))
    try:
        rows = [(999, INO_BASE - 1 - i, 1, f"busy{i}".encode()) for i in range(BUSY_ROWS)]
        db.execute("INSERT INTO changes (session, inode, parent, name, at) VALUES "
                   + ", ".join(["(%s, %s, %s, %s, NOW(6) + INTERVAL 1 HOUR)"] * len(rows)),
                   [x for r in rows for x in r])
    finally:
        db.close()


def _load_worker(sock: str, kind: str, w: int, seconds: float, barrier: Barrier,
                 created: int, out: Any) -> None:
    """One worker process: one connection, ``kind`` transactions for ``seconds`` after all
    workers met at ``barrier``; puts (worker, transactions, seconds, latencies in ns,
    error or "") on ``out``. ``created``: how many files each worker's directory holds
    (the lookups pick among them)."""
    from cas.db.database import Database, MetaTarget
    from cas.db import namespace as ns
    lat: list[int] = []
    err = ""
    n = 0
    t_start = t_end = 0.0
    try:
        db = Database(MetaTarget(user="root", password="", database=DB_LOAD, unix_socket=sock))
        rng = random.Random(w)
        parent = HOT_DIR if kind == "create_hot" else _dir_ino(w)
        base = INO_BASE + w * INO_SPAN + (INO_SPAN // 2 if kind == "create_hot" else 0)

        def create(i: int) -> None:
            ino, name, now = base + i, f"w{w}-{kind}-{i}".encode(), time.time_ns()

            def body(cur: Any) -> None:
                held = ns.HeldCreates()
                held.add([ino, S.S_IFREG | 0o644, 0, 0, 1, 0, 0, now, now, now], parent, name, None, now, 0)
                held.write(cur)
                # the change-log rows a shared mount writes with it (cas/db/changes.py on main)
                cur.execute("INSERT INTO changes (session, inode, parent, name) VALUES (%s, %s, %s, %s), "
                            "(%s, %s, NULL, NULL)", (w + 1, ino, parent, name, w + 1, parent))
            db.transaction(body)

        def lookup(i: int) -> None:
            k = rng.randrange(created) if created else 0
            found = ns.lookup_rows(db, _dir_ino(w), f"w{w}-create-{k}".encode(), 4 * MiB)
            if created and found is None:
                raise RuntimeError(f"lookup of w{w}-create-{k} found nothing")

        def poll(i: int) -> None:
            db.query("SELECT id, session, inode, parent, name FROM changes "
                     "WHERE at >= NOW(6) - INTERVAL %s MICROSECOND AND session <> %s",
                     (int(POLL_WINDOW_S * 1e6), w + 1))

        def lookup_poll(i: int) -> None:
            poll(i)
            lookup(i)

        op = {"create": create, "create_hot": create, "lookup": lookup, "lookup_poll": lookup_poll,
              "poll_busy": poll}[kind]
        barrier.wait(timeout=120)
        t_start = time.monotonic()
        deadline = t_start + seconds
        while True:
            t0 = time.perf_counter_ns()
            op(n)
            lat.append(time.perf_counter_ns() - t0)
            n += 1
            if time.monotonic() >= deadline:
                break
        t_end = time.monotonic()
        db.close()
    except Exception as e:  # noqa: BLE001 - reported by the parent
        err = f"{type(e).__name__}: {e}"
    out.put((w, n, t_end - t_start, lat, err))


def run_load(sock: str, kind: str, workers: int, seconds: float, created: int) -> LoadResult:
    """``workers`` processes running ``kind`` for ``seconds``; aggregate transactions/s."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers)
    out = ctx.Queue()
    procs = [ctx.Process(target=_load_worker, args=(sock, kind, w, seconds, barrier, created, out), daemon=True)
             for w in range(workers)]
    results = []
    try:
        for p in procs:
            p.start()
        for _ in procs:
            results.append(out.get(timeout=seconds + 300))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()   # our own child, by its pid
                p.join()
    lat = sorted(x for r in results for x in r[3])
    errors = [f"worker {r[0]}: {r[4]}" for r in results if r[4]]
    secs = max((r[2] for r in results), default=0.0)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6 if lat else 0.0

    return LoadResult(kind, workers, sum(r[1] for r in results), secs, pct(0.50), pct(0.99),
                      min((r[1] for r in results), default=0), errors)


def measure_load(sock: str, worker_counts: list[int], seconds: float,
                 progress: Callable[[str], None]) -> list[LoadResult]:
    """Part 2: every kind at every worker count (creates first: the lookups read them)."""
    out: list[LoadResult] = []
    for n in worker_counts:
        setup_load_db(sock, max(worker_counts))
        created = 0
        for kind in KINDS:
            if kind == "poll_busy":
                fill_window(sock)
            progress(f"load: {kind}, {n} worker(s), {seconds:.0f} s")
            r = run_load(sock, kind, n, seconds, created)
            if kind == "create":
                created = r.min_worker_tx   # each worker's directory holds at least these
            out.append(r)
    return out


def format_load(results: list[LoadResult]) -> list[str]:
    counts = sorted({r.workers for r in results})
    table = [["transaction", *(f"{n} worker{'s' if n > 1 else ''}" for n in counts), "p50 / p99 ms at max"]]
    for kind, label in KINDS.items():
        by = {r.workers: r for r in results if r.kind == kind}
        top = by.get(counts[-1])
        table.append([label, *(f"{by[n].rate:,.0f}" if n in by else "-" for n in counts),
                      f"{top.p50_ms:.2f} / {top.p99_ms:.2f}" if top else "-"])
    out = _table(table)
    out.append("transactions/s of all workers together (one process and one connection each); "
               "every create is its own COMMIT.")
    out += [f"error: {r.kind} x{r.workers}: {e}" for r in results for e in r.errors]
    return out


# ------------------------------------------------------------ 3. machines one server carries


def best(results: list[LoadResult], kind: str) -> float:
    return max((r.rate for r in results if r.kind == kind), default=0.0)


def capacity(rows: list[OpRow], results: list[LoadResult], machines: list[int]) -> list[str]:
    """Part 3: for M machines at each level, the mounts' background statements, and the
    creates/s and opens/s the server carries for each machine when all M share it evenly
    (computed from parts 1 and 2); and the change-log rows the polls re-read when the
    machines create at the server's full rate."""
    per = {r.key: r for r in rows}
    reads = best(results, "lookup")              # single-statement transactions/s: the read capacity
    creates = best(results, "create")
    hot = best(results, "create_hot")
    if not reads or not creates or "open_cold" not in per:
        return ["(not computed: parts 1 and 2 are both needed)"]
    out = [f"read capacity {reads:,.0f} statements/s (best lookup rate), create capacity {creates:,.0f} creates/s "
           f"in own directories, {hot:,.0f} in one directory (best rates of part 2); the background of M mounts "
           "takes its share of the read capacity, the rest is split evenly between the machines and divided by "
           "the operation's statements at the level (part 1, shared columns). poll rows: the change-log rows all "
           f"polls re-read per second when the machines create at the full rate (2 rows per create, a "
           f"{POLL_WINDOW_S:.0f} s window re-read at every poll)."]
    table = [["machines", "level", "background stmts/s", "creates/s each", "creates/s each, one dir",
              "cold opens/s each", "cached opens/s each", "stats/s each", "poll rows/s"]]
    for m in machines:
        for lv in LEVELS:
            bg = m * shared_estimate(per["idle"], lv) if "idle" in per else 0.0
            left = max(0.0, 1 - bg / reads)
            cold = shared_estimate(per["open_cold"], lv)
            cached = shared_estimate(per["open_cached"], lv)
            stat = shared_estimate(per["stat_cached"], lv) if "stat_cached" in per else 0.0
            poll_rows = m / POLL_S[lv] * creates * 2 * POLL_WINDOW_S
            table.append([str(m), lv, f"{bg:,.1f}", f"{creates * left / m:,.0f}", f"{hot * left / m:,.0f}",
                          f"{reads * left / cold / m:,.0f}" if cold else "no SQL",
                          f"{reads * left / cached / m:,.0f}" if cached else "no SQL",
                          f"{reads * left / stat / m:,.0f}" if stat else "kernel cache",
                          f"{poll_rows:,.0f}"])
    return out + _table(table)


# ----------------------------------------------------------------------- 4. Drive limits

#: the Drive API's documented per-user limits (Google Drive API "Usage limits" page) and the
#: sustained file-creation rate Drive allows one user in practice
DRIVE_LIMITS = {
    "queries_per_min_user": 12_000,        # queries per 60 s per user (the documented per-user quota)
    "upload_bytes_per_day": 750 * 10**9,   # 750 GB a day of uploads per user (files.create/update)
    "creations_per_s": 2.5,                # files created per second and user Drive sustains (2-3)
}


def drive_table(machines: list[int]) -> list[str]:
    """Part 4: what one account's limits leave each of M machines (computed)."""
    from cas.tier.cloud import CloudConfig
    from cas.tier.drive import MULTIPART_MAX
    cfg = CloudConfig()
    pack, step = cfg.pack_size, cfg.upload_chunk
    requests = 1 + -(-pack // step) if pack > MULTIPART_MAX else 1
    day = DRIVE_LIMITS["upload_bytes_per_day"] / 86400 / MiB          # MiB/s averaged over a day
    by_creations = DRIVE_LIMITS["creations_per_s"] * pack / MiB         # MiB/s if every pack is full
    by_queries = DRIVE_LIMITS["queries_per_min_user"] / 60 / requests * pack / MiB
    out = [f"pack {pack / MiB:.0f} MiB, uploaded in {requests} requests ({step / MiB:.0f} MiB resumable steps), "
           f"pack age {cfg.pack_age_s:.0f} s; per account: {DRIVE_LIMITS['queries_per_min_user']:,} queries/min, "
           f"750 GB/day uploaded = {day:.1f} MiB/s averaged over a day, about "
           f"{DRIVE_LIMITS['creations_per_s']} file creations/s.",
           f"upload bound per account: {min(day, by_creations, by_queries):.1f} MiB/s sustained (daily cap); "
           f"{min(by_creations, by_queries):.0f} MiB/s in bursts (file creations of full packs); "
           f"the query quota alone would allow {by_queries:,.0f} MiB/s."]
    table = [["machines", "MiB/s each, day-average", "MiB/s each, burst (full packs)",
              "min pack age for small writes (s)", "GiB/day each"]]
    for m in machines:
        table.append([str(m), f"{day / m:.2f}", f"{by_creations / m:.1f}",
                      f"{m / DRIVE_LIMITS['creations_per_s']:.1f}", f"{750 / m / 1.073741824:.0f}"])
    out += _table(table)
    out.append("min pack age: a machine that writes a little and uploads a pack every AGE seconds creates "
               "1/AGE files/s; M machines stay under the creation rate when AGE >= M / "
               f"{DRIVE_LIMITS['creations_per_s']} s.")
    return out


# --------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=300, help="files per operation loop (default 300)")
    p.add_argument("--mib", type=int, default=16, help="MiB of the write and read rows (default 16)")
    p.add_argument("--workers", default="1,2,4,8", help="load generator worker counts (default 1,2,4,8)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per load phase (default 5)")
    p.add_argument("--machines", default="1,2,4,8,16,32", help="machine counts of the computed tables")
    p.add_argument("--skip-ops", action="store_true", help="leave out part 1 (the mount)")
    p.add_argument("--skip-load", action="store_true", help="leave out part 2 (the load generator)")
    p.add_argument("--no-audit-off", action="store_true", help="part 1 with the default mount only")
    p.add_argument("--workdir", type=Path, default=None, help="where the scratch directory goes")
    p.add_argument("--out", type=Path, help="also write the report to this file")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    args = p.parse_args(argv)
    try:
        args.workers = [int(x) for x in args.workers.split(",") if x.strip()]
        args.machines = [int(x) for x in args.machines.split(",") if x.strip()]
    except ValueError:
        p.error("--workers and --machines take comma-separated integers")
    if args.files < 1 or args.mib < 1 or args.seconds <= 0 or not args.workers or min(args.workers) < 1:
        p.error("--files, --mib, --seconds and --workers must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, sigterm_to_interrupt)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"scaling: {msg}", file=sys.stderr, flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="casfs-scaling-", dir=args.workdir))
    lines = machine_info(scratch)
    lines.append(f"load:    {os.getloadavg()[0]:.2f} (1 min load average at start)")
    rows: list[OpRow] = []
    rows_off: list[OpRow] = []
    load: list[LoadResult] = []
    errors: list[str] = []
    mounts: list[Mount] = []
    try:
        with scratch_server(scratch / "mariadb") as srv:
            sock = str(srv.socket)
            counters = Counters(sock)
            try:
                v = counters.variables()
                lines.append("server:  MariaDB " + v.get("version", "?") + ", innodb_flush_log_at_trx_commit="
                             + v.get("innodb_flush_log_at_trx_commit", "?") + ", log_bin=" + v.get("log_bin", "?")
                             + ", buffer pool " + f"{int(v.get('innodb_buffer_pool_size', '0')) / MiB:.0f} MiB"
                             + " (the embedded kind, cas.db.server; on this machine's disk)")
                if not args.skip_ops:
                    passes = [("ops", [], rows), ("ops-audit-off", ["--audit", "off"], rows_off)]
                    for sub, extra, into in passes[:1 if args.no_audit_off else 2]:
                        (scratch / sub).mkdir()
                        url = f"mysql://root@localhost/{DB_OPS}_{len(mounts)}?unix_socket={sock}"
                        m = Mount(scratch / sub, url, extra)
                        mounts.append(m)
                        try:
                            into += measure_ops(m, counters, args.files, args.mib, progress)
                        except Exception as e:  # noqa: BLE001 - report the rows done and the error
                            errors.append(f"part 1 ({sub}): {type(e).__name__}: {e}")
                        finally:
                            with no_interrupts():
                                m.umount()
                if not args.skip_load:
                    try:
                        load = measure_load(sock, args.workers, args.seconds, progress)
                    except Exception as e:  # noqa: BLE001
                        errors.append(f"part 2: {type(e).__name__}: {e}")
            finally:
                counters.close()
                with no_interrupts():   # while the server still runs: the unmounts commit
                    for m in mounts:
                        m.umount()
    finally:
        with no_interrupts():
            left = [m.mp for m in mounts if is_fuse_mounted(m.mp)]
            if left:
                warn(f"still mounted, not removing {scratch}: {left}")
            else:
                shutil.rmtree(scratch, ignore_errors=True)
    lines.append(f"params:  --files {args.files} --mib {args.mib} --workers {','.join(map(str, args.workers))} "
                 f"--seconds {args.seconds:g}")
    lines += ["", *errors]
    if rows:
        lines += ["1. statements per operation, one mount (this machine, this run):", *format_ops(rows, rows_off), ""]
    if load:
        lines += ["2. transactions/s of one server, N processes with one connection each:", *format_load(load), ""]
    if rows and load:
        lines += ["3. what one server carries for M machines (computed from 1 and 2):",
                  *capacity(rows, load, args.machines), ""]
    lines += ["4. Drive limits for M machines under one account (computed):", *drive_table(args.machines)]
    lines.append(f"finished {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    report = "\n".join(lines) + "\n"
    sys.stdout.write(report)
    if args.out:
        args.out.write_text(report)
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("scaling: interrupted", file=sys.stderr)
        sys.exit(130)
