"""Tests of cas.db.database: URL parsing, schema creation and checks, transactions.

The database tests run against the session MariaDB server (``mysql_server``), each in a
database of its own that is dropped at teardown.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from cas.errors import MetaError, SchemaMismatch
from cas.db.database import (ROOT_INODE, SCHEMA_VERSION, Database, MetaTarget, connect, initialize,
                      parse_meta_url, schema_statements)
from cas.db.server import EmbeddedServer
from cas.config.volume import Volume

# -- parse_meta_url --------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CASFS_MYSQL_PASSWORD", raising=False)


@pytest.mark.parametrize("url, expected", [
    ("mysql://root@localhost/casfs",
     MetaTarget(user="root", password="", database="casfs", host="localhost", port=3306)),
    ("mysql://alice@db.example.com:3307/vol_1",
     MetaTarget(user="alice", password="", database="vol_1", host="db.example.com", port=3307)),
    ("mariadb://bob@10.0.0.5/x",
     MetaTarget(user="bob", password="", database="x", host="10.0.0.5", port=3306)),
    ("mysql://root@localhost/casfs?unix_socket=/run/mysqld/mysqld.sock",
     MetaTarget(user="root", password="", database="casfs", host="localhost", port=3306,
                unix_socket="/run/mysqld/mysqld.sock")),
    ("mysql://a%40b@localhost/d$b",
     MetaTarget(user="a@b", password="", database="d$b", host="localhost", port=3306)),
    ("mysql://u@[::1]:3306/db",
     MetaTarget(user="u", password="", database="db", host="::1", port=3306)),
    ("mysql://u@h/" + "d" * 64,
     MetaTarget(user="u", password="", database="d" * 64, host="h", port=3306)),
])
def test_parse_good_urls(url: str, expected: MetaTarget) -> None:
    assert parse_meta_url(url) == expected


def test_parse_password_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_meta_url("mysql://u@h/db").password == ""
    monkeypatch.setenv("CASFS_MYSQL_PASSWORD", "from-env")
    assert parse_meta_url("mysql://u@h/db").password == "from-env"
    assert parse_meta_url("mysql://u@h/db", password="from-config").password == "from-config"


def test_describe() -> None:
    assert parse_meta_url("mysql://u@h:1234/db").describe() == "u@h:1234/db"
    assert parse_meta_url("mysql://u@h/db?unix_socket=/s.sock").describe() == "u@/s.sock/db"


@pytest.mark.parametrize("url", ["mysql://u:secret@h/db", "mysql://u:secret@h:3306/db?unix_socket=/x"])
def test_parse_refuses_password(url: str) -> None:
    with pytest.raises(MetaError, match="must not carry a password") as ei:
        parse_meta_url(url)
    assert "secret" not in str(ei.value)


@pytest.mark.parametrize("url, match", [
    ("postgres://u@h/db", "scheme must be mysql://"),
    ("http://u@h/db", "scheme must be mysql://"),
    ("u@h/db", "scheme must be mysql://"),
    ("", "scheme must be mysql://"),
    ("mysql://u@h/", "expected mysql://USER@HOST"),
    ("mysql://u@h", "expected mysql://USER@HOST"),
    ("mysql://u@h/a-b", "expected mysql://USER@HOST"),
    ("mysql://u@h/a;drop", "expected mysql://USER@HOST"),
    ("mysql://u@h/db/extra", "expected mysql://USER@HOST"),
    ("mysql://u@h/`db`", "expected mysql://USER@HOST"),
    ("mysql://u@h/" + "d" * 65, "expected mysql://USER@HOST"),
    ("mysql://h/db", "expected mysql://USER@HOST"),
    ("mysql://u@/db", "expected mysql://USER@HOST"),
    ("mysql://u@h:abc/db", "bad port"),
    ("mysql://u@h:99999/db", "bad port"),
])
def test_parse_bad_urls(url: str, match: str) -> None:
    with pytest.raises(MetaError, match=match):
        parse_meta_url(url)


# -- a database on the session server --------------------------------------------------

def _admin(server: EmbeddedServer) -> pymysql.connections.Connection:
    return pymysql.connect(unix_socket=str(server.socket), user="root", password="", autocommit=True)


@pytest.fixture
def dbname(mysql_server: EmbeddedServer) -> Iterator[str]:
    """A fresh database name; the database is dropped at teardown if it was created."""
    name = f"tm_{uuid.uuid4().hex[:16]}"
    try:
        yield name
    finally:
        conn = _admin(mysql_server)
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            conn.close()


@pytest.fixture
def volume(tmp_path: Path, mysql_server: EmbeddedServer, dbname: str) -> Volume:
    return Volume(path=tmp_path / "vol", name="vol", uuid=str(uuid.uuid4()), chunk_size=1 << 20,
                  compression="zstd:3",
                  meta_url=f"mysql://root@localhost/{dbname}?unix_socket={mysql_server.socket}")


def test_initialize_and_connect(volume: Volume) -> None:
    initialize(volume, 1234, 5678)
    with connect(volume) as meta:
        assert meta.volume is volume
        assert meta.server is None  # an external server is not ours to start
        db = meta.db
        rows = dict(db.query("SELECT k, v FROM meta"))
        assert rows == {"schema_version": str(SCHEMA_VERSION), "volume_uuid": volume.uuid,
                        "chunk_size": str(1 << 20)}
        root = db.query("SELECT id, mode, uid, gid, nlink, size FROM inodes")
        assert root == [(ROOT_INODE, 0o40755, 1234, 5678, 2, 0)]
        tables = {r[0] for r in db.query("SHOW TABLES")}
        assert tables == {"meta", "inodes", "dentries", "symlinks", "xattrs", "chunks", "manifests",
                          "packs", "pack_entries", "upload_queue", "snapshot_packs", "sessions",
                          "sustained", "changes"}
        # tx_isolation (MariaDB < 11.1) or transaction_isolation (MySQL 8, MariaDB >= 11.1)
        iso = {v for _, v in db.query("SHOW SESSION VARIABLES WHERE Variable_name IN "
                                          "('tx_isolation', 'transaction_isolation')")}
        assert iso == {"READ-COMMITTED"}
        assert db.query("SELECT @@SESSION.autocommit")[0][0] == 1
    # closed: the connection is gone
    with pytest.raises(Exception):
        db.conn.ping(reconnect=False)


def test_schema_statements_cover_schema() -> None:
    stmts = list(schema_statements())
    assert sum(s.upper().startswith("CREATE TABLE") for s in stmts) == 14
    assert any(f"'schema_version', '{SCHEMA_VERSION}'" in s for s in stmts)
    assert not any("--" in s.splitlines()[0] for s in stmts)


def test_initialize_twice_refused(volume: Volume) -> None:
    initialize(volume, 0, 0)
    with pytest.raises(MetaError, match="is not empty"):
        initialize(volume, 0, 0)
    with connect(volume) as meta:  # the first volume is intact
        assert meta.db.query("SELECT COUNT(*) FROM inodes")[0][0] == 1


def test_connect_missing_database(volume: Volume, dbname: str) -> None:
    with pytest.raises(MetaError, match=f"database '{dbname}' does not exist"):
        connect(volume)


def test_connect_empty_database(volume: Volume, mysql_server: EmbeddedServer, dbname: str) -> None:
    conn = _admin(mysql_server)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{dbname}`")
    finally:
        conn.close()
    with pytest.raises(MetaError, match="holds no casfs volume"):
        connect(volume)


def _set_meta(volume: Volume, k: str, v: str) -> None:
    db = Database(parse_meta_url(volume.meta_url))
    try:
        assert db.execute("UPDATE meta SET v = %s WHERE k = %s", (v, k)) == 1
    finally:
        db.close()


@pytest.mark.parametrize("version", ["999", "0", str(SCHEMA_VERSION + 1)])
def test_schema_version_mismatch(volume: Volume, version: str) -> None:
    initialize(volume, 0, 0)
    _set_meta(volume, "schema_version", version)
    with pytest.raises(SchemaMismatch, match=f"schema version {version}, this casfs speaks version "
                                             f"{SCHEMA_VERSION}"):
        connect(volume)
    _set_meta(volume, "schema_version", str(SCHEMA_VERSION))
    connect(volume).close()


def test_schema_3_database_is_upgraded_to_4(volume: Volume) -> None:
    """A schema-3 database (no snapshot_packs, no xattrs.name_idx) is upgraded in place at
    connect, keeping its rows; the step is idempotent (a crash mid-way runs it again)."""
    initialize(volume, 0, 0)
    db = Database(parse_meta_url(volume.meta_url))
    try:
        db.execute("INSERT INTO xattrs (inode, name, value) VALUES (1, 'user.k', 'v')")
        db.execute("DROP TABLE snapshot_packs")
        db.execute("ALTER TABLE xattrs DROP KEY name_idx")
        db.execute("UPDATE meta SET v = '3' WHERE k = 'schema_version'")
    finally:
        db.close()
    connect(volume).close()
    connect(volume).close()   # already at 4: nothing to do
    db = Database(parse_meta_url(volume.meta_url))
    try:
        assert db.query("SELECT v FROM meta WHERE k = 'schema_version'") == [(str(SCHEMA_VERSION),)]
        assert db.query("SELECT COUNT(*) FROM snapshot_packs") == [(0,)]
        assert db.query("SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = DATABASE() "
                        "AND table_name = 'xattrs' AND index_name = 'name_idx'")[0][0] >= 1
        assert db.query("SELECT value FROM xattrs WHERE inode = 1 AND name = 'user.k'") == [(b"v",)]
    finally:
        db.close()


def test_schema_4_database_is_upgraded_to_5(volume: Volume) -> None:
    """A schema-4 database (no sessions, sustained or changes table, no upload_queue.store)
    is upgraded in place at connect, keeping its queue rows (store NULL: the first store's)."""
    initialize(volume, 0, 0)
    db = Database(parse_meta_url(volume.meta_url))
    try:
        db.execute("DROP TABLE sessions, sustained, changes")
        db.execute("ALTER TABLE upload_queue DROP KEY store_idx, DROP COLUMN store")
        db.execute("INSERT INTO upload_queue (chunk) VALUES (%s)", (b"\x01" * 32,))
        db.execute("UPDATE meta SET v = '4' WHERE k = 'schema_version'")
    finally:
        db.close()
    connect(volume).close()
    connect(volume).close()   # already at 5: nothing to do
    db = Database(parse_meta_url(volume.meta_url))
    try:
        assert db.query("SELECT v FROM meta WHERE k = 'schema_version'") == [(str(SCHEMA_VERSION),)]
        for table in ("sessions", "sustained", "changes"):
            assert db.query(f"SELECT COUNT(*) FROM {table}") == [(0,)]
        assert db.query("SELECT chunk, store FROM upload_queue") == [(b"\x01" * 32, None)]
    finally:
        db.close()


def test_schema_version_missing(volume: Volume) -> None:
    initialize(volume, 0, 0)
    db = Database(parse_meta_url(volume.meta_url))
    try:
        db.execute("DELETE FROM meta WHERE k = 'schema_version'")
    finally:
        db.close()
    with pytest.raises(SchemaMismatch):
        connect(volume)


def test_volume_uuid_mismatch(volume: Volume, tmp_path: Path) -> None:
    initialize(volume, 0, 0)
    other = Volume(path=tmp_path / "other", name="other", uuid=str(uuid.uuid4()),
                   chunk_size=volume.chunk_size, compression="zstd:3", meta_url=volume.meta_url)
    with pytest.raises(MetaError, match="belongs to another volume") as ei:
        connect(other)
    assert type(ei.value) is MetaError
    assert volume.uuid in str(ei.value) and other.uuid in str(ei.value)


def test_wrong_password(volume: Volume) -> None:
    initialize(volume, 0, 0)
    bad = Volume(path=volume.path, name=volume.name, uuid=volume.uuid, chunk_size=volume.chunk_size,
                 compression=volume.compression, meta_url=volume.meta_url, meta_password="nope")
    with pytest.raises(MetaError, match="refused the credentials"):
        connect(bad)


@pytest.mark.parametrize("url", ["mysql://root@127.0.0.1:1/x",
                                 "mysql://root@localhost/x?unix_socket=/nonexistent/s.sock"])
def test_unreachable(url: str) -> None:
    with pytest.raises(MetaError, match="cannot reach MySQL"):
        Database(parse_meta_url(url))


# -- transactions ----------------------------------------------------------------------

@pytest.fixture
def table(mysql_server: EmbeddedServer, dbname: str) -> Iterator[Callable[[], Database]]:
    """A database with table t(id PK, v) holding rows (1, 0) and (2, 0); yields a
    factory of Database connections to it (all closed at teardown)."""
    conn = _admin(mysql_server)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{dbname}`")
            cur.execute(f"CREATE TABLE `{dbname}`.t (id INT PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB")
            cur.execute(f"INSERT INTO `{dbname}`.t VALUES (1, 0), (2, 0)")
    finally:
        conn.close()
    target = MetaTarget(user="root", password="", database=dbname, unix_socket=str(mysql_server.socket))
    opened: list[Database] = []

    def new() -> Database:
        db = Database(target)
        db.execute("SET SESSION innodb_lock_wait_timeout = 5")
        opened.append(db)
        return db

    try:
        yield new
    finally:
        for db in opened:
            db.close()


def _rows(db: Database) -> dict[int, int]:
    return {int(a): int(b) for a, b in db.query("SELECT id, v FROM t")}


def test_transaction_commits(table: Callable[[], Database]) -> None:
    db = table()

    def body(cur: Any) -> str:
        cur.execute("UPDATE t SET v = 5 WHERE id = 1")
        cur.execute("INSERT INTO t VALUES (3, 3)")
        return "done"

    assert db.transaction(body) == "done"
    assert _rows(table()) == {1: 5, 2: 0, 3: 3}


def test_transaction_rolls_back_on_python_exception(table: Callable[[], Database]) -> None:
    db = table()
    calls = 0

    def body(cur: Any) -> None:
        nonlocal calls
        calls += 1
        cur.execute("UPDATE t SET v = 7 WHERE id = 1")
        cur.execute("INSERT INTO t VALUES (3, 3)")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        db.transaction(body)
    assert calls == 1  # not retried
    assert _rows(db) == {1: 0, 2: 0}
    assert _rows(table()) == {1: 0, 2: 0}
    # the connection is usable and back in autocommit mode
    db.execute("UPDATE t SET v = 1 WHERE id = 2")
    assert _rows(table()) == {1: 0, 2: 1}


def test_transaction_rolls_back_on_sql_error(table: Callable[[], Database]) -> None:
    db = table()
    calls = 0

    def body(cur: Any) -> None:
        nonlocal calls
        calls += 1
        cur.execute("UPDATE t SET v = 9 WHERE id = 2")
        cur.execute("INSERT INTO t VALUES (1, 1)")  # duplicate key 1062

    with pytest.raises(MetaError, match="1062"):
        db.transaction(body)
    assert calls == 1  # only deadlocks and lock wait timeouts are retried
    assert _rows(db) == {1: 0, 2: 0}
    assert _rows(table()) == {1: 0, 2: 0}


def test_transaction_rolls_back_on_keyboard_interrupt(table: Callable[[], Database]) -> None:
    db = table()

    def body(cur: Any) -> None:
        cur.execute("DELETE FROM t")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        db.transaction(body)
    assert _rows(db) == {1: 0, 2: 0}
    assert _rows(table()) == {1: 0, 2: 0}


def _deadlock_pair(table: Callable[[], Database], retries: int) -> tuple[dict[str, int], dict[str, Any]]:
    """Two transactions lock rows 1,2 and 2,1 with a barrier in between: a real deadlock.

    Only a body's first run waits at the barrier, so a retry goes straight through.
    Returns (runs per body, outcome per body: its result or the exception raised).
    """
    dbs = {"a": table(), "b": table()}
    order = {"a": (1, 2), "b": (2, 1)}
    barrier = threading.Barrier(2, timeout=10)
    runs = {"a": 0, "b": 0}
    outcome: dict[str, Any] = {}

    def body_for(name: str) -> Callable[[Any], str]:
        def body(cur: Any) -> str:
            runs[name] += 1
            first, second = order[name]
            cur.execute("UPDATE t SET v = v + 1 WHERE id = %s", (first,))
            if runs[name] == 1:
                barrier.wait()
                time.sleep(0.05 if name == "b" else 0)  # a blocks first, b closes the cycle
            cur.execute("UPDATE t SET v = v + 1 WHERE id = %s", (second,))
            return name
        return body

    def run(name: str) -> None:
        try:
            outcome[name] = dbs[name].transaction(body_for(name), retries=retries)
        except BaseException as exc:  # noqa: BLE001 - recorded and checked by the test
            outcome[name] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in dbs]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "transactions hung"
    assert time.monotonic() - t0 < 5
    return runs, outcome


def test_transaction_retries_on_deadlock(table: Callable[[], Database]) -> None:
    runs, outcome = _deadlock_pair(table, retries=20)
    assert outcome == {"a": "a", "b": "b"}, outcome
    # exactly one of them was the deadlock victim and ran again
    assert sorted(runs.values()) == [1, 2], runs
    # both committed exactly once: each row was incremented by both transactions
    assert _rows(table()) == {1: 2, 2: 2}


def test_transaction_deadlock_without_retries_left(table: Callable[[], Database]) -> None:
    runs, outcome = _deadlock_pair(table, retries=1)
    assert runs == {"a": 1, "b": 1}
    errors = {k: v for k, v in outcome.items() if isinstance(v, BaseException)}
    assert len(errors) == 1, outcome
    (exc,) = errors.values()
    assert isinstance(exc, MetaError) and "1213" in str(exc), exc
    winner = ({"a", "b"} - set(errors)).pop()
    assert outcome[winner] == winner
    # the victim's first update was rolled back
    assert _rows(table()) == {1: 1, 2: 1}
