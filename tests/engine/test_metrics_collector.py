"""The metrics collector (fusefront/metrics.py) on a real engine and database: the
local store's byte count, a scan of the chunks table, is measured again only when this
mount stored, evicted or fetched chunks, or LOCAL_BYTES_TTL_S after the last scan; not
at every scrape."""
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
        make_file(eng.fs, b"f", os.urandom(200_000))
        first = local_bytes(c)
        assert first == eng.q("SELECT SUM(stored_length) FROM chunks WHERE is_local = 1")[0][0]
        # another process adds local chunks (this mount stores nothing): not scanned again
        other = eng.new_fs()
        make_file(other, b"g", os.urandom(200_000))
        stored = eng.q("SELECT SUM(stored_length) FROM chunks WHERE is_local = 1")[0][0]
        assert stored > first
        assert local_bytes(c) == first                  # within the TTL: no new scan
        c.local_bytes_ttl_s = 0
        assert local_bytes(c) == stored                 # measured again once it expired
        c.local_bytes_ttl_s = LOCAL_BYTES_TTL_S
        make_file(eng.fs, b"h", os.urandom(200_000))    # this mount stores new chunks
        assert local_bytes(c) == eng.q("SELECT SUM(stored_length) FROM chunks WHERE is_local = 1")[0][0]
    finally:
        c.close()
