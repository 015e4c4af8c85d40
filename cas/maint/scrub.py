"""Scrub: verify every local chunk file and, optionally, every confirmed pack on the cloud
tier; rate-limited and resumable (docs/integrity.md).

Local pass: every chunk row with ``is_local = 1``, in id order, is read from the local
store and verified (:func:`cas.chunk.envelope.open_envelope`: header, decompression, SHA-256
against the id). A chunk that fails, or whose file is missing while its row (read again)
still says ``is_local = 1``, is marked ``bad = 1``: dedup then never references it and
the next write of its bytes rewrites it (cas.chunk.manager invariant 4).

Cloud pass: every confirmed pack, in id order, is read with ranged reads of runs of its
recorded entries (``pack_entries``: chunk, offset, length) through
:meth:`cas.tier.cloud.CloudTier.read_object` (retried), and each envelope verified. All bad
copies are reported by pack. A chunk with a bad cloud copy and a good local file loses
the bad copy's location and is queued for upload again (eviction must never rely on a
bad copy); one without a good local file is marked bad.

Both passes persist a cursor in the ``meta`` table (keys ``scrub_local_cursor`` and
``scrub_cloud_cursor``: the last id verified, with the pass's counts) after every batch,
so a scrub that was interrupted continues where it stopped; ``restart`` starts over. A
finished pass deletes its cursor and records ``scrub_last_local`` / ``scrub_last_cloud``.
Reads are paced to ``rate`` bytes per second. Safe while the volume is mounted: it
writes nothing but bad marks, the re-queueing of chunks whose cloud copy is bad, and its
meta keys, in short transactions of its own connection (a mark waits at most for the
mount's next group commit).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pymysql.cursors

from cas.tier.cloud import CloudTier, set_meta
from cas.db import chunks as chunk_rows
from cas.db import packs as pack_rows
from cas.db import queue as queue_rows
from cas.db import volume as meta_rows
from cas.chunk.envelope import ChunkCodec, codec_for
from cas.errors import ChunkMissing, FsError
from cas.db.database import Database, Metadata
from cas.tier.objstore import ObjectNotFound, ObjectStoreError
from cas.chunk.store import LocalStore

log = logging.getLogger(__name__)

LOCAL_CURSOR = "scrub_local_cursor"
CLOUD_CURSOR = "scrub_cloud_cursor"
LOCAL_LAST = "scrub_last_local"
CLOUD_LAST = "scrub_last_cloud"
BATCH = 256            # chunk rows per query
SAVE_EVERY_S = 2.0     # seconds between cursor saves (and after every batch)
RUN_MAX = 8 << 20      # bytes: the longest ranged read of a pack in the cloud pass

Progress = Callable[[int], None]   # called with the bytes just verified


class Pacer:
    """Keeps an average of at most ``rate`` bytes per second (0: no limit) by sleeping
    after each :meth:`take` that gets ahead of the schedule."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.done = 0

    def take(self, n: int) -> None:
        """Account ``n`` bytes read; sleep until they fit the rate."""
        if self.rate <= 0:
            return
        self.done += n
        ahead = self.done / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


@dataclass
class PassResult:
    """One pass (local or cloud) of a scrub run. Counts are this run's; ``pass_*`` add
    what earlier, interrupted runs of the same pass found. Ids are hex chunk ids."""

    checked: int = 0
    bytes: int = 0
    bad: list[str] = field(default_factory=list)
    resumed: bool = False          # continued from a saved cursor
    complete: bool = False         # reached the end (the cursor is gone)
    skipped: bool = False          # local: done by the run whose cloud pass this one resumes
    pass_checked: int = 0
    pass_bad: int = 0
    bad_packs: dict[str, list[str]] = field(default_factory=dict)   # cloud: pack name -> bad ids
    errors: list[str] = field(default_factory=list)                 # cloud: packs not readable now
    requeued: list[str] = field(default_factory=list)   # cloud: bad copy dropped, good local one queued

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Plan:
    """What a scrub run has left to verify: chunks and bytes (stored envelope bytes)."""

    local_chunks: int
    local_bytes: int
    cloud_packs: int
    cloud_bytes: int


def _cursor(db: Database, key: str) -> dict[str, Any] | None:
    text = meta_rows.get(db, key)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def reset(db: Database) -> None:
    """Forget both cursors: the next scrub starts from the beginning."""
    meta_rows.delete_keys(db, (LOCAL_CURSOR, CLOUD_CURSOR))


def plan(db: Database, cloud: bool) -> Plan:
    """What is left to verify from the saved cursors (for progress totals)."""
    cur = _cursor(db, LOCAL_CURSOR)
    after = bytes.fromhex(cur["at"]) if cur else b""
    n, size = chunk_rows.local_totals_after(db, after)
    pn = pb = 0
    if cloud:
        cc = _cursor(db, CLOUD_CURSOR)
        pn, pb = pack_rows.totals_after(db, int(cc["at"]) if cc else 0)
    return Plan(n, size, pn, pb)


class _Budget:
    """How many more chunks this run may verify (``stop_after``; None: no limit)."""

    def __init__(self, stop_after: int | None) -> None:
        self.left = stop_after

    def spent(self) -> bool:
        return self.left is not None and self.left <= 0

    def use(self, n: int = 1) -> None:
        if self.left is not None:
            self.left -= n


def scrub_local(meta: Metadata, pacer: Pacer, progress: Progress | None = None,
                budget: _Budget | None = None) -> PassResult:
    """The local pass (module docstring), from the saved cursor. Raises MetaError."""
    db = meta.db
    store = LocalStore(meta.volume.chunk_dir)
    envelope = codec_for(meta.volume)
    # a shared volume: a file missing here is damage only for a chunk whose queue row
    # names this store (docs/sharing.md, "Data"); other stores hold theirs
    held = (meta.volume.store, queue_rows.first_store(meta.volume.uuid)) if meta_rows.is_shared(db) else None
    budget = budget or _Budget(None)
    saved = _cursor(db, LOCAL_CURSOR)
    res = PassResult(resumed=saved is not None)
    after = bytes.fromhex(saved["at"]) if saved else b""
    prior_checked = int(saved.get("checked", 0)) if saved else 0
    prior_bad = int(saved.get("bad", 0)) if saved else 0
    last_save = time.monotonic()

    def save() -> None:
        set_meta(db, {LOCAL_CURSOR: json.dumps({"at": after.hex(), "checked": prior_checked + res.checked,
                                                "bad": prior_bad + len(res.bad)})})
    try:
        while not budget.spent():
            rows = chunk_rows.local_after(db, after, BATCH)
            if not rows:
                res.complete = True
                break
            for cid, slen in rows:
                if budget.spent():
                    break
                n = _verify_local(db, store, cid, res, envelope, held)
                res.checked += 1
                res.bytes += n
                budget.use()
                after = cid
                pacer.take(n)
                if progress is not None:
                    progress(n or slen)
            if time.monotonic() - last_save >= SAVE_EVERY_S or budget.spent():
                save()
                last_save = time.monotonic()
    finally:
        if res.complete:
            meta_rows.delete_keys(db, (LOCAL_CURSOR,))
            set_meta(db, {LOCAL_LAST: f"{time.strftime('%Y-%m-%d %H:%M:%S')}: "
                                      f"{prior_checked + res.checked} chunks, {prior_bad + len(res.bad)} bad"})
        elif after:
            save()   # interrupted (stop_after, Ctrl-C, an error): continue here next time
    res.pass_checked = prior_checked + res.checked
    res.pass_bad = prior_bad + len(res.bad)
    return res


def _verify_local(db: Database, store: LocalStore, cid: bytes, res: PassResult, envelope: ChunkCodec,
                  held: tuple[str, str] | None = None) -> int:
    """Verify one local chunk; mark it bad when it fails. Returns the bytes read.
    ``held``: (this store, the first store) on a shared volume, where a missing file
    is damage only when the chunk's queue row names this store."""
    try:
        blob = store.get(cid)
    except ChunkMissing:
        if held is not None:
            if queue_rows.holder(db, cid, held[1]) == held[0] and store.stat(cid) is None:
                chunk_rows.mark_bad_if_held(db, [cid], held[0], held[1])
                log.error("scrub: chunk %s: local file of this store's unconfirmed chunk missing; "
                          "marked bad", cid.hex())
                res.bad.append(cid.hex())
            return 0
        # evicted or collected since our query? then its row no longer says is_local = 1
        if chunk_rows.is_local(db, cid) and store.stat(cid) is None:
            chunk_rows.mark_bad_if_local(db, [cid])
            log.error("scrub: chunk %s: local file missing; marked bad", cid.hex())
            res.bad.append(cid.hex())
        return 0
    except FsError as exc:   # an OS read error (EIO from the disk)
        log.error("scrub: chunk %s: %s; marked bad", cid.hex(), exc)
        chunk_rows.mark_bad(db, [cid])
        res.bad.append(cid.hex())
        return 0
    try:
        envelope.open(blob, cid)
    except FsError as exc:
        log.error("scrub: chunk %s fails verification (%s); marked bad", cid.hex(), exc)
        chunk_rows.mark_bad(db, [cid])
        res.bad.append(cid.hex())
    return len(blob)


def scrub_cloud(tier: CloudTier, pacer: Pacer, progress: Progress | None = None,
                budget: _Budget | None = None) -> PassResult:
    """The cloud pass (module docstring), from the saved cursor. Raises MetaError; a pack
    the store cannot give now (after retries) is listed in ``errors`` and left for the
    next run (the cursor stops before it)."""
    db = tier.db
    budget = budget or _Budget(None)
    saved = _cursor(db, CLOUD_CURSOR)
    res = PassResult(resumed=saved is not None)
    after = int(saved["at"]) if saved else 0
    prior_checked = int(saved.get("checked", 0)) if saved else 0
    prior_bad = int(saved.get("bad", 0)) if saved else 0
    stuck = False   # a pack could not be read: the cursor must not pass it

    def save() -> None:
        set_meta(db, {CLOUD_CURSOR: json.dumps({"at": after, "checked": prior_checked + res.checked,
                                                "bad": prior_bad + len(res.bad)})})
    try:
        packs = pack_rows.confirmed_after(db, after)
        for pack, name, oid in packs:
            if budget.spent():
                break
            entries = pack_rows.entries(db, pack)
            try:
                bad, nbytes = _verify_pack(tier, oid, entries, pacer, progress)
            except ObjectStoreError as exc:
                res.errors.append(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                stuck = True
                continue
            res.checked += len(entries)
            res.bytes += nbytes
            budget.use(len(entries))
            if bad:
                res.bad_packs[name] = [c.hex() for c in bad]
                res.bad.extend(c.hex() for c in bad)
                for cid in bad:
                    if _requeue(tier, cid, pack):
                        res.requeued.append(cid.hex())
            if not stuck:
                after = pack
                save()
        else:
            res.complete = not stuck
    finally:
        if res.complete:
            meta_rows.delete_keys(db, (CLOUD_CURSOR,))
            set_meta(db, {CLOUD_LAST: f"{time.strftime('%Y-%m-%d %H:%M:%S')}: "
                                      f"{prior_checked + res.checked} chunks, {prior_bad + len(res.bad)} bad"})
    res.pass_checked = prior_checked + res.checked
    res.pass_bad = prior_bad + len(res.bad)
    return res


def _requeue(tier: CloudTier, cid: bytes, pack: int) -> bool:
    """Settle chunk ``cid`` whose copy in ``pack`` is bad, under its row lock: when its
    local file is there and verifies, forget the bad copy (its ``pack_entries`` row) and
    queue the chunk for upload again, so eviction never relies on the bad copy; else no
    good copy is left: mark it bad (the next write of its bytes heals it). Returns True
    when the chunk was queued again."""
    def body(cur: pymysql.cursors.Cursor) -> bool:
        local = chunk_rows.lock_is_local(cur, cid)
        if local is None:
            return False   # collected meanwhile
        if local:
            try:
                tier.envelope.open(tier.store.get(cid), cid)
            except FsError:
                pass
            else:
                pack_rows.drop_entry(cur, cid, pack)
                queue_rows.requeue(cur, cid, tier.scope.store)   # our verified file goes up
                return True
        chunk_rows.mark_bad(cur, [cid])
        return False
    requeued = tier.db.transaction(body)
    if requeued:
        log.warning("scrub: chunk %s: bad cloud copy forgotten, queued for upload again", cid.hex())
    else:
        log.error("scrub: chunk %s: no good copy left; marked bad", cid.hex())
    return requeued


def _verify_pack(tier: CloudTier, oid: str, entries: list[pack_rows.Entry], pacer: Pacer,
                 progress: Progress | None) -> tuple[list[bytes], int]:
    """Read ``entries`` of pack object ``oid`` in runs of adjacent entries (at most
    RUN_MAX bytes per ranged read) and verify each envelope. Returns (bad chunk ids,
    bytes read). A missing object makes every entry bad; other store errors propagate."""
    bad: list[bytes] = []
    total = 0
    i = 0
    while i < len(entries):
        j = i + 1
        start = entries[i][1]
        end = start + entries[i][2]
        while j < len(entries) and entries[j][1] == end and end + entries[j][2] - start <= RUN_MAX:
            end += entries[j][2]
            j += 1
        try:
            data = tier.read_object(oid, start, end - start)
        except ObjectNotFound:
            data = b""
        for cid, pos, n in entries[i:j]:
            blob = data[pos - start:pos - start + n]
            try:
                if len(blob) != n:
                    raise ChunkMissing(f"chunk {cid.hex()}: pack object {oid} is short")
                tier.envelope.open(blob, cid)
            except FsError as exc:
                log.error("scrub: the cloud copy of chunk %s (pack object %s) is bad: %s", cid.hex(), oid, exc)
                bad.append(cid)
        total += len(data)
        pacer.take(len(data))
        if progress is not None:
            progress(end - start)
        i = j
    return bad, total


@dataclass
class ScrubResult:
    """A scrub run: its local pass and (with ``cloud``) its cloud pass."""

    local: PassResult
    cloud: PassResult | None

    @property
    def complete(self) -> bool:
        return self.local.complete and (self.cloud is None or self.cloud.complete)

    @property
    def bad(self) -> int:
        """Bad chunks this run found (local files and cloud copies)."""
        return len(self.local.bad) + (len(self.cloud.bad) if self.cloud else 0)

    def as_dict(self) -> dict[str, Any]:
        return {"local": self.local.as_dict(), "cloud": None if self.cloud is None else self.cloud.as_dict(),
                "complete": self.complete, "bad": self.bad}


def scrub(meta: Metadata, tier: CloudTier | None = None, rate: float = 0, restart: bool = False,
          stop_after: int | None = None, progress: Progress | None = None) -> ScrubResult:
    """Run the local pass, then (with ``tier``) the cloud pass, from the saved cursors
    (``restart``: from the beginning). ``rate``: bytes per second for both passes
    (0: unlimited); ``stop_after``: verify at most this many chunks in this run (the
    cursor is saved; the next run continues). Raises MetaError; KeyboardInterrupt
    leaves the cursor at the last chunk verified."""
    if restart:
        reset(meta.db)
    pacer = Pacer(rate)
    budget = _Budget(stop_after)
    if tier is not None and _cursor(meta.db, CLOUD_CURSOR) is not None and _cursor(meta.db, LOCAL_CURSOR) is None:
        local = PassResult(complete=True, skipped=True)   # finished before the cloud pass was cut short
    else:
        local = scrub_local(meta, pacer, progress, budget)
    cloud = None
    if tier is not None and local.complete:
        cloud = scrub_cloud(tier, pacer, progress, budget)
    elif tier is not None:
        cloud = PassResult()
    return ScrubResult(local, cloud)
