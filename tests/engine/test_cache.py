"""Tests for cas.chunk.cache: the W-TinyLFU LFUCache (byte bound, segments, admission, adaptive
window, aging, stats, thread safety) and its FrequencySketch.

The main property test replays random operation sequences against a deliberately naive
reference model (plain lists, sums recomputed, victims found by scanning, exact
frequency counts).  Its keys are chosen so that the real sketch is exact for them
(checked by ``test_model_keys_do_not_collide_in_the_sketch``), so the model's exact
counts must give the very same admission decisions."""
from __future__ import annotations

import random
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cas.chunk.cache import (
    COUNTER_MAX,
    GHOST_FRACTION,
    MIN_SAMPLE,
    MIN_SKETCH_WIDTH,
    PROTECTED_FRACTION,
    SAMPLE_FACTOR,
    SKETCH_DEPTH,
    WIDTH_FACTOR,
    WINDOW_FRACTION,
    CacheStats,
    FrequencySketch,
    LFUCache,
)


def k(i: int) -> bytes:
    """A 32-byte chunk id."""
    return i.to_bytes(32, "big")


def read_through(c: LFUCache, key: bytes, size: int = 10) -> bool:
    """One engine-style request: get, put on a miss. Returns whether it hit."""
    if c.get(key) is not None:
        return True
    c.put(key, bytes(size))
    return False


# -- reference model ----------------------------------------------------------


@dataclass
class RefWTinyLFU:
    """W-TinyLFU by lists and scans; exact counts stand in for the sketch."""

    cap: int
    aging_period: int | None
    window: list[bytes] = field(default_factory=list)      # least recent first
    probation: list[bytes] = field(default_factory=list)
    protected: list[bytes] = field(default_factory=list)
    vals: dict[bytes, bytes] = field(default_factory=dict)
    counts: dict[bytes, int] = field(default_factory=dict)
    additions: int = 0
    max_entries: int = 0
    last_get: bytes | None = None
    rejected: list[tuple[bytes, int]] = field(default_factory=list)  # ghosts, oldest first
    victims: list[tuple[bytes, int]] = field(default_factory=list)
    window_cap: int = 0
    protected_cap: int = 0
    hits: int = 0
    misses: int = 0
    inserts: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    rejects: int = 0

    def __post_init__(self) -> None:
        self.set_window(round(self.cap * WINDOW_FRACTION))

    def nbytes(self, keys: list[bytes]) -> int:
        return sum(len(self.vals[x]) for x in keys)

    def segment(self, key: bytes) -> list[bytes] | None:
        for seg in (self.window, self.probation, self.protected):
            if key in seg:
                return seg
        return None

    def set_window(self, w: int) -> None:
        self.window_cap = min(self.cap, max(0, w))
        self.protected_cap = int((self.cap - self.window_cap) * PROTECTED_FRACTION)
        self.demote()

    def demote(self) -> None:
        while self.nbytes(self.protected) > self.protected_cap and len(self.protected) > 1:
            self.probation.append(self.protected.pop(0))

    def count(self, key: bytes) -> None:
        self.counts[key] = min(COUNTER_MAX, self.counts.get(key, 0) + 1)
        self.additions += 1
        period = self.aging_period or max(MIN_SAMPLE, SAMPLE_FACTOR * self.max_entries)
        if self.additions >= period:
            self.counts = {x: c // 2 for x, c in self.counts.items()}
            self.additions = 0

    @staticmethod
    def ghost_bytes(g: list[tuple[bytes, int]]) -> int:
        return sum(n for _, n in g)

    def ghost_add(self, g: list[tuple[bytes, int]], key: bytes, n: int) -> None:
        g[:] = [e for e in g if e[0] != key] + [(key, n)]
        while self.ghost_bytes(g) > int(self.cap * GHOST_FRACTION):
            g.pop(0)

    def ghost_pop(self, g: list[tuple[bytes, int]], key: bytes) -> int | None:
        for i, (x, n) in enumerate(g):
            if x == key:
                del g[i]
                return n
        return None

    def get(self, key: bytes) -> bytes | None:
        if self.cap == 0:
            self.misses += 1
            return None
        if key != self.last_get:
            self.count(key)
            self.last_get = key
        seg = self.segment(key)
        if seg is None:
            self.misses += 1
            n = self.ghost_pop(self.rejected, key)
            if n is not None:
                ratio = max(1.0, self.ghost_bytes(self.victims) / max(1, self.ghost_bytes(self.rejected)))
                self.set_window(self.window_cap + int(n * ratio))
            else:
                n = self.ghost_pop(self.victims, key)
                if n is not None:
                    ratio = max(1.0, self.ghost_bytes(self.rejected) / max(1, self.ghost_bytes(self.victims)))
                    self.set_window(self.window_cap - int(n * ratio))
            return None
        self.hits += 1
        seg.remove(key)
        if seg is self.probation:
            self.protected.append(key)
            self.demote()
        else:
            seg.append(key)
        return self.vals[key]

    def evict(self, key: bytes, ghosts: list[tuple[bytes, int]]) -> None:
        seg = self.segment(key)
        assert seg is not None
        seg.remove(key)
        n = len(self.vals.pop(key))
        self.ghost_add(ghosts, key, n)
        self.evictions += 1
        self.evicted_bytes += n

    def put(self, key: bytes, value: bytes) -> None:
        if self.cap == 0:
            return
        seg = self.segment(key)
        if len(value) > self.cap:
            if seg is not None:
                seg.remove(key)
                del self.vals[key]
            return
        if seg is None:
            self.window.append(key)
            self.vals[key] = value
            self.inserts += 1
            self.max_entries = max(self.max_entries, len(self.vals))
        else:
            self.vals[key] = value
            seg.remove(key)
            seg.append(key)
            if seg is self.protected:
                self.demote()
        cands = []
        while self.nbytes(self.window) > self.window_cap and self.window[0] != key:
            cands.append(self.window.pop(0))
            self.probation.append(cands[-1])
        while sum(len(v) for v in self.vals.values()) > self.cap:
            pending = [x for x in cands if x in self.vals]
            others = [x for x in self.probation if x not in pending]
            victim = None
            for seg in (others, self.protected, self.window):
                if seg and seg[0] != key:
                    victim = seg[0]
                    break
            if not pending:
                assert victim is not None
                self.evict(victim, self.victims)
            elif victim is None:
                self.evict(pending[0], self.rejected)
            elif self.counts.get(pending[0], 0) > self.counts.get(victim, 0):
                self.evict(victim, self.victims)
            else:
                self.evict(pending[0], self.rejected)
                self.rejects += 1

    def discard(self, key: bytes) -> None:
        seg = self.segment(key)
        if seg is not None:
            seg.remove(key)
            del self.vals[key]

    def clear(self) -> None:
        for seg in (self.window, self.probation, self.protected):
            seg.clear()
        self.vals.clear()
        self.rejected.clear()
        self.victims.clear()
        self.set_window(round(self.cap * WINDOW_FRACTION))

    def segment_name(self, key: bytes) -> str | None:
        seg = self.segment(key)
        names = {id(self.window): "window", id(self.probation): "probation",
                 id(self.protected): "protected"}
        return None if seg is None else names[id(seg)]

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, self.evictions, self.inserts,
                          sum(len(v) for v in self.vals.values()), self.cap, len(self.vals),
                          self.evicted_bytes, self.rejects, self.window_cap)


NKEYS = 7
# (operation, key index, value size); weighted towards get/put so that caches
# fill up and evictions depend on frequency and recency.
ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["get"] * 10 + ["put"] * 8 + ["discard"] * 1 + ["clear"]),
        st.integers(0, NKEYS - 1),
        st.one_of(st.integers(0, 10), st.integers(0, 45), st.integers(0, 160)),
    ),
    max_size=150,
)


def test_model_keys_do_not_collide_in_the_sketch() -> None:
    """Each model key has, in some row, a counter no other model key shares, so the
    sketch's estimates for them are exact: the premise of the model test."""
    s = FrequencySketch()
    assert s.width == MIN_SKETCH_WIDTH
    idx = [s.indexes(k(i)) for i in range(NKEYS)]
    for i in range(NKEYS):
        assert any(all(idx[j][r] != idx[i][r] for j in range(NKEYS) if j != i)
                   for r in range(SKETCH_DEPTH))


@settings(max_examples=400, deadline=None)
@given(cap=st.one_of(st.integers(0, 40), st.integers(0, 400)),
       period=st.one_of(st.none(), st.integers(1, 9)), ops=ops_strategy)
def test_matches_reference_model(cap: int, period: int | None, ops: list) -> None:
    cache = LFUCache(cap, aging_period=period)
    ref = RefWTinyLFU(cap, period)
    for step, op in enumerate(ops):
        if op[0] == "get":
            assert cache.get(k(op[1])) == ref.get(k(op[1]))
        elif op[0] == "put":
            value = bytes([step % 256]) * op[2]  # distinct per step: stale values show
            cache.put(k(op[1]), value)
            ref.put(k(op[1]), value)
        elif op[0] == "discard":
            cache.discard(k(op[1]))
            ref.discard(k(op[1]))
        else:
            cache.clear()
            ref.clear()
        assert cache.size_bytes <= cap
        assert [cache.segment_of(k(i)) for i in range(NKEYS)] == \
               [ref.segment_name(k(i)) for i in range(NKEYS)]
        assert all((k(i) in cache) == (k(i) in ref.vals) for i in range(NKEYS))
        assert [cache.frequency(k(i)) for i in range(NKEYS)] == \
               [ref.counts.get(k(i), 0) for i in range(NKEYS)]
        assert cache.stats() == ref.stats()
        assert len(cache) == len(ref.vals)


def _replay_against_model(seed: int) -> None:
    rnd = random.Random(seed)
    cap = rnd.choice([rnd.randrange(41), rnd.randrange(401), rnd.randrange(100, 2000)])
    period = rnd.choice([None, rnd.randrange(1, 10), rnd.randrange(10, 60)])
    max_size = rnd.choice([10, 45, 160, 600])
    cache, ref = LFUCache(cap, aging_period=period), RefWTinyLFU(cap, period)
    for step in range(400):
        op, key = rnd.random(), k(rnd.randrange(NKEYS))
        where = f"seed {seed}, step {step}"
        if op < 0.5:
            assert cache.get(key) == ref.get(key), where
        elif op < 0.93:
            value = bytes([step % 256]) * rnd.randrange(max_size + 1)
            cache.put(key, value)
            ref.put(key, value)
        elif op < 0.98:
            cache.discard(key)
            ref.discard(key)
        else:
            cache.clear()
            ref.clear()
        assert cache.stats() == ref.stats(), where
        assert [cache.segment_of(k(i)) for i in range(NKEYS)] == \
               [ref.segment_name(k(i)) for i in range(NKEYS)], where


def test_matches_reference_model_long_runs() -> None:
    """300 seeded runs of 400 operations: long enough to reach adapted windows, full
    ghost lists and overfull protected segments, which short hypothesis examples
    rarely do."""
    for seed in range(300):
        _replay_against_model(seed)


# -- byte bound -------------------------------------------------------------------


def test_byte_bound_holds_under_random_sizes() -> None:
    rnd = random.Random(5)
    c = LFUCache(10_000)
    for step in range(20_000):
        key = k(int(rnd.paretovariate(1.0)) % 3000)
        if rnd.random() < 0.9:
            read_through(c, key, rnd.choice((1, 50, 500, 5000, 9999)))
        else:
            c.discard(key)
        if step % 97 == 0:
            s = c.stats()
            assert s.size_bytes <= 10_000 and s.entries == len(c)
            assert 0 <= s.window_bytes <= 10_000
    present = [x for x in (k(i) for i in range(3000)) if x in c]
    assert len(present) == len(c)


# -- segments, admission, eviction order ---------------------------------------------


def test_new_entry_lands_in_window_and_is_present() -> None:
    c = LFUCache(1000)
    for i in range(200):
        c.put(k(i), bytes(10))
        assert c.segment_of(k(i)) == "window" and c.get(k(i)) == bytes(10)
    assert c.size_bytes <= 1000


def test_duel_evicts_victim_only_for_strictly_higher_frequency() -> None:
    c = LFUCache(30)  # window share 0: the window holds just the newest entry
    for name in (0, 1, 2):
        c.put(k(name), bytes(10))
    # window [2], probation [0, 1]: full
    for _ in range(3):
        c.get(k(9))  # misses; frequency of 9 becomes 3
    c.put(k(9), bytes(10))
    # candidate 2 (frequency 0) vs victim 0 (frequency 0): a tie keeps the victim
    assert k(2) not in c and c.stats().admission_rejects == 1
    assert [c.segment_of(k(i)) for i in (0, 1, 9)] == ["probation", "probation", "window"]
    c.get(k(8))
    c.put(k(8), bytes(10))
    # candidate 9 (frequency 3) vs victim 0 (frequency 0): the victim goes
    assert k(0) not in c and all(k(i) in c for i in (1, 8, 9))
    assert c.segment_of(k(9)) == "probation"
    s = c.stats()
    assert (s.evictions, s.admission_rejects, s.evicted_bytes) == (2, 1, 20)


def test_probation_hit_promotes_and_protected_overflow_demotes() -> None:
    c = LFUCache(100)  # window 1 byte; protected int(99 * 0.8) = 79 bytes
    for i in range(9):
        c.put(k(i), bytes(10))
    assert c.segment_of(k(8)) == "window"
    assert all(c.segment_of(k(i)) == "probation" for i in range(8))
    for i in range(8):
        assert c.get(k(i)) == bytes(10)
    # eight 10-byte entries exceed 79 bytes: the oldest promoted one falls back
    assert c.segment_of(k(0)) == "probation"
    assert all(c.segment_of(k(i)) == "protected" for i in range(1, 8))


def test_frequent_chunks_survive_a_scan() -> None:
    """One-time chunks cannot flush frequently used ones; an LRU of the same size,
    seeing 8 scan keys between two uses of a hot key, would miss every time."""
    c = LFUCache(100)  # ten 10-byte entries
    hot = [k(i) for i in range(8)]
    for _ in range(5):
        for key in hot:
            read_through(c, key)
    hits = 0
    for i in range(400):
        read_through(c, k(1000 + i))  # a one-time key
        hits += read_through(c, hot[i % len(hot)])
    assert hits == 400 and all(key in c for key in hot)
    assert c.stats().admission_rejects > 300


def test_a_chunk_read_in_pieces_counts_once() -> None:
    """The engine calls get once per kernel read, e.g. 8 times for a 1 MiB chunk read
    in 128 KiB pieces; consecutive gets of one key count once, so a one-pass scan of
    such chunks does not look popular and cannot flush the frequent ones."""
    c = LFUCache(100)
    for _ in range(3):
        c.get(k(1))
    assert c.frequency(k(1)) == 1
    c.get(k(2))
    c.get(k(1))
    assert c.frequency(k(1)) == 2
    hot = [k(10 + i) for i in range(8)]
    for _ in range(3):
        for key in hot:
            read_through(c, key)
    for i in range(200):
        for _ in range(8):
            read_through(c, k(1000 + i))  # one chunk, eight kernel reads
        read_through(c, hot[i % len(hot)])
    assert all(key in c for key in hot)


def test_refresh_replaces_value_and_never_evicts_itself() -> None:
    c = LFUCache(20)
    c.put(k(0), b"a" * 5)
    c.put(k(1), b"b" * 10)
    for _ in range(5):
        c.get(k(1))
    c.put(k(0), b"c" * 15)  # k(1) is used more, yet it must go
    assert k(1) not in c and c.get(k(0)) == b"c" * 15
    assert c.size_bytes == 15 and c.stats().inserts == 2


def test_put_evicts_several_to_fit_and_counts_bytes() -> None:
    c = LFUCache(30)
    for i, n in enumerate((5, 10, 15)):
        c.put(k(i), bytes(n))
    c.put(k(9), bytes(30))  # the new entry takes everything
    assert [i for i in (0, 1, 2, 9) if k(i) in c] == [9]
    s = c.stats()
    assert (s.evictions, s.evicted_bytes, s.size_bytes) == (3, 30, 30)


def test_contains_frequency_and_segment_of_are_not_accesses() -> None:
    c = LFUCache(20)
    c.put(k(0), bytes(10))
    c.put(k(1), bytes(10))
    before = c.stats()
    for _ in range(10):
        assert k(0) in c
        assert c.frequency(k(0)) == 0
        assert c.segment_of(k(0)) == "probation"
    assert c.stats() == before


# -- adaptive window ----------------------------------------------------------------


def test_window_grows_when_rejected_chunks_return_and_shrinks_when_victims_do() -> None:
    c = LFUCache(100, aging_period=10**9)  # ten 10-byte entries; window starts at 1 byte
    old = [k(i) for i in range(10)]
    for _ in range(6):
        for key in old:
            read_through(c, key)
    assert c.stats().window_bytes == 1
    new = [k(100 + i) for i in range(6)]
    for _ in range(8):  # new chunks lose duels, come back: grow the window
        for key in new:
            read_through(c, key)
    grown = c.stats().window_bytes
    assert grown >= 60 and all(key in c for key in new)
    for _ in range(3):  # the old ones, evicted as victims meanwhile, come back
        for key in old:
            read_through(c, key)
    assert c.stats().window_bytes < grown


def test_recency_workload_tracks_lru() -> None:
    """A hot set that moves: the adaptive window keeps the cache close to LRU."""
    rnd = random.Random(3)
    c = LFUCache(50 * 10)
    lru: dict[bytes, None] = {}
    lru_hits = 0
    for phase in range(30):
        hot = [k(phase * 1000 + i) for i in range(40)]
        for _ in range(400):
            key = rnd.choice(hot)
            read_through(c, key)
            if key in lru:
                lru_hits += 1
                del lru[key]
            lru[key] = None
            if len(lru) > 50:
                del lru[next(iter(lru))]
    assert c.stats().hit_ratio >= lru_hits / (30 * 400) - 0.05


# -- aging and the sketch -------------------------------------------------------------


def _old_then_new_hot_set(period: int) -> tuple[LFUCache, list[bytes], list[bytes]]:
    c = LFUCache(40, aging_period=period)
    old, new = [k(i) for i in range(4)], [k(100 + i) for i in range(4)]
    for _ in range(50):
        for key in old:
            read_through(c, key)
    for _ in range(60):  # the new working set
        for key in new:
            read_through(c, key)
    return c, old, new


def test_aging_lets_new_hot_set_displace_old() -> None:
    c, old, new = _old_then_new_hot_set(period=32)
    assert all(key in c for key in new) and not any(key in c for key in old)
    assert all(c.frequency(o) < c.frequency(n) for o in old for n in new)


def test_without_aging_old_counts_stay_saturated() -> None:
    """Control for the test above: without halving, the old hot set keeps the top count."""
    c, old, new = _old_then_new_hot_set(period=10**9)
    assert all(c.frequency(key) == COUNTER_MAX for key in old + new)


def test_sketch_halves_every_period() -> None:
    s = FrequencySketch(aging_period=10)
    for i in range(9):
        s.increment(k(1))
    assert s.estimate(k(1)) == 9 and s.halvings == 0
    s.increment(k(1))  # tenth: 10 -> 5
    assert s.estimate(k(1)) == 5 and s.halvings == 1
    for _ in range(30):
        s.increment(k(2))
    # k(2): 10 -> 5, 5 + 10 = 15 -> 7, 7 + 10 saturates at 15 -> 7; k(1): 5 -> 2 -> 1 -> 0
    assert s.estimate(k(2)) == 7 and s.estimate(k(1)) == 0 and s.halvings == 4


def test_sketch_never_underestimates_and_counts_saturate() -> None:
    rnd = random.Random(11)
    s = FrequencySketch(aging_period=97)
    exact: Counter[bytes] = Counter()
    keys = [k(i) for i in range(600)]  # far more keys than counters per row: collisions
    for step in range(1, 5000):
        key = keys[int(rnd.paretovariate(0.8)) % len(keys)]
        exact[key] = min(COUNTER_MAX, exact[key] + 1)
        s.increment(key)
        if step % 97 == 0:
            exact = Counter({x: c // 2 for x, c in exact.items()})
        if step % 250 == 0:
            assert all(s.estimate(x) >= exact[x] for x in keys)
            assert all(s.estimate(x) <= COUNTER_MAX for x in keys)


def test_sketch_growth_keeps_estimates_and_scales_the_sample() -> None:
    s = FrequencySketch()
    assert s.sample_size == MIN_SAMPLE
    rnd = random.Random(2)
    for _ in range(60):
        s.increment(k(rnd.randrange(300)))
    before = [s.estimate(k(i)) for i in range(300)]
    s.ensure_capacity(100)
    assert s.width == 512 and s.sample_size == SAMPLE_FACTOR * 100
    assert [s.estimate(k(i)) for i in range(300)] == before
    s.ensure_capacity(50)  # never shrinks
    assert s.width == 512 and s.sample_size == SAMPLE_FACTOR * 100


def test_sketch_grows_with_the_cache() -> None:
    c = LFUCache(10_000)
    for i in range(1000):
        c.put(k(i), bytes(1))
    assert c._sketch.width >= WIDTH_FACTOR * 1000  # white-box size check


# -- admission of oversized values, capacity 0, counters, validation ----------------


def test_oversized_value_not_admitted_and_evicts_nothing() -> None:
    c = LFUCache(10)
    c.put(k(0), bytes(4))
    c.put(k(1), bytes(11))
    assert k(1) not in c and k(0) in c and c.size_bytes == 4
    c.put(k(2), bytes(10))  # exactly the capacity is stored
    assert k(2) in c and c.size_bytes == 10
    c.put(k(2), bytes(11))  # an oversized refresh drops the stale entry
    assert k(2) not in c and c.size_bytes == 0
    s = c.stats()
    assert (s.inserts, s.evictions, s.evicted_bytes) == (2, 1, 4)


def test_capacity_zero_disables_cache() -> None:
    c = LFUCache(0)
    c.put(k(0), b"")
    c.put(k(1), b"x")
    assert c.get(k(0)) is None and c.get(k(1)) is None
    assert len(c) == 0 and c.size_bytes == 0 and k(0) not in c
    assert c.stats() == CacheStats(hits=0, misses=2, evictions=0, inserts=0,
                                   size_bytes=0, capacity_bytes=0, entries=0)


def test_counters_exact() -> None:
    c = LFUCache(100)  # window 1 byte
    assert c.stats().hit_ratio == 0.0
    c.put(k(0), b"a" * 40)
    c.put(k(1), b"b" * 40)  # k(0) leaves the window for probation
    assert c.get(k(0)) == b"a" * 40  # promoted to protected
    assert c.get(k(0)) == b"a" * 40
    assert c.get(k(5)) is None
    c.put(k(2), b"c" * 30)  # candidate k(1) (frequency 0) loses to victim k(0) (2)
    c.put(k(0), b"d" * 40)  # refresh: not an insert
    c.discard(k(2))         # not an eviction
    c.discard(k(7))
    s = c.stats()
    assert s == CacheStats(hits=2, misses=1, evictions=1, inserts=3, size_bytes=40,
                           capacity_bytes=100, entries=1, evicted_bytes=40,
                           admission_rejects=1, window_bytes=1)
    assert s.hit_ratio == pytest.approx(2 / 3)
    assert c.capacity_bytes == 100 and len(c) == 1
    c.clear()
    assert len(c) == 0 and c.size_bytes == 0 and c.get(k(0)) is None
    assert c.stats().hits == 2 and c.stats().misses == 2  # counters survive clear
    c.put(k(3), bytes(100))
    assert c.size_bytes == 100 and len(c) == 1


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        LFUCache(-1)
    with pytest.raises(ValueError):
        LFUCache(10, aging_period=0)


# -- threads --------------------------------------------------------------------


def test_thread_safety_smoke() -> None:
    cap, nthreads, nops = 300, 8, 3000
    c = LFUCache(cap, aging_period=37)

    def val(i: int) -> bytes:
        return bytes([i]) * (i + 1)

    gets = [0] * nthreads
    errors: list[BaseException] = []
    start = threading.Barrier(nthreads)

    def worker(t: int) -> None:
        rnd = random.Random(t)
        try:
            start.wait()
            for _ in range(nops):
                i, r = rnd.randrange(40), rnd.random()
                if r < 0.6:
                    gets[t] += 1
                    got = c.get(k(i))
                    assert got is None or got == val(i)
                elif r < 0.95:
                    c.put(k(i), val(i))
                else:
                    c.discard(k(i))
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors
    s = c.stats()
    assert s.hits + s.misses == sum(gets)
    present = [i for i in range(40) if k(i) in c]
    assert s.size_bytes == sum(len(val(i)) for i in present) <= cap
    assert s.entries == len(present) == len(c)
    # The segments must still be sound: one full-size value evicts everything else.
    c.put(k(1000), bytes(cap))
    s2 = c.stats()
    assert s2.evictions - s.evictions == len(present) and len(c) == 1
