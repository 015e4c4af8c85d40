"""Two machines on one shared volume: what each sees of the other's changes (docs/sharing.md,
"Consistency").

Side A is a volume made by `casfs init` on the session's MariaDB server, marked shared;
side B is a second casfs data directory (its own XDG_DATA_HOME, volume.toml, run/ and
log/) with A's volume.toml and a fresh store id, which is what `casfs join` makes
(:func:`_side_b_by_copy`). Both mount the volume at once, each with its own daemon,
connection, RAM caches and kernel caches.

Test-only shortcut: B's ``chunks/`` directory is a symlink to A's, so that B reads the
chunk files A wrote without a cloud tier (the data plane between separate stores is
another part of the design). What these tests look at is the metadata: the change log,
the RAM and kernel caches, close-to-open, the stated bounds, refcounts under two
writers.
"""
from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
import tomllib
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pymysql
import pytest
import tomli_w

from cas.engine.coherence import LEVELS, SESSION, STRONG
from tests.conftest import CasEnv
from tests.test_posix_details import data_bytes_mismatches
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="needs /dev/fuse and fusermount3"),
]

CS = 64 * 1024   # chunk size of the volume under test


def pattern(tag: bytes, n: int) -> bytes:
    """``n`` bytes that differ from any other tag's at every 8-byte word."""
    word = (tag * 8)[:6]
    return b"".join(word + i.to_bytes(2, "big") for i in range(n // 8 + 1))[:n]


def _mark_shared(env: CasEnv, name: str) -> None:
    """Set meta ``shared`` = '1' on the volume's database (what `casfs init --shared`
    does; the tests of this file do it through their own connection)."""
    u = urlparse(_vol_url(env, name))
    conn = pymysql.connect(unix_socket=parse_qs(u.query)["unix_socket"][0], user="root", password="",
                           database=u.path.lstrip("/"), autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO meta (k, v) VALUES ('shared', '1') ON DUPLICATE KEY UPDATE v = '1'")
    finally:
        conn.close()


def _vol_url(env: CasEnv, name: str) -> str:
    """The meta URL in side ``env``'s volume.toml of ``name``."""
    return str(tomllib.loads((env.data_home / name / "volume.toml").read_text())["meta_url"])


def _side_b_by_copy(a: CasEnv, tmp: Path, name: str) -> CasEnv:
    """Side B of volume ``name``: a casfs data directory of its own with A's volume.toml
    and a fresh ``store_id`` (what `casfs join` makes); its ``chunks/`` is a symlink to
    A's (the test-only shortcut of the module docstring)."""
    xdg = tmp / "xdg-b"
    vol_b = xdg / "casfs" / name
    vol_b.mkdir(parents=True, mode=0o700)
    for sub in ("run", "log"):
        (vol_b / sub).mkdir(mode=0o700)
    cfg = tomllib.loads((a.data_home / name / "volume.toml").read_text())
    cfg["store_id"] = secrets.token_hex(16)
    with open(os.open(vol_b / "volume.toml", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        tomli_w.dump(cfg, f)
    (vol_b / "chunks").symlink_to(a.data_home / name / "chunks")
    env = dict(a.env)
    env["XDG_DATA_HOME"] = str(xdg)
    (tmp / "b").mkdir()
    return CasEnv(tmp=tmp / "b", server=a.server, env=env)


@pytest.fixture
def two_sides(casenv: CasEnv, tmp_path: Path):  # type: ignore[no-untyped-def]
    """make(consistency) -> (A env, A's mountpoint, B env, B's mountpoint): both sides
    mounted; every mount is unmounted at teardown, failed test or not."""
    sides: list[CasEnv] = []

    def make(consistency: str) -> tuple[CasEnv, Path, CasEnv, Path]:
        casenv.init("vol", chunk_size="64KiB")
        _mark_shared(casenv, "vol")
        b = _side_b_by_copy(casenv, tmp_path, "vol")
        sides.append(b)
        mp_a = casenv.mount("vol", None, "--consistency", consistency)
        mp_b = b.mount("vol", None, "--consistency", consistency)
        return casenv, mp_a, b, mp_b

    try:
        yield make
    finally:
        for b in sides:
            b.cleanup()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_session_close_to_open_namespace_bound_and_two_writers(two_sides) -> None:  # type: ignore[no-untyped-def]
    """Session consistency, one pair of mounts:

    1. close-to-open: a file B has read and cached is rewritten (longer) on A; right
       after A's close() returns, an open() on B reads the new bytes and B's stat shows
       the new size; a tree written on A is read byte-exact on B right after each close;
    2. rename, unlink and mkdir on A are seen on B (lookups and a listing) within the
       stated bound (poll 1 s + kernel timeout 1 s), measured from A's return;
    3. both sides write different slots of one file, then the same slots at once: each
       slot holds one side's whole slot (the last commit's), never a mix; both sides read
       the same bytes; fsck finds the refcounts exact, and data_bytes matches the rows.
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
    os.rename(mp_a / "t" / "0", mp_a / "t" / "renamed")
    os.unlink(mp_a / "t" / "1")
    os.mkdir(mp_a / "t" / "newdir")
    t0 = time.monotonic()
    want = sorted(["sub", "renamed", "newdir"] + [str(i) for i in range(2, 6)])

    def seen() -> bool:
        return ((mp_b / "t" / "renamed").exists() and not (mp_b / "t" / "0").exists()
                and not (mp_b / "t" / "1").exists() and (mp_b / "t" / "newdir").is_dir()
                and sorted(os.listdir(mp_b / "t")) == want)
    wait_for(seen, "B to see A's rename, unlink and mkdir", timeout=bound + 30)
    took = time.monotonic() - t0
    assert took <= bound + 1.0, f"seen after {took:.2f} s, the stated bound is {bound} s"
    assert _read(mp_b / "t" / "renamed") == tree["t/0"]
    # 3. two writers of one file
    size = 4 * CS
    _write(mp_a / "w", pattern(b"base", size))
    wait_for(lambda: os.path.exists(mp_b / "w"), "B to see w", timeout=bound + 30)
    with open(mp_a / "w", "r+b") as fa, open(mp_b / "w", "r+b") as fb:
        fa.seek(0)
        fa.write(pattern(b"A0", 2 * CS))        # slots 0, 1 on A
        fb.seek(2 * CS)
        fb.write(pattern(b"B0", 2 * CS))        # slots 2, 3 on B
    merged = pattern(b"A0", 2 * CS) + pattern(b"B0", 2 * CS)
    assert _read(mp_a / "w") == merged and _read(mp_b / "w") == merged
    slots_written: dict[str, list[bytes]] = {"A": [], "B": []}

    def writer(side: str, mp: Path) -> None:
        for rnd in range(6):
            data = b"".join(pattern(b"%s%d.%d" % (side.encode(), rnd, s), CS) for s in range(4))
            with open(mp / "w", "r+b") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            slots_written[side].extend(data[s * CS:(s + 1) * CS] for s in range(4))

    threads = [threading.Thread(target=writer, args=(s, mp)) for s, mp in (("A", mp_a), ("B", mp_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    final_a, final_b = _read(mp_a / "w"), _read(mp_b / "w")
    assert final_a == final_b and len(final_a) == size
    allowed = set(slots_written["A"]) | set(slots_written["B"])
    for s in range(4):
        assert final_a[s * CS:(s + 1) * CS] in allowed, f"slot {s} mixes two writes"
    r = a.run("fsck", "vol", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert data_bytes_mismatches("vol", CS) == []   # st_blocks' source, from the rows


def test_strong_getattr_sees_a_write_fsynced_on_the_other_side(two_sides) -> None:  # type: ignore[no-untyped-def]
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
