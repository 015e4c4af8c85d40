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

``DriveSim(sha256=False)`` (command line: ``--no-sha256``) leaves ``sha256Checksum`` out of
every file's metadata, as Drive may ("if available").

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

The package: :mod:`~tools.drivesim.protocol` (limits, request kinds, replies and Drive's
error envelope), :mod:`~tools.drivesim.parsing` (``fields``, ``q``, multipart,
Content-Range), :mod:`~tools.drivesim.faults` (:class:`Fault`, :class:`SimCounters`),
:mod:`~tools.drivesim.server` (:class:`DriveSim`: storage, sessions, the API calls),
:mod:`~tools.drivesim.handler` (the HTTP transport) and :mod:`~tools.drivesim.cli`.
"""
from __future__ import annotations

from tools.drivesim.cli import main
from tools.drivesim.faults import Fault, SimCounters
from tools.drivesim.handler import log
from tools.drivesim.parsing import (
    Mask,
    Predicate,
    apply_fields,
    parse_fields,
    parse_query,
    split_head,
    split_multipart,
)
from tools.drivesim.protocol import (
    APP_PROPERTIES_MAX,
    APP_PROPERTY_BYTES,
    CHUNK_ALIGN,
    DEFAULT_PAGE_SIZE,
    FAULT_KINDS,
    FOLDER_MIME,
    KINDS,
    MAX_BATCH,
    MAX_PAGE_SIZE,
    classify,
)
from tools.drivesim.server import DriveSim

__all__ = [
    "APP_PROPERTIES_MAX", "APP_PROPERTY_BYTES", "CHUNK_ALIGN", "DEFAULT_PAGE_SIZE",
    "FAULT_KINDS", "FOLDER_MIME", "KINDS", "MAX_BATCH", "MAX_PAGE_SIZE",
    "DriveSim", "Fault", "Mask", "Predicate", "SimCounters",
    "apply_fields", "classify", "log", "main", "parse_fields", "parse_query",
    "split_head", "split_multipart",
]
