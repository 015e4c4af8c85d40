"""The cloud tier: object stores (Google Drive, a directory), packs and the upload
queue, reads of evicted chunks, eviction, metadata snapshots and restore."""
