"""The object-store interface of the cloud tier, its errors, a retry policy, and a
directory-backed implementation.

An object store holds immutable named objects (casfs packs). Object ids are opaque
strings chosen by the store on :meth:`ObjectStore.put` (Drive file ids; for
:class:`DirObjectStore` a random hex name). Every implementation must pass the
conformance suite in ``tests/engine/test_objstore.py``.

Errors an implementation raises (and nothing else for store-side conditions):

- :class:`ObjectNotFound`: the id names no object (HTTP 404);
- :class:`TryAgain`: a transient condition (HTTP 403 rate limit, 408, 429, 5xx, a dropped
  or refused connection, a timeout); ``retry_after`` is the server's Retry-After in
  seconds when it sent one;
- :class:`DailyLimit`: the store's daily upload cap is reached (Drive: reason
  ``dailyLimitExceeded``, or ``userRateLimitExceeded`` with the message "User rate limit
  exceeded."; cas.tier.drive.is_daily_limit); retrying before the cap resets is pointless, so
  callers pause;
- :class:`ObjectStoreError`: anything else (bad credentials, quota full, bad request).
"""
from __future__ import annotations

import email.utils
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, TypeVar

import tenacity

T = TypeVar("T")


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (RFC 9110 10.2.3: delta-seconds or an HTTP
    date; a decimal fraction is accepted); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


class ObjectStoreError(Exception):
    """A cloud-store failure that retrying will not cure."""


class CredentialsRefused(ObjectStoreError):
    """The store refused our credentials (HTTP 401, a 403 naming the credentials, a
    token that cannot be refreshed), or the credentials file is not usable. Logged to
    the audit log (cas.config.audit) by the mount that met it."""


class ObjectNotFound(ObjectStoreError):
    """The object id names no object (HTTP 404)."""


class TryAgain(ObjectStoreError):
    """A transient failure: rate limit (403/429), 408, 5xx, network error or timeout.

    ``retry_after``: seconds the server asked us to wait (Retry-After header), or None.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DailyLimit(ObjectStoreError):
    """The daily upload cap is reached (Drive: 403 "User rate limit exceeded.").

    Drive documents about 750 GB of uploads per user per day; retrying before the cap
    resets only adds errors, so the uploader pauses and says so.
    """


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: ``size`` in bytes, hex ``md5``/``sha256`` of its content,
    ``created`` as an aware UTC datetime, ``properties`` the app properties given at put."""

    id: str
    name: str
    size: int
    md5: str
    sha256: str
    created: datetime
    properties: dict[str, str] = field(default_factory=dict)


class ObjectStore(Protocol):
    """What the cloud tier needs of a store. All methods block; all are thread-safe."""

    def put(self, name: str, data: bytes, properties: dict[str, str] | None = None) -> ObjectInfo:
        """Store ``data`` as a new object called ``name``; return its info, whose size and
        checksums are the store's own account of what it received (compare them)."""
        ...

    def get(self, object_id: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset + length)`` of the object (to its end when ``length`` is
        None). A range past the end is cut at the end. Raises ObjectNotFound."""
        ...

    def stat(self, object_id: str) -> ObjectInfo:
        """The object's info. Raises ObjectNotFound."""
        ...

    def delete(self, object_id: str) -> None:
        """Delete the object. Raises ObjectNotFound when it does not exist."""
        ...

    def list(self) -> Iterator[ObjectInfo]:
        """Every object in the store (this store's folder), in no set order."""
        ...

    def find(self, name: str) -> Sequence[ObjectInfo]:
        """The objects called ``name`` (names need not be unique)."""
        ...


# -- retries -------------------------------------------------------------------------

BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 32.0   # Drive docs: exponential backoff capped at 32-64 s


def _wait(initial: float, cap: float) -> Callable[[tenacity.RetryCallState], float]:
    jitter = tenacity.wait_exponential_jitter(multiplier=initial, max=cap, jitter=initial)

    def wait(state: tenacity.RetryCallState) -> float:
        delay = jitter(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TryAgain) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, cap))
        return delay
    return wait


def retrying(fn: Callable[[], T], attempts: int, initial_s: float = BACKOFF_INITIAL_S,
             cap_s: float = BACKOFF_MAX_S) -> T:
    """Call ``fn`` until it returns, retrying :class:`TryAgain` up to ``attempts`` calls
    in all, with exponential backoff and jitter (``initial_s``, 2x, 4x ... capped at
    ``cap_s``) and at least the server's Retry-After. Other errors, and the last TryAgain,
    propagate."""
    r = tenacity.Retrying(stop=tenacity.stop_after_attempt(attempts),
                          wait=_wait(initial_s, cap_s),
                          retry=tenacity.retry_if_exception_type(TryAgain),
                          reraise=True)
    return r(fn)


# -- a store in a local directory ------------------------------------------------------

class DirObjectStore:
    """Objects as files ``ROOT/<id>`` plus ``ROOT/<id>.name`` holding the name and
    properties. For tests and for a second copy on another disk; not for speed."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, object_id: str) -> Path:
        if not object_id or "/" in object_id or object_id.startswith(".") or object_id.endswith(".name"):
            raise ObjectNotFound(f"no object {object_id!r}")
        return self.root / object_id

    def put(self, name: str, data: bytes, properties: dict[str, str] | None = None) -> ObjectInfo:
        oid = secrets.token_hex(16)
        props = dict(properties or {})
        side = "\n".join([name] + [f"{k}={v}" for k, v in sorted(props.items())])
        for path, content in ((self.root / f".{oid}.tmp", data), (self.root / f".{oid}.name.tmp", side.encode())):
            with open(path, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        os.rename(self.root / f".{oid}.name.tmp", self.root / f"{oid}.name")
        os.rename(self.root / f".{oid}.tmp", self.root / oid)
        return self.stat(oid)

    def get(self, object_id: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(object_id), "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {object_id!r}") from None

    def stat(self, object_id: str) -> ObjectInfo:
        path = self._path(object_id)
        try:
            data = path.read_bytes()
            side = (self.root / f"{object_id}.name").read_text().split("\n")
            st = path.stat()
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {object_id!r}") from None
        props = dict(line.split("=", 1) for line in side[1:] if "=" in line)
        return ObjectInfo(object_id, side[0], len(data), hashlib.md5(data).hexdigest(),
                          hashlib.sha256(data).hexdigest(),
                          datetime.fromtimestamp(st.st_mtime, timezone.utc), props)

    def delete(self, object_id: str) -> None:
        path = self._path(object_id)
        try:
            path.unlink()
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {object_id!r}") from None
        (self.root / f"{object_id}.name").unlink(missing_ok=True)

    def find(self, name: str) -> Sequence[ObjectInfo]:
        return [o for o in self.list() if o.name == name]

    def list(self) -> Iterator[ObjectInfo]:
        for p in self.root.iterdir():
            if p.name.startswith(".") or p.name.endswith(".name"):
                continue
            try:
                yield self.stat(p.name)
            except ObjectNotFound:
                continue


def now_utc() -> datetime:
    """The current time as an aware UTC datetime (for comparing with ObjectInfo.created)."""
    return datetime.fromtimestamp(time.time(), timezone.utc)
