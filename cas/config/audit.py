"""The audit log: who did what to a volume, as JSON lines in ``VOLUME/log/audit.jsonl``.

One record per line (docs/monitoring.md)::

    {"time": "2026-11-27T16:31:02.123Z", "uid": 1000, "gid": 1000, "pid": 4242,
     "op": "rename", "path": "/a/x", "path2": "/b/x", "result": 0}

``time`` is UTC with milliseconds (ISO 8601); ``result`` is 0 or an errno name
("ENOTEMPTY", errno(3)); ``path2`` appears for rename and link, ``bytes`` for read and
write, ``attrs`` for setattr, ``name`` for xattr operations.

Everything goes through the standard :mod:`logging` package: the logger
:data:`LOGGER` ("casfs.audit") and a handler made by :func:`open_handler`, a
:class:`logging.handlers.RotatingFileHandler` whose files are created mode 0600 and
opened for appending (O_APPEND) only, formatted by :class:`JsonFormatter`. Any process
may add events: the mount's FUSE layer (fusefront/observe.py), and CLI commands after
:func:`attach` -- e.g. a wrong passphrase::

    logging.getLogger("casfs.audit").warning(
        "authentication failed", extra={"audit": {"op": "unlock", "result": "EACCES"}})

A record's ``audit`` dict gives the fields; ``op`` defaults to the message, ``uid``,
``gid`` and ``pid`` to the emitting process's.

Levels (:data:`LEVELS`, mount option ``--audit``, volume.toml ``[audit] level``):
``off``; ``changes`` (the default: namespace changes, setattr, xattr changes, opens);
``all`` (also reads and writes with their byte counts, lookups, directory opens, xattr
reads, readlink).
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from dataclasses import dataclass
from io import TextIOWrapper
from typing import Any

from cas.errors import VolumeError
from cas.config.volume import Volume

LOGGER = "casfs.audit"
AUDIT_FILE = "audit.jsonl"
OFF, CHANGES, ALL = "off", "changes", "all"
LEVELS = (OFF, CHANGES, ALL)
DEFAULT_MAX_BYTES = 64 << 20   # bytes of one file before it is rotated
DEFAULT_BACKUPS = 8            # rotated files kept (audit.jsonl.1 ... .8)

audit_log = logging.getLogger(LOGGER)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False, default=str)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ms), then the record's ``audit`` dict,
    with ``op`` defaulting to the message and ``uid``/``gid``/``pid`` to the emitting
    process's. A record without ``audit`` gives ``op`` (the message) and ``level``."""

    def format(self, record: logging.LogRecord) -> str:
        t = record.created
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
        fields = getattr(record, "audit", None)
        out: dict[str, Any] = {"time": stamp}
        if isinstance(fields, dict):
            if "op" not in fields or "uid" not in fields:
                out.update(uid=os.getuid(), gid=os.getgid(), pid=record.process, op=record.getMessage())
            out.update(fields)
        else:
            out.update(uid=os.getuid(), gid=os.getgid(), pid=record.process, op=record.getMessage(),
                       level=record.levelname)
        return _json(out)


class PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files are created mode 0600 (before anything is
    written, and again after every rotation) and opened with O_APPEND only.

    With ``buffered`` the lines collect in RAM and reach the file in one write(2) at
    :meth:`flush` (the mount calls it every AUDIT_FLUSH_S and at exit), when
    BUFFER_BYTES are pending, or at once for a WARNING or worse; otherwise every record
    is written at once. One write(2) per batch of whole lines, with O_APPEND, keeps the
    lines of several processes appending to the same file whole. Rotation happens
    between batches, at ``maxBytes``, counted here (the standard handler's check asks
    the file for its position, which would flush every record)."""

    BUFFER_BYTES = 64 << 10

    def __init__(self, filename: str | os.PathLike[str], maxBytes: int = 0, backupCount: int = 0,
                 buffered: bool = False) -> None:
        self.buffered = buffered
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._size = 0
        super().__init__(filename, maxBytes=maxBytes, backupCount=backupCount, encoding="utf-8")

    def _open(self) -> TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchmod(fd, 0o600)   # a file made by hand (or by an older version) is narrowed
            self._size = os.fstat(fd).st_size
        except OSError:
            pass
        return open(fd, "a", encoding="utf-8", errors="backslashreplace", buffering=1 << 20)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record) + "\n"
            self._pending.append(msg)
            self._pending_bytes += len(msg)
            if not self.buffered or record.levelno >= logging.WARNING \
                    or self._pending_bytes >= self.BUFFER_BYTES:
                self._write()
        except Exception:
            self.handleError(record)

    def _write(self) -> None:
        if not self._pending:
            return
        data = "".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        if self.stream is None:
            self.stream = self._open()
        if self.maxBytes > 0 and self._size and self._size + len(data) > self.maxBytes:
            self.doRollover()
            if self.stream is None:
                self.stream = self._open()
        self.stream.write(data)
        self.stream.flush()
        self._size += len(data)

    def flush(self) -> None:
        """Write the pending lines (one write(2))."""
        self.acquire()
        try:
            self._write()
        except Exception:
            pass
        finally:
            self.release()

    def close(self) -> None:
        self.flush()
        super().close()


@dataclass(frozen=True)
class AuditConfig:
    """The ``[audit]`` table of volume.toml: ``level`` (:data:`LEVELS`), ``max_bytes``
    (bytes of audit.jsonl before rotation; 0: never rotated) and ``backups`` (rotated
    files kept, at least 1)."""

    level: str = CHANGES
    max_bytes: int = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS

    @classmethod
    def from_volume(cls, volume: Volume, level: str | None = None) -> "AuditConfig":
        """The volume's config; ``level`` (the mount option) overrides its level.
        Raises VolumeError for an unknown key or a bad value."""
        raw = dict(volume.audit)
        unknown = set(raw) - {"level", "max_bytes", "backups"}
        if unknown:
            raise VolumeError(f"volume {volume.name}: unknown [audit] key {sorted(unknown)[0]!r}")
        try:
            cfg = cls(level=str(raw.get("level", CHANGES)),
                      max_bytes=int(str(raw.get("max_bytes", DEFAULT_MAX_BYTES))),
                      backups=int(str(raw.get("backups", DEFAULT_BACKUPS))))
        except (TypeError, ValueError) as exc:
            raise VolumeError(f"volume {volume.name}: bad [audit] values {raw}: {exc}") from exc
        if level is not None:
            cfg = cls(level=level, max_bytes=cfg.max_bytes, backups=cfg.backups)
        if cfg.level not in LEVELS:
            raise VolumeError(f"volume {volume.name}: audit level {cfg.level!r} is not one of {', '.join(LEVELS)}")
        if cfg.max_bytes < 0 or cfg.backups < 0:
            raise VolumeError(f"volume {volume.name}: bad [audit] values {raw}")
        if cfg.backups == 0:
            # logging.handlers.RotatingFileHandler rotates nothing with backupCount 0:
            # the log would grow without bound past max_bytes
            raise VolumeError(f"volume {volume.name}: [audit] backups = 0 keeps no rotated file and "
                              "the log would grow without bound; give 1 or more (and max_bytes = 0 "
                              "to never rotate)")
        return cfg


def open_handler(volume: Volume, cfg: AuditConfig | None = None, buffered: bool = False) -> PrivateRotatingHandler:
    """A handler writing JSON lines to ``volume``'s log/audit.jsonl (mode 0600, rotated
    at ``cfg.max_bytes`` keeping ``cfg.backups`` files; ``buffered``: see
    :class:`PrivateRotatingHandler`). The file is created (0600) now. Raises OSError."""
    cfg = cfg or AuditConfig.from_volume(volume)
    volume.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    h = PrivateRotatingHandler(volume.log_dir / AUDIT_FILE, maxBytes=cfg.max_bytes,
                               backupCount=cfg.backups, buffered=buffered)
    h.setFormatter(JsonFormatter())
    return h


def attach(volume: Volume) -> logging.Handler | None:
    """Send this process's audit events (logger "casfs.audit") to ``volume``'s audit log
    too, unless its level is ``off``; returns the handler (None when off or when the
    log cannot be opened: auditing must not make a command fail). Audit events then no
    longer reach the root logger's handlers (the command reports errors itself)."""
    try:
        cfg = AuditConfig.from_volume(volume)
        if cfg.level == OFF:
            return None
        h = open_handler(volume, cfg)
    except (OSError, VolumeError) as exc:
        logging.getLogger(__name__).warning("audit log of volume %s unavailable: %s", volume.name, exc)
        return None
    audit_log.addHandler(h)
    audit_log.setLevel(logging.INFO)
    audit_log.propagate = False
    return h


def detach(handler: logging.Handler | None) -> None:
    """Undo :func:`attach`: write out and remove ``handler`` (None: nothing to do), and let
    audit events reach the root logger again."""
    if handler is None:
        return
    audit_log.removeHandler(handler)
    handler.close()
    if not audit_log.handlers:
        audit_log.propagate = True


def event(message: str, **fields: Any) -> None:
    """Log one audit event of this process (a WARNING on "casfs.audit") with ``fields``
    (``op``, ``result``, ``path``, ...)."""
    audit_log.warning(message, extra={"audit": {"op": message, **fields}})
