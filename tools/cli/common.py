"""Helpers shared by the CLI command modules: sizes, errors, opening volumes."""
from __future__ import annotations

import errno
import functools
import re
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import click

from cas.tier import cloud
from cas.errors import CasError, VolumeError
from cas.db.database import Metadata
from cas.tier.objstore import ObjectStoreError
from fusefront.mountpoint import MountpointError

P = ParamSpec("P")
R = TypeVar("R")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """Parse a byte size such as ``1MiB``, ``64K``, ``256mib`` or ``4096`` into bytes.

    Binary units (K, M, G, KiB ...) are powers of 1024, KB/MB/GB powers of 1000.
    Raises click.BadParameter for anything else.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size (examples: 4096, 64KiB, 1MiB, 2G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: float, digits: int = 2) -> str:
    """``n`` bytes as a short human string in binary units (``512 B``, ``12.34 MiB``),
    with ``digits`` decimals above bytes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return f"{n:.{digits}f} TiB"


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Report engine and mountpoint errors as a one-line message and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (CasError, MountpointError, ObjectStoreError) as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return wrapper


def os_error_line(exc: OSError) -> str:
    """A one-line message for an OSError: its strerror and the path(s) it names, a long
    path shortened in the middle (ENAMETOOLONG names one of over 255 bytes)."""
    def short(p: object) -> str:
        t = str(p)
        return t if len(t) <= 120 else t[:60] + "..." + t[-40:]
    what = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENAMETOOLONG:
        what += " (a path component is at most 255 bytes, a path 4095)"
    names = [short(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{what}: {' -> '.join(names)}" if names else what


class CasfsGroup(click.Group):
    """The click group of `casfs`: an OSError that escapes any command (a path the OS
    refuses: ENAMETOOLONG, EACCES, ELOOP ...) becomes a one-line message and exit
    status 1 here, in one place, instead of a traceback. EPIPE is left to click."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise
            raise click.ClickException(os_error_line(exc)) from None


def open_tier(meta: Metadata, endpoint: str | None = None) -> cloud.CloudTier:
    """The volume's cloud tier for a CLI command (no background thread); ``endpoint``
    overrides the configured one. Raises VolumeError when the tier is not enabled."""
    if not cloud.enabled(meta.db):
        raise VolumeError(f"volume {meta.volume.name} has no cloud tier; set one up with `casfs drive auth` or `casfs s3 enable`")
    cfg = cloud.CloudConfig.from_volume(meta.volume)
    if endpoint is not None:
        cfg.endpoint = endpoint
    return cloud.CloudTier(meta, cloud.open_objects(meta.volume, cfg, meta.db), cfg)


def refuse_live_sessions(meta: Metadata, command: str) -> None:
    """Enabling the cloud tier while another mount runs would leave that mount without
    queue rows for its new chunks (it reads ``cloud_enabled`` at start) and its files
    unqueued: refuse while any session is live, on any machine (docs/sharing.md,
    "Data"). Raises VolumeError (one line, exit 1)."""
    from cas.db import sessions as dbsessions
    live = dbsessions.any_live(meta.db)
    if live:
        s = live[0]
        raise VolumeError(f"volume {meta.volume.name} is mounted by {s.host}:{s.pid} (session {s.id}): "
                          f"unmount every mount before `casfs {command}`")


def enable_tier(meta: Metadata) -> int:
    """Enable the volume's cloud tier from this side (cas.tier.cloud.enable): on a shared
    volume only the chunks whose file this side's store holds are queued (each other
    side queues its own at its next mount). Returns the chunks queued. Raises MetaError."""
    from cas.chunk.store import LocalStore
    from cas.db.volume import is_shared
    vol = meta.volume
    local = LocalStore(vol.chunk_dir) if is_shared(meta.db) else None
    return cloud.enable(meta.db, vol.store, local)
