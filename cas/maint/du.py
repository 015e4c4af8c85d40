"""Space used by a subtree (`casfs du`): logical, unique, shared bytes and holes.

For the regular files below a directory (each inode once, however many of its links
lie in the subtree):

- logical: the sum of their sizes (``du --apparent-size``);
- holes: the bytes of those files that lie in holes (size minus ``data_bytes``): not
  stored, and not counted as deduplicated either;
- unique: the plaintext bytes of the chunks referenced only from inside the subtree
  (the number of manifest slots of the subtree's files naming the chunk equals its
  refcount), each chunk counted once; ``unique_stored`` is their envelope bytes on disk
  (after compression): what deleting the subtree would free, once gc has run;
- shared: the plaintext bytes of the chunks referenced from the subtree and also from
  outside it, each counted once (``shared_stored`` likewise): deleting the subtree frees
  none of it;
- data: the bytes of the files outside holes; ``data - unique - shared`` is what dedup
  saved inside the subtree.

Figures come from one statement (one consistent snapshot under READ COMMITTED) on the
committed database, like :mod:`cas.maint.find`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from cas.db import reports
from cas.db.database import Database


@dataclass(frozen=True)
class Usage:
    """One subtree's figures (bytes, except the counts); see the module docstring."""

    files: int
    directories: int
    logical: int
    data: int
    holes: int
    unique: int
    unique_stored: int
    shared: int
    shared_stored: int
    chunks: int

    @property
    def dedup_saved(self) -> int:
        """Bytes of the files' data that dedup did not store a second time."""
        return max(self.data - self.unique - self.shared, 0)

    def as_dict(self) -> dict[str, int]:
        """The figures in bytes (``--json`` of `casfs du`), with ``dedup_saved``."""
        d = dict(asdict(self))
        d["dedup_saved"] = self.dedup_saved
        return d


def usage(db: Database, inode: int) -> Usage:
    """The figures of the subtree at directory (or regular file) ``inode``. Raises
    MetaError.

    For the root, every linked inode is in the subtree: the inodes are scanned instead
    of walking the tree (docs/find.md gives both times at 1,000,000 files)."""
    n, logical, data, dirs, unique, unique_st, shared, shared_st, chunks = reports.subtree_usage(db, inode)
    return Usage(files=n, directories=max(dirs, 0), logical=logical, data=data, holes=logical - data,
                 unique=unique, unique_stored=unique_st, shared=shared, shared_stored=shared_st,
                 chunks=chunks)


def children(db: Database, inode: int) -> list[tuple[bytes, int]]:
    """(name, inode) of the subdirectories of directory ``inode``, by name."""
    return [(d.name, d.inode) for d in reports.subdirectories(db, inode)]
