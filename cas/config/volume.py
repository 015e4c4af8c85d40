"""Volumes: where a volume lives, its config file, and how it is created and opened.

A volume is a directory ``$XDG_DATA_HOME/casfs/NAME/`` (``~/.local/share`` when unset)::

    volume.toml   config: format, uuid, chunk_size, compression, meta_url, meta_password,
                  store_id (this machine's local store, docs/sharing.md),
                  [drive] (cloud tier, cas.tier.cloud.CloudConfig),
                  [s3] (cloud tier on an S3-compatible store instead, cas.tier.cloud.CloudConfig),
                  [mount] (defaults of `casfs mount`: durability = "group" | "immediate"),
                  [meta] (TLS to an external server, cas.db.tls)
                  [audit] (the audit log: level, max_bytes, backups; cas.config.audit.AuditConfig)
                  [encryption] (wrapped master key of an encrypted volume, cas.config.keys)
    chunks/       the local chunk store (cas.chunk.store)
    mysql/        datadir of the embedded MariaDB server (embedded volumes only)
    run/          socket (or sockdir: where a long path's socket lives), lock files,
                  the server's tmp/, umount's sync request/answer, stats.json
    rescue/       uncommitted buffers a daemon had to leave at exit (cas.engine.rescue)
    log/          mount daemon and MariaDB logs

The chunk size is fixed at init: a power of two between 64 KiB and 16 MiB.
"""
from __future__ import annotations

import os
import re
import stat as S
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from cas.chunk.envelope import parse_codec
from cas.errors import VolumeError

if TYPE_CHECKING:
    from cas.config.keys import VolumeKeys

CONFIG_FORMAT = 1
MIN_CHUNK = 64 * 1024
MAX_CHUNK = 16 * 1024 * 1024
DEFAULT_CHUNK = 1024 * 1024
DEFAULT_NAME = "default"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (temp file + rename) with ``data``, mode 0600: volume
    files that hold secrets or control state only the owner may read. Raises OSError."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def data_home() -> Path:
    """The casfs data directory: ``$XDG_DATA_HOME/casfs`` (XDG Base Directory spec)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "casfs"


def check_chunk_size(size: int) -> int:
    """Return ``size`` if it is a power of two in [64 KiB, 16 MiB]; else raise VolumeError."""
    if size < MIN_CHUNK or size > MAX_CHUNK or size & (size - 1):
        raise VolumeError(f"chunk size {size} must be a power of two between 64 KiB and 16 MiB")
    return size


@dataclass
class Volume:
    """An opened volume directory and its configuration."""

    path: Path
    name: str
    uuid: str
    chunk_size: int
    compression: str
    meta_url: str = ""
    meta_password: str = ""
    drive: dict[str, object] = field(default_factory=dict)   # the [drive] table (cas.tier.cloud.CloudConfig)
    mount: dict[str, object] = field(default_factory=dict)   # the [mount] table: defaults of `casfs mount`
    meta_tls: dict[str, object] = field(default_factory=dict)  # the [meta] table: TLS (cas/db/tls.py)
    audit: dict[str, object] = field(default_factory=dict)   # the [audit] table (cas.config.audit.AuditConfig)
    encryption: dict[str, Any] = field(default_factory=dict)  # the [encryption] table (cas.config.keys); {} = plain
    store_id: str = ""   # this side's local chunk store id (32 hex); "" = the volume's first store
    s3: dict[str, object] = field(default_factory=dict)   # the [s3] table (cas.tier.cloud.CloudConfig)
    # the unlocked keys of an encrypted volume (cas.config.keys.unlock sets them; never saved)
    keys: VolumeKeys | None = field(default=None, repr=False, compare=False)

    @property
    def embedded(self) -> bool:
        """True when the volume uses its private MariaDB server (no meta URL)."""
        return not self.meta_url

    @property
    def store(self) -> str:
        """The id of this side's local chunk store: 32 lowercase hex characters. The store
        made by ``casfs init`` has the volume uuid's hex digits (no config key needed);
        ``casfs join`` gives each further machine's store a random id (``store_id`` in
        volume.toml). Upload queue rows and sessions name it (docs/sharing.md)."""
        return self.store_id or uuid.UUID(self.uuid).hex

    @property
    def chunk_dir(self) -> Path:
        return self.path / "chunks"

    @property
    def run_dir(self) -> Path:
        return self.path / "run"

    @property
    def log_dir(self) -> Path:
        return self.path / "log"

    @property
    def mysql_dir(self) -> Path:
        return self.path / "mysql"

    @property
    def codec(self) -> tuple[int, int]:
        return parse_codec(self.compression)

    def save(self) -> None:
        cfg: dict[str, object] = {
            "format": CONFIG_FORMAT,
            "name": self.name,
            "uuid": self.uuid,
            "chunk_size": self.chunk_size,
            "compression": self.compression,
            "meta_url": self.meta_url,
        }
        if self.meta_password:
            cfg["meta_password"] = self.meta_password
        if self.store_id:
            cfg["store_id"] = self.store_id
        if self.drive:
            cfg["drive"] = dict(self.drive)
        if self.mount:
            cfg["mount"] = dict(self.mount)
        if self.meta_tls:
            cfg["meta"] = dict(self.meta_tls)
        if self.audit:
            cfg["audit"] = dict(self.audit)
        if self.encryption:
            cfg["encryption"] = dict(self.encryption)
        if self.s3:
            cfg["s3"] = dict(self.s3)
        tmp = self.path / "volume.toml.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            tomli_w.dump(cfg, f)
            f.flush()
            os.fsync(f.fileno())   # the [encryption] table: a torn volume.toml loses the data
        os.replace(tmp, self.path / "volume.toml")


def volume_path(name: str) -> Path:
    """The directory of volume ``name``; a name containing '/' is taken as a path."""
    if "/" in name:
        return Path(name).resolve()
    if not _NAME_RE.match(name):
        raise VolumeError(f"bad volume name {name!r}: use letters, digits, '.', '_', '-'")
    return data_home() / name


def open_volume(name: str) -> Volume:
    """Open an existing volume. Raises VolumeError if it does not exist or is malformed."""
    path = volume_path(name)
    cfg_file = path / "volume.toml"
    if not cfg_file.is_file():
        raise VolumeError(f"volume {name!r} does not exist ({path}); create it with `casfs init {name}`")
    try:
        cfg = tomllib.loads(cfg_file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise VolumeError(f"volume {name!r}: cannot read {cfg_file}: {exc}") from exc
    if cfg.get("format") != CONFIG_FORMAT:
        raise VolumeError(f"volume {name!r}: config format {cfg.get('format')!r} not supported")
    try:
        vol = Volume(
            path=path,
            name=str(cfg["name"]),
            uuid=str(cfg["uuid"]),
            chunk_size=check_chunk_size(int(cfg["chunk_size"])),
            compression=str(cfg["compression"]),
            meta_url=str(cfg.get("meta_url", "")),
            meta_password=str(cfg.get("meta_password", "")),
            drive=dict(cfg.get("drive", {})),
            mount=dict(cfg.get("mount", {})),
            meta_tls=dict(cfg.get("meta", {})),
            audit=dict(cfg.get("audit", {})),
            encryption=dict(cfg.get("encryption", {})),
            store_id=str(cfg.get("store_id", "")),
            s3=dict(cfg.get("s3", {})),
        )
        parse_codec(vol.compression)
        if vol.store_id and not re.fullmatch(r"[0-9a-f]{32}", vol.store_id):
            raise ValueError(f"store_id {vol.store_id!r} is not 32 lowercase hex digits")
        uuid.UUID(vol.uuid)
    except (KeyError, ValueError) as exc:
        raise VolumeError(f"volume {name!r}: bad config {cfg_file}: {exc}") from exc
    return vol


def check_new_volume_dir(path: Path) -> None:
    """Refuse ``path`` as the directory of a new volume unless it is safe to fill.

    An existing directory must be empty (init never mixes a volume with other files),
    owned by this effective uid and writable by nobody else (no group/other write bit):
    other users must not be able to add, replace or remove anything in a volume (its
    ``run/`` holds the embedded server's socket and pid file). Its parent, when it
    exists, must not let every user rename entries (world-writable without the
    sticky bit, see chmod(2) S_ISVTX; group write is common with user private groups and
    allowed there). Raises VolumeError; nothing is created.
    """
    parent = path.parent
    try:
        pst = os.stat(parent)
    except FileNotFoundError:
        pst = None
    except OSError as exc:
        raise VolumeError(f"cannot use {parent}: {exc.strerror}") from exc
    if pst is not None and pst.st_mode & 0o002 and not pst.st_mode & S.S_ISVTX:
        raise VolumeError(f"refusing to create a volume in {parent}: every user can rename "
                          f"entries there (mode {S.S_IMODE(pst.st_mode):04o}, no sticky bit)")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise VolumeError(f"cannot use {path}: {exc.strerror}") from exc
    if not S.S_ISDIR(st.st_mode):
        raise VolumeError(f"{path} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise VolumeError(f"refusing volume directory {path}: it is owned by uid {st.st_uid}, "
                          f"not by uid {os.geteuid()}")
    if st.st_mode & 0o022:
        raise VolumeError(f"refusing volume directory {path}: other users can write into it "
                          f"(mode {S.S_IMODE(st.st_mode):04o}); chmod 700 it first")
    try:
        entries = os.listdir(path)
    except OSError as exc:
        raise VolumeError(f"cannot use {path}: {exc.strerror}") from exc
    if entries:
        raise VolumeError(f"refusing volume directory {path}: it is not empty ({len(entries)} entries)")


def create_volume_dir(name: str, chunk_size: int, compression: str, meta_url: str) -> Volume:
    """Create the directory and config of a new volume (not its database).

    Raises VolumeError if the volume exists already, arguments are invalid, or the
    directory is not safe to use (:func:`check_new_volume_dir`).
    """
    check_chunk_size(chunk_size)
    try:
        parse_codec(compression)
    except ValueError as exc:
        raise VolumeError(f"bad compression {compression!r}: use zstd:LEVEL (LEVEL 1-22) or none") from exc
    path = volume_path(name)
    if (path / "volume.toml").exists():
        raise VolumeError(f"volume {name!r} already exists ({path})")
    check_new_volume_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in ("chunks", "run", "log"):
            (path / sub).mkdir(exist_ok=True, mode=0o700)
    except OSError as exc:
        raise VolumeError(f"cannot create volume directory {path}: {exc}") from exc
    vol = Volume(path=path, name=path.name if "/" in name else name, uuid=str(uuid.uuid4()),
                 chunk_size=chunk_size, compression=compression, meta_url=meta_url)
    return vol
