"""fsck: check a volume's metadata against its chunk store, and repair what can be.

Checks, on one consistent snapshot of the database (REPEATABLE READ):
- every chunk's refcount equals the number of manifest slots naming it;
- every chunk a manifest names has a row, a file or a confirmed cloud copy, and
  (unless ``verify=False``) a local file whose plaintext hashes to its id (cloud copies
  are verified when read, not by fsck); a missing file of a chunk whose row says
  ``is_local = 1`` or ``bad = 1`` is missing even when a cloud copy exists, and a
  chunk marked bad whose file verifies is listed in ``bad_marked``;
- every non-directory inode's nlink equals its number of directory entries;
- no directory entry points to a missing inode;
- every linked directory is reachable from the root (``unreachable_dirs``: a dentry
  cycle cut off from the root, which two crossing directory moves could once make);
and lists orphan chunk files (a file with no row; gc removes them after the grace
period). The upload queue is counted per local store; a queue row of a store that no
mount session names is reported (``unknown_stores``: its chunks upload only when that
machine mounts again). On a shared volume (docs/sharing.md, "Data") a live chunk this
store lacks is fine when it has a confirmed cloud copy (``cloud_only``) or when its
queue row names another store (``held_elsewhere``: that machine holds the only copy
until it uploads it); it is missing only when it should be in this store. ``repair`` rewrites refcounts and link counts from the manifests and entries;
missing, corrupt and bad-marked chunks are repaired by cas.maint.repair (from the cloud tier).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pymysql.cursors

from cas.db import chunks as chunk_rows
from cas.db import queue as queue_rows
from cas.db import volume as volume_rows
from cas.db import manifests as manifest_rows
from cas.db import namespace as namespace_rows
from cas.db import tables
from cas.chunk.envelope import codec_for
from cas.errors import ChunkMissing, IntegrityError
from cas.db.database import ROOT_INODE, Metadata
from cas.chunk.store import LocalStore


#: what fsck reads in its one snapshot: refcount mismatches (id, stored, actual), chunk
#: ids with no row, live chunk ids, (cloud-only ids, bad-marked ids), nlink mismatches
#: (inode, stored, actual), dangling entries (parent, name), every chunk id, and the upload
#: queue (rows per store, stores sessions name, chunk -> the store its queue row names)
_Snapshot = tuple[list[tuple[bytes, int, int]], list[bytes], list[bytes], tuple[set[bytes], set[bytes]],
                  list[tuple[int, int, int]], list[tuple[int, str]], set[bytes],
                  tuple[list[queue_rows.StoreQueue], set[str], dict[bytes, str]]]


@dataclass(frozen=True)
class FsckReport:
    """Findings of one fsck run; ids are hex chunk ids."""

    chunks_checked: int
    refcount_mismatches: list[tuple[str, int, int]] = field(default_factory=list)  # id, stored, actual
    missing_rows: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    corrupt_chunks: list[str] = field(default_factory=list)
    nlink_mismatches: list[tuple[int, int, int]] = field(default_factory=list)  # inode, stored, actual
    dangling_entries: list[tuple[int, str]] = field(default_factory=list)
    orphan_files: int = 0
    repaired: bool = False
    cloud_only: int = 0   # live chunks with no local file but a confirmed cloud copy (not an error)
    bad_marked: list[str] = field(default_factory=list)  # marked bad, yet the local file verifies now
    held_elsewhere: int = 0   # shared volume: live chunks another store holds, not uploaded yet (not an error)
    # upload queue per store: [store id, rows, rows claimed for a pack, envelope bytes]
    queue_stores: list[tuple[str, int, int, int]] = field(default_factory=list)
    unknown_stores: list[str] = field(default_factory=list)  # queue rows of stores no session names (a warning)
    unreachable_dirs: list[int] = field(default_factory=list)  # linked directories the root does not reach

    @property
    def clean(self) -> bool:
        """True when nothing is wrong (orphan files are not an error: gc removes them)."""
        return not (self.refcount_mismatches or self.missing_rows or self.missing_files
                    or self.corrupt_chunks or self.nlink_mismatches or self.dangling_entries
                    or self.bad_marked or self.unreachable_dirs)


def check(meta: Metadata, repair: bool = False, verify: bool = True,
          progress: Callable[[int], None] | None = None,
          on_total: Callable[[int], None] | None = None) -> FsckReport:
    """Run the checks of the module docstring; with ``repair`` fix refcounts and nlinks.

    ``on_total`` is called once with the number of live chunks to check (after the
    database snapshot), ``progress`` with 1 per live chunk checked."""
    db = meta.db
    store = LocalStore(meta.volume.chunk_dir)
    envelope = codec_for(meta.volume)
    shared = volume_rows.is_shared(db)
    first = queue_rows.first_store(meta.volume.uuid)

    def snapshot(cur: pymysql.cursors.Cursor) -> _Snapshot:
        refs = [(r.chunk, r.stored, r.actual) for r in chunk_rows.refcount_mismatches(cur)]
        no_row = manifest_rows.chunks_without_row(cur)
        rows = chunk_rows.live(cur)
        live = [r.id for r in rows]
        in_cloud = {r.id for r in rows if r.in_cloud and not (r.is_local or r.bad)}   # meant to be cloud-only
        if shared:   # is_local says "some store": a confirmed chunk is readable here regardless
            in_cloud = {r.id for r in rows if r.in_cloud and not r.bad}
        marked = {r.id for r in rows if r.bad}
        nlinks = [(r.inode, r.stored, r.actual) for r in namespace_rows.nlink_mismatches(cur)]
        dangling = [(r.parent, r.name.decode(errors="replace")) for r in namespace_rows.dangling(cur)]
        all_ids = chunk_rows.all_ids(cur)
        # the queue in the same snapshot as the chunk states: a chunk another machine
        # confirms meanwhile is then either still queued there or confirmed, never neither
        queue = (queue_rows.per_store(cur, first), queue_rows.session_stores(cur),
                 queue_rows.holders(cur, first) if shared else {})
        return refs, no_row, live, (in_cloud, marked), nlinks, dangling, all_ids, queue

    with tables.repeatable_read(db):
        (refs, no_row, live, (in_cloud, marked), nlinks, dangling, all_ids,
         (per_store, with_session, holder)) = db.transaction(snapshot)
        unreachable = db.transaction(lambda cur: namespace_rows.unreachable_dirs(cur, ROOT_INODE))
    missing, corrupt, bad_marked = [], [], []
    cloud_only = held_elsewhere = 0
    if on_total is not None:
        on_total(len(live))
    for cid in live:
        if progress is not None:
            progress(1)
        try:
            blob = store.get(cid)
            if verify:
                envelope.open(blob, cid)
        except ChunkMissing:
            if cid in in_cloud:
                cloud_only += 1   # evicted, or lost locally: reads fetch it (casfs restore)
            elif holder.get(cid, meta.volume.store) != meta.volume.store:
                held_elsewhere += 1   # another machine's store holds it until its upload
            else:
                missing.append(cid.hex())
        except IntegrityError:
            corrupt.append(cid.hex())
        else:
            if cid in marked:
                bad_marked.append(cid.hex())
    orphans = sum(1 for cid in store.iter_ids() if cid not in all_ids)
    repaired = False
    if repair and (refs or nlinks):
        def fix(cur: pymysql.cursors.Cursor) -> None:
            for cid, _, _ in refs:
                chunk_rows.recount(cur, cid)
            for ino, _, _ in nlinks:
                namespace_rows.recount_nlink(cur, ino)
        db.transaction(fix)
        repaired = True
    return FsckReport(
        chunks_checked=len(live),
        refcount_mismatches=[(c.hex(), a, b) for c, a, b in refs],
        missing_rows=[c.hex() for c in no_row], missing_files=missing, corrupt_chunks=corrupt,
        nlink_mismatches=nlinks, dangling_entries=dangling, orphan_files=orphans, repaired=repaired,
        cloud_only=cloud_only, bad_marked=bad_marked, held_elsewhere=held_elsewhere,
        unreachable_dirs=unreachable,
        queue_stores=[(q.store, q.chunks, q.claimed, q.bytes) for q in per_store],
        unknown_stores=[q.store for q in per_store
                        if q.store not in with_session and q.store not in (first, meta.volume.store)])


def store_lines(r: FsckReport) -> list[str]:
    """The lines of the text report about stores: the queue per store and the stores
    no session names, and the chunks other stores hold."""
    out = [f"  upload queue of store {s}: {n} chunks ({c} in packs being uploaded), {b} bytes"
           for s, n, c, b in r.queue_stores]
    out += [f"  warning: store {s} has queued chunks and no mount session: they upload only when "
            "that machine mounts the volume again (lost with it if it is gone)" for s in r.unknown_stores]
    if r.held_elsewhere:
        out.append(f"  {r.held_elsewhere} live chunks are held by other machines' stores until they upload them")
    return out
