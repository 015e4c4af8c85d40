"""The data plane of a shared volume (docs/sharing.md, "Data"): two machines, one MariaDB
database, one drivesim, each machine with its own local chunk store.

The machines are those of tests/machines.py (``two_machines``): side A makes the volume
with `casfs init --meta URL --shared` and `casfs drive auth`, side B (and a third machine
where a test needs one) with the real `casfs join`. Everything runs for real: the casfs
CLI, FUSE mounts, the google-api-python-client against tools.drivesim.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import threading
import time
import tomllib
from typing import Any

import pytest

from cas.chunk.store import LocalStore
from cas.config.volume import open_volume
from cas.db.database import connect
from tests.conftest import CasEnv
from tests.machines import Machines, two_machines  # noqa: F401 - the fixture
from tests.test_drive import CHUNK, fsync_tree, make_tree, pack_files
from tests.treeutil import compare_trees
from tests.waiting import wait_for
from tools.drivesim import DriveSim

#: these tests kill no mount: the default session timeout, so that a heartbeat late on a
#: loaded machine never gets a live mount reaped
SESSION_TIMEOUT_S = "60"


def sql(query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run ``query`` on the test volume's database (side A's volume.toml names it)."""
    meta = connect(open_volume("vol"))
    try:
        return [tuple(r) for r in meta.db.query(query, args)]
    finally:
        meta.close()


@pytest.fixture
def machines(two_machines: Machines, monkeypatch: pytest.MonkeyPatch) -> Machines:
    """``two_machines`` with the default session timeout, and this process's
    XDG_DATA_HOME on A's, so that ``open_volume("vol")`` here (:func:`sql`) opens A's side."""
    for side in (two_machines.a, two_machines.b):
        side.env["CASFS_SESSION_TIMEOUT_S"] = SESSION_TIMEOUT_S
    monkeypatch.setenv("XDG_DATA_HOME", two_machines.a.env["XDG_DATA_HOME"])
    return two_machines


def setup_shared(m: Machines, sim: DriveSim) -> None:
    """`casfs init --meta URL --shared` on A, a Drive tier on ``sim`` (`casfs drive auth`
    on A), then `casfs join` on B (which copies A's [drive] table)."""
    m.init_a("vol", "64KiB")
    m.drive_auth(sim.url, "vol", "--pack-size", "256KiB", "--pack-age", "0")
    m.join_b("vol")


def store_of(side: CasEnv) -> str:
    """The store id `casfs join` gave ``side`` (its volume.toml's ``store_id``)."""
    return str(tomllib.loads((side.data_home / "vol" / "volume.toml").read_text())["store_id"])


def store_ids(env: CasEnv) -> set[bytes]:
    """The chunk ids with a file in ``env``'s local store of "vol"."""
    return set(LocalStore(env.data_home / "vol" / "chunks").iter_ids())


def queue_by_store() -> dict[str, int]:
    return {str(s): int(n) for s, n in sql("SELECT COALESCE(store, 'NULL'), COUNT(*) FROM upload_queue GROUP BY 1")}


def drained() -> bool:
    return not sql("SELECT 1 FROM upload_queue LIMIT 1") and not sql(
        "SELECT 1 FROM packs WHERE state = 'uploading' LIMIT 1")


def packs_on_drive(sim: DriveSim) -> list[tuple[str, int]]:
    """(name, size) of every pack object on the server (not the metadata snapshots)."""
    return sorted((str(f["name"]), int(f["size"])) for f in pack_files(sim))


def fsck(env: CasEnv) -> dict[str, Any]:
    return dict(json.loads(env.run("fsck", "--json", "vol").stdout))


def test_b_reads_a_tree_from_drive_and_its_copy_stores_and_uploads_nothing(
        machines: Machines, drive_sim: DriveSim) -> None:
    a, b = machines.a, machines.b
    setup_shared(machines, drive_sim)
    mp_a = a.mount("vol")
    src = a.tmp / "src"
    make_tree(src, seed=21)
    shutil.copytree(src, mp_a / "t")
    fsync_tree(mp_a)
    wait_for(drained, "A's uploads", 120, interval=0.2)
    a_files = store_ids(a)
    chunks = sql("SELECT COUNT(*) FROM chunks")[0][0]
    before = packs_on_drive(drive_sim)
    assert a_files and queue_by_store() == {}

    mp_b = b.mount("vol")
    # B writes the same tree from its own disk: every chunk is confirmed on Drive, so B
    # stores no file, adds no chunk row and no queue row, and Drive gets nothing
    shutil.copytree(src, mp_b / "copy")
    fsync_tree(mp_b)
    assert store_ids(b) == set()
    assert sql("SELECT COUNT(*) FROM chunks")[0][0] == chunks and queue_by_store() == {}
    # B reads A's tree and its own copy byte-exact, from Drive (B's store had none of it)
    downloads = drive_sim.counters.requests.get("download", 0)
    assert compare_trees(src, mp_b / "t", mtimes=False) == []
    assert compare_trees(src, mp_b / "copy", mtimes=False) == []
    assert drive_sim.counters.requests.get("download", 0) > downloads
    shutil.copytree(mp_b / "t", mp_b / "t3")             # and a copy within the volume
    fsync_tree(mp_b)
    assert sql("SELECT COUNT(*) FROM chunks")[0][0] == chunks and queue_by_store() == {}
    b.run("drive", "push", "vol")                        # B's store has nothing queued
    a.run("drive", "push", "vol")
    assert packs_on_drive(drive_sim) == before                 # not one pack (or byte) more
    assert all(n == 1 for name, n in drive_sim.counters.created_by_name.items() if name.startswith("casfs-pack-"))
    assert len(before) == sql("SELECT COUNT(*) FROM packs WHERE state = 'confirmed'")[0][0]
    # the copies B keeps of what it read are a cache: evictable under --local-limit, and
    # B's eviction leaves A's store alone
    kept = store_ids(b)
    assert kept
    b.umount(mp_b)
    b.mount("vol", mp_b, "--local-limit", "0")
    wait_for(lambda: not store_ids(b), "B's eviction", 60, interval=0.2)
    assert store_ids(a) == a_files
    assert compare_trees(src, mp_b / "t", mtimes=False) == []      # from Drive again
    for side in (a, b):
        rep = fsck(side)
        assert rep["clean"], rep


def test_a_read_on_b_waits_for_a_pending_upload_and_b_keeps_its_own_copy(
        machines: Machines, drive_sim: DriveSim) -> None:
    a, b = machines.a, machines.b
    setup_shared(machines, drive_sim)
    held = drive_sim.inject("server_error", times=10**6, match="upload_multipart")   # A's uploads fail
    mp_a = a.mount("vol")
    rnd = random.Random(22)
    f, g, h = rnd.randbytes(3 * CHUNK + 100), rnd.randbytes(2 * CHUNK + 7), rnd.randbytes(CHUNK + 50)
    for name, data in (("f", f), ("g", g), ("h", h)):
        (mp_a / name).write_bytes(data)
    fsync_tree(mp_a)
    wait_for(lambda: held.fired >= 1, "A's first failed upload", 60, interval=0.2)
    store_a = open_volume("vol").store
    n = sql("SELECT COUNT(*) FROM chunks")[0][0]
    assert n == 9 and queue_by_store() == {store_a: n}

    # a read that waits less than A takes to upload: EIO, and the log names the store
    b.env["CASFS_REMOTE_WAIT_S"] = "1"
    store_b = store_of(b)
    mp_b = b.mount("vol")
    with pytest.raises(OSError) as ei:
        (mp_b / "f").read_bytes()
    assert ei.value.errno == errno.EIO
    log_b = (b.data_home / "vol" / "log" / "mount.log").read_text()
    assert f"its only copy is in store {store_a}" in log_b
    rep = fsck(b)                                        # nothing is damaged: A holds them
    assert rep["clean"] and rep["held_elsewhere"] == n, rep
    assert sql("SELECT COUNT(*) FROM chunks WHERE bad = 1")[0][0] == 0
    # B writes f's bytes itself: it keeps its own copy (no queue row: A's rows stay the
    # one upload) and reads its data at once, without waiting for A
    (mp_b / "f2").write_bytes(f)
    fsync_tree(mp_b)
    assert (mp_b / "f2").read_bytes() == f and (mp_b / "f").read_bytes() == f
    # and B's uploader never claimed A's rows (A's bytes are not in B's store)
    assert len(store_ids(b)) == 4 and queue_by_store() == {store_a: n}

    # a third machine, default wait: its read of g waits for A's upload and succeeds once
    # A's uploads go through again
    b2 = machines.join_another("C", "vol", CASFS_SESSION_TIMEOUT_S=SESSION_TIMEOUT_S)
    logf = b2.data_home / "vol" / "log" / "mount.log"
    mp_b = b2.mount("vol")
    got: list[bytes] = []
    errs: list[BaseException] = []

    def read() -> None:
        try:
            got.append((mp_b / "g").read_bytes())
        except BaseException as exc:   # noqa: BLE001 - reported by the assertion below
            errs.append(exc)
    def write_in_part() -> None:   # must load h's first chunk: waits too, without the engine lock
        try:
            with open(mp_b / "h", "r+b") as fh:
                fh.seek(5)
                fh.write(b"x")
        except BaseException as exc:   # noqa: BLE001 - reported by the assertion below
            errs.append(exc)
    t = threading.Thread(target=read)
    t.start()
    w = threading.Thread(target=write_in_part)
    w.start()
    wait_for(lambda: logf.read_text().count(f"is held by store {store_a}") >= 2, "B's read and write to wait",
             60, 0.1)
    # meanwhile the mount serves others: a write and fsync of another file completes
    def write_other() -> None:
        (mp_b / "other").write_bytes(b"y" * 1000)
        fd = os.open(mp_b / "other", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    other = threading.Thread(target=write_other)
    other.start()
    other.join(60)
    assert not other.is_alive() and t.is_alive() and w.is_alive()
    drive_sim.clear_faults()
    released = time.monotonic()
    t.join(150)
    w.join(150)
    assert not t.is_alive() and not w.is_alive() and not errs and got == [g]
    assert (mp_b / "h").read_bytes() == h[:5] + b"x" + h[6:]
    print(f"B's read returned {time.monotonic() - released:.1f} s after A's uploads were let through")
    fsync_tree(mp_b)                                     # B's new chunk of h: queued in B's store
    wait_for(drained, "A's and B's uploads", 120, interval=0.2)
    assert all(k == 1 for name, k in drive_sim.counters.created_by_name.items() if name.startswith("casfs-pack-"))
    # fsck counts the queue per store and warns of a store no session names
    sql_exec("INSERT INTO upload_queue (chunk, store) VALUES (%s, %s)", (b"\x01" * 32, "f" * 32))
    rep = fsck(a)
    assert rep["unknown_stores"] == ["f" * 32] and rep["clean"], rep
    assert "no mount session" in a.run("fsck", "vol").stdout
    assert store_b not in rep["unknown_stores"]


def sql_exec(query: str, args: tuple[Any, ...]) -> None:
    meta = connect(open_volume("vol"))
    try:
        meta.db.execute(query, args)
    finally:
        meta.close()


def test_gc_from_b_while_a_writes_loses_nothing_and_a_sweeps_its_store(
        machines: Machines, drive_sim: DriveSim) -> None:
    a, b = machines.a, machines.b
    setup_shared(machines, drive_sim)
    a.env.update(CASFS_STORE_SWEEP_S="1", CASFS_STORE_SWEEP_GRACE_S="3")
    mp_a = a.mount("vol")
    rnd = random.Random(23)
    expected: dict[str, bytes] = {}
    for i in range(8):
        expected[f"f{i}"] = rnd.randbytes(rnd.randrange(CHUNK, 4 * CHUNK))
        (mp_a / f"f{i}").write_bytes(expected[f"f{i}"])
    fsync_tree(mp_a)
    stop = threading.Event()
    errs: list[BaseException] = []

    def writer() -> None:   # A overwrites, unlinks and creates files while B's gc runs
        try:
            n = 0
            while not stop.is_set() or n < 20:
                name = f"f{rnd.randrange(12)}"
                if name in expected and rnd.random() < 0.25:
                    (mp_a / name).unlink()
                    del expected[name]
                else:
                    data = rnd.randbytes(rnd.randrange(1, 4 * CHUNK))
                    with open(mp_a / name, "wb") as fh:
                        fh.write(data)
                        os.fsync(fh.fileno())
                    expected[name] = data
                n += 1
        except BaseException as exc:   # noqa: BLE001 - reported below
            errs.append(exc)
    t = threading.Thread(target=writer)
    t.start()
    deleted = 0
    try:
        for _ in range(2):
            out = b.run("gc", "--grace", "0", "vol").stdout
            m = re.search(r"(?:deleted|freed) (\d+) chunks", out)
            assert m is not None, out
            deleted += int(m.group(1))
    finally:
        stop.set()
        t.join(300)
    assert not errs and not t.is_alive()
    fsync_tree(mp_a)
    assert deleted > 0                                   # B's gc did delete rows A had dropped
    # A's mount sweeps the files of rows B's gc deleted: A's store keeps no orphan
    wait_for(lambda: not store_ids(a) - {bytes(r[0]) for r in sql("SELECT id FROM chunks")},
             "A's store sweep", 60, interval=0.3)
    a.umount(mp_a)
    for side in (a, b):
        rep = fsck(side)
        assert rep["clean"] and rep["orphan_files"] == 0, rep
    a.mount("vol", mp_a)
    assert sorted(p.name for p in mp_a.iterdir()) == sorted(expected)
    for name, data in expected.items():
        assert (mp_a / name).read_bytes() == data, name


def test_a_mounts_pack_owner_names_the_host_of_its_session(machines: Machines, drive_sim: DriveSim) -> None:
    # the uploader's packs name the host the session row names (CASFS_SESSION_HOST when
    # set: machine-A here): reaping a dead session expires its packs' leases by that prefix
    m = machines
    setup_shared(m, drive_sim)
    drive_sim.inject("slow", times=1, delay=8, match="upload_multipart")   # one upload in flight a while
    mp = m.a.mount("vol")
    (mp / "f").write_bytes(random.Random(5).randbytes(200_000))
    fsync_tree(mp)
    seen: list[tuple[Any, ...]] = []

    def uploading() -> bool:
        seen[:] = sql("SELECT owner FROM packs WHERE state = 'uploading'")
        return bool(seen)
    wait_for(uploading, "A's pack upload", 60, interval=0.1)
    assert sql("SELECT host FROM sessions") == [("machine-A",)]
    assert all(str(o).startswith("machine-A:") for (o,) in seen), seen
    wait_for(drained, "A's upload to finish", 120, 0.2)
