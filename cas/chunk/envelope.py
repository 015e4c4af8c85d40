"""The chunk envelope: chunk ids, compression, the on-disk header, verification.

One module owns the byte format of a stored chunk (see docs/format.md)::

    offset size field
    0      4    magic  b"CASC"
    4      1    format version (1)
    5      1    codec  (0 = raw, 1 = zstd)
    6      2    flags  (0 = plain; FLAG_AEAD = encrypted volume), big-endian
    8      8    plaintext length in bytes, unsigned big-endian
    16     ...  payload: the plaintext (raw) or one zstd frame

A chunk id is the SHA-256 digest (32 bytes) of the plaintext. The payload is zstd
unless zstd does not make it smaller, then raw. :func:`open_envelope` verifies the
plaintext against the id it was asked for, so wrong bytes never leave this module.
hashlib and zstandard release the GIL, so these functions run well in worker threads.

In an encrypted volume (cas.config.keys) the header has ``flags = FLAG_AEAD`` and the payload
is ``nonce(12) || AES-256-GCM(payload as above) || tag(16)``, with the 16-byte header
and the 32-byte chunk id as associated data; the chunk id is keyed BLAKE3. One
:class:`ChunkCodec` per volume (:func:`codec_for`) owns chunk ids, sealing and opening;
the module functions :func:`chunk_id`, :func:`seal` and :func:`open_envelope` are those
of an unencrypted volume (:data:`PLAIN`). docs/format.md.
"""
from __future__ import annotations

import hashlib
import os
import struct
import threading
from typing import TYPE_CHECKING

import zstandard
from cryptography.exceptions import InvalidTag

from cas.errors import IntegrityError, VolumeError

if TYPE_CHECKING:
    from cas.config.keys import VolumeKeys
    from cas.config.volume import Volume

MAGIC = b"CASC"
FORMAT_VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
_HEADER = struct.Struct(">4sBBHQ")
HEADER_SIZE = _HEADER.size  # 16 bytes
MAX_PLAINTEXT = 16 << 20    # bytes: the largest chunk size a volume can have
FLAG_AEAD = 0x0001          # payload is nonce || AES-256-GCM ciphertext || tag
NONCE_SIZE = 12             # bytes (96-bit random nonce, NIST SP 800-38D 8.2.2)
TAG_SIZE = 16               # bytes

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


def _compress(data: bytes | bytearray, codec: int, level: int) -> tuple[bytes | bytearray, int]:
    """(payload, codec used): zstd at ``level`` when asked and it shrinks ``data``, else raw."""
    if codec == CODEC_ZSTD and data:
        packed = _compressor(level).compress(data)
        if len(packed) < len(data):
            return packed, CODEC_ZSTD
    return data, CODEC_RAW


def seal(data: bytes | bytearray, codec: int = CODEC_ZSTD, level: int = 3) -> bytes:
    """Return the envelope (header + payload) holding ``data`` (plaintext bytes) in an
    unencrypted volume (flags 0).

    With ``codec == CODEC_ZSTD`` the payload is compressed at ``level`` unless that does
    not shrink it, in which case it is stored raw.
    """
    payload, used = _compress(data, codec, level)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, used, 0, len(data)) + payload


def _parse_header(blob: bytes, expected_id: bytes, flags_wanted: int) -> tuple[int, int]:
    """(codec, plaintext length) of envelope ``blob``'s header; IntegrityError when it is
    truncated, malformed, impossible, or its flags are not ``flags_wanted`` (an encrypted
    envelope in a plain volume or the reverse)."""
    if len(blob) < HEADER_SIZE:
        raise IntegrityError(f"chunk {expected_id.hex()}: envelope truncated ({len(blob)} bytes)")
    magic, version, codec, flags, length = _HEADER.unpack_from(blob)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise IntegrityError(f"chunk {expected_id.hex()}: bad envelope header")
    if length > MAX_PLAINTEXT:
        raise IntegrityError(f"chunk {expected_id.hex()}: recorded length {length} is impossible")
    if flags != flags_wanted:
        raise IntegrityError(f"chunk {expected_id.hex()}: envelope flags {flags:#06x}, expected "
                             f"{flags_wanted:#06x} ({'an encrypted' if flags_wanted else 'a plain'} volume)")
    return codec, length


def _decompress(payload: bytes | memoryview, codec: int, length: int, expected_id: bytes) -> bytes:
    try:
        if codec == CODEC_ZSTD:
            data = _decompressor().decompress(payload, max_output_size=length)
        elif codec == CODEC_RAW:
            data = bytes(payload)
        else:
            raise IntegrityError(f"chunk {expected_id.hex()}: unknown codec {codec}")
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"chunk {expected_id.hex()}: zstd: {exc}") from exc
    if len(data) != length:
        raise IntegrityError(f"chunk {expected_id.hex()}: payload does not hold the recorded length")
    return data


def open_envelope(blob: bytes, expected_id: bytes) -> bytes:
    """Return the plaintext held by envelope ``blob`` of an unencrypted volume, verified
    against ``expected_id``.

    Raises IntegrityError (EIO) when the header is malformed (or flagged encrypted), the
    payload does not decompress to the recorded length, or the plaintext's SHA-256
    differs from the id.
    """
    codec, length = _parse_header(blob, expected_id, 0)
    data = _decompress(memoryview(blob)[HEADER_SIZE:], codec, length, expected_id)
    if chunk_id(data) != expected_id:
        raise IntegrityError(f"chunk {expected_id.hex()}: content does not match its SHA-256")
    return data


class ChunkCodec:
    """Chunk ids, sealing and opening of envelopes for one volume.

    ``ChunkCodec(None)`` (:data:`PLAIN`) is an unencrypted volume: SHA-256 ids and the
    plain envelope (flags 0, byte-identical to :func:`seal`). ``ChunkCodec(keys)`` is an
    encrypted volume: keyed BLAKE3 ids (:meth:`cas.config.keys.VolumeKeys.chunk_id`) and AEAD
    envelopes (flags FLAG_AEAD; docs/format.md). Thread-safe.
    """

    def __init__(self, keys: VolumeKeys | None) -> None:
        self.keys = keys

    @property
    def encrypted(self) -> bool:
        """True for an encrypted volume's codec (AEAD envelopes, keyed ids)."""
        return self.keys is not None

    def chunk_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """The 32-byte chunk id of plaintext ``data``: SHA-256, or keyed BLAKE3."""
        if self.keys is None:
            return hashlib.sha256(data).digest()
        return self.keys.chunk_id(data)

    def seal(self, data: bytes | bytearray, codec: int = CODEC_ZSTD, level: int = 3,
             cid: bytes | None = None) -> bytes:
        """The envelope holding plaintext ``data``: compressed (as :func:`seal`), then in
        an encrypted volume AES-256-GCM with a random 96-bit nonce and header || ``cid``
        (computed when None) as associated data. Envelope bytes: 16 + payload
        (+ 28 encrypted)."""
        if self.keys is None:
            return seal(data, codec, level)
        if cid is None:
            cid = self.keys.chunk_id(data)
        payload, used = _compress(data, codec, level)
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, used, FLAG_AEAD, len(data))
        nonce = os.urandom(NONCE_SIZE)
        return header + nonce + self.keys.chunk_aead.encrypt(nonce, payload, header + cid)

    def open(self, blob: bytes, expected_id: bytes) -> bytes:
        """The plaintext of envelope ``blob``, verified: in an encrypted volume the AEAD
        tag (header and ``expected_id`` authenticated) and the keyed id of the plaintext;
        else as :func:`open_envelope`. Raises IntegrityError (EIO)."""
        if self.keys is None:
            return open_envelope(blob, expected_id)
        codec, length = _parse_header(blob, expected_id, FLAG_AEAD)
        if len(blob) < HEADER_SIZE + NONCE_SIZE + TAG_SIZE:
            raise IntegrityError(f"chunk {expected_id.hex()}: envelope truncated ({len(blob)} bytes)")
        view = memoryview(blob)
        try:
            payload = self.keys.chunk_aead.decrypt(view[HEADER_SIZE:HEADER_SIZE + NONCE_SIZE],
                                                   view[HEADER_SIZE + NONCE_SIZE:],
                                                   bytes(view[:HEADER_SIZE]) + expected_id)
        except InvalidTag as exc:
            raise IntegrityError(f"chunk {expected_id.hex()}: authentication failed (changed bytes "
                                 "or another volume's key)") from exc
        data = _decompress(payload, codec, length, expected_id)
        if self.keys.chunk_id(data) != expected_id:
            raise IntegrityError(f"chunk {expected_id.hex()}: content does not match its keyed id")
        return data


PLAIN = ChunkCodec(None)


def codec_for(volume: Volume) -> ChunkCodec:
    """The chunk codec of ``volume``: :data:`PLAIN` for an unencrypted volume, else one
    made from ``volume.keys`` (set by :func:`cas.config.keys.unlock`). Raises VolumeError for an
    encrypted volume that was not unlocked (never falls back to plain)."""
    if not volume.encryption:
        return PLAIN
    if volume.keys is None:
        raise VolumeError(f"volume {volume.name} is encrypted and was not unlocked")
    return ChunkCodec(volume.keys)
