"""The typed metadata layer (cas/db/, docs/metadata.md): its rules, and the typed
functions where the typing adds one.

- No module outside ``cas/db/`` (benchmarks under tools/bench excepted) runs a
  statement of its own (:func:`test_no_sql_outside_the_metadata_layer`); the modules
  are :data:`SQL_FREE_MODULES`.
- Every public function of the layer says in its docstring which row locks it takes.
- Typed functions on a real MariaDB: a file's manifest rows round-trip through batches
  of BATCH_ROWS, refcount deltas over more than BATCH_ROWS chunks land exactly, and an
  inode update refuses columns that are not writable.
"""
from __future__ import annotations

import ast
import inspect
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import cas.db.chunks as dbchunks
import cas.db.manifests as dbmanifests
import cas.db.namespace as ns
import cas.db.packs as dbpacks
import cas.db.queue as dbqueue
import cas.db.tables as dbtables
import cas.db.volume as dbvolume
import cas.db.sessions as dbsessions
import cas.db.changes as dbchanges
import cas.db.reports as reports
import cas.db.database
from cas.db.batch import BATCH_ROWS
from tests.engine.test_fs import ROOT, Engine, eng  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]

#: modules that run SQL of their own and may: the metadata layer itself, and benchmarks
#: (tools/bench seeds and probes test volumes' rows directly: docs/metadata.md)
SQL_ALLOWED_UNDER: tuple[str, ...] = ("cas/db/", "tools/bench/")

#: modules whose ``execute(`` calls are not SQL (an SQL text there is still refused)
NOT_SQL_EXECUTE: dict[str, str] = {
    "cas/tier/drive.py": "google-api-python-client requests end in .execute()",
}

#: every module whose SQL lives in cas/db/: none of them may run a statement of its own
#: (a new module joins the list by existing; the engine, maintenance, cloud tier, FUSE
#: side and CLI all do, e.g. cas/engine/rescue.py, fusefront/metrics.py,
#: tools/cli/statwatch.py, tools/cli/drivecmd.py)
SQL_FREE_MODULES: tuple[str, ...] = tuple(
    str(p.relative_to(REPO)) for top in ("cas", "fusefront", "tools") for p in sorted((REPO / top).rglob("*.py"))
    if not str(p.relative_to(REPO)).startswith(SQL_ALLOWED_UNDER))

#: the layer's modules, each public function of which states its row locks
LAYER_MODULES = (ns, dbmanifests, dbchunks, reports, dbpacks, dbqueue, dbvolume, dbtables, dbsessions,
                 dbchanges)

# a statement's verb, upper case as every statement of casfs is written, then a blank
# (so that prose such as "Insert the row" or errors="replace" is not one)
_SQL_START = re.compile(r"\s*(SELECT|INSERT|UPDATE|DELETE|REPLACE|WITH RECURSIVE)\s")
_SQL_CALLS = {"execute", "executemany", "query"}


def sql_in(source: str) -> list[tuple[int, str, str]]:
    """(line, enclosing function's qualified name or "", what) of every SQL statement in
    ``source``: a call of ``execute(``, ``executemany(`` or ``query(``, or a string
    literal (an f-string's first part too) that starts with an SQL verb in capitals."""
    tree = ast.parse(source)
    found: list[tuple[int, str, str]] = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{scope}.{child.name}" if scope else child.name
            if isinstance(child, ast.Call):
                f = child.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                if name in _SQL_CALLS:
                    found.append((child.lineno, scope, f"{name}("))
            text: str | None = None
            if isinstance(child, ast.Constant) and isinstance(child.value, str):
                text = child.value
            elif isinstance(child, ast.JoinedStr) and child.values:
                first = child.values[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    text = first.value
            if text is not None and _SQL_START.match(text):
                found.append((child.lineno, scope, text.strip()[:40]))
            if not isinstance(child, ast.JoinedStr):
                visit(child, inner)

    visit(tree, "")
    return found


def test_the_rule_finds_statements() -> None:
    """The checker itself: calls and literals, in methods, nested functions and f-strings."""
    src = (
        "class A:\n"
        "    def m(self, cur):\n"
        "        def body(c):\n"
        "            c.execute('UPDATE x SET y = 1')\n"
        "        return self.db.query(f'SELECT {1}')\n"
        "X = 'DELETE FROM t'\n"
        "doc = 'Insert nothing, just prose'; e = 'REPLACE'\n")
    got = sql_in(src)
    assert (4, "A.m.body", "execute(") in got
    assert (4, "A.m.body", "UPDATE x SET y = 1") in got
    assert (5, "A.m", "query(") in got
    assert (5, "A.m", "SELECT") in got
    assert (6, "", "DELETE FROM t") in got
    assert not [g for g in got if g[0] == 7]


def test_no_sql_outside_the_metadata_layer() -> None:
    assert {"cas/engine/fs.py", "cas/engine/rescue.py", "cas/maint/gc.py", "fusefront/metrics.py",
            "tools/cli/statwatch.py", "tools/cli/drivecmd.py"} <= set(SQL_FREE_MODULES)
    offenders = []
    for rel in SQL_FREE_MODULES:
        for line, scope, what in sql_in((REPO / rel).read_text()):
            if rel in NOT_SQL_EXECUTE and what == "execute(":
                continue
            offenders.append(f"{rel}:{line} in {scope or '<module>'}: {what}")
    assert not offenders, ("SQL belongs in cas/db/ (docs/metadata.md); found:\n" + "\n".join(offenders))


def test_every_layer_function_states_its_locks() -> None:
    missing = []
    for mod in LAYER_MODULES:
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if name.startswith("_") or fn.__module__ != mod.__name__:
                continue
            doc = inspect.getdoc(fn) or ""
            if "lock" not in doc.lower():
                missing.append(f"{mod.__name__}.{name}")
    assert not missing, f"docstrings that do not say which row locks they take: {missing}"


# -- typed functions on a real MariaDB ---------------------------------------------------

@pytest.fixture
def db(eng: Engine) -> Iterator[cas.db.database.Database]:
    """A connection of its own to the volume's database (no group commit: each
    transaction commits), closed at teardown."""
    meta = cas.db.database.connect(eng.vol)
    try:
        yield meta.db
    finally:
        meta.close()


def test_manifest_rows_round_trip_in_batches(eng: Engine, db: cas.db.database.Database) -> None:
    ino = eng.fs.create(ROOT, b"f", 0o644, os.getuid(), os.getgid()).ino
    eng.fs.release(ino)
    eng.fs.sync()
    n = 2 * BATCH_ROWS + 37       # three REPLACE statements
    rows = [dbmanifests.ManifestRow(ino, s, s.to_bytes(4, "big") * 8) for s in range(n)]
    db.transaction(lambda cur: dbmanifests.put(cur, rows))
    want = {r.slot: r.chunk for r in rows}
    assert dbmanifests.manifest_of(db, ino) == want
    # the same rows through the transaction's cursor, and REPLACE keeps one row per slot
    db.transaction(lambda cur: dbmanifests.put(cur, rows[:10]))
    assert db.transaction(lambda cur: dbmanifests.manifest_of(cur, ino)) == want
    holes = list(range(0, n, 2))  # more than BATCH_ROWS slots: two DELETE statements
    assert len(holes) > BATCH_ROWS
    db.transaction(lambda cur: dbmanifests.delete_slots(cur, ino, holes))
    want = {s: c for s, c in want.items() if s % 2}
    assert dbmanifests.manifest_of(db, ino) == want
    db.transaction(lambda cur: dbmanifests.delete_from(cur, ino, n - 100))
    want = {s: c for s, c in want.items() if s < n - 100}
    assert dbmanifests.manifest_of(db, ino) == want
    got = db.transaction(lambda cur: dbmanifests.chunks_for_update(cur, ino))
    assert sorted(got) == sorted(want.values())
    db.transaction(lambda cur: dbmanifests.delete_all(cur, ino))
    assert dbmanifests.manifest_of(db, ino) == {}


def test_refcount_deltas_over_more_than_a_batch(eng: Engine, db: cas.db.database.Database) -> None:
    n = BATCH_ROWS * 2 + 11
    ids = sorted(i.to_bytes(2, "big") * 16 for i in range(1, n + 1))
    refs = [dbchunks.ChunkRef(cid, 1000 + i, 500 + i, 1 + i % 3) for i, cid in enumerate(ids)]
    db.transaction(lambda cur: dbchunks.add_refs(cur, refs))
    assert dbchunks.recorded(db, ids + [b"\xff" * 32]) == set(ids)
    locked = db.transaction(lambda cur: dbchunks.lock_gaining(cur, ids))
    assert locked == {r.id: dbchunks.LockedChunk(r.delta, r.stored_length, False) for r in refs}
    with pytest.raises(ValueError):    # the lock order is id order: refused otherwise
        db.transaction(lambda cur: dbchunks.lock_gaining(cur, ids[::-1]))
    # a second upsert adds to the refcounts; a negative delta takes away, and a chunk
    # that reaches 0 gets zero_since (gc's grace period), one that stays above does not
    db.transaction(lambda cur: dbchunks.add_refs(cur, [r._replace(delta=1) for r in refs]))
    ones = [r.id for r in refs if r.delta == 1]      # refcount 2 now
    db.transaction(lambda cur: dbchunks.drop_refs(cur, -2, ones))
    assert len(ones) > BATCH_ROWS // 2
    got = {bytes(c): (int(rc), z is not None) for c, rc, z in eng.q(
        "SELECT id, refcount, zero_since FROM chunks", sync=False)}
    want = {r.id: (0, True) if r.delta == 1 else (r.delta + 1, False) for r in refs}
    assert got == want
    # bad marks over more than a batch, and the dedup check sees them
    bad = ids[::2]
    db.transaction(lambda cur: dbchunks.mark_bad(cur, bad))
    states = {s.id: s for s in dbchunks.states(db, ids)}
    assert {c for c, s in states.items() if s.bad} == set(bad)
    assert all(s.is_local and s.stored_length == next(r.stored_length for r in refs if r.id == c)
               for c, s in list(states.items())[:5])
    db.transaction(lambda cur: dbchunks.mark_rewritten(cur, bad[0], 77))
    assert dbchunks.states(db, [bad[0]]) == [dbchunks.ChunkState(bad[0], False, True, 77)]
    # the same marks autocommitted on the Database (scrub, repair); the "if local" one
    # leaves a chunk whose row says it is not local (evicted meanwhile) unmarked
    good = ids[1::2]
    db.execute("UPDATE chunks SET is_local = 0 WHERE id = %s", (good[0],))
    dbchunks.mark_bad_if_local(db, good[:2])
    dbchunks.mark_bad(db, good[2:3])
    assert [s.bad for s in dbchunks.states(db, good[:4])] == [False, True, True, False]


def test_inode_rows_are_typed_and_updates_checked(eng: Engine, db: cas.db.database.Database) -> None:
    fs = eng.fs
    d = fs.mkdir(ROOT, b"d", 0o755, os.getuid(), os.getgid())
    f = fs.create(d.ino, b"f", 0o600, os.getuid(), os.getgid())
    fs.release(f.ino)
    fs.setxattr(f.ino, b"user.k", b"v")
    fs.sync()
    row = ns.inode(db, f.ino)
    assert row is not None and row.id == f.ino and row.mode == f.mode and row.nlink == 1
    assert ns.lookup(db, d.ino, b"f") == row
    assert ns.parent_of(db, d.ino) == ROOT and ns.parent_of(db, ROOT) is None
    assert ns.dentry_of(db, f.ino) == ns.Dentry(d.ino, b"f", f.ino)
    assert [(e.name, e.inode) for e in ns.list_dir(db, d.ino, 0, 10)] == [(b"f", row)]
    assert ns.xattrs_of(db, f.ino) == {b"user.k": b"v"}
    assert ns.inodes_with_xattrs(db, [d.ino, f.ino]) == {f.ino}
    with pytest.raises(ValueError):
        db.transaction(lambda cur: ns.update_inode(cur, f.ino, {"id": 99}))
    with pytest.raises(ValueError):
        db.transaction(lambda cur: ns.update_inode(cur, f.ino, {"mode = 0, uid": 1}))
    db.transaction(lambda cur: ns.update_inode(cur, f.ino, {"uid": 4242, "size": 7}))
    after = ns.inode(db, f.ino)
    assert after == row._replace(uid=4242, size=7)
