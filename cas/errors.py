"""The engine's one exception hierarchy.

Everything `cas` raises on purpose derives from :class:`CasError`.  Errors that a
POSIX caller must see as an errno derive from :class:`FsError` and carry that errno
(`errno` attribute); the FUSE layer turns them into ``FUSEError(errno)`` in one place.
PyMySQL and OS errors are converted where they enter the engine.
"""
from __future__ import annotations

import errno as _errno


class CasError(Exception):
    """Base of every error the engine raises on purpose."""


class FsError(CasError):
    """An error a POSIX caller sees as ``errno`` (default EIO)."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "", err: int | None = None) -> None:
        super().__init__(message)
        if err is not None:
            self.errno = err


class NotFound(FsError):
    errno = _errno.ENOENT


class Stale(NotFound):
    """An inode number whose row is gone: another machine freed it (shared volume,
    docs/sharing.md). ESTALE, on which Linux walks the path again (NFS's answer); still
    a NotFound to callers that only ask whether the inode exists."""

    errno = _errno.ESTALE


class Exists(FsError):
    errno = _errno.EEXIST


class NotEmpty(FsError):
    errno = _errno.ENOTEMPTY


class NotADirectory(FsError):
    errno = _errno.ENOTDIR


class IsADirectory(FsError):
    errno = _errno.EISDIR


class NameTooLong(FsError):
    errno = _errno.ENAMETOOLONG


class NoSpace(FsError):
    """The chunk store's disk is full (ENOSPC); nothing was committed."""

    errno = _errno.ENOSPC


class InvalidArgument(FsError):
    errno = _errno.EINVAL


class NoData(FsError):
    """Extended attribute not present (ENODATA, POSIX xattr(7))."""

    errno = _errno.ENODATA


class IntegrityError(FsError):
    """A chunk's bytes do not hash to its id, or its envelope is malformed (EIO)."""

    errno = _errno.EIO


class ChunkMissing(FsError):
    """A chunk named by a manifest is not in the store (EIO)."""

    errno = _errno.EIO


class ChunkPending(ChunkMissing):
    """A chunk another machine's local store holds is not uploaded yet, and the caller
    asked not to wait for it (a read-ahead; docs/sharing.md, "Data"). EIO."""


class MetaError(CasError):
    """The metadata server is unreachable, refused us, or failed a statement."""


class SchemaMismatch(MetaError):
    """The database carries a schema version this casfs does not speak."""


class VolumeError(CasError):
    """A volume is missing, malformed, or cannot be created."""


class ServerError(CasError):
    """The embedded MariaDB server cannot be installed, started or stopped."""
