"""Engine tests of the namespace durability modes (docs/durability.md), without FUSE.

Under IMMEDIATE every namespace operation is committed when the engine returns: the
test's own connection (READ COMMITTED, as `casfs gc|stats` would use) sees it at once,
without ``fs.sync()``. Under GROUP (the default) the same operations stay in the open
group transaction until a commit, which this engine test never triggers by itself (no
writeback tick runs here), so the other connection sees none of them.
"""
from __future__ import annotations

import stat as S

import pytest

import cas.db.database
from cas.errors import InvalidArgument
from cas.engine.fs import GROUP, IMMEDIATE, Filesystem
from tests.engine.test_fs import FILE_MODE, GID, ROOT, UID, Engine, eng  # noqa: F401 - the fixture


def open_fs(eng: Engine, durability: str) -> Filesystem:
    """Replace the engine's Filesystem with one in ``durability`` mode."""
    eng.fs.close()
    eng.opened.remove(eng.fs)
    eng.fs = Filesystem(cas.db.database.connect(eng.vol), cache_bytes=16 << 20, durability=durability)
    eng.opened.append(eng.fs)
    return eng.fs


@pytest.mark.parametrize("mode", [IMMEDIATE, GROUP])
def test_operations_commit_before_returning_only_under_immediate(eng: Engine, mode: str) -> None:
    fs = open_fs(eng, mode)
    committed = mode == IMMEDIATE

    def seen(sql: str, *args: object) -> bool:
        return bool(eng.q(sql, args, sync=False))

    def entry(name: bytes, parent: int = ROOT) -> bool:
        return seen("SELECT 1 FROM dentries WHERE parent = %s AND name = %s", parent, name)

    # the state before, committed
    d = fs.mkdir(ROOT, b"d", 0o755, UID, GID).ino
    f = fs.create(d, b"f", FILE_MODE, UID, GID).ino
    fs.release(f)
    fs.mkdir(ROOT, b"rmd", 0o755, UID, GID)
    fs.sync()
    # each operation, and whether another connection sees it at once
    fs.mkdir(ROOT, b"n", 0o755, UID, GID)
    assert entry(b"n") is committed
    o = fs.create(d, b"o", FILE_MODE, UID, GID).ino
    assert entry(b"o", d) is committed
    fs.setattr(o, mode=0o600)       # o is open: under GROUP this waits for its writeback
    assert seen("SELECT 1 FROM inodes WHERE id = %s AND mode = %s", o, S.S_IFREG | 0o600) is committed
    fs.release(o)
    fs.setattr(f, mode=0o640)
    assert seen("SELECT 1 FROM inodes WHERE id = %s AND mode = %s", f, S.S_IFREG | 0o640) is committed
    fs.rename(d, b"f", ROOT, b"g")
    assert entry(b"g") is committed and entry(b"f", d) is not committed
    fs.link(f, ROOT, b"h")
    assert entry(b"h") is committed
    fs.symlink(ROOT, b"s", b"target", UID, GID)
    assert entry(b"s") is committed
    fs.setxattr(f, b"user.k", b"v")
    assert seen("SELECT 1 FROM xattrs WHERE inode = %s AND name = 'user.k'", f) is committed
    fs.unlink(d, b"o")
    assert entry(b"o", d) is False  # under GROUP it was never committed
    fs.rmdir(ROOT, b"rmd")
    assert entry(b"rmd") is not committed
    fs.sync()
    assert entry(b"g") and entry(b"h") and entry(b"s") and not entry(b"rmd") and not entry(b"f", d)


def test_immediate_rename_commits_the_files_buffered_contents_first(eng: Engine) -> None:
    fs = open_fs(eng, IMMEDIATE)
    data = b"new contents" * 1000
    f = fs.create(ROOT, b"tmp", FILE_MODE, UID, GID).ino
    fs.write(f, 0, data)
    fs.release(f)                   # released with buffered bytes: no writeback yet
    assert eng.q("SELECT size FROM inodes WHERE id = %s", (f,), sync=False) == [(0,)]
    fs.rename(ROOT, b"tmp", ROOT, b"target")
    assert eng.q("SELECT size FROM inodes WHERE id = %s", (f,), sync=False) == [(len(data),)]
    assert eng.q("SELECT COUNT(*) FROM manifests WHERE inode = %s", (f,), sync=False) == [(1,)]


def test_unknown_durability_is_refused(eng: Engine) -> None:
    with cas.db.database.connect(eng.vol) as meta, pytest.raises(InvalidArgument):
        Filesystem(meta, durability="sometimes")
