"""drivesim: a local HTTP server speaking enough of the Google Drive v3 wire protocol for
the unmodified google-api-python-client, with fault injection, for tests and offline trials.

What it serves (paths under the discovery document's ``rootUrl``):

- ``POST /drive/v3/files``: create a folder or an empty file (JSON metadata, no media);
- ``POST /upload/drive/v3/files?uploadType=multipart|media|resumable``: uploads; a
  resumable session answers its start with 200 + ``Location``, each chunk ``PUT`` with
  308 + ``Range: bytes=0-N`` or, when complete, 200 + the file; ``Content-Range:
  bytes */TOTAL`` asks for the status. Like Google's servers, a non-final chunk is kept
  only up to a multiple of 256 KiB, and a connection lost in the middle of a chunk keeps
  the 256 KiB-aligned part received so far;
- ``GET /drive/v3/files`` (list: ``q``, ``pageSize``, ``pageToken``, ``fields``),
  ``GET /drive/v3/files/ID`` (get, or ``alt=media`` with ``Range: bytes=S-E``),
  ``PATCH /drive/v3/files/ID`` (name, appProperties, trashed), ``DELETE /drive/v3/files/ID``;
- ``POST /batch/drive/v3``: ``multipart/mixed`` of up to 100 ``application/http`` calls.

``q`` understands ``name = '...'`` (also ``!=``, ``contains``), ``mimeType = / != '...'``,
``trashed = true|false``, ``'ID' in parents``, ``appProperties has { key='k' and
value='v' }``, joined with ``and`` / ``or`` / ``not`` and parentheses; ``\\'`` quotes a
quote. Errors use Drive's envelope ``{"error": {"code", "message", "errors": [{"domain",
"reason", "message"}]}}``. A request body shorter than its Content-Length is answered with
408 after ``body_timeout`` seconds of silence instead of hanging.

Files live in memory, or with ``data_dir`` as ``DIR/blobs/ID`` plus ``DIR/index.json`` so an
offline trial survives a restart (upload sessions do not: a client resuming one after a
restart gets 404 and must start over, as with an expired Drive session).

Faults (:meth:`DriveSim.inject`), each request taking at most one, the first matching:

- ``rate_limit``: 403 ``userRateLimitExceeded`` "User Rate Limit Exceeded";
- ``too_many``: 429 ``rateLimitExceeded`` with Retry-After (1 s unless given);
- ``server_error``: 503 ``backendError`` (``status=500`` for a 500);
- ``daily_limit``: 403 ``userRateLimitExceeded`` "User rate limit exceeded." (the daily cap);
- ``quota``: 403 ``storageQuotaExceeded``;
- ``drop``: read the request (or only ``after_bytes`` of its body) and close the
  connection without answering; nothing is processed (but see the chunk rule above);
- ``slow``: wait ``delay`` seconds, then answer normally.

The error kinds also apply to single calls inside a batch; ``drop`` and ``slow`` only to
whole HTTP requests. Run ``python -m tools.drivesim --help`` for the command line.
"""
from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import logging
import os
import random
import re
import secrets
import signal
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

log = logging.getLogger("drivesim")

FOLDER_MIME = "application/vnd.google-apps.folder"
CHUNK_ALIGN = 256 * 1024          # resumable chunks are kept in multiples of this
MAX_BATCH = 100                   # calls per batch request
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
APP_PROPERTY_BYTES = 124          # key + value, UTF-8
APP_PROPERTIES_MAX = 30

KINDS = ("create", "list", "get", "download", "update", "delete", "batch", "upload_multipart",
         "upload_media", "upload_start", "upload_chunk", "upload_status", "other")
FAULT_KINDS = ("rate_limit", "too_many", "server_error", "daily_limit", "quota", "drop", "slow")
_DEFAULT_FIELDS = "kind,id,name,mimeType"


# -- replies and errors ----------------------------------------------------------------

@dataclass
class _Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class _ApiError(Exception):
    """A Drive error reply: raised anywhere in request handling, turned into the envelope."""

    def __init__(self, status: int, reason: str, message: str, domain: str = "global",
                 retry_after: float | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.domain = status, reason, message, domain
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = _fmt_seconds(retry_after)

    def reply(self) -> _Reply:
        env = {"error": {"code": self.status, "message": self.message,
                         "errors": [{"domain": self.domain, "reason": self.reason,
                                     "message": self.message}]}}
        return _json_reply(self.status, env, self.headers)


def _fmt_seconds(s: float) -> str:
    return str(int(s)) if float(s).is_integer() else repr(float(s))


def _json_reply(status: int, obj: Any, headers: dict[str, str] | None = None) -> _Reply:
    h = {"Content-Type": "application/json; charset=UTF-8", **(headers or {})}
    return _Reply(status, json.dumps(obj).encode(), h)


def _not_found(file_id: str) -> _ApiError:
    return _ApiError(404, "notFound", f"File not found: {file_id}.")


def _bad_request(message: str, reason: str = "badRequest") -> _ApiError:
    return _ApiError(400, reason, message)


# -- field masks: "nextPageToken, files(id,name)", "files/id", "*" -----------------------

Mask = dict[str, "Mask | None"]


def parse_fields(text: str) -> Mask:
    """Parse a Drive ``fields`` mask into a tree (a None leaf selects the whole value):
    ``a,b(c,d),e/f`` -> ``{"a": None, "b": {"c": None, "d": None}, "e": {"f": None}}``."""
    pos = 0
    name_re = re.compile(r"\s*([A-Za-z_*][A-Za-z0-9_]*)\s*")

    def fail() -> _ApiError:
        return _bad_request(f"Invalid field selection {text}", "invalidParameter")

    def item(out: Mask) -> None:
        nonlocal pos
        m = name_re.match(text, pos)
        if not m:
            raise fail()
        name, pos = m.group(1), m.end()
        sub: Mask | None = None
        if text.startswith("(", pos):
            pos += 1
            sub = items()
            if not text.startswith(")", pos):
                raise fail()
            pos += 1
        elif text.startswith("/", pos):
            pos += 1
            sub = {}
            item(sub)
        out[name] = _merge(out[name], sub) if name in out else sub
        while pos < len(text) and text[pos].isspace():
            pos += 1

    def items() -> Mask:
        nonlocal pos
        out: Mask = {}
        item(out)
        while text.startswith(",", pos):
            pos += 1
            item(out)
        return out

    mask = items()
    if pos != len(text):
        raise fail()
    return mask


def _merge(a: Mask | None, b: Mask | None) -> Mask | None:
    if a is None or b is None:
        return None
    return {**a, **{k: _merge(a[k], v) if k in a else v for k, v in b.items()}}


def apply_fields(obj: dict[str, Any], mask: Mask | None) -> dict[str, Any]:
    """Keep only the parts of ``obj`` that ``mask`` selects."""
    if mask is None or "*" in mask:
        return obj
    out: dict[str, Any] = {}
    for key, sub in mask.items():
        if key not in obj:
            continue
        value = obj[key]
        if sub is not None and isinstance(value, list):
            value = [apply_fields(v, sub) if isinstance(v, dict) else v for v in value]
        elif sub is not None and isinstance(value, dict):
            value = apply_fields(value, sub)
        out[key] = value
    return out


# -- the q language --------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<op>!=|=|\(|\)|\{|\})"
                    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*))")
Predicate = Callable[[dict[str, Any]], bool]


def parse_query(q: str, root_id: str) -> Predicate:
    """Compile a files.list ``q`` into a predicate over file records (see module doc)."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(q):
        m = _TOKEN.match(q, pos)
        if not m or m.end() == pos:
            if q[pos:].strip() == "":
                break
            raise _invalid_q()
        pos = m.end()
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "str":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        tokens.append((kind, value))
    i = 0

    def peek(value: str | None = None) -> bool:
        return i < len(tokens) and (value is None or tokens[i][1] == value) and tokens[i][0] != "str"

    def take(kind: str | None = None, value: str | None = None) -> str:
        nonlocal i
        if i >= len(tokens) or (kind and tokens[i][0] != kind) or (value and tokens[i][1] != value):
            raise _invalid_q()
        i += 1
        return tokens[i - 1][1]

    def expr() -> Predicate:
        terms = [term()]
        while peek("or"):
            take()
            terms.append(term())
        return terms[0] if len(terms) == 1 else (lambda f: any(t(f) for t in terms))

    def term() -> Predicate:
        factors = [factor()]
        while peek("and"):
            take()
            factors.append(factor())
        return factors[0] if len(factors) == 1 else (lambda f: all(p(f) for p in factors))

    def factor() -> Predicate:
        if peek("not"):
            take()
            inner = factor()
            return lambda f: not inner(f)
        if peek("("):
            take()
            inner = expr()
            take("op", ")")
            return inner
        if i < len(tokens) and tokens[i][0] == "str":
            parent = take("str")
            take("word", "in")
            take("word", "parents")
            parent = root_id if parent == "root" else parent
            return lambda f: parent in f.get("parents", [])
        name = take("word")
        if name in ("appProperties", "properties"):
            take("word", "has")
            take("op", "{")
            take("word", "key")
            take("op", "=")
            key = take("str")
            take("word", "and")
            take("word", "value")
            take("op", "=")
            value = take("str")
            take("op", "}")
            return lambda f: f.get(name, {}).get(key) == value
        op = take()
        if name == "trashed" and op in ("=", "!="):
            flag = take("word")
            if flag not in ("true", "false"):
                raise _invalid_q()
            want = (flag == "true") == (op == "=")
            return lambda f: bool(f.get("trashed")) == want
        if name in ("name", "mimeType") and op in ("=", "!="):
            value = take("str")
            eq = op == "="
            return lambda f: (f.get(name) == value) == eq
        if name == "name" and op == "contains":
            value = take("str")
            return lambda f: any(w.startswith(value) for w in [f["name"], *f["name"].split()])
        raise _invalid_q()

    if not tokens:
        return lambda f: True
    pred = expr()
    if i != len(tokens):
        raise _invalid_q()
    return pred


def _invalid_q() -> _ApiError:
    return _ApiError(400, "invalid", "Invalid Value")


# -- multipart bodies ------------------------------------------------------------------

def _boundary(content_type: str) -> bytes:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise _bad_request("Missing boundary in multipart content type")
    return m.group(1).encode()


def split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    """The parts of a MIME multipart body. Line ends (LF, as the Google client writes, or
    CRLF) are taken from the first delimiter line, so binary content keeps its bytes."""
    delim = b"--" + boundary
    start = body.find(delim)
    if start < 0:
        raise _bad_request("Malformed multipart body")
    eol = body.find(b"\n", start)
    nl = b"\r\n" if eol > 0 and body[eol - 1:eol] == b"\r" else b"\n"
    parts, pos = [], start + len(delim)
    while not body.startswith(b"--", pos):
        eol = body.find(b"\n", pos)
        if eol < 0:
            raise _bad_request("Malformed multipart body")
        pos = eol + 1
        end = body.find(nl + delim, pos - len(nl))
        if end < 0:
            raise _bad_request("Malformed multipart body")
        parts.append(body[pos:max(end, pos)])
        pos = end + len(nl) + len(delim)
    return parts


def split_head(part: bytes) -> tuple[dict[str, str], bytes]:
    """Split a MIME part or an HTTP message into (lower-cased headers, body)."""
    m = re.search(rb"\r?\n\r?\n", part)
    head, body = (part[:m.start()], part[m.end():]) if m else (part, b"")
    headers: dict[str, str] = {}
    last = ""
    for line in head.decode("utf-8", "replace").splitlines():
        if line[:1] in (" ", "\t") and last:
            headers[last] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            last = key.strip().lower()
            headers[last] = value.strip()
    return headers, body


# -- faults and counters ---------------------------------------------------------------

@dataclass
class Fault:
    """One injected fault; see :meth:`DriveSim.inject`. ``fired`` counts its uses."""

    kind: str
    times: int | None = None
    probability: float | None = None
    match: str | None = None
    retry_after: float | None = None
    delay: float = 0.5
    status: int | None = None
    after_bytes: int | None = None
    skip: int = 0
    fired: int = 0
    seen: int = 0

    def matches(self, kind: str, target: str) -> bool:
        if self.match is None:
            return True
        if self.match in KINDS:
            return self.match == kind
        return re.search(self.match, target) is not None

    def error(self) -> _ApiError:
        ra = self.retry_after
        if self.kind == "rate_limit":
            return _ApiError(403, "userRateLimitExceeded", "User Rate Limit Exceeded", "usageLimits", ra)
        if self.kind == "too_many":
            return _ApiError(429, "rateLimitExceeded", "Rate Limit Exceeded", "usageLimits",
                             1.0 if ra is None else ra)
        if self.kind == "daily_limit":
            return _ApiError(403, "userRateLimitExceeded", "User rate limit exceeded.", "usageLimits", ra)
        if self.kind == "quota":
            return _ApiError(403, "storageQuotaExceeded",
                             "The user's Drive storage quota has been exceeded.", "usageLimits")
        if self.status == 500:
            return _ApiError(500, "internalError", "Internal Error", "global", ra)
        return _ApiError(self.status or 503, "backendError", "Service Unavailable", "global", ra)


@dataclass(frozen=True)
class SimCounters:
    """A snapshot of the server's counters.

    ``requests``: HTTP requests (and calls inside batches) per kind (see ``KINDS``), faulted
    ones included; ``faults``: faults fired per fault kind; ``files_created``: files and
    folders created; ``created_by_name``: the same per name; ``bytes_uploaded``: media bytes
    in completed uploads; ``bytes_received``: body bytes of upload calls read off the wire
    (multipart envelopes included), re-sent and abandoned ones too; ``uploads_started``:
    resumable sessions opened."""

    requests: dict[str, int]
    faults: dict[str, int]
    files_created: int
    created_by_name: dict[str, int]
    bytes_uploaded: int
    bytes_received: int
    uploads_started: int


@dataclass
class _Session:
    metadata: dict[str, Any]
    fields: str | None
    total: int | None
    buf: bytearray = field(default_factory=bytearray)
    done_id: str | None = None


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    host: str


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _new_id() -> str:
    return "1" + secrets.token_urlsafe(24)


def _parse_content_range(value: str) -> tuple[int | None, int | None, int | None]:
    """``bytes a-b/T`` -> (a, b, T); ``bytes */T`` -> (None, None, T); ``*`` totals -> None."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value)
    if not m:
        raise _bad_request(f"Invalid Content-Range: {value}")
    a, b, t = m.groups()
    return (None if a is None else int(a), None if b is None else int(b),
            None if t == "*" else int(t))


# -- the server ------------------------------------------------------------------------

class DriveSim:
    """A Drive v3 test server on ``host:port`` (port 0: any free port), in a thread.

    ``data_dir``: keep files on disk there (None: in memory). ``seed`` seeds the random
    choices of probabilistic faults. ``body_timeout``: seconds of silence after which a
    request body shorter than its Content-Length gets 408. Thread-safe."""

    def __init__(self, data_dir: Path | None = None, host: str = "127.0.0.1", port: int = 0,
                 *, seed: int | None = None, body_timeout: float = 1.0) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.host, self.port = host, port
        self.body_timeout = body_timeout
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._files: dict[str, dict[str, Any]] = {}
        self._blobs: dict[str, bytes] = {}
        self._sessions: dict[str, _Session] = {}
        self._faults: list[Fault] = []
        self._requests: Counter[str] = Counter()
        self._fault_counts: Counter[str] = Counter()
        self._by_name: Counter[str] = Counter()
        self._bytes_uploaded = self._bytes_received = self._uploads_started = 0
        self._seq = 0
        self._root_id = _new_id()
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        if self.data_dir is not None:
            self._load()

    # -- lifecycle

    def start(self) -> DriveSim:
        """Bind and serve in a background thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("drivesim already started")
        self._stopping.clear()
        self._httpd = _Server((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="drivesim",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every open connection, and join all server threads."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()          # joins the handler threads
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> DriveSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://HOST:PORT/``: the ``rootUrl`` to put in the discovery document."""
        if self._httpd is None:
            raise RuntimeError("drivesim not started")
        return f"http://{self.host}:{self.port}/"

    # -- inspection

    @property
    def root_id(self) -> str:
        """The id that the alias ``root`` stands for."""
        return self._root_id

    def files(self) -> list[dict[str, Any]]:
        """Every file and folder (folders: ``mimeType == FOLDER_MIME``, no ``size``), as
        full Drive file JSON, in creation order."""
        with self._lock:
            files = [self._public(f) for f in sorted(self._files.values(), key=lambda f: f["_seq"])]
            return copy.deepcopy(files)

    def file_bytes(self, file_id: str) -> bytes:
        """The content of file ``file_id``. Raises KeyError when there is none."""
        with self._lock:
            if file_id not in self._files:
                raise KeyError(file_id)
            return self._read_blob(file_id)

    @property
    def counters(self) -> SimCounters:
        """A snapshot of the counters (see :class:`SimCounters`)."""
        with self._lock:
            return SimCounters(dict(self._requests), dict(self._fault_counts),
                               sum(self._by_name.values()), dict(self._by_name),
                               self._bytes_uploaded, self._bytes_received, self._uploads_started)

    # -- faults

    def inject(self, kind: str, *, times: int | None = None, probability: float | None = None,
               match: str | None = None, retry_after: float | None = None, delay: float = 0.5,
               status: int | None = None, after_bytes: int | None = None, skip: int = 0) -> Fault:
        """Add a fault of ``kind`` (one of ``FAULT_KINDS``, see the module doc).

        It lets the first ``skip`` matching requests pass, then fires on the next ``times``,
        or on each with ``probability`` (both: at most ``times`` times; neither: once).
        ``match``: a request kind from ``KINDS`` or a regex searched in ``"METHOD /path"``;
        None matches everything.
        ``retry_after`` (seconds) adds a Retry-After header to error replies; ``delay``
        (seconds) is the wait of ``slow``; ``status`` picks 500 or 503 for ``server_error``;
        ``after_bytes`` makes ``drop`` close after reading that many body bytes. Raises
        ValueError for an unknown kind."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if times is None and probability is None:
            times = 1
        fault = Fault(kind, times, probability, match, retry_after, delay, status, after_bytes, skip)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, kind: str, target: str, in_batch: bool = False) -> Fault | None:
        with self._lock:
            self._requests[kind] += 1
            for fault in self._faults:
                if in_batch and fault.kind in ("drop", "slow"):
                    continue
                if not fault.matches(kind, target):
                    continue
                fault.seen += 1
                if fault.seen <= fault.skip:
                    continue
                if fault.times is not None and fault.fired >= fault.times:
                    continue
                if fault.probability is not None and self._rng.random() >= fault.probability:
                    continue
                fault.fired += 1
                self._fault_counts[fault.kind] += 1
                return fault
        return None

    # -- storage

    def _public(self, f: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in f.items() if not k.startswith("_")}

    def _load(self) -> None:
        assert self.data_dir is not None
        (self.data_dir / "blobs").mkdir(parents=True, exist_ok=True)
        index = self.data_dir / "index.json"
        if index.exists():
            state = json.loads(index.read_text())
            self._root_id, self._seq = state["root"], state["seq"]
            self._files = {f["id"]: f for f in state["files"]}

    def _save(self) -> None:
        if self.data_dir is None:
            return
        tmp = self.data_dir / "index.json.tmp"
        tmp.write_text(json.dumps({"root": self._root_id, "seq": self._seq,
                                   "files": list(self._files.values())}))
        os.replace(tmp, self.data_dir / "index.json")

    def _read_blob(self, file_id: str) -> bytes:
        if self.data_dir is None:
            return self._blobs.get(file_id, b"")
        path = self.data_dir / "blobs" / file_id
        return path.read_bytes() if path.exists() else b""

    def _add_file(self, meta: dict[str, Any], content: bytes | None) -> dict[str, Any]:
        """Create a file (``content`` None: a folder) from request metadata."""
        if not isinstance(meta, dict):
            raise _bad_request("Invalid metadata")
        name = str(meta.get("name") or "Untitled")
        mime = str(meta.get("mimeType") or "application/octet-stream")
        folder = mime == FOLDER_MIME
        props = meta.get("appProperties") or {}
        if not isinstance(props, dict) or len(props) > APP_PROPERTIES_MAX:
            raise _bad_request(f"At most {APP_PROPERTIES_MAX} appProperties per file")
        for k, v in props.items():
            size = len(str(k).encode()) + len(str(v).encode())
            if size > APP_PROPERTY_BYTES:
                raise _bad_request(f"Property key-value pair {k!r} is {size} bytes, "
                                   f"more than {APP_PROPERTY_BYTES}", "invalid")
        with self._lock:
            parents = [self._root_id if p == "root" else str(p)
                       for p in meta.get("parents") or ["root"]]
            for p in parents:
                if p != self._root_id and self._files.get(p, {}).get("mimeType") != FOLDER_MIME:
                    raise _not_found(p)
            self._seq += 1
            now = _now()
            f: dict[str, Any] = {"kind": "drive#file", "id": _new_id(), "name": name,
                                 "mimeType": mime,
                                 "parents": parents, "createdTime": now, "modifiedTime": now,
                                 "trashed": False, "_seq": self._seq}
            if props:
                f["appProperties"] = {str(k): str(v) for k, v in props.items()}
            if not folder:
                data = content or b""
                f.update(size=str(len(data)), md5Checksum=hashlib.md5(data).hexdigest(),
                         sha256Checksum=hashlib.sha256(data).hexdigest())
                if self.data_dir is None:
                    self._blobs[f["id"]] = data
                else:
                    tmp = self.data_dir / "blobs" / f".{f['id']}.tmp"
                    tmp.write_bytes(data)
                    os.replace(tmp, self.data_dir / "blobs" / f["id"])
                self._bytes_uploaded += len(data)
            self._files[f["id"]] = f
            self._by_name[name] += 1
            self._save()
            return f

    def _file(self, file_id: str) -> dict[str, Any]:
        f = self._files.get(file_id)
        if f is None:
            raise _not_found(file_id)
        return f

    # -- request handling (called by _Handler, on handler threads)

    def _dispatch(self, req: _Request, kind: str) -> _Reply:
        try:
            handler = getattr(self, f"_api_{kind}", None)
            if handler is None:
                raise _ApiError(404, "notFound", f"Not Found: {req.method} /{req.path}")
            reply: _Reply = handler(req)
            return reply
        except _ApiError as e:
            return e.reply()
        except (ValueError, KeyError, TypeError) as e:
            return _bad_request(f"Bad request: {e}").reply()

    def _fields(self, req: _Request, f: dict[str, Any], default: str = _DEFAULT_FIELDS) -> dict[str, Any]:
        return apply_fields(self._public(f), parse_fields(req.query.get("fields") or default))

    def _file_id(self, req: _Request) -> str:
        return req.path[len("drive/v3/files/"):]

    def _api_create(self, req: _Request) -> _Reply:
        meta = json.loads(req.body or b"{}")
        content = None if meta.get("mimeType") == FOLDER_MIME else b""
        return _json_reply(200, self._fields(req, self._add_file(meta, content)))

    def _api_upload_multipart(self, req: _Request) -> _Reply:
        parts = split_multipart(req.body, _boundary(req.headers.get("content-type", "")))
        if len(parts) != 2:
            raise _bad_request("Multipart upload needs exactly two parts (metadata, media)")
        meta = json.loads(split_head(parts[0])[1] or b"{}")
        media_headers, media = split_head(parts[1])
        if isinstance(meta, dict) and not meta.get("mimeType"):
            meta["mimeType"] = media_headers.get("content-type")
        return _json_reply(200, self._fields(req, self._add_file(meta, media)))

    def _api_upload_media(self, req: _Request) -> _Reply:
        meta = {"mimeType": req.headers.get("content-type", "application/octet-stream")}
        return _json_reply(200, self._fields(req, self._add_file(meta, req.body)))

    def _api_upload_start(self, req: _Request) -> _Reply:
        meta = json.loads(req.body or b"{}")
        total = req.headers.get("x-upload-content-length")
        if meta.get("mimeType") is None and req.headers.get("x-upload-content-type"):
            meta["mimeType"] = req.headers["x-upload-content-type"]
        parse_fields(req.query.get("fields") or _DEFAULT_FIELDS)       # fail early
        sid = secrets.token_urlsafe(16)
        with self._lock:
            self._sessions[sid] = _Session(meta, req.query.get("fields"),
                                           int(total) if total else None)
            self._uploads_started += 1
        return _Reply(200, b"", {"Location": f"http://{req.host}/upload/drive/v3/files"
                                             f"?uploadType=resumable&upload_id={sid}"})

    def _session(self, req: _Request) -> _Session:
        sess = self._sessions.get(req.query.get("upload_id", ""))
        if sess is None:
            raise _ApiError(404, "notFound", "Upload session not found or expired")
        return sess

    def _api_upload_status(self, req: _Request) -> _Reply:
        with self._lock:
            sess = self._session(req)
            return self._session_reply(req, sess)

    def _api_upload_chunk(self, req: _Request) -> _Reply:
        return self._accept(req, req.body, interrupted=False)

    def _interrupted_chunk(self, req: _Request, data: bytes) -> None:
        """A chunk PUT whose connection broke after ``data``: keep what Drive would keep."""
        if req.headers.get("content-range"):
            try:
                self._accept(req, data, interrupted=True)
            except _ApiError:
                pass

    def _accept(self, req: _Request, data: bytes, interrupted: bool) -> _Reply:
        """Take a chunk PUT's bytes into its session. An ``interrupted`` chunk (connection
        lost) keeps only its 256 KiB-aligned part and never completes the upload."""
        cr = req.headers.get("content-range")
        first, last, total = _parse_content_range(cr) if cr else (0, len(data) - 1, len(data))
        if first is None or last is None:
            raise _bad_request("Content-Range without a byte range on a chunk")
        if not interrupted and last - first + 1 != len(data):
            raise _bad_request(f"Content-Range {cr} does not match {len(data)} body bytes")
        with self._lock:
            sess = self._session(req)
            if sess.done_id is not None:
                return self._session_reply(req, sess)
            have = len(sess.buf)
            if first > have:
                raise _bad_request(f"Invalid request. According to the Content-Range header, the "
                                   f"upload offset is {first} byte(s), which exceeds already "
                                   f"uploaded size of {have} byte(s).")
            if total is not None:
                sess.total = total
            new = data[have - first:]
            if sess.total is not None and have + len(new) > sess.total:
                raise _bad_request("More bytes than the declared upload size")
            if not interrupted and sess.total is not None and have + len(new) == sess.total:
                sess.buf += new
                f = self._add_file(sess.metadata, bytes(sess.buf))
                sess.done_id, sess.buf = f["id"], bytearray()
            else:
                sess.buf += new[:len(new) // CHUNK_ALIGN * CHUNK_ALIGN]
            return self._session_reply(req, sess)

    def _session_reply(self, req: _Request, sess: _Session) -> _Reply:
        if sess.done_id is not None:
            f = self._files.get(sess.done_id)
            if f is None:
                raise _not_found(sess.done_id)
            return _json_reply(200, apply_fields(self._public(f),
                                                 parse_fields(sess.fields or _DEFAULT_FIELDS)))
        headers = {"Range": f"bytes=0-{len(sess.buf) - 1}"} if sess.buf else {}
        return _Reply(308, b"", headers)

    def _api_list(self, req: _Request) -> _Reply:
        pred = parse_query(req.query.get("q", ""), self._root_id)
        try:
            size = int(req.query.get("pageSize") or DEFAULT_PAGE_SIZE)
            offset = int(base64.urlsafe_b64decode(req.query["pageToken"]).decode()) \
                if req.query.get("pageToken") else 0
        except ValueError:
            raise _ApiError(400, "invalid", "Invalid Value") from None
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise _ApiError(400, "invalid", f"Invalid value '{size}'. Values must be within "
                                            f"the range: [1, {MAX_PAGE_SIZE}]")
        with self._lock:
            hits = [self._public(f) for f in sorted(self._files.values(), key=lambda f: f["_seq"])
                    if pred(f)]
        out: dict[str, Any] = {"kind": "drive#fileList", "incompleteSearch": False,
                               "files": hits[offset:offset + size]}
        if offset + size < len(hits):
            out["nextPageToken"] = base64.urlsafe_b64encode(str(offset + size).encode()).decode()
        mask = parse_fields(req.query.get("fields") or
                            f"kind,incompleteSearch,nextPageToken,files({_DEFAULT_FIELDS})")
        return _json_reply(200, apply_fields(out, mask))

    def _api_get(self, req: _Request) -> _Reply:
        with self._lock:
            f = self._file(self._file_id(req))
            return _json_reply(200, self._fields(req, f))

    def _api_update(self, req: _Request) -> _Reply:
        patch = json.loads(req.body or b"{}")
        with self._lock:
            f = self._file(self._file_id(req))
            if "name" in patch:
                f["name"] = str(patch["name"])
            if "trashed" in patch:
                f["trashed"] = bool(patch["trashed"])
            if patch.get("appProperties"):
                props = dict(f.get("appProperties", {}))
                for k, v in patch["appProperties"].items():
                    if v is None:
                        props.pop(k, None)
                    else:
                        props[k] = str(v)
                f["appProperties"] = props
            f["modifiedTime"] = _now()
            self._save()
            return _json_reply(200, self._fields(req, f))

    def _api_delete(self, req: _Request) -> _Reply:
        with self._lock:
            doomed = [self._file(self._file_id(req))["id"]]
            for fid in doomed:            # a folder takes its contents with it
                doomed += [c["id"] for c in self._files.values() if fid in c.get("parents", [])
                           and c["id"] not in doomed]
            for fid in doomed:
                self._files.pop(fid, None)
                self._blobs.pop(fid, None)
                if self.data_dir is not None:
                    (self.data_dir / "blobs" / fid).unlink(missing_ok=True)
            self._save()
        return _Reply(204)

    def _api_download(self, req: _Request) -> _Reply:
        with self._lock:
            f = self._file(self._file_id(req))
            if f["mimeType"] == FOLDER_MIME:
                raise _ApiError(403, "fileNotDownloadable", "Only files with binary content "
                                "can be downloaded. Use Export with Docs Editors files.")
            data = self._read_blob(f["id"])
        rng = req.headers.get("range")
        headers = {"Content-Type": f["mimeType"], "Accept-Ranges": "bytes"}
        if not rng:
            return _Reply(200, data, headers)
        m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
        if not m or m.groups() == ("", ""):
            raise _bad_request(f"Invalid Range header: {rng}")
        first, last = m.groups()
        if first == "":                                   # suffix: the last N bytes
            start, end = max(len(data) - int(last), 0), len(data) - 1
        else:
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        if start >= len(data) or start > end:
            raise _ApiError(416, "requestedRangeNotSatisfiable", "Request range not satisfiable",
                            headers={"Content-Range": f"bytes */{len(data)}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return _Reply(206, data[start:end + 1], headers)

    def _api_batch(self, req: _Request) -> _Reply:
        parts = split_multipart(req.body, _boundary(req.headers.get("content-type", "")))
        if len(parts) > MAX_BATCH:
            raise _bad_request(f"A batch may hold at most {MAX_BATCH} calls, not {len(parts)}")
        boundary = "batch_" + secrets.token_hex(12)
        out = []
        for part in parts:
            part_headers, payload = split_head(part)
            line, _, rest = payload.partition(b"\n")
            words = line.decode().strip().split(" ")
            if len(words) < 2:
                raise _bad_request("Malformed call in batch")
            url = urlsplit(words[1])
            inner_headers, inner_body = split_head(rest)
            inner = _Request(words[0].upper(), unquote(url.path).lstrip("/"),
                             dict(parse_qsl(url.query, keep_blank_values=True)),
                             inner_headers, inner_body, req.host)
            kind = classify(inner.method, inner.path, inner.query, inner.headers)
            if kind.startswith("upload") or kind in ("batch", "download"):
                reply = _bad_request("Media calls cannot be batched").reply()
            else:
                fault = self._take_fault(kind, f"{inner.method} /{inner.path}", in_batch=True)
                reply = fault.error().reply() if fault else self._dispatch(inner, kind)
            cid = part_headers.get("content-id", "<>")
            head = "".join(f"{k}: {v}\r\n" for k, v in
                           {"Content-Type": "application/json; charset=UTF-8", **reply.headers}.items())
            out.append(f"--{boundary}\r\nContent-Type: application/http\r\n"
                       f"Content-ID: <response-{cid.strip('<>')}>\r\n\r\n"
                       f"HTTP/1.1 {reply.status} {_reason(reply.status)}\r\n{head}"
                       f"Content-Length: {len(reply.body)}\r\n\r\n".encode() + reply.body + b"\r\n")
        body = b"".join(out) + f"--{boundary}--\r\n".encode()
        return _Reply(200, body, {"Content-Type": f"multipart/mixed; boundary={boundary}"})


def _reason(status: int) -> str:
    return BaseHTTPRequestHandler.responses.get(status, ("",))[0]


def classify(method: str, path: str, query: dict[str, str], headers: dict[str, str]) -> str:
    """The request kind (one of ``KINDS``) of a call, from its line and headers alone."""
    if path == "batch/drive/v3" and method == "POST":
        return "batch"
    if path == "upload/drive/v3/files":
        if method == "POST":
            return {"multipart": "upload_multipart", "resumable": "upload_start",
                    "media": "upload_media"}.get(query.get("uploadType", ""), "other")
        if method == "PUT":
            return "upload_status" if headers.get("content-range", "").replace(" ", "") \
                .startswith("bytes*/") else "upload_chunk"
    if path == "drive/v3/files":
        return {"GET": "list", "POST": "create"}.get(method, "other")
    if path.startswith("drive/v3/files/") and "/" not in path[len("drive/v3/files/"):]:
        if method == "GET":
            return "download" if query.get("alt") == "media" else "get"
        return {"DELETE": "delete", "PATCH": "update"}.get(method, "other")
    return "other"


class _Server(ThreadingHTTPServer):
    daemon_threads = False        # server_close() joins the handler threads
    block_on_close = True

    def __init__(self, addr: tuple[str, int], sim: DriveSim) -> None:
        self.sim = sim
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def close_connections(self) -> None:
        with self.live_lock:
            for sock in self.live:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "drivesim/1"
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.live_lock:
            self.server.live.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            with self.server.live_lock:
                self.server.live.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def _read_body(self, n: int) -> tuple[bytes, bool]:
        """Up to ``n`` body bytes; False when the client went quiet or away before ``n``."""
        sim = self.server.sim
        buf = bytearray()
        self.connection.settimeout(sim.body_timeout)
        try:
            while len(buf) < n:
                piece = self.rfile.read1(min(n - len(buf), 1 << 20))
                if not piece:
                    break
                buf += piece
        except OSError:
            pass
        finally:
            try:
                self.connection.settimeout(None)
            except OSError:
                pass
        return bytes(buf), len(buf) == n

    def _serve(self) -> None:
        sim = self.server.sim
        url = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = _Request(self.command, unquote(url.path).lstrip("/"),
                       dict(parse_qsl(url.query, keep_blank_values=True)), headers, b"",
                       headers.get("host") or f"{sim.host}:{sim.port}")
        kind = classify(req.method, req.path, req.query, headers)
        fault = sim._take_fault(kind, f"{req.method} /{req.path}")
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._send(_bad_request("Invalid Content-Length").reply())
            self.close_connection = True
            return
        media = kind.startswith("upload") and kind != "upload_start"
        if fault is not None and fault.kind == "drop":
            limit = length if fault.after_bytes is None else min(fault.after_bytes, length)
            data, _ = self._read_body(limit)
            if media:
                with sim._lock:
                    sim._bytes_received += len(data)
            if kind == "upload_chunk" and fault.after_bytes is not None:
                sim._interrupted_chunk(req, data)
            self.close_connection = True
            return
        req.body, complete = self._read_body(length)
        if media:
            with sim._lock:
                sim._bytes_received += len(req.body)
        if not complete:
            if kind == "upload_chunk":
                sim._interrupted_chunk(req, req.body)
            self._send(_ApiError(408, "requestTimeout", f"Request body ended after "
                                 f"{len(req.body)} of {length} bytes").reply())
            self.close_connection = True
            return
        if fault is not None and fault.kind == "slow":
            if sim._stopping.wait(fault.delay):
                self.close_connection = True
                return
            fault = None
        try:
            reply = fault.error().reply() if fault is not None else sim._dispatch(req, kind)
        except Exception as e:                          # a bug here: say so, keep serving
            log.exception("drivesim: internal error")
            reply = _ApiError(500, "internalError", f"drivesim internal error: {e!r}").reply()
        self._send(reply)

    def _send(self, reply: _Reply) -> None:
        try:
            self.send_response(reply.status)
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:
            self.close_connection = True


# -- command line ----------------------------------------------------------------------

def _parse_fault(text: str) -> tuple[str, float, str | None]:
    kind, _, rest = text.partition(":")
    prob, _, match = rest.partition(":")
    try:
        p = float(prob) if prob else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad probability in {text!r}") from None
    if kind not in FAULT_KINDS or not 0 <= p <= 1:
        raise argparse.ArgumentTypeError(f"bad fault {text!r}: KIND:PROB[:MATCH], KIND one of "
                                         f"{', '.join(FAULT_KINDS)}, PROB in [0, 1]")
    return kind, p, match or None


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM; print the URL (the rootUrl) as the first stdout line."""
    ap = argparse.ArgumentParser(prog="python -m tools.drivesim",
                                 description="A local Google Drive v3 test server.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 (default): any free port")
    ap.add_argument("--data-dir", type=Path, help="keep files here across restarts")
    ap.add_argument("--fault", action="append", type=_parse_fault, default=[],
                    metavar="KIND:PROB[:MATCH]",
                    help=f"inject a fault with probability PROB; KIND: {', '.join(FAULT_KINDS)}; "
                         f"MATCH: a request kind or path regex")
    ap.add_argument("--seed", type=int, help="seed for probabilistic faults")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="drivesim: %(message)s")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    sim = DriveSim(args.data_dir, args.host, args.port, seed=args.seed)
    for kind, p, match in args.fault:
        sim.inject(kind, probability=p, match=match)
    with sim:
        print(sim.url, flush=True)
        print(f"drivesim: serving Drive v3 at {sim.url} (root folder id {sim.root_id}); "
              f"Ctrl-C stops", file=sys.stderr, flush=True)
        while not done.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
