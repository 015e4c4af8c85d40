"""Engine tests of writeback bookkeeping (docs/writeback.md), without FUSE.

- the running total of dirty bytes (FileData.total_dirty) equals the sum over the open
  files after any sequence of writes, truncates, flushes, releases and unlinks (a write
  costs O(1) in the number of open files; issue 8, item 7);
- a rescue record survives encode/decode byte for byte, and a damaged one is refused.
"""
from __future__ import annotations

import random
import stat as S

import pytest

from cas.engine import rescue
from cas.errors import CasError
from cas.engine.fs import Filesystem
from tests.engine.test_fs import CS, GID, ROOT, UID, Engine, eng  # noqa: F401 - the fixture


def _check_total(fs: Filesystem) -> None:
    assert fs.data.total_dirty == sum(st.dirty_bytes for st in fs.data.states.values())
    for st in fs.data.states.values():
        assert st.dirty_bytes == sum(len(b) for b in st.dirty.values()), st.ino


@pytest.mark.parametrize("seed", [1, 2])
def test_running_dirty_total_equals_sum(eng: Engine, seed: int) -> None:
    fs = eng.fs
    rng = random.Random(seed)
    fs.data.inode_dirty_limit = 6 * CS      # small limits: forced flushes happen too
    fs.data.total_dirty_limit = 20 * CS
    open_: dict[int, int] = {}               # ino -> handles held by the test
    names: dict[bytes, int] = {}
    for step in range(600):
        op = rng.random()
        if op < 0.15 or not names:
            name = f"f{step}".encode()
            a = fs.create(ROOT, name, 0o644, UID, GID)
            names[name] = a.ino
            open_[a.ino] = open_.get(a.ino, 0) + 1
        elif op < 0.55:
            ino = rng.choice(list(open_)) if open_ else None
            if ino is not None:
                off = rng.randrange(0, 12 * CS)
                fs.write(ino, off, rng.randbytes(rng.choice([1, 100, CS // 2, CS, 2 * CS + 7])))
        elif op < 0.65:
            ino = rng.choice(list(open_)) if open_ else None
            if ino is not None:
                fs.setattr(ino, size=rng.randrange(0, 10 * CS))
        elif op < 0.72:
            name = rng.choice(list(names))
            ino = names[name]
            fs.open(ino)
            open_[ino] = open_.get(ino, 0) + 1
        elif op < 0.85 and open_:
            ino = rng.choice(list(open_))
            fs.close_file(ino)
            fs.release(ino)
            open_[ino] -= 1
            if not open_[ino]:
                del open_[ino]
        elif op < 0.90:
            name = rng.choice(list(names))
            fs.unlink(ROOT, name)
            del names[name]
        elif op < 0.95:
            fs.writeback(0.0)
        else:
            ino = rng.choice(list(open_)) if open_ else None
            if ino is not None:
                fs.fsync(ino)
        _check_total(fs)
    fs.flush_all()
    _check_total(fs)
    assert fs.data.total_dirty == 0


def test_rescue_record_roundtrip_and_damage() -> None:
    rng = random.Random(5)
    slots = {0: rng.randbytes(CS), 3: rng.randbytes(100), 7: b""}
    header = {"ino": 42, "path": "/a/b", "size": 3 * CS + 100, "chunk_size": CS,
              "truncate_from": 2, "attrs": {"mtime_ns": 5}, "mode": S.S_IFREG | 0o600,
              "uid": 0, "gid": 0, "error": "full", "time_ns": 1}
    blob = rescue.encode(header, slots)
    rec = rescue.decode(blob)
    assert rec.slots == slots
    assert {k: rec.header[k] for k in header} == header
    for pos in (0, len(rescue.MAGIC) + 6, len(blob) - 40, len(blob) - 1):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(rescue.RescueError):
            rescue.decode(bytes(bad))
    with pytest.raises(rescue.RescueError):
        rescue.decode(blob[:-1])


def _kill_session(eng: Engine, fs: Filesystem) -> None:
    """KILL the engine's MySQL session from the test's own connection: the open group
    transaction is rolled back by the server, as when mariadbd dies."""
    with eng.admin.cursor() as cur:
        cur.execute(f"KILL {fs.db.conn.thread_id()}")


def test_flushed_bytes_survive_a_lost_group_transaction(eng: Engine) -> None:
    """Bytes flushed into the group transaction but not committed are given back as
    dirty when the group is lost (not dropped with the released file's state), and the
    next writeback commits them: the file reads back as the application wrote it."""
    fs = eng.fs
    rng = random.Random(9)
    a = fs.create(ROOT, b"f", 0o644, UID, GID)
    first = rng.randbytes(5 * CS + 100)
    fs.write(a.ino, 0, first)
    fs.fsync(a.ino)                                   # committed: the file and 5 slots
    fs.setattr(a.ino, size=3 * CS + 10)              # truncation flushed into the group
    patch = rng.randbytes(CS + 7)
    fs.write(a.ino, CS // 2, patch)
    fs.write(a.ino, 7 * CS, b"tail")                  # grows the file past a hole
    fs.setattr(a.ino, mode=0o600)
    want = bytearray(first[:3 * CS + 10])
    want[CS // 2:CS // 2 + len(patch)] = patch
    want += bytes(7 * CS - len(want)) + b"tail"
    fs.close_file(a.ino)
    fs.release(a.ino)
    with fs.lock:
        fs._flush_closed()                            # flushed into the group, state dropped
    assert a.ino not in fs.data.states and fs.data.total_dirty == 0
    _kill_session(eng, fs)
    with pytest.raises(CasError):
        fs.sync()                                     # the COMMIT finds the group lost
    st = fs.data.states[a.ino]                        # given back, with its bytes dirty
    assert st.dirty and st.size == len(want)
    fs.writeback(0.0)                                 # the tick writes it back and commits
    assert a.ino not in fs.data.states
    fs = eng.reopen()
    assert fs.getattr(a.ino).size == len(want)
    assert fs.getattr(a.ino).mode & 0o777 == 0o600
    fs.open(a.ino)
    assert fs.read(a.ino, 0, len(want) + 10) == bytes(want)
    fs.release(a.ino)
    assert eng.fsck().clean
