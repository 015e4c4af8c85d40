"""The typed metadata layer: every SQL statement casfs runs against a volume's tables.

One module per group of tables (see docs/metadata.md for the lock order, transaction
scopes and the invariants each statement relies on):

* :mod:`cas.db.batch` - the one batching helper for multi-row statements.
* :mod:`cas.db.source` - where a statement runs: a transaction's cursor or the Database.
* :mod:`cas.db.namespace` - inodes, dentries, symlinks, xattrs.
* :mod:`cas.db.manifests` - the slot -> chunk rows of each file.
* :mod:`cas.db.chunks` - chunk rows, refcount deltas, the gc protocol's row locks, bad marks.
* :mod:`cas.db.reports` - the read-only statements of find, du, stats and the sync status.
* :mod:`cas.db.queue` - ``upload_queue``: enqueue, the uploader's claim, release
  (docs/metadata-packs.md).
* :mod:`cas.db.packs` - ``packs``, ``pack_entries``, ``snapshot_packs``.
* :mod:`cas.db.volume` - the ``meta`` table.
* :mod:`cas.db.tables` - consistent reads, dumps and loads of whole tables.

Callers pass the cursor of the transaction they run in (``Database.transaction`` bodies)
or the :class:`cas.db.database.Database` for single reads; functions return typed rows
(dataclasses or NamedTuples), never raw tuples.
"""
