"""Dedup figures, deletes, and gc through the real CLI and a real mount."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, CasEnv
from tests.treeutil import IGNORED, compare_trees, snapshot_stdlib, unique_chunk_bytes
from tests.waiting import wait_for

CS = 1 << 20


def stats(casenv: CasEnv, vol: str = "vol") -> dict[str, float]:
    return json.loads(casenv.run("stats", "--json", vol).stdout)


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_dedup_delete_and_gc(casenv: CasEnv, tmp_path: Path) -> None:
    src = snapshot_stdlib(tmp_path / "src")
    casenv.init("vol")
    mp = casenv.mount("vol")
    shutil.copytree(src, mp / "a", symlinks=True, ignore=IGNORED)
    shutil.copytree(src, mp / "b", symlinks=True, ignore=IGNORED)
    logical, unique = unique_chunk_bytes([src, src], CS)
    wait_for(lambda: stats(casenv)["logical_bytes"] == logical, "all files flushed", 30.0, interval=0.1)
    s = stats(casenv)
    true_ratio = logical / unique
    assert s["logical_bytes"] == logical
    assert s["logical_bytes"] / s["unique_bytes"] >= 1.95  # two copies: ~2x (or more, within-tree dups)
    assert abs(s["dedup_ratio"] - true_ratio) / true_ratio < 0.01, (s, true_ratio)
    before_delete = s

    shutil.rmtree(mp / "a")
    wait_for(lambda: stats(casenv)["logical_bytes"] == logical // 2, "deleted copy released", 30.0, interval=0.1)
    s = stats(casenv)
    assert s["stored_bytes"] == before_delete["stored_bytes"]      # nothing freed ...
    assert s["unique_bytes"] == before_delete["unique_bytes"]      # ... every chunk still used
    assert s["garbage_chunks"] == 0
    r = casenv.run("gc", "--grace", "0", "vol")
    assert "freed 0 chunks" in r.stdout
    assert compare_trees(src, mp / "b") == []

    base = stats(casenv)
    rnd = random.Random(7)
    write_synced(mp / "new1.bin", rnd.randbytes(5 * CS + 12345))
    write_synced(mp / "new2.bin", rnd.randbytes(3000))
    wait_for(lambda: stats(casenv)["chunks"] == base["chunks"] + 7, "new chunks recorded", 30.0, interval=0.1)
    grown = stats(casenv)
    assert grown["stored_bytes"] > base["stored_bytes"]
    os.unlink(mp / "new1.bin")
    os.unlink(mp / "new2.bin")
    wait_for(lambda: stats(casenv)["garbage_chunks"] == 7, "deleted files released", 30.0, interval=0.1)
    r = casenv.run("gc", "--grace", "0", "vol")
    assert "freed 7 chunks" in r.stdout
    after = stats(casenv)
    assert after["stored_bytes"] == base["stored_bytes"]
    assert after["chunks"] == base["chunks"]
    assert compare_trees(src, mp / "b") == []


GC_LOOP = """
import subprocess, sys, time
end = time.monotonic() + float(sys.argv[1])
n = 0
while time.monotonic() < end:
    subprocess.run([sys.executable, "-m", "tools.cli", "gc", "--grace", "0", "vol"], check=True,
                   capture_output=True)
    n += 1
print(n)
"""


def test_gc_racing_a_writer(casenv: CasEnv) -> None:
    casenv.init("vol", chunk_size="64KiB")
    mp = casenv.mount("vol")
    rnd = random.Random(3)
    kept: list[tuple[Path, bytes]] = []
    for rnd_i in range(4):
        payloads = [rnd.randbytes(rnd.randrange(1, 6) * 65536 + rnd.randrange(1, 4000)) for _ in range(24)]
        n_chunks = sum(-(-len(p) // 65536) for p in payloads)
        d = mp / f"r{rnd_i}"
        d.mkdir()
        for i, data in enumerate(payloads):
            write_synced(d / f"f{i}", data)
        for i in range(len(payloads)):
            os.unlink(d / f"f{i}")
        wait_for(lambda: json.loads(casenv.run("stats", "--json", "vol").stdout)["garbage_chunks"] == n_chunks,
                 "deleted data released", 30.0, interval=0.1)
        gc = subprocess.Popen([sys.executable, "-c", GC_LOOP, "4"], cwd=ROOT, env=casenv.env,
                              stdout=subprocess.PIPE, text=True)
        try:
            # rewrite the just-deleted bytes while gc deletes their chunks
            for i, data in enumerate(payloads):
                write_synced(d / f"g{i}", data)
        finally:
            out, _ = gc.communicate(timeout=300)
        assert gc.returncode == 0 and int(out) >= 1
        for i, data in enumerate(payloads):
            assert (d / f"g{i}").read_bytes() == data
            kept.append((d / f"g{i}", data))
    r = casenv.run("fsck", "vol", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    casenv.run("gc", "--grace", "0", "vol")
    casenv.umount(mp)
    casenv.mount("vol", mp)  # cold: every chunk comes from the store and is verified
    for path, data in kept:
        assert path.read_bytes() == data
    assert casenv.run("fsck", "vol", check=False).returncode == 0
