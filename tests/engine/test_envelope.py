"""Tests of cas.chunk.envelope: chunk ids, the on-disk header, compression, verification."""
from __future__ import annotations

import hashlib
import os
import struct
import threading

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cas.chunk.envelope import (CODEC_RAW, CODEC_ZSTD, FORMAT_VERSION, HEADER_SIZE, MAGIC, chunk_id,
                          open_envelope, parse_codec, seal)
from cas.errors import FsError, IntegrityError

COMPRESSIBLE = b"casfs dedup " * 10_000          # 120 000 bytes
INCOMPRESSIBLE = os.urandom(100_000)


def header(blob: bytes) -> tuple[bytes, int, int, int, int]:
    """(magic, version, codec, flags, length) decoded by hand from docs/format.md."""
    return (blob[0:4], blob[4], blob[5], int.from_bytes(blob[6:8], "big"),
            int.from_bytes(blob[8:16], "big"))


def test_header_size_is_16() -> None:
    assert HEADER_SIZE == 16
    assert MAGIC == b"CASC"
    assert FORMAT_VERSION == 1
    assert (CODEC_RAW, CODEC_ZSTD) == (0, 1)


def test_chunk_id_is_sha256() -> None:
    for data in (b"", b"a", COMPRESSIBLE, INCOMPRESSIBLE):
        assert chunk_id(data) == hashlib.sha256(data).digest()
        assert len(chunk_id(data)) == 32
    assert chunk_id(bytearray(b"xyz")) == chunk_id(memoryview(b"xyz")) == chunk_id(b"xyz")


def test_zstd_round_trip_compressible() -> None:
    blob = seal(COMPRESSIBLE, CODEC_ZSTD, 3)
    assert header(blob) == (b"CASC", 1, CODEC_ZSTD, 0, len(COMPRESSIBLE))
    assert len(blob) < len(COMPRESSIBLE) // 10
    # the payload is one standard zstd frame holding the plaintext
    assert zstandard.ZstdDecompressor().decompress(blob[16:]) == COMPRESSIBLE
    assert open_envelope(blob, chunk_id(COMPRESSIBLE)) == COMPRESSIBLE


def test_zstd_falls_back_to_raw_when_not_smaller() -> None:
    blob = seal(INCOMPRESSIBLE, CODEC_ZSTD, 3)
    assert header(blob) == (b"CASC", 1, CODEC_RAW, 0, len(INCOMPRESSIBLE))
    assert blob[16:] == INCOMPRESSIBLE
    assert len(blob) == HEADER_SIZE + len(INCOMPRESSIBLE)
    assert open_envelope(blob, chunk_id(INCOMPRESSIBLE)) == INCOMPRESSIBLE


@pytest.mark.parametrize("data", [COMPRESSIBLE, INCOMPRESSIBLE, b"x"], ids=["compressible", "random", "1byte"])
def test_raw_round_trip(data: bytes) -> None:
    blob = seal(data, CODEC_RAW)
    assert header(blob) == (b"CASC", 1, CODEC_RAW, 0, len(data))
    assert blob[16:] == data
    assert open_envelope(blob, chunk_id(data)) == data


@pytest.mark.parametrize("codec", [CODEC_RAW, CODEC_ZSTD])
def test_empty_round_trip(codec: int) -> None:
    blob = seal(b"", codec)
    assert blob == struct.pack(">4sBBHQ", b"CASC", 1, CODEC_RAW, 0, 0)
    assert open_envelope(blob, chunk_id(b"")) == b""


@pytest.mark.parametrize("level", [1, 3, 19, 22])
def test_levels(level: int) -> None:
    blob = seal(COMPRESSIBLE, CODEC_ZSTD, level)
    assert header(blob)[2] == CODEC_ZSTD
    assert open_envelope(blob, chunk_id(COMPRESSIBLE)) == COMPRESSIBLE


def test_open_accepts_bytearray_and_memoryview_blob() -> None:
    blob = seal(COMPRESSIBLE)
    cid = chunk_id(COMPRESSIBLE)
    assert open_envelope(bytearray(blob), cid) == COMPRESSIBLE  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=4096) | st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8),
                                                  st.integers(1, 2000)),
       codec=st.sampled_from([CODEC_RAW, CODEC_ZSTD]), level=st.integers(1, 22))
def test_round_trip_property(data: bytes, codec: int, level: int) -> None:
    blob = seal(data, codec, level)
    magic, version, used, flags, length = header(blob)
    assert (magic, version, flags, length) == (b"CASC", 1, 0, len(data))
    assert used in (CODEC_RAW, CODEC_ZSTD)
    if codec == CODEC_RAW:
        assert used == CODEC_RAW
    if used == CODEC_ZSTD:
        assert len(blob) - HEADER_SIZE < len(data)  # zstd only when it is smaller
    assert open_envelope(blob, chunk_id(data)) == data


# -- corruption ------------------------------------------------------------------------

def _flip(blob: bytes, i: int) -> bytes:
    b = bytearray(blob)
    b[i] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize("data", [COMPRESSIBLE, INCOMPRESSIBLE], ids=["zstd", "raw"])
def test_any_flipped_payload_byte_is_detected(data: bytes) -> None:
    blob = seal(data)
    cid = chunk_id(data)
    n = len(blob)
    positions = sorted({HEADER_SIZE, HEADER_SIZE + 1, n // 2, n - 2, n - 1,
                        *range(HEADER_SIZE, n, max(1, (n - HEADER_SIZE) // 50))})
    for i in positions:
        with pytest.raises(IntegrityError):
            open_envelope(_flip(blob, i), cid)


@pytest.mark.parametrize("data", [COMPRESSIBLE, INCOMPRESSIBLE, b""], ids=["zstd", "raw", "empty"])
def test_any_flipped_header_byte_is_detected(data: bytes) -> None:
    """Magic, version, codec and length are all checked; flags are reserved (ignored)."""
    blob = seal(data)
    cid = chunk_id(data)
    for i in [*range(0, 6), *range(8, 16)]:
        for bit in (0x01, 0x40, 0x80):
            if (i, bit) == (8, 0x80):
                continue  # see test_length_with_top_bit_set
            b = bytearray(blob)
            b[i] ^= bit
            with pytest.raises(IntegrityError):
                open_envelope(bytes(b), cid)


def test_length_with_top_bit_set() -> None:
    """A corrupt length field >= 2**63 is reported as IntegrityError like any other."""
    for data in (INCOMPRESSIBLE, COMPRESSIBLE):
        b = bytearray(seal(data))
        b[8] ^= 0x80
        with pytest.raises(IntegrityError):
            open_envelope(bytes(b), chunk_id(data))


def test_codec_swapped_is_detected() -> None:
    blob = bytearray(seal(COMPRESSIBLE))
    assert blob[5] == CODEC_ZSTD
    blob[5] = CODEC_RAW
    with pytest.raises(IntegrityError):
        open_envelope(bytes(blob), chunk_id(COMPRESSIBLE))
    raw = bytearray(seal(INCOMPRESSIBLE))
    raw[5] = CODEC_ZSTD
    with pytest.raises(IntegrityError):
        open_envelope(bytes(raw), chunk_id(INCOMPRESSIBLE))
    raw[5] = 7
    with pytest.raises(IntegrityError, match="unknown codec"):
        open_envelope(bytes(raw), chunk_id(INCOMPRESSIBLE))


@pytest.mark.parametrize("data", [COMPRESSIBLE, INCOMPRESSIBLE, b""], ids=["zstd", "raw", "empty"])
def test_wrong_expected_id(data: bytes) -> None:
    blob = seal(data)
    with pytest.raises(IntegrityError, match="SHA-256"):
        open_envelope(blob, chunk_id(data + b"!"))
    with pytest.raises(IntegrityError):
        open_envelope(blob, bytes(32))


@pytest.mark.parametrize("data", [COMPRESSIBLE, INCOMPRESSIBLE], ids=["zstd", "raw"])
def test_truncated_blob(data: bytes) -> None:
    blob = seal(data)
    cid = chunk_id(data)
    for n in (0, 1, 4, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, len(blob) // 2, len(blob) - 1):
        with pytest.raises(IntegrityError):
            open_envelope(blob[:n], cid)


def test_appended_garbage_is_detected_raw() -> None:
    # (after a zstd frame, trailing bytes are ignored: the plaintext is still verified)
    with pytest.raises(IntegrityError):
        open_envelope(seal(INCOMPRESSIBLE) + b"\0", chunk_id(INCOMPRESSIBLE))
    with pytest.raises(IntegrityError):
        open_envelope(seal(b"") + b"\0", chunk_id(b""))


def test_zstd_frame_bigger_than_recorded_length() -> None:
    """A header that understates the length cannot make the reader allocate or accept more."""
    blob = bytearray(seal(COMPRESSIBLE))
    blob[8:16] = (100).to_bytes(8, "big")
    with pytest.raises(IntegrityError):
        open_envelope(bytes(blob), chunk_id(COMPRESSIBLE))
    with pytest.raises(IntegrityError):
        open_envelope(bytes(blob), chunk_id(COMPRESSIBLE[:100]))


def test_integrity_error_is_eio() -> None:
    import errno
    assert issubclass(IntegrityError, FsError)
    assert IntegrityError().errno == errno.EIO


def test_threads_share_nothing() -> None:
    """Per-thread compressors: concurrent seal/open give correct results."""
    datas = [bytes([i]) * 50_000 + os.urandom(100) for i in range(16)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                d = datas[(i + _) % len(datas)]
                assert open_envelope(seal(d, CODEC_ZSTD, 1 + i % 5), chunk_id(d)) == d
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# -- parse_codec -----------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("none", (CODEC_RAW, 0)),
    ("zstd", (CODEC_ZSTD, 3)),
    ("zstd:1", (CODEC_ZSTD, 1)),
    ("zstd:3", (CODEC_ZSTD, 3)),
    ("zstd:19", (CODEC_ZSTD, 19)),
    ("zstd:22", (CODEC_ZSTD, 22)),
])
def test_parse_codec_accepts(spec: str, expected: tuple[int, int]) -> None:
    assert parse_codec(spec) == expected


@pytest.mark.parametrize("spec", ["", "lz4", "gzip:3", "ZSTD:3", "None", "raw", "zstd:0", "zstd:23",
                                  "zstd:-1", "zstd:abc", "zstd:3.5", "zstd:3:4", "none:1", " zstd:3"])
def test_parse_codec_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_codec(spec)
