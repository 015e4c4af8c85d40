"""Tests of cas.chunk.store.LocalStore: round trips, layout, temporary files, ENOSPC, absence."""
from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.treeutil import tmpfs

from cas.chunk.envelope import chunk_id, open_envelope, seal
from cas.errors import ChunkMissing, FsError, NoSpace
from cas.chunk.store import LocalStore, StoredChunk


def make(data: bytes) -> tuple[bytes, bytes]:
    return chunk_id(data), seal(data)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    root = tmp_path / "chunks"
    root.mkdir()
    return LocalStore(root)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_round_trip(store: LocalStore) -> None:
    cid, blob = make(b"hello chunk" * 100)
    assert not store.exists(cid)
    assert store.stat(cid) is None
    assert store.put(cid, blob) == len(blob)
    assert store.exists(cid)
    st = store.stat(cid)
    assert isinstance(st, StoredChunk)
    assert st.size == len(blob)
    assert st.mtime_ns == os.stat(store.path(cid)).st_mtime_ns
    assert store.get(cid) == blob
    assert open_envelope(store.get(cid), cid) == b"hello chunk" * 100
    assert list(store.iter_ids()) == [cid]
    assert store.delete(cid) is True
    assert store.delete(cid) is False
    assert not store.exists(cid)
    assert list(store.iter_ids()) == []


def test_put_many_and_iter_ids(store: LocalStore) -> None:
    items = [make(os.urandom(1000 + i)) for i in range(300)]
    assert store.put_many(items) == sum(len(b) for _, b in items)
    assert sorted(store.iter_ids()) == sorted(c for c, _ in items)
    for cid, blob in items:
        assert store.get(cid) == blob
    for cid, _ in items[:100]:
        assert store.delete(cid)
    assert sorted(store.iter_ids()) == sorted(c for c, _ in items[100:])


def test_put_twice_replaces(store: LocalStore) -> None:
    cid, blob = make(b"same")
    store.put(cid, blob)
    store.put(cid, blob)
    assert store.get(cid) == blob
    assert len(files_under(store.root)) == 1


def test_put_many_empty(store: LocalStore) -> None:
    assert store.put_many([]) == 0
    assert list(store.iter_ids()) == []


def test_fan_out_layout(store: LocalStore) -> None:
    cid, blob = make(b"layout")
    h = cid.hex()
    assert len(h) == 64
    expected = store.root / h[:2] / h[2:4] / h
    assert store.path(cid) == expected
    store.put(cid, blob)
    assert files_under(store.root) == [expected]
    assert expected.read_bytes() == blob
    # the file is private to the owner
    assert expected.stat().st_mode & 0o777 == 0o600


def test_layout_fixed_ids(store: LocalStore) -> None:
    cid = bytes.fromhex("ab" + "cd" + "00" * 30)
    assert store.path(cid) == store.root / "ab" / "cd" / cid.hex()


def test_temp_files_are_not_listed(store: LocalStore) -> None:
    cid, blob = make(b"real")
    store.put(cid, blob)
    h = cid.hex()
    d = store.path(cid).parent
    (d / f"{h}.12345.tmp").write_bytes(b"partial")           # a put in progress / crashed
    other = chunk_id(b"other").hex()
    od = store.root / other[:2] / other[2:4]
    od.mkdir(parents=True, exist_ok=True)
    (od / f"{other}.999.tmp").write_bytes(b"partial")
    (od / "README").write_bytes(b"not a chunk")
    (od / ("zz" * 32)).write_bytes(b"64 chars, not hex")
    (store.root / "ab").mkdir(exist_ok=True)
    (store.root / "ab" / "file").write_bytes(b"")             # a file where a dir is expected
    (store.root / "stray").mkdir()                            # name not 2 chars
    (store.root / ".probe1.tmp").write_bytes(b"")
    assert list(store.iter_ids()) == [cid]
    assert not store.exists(chunk_id(b"other"))


def test_no_temp_file_left_after_put(store: LocalStore) -> None:
    items = [make(os.urandom(5000)) for _ in range(20)]
    store.put_many(items)
    names = [p.name for p in files_under(store.root)]
    assert len(names) == 20
    assert not [n for n in names if n.endswith(".tmp")]


def test_iter_ids_missing_root(tmp_path: Path) -> None:
    assert list(LocalStore(tmp_path / "nowhere").iter_ids()) == []


def test_get_missing(store: LocalStore) -> None:
    cid = chunk_id(b"never stored")
    with pytest.raises(ChunkMissing) as ei:
        store.get(cid)
    assert cid.hex() in str(ei.value)
    assert ei.value.errno == errno.EIO
    assert store.stat(cid) is None
    assert store.delete(cid) is False


def test_get_deleted(store: LocalStore) -> None:
    cid, blob = make(b"short-lived")
    store.put(cid, blob)
    store.delete(cid)
    with pytest.raises(ChunkMissing):
        store.get(cid)


def test_check_writable(store: LocalStore, tmp_path: Path) -> None:
    store.check_writable()
    assert files_under(store.root) == []
    with pytest.raises(OSError):
        LocalStore(tmp_path / "nowhere").check_writable()


def test_disk_usage(store: LocalStore) -> None:
    free, total = store.disk_usage()
    assert 0 <= free <= total
    assert total > 0


def test_put_into_a_file_is_fs_error(tmp_path: Path) -> None:
    """Other OS errors become FsError (EIO), not NoSpace, and leave nothing behind."""
    root = tmp_path / "chunks"
    root.write_bytes(b"a file, not a directory")
    s = LocalStore(root)
    cid, blob = make(b"x")
    with pytest.raises(FsError) as ei:
        s.put(cid, blob)
    assert not isinstance(ei.value, NoSpace)
    assert ei.value.errno == errno.EIO


# -- a full disk -----------------------------------------------------------------------

@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root), unmounted at teardown."""
    with tmpfs(tmp_path / "tmpfs", "1m", mode="0755") as d:
        yield d


def test_enospc_is_nospace(tiny_tmpfs: Path) -> None:
    s = LocalStore(tiny_tmpfs)
    stored: list[tuple[bytes, bytes]] = []
    with pytest.raises(NoSpace) as ei:
        for _ in range(100):  # 100 x 64 KiB = 6.4 MiB into 1 MiB
            item = make(os.urandom(64 * 1024))
            s.put(*item)
            stored.append(item)
    assert ei.value.errno == errno.ENOSPC
    assert 4 <= len(stored) < 16
    # no partial file is left, and every chunk stored before is complete
    names = [p.name for p in files_under(tiny_tmpfs)]
    assert not [n for n in names if n.endswith(".tmp")], names
    assert sorted(s.iter_ids()) == sorted(c for c, _ in stored)
    for cid, blob in stored:
        assert s.get(cid) == blob
    # freeing space makes puts work again
    for cid, _ in stored[:3]:
        s.delete(cid)
    cid, blob = make(os.urandom(64 * 1024))
    s.put(cid, blob)
    assert s.get(cid) == blob


def test_enospc_in_put_many_keeps_earlier_files(tiny_tmpfs: Path) -> None:
    s = LocalStore(tiny_tmpfs)
    items = [make(os.urandom(200 * 1024)) for _ in range(10)]
    with pytest.raises(NoSpace):
        s.put_many(items)
    ids = set(s.iter_ids())
    assert ids and len(ids) < len(items)
    # what is there is a prefix of the batch, each file complete
    assert ids == {c for c, _ in items[:len(ids)]}
    for cid, blob in items[:len(ids)]:
        assert s.get(cid) == blob
    assert not [p for p in files_under(tiny_tmpfs) if p.name.endswith(".tmp")]
