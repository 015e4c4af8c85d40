"""Requests that do not wait for each other (docs/concurrency.md), on real mounts.

* Creates complete while another thread's fsync of a large file runs: the flush stores
  its chunks without the engine lock, in a worker thread, so the FUSE loop keeps serving.
  Counted, not timed: the creates that finished between the fsync's start and its end
  (the old engine ran the whole flush on the loop thread: none).
* A read of a local chunk completes while a read of an evicted chunk waits on Drive
  (drivesim's ``slow`` fault holds every download): the cloud fetch runs in a worker
  thread without the engine lock. Order only: the local read finishes first.
* Several threads of random operations at once, each in its own subtree checked against
  its own model, plus writers and readers sharing files, checked byte-exact after fsync
  and after a remount.
"""
from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path
from typing import Any

from tests.conftest import CasEnv
from tests.drivesim_fixture import drive_sim  # noqa: F401 - the fixture
from tests.test_drive import drained, fsync_tree
from tests.test_drive_overlap import evict_and_remount
from tests.waiting import wait_for
from tools.drivesim import DriveSim

MIB = 1 << 20
BIG = 128 * MIB       # the fsynced file: two flights of the 64 MiB per-file buffer bound
DURING_MIN = 5        # creates that must finish inside the fsync (old engine: 0, or 1 by a race)
JOIN_S = 600.0        # deadline of a helper thread


def _write_big(path: Path, seed: int) -> tuple[int, str]:
    """Open ``path``, write BIG pseudo-random bytes, return (fd, sha256 hex) unflushed."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(BIG // MIB):
        piece = rng.randbytes(MIB)
        h.update(piece)
        os.write(fd, piece)
    return fd, h.hexdigest()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(MIB):
            h.update(piece)
    return h.hexdigest()


def test_creates_complete_while_another_thread_fsyncs_a_large_file(casenv: CasEnv, mounted: Any) -> None:
    mp = mounted("1MiB")
    (mp / "d").mkdir()
    fd, want = _write_big(mp / "big", 1)
    done = threading.Event()
    failed: list[BaseException] = []

    def do_fsync() -> None:
        try:
            os.fsync(fd)
        except BaseException as exc:
            failed.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=do_fsync)
    t.start()
    during = made = 0
    while not done.is_set():
        p = mp / "d" / f"n{made}"
        with open(p, "xb") as f:          # CREATE (and a LOOKUP of a new name) reach the daemon
            f.write(b"x")
        assert p.stat().st_size == 1
        made += 1
        if not done.is_set():
            during += 1
    t.join(JOIN_S)
    assert not t.is_alive() and not failed, failed
    os.close(fd)
    assert during >= DURING_MIN, f"only {during} creates finished while the fsync ran"
    assert sorted(os.listdir(mp / "d")) == sorted(f"n{i}" for i in range(made))
    casenv.umount(mp)
    casenv.mount("vol", mp)
    assert _digest(mp / "big") == want
    assert all((mp / "d" / f"n{i}").read_bytes() == b"x" for i in range(made))


def test_local_read_completes_while_an_evicted_read_waits_on_drive(casenv: CasEnv, drive_sim: DriveSim) -> None:
    casenv.init("vol", chunk_size="64KiB")
    casenv.run("drive", "auth", "--endpoint", drive_sim.url, "--pack-size", "256KiB", "--pack-age", "0", "vol")
    mp = casenv.mount("vol")
    cold = os.urandom(256 * 1024)
    (mp / "cold").write_bytes(cold)
    fsync_tree(mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain", 120, interval=0.3)
    evict_and_remount(casenv, mp)             # every chunk of "cold" only on Drive now
    casenv.umount(mp)
    casenv.mount("vol", mp)                   # no local limit: new chunks stay local
    hot = os.urandom(128 * 1024)
    (mp / "hot").write_bytes(hot)
    fsync_tree(mp)
    casenv.umount(mp)
    casenv.mount("vol", mp)                   # empty RAM cache and page cache
    drive_sim.inject("slow", probability=1.0, match="download", delay=8.0)
    got: list[bytes] = []
    cold_done = threading.Event()

    def read_cold() -> None:
        try:
            with open(mp / "cold", "rb", buffering=0) as f:
                got.append(f.read(64 * 1024))
        finally:
            cold_done.set()

    t = threading.Thread(target=read_cold)
    t.start()
    wait_for(lambda: drive_sim.counters.max_in_flight.get("download", 0) >= 1,
             "the cold read's download to be held by drivesim", 60)
    assert (mp / "hot").read_bytes() == hot
    local_first = not cold_done.is_set()
    t.join(JOIN_S)
    assert got == [cold[:64 * 1024]]
    assert local_first, "the local read waited for the Drive download"
    drive_sim.clear_faults()
    assert (mp / "cold").read_bytes() == cold


def _worker(root: Path, seed: int, ops: int, errors: list[BaseException]) -> None:
    """Random operations in ``root`` (this thread's own subtree), mirrored in a model
    dict; at the end every file is checked byte-exact after an fsync."""
    try:
        rng = random.Random(seed)
        model: dict[str, bytearray] = {}
        root.mkdir()
        for _ in range(ops):
            op = rng.random()
            names = sorted(model)
            if op < 0.25 or not names:
                name = f"f{rng.randrange(1_000_000)}"
                data = rng.randbytes(rng.choice([0, 100, 70_000, 300_000]))
                (root / name).write_bytes(data)
                model[name] = bytearray(data)
            elif op < 0.55:
                name = rng.choice(names)
                off = rng.randrange(len(model[name]) + 70_000)
                data = rng.randbytes(rng.choice([1, 5000, 90_000]))
                with open(root / name, "r+b") as f:
                    f.seek(off)
                    f.write(data)
                m = model[name]
                if off > len(m):
                    m.extend(bytes(off - len(m)))
                m[off:off + len(data)] = data
            elif op < 0.65:
                name = rng.choice(names)
                size = rng.randrange(len(model[name]) + 1)
                os.truncate(root / name, size)
                del model[name][size:]
            elif op < 0.75:
                name = rng.choice(names)
                new = f"r{rng.randrange(1_000_000)}"
                os.rename(root / name, root / new)
                model[new] = model.pop(name)
            elif op < 0.85:
                name = rng.choice(names)
                os.unlink(root / name)
                del model[name]
            else:
                name = rng.choice(names)
                assert (root / name).read_bytes() == bytes(model[name]), name
        for name, m in model.items():
            fd = os.open(root / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            assert (root / name).read_bytes() == bytes(m), name
        assert sorted(os.listdir(root)) == sorted(model)
        (root / "model.ok").write_text("\n".join(sorted(model)))
        for name, m in model.items():
            (root.parent / f"{root.name}.{name}.sha").write_text(hashlib.sha256(m).hexdigest())
    except BaseException as exc:
        errors.append(exc)


def test_stress_threads_of_random_operations_on_one_mount(casenv: CasEnv, mounted: Any) -> None:
    """Four threads of random operations, each in its own subtree with its own model,
    while a writer rewrites a shared file in place (each version one whole-file
    pwrite of the same length) and two readers read it: a reader sees only bytes of
    some version while the writer runs, and after the writer's fsync the last one."""
    mp = mounted("64KiB")
    errors: list[BaseException] = []
    size = 1 * MIB
    versions = [bytes([v]) * size for v in range(1, 9)]
    shared = mp / "shared"
    shared.write_bytes(versions[0])
    fsynced = threading.Event()
    stop = threading.Event()

    def writer() -> None:
        try:
            fd = os.open(shared, os.O_WRONLY)
            try:
                for v in versions[1:]:
                    os.pwrite(fd, v, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsynced.set()
        except BaseException as exc:
            errors.append(exc)
            fsynced.set()

    def reader() -> None:
        try:
            allowed = b"".join(v[:1] for v in versions)
            while not stop.is_set():
                after = fsynced.is_set()
                with open(shared, "rb", buffering=0) as f:
                    for off in range(0, size, 64 * 1024):
                        piece = f.read(64 * 1024)
                        assert len(piece) == 64 * 1024
                        assert not piece.translate(None, allowed), f"bytes of no version at {off}"
                        if after:
                            assert piece == versions[-1][:len(piece)], "stale after fsync"
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=_worker, args=(mp / f"w{i}", 100 + i, 60, errors)) for i in range(4)]
    others = [threading.Thread(target=writer), threading.Thread(target=reader), threading.Thread(target=reader)]
    for t in workers + others:
        t.start()
    for t in workers:
        t.join(JOIN_S)
    others[0].join(JOIN_S)
    wait_for(fsynced.is_set, "the shared writer's fsync", 120)
    stop.set()
    for t in others:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in workers + others)
    assert not errors, errors
    assert shared.read_bytes() == versions[-1]
    fsync_tree(mp)
    casenv.umount(mp)
    casenv.mount("vol", mp)
    assert shared.read_bytes() == versions[-1]
    for i in range(4):
        root = mp / f"w{i}"
        names = [n for n in (root / "model.ok").read_text().split("\n") if n]
        assert sorted(os.listdir(root)) == sorted([*names, "model.ok"])
        for name in names:
            want = (mp / f"w{i}.{name}.sha").read_text()
            assert hashlib.sha256((root / name).read_bytes()).hexdigest() == want, (i, name)
