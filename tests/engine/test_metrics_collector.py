"""The metrics collector (fusefront/metrics.py) on a real engine and database: the
local store's byte count, a scan of the chunks table, is measured at most once per
LOCAL_BYTES_TTL_S, not at every scrape."""
from __future__ import annotations

import os

from fusefront.metrics import LOCAL_BYTES_TTL_S, CasCollector
from fusefront.observe import Observer
from tests.engine.test_fs import Engine, eng, make_file  # noqa: F401 - the fixture


def local_bytes(c: CasCollector) -> float:
    for m in c.collect():
        if m.name == "casfs_local_store_bytes":
            return float(m.samples[0].value)
    raise AssertionError("no casfs_local_store_bytes")


def test_local_store_bytes_are_cached_between_scrapes(eng: Engine) -> None:
    c = CasCollector(eng.fs, Observer(eng.fs, metrics=True))
    try:
        assert LOCAL_BYTES_TTL_S >= 60
        first = local_bytes(c)
        make_file(eng.fs, b"f", os.urandom(200_000))   # committed: new local chunks
        stored = eng.q("SELECT SUM(stored_length) FROM chunks WHERE is_local = 1")[0][0]
        assert stored > first
        assert local_bytes(c) == first                  # within the TTL: no new scan
        c.local_bytes_ttl_s = 0
        assert local_bytes(c) == stored                 # measured again once it expired
    finally:
        c.close()
