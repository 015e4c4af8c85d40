"""The orphan sweep of one local chunk store: delete chunk files that have no chunk row.

A chunk file with no row is left by a crash between writing the file and committing the
manifest that names it, and, on a shared volume (docs/sharing.md, "Data"), by gc run
from another machine: gc deletes a collected chunk's row volume-wide but its file only
in its own store, so every other store keeps a file whose row is gone. ``casfs gc``
sweeps its own store (cas.maint.gc.collect); a mount of a shared volume sweeps its own
store now and then (cas.tier.cloud.CloudTier), so no store keeps such files forever.

The protocol (invariant 3 of docs/design.md): a file is deleted only when it is older
than the grace period (its mtime, seconds), inside a transaction that holds the lock of
a placeholder row inserted for its id (the row lock a writer recording that id would
take, cas.db.chunks.insert_placeholder); the placeholder is deleted in the same
transaction. A writer that records the id meanwhile makes the insert fail (the file is
kept); a writer that wrote the file again has given it a fresh mtime (kept).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import pymysql.cursors

from cas.chunk.store import LocalStore
from cas.db import chunks as chunk_rows
from cas.db.database import Database


class SweepResult(NamedTuple):
    """Orphan files deleted (or found, in a dry run) and their bytes."""

    files: int
    bytes: int


def sweep_orphans(db: Database, store: LocalStore, grace_s: float, dry_run: bool = False,
                  progress: Callable[[int], None] | None = None,
                  on_total: Callable[[int], None] | None = None) -> SweepResult:
    """Delete the files of ``store`` whose chunk id has no row and whose mtime is older
    than ``grace_s`` seconds (module docstring). ``on_total`` is called once with the
    number of files listed, ``progress`` with 1 per file examined. Raises MetaError;
    what was deleted so far stays consistent."""
    ids = list(store.iter_ids())
    if on_total is not None:
        on_total(len(ids))
    known = chunk_rows.recorded(db, ids)
    count = total = 0
    for cid in ids:
        if progress is not None:
            progress(1)
        if cid in known:
            continue
        st = store.stat(cid)
        if st is None or time.time_ns() - st.mtime_ns < grace_s * 1e9:
            continue
        if dry_run:
            count += 1
            total += st.size
            continue

        def body(cur: pymysql.cursors.Cursor, cid: bytes = cid) -> int | None:
            # placeholder row: holds the row lock a writer would take for this id
            if not chunk_rows.insert_placeholder(cur, cid):
                return None  # a writer recorded it meanwhile
            now_st = store.stat(cid)
            if now_st is not None and time.time_ns() - now_st.mtime_ns >= grace_s * 1e9:
                store.delete(cid)
            chunk_rows.delete_row(cur, cid)
            return now_st.size if now_st is not None else 0
        n = db.transaction(body)
        if n:
            count += 1
            total += n
    return SweepResult(count, total)
