"""Plain counters the engine keeps for monitoring; read at scrape time, never pushed.

The engine does not import a metrics library: it keeps ints and :class:`Histogram`
objects, and the mount's Prometheus collector (fusefront/metrics.py) turns them into
metric families when /metrics is scraped (docs/monitoring.md). Updating one costs a
bisect and two additions, so they stay on in every process.

:data:`MYSQL_TX` (the latency of every metadata transaction), :data:`MYSQL_COMMIT` (of
every group COMMIT, cas.db.database.Database.start_group_commit) and
:data:`MYSQL_RETRIES` (transactions run again after a deadlock, MySQL error 1213, or a
lock wait timeout, 1205) are per process: every :class:`cas.db.database.Database` of the
process adds to them, whatever thread it runs on.
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass

#: upper bounds (seconds) of the latency buckets: FUSE operations take tens of
#: microseconds when answered from RAM, a MySQL COMMIT a millisecond or more
LATENCY_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                     0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class HistogramSnapshot:
    """Counts per bucket (``counts[i]``: observations <= ``bounds_s[i]``, not cumulative;
    the last entry counts those above every bound), their number and sum in seconds."""

    bounds_s: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum_s: float


class Histogram:
    """Observations of a duration (ns) in fixed buckets (:data:`LATENCY_BUCKETS_S`).

    Thread-safe (one lock; uncontended it costs about 100 ns)."""

    def __init__(self, bounds_s: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds_s = bounds_s
        self._bounds_ns = [int(b * 1e9) for b in bounds_s]
        self._counts = [0] * (len(bounds_s) + 1)
        self._sum_ns = 0
        self._lock = threading.Lock()

    def observe_ns(self, ns: int) -> None:
        """Record one duration of ``ns`` nanoseconds."""
        i = bisect_left(self._bounds_ns, ns)
        with self._lock:
            self._counts[i] += 1
            self._sum_ns += ns

    def snapshot(self) -> HistogramSnapshot:
        """A consistent copy of the counts."""
        with self._lock:
            counts = tuple(self._counts)
            total = self._sum_ns
        return HistogramSnapshot(self.bounds_s, counts, sum(counts), total / 1e9)


class Counter:
    """A thread-safe monotonically increasing integer (events or bytes)."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        """Add ``n`` (default 1) to the count. Thread-safe."""
        with self._lock:
            self.value += n


MYSQL_TX = Histogram()      # seconds per transaction (body + COMMIT, or a body in the group)
MYSQL_COMMIT = Histogram()  # seconds per COMMIT of a group transaction
MYSQL_RETRIES = Counter()  # transactions retried after a deadlock (1213) or lock wait timeout (1205)
