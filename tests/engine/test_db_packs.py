"""Engine tests of the typed pack and queue functions (cas/db/queue.py, cas/db/packs.py)
where their lock rules matter, on the real MariaDB (docs/metadata-packs.md).

Each test holds a transaction open on one connection and checks what another
connection's statement does meanwhile: skips the locked rows (the uploader's claim),
or waits for them and then decides right (gc's delete of a pack row against a
snapshot's pin of it). A wait is observed in information_schema.processlist (the
waiting connection still inside its statement), never assumed from time.
"""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import pymysql.cursors
import pymysql.err

import cas.maint.gc
import cas.db.database
import cas.tier.snapshot
import cas.db.chunks as dbchunks
from cas.db import packs as pack_rows
from cas.db.batch import BATCH_ROWS
from cas.db import queue as queue_rows
import cas.db.volume as dbvolume
from tests.engine.test_cloud import CloudEngine, ceng, rand  # noqa: F401 - ceng is a fixture
from tests.engine.test_fs import CS, make_file
from tests.waiting import wait_for

T = TypeVar("T")


@contextmanager
def open_transaction(db: cas.db.database.Database) -> Iterator[pymysql.cursors.Cursor]:
    """A transaction on ``db``'s connection left open for the ``with`` body (it holds
    whatever locks the body's statements take); rolled back at the end."""
    db.conn.begin()
    try:
        with db.conn.cursor() as cur:
            yield cur
    finally:
        db.conn.rollback()


def in_thread(fn: Callable[[], T]) -> tuple[threading.Thread, list[T], list[BaseException]]:
    """Run ``fn`` in a started thread; its result or exception lands in the lists."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            err.append(exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out, err


def blocked_in(ceng: CloudEngine, db: cas.db.database.Database, statement: str) -> bool:
    """Whether ``db``'s connection is inside a statement matching ``statement`` (a LIKE
    pattern) right now: a one-row lookup by key stays there only while it waits for a
    row lock. (information_schema.processlist: MariaDB lists a locking read that waits
    during optimization in innodb_trx only sometimes.)"""
    return bool(ceng.q("SELECT 1 FROM information_schema.processlist WHERE id = %s AND command = 'Query' "
                       "AND info LIKE %s", (db.conn.thread_id(), statement), sync=False))


def confirmed_pack(db: cas.db.database.Database, name: str) -> int:
    """A confirmed pack row with no entry (what gc finds dead), made with the typed
    functions as the uploader makes one; returns its id."""
    def body(cur: pymysql.cursors.Cursor) -> int:
        pack = pack_rows.insert_uploading(cur, name, 100, b"\1" * 16, b"\2" * 32, "test:1:x", 600)
        pack_rows.mark_confirmed(cur, pack, f"object-of-{name}")
        return pack
    return db.transaction(body)


def test_claim_skips_queue_rows_another_transaction_holds(ceng: CloudEngine) -> None:
    for i in range(6):
        make_file(ceng.fs, b"f%d" % i, rand(CS, 700 + i))
    ceng.fs.sync()
    queued = {bytes(r[0]) for r in ceng.q("SELECT chunk FROM upload_queue")}
    assert len(queued) == 6
    tier = ceng.tier(pack_size=1 << 20)
    with ceng.other() as a, ceng.other() as b:
        with open_transaction(a.db) as ca:
            held = queue_rows.claim(ca, 2)
            assert len(held) == 2
            assert [q.queued for q in held] == sorted(q.queued for q in held)
            # a second claim neither waits for the held rows nor returns them
            b.db.execute("SET SESSION innodb_lock_wait_timeout = 1")
            with open_transaction(b.db) as cb:
                rest = queue_rows.claim(cb, 100)
            assert {q.chunk for q in rest} == queued - {q.chunk for q in held}
            # the uploader's whole claim (its own transaction) packs only the free rows
            claim = tier._claim()
            assert claim is not None
            _, _, layout = claim
            assert {c for c, _, _ in layout} == queued - {q.chunk for q in held}
        # the held rows were never claimed: once free, the next claim takes them
        claim = tier._claim()
        assert claim is not None
        assert {c for c, _, _ in claim[2]} == {q.chunk for q in held}
    assert ceng.q("SELECT COUNT(*) FROM upload_queue WHERE pack IS NULL")[0][0] == 0


def test_a_pin_under_way_keeps_gc_from_deleting_its_pack(ceng: CloudEngine) -> None:
    tier = ceng.tier()
    pack = confirmed_pack(tier.db, "casfs-pack-pinned")
    assert [d.id for d in pack_rows.dead(tier.db)] == [pack]
    with ceng.other() as snap:
        with open_transaction(snap.db) as cur:
            # a snapshot pins the pack: shared lock on its row, pin row not committed yet
            assert pack_rows.lock_confirmed_names(cur, ["casfs-pack-pinned"]) == 1
            pack_rows.insert_pins(cur, 7, ["casfs-pack-pinned"])
            t, out, err = in_thread(lambda: cas.maint.gc._drop_dead_pack(tier, pack))
            wait_for(lambda: blocked_in(ceng, tier.db, "SELECT name FROM packs WHERE id = %FOR UPDATE"),
                     "gc to wait for the pin's lock", 30)
            snap.db.conn.commit()
            t.join(60)
    assert not err and out == [False]                 # gc saw the pin after waiting for it
    assert ceng.q("SELECT COUNT(*) FROM packs WHERE id = %s", (pack,))[0][0] == 1
    assert pack_rows.pinned_names(tier.db) == {"casfs-pack-pinned"}
    pack_rows.unpin(tier.db, 7)                        # retention dropped the generation
    assert cas.maint.gc._drop_dead_pack(tier, pack) is True
    assert ceng.q("SELECT COUNT(*) FROM packs WHERE id = %s", (pack,))[0][0] == 0


def test_a_pack_gc_is_deleting_is_never_pinned(ceng: CloudEngine) -> None:
    tier = ceng.tier()
    pack = confirmed_pack(tier.db, "casfs-pack-dying")
    with ceng.other() as gc:
        with open_transaction(gc.db) as cur:
            # gc's delete protocol, uncommitted: exclusive lock, no entry, no pin, delete
            assert pack_rows.lock_confirmed_name(cur, pack) == "casfs-pack-dying"
            assert not pack_rows.has_entries(cur, pack)
            assert not pack_rows.is_pinned(cur, "casfs-pack-dying")
            pack_rows.delete_pack(cur, pack)
            t, out, err = in_thread(lambda: cas.tier.snapshot._pin(tier.db, 8, ["casfs-pack-dying"]))
            wait_for(lambda: blocked_in(ceng, tier.db, "SELECT id FROM packs WHERE name IN %LOCK IN SHARE MODE"),
                     "the pin to wait for gc's lock", 30)
            gc.db.conn.commit()
            t.join(60)
    assert not err and out == [False]                 # the snapshot is dumped again
    assert ceng.q("SELECT COUNT(*) FROM snapshot_packs WHERE generation = 8")[0][0] == 0


def test_enqueue_adds_each_chunk_once_in_batches_and_keeps_claims(ceng: CloudEngine) -> None:
    make_file(ceng.fs, b"a", rand(2 * CS, 800))
    ceng.fs.sync()
    tier = ceng.tier(pack_size=1 << 20)
    claim = tier._claim()
    assert claim is not None
    pack, _, layout = claim
    claimed = {c for c, _, _ in layout}
    ids = [hashlib.sha256(b"%d" % i).digest() for i in range(2 * BATCH_ROWS + 1)] + sorted(claimed)
    for _ in range(2):   # again: nothing added, nothing changed
        tier.db.transaction(lambda cur: queue_rows.enqueue(cur, ids))
        rows = {bytes(c): p for c, p in ceng.q("SELECT chunk, pack FROM upload_queue")}
        assert set(rows) == set(ids)
        assert {c for c, p in rows.items() if p is not None} == claimed
        assert {p for p in rows.values() if p is not None} == {pack}


def test_eviction_skips_rows_a_writer_holds_and_never_waits(ceng: CloudEngine) -> None:
    """``chunks.lock_evictable`` gets its victims least frequently used first, over
    several batches. A writer's group holds one victim's row (it is gaining a reference):
    the evictor takes every other victim, in id order, and returns at once without that
    one (SKIP LOCKED), so it can never wait in a lock cycle with the mount's group
    transaction (which the database would break by rolling the group back: EIO). Locking
    with a plain FOR UPDATE, it would wait for the writer's row."""
    ids = sorted(hashlib.sha256(b"evict %d" % i).digest() for i in range(2 * BATCH_ROWS + 3))
    refs = [dbchunks.ChunkRef(c, 100, 50, 1) for c in ids]
    tier = ceng.tier()
    tier.db.transaction(lambda cur: dbchunks.add_refs(cur, refs))
    pack = confirmed_pack(tier.db, "casfs-pack-evict")
    with ceng.admin.cursor() as cur:      # seeding: every chunk has its confirmed copy
        cur.executemany("INSERT INTO pack_entries (chunk, pack, pos, length) VALUES (%s, %s, %s, 50)",
                        [(c, pack, 50 * i) for i, c in enumerate(ids)])
    held = ids[BATCH_ROWS + 1]
    with ceng.other() as writer, ceng.other() as evictor:
        with open_transaction(writer.db) as cw:
            assert set(dbchunks.lock_gaining(cw, [held])) == {held}
            with open_transaction(evictor.db) as ce:
                t, out, err = in_thread(lambda: dbchunks.lock_evictable(ce, ids[::-1]))
                try:
                    wait_for(lambda: bool(out or err), "the evictor to return while the writer holds a row", 30)
                finally:
                    writer.db.conn.rollback()
                    t.join(60)
                evictor.db.conn.rollback()
    assert not err and out == [[c for c in ids if c != held]]


def test_two_first_snapshot_generations_differ(ceng: CloudEngine) -> None:
    """The first two snapshot generations of a volume (no ``snapshot_generation`` row
    yet), handed out by two processes at once, differ: the first one's transaction holds
    the key's row (``volume.lock_value`` creates it), so the second waits and counts on.
    Under READ COMMITTED a ``FOR UPDATE`` of the absent row locked nothing, and both got 1."""
    assert dbvolume.get(ceng.fs.db, "snapshot_generation") is None
    with ceng.other() as a, ceng.other() as b:
        with open_transaction(a.db) as ca:
            first = int(dbvolume.lock_value(ca, "snapshot_generation", "0")) + 1
            t, out, err = in_thread(lambda: cas.tier.snapshot._next_generation(b.db))
            try:
                wait_for(lambda: bool(out or err) or blocked_in(ceng, b.db, "INSERT INTO meta%"),
                         "the second generation to be handed out or to wait", 30)
                dbvolume.set_value(ca, "snapshot_generation", str(first))
                a.db.conn.commit()
            finally:
                a.db.conn.rollback()
                t.join(60)
    assert not err and first == 1 and out == [2]
    assert dbvolume.get(ceng.fs.db, "snapshot_generation") == "2"
