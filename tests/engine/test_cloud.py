"""Engine tests of the cloud tier (cas.tier.cloud, cas.maint.gc.collect_cloud) on a directory store.

The store is cas.tier.objstore.DirObjectStore (the same ObjectStore interface the Drive
store implements and passes the same conformance suite), so these tests exercise the
queue, packs, confirmation, eviction, fetch, recovery, gc and restore logic without
HTTP; tests/test_drive.py runs the same paths against the Drive test server. Expected
figures are computed from the bytes written (hashlib), never taken from the engine.
"""
from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import cas.tier.cloud
import cas.engine.fs
import cas.maint.gc
import cas.db.database
import cas.chunk.store
import cas.config.volume
from cas.tier.cloud import CloudConfig, CloudTier
from cas.errors import FsError
from cas.tier.objstore import DirObjectStore
from cas.db.server import EmbeddedServer
from tests.engine.test_fs import CS, Engine, make_file, read_name, slots_of


class CloudEngine(Engine):
    """An Engine whose volume has the cloud tier enabled on a directory store."""

    def __init__(self, tmp_path: Path, server: EmbeddedServer) -> None:
        super().__init__(tmp_path, server)
        self.objdir = tmp_path / "cloud"
        self.objects = DirObjectStore(self.objdir)
        with self.other() as m:
            cas.tier.cloud.enable(m.db)
        self.reopen()
        self.tiers: list[tuple[CloudTier, cas.db.database.Metadata]] = []

    def cfg(self, **kw: object) -> CloudConfig:
        c = CloudConfig(endpoint=f"file:{self.objdir}", pack_size=256 << 10, read_attempts=2)
        for k, v in kw.items():
            setattr(c, k, v)
        return c

    def tier(self, attach: bool = False, local_limit: int | None = None, **kw: object) -> CloudTier:
        """A CloudTier on its own connection; ``attach`` makes the Filesystem use it."""
        m = self.other()
        t = CloudTier(m, self.objects, self.cfg(**kw), local_limit=local_limit)
        self.tiers.append((t, m))
        if attach:
            self.fs.attach_cloud(t)
        return t

    def drain(self, **kw: object) -> int:
        self.fs.sync()
        t = self.tier(**kw)
        return t.drain(30)

    def pack_blobs(self) -> dict[str, bytes]:
        """object id -> bytes, for every object in the store (read directly)."""
        return {p.name: p.read_bytes() for p in self.objdir.iterdir()
                if not p.name.startswith(".") and not p.name.endswith(".name")}

    def close(self) -> None:
        for t, m in self.tiers:
            t.close()
            m.close()
        super().close()


@pytest.fixture
def ceng(tmp_path: Path, mysql_server: EmbeddedServer) -> Iterator[CloudEngine]:
    e = CloudEngine(tmp_path, mysql_server)
    try:
        yield e
    finally:
        e.close()


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def uploaded_chunks(e: CloudEngine) -> list[bytes]:
    """Chunk ids found in the store's objects, by cutting each pack at the recorded
    positions and hashing the plaintext (independent of pack_entries' claims)."""
    from cas.chunk.envelope import open_envelope
    blobs = e.pack_blobs()
    out = []
    rows = e.q("SELECT e.chunk, p.object_id, e.pos, e.length FROM pack_entries e JOIN packs p ON p.id = e.pack")
    for cid, oid, pos, n in rows:
        data = open_envelope(blobs[oid][pos:pos + n], bytes(cid))
        out.append(hashlib.sha256(data).digest())
    return out


def test_upload_each_chunk_once_and_duplicates_add_nothing(ceng: CloudEngine) -> None:
    a, b = rand(20 * CS, 1), rand(7 * CS + 123, 2)
    make_file(ceng.fs, b"a", a)
    make_file(ceng.fs, b"b", b + a[:3 * CS])          # shares 3 chunks with a
    expect = {hashlib.sha256(p).digest() for c in (a, b + a[:3 * CS]) for p in slots_of(c).values()}
    assert {bytes(r[0]) for r in ceng.q("SELECT chunk FROM upload_queue")} == expect
    n = ceng.drain()
    assert n > 0
    got = uploaded_chunks(ceng)
    assert sorted(got) == sorted(expect)                # every chunk once, verified by hash
    assert ceng.q("SELECT COUNT(*) FROM upload_queue")[0][0] == 0
    sizes = [len(b) for b in ceng.pack_blobs().values()]
    assert sum(sizes) == sum(r[0] for r in ceng.q("SELECT stored_length FROM chunks"))
    assert all(s <= 256 << 10 for s in sizes) and len(sizes) >= 2   # packs respect pack_size
    before = ceng.pack_blobs()
    make_file(ceng.fs, b"c", a)                          # the same data again
    make_file(ceng.fs, b"d", b + a[:3 * CS])
    assert ceng.drain() == 0
    assert ceng.pack_blobs() == before


def test_pack_rows_record_checksums_of_what_the_store_holds(ceng: CloudEngine) -> None:
    make_file(ceng.fs, b"a", rand(5 * CS, 3))
    ceng.drain()
    for oid, size, md5, sha in ceng.q("SELECT object_id, size, md5, sha256 FROM packs WHERE state = 'confirmed'"):
        blob = ceng.pack_blobs()[oid]
        assert len(blob) == size
        assert hashlib.md5(blob).digest() == bytes(md5) and hashlib.sha256(blob).digest() == bytes(sha)


def test_small_queue_waits_for_pack_age_unless_forced(ceng: CloudEngine) -> None:
    make_file(ceng.fs, b"a", rand(CS, 4))
    ceng.fs.sync()
    t = ceng.tier(pack_age_s=3600, pack_size=32 << 20)
    assert t.upload_one() == 0                  # neither full nor old
    assert ceng.pack_blobs() == {}
    assert t.upload_one(force=True) > 0
    t2 = ceng.tier(pack_age_s=0)
    make_file(ceng.fs, b"b", rand(CS, 5))
    ceng.fs.sync()
    assert t2.upload_one() > 0                  # old enough at age 0


def test_evict_everything_then_read_back_from_the_cloud(ceng: CloudEngine) -> None:
    files = {b"f%d" % i: rand(random.Random(i).randrange(1, 6 * CS), 10 + i) for i in range(6)}
    for name, data in files.items():
        make_file(ceng.fs, name, data)
    make_file(ceng.fs, b"late", rand(3 * CS, 99), flush=True)
    ceng.drain()
    extra = rand(2 * CS, 98)
    make_file(ceng.fs, b"queued", extra)   # written after the drain: still queued
    ceng.fs.sync()
    t = ceng.tier(local_limit=0)
    evicted, _ = t.evict(0)
    queued = {hashlib.sha256(p).digest() for p in slots_of(extra).values()}
    on_disk = set(ceng.store_files())
    assert on_disk == queued                    # only what is not confirmed stays
    assert evicted == len(ceng.q("SELECT id FROM chunks WHERE is_local = 0"))
    st = ceng.stats()
    assert st.cloud_only_chunks == evicted and st.local_only_chunks == len(queued)
    fs = ceng.reopen(cache_bytes=0)
    reader = ceng.tier()
    fs.attach_cloud(reader)
    for name, data in files.items():
        assert read_name(fs, name) == data
    assert read_name(fs, b"late") == rand(3 * CS, 99)
    reader.flush_local_marks()
    back = set(ceng.store_files())             # fetched chunks are kept locally again
    assert back > queued
    assert all(ceng.q("SELECT is_local FROM chunks WHERE id = %s", (c,))[0][0] == 1 for c in back)
    assert ceng.fsck().clean


def test_eviction_prefers_rarely_read_chunks(ceng: CloudEngine) -> None:
    hot, cold = rand(4 * CS, 20), rand(4 * CS, 21)
    make_file(ceng.fs, b"hot", hot)
    make_file(ceng.fs, b"cold", cold)
    ceng.drain()
    t = ceng.tier(attach=True)
    for _ in range(5):
        ceng.fs.cache.clear()
        read_name(ceng.fs, b"hot")
    read_name(ceng.fs, b"cold")
    hot_ids = {hashlib.sha256(p).digest() for p in slots_of(hot).values()}
    total = sum(ceng.store_files().values())
    t.evict(total // 2)
    assert hot_ids <= set(ceng.store_files())


def test_unreachable_store_gives_eio_not_a_hang(ceng: CloudEngine) -> None:
    data = rand(3 * CS, 30)
    make_file(ceng.fs, b"a", data)
    ceng.drain()
    ceng.tier().evict(0)
    for p in ceng.objdir.iterdir():          # the cloud copies are gone
        p.unlink()
    fs = ceng.reopen(cache_bytes=0)
    fs.attach_cloud(ceng.tier())
    ino = fs.lookup(1, b"a").ino
    fs.open(ino)
    with pytest.raises(FsError) as ei:
        fs.read(ino, 0, CS)
    fs.release(ino)
    assert ei.value.errno == 5


def test_two_uploaders_sharing_the_database_upload_each_chunk_once(ceng: CloudEngine) -> None:
    for i in range(12):
        make_file(ceng.fs, b"f%d" % i, rand(3 * CS, 40 + i))
    ceng.fs.sync()
    tiers = [ceng.tier(pack_size=CS + 4096), ceng.tier(pack_size=CS + 4096)]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(t: CloudTier) -> None:
        try:
            start.wait()
            t.drain(60)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(t,)) for t in tiers]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert sum(t.uploaded_packs for t in tiers) == len(ceng.pack_blobs()) == 36   # one chunk a pack
    got = uploaded_chunks(ceng)
    assert len(got) == len(set(got)) == 36
    assert sum(len(b) for b in ceng.pack_blobs().values()) == sum(
        r[0] for r in ceng.q("SELECT stored_length FROM chunks"))   # no byte uploaded twice


def _dead_owner() -> str:
    pid = 4_000_000   # above pid_max: never running
    return f"{socket.gethostname()}:{pid}:dead"


def _claimed_by_dead_uploader(ceng: CloudEngine, data: bytes) -> tuple[int, str, bytes]:
    """Write ``data`` and let an uploader that then "dies" claim it and build its pack
    (row, layout and checksums recorded, nothing uploaded). Returns (pack, name, blob)."""
    make_file(ceng.fs, b"a", data)
    ceng.fs.sync()
    t = ceng.tier(pack_size=1 << 20)
    t.owner = _dead_owner()
    claim = t._claim()
    assert claim is not None
    pack, name, layout = claim
    blob = t._build(layout)
    assert blob is not None
    ceng.q("UPDATE packs SET md5 = %s, sha256 = %s WHERE id = %s",
           (hashlib.md5(blob).digest(), hashlib.sha256(blob).digest(), pack))
    return pack, name, blob


def test_recovery_adopts_a_completed_upload_of_a_dead_uploader(ceng: CloudEngine) -> None:
    _, name, blob = _claimed_by_dead_uploader(ceng, rand(4 * CS, 50))
    cas.tier.cloud.put_checked(ceng.objects, name, blob, ceng.vol.uuid)   # ... and then it died
    fresh = ceng.tier()
    assert fresh.recover() == 1
    assert len(ceng.pack_blobs()) == 1                     # adopted, not uploaded again
    assert fresh.drain(10) == 0
    assert len(ceng.pack_blobs()) == 1
    assert sorted(uploaded_chunks(ceng)) == sorted(hashlib.sha256(p).digest()
                                                   for p in slots_of(rand(4 * CS, 50)).values())


def test_recovery_releases_a_partial_upload_and_deletes_its_object(ceng: CloudEngine) -> None:
    data = rand(4 * CS, 51)
    _, name, blob = _claimed_by_dead_uploader(ceng, data)
    ceng.objects.put(name, blob[: len(blob) // 2],         # a truncated object of that name
                     {"casfs_volume": ceng.vol.uuid})
    fresh = ceng.tier()
    assert fresh.recover() == 1
    assert ceng.pack_blobs() == {}
    assert ceng.q("SELECT COUNT(*) FROM upload_queue WHERE pack IS NULL")[0][0] == 4
    fresh.drain(10)
    assert sorted(uploaded_chunks(ceng)) == sorted(hashlib.sha256(p).digest() for p in slots_of(data).values())


def test_live_lease_of_another_uploader_is_left_alone(ceng: CloudEngine) -> None:
    make_file(ceng.fs, b"a", rand(2 * CS, 52))
    ceng.fs.sync()
    busy = ceng.tier()
    busy.owner = "otherhost:1:x"
    assert busy._claim() is not None
    assert ceng.tier().recover() == 0
    assert ceng.q("SELECT COUNT(*) FROM packs WHERE state = 'uploading'")[0][0] == 1


def test_gc_deletes_empty_packs_rewrites_sparse_ones_and_keeps_data_readable(ceng: CloudEngine) -> None:
    keep = {b"k%d" % i: rand(2 * CS, 60 + i) for i in range(3)}
    drop = {b"d%d" % i: rand(6 * CS, 70 + i) for i in range(3)}
    for name in sorted(keep):   # interleave so each pack holds a little live data
        make_file(ceng.fs, name, keep[name])
        make_file(ceng.fs, b"d" + name[1:], drop[b"d" + name[1:]])
    solo = rand(5 * CS, 80)
    make_file(ceng.fs, b"solo", solo)
    ceng.drain(pack_size=600 << 10)
    packs_before = set(ceng.pack_blobs())
    for name in drop:
        ceng.fs.unlink(1, name)
    ceng.fs.unlink(1, b"solo")
    ceng.gc(0)
    t = ceng.tier(pack_size=600 << 10)
    r = cas.maint.gc.collect_cloud(t, grace_s=0)
    assert r.packs_rewritten >= 1 and r.new_packs >= 1 and r.packs_deleted >= 1
    after = ceng.pack_blobs()
    assert not (packs_before & set(after)) or len(after) < len(packs_before)
    live_ids = {hashlib.sha256(p).digest() for d in keep.values() for p in slots_of(d).values()}
    assert sorted(uploaded_chunks(ceng)) == sorted(live_ids)
    assert sum(len(b) for b in after.values()) == sum(
        r[0] for r in ceng.q("SELECT stored_length FROM chunks WHERE refcount > 0"))   # nothing dead left
    ceng.tier().evict(0)
    fs = ceng.reopen(cache_bytes=0)
    fs.attach_cloud(ceng.tier())
    for name, data in keep.items():
        assert read_name(fs, name) == data


def test_gc_removes_orphan_objects_after_the_grace_period(ceng: CloudEngine) -> None:
    make_file(ceng.fs, b"a", rand(2 * CS, 90))
    ceng.drain()
    stray = ceng.objects.put("casfs-pack-stray", b"x" * 1000, {"casfs_volume": ceng.vol.uuid})
    others = [ceng.objects.put("casfs-pack-other", b"y" * 10, {"casfs_volume": "another-volume"}).id,
              ceng.objects.put("casfs-pack-nobody", b"z" * 10).id]
    t = ceng.tier()
    assert cas.maint.gc.collect_cloud(t, grace_s=3600).orphans_deleted == 0
    r = cas.maint.gc.collect_cloud(t, grace_s=0)
    assert r.orphans_deleted == 1 and r.orphan_bytes_deleted == 1000
    assert stray.id not in ceng.pack_blobs()
    assert set(others) <= set(ceng.pack_blobs())          # not this volume's: never deleted
    assert len(ceng.pack_blobs()) == 3


def test_chunk_collected_while_its_pack_uploads_is_not_recorded(ceng: CloudEngine) -> None:
    data = rand(2 * CS, 91)
    make_file(ceng.fs, b"a", data)
    ceng.fs.sync()
    t = ceng.tier()
    claim = t._claim()
    assert claim is not None
    pack, name, layout = claim
    blob = t._build(layout)
    assert blob is not None
    ceng.fs.unlink(1, b"a")
    ceng.gc(0)                                   # chunk rows gone while "uploading"
    info = ceng.objects.put(name, blob, {"casfs_volume": ceng.vol.uuid})
    assert t._confirm(pack, info, t.owner)
    assert ceng.q("SELECT COUNT(*) FROM pack_entries")[0][0] == 0
    assert cas.maint.gc.collect_cloud(t, grace_s=0).packs_deleted == 1
    assert ceng.pack_blobs() == {}


def test_restore_rebuilds_a_lost_local_store(ceng: CloudEngine) -> None:
    files = {b"f%d" % i: rand(3 * CS + i, 100 + i) for i in range(4)}
    for name, data in files.items():
        make_file(ceng.fs, name, data)
    ceng.drain()
    lost = rand(CS, 200)
    make_file(ceng.fs, b"never-uploaded", lost)
    ceng.fs.sync()
    ceng.fs.close()
    ceng.opened.remove(ceng.fs)
    import shutil
    shutil.rmtree(ceng.vol.chunk_dir)
    os.mkdir(ceng.vol.chunk_dir)
    t = ceng.tier()
    r = cas.tier.cloud.restore(t)
    assert r.restored == sum(len(slots_of(d)) for d in files.values())
    assert r.lost == [hashlib.sha256(lost).hexdigest()]
    ceng.fs = ceng.new_fs(cache_bytes=0)
    for name, data in files.items():
        assert read_name(ceng.fs, name) == data
    rep = ceng.fsck()
    assert rep.missing_files == [hashlib.sha256(lost).hexdigest()]


def test_lazy_restore_marks_missing_chunks_cloud_only(ceng: CloudEngine) -> None:
    data = rand(3 * CS, 300)
    make_file(ceng.fs, b"a", data)
    ceng.drain()
    for c in list(ceng.store_files()):
        os.unlink(ceng.vol.chunk_dir / c.hex()[:2] / c.hex()[2:4] / c.hex())
    r = cas.tier.cloud.restore(ceng.tier(), lazy=True)
    assert r.marked_remote == 3 and r.restored == 0 and not r.lost
    assert ceng.stats().cloud_only_chunks == 3
    fs = ceng.reopen(cache_bytes=0)
    fs.attach_cloud(ceng.tier())
    assert read_name(fs, b"a") == data


def test_writer_rereferencing_an_evicted_chunk_keeps_it_readable(ceng: CloudEngine) -> None:
    data = rand(2 * CS, 400)
    make_file(ceng.fs, b"a", data)
    ceng.drain()
    ceng.fs.unlink(1, b"a")
    ceng.fs.sync()
    ceng.tier().evict(0)                         # refcount 0, evicted, still in the cloud
    make_file(ceng.fs, b"b", data)               # the same bytes again
    ceng.fs.sync()
    assert ceng.q("SELECT COUNT(*) FROM chunks WHERE is_local = 1")[0][0] == 2   # rewritten locally
    fs = ceng.reopen(cache_bytes=0)
    assert read_name(fs, b"b") == data
    assert ceng.fsck().clean


def test_config_round_trip_and_bad_values(ceng: CloudEngine) -> None:
    from cas.errors import VolumeError
    ceng.vol.drive = {"endpoint": "http://127.0.0.1:1/", "pack_size": 1 << 20, "repack_threshold": 0.25}
    ceng.vol.save()
    v = cas.config.volume.open_volume(str(ceng.vol.path))
    cfg = CloudConfig.from_volume(v)
    assert (cfg.endpoint, cfg.pack_size, cfg.repack_threshold) == ("http://127.0.0.1:1/", 1 << 20, 0.25)
    assert cfg.folder == f"casfs-{v.uuid}"
    for bad in ({"nope": 1}, {"pack_size": "big"}, {"repack_threshold": 2.0}):
        v.drive = bad
        with pytest.raises(VolumeError):
            CloudConfig.from_volume(v)


def test_queued_chunk_whose_file_is_lost_leaves_the_queue(ceng: CloudEngine,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    data = rand(3 * CS, 500)
    make_file(ceng.fs, b"a", data)
    ceng.fs.sync()
    lost = hashlib.sha256(data[:CS]).digest()
    os.unlink(ceng.vol.chunk_dir / lost.hex()[:2] / lost.hex()[2:4] / lost.hex())   # disk damage
    with caplog.at_level("ERROR", logger="cas.tier.cloud"):
        ceng.drain()
    assert ceng.q("SELECT COUNT(*) FROM upload_queue")[0][0] == 0     # no endless retry
    assert lost not in set(uploaded_chunks(ceng)) and len(uploaded_chunks(ceng)) == 2
    assert any(lost.hex() in r.getMessage() for r in caplog.records)
    assert ceng.fsck().missing_files == [lost.hex()]


def read_in_chunks(fs: cas.engine.fs.Filesystem, ino: int, size: int) -> bytes:
    """``size`` bytes of ``ino`` read sequentially, one chunk per read (as a reader would)."""
    fs.open(ino)
    try:
        return b"".join(fs.read(ino, off, CS) for off in range(0, size, CS))
    finally:
        fs.release(ino)


def test_read_ahead_is_per_file_and_offers_each_slot_once(ceng: CloudEngine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A file streaming from the cloud does not make sequential reads of local files
    look for evicted chunks (the gate used to be mount-wide: every read of any file for
    5 s after a fetch built candidate lists and stat'ed each), and a cold sequential
    read examines each of its slots once, not the whole window at every read."""
    n = 24
    cold, hot = rand(n * CS, 51), rand(n * CS, 52)
    make_file(ceng.fs, b"cold", cold)
    ceng.drain()
    ceng.tier(local_limit=0).evict(0)
    make_file(ceng.fs, b"hot", hot)            # after the drain: queued, local only
    fs = ceng.reopen(cache_bytes=0)
    reader = ceng.tier()
    fs.attach_cloud(reader)
    stats = [0]
    real_stat = cas.chunk.store.LocalStore.stat

    def counted(self: cas.chunk.store.LocalStore, cid: bytes) -> object:
        stats[0] += 1
        return real_stat(self, cid)
    monkeypatch.setattr(cas.chunk.store.LocalStore, "stat", counted)

    assert read_in_chunks(fs, fs.lookup(1, b"cold").ino, n * CS) == cold
    assert reader.fetches >= 1
    assert stats[0] <= n + 1     # the first chunk's stat at offset 0, then each slot once
    stats[0] = 0
    assert read_in_chunks(fs, fs.lookup(1, b"hot").ino, n * CS) == hot
    assert stats[0] <= 1         # only the offset-0 check of the first chunk
