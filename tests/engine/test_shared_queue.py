"""The upload queue of a volume with several local stores (docs/sharing.md, "Data"),
without FUSE: queue rows name the writer's store, an uploader claims only its own
store's rows (NULL rows are the first store's), and a stale 'uploading' pack of another
store is only ever adopted, never released, by an uploader of another store."""
from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

import cas.db.database
from cas.db import queue as queue_rows
from cas.db import volume as volume_rows
from cas.tier.cloud import CloudTier
from cas.db.server import EmbeddedServer
from tests.engine.test_cloud import CloudEngine, rand
from tests.engine.test_fs import CS, make_file


@pytest.fixture
def shared(tmp_path: Path, mysql_server: EmbeddedServer) -> Iterator[CloudEngine]:
    e = CloudEngine(tmp_path, mysql_server)
    try:
        with e.other() as m:
            m.db.transaction(volume_rows.set_shared)
        e.reopen()
        yield e
    finally:
        e.close()


def side_tier(e: CloudEngine, tmp_path: Path) -> CloudTier:
    """An uploader of a second store of ``e``'s volume (its own chunk directory)."""
    vol_b = dataclasses.replace(e.vol, path=tmp_path / "side-b", store_id=secrets.token_hex(16))
    (vol_b.path / "chunks").mkdir(parents=True)
    m = cas.db.database.connect(vol_b)
    t = CloudTier(m, e.objects, e.cfg())
    e.tiers.append((t, m))
    return t


def test_an_uploader_claims_only_its_own_stores_rows(shared: CloudEngine, tmp_path: Path) -> None:
    e = shared
    make_file(e.fs, b"a", rand(6 * CS, 31))
    e.fs.sync()
    first = queue_rows.first_store(e.vol.uuid)
    assert e.vol.store == first
    assert {r[0] for r in e.q("SELECT store FROM upload_queue")} == {first}   # never NULL
    a, b = e.tier(pack_size=1 << 20), side_tier(e, tmp_path)
    assert a.shared and b.shared and a.pack_age_s <= 2.0
    assert b._claim() is None and b.drain(5) == 0          # A's bytes are not in B's store
    assert e.q("SELECT COUNT(*) FROM upload_queue WHERE pack IS NULL")[0][0] == 6
    e.q("UPDATE upload_queue SET store = NULL")            # rows queued before schema 5
    assert b._claim() is None
    claim = a._claim()                                     # the first store's, NULL or not
    assert claim is not None and len(claim[2]) == 6
    pack = claim[0]
    # the claim's lease runs out (A died on another host): B only adopts a complete
    # object, and there is none, so the pack and its claims stay for A
    e.q("UPDATE packs SET lease_until = NOW(6) - INTERVAL 1 SECOND, owner = 'elsewhere:1:x' WHERE id = %s",
        (pack,))
    b.recover()
    assert e.q("SELECT state FROM packs WHERE id = %s", (pack,)) == [("uploading",)]
    assert e.q("SELECT COUNT(*) FROM upload_queue WHERE pack = %s", (pack,))[0][0] == 6
    a.recover()                                            # A's own store: released, then uploaded
    assert not e.q("SELECT 1 FROM packs WHERE id = %s", (pack,))
    assert a.drain(30) > 0
    assert e.q("SELECT COUNT(*) FROM upload_queue")[0][0] == 0


def test_fsck_reads_chunk_states_and_queue_holders_in_one_snapshot(
        shared: CloudEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsck on side B while A's uploader confirms A's chunks: each chunk is either held by
    A's store (queued) or confirmed in the one snapshot fsck reads, never neither (which
    counted it missing: a false exit 1)."""
    from cas.maint import fsck
    e = shared
    make_file(e.fs, b"a", rand(4 * CS, 41))
    e.fs.sync()
    a = e.tier(pack_size=1 << 20)
    vol_b = dataclasses.replace(e.vol, path=tmp_path / "side-b", store_id=secrets.token_hex(16))
    (vol_b.path / "chunks").mkdir(parents=True)
    meta_b = cas.db.database.connect(vol_b)
    try:
        r = fsck.check(meta_b)
        assert r.clean and r.held_elsewhere == 4 and r.cloud_only == 0
        real = queue_rows.per_store
        confirmed: list[int] = []

        def confirm_then_read(src: object, first: str) -> list[queue_rows.StoreQueue]:
            if not confirmed:   # A's upload commits between fsck's reads of chunks and queue
                confirmed.append(a.drain(30))
            return real(src, first)   # type: ignore[arg-type]
        monkeypatch.setattr(queue_rows, "per_store", confirm_then_read)
        r = fsck.check(meta_b)
        assert confirmed and confirmed[0] > 0
        assert not e.q("SELECT 1 FROM upload_queue")
        assert r.clean and not r.missing_files, r
        assert r.held_elsewhere + r.cloud_only == 4
        monkeypatch.setattr(queue_rows, "per_store", real)
        r = fsck.check(meta_b)
        assert r.clean and r.cloud_only == 4 and r.held_elsewhere == 0
    finally:
        meta_b.close()


def _evict_probing_row_locks(e: CloudEngine, t: CloudTier, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Evict everything from ``t``'s store; each time it deletes a file, probe (from the
    test's own connection, ``FOR UPDATE NOWAIT``) whether that chunk's row lock is held.
    Returns one bool per file deleted: True = the row was locked (gc could not delete it
    and a writer could not re-create it meanwhile)."""
    import pymysql
    real = t.store.delete
    held: list[bool] = []

    def probing_delete(cid: bytes) -> bool:
        try:
            e.q("SELECT id FROM chunks WHERE id = %s FOR UPDATE NOWAIT", (cid,), sync=False)
            held.append(False)
        except pymysql.err.OperationalError:
            held.append(True)
        return real(cid)
    monkeypatch.setattr(t.store, "delete", probing_delete)
    t.evict(0)
    return held


def test_shared_eviction_deletes_files_under_the_row_locks(shared: CloudEngine,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    e = shared
    make_file(e.fs, b"a", rand(4 * CS, 51))
    assert e.drain() > 0
    t = e.tier(local_limit=0)
    assert t.shared
    held = _evict_probing_row_locks(e, t, monkeypatch)
    assert held and all(held), held
    assert not list(t.store.iter_ids())


def test_eviction_deletes_files_under_the_row_locks(tmp_path: Path, mysql_server: EmbeddedServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    e = CloudEngine(tmp_path, mysql_server)
    try:
        make_file(e.fs, b"a", rand(4 * CS, 52))
        assert e.drain() > 0
        t = e.tier(local_limit=0)
        assert not t.shared
        held = _evict_probing_row_locks(e, t, monkeypatch)
        assert held and all(held), held
        assert not list(t.store.iter_ids())
        assert e.q("SELECT COUNT(*) FROM chunks WHERE is_local = 1")[0][0] == 0
    finally:
        e.close()


def test_a_row_whose_file_is_elsewhere_is_kept_and_adopted_by_the_store_holding_it(
        shared: CloudEngine, tmp_path: Path) -> None:
    """A queue row naming store B for a chunk only A's store holds (what enabling the
    tier on B queued before the fix): B's uploader keeps it (a drain ends, it does not
    wait for its deadline), and A adopts it at its next mount start (queue_held)."""
    from cas.tier.cloud import queue_held
    e = shared
    make_file(e.fs, b"a", rand(3 * CS, 61))
    e.fs.sync()
    a, b = e.tier(pack_size=1 << 20), side_tier(e, tmp_path)
    stray = bytes(e.q("SELECT chunk FROM upload_queue ORDER BY chunk LIMIT 1")[0][0])
    e.q("UPDATE upload_queue SET store = %s WHERE chunk = %s", (b.scope.store, stray))
    assert b.drain(30) == 0                       # ends: nothing of B's is uploadable here
    assert e.q("SELECT store FROM upload_queue WHERE chunk = %s", (stray,)) == [(b.scope.store,)]
    assert a.drain(30) > 0
    assert [bytes(r[0]) for r in e.q("SELECT chunk FROM upload_queue")] == [stray]
    assert queue_held(a.db, a.store, a.scope.store, e.vol.uuid) == 1
    assert e.q("SELECT store FROM upload_queue WHERE chunk = %s", (stray,)) == [(a.scope.store,)]
    assert a.drain(30) > 0
    assert not e.q("SELECT 1 FROM upload_queue")
    assert not e.q("SELECT 1 FROM chunks c LEFT JOIN pack_entries p ON p.chunk = c.id WHERE p.chunk IS NULL")
