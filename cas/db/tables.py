"""Statements over whole tables: consistent reads across tables, generic dumps and loads
of a table list (metadata snapshots, cas.tier.snapshot), and removing a half-loaded database.

The table list itself is defined once, by the caller (``cas.tier.snapshot.TABLES``); the only
per-table rule here is :data:`ROW_FILTER` (which rows of a table a dump takes).

Locks: a consistent read (:func:`begin_consistent`, :func:`repeatable_read`) takes no
row lock: InnoDB serves it from one read view, so it never waits for a writer and no
writer waits for it. Loads insert into a database nobody else uses yet.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import pymysql.connections
import pymysql.cursors

if TYPE_CHECKING:
    from cas.db.database import Database

#: rows a dump takes of a table (all when not named): only confirmed packs, so every pack
#: a snapshot names was confirmed on the store (docs/backup.md)
ROW_FILTER = {"packs": "state = 'confirmed'"}


class Column(NamedTuple):
    """A table column: its name and its data type (lower case, as information_schema
    gives it: "binary", "varchar", "datetime", ...)."""

    name: str
    data_type: str


def begin_consistent(cur: pymysql.cursors.Cursor) -> None:
    """Start a read-only REPEATABLE READ transaction WITH CONSISTENT SNAPSHOT on ``cur``'s
    connection: every later read of it sees the tables as of this instant, whatever
    commits meanwhile. The caller commits (or rolls back) the connection. No row lock (one read view)."""
    cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")


@contextmanager
def repeatable_read(db: Database) -> Iterator[None]:
    """Run the ``with`` body's transactions at REPEATABLE READ (one read view per
    transaction: fsck's checks agree with one another), then return the session to
    READ COMMITTED (cas.db.database's default). No lock of its own (session setting)."""
    db.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    try:
        yield
    finally:
        db.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")


def columns(cur: pymysql.cursors.Cursor, table: str) -> list[Column]:
    """``table``'s columns in definition order (empty: no such table in the current
    database). No lock (information_schema)."""
    cur.execute("SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND table_name = %s ORDER BY ordinal_position", (table,))
    return [Column(str(a), str(b).lower()) for a, b in cur.fetchall()]


def column_names(db: Database, table: str) -> set[str]:
    """Names of ``table``'s columns in the current database (empty: no such table). No lock (information_schema)."""
    return {str(r[0]) for r in db.query("SELECT column_name FROM information_schema.columns "
                                        "WHERE table_schema = DATABASE() AND table_name = %s", (table,))}


def stream_rows(conn: pymysql.connections.Connection, table: str, cols: Sequence[str]) -> Iterator[tuple[Any, ...]]:
    """The rows of ``table`` (those :data:`ROW_FILTER` keeps), columns ``cols`` in that
    order, streamed from the server by an unbuffered cursor (RAM holds one row at a
    time), in the transaction open on ``conn`` (:func:`begin_consistent`). No lock (the consistent
    snapshot's read view)."""
    where = f" WHERE {ROW_FILTER[table]}" if table in ROW_FILTER else ""
    with conn.cursor(pymysql.cursors.SSCursor) as sc:
        sc.execute(f"SELECT {', '.join(f'`{c}`' for c in cols)} FROM `{table}`{where}")
        yield from sc


def insert_rows(cur: pymysql.cursors.Cursor, table: str, cols: Sequence[str], rows: Sequence[Sequence[Any]],
                replace: bool = False) -> None:
    """Insert ``rows`` (values of ``cols``) into ``table`` (``replace``: REPLACE, so
    that they win over rows already there). PyMySQL sends them as one multi-row
    statement; the caller passes at most one load batch. Locks the inserted rows to the caller's
    COMMIT (a database nobody else uses yet)."""
    verb = "REPLACE" if replace else "INSERT"
    sql = (f"{verb} INTO `{table}` ({', '.join(f'`{c}`' for c in cols)}) "
           f"VALUES ({', '.join(['%s'] * len(cols))})")
    cur.executemany(sql, [tuple(r) for r in rows])


def drop_database(admin: Database, name: str) -> None:
    """``DROP DATABASE IF EXISTS name`` (``admin``: a connection to no database). Takes the
    metadata lock of every table in it (DDL; nobody else uses it)."""
    admin.execute(f"DROP DATABASE IF EXISTS `{name}`")


def drop_tables(admin: Database, name: str) -> None:
    """Drop every table of database ``name``, leaving the database itself. Takes each table's
    metadata lock (DDL; nobody else uses them)."""
    for (t,) in admin.query("SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (name,)):
        admin.execute(f"DROP TABLE IF EXISTS `{name}`.`{t}`")
