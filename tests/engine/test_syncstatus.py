"""The sync status of a file (cas/engine/syncstatus.py, docs/status.md) on the engine: the
value's shape, where buffered bytes count, the read-only virtual name, and the places."""
from __future__ import annotations

import errno
import os

import pytest

from cas.errors import FsError, NoData
from cas.engine.syncstatus import STATUS_XATTR, FileSync, _where

from .test_fs import CS, ROOT, Engine, eng, make_file  # noqa: F401 - eng is a fixture


def test_places() -> None:
    # (chunks, local, cloud, dirty bytes) -> where
    assert _where(0, 0, 0, 0) == "none" and _where(0, 0, 0, 5) == "local"
    assert _where(3, 3, 0, 0) == "local" and _where(3, 3, 1, 0) == "local"
    assert _where(3, 3, 3, 0) == "both" and _where(3, 0, 3, 0) == "cloud-only"
    assert _where(3, 1, 3, 0) == "partial" and _where(3, 0, 3, 9) == "partial"
    assert _where(3, 2, 1, 0) == "partial"


def test_engine_status_value_and_read_only_name(eng: Engine) -> None:
    fs = eng.fs
    a, b = os.urandom(CS), os.urandom(CS)
    ino = make_file(fs, b"f", a + b + a, release=False)           # slot 2 repeats slot 0
    s = FileSync.decode(fs.getxattr(ino, STATUS_XATTR))
    assert (s.state, s.where, s.chunks, s.local_chunks, s.cloud_chunks, s.dirty_bytes) == \
        ("no-cloud", "local", 2, 2, 0, 0)                       # no cloud tier on this volume
    fs.write(ino, 0, b"x" * 10)                                   # buffered, not written back
    assert fs.sync_status(ino).dirty_bytes > 0
    for call in (lambda: fs.setxattr(ino, STATUS_XATTR, b"synced"), lambda: fs.removexattr(ino, STATUS_XATTR)):
        with pytest.raises(FsError) as ei:
            call()
        assert ei.value.errno == errno.EPERM
    assert fs.listxattr(ino) == []
    assert not fs.db.query("SELECT 1 FROM xattrs")                # never stored
    with pytest.raises(NoData):
        fs.getxattr(ROOT, STATUS_XATTR)                         # only regular files
    fs.release(ino)
    with pytest.raises(ValueError):
        FileSync.decode(b'{"state": "maybe"}')
