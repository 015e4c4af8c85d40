"""``python -m tools.bench --two-mounts``: aggregate throughput of two mounts of one shared
volume against the same work on one mount (docs/scaling.md).

One MariaDB server of the embedded kind (:func:`tools.bench.scaling.scratch_server`) in the
scratch directory serves as the "external" server both sides share. Side A (its own
``XDG_DATA_HOME`` and ``XDG_RUNTIME_DIR``) makes the volume::

    casfs init --meta URL --shared [--chunk-size N] twom

side B, in another ``XDG_DATA_HOME``, joins it (its own local chunk store)::

    casfs join twom --meta URL

Rows, each run by two processes started together (a barrier) and timed from the first
start to the last end, amounts summed (aggregate):

* sequential write: each process writes SIZE MiB of new random data (1 MiB ``write()``
  calls) to a file of its own and ``fsync``\\ s it, MiB/s;
* create: each process creates FILES files of 4 KiB in a directory of its own and
  ``fsync``\\ s the directory, files/s.

Both processes on mount A alone ("one mount", side B unmounted), or one process on each
mount ("two mounts"), in the order one, two, two, one (drift on a shared machine cancels);
the best of each is printed with the ratio two mounts / one mount. Both mounts run on
this one machine: the ratio shows what the shared metadata server and the engine cost
two writers, not what two machines' CPUs would add.

Without ``casfs join`` (a casfs before shared volumes) it prints one line saying so and
exits 2. Everything it mounts it unmounts; the server it started it stops, by pid.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from cas.chunk.store import fsync_dir
from tools.bench import (MiB, SMALL_FILE_SIZE, _fmt, _ratio, _write_all, child_env, force_unmount, is_fuse_mounted,
                         machine_info, no_interrupts, wait_mounted, warn)

VOLUME = "twom"
ORDER = ("one", "two", "two", "one")   # ABBA: drift of a shared machine cancels; the best of each kind
DATABASE = "bench_two_mounts"


class Side:
    """One "machine": its XDG directories, its mountpoint, the CLI run in them."""

    def __init__(self, scratch: Path, name: str, timeout: float) -> None:
        self.root = scratch / name
        self.mp = self.root / "mnt"
        self.timeout = timeout
        self.env = child_env()
        self.env["XDG_DATA_HOME"] = str(self.root / "data")
        self.env["XDG_RUNTIME_DIR"] = str(self.root / "run")

    def make(self) -> None:
        for d in (self.root, self.mp, Path(self.env["XDG_DATA_HOME"])):
            d.mkdir(parents=True, exist_ok=True)
        Path(self.env["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, exist_ok=True)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "tools.cli", *args], env=self.env, text=True,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout)
        if check and r.returncode != 0:
            lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
            raise RuntimeError(f"casfs {' '.join(args)}: exit {r.returncode}" + (f": {lines[-1]}" if lines else ""))
        return r

    def mount(self) -> None:
        self.cli("mount", str(self.mp), VOLUME)
        wait_mounted(self.mp, timeout=30)

    def umount(self) -> None:
        if not is_fuse_mounted(self.mp):
            return
        try:
            self.cli("umount", str(self.mp))
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            warn(f"casfs umount {self.mp}: {e}")
        if is_fuse_mounted(self.mp):
            force_unmount(self.mp)


def join_available(env: dict[str, str]) -> bool:
    """Whether this casfs has ``casfs join`` (shared volumes)."""
    r = subprocess.run([sys.executable, "-m", "tools.cli", "join", "--help"], env=env, text=True,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    return r.returncode == 0


def _worker(kind: str, where: str, amount: int, barrier: Barrier, out: Any) -> None:
    """One process of a row: ``write`` ``amount`` MiB of new data to file ``where`` +
    fsync, or ``create`` ``amount`` 4 KiB files in directory ``where`` + fsync of it,
    after every process met at ``barrier``. Puts (start, end, amount, error) on ``out``,
    times from time.monotonic (one clock for all processes: CLOCK_MONOTONIC)."""
    t0 = t1 = 0.0
    err = ""
    try:
        if kind == "write":
            blocks = [os.urandom(MiB) for _ in range(amount)]
            barrier.wait(timeout=300)
            t0 = time.monotonic()
            fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for b in blocks:
                    _write_all(fd, b)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            payload = os.urandom(SMALL_FILE_SIZE * amount)
            d = Path(where)
            d.mkdir()
            names = [str(d / f"f{i:06d}") for i in range(amount)]
            barrier.wait(timeout=300)
            t0 = time.monotonic()
            view = memoryview(payload)
            for i, name in enumerate(names):
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    _write_all(fd, view[i * SMALL_FILE_SIZE:(i + 1) * SMALL_FILE_SIZE])
                finally:
                    os.close(fd)
            fsync_dir(d)
        t1 = time.monotonic()
    except Exception as e:  # noqa: BLE001 - reported by the parent
        err = f"{type(e).__name__}: {e}"
    out.put((t0, t1, amount, err))


def run_pair(kind: str, wheres: list[Path], amount: int) -> float:
    """Run ``kind`` in one process per entry of ``wheres`` at once; aggregate amount per
    second (MiB/s or files/s). Raises RuntimeError when a process failed."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(wheres))
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(kind, str(w), amount, barrier, out), daemon=True) for w in wheres]
    got = []
    try:
        for p in procs:
            p.start()
        for _ in procs:
            got.append(out.get(timeout=3600))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()   # our own child, by its pid
                p.join()
    errors = [g[3] for g in got if g[3]]
    if errors:
        raise RuntimeError("; ".join(errors))
    span = max(g[1] for g in got) - min(g[0] for g in got)
    return sum(g[2] for g in got) / span if span > 0 else 0.0


def two_mounts(args: argparse.Namespace) -> int:
    """``--two-mounts``: the report on stdout (and ``--out``); 0, 1 on a failed row, 2
    when this casfs has no ``casfs join``."""
    from tools.bench.scaling import scratch_server

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"bench: {msg}", file=sys.stderr, flush=True)

    if not join_available(child_env()):
        print("bench: --two-mounts needs `casfs join` (shared volumes), which this casfs does not have",
              file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="casfs-bench-2m-", dir=args.workdir))
    a, b = Side(scratch, "a", args.casfs_timeout), Side(scratch, "b", args.casfs_timeout)
    values: dict[tuple[str, str], float] = {}
    errors: list[str] = []
    try:
        with scratch_server(scratch / "mariadb") as srv:
            url = f"mysql://root@localhost/{DATABASE}?unix_socket={srv.socket}"
            a.make()
            b.make()
            progress("casfs init --shared on side A, casfs join on side B")
            a.cli("init", "--meta", url, "--shared", *(["--chunk-size", args.chunk_size] if args.chunk_size else []),
                  VOLUME)
            b.cli("join", VOLUME, "--meta", url)

            def wheres(kind: str, mounts: str, k: int) -> list[Path]:
                tag = f"{kind}-{mounts}-{k}"
                if mounts == "one":
                    return [a.mp / f"{tag}-0", a.mp / f"{tag}-1"]
                return [a.mp / f"{tag}-a", b.mp / f"{tag}-b"]

            try:
                a.mount()
                for k, mounts in enumerate(ORDER):
                    if mounts == "two" and not is_fuse_mounted(b.mp):
                        progress("mounting side B")
                        b.mount()
                    elif mounts == "one" and is_fuse_mounted(b.mp):
                        progress("unmounting side B")
                        b.umount()
                    for kind, amount in (("write", args.size_mib), ("create", args.files)):
                        progress(f"round {k + 1} of {len(ORDER)}: {kind}, "
                                 f"{'two processes on mount A' if mounts == 'one' else 'one process on each mount'}")
                        try:
                            got = run_pair(kind, wheres(kind, mounts, k), amount)
                            values[(kind, mounts)] = max(values.get((kind, mounts), 0.0), got)
                        except RuntimeError as e:
                            errors.append(f"{kind} on {mounts} mount(s), round {k + 1}: {e}")
            finally:
                with no_interrupts():   # while the server still runs: the unmounts commit
                    for side in (b, a):
                        side.umount()
    except Exception as e:  # noqa: BLE001 - report what was measured and the error
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        with no_interrupts():
            left = [str(s.mp) for s in (a, b) if is_fuse_mounted(s.mp)]
            if left:
                warn(f"still mounted, not removing {scratch}: {', '.join(left)}")
            else:
                shutil.rmtree(scratch, ignore_errors=True)
    labels = {"write": f"seq write, 2 x {args.size_mib} MiB new data + fsync (MiB/s, aggregate)",
              "create": f"create 2 x {args.files} x 4 KiB files + fsync dir (files/s, aggregate)"}
    table = [["workload", "one mount (2 processes)", "two mounts (1 process each)", "two / one"]]
    for kind, label in labels.items():
        one, two = values.get((kind, "one")), values.get((kind, "two"))
        table.append([label, _fmt(one), _fmt(two), _ratio(two, one)])
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = machine_info(Path(tempfile.gettempdir()) if args.workdir is None else args.workdir)
    lines += [f"params:  --two-mounts --size-mib {args.size_mib} --files {args.files}"
              + (f" --chunk-size {args.chunk_size}" if args.chunk_size else ""),
              "shared volume on one MariaDB server (embedded kind, this machine); side B joined with casfs join; "
              "both mounts on this machine, default consistency; rounds in the order one, two, two, one mount(s), "
              "the best of each", "", *errors]
    lines += ["| " + " | ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]) + " |"
              for r in table]
    lines.insert(len(lines) - len(table) + 1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    report = "\n".join(lines) + "\n"
    sys.stdout.write(report)
    if args.out:
        args.out.write_text(report)
    return 1 if errors else 0
