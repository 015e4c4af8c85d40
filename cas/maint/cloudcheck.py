"""`casfs fsck --cloud`: check that every pack the database names is on the cloud store
as recorded, and say which files depend on the packs that are not.

For each confirmed pack (schema.sql ``packs``, state 'confirmed') the store's object
``object_id`` must exist in the volume's folder, not trashed, with the recorded
``size`` in bytes and, when the store reports one, the recorded ``md5`` (Drive documents
``size`` and ``md5Checksum`` for binary files; sha256 is not relied on, docs/cloud.md).
The folder is listed once (pages of up to 1000 files); an id not in the listing is looked
up on its own, so that a pack moved out of the folder or trashed is told from one that
is gone. For a bad pack the report gives its chunks, how many of them have no local copy
(their data is unreadable now, not only unprotected), and the paths of the files whose
manifests name one of its chunks (a file with several names: one of them; a file with
no name left, unlinked while open: ``<inode N>``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cas.db import manifests as manifest_rows
from cas.db import namespace as namespace_rows
from cas.db import packs as pack_rows
from cas.db.database import ROOT_INODE, Database
from cas.tier.objstore import ObjectInfo, ObjectNotFound, ObjectStore

PATHS_PER_PACK = 50   # paths listed per bad pack (the count is always exact)


@dataclass(frozen=True)
class PackProblem:
    """One confirmed pack that is not on the store as recorded.

    ``problem``: "missing", "not in the volume's folder (trashed or moved)", "size N
    bytes, recorded M", or "md5 X, recorded Y". ``chunks``: live chunks located in it;
    ``cloud_only``: those with no local copy; ``files``: files depending on it;
    ``paths``: up to PATHS_PER_PACK of their paths (bytes decoded with surrogateescape).
    """

    name: str
    object_id: str
    problem: str
    chunks: int
    cloud_only: int
    files: int
    paths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CloudCheck:
    """What :func:`check_packs` found: packs checked, and the bad ones."""

    packs_checked: int
    problems: list[PackProblem] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """For JSON output."""
        return {"packs_checked": self.packs_checked, "clean": self.clean,
                "problems": [asdict(p) for p in self.problems]}


def check_packs(db: Database, objects: ObjectStore) -> CloudCheck:
    """Compare every confirmed pack with the store's object (see the module doc).
    Read-only; safe while the volume is mounted. Raises MetaError and the cas.tier.objstore
    errors (TryAgain after the store's own retries, ObjectStoreError)."""
    rows = pack_rows.confirmed(db)
    listed: dict[str, ObjectInfo] = {o.id: o for o in objects.list()}
    problems: list[PackProblem] = []
    for pid, name, oid, size, md5 in rows:
        want_md5 = md5.hex()
        info = listed.get(oid)
        problem = ""
        if info is None:
            try:
                objects.stat(oid)
                problem = "not in the volume's folder (trashed or moved)"
            except ObjectNotFound:
                problem = "missing"
        elif info.size != size:
            problem = f"size {info.size} bytes, recorded {size}"
        elif info.md5 and info.md5 != want_md5:
            problem = f"md5 {info.md5}, recorded {want_md5}"
        if problem:
            problems.append(_problem(db, pid, name, oid, problem))
    return CloudCheck(len(rows), problems)


def _problem(db: Database, pack: int, name: str, oid: str, problem: str) -> PackProblem:
    chunks, remote = pack_rows.entry_counts(db, pack)
    inodes = manifest_rows.inodes_using_pack(db, pack)
    paths = [path_of(db, ino) for ino in inodes[:PATHS_PER_PACK]]
    return PackProblem(name, oid, problem, chunks, remote, len(inodes), paths)


def path_of(db: Database, inode: int) -> str:
    """One path of ``inode`` from the root ("/dir/file"), or ``<inode N>`` when it has
    no directory entry (unlinked while open)."""
    parts: list[str] = []
    ino = inode
    seen = set()
    while ino != ROOT_INODE:
        row = namespace_rows.dentry_of(db, ino)
        if row is None or ino in seen:
            return f"<inode {inode}>"
        seen.add(ino)
        parts.append(row.name.decode("utf-8", "surrogateescape"))
        ino = row.parent
    return "/" + "/".join(reversed(parts))
