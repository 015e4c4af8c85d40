"""The cloud tier of an encrypted volume (engine level, directory object store): gc
rewrites sparse packs by opening and copying their encrypted envelopes, restore and
eviction read them back (docs/encryption.md)."""
from __future__ import annotations

import hashlib

import cas.tier.cloud
import cas.maint.gc
from cas.config import keys
from cas.chunk.envelope import ChunkCodec, codec_for
from tests.engine.test_cloud import CloudEngine, ceng, rand  # noqa: F401
from tests.engine.test_fs import CS, make_file, read_name, slots_of


def encrypt(e: CloudEngine) -> ChunkCodec:
    """Make ``e``'s (still empty) volume an encrypted one and reopen its Filesystem."""
    e.vol.encryption = keys.new_encryption_table(keys.new_master_key(), "pw", None, volume_uuid=e.vol.uuid)
    e.vol.save()
    keys.unlock(e.vol, "pw")
    e.reopen()
    return codec_for(e.vol)


def test_gc_repacks_restores_and_reads_encrypted_packs(ceng: CloudEngine) -> None:  # noqa: F811
    codec = encrypt(ceng)
    keep = {b"k%d" % i: rand(2 * CS, 60 + i) for i in range(3)}
    drop = {b"d%d" % i: rand(6 * CS, 70 + i) for i in range(3)}
    for name in sorted(keep):   # interleave so each pack holds a little live data
        make_file(ceng.fs, name, keep[name])
        make_file(ceng.fs, b"d" + name[1:], drop[b"d" + name[1:]])
    ceng.drain(pack_size=600 << 10)
    for name in drop:
        ceng.fs.unlink(1, name)
    ceng.gc(0)
    r = cas.maint.gc.collect_cloud(ceng.tier(pack_size=600 << 10), grace_s=0)
    assert r.packs_rewritten >= 1 and r.new_packs >= 1
    blobs = ceng.pack_blobs()
    live = {codec.chunk_id(p) for d in keep.values() for p in slots_of(d).values()}
    found = set()
    for cid, oid, pos, n in ceng.q("SELECT e.chunk, p.object_id, e.pos, e.length FROM pack_entries e "
                                   "JOIN packs p ON p.id = e.pack"):
        env = blobs[oid][pos:pos + n]
        assert env[6:8] == b"\x00\x01"                         # every envelope in a pack is sealed
        found.add(codec.chunk_id(codec.open(env, bytes(cid))))
    assert found == live
    assert not live & {hashlib.sha256(p).digest() for d in keep.values() for p in slots_of(d).values()}
    for p in ceng.vol.chunk_dir.rglob("*"):                    # local store gone: restore from packs
        if p.is_file():
            p.unlink()
    res = cas.tier.cloud.restore(ceng.tier())
    assert res.restored == len(live) and not res.lost
    ceng.tier().evict(0)                                       # and read back from the packs
    fs = ceng.reopen(cache_bytes=0)
    fs.attach_cloud(ceng.tier())
    for name, data in keep.items():
        assert read_name(fs, name) == data
