"""`casfs fsck --repair` for chunk data: replace bad or missing chunks from the cloud tier,
and name the files whose data stays lost (docs/integrity.md).

For each chunk that fsck found corrupt or missing, or that is marked ``bad``:

1. a local file that verifies now (its plaintext hashes to its id) only loses the mark;
2. else, when the cloud tier holds a confirmed copy, it is read with
   :meth:`cas.tier.cloud.CloudTier.fetch` (ranged, retried), verified against the id, written
   durably to the local store, and the row gets ``bad = 0, is_local = 1`` under its row
   lock;
3. else the chunk stays (or becomes) marked bad, so that the next write of the same
   bytes rewrites it (cas.chunk.manager invariant 4), and every path of every file that uses
   it is reported (hard links: each name).

Maintenance code: it uses the engine (cas.tier.cloud, cas.chunk.store); the engine never imports it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pymysql.cursors

from cas.tier.cloud import CloudTier
from cas.db import chunks as chunk_rows
from cas.db import manifests as manifest_rows
from cas.db import namespace as namespace_rows
from cas.chunk.envelope import codec_for
from cas.errors import ChunkMissing, FsError
from cas.db.database import ROOT_INODE, Database, Metadata
from cas.chunk.store import LocalStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkRepair:
    """What a repair did; ids are hex chunk ids, paths start at the volume root ("/a/b")."""

    replaced: list[str] = field(default_factory=list)    # fetched from the cloud, verified, written
    cleared: list[str] = field(default_factory=list)     # marked bad, but the local file verifies
    unrepaired: list[str] = field(default_factory=list)  # no good copy anywhere: marked bad
    paths: dict[str, list[str]] = field(default_factory=dict)  # unrepaired id -> files using it
    cloud_error: str = ""   # why the cloud tier could not be asked ("" when it was, or has none)

    @property
    def damaged_files(self) -> list[str]:
        """Every path that uses an unrepaired chunk, sorted, each once."""
        return sorted({p for ps in self.paths.values() for p in ps})

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        return {"replaced": self.replaced, "cleared": self.cleared, "unrepaired": self.unrepaired,
                "paths": self.paths, "damaged_files": self.damaged_files, "cloud_error": self.cloud_error}


def candidates(db: Database, found: Iterable[str]) -> list[bytes]:
    """The ids to repair: ``found`` (hex ids fsck listed as missing, corrupt or marked)
    and every referenced chunk marked bad, sorted."""
    ids = {bytes.fromhex(h) for h in found}
    ids.update(chunk_rows.bad_referenced(db))
    return sorted(ids)


def repair_chunks(meta: Metadata, ids: list[bytes], tier: CloudTier | None,
                  cloud_error: str = "") -> ChunkRepair:
    """Repair chunks ``ids`` as the module docstring says; ``tier`` None: no cloud copy
    can be had (no tier, or ``cloud_error`` says why it could not be opened). Raises
    MetaError, and NoSpace/FsError when a fetched copy cannot be written."""
    db = meta.db
    store = LocalStore(meta.volume.chunk_dir)
    envelope = codec_for(meta.volume)
    replaced: list[str] = []
    cleared: list[str] = []
    lost: list[bytes] = []
    for cid in ids:
        try:
            envelope.open(store.get(cid), cid)
        except FsError:
            pass
        else:
            _set_good(db, cid, None)
            cleared.append(cid.hex())
            continue
        blob = _from_cloud(tier, cid)
        if blob is None:
            lost.append(cid)
            continue
        store.put(cid, blob)   # durable before the row says so
        _set_good(db, cid, len(blob))
        log.warning("repair: chunk %s replaced by its verified cloud copy", cid.hex())
        replaced.append(cid.hex())
    chunk_rows.mark_bad(db, lost)
    paths = affected_paths(db, lost)
    return ChunkRepair(replaced, cleared, [c.hex() for c in lost],
                       {c.hex(): paths.get(c, []) for c in lost}, cloud_error)


def _from_cloud(tier: CloudTier | None, cid: bytes) -> bytes | None:
    """The verified envelope of ``cid`` from the cloud tier, or None."""
    if tier is None:
        return None
    try:
        blob = tier.fetch(cid)
        tier.envelope.open(blob, cid)
    except ChunkMissing as exc:
        log.info("repair: chunk %s: %s", cid.hex(), exc)
        return None
    except FsError as exc:
        log.error("repair: the cloud copy of chunk %s fails verification: %s", cid.hex(), exc)
        return None
    return blob


def _set_good(db: Database, cid: bytes, stored_length: int | None) -> None:
    """Clear ``cid``'s bad mark (and record its new envelope length) under its row lock."""
    def body(cur: pymysql.cursors.Cursor) -> None:
        if not chunk_rows.lock_exists(cur, cid):
            return   # collected meanwhile: the file we wrote is an orphan for gc
        if stored_length is None:
            chunk_rows.clear_bad(cur, cid)
        else:
            chunk_rows.mark_rewritten(cur, cid, stored_length)
    db.transaction(body)


def affected_paths(db: Database, ids: list[bytes]) -> dict[bytes, list[str]]:
    """Chunk id -> sorted paths (from the volume root) of every file whose manifest names
    it; a file with several hard links is listed under each name, an unlinked one as
    ``<unlinked inode N>``."""
    users: dict[bytes, set[int]] = {}
    for cid, ino in manifest_rows.users(db, ids):
        users.setdefault(cid, set()).add(ino)
    dirs: dict[int, str] = {ROOT_INODE: ""}
    files: dict[int, list[str]] = {}
    out: dict[bytes, list[str]] = {}
    for cid, inos in users.items():
        paths: list[str] = []
        for ino in sorted(inos):
            if ino not in files:
                files[ino] = inode_paths(db, ino, dirs)
            paths.extend(files[ino])
        out[cid] = sorted(paths)
    return out


def inode_paths(db: Database, ino: int, dirs: dict[int, str] | None = None) -> list[str]:
    """Every path of inode ``ino`` (one per directory entry naming it), sorted.
    ``dirs`` caches directory inode -> path ("" for the root)."""
    cache = {ROOT_INODE: ""} if dirs is None else dirs
    entries = namespace_rows.names_of(db, ino)
    if not entries:
        return [f"<unlinked inode {ino}>"]
    return sorted(f"{_dir_path(db, p, cache)}/{os.fsdecode(n)}" for p, n in entries)


def _dir_path(db: Database, ino: int, cache: dict[int, str]) -> str:
    """The path of directory ``ino`` (a directory has one entry), cached."""
    chain: list[tuple[int, str]] = []
    cur = ino
    while cur not in cache:
        row = namespace_rows.dentry_of(db, cur)
        if row is None or len(chain) > 4096:
            cache[cur] = f"<detached inode {cur}>"
            break
        chain.append((cur, os.fsdecode(row.name)))
        cur = row.parent
    path = cache[cur]
    for d, name in reversed(chain):
        path = f"{path}/{name}"
        cache[d] = path
    return path
