"""Sync status of one file: is every chunk of it on Drive, what is still queued, where
its chunks are (docs/status.md).

The mount answers it as the read-only virtual xattr ``user.casfs.status`` of every
regular file (:data:`STATUS_XATTR`); `casfs status` and `casfs drive wait` read that
xattr. The value is one line of JSON (:meth:`FileSync.encode`), e.g.::

    {"chunks":3,"cloud_chunks":0,"dirty_bytes":0,"local_chunks":3,"queued_bytes":196719,
     "queued_chunks":3,"state":"pending","where":"local"}

Counts are of the file's *distinct* chunks (a chunk used by several slots counts once:
it is uploaded once). A chunk is on Drive once it has a ``pack_entries`` row: that row
is written in the transaction that confirms its pack (size and md5 checked, docs/cloud.md
invariant 5), so "synced" never counts an upload still under way.

- ``state``: ``"synced"`` (every chunk is in a confirmed pack and no written byte is
  waiting for writeback), ``"pending"`` (something is still to upload), or
  ``"no-cloud"`` (the volume has no cloud tier: nothing is ever uploaded);
- ``where`` (of the chunks; bytes still in RAM count as local): ``"local"`` (every
  chunk has a local copy, some have none on Drive),
  ``"both"`` (every chunk local and on Drive), ``"cloud-only"`` (every chunk on Drive
  only: evicted under ``--local-limit``), ``"partial"`` (some chunks have no local copy,
  others no Drive copy, or only part of them was evicted), ``"none"`` (no stored data:
  empty or all holes);
- ``queued_bytes``: stored (compressed envelope) bytes of the chunks not yet in a
  confirmed pack; ``dirty_bytes``: bytes written to the file and still buffered in the
  mount's RAM (not yet chunks: their stored size is not known yet).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from cas.db import reports
from cas.db.database import Database

STATUS_XATTR = b"user.casfs.status"
# names the mount answers itself: never stored in the xattrs table, never listed,
# read-only (setxattr/removexattr give EPERM)
VIRTUAL_XATTRS = frozenset({STATUS_XATTR})
STATES = ("synced", "pending", "no-cloud")
PLACES = ("local", "both", "cloud-only", "partial", "none")


@dataclass(frozen=True)
class FileSync:
    """The sync status of one file (see the module docstring); bytes and chunk counts."""

    state: str
    where: str
    chunks: int
    local_chunks: int
    cloud_chunks: int
    queued_chunks: int
    queued_bytes: int
    dirty_bytes: int

    @property
    def bytes_left(self) -> int:
        """Bytes still to reach Drive: queued stored bytes plus buffered bytes."""
        return self.queued_bytes + self.dirty_bytes

    def encode(self) -> bytes:
        """The xattr value: compact JSON, keys sorted, ASCII."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> FileSync:
        """Parse an xattr value; raises ValueError when it is not one."""
        try:
            d: Any = json.loads(value)
            fs = cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a casfs status value: {value[:80]!r}") from exc
        if fs.state not in STATES or fs.where not in PLACES:
            raise ValueError(f"not a casfs status value: {value[:80]!r}")
        return fs


def _where(chunks: int, local: int, cloud: int, dirty: int) -> str:
    if chunks == 0:
        return "local" if dirty else "none"
    if local == chunks:
        return "both" if cloud == chunks else "local"
    if local == 0 and cloud == chunks and not dirty:
        return "cloud-only"
    return "partial"


def file_sync(db: Database, ino: int, cloud: bool, dirty_bytes: int = 0) -> FileSync:
    """The sync status of inode ``ino`` from its manifest, its chunks' rows and their pack
    entries, in one query on ``db`` (a mount passes its own connection, so the rows of
    its open group transaction count). ``cloud``: whether the volume's cloud tier is
    enabled; ``dirty_bytes``: the file's bytes buffered in RAM. Raises MetaError."""
    n, local, in_cloud, qbytes = reports.file_chunks(db, ino)
    if not cloud:
        state = "no-cloud"
    elif in_cloud == n and not dirty_bytes:
        state = "synced"
    else:
        state = "pending"
    return FileSync(state=state, where=_where(n, local, in_cloud, dirty_bytes), chunks=n,
                    local_chunks=local, cloud_chunks=in_cloud, queued_chunks=n - in_cloud if cloud else 0,
                    queued_bytes=qbytes if cloud else 0, dirty_bytes=dirty_bytes)
