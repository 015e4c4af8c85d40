"""Two machines on one shared volume: what each sees of the other's changes (docs/sharing.md,
"Consistency").

Two machines of tests/machines.py (``two_machines``: each its own XDG data dir, local
chunk store, run/ and log/, all on the session's MariaDB server): side A makes the volume
with `casfs init --meta URL --shared` and gives it a Drive tier on a drivesim
(`casfs drive auth --endpoint`, packs uploaded at once), side B is made by the real
`casfs join`. Both mount the volume at once, each with its own daemon, connection, RAM
caches, kernel caches and chunk store: B reads the chunks A wrote through Drive (or
waits for A's upload), as another machine would.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cas.config.volume import open_volume
from cas.db.database import connect
from cas.engine.coherence import LEVELS, SESSION, STRONG
from tests.drivesim_fixture import drive_sim  # noqa: F401 - the fixture
from tests.machines import Machine, Machines, two_machines  # noqa: F401 - the fixture
from tests.test_posix_details import data_bytes_mismatches
from tests.waiting import wait_for
from tools.drivesim import DriveSim

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="needs /dev/fuse and fusermount3"),
]

CS = 64 * 1024   # chunk size of the volume under test
#: slack (seconds) on top of a stated bound, for a loaded machine: a test fails only
#: when a change is not seen within bound + SLACK_S of the operation that made it
SLACK_S = 30.0


def pattern(tag: bytes, n: int) -> bytes:
    """``n`` bytes that differ from any other tag's at every 8-byte word."""
    word = (tag * 8)[:6]
    return b"".join(word + i.to_bytes(2, "big") for i in range(n // 8 + 1))[:n]


Sides = Callable[[str], tuple[Machine, Path, Machine, Path]]


@pytest.fixture
def two_sides(two_machines: Machines, drive_sim: DriveSim,  # noqa: F811 - the fixtures
              monkeypatch: pytest.MonkeyPatch) -> Iterator[Sides]:
    """make(consistency) -> (A, A's mountpoint, B, B's mountpoint): a shared volume with
    a Drive tier (init --shared and drive auth on A, join on B), both sides mounted at
    ``consistency``; the test process opens the volume as A (XDG_DATA_HOME). Every
    mount is unmounted at teardown, failed test or not (the ``two_machines`` finalizer)."""
    m = two_machines

    def make(consistency: str) -> tuple[Machine, Path, Machine, Path]:
        m.init_a("vol", "64KiB")
        m.drive_auth(drive_sim.url, "vol", "--pack-size", "256KiB", "--pack-age", "0")
        m.join_b("vol")
        monkeypatch.setenv("XDG_DATA_HOME", m.a.env["XDG_DATA_HOME"])
        mp_a = m.a.mount("vol", None, "--consistency", consistency)
        mp_b = m.b.mount("vol", None, "--consistency", consistency)
        return m.a, mp_a, m.b, mp_b

    yield make


def _drained() -> bool:
    """No chunk waits for an upload, on either side."""
    with connect(open_volume("vol")) as meta:
        return not meta.db.query("SELECT 1 FROM upload_queue LIMIT 1") and not meta.db.query(
            "SELECT 1 FROM packs WHERE state = 'uploading' LIMIT 1")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_session_close_to_open_namespace_bound_and_two_writers(two_sides: Sides) -> None:
    """Session consistency, one pair of mounts:

    1. close-to-open: a file B has read and cached is rewritten (longer) on A; right
       after A's close() returns, an open() on B reads the new bytes and B's stat shows
       the new size; a tree written on A is read byte-exact on B right after each close;
    2. rename, unlink and mkdir on A are seen on B (lookups and a listing) within the
       stated bound (poll 1 s + kernel timeout 1 s) plus a generous slack, counted from
       before A's operations;
    3. both sides write different slots of one file, then the same slots at once, A
       whole slots and B the middle half of each slot: each slot holds one commit's
       chunk (A's whole slot, or B's middle over one version of the slot), never a mix;
       both sides read the same bytes; fsck on each side is clean (refcounts exact) and
       data_bytes matches the rows.
    """
    a, mp_a, b, mp_b = two_sides(SESSION)
    # 1. close-to-open on a file B has cached
    _write(mp_a / "f", pattern(b"old", 3 * CS + 100))
    assert _read(mp_b / "f") == pattern(b"old", 3 * CS + 100)     # B's pages, attrs, entry
    assert os.stat(mp_b / "f").st_size == 3 * CS + 100
    new = pattern(b"new", 5 * CS + 7)
    _write(mp_a / "f", new)                     # close() returned on A
    with open(mp_b / "f", "rb") as f:           # open() on B after it
        assert os.fstat(f.fileno()).st_size == len(new)
        assert f.read() == new
    assert os.stat(mp_b / "f").st_size == len(new)
    (mp_a / "t" / "sub").mkdir(parents=True)
    tree = {f"t/{i}": pattern(b"t%d" % i, i * 40_000 + 1) for i in range(6)}
    tree["t/sub/deep"] = pattern(b"deep", 2 * CS)
    for rel, data in tree.items():
        _write(mp_a / rel, data)
        assert _read(mp_b / rel) == data, rel
    # 2. the namespace bound
    bound = LEVELS[SESSION].bound_s
    assert sorted(os.listdir(mp_b / "t")) == sorted(["sub"] + [str(i) for i in range(6)])
    assert not (mp_b / "t" / "renamed").exists() and not (mp_b / "t" / "newdir").exists()  # negative entries
    t0 = time.monotonic()                       # before the operations
    os.rename(mp_a / "t" / "0", mp_a / "t" / "renamed")
    os.unlink(mp_a / "t" / "1")
    os.mkdir(mp_a / "t" / "newdir")
    want = sorted(["sub", "renamed", "newdir"] + [str(i) for i in range(2, 6)])

    def seen() -> bool:
        return ((mp_b / "t" / "renamed").exists() and not (mp_b / "t" / "0").exists()
                and not (mp_b / "t" / "1").exists() and (mp_b / "t" / "newdir").is_dir()
                and sorted(os.listdir(mp_b / "t")) == want)
    wait_for(seen, f"B to see A's rename, unlink and mkdir (stated bound {bound} s + {SLACK_S} s slack)",
             timeout=max(0.0, t0 + bound + SLACK_S - time.monotonic()))
    assert _read(mp_b / "t" / "renamed") == tree["t/0"]
    # 3. two writers of one file
    size = 4 * CS
    _write(mp_a / "w", pattern(b"base", size))
    wait_for(lambda: os.path.exists(mp_b / "w"), "B to see w", timeout=bound + SLACK_S)
    with open(mp_a / "w", "r+b") as fa, open(mp_b / "w", "r+b") as fb:
        fa.seek(0)
        fa.write(pattern(b"A0", 2 * CS))        # slots 0, 1 on A
        fb.seek(2 * CS)
        fb.write(pattern(b"B0", 2 * CS))        # slots 2, 3 on B
    merged = pattern(b"A0", 2 * CS) + pattern(b"B0", 2 * CS)
    assert _read(mp_a / "w") == merged and _read(mp_b / "w") == merged
    # A writes whole slots; B writes the middle half of each slot (a partial-slot write,
    # merged with the slot as B last saw it)
    mid = slice(CS // 4, 3 * CS // 4)
    whole: list[list[bytes]] = [[pattern(b"base", size)[s * CS:(s + 1) * CS], merged[s * CS:(s + 1) * CS]]
                                for s in range(4)]
    middles: list[list[bytes]] = [[] for _ in range(4)]

    def writer_a() -> None:
        for rnd in range(6):
            data = [pattern(b"A%d.%d" % (rnd, s), CS) for s in range(4)]
            for s in range(4):
                whole[s].append(data[s])
            with open(mp_a / "w", "r+b") as f:
                f.write(b"".join(data))
                f.flush()
                os.fsync(f.fileno())

    def writer_b() -> None:
        for rnd in range(6):
            with open(mp_b / "w", "r+b") as f:
                for s in range(4):
                    part = pattern(b"B%d.%d" % (rnd, s), CS // 2)
                    middles[s].append(part)
                    os.pwrite(f.fileno(), part, s * CS + CS // 4)
                os.fsync(f.fileno())

    threads = [threading.Thread(target=writer_a), threading.Thread(target=writer_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    final_a, final_b = _read(mp_a / "w"), _read(mp_b / "w")
    assert final_a == final_b and len(final_a) == size
    for s in range(4):
        slot = final_a[s * CS:(s + 1) * CS]
        if slot[mid] in middles[s]:
            # B's write: the rest of the slot is one version of it (A's or the base)
            assert any(slot[:mid.start] == v[:mid.start] and slot[mid.stop:] == v[mid.stop:]
                       for v in whole[s]), f"slot {s} mixes two writes around B's"
        else:
            assert slot in whole[s], f"slot {s} mixes two writes"
    wait_for(_drained, "both sides' uploads", timeout=120, interval=0.2)
    for side in (a, b):
        rep = json.loads(side.run("fsck", "--json", "vol").stdout)
        assert rep["clean"], rep
    assert data_bytes_mismatches("vol", CS) == []   # st_blocks' source, from the rows


def test_strong_getattr_sees_a_write_fsynced_on_the_other_side(two_sides: Sides) -> None:
    """Strong consistency: a stat on B right after a write + fsync on A returned shows
    the new size (every getattr reads the change log; the kernel caches nothing), and
    a rename on A is seen by B's next lookup."""
    _a, mp_a, _b, mp_b = two_sides(STRONG)
    _write(mp_a / "g", b"x" * 10)
    assert os.stat(mp_b / "g").st_size == 10
    with open(mp_a / "g", "r+b") as f:
        for size in (3 * CS + 5, 7 * CS):
            f.seek(size - 1)
            f.write(b"y")
            f.flush()
            os.fsync(f.fileno())
            assert os.stat(mp_b / "g").st_size == size
    os.rename(mp_a / "g", mp_a / "h")
    assert not (mp_b / "g").exists() and (mp_b / "h").exists()
    assert _read(mp_b / "h")[-1:] == b"y"
