"""Garbage collection: delete chunks no manifest references, and orphan chunk files.

The protocol (invariant 3 of docs/design.md, see cas.chunk.manager): a chunk's file is deleted only
inside a transaction that holds the chunk's row lock, sees refcount <= 0 for longer
than the grace period, and deletes the row. A writer that references the chunk again
takes the same lock, so it either commits first (gc then sees refcount > 0) or finds the
row gone and rewrites the file. Orphan files (a file with no row: a crash between
writing a chunk and committing its manifest) are deleted only when older than the grace
period, under the lock of a placeholder row that gc inserts and deletes.
"""
from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
import pymysql.cursors

from cas.tier.cloud import PACK_PREFIX, CloudTier, forget_sql, owned, put_checked
from cas.db import chunks as chunk_rows
from cas.db import packs as pack_rows
from cas.errors import ChunkMissing, FsError
from cas.db.database import Metadata
from cas.tier.objstore import ObjectNotFound, now_utc
from cas.maint.safety import DEFAULT_GRACE_S
from cas.tier.snapshot import is_backup_object
from cas.chunk.store import LocalStore
from cas.chunk.sweep import sweep_orphans


@dataclass(frozen=True)
class GcResult:
    """What a gc run freed (or would free, with dry_run); sizes in bytes on disk."""

    chunks_deleted: int
    bytes_freed: int
    orphans_deleted: int
    orphan_bytes_freed: int
    dry_run: bool


def collect(meta: Metadata, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False,
            progress: Callable[[int], None] | None = None,
            on_total: Callable[[int], None] | None = None) -> GcResult:
    """Delete unreferenced chunks older than ``grace_s`` seconds. Safe during a mount.

    ``progress`` is called with 1 per item examined: each candidate chunk row, then each
    file of the local store (the orphan sweep); ``on_total`` with the number of items,
    first the candidates, again once the store's files are listed (candidates + files).
    Raises MetaError on database failure (what was deleted so far stays consistent).
    """
    if grace_s < 0:
        raise ValueError("grace must be >= 0 seconds")
    db = meta.db
    store = LocalStore(meta.volume.chunk_dir)
    grace_us = int(grace_s * 1_000_000)
    candidates = chunk_rows.collectable(db, grace_us)
    deleted = freed = 0
    if on_total is not None:
        on_total(len(candidates))
    for cid in candidates:
        def body(cur: pymysql.cursors.Cursor, cid: bytes = cid) -> int | None:
            row = chunk_rows.lock_for_gc(cur, cid, grace_us)
            if row is None or row.refcount > 0 or not row.expired:
                return None
            if not dry_run:
                # this side's file only: another machine's store keeps its file until that
                # mount's own sweep finds the row gone (docs/sharing.md, "Data")
                store.delete(cid)
                chunk_rows.delete_row(cur, cid)
                forget_sql(cur, cid)
            return row.stored_length
        n = db.transaction(body)
        if n is not None:
            deleted += 1
            freed += n
        if progress is not None:
            progress(1)
    orphans, orphan_bytes = _sweep_orphans(meta, store, grace_s, dry_run, progress,
                                           None if on_total is None else lambda n: on_total(len(candidates) + n))
    return GcResult(deleted, freed, orphans, orphan_bytes, dry_run)


def _sweep_orphans(meta: Metadata, store: LocalStore, grace_s: float, dry_run: bool,
                   progress: Callable[[int], None] | None = None,
                   on_total: Callable[[int], None] | None = None) -> tuple[int, int]:
    """The orphan sweep of this side's store (cas.chunk.sweep): only the files of the
    store gc runs beside; other machines' stores are swept by their mounts."""
    r = sweep_orphans(meta.db, store, grace_s, dry_run, progress, on_total)
    return r.files, r.bytes


# -- the cloud tier ------------------------------------------------------------------------

@dataclass(frozen=True)
class CloudGcResult:
    """What a cloud gc run did (or would do, with dry_run); sizes in bytes of pack objects."""

    packs_deleted: int
    pack_bytes_deleted: int
    packs_rewritten: int
    bytes_rewritten: int
    new_packs: int
    orphans_deleted: int
    orphan_bytes_deleted: int
    dry_run: bool


def collect_cloud(tier: CloudTier, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False,
                  progress: Callable[[int], None] | None = None,
                  on_total: Callable[[int], None] | None = None) -> CloudGcResult:
    """Reclaim cloud space after :func:`collect` has dropped dead chunks:

    1. rewrite packs whose live fraction (bytes of chunks still recorded / pack size) is
       below ``repack_threshold``: their live chunks are copied into new packs (from
       local files, else ranged reads of the old pack, verified), and their locations
       move to the new pack in the transaction that confirms it;
    2. delete packs with no live chunk (a confirmed pack never gains entries; the
       object only when it carries this volume's id);
    3. delete orphan objects in the folder (no confirmed pack names them, no upload is
       under way under their name) older than ``grace_s`` that carry this volume's id
       (app property ``casfs_volume``): objects of another volume sharing the folder, or
       without the property, are never deleted.
    ``progress`` is called with the packs done (sparse ones once rewritten, dead ones one
    by one) and then with 1 per object of the folder examined; ``on_total`` with the
    number of these items, again once the folder is listed.
    Raises ObjectStoreError/TryAgain from the store; what was done so far stays consistent.
    """
    db = tier.db
    rows = pack_rows.fill(db)
    # a pack a kept snapshot generation names stays as it is: rewriting it would only add
    # a copy (docs/backup.md, "What gc keeps")
    pinned = _pinned_ids(tier)
    sparse = [(pid, size, live) for pid, size, live, n in rows
              if n and size and live / size < tier.cfg.repack_threshold and pid not in pinned]
    rewritten = rewritten_bytes = new_packs = 0
    if on_total is not None:
        on_total(len(sparse))
    if sparse and not dry_run:
        rewritten, rewritten_bytes, new_packs = _repack(tier, [p for p, _, _ in sparse])
    elif dry_run:
        rewritten, rewritten_bytes = len(sparse), sum(live for _, _, live in sparse)
    if progress is not None:
        progress(len(sparse))
    dead = pack_rows.dead(db)
    if on_total is not None:
        on_total(len(sparse) + len(dead))
    deleted = deleted_bytes = 0
    for pid, oid, size in dead:
        if progress is not None:
            progress(1)
        if pid in pinned or (not dry_run and not _drop_dead_pack(tier, pid)):
            continue   # a kept snapshot generation names it (or it gained entries meanwhile)
        if not dry_run:
            try:
                # the row names it, but an object is deleted only when it carries our id
                if owned(tier.objects.stat(oid), tier.volume.uuid):
                    tier.objects.delete(oid)
            except ObjectNotFound:
                pass
        deleted += 1
        deleted_bytes += size
    orphans, orphan_bytes = _sweep_cloud_orphans(
        tier, grace_s, dry_run, progress,
        None if on_total is None else lambda n: on_total(len(sparse) + len(dead) + n))
    return CloudGcResult(deleted, deleted_bytes, rewritten, rewritten_bytes, new_packs, orphans,
                         orphan_bytes, dry_run)


def _pinned_ids(tier: CloudTier) -> set[int]:
    """Ids of the confirmed packs that a kept snapshot generation names."""
    return pack_rows.pinned_ids(tier.db)


def _drop_dead_pack(tier: CloudTier, pack: int) -> bool:
    """Delete the row of pack ``pack`` if it still has no entry and no kept generation
    names it, under an exclusive lock on its row (a snapshot pins a pack under a shared
    lock on the same row, cas.tier.snapshot._pin: one of the two waits for the other). The
    object is deleted after this commit; a failure there leaves an orphan for the sweep.
    Returns whether the row was deleted."""
    def body(cur: pymysql.cursors.Cursor) -> bool:
        name = pack_rows.lock_confirmed_name(cur, pack)
        if name is None:
            return False
        if pack_rows.has_entries(cur, pack):
            return False
        if pack_rows.is_pinned(cur, name):
            return False
        pack_rows.delete_pack(cur, pack)
        return True
    return tier.db.transaction(body)


def _repack(tier: CloudTier, packs: list[int]) -> tuple[int, int, int]:
    """Copy the live chunks of ``packs`` into new packs; returns (old packs emptied, bytes
    copied, new packs)."""
    db = tier.db
    entries = pack_rows.repack_entries(db, packs)
    copied = new = 0
    batch: list[tuple[bytes, int, bytes]] = []   # (chunk, old pack, envelope)
    size = 0

    def flush() -> None:
        nonlocal new, size
        if batch:
            _write_pack(tier, batch)
            new += 1
            batch.clear()
            size = 0
    for cid, old, pos, n, oid in entries:
        blob = None
        try:
            local = tier.store.get(cid)
            tier.envelope.open(local, cid)
            blob = local
        except (ChunkMissing, FsError):
            pass
        if blob is None:
            blob = tier.read_object(oid, pos, n)
            tier.envelope.open(blob, cid)   # IntegrityError: never copy a bad chunk
        if size and size + len(blob) > tier.cfg.pack_size:
            flush()
        batch.append((cid, old, blob))
        size += len(blob)
        copied += len(blob)
    flush()
    return len(packs), copied, new


def _write_pack(tier: CloudTier, batch: list[tuple[bytes, int, bytes]]) -> None:
    blob = b"".join(b for _, _, b in batch)
    name = PACK_PREFIX + secrets.token_hex(12)
    db = tier.db
    pack = db.transaction(lambda cur: tier.insert_pack(cur, name, len(blob), hashlib.md5(blob).digest(),
                                                       hashlib.sha256(blob).digest()))
    try:
        info = put_checked(tier.objects, name, blob, tier.volume.uuid)
    except BaseException:
        pack_rows.discard(db, pack)
        raise

    def confirm(cur: pymysql.cursors.Cursor) -> None:
        pack_rows.mark_confirmed(cur, pack, info.id)
        pos = 0
        for cid, old, b in batch:
            pack_rows.move_entry(cur, cid, old, pack, pos)
            pos += len(b)
    db.transaction(confirm)


def _sweep_cloud_orphans(tier: CloudTier, grace_s: float, dry_run: bool,
                         progress: Callable[[int], None] | None = None,
                         on_total: Callable[[int], None] | None = None) -> tuple[int, int]:
    db = tier.db
    # In this order, so that an upload running meanwhile (a mount of this or another
    # machine) never loses its object: an object created before the cutoff had its pack
    # row before it, so that row is 'uploading' when read next (busy), or confirmed by
    # the time the confirmed ids are read after (known); one created later is too young.
    cutoff = now_utc() - timedelta(seconds=grace_s)
    busy = pack_rows.uploading_names(db)
    busy |= pack_rows.pinned_names(db)   # kept generations' packs
    known = pack_rows.confirmed_object_ids(db)
    n = total = 0
    listed = list(tier.objects.list())
    if on_total is not None:
        on_total(len(listed))
    for obj in listed:
        if progress is not None:
            progress(1)
        if obj.id in known or obj.name in busy or obj.created > cutoff:
            continue
        if is_backup_object(obj.name):   # metadata snapshots and the volume object (cas.tier.snapshot)
            continue
        if not owned(obj, tier.volume.uuid):   # another volume's (or nobody's): never ours to delete
            continue
        if not dry_run:
            try:
                tier.objects.delete(obj.id)
            except ObjectNotFound:
                continue
        n += 1
        total += obj.size
    return n, total
