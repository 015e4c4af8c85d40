"""The change log of a shared volume: the ``changes`` table (schema.sql, docs/sharing.md).

On a shared volume (meta ``shared`` = '1', :func:`cas.db.volume.is_shared`) every
transaction that changes an inode's attributes or manifest, or a dentry, also inserts
one row per inode it changed (with the dentry's parent and name for a namespace change)
through :func:`record`, in the same transaction: the rows commit exactly when the change
does. Every mount polls the rows of the other sessions (:func:`since`) and drops what
they name from its RAM and kernel caches (cas/engine/coherence.py).

``id`` is AUTO_INCREMENT: ids are handed out at INSERT, not at COMMIT, so a row may
become visible after rows with higher ids. Pollers therefore re-read a window of
recent ids (cas.engine.coherence.ChangeFeed). Any mount deletes rows older than a few
minutes now and then (:func:`prune`).

Locks (InnoDB, READ COMMITTED): :func:`record` X-locks the rows it inserts (and the
table's AUTO-INC counter for the statement only); :func:`since` and :func:`settled_id`
take none (consistent reads of committed rows); :func:`prune` X-locks the rows it
deletes, which no writer ever waits for (nobody updates old rows).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from pymysql.cursors import Cursor

from cas.db.batch import batches, values
from cas.db.source import Source, execute, rows

#: rows one poll statement reads at most (a poll loops until it got fewer)
POLL_ROWS = 5000


class Change(NamedTuple):
    """One ``changes`` row: session ``session`` changed inode ``inode`` (attributes,
    manifest, or its life) and, when ``parent`` is not None, the dentry ``name`` of
    directory ``parent`` (created, removed or repointed; the parent's attributes too)."""

    id: int
    session: int
    inode: int
    parent: int | None
    name: bytes | None


def record(cur: Cursor, session: int, items: Sequence[tuple[int, int | None, bytes | None]]) -> None:
    """Insert one change row per (inode, parent or None, name or None) of ``items`` for
    ``session``, in the caller's transaction (they commit with the change they name).
    One multi-row INSERT per BATCH_ROWS rows; ``at`` is server time in UTC
    (``UTC_TIMESTAMP(6)``, as :func:`prune` compares it: a DST change moves nothing).
    Locks: X on the new rows."""
    for part in batches([(session, ino, parent, name) for ino, parent, name in items]):
        text, args = values(part)
        text = text.replace("%s)", "%s,UTC_TIMESTAMP(6))")
        cur.execute("INSERT INTO changes (session, inode, parent, name, at) VALUES " + text, args)


def since(src: Source, after_id: int, session: int) -> tuple[int, list[Change]]:
    """(``top``, the committed change rows with id > ``after_id`` of sessions other than
    ``session``, in id order). ``top`` is the highest id committed, of any session
    (0 for none), read in the same statement (one snapshot) as the first rows: every
    id up to it was handed out before the poll's read (cas.engine.coherence.ChangeFeed).
    Reads POLL_ROWS rows per statement, as many statements as needed (one, in the
    common case: a primary-key read and a primary-key range). No lock (consistent
    reads of what is committed)."""
    out: list[Change] = []
    got = rows(src, "SELECT COALESCE(MAX(id), 0), NULL, NULL, NULL, NULL, NULL FROM changes UNION ALL "
                    "(SELECT 0, id, session, inode, parent, name FROM changes "
                    "WHERE id > %s AND session <> %s ORDER BY id LIMIT %s)",
               (after_id, session, POLL_ROWS))
    top = max(int(r[0]) for r in got if r[1] is None)
    batch = sorted((r[1:] for r in got if r[1] is not None), key=lambda r: int(r[0]))
    while True:
        out.extend(_change(r) for r in batch)
        if len(batch) < POLL_ROWS:
            return top, out
        batch = [r[1:] for r in rows(src, "SELECT 0, id, session, inode, parent, name FROM changes "
                                          "WHERE id > %s AND session <> %s ORDER BY id LIMIT %s",
                                     (int(batch[-1][0]), session, POLL_ROWS))]


def _change(r: Sequence[Any]) -> Change:
    return Change(int(r[0]), int(r[1]), int(r[2]), None if r[3] is None else int(r[3]),
                  None if r[4] is None else bytes(r[4]))


def settled_id(src: Source, older_than_s: float) -> int:
    """The highest id of the change rows inserted more than ``older_than_s`` seconds ago
    (server time, UTC; 0 for none): where a new mount starts polling. Every row with a lower
    id was inserted before that one, so (committing within the poll window of its
    INSERT) it is committed already. One ``at_idx`` range read, no lock."""
    return int(rows(src, "SELECT COALESCE(MAX(id), 0) FROM changes WHERE at < UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND",
                    (int(older_than_s * 1e6),))[0][0])


def prune(src: Source, older_than_s: float) -> int:
    """Delete change rows older than ``older_than_s`` seconds (server time, UTC), POLL_ROWS
    per statement (each its own autocommit on a Database), until a statement deletes
    fewer; returns how many went. Locks: X on the deleted rows (by the ``at_idx``
    range), which no writer waits for. Run it on a connection of its own, outside the
    engine lock (cas.engine.fs.Filesystem.prune_changes)."""
    total = 0
    while True:
        n = execute(src, "DELETE FROM changes WHERE at < UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND LIMIT %s",
                    (int(older_than_s * 1e6), POLL_ROWS))
        total += n
        if n < POLL_ROWS:
            return total
