"""The engine's xattr limits (cas/engine/xattrs.py, docs/security.md): the per-inode space,
the byte bound of the xattr cache, bare namespace prefixes, and the maximum file size."""
from __future__ import annotations

import errno
import os

import pytest

from cas.errors import FsError
from cas.engine.fs import MAX_FILE_SIZE
from cas.engine.xattrs import XATTR_CACHE_BYTES, XATTR_INODE_MAX, XattrCache

from .test_fs import Engine, eng, make_file  # noqa: F401 - eng is a fixture


def test_cache_counts_what_it_holds() -> None:
    c = XattrCache(max_bytes=10_000)
    c[1] = {b"user.a": b"x" * 1000}
    c[2] = {b"user.a": b"y" * 1000}
    total = c.bytes
    assert total > 2000
    c[1][b"user.b"] = b"z" * 3000
    c.changed(1)
    assert c.bytes == total + 3000 + len(b"user.b") + 100
    c.pop(2)
    c.popitem(last=False)
    assert c.bytes == 0 and not c
    for i in range(100):                     # 100 x ~1.4 KB > 10,000 bytes: the oldest go
        c[i] = {b"user.a": b"x" * 1000}
        assert c.bytes <= 10_000
    assert 99 in c and 0 not in c
    c.clear()
    assert c.bytes == 0


def test_xattr_cache_stays_bounded(eng: Engine) -> None:
    fs = eng.fs
    value = os.urandom(60_000)
    inos = [make_file(fs, f"f{i}".encode(), b"") for i in range(400)]   # 48 MB of values
    for ino in inos:
        fs.setxattr(ino, b"user.a", value)
        fs.setxattr(ino, b"user.b", value)
        assert fs.xattr_cache.bytes <= XATTR_CACHE_BYTES
    for ino in inos:
        assert fs.getxattr(ino, b"user.a") == value
        assert fs.xattr_cache.bytes <= XATTR_CACHE_BYTES
    assert len(fs.xattr_cache) < len(inos)


def test_xattr_space_and_names(eng: Engine) -> None:
    fs = eng.fs
    ino = make_file(fs, b"x", b"")
    fs.setxattr(ino, b"user.a", b"a" * 65536)
    fs.setxattr(ino, b"user.b", b"b" * (XATTR_INODE_MAX - 65536 - 12))
    with pytest.raises(FsError) as ei:
        fs.setxattr(ino, b"user.c", b"")
    assert ei.value.errno == errno.ENOSPC
    fs.removexattr(ino, b"user.b")
    fs.setxattr(ino, b"user.c", b"")
    for name in (b"user.", b"trusted.", b"security.", b"system."):
        for call in (lambda: fs.setxattr(ino, name, b"v"), lambda: fs.getxattr(ino, name),
                     lambda: fs.removexattr(ino, name)):
            with pytest.raises(FsError) as ei:
                call()
            assert ei.value.errno == errno.EINVAL, name


def test_maximum_file_size(eng: Engine) -> None:
    fs = eng.fs
    ino = make_file(fs, b"big", b"", release=False)
    with pytest.raises(FsError) as ei:
        fs.setattr(ino, size=MAX_FILE_SIZE + 1)
    assert ei.value.errno == errno.EFBIG
    with pytest.raises(FsError) as ei:
        fs.write(ino, MAX_FILE_SIZE, b"x")
    assert ei.value.errno == errno.EFBIG
    assert fs.write(ino, MAX_FILE_SIZE - 1, b"xyz") == 1
    assert fs.getattr(ino).size == MAX_FILE_SIZE
    fs.fsync(ino)
    fs.release(ino)
    assert fs.getattr(ino).size == MAX_FILE_SIZE
