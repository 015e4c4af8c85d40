"""cas.chunk.envelope.ChunkCodec: the encrypted envelope (docs/format.md) and the plain one."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cas.config import keys
from cas.chunk.envelope import (CODEC_RAW, CODEC_ZSTD, FLAG_AEAD, HEADER_SIZE, NONCE_SIZE, PLAIN, TAG_SIZE,
                          ChunkCodec, codec_for, seal)
from cas.errors import IntegrityError, VolumeError
from cas.config.volume import Volume

TEXT = b"a compressible line of text, over and over\n" * 2000


@pytest.fixture
def codec() -> ChunkCodec:
    return ChunkCodec(keys.VolumeKeys(keys.new_master_key()))


def test_plain_codec_is_format_1_byte_identical() -> None:
    for data in (TEXT, os.urandom(5000), b""):
        assert PLAIN.chunk_id(data) == hashlib.sha256(data).digest()
        assert PLAIN.seal(data, CODEC_ZSTD, 3)[:HEADER_SIZE] == seal(data, CODEC_ZSTD, 3)[:HEADER_SIZE]
        assert PLAIN.seal(data, CODEC_ZSTD, 3) == seal(data, CODEC_ZSTD, 3)
        assert PLAIN.open(seal(data), PLAIN.chunk_id(data)) == data


def test_aead_roundtrip_compresses_before_encrypting(codec: ChunkCodec) -> None:
    for data, used in ((TEXT, CODEC_ZSTD), (os.urandom(70000), CODEC_RAW), (b"", CODEC_RAW)):
        cid = codec.chunk_id(data)
        assert cid != hashlib.sha256(data).digest() and len(cid) == 32
        blob = codec.seal(data, CODEC_ZSTD, 3, cid)
        assert blob[4:8] == bytes([1, used]) + FLAG_AEAD.to_bytes(2, "big")
        assert int.from_bytes(blob[8:16], "big") == len(data)
        if used == CODEC_ZSTD:
            assert len(blob) < len(data) // 10
        else:
            assert len(blob) == HEADER_SIZE + NONCE_SIZE + len(data) + TAG_SIZE
        assert codec.open(blob, cid) == data
        assert codec.seal(data, CODEC_ZSTD, 3, cid) != blob          # a fresh nonce each time


def test_aead_every_flipped_byte_and_wrong_id_or_key_fail(codec: ChunkCodec) -> None:
    data = TEXT[:3000]
    cid = codec.chunk_id(data)
    blob = codec.seal(data, CODEC_ZSTD, 3, cid)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(IntegrityError):
            codec.open(bytes(bad), cid)
    with pytest.raises(IntegrityError):
        codec.open(blob, codec.chunk_id(b"other"))                   # the id is associated data
    with pytest.raises(IntegrityError):
        ChunkCodec(keys.VolumeKeys(keys.new_master_key())).open(blob, cid)
    with pytest.raises(IntegrityError):
        codec.open(blob[:HEADER_SIZE + NONCE_SIZE + 3], cid)
    with pytest.raises(IntegrityError):                              # plain and encrypted never mix
        PLAIN.open(blob, cid)
    with pytest.raises(IntegrityError):
        codec.open(seal(data), cid)


def test_codec_for_never_falls_back_to_plain(tmp_path: Path) -> None:
    vol = Volume(path=tmp_path, name="v", uuid="u", chunk_size=1 << 20, compression="zstd:3")
    assert codec_for(vol) is PLAIN
    vol.encryption = keys.new_encryption_table(keys.new_master_key(), "pw", None, volume_uuid="u")
    with pytest.raises(VolumeError):
        codec_for(vol)
    vol.keys = keys.unwrap(vol.encryption, "pw", None)
    assert codec_for(vol).encrypted
