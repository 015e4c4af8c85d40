"""The cloud tier's object store on Google Drive (API v3), through google-api-python-client.

Objects are plain Drive files in one folder; an object id is the Drive file id, its
properties are the file's ``appProperties``. Every call runs once (``num_retries=0``) and
Drive's errors are turned into the errors of :mod:`cas.tier.objstore` here, where they enter:
404 -> ObjectNotFound; the daily upload cap -> DailyLimit; per-minute rate limits
(``userRateLimitExceeded``/``rateLimitExceeded``), 408, 429, 5xx and network failures ->
TryAgain (with the server's Retry-After); 401, a 403 naming the credentials
(:data:`AUTH_REASONS`) and a token that cannot be refreshed -> CredentialsRefused (an
ObjectStoreError that the mount also writes to the audit log); anything else
(``storageQuotaExceeded``, bad requests) -> ObjectStoreError. The daily cap is told from rate limits by
the error's documented ``reason`` first (:func:`is_daily_limit`), by its wording only as
Drive is observed to send it: reason ``dailyLimitExceeded`` is the cap; reason
``userRateLimitExceeded`` is the cap only with the exact message "User rate limit
exceeded." (how the ~750 GB/day cap arrives); ``rateLimitExceeded`` is never the cap;
a 403 without any reason falls back to that exact message. Retrying whole calls is the caller's business
(:func:`cas.tier.objstore.retrying`), with one exception: a resumable upload resumes from the
server's received offset after a transient failure, a bounded number of times per chunk,
because starting a large upload over is expensive.

Concurrency: httplib2 is not thread-safe, so each thread gets its own service object from
the factory (``threading.local``); a request object is only ever executed on the thread
that built it. The store itself holds no other mutable state.

Client quirks handled here (google-api-python-client 2.202.0): uploads use a
``MediaIoBaseUpload`` that reports ``has_stream() == False``, so a retried chunk is re-read
from the bytes instead of re-sending an already consumed stream slice (which announces
Content-Length N, sends nothing, and hangs); a test server is reached by loading the
discovery document shipped in the wheel and rewriting its ``rootUrl``.
"""
from __future__ import annotations

import functools
import http.client
import io
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import google.auth.credentials
import google.auth.exceptions
import google_auth_httplib2
import googleapiclient
import httplib2
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account
from googleapiclient.discovery import build, build_from_document
from googleapiclient.errors import BatchError, HttpError
from googleapiclient.http import MediaIoBaseUpload, build_http

from cas.tier.objstore import (CredentialsRefused, DailyLimit, ObjectInfo, ObjectNotFound, ObjectStoreError, TryAgain,
                       retry_after_seconds, retrying)

# The client logs 'Encountered 403 Forbidden with reason "..."' for every 403 it sees,
# even with num_retries=0; each error is translated and reported here instead, so that a
# CLI error stays one line.
logging.getLogger("googleapiclient.http").setLevel(logging.ERROR)

T = TypeVar("T")
Resource = Any                    # googleapiclient.discovery.Resource (dynamically built)

SCOPE = "https://www.googleapis.com/auth/drive.file"
FOLDER_MIME = "application/vnd.google-apps.folder"
OBJECT_MIME = "application/octet-stream"
MULTIPART_MAX = 5 * 1000 * 1000   # Drive: multipart (simple) uploads up to 5 MB
CHUNK_UNIT = 256 * 1024           # resumable chunks are multiples of this (but the last)
DEFAULT_CHUNK = 8 * 1024 * 1024
DEFAULT_TIMEOUT_S = 60.0
UPLOAD_ATTEMPTS = 5               # tries per resumable-upload step before TryAgain
BATCH_MAX = 100                   # Drive: calls per batch request
DAILY_LIMIT_MESSAGE = "User rate limit exceeded."
RATE_LIMIT_REASONS = frozenset({"userRateLimitExceeded", "rateLimitExceeded"})
DAILY_LIMIT_REASON = "dailyLimitExceeded"
USER_RATE_LIMIT_REASON = "userRateLimitExceeded"
# 403 reasons that mean "these credentials may not do this" (Drive API: Resolve errors)
AUTH_REASONS = frozenset({"authError", "insufficientPermissions", "forbidden"})
FIELDS = "id,name,size,md5Checksum,sha256Checksum,createdTime,appProperties"

# What a failed call can raise besides HttpError: all of these mean "the network".
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,                      # socket timeouts, ConnectionError, EPIPE, ECONNREFUSED ...
    httplib2.HttpLib2Error,       # ServerNotFoundError, RedirectLimit ...
    http.client.HTTPException,    # IncompleteRead, BadStatusLine ...
    google.auth.exceptions.TransportError,
)
_API_ERRORS = (HttpError, google.auth.exceptions.GoogleAuthError) + _TRANSPORT_ERRORS


# -- connecting ------------------------------------------------------------------------

@functools.cache
def _discovery_document() -> dict[str, Any]:
    path = Path(googleapiclient.__file__).parent / "discovery_cache/documents/drive.v3.json"
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def build_service(endpoint: str | None, credentials: google.auth.credentials.Credentials | None,
                  timeout: float = DEFAULT_TIMEOUT_S) -> Resource:
    """A Drive v3 service object. ``endpoint``: the root URL of a Drive-compatible test
    server (``http://HOST:PORT/``), or None for Google's; ``credentials``: from
    :func:`load_credentials` (None: anonymous, only with an endpoint); ``timeout``:
    seconds per socket operation. Not thread-safe: one per thread. Raises
    ObjectStoreError when Google's service is asked for without credentials."""
    http = build_http()               # treats 308 as "resume incomplete", not a redirect
    http.timeout = timeout
    if endpoint is None and credentials is None:
        raise ObjectStoreError("Google Drive needs credentials (a token or service-account file)")
    creds = credentials or google.auth.credentials.AnonymousCredentials()
    authed = google_auth_httplib2.AuthorizedHttp(creds, http=http)
    if endpoint is not None:
        doc = {**_discovery_document(), "rootUrl": endpoint.rstrip("/") + "/"}
        return build_from_document(doc, http=authed)
    return build("drive", "v3", http=authed, static_discovery=True, cache_discovery=False)


def load_credentials(path: Path | None) -> google.auth.credentials.Credentials:
    """Credentials for scope ``drive.file`` from ``path``: an authorized-user token (as
    written after an OAuth installed-app flow) or a service-account key. None gives
    anonymous credentials (only good for a test server). Raises ObjectStoreError, one
    line, for a missing, unreadable or unrecognised file."""
    if path is None:
        return google.auth.credentials.AnonymousCredentials()
    try:
        info = json.loads(Path(path).read_text())
    except OSError as e:
        raise ObjectStoreError(f"cannot read credentials {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise CredentialsRefused(f"credentials {path} is not JSON: {e}") from None
    if not isinstance(info, dict):
        raise CredentialsRefused(f"credentials {path}: not a JSON object")
    try:
        if info.get("type") == "service_account":
            creds: google.auth.credentials.Credentials = \
                service_account.Credentials.from_service_account_info(info, scopes=[SCOPE])
            return creds
        if info.get("type") == "authorized_user" or "refresh_token" in info:
            return user_credentials.Credentials.from_authorized_user_info(info, scopes=[SCOPE])
    except (ValueError, KeyError) as e:
        raise CredentialsRefused(f"credentials {path}: {' '.join(str(e).split())}") from None
    if "installed" in info or "web" in info:
        raise CredentialsRefused(f"credentials {path} is an OAuth client-secrets file, not a "
                                 f"token: run the authorization flow first")
    raise CredentialsRefused(f"credentials {path}: neither an authorized-user token nor a "
                             f"service-account key")


def _quote(text: str) -> str:
    """``text`` as a ``q`` string literal body."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def ensure_folder(store_or_service: DriveObjectStore | Resource, name: str,
                  parent: str = "root") -> str:
    """The id of the (non-trashed) folder ``name`` in folder ``parent``, created when
    missing; of several, the oldest. Raises the :mod:`cas.tier.objstore` errors."""
    svc = (store_or_service.service() if isinstance(store_or_service, DriveObjectStore)
           else store_or_service)
    q = (f"name = '{_quote(name)}' and '{_quote(parent)}' in parents and "
         f"mimeType = '{FOLDER_MIME}' and trashed = false")
    found = _run(f"find folder {name!r}", lambda: svc.files().list(
        q=q, fields="files(id,createdTime)", pageSize=100, spaces="drive").execute(num_retries=0))
    folders = sorted(found.get("files", []), key=lambda f: (f.get("createdTime", ""), f["id"]))
    if folders:
        return str(folders[0]["id"])
    made = _run(f"create folder {name!r}", lambda: svc.files().create(
        body={"name": name, "mimeType": FOLDER_MIME, "parents": [parent]},
        fields="id").execute(num_retries=0))
    return str(made["id"])


def find_folders(service: Resource, name: str | None = None, prefix: str = "casfs-") -> list[tuple[str, str]]:
    """(id, name) of the non-trashed folders called ``name``, or, without a name, of those
    whose name starts with ``prefix``, oldest first; found without creating anything (a
    restore on a fresh machine looks for its volume's folder this way). With the
    ``drive.file`` scope Drive shows only the folders this app created. Raises the
    :mod:`cas.tier.objstore` errors."""
    cond = f"name = '{_quote(name)}'" if name else f"name contains '{_quote(prefix)}'"
    q = f"{cond} and mimeType = '{FOLDER_MIME}' and trashed = false"
    out: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        page = _run("find folders", lambda: service.files().list(
            q=q, fields="nextPageToken, files(id,name,createdTime)", pageSize=100, pageToken=token,
            spaces="drive").execute(num_retries=0))
        out += page.get("files", [])
        token = page.get("nextPageToken")
        if not token:
            break
    found = [f for f in out if name or str(f.get("name", "")).startswith(prefix)]
    found.sort(key=lambda f: (f.get("createdTime", ""), f["id"]))
    return [(str(f["id"]), str(f["name"])) for f in found]


# -- errors ----------------------------------------------------------------------------

def _error_details(content: bytes | str | None) -> tuple[str, list[str], list[str]]:
    """(message, reasons, messages) of a Drive error envelope; tolerant of other bodies."""
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else (content or "")
    try:
        err = json.loads(text)["error"]
        items = [e for e in err.get("errors") or [] if isinstance(e, dict)]
        return (str(err.get("message", "")), [str(e.get("reason", "")) for e in items],
                [str(e.get("message", "")) for e in items])
    except (ValueError, KeyError, TypeError, AttributeError):
        return text[:200], [], []


def is_daily_limit(status: int, message: str, reasons: list[str], messages: list[str]) -> bool:
    """Whether a Drive error is the daily upload cap (see the module doc): decided by the
    documented ``reason`` (``dailyLimitExceeded``; ``userRateLimitExceeded`` only with the
    exact message "User rate limit exceeded."), by the message alone only when the
    error carries no reason at all."""
    worded = DAILY_LIMIT_MESSAGE in (message, *messages)
    if DAILY_LIMIT_REASON in reasons:
        return True
    if any(reasons):
        return USER_RATE_LIMIT_REASON in reasons and worded
    return status == 403 and worded


def translate(exc: BaseException, what: str) -> ObjectStoreError:
    """The :mod:`cas.tier.objstore` error for a failed Drive call ``what`` (see module doc)."""
    if isinstance(exc, HttpError):      # ResumableUploadError included
        status = int(exc.resp.status)
        message, reasons, messages = _error_details(exc.content)
        text = " ".join(f"{what}: HTTP {status} {message or exc.resp.reason or ''}".split())
        if reasons and reasons[0]:
            text += f" ({reasons[0]})"
        retry_after = retry_after_seconds(exc.resp.get("retry-after"))
        if status == 404:
            return ObjectNotFound(text)
        if status == 401 or (status == 403 and AUTH_REASONS.intersection(reasons)):
            return CredentialsRefused(text)
        if is_daily_limit(status, message, reasons, messages):
            return DailyLimit(text)
        if (status == 403 and RATE_LIMIT_REASONS.intersection(reasons)) \
                or status in (408, 429) or status >= 500:
            return TryAgain(text, retry_after)
        return ObjectStoreError(text)
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    if isinstance(exc, google.auth.exceptions.RefreshError) and not getattr(exc, "retryable", False):
        return CredentialsRefused(f"{what}: credentials refused: {detail}")
    if isinstance(exc, _TRANSPORT_ERRORS) or isinstance(exc, google.auth.exceptions.RefreshError):
        return TryAgain(f"{what}: network error: {detail}")
    if isinstance(exc, google.auth.exceptions.GoogleAuthError):
        # e.g. a 401 answered to credentials that cannot be refreshed (InvalidOperation)
        return CredentialsRefused(f"{what}: credentials refused: {detail}")
    return ObjectStoreError(f"{what}: {detail}")


def _run(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, with Drive and transport errors translated."""
    try:
        return fn()
    except _API_ERRORS as e:
        raise translate(e, what) from e


class _SessionLost(ObjectStoreError):
    """The resumable-upload session is gone (404): only a new upload helps."""


class _BytesUpload(MediaIoBaseUpload):
    """In-memory media that the client re-reads on every (re)try: ``has_stream()`` is
    False (see the module doc for the client bug this avoids)."""

    def __init__(self, data: bytes, chunk_size: int, resumable: bool) -> None:
        super().__init__(io.BytesIO(data), OBJECT_MIME, chunksize=chunk_size, resumable=resumable)

    def has_stream(self) -> bool:
        return False


def _info(res: dict[str, Any]) -> ObjectInfo:
    created = datetime.fromisoformat(res["createdTime"]).astimezone(timezone.utc)
    return ObjectInfo(str(res["id"]), str(res.get("name", "")), int(res.get("size", 0)),
                      str(res.get("md5Checksum", "")), str(res.get("sha256Checksum", "")),
                      created, {str(k): str(v) for k, v in (res.get("appProperties") or {}).items()})


# -- the store -------------------------------------------------------------------------

class DriveObjectStore:
    """An :class:`cas.tier.objstore.ObjectStore` on the Drive folder ``folder_id``.

    ``service_factory`` builds a service (e.g. ``lambda: build_service(url, creds)``); it
    is called once per thread. Objects up to 5 MB go up in one multipart request, bigger
    ones in a resumable upload of ``chunk_size`` bytes a request (a positive multiple of
    256 KiB; default 8 MiB). A resumable upload step that fails transiently is retried
    ``upload_attempts`` times in all, resuming from the offset the server reports, with
    backoff from ``backoff_s`` doubling up to ``backoff_cap_s`` seconds (at least the
    server's Retry-After, up to the cap); then TryAgain. ``page_size``: files per list page
    (1-1000). Raises ValueError for a bad chunk or page size."""

    def __init__(self, service_factory: Callable[[], Resource], folder_id: str,
                 chunk_size: int = DEFAULT_CHUNK, *, upload_attempts: int = UPLOAD_ATTEMPTS,
                 backoff_s: float = 1.0, backoff_cap_s: float = 32.0, page_size: int = 1000) -> None:
        if chunk_size <= 0 or chunk_size % CHUNK_UNIT:
            raise ValueError(f"chunk_size must be a positive multiple of {CHUNK_UNIT}, not {chunk_size}")
        if not 1 <= page_size <= 1000:
            raise ValueError(f"page_size must be in 1..1000, not {page_size}")
        self.folder_id = folder_id
        self.chunk_size = chunk_size
        self.upload_attempts = upload_attempts
        self.backoff_s, self.backoff_cap_s = backoff_s, backoff_cap_s
        self.page_size = page_size
        self._factory = service_factory
        self._local = threading.local()
        self._services: list[Resource] = []
        self._services_lock = threading.Lock()

    def service(self) -> Resource:
        """This thread's service object (built on first use)."""
        svc = getattr(self._local, "service", None)
        if svc is None:
            svc = self._local.service = self._factory()
            with self._services_lock:
                self._services.append(svc)
        return svc

    def close(self) -> None:
        """Close the connections of every thread's service; call when no thread uses the
        store any more (a later call builds new services)."""
        with self._services_lock:
            services, self._services = self._services, []
        self._local = threading.local()
        for svc in services:
            try:
                svc.close()
            except Exception:           # closing is best effort
                pass

    def __enter__(self) -> DriveObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _check_id(object_id: str) -> None:
        if not object_id or not re.fullmatch(r"[A-Za-z0-9_-]+", object_id):
            raise ObjectNotFound(f"no object {object_id!r}")

    def put(self, name: str, data: bytes, properties: dict[str, str] | None = None) -> ObjectInfo:
        """Upload ``data`` as a new file ``name`` in the folder with ``properties`` as its
        appProperties (Drive: at most 30, key + value <= 124 bytes each); returns Drive's
        account of it (size, md5, sha256: compare them). A put retried after a lost reply
        may leave an unreferenced duplicate behind. Raises TryAgain, DailyLimit,
        ObjectStoreError (also when the folder is gone)."""
        what = f"put {name!r}"
        meta: dict[str, Any] = {"name": name, "parents": [self.folder_id], "mimeType": OBJECT_MIME}
        if properties:
            meta["appProperties"] = dict(properties)
        resumable = len(data) > MULTIPART_MAX
        request = self.service().files().create(
            body=meta, media_body=_BytesUpload(data, self.chunk_size, resumable), fields=FIELDS)
        try:
            if not resumable:
                res = _run(what, lambda: request.execute(num_retries=0))
            else:
                res = self._upload(what, request)
        except ObjectNotFound as e:
            raise ObjectStoreError(f"{e} (is folder {self.folder_id} gone?)") from e
        return _info(res)

    def _upload(self, what: str, request: Any) -> dict[str, Any]:
        """Drive a resumable upload to its end; after a failed step the client asks the
        server how much it holds (``Content-Range: bytes */N``) and goes on from there."""
        def step() -> dict[str, Any] | None:
            started = request.resumable_uri is not None
            try:
                _, body = request.next_chunk(num_retries=0)
                return body if body is None else dict(body)
            except _API_ERRORS as e:
                err = translate(e, what)
                if started and isinstance(err, ObjectNotFound):
                    raise _SessionLost(str(err)) from e
                raise err from e

        body: dict[str, Any] | None = None
        try:
            while body is None:
                body = retrying(step, self.upload_attempts, self.backoff_s, self.backoff_cap_s)
        except _SessionLost as e:
            raise TryAgain(f"{e}: upload session lost, put again") from e
        return body

    def get(self, object_id: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset + length)`` of the object (to its end when ``length`` is
        None; cut at the end; empty past it), by a ranged download. Raises
        ObjectNotFound, TryAgain, ObjectStoreError; ValueError for a negative range."""
        self._check_id(object_id)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range offset={offset} length={length}")
        if length == 0:
            self.stat(object_id)
            return b""
        request = self.service().files().get_media(fileId=object_id)
        ranged = offset > 0 or length is not None
        if ranged:
            end = "" if length is None else str(offset + length - 1)
            request.headers["Range"] = f"bytes={offset}-{end}"
        statuses: list[int] = []
        request.add_response_callback(lambda resp: statuses.append(int(resp.status)))

        def fetch() -> bytes:
            try:
                return bytes(request.execute(num_retries=0))
            except HttpError as e:
                if e.resp.status == 416:            # starts at or past the end
                    return b""
                raise

        data = _run(f"get {object_id}", fetch)
        if ranged and statuses and statuses[-1] == 200:   # the server ignored Range
            data = data[offset:] if length is None else data[offset:offset + length]
        return data

    def stat(self, object_id: str) -> ObjectInfo:
        """The object's info. Raises ObjectNotFound (also for a folder), TryAgain,
        ObjectStoreError."""
        self._check_id(object_id)
        res = _run(f"stat {object_id}", lambda: self.service().files().get(
            fileId=object_id, fields=FIELDS).execute(num_retries=0))
        if "size" not in res:
            raise ObjectNotFound(f"stat {object_id}: not an object (a folder?)")
        return _info(res)

    def delete(self, object_id: str) -> None:
        """Delete the file for good (not to the trash). Raises ObjectNotFound, TryAgain,
        ObjectStoreError."""
        self._check_id(object_id)
        _run(f"delete {object_id}", lambda: self.service().files().delete(
            fileId=object_id).execute(num_retries=0))

    def delete_many(self, object_ids: Iterable[str]) -> dict[str, Exception | None]:
        """Delete many objects with batch requests of up to 100 calls; returns, for each
        distinct id, None when deleted or the error (ObjectNotFound, TryAgain, ...) for it.
        Calls in a batch are not retried: retry the ids that got TryAgain."""
        ids = list(dict.fromkeys(object_ids))
        results: dict[str, Exception | None] = {}
        svc = self.service()
        for start in range(0, len(ids), BATCH_MAX):
            group = ids[start:start + BATCH_MAX]

            def done(request_id: str, response: Any, exception: Exception | None,
                     group: list[str] = group) -> None:
                oid = group[int(request_id)]
                results[oid] = None if exception is None else translate(exception, f"delete {oid}")

            batch = svc.new_batch_http_request(callback=done)
            for i, oid in enumerate(group):
                try:
                    self._check_id(oid)
                except ObjectNotFound as e:
                    results[oid] = e
                    continue
                batch.add(svc.files().delete(fileId=oid), request_id=str(i))
            try:
                batch.execute()
            except (BatchError, KeyError, ValueError) + _API_ERRORS as e:
                err = translate(e, f"batch delete of {len(group)}")
                for oid in group:
                    results.setdefault(oid, err)
        return results

    def list(self) -> Iterator[ObjectInfo]:
        """Every non-trashed file in the folder (folders excluded), page by page, in no
        set order. Raises TryAgain, ObjectStoreError while iterating."""
        return self._query("")

    def find(self, name: str) -> Sequence[ObjectInfo]:
        """The non-trashed files in the folder called ``name`` (one list call with
        ``name = '...'`` in ``q``). Raises TryAgain, ObjectStoreError."""
        return list(self._query(f" and name = '{_quote(name)}'"))

    def _query(self, extra: str) -> Iterator[ObjectInfo]:
        q = (f"'{_quote(self.folder_id)}' in parents and trashed = false and "
             f"mimeType != '{FOLDER_MIME}'" + extra)
        token: str | None = None
        while True:
            page = _run("list", lambda: self.service().files().list(
                q=q, fields=f"nextPageToken, files({FIELDS})", pageSize=self.page_size,
                pageToken=token, spaces="drive").execute(num_retries=0))
            for res in page.get("files", []):
                yield _info(res)
            token = page.get("nextPageToken")
            if not token:
                return
