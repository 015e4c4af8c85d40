"""`casfs find` answers what find(1) on the mount answers; `casfs du` splits a subtree
into unique, shared and hole bytes; `casfs find --status` follows the cloud tier.

Each test builds its tree through a real mount, has the daemon commit it (the commit
request of `casfs umount`, without unmounting), and runs the real CLI beside find(1)
(or an os.walk oracle, for what find(1) cannot test: xattrs, identical content).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

from tests.conftest import CasEnv
from tests.test_drive import drained, fsync_tree, setup_volume, stats
from tests.waiting import wait_for
from tools.drivesim import DriveSim
from tools.cli.mountcmd import commit_before_unmount

CHUNK = 64 * 1024
DAY = 86400


def commit(casenv: CasEnv, mp: Path, vol: str = "vol") -> None:
    """Have the daemon of ``mp`` commit every buffer and namespace change now."""
    commit_before_unmount(str(mp), casenv.daemon_pid(mp), casenv.data_home / vol / "run",
                          time.monotonic() + 120)


def cfind(casenv: CasEnv, *args: str) -> set[str]:
    out = casenv.run("find", *args).stdout
    return set(out.splitlines())


def ffind(mp: Path, *args: str, start: str = ".") -> set[str]:
    """find(1) run on the mount, from ``mp``; the start point itself left out, "./" cut."""
    out = subprocess.run(["find", start, "-mindepth", "1", *args], cwd=mp, capture_output=True,
                         text=True, check=True).stdout
    return {p[2:] if p.startswith("./") else p for p in out.splitlines()}


def build_tree(mp: Path) -> None:
    """Names with glob and LIKE specials, sizes around 100 KB, mtimes of 1 h to 10 d, a
    symlink, a hard link, a sparse file, copies, and xattrs."""
    now = time.time()
    for d in ("a/b", "c", "img"):
        (mp / d).mkdir(parents=True)
    files = {
        "a/x.txt": os.urandom(10), "a/y.TXT": os.urandom(200_000), "a/b/deep.txt": b"same" * 40_000,
        "c/copy.txt": b"same" * 40_000, "c/copy2.bin": b"same" * 40_000, "c/near.txt": b"same" * 40_001,
        "img/img1.jpg": os.urandom(99), "img/img2.jpg": os.urandom(100_000), "img/imgA.jpg": b"",
        "we%ird_x": b"1", "weXirdYx": b"2", "c/[lit]": b"3",
    }
    for name, data in files.items():
        (mp / name).write_bytes(data)
    with open(mp / "c/sparse", "wb") as f:          # two chunks, one of them a hole
        f.seek(CHUNK)
        f.write(b"same" * 40_000)
    os.link(mp / "a/x.txt", mp / "c/x-link")
    os.symlink("a/x.txt", mp / "lnk")
    ages = {"a/x.txt": 3600, "a/y.TXT": 3 * DAY, "img/img1.jpg": 10 * DAY, "c/copy.txt": 10 * DAY, "lnk": 7 * DAY}
    for name, age in ages.items():
        os.utime(mp / name, (now - age, now - age), follow_symlinks=False)
    os.setxattr(mp / "a/y.TXT", "user.tag", b"red")
    os.setxattr(mp / "img/img2.jpg", "user.tag", b"blue")
    os.setxattr(mp / "c", "user.tag", b"red")
    os.setxattr(mp / "img/img2.jpg", "user.other", b"")


def test_find_matches_find1(casenv: CasEnv) -> None:
    casenv.init("vol", chunk_size="64KiB")
    mp = casenv.mount("vol")
    build_tree(mp)
    commit(casenv, mp)
    # name globs: *, ?, [...], [!...], a literal '[', LIKE's own % and _ taken literally,
    # case-sensitive
    for glob in ("*.jpg", "img?.jpg", "img[0-9].jpg", "img[!0-9].jpg", "*.txt", "*.TXT", "we%ird_*",
                 "\\[lit]", "*", "[[]*"):
        assert cfind(casenv, "vol", "--name", glob) == ffind(mp, "-name", glob), glob
    assert cfind(casenv, "vol", "--name", "we%ird_*") == {"we%ird_x"}
    # below a directory, in both spellings: VOLUME PATH, and a path on the mount
    assert cfind(casenv, "vol", "a", "--name", "*.txt") == ffind(mp, "-name", "*.txt", start="a") == {
        "a/x.txt", "a/b/deep.txt"}
    assert cfind(casenv, str(mp / "c"), "--type", "f") == ffind(mp, "-type", "f", start=str(mp / "c"))
    # types, sizes (exact bytes: find's -size Nc), mtimes (days, as find's -mtime)
    for t in "fdl":
        assert cfind(casenv, "vol", "--type", t) == ffind(mp, "-type", t), t
    assert cfind(casenv, "vol", "--size", "+100000") == ffind(mp, "-size", "+100000c")
    assert cfind(casenv, "vol", "--type", "f", "--size", "-100") == ffind(mp, "-type", "f", "-size", "-100c")
    assert cfind(casenv, "vol", "--size", "100000") == ffind(mp, "-size", "100000c") == {"img/img2.jpg"}
    assert cfind(casenv, "vol", "--size", "+150k") == ffind(mp, "-size", f"+{150 * 1024}c")
    assert cfind(casenv, "vol", "--mtime", "-2d") == ffind(mp, "-mtime", "-2")
    assert cfind(casenv, "vol", "--mtime", "+5d", "--type", "f") == ffind(mp, "-mtime", "+5", "-type", "f") == {
        "img/img1.jpg", "c/copy.txt"}
    assert cfind(casenv, "vol", "--mtime", "-90m", "--name", "*.txt") == ffind(mp, "-mmin", "-90", "-name", "*.txt")
    # xattrs: an os.walk + getxattr oracle
    def with_xattr(key: str, value: bytes | None = None) -> set[str]:
        out = set()
        for root, dirs, names in os.walk(mp):
            for n in dirs + names:
                p = Path(root, n)
                if p.is_symlink():
                    continue
                if key in os.listxattr(p) and (value is None or os.getxattr(p, key) == value):
                    out.add(str(p.relative_to(mp)))
        return out
    assert cfind(casenv, "vol", "--xattr", "user.tag") == with_xattr("user.tag") == {"a/y.TXT", "img/img2.jpg", "c"}
    assert cfind(casenv, "vol", "--xattr", "user.tag=red") == with_xattr("user.tag", b"red") == {"a/y.TXT", "c"}
    assert cfind(casenv, "vol", "--xattr", "user.tag=red", "--type", "f") == {"a/y.TXT"}
    assert cfind(casenv, "vol", "--xattr", "user.tag", "--xattr", "user.other=") == {"img/img2.jpg"}
    # duplicates: files with the same bytes (a content oracle), the file itself left out
    def same_content(rel: str) -> set[str]:
        want = hashlib.sha256((mp / rel).read_bytes()).digest()
        ino = os.stat(mp / rel).st_ino
        return {str(p.relative_to(mp)) for p in mp.rglob("*")
                if p.is_file() and not p.is_symlink() and os.stat(p).st_ino != ino
                and hashlib.sha256(p.read_bytes()).digest() == want}
    assert cfind(casenv, "vol", "--duplicates-of", "c/copy.txt") == same_content("c/copy.txt") == {
        "a/b/deep.txt", "c/copy2.bin"}
    assert cfind(casenv, "vol", "--duplicates-of", str(mp / "a/b/deep.txt")) == same_content("a/b/deep.txt")
    assert cfind(casenv, "vol", "--duplicates-of", "img/imgA.jpg") == same_content("img/imgA.jpg") == set()
    # hard links: both names, as find(1)
    assert cfind(casenv, "vol", "--name", "x*") == ffind(mp, "-name", "x*") == {"a/x.txt", "c/x-link"}
    # output formats
    r = casenv.run("find", "vol", "img", "--name", "img[12].jpg", "--print0")
    assert sorted(r.stdout.split("\0")[:-1]) == ["img/img1.jpg", "img/img2.jpg"]
    rows = [json.loads(line) for line in casenv.run("find", "vol", "--name", "img2.jpg", "--json").stdout.splitlines()]
    assert rows == [{"path": "img/img2.jpg", "inode": os.stat(mp / "img/img2.jpg").st_ino, "type": "f",
                     "size": 100_000, "mtime_ns": os.stat(mp / "img/img2.jpg").st_mtime_ns}]
    # errors reach the user: one line, exit status non-zero
    r = casenv.run("find", "vol", "nope", "--name", "*", check=False)
    assert r.returncode == 1 and "nope: no such file or directory" in r.stderr and "Traceback" not in r.stderr
    r = casenv.run("find", "vol", "a/x.txt", check=False)
    assert r.returncode == 1 and "not a directory" in r.stderr
    r = casenv.run("find", "vol", "--size", "lots", check=False)
    assert r.returncode == 2 and "--size" in r.stderr
    r = casenv.run("find", "vol", "--duplicates-of", "img", check=False)
    assert r.returncode == 1 and "not a regular file" in r.stderr
    r = casenv.run("find", "vol", "--status", "synced", check=False)
    assert r.returncode == 1 and "no cloud tier" in r.stderr
    # unmounted: the same answers from the database alone
    before = cfind(casenv, "vol", "--type", "f", "--size", "+1000")
    casenv.umount(mp)
    assert cfind(casenv, "vol", "--type", "f", "--size", "+1000") == before


def test_du_unique_shared_and_holes(casenv: CasEnv) -> None:
    casenv.init("vol", chunk_size="64KiB")
    mp = casenv.mount("vol")
    (mp / "sub/deeper").mkdir(parents=True)
    (mp / "other").mkdir()
    u1, u2, shared, o = (os.urandom(n * CHUNK) for n in (3, 2, 2, 1))
    (mp / "sub/u1").write_bytes(u1)
    (mp / "sub/deeper/u2").write_bytes(u2)
    (mp / "sub/deeper/u1-copy").write_bytes(u1)       # dedup inside the subtree: still unique to it
    (mp / "sub/s").write_bytes(shared)
    (mp / "other/s2").write_bytes(shared)             # the same chunks outside: shared
    (mp / "other/o").write_bytes(o)
    h = os.urandom(CHUNK)
    with open(mp / "sub/holey", "wb") as f:           # one chunk of data after three of hole
        f.seek(3 * CHUNK)
        f.write(h)
    os.link(mp / "sub/u1", mp / "sub/deeper/u1-link")  # one inode, counted once
    commit(casenv, mp)

    def du(*args: str) -> object:
        return json.loads(casenv.run("du", "--json", "vol", *args).stdout)

    sub = du("sub")
    assert isinstance(sub, dict)
    assert sub["files"] == 5 and sub["directories"] == 1
    assert sub["logical"] == (3 + 2 + 3 + 2 + 4) * CHUNK
    assert sub["holes"] == 3 * CHUNK
    assert sub["data"] == sub["logical"] - sub["holes"]
    assert sub["unique"] == (3 + 2 + 1) * CHUNK       # u1 once, u2, holey's data chunk
    assert sub["shared"] == 2 * CHUNK
    assert sub["chunks"] == 3 + 2 + 1 + 2
    assert sub["dedup_saved"] == 3 * CHUNK            # u1-copy
    assert 6 * CHUNK <= sub["unique_stored"] < 6 * CHUNK + 6 * 1024   # random bytes: envelopes barely grow
    assert 2 * CHUNK <= sub["shared_stored"] < 2 * CHUNK + 2 * 1024
    rows = du("/", "-d", "1")
    assert isinstance(rows, list)
    by = {r["path"]: r for r in rows}
    assert set(by) == {"/other", "/sub", "/"}
    assert by["/other"]["unique"] == CHUNK and by["/other"]["shared"] == 2 * CHUNK
    assert by["/sub"] == {**sub, "path": "/sub"}
    assert by["/"]["shared"] == 0 and by["/"]["unique"] == (3 + 2 + 1 + 2 + 1) * CHUNK
    assert by["/"]["logical"] == sub["logical"] + 3 * CHUNK
    assert du("sub/deeper/u2")["unique"] == 2 * CHUNK   # a single file
    text = casenv.run("du", "vol", "sub").stdout
    assert "384.00 KiB" in text and "128.00 KiB" in text and "192.00 KiB" in text   # unique, shared, holes


def test_find_status_follows_the_cloud_tier(casenv: CasEnv, drive_sim: DriveSim) -> None:
    setup_volume(casenv, drive_sim)
    mp = casenv.mount("vol", None, "--local-limit", "0")
    (mp / "up").mkdir()
    for i in range(2):
        (mp / f"up/f{i}").write_bytes(os.urandom(2 * CHUNK))
    (mp / "empty").write_bytes(b"")
    fsync_tree(mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain", 120)
    wait_for(lambda: stats(casenv)["cloud_only_chunks"] == 4, "eviction of the uploaded chunks", 120)
    drive_sim.inject("daily_limit", times=100_000, match="upload_multipart")   # nothing uploads now
    (mp / "new").write_bytes(os.urandom(CHUNK))
    fsync_tree(mp)
    commit(casenv, mp)
    assert cfind(casenv, "vol", "--status", "synced") == {"up/f0", "up/f1", "empty"}
    assert cfind(casenv, "vol", "--status", "pending") == {"new"}
    assert cfind(casenv, "vol", "--status", "cloud-only") == {"up/f0", "up/f1"}
    assert cfind(casenv, "vol", "up", "--status", "pending") == set()
    # stats --watch shows the stuck queue: one chunk, no upload rate, so no ETA
    w = json.loads(casenv.run("stats", "vol", "--watch", "--json", "--count", "1", "--interval", "0.2").stdout)
    assert w["queued_chunks"] == 1 and w["queued_bytes"] > CHUNK and w["eta_s"] is None, w
