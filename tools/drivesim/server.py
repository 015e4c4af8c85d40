"""The :class:`DriveSim` server: its files (in memory or under ``data_dir``), upload
sessions, fault bookkeeping and counters, and one method per Drive API call. The HTTP
transport that feeds it lives in :mod:`tools.drivesim.handler`."""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import random
import re
import secrets
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tools.drivesim.faults import Fault, SimCounters
from tools.drivesim.handler import _Server
from tools.drivesim.parsing import (
    _boundary,
    _parse_content_range,
    apply_fields,
    parse_fields,
    parse_query,
    split_head,
    split_multipart,
)
from tools.drivesim.protocol import (
    _DEFAULT_FIELDS,
    APP_PROPERTIES_MAX,
    APP_PROPERTY_BYTES,
    CHUNK_ALIGN,
    DEFAULT_PAGE_SIZE,
    FAULT_KINDS,
    FOLDER_MIME,
    MAX_BATCH,
    MAX_PAGE_SIZE,
    _ApiError,
    _bad_request,
    _json_reply,
    _not_found,
    _reason,
    _Reply,
    _Request,
    classify,
)


@dataclass
class _Session:
    metadata: dict[str, Any]
    fields: str | None
    total: int | None
    buf: bytearray = field(default_factory=bytearray)
    done_id: str | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _new_id() -> str:
    return "1" + secrets.token_urlsafe(24)


class DriveSim:
    """A Drive v3 test server on ``host:port`` (port 0: any free port), in a thread.

    ``data_dir``: keep files on disk there (None: in memory). ``seed`` seeds the random
    choices of probabilistic faults. ``body_timeout``: seconds of silence after which a
    request body shorter than its Content-Length gets 408. ``sha256``: False makes
    every reply omit ``sha256Checksum`` (Drive documents it as "if available"; the
    attribute ``sha256`` can be flipped while serving). Thread-safe."""

    def __init__(self, data_dir: Path | None = None, host: str = "127.0.0.1", port: int = 0,
                 *, seed: int | None = None, body_timeout: float = 1.0, sha256: bool = True) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.sha256 = sha256
        self.host, self.port = host, port
        self.body_timeout = body_timeout
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._files: dict[str, dict[str, Any]] = {}
        self._blobs: dict[str, bytes] = {}
        self._sessions: dict[str, _Session] = {}
        self._faults: list[Fault] = []
        self._requests: Counter[str] = Counter()
        self._active: Counter[str] = Counter()        # HTTP requests being served, per kind
        self._max_active: Counter[str] = Counter()    # the most at once, per kind
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

    def replace_content(self, file_id: str, data: bytes) -> None:
        """Replace file ``file_id``'s content with ``data`` behind the API's back (its
        ``size`` and checksums follow, as Drive would report them): damage on the
        server's side, for tests of checks such as ``casfs fsck --cloud``. Raises
        KeyError when there is no such file."""
        with self._lock:
            f = self._files[file_id]
            f.update(size=str(len(data)), md5Checksum=hashlib.md5(data).hexdigest(),
                     sha256Checksum=hashlib.sha256(data).hexdigest())
            if self.data_dir is None:
                self._blobs[file_id] = data
            else:
                (self.data_dir / "blobs" / file_id).write_bytes(data)
            self._save()

    @property
    def counters(self) -> SimCounters:
        """A snapshot of the counters (see :class:`SimCounters`)."""
        with self._lock:
            return SimCounters(dict(self._requests), dict(self._fault_counts),
                               sum(self._by_name.values()), dict(self._by_name),
                               self._bytes_uploaded, self._bytes_received, self._uploads_started,
                               dict(self._max_active))

    def _request_started(self, kind: str) -> None:
        """Count an HTTP request of ``kind`` as being served (for ``max_in_flight``)."""
        with self._lock:
            self._active[kind] += 1
            self._max_active[kind] = max(self._max_active[kind], self._active[kind])

    def _request_ended(self, kind: str) -> None:
        with self._lock:
            self._active[kind] -= 1

    # -- faults

    def inject(self, kind: str, *, times: int | None = None, probability: float | None = None,
               match: str | None = None, retry_after: float | None = None, delay: float = 0.5,
               status: int | None = None, after_bytes: int | None = None, skip: int = 0,
               reason: str | None = None, message: str | None = None) -> Fault:
        """Add a fault of ``kind`` (one of ``FAULT_KINDS``, see the package doc).

        It lets the first ``skip`` matching requests pass, then fires on the next ``times``,
        or on each with ``probability`` (both: at most ``times`` times; neither: once).
        ``match``: a request kind from ``KINDS`` or a regex searched in ``"METHOD /path"``;
        None matches everything.
        ``retry_after`` (seconds) adds a Retry-After header to error replies; ``delay``
        (seconds) is the wait of ``slow``; ``status`` picks 500 or 503 for ``server_error``;
        ``after_bytes`` makes ``drop`` close after reading that many body bytes;
        ``reason`` and ``message`` replace an error kind's reason and message in the
        envelope. Raises ValueError for an unknown kind."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if times is None and probability is None:
            times = 1
        fault = Fault(kind, times, probability, match, retry_after, delay, status, after_bytes, skip,
                      reason=reason, message=message)
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
        return {k: v for k, v in f.items()
                if not k.startswith("_") and (self.sha256 or k != "sha256Checksum")}

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
