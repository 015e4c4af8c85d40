"""`casfs stats` on a mounted volume shows the mount's live RAM-cache hit ratio."""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import CasEnv

CHUNK = 64 * 1024


def _read_direct(path: Path) -> bytes:
    """Read ``path`` with O_DIRECT, so the kernel page cache cannot answer for casfs."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        out = bytearray()
        while True:
            piece = os.read(fd, 1 << 20)
            if not piece:
                return bytes(out)
            out += piece
    finally:
        os.close(fd)


def _live(casenv: CasEnv, want: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    """Poll `casfs stats --json` until its live counters satisfy ``want`` (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        mount = json.loads(casenv.run("stats", "--json", "vol").stdout)["mount"]
        if mount is not None and want(mount):
            return dict(mount)
        assert time.monotonic() < deadline, f"live stats never reached the expected state: {mount}"
        time.sleep(0.5)


def test_stats_shows_live_cache_hit_ratio(casenv: CasEnv, mounted: Callable[..., Path]) -> None:
    mp = mounted(chunk_size="64KiB")
    data = os.urandom(8 * CHUNK)
    (mp / "f").write_bytes(data)
    casenv.umount(mp)
    assert json.loads(casenv.run("stats", "--json", "vol").stdout)["mount"] is None
    assert "RAM cache          not mounted" in casenv.run("stats", "vol").stdout
    casenv.mount("vol", mp)
    assert _read_direct(mp / "f") == data      # cold: every chunk a miss
    first = _live(casenv, lambda m: m["cache_misses"] >= 8)
    assert first["cache_hits"] + first["cache_misses"] >= 8
    for _ in range(3):
        assert _read_direct(mp / "f") == data  # warm: served by the RAM cache
    m = _live(casenv, lambda m: m["cache_hits"] >= first["cache_hits"] + 24)
    assert m["cache_misses"] == first["cache_misses"]      # nothing new came from disk
    assert abs(m["cache_hit_ratio"] - m["cache_hits"] / (m["cache_hits"] + m["cache_misses"])) < 1e-5
    assert m["cache_bytes"] >= len(data)
    text = casenv.run("stats", "vol").stdout
    assert re.search(r"RAM cache +hit ratio \d+\.\d% of \d+ chunk reads since mount", text), text
