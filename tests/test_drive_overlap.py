"""Overlapped cold reads from Drive (docs/cloud.md, "Reading evicted chunks"): a file
written in one go sits in its packs in file order, a sequential reader of the evicted
file keeps many ranged GETs in flight, and a failed read-ahead GET never turns into a
wrong or failed read.

Real mount, the real casfs CLI and google-api-python-client, tools.drivesim answering
every download after a delay (its ``slow`` fault) and counting how many it serves at once.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

import tomli_w

from cas.db.database import connect
from cas.config.volume import open_volume
from tests.conftest import CasEnv
from tests.test_drive import drained, fsync_tree, stats
from tests.waiting import wait_for
from tools.drivesim import DriveSim

CHUNK = 64 * 1024
FILE_SIZE = 8 << 20          # 128 chunks, 3 to a pack of 256 KiB: 43 packs
DELAY_S = 2.0                # drivesim answers every download this late (s)
# Before, the only GETs running at once were the local read-ahead's (4 chunks ahead) and
# the reader's own: at most 5 or 6. Now up to fetch_ahead (16) more.
MANY_IN_FLIGHT = 10


def set_drive_keys(casenv: CasEnv, **keys: object) -> None:
    """Set keys of the volume's [drive] table (volume.toml; read at mount)."""
    path = casenv.data_home / "vol" / "volume.toml"
    cfg = tomllib.loads(path.read_text())
    cfg["drive"].update(keys)
    path.write_text(tomli_w.dumps(cfg))


def evict_and_remount(casenv: CasEnv, mp: Path) -> None:
    """Evict every chunk, then remount (empty RAM cache, no kernel page cache)."""
    casenv.umount(mp)
    casenv.mount("vol", mp, "--local-limit", "0")
    wait_for(lambda: stats(casenv)["local_bytes"] == 0, "eviction of every local chunk", 120, interval=0.3)
    casenv.umount(mp)
    casenv.mount("vol", mp, "--local-limit", "0")


def read_sequentially(path: Path) -> bytes:
    out = bytearray()
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(1 << 20):
            out += piece
    return bytes(out)


def test_cold_sequential_read_overlaps_gets_and_survives_failed_read_ahead(
        casenv: CasEnv, drive_sim: DriveSim) -> None:
    casenv.init("vol", chunk_size="64KiB")
    casenv.run("drive", "auth", "--endpoint", drive_sim.url, "--pack-size", "256KiB", "--pack-age", "0", "vol")
    # enough attempts that a read's own GET outlasts every injected error below
    set_drive_keys(casenv, read_attempts=8)
    mp = casenv.mount("vol")
    data = os.urandom(FILE_SIZE)
    (mp / "f").write_bytes(data)
    fsync_tree(mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain", 120, interval=0.3)
    assert stats(casenv)["cloud_packs"] >= 40
    # the uploader packed the file's chunks in file order (they were queued in one
    # writeback, i.e. in chunk id order): a pack holds consecutive slots, in order
    with connect(open_volume("vol")) as meta:
        slots = [int(r[0]) for r in meta.db.query(
            "SELECT m.slot FROM pack_entries e JOIN manifests m ON m.chunk = e.chunk ORDER BY e.pack, e.pos")]
    assert slots == list(range(FILE_SIZE // CHUNK))

    # 1. every download answered after DELAY_S: the reader keeps several in flight
    evict_and_remount(casenv, mp)
    drive_sim.inject("slow", probability=1.0, match="download", delay=DELAY_S)
    before = drive_sim.counters.requests.get("download", 0)
    assert read_sequentially(mp / "f") == data
    c = drive_sim.counters
    assert c.requests.get("download", 0) - before >= 43          # every pack read
    assert c.max_in_flight.get("download", 0) >= MANY_IN_FLIGHT, c.max_in_flight

    # 2. the first download passes, the next four fail (503): the read-ahead GETs that
    # got them are dropped, the reads fetch those chunks themselves, byte-exact
    evict_and_remount(casenv, mp)
    drive_sim.clear_faults()
    drive_sim.inject("server_error", match="download", skip=1, times=4)
    drive_sim.inject("slow", probability=1.0, match="download", delay=DELAY_S)
    assert read_sequentially(mp / "f") == data
    assert drive_sim.counters.faults.get("server_error", 0) == 4
    # those were GETs ahead (a read from the file's start sends them before its own
    # fetch): dropped, said so in the mount's log
    log_text = (open_volume("vol").log_dir / "mount.log").read_text(errors="replace")
    assert "cloud read-ahead of pack object" in log_text and "the reads fetch on their own" in log_text
    # the chunks read were kept locally again and verify: fsck finds nothing wrong
    drive_sim.clear_faults()
    casenv.umount(mp)
    out = casenv.run("fsck", "vol")
    assert out.returncode == 0
