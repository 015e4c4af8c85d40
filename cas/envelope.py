"""The chunk envelope: chunk ids, compression, the on-disk header, verification.

One module owns the byte format of a stored chunk (see docs/format.md)::

    offset size field
    0      4    magic  b"CASC"
    4      1    format version (1)
    5      1    codec  (0 = raw, 1 = zstd)
    6      2    flags  (0; reserved for encryption)
    8      8    plaintext length in bytes, unsigned big-endian
    16     ...  payload: the plaintext (raw) or one zstd frame

A chunk id is the SHA-256 digest (32 bytes) of the plaintext. The payload is zstd
unless zstd does not make it smaller, then raw. :func:`open_envelope` verifies the
plaintext against the id it was asked for, so wrong bytes never leave this module.
hashlib and zstandard release the GIL, so these functions run well in worker threads.
"""
from __future__ import annotations

import hashlib
import struct
import threading

import zstandard

from .errors import IntegrityError

MAGIC = b"CASC"
FORMAT_VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
_HEADER = struct.Struct(">4sBBHQ")
HEADER_SIZE = _HEADER.size  # 16 bytes
MAX_PLAINTEXT = 16 << 20    # bytes: the largest chunk size a volume can have

_local = threading.local()


def chunk_id(data: bytes | bytearray | memoryview) -> bytes:
    """Return the chunk id of ``data``: its SHA-256 digest, 32 bytes."""
    return hashlib.sha256(data).digest()


def parse_codec(spec: str) -> tuple[int, int]:
    """Parse a compression spec ``"zstd:LEVEL"``, ``"zstd"`` or ``"none"``.

    Returns (codec, level). Raises ValueError for anything else (levels 1..22).
    """
    if spec == "none":
        return CODEC_RAW, 0
    name, _, level_s = spec.partition(":")
    if name != "zstd":
        raise ValueError(f"unknown compression {spec!r} (use zstd:LEVEL or none)")
    level = int(level_s) if level_s else 3
    if not 1 <= level <= 22:
        raise ValueError(f"zstd level {level} out of range 1..22")
    return CODEC_ZSTD, level


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def seal(data: bytes | bytearray, codec: int = CODEC_ZSTD, level: int = 3) -> bytes:
    """Return the envelope (header + payload) holding ``data`` (plaintext bytes).

    With ``codec == CODEC_ZSTD`` the payload is compressed at ``level`` unless that does
    not shrink it, in which case it is stored raw.
    """
    payload: bytes | bytearray = data
    used = CODEC_RAW
    if codec == CODEC_ZSTD and data:
        packed = _compressor(level).compress(data)
        if len(packed) < len(data):
            payload, used = packed, CODEC_ZSTD
    return _HEADER.pack(MAGIC, FORMAT_VERSION, used, 0, len(data)) + payload


def open_envelope(blob: bytes, expected_id: bytes) -> bytes:
    """Return the plaintext held by envelope ``blob``, verified against ``expected_id``.

    Raises IntegrityError (EIO) when the header is malformed, the payload does not
    decompress to the recorded length, or the plaintext's SHA-256 differs from the id.
    """
    if len(blob) < HEADER_SIZE:
        raise IntegrityError(f"chunk {expected_id.hex()}: envelope truncated ({len(blob)} bytes)")
    magic, version, codec, _flags, length = _HEADER.unpack_from(blob)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise IntegrityError(f"chunk {expected_id.hex()}: bad envelope header")
    if length > MAX_PLAINTEXT:
        raise IntegrityError(f"chunk {expected_id.hex()}: recorded length {length} is impossible")
    payload = memoryview(blob)[HEADER_SIZE:]
    try:
        if codec == CODEC_ZSTD:
            data = _decompressor().decompress(payload, max_output_size=length)
        elif codec == CODEC_RAW:
            data = bytes(payload)
        else:
            raise IntegrityError(f"chunk {expected_id.hex()}: unknown codec {codec}")
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"chunk {expected_id.hex()}: zstd: {exc}") from exc
    if len(data) != length or chunk_id(data) != expected_id:
        raise IntegrityError(f"chunk {expected_id.hex()}: content does not match its SHA-256")
    return data
