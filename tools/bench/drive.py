"""The cloud-tier benchmark: casfs against the raw speed of the same Drive server.

``python -m tools.bench.drive [--size-mib N] [--chunk-size SIZE] [--latency S] [--serial] [--out FILE]``

Starts ``tools.drivesim`` in its own process (in memory) and measures, in one run:

1. **raw upload / download**: the google-api-python-client (cas.tier.drive.DriveObjectStore)
   putting N MiB of random bytes as 32 MiB objects (resumable uploads, 8 MiB requests)
   and getting them back whole: the ceiling of any Drive client on this machine;
2. **casfs upload**: a volume with the tier enabled (pack age 0) gets one N MiB file of
   random bytes; the clock runs from the file's fsync (the data is local and committed)
   until `casfs drive status` shows the queue drained; bytes = the confirmed packs'
   bytes. Also Drive files created per GB uploaded (packs; one file per chunk would be
   1024 at 1 MiB chunks);
3. **casfs cold read from Drive**: the volume is remounted with ``--local-limit 0``,
   every chunk evicted, remounted again (empty RAM cache), and the file read
   sequentially: every chunk comes from a ranged GET on its pack.
4. with ``--latency S``, drivesim answers every download after S seconds (its ``slow``
   fault; Drive's own latency is of that order), raw downloads included; with
   ``--serial`` the cold read is also measured with ``fetch_ahead = 0`` (no ranged GETs
   kept in flight ahead of the reader, as before overlapped cold reads) and the row
   "overlapped / serial" gives the ratio of the two cold reads of the same run.

Ratios are casfs / raw of the same run; absolute speeds drift on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cas.tier import cloud
from cas.tier.drive import DriveObjectStore, build_service, ensure_folder, load_credentials
from cas.db.database import connect
from cas.config.volume import open_volume

MiB = 1 << 20
OBJECT = 32 * MiB


def start_sim(latency_s: float = 0.0) -> tuple[subprocess.Popen[str], str]:
    """drivesim in its own process; with ``latency_s`` every download is answered after
    that many seconds (only 0.5 s, drivesim's ``slow`` delay, is offered by its CLI)."""
    faults = ["--fault", "slow:1:download"] if latency_s else []
    proc = subprocess.Popen([sys.executable, "-m", "tools.drivesim", "--port", "0", *faults],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise RuntimeError("drivesim did not start")
    return proc, url


def raw_speeds(url: str, data: bytes) -> tuple[float, float]:
    """(upload MiB/s, download MiB/s) of the plain client against the server."""
    creds = load_credentials(None)
    folder = ensure_folder(build_service(url, creds), "raw-bench")
    store = DriveObjectStore(lambda: build_service(url, creds), folder)
    t0 = time.perf_counter()
    ids = [store.put(f"raw{i}", data[i:i + OBJECT]).id for i in range(0, len(data), OBJECT)]
    up = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = sum(len(store.get(i)) for i in ids)
    down = time.perf_counter() - t0
    assert got == len(data)
    return len(data) / MiB / up, len(data) / MiB / down


class Casfs:
    def __init__(self, scratch: Path) -> None:
        self.env = dict(os.environ, XDG_DATA_HOME=str(scratch / "data"))
        self.mp = scratch / "mnt"
        self.mp.mkdir()

    def cli(self, *args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "tools.cli", *args], env=self.env,
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"casfs {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def stats(self) -> dict[str, int]:
        return dict(json.loads(self.cli("stats", "--json", "bench")))

    def wait(self, cond: str, timeout: float = 1800) -> None:
        """Poll the volume's database directly (a CLI call would cost more than the
        polling interval) until the upload queue is drained / nothing is local."""
        os.environ["XDG_DATA_HOME"] = self.env["XDG_DATA_HOME"]
        end = time.monotonic() + timeout
        with connect(open_volume("bench")) as meta:
            while True:
                if cond == "drained":
                    s = cloud.status(meta.db)
                    if s.queued_chunks == 0 and s.uploading_packs == 0:
                        return
                elif not meta.db.query("SELECT 1 FROM chunks WHERE is_local = 1 LIMIT 1"):
                    return
                if time.monotonic() > end:
                    raise RuntimeError(f"timed out waiting for {cond}")
                time.sleep(0.02)


def set_fetch_ahead(c: "Casfs", n: int | None) -> None:
    """Set (or with None remove) ``fetch_ahead`` in the volume's [drive] table."""
    import tomllib

    import tomli_w
    path = Path(c.env["XDG_DATA_HOME"]) / "casfs" / "bench" / "volume.toml"
    cfg = tomllib.loads(path.read_text())
    if n is None:
        cfg["drive"].pop("fetch_ahead", None)
    else:
        cfg["drive"]["fetch_ahead"] = n
    path.write_text(tomli_w.dumps(cfg))


def cold_read(c: "Casfs", data: bytes, fetch_ahead: int | None) -> float:
    """Evict everything, remount, read the file sequentially; MiB/s."""
    c.cli("umount", str(c.mp))
    set_fetch_ahead(c, fetch_ahead)
    c.cli("mount", "--local-limit", "0", str(c.mp), "bench")
    c.wait("evicted")
    c.cli("umount", str(c.mp))
    c.cli("mount", "--local-limit", "0", str(c.mp), "bench")
    t0 = time.perf_counter()
    with open(c.mp / "f", "rb", buffering=0) as f:
        n = 0
        while piece := f.read(MiB):
            if piece != data[n:n + len(piece)]:
                raise RuntimeError(f"cold read: wrong bytes at offset {n}")
            n += len(piece)
    down = time.perf_counter() - t0
    assert n == len(data)
    return len(data) / MiB / down


def run(size_mib: int, chunk_size: str, latency_s: float = 0.0, serial: bool = False) -> list[str]:
    data = os.urandom(size_mib * MiB)
    proc, url = start_sim(latency_s)
    rows: list[str] = []
    try:
        raw_up, raw_down = raw_speeds(url, data)
        with tempfile.TemporaryDirectory(prefix="casfs-drive-bench-") as tmp:
            c = Casfs(Path(tmp))
            c.cli("init", "--chunk-size", chunk_size, "bench")
            c.cli("drive", "auth", "--endpoint", url, "--pack-age", "0", "bench")
            c.cli("mount", str(c.mp), "bench")
            try:
                with open(c.mp / "f", "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                t0 = time.perf_counter()
                c.wait("drained")
                up = time.perf_counter() - t0
                st = c.stats()
                cas_serial = cold_read(c, data, 0) if serial else None
                cas_down = cold_read(c, data, None)
            finally:
                subprocess.run([sys.executable, "-m", "tools.cli", "umount", str(c.mp)], env=c.env,
                               capture_output=True, timeout=600)
        cas_up = st["cloud_bytes"] / MiB / up
        per_gb = st["cloud_packs"] / (st["cloud_bytes"] / 1e9)
        rows += [
            f"| workload ({size_mib} MiB, chunk {chunk_size}"
            + (f", every download answered after {latency_s} s" if latency_s else "")
            + ") | raw client | casfs | casfs/raw |",
            "|---|---:|---:|---:|",
            f"| upload to Drive (MiB/s) | {raw_up:,.0f} | {cas_up:,.0f} | {cas_up / raw_up:.2f}x |",
            f"| cold read from Drive after eviction (MiB/s) | {raw_down:,.0f} | {cas_down:,.0f} | "
            f"{cas_down / raw_down:.2f}x |",
            f"| Drive files created per GB uploaded | - | {per_gb:,.1f} | - |",
        ]
        if cas_serial is not None:
            rows += [
                f"| cold read from Drive, serial fetch (fetch_ahead = 0) (MiB/s) | {raw_down:,.0f} | "
                f"{cas_serial:,.1f} | {cas_serial / raw_down:.2f}x |",
                f"| cold read from Drive, overlapped / serial | - | {cas_down / cas_serial:.2f}x | - |",
            ]
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.drive", description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--chunk-size", default="1MiB")
    ap.add_argument("--latency", type=float, default=0.0, metavar="S",
                    help="answer every download after S seconds (drivesim's slow fault: 0 or 0.5)")
    ap.add_argument("--serial", action="store_true",
                    help="also the cold read with fetch_ahead = 0, and the overlapped/serial ratio")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.latency not in (0.0, 0.5):
        ap.error("--latency: drivesim's command line offers 0 or 0.5 s")
    rows = run(args.size_mib, args.chunk_size, args.latency, args.serial)
    text = "\n".join(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
