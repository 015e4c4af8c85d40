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
committed database, like :mod:`cas.find`.
"""
from __future__ import annotations

import stat as S
from dataclasses import asdict, dataclass

from .meta import ROOT_INODE, Database

_FMT, _DIR, _REG = S.S_IFMT(0o170000), S.S_IFDIR, S.S_IFREG


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
    if inode == ROOT_INODE:
        tree = (f"tree (ino) AS (SELECT id FROM inodes WHERE nlink > 0 AND mode & {_FMT} = {_DIR}),"
                " files AS (SELECT i.id, i.size, i.data_bytes FROM inodes i"
                f" WHERE i.nlink > 0 AND i.mode & {_FMT} = {_REG}),")
        args: tuple[int, ...] = ()
    else:
        tree = (
            "tree (ino) AS ("
            " SELECT %s"
            " UNION ALL"
            " SELECT d.inode FROM tree t JOIN dentries d ON d.parent = t.ino JOIN inodes i ON i.id = d.inode"
            f" WHERE i.mode & {_FMT} = {_DIR}),"
            " files AS ("
            " SELECT i.id, i.size, i.data_bytes FROM inodes i WHERE i.id = %s AND i.mode & %s = %s"
            " UNION"
            " SELECT i.id, i.size, i.data_bytes FROM tree t JOIN dentries d ON d.parent = t.ino"
            f" JOIN inodes i ON i.id = d.inode WHERE i.mode & {_FMT} = {_REG}),")
        args = (inode, inode, _FMT, _REG)
    text = (
        f"WITH RECURSIVE {tree}"
        " refs AS (SELECT m.chunk, COUNT(*) AS n FROM files f JOIN manifests m ON m.inode = f.id GROUP BY m.chunk)"
        " SELECT f.n, f.logical, f.data, (SELECT COUNT(*) - 1 FROM tree), c.* FROM"
        " (SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS logical, COALESCE(SUM(LEAST(data_bytes, size)), 0) AS data"
        "  FROM files) f CROSS JOIN"
        " (SELECT COALESCE(SUM(IF(r.n >= c.refcount, c.length, 0)), 0),"
        "  COALESCE(SUM(IF(r.n >= c.refcount, c.stored_length, 0)), 0),"
        "  COALESCE(SUM(IF(r.n < c.refcount, c.length, 0)), 0),"
        "  COALESCE(SUM(IF(r.n < c.refcount, c.stored_length, 0)), 0), COUNT(*)"
        "  FROM refs r JOIN chunks c ON c.id = r.chunk) c")
    row = db.query(text, args)[0]
    n, logical, data, dirs, unique, unique_st, shared, shared_st, chunks = (int(v) for v in row)
    return Usage(files=n, directories=max(dirs, 0), logical=logical, data=data, holes=logical - data,
                 unique=unique, unique_stored=unique_st, shared=shared, shared_stored=shared_st,
                 chunks=chunks)


def children(db: Database, inode: int) -> list[tuple[bytes, int]]:
    """(name, inode) of the subdirectories of directory ``inode``, by name."""
    return [(bytes(n), int(i)) for n, i in db.query(
        "SELECT d.name, d.inode FROM dentries d JOIN inodes i ON i.id = d.inode "
        "WHERE d.parent = %s AND i.mode & %s = %s ORDER BY d.name", (inode, _FMT, _DIR))]
