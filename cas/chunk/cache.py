"""An in-RAM cache of chunk plaintexts, keyed by chunk id: W-TinyLFU, byte-bounded.

The read path asks this cache before it fetches, decrypts and decompresses a chunk
from the store, and puts what it loaded (``get``, then ``put`` on a miss; read-ahead
may ``put`` before the ``get``).  Keys are chunk ids (32-byte SHA-256; any ``bytes``
works), values are the chunk's plaintext ``bytes``.  The cache is bounded in
**bytes** (the sum of ``len(value)``), not in entries.

Policy: W-TinyLFU, from Einziger, Friedman, Manes, "TinyLFU: A Highly Efficient
Cache Admission Policy", ACM Transactions on Storage 13(4), 2017, laid out as in its
reference implementation, Caffeine:

* **Window**: an LRU of initially ``WINDOW_FRACTION`` (1 %) of the capacity.  Every
  new entry lands here, so a chunk just put is cached, and a burst of requests to
  new chunks hits while they are young.  The window always keeps its newest entry.
* **Main**: a segmented LRU of the other bytes.  Entries leaving the window go to its
  *probation* segment; a hit there promotes to *protected* (``PROTECTED_FRACTION``,
  80 %, of main), whose overflow falls back to probation.
* **Admission**: while the cache is over capacity, the oldest entry that left the
  window (the *candidate*) duels the eviction *victim* (probation's oldest, else
  protected's, else the window's): the victim is evicted only if the candidate's
  estimated frequency is strictly higher, otherwise the candidate goes.  One-time
  chunks (scans) therefore cannot flush the frequently used ones.
* **Frequency** is estimated by :class:`FrequencySketch`, a count-min sketch of 4-bit
  (saturating at 15) counters that records every ``get``, hit or miss, so it also
  knows chunks that are not, or no longer, cached.  ``put`` is not a request and
  records nothing.  A ``get`` of the same key as the previous ``get`` is not
  recorded again: the engine asks once per kernel read, e.g. 8 times in a row for a
  1 MiB chunk read in 128 KiB pieces, and a one-pass scan of such chunks must not
  look popular (our addition; it restores the scan resistance measured with one
  request per chunk).
* **Aging** (the paper's "reset"): after each sample of W recorded requests
  every counter is halved, so popularity that is not renewed fades.  W is
  ``SAMPLE_FACTOR`` (10, the paper's W/C) times the most entries the cache has held.
* **Adaptive window**: a fixed 1 % window loses to LRU when the popular chunks
  change faster than the sketch forgets (quick shifting-hot-set trace of
  ``tools/bench/cache.py``, cache at 20 %: 38 % hit ratio against LRU's 75 %).
  Caffeine tunes the window by hill climbing on sampled hit ratios (Einziger,
  Eytan, Friedman, Manes, "Adaptive Software Cache Management", Middleware 2018);
  on our traces that climbed one step per sample of 10 x C requests (47 % after
  40,000 requests) and, with shorter samples, oscillated with the workload's
  phases.  We use the ghost-list rule of ARC instead (Megiddo, Modha, "ARC: A
  Self-Tuning, Low Overhead Replacement Cache", FAST 2003): the keys (not values)
  of the last candidates *rejected* by admission and of the last *victims*
  evicted from the cache are remembered, each list bounded to ``GHOST_FRACTION``
  of ``capacity_bytes`` in their sizes (ARC remembers a whole cache; a quarter
  measured as good or better on the benchmark's traces, up to 12 points on the
  stdlib one at 2 %, and within half a point on the shifting one).  A miss on a
  rejected key means a larger window would have hit: the window grows by the key's
  size times ``max(1, victims' bytes / rejected bytes)``; a miss on a victim's key
  shrinks it symmetrically.  The window ranges over 0..capacity (0: TinyLFU with a
  one-entry window; capacity: plain LRU); protected stays 80 % of the rest.

``tools/bench/cache.py`` measures the policy against LRU and the offline optimum.

Costs: ``get``/``put``/``discard``/``in``/``len`` are O(1) (``put``: plus O(1) per
entry evicted or moved out of a shrunk window, each entry moving once per resize,
amortised O(1)); a halving costs O(sketch width) once per W > 1.25 x width requests
and growing the sketch O(width), both amortised O(1).  Memory beyond the entries:
the sketch's 4 x width bytes (width a power of two, >= ``WIDTH_FACTOR`` x the most
entries held: 16-32 bytes per entry) and the two ghost lists (a reference to the
key and an int per ghost, at most a cache-full of keys per list).

The sketch hashes keys with BLAKE2b (not Python's per-process randomised ``hash``),
so hit ratios are reproducible.  Ties in the duel go to the victim (Caffeine admits
some warm candidates at random against hash flooding; chunk ids are SHA-256 of the
content, so we do not).

All public methods take one ``threading.Lock``; the cache is safe to share between
worker threads.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

__all__ = [
    "COUNTER_MAX", "GHOST_FRACTION", "MIN_SAMPLE", "MIN_SKETCH_WIDTH", "PROTECTED_FRACTION",
    "SAMPLE_FACTOR", "SKETCH_DEPTH", "WIDTH_FACTOR", "WINDOW_FRACTION", "CacheStats",
    "FrequencySketch", "LFUCache",
]

#: Initial share of the capacity (bytes) given to the LRU window (paper: 1 %).
WINDOW_FRACTION = 0.01
#: Share of the main region (bytes) given to its protected segment (paper: 80 %).
PROTECTED_FRACTION = 0.8
#: Sample size W = SAMPLE_FACTOR x (most entries held) requests between halvings.
SAMPLE_FACTOR = 10
#: Smallest sample size W (requests), for nearly empty caches.
MIN_SAMPLE = 64
#: Rows of the count-min sketch (each key has one counter per row; the index
#: computation in FrequencySketch.indexes is written out for 4).
SKETCH_DEPTH = 4
#: Counters saturate here (4-bit counters, as in the paper and Caffeine).
COUNTER_MAX = 15
#: Columns per row >= WIDTH_FACTOR x (most entries held): 16 counters per entry, as
#: Caffeine's sketch has.
WIDTH_FACTOR = 4
#: Fewest columns per row of the sketch.
MIN_SKETCH_WIDTH = 64
#: Each ghost list remembers at most this share of the capacity, in bytes of sizes.
GHOST_FRACTION = 0.25

# bytes.translate table that halves every counter value (0..255 -> v >> 1)
_HALVE = bytes(v >> 1 for v in range(256))


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of an :class:`LFUCache`'s counters (counts since construction).

    ``hits``/``misses`` count ``get`` calls; ``inserts`` counts keys newly stored by
    ``put`` (refreshing a present key is not an insert); ``evictions`` and
    ``evicted_bytes`` count entries removed to make room (not ``discard``/``clear``),
    including ``admission_rejects``: candidates that lost the frequency duel (TinyLFU
    admission) and were dropped instead of a victim.  ``size_bytes`` and
    ``capacity_bytes`` are bytes of value; ``entries`` is ``len``; ``window_bytes``
    is the window's current share of the capacity, in bytes (adaptive).
    """

    hits: int
    misses: int
    evictions: int
    inserts: int
    size_bytes: int
    capacity_bytes: int
    entries: int
    evicted_bytes: int = 0
    admission_rejects: int = 0
    window_bytes: int = 0

    @property
    def hit_ratio(self) -> float:
        """``hits / (hits + misses)``, or 0.0 before the first ``get``."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class FrequencySketch:
    """Count-min sketch of recent request counts: ``SKETCH_DEPTH`` rows of 4-bit counters.

    ``estimate(key)`` is the minimum of the key's counters: never below the key's true
    (saturated, halved) count, above it only through hash collisions (count-min
    sketch, as in the TinyLFU paper).  Every ``sample_size`` increments all counters
    are halved, rounding down (the paper's "reset").  Both scale with the most entries the cache has held
    (:meth:`ensure_capacity`): ``width`` (columns per row, a power of two) is at least
    ``WIDTH_FACTOR`` times it and ``MIN_SKETCH_WIDTH``; ``sample_size`` is
    ``aging_period`` if given, else ``SAMPLE_FACTOR`` times it (at least
    ``MIN_SAMPLE``).  The width only grows; doubling copies each row twice, so every
    key keeps its counter values.  Not thread-safe: :class:`LFUCache` calls it under
    its lock.
    """

    def __init__(self, aging_period: int | None = None) -> None:
        if aging_period is not None and aging_period < 1:
            raise ValueError(f"aging_period must be >= 1 or None, got {aging_period}")
        self._width = MIN_SKETCH_WIDTH
        self._table = bytearray(SKETCH_DEPTH * self._width)
        self._aging_period = aging_period
        self._entries = 0
        self._sample = self._sample_for(0)
        self._additions = 0
        self.halvings = 0  # resets done so far (for tests and benchmarks)

    @property
    def width(self) -> int:
        """Columns per row (a power of two)."""
        return self._width

    @property
    def sample_size(self) -> int:
        """Increments between two halvings, W."""
        return self._sample

    def _sample_for(self, entries: int) -> int:
        if self._aging_period is not None:
            return self._aging_period
        return max(MIN_SAMPLE, SAMPLE_FACTOR * entries)

    def indexes(self, key: bytes) -> tuple[int, int, int, int]:
        """Positions of ``key``'s counters in the table, one per row (row-major)."""
        h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        a, b = h & 0xFFFFFFFF, (h >> 32) | 1  # double hashing (Kirsch-Mitzenmacher)
        w, m = self._width, self._width - 1
        return (a & m, ((a + b) & m) + w, ((a + 2 * b) & m) + 2 * w, ((a + 3 * b) & m) + 3 * w)

    def increment(self, key: bytes) -> None:
        """Count one request for ``key``; halve everything when the sample is full."""
        t = self._table
        for i in self.indexes(key):
            if t[i] < COUNTER_MAX:
                t[i] += 1
        self._additions += 1
        if self._additions >= self._sample:
            self.halve()

    def estimate(self, key: bytes) -> int:
        """Estimated recent requests of ``key``, 0..COUNTER_MAX."""
        t = self._table
        i, j, k, n = self.indexes(key)
        return min(t[i], t[j], t[k], t[n])

    def halve(self) -> None:
        """Divide every counter by two (rounding down) and start a new sample. O(width)."""
        self._table = bytearray(self._table.translate(_HALVE))
        self._additions = 0
        self.halvings += 1

    def ensure_capacity(self, entries: int) -> None:
        """Note that the cache holds ``entries`` entries; on a new maximum, grow the
        sample size and double the width as needed. Amortised O(1) per entry."""
        if entries <= self._entries:
            return
        self._entries = entries
        self._sample = self._sample_for(entries)
        while self._width < WIDTH_FACTOR * entries:
            t, w = self._table, self._width
            self._table = bytearray().join(t[r * w:(r + 1) * w] * 2 for r in range(SKETCH_DEPTH))
            self._width = 2 * w


class _Ghosts:
    """Keys (no values) of recently dropped entries with their sizes, oldest first,
    at most ``limit`` bytes of sizes in all."""

    __slots__ = ("bytes", "keys")

    def __init__(self) -> None:
        self.keys: OrderedDict[bytes, int] = OrderedDict()
        self.bytes = 0

    def add(self, key: bytes, size: int, limit: int) -> None:
        self.pop(key)
        self.keys[key] = size
        self.bytes += size
        while self.bytes > limit:
            self.bytes -= self.keys.popitem(last=False)[1]

    def pop(self, key: bytes) -> int | None:
        size = self.keys.pop(key, None)
        if size is not None:
            self.bytes -= size
        return size

    def clear(self) -> None:
        self.keys.clear()
        self.bytes = 0


class LFUCache:
    """Byte-bounded W-TinyLFU map ``chunk id (bytes) -> plaintext (bytes)``.

    ``capacity_bytes`` bounds the sum of ``len(value)`` (0 disables the cache: ``put``
    does nothing and ``get`` always misses).  ``aging_period`` is the number of recorded
    ``get`` calls between halvings of the frequency sketch (``None``: 10 x the most
    entries held, at least 64; see the module docstring).  The window starts at
    ``round(capacity_bytes * WINDOW_FRACTION)`` bytes and adapts; it always keeps its
    newest entry, even when that is larger than its share, which then leaves for the
    admission duel when the next new entry arrives.
    """

    def __init__(self, capacity_bytes: int, aging_period: int | None = None) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self._capacity = capacity_bytes
        self._sketch = FrequencySketch(aging_period=aging_period)
        self._lock = threading.Lock()
        # each segment is least- to most-recently used; key -> value
        self._window: OrderedDict[bytes, bytes] = OrderedDict()
        self._probation: OrderedDict[bytes, bytes] = OrderedDict()
        self._protected: OrderedDict[bytes, bytes] = OrderedDict()
        self._where: dict[bytes, OrderedDict[bytes, bytes]] = {}  # key -> its segment
        self._rejected = _Ghosts()  # candidates that lost a duel
        self._victims = _Ghosts()   # entries evicted for a candidate (or a new entry)
        self._size = self._window_bytes = self._protected_bytes = 0
        self._window_cap = self._protected_cap = 0
        self._set_window(round(capacity_bytes * WINDOW_FRACTION))
        self._last_get: bytes | None = None
        self._hits = self._misses = self._inserts = 0
        self._evictions = self._evicted_bytes = self._rejects = 0

    # -- public API --------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        """Return the cached value for ``key`` or None; counts a hit or a miss, records
        the request in the frequency sketch (unless ``key`` was also the previous
        ``get``'s), adapts the window on a miss of a ghost key. O(1) amortised."""
        with self._lock:
            if self._capacity == 0:
                self._misses += 1
                return None
            if key != self._last_get:
                self._sketch.increment(key)
                self._last_get = key
            seg = self._where.get(key)
            if seg is None:
                self._misses += 1
                self._adapt(key)
                return None
            self._hits += 1
            if seg is self._probation:
                value = seg.pop(key)
                self._protected[key] = value
                self._where[key] = self._protected
                self._protected_bytes += len(value)
                self._demote_protected()
                return value
            seg.move_to_end(key)
            return seg[key]

    def put(self, key: bytes, value: bytes) -> None:
        """Insert ``key`` (as the window's newest entry) or refresh it (new value, newest
        of its segment), then evict to fit.

        A value longer than the capacity is not stored (a present entry for ``key`` is
        then dropped, since it would be stale); nothing else is evicted for it.  The
        entry just put is never evicted to make room for itself, so it is present
        when ``put`` returns; a new one may later lose the admission duel when it
        leaves the window.  O(1 + number of evictions).
        """
        with self._lock:
            if self._capacity == 0:
                return
            seg = self._where.get(key)
            n = len(value)
            if n > self._capacity:
                if seg is not None:
                    self._remove(key)
                return
            if seg is None:
                self._window[key] = value
                self._where[key] = self._window
                self._window_bytes += n
                self._size += n
                self._inserts += 1
                self._sketch.ensure_capacity(len(self._where))
            else:
                delta = n - len(seg[key])
                seg[key] = value
                seg.move_to_end(key)
                self._size += delta
                if seg is self._window:
                    self._window_bytes += delta
                elif seg is self._protected:
                    self._protected_bytes += delta
                    self._demote_protected()
            self._make_room(exclude=key)

    def discard(self, key: bytes) -> None:
        """Remove ``key`` if present (not counted as an eviction). O(1)."""
        with self._lock:
            if key in self._where:
                self._remove(key)

    def clear(self) -> None:
        """Drop every entry and the ghost lists, and reset the window to its initial
        share; the frequency sketch and the stats counters are kept."""
        with self._lock:
            for seg in (self._window, self._probation, self._protected):
                seg.clear()
            self._where.clear()
            self._rejected.clear()
            self._victims.clear()
            self._size = self._window_bytes = self._protected_bytes = 0
            self._set_window(round(self._capacity * WINDOW_FRACTION))

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is cached; not an access (no stats, no frequency count)."""
        with self._lock:
            return key in self._where

    def __len__(self) -> int:
        """Number of entries."""
        with self._lock:
            return len(self._where)

    @property
    def size_bytes(self) -> int:
        """Sum of ``len(value)`` over the entries, in bytes (<= capacity_bytes)."""
        with self._lock:
            return self._size

    @property
    def capacity_bytes(self) -> int:
        """The byte bound given at construction."""
        return self._capacity

    def frequency(self, key: bytes) -> int:
        """The sketch's estimate of ``key``'s recent requests (0..15); not an access."""
        with self._lock:
            return self._sketch.estimate(key)

    def segment_of(self, key: bytes) -> str | None:
        """``"window"``, ``"probation"``, ``"protected"`` or None (not cached); not an
        access.  For tests and diagnostics."""
        with self._lock:
            seg = self._where.get(key)
            if seg is None:
                return None
            return ("window" if seg is self._window
                    else "probation" if seg is self._probation else "protected")

    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters. O(1)."""
        with self._lock:
            return CacheStats(
                hits=self._hits, misses=self._misses, evictions=self._evictions,
                inserts=self._inserts, size_bytes=self._size,
                capacity_bytes=self._capacity, entries=len(self._where),
                evicted_bytes=self._evicted_bytes, admission_rejects=self._rejects,
                window_bytes=self._window_cap,
            )

    # -- internals (caller holds the lock) -----------------------------------

    def _set_window(self, window_bytes: int) -> None:
        """Set the window's share (clamped to 0..capacity) and protected's, 80 % of the
        rest; an oversized protected segment is demoted now, an oversized window
        shrinks at the next ``put``."""
        self._window_cap = min(self._capacity, max(0, window_bytes))
        self._protected_cap = int((self._capacity - self._window_cap) * PROTECTED_FRACTION)
        self._demote_protected()

    def _adapt(self, key: bytes) -> None:
        """ARC's rule on a miss of ``key``: grow the window if ``key`` was rejected by
        admission lately, shrink it if it was evicted as a victim lately."""
        size = self._rejected.pop(key)
        if size is not None:
            ratio = max(1.0, self._victims.bytes / max(1, self._rejected.bytes))
            self._set_window(self._window_cap + int(size * ratio))
            return
        size = self._victims.pop(key)
        if size is not None:
            ratio = max(1.0, self._rejected.bytes / max(1, self._victims.bytes))
            self._set_window(self._window_cap - int(size * ratio))

    def _remove(self, key: bytes) -> int:
        """Drop ``key`` from its segment; returns its size in bytes."""
        seg = self._where.pop(key)
        n = len(seg.pop(key))
        self._size -= n
        if seg is self._window:
            self._window_bytes -= n
        elif seg is self._protected:
            self._protected_bytes -= n
        return n

    def _evict(self, key: bytes, ghosts: _Ghosts) -> None:
        n = self._remove(key)
        ghosts.add(key, n, int(self._capacity * GHOST_FRACTION))
        self._evictions += 1
        self._evicted_bytes += n

    def _demote_protected(self) -> None:
        """Move protected's oldest entries to probation's newest end while protected is
        over its share (its newest entry stays, even if alone over the share)."""
        prot, prob = self._protected, self._probation
        while self._protected_bytes > self._protected_cap and len(prot) > 1:
            k, v = prot.popitem(last=False)
            self._protected_bytes -= len(v)
            prob[k] = v
            self._where[k] = prob

    def _victim(self, exclude: bytes, pending: int) -> bytes | None:
        """The entry to duel a candidate: probation's oldest non-candidate, else
        protected's oldest, else the window's oldest; never ``exclude``.

        The last ``pending`` probation entries are the candidates.  ``exclude`` is the
        newest of its segment (or of probation's non-candidates), so if it comes
        first there, it is alone and the next segment is tried.
        """
        if len(self._probation) > pending:
            k = next(iter(self._probation))
            if k != exclude:
                return k
        for seg in (self._protected, self._window):
            if seg:
                k = next(iter(seg))
                if k != exclude:
                    return k
        return None

    def _make_room(self, exclude: bytes) -> None:
        """Shrink the window to its share, then evict until the bytes fit.

        Entries leaving the window are appended to probation as candidates (oldest
        first).  While over capacity the current candidate duels :meth:`_victim` and
        the loser is evicted (TinyLFU admission); with no candidate left the victim is
        evicted.  ``exclude``, the key just put, is never moved or evicted; the caller
        ensured that its value fits the capacity.
        """
        window, prob = self._window, self._probation
        cands: list[bytes] = []
        while self._window_bytes > self._window_cap:
            k = next(iter(window))
            if k == exclude:  # the newest, so alone in the window
                break
            v = window.pop(k)
            self._window_bytes -= len(v)
            prob[k] = v
            self._where[k] = prob
            cands.append(k)
        ci = 0
        while self._size > self._capacity:
            victim = self._victim(exclude, len(cands) - ci)
            if ci == len(cands):
                assert victim is not None, "over capacity with nothing evictable"
                self._evict(victim, self._victims)
            elif victim is None:  # only candidates are left to evict
                self._evict(cands[ci], self._rejected)
                ci += 1
            elif self._sketch.estimate(cands[ci]) > self._sketch.estimate(victim):
                self._evict(victim, self._victims)
            else:
                self._evict(cands[ci], self._rejected)
                self._rejects += 1
                ci += 1
