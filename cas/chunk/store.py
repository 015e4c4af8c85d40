"""The local chunk store: one envelope file per chunk, fanned out by id prefix.

Layout: ``ROOT/ab/cd/abcd...(64 hex)`` for chunk id ``abcd...``. A put writes a temporary
file in the same directory and renames it into place, so a chunk file is never seen
half-written; a batch of puts ends with one syncfs(2), so every chunk is durable before
the transaction that references it commits (invariant 1, docs/design.md).
ENOSPC/EDQUOT become :class:`~cas.errors.NoSpace`; a missing file on get is
:class:`~cas.errors.ChunkMissing`.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from cas.errors import ChunkMissing, FsError, NoSpace

_TMP_SUFFIX = ".tmp"


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs(2) (Linux), or None where it cannot be had."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_syncfs = _load_syncfs()


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync(2) the directory ``directory``, making the entries created, renamed or
    removed in it durable (POSIX leaves that to a fsync of the directory). Raises OSError."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StoredChunk:
    """What the store knows of one chunk file: its size in bytes and mtime in ns."""

    size: int
    mtime_ns: int


class LocalStore:
    """Chunk envelopes on a local disk under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, cid: bytes) -> Path:
        """The file that holds chunk ``cid`` (32-byte id)."""
        h = cid.hex()
        return self.root / h[:2] / h[2:4] / h

    def check_writable(self) -> None:
        """Raise OSError if the store directory cannot be written."""
        probe = self.root / f".probe{os.getpid()}{_TMP_SUFFIX}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)

    def put_many(self, items: Iterable[tuple[bytes, bytes]], pool: Executor | None = None) -> int:
        """Store each (chunk id, envelope bytes) durably; return bytes written.

        Each file is written to a temporary name and renamed into place (in ``pool``'s
        threads when given); then ONE syncfs(2) of the store's filesystem makes all of
        them, and their directory entries, durable before this returns. A file that an
        OS crash caught between rename and sync has no committed row (rows are written
        after this returns), so it is an orphan: writers store row-less chunks again,
        and gc removes orphans. Raises NoSpace on ENOSPC/EDQUOT (the partial temporary
        file is removed) and FsError(EIO) on other OS errors.
        """
        items = list(items)
        if pool is not None and len(items) > 1:
            list(pool.map(self._put_one, items))
        else:
            for item in items:
                self._put_one(item)
        if items:
            self._sync()
        return sum(len(blob) for _, blob in items)

    def _sync(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs is None or _syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)

    def _put_one(self, item: tuple[bytes, bytes]) -> None:
        """Write one chunk file (temp + rename); durability comes from :meth:`_sync`."""
        cid, blob = item
        final = self.path(cid)
        tmp = final.with_name(final.name + f".{os.getpid()}.{threading.get_ident()}{_TMP_SUFFIX}")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(blob)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"chunk store full: {exc}") from exc
            raise FsError(f"chunk store: {exc}") from exc

    def put(self, cid: bytes, blob: bytes) -> int:
        """Store one envelope durably; see :meth:`put_many`."""
        return self.put_many([(cid, blob)])

    def put_cached(self, cid: bytes, blob: bytes) -> int:
        """Store a local copy of a chunk whose durable copy is elsewhere (the cloud):
        temp + rename, no sync. Raises like :meth:`put_many`."""
        self._put_one((cid, blob))
        return len(blob)

    def get(self, cid: bytes) -> bytes:
        """Return the envelope bytes of chunk ``cid``. Raises ChunkMissing if absent."""
        try:
            with open(self.path(cid), "rb") as f:
                return f.read()
        except FileNotFoundError as exc:
            raise ChunkMissing(f"chunk {cid.hex()} missing from the local store") from exc
        except OSError as exc:
            raise FsError(f"chunk {cid.hex()}: {exc}") from exc

    def stat(self, cid: bytes) -> StoredChunk | None:
        """Size and mtime of chunk ``cid``'s file, or None if it is absent."""
        try:
            st = os.stat(self.path(cid))
        except FileNotFoundError:
            return None
        return StoredChunk(st.st_size, st.st_mtime_ns)

    def exists(self, cid: bytes) -> bool:
        """Whether chunk ``cid`` has a file in the store."""
        return self.stat(cid) is not None

    def delete(self, cid: bytes) -> bool:
        """Remove chunk ``cid``'s file; return False if it was already absent."""
        try:
            os.unlink(self.path(cid))
            return True
        except FileNotFoundError:
            return False

    def iter_ids(self) -> Iterator[bytes]:
        """Every chunk id with a file in the store (temporary files are skipped)."""
        if not self.root.is_dir():
            return
        for a in os.scandir(self.root):
            if not a.is_dir() or len(a.name) != 2:
                continue
            for b in os.scandir(a.path):
                if not b.is_dir():
                    continue
                for f in os.scandir(b.path):
                    if len(f.name) == 64 and not f.name.endswith(_TMP_SUFFIX):
                        try:
                            yield bytes.fromhex(f.name)
                        except ValueError:
                            continue

    def disk_usage(self) -> tuple[int, int]:
        """(free bytes, total bytes) of the filesystem holding the store."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
