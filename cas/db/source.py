"""Where a statement of the metadata layer runs: a transaction's cursor or the Database.

A function that only reads can be called inside a transaction (the cursor of a
``Database.transaction`` body: it sees that transaction's uncommitted rows) or outside
one (the :class:`cas.db.database.Database`: a single read, with its reconnect-and-retry rules,
which under group commit still runs on the mount's connection and so sees the open
group's rows). :data:`Source` is either; :func:`rows` runs a statement on it,
:func:`execute` one that returns no rows (in the caller's transaction on a cursor,
autocommitted on the Database).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import pymysql.cursors

from cas.db.database import Database

Source = Union[Database, pymysql.cursors.Cursor]


def rows(src: Source, sql: str, args: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` run on ``src`` (a transaction's cursor or the Database).
    Raises MetaError (Database) or PyMySQL's errors (cursor: the transaction converts
    them)."""
    if isinstance(src, Database):
        return src.query(sql, args)
    src.execute(sql, args)
    return list(src.fetchall())


def execute(src: Source, sql: str, args: Sequence[Any] | None = None) -> int:
    """Run ``sql`` (no result rows) on ``src``; the affected row count. On the Database
    it is one autocommitted statement (cas.db.database.Database.execute); on a cursor
    it runs in the caller's transaction. Raises MetaError (Database) or PyMySQL's
    errors (cursor)."""
    if isinstance(src, Database):
        return src.execute(sql, args)
    return int(src.execute(sql, args))
