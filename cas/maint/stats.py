"""Volume statistics: sizes, dedup and compression ratios, chunk counts.

Definitions (bytes):
- logical: the sum of the sizes of the regular files in the namespace (a hard-linked
  file counts once); what ``du --apparent-size`` would report.
- referenced: the sum, over every manifest slot, of its chunk's plaintext length.
- unique: the plaintext bytes of the chunks with refcount > 0 (each counted once).
- stored: the envelope bytes of every chunk row (after compression), garbage included;
  ``live_stored`` counts the live chunks only (refcount > 0), ``garbage`` the rest
  (refcount 0, awaiting gc). `casfs stats` prints live and garbage on their own lines.
- dedup saved: logical - sparse - unique (bytes of file data not stored again because
  an identical chunk was stored already).
- sparse: the bytes of regular files that lie in holes (slots never written, or written
  all zeros): logical minus the files' ``data_bytes``. They are stored as nothing, so
  they are not deduplicated bytes.
- dedup ratio = (logical - sparse) / unique; compression ratio = unique / stored bytes of
  live chunks.
- local: envelope bytes with a file in the local store; cloud: bytes of confirmed packs.
  A live chunk is local-only (not yet confirmed in a pack), cloud-only (evicted) or both.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from cas.db import reports
from cas.db.database import Metadata


@dataclass(frozen=True)
class VolumeStats:
    """A snapshot of a volume's figures; see the module docstring for definitions."""

    files: int
    directories: int
    symlinks: int
    logical_bytes: int
    referenced_bytes: int
    unique_bytes: int
    stored_bytes: int
    live_stored_bytes: int
    chunks: int
    live_chunks: int
    garbage_chunks: int
    garbage_bytes: int
    chunk_size: int
    local_bytes: int = 0          # envelope bytes of chunks with a local file
    local_only_chunks: int = 0    # live chunks with no confirmed cloud copy yet
    cloud_only_chunks: int = 0    # live chunks evicted from the local store
    both_chunks: int = 0          # live chunks local and in the cloud
    cloud_bytes: int = 0          # bytes of confirmed packs (what the cloud store holds)
    cloud_packs: int = 0
    queued_chunks: int = 0        # upload queue length
    sparse_bytes: int = 0         # bytes of files in holes (not stored, not deduplicated)

    @property
    def dedup_saved_bytes(self) -> int:
        return max(self.logical_bytes - self.sparse_bytes - self.unique_bytes, 0)

    @property
    def dedup_ratio(self) -> float:
        data = self.logical_bytes - self.sparse_bytes
        return data / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_bytes / self.live_stored_bytes if self.live_stored_bytes else 1.0

    def as_dict(self) -> dict[str, float | int]:
        d: dict[str, float | int] = dict(asdict(self))
        d["dedup_ratio"] = round(self.dedup_ratio, 6)
        d["compression_ratio"] = round(self.compression_ratio, 6)
        d["dedup_saved_bytes"] = self.dedup_saved_bytes
        return d


def collect(meta: Metadata) -> VolumeStats:
    """Compute the figures of ``meta``'s volume (works while it is mounted)."""
    files, dirs, links, logical, sparse = reports.namespace_figures(meta.db)
    referenced, chunks, stored, live, unique, live_stored = reports.chunk_figures(meta.db)
    return VolumeStats(
        files=int(files), directories=int(dirs), symlinks=int(links), logical_bytes=int(logical),
        referenced_bytes=int(referenced), unique_bytes=int(unique), stored_bytes=int(stored),
        live_stored_bytes=int(live_stored), chunks=int(chunks), live_chunks=int(live),
        garbage_chunks=int(chunks) - int(live), garbage_bytes=int(stored) - int(live_stored),
        chunk_size=meta.volume.chunk_size, sparse_bytes=int(sparse), **_cloud_figures(meta))


def _cloud_figures(meta: Metadata) -> dict[str, int]:
    f = reports.cloud_figures(meta.db)
    return {"local_bytes": f.local_bytes, "local_only_chunks": f.local_only,
            "cloud_only_chunks": f.cloud_only, "both_chunks": f.both, "cloud_bytes": f.cloud_bytes,
            "cloud_packs": f.packs, "queued_chunks": f.queued}
