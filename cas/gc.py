"""Garbage collection: delete chunks no manifest references, and orphan chunk files.

The protocol (DESIGN invariant 3, see cas.chunks): a chunk's file is deleted only
inside a transaction that holds the chunk's row lock, sees refcount <= 0 for longer
than the grace period, and deletes the row. A writer that references the chunk again
takes the same lock, so it either commits first (gc then sees refcount > 0) or finds the
row gone and rewrites the file. Orphan files (a file with no row: a crash between
writing a chunk and committing its manifest) are deleted only when older than the grace
period, under the lock of a placeholder row that gc inserts and deletes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .meta import Metadata
from .safety import DEFAULT_GRACE_S
from .store import LocalStore


@dataclass(frozen=True)
class GcResult:
    """What a gc run freed (or would free, with dry_run); sizes in bytes on disk."""

    chunks_deleted: int
    bytes_freed: int
    orphans_deleted: int
    orphan_bytes_freed: int
    dry_run: bool


def collect(meta: Metadata, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False) -> GcResult:
    """Delete unreferenced chunks older than ``grace_s`` seconds. Safe during a mount.

    Raises MetaError on database failure (what was deleted so far stays consistent).
    """
    if grace_s < 0:
        raise ValueError("grace must be >= 0 seconds")
    db = meta.db
    store = LocalStore(meta.volume.chunk_dir)
    grace_us = int(grace_s * 1_000_000)
    candidates = [bytes(r[0]) for r in db.query(
        "SELECT id FROM chunks WHERE refcount <= 0 AND zero_since <= NOW(6) - INTERVAL %s MICROSECOND",
        (grace_us,))]
    deleted = freed = 0
    for cid in candidates:
        def body(cur: Any, cid: bytes = cid) -> int | None:
            cur.execute("SELECT refcount, stored_length, zero_since <= NOW(6) - INTERVAL %s MICROSECOND "
                        "FROM chunks WHERE id = %s FOR UPDATE", (grace_us, cid))
            row = cur.fetchone()
            if row is None or int(row[0]) > 0 or not row[2]:
                return None
            if not dry_run:
                store.delete(cid)
                cur.execute("DELETE FROM chunks WHERE id = %s", (cid,))
            return int(row[1])
        n = db.transaction(body)
        if n is not None:
            deleted += 1
            freed += n
    orphans, orphan_bytes = _sweep_orphans(meta, store, grace_s, dry_run)
    return GcResult(deleted, freed, orphans, orphan_bytes, dry_run)


def _sweep_orphans(meta: Metadata, store: LocalStore, grace_s: float, dry_run: bool) -> tuple[int, int]:
    db = meta.db
    ids = list(store.iter_ids())
    known: set[bytes] = set()
    for i in range(0, len(ids), 500):
        batch = ids[i:i + 500]
        known.update(bytes(r[0]) for r in db.query("SELECT id FROM chunks WHERE id IN %s", (batch,)))
    count = total = 0
    for cid in ids:
        if cid in known:
            continue
        st = store.stat(cid)
        if st is None or time.time_ns() - st.mtime_ns < grace_s * 1e9:
            continue
        if dry_run:
            count += 1
            total += st.size
            continue

        def body(cur: Any, cid: bytes = cid) -> int | None:
            # placeholder row: holds the row lock a writer would take for this id
            cur.execute("INSERT IGNORE INTO chunks (id, length, stored_length, refcount, zero_since) "
                        "VALUES (%s, 0, 0, 0, NOW(6))", (cid,))
            if cur.rowcount != 1:
                return None  # a writer recorded it meanwhile
            now_st = store.stat(cid)
            if now_st is not None and time.time_ns() - now_st.mtime_ns >= grace_s * 1e9:
                store.delete(cid)
            cur.execute("DELETE FROM chunks WHERE id = %s", (cid,))
            return now_st.size if now_st is not None else 0
        n = db.transaction(body)
        if n:
            count += 1
            total += n
    return count, total
