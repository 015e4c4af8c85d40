"""Prometheus metrics of a mount: a collector read at scrape time, and its HTTP server.

`casfs mount --metrics [HOST:]PORT` serves ``/metrics`` (Prometheus text format,
prometheus-client's ``start_http_server``) from a thread of the mount daemon. Nothing
is pushed or updated on the hot path for it: :class:`CasCollector` reads, when scraped,
the counters the engine and the FUSE hook keep anyway (cas/counters.py, the RAM
cache's statistics, the cloud tier's counters, fusefront/observe.py) and runs a few
queries on its own database connection (the upload queue, the last metadata snapshot,
and, at most once per LOCAL_BYTES_TTL_S, the local store's bytes). docs/monitoring.md lists every metric.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from cas.counters import MYSQL_COMMIT, MYSQL_RETRIES, MYSQL_TX, HistogramSnapshot
from cas.errors import CasError
from cas.engine.fs import Filesystem
from cas.db.database import Database
from cas.db import chunks as chunk_rows, queue as queue_rows, reports, volume as meta_rows

from .observe import HANDLERS, Observer

log = logging.getLogger(__name__)
DEFAULT_HOST = "127.0.0.1"
#: the labels of casfs_drive_errors_total (cas.tier.cloud.error_kind), exported from 0
DRIVE_ERROR_KINDS = ("daily_limit", "try_again", "credentials", "not_found", "store", "database", "other")
SNAPSHOT_KEY = "snapshot_confirmed_at"   # meta key: UTC "%Y-%m-%d %H:%M:%S" of the last snapshot
#: seconds a scrape reuses the local store's byte count (a scan of the chunks table:
#: SUM(stored_length) WHERE is_local = 1 has no index to use) while this mount stored,
#: evicted and fetched nothing; what other processes do (gc) shows within this time
LOCAL_BYTES_TTL_S = 60.0


class MetricsError(CasError):
    """The metrics endpoint cannot be served (bad address, port taken)."""


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6ADDR]:PORT``, ``:PORT`` or ``PORT`` -> (host, port); the host
    defaults to 127.0.0.1 (localhost only). Raises MetricsError."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or DEFAULT_HOST
    try:
        num = int(port)
    except ValueError:
        raise MetricsError(f"--metrics {text!r}: expected [HOST:]PORT") from None
    if not 0 < num < 65536:
        raise MetricsError(f"--metrics {text!r}: port out of range")
    return host, num


def _histogram(fam: HistogramMetricFamily, labels: list[str], snap: HistogramSnapshot) -> None:
    buckets: list[tuple[str, float]] = []
    acc = 0
    for bound, n in zip(snap.bounds_s, snap.counts):
        acc += n
        buckets.append((repr(bound), acc))
    buckets.append(("+Inf", snap.count))
    fam.add_metric(labels, buckets, snap.sum_s)


class CasCollector(Collector):
    """The metrics of one mounted :class:`Filesystem` and its FUSE hook (``observer``)."""

    def __init__(self, fs: Filesystem, observer: Observer) -> None:
        self.fs = fs
        self.observer = observer
        self._db: Database | None = None
        self._db_lock = threading.Lock()
        self.local_bytes_ttl_s = LOCAL_BYTES_TTL_S
        # (time.monotonic() measured, this mount's store changes then, bytes)
        self._local: tuple[float, tuple[int, int, int], int] | None = None

    def close(self) -> None:
        """Close the collector's own database connection (opened again at the next scrape)."""
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _query(self) -> dict[str, Any]:
        """Figures read from the database on this collector's own connection."""
        with self._db_lock:
            if self._db is None:
                self._db = Database(self.fs.db.target)
            queued = queue_rows.figures(self._db)
            t, moved = time.monotonic(), self._store_changes()
            if self._local is None or t - self._local[0] >= self.local_bytes_ttl_s or moved != self._local[1]:
                self._local = (t, moved, chunk_rows.local_bytes(self._db))
            local = self._local[2]
            snap = meta_rows.get(self._db, SNAPSHOT_KEY)
            now = reports.server_utc_now(self._db)
        snapshot_age = math.nan
        if snap is not None:
            try:
                at = datetime.strptime(snap, "%Y-%m-%d %H:%M:%S")
                snapshot_age = max(0.0, (now - at).total_seconds())
            except ValueError:
                pass
        return {"queue_chunks": queued.chunks, "queue_bytes": queued.bytes,
                "queue_age_s": queued.oldest_us / 1e6,
                "local_bytes": int(local), "snapshot_age_s": snapshot_age}

    def _store_changes(self) -> tuple[int, int, int]:
        """What this mount did to its local store: plaintext bytes written back as new
        chunks, chunk bytes evicted, chunks fetched back from the cloud (they are kept
        locally). Unchanged: the local store's byte count is unchanged by this mount."""
        tier = self.fs.cloud
        return (self.fs.data.new_bytes, tier.evicted_bytes if tier is not None else 0,
                tier.fetches if tier is not None else 0)

    def collect(self) -> Iterator[Metric]:
        fs, ob = self.fs, self.observer
        # read before the written-back counters: a writeback adds to those before it
        # takes its bytes off the dirty total, so dirty + written back never dips
        # bytes written (cas.engine.fs.Filesystem's counter, also run/stats.json's) first: it
        # grows after the dirty total it adds to, so read before it, it never
        # exceeds dirty + written back
        written = fs.bytes_written
        dirty = fs.data.total_dirty
        ops = CounterMetricFamily("casfs_fuse_operations", "FUSE requests answered, by operation", labels=["op"])
        lat = HistogramMetricFamily("casfs_fuse_operation_seconds", "Time to answer a FUSE request", labels=["op"])
        for op in HANDLERS:
            h = ob.latency.get(op)
            if h is None:
                continue
            snap = h.snapshot()
            ops.add_metric([op], snap.count)
            _histogram(lat, [op], snap)
        yield ops
        yield lat
        errs = CounterMetricFamily("casfs_fuse_errors", "FUSE requests answered with an error, by operation "
                                   "and errno", labels=["op", "errno"])
        eio = 0
        for (op, name), n in sorted(ob.errors.items()):
            errs.add_metric([op, name], n)
            if name == "EIO":
                eio += n
        yield errs
        yield CounterMetricFamily("casfs_eio_errors", "FUSE requests answered with EIO", value=eio)
        yield CounterMetricFamily("casfs_audit_path_queries", "Dentry queries the audit log ran to name a "
                                  "path (names the mount had not seen)", value=ob.path_queries)
        yield CounterMetricFamily("casfs_read_bytes", "Bytes returned to applications by read", value=fs.bytes_read)
        yield CounterMetricFamily("casfs_written_bytes", "Bytes written by applications", value=written)
        yield CounterMetricFamily("casfs_dedup_bytes", "Bytes of written-back slots whose chunk was stored "
                                  "already (deduplicated)", value=fs.data.dedup_bytes)
        yield CounterMetricFamily("casfs_new_chunk_bytes", "Bytes of written-back slots stored as new chunks",
                                  value=fs.data.new_bytes)
        c = fs.cache.stats()
        yield CounterMetricFamily("casfs_cache_hits", "RAM chunk cache hits", value=c.hits)
        yield CounterMetricFamily("casfs_cache_misses", "RAM chunk cache misses", value=c.misses)
        yield CounterMetricFamily("casfs_cache_evictions", "Chunks evicted from the RAM cache", value=c.evictions)
        yield GaugeMetricFamily("casfs_cache_bytes", "Bytes held in the RAM chunk cache", value=c.size_bytes)
        yield GaugeMetricFamily("casfs_cache_capacity_bytes", "Capacity of the RAM chunk cache",
                                value=c.capacity_bytes)
        yield GaugeMetricFamily("casfs_dirty_bytes", "Bytes buffered in RAM waiting for writeback",
                                value=dirty)
        yield GaugeMetricFamily("casfs_uncommitted_operations", "Operations in the open group transaction",
                                value=fs.db.uncommitted)
        tx = HistogramMetricFamily("casfs_mysql_transaction_seconds", "Duration of metadata transactions "
                                   "(kind=transaction) and of group COMMITs (kind=group_commit)", labels=["kind"])
        _histogram(tx, ["transaction"], MYSQL_TX.snapshot())
        _histogram(tx, ["group_commit"], MYSQL_COMMIT.snapshot())
        yield tx
        yield CounterMetricFamily("casfs_mysql_deadlock_retries", "Transactions run again after a deadlock "
                                  "or lock wait timeout", value=MYSQL_RETRIES.value)
        yield from self._cloud()
        yield from self._store()

    def _cloud(self) -> Iterator[Metric]:
        tier = self.fs.cloud
        yield GaugeMetricFamily("casfs_drive_enabled", "1 when this mount runs a cloud tier uploader",
                                value=0 if tier is None else 1)
        yield CounterMetricFamily("casfs_drive_packs_uploaded", "Packs uploaded and confirmed by this mount",
                                  value=0 if tier is None else tier.uploaded_packs)
        yield CounterMetricFamily("casfs_drive_uploaded_bytes", "Bytes of packs uploaded by this mount",
                                  value=0 if tier is None else tier.uploaded_bytes)
        yield CounterMetricFamily("casfs_drive_fetches", "Evicted chunks read back from Drive",
                                  value=0 if tier is None else tier.fetches)
        errs = CounterMetricFamily("casfs_drive_errors", "Cloud tier errors, by kind", labels=["kind"])
        seen = dict(tier.errors) if tier is not None else {}
        for kind in DRIVE_ERROR_KINDS:
            errs.add_metric([kind], seen.get(kind, 0))
        yield errs
        yield CounterMetricFamily("casfs_local_evicted_chunks", "Chunk files evicted under --local-limit",
                                  value=0 if tier is None else tier.evicted_chunks)
        yield CounterMetricFamily("casfs_local_evicted_bytes", "Bytes of chunk files evicted under --local-limit",
                                  value=0 if tier is None else tier.evicted_bytes)
        if tier is not None and tier.local_limit is not None:
            yield GaugeMetricFamily("casfs_local_limit_bytes", "The mount's --local-limit", value=tier.local_limit)

    def _store(self) -> Iterator[Metric]:
        try:
            figures = self._query()
        except CasError as exc:   # the database is down: the other metrics still answer
            log.warning("metrics: cannot query the database: %s", exc)
            self.close()
            figures = {}
        nan = math.nan
        yield GaugeMetricFamily("casfs_drive_queue_chunks", "Chunks queued for upload to Drive",
                                value=figures.get("queue_chunks", nan))
        yield GaugeMetricFamily("casfs_drive_queue_bytes", "Bytes of the chunks queued for upload",
                                value=figures.get("queue_bytes", nan))
        yield GaugeMetricFamily("casfs_drive_queue_oldest_age_seconds", "Age of the oldest queued chunk "
                                "(0 when the queue is empty)", value=figures.get("queue_age_s", nan))
        yield GaugeMetricFamily("casfs_snapshot_age_seconds", "Age of the last metadata snapshot confirmed "
                                "on Drive (NaN: none yet)", value=figures.get("snapshot_age_s", nan))
        yield GaugeMetricFamily("casfs_local_store_bytes", "Envelope bytes of the chunk files in the local store",
                                value=figures.get("local_bytes", nan))
        try:
            free, total = self.fs.store.disk_usage()
        except OSError:
            free, total = -1, -1
        yield GaugeMetricFamily("casfs_local_free_bytes", "Free bytes (for unprivileged users) on the "
                                "filesystem of the local store", value=free if free >= 0 else nan)
        yield GaugeMetricFamily("casfs_local_disk_bytes", "Size of the filesystem of the local store",
                                value=total if total >= 0 else nan)


class MetricsServer:
    """The /metrics endpoint of a mount, served from a daemon thread until :meth:`stop`."""

    def __init__(self, fs: Filesystem, observer: Observer, listen: str) -> None:
        """Bind ``listen`` ([HOST:]PORT) now. Raises MetricsError (one line) when the
        address is bad or the port is taken."""
        host, port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = CasCollector(fs, observer)
        self.registry.register(self.collector)
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(f"--metrics {host}:{port}: cannot listen: {exc.strerror or exc}") from None
        self.address = f"{host}:{self.server.server_address[1]}"
        log.info("metrics at http://%s/metrics (pid %d)", self.address, os.getpid())

    def stop(self) -> None:
        """Stop serving /metrics (waits up to 5 s for the server thread) and close the collector."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        self.collector.close()

