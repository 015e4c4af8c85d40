"""The audit hook's path map (fusefront/observe.py) on a real engine and database,
driving the real FUSE handlers (fusefront/operations.py) without a kernel mount.

* a walk 600 directories up is a loop, not a recursion (RecursionError used to escape
  the hook and end pyfuse3.main);
* opens and xattr changes of inodes the hook has seen named run no dentry query, and a
  rename moves one name in the map instead of clearing it;
* an exception in the hook's own bookkeeping is logged once and dropped: the request's
  result stands.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import trio

import fusefront.observe as observe
import fusefront.operations as operations
from cas.config.audit import CHANGES, LOGGER
from fusefront.observe import Observer
from fusefront.operations import CasOperations
from tests.engine.test_fs import ROOT, Engine, eng  # noqa: F401 - the fixture

CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), umask=0o022)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.recs: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.recs.append(dict(record.audit))  # type: ignore[attr-defined]


@pytest.fixture
def audit_records() -> Iterator[Records]:
    log = logging.getLogger(LOGGER)
    h, level, propagate = Records(), log.level, log.propagate
    log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield h
    finally:
        log.removeHandler(h)
        log.setLevel(level)
        log.propagate = propagate


def count_dentry_queries(eng: Engine) -> list[int]:
    """Count the Filesystem's dentry look-ups (the real method still runs)."""
    calls = [0]
    real: Callable[[int], Any] = eng.fs.dentry_of

    def counted(ino: int) -> Any:
        calls[0] += 1
        return real(ino)
    eng.fs.dentry_of = counted  # type: ignore[method-assign]
    return calls


def test_deep_path_is_a_loop(eng: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    parent = ROOT
    for _ in range(600):
        parent = eng.fs.mkdir(parent, b"d", 0o40755, os.getuid(), os.getgid()).ino
    calls = count_dentry_queries(eng)
    obs = Observer(eng.fs, audit_level=CHANGES)
    assert obs.path(parent) == "/d" * 600
    assert calls[0] == 600                      # one query per level, then remembered
    assert obs.path(parent) == "/d" * 600 and calls[0] == 600
    monkeypatch.setattr(observe, "MAX_DEPTH", 100)
    assert Observer(eng.fs, audit_level=CHANGES).path(parent) is None   # capped: no path


def test_known_inodes_need_no_query(eng: Engine, audit_records: Records) -> None:
    ops = CasOperations(eng.fs)
    Observer(eng.fs, audit_level=CHANGES).install(ops)
    calls = count_dentry_queries(eng)

    async def run() -> None:
        a = (await ops.mkdir(ROOT, b"a", 0o755, CTX)).st_ino
        b = (await ops.mkdir(a, b"b", 0o755, CTX)).st_ino
        fi, e = await ops.create(b, b"f", 0o644, os.O_WRONLY, CTX)
        await ops.release(fi.fh)
        await ops.rename(ROOT, b"a", ROOT, b"c", 0, CTX)
        await ops.release((await ops.open(e.st_ino, os.O_RDONLY, CTX)).fh)
        await ops.rename(b, b"f", b, b"g", 0, CTX)
        await ops.setxattr(e.st_ino, b"user.k", b"v", CTX)
        x = (await ops.mkdir(ROOT, b"x", 0o755, CTX)).st_ino
        await ops.rename(a, b"b", x, b"b", 0, CTX)
        await ops.release((await ops.open(e.st_ino, os.O_RDONLY, CTX)).fh)
        await ops.rmdir(ROOT, b"c", CTX)
        await ops.unlink(b, b"g", CTX)
    trio.run(run)
    got = [(r["op"], r["path"], r.get("path2"), r["result"]) for r in audit_records.recs]
    assert got == [
        ("mkdir", "/a", None, 0), ("mkdir", "/a/b", None, 0), ("create", "/a/b/f", None, 0),
        ("rename", "/a", "/c", 0), ("open", "/c/b/f", None, 0), ("rename", "/c/b/f", "/c/b/g", 0),
        ("setxattr", "/c/b/g", None, 0), ("mkdir", "/x", None, 0), ("rename", "/c/b", "/x/b", 0),
        ("open", "/x/b/g", None, 0), ("rmdir", "/c", None, 0), ("unlink", "/x/b/g", None, 0),
    ], got
    assert calls[0] == 0


def test_hook_failure_leaves_the_result(eng: Engine, audit_records: Records,
                                        caplog: pytest.LogCaptureFixture) -> None:
    ops = CasOperations(eng.fs)
    obs = Observer(eng.fs, audit_level=CHANGES)
    obs.install(ops)
    ino = eng.fs.create(ROOT, b"f", 0o100644, os.getuid(), os.getgid()).ino

    def broken(ino: int) -> Any:
        raise RuntimeError("bookkeeping bug")
    eng.fs.dentry_of = broken  # type: ignore[method-assign]

    async def run() -> None:
        for _ in range(3):
            fi = await ops.open(ino, os.O_RDONLY, CTX)
            assert fi.fh == ino
            await ops.release(fi.fh)
    with caplog.at_level(logging.ERROR, logger="fusefront.observe"):
        trio.run(run)
    assert obs.hook_errors == 3
    assert sum("hook failed" in r.getMessage() for r in caplog.records) == 1   # logged once


def test_listed_names_and_a_full_map(eng: Engine, audit_records: Records, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names a readdir hands out are learned (no query at the open that follows); a full
    map lets its oldest name go, which costs a query later, never a wrong path; a lost
    group transaction (the FUSE layer forgets its tables) empties the map."""
    monkeypatch.setattr(observe, "NAMES_MAX", 4)
    d = eng.fs.mkdir(ROOT, b"d", 0o40755, os.getuid(), os.getgid()).ino
    inos = [eng.fs.create(d, b"f%d" % i, 0o100644, os.getuid(), os.getgid()).ino for i in range(3)]
    ops = CasOperations(eng.fs)
    obs = Observer(eng.fs, audit_level=CHANGES)
    obs.install(ops)
    calls = count_dentry_queries(eng)

    async def run() -> None:
        assert (await ops.lookup(ROOT, b"d", CTX)).st_ino == d
        await ops.opendir(d, CTX)
        await ops.readdir(d, 0, None)   # type: ignore[arg-type]
        for ino in inos:
            await ops.release((await ops.open(ino, os.O_RDONLY, CTX)).fh)
    monkeypatch.setattr(operations.pyfuse3, "readdir_reply", lambda *a: True)   # no kernel here
    trio.run(run)
    assert [r["path"] for r in audit_records.recs if r["op"] == "open"] == ["/d/f0", "/d/f1", "/d/f2"]
    assert calls[0] == 0
    assert len(obs._names) == 4
    e = eng.fs.create(d, b"g", 0o100644, os.getuid(), os.getgid()).ino
    # g is not in the map: one query; learning it lets the oldest name (d) go, so d
    # costs a query too (and lets f0 go)
    assert obs.path(e) == "/d/g" and calls[0] == 2
    assert len(obs._names) == 4 and inos[0] not in obs._names
    assert obs.path(inos[2]) == "/d/f2" and calls[0] == 2
    assert obs.path(inos[0]) == "/d/f0" and calls[0] == 3
    ops._forget_tables()
    assert obs._names == {} and obs._inos == {}
