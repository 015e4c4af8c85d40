"""The Drive tier loses nothing and never sticks (issue 8, item 5), end to end: real
mounts, the real casfs CLI, the real google-api-python-client in the daemon, and
tools.drivesim in this process with faults injected.

Each test names the behaviour it guards; docs/cloud.md refers to them by name.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

from tests.conftest import CasEnv
from tests.test_drive import CHUNK, fsync_tree, make_tree, pack_files, wait_for
from tests.treeutil import compare_trees
from tools.drivesim import DriveSim


def auth(casenv: CasEnv, sim: DriveSim, vol: str, *extra: str) -> None:
    casenv.init(vol, chunk_size="64KiB")
    casenv.run("drive", "auth", "--endpoint", sim.url, "--pack-size", "256KiB", "--pack-age", "0",
               *extra, vol)


def status(casenv: CasEnv, vol: str = "vol") -> dict[str, Any]:
    return dict(json.loads(casenv.run("drive", "status", "--json", vol).stdout))


def stats(casenv: CasEnv, vol: str = "vol") -> dict[str, Any]:
    return dict(json.loads(casenv.run("stats", "--json", vol).stdout))


def drained(casenv: CasEnv, vol: str = "vol") -> bool:
    s = status(casenv, vol)
    return bool(s["queued_chunks"] == 0 and s["uploading_packs"] == 0)


def evict_all(casenv: CasEnv, mp: Path, vol: str = "vol") -> None:
    """Remount ``vol`` at ``mp`` with --local-limit 0 and wait until no chunk is local."""
    casenv.umount(mp)
    casenv.mount(vol, mp, "--local-limit", "0")
    wait_for("eviction of every local chunk", lambda: stats(casenv, vol)["local_bytes"] == 0)


# -- 1. two volumes, one Drive folder ------------------------------------------------------

def test_two_volumes_in_one_folder_gc_keeps_the_others_packs_and_auth_refuses_a_third(
        casenv: CasEnv, drive_sim: DriveSim) -> None:
    # Both are accepted: when they are set up the folder is still empty.
    auth(casenv, drive_sim, "va", "--folder", "shared")
    auth(casenv, drive_sim, "vb", "--folder", "shared")
    mpa, mpb = casenv.mount("va"), casenv.mount("vb")
    rnd = random.Random(11)
    data_a, data_b = rnd.randbytes(6 * CHUNK), rnd.randbytes(6 * CHUNK)
    (mpa / "a").write_bytes(data_a)
    (mpb / "b").write_bytes(data_b)
    fsync_tree(mpa)
    fsync_tree(mpb)
    for v in ("va", "vb"):
        wait_for(f"{v}'s upload queue to drain", lambda v=v: drained(casenv, v))
    folders = {f["parents"][0] for f in pack_files(drive_sim)}
    assert len(folders) == 1                                  # really one folder for both
    before = {f["id"] for f in pack_files(drive_sim)}
    assert len(before) == stats(casenv, "va")["cloud_packs"] + stats(casenv, "vb")["cloud_packs"]
    out = casenv.run("gc", "--grace", "0", "va").stdout
    assert "0 orphan objects" in out
    assert {f["id"] for f in pack_files(drive_sim)} == before  # vb's packs are not va's orphans
    evict_all(casenv, mpb, "vb")
    casenv.umount(mpb)
    mpb = casenv.mount("vb", mpb)
    assert (mpb / "b").read_bytes() == data_b                # read back from Drive
    # A third volume pointed at the folder is refused, and nothing of it changes.
    casenv.init("vc", chunk_size="64KiB")
    toml = (casenv.data_home / "vc" / "volume.toml").read_text()
    r = casenv.run("drive", "auth", "--endpoint", drive_sim.url, "--folder", "shared", "vc", check=False)
    assert r.returncode == 1 and "already holds objects of another volume" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (casenv.data_home / "vc" / "volume.toml").read_text() == toml
    assert not status(casenv, "vc")["enabled"]
    assert {f["id"] for f in pack_files(drive_sim)} == before
    # Its own folder is fine.
    casenv.run("drive", "auth", "--endpoint", drive_sim.url, "vc")
    assert status(casenv, "vc")["enabled"]
