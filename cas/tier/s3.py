"""The cloud tier's object store on an S3-compatible service (AWS S3, MinIO, Ceph RGW,
moto's server in the tests), through boto3.

Layout: every object is the key ``PREFIX + quote(NAME) + "/" + 32 random hex`` in one
bucket; the object id *is* the key. The random part makes every put a new object (names
need not be unique, as on Drive), and the quoted name (``urllib.parse.quote`` with no safe
characters, dots and tildes escaped too; ``~`` for the empty name) is one non-empty
segment, so :meth:`S3ObjectStore.find` is one
listing of ``PREFIX + quote(NAME) + "/"``. Properties travel as one user-metadata entry
``x-amz-meta-casfs-properties`` (percent-quoted JSON, so keys keep their case and values
may be any text; S3 allows 2 KB of user metadata per object). An id that does not lie
under the prefix, or that holds an empty, ``.`` or ``..`` path segment, names no object
of this store (ObjectNotFound without a request): a store touches only its prefix.

Integrity on PUT (AWS S3 API reference, PutObject): ``Content-MD5`` and
``x-amz-checksum-sha256`` are sent with every object; S3 refuses a body that does not
match either (``BadDigest``, treated as a transient failure: the bytes were damaged on
the way). The object's md5 is its ``ETag`` when that is 32 hex digits (a single-part PUT
without SSE-KMS); otherwise the md5 recorded in the metadata entry ``casfs-md5`` at put,
which S3 verified against the body through Content-MD5. The sha256 is the store's
``ChecksumSHA256`` (HeadObject with ``ChecksumMode=ENABLED``), "" when the store keeps
none. Objects go up in one PutObject (S3 allows 5 GiB per PUT; casfs packs are tens of
MiB), never as multipart uploads, whose ETag is not an md5.

Errors (the :mod:`cas.tier.objstore` contract), decided by the S3 error code first and
the HTTP status second (:func:`translate`):

- 404 ``NoSuchKey`` (and the body-less 404 of HeadObject) -> ObjectNotFound;
  ``NoSuchBucket`` -> ObjectStoreError (the whole store is gone, not one object);
- ``SlowDown``, ``ServiceUnavailable``, ``InternalError``, ``RequestTimeout``,
  throttling codes, ``BadDigest``, 408, 429, any 5xx, dropped or refused connections and
  timeouts -> TryAgain, with the server's Retry-After when it sent one;
- 401, and a 403 ``InvalidAccessKeyId`` / ``SignatureDoesNotMatch`` / ``AccessDenied`` /
  ``ExpiredToken`` (or a body-less 403 of HeadObject), no credentials found, a missing
  profile or an unreadable credentials file -> CredentialsRefused;
- anything else (``EntityTooLarge``, ``InvalidBucketName``, quota codes of S3-compatible
  servers) -> ObjectStoreError. S3 has no daily upload cap: DailyLimit is never raised.

Every call runs once (botocore's own retries are off: ``total_max_attempts = 1``);
retrying is the caller's business (:func:`cas.tier.objstore.retrying`), as for Drive.

Credentials come from the standard AWS chain (environment, ``~/.aws/credentials``,
``~/.aws/config``, instance roles), optionally narrowed to a ``profile`` and to a
``credentials_file`` in the AWS shared-credentials format; never from volume.toml.

Concurrency: one boto3 client, which is thread-safe (boto3 docs, "Multithreading");
its connection pool holds ``max_connections`` connections.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import json
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import boto3
import botocore.exceptions
import botocore.session
from botocore.config import Config

from cas.tier.objstore import (CredentialsRefused, ObjectInfo, ObjectNotFound, ObjectStoreError, TryAgain,
                               retry_after_seconds)

T = TypeVar("T")

DEFAULT_REGION = "us-east-1"
DEFAULT_TIMEOUT_S = 60.0
PUT_MAX = 5 * 1024 ** 3          # S3: one PutObject carries at most 5 GiB
PROPERTIES_KEY = "casfs-properties"
MD5_KEY = "casfs-md5"
OBJECT_MIME = "application/octet-stream"

NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchVersion"})
CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "InvalidSecurity", "AccountProblem",
    "AllAccessDisabled", "InvalidClientTokenId", "UnrecognizedClientException", "401", "403"})
TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException",
    "BadDigest", "XAmzContentSHA256Mismatch", "IncompleteBody", "OperationAborted"})

# What a call can raise besides ClientError that means "the network": botocore wraps
# urllib3's failures (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError,
# ConnectionClosedError, ResponseStreamingError ... are HTTPClientError or
# ConnectionError); a short body is IncompleteReadError.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.IncompleteReadError,
    OSError,
    http.client.HTTPException,
)
_CREDENTIAL_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.ProfileNotFound,
    botocore.exceptions.TokenRetrievalError,
    botocore.exceptions.UnauthorizedSSOTokenError,
)
_API_ERRORS = (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) + _TRANSPORT_ERRORS


def translate(exc: BaseException, what: str) -> ObjectStoreError:
    """The :mod:`cas.tier.objstore` error for a failed S3 call ``what`` (see the module
    doc for the table). The message is one line: ``what: HTTP status Code message``."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {}) or {}
        meta = exc.response.get("ResponseMetadata", {}) or {}
        code = str(err.get("Code", "") or "")
        status = int(meta.get("HTTPStatusCode", 0) or 0)
        if not status and code.isdigit():
            status = int(code)
        message = str(err.get("Message", "") or "")
        text = " ".join(f"{what}: HTTP {status} {code} {message}".split())
        headers = meta.get("HTTPHeaders", {}) or {}
        retry_after = retry_after_seconds(headers.get("retry-after"))
        if code == "NoSuchBucket":
            return ObjectStoreError(f"{text} (is the bucket gone?)")
        if code in NOT_FOUND_CODES or (status == 404 and not code):
            return ObjectNotFound(text)
        if status == 401 or (status == 403 and (code in CREDENTIAL_CODES or not code)):
            return CredentialsRefused(text)
        if code in TRANSIENT_CODES or status in (408, 429) or status >= 500:
            return TryAgain(text, retry_after)
        return ObjectStoreError(text)
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return CredentialsRefused(f"{what}: credentials refused: {detail}")
    if isinstance(exc, _TRANSPORT_ERRORS):
        return TryAgain(f"{what}: network error: {detail}")
    return ObjectStoreError(f"{what}: {detail}")


def _run(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, with S3, botocore and transport errors translated."""
    try:
        return fn()
    except _API_ERRORS as e:
        raise translate(e, what) from e


EMPTY_NAME = "~"     # the key segment of the empty name (a quoted name never holds "~")


def quote_name(name: str) -> str:
    """``name`` as one non-empty key segment: percent-quoted with no safe characters,
    dots and tildes too (so no segment is empty, ``.`` or ``..``, and none holds ``/``);
    the empty name is ``~``."""
    return quote(name, safe="").replace(".", "%2E").replace("~", "%7E") or EMPTY_NAME


def unquote_name(segment: str) -> str:
    """The name whose key segment is ``segment`` (the inverse of :func:`quote_name`)."""
    return "" if segment == EMPTY_NAME else unquote(segment)


def make_client(endpoint_url: str | None = None, region: str = DEFAULT_REGION, *,
                profile: str | None = None, credentials_file: Path | None = None,
                timeout_s: float = DEFAULT_TIMEOUT_S, max_connections: int = 32) -> Any:
    """A boto3 S3 client. ``endpoint_url``: an S3-compatible server (``http://HOST:PORT``;
    path-style addressing), None for AWS; ``profile``: a profile of the AWS config files;
    ``credentials_file``: an AWS shared-credentials file used instead of
    ``~/.aws/credentials`` (environment variables still come first, as in every AWS
    tool); ``timeout_s``: seconds per connect and per socket read. Raises
    CredentialsRefused when the credentials file cannot be read or the profile does not
    exist."""
    bs = botocore.session.Session()
    if credentials_file is not None:
        try:
            with open(credentials_file, "rb"):
                pass
        except OSError as exc:
            raise CredentialsRefused(f"S3 credentials file {credentials_file}: {exc.strerror or exc}") from exc
        bs.set_config_variable("credentials_file", str(credentials_file))
    if profile:
        bs.set_config_variable("profile", profile)
    config = Config(
        retries={"total_max_attempts": 1},       # retrying is the caller's (objstore.retrying)
        connect_timeout=timeout_s, read_timeout=timeout_s, max_pool_connections=max_connections,
        signature_version="s3v4",
        # checksums are sent explicitly on PUT; no CRC32 trailers that S3-compatible
        # servers may not speak
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
        s3={"addressing_style": "path" if endpoint_url else "auto"})
    try:
        session = boto3.session.Session(botocore_session=bs, region_name=region or DEFAULT_REGION)
        return session.client("s3", endpoint_url=endpoint_url or None, config=config)
    except botocore.exceptions.ProfileNotFound as exc:
        raise CredentialsRefused(f"S3 credentials: {exc}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise ObjectStoreError(f"S3 client: {exc}") from exc


def _b64_to_hex(value: str | None) -> str:
    if not value or "-" in value:           # "-N": a composite (multipart) checksum
        return ""
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        return ""


class S3ObjectStore:
    """An :class:`cas.tier.objstore.ObjectStore` on the keys under ``prefix`` in
    ``bucket`` (see the module doc for the layout, integrity and errors).

    ``client``: from :func:`make_client`. ``prefix``: "" or a string ending in ``/``
    (one is added otherwise). ``list_workers``: HeadObject calls in flight while
    listing (a listing returns neither properties nor checksums, so every listed object
    costs one HEAD)."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", *, list_workers: int = 8) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.list_workers = max(1, list_workers)

    def close(self) -> None:
        """Close the client's connections (a later call reopens them)."""
        try:
            self.client.close()
        except Exception:           # closing is best effort
            pass

    def __enter__(self) -> S3ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys ------------------------------------------------------------------------
    def _rest(self, key: str) -> str | None:
        """The part of ``key`` after the prefix, or None when ``key`` is not an object
        id of this store."""
        if not key.startswith(self.prefix):
            return None
        rest = key[len(self.prefix):]
        if not rest or any(seg in ("", ".", "..") for seg in rest.split("/")):
            return None
        return rest

    def _check_id(self, object_id: str) -> None:
        if not isinstance(object_id, str) or self._rest(object_id) is None:
            raise ObjectNotFound(f"no object {object_id!r}")

    def _name_of(self, key: str) -> str:
        rest = self._rest(key) or key
        m = re.fullmatch(r"([^/]*)/[0-9a-f]{32}", rest)
        return unquote_name(m.group(1)) if m else rest

    # -- bucket ----------------------------------------------------------------------
    def ensure_bucket(self, create: bool = False, region: str = DEFAULT_REGION) -> bool:
        """Check that the bucket exists and these credentials reach it; with ``create``,
        create it when it does not exist (in ``region``). Returns True when it was
        created. Raises ObjectStoreError (no such bucket), CredentialsRefused, TryAgain."""
        try:
            _run(f"bucket {self.bucket}", lambda: self.client.head_bucket(Bucket=self.bucket))
            return False
        except ObjectNotFound:
            if not create:
                raise ObjectStoreError(f"bucket {self.bucket} does not exist (create it, or give "
                                       "--create-bucket)") from None
        kw: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != DEFAULT_REGION:
            kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
        _run(f"create bucket {self.bucket}", lambda: self.client.create_bucket(**kw))
        return True

    # -- the ObjectStore interface ---------------------------------------------------
    def put(self, name: str, data: bytes, properties: dict[str, str] | None = None) -> ObjectInfo:
        """Store ``data`` as a new object ``name`` (one PutObject with Content-MD5 and
        x-amz-checksum-sha256, then a HeadObject: the returned info is the store's account
        of what it holds). A put retried after a lost reply may leave an unreferenced
        duplicate behind (gc's orphan sweep removes it). Raises TryAgain,
        CredentialsRefused, ObjectStoreError (also for more than 5 GiB, or a missing
        bucket)."""
        if len(data) > PUT_MAX:
            raise ObjectStoreError(f"put {name!r}: {len(data)} bytes is more than one S3 PUT takes ({PUT_MAX})")
        key = f"{self.prefix}{quote_name(name)}/{secrets.token_hex(16)}"
        md5 = hashlib.md5(data)
        sha = hashlib.sha256(data)
        metadata = {PROPERTIES_KEY: quote(json.dumps(dict(properties or {}), sort_keys=True), safe=""),
                    MD5_KEY: md5.hexdigest()}
        _run(f"put {name!r}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, ContentType=OBJECT_MIME, Metadata=metadata,
            ContentMD5=base64.b64encode(md5.digest()).decode(),
            ChecksumAlgorithm="SHA256", ChecksumSHA256=base64.b64encode(sha.digest()).decode()))
        return self.stat(key)

    def get(self, object_id: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset + length)`` of the object (to its end when ``length`` is
        None; cut at the end; empty past it), by a ranged GetObject (``Range: bytes=A-B``;
        a 416 means the range starts at or past the end). Raises ObjectNotFound, TryAgain,
        CredentialsRefused, ObjectStoreError; ValueError for a negative range."""
        self._check_id(object_id)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range offset={offset} length={length}")
        if length == 0:
            self.stat(object_id)
            return b""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": object_id}
        ranged = offset > 0 or length is not None
        if ranged:
            end = "" if length is None else str(offset + length - 1)
            kw["Range"] = f"bytes={offset}-{end}"

        def fetch() -> tuple[int, bytes]:
            try:
                resp = self.client.get_object(**kw)
            except botocore.exceptions.ClientError as e:
                status = int((e.response.get("ResponseMetadata") or {}).get("HTTPStatusCode", 0) or 0)
                if status == 416 or (e.response.get("Error") or {}).get("Code") == "InvalidRange":
                    return 206, b""
                raise
            body = resp["Body"]
            try:
                return int(resp["ResponseMetadata"]["HTTPStatusCode"]), bytes(body.read())
            finally:
                body.close()

        status, data = _run(f"get {object_id}", fetch)
        if ranged and status == 200:            # the server ignored Range
            data = data[offset:] if length is None else data[offset:offset + length]
        return data

    def stat(self, object_id: str) -> ObjectInfo:
        """The object's info from one HeadObject. Raises ObjectNotFound, TryAgain,
        CredentialsRefused, ObjectStoreError."""
        self._check_id(object_id)
        head = _run(f"stat {object_id}", lambda: self.client.head_object(
            Bucket=self.bucket, Key=object_id, ChecksumMode="ENABLED"))
        return self._info(object_id, head)

    def _info(self, key: str, head: dict[str, Any]) -> ObjectInfo:
        metadata = {str(k).lower(): str(v) for k, v in (head.get("Metadata") or {}).items()}
        etag = str(head.get("ETag", "")).strip('"').lower()
        md5 = etag if re.fullmatch(r"[0-9a-f]{32}", etag) else metadata.get(MD5_KEY, "")
        try:
            props = json.loads(unquote(metadata.get(PROPERTIES_KEY, ""))) if PROPERTIES_KEY in metadata else {}
            if not isinstance(props, dict):
                props = {}
        except ValueError:
            props = {}
        created = head.get("LastModified")
        if not isinstance(created, datetime):
            created = datetime.fromtimestamp(0, timezone.utc)
        created = created.astimezone(timezone.utc)
        return ObjectInfo(key, self._name_of(key), int(head.get("ContentLength", 0)), md5,
                          _b64_to_hex(head.get("ChecksumSHA256")), created,
                          {str(k): str(v) for k, v in props.items()})

    def delete(self, object_id: str) -> None:
        """Delete the object (a HeadObject first: S3's DeleteObject answers 204 for a
        missing key too, and the interface says ObjectNotFound). Raises ObjectNotFound,
        TryAgain, CredentialsRefused, ObjectStoreError."""
        self.stat(object_id)
        _run(f"delete {object_id}", lambda: self.client.delete_object(Bucket=self.bucket, Key=object_id))

    def list(self) -> Iterator[ObjectInfo]:
        """Every object under the prefix (keys ending in ``/``, e.g. console folder
        markers, excluded), page by page (ListObjectsV2, 1,000 keys a page), each with
        one HeadObject (``list_workers`` at a time). Raises TryAgain, CredentialsRefused,
        ObjectStoreError while iterating."""
        return self._listing(self.prefix)

    def find(self, name: str) -> Sequence[ObjectInfo]:
        """The objects called ``name``: one listing of ``PREFIX + quote(name) + "/"``.
        Raises TryAgain, CredentialsRefused, ObjectStoreError."""
        return [o for o in self._listing(f"{self.prefix}{quote_name(name)}/") if o.name == name]

    def _listing(self, prefix: str) -> Iterator[ObjectInfo]:
        pool = ThreadPoolExecutor(self.list_workers, thread_name_prefix="s3-list")
        try:
            token: str | None = None
            while True:
                kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
                if token:
                    kw["ContinuationToken"] = token
                page = _run("list", lambda: self.client.list_objects_v2(**kw))
                keys = [str(o["Key"]) for o in page.get("Contents", []) if self._rest(str(o["Key"])) is not None]
                for info in pool.map(self._stat_if_there, keys):
                    if info is not None:
                        yield info
                if not page.get("IsTruncated"):
                    return
                token = page.get("NextContinuationToken")
                if not token:
                    return
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def prefixes(self, start: str = "") -> Sequence[str]:
        """The key prefixes just below this store's prefix that begin with ``start``, up
        to and including the next ``/`` (ListObjectsV2 with a ``/`` delimiter: the
        ``casfs-<uuid>/`` prefixes of the volumes in a bucket). Raises TryAgain,
        CredentialsRefused, ObjectStoreError."""
        found: list[str] = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + start, "Delimiter": "/"}
            if token:
                kw["ContinuationToken"] = token
            page = _run(f"list {self.bucket}", lambda: self.client.list_objects_v2(**kw))
            found += [str(p["Prefix"]) for p in page.get("CommonPrefixes", [])]
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return found

    def _stat_if_there(self, key: str) -> ObjectInfo | None:
        try:
            return self.stat(key)
        except ObjectNotFound:               # deleted between the listing and the HEAD
            return None


def open_store(bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str = DEFAULT_REGION,
               profile: str | None = None, credentials_file: Path | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> S3ObjectStore:
    """An S3ObjectStore on ``bucket``/``prefix`` with a client from :func:`make_client`.
    Raises CredentialsRefused, ObjectStoreError."""
    client = make_client(endpoint_url, region, profile=profile, credentials_file=credentials_file,
                         timeout_s=timeout_s)
    return S3ObjectStore(client, bucket, prefix)
