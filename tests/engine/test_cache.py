"""Tests for cas.cache.LFUCache: byte bound, LFU/LRU eviction order, aging, stats,
thread safety.  The main property test replays random operation sequences against
a deliberately naive reference model that finds the victim by scanning."""
from __future__ import annotations

import random
import sys
import threading
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cas.cache import DEFAULT_MIN_AGING_PERIOD, CacheStats, LFUCache


def k(i: int) -> bytes:
    """A 32-byte chunk id."""
    return i.to_bytes(32, "big")


# -- reference model ----------------------------------------------------------


@dataclass
class RefLFU:
    """LFU by scan: victim = min (frequency, last access time); halve every period."""

    cap: int
    period: int
    d: dict[bytes, list] = field(default_factory=dict)  # key -> [value, freq, tick]
    clock: int = 0
    accesses: int = 0
    hits: int = 0
    misses: int = 0
    inserts: int = 0
    evictions: int = 0
    evicted_bytes: int = 0

    def size(self, exclude: bytes | None = None) -> int:
        return sum(len(e[0]) for key, e in self.d.items() if key != exclude)

    def _access(self) -> None:
        self.accesses += 1
        if self.accesses % self.period == 0:
            for e in self.d.values():
                e[1] = max(1, e[1] // 2)

    def _bump(self, key: bytes) -> None:
        self.clock += 1
        self.d[key][1] += 1
        self.d[key][2] = self.clock

    def get(self, key: bytes) -> bytes | None:
        e = self.d.get(key)
        if e is None:
            self.misses += 1
        else:
            self.hits += 1
            self._bump(key)
        self._access()
        return None if e is None else e[0]

    def put(self, key: bytes, value: bytes) -> None:
        if self.cap == 0:
            return
        if len(value) > self.cap:
            self.d.pop(key, None)
        else:
            if key in self.d:
                self._bump(key)
            while self.size(exclude=key) + len(value) > self.cap:
                victim = min((x for x in self.d if x != key),
                             key=lambda x: (self.d[x][1], self.d[x][2]))
                self.evictions += 1
                self.evicted_bytes += len(self.d.pop(victim)[0])
            if key in self.d:
                self.d[key][0] = value
            else:
                self.clock += 1
                self.d[key] = [value, 1, self.clock]
                self.inserts += 1
        self._access()

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, self.evictions, self.inserts,
                          self.size(), self.cap, len(self.d), self.evicted_bytes)


NKEYS = 7
# (operation, key index, value size); weighted towards get/put so that caches
# fill up and evictions depend on frequency and recency.
ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["get"] * 9 + ["put"] * 8 + ["discard"] * 2 + ["clear"]),
        st.integers(0, NKEYS - 1),
        st.one_of(st.integers(0, 10), st.integers(0, 45)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(cap=st.integers(0, 40), period=st.one_of(st.none(), st.integers(1, 9)),
       ops=ops_strategy)
def test_matches_reference_model(cap: int, period: int | None, ops: list) -> None:
    cache = LFUCache(cap, aging_period=period)
    ref = RefLFU(cap, period or DEFAULT_MIN_AGING_PERIOD)
    for step, op in enumerate(ops):
        if op[0] == "get":
            assert cache.get(k(op[1])) == ref.get(k(op[1]))
        elif op[0] == "put":
            value = bytes([step % 256]) * op[2]  # distinct per step: stale values show
            cache.put(k(op[1]), value)
            ref.put(k(op[1]), value)
        elif op[0] == "discard":
            cache.discard(k(op[1]))
            ref.d.pop(k(op[1]), None)
        else:
            cache.clear()
            ref.d.clear()
            ref.accesses = 0  # clear restarts the aging period
        assert cache.size_bytes <= cap
        assert {i for i in range(NKEYS) if k(i) in cache} == \
               {i for i in range(NKEYS) if k(i) in ref.d}
        assert cache.stats() == ref.stats()
        assert len(cache) == len(ref.d)


# -- eviction order -------------------------------------------------------------


def test_evicts_least_frequent_first() -> None:
    c = LFUCache(30)
    for i in range(3):
        c.put(k(i), bytes(10))
    for _ in range(3):
        c.get(k(0))
    c.get(k(1))
    c.get(k(1))
    c.get(k(2))  # freqs: 0 -> 4, 1 -> 3, 2 -> 2; k(2) is the most recent
    c.put(k(3), bytes(10))
    assert k(2) not in c and all(k(i) in c for i in (0, 1, 3))
    c.put(k(4), bytes(10))  # k(3) has frequency 1
    assert k(3) not in c and all(k(i) in c for i in (0, 1, 4))


def test_ties_broken_by_least_recent() -> None:
    c = LFUCache(30)
    for i in range(3):
        c.put(k(i), bytes(10))
    for i in (2, 0, 1):  # all frequency 2; least recent is now k(2)
        c.get(k(i))
    c.put(k(3), bytes(10))
    assert k(2) not in c and all(k(i) in c for i in (0, 1, 3))


def test_put_evicts_several_to_fit_and_counts_bytes() -> None:
    c = LFUCache(30)
    for i, n in enumerate((5, 10, 15)):
        c.put(k(i), bytes(n))
    c.get(k(2))
    c.put(k(9), bytes(15))  # must drop k(0) (5) and k(1) (10), the frequency-1 ones
    assert [i for i in (0, 1, 2, 9) if k(i) in c] == [2, 9]
    s = c.stats()
    assert (s.evictions, s.evicted_bytes, s.size_bytes) == (2, 15, 30)


def test_refresh_replaces_value_and_never_evicts_itself() -> None:
    c = LFUCache(20)
    c.put(k(0), b"a" * 5)
    c.put(k(1), b"b" * 10)
    for _ in range(5):
        c.get(k(1))
    c.put(k(0), b"c" * 15)  # k(0) (freq 2) is less used, yet k(1) must go
    assert k(1) not in c and c.get(k(0)) == b"c" * 15
    assert c.size_bytes == 15 and c.stats().inserts == 2


def test_contains_is_not_an_access() -> None:
    c = LFUCache(20)
    c.put(k(0), bytes(10))
    c.put(k(1), bytes(10))
    before = c.stats()
    for _ in range(10):
        assert k(0) in c
    assert c.stats() == before
    c.put(k(2), bytes(10))  # k(0) is still the LFU/LRU victim
    assert k(0) not in c and k(1) in c


# -- aging ----------------------------------------------------------------------


def _old_then_new_hot_set(period: int) -> tuple[list[bool], list[bool]]:
    c = LFUCache(40, aging_period=period)
    old, new = [k(i) for i in range(4)], [k(100 + i) for i in range(4)]
    for key in old:
        c.put(key, bytes(10))
    for _ in range(50):
        for key in old:
            c.get(key)
    for _ in range(60):  # read-through: the new working set
        for key in new:
            if c.get(key) is None:
                c.put(key, bytes(10))
    return [key in c for key in new], [key in c for key in old]


def test_aging_lets_new_hot_set_displace_old() -> None:
    new_in, old_in = _old_then_new_hot_set(period=32)
    assert all(new_in) and not any(old_in)


def test_without_aging_old_hot_set_pins_cache() -> None:
    """Control for the test above: the scenario really needs aging."""
    new_in, old_in = _old_then_new_hot_set(period=10**9)
    assert sum(new_in) <= 1 and sum(old_in) >= 3


def test_aging_halves_and_keeps_recency_order() -> None:
    c = LFUCache(30, aging_period=10)
    c.put(k(0), bytes(10))  # access 1
    c.put(k(1), bytes(10))  # 2
    c.put(k(2), bytes(10))  # 3
    for _ in range(3):
        c.get(k(0))         # 4-6: k(0) freq 4
    c.get(k(2))             # 7
    c.get(k(2))             # 8: k(2) freq 3
    c.get(k(1))             # 9: k(1) freq 2, more recent than k(2)
    c.get(k(0))             # 10: k(0) freq 5 -> aging: k(0) 2, k(1) 1, k(2) 1
    # k(1) and k(2) came from different buckets and now tie at frequency 1;
    # k(2) was used less recently, so it goes first, then k(1).
    c.put(k(3), bytes(10))
    assert k(2) not in c and all(k(i) in c for i in (0, 1, 3))
    c.put(k(4), bytes(10))
    assert k(1) not in c and all(k(i) in c for i in (0, 3, 4))


def test_aging_keeps_frequency_at_least_one() -> None:
    c = LFUCache(30, aging_period=3)
    c.put(k(0), bytes(10))  # 1
    c.put(k(1), bytes(10))  # 2
    c.get(k(1))             # 3 -> aging: k(0) 1 -> 1 (not 0), k(1) 2 -> 1
    c.put(k(2), bytes(10))  # 4: k(2) freq 1, the most recent
    c.put(k(3), bytes(10))  # 5: must evict k(0), the oldest of three at freq 1
    assert k(0) not in c and all(k(i) in c for i in (1, 2, 3))


# -- admission, capacity 0, counters, validation ---------------------------------


def test_oversized_value_not_admitted_and_evicts_nothing() -> None:
    c = LFUCache(10)
    c.put(k(0), bytes(4))
    c.put(k(1), bytes(11))
    assert k(1) not in c and k(0) in c and c.size_bytes == 4
    c.put(k(2), bytes(10))  # exactly the capacity is admitted
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
    c = LFUCache(100)
    assert c.stats().hit_ratio == 0.0
    c.put(k(0), b"a" * 40)
    c.put(k(1), b"b" * 40)
    assert c.get(k(0)) == b"a" * 40
    assert c.get(k(0)) == b"a" * 40
    assert c.get(k(5)) is None
    c.put(k(2), b"c" * 30)  # evicts k(1) (40 bytes)
    c.put(k(0), b"d" * 40)  # refresh: not an insert
    c.discard(k(2))         # not an eviction
    c.discard(k(7))
    s = c.stats()
    assert s == CacheStats(hits=2, misses=1, evictions=1, inserts=3, size_bytes=40,
                           capacity_bytes=100, entries=1, evicted_bytes=40)
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
    # The bucket structure must still be sound: filling with one full-size value
    # must evict exactly the remaining entries.
    c.put(k(1000), bytes(cap))
    s2 = c.stats()
    assert s2.evictions - s.evictions == len(present) and len(c) == 1
