"""The Drive v3 wire vocabulary of drivesim: limits, request kinds, the parsed request, the
reply, and Drive's error envelope (:class:`_ApiError`), shared by the parsers, the server
and the HTTP handler."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

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


# -- requests and their kinds ----------------------------------------------------------

@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    host: str


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
