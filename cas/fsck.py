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
and lists orphan chunk files (a file with no row; gc removes them after the grace
period). ``repair`` rewrites refcounts and link counts from the manifests and entries;
missing, corrupt and bad-marked chunks are repaired by cas.repair (from the cloud tier).
"""
from __future__ import annotations

import stat as S
from dataclasses import dataclass, field
from typing import Any

from .envelope import codec_for
from .errors import ChunkMissing, IntegrityError
from .meta import Metadata
from .store import LocalStore


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

    @property
    def clean(self) -> bool:
        """True when nothing is wrong (orphan files are not an error: gc removes them)."""
        return not (self.refcount_mismatches or self.missing_rows or self.missing_files
                    or self.corrupt_chunks or self.nlink_mismatches or self.dangling_entries
                    or self.bad_marked)


def check(meta: Metadata, repair: bool = False, verify: bool = True) -> FsckReport:
    """Run the checks of the module docstring; with ``repair`` fix refcounts and nlinks."""
    db = meta.db
    store = LocalStore(meta.volume.chunk_dir)
    envelope = codec_for(meta.volume)

    def snapshot(cur: Any) -> tuple[Any, ...]:
        cur.execute("SELECT c.id, c.refcount, COUNT(m.chunk) FROM chunks c "
                    "LEFT JOIN manifests m ON m.chunk = c.id GROUP BY c.id, c.refcount "
                    "HAVING c.refcount <> COUNT(m.chunk)")
        refs = [(bytes(r[0]), int(r[1]), int(r[2])) for r in cur.fetchall()]
        cur.execute("SELECT DISTINCT m.chunk FROM manifests m LEFT JOIN chunks c ON c.id = m.chunk "
                    "WHERE c.id IS NULL")
        no_row = [bytes(r[0]) for r in cur.fetchall()]
        cur.execute("SELECT c.id, e.chunk IS NOT NULL, c.is_local, c.bad FROM chunks c "
                    "LEFT JOIN pack_entries e ON e.chunk = c.id WHERE c.refcount > 0")
        rows = cur.fetchall()
        live = [bytes(r[0]) for r in rows]
        in_cloud = {bytes(r[0]) for r in rows if r[1] and not (r[2] or r[3])}   # meant to be cloud-only
        marked = {bytes(r[0]) for r in rows if r[3]}
        cur.execute("SELECT i.id, i.nlink, COUNT(d.inode) FROM inodes i LEFT JOIN dentries d ON d.inode = i.id "
                    "WHERE i.mode & %s <> %s AND i.nlink > 0 GROUP BY i.id, i.nlink "
                    "HAVING i.nlink <> COUNT(d.inode)", (S.S_IFMT(0o170000), S.S_IFDIR))
        nlinks = [(int(r[0]), int(r[1]), int(r[2])) for r in cur.fetchall()]
        cur.execute("SELECT d.parent, d.name FROM dentries d LEFT JOIN inodes i ON i.id = d.inode "
                    "WHERE i.id IS NULL")
        dangling = [(int(r[0]), bytes(r[1]).decode(errors="replace")) for r in cur.fetchall()]
        cur.execute("SELECT id FROM chunks")
        all_ids = {bytes(r[0]) for r in cur.fetchall()}
        return refs, no_row, live, (in_cloud, marked), nlinks, dangling, all_ids

    db.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    try:
        refs, no_row, live, (in_cloud, marked), nlinks, dangling, all_ids = db.transaction(snapshot)
    finally:
        db.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    missing, corrupt, bad_marked = [], [], []
    cloud_only = 0
    for cid in live:
        try:
            blob = store.get(cid)
            if verify:
                envelope.open(blob, cid)
        except ChunkMissing:
            if cid in in_cloud:
                cloud_only += 1   # evicted, or lost locally: reads fetch it (casfs restore)
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
        def fix(cur: Any) -> None:
            for cid, _, _ in refs:
                cur.execute("UPDATE chunks SET refcount = (SELECT COUNT(*) FROM manifests WHERE chunk = %s), "
                            "zero_since = IF((SELECT COUNT(*) FROM manifests WHERE chunk = %s) = 0, "
                            "COALESCE(zero_since, NOW(6)), NULL) WHERE id = %s", (cid, cid, cid))
            for ino, _, _ in nlinks:
                cur.execute("UPDATE inodes SET nlink = (SELECT COUNT(*) FROM dentries WHERE inode = %s) "
                            "WHERE id = %s", (ino, ino))
        db.transaction(fix)
        repaired = True
    return FsckReport(
        chunks_checked=len(live),
        refcount_mismatches=[(c.hex(), a, b) for c, a, b in refs],
        missing_rows=[c.hex() for c in no_row], missing_files=missing, corrupt_chunks=corrupt,
        nlink_mismatches=nlinks, dangling_entries=dangling, orphan_files=orphans, repaired=repaired,
        cloud_only=cloud_only, bad_marked=bad_marked)
