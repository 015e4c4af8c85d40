"""Scale benchmark: mount time, listing and idle memory of a volume with many files.

Usage::

    python -m tools.bench.scale [--files 1000000] [--per-dir 10000] [--cache-size 256MiB]
                                [--mounts 3] [--workdir DIR] [--data-home DIR] [--keep]
                                [--out FILE]

Two volumes with embedded MariaDB servers are created under a scratch
``XDG_DATA_HOME``: ``empty`` (just the root) and ``scale``, which gets FILES files
of 4 KiB in directories of PER-DIR entries (``d0000/f0000000`` ...). The files share
one chunk: a real one, written through a mount, whose refcount is raised by the
number of files, so the volume passes ``casfs fsck``. The rows are inserted with
multi-row INSERTs straight into ``inodes``, ``dentries`` and ``manifests`` while the
volume is not mounted (the mount holds the only writer's lock otherwise).

Measured for both volumes, in this order:

* ``casfs mount`` wall time until it returns (the mount is ready), the median of
  MOUNTS mounts, each after ``casfs umount`` (so each one also starts the volume's
  embedded MariaDB server, as a user's mount does);
* the mount daemon's VmRSS (``/proc/PID/status``; the pid comes from the mount
  registry) after 2 s idle; the MariaDB server's is printed beside it;
* ``ls`` and ``ls -l`` of one directory (``scale``: d0000, PER-DIR entries) right
  after a fresh mount, and the daemon's VmRSS after them;
* ``casfs find`` on the mounted ``scale`` volume (median of MOUNTS runs): a name glob
  in d0000, and a whole-volume xattr query (every 10th file gets ``user.project``, every
  100th inode with the value ``alpha``).

With ``--data-home`` an existing directory is used (and kept) and a ``scale``
volume already in it is measured without being filled again. Everything this
script mounts it unmounts; servers it leaves running it stops, by pid.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.bench import child_env, fusermount_u, is_fuse_mounted, sigterm_to_interrupt, warn

SEED_SIZE = 4096
BATCH = 20_000                 # rows per INSERT statement
REG_FILE = 0o100644
DIRECTORY = 0o040755


class Scale:
    """The scratch world: data home, volumes, mountpoints, and the CLI to drive them."""

    def __init__(self, data_home: Path, scratch: Path, cache_size: str) -> None:
        self.data_home = data_home
        self.scratch = scratch
        self.cache_size = cache_size
        self.env = child_env()
        self.env["XDG_DATA_HOME"] = str(data_home)
        self.mounted: set[Path] = set()

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "tools.cli", *args], env=self.env, text=True,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"casfs {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
        return r

    def mount(self, volume: str, mp: Path) -> float:
        """``casfs mount``; returns its wall time in seconds."""
        mp.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        self.mounted.add(mp)
        self.cli("mount", "--cache-size", self.cache_size, str(mp), volume)
        return time.perf_counter() - t0

    def umount(self, mp: Path) -> None:
        if is_fuse_mounted(mp):
            self.cli("umount", str(mp))
        self.mounted.discard(mp)

    def daemon_pid(self, mp: Path) -> int:
        from tools.cli.mountcmd import registry_file  # reads XDG_DATA_HOME, set by main()
        return int(json.loads(registry_file(mp).read_text())["pid"])

    def server_pid(self, volume: str) -> int | None:
        from cas.db.server import EmbeddedServer
        vol = self.data_home / "casfs" / volume
        return EmbeddedServer(vol / "mysql", vol / "run", vol / "log").pid()

    def cleanup(self) -> None:
        for mp in list(self.mounted):
            try:
                self.umount(mp)
            except Exception as e:  # noqa: BLE001 - go on cleaning up
                warn(f"umount {mp}: {e}")
                if is_fuse_mounted(mp):
                    fusermount_u(mp, lazy=True)
        for vol in ("empty", "scale"):
            pid = self.server_pid(vol) if (self.data_home / "casfs" / vol).exists() else None
            if pid is not None:
                _stop_pid(pid)


def _stop_pid(pid: int) -> None:
    from cas.db.server import pid_running
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while pid_running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_running(pid):
        os.kill(pid, signal.SIGKILL)


def rss_kib(pid: int | None) -> int | None:
    """VmRSS of ``pid`` in KiB (None if unknown)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------ filling


def fill(world: Scale, files: int, per_dir: int, progress: "Progress") -> None:
    """Create volume ``scale`` with ``files`` files of one shared 4 KiB chunk."""
    world.cli("init", "scale")
    mp = world.scratch / "seed-mnt"
    world.mount("scale", mp)
    (mp / "seed").write_bytes(os.urandom(SEED_SIZE))
    world.umount(mp)
    from cas.db.database import connect
    from cas.config.volume import open_volume
    meta = connect(open_volume("scale"))
    try:
        conn = meta.db.conn
        with conn.cursor() as cur:
            cur.execute("SELECT id, uid, gid FROM inodes WHERE id = 1")
            _, uid, gid = cur.fetchone()
            cur.execute("SELECT i.id FROM dentries d JOIN inodes i ON i.id = d.inode "
                        "WHERE d.parent = 1 AND d.name = 'seed'")
            seed = int(cur.fetchone()[0])
            cur.execute("SELECT chunk FROM manifests WHERE inode = %s", (seed,))
            chunk = bytes(cur.fetchone()[0]).hex()
            cur.execute("SELECT MAX(id) FROM inodes")
            base = int(cur.fetchone()[0])
        now = time.time_ns()
        ndirs = -(-files // per_dir)
        first_file = base + ndirs + 1

        def insert(sql_head: str, rows: list[str]) -> None:
            with conn.cursor() as cur:
                for i in range(0, len(rows), BATCH):
                    cur.execute(sql_head + ",".join(rows[i:i + BATCH]))

        conn.begin()
        cols = ("INSERT INTO inodes (id, mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns, "
                "data_bytes) VALUES ")
        insert(cols, [f"({base + 1 + d},{DIRECTORY},{uid},{gid},2,0,0,{now},{now},{now},0)"
                      for d in range(ndirs)])
        insert("INSERT INTO dentries (parent, name, inode) VALUES ",
               [f"(1,'d{d:04d}',{base + 1 + d})" for d in range(ndirs)])
        with conn.cursor() as cur:
            cur.execute("UPDATE inodes SET nlink = nlink + %s WHERE id = 1", (ndirs,))
        conn.commit()
        t0 = time.monotonic()
        step = 100_000
        for lo in range(0, files, step):
            hi = min(files, lo + step)
            conn.begin()
            insert(cols, [f"({first_file + i},{REG_FILE},{uid},{gid},1,{SEED_SIZE},0,{now},{now},{now},"
                          f"{SEED_SIZE})"
                          for i in range(lo, hi)])
            insert("INSERT INTO dentries (parent, name, inode) VALUES ",
                   [f"({base + 1 + i // per_dir},'f{i:07d}',{first_file + i})" for i in range(lo, hi)])
            insert("INSERT INTO manifests (inode, slot, chunk) VALUES ",
                   [f"({first_file + i},0,X'{chunk}')" for i in range(lo, hi)])
            with conn.cursor() as cur:
                cur.execute("UPDATE chunks SET refcount = refcount + %s WHERE id = X'" + chunk + "'",
                            (hi - lo,))
            conn.commit()
            progress(f"filled {hi:,} of {files:,} files ({time.monotonic() - t0:.0f} s)")
    finally:
        meta.close()
    (world.data_home / "scale.json").write_text(json.dumps({"files": files, "per_dir": per_dir}))


def fill_xattrs(world: Scale, progress: "Progress") -> int:
    """Give every 10th file of volume ``scale`` the xattr ``user.project``: ``alpha`` on
    every 100th inode, ``beta`` on the others (unless it has them already). Returns the
    number of ``alpha`` files, which `casfs find --xattr user.project=alpha` must print."""
    from cas.db.database import connect
    from cas.config.volume import open_volume
    meta = connect(open_volume("scale"))
    try:
        db = meta.db
        if not db.query("SELECT 1 FROM xattrs WHERE name = 'user.project' LIMIT 1"):
            progress("scale: setting user.project on every 10th file")
            db.execute("INSERT INTO xattrs (inode, name, value) SELECT id, 'user.project', "
                       "IF(id %% 100 = 0, 'alpha', 'beta') FROM inodes WHERE id %% 10 = 0 AND mode = %s",
                       (REG_FILE,))
        return int(db.query("SELECT COUNT(*) FROM xattrs WHERE name = 'user.project' AND value = 'alpha'")[0][0])
    finally:
        meta.close()


def measure_find(world: Scale, runs: int, progress: "Progress") -> dict[str, float | int | None]:
    """`casfs find` on the mounted scale volume (wall time of the command, median of
    ``runs``): a name glob in one directory (d0000, PER-DIR entries) and a whole-volume
    xattr query; with the number of paths each printed."""
    alpha = fill_xattrs(world, progress)
    mp = world.scratch / "scale-find-mnt"
    world.mount("scale", mp)
    out: dict[str, float | int | None] = {"find_xattr_expected": alpha}
    try:
        for key, args in (("find_name", ["d0000", "--name", "f00001*"]),
                          ("find_xattr", ["--xattr", "user.project=alpha"])):
            times = []
            for _ in range(runs):
                progress(f"scale: casfs find {' '.join(args)}")
                t0 = time.perf_counter()
                r = world.cli("find", "scale", *args)
                times.append(time.perf_counter() - t0)
            out[f"{key}_s"] = statistics.median(times)
            out[f"{key}_paths"] = len(r.stdout.splitlines())
    finally:
        world.umount(mp)
    return out


def _find_rows(f: dict[str, float | int | None] | None) -> list[str]:
    """Report rows of :func:`measure_find` (targets: < 1 s and < 5 s, issue 11)."""
    if not f:
        return []
    return [
        f"| {'find d0000 --name f00001* (%s paths) (s)' % f['find_name_paths']:<47} | {'-':>12} | {_fmt_s(f['find_name_s']):>12} |",
        f"| {'find --xattr user.project=alpha (%s) (s)' % f['find_xattr_paths']:<47} | {'-':>12} | {_fmt_s(f['find_xattr_s']):>12} |",
    ]


# ----------------------------------------------------------------------------- measuring


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"bench_scale: {msg}", file=sys.stderr, flush=True)


def measure(world: Scale, volume: str, listed: str | None, mounts: int,
            progress: Progress) -> dict[str, float | int | None]:
    mp = world.scratch / f"{volume}-mnt"
    out: dict[str, float | int | None] = {}
    times = []
    for k in range(mounts):
        progress(f"{volume}: mount {k + 1} of {mounts}")
        times.append(world.mount(volume, mp))
        if k + 1 < mounts:
            world.umount(mp)
    out["mount_s"] = statistics.median(times)
    out["mount_first_s"] = times[0]
    pid = world.daemon_pid(mp)
    time.sleep(2)
    out["rss_idle_kib"] = rss_kib(pid)
    out["mysqld_rss_kib"] = rss_kib(world.server_pid(volume))
    if listed is not None:
        d = mp / listed
        env = dict(os.environ, LC_ALL="C")
        for cmd, key in ((["ls"], "ls"), (["ls", "-l"], "ls_l")):
            progress(f"{volume}: {' '.join(cmd)} {listed}")
            t0 = time.perf_counter()
            r = subprocess.run([*cmd, str(d)], stdout=subprocess.PIPE, env=env, check=True, timeout=3600)
            out[f"{key}_s"] = time.perf_counter() - t0
            out[f"{key}_entries"] = len(r.stdout.splitlines()) - (1 if key == "ls_l" else 0)
        time.sleep(2)
        out["rss_after_ls_kib"] = rss_kib(pid)
    world.umount(mp)
    return out


def _fmt_s(v: float | int | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _fmt_mib(kib: float | int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def report(args: argparse.Namespace, res: dict[str, dict[str, float | int | None]], files: int,
           per_dir: int) -> str:
    e, s = res["empty"], res["scale"]
    lines = [
        f"date:    {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"system:  {platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"nproc={len(os.sched_getaffinity(0))}",
        f"params:  --files {files} --per-dir {per_dir} --cache-size {args.cache_size} --mounts {args.mounts}",
        "",
        "| measure                                         | empty volume | scale volume |",
        "|-------------------------------------------------|--------------|--------------|",
        f"| casfs mount, wall time (s, median)              | {_fmt_s(e['mount_s']):>12} | {_fmt_s(s['mount_s']):>12} |",
        f"| casfs mount, first of the run (s)               | {_fmt_s(e['mount_first_s']):>12} | {_fmt_s(s['mount_first_s']):>12} |",
        f"| daemon VmRSS, idle after mount (MiB)            | {_fmt_mib(e['rss_idle_kib']):>12} | {_fmt_mib(s['rss_idle_kib']):>12} |",
        f"| MariaDB server VmRSS (MiB)                      | {_fmt_mib(e['mysqld_rss_kib']):>12} | {_fmt_mib(s['mysqld_rss_kib']):>12} |",
        f"| {'ls of d0000 (%s entries) after mount (s)' % s.get('ls_entries', '-'):<47} | {'-':>12} | {_fmt_s(s.get('ls_s')):>12} |",
        f"| ls -l of d0000 (s)                              | {'-':>12} | {_fmt_s(s.get('ls_l_s')):>12} |",
        f"| daemon VmRSS after ls + ls -l (MiB)             | {'-':>12} | {_fmt_mib(s.get('rss_after_ls_kib')):>12} |",
        *_find_rows(res.get("find")),
        "",
        f"scale volume: {files:,} files of 4 KiB sharing one chunk, in directories of {per_dir:,}; "
        f"RAM chunk cache configured: {args.cache_size} (it fills only on reads).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=1_000_000, help="files in the scale volume (default 1000000)")
    p.add_argument("--per-dir", type=int, default=10_000, help="files per directory (default 10000)")
    p.add_argument("--cache-size", default="256MiB", help="casfs mount --cache-size (default 256MiB)")
    p.add_argument("--mounts", type=int, default=3, help="mounts timed per volume (default 3)")
    p.add_argument("--workdir", type=Path, help="where to create the scratch directory")
    p.add_argument("--data-home", type=Path, help="use (and keep) this XDG_DATA_HOME; reuse its volumes")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--out", type=Path, help="also write the report to this file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.files < 1 or args.per_dir < 1 or args.mounts < 1:
        p.error("--files, --per-dir and --mounts must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, sigterm_to_interrupt)
    progress = Progress(args.quiet)
    scratch = Path(tempfile.mkdtemp(prefix="casfs-scale-", dir=args.workdir))
    data_home = (args.data_home or scratch / "data").resolve()
    data_home.mkdir(parents=True, exist_ok=True)
    os.environ["XDG_DATA_HOME"] = str(data_home)   # for cas.config.volume / tools.cli.mountcmd here
    world = Scale(data_home, scratch, args.cache_size)
    res: dict[str, dict[str, float | int | None]] = {}
    try:
        if not (data_home / "casfs" / "empty").exists():
            world.cli("init", "empty")
        if not (data_home / "casfs" / "scale").exists():
            progress(f"creating volume scale with {args.files:,} files in {data_home}")
            fill(world, args.files, args.per_dir, progress)
        shape = json.loads((data_home / "scale.json").read_text())
        res["empty"] = measure(world, "empty", None, args.mounts, progress)
        res["scale"] = measure(world, "scale", "d0000", args.mounts, progress)
        res["find"] = measure_find(world, args.mounts, progress)
    finally:
        world.cleanup()
        if world.mounted:
            warn(f"still mounted, not removing {scratch}: {', '.join(map(str, world.mounted))}")
        elif not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    text = report(args, res, shape["files"], shape["per_dir"])
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench_scale: interrupted", file=sys.stderr)
        sys.exit(130)
