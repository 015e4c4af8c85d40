"""The ``meta`` table: one row per volume-wide setting or piece of state, ``k -> v``.

Keys: ``schema_version``, ``volume_uuid``, ``chunk_size``, ``encryption`` (cas.db.database);
``cloud_enabled`` and the uploader's ``drive_*`` keys (cas.tier.cloud); the scrub cursors
``scrub_*`` (cas.maint.scrub); the snapshot keys ``snapshot_*`` (cas.tier.snapshot);
``inode_next`` (cas.db.namespace.reserve_inodes); ``shared`` ('1': several mounts may
run at once, docs/sharing.md). Values are text of at most 255
characters (schema.sql); :func:`set_values` cuts longer ones.

Locks: reads take none (READ COMMITTED, or the caller's consistent snapshot); an upsert
locks its one row until the caller's COMMIT; :func:`lock_value` creates the row if
absent and takes its exclusive lock so that a read-modify-write of a counter (the
snapshot generation) is serialized between processes, the first one included. Every
statement here touches only the rows of the keys it names (docs/metadata-packs.md,
"Lock order", for what a transaction may lock after a ``meta`` row).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import pymysql.cursors

from cas.db.source import Source, rows

if TYPE_CHECKING:
    from cas.db.database import Database

#: the column's width (schema.sql ``meta.v VARCHAR(255)``)
VALUE_MAX = 255


def get(src: Source, key: str) -> str | None:
    """The value of ``key``, or None when there is no row: on the Database the last
    committed value, on a cursor the one its transaction sees (a consistent snapshot's
    own, cas.db.tables.begin_consistent). No lock."""
    found = rows(src, "SELECT v FROM meta WHERE k = %s", (key,))
    return str(found[0][0]) if found else None


def values_of(db: Database, keys: Sequence[str]) -> dict[str, str]:
    """``{key: value}`` of those of ``keys`` (non-empty) that have a row. No lock."""
    return {str(k): str(v) for k, v in db.query("SELECT k, v FROM meta WHERE k IN %s", (list(keys),))}


def values_with_prefix(db: Database, *prefixes: str) -> dict[str, str]:
    """``{key: value}`` of every key starting with one of ``prefixes`` (at least one;
    plain text, no LIKE wildcards in them). No lock."""
    where = " OR ".join(["k LIKE %s"] * len(prefixes))
    return {str(k): str(v) for k, v in db.query(f"SELECT k, v FROM meta WHERE {where}",
                                                 [p + "%" for p in prefixes])}


def set_values(db: Database, values: Mapping[str, str]) -> None:
    """Upsert each key (one autocommitted statement per key, values cut to VALUE_MAX
    characters). Locks each row only for its own statement."""
    for k, v in values.items():
        db.execute("INSERT INTO meta (k, v) VALUES (%s, %s) ON DUPLICATE KEY UPDATE v = VALUES(v)",
                   (k, v[:VALUE_MAX]))


def set_value(cur: pymysql.cursors.Cursor, key: str, value: str) -> None:
    """Upsert ``key`` in the caller's transaction (its row stays locked until COMMIT)."""
    cur.execute("INSERT INTO meta (k, v) VALUES (%s, %s) ON DUPLICATE KEY UPDATE v = VALUES(v)",
                (key, value[:VALUE_MAX]))


def add_if_absent(db: Database, key: str, value: str) -> None:
    """Insert ``key`` unless it has a row (``INSERT IGNORE``: the first writer wins; read
    the value back with :func:`get`). Locks the row for that statement only."""
    db.execute("INSERT IGNORE INTO meta (k, v) VALUES (%s, %s)", (key, value[:VALUE_MAX]))


def lock_value(cur: pymysql.cursors.Cursor, key: str, initial: str) -> str:
    """The value of ``key`` under its row's exclusive lock (held to the caller's
    COMMIT); a key without a row first gets one holding ``initial`` (in the caller's
    transaction: it is rolled back with it, and a caller that writes the key later in
    the transaction never lets ``initial`` be seen).

    The row is created and locked by one ``INSERT ... ON DUPLICATE KEY UPDATE v = v``
    (an X lock on the new or the existing row), then read. A plain ``SELECT ... FOR
    UPDATE`` of an absent key locks nothing under READ COMMITTED (no gap locks, see
    cas.db.namespace): two first read-modify-writes of a counter would both read
    "absent" and hand out the same value. Guarded by
    tests/engine/test_db_packs.py::test_two_first_snapshot_generations_differ."""
    cur.execute("INSERT INTO meta (k, v) VALUES (%s, %s) ON DUPLICATE KEY UPDATE v = v",
                (key, initial[:VALUE_MAX]))
    cur.execute("SELECT v FROM meta WHERE k = %s FOR UPDATE", (key,))
    return str(cur.fetchone()[0])


def delete_keys(db: Database, keys: Iterable[str]) -> None:
    """Delete the rows of ``keys`` (none: no statement). Autocommitted. Locks those rows for that statement only."""
    ks = list(keys)
    if ks:
        db.execute("DELETE FROM meta WHERE k IN %s", (ks,))


def cloud_enabled(db: Database) -> bool:
    """Whether the cloud tier is enabled (key ``cloud_enabled`` = "1"). No lock."""
    return get(db, "cloud_enabled") == "1"


def enable_cloud(cur: pymysql.cursors.Cursor) -> None:
    """Set ``cloud_enabled`` = "1" in the caller's transaction: from its COMMIT on, every
    new chunk row gets its upload_queue row in the transaction that creates it. Locks the row
    (exclusive) to the caller's COMMIT."""
    set_value(cur, "cloud_enabled", "1")


#: meta key: '1' when the volume may be mounted by several sessions at once (docs/sharing.md)
SHARED_KEY = "shared"


def is_shared(src: Source) -> bool:
    """True when the volume is shared (meta ``shared`` = '1'): several mounts, on any
    machines, may run at once, and each runs its engine in shared mode. Locks: none."""
    return get(src, SHARED_KEY) == "1"


def set_shared(cur: pymysql.cursors.Cursor) -> None:
    """Mark the volume shared (``casfs init --shared``, ``casfs join``). Locks: the
    ``shared`` row, exclusive, until the caller's COMMIT."""
    set_value(cur, SHARED_KEY, "1")
