"""What the chunk layer needs from a cloud tier: :class:`RemoteChunks` (a Protocol).

The chunk layer (envelope, store, cache, chunk manager) defines this interface and the
cloud tier implements it: ``cas.tier.cloud.CloudTier`` satisfies it structurally, without
naming it, and mypy checks that where ``Filesystem.attach_cloud`` hands the tier to the
:class:`~cas.chunk.manager.ChunkManager`. So the chunk layer never imports the cloud tier, not
even for type checking (tests/engine/test_layers.py, docs/layout.md), and the cloud
tier is free to import the chunk layer (the local store, the envelope codec).

Chunk ids are ``bytes`` (32: SHA-256, or keyed BLAKE3 in an encrypted volume); blobs are
chunk envelopes (cas/chunk/envelope.py), which the chunk manager verifies itself: the tier
hands out bytes it has not verified.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class AheadSettings(Protocol):
    """The one setting of a cloud tier the chunk layer reads."""

    @property
    def fetch_ahead(self) -> int:
        """Ranged GETs kept in flight for a sequential reader; 0: the tier does not overlap."""
        ...


class AccessCounter(Protocol):
    """Where the chunk layer reports chunk reads (the cloud tier's eviction order)."""

    def touch(self, cid: bytes) -> None:
        """Count one read of chunk ``cid``; thread-safe."""
        ...


class RemoteChunks(Protocol):
    """What :class:`~cas.chunk.manager.ChunkManager` needs from a cloud tier: reads of evicted
    chunks, the read-ahead of a sequential cold reader, and the access counts that
    order eviction."""

    @property
    def cfg(self) -> AheadSettings:
        """The tier's settings (read: ``fetch_ahead``)."""
        ...

    @property
    def counts(self) -> AccessCounter:
        """The tier's access counts (:meth:`ChunkManager.load` touches every chunk read)."""
        ...

    def fetch(self, cid: bytes, wait: bool = True) -> bytes:
        """The envelope of evicted chunk ``cid``, unverified. Raises ChunkMissing when no
        copy is recorded, FsError(EIO) when the store will not give it. A chunk another
        store holds and has not uploaded yet is waited for (bounded) when ``wait``, else
        ChunkPending is raised at once (a read-ahead must not hold its thread)."""
        ...

    def keep_local(self, cid: bytes, blob: bytes) -> None:
        """Write the verified envelope ``blob`` of ``cid`` back to the local store."""
        ...

    def ahead_room(self) -> bool:
        """True when :meth:`fetch_ahead` would start a GET now (no list, stat or query)."""
        ...

    def fetch_ahead(self, cids: Iterable[bytes]) -> int:
        """Start ranged GETs for the evicted chunks among ``cids`` (file order); returns
        the GETs started. Never raises."""
        ...

    def fetch_ahead_prefix(self, cids: list[bytes]) -> tuple[int, int]:
        """:meth:`fetch_ahead` for ``cids``; returns (GETs started, how many leading
        ``cids`` it dealt with)."""
        ...
