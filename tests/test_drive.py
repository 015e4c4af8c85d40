"""The cloud tier end to end: real mounts, the real casfs CLI, the real
google-api-python-client in the daemon, and tools.drivesim speaking the Drive v3 wire
protocol in this process (faults injected into it).

What the server holds is counted on the server side (its files, bytes and
per-name creation counts); what casfs believes comes from `casfs stats --json` and
`casfs drive status --json`. The two must agree.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CasEnv

from tests.treeutil import compare_trees
from tests.waiting import wait_for
from tools.drivesim import FOLDER_MIME, DriveSim

CHUNK = 64 * 1024


def make_tree(root: Path, seed: int, files: int = 24) -> None:
    """Random files (some repeating others' bytes) in two directories."""
    rnd = random.Random(seed)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    blobs = [rnd.randbytes(rnd.randrange(1, 5 * CHUNK)) for _ in range(files)]
    for i, blob in enumerate(blobs):
        (root / ("a" if i % 2 else "b") / f"f{i}").write_bytes(blob)
    (root / "a" / "copy").write_bytes(blobs[0] + blobs[1])


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``: casfs commits its data and metadata (and so the
    chunks' upload-queue rows) before fsync returns."""
    for p in [root, *root.rglob("*")]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def status(casenv: CasEnv) -> dict[str, Any]:
    return dict(json.loads(casenv.run("drive", "status", "--json", "vol").stdout))


def stats(casenv: CasEnv) -> dict[str, Any]:
    return dict(json.loads(casenv.run("stats", "--json", "vol").stdout))


def drained(casenv: CasEnv) -> bool:
    s = status(casenv)
    return bool(s["queued_chunks"] == 0 and s["uploading_packs"] == 0)


def pack_files(sim: DriveSim) -> list[dict[str, Any]]:
    """The pack objects on the server (not folders, not the metadata snapshots and the
    volume object of docs/backup.md)."""
    return [f for f in sim.files() if f["mimeType"] != FOLDER_MIME and f["name"].startswith("casfs-pack-")]


def setup_volume(casenv: CasEnv, sim: DriveSim, *extra: str) -> None:
    casenv.init("vol", chunk_size="64KiB")
    out = casenv.run("drive", "auth", "--endpoint", sim.url, "--pack-size", "256KiB", "--pack-age", "0",
                     *extra, "vol").stdout
    assert "cloud tier on " + sim.url in out


def upload_tree(casenv: CasEnv, sim: DriveSim, seed: int) -> tuple[Path, Path]:
    """Set up the volume, mount it, copy a random tree in as ``t`` and wait until every
    chunk is on Drive. Returns (mountpoint, source tree)."""
    setup_volume(casenv, sim)
    mp = casenv.mount("vol")
    src = casenv.tmp / "src"
    make_tree(src, seed=seed)
    shutil.copytree(src, mp / "t")
    fsync_tree(mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain", 120, interval=0.3)
    return mp, src


def assert_each_chunk_once(casenv: CasEnv, sim: DriveSim) -> None:
    """The server holds exactly the confirmed packs, each created once, and their bytes
    are exactly the envelope bytes of the volume's chunks (each chunk once)."""
    st = stats(casenv)
    files = pack_files(sim)
    assert len(files) == st["cloud_packs"]
    assert sum(int(f["size"]) for f in files) == st["cloud_bytes"]
    assert st["cloud_bytes"] == st["stored_bytes"]          # every chunk once, no garbage
    assert all(n == 1 for name, n in sim.counters.created_by_name.items() if name.startswith("casfs-pack-"))


def test_tree_uploaded_once_and_identical_tree_adds_nothing(casenv: CasEnv, drive_sim: DriveSim) -> None:
    setup_volume(casenv, drive_sim)
    mp = casenv.mount("vol")
    make_tree(mp / "one", seed=1)
    fsync_tree(mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain", 120, interval=0.3)
    assert_each_chunk_once(casenv, drive_sim)
    before = drive_sim.counters
    assert before.bytes_uploaded == stats(casenv)["cloud_bytes"]
    make_tree(mp / "two", seed=1)                            # the same bytes again
    fsync_tree(mp)
    time.sleep(2.5)                                          # several uploader rounds
    wait_for(lambda: drained(casenv), "the upload queue to drain", 120, interval=0.3)
    after = drive_sim.counters
    assert after.files_created == before.files_created
    assert after.bytes_uploaded == before.bytes_uploaded
    st = stats(casenv)
    assert st["local_only_chunks"] == 0 and st["cloud_only_chunks"] == 0 and st["both_chunks"] == st["live_chunks"]
    text = casenv.run("drive", "status", "vol").stdout
    assert "queue        0 chunks" in text and f"{st['cloud_packs']} packs" in text


def test_evict_everything_then_read_back_from_drive(casenv: CasEnv, drive_sim: DriveSim) -> None:
    mp, src = upload_tree(casenv, drive_sim, seed=2)
    casenv.umount(mp)
    casenv.mount("vol", mp, "--local-limit", "0")
    wait_for(lambda: stats(casenv)["local_bytes"] == 0, "eviction of every local chunk", 120, interval=0.3)
    st = stats(casenv)
    assert st["cloud_only_chunks"] == st["live_chunks"] > 0
    assert not any(p.is_file() for p in (casenv.data_home / "vol" / "chunks").rglob("*"))
    casenv.umount(mp)
    downloads = drive_sim.counters.requests.get("download", 0)
    casenv.mount("vol", mp, "--local-limit", "0")
    assert compare_trees(src, mp / "t", mtimes=False) == []   # byte-exact, from Drive
    got = drive_sim.counters.requests.get("download", 0) - downloads
    assert st["cloud_packs"] <= got <= st["live_chunks"]     # every pack read; chunks in runs (read-ahead)
    assert "cloud only" in casenv.run("stats", "vol").stdout
    casenv.umount(mp)
    rep = json.loads(casenv.run("fsck", "--json", "vol").stdout)
    assert rep["clean"] and rep["cloud_only"] == stats(casenv)["cloud_only_chunks"]   # fsck and stats agree


def test_kill_during_faulty_uploads_then_remount_drains_once(casenv: CasEnv, drive_sim: DriveSim) -> None:
    setup_volume(casenv, drive_sim)
    for kind, extra in (("drop", {}), ("rate_limit", {}), ("too_many", {"retry_after": 0.2}),
                        ("server_error", {})):
        drive_sim.inject(kind, probability=0.12, **extra)
    mp = casenv.mount("vol")
    src = casenv.tmp / "src"
    make_tree(src, seed=3, files=40)
    shutil.copytree(src, mp / "t")
    fsync_tree(mp)
    wait_for(lambda: drive_sim.counters.requests.get("upload_multipart", 0) >= 2,
             "an upload under way", 60, interval=0.3)
    pid = casenv.daemon_pid(mp)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the daemon to die", 30, interval=0.3)
    casenv.umount(mp)                                       # cleans the dead mount
    s = status(casenv)
    assert s["queued_chunks"] > 0                           # the kill left uploads pending
    casenv.mount("vol", mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain after remount", 180, interval=0.3)
    drive_sim.clear_faults()
    casenv.run("gc", "--grace", "0", "vol")
    assert_each_chunk_once(casenv, drive_sim)
    casenv.umount(mp)
    casenv.mount("vol", mp, "--local-limit", "0")
    wait_for(lambda: stats(casenv)["local_bytes"] == 0, "eviction", 120, interval=0.3)
    casenv.umount(mp)
    casenv.mount("vol", mp)
    assert compare_trees(src, mp / "t", mtimes=False) == []


def test_gc_deletes_dead_packs_and_rewrites_sparse_ones(casenv: CasEnv, drive_sim: DriveSim) -> None:
    setup_volume(casenv, drive_sim, "--repack-threshold", "0.5")
    mp = casenv.mount("vol")
    rnd = random.Random(4)
    keep = {f"k{i}": rnd.randbytes(CHUNK) for i in range(3)}
    drop = {f"d{i}": rnd.randbytes(3 * CHUNK) for i in range(3)}
    for i in range(3):                                      # one pack per pair: 1 live chunk in 4
        (mp / f"k{i}").write_bytes(keep[f"k{i}"])
        (mp / f"d{i}").write_bytes(drop[f"d{i}"])
        fsync_tree(mp)
        wait_for(lambda: drained(casenv), "the upload queue to drain", 120, interval=0.3)
    (mp / "gone").write_bytes(rnd.randbytes(3 * CHUNK))
    fsync_tree(mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain", 120, interval=0.3)
    before = {f["id"] for f in pack_files(drive_sim)}
    for name in [*drop, "gone"]:
        (mp / name).unlink()
    fsync_tree(mp)
    out = casenv.run("gc", "--grace", "0", "vol").stdout
    assert "cloud: deleted" in out
    after = pack_files(drive_sim)
    st = stats(casenv)
    assert sum(int(f["size"]) for f in after) == st["cloud_bytes"] == st["stored_bytes"]
    assert len(after) < len(before)                          # dead and sparse packs are gone
    assert {f["id"] for f in after} - before                 # the live chunks moved to a new pack
    casenv.umount(mp)
    casenv.mount("vol", mp, "--local-limit", "0")
    wait_for(lambda: stats(casenv)["local_bytes"] == 0, "eviction", 120, interval=0.3)
    casenv.umount(mp)
    casenv.mount("vol", mp)
    for name, data in keep.items():
        assert (mp / name).read_bytes() == data


def test_daily_limit_pauses_uploads_and_says_so(casenv: CasEnv, drive_sim: DriveSim) -> None:
    setup_volume(casenv, drive_sim)
    drive_sim.inject("daily_limit", times=1000, match="upload_multipart")
    mp = casenv.mount("vol")
    data = os.urandom(3 * CHUNK)
    (mp / "f").write_bytes(data)
    fsync_tree(mp)
    wait_for(lambda: bool(status(casenv)["paused_until"]), "the pause", 60, interval=0.3)
    s = status(casenv)
    assert "User rate limit exceeded." in s["last_error"] and s["queued_chunks"] == 3
    assert "PAUSED until" in casenv.run("drive", "status", "vol").stdout
    attempts = drive_sim.counters.faults.get("daily_limit", 0)
    time.sleep(2)
    assert drive_sim.counters.faults.get("daily_limit", 0) == attempts   # not retried blindly
    assert (mp / "f").read_bytes() == data                  # the mount works on
    (mp / "g").write_bytes(data[::-1])


def test_drive_unreachable_local_works_and_evicted_reads_fail_with_eio(
        casenv: CasEnv, drive_sim: DriveSim) -> None:
    setup_volume(casenv, drive_sim)
    mp = casenv.mount("vol")
    data = os.urandom(3 * CHUNK)
    (mp / "evicted").write_bytes(data)
    fsync_tree(mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain", 120, interval=0.3)
    casenv.umount(mp)
    casenv.mount("vol", mp, "--local-limit", "0")
    wait_for(lambda: stats(casenv)["local_bytes"] == 0, "eviction", 120, interval=0.3)
    drive_sim.stop()                                         # Drive is gone
    local = os.urandom(2 * CHUNK)
    (mp / "local").write_bytes(local)                        # queued, never evicted
    fsync_tree(mp)
    assert (mp / "local").read_bytes() == local
    with pytest.raises(OSError) as ei:
        (mp / "evicted").read_bytes()
    assert ei.value.errno == errno.EIO
    assert (mp / "local").read_bytes() == local


def test_restore_rebuilds_a_lost_local_store(casenv: CasEnv, drive_sim: DriveSim) -> None:
    mp, src = upload_tree(casenv, drive_sim, seed=5)
    casenv.umount(mp)
    shutil.rmtree(casenv.data_home / "vol" / "chunks")      # the disk is lost
    out = casenv.run("restore", "vol").stdout
    assert "0 lost" in out
    rep = json.loads(casenv.run("fsck", "--json", "vol").stdout)
    assert rep["clean"] and rep["cloud_only"] == 0
    casenv.mount("vol", mp)
    assert compare_trees(src, mp / "t", mtimes=False) == []


def test_drive_commands_refuse_bad_use(casenv: CasEnv, drive_sim: DriveSim) -> None:
    casenv.init("vol", chunk_size="64KiB")
    r = casenv.run("drive", "auth", "vol", check=False)
    assert r.returncode != 0 and "--client-secrets" in r.stderr
    r = casenv.run("drive", "push", "vol", check=False)
    assert r.returncode == 1 and "no cloud tier" in r.stderr
    mp = casenv.tmp / "mp"
    mp.mkdir()
    casenv.mounts.append(mp)                                  # unmounted at teardown if mounted
    for opt in (("--local-limit", "0"), ("--drive-endpoint", drive_sim.url)):
        r = casenv.run("mount", str(mp), "vol", *opt, check=False)
        assert r.returncode == 1 and "has no cloud tier" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    casenv.mount("vol", mp)
    r = casenv.run("drive", "auth", "--endpoint", drive_sim.url, "vol", check=False)
    assert r.returncode == 1 and "is mounted" in r.stderr
    casenv.umount(mp)
    bad = casenv.tmp / "key.json"
    bad.write_text('{"type": "authorized_user_but_not"}')
    r = casenv.run("drive", "auth", "--service-account", str(bad), "vol", check=False)
    assert r.returncode == 1 and "not a service-account key" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
