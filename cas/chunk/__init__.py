"""The chunk layer: the chunk envelope (ids, zstd, AEAD), the local store, the RAM
cache and the chunk manager (load, store-once, refcount protocol). It reaches the
cloud tier only through :class:`cas.chunk.remote.RemoteChunks`, which it defines."""
