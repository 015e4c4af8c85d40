"""Engine tests of cas.engine.fs.Filesystem, without FUSE.

Each test gets a volume in ``tmp_path`` whose metadata lives in a database of its own on
the session MariaDB server (``mysql_server``), dropped at teardown. The chunk size is
64 KiB so that multi-chunk files stay small. Expected chunk ids, refcounts and sizes are
computed in the test from the bytes written (hashlib), never taken from the engine.

The engine group-commits its namespace operations (cas.db.database.Database.start_group_commit),
so the tests look at the database through their own connection after ``fs.sync()``
(``Engine.q``), and run fsck, stats and gc on connections of their own, as the CLI does.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
import stat as S
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

import cas.maint.fsck
import cas.maint.gc
import cas.db.database
import cas.maint.stats
from cas.chunk.envelope import HEADER_SIZE
from cas.errors import CasError, FsError
from cas.engine.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, Filesystem
from cas.db.server import EmbeddedServer
from cas.config.volume import Volume, create_volume_dir

CS = 64 * 1024
ROOT = 1
UID, GID = os.getuid(), os.getgid()
FILE_MODE = 0o644
_db_counter = itertools.count()


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def slots_of(content: bytes | bytearray) -> dict[int, bytes]:
    """slot -> exact bytes of the slot, for the non-zero slots of a file's content."""
    out = {}
    for i in range(0, len(content), CS):
        piece = bytes(content[i:i + CS])
        if piece.count(0) != len(piece):
            out[i // CS] = piece
    return out


def expected_refs(*contents: bytes | bytearray) -> Counter[bytes]:
    """chunk id -> number of slots naming it, for files with these contents."""
    c: Counter[bytes] = Counter()
    for content in contents:
        c.update(sha(p) for p in slots_of(content).values())
    return c


class Engine:
    """A volume, its database and the Filesystem(s) opened on it."""

    def __init__(self, tmp_path: Path, server: EmbeddedServer) -> None:
        self.dbname = f"tfs_{os.getpid()}_{next(_db_counter)}"
        self.server = server
        url = f"mysql://root@localhost/{self.dbname}?unix_socket={server.socket}"
        self.vol: Volume = create_volume_dir(str(tmp_path / "vol"), CS, "zstd:3", url)
        cas.db.database.initialize(self.vol, UID, GID)
        self.vol.save()
        self.admin = pymysql.connect(unix_socket=str(server.socket), user="root", password="",
                                     database=self.dbname, autocommit=True)
        self.opened: list[Filesystem] = []
        self.fs = self.new_fs()

    def new_fs(self, cache_bytes: int = 64 << 20) -> Filesystem:
        fs = Filesystem(cas.db.database.connect(self.vol), cache_bytes=cache_bytes)
        self.opened.append(fs)
        return fs

    def reopen(self, cache_bytes: int = 64 << 20) -> Filesystem:
        """Close the current Filesystem cleanly and open a fresh one (empty RAM state)."""
        self.fs.close()
        self.opened.remove(self.fs)
        self.fs = self.new_fs(cache_bytes)
        return self.fs

    def abandon(self, fs: Filesystem) -> None:
        """Forget ``fs`` without closing it (its connection is gone: a crash)."""
        fs.pool.shutdown(wait=True)
        fs.io_pool.shutdown(wait=True)
        self.opened.remove(fs)

    def q(self, sql: str, args: Any = None, sync: bool = True) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` on the test's own connection; with ``sync`` the Filesystem's
        open group transaction is committed first."""
        if sync:
            self.fs.sync()
        with self.admin.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def chunk_rows(self) -> dict[bytes, tuple[int, int, int]]:
        """chunk id -> (refcount, length, stored_length)."""
        return {bytes(r[0]): (int(r[1]), int(r[2]), int(r[3]))
                for r in self.q("SELECT id, refcount, length, stored_length FROM chunks")}

    def refcounts(self) -> dict[bytes, int]:
        return {c: r[0] for c, r in self.chunk_rows().items()}

    def manifest_counts(self) -> Counter[bytes]:
        return Counter(bytes(r[0]) for r in self.q("SELECT chunk FROM manifests"))

    def store_files(self) -> dict[bytes, int]:
        """chunk id -> file size, for every chunk file on disk (walked independently)."""
        out = {}
        for dirpath, _dirs, files in os.walk(self.vol.chunk_dir):
            for f in files:
                if len(f) == 64:
                    out[bytes.fromhex(f)] = os.path.getsize(os.path.join(dirpath, f))
        return out

    def other(self) -> cas.db.database.Metadata:
        """A second connection to the volume (what `casfs fsck|gc|stats` would open)."""
        return cas.db.database.connect(self.vol)

    def fsck(self, **kw: Any) -> cas.maint.fsck.FsckReport:
        self.fs.sync()
        with self.other() as m:
            return cas.maint.fsck.check(m, **kw)

    def stats(self) -> cas.maint.stats.VolumeStats:
        self.fs.sync()
        with self.other() as m:
            return cas.maint.stats.collect(m)

    def gc(self, grace_s: float) -> cas.maint.gc.GcResult:
        self.fs.sync()
        with self.other() as m:
            return cas.maint.gc.collect(m, grace_s=grace_s)

    def close(self) -> None:
        for fs in self.opened:
            try:
                fs.close()
            except Exception:  # noqa: BLE001 - teardown must go on
                pass
        self.opened.clear()
        try:
            with self.admin.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{self.dbname}`")
        finally:
            self.admin.close()


@pytest.fixture
def eng(tmp_path: Path, mysql_server: EmbeddedServer) -> Iterator[Engine]:
    e = Engine(tmp_path, mysql_server)
    try:
        yield e
    finally:
        e.close()


# -- helpers ---------------------------------------------------------------------------

def make_file(fs: Filesystem, name: bytes, data: bytes, parent: int = ROOT, offset: int = 0,
              release: bool = True, flush: bool = True) -> int:
    ino = fs.create(parent, name, FILE_MODE, UID, GID).ino
    if data:
        assert fs.write(ino, offset, data) == len(data)
    if flush:
        fs.fsync(ino)
    if release:
        fs.release(ino)
    return ino


def read_all(fs: Filesystem, ino: int) -> bytes:
    """The whole content of ``ino`` through an open/read/release cycle."""
    size = fs.getattr(ino).size
    fs.open(ino)
    try:
        out = fs.read(ino, 0, size + 4096)
    finally:
        fs.release(ino)
    assert len(out) == size
    return out


def read_name(fs: Filesystem, name: bytes, parent: int = ROOT) -> bytes:
    return read_all(fs, fs.lookup(parent, name).ino)


def rand_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def errno_of(excinfo: pytest.ExceptionInfo[FsError]) -> int:
    return excinfo.value.errno


# -- dedup -----------------------------------------------------------------------------

def test_dedup_within_file(eng: Engine) -> None:
    fs = eng.fs
    block = random.Random(1).randbytes(CS)
    n = 9
    ino = make_file(fs, b"rep", block * n)
    cid = sha(block)
    assert eng.chunk_rows() == {cid: (n, CS, eng.store_files()[cid])}
    assert eng.q("SELECT slot, chunk FROM manifests WHERE inode = %s ORDER BY slot", (ino,)) == \
        [(i, cid) for i in range(n)]
    assert set(eng.store_files()) == {cid}
    assert read_all(fs, ino) == block * n
    assert fs.getattr(ino).size == n * CS


def test_dedup_across_files(eng: Engine) -> None:
    fs = eng.fs
    rng = random.Random(2)
    a, b, c = (rng.randbytes(CS) for _ in range(3))
    tail = rng.randbytes(1234)
    f1 = a + b + tail
    f2 = a + b + tail          # identical file
    f3 = b + c + a + a         # shares a and b, reorders them
    for name, data in ((b"f1", f1), (b"f2", f2), (b"f3", f3)):
        make_file(fs, name, data)
    want = expected_refs(f1, f2, f3)
    assert want == {sha(a): 4, sha(b): 3, sha(c): 1, sha(tail): 2}
    assert eng.refcounts() == want
    assert set(eng.store_files()) == set(want)
    assert eng.manifest_counts() == want
    for name, data in ((b"f1", f1), (b"f2", f2), (b"f3", f3)):
        assert read_name(fs, name) == data


def test_dedup_across_remount(eng: Engine) -> None:
    rng = random.Random(3)
    data = rng.randbytes(3 * CS) + rng.randbytes(CS) * 2 + rng.randbytes(777)
    make_file(eng.fs, b"first", data)
    rows_before = eng.chunk_rows()
    assert rows_before == {c: (n, rows_before[c][1], rows_before[c][2])
                           for c, n in expected_refs(data).items()}
    disk_before = eng.store_files()
    mtimes = {c: os.stat(eng.fs.store.path(c)).st_mtime_ns for c in disk_before}

    fs = eng.reopen()
    assert read_name(fs, b"first") == data
    make_file(fs, b"second", data)
    make_file(fs, b"third", data, flush=False)  # committed by release batching + close
    fs = eng.reopen()

    rows_after = eng.chunk_rows()
    assert set(rows_after) == set(rows_before)            # no new chunk rows
    assert {c: r[0] for c, r in rows_after.items()} == {c: 3 * n for c, n in expected_refs(data).items()}
    assert eng.store_files() == disk_before               # no new files, same sizes
    assert {c: os.stat(fs.store.path(c)).st_mtime_ns for c in disk_before} == mtimes  # not rewritten
    for name in (b"first", b"second", b"third"):
        assert read_name(fs, name) == data


def test_dedup_independent_of_write_history(eng: Engine) -> None:
    """Two files with identical contents share their chunks whatever the write order."""
    fs = eng.fs
    head = random.Random(4).randbytes(1000)
    final = head + bytes(CS - 1000) + b"x" * 10      # 1000 bytes, zeros to the slot end, 10 x

    make_file(fs, b"oneshot", final)
    ino = fs.create(ROOT, b"grown", FILE_MODE, UID, GID).ino
    fs.write(ino, 0, head)
    fs.fsync(ino)                                       # slot 0 committed with 1000 bytes
    fs.write(ino, CS, b"x" * 10)                         # the file grows past slot 0
    fs.release(ino)
    fs.flush_all()
    assert read_all(fs, ino) == final
    refs = eng.refcounts()
    assert {c: n for c, n in refs.items() if n} == expected_refs(final, final)
    assert refs[sha(head)] == 0          # the short cut of slot 0 is garbage now
    # growing by truncate re-cuts the short last slot too
    ino3 = make_file(fs, b"truncgrown", head)
    fs.setattr(ino3, size=2 * CS)
    refs = eng.refcounts()
    assert {c: n for c, n in refs.items() if n} == expected_refs(final, final, head + bytes(2 * CS - 1000))
    assert eng.q("SELECT chunk FROM manifests WHERE inode = %s", (ino3,)) == [(sha(head + bytes(CS - 1000)),)]


# -- holes -----------------------------------------------------------------------------

def test_sparse_write_far_offset(eng: Engine) -> None:
    fs = eng.fs
    off = 10 << 20
    payload = random.Random(5).randbytes(1000)
    ino = make_file(fs, b"sparse", payload, offset=off)
    assert fs.getattr(ino).size == off + 1000
    assert eng.refcounts() == {sha(payload): 1}
    assert eng.q("SELECT slot FROM manifests WHERE inode = %s", (ino,)) == [(off // CS,)]
    assert set(eng.store_files()) == {sha(payload)}
    fs.open(ino)
    assert fs.read(ino, 0, 4096) == bytes(4096)
    assert fs.read(ino, 5 << 20, CS + 17) == bytes(CS + 17)
    assert fs.read(ino, off - 10, 20) == bytes(10) + payload[:10]
    assert fs.read(ino, off + 990, 100) == payload[990:]       # short at EOF
    assert fs.read(ino, off + 1000, 100) == b""
    fs.release(ino)
    fs = eng.reopen()
    assert read_all(fs, ino) == bytes(off) + payload


def test_zero_slots_store_nothing(eng: Engine) -> None:
    fs = eng.fs
    ino = make_file(fs, b"zeros", bytes(3 * CS + 100))
    assert fs.getattr(ino).size == 3 * CS + 100
    assert eng.chunk_rows() == {}
    assert eng.q("SELECT COUNT(*) FROM manifests")[0][0] == 0
    assert eng.store_files() == {}
    assert read_all(fs, ino) == bytes(3 * CS + 100)

    # overwriting data with zeros turns the slot back into a hole
    rng = random.Random(6)
    data = rng.randbytes(2 * CS)
    ino2 = make_file(fs, b"data", data)
    fs.open(ino2)
    fs.write(ino2, 0, bytes(CS))
    fs.fsync(ino2)
    fs.release(ino2)
    assert eng.q("SELECT slot FROM manifests WHERE inode = %s", (ino2,)) == [(1,)]
    assert eng.refcounts() == {sha(data[:CS]): 0, sha(data[CS:]): 1}
    assert read_all(fs, ino2) == bytes(CS) + data[CS:]


@pytest.mark.parametrize("flush_first", [True, False])
@pytest.mark.parametrize("keep_open", [True, False])
def test_truncate_down_then_grow(eng: Engine, flush_first: bool, keep_open: bool) -> None:
    fs = eng.fs
    data = random.Random(7).randbytes(3 * CS)
    cut = CS + 1000
    ino = make_file(fs, b"t", data, flush=flush_first, release=not keep_open)
    fs.setattr(ino, size=cut)
    assert fs.getattr(ino).size == cut
    fs.setattr(ino, size=3 * CS)
    want = data[:cut] + bytes(3 * CS - cut)
    if keep_open:
        assert fs.read(ino, 0, 4 * CS) == want
        assert fs.read(ino, cut - 1, 2) == data[cut - 1:cut] + b"\0"
        fs.release(ino)
    assert read_all(fs, ino) == want
    fs.flush_all()
    assert eng.manifest_counts() == expected_refs(want)
    # the cut-off tail of slot 1 and the whole of slot 2 are no longer referenced
    refs = eng.refcounts()
    assert refs.get(sha(data[CS:2 * CS]), 0) == refs.get(sha(data[2 * CS:]), 0) == 0
    assert (sha(data[2 * CS:]) in refs) == flush_first   # stored only if it was flushed
    assert {c: n for c, n in refs.items() if n} == expected_refs(want)
    assert eng.fsck().clean
    fs = eng.reopen(cache_bytes=0)
    assert read_all(fs, ino) == want


def test_truncate_via_open_trunc_and_extend(eng: Engine) -> None:
    fs = eng.fs
    data = random.Random(8).randbytes(2 * CS + 5)
    ino = make_file(fs, b"o", data)
    fs.open(ino, truncate=True)
    assert fs.getattr(ino).size == 0
    assert fs.read(ino, 0, 100) == b""
    fs.write(ino, 10, b"abc")
    fs.release(ino)
    fs.flush_all()
    assert read_all(fs, ino) == bytes(10) + b"abc"
    assert eng.refcounts() == {**{c: 0 for c in expected_refs(data)}, sha(bytes(10) + b"abc"): 1}
    # truncate up on a closed file: slot 0 is re-cut to the full slot, the rest are holes
    fs.setattr(ino, size=5 * CS)
    grown = bytes(10) + b"abc" + bytes(5 * CS - 13)
    assert read_all(fs, ino) == grown
    assert eng.manifest_counts() == expected_refs(grown) == {sha(grown[:CS]): 1}


# -- refcounts under random operations ---------------------------------------------------

class Model:
    """What the file tree should hold: names -> inode, inode -> bytes, links, opens."""

    def __init__(self) -> None:
        self.names: dict[tuple[int, bytes], int] = {}
        self.content: dict[int, bytearray] = {}
        self.nlink: dict[int, int] = {}
        self.opens: dict[int, int] = {}

    def alive(self) -> list[int]:
        return sorted(self.content)

    def gone(self, ino: int) -> bool:
        return self.nlink[ino] == 0 and self.opens.get(ino, 0) == 0

    def drop_if_gone(self, ino: int) -> None:
        if self.gone(ino):
            del self.content[ino], self.nlink[ino]
            self.opens.pop(ino, None)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_ops_refcounts_exact(eng: Engine, seed: int) -> None:
    fs = eng.fs
    rng = random.Random(seed)
    sub = fs.mkdir(ROOT, b"sub", 0o755, UID, GID).ino
    dirs = [ROOT, sub]
    pool = [rng.randbytes(CS) for _ in range(4)]
    m = Model()
    names = [b"a", b"b", b"c", b"d", b"e", b"f"]
    max_size = 5 * CS

    def ensure_open(ino: int) -> None:
        if m.opens.get(ino, 0) == 0:
            fs.open(ino)
            m.opens[ino] = 1

    def do_write(ino: int) -> None:
        ensure_open(ino)
        kind = rng.randrange(5)
        if kind == 0:    # a shared block at a slot boundary
            off, data = rng.randrange(5) * CS, rng.choice(pool)
        elif kind == 1:  # a zero block
            off, data = rng.randrange(5) * CS, bytes(CS)
        elif kind == 2:  # a shared block, unaligned
            off, data = rng.randrange(max_size), rng.choice(pool)[:rng.randrange(1, CS)]
        elif kind == 3:  # a few random bytes
            off, data = rng.randrange(max_size), rng.randbytes(rng.randrange(1, 300))
        else:            # a long random run over slot boundaries
            off, data = rng.randrange(max_size), rng.randbytes(rng.randrange(CS, 2 * CS))
        assert fs.write(ino, off, data) == len(data)
        c = m.content[ino]
        if len(c) < off:
            c.extend(bytes(off - len(c)))
        c[off:off + len(data)] = data

    for _step in range(400):
        op = rng.choices(["create", "write", "truncate", "unlink", "link", "rename", "release",
                          "flush", "read", "otrunc"],
                         weights=[8, 30, 6, 4, 4, 5, 10, 5, 8, 2])[0]
        if op == "create":
            key = (rng.choice(dirs), rng.choice(names))
            if key in m.names:
                with pytest.raises(FsError) as ei:
                    fs.create(key[0], key[1], FILE_MODE, UID, GID)
                assert ei.value.errno == errno.EEXIST
                continue
            ino = fs.create(key[0], key[1], FILE_MODE, UID, GID).ino
            m.names[key] = ino
            m.content[ino] = bytearray()
            m.nlink[ino] = 1
            m.opens[ino] = 1
        elif op == "write" and m.content:
            do_write(rng.choice(m.alive()))
        elif op == "truncate" and m.content:
            ino = rng.choice(m.alive())
            size = rng.choice([rng.randrange(max_size), rng.randrange(max_size), rng.randrange(6) * CS])
            fs.setattr(ino, size=size)
            c = m.content[ino]
            if size < len(c):
                del c[size:]
            else:
                c.extend(bytes(size - len(c)))
        elif op == "otrunc" and m.names:
            ino = m.names[rng.choice(sorted(m.names))]
            fs.open(ino, truncate=True)
            m.opens[ino] = m.opens.get(ino, 0) + 1
            m.content[ino].clear()
        elif op == "unlink" and m.names:
            key = rng.choice(sorted(m.names))
            fs.unlink(*key)
            ino = m.names.pop(key)
            m.nlink[ino] -= 1
            m.drop_if_gone(ino)
        elif op == "link" and m.names:
            ino = m.names[rng.choice(sorted(m.names))]
            key = (rng.choice(dirs), rng.choice(names) + b"l")
            if key in m.names:
                continue
            assert fs.link(ino, *key).nlink == m.nlink[ino] + 1
            m.names[key] = ino
            m.nlink[ino] += 1
        elif op == "rename" and m.names:
            src = rng.choice(sorted(m.names))
            dst = (rng.choice(dirs), rng.choice(names + [n + b"l" for n in names]))
            if src == dst:
                continue
            fs.rename(src[0], src[1], dst[0], dst[1])
            ino = m.names.pop(src)
            old = m.names.get(dst)
            m.names[dst] = ino
            if old is not None and old != ino:
                m.nlink[old] -= 1
                m.drop_if_gone(old)
            elif old == ino:  # hard links of one inode: rename does nothing
                m.names[src] = ino
        elif op == "release":
            opened = [i for i, n in m.opens.items() if n > 0]
            if opened:
                ino = rng.choice(sorted(opened))
                fs.release(ino)
                m.opens[ino] -= 1
                m.drop_if_gone(ino)
        elif op == "flush":
            rng.choice([fs.flush_all, lambda: fs.writeback(0.0), lambda: fs.writeback(60.0)])()
            if m.content:
                fs.fsync(rng.choice(m.alive()))
        elif op == "read" and m.content:
            ino = rng.choice(m.alive())
            ensure_open(ino)
            off = rng.randrange(max_size + CS)
            n = rng.randrange(1, 2 * CS)
            assert fs.read(ino, off, n) == bytes(m.content[ino][off:off + n]), f"step {_step}"
        if rng.random() < 0.05:
            fs.flush_all()
            counted = eng.manifest_counts()
            assert {c: n for c, n in eng.refcounts().items() if n} == dict(counted), f"step {_step}"

    for ino, n in list(m.opens.items()):
        for _ in range(n):
            fs.release(ino)
        m.opens[ino] = 0
    for ino in list(m.content):
        m.drop_if_gone(ino)
    fs.flush_all()

    # the namespace and contents match the model
    for (parent, name), ino in m.names.items():
        a = fs.lookup(parent, name)
        assert a.ino == ino and a.nlink == m.nlink[ino] and a.size == len(m.content[ino])
        assert read_all(fs, ino) == bytes(m.content[ino])
    live = {int(r[0]) for r in eng.q("SELECT id FROM inodes WHERE mode & %s = %s", (S.S_IFMT(0o170000),
                                                                                  S.S_IFREG))}
    assert live == set(m.content)
    # the manifests name exactly the non-zero slots of each file, by their exact bytes
    for ino, content in m.content.items():
        slots = {int(r[0]): bytes(r[1]) for r in eng.q("SELECT slot, chunk FROM manifests WHERE inode = %s",
                                                      (ino,))}
        assert slots == {i: sha(p) for i, p in slots_of(content).items()}, f"inode {ino}"
    # refcounts: exactly the number of manifest slots naming each chunk
    counted = eng.manifest_counts()
    refs = eng.refcounts()
    assert {c: n for c, n in refs.items() if n} == dict(counted)
    assert all(n == 0 for c, n in refs.items() if c not in counted)
    assert set(counted) <= set(eng.store_files())
    report = eng.fsck()
    assert report.clean, report
    # and the same after a restart, read from the chunk files (no cache)
    fs = eng.reopen(cache_bytes=0)
    for (parent, name), ino in m.names.items():
        assert read_name(fs, name, parent) == bytes(m.content[ino])
    assert eng.q("SELECT COUNT(*) FROM inodes WHERE nlink = 0")[0][0] == 0


def test_fsck_finds_and_repairs_drift(eng: Engine) -> None:
    """fsck's view of refcounts and link counts is checked against our own counts."""
    fs = eng.fs
    a = random.Random(15).randbytes(CS)
    ino = make_file(fs, b"f", a * 3)
    fs.link(ino, ROOT, b"g")
    assert eng.fsck().clean
    eng.q("UPDATE chunks SET refcount = 5 WHERE id = %s", (sha(a),))
    eng.q("UPDATE inodes SET nlink = 7 WHERE id = %s", (ino,))
    report = eng.fsck()
    assert not report.clean
    assert report.refcount_mismatches == [(sha(a).hex(), 5, 3)]
    assert report.nlink_mismatches == [(ino, 7, 2)]
    assert eng.fsck(repair=True).repaired
    assert eng.fsck().clean
    assert eng.refcounts() == {sha(a): 3}
    assert eng.q("SELECT nlink FROM inodes WHERE id = %s", (ino,)) == [(2,)]


# -- stats -----------------------------------------------------------------------------

def test_stats_figures(eng: Engine) -> None:
    fs = eng.fs
    rng = random.Random(21)
    a, b = rng.randbytes(CS), rng.randbytes(CS)
    text = (b"casfs compresses this line well. " * 4000)[:CS]
    files = {
        b"one": a + b + rng.randbytes(500),
        b"two": a + b + text,                     # dedups with one's first two slots
        b"rep": text * 4 + text[:999],            # compressible, dedup within the file
        b"hole": bytes(5 * CS) + b"0123456789",   # four zero slots are holes
        b"empty": b"",
    }
    inos = {name: make_file(fs, name, data) for name, data in files.items()}
    fs.link(inos[b"one"], ROOT, b"one-link")       # a hard link counts once
    d = fs.mkdir(ROOT, b"dir", 0o755, UID, GID).ino
    fs.mkdir(d, b"sub", 0o755, UID, GID)
    fs.symlink(ROOT, b"sym", b"one", UID, GID)

    refs = expected_refs(*files.values())
    unique = {}
    for content in files.values():
        unique.update({sha(p): len(p) for p in slots_of(content).values()})
    disk = eng.store_files()
    assert set(disk) == set(refs)
    st = eng.stats()
    assert st.files == len(files)
    assert st.directories == 3
    assert st.symlinks == 1
    assert st.logical_bytes == sum(len(c) for c in files.values())
    assert st.referenced_bytes == sum(len(p) for c in files.values() for p in slots_of(c).values())
    assert st.unique_bytes == sum(unique.values())
    assert st.chunks == st.live_chunks == len(refs) == 6
    assert st.stored_bytes == st.live_stored_bytes == sum(disk.values())
    assert st.live_stored_bytes < st.unique_bytes   # the text chunks compressed
    assert st.garbage_chunks == 0 and st.garbage_bytes == 0
    assert st.chunk_size == CS
    assert st.sparse_bytes == 5 * CS                 # the holes of "hole": not stored, not dedup
    assert st.dedup_ratio == pytest.approx((st.logical_bytes - st.sparse_bytes) / st.unique_bytes)

    # unlinking "two" leaves its own slot (text) referenced by rep, frees nothing;
    # unlinking both names of "one" frees its tail chunk only
    fs.unlink(ROOT, b"two")
    fs.unlink(ROOT, b"one")
    st2 = eng.stats()
    assert st2.files == len(files) - 1 and st2.logical_bytes == st.logical_bytes - len(files[b"two"])
    fs.unlink(ROOT, b"one-link")
    st3 = eng.stats()
    dead = {sha(a), sha(b), sha(files[b"one"][2 * CS:])}
    assert st3.files == len(files) - 2
    assert st3.logical_bytes == sum(len(c) for n, c in files.items() if n not in (b"one", b"two"))
    assert st3.garbage_chunks == 3 and st3.live_chunks == 3 and st3.chunks == 6
    assert st3.garbage_bytes == sum(disk[c] for c in dead)
    assert st3.unique_bytes == sum(n for c, n in unique.items() if c not in dead)
    assert st3.stored_bytes == st.stored_bytes
    gc = eng.gc(0)
    assert (gc.chunks_deleted, gc.bytes_freed) == (3, sum(disk[c] for c in dead))
    st4 = eng.stats()
    assert st4.chunks == 3 and st4.stored_bytes == sum(n for c, n in disk.items() if c not in dead)
    assert set(eng.store_files()) == set(refs) - dead

    # a file unlinked while open is out of the namespace (not counted in files and
    # logical bytes) but its chunks are still referenced
    tmp = rng.randbytes(CS)
    t = make_file(fs, b"tmp", tmp, release=False)
    fs.unlink(ROOT, b"tmp")
    st5 = eng.stats()
    assert (st5.files, st5.logical_bytes) == (st4.files, st4.logical_bytes)
    assert (st5.live_chunks, st5.unique_bytes) == (st4.live_chunks + 1, st4.unique_bytes + CS)
    fs.release(t)
    st6 = eng.stats()
    assert (st6.live_chunks, st6.unique_bytes, st6.garbage_chunks) == (st4.live_chunks, st4.unique_bytes, 1)


# -- integrity -------------------------------------------------------------------------

def test_corrupt_chunk_is_eio(eng: Engine) -> None:
    fs = eng.fs
    rng = random.Random(31)
    s0, s1 = rng.randbytes(CS), rng.randbytes(CS)
    ino = make_file(fs, b"f", s0 + s1)
    path = fs.store.path(sha(s1))
    blob = bytearray(path.read_bytes())
    blob[HEADER_SIZE + 100] ^= 0x01
    path.write_bytes(bytes(blob))
    fs.cache.clear()
    fs.open(ino)  # state was dropped at release: the manifest is read again
    assert fs.read(ino, 0, CS) == s0
    with pytest.raises(FsError) as ei:
        fs.read(ino, CS, 10)
    assert ei.value.errno == errno.EIO
    with pytest.raises(FsError) as ei:
        fs.read(ino, CS - 5, 10)   # a read touching the bad chunk fails whole
    assert ei.value.errno == errno.EIO
    fs.release(ino)
    report = eng.fsck()
    assert report.corrupt_chunks == [sha(s1).hex()]
    assert report.missing_files == [] and not report.clean
    # a fresh mount with an empty cache sees the same
    fs = eng.reopen(cache_bytes=0)
    fs.open(ino)
    with pytest.raises(FsError) as ei:
        fs.read(ino, CS, 1)
    assert ei.value.errno == errno.EIO
    fs.release(ino)


def test_missing_chunk_is_eio(eng: Engine) -> None:
    fs = eng.fs
    rng = random.Random(32)
    s0, s1 = rng.randbytes(CS), rng.randbytes(100)
    ino = make_file(fs, b"f", s0 + s1)
    os.unlink(fs.store.path(sha(s0)))
    fs.cache.clear()
    fs.open(ino)
    assert fs.read(ino, CS, 100) == s1
    with pytest.raises(FsError) as ei:
        fs.read(ino, 0, 1)
    assert ei.value.errno == errno.EIO
    fs.release(ino)
    report = eng.fsck()
    assert report.missing_files == [sha(s0).hex()]
    assert report.corrupt_chunks == [] and not report.clean


# -- unlinked while open -----------------------------------------------------------------

def test_unlinked_while_open_flushed(eng: Engine) -> None:
    fs = eng.fs
    rng = random.Random(41)
    data = rng.randbytes(3 * CS)
    ino = make_file(fs, b"u", data, release=False)
    keep = make_file(fs, b"keep", rng.randbytes(CS))
    fs.unlink(ROOT, b"u")
    with pytest.raises(FsError) as ei:
        fs.lookup(ROOT, b"u")
    assert ei.value.errno == errno.ENOENT
    assert fs.getattr(ino).nlink == 0
    assert fs.read(ino, 0, 4 * CS) == data
    fs.write(ino, 3 * CS, b"more")      # still writable through the handle
    fs.fsync(ino)
    assert fs.read(ino, 3 * CS - 2, 10) == data[-2:] + b"more"
    assert all(eng.refcounts()[c] == 1 for c in expected_refs(data))
    fs.release(ino)
    assert eng.q("SELECT COUNT(*) FROM inodes WHERE id = %s", (ino,))[0][0] == 0
    assert eng.q("SELECT COUNT(*) FROM manifests WHERE inode = %s", (ino,))[0][0] == 0
    with pytest.raises(FsError) as ei:
        fs.getattr(ino)
    assert ei.value.errno == errno.ENOENT
    dead = set(expected_refs(data)) | {sha(b"more")}
    refs = eng.refcounts()
    assert {c: refs[c] for c in dead} == {c: 0 for c in dead}
    assert eng.fsck().clean
    gc = eng.gc(0)
    assert gc.chunks_deleted == len(dead) == 4
    assert set(eng.store_files()) == set(eng.refcounts()) == {sha(read_all(fs, keep))}


def test_unlinked_while_open_unflushed_stores_nothing(eng: Engine) -> None:
    fs = eng.fs
    data = random.Random(42).randbytes(2 * CS)
    ino = make_file(fs, b"u", data, release=False, flush=False)
    fs.unlink(ROOT, b"u")
    assert fs.read(ino, 0, 3 * CS) == data
    fs.release(ino)
    fs.flush_all()
    assert eng.q("SELECT COUNT(*) FROM inodes")[0][0] == 1
    assert eng.chunk_rows() == {} and eng.store_files() == {}


def test_release_pending_file_unlinked(eng: Engine) -> None:
    """A file released with unflushed data, then unlinked: freed, nothing leaks."""
    fs = eng.fs
    data = random.Random(43).randbytes(CS + 10)
    ino = make_file(fs, b"p", data, flush=False)   # released, flush batched
    fs.unlink(ROOT, b"p")
    fs.writeback(5.0)
    fs.flush_all()
    assert eng.q("SELECT COUNT(*) FROM inodes WHERE id = %s", (ino,))[0][0] == 0
    assert all(n == 0 for n in eng.refcounts().values())
    assert eng.fsck().clean
    fs = eng.reopen()
    assert eng.q("SELECT COUNT(*) FROM inodes")[0][0] == 1


# -- batched release -----------------------------------------------------------------------

def test_batched_release_300_files(eng: Engine) -> None:
    fs = eng.fs
    contents = {f"f{i:03d}".encode(): f"file {i} ".encode() * (1 + i % 50) for i in range(300)}
    inos = {}
    for name, data in contents.items():
        inos[name] = make_file(fs, name, data, flush=False)
    # visible before any writeback, from the attrs and through a fresh open
    assert fs.getattr(inos[b"f299"]).size == len(contents[b"f299"])
    assert read_all(fs, inos[b"f299"]) == contents[b"f299"]
    fs.writeback(5.0)
    assert fs.closed_dirty == set()
    assert fs.data.states == {}
    st = eng.stats()
    assert st.files == 300
    assert st.logical_bytes == sum(len(d) for d in contents.values())
    assert st.chunks == len({sha(d) for d in contents.values()})
    assert eng.refcounts() == expected_refs(*contents.values())
    fs = eng.reopen(cache_bytes=0)
    for name, data in contents.items():
        assert read_name(fs, name) == data


# -- crash recovery ------------------------------------------------------------------------

def test_recover_frees_unlinked_open_inode(eng: Engine) -> None:
    fs = eng.fs
    rng = random.Random(51)
    data = rng.randbytes(2 * CS + 3)
    other = rng.randbytes(CS)
    ino = make_file(fs, b"doomed", data, release=False)
    make_file(fs, b"other", other)
    fs.unlink(ROOT, b"doomed")
    assert eng.q("SELECT nlink FROM inodes WHERE id = %s", (ino,)) == [(0,)]  # (commits)
    fs.meta.db.conn.close()          # the mount dies without releasing
    eng.abandon(fs)

    fs = eng.fs = eng.new_fs()
    assert eng.q("SELECT COUNT(*) FROM inodes WHERE id = %s", (ino,))[0][0] == 1
    assert fs.recover() == 1
    assert fs.recover() == 0
    assert eng.q("SELECT COUNT(*) FROM inodes WHERE id = %s", (ino,))[0][0] == 0
    assert eng.q("SELECT COUNT(*) FROM manifests WHERE inode = %s", (ino,))[0][0] == 0
    refs = eng.refcounts()
    assert {c: refs[c] for c in expected_refs(data)} == {c: 0 for c in expected_refs(data)}
    assert refs[sha(other)] == 1
    report = eng.fsck()
    assert report.clean, report
    assert eng.gc(0).chunks_deleted == 3
    assert read_name(fs, b"other") == other


def test_crash_loses_only_uncommitted_namespace_ops(eng: Engine) -> None:
    """Group commit: what the mount did since its last commit (fsync, sync, writeback
    tick) is lost in a crash, all of it, and the volume stays consistent."""
    fs = eng.fs
    data = random.Random(52).randbytes(CS + 5)
    ino = make_file(fs, b"kept", data)            # fsync: committed
    fs.mkdir(ROOT, b"d", 0o755, UID, GID)
    fs.rename(ROOT, b"kept", ROOT, b"renamed")
    fs.setxattr(ino, b"user.x", b"1")
    make_file(fs, b"new", b"new data", flush=False)
    assert fs.lookup(ROOT, b"renamed").ino == ino   # the mount sees its own changes
    assert eng.q("SELECT name FROM dentries WHERE parent = 1", sync=False) == [(b"kept",)]
    fs.meta.db.conn.close()
    eng.abandon(fs)

    fs = eng.fs = eng.new_fs()
    assert fs.recover() == 0
    assert [n for n, _a, _o in fs.readdir(ROOT, 0)] == [b"kept"]
    assert read_name(fs, b"kept") == data
    assert fs.listxattr(ino) == []
    assert fs.getattr(ROOT).nlink == 2
    report = eng.fsck()
    assert report.clean, report


def test_reconnects_after_idle_timeout(eng: Engine) -> None:
    fs = eng.fs
    fs.mkdir(ROOT, b"a", 0o755, UID, GID)
    fs.sync()
    fs.db.execute("SET SESSION wait_timeout = 1")   # the server drops an idle connection
    time.sleep(2.5)
    try:
        fs.mkdir(ROOT, b"b0", 0o755, UID, GID)      # may fail (EIO): the drop is noticed here
    except CasError:
        pass
    fs.mkdir(ROOT, b"b1", 0o755, UID, GID)          # but the mount must work again
    assert fs.lookup(ROOT, b"a").ino
    fs.sync()
    assert {bytes(r[0]) for r in eng.q("SELECT name FROM dentries")} >= {b"a", b"b1"}
    assert eng.fsck().clean


def test_lost_group_transaction_keeps_refcounts_true(eng: Engine) -> None:
    fs = eng.fs
    rng = random.Random(53)
    y, z = rng.randbytes(CS), rng.randbytes(CS)
    make_file(fs, b"B", y)                           # committed: y has refcount 1
    a = make_file(fs, b"A", b"", release=False)      # committed, still open
    fs.write(a, 0, y)
    fs.setattr(a, size=CS)                           # flushed into the open group: y at 2
    eng.q(f"KILL CONNECTION {fs.db.conn.thread_id()}", sync=False)
    try:
        fs.fsync(a)                                  # the group is lost: EIO is fair here
    except CasError:
        pass
    fs.write(a, 0, z)
    fs.fsync(a)                                      # the mount must work again...
    fs.release(a)
    report = eng.fsck()
    assert report.clean, report                      # ...with true refcounts
    eng.gc(0)
    fs = eng.reopen(cache_bytes=0)
    assert read_name(fs, b"B") == y                  # no other file lost its data
    assert read_name(fs, b"A") == z


# -- gc protocol ----------------------------------------------------------------------------

def test_gc_then_rewrite_same_chunks(eng: Engine) -> None:
    fs = eng.fs
    rng = random.Random(61)
    x = rng.randbytes(CS) + rng.randbytes(CS // 2)
    make_file(fs, b"x1", x)
    fs.unlink(ROOT, b"x1")
    ids = set(expected_refs(x))
    assert eng.refcounts() == {c: 0 for c in ids}
    big = eng.gc(3600)
    assert (big.chunks_deleted, big.orphans_deleted) == (0, 0)
    assert set(eng.store_files()) == ids and set(eng.chunk_rows()) == ids
    gc = eng.gc(0)
    assert gc.chunks_deleted == 2
    assert eng.store_files() == {} and eng.chunk_rows() == {}
    make_file(fs, b"x2", x)
    assert eng.refcounts() == {c: 1 for c in ids}
    assert set(eng.store_files()) == ids
    fs = eng.reopen(cache_bytes=0)
    assert read_name(fs, b"x2") == x
    assert eng.fsck().clean


def test_gc_between_precheck_and_commit(eng: Engine) -> None:
    """gc deletes a refcount-0 chunk after the writer found its row (so did not store it)
    but before the writer's transaction: the writer must put the file back."""
    fs = eng.fs
    rng = random.Random(62)
    x = rng.randbytes(CS) + rng.randbytes(1000)
    make_file(fs, b"x1", x)
    fs.unlink(ROOT, b"x1")
    fs.sync()
    ids = set(expected_refs(x))
    gc_meta = eng.other()
    results = []
    orig = fs.chunks.write_chunks   # the store step of a flush, after the pre-check

    def racing_write_chunks(chunks: Any, todo: list[bytes]) -> dict[bytes, int]:
        stored = orig(chunks, todo)
        results.append(cas.maint.gc.collect(gc_meta, grace_s=0))
        return stored

    fs.chunks.write_chunks = racing_write_chunks  # type: ignore[method-assign]
    try:
        make_file(fs, b"x2", x)
    finally:
        fs.chunks.write_chunks = orig  # type: ignore[method-assign]
        gc_meta.close()
    assert [r.chunks_deleted for r in results] == [2]
    disk = eng.store_files()
    assert set(disk) == ids
    assert eng.chunk_rows() == {c: (1, r[1], disk[c]) for c, r in eng.chunk_rows().items()}
    assert {c: r[1] for c, r in eng.chunk_rows().items()} == {sha(x[:CS]): CS, sha(x[CS:]): 1000}
    fs = eng.reopen(cache_bytes=0)
    assert read_name(fs, b"x2") == x
    report = eng.fsck()
    assert report.clean and report.orphan_files == 0


def test_gc_waits_for_uncommitted_reference(eng: Engine) -> None:
    """A chunk at refcount 0 gains a reference inside the mount's open group transaction:
    gc (another connection) must wait for the row lock, then leave the chunk alone."""
    fs = eng.fs
    x = random.Random(64).randbytes(CS)
    make_file(fs, b"x1", x)
    fs.unlink(ROOT, b"x1")
    fs.sync()                                        # refcount 0 is committed
    ino = make_file(fs, b"x2", b"", release=False)
    fs.write(ino, 0, x)
    fs.setattr(ino, size=CS)                         # flushed, not committed: row locked
    gc_meta = eng.other()
    results: list[cas.maint.gc.GcResult] = []
    t = threading.Thread(target=lambda: results.append(cas.maint.gc.collect(gc_meta, grace_s=0)))
    try:
        t.start()
        t.join(1.0)
        assert t.is_alive()                          # blocked on the chunk's row lock
        fs.sync()
        t.join(60)
        assert not t.is_alive()
    finally:
        fs.sync()
        t.join(60)
        gc_meta.close()
    assert results[0].chunks_deleted == 0
    assert set(eng.store_files()) == {sha(x)}
    assert eng.refcounts() == {sha(x): 1}
    fs.release(ino)
    fs = eng.reopen(cache_bytes=0)
    assert read_name(fs, b"x2") == x
    assert eng.fsck().clean


def test_gc_orphan_files_respect_grace(eng: Engine) -> None:
    fs = eng.fs
    from cas.chunk.envelope import seal
    orphan = b"orphan chunk never committed"
    fs.store.put(sha(orphan), seal(orphan))
    live = random.Random(63).randbytes(CS)
    make_file(fs, b"live", live)
    r = eng.gc(3600)
    assert (r.chunks_deleted, r.orphans_deleted) == (0, 0)
    assert set(eng.store_files()) == {sha(orphan), sha(live)}
    assert eng.fsck().orphan_files == 1
    r = eng.gc(0)
    assert (r.chunks_deleted, r.orphans_deleted) == (0, 1)
    assert set(eng.store_files()) == {sha(live)}
    assert set(eng.chunk_rows()) == {sha(live)}


# -- xattrs ----------------------------------------------------------------------------------

def test_xattrs_round_trip(eng: Engine) -> None:
    fs = eng.fs
    ino = make_file(fs, b"x", b"data")
    values = {b"user.a": b"1", b"user.empty": b"", b"user.bin": bytes(range(256)),
              b"user.big": b"v" * 65536}
    for k, v in values.items():
        fs.setxattr(ino, k, v)
    fs.setxattr(ino, b"user.a", b"2")
    values[b"user.a"] = b"2"
    assert fs.listxattr(ino) == sorted(values)
    for k, v in values.items():
        assert fs.getxattr(ino, k) == v
    with pytest.raises(FsError) as ei:
        fs.getxattr(ino, b"user.none")
    assert ei.value.errno == errno.ENODATA
    with pytest.raises(FsError) as ei:
        fs.removexattr(ino, b"user.none")
    assert ei.value.errno == errno.ENODATA
    with pytest.raises(FsError) as ei:
        fs.setxattr(ino, b"user.huge", b"v" * 65537)
    assert ei.value.errno == errno.E2BIG
    with pytest.raises(FsError) as ei:
        fs.setxattr(ino, b"", b"v")
    assert ei.value.errno == errno.ERANGE
    with pytest.raises(FsError) as ei:
        fs.getxattr(987654, b"user.a")
    assert ei.value.errno == errno.ENOENT
    fs.removexattr(ino, b"user.bin")
    del values[b"user.bin"]
    with pytest.raises(FsError) as ei:
        fs.getxattr(ino, b"user.bin")
    assert ei.value.errno == errno.ENODATA
    d = fs.mkdir(ROOT, b"d", 0o755, UID, GID).ino
    fs.setxattr(d, b"user.dir", b"yes")

    fs = eng.reopen()
    assert fs.listxattr(ino) == sorted(values)
    assert {k: fs.getxattr(ino, k) for k in values} == values
    assert fs.listxattr(d) == [b"user.dir"]
    assert fs.listxattr(ROOT) == []
    fs.unlink(ROOT, b"x")
    fs.rmdir(ROOT, b"d")
    assert eng.q("SELECT COUNT(*) FROM xattrs")[0][0] == 0


# -- readdir ----------------------------------------------------------------------------------

def test_readdir_offsets_stable(eng: Engine) -> None:
    fs = eng.fs
    d = fs.mkdir(ROOT, b"d", 0o755, UID, GID).ino
    for i in range(10):
        make_file(fs, f"n{i:02d}".encode(), b"", parent=d)
    first = fs.readdir(d, 0, limit=4)
    assert [n for n, _a, _o in first] == [b"n00", b"n01", b"n02", b"n03"]
    offs = [o for _n, _a, o in first]
    assert offs == sorted(offs) and len(set(offs)) == 4
    assert all(a.ino == fs.lookup(d, n).ino for n, a, _o in first)
    # change the directory between two readdir calls
    fs.unlink(d, b"n01")      # already listed
    fs.unlink(d, b"n05")      # not listed yet
    make_file(fs, b"n10", b"", parent=d)
    make_file(fs, b"n11", b"", parent=d)
    rest = []
    after = offs[-1]
    for _ in range(20):  # bounded: a readdir that repeats entries must not hang the test
        page = fs.readdir(d, after, limit=3)
        if not page:
            break
        rest.extend(page)
        after = page[-1][2]
    assert [n for n, _a, _o in rest] == [f"n{i:02d}".encode() for i in (4, 6, 7, 8, 9, 10, 11)]
    all_offs = offs + [o for _n, _a, o in rest]
    assert all_offs == sorted(all_offs) and len(set(all_offs)) == len(all_offs)
    # resuming at an old offset (of a removed entry) still continues right after it
    assert [n for n, _a, _o in fs.readdir(d, offs[1], limit=2)] == [b"n02", b"n03"]
    # offsets survive a restart
    fs = eng.reopen()
    assert [(n, o) for n, _a, o in fs.readdir(d, offs[1])] == \
        [(n, o) for n, _a, o in first[2:] + rest]
    assert fs.readdir(d, all_offs[-1]) == []
    make_file(fs, b"f", b"")
    with pytest.raises(FsError) as ei:
        fs.readdir(fs.lookup(ROOT, b"f").ino, 0)
    assert ei.value.errno == errno.ENOTDIR


# -- rename, rmdir ---------------------------------------------------------------------------

def test_rename_noreplace(eng: Engine) -> None:
    fs = eng.fs
    a = make_file(fs, b"a", b"AAA")
    b = make_file(fs, b"b", b"BBB")
    with pytest.raises(FsError) as ei:
        fs.rename(ROOT, b"a", ROOT, b"b", RENAME_NOREPLACE)
    assert ei.value.errno == errno.EEXIST
    assert fs.lookup(ROOT, b"a").ino == a and fs.lookup(ROOT, b"b").ino == b
    assert read_name(fs, b"b") == b"BBB"
    fs.rename(ROOT, b"a", ROOT, b"c", RENAME_NOREPLACE)
    assert fs.lookup(ROOT, b"c").ino == a
    with pytest.raises(FsError) as ei:
        fs.lookup(ROOT, b"a")
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(FsError) as ei:
        fs.rename(ROOT, b"c", ROOT, b"b", RENAME_NOREPLACE | RENAME_EXCHANGE)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(FsError) as ei:
        fs.rename(ROOT, b"nope", ROOT, b"x")
    assert ei.value.errno == errno.ENOENT
    # plain rename replaces, and frees the replaced file
    fs.rename(ROOT, b"c", ROOT, b"b")
    assert read_name(fs, b"b") == b"AAA"
    assert eng.q("SELECT COUNT(*) FROM inodes WHERE id = %s", (b,))[0][0] == 0
    assert eng.refcounts() == {sha(b"AAA"): 1, sha(b"BBB"): 0}
    assert eng.fsck().clean


def test_rename_exchange(eng: Engine) -> None:
    fs = eng.fs
    d1 = fs.mkdir(ROOT, b"d1", 0o755, UID, GID).ino
    d2 = fs.mkdir(ROOT, b"d2", 0o755, UID, GID).ino
    f = make_file(fs, b"f", b"file", parent=d1)
    sub = fs.mkdir(d2, b"sub", 0o755, UID, GID).ino
    make_file(fs, b"inner", b"inner", parent=sub)
    assert (fs.getattr(d1).nlink, fs.getattr(d2).nlink, fs.getattr(ROOT).nlink) == (2, 3, 4)
    fs.rename(d1, b"f", d2, b"sub", RENAME_EXCHANGE)
    assert fs.lookup(d1, b"f").ino == sub
    assert fs.lookup(d2, b"sub").ino == f
    assert fs.lookup(sub, b"inner").ino
    assert fs.lookup(sub, b"..").ino == d1
    assert (fs.getattr(d1).nlink, fs.getattr(d2).nlink) == (3, 2)
    assert read_all(fs, f) == b"file"
    # exchange two files in one directory
    g = make_file(fs, b"g", b"gee", parent=d2)
    fs.rename(d2, b"g", d2, b"sub", RENAME_EXCHANGE)
    assert fs.lookup(d2, b"g").ino == f and fs.lookup(d2, b"sub").ino == g
    with pytest.raises(FsError) as ei:
        fs.rename(d2, b"g", d2, b"missing", RENAME_EXCHANGE)
    assert ei.value.errno == errno.ENOENT
    report = eng.fsck()
    assert report.clean, report
    fs = eng.reopen()
    assert (fs.getattr(d1).nlink, fs.getattr(d2).nlink, fs.getattr(ROOT).nlink) == (3, 2, 4)


def test_rename_directory_below_itself(eng: Engine) -> None:
    fs = eng.fs
    a = fs.mkdir(ROOT, b"a", 0o755, UID, GID).ino
    b = fs.mkdir(a, b"b", 0o755, UID, GID).ino
    c = fs.mkdir(b, b"c", 0o755, UID, GID).ino
    for parent in (a, b, c):
        with pytest.raises(FsError) as ei:
            fs.rename(ROOT, b"a", parent, b"moved")
        assert ei.value.errno == errno.EINVAL
    with pytest.raises(FsError) as ei:
        fs.rename(ROOT, b"a", c, b"x", RENAME_EXCHANGE)   # (x missing: EINVAL comes first)
    assert ei.value.errno in (errno.EINVAL, errno.ENOENT)
    make_file(fs, b"x", b"", parent=c)
    with pytest.raises(FsError) as ei:
        fs.rename(ROOT, b"a", c, b"x", RENAME_EXCHANGE)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(FsError) as ei:
        fs.rename(c, b"x", ROOT, b"a", RENAME_EXCHANGE)
    assert ei.value.errno == errno.EINVAL
    # nothing moved
    assert fs.lookup(ROOT, b"a").ino == a and fs.lookup(a, b"b").ino == b and fs.lookup(b, b"c").ino == c
    # moving up is fine
    fs.rename(b, b"c", ROOT, b"c")
    assert fs.lookup(ROOT, b"c").ino == c
    assert (fs.getattr(ROOT).nlink, fs.getattr(a).nlink, fs.getattr(b).nlink) == (4, 3, 2)
    assert eng.fsck().clean


def test_rmdir_and_unlink_errors(eng: Engine) -> None:
    fs = eng.fs
    d = fs.mkdir(ROOT, b"d", 0o755, UID, GID).ino
    make_file(fs, b"f", b"x", parent=d)
    e = fs.mkdir(ROOT, b"e", 0o755, UID, GID).ino
    with pytest.raises(FsError) as ei:
        fs.rmdir(ROOT, b"d")
    assert ei.value.errno == errno.ENOTEMPTY
    with pytest.raises(FsError) as ei:
        fs.rename(ROOT, b"e", ROOT, b"d")       # onto a non-empty directory
    assert ei.value.errno == errno.ENOTEMPTY
    with pytest.raises(FsError) as ei:
        fs.rmdir(d, b"f")
    assert ei.value.errno == errno.ENOTDIR
    with pytest.raises(FsError) as ei:
        fs.unlink(ROOT, b"d")
    assert ei.value.errno == errno.EISDIR
    with pytest.raises(FsError) as ei:
        fs.rmdir(ROOT, b"missing")
    assert ei.value.errno == errno.ENOENT
    assert fs.lookup(ROOT, b"d").ino == d
    fs.unlink(d, b"f")
    fs.rename(ROOT, b"e", ROOT, b"d")           # onto an empty directory: replaces it
    assert fs.lookup(ROOT, b"d").ino == e
    assert eng.q("SELECT COUNT(*) FROM inodes WHERE id = %s", (d,))[0][0] == 0
    assert fs.getattr(ROOT).nlink == 3
    fs.rmdir(ROOT, b"d")
    assert fs.getattr(ROOT).nlink == 2
    assert eng.q("SELECT COUNT(*) FROM inodes")[0][0] == 1
    assert eng.fsck().clean
