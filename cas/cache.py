"""An in-RAM LFU cache of chunk plaintexts, keyed by chunk id.

The read path asks this cache before it fetches, decrypts and decompresses a chunk
from the store; the write path may seed it with chunks it has just written.  Keys
are 32-byte SHA-256 chunk ids, values are the chunk's plaintext ``bytes``.  The
cache is bounded in **bytes** (the sum of ``len(value)``), not in entries.

Eviction is LFU: the entry with the lowest access frequency goes first, and among
equal frequencies the least recently used one.  Frequencies are kept in O(1)
"frequency buckets" (a doubly linked list of buckets in increasing frequency, each
an ``OrderedDict`` of keys in least- to most-recent order), so get/put/discard are
O(1) with no heap and no scan.

Aging: every ``aging_period`` accesses (an access is one ``get`` or ``put`` call)
every entry's frequency is halved (rounding down, minimum 1), so chunks that were
hot long ago cannot pin the cache forever.  Halving costs O(entries); with the
default period of ``max(10_000, 8 * entries)`` accesses that is amortized O(1) per
access.  Recency order among entries that end up with equal frequencies is kept.

All public methods take one ``threading.Lock``; the cache is safe to share
between worker threads.
"""
from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["AGING_ENTRIES_FACTOR", "DEFAULT_MIN_AGING_PERIOD", "CacheStats", "LFUCache"]

#: With ``aging_period=None`` the period is recomputed after every halving as
#: ``max(DEFAULT_MIN_AGING_PERIOD, AGING_ENTRIES_FACTOR * len(cache))`` accesses.
DEFAULT_MIN_AGING_PERIOD = 10_000
AGING_ENTRIES_FACTOR = 8


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of an :class:`LFUCache`'s counters (counts since construction).

    ``hits``/``misses`` count ``get`` calls; ``inserts`` counts keys newly admitted
    by ``put`` (refreshing a present key is not an insert); ``evictions`` and
    ``evicted_bytes`` count entries removed to make room (not ``discard``/``clear``).
    ``size_bytes``/``capacity_bytes`` are in bytes of value; ``entries`` is ``len``.
    """

    hits: int
    misses: int
    evictions: int
    inserts: int
    size_bytes: int
    capacity_bytes: int
    entries: int
    evicted_bytes: int = 0

    @property
    def hit_ratio(self) -> float:
        """``hits / (hits + misses)``, or 0.0 before the first ``get``."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class _Bucket:
    """All keys with one frequency, least recently used first; a list node."""

    __slots__ = ("freq", "keys", "prev", "next")

    def __init__(self, freq: int) -> None:
        self.freq = freq
        self.keys: OrderedDict[bytes, None] = OrderedDict()
        self.prev: _Bucket = self
        self.next: _Bucket = self


class _Entry:
    __slots__ = ("value", "bucket", "tick")

    def __init__(self, value: bytes, bucket: _Bucket, tick: int) -> None:
        self.value = value
        self.bucket = bucket
        self.tick = tick  # time of last access; orders keys inside a bucket


class LFUCache:
    """Byte-bounded LFU map ``chunk id (bytes) -> plaintext (bytes)``.

    ``capacity_bytes`` bounds the sum of ``len(value)`` (0 disables the cache:
    ``put`` does nothing and ``get`` always misses).  ``aging_period`` is the number
    of accesses between frequency halvings (``None``: ``max(10_000, 8 * entries)``,
    recomputed after each halving).  get/put/discard/contains/len are O(1);
    ``put`` is O(1 + evictions); aging is O(entries), amortized O(1) per access
    when the period is at least proportional to the number of entries.
    """

    def __init__(self, capacity_bytes: int, aging_period: int | None = None) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        if aging_period is not None and aging_period < 1:
            raise ValueError(f"aging_period must be >= 1 or None, got {aging_period}")
        self._capacity = capacity_bytes
        self._aging_period = aging_period
        self._lock = threading.Lock()
        self._entries: dict[bytes, _Entry] = {}
        self._head = _Bucket(0)  # sentinel: .next is the least frequent bucket
        self._size = 0
        self._tick = 0
        self._hits = self._misses = self._inserts = 0
        self._evictions = self._evicted_bytes = 0
        self._until_aging = self._period()

    # -- public API --------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        """Return the cached value for ``key`` or None; counts a hit or a miss. O(1)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
            else:
                self._hits += 1
                self._touch(key, entry)
            self._count_access()
            return None if entry is None else entry.value

    def put(self, key: bytes, value: bytes) -> None:
        """Insert ``key`` or refresh it (new value, frequency + 1), evicting to fit.

        A value longer than the capacity is not admitted (a present entry for
        ``key`` is then dropped, since it would be stale); nothing else is evicted
        for it.  A refreshed entry is never evicted to make room for itself.
        O(1 + number of evictions).
        """
        with self._lock:
            if self._capacity == 0:
                return
            entry = self._entries.get(key)
            if len(value) > self._capacity:
                if entry is not None:
                    self._remove(key, entry)
            elif entry is None:
                self._make_room(len(value), exclude=None)
                bucket = self._head.next
                if bucket.freq != 1:
                    bucket = self._link_after(self._head, 1)
                bucket.keys[key] = None
                self._tick += 1
                self._entries[key] = _Entry(value, bucket, self._tick)
                self._size += len(value)
                self._inserts += 1
            else:
                self._size -= len(entry.value)
                self._touch(key, entry)
                self._make_room(len(value), exclude=key)
                entry.value = value
                self._size += len(value)
            self._count_access()

    def discard(self, key: bytes) -> None:
        """Remove ``key`` if present (not counted as an eviction). O(1)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._remove(key, entry)

    def clear(self) -> None:
        """Drop every entry and restart the aging period; stats counters are kept."""
        with self._lock:
            self._entries.clear()
            self._head.next = self._head.prev = self._head
            self._size = 0
            self._until_aging = self._period()

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is cached; not an access (no stats, no frequency bump)."""
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        """Number of entries."""
        with self._lock:
            return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Sum of ``len(value)`` over the entries, in bytes (<= capacity_bytes)."""
        with self._lock:
            return self._size

    @property
    def capacity_bytes(self) -> int:
        """The byte bound given at construction."""
        return self._capacity

    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters. O(1)."""
        with self._lock:
            return CacheStats(
                hits=self._hits, misses=self._misses, evictions=self._evictions,
                inserts=self._inserts, size_bytes=self._size,
                capacity_bytes=self._capacity, entries=len(self._entries),
                evicted_bytes=self._evicted_bytes,
            )

    # -- internals (caller holds the lock) -----------------------------------

    def _period(self) -> int:
        if self._aging_period is not None:
            return self._aging_period
        return max(DEFAULT_MIN_AGING_PERIOD, AGING_ENTRIES_FACTOR * len(self._entries))

    def _link_after(self, node: _Bucket, freq: int) -> _Bucket:
        bucket = _Bucket(freq)
        bucket.prev, bucket.next = node, node.next
        node.next.prev = bucket
        node.next = bucket
        return bucket

    @staticmethod
    def _unlink(bucket: _Bucket) -> None:
        bucket.prev.next = bucket.next
        bucket.next.prev = bucket.prev

    def _touch(self, key: bytes, entry: _Entry) -> None:
        """Move ``key`` to frequency + 1, as its most recent key."""
        old = entry.bucket
        new = old.next
        if new.freq != old.freq + 1:  # also true for the sentinel (freq 0)
            new = self._link_after(old, old.freq + 1)
        del old.keys[key]
        new.keys[key] = None
        entry.bucket = new
        self._tick += 1
        entry.tick = self._tick
        if not old.keys:
            self._unlink(old)

    def _remove(self, key: bytes, entry: _Entry) -> None:
        del self._entries[key]
        del entry.bucket.keys[key]
        if not entry.bucket.keys:
            self._unlink(entry.bucket)
        self._size -= len(entry.value)

    def _make_room(self, need: int, exclude: bytes | None) -> None:
        """Evict LFU/LRU entries (never ``exclude``) until ``need`` more bytes fit.

        ``need <= capacity`` and ``exclude`` (if any) is not in ``_size`` and is the
        most recent key of its bucket, so if it comes first its bucket holds only it.
        """
        while self._size + need > self._capacity:
            bucket = self._head.next
            victim = next(iter(bucket.keys))
            if victim == exclude:
                victim = next(iter(bucket.next.keys))
            entry = self._entries[victim]
            self._remove(victim, entry)
            self._evictions += 1
            self._evicted_bytes += len(entry.value)

    def _count_access(self) -> None:
        self._until_aging -= 1
        if self._until_aging <= 0:
            self._age()
            self._until_aging = self._period()

    def _age(self) -> None:
        """Halve every frequency (min 1) and rebuild the buckets. O(entries).

        Old buckets are walked in increasing frequency, so the new frequencies come
        out sorted; the 2-3 old buckets that land on one new frequency are merged by
        last-access tick, keeping least-recent-first order inside the new bucket.
        """
        head, entries = self._head, self._entries
        old = head.next
        head.next = head.prev = head
        tail = head
        while old is not head:
            freq = max(1, old.freq // 2)
            group = [old.keys]
            old = old.next
            while old is not head and max(1, old.freq // 2) == freq:
                group.append(old.keys)
                old = old.next
            tail = self._link_after(tail, freq)
            for key in heapq.merge(*group, key=lambda k: entries[k].tick):
                tail.keys[key] = None
                entries[key].bucket = tail
