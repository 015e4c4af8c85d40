"""`casfs stats --watch`: a mount's rates, refreshed every interval (like iostat).

Each report compares two consecutive readings of the mount's live counters
(``run/stats.json``, rewritten by the daemon at most every 0.5 s while they change,
fusefront/daemon.py) and shows, per second of the time between the two readings:

- ops/s: FUSE requests; in / out: MiB/s written and read by applications;
- dedup: MiB/s of written-back data that was already stored (not stored again);
- hit: the RAM cache's hit ratio over the interval (chunk reads; "-" without reads);
- up: MiB/s uploaded to Drive; queue: chunks and bytes waiting for upload (from the
  database) and the ETA at the upload rate of the last ETA_WINDOW reports (uploads
  go a pack at a time, so one interval's rate jumps; "-" when nothing moved).

On a terminal the figures are redrawn in place with rich; otherwise one line is printed
per interval with a header first, for scripts and logs. Ctrl-C ends it with status 0;
``--count N`` stops after N reports. Only a mounted volume has live counters: otherwise
the command exits 1 with a one-line message.
"""
from __future__ import annotations

import json
import sys
from collections import deque
import time
from dataclasses import dataclass
from typing import Any

import click

from cas.tier import cloud
from cas.db.database import Metadata, connect
from cas.db import queue as queue_rows
from cas.config.volume import Volume
from fusefront.daemon import STATS_FILE

from tools.cli.common import human
from tools.cli.mountcmd import is_mounted

MiB = 1 << 20
ETA_WINDOW = 10   # reports whose uploaded bytes the ETA's rate is averaged over


@dataclass(frozen=True)
class Rates:
    """One report: rates per second between two readings, and the upload queue."""

    ops: float
    in_mib: float
    out_mib: float
    dedup_mib: float
    hit_ratio: float | None
    up_mib: float
    queued_chunks: int
    queued_bytes: int
    eta_s: float | None
    dirty_bytes: int

    def as_dict(self) -> dict[str, Any]:
        """One `stats --watch --json` line: rates per second (MiB/s in binary MiB)."""
        return {"ops_per_s": round(self.ops, 3), "in_mib_per_s": round(self.in_mib, 3),
                "out_mib_per_s": round(self.out_mib, 3), "dedup_mib_per_s": round(self.dedup_mib, 3),
                "cache_hit_ratio": None if self.hit_ratio is None else round(self.hit_ratio, 4),
                "upload_mib_per_s": round(self.up_mib, 3), "queued_chunks": self.queued_chunks,
                "queued_bytes": self.queued_bytes, "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
                "dirty_bytes": self.dirty_bytes}


def read_live(vol: Volume) -> dict[str, Any]:
    """The mount's live counters. Raises click.ClickException when not mounted."""
    if not is_mounted(vol):
        raise click.ClickException(f"volume {vol.name} is not mounted: --watch shows a live mount's rates")
    try:
        data = json.loads((vol.run_dir / STATS_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read the mount's live figures: {exc}") from None
    if not isinstance(data, dict):
        raise click.ClickException("the mount's live figures are malformed")
    return data


def queue(meta: Metadata) -> tuple[int, int]:
    """(chunks, envelope bytes) in the upload queue; (0, 0) without a cloud tier."""
    if not cloud.enabled(meta.db):
        return 0, 0
    f = queue_rows.figures(meta.db)
    return f.chunks, f.bytes


def rates(prev: dict[str, Any], cur: dict[str, Any], queued: tuple[int, int],
          eta_rate: float | None = None) -> Rates:
    """The rates between readings ``prev`` and ``cur`` (per second of the time between
    them; all 0 when the mount wrote no new reading: nothing changed). The ETA divides
    the queued bytes by ``eta_rate`` (bytes/s; default: this interval's upload rate)."""
    dt = float(cur.get("time", 0)) - float(prev.get("time", 0))

    def per_s(key: str, scale: float = 1.0) -> float:
        if dt <= 0:
            return 0.0
        return max(float(cur.get(key, 0)) - float(prev.get(key, 0)), 0.0) / dt / scale

    hits = float(cur.get("cache_hits", 0)) - float(prev.get("cache_hits", 0))
    misses = float(cur.get("cache_misses", 0)) - float(prev.get("cache_misses", 0))
    dedup = 0.0
    if dt > 0:
        wb = float(cur.get("writeback_bytes", 0)) - float(prev.get("writeback_bytes", 0))
        new = float(cur.get("new_chunk_bytes", 0)) - float(prev.get("new_chunk_bytes", 0))
        dedup = max(wb - new, 0.0) / dt / MiB
    up = per_s("cloud_uploaded_bytes", MiB)
    speed = up * MiB if eta_rate is None else eta_rate
    eta = queued[1] / speed if speed > 0 else (0.0 if queued[1] == 0 else None)
    return Rates(ops=per_s("ops"), in_mib=per_s("written_bytes", MiB), out_mib=per_s("read_bytes", MiB),
                 dedup_mib=dedup, hit_ratio=hits / (hits + misses) if hits + misses > 0 else None,
                 up_mib=up, queued_chunks=queued[0], queued_bytes=queued[1], eta_s=eta,
                 dirty_bytes=int(cur.get("dirty_bytes", 0)))


HEADER = (f"{'time':8} {'ops/s':>8} {'in MiB/s':>9} {'out MiB/s':>9} {'dedup MiB/s':>11} {'hit':>6} "
          f"{'up MiB/s':>9} {'queue':>18} {'ETA':>8} {'dirty':>10}")


def _eta(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def line(r: Rates, when: float) -> str:
    """One report as a line under :data:`HEADER`."""
    hit = "-" if r.hit_ratio is None else f"{r.hit_ratio * 100:.1f}%"
    q = f"{r.queued_chunks} / {human(r.queued_bytes)}"
    return (f"{time.strftime('%H:%M:%S', time.localtime(when)):8} {r.ops:8.1f} {r.in_mib:9.2f} {r.out_mib:9.2f} "
            f"{r.dedup_mib:11.2f} {hit:>6} {r.up_mib:9.2f} {q:>18} {_eta(r.eta_s):>8} {human(r.dirty_bytes):>10}")


def _table(vol: Volume, r: Rates, when: float) -> Any:
    from rich.table import Table
    t = Table(title=f"casfs {vol.name} at {time.strftime('%H:%M:%S', time.localtime(when))}",
              show_header=False, box=None)
    hit = "-" if r.hit_ratio is None else f"{r.hit_ratio * 100:.1f} %"
    for k, v in (("operations", f"{r.ops:.1f} /s"), ("written (in)", f"{r.in_mib:.2f} MiB/s"),
                 ("read (out)", f"{r.out_mib:.2f} MiB/s"), ("dedup saved", f"{r.dedup_mib:.2f} MiB/s"),
                 ("cache hit ratio", hit), ("upload", f"{r.up_mib:.2f} MiB/s"),
                 ("upload queue", f"{r.queued_chunks} chunks, {human(r.queued_bytes)}"),
                 ("queue ETA", _eta(r.eta_s)), ("uncommitted", human(r.dirty_bytes))):
        t.add_row(k, v)
    return t


def watch(vol: Volume, interval: float, count: int | None, as_json: bool) -> None:
    """Print a report every ``interval`` seconds, ``count`` times (None: until Ctrl-C)."""
    tty = sys.stdout.isatty() and not as_json
    with connect(vol) as meta:
        prev = read_live(vol)
        done = 0
        started = time.monotonic()
        uploads: deque[tuple[float, float]] = deque(maxlen=ETA_WINDOW)   # (seconds, bytes uploaded)
        live_view: Any = None
        try:
            if tty:
                from rich.console import Console
                from rich.live import Live
                live_view = Live(console=Console(), auto_refresh=False)
                live_view.start()
            elif not as_json:
                click.echo(HEADER)
            while count is None or done < count:
                time.sleep(interval)
                cur = read_live(vol)
                now = time.monotonic()
                uploads.append((now - started, float(cur.get("cloud_uploaded_bytes", 0))
                                - float(prev.get("cloud_uploaded_bytes", 0))))
                started = now
                span = sum(s for s, _ in uploads)
                r = rates(prev, cur, queue(meta), sum(b for _, b in uploads) / span if span > 0 else None)
                when = time.time()
                if as_json:
                    click.echo(json.dumps({"time": round(when, 3), **r.as_dict()}))
                elif live_view is not None:
                    live_view.update(_table(vol, r, when), refresh=True)
                else:
                    click.echo(line(r, when))
                sys.stdout.flush()
                prev = cur
                done += 1
        except KeyboardInterrupt:
            pass
        finally:
            if live_view is not None:
                live_view.stop()
