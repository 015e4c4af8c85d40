"""Trace benchmark of the chunk cache: our ``cas.chunk.cache.LFUCache`` against LRU and Belady.

Usage::

    python -m tools.bench.cache [--quick] [--out FILE]
    python -m tools.bench.cache --record-stdlib FILE [--stdlib DIR]

Each trace is a sequence of chunk requests.  A policy serves it the way the engine's
read path does (``cas.chunk.manager.ChunkManager.load``): ``get``, and ``put`` on a miss.
Every policy is byte-bounded with the same capacity, ``PCT`` of the trace's working
set (the bytes of its distinct chunks), and is scored by **object hit ratio**: hits
per request.  The policies:

``LFU``
    the real :class:`cas.chunk.cache.LFUCache` (W-TinyLFU), cold at the start;
``LRU``
    an ``OrderedDict`` LRU counted in the same bytes;
``Belady``
    the offline MIN policy: on a miss, evict the cached chunk whose next use is
    furthest in the future, or bypass the requested one if its own next use is
    further still.  For uniform sizes (the synthetic traces) this is the optimum
    of any policy, online or not.  For the stdlib trace (real chunk sizes) it is
    only a strong offline heuristic, so the table also gives ``PFOO-U``;
``PFOO-U``
    an upper bound on the object hit ratio of any policy with variable sizes
    (Berger, Beckmann, Harchol-Balter, "Practical Bounds on Optimal Caching with
    Variable Object Sizes", SIGMETRICS 2018): keeping a chunk from one request to
    its next costs size x distance byte-requests, at most capacity x length are
    available, and taking the cheapest intervals first maximises their number;
    shown for the stdlib trace only;
``top-k``
    for the stationary Zipf traces: a cache that statically holds the k most
    probable chunks (k = capacity / chunk size, cold misses included).  Under the
    independent reference model this is, in expectation, the best any policy
    *without* future knowledge can do (it knows the true popularity, which an
    online policy must learn), so it is the fair target; on one finite trace a
    policy may beat it slightly by chance.  Belady sees the future and beats it,
    by the most at small sizes.

Traces (synthetic ones use 64 KiB chunks and fixed seeds; ``--quick`` shrinks
them fivefold, to 2,000 keys and 40,000 requests; the stdlib trace is the same):

``zipf-S``
    stationary Zipf with skew S (0.6, 0.8, 1.0, 1.2) over a fixed key population;
``scan``
    Zipf(0.9) interrupted every 2 x population requests by a sequential scan of
    population / 2 fresh, one-time keys;
``shift``
    a hot set of population / 10 keys takes 80 % of the requests (the rest is
    uniform over the population) and is replaced by a new random one every
    population requests;
``stdlib``
    a recorded trace, ``tools/bench/traces/stdlib-py311.trace.gz`` (53 KB: 1,903 chunks,
    85,884 requests), loaded as recorded, not regenerated, so runs on other
    machines and Python versions use the same requests.

How the stdlib trace was recorded (``--record-stdlib``, deterministic given the
stdlib tree): every ``.py`` file of the CPython 3.11.7 standard library (1,790
files, 31.5 MB, ``site-packages`` excluded) is cut into chunks exactly as
``cas.engine.filedata`` stores a file on a volume with the smallest chunk size (64 KiB):
fixed slots, the last one short, all-zero slots left as holes, id =
``cas.chunk.envelope.chunk_id`` (SHA-256), identical slots sharing an id; the file keeps
the first 8 bytes of each id and the real chunk sizes.  The read pattern: 2,000
simulated program runs, each importing, from a cold import state, ``site`` and
then one root module drawn from Zipf(1.0) over the modules ranked by how many
stdlib files import them, following top-level imports depth-first (each module's
file read once per run, every chunk in order); between runs a tree walker reads
the next files in sorted path order, three full passes over the tree in all (like
``grep -r`` or an indexer).  A file read requests each of its chunks once (kernel
reads of 128 KiB cover whole 64 KiB chunks).  The kernel page cache in front of
a real mount would absorb some of these repeats; this is the stream the engine's
cache would see without it.

The benchmark only measures and prints; hit ratios are deterministic.
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import heapq
import random
import re
import struct
import sys
import sysconfig
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cas.chunk.cache import LFUCache
from cas.chunk.envelope import chunk_id
from cas.config.volume import MIN_CHUNK

CHUNK = 64 * 1024                     # bytes per chunk of the synthetic traces
PCTS = (1, 5, 10, 20, 40)             # cache sizes, % of the working set
ZIPF_SKEWS = (0.6, 0.8, 1.0, 1.2)
TRACE_DIR = Path(__file__).resolve().parent / "traces"
STDLIB_TRACE = TRACE_DIR / "stdlib-py311.trace.gz"
_MAGIC = b"CASTRC1\n"
_ID_LEN = 8                           # bytes of each chunk id kept in a trace file


# --------------------------------------------------------------------------- traces


@dataclass(frozen=True)
class Trace:
    """A request sequence over keys ``0..len(sizes)-1``.

    ``seq``: key per request; ``sizes``: bytes per key; ``ids``: the key's bytes as
    given to ``LFUCache``; ``ranked``: for IRM traces, keys by decreasing
    probability (enables the top-k bound), else None.
    """

    name: str
    seq: Sequence[int]
    sizes: Sequence[int]
    ids: Sequence[bytes]
    ranked: Sequence[int] | None = None

    @property
    def uniform(self) -> bool:
        """Whether all requested keys have one size (Belady is then optimal)."""
        return len({self.sizes[k] for k in set(self.seq)}) <= 1

    @property
    def working_set(self) -> int:
        """Bytes of the distinct keys requested."""
        return sum(self.sizes[k] for k in set(self.seq))


@dataclass(frozen=True)
class Scale:
    """Trace dimensions: key population and requests of each synthetic trace."""

    population: int
    requests: int


FULL = Scale(population=10_000, requests=200_000)
QUICK = Scale(population=2_000, requests=40_000)


def _uniform_trace(name: str, seq: list[int], nkeys: int,
                   ranked: Sequence[int] | None = None) -> Trace:
    return Trace(name, seq, [CHUNK] * nkeys, [k.to_bytes(_ID_LEN, "little") for k in range(nkeys)],
                 ranked)


def zipf_cdf(n: int, skew: float) -> list[float]:
    """Cumulative probabilities of ranks 0..n-1, p(r) proportional to 1 / (r + 1)^skew."""
    acc, out = 0.0, []
    for r in range(n):
        acc += 1.0 / (r + 1) ** skew
        out.append(acc)
    return [c / acc for c in out]


def _draw(rng: random.Random, cdf: list[float]) -> int:
    return min(bisect.bisect_left(cdf, rng.random()), len(cdf) - 1)


def zipf_trace(skew: float, sc: Scale, seed: int) -> Trace:
    """Stationary Zipf: key = popularity rank, ``sc.requests`` independent draws."""
    rng, cdf = random.Random(seed), zipf_cdf(sc.population, skew)
    seq = [_draw(rng, cdf) for _ in range(sc.requests)]
    return _uniform_trace(f"zipf-{skew}", seq, sc.population, ranked=range(sc.population))


def scan_trace(sc: Scale, seed: int, skew: float = 0.9) -> Trace:
    """Zipf(skew) requests; after every 2 x population of them a scan of
    population / 2 fresh keys, each requested once."""
    rng, cdf = random.Random(seed), zipf_cdf(sc.population, skew)
    seq: list[int] = []
    fresh = sc.population
    while len(seq) < sc.requests:
        seq.extend(_draw(rng, cdf) for _ in range(2 * sc.population))
        seq.extend(range(fresh, fresh + sc.population // 2))
        fresh += sc.population // 2
    return _uniform_trace("scan", seq[:sc.requests], fresh)


def shifting_trace(sc: Scale, seed: int) -> Trace:
    """80 % of requests uniform over a hot set of population / 10 keys, 20 % uniform
    over all keys; a new random hot set every ``population`` requests."""
    rng = random.Random(seed)
    seq: list[int] = []
    hot: list[int] = []
    for i in range(sc.requests):
        if i % sc.population == 0:
            hot = rng.sample(range(sc.population), sc.population // 10)
        seq.append(rng.choice(hot) if rng.random() < 0.8 else rng.randrange(sc.population))
    return _uniform_trace("shift", seq, sc.population)


def synthetic_traces(sc: Scale, seed: int = 1) -> list[Trace]:
    """The synthetic traces of the table, in order."""
    out = [zipf_trace(s, sc, seed + i) for i, s in enumerate(ZIPF_SKEWS)]
    return out + [scan_trace(sc, seed + 10), shifting_trace(sc, seed + 20)]


# --------------------------------------------------------------------------- policies


def _values(t: Trace) -> list[bytes]:
    blobs: dict[int, bytes] = {}
    return [blobs.setdefault(n, bytes(n)) for n in t.sizes]


def run_ours(t: Trace, capacity: int, make: Callable[[int], LFUCache] = LFUCache) -> float:
    """Object hit ratio of the real cache, driven like the engine: get, put on a miss."""
    cache = make(capacity)
    get, put, ids, vals = cache.get, cache.put, t.ids, _values(t)
    for k in t.seq:
        key = ids[k]
        if get(key) is None:
            put(key, vals[k])
    return cache.stats().hit_ratio


def run_lru(t: Trace, capacity: int) -> float:
    """Object hit ratio of a byte-bounded LRU (``OrderedDict``), put on every miss."""
    lru: OrderedDict[int, int] = OrderedDict()
    size = hits = 0
    sizes = t.sizes
    for k in t.seq:
        if k in lru:
            lru.move_to_end(k)
            hits += 1
            continue
        n = sizes[k]
        if n > capacity:
            continue
        lru[k] = n
        size += n
        while size > capacity:
            size -= lru.popitem(last=False)[1]
    return hits / len(t.seq) if t.seq else 0.0


def next_uses(seq: Sequence[int]) -> list[int]:
    """For each request, the index of the next request of the same key (len(seq): none)."""
    nxt = [0] * len(seq)
    last: dict[int, int] = {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = last.get(seq[i], len(seq))
        last[seq[i]] = i
    return nxt


def belady_hits(seq: Sequence[int], sizes: Sequence[int], capacity: int) -> int:
    """Hits of MIN with bypass: evict furthest-next-use chunks until the requested one
    fits, unless it is itself used later than every cached chunk (then bypass).

    Optimal for uniform sizes (Belady 1966; Mattson et al. 1970); a heuristic for
    variable sizes.  O(n log n) with a lazily cleaned max-heap of next uses.
    """
    nxt = next_uses(seq)
    end = len(seq)
    cached: dict[int, int] = {}        # key -> its next use
    heap: list[tuple[int, int]] = []   # (-next use, key); stale when it disagrees
    size = hits = 0
    for i, k in enumerate(seq):
        nu = nxt[i]
        if k in cached:
            hits += 1
            cached[k] = nu
            heapq.heappush(heap, (-nu, k))
            continue
        n = sizes[k]
        if nu == end or n > capacity:
            continue
        while size + n > capacity:
            far, victim = heap[0]
            if cached.get(victim) != -far:
                heapq.heappop(heap)
            elif -far <= nu:
                break              # everything cached is needed before k: bypass k
            else:
                heapq.heappop(heap)
                del cached[victim]
                size -= sizes[victim]
        if size + n <= capacity:
            cached[k] = nu
            heapq.heappush(heap, (-nu, k))
            size += n
    return hits


def pfoo_upper_hits(seq: Sequence[int], sizes: Sequence[int], capacity: int) -> int:
    """Upper bound on the hits of any policy (PFOO-U, Berger et al. 2018).

    A hit at request j of a key last requested at i needs the key cached over the
    j - i gaps between them, using size x (j - i) of the capacity x len(seq)
    byte-gaps that exist; the cheapest intervals first give the most hits.
    """
    costs = sorted(sizes[seq[i]] * (j - i) for i, j in enumerate(next_uses(seq))
                   if j < len(seq) and sizes[seq[i]] <= capacity)
    budget, hits = capacity * len(seq), 0
    for c in costs:
        budget -= c
        if budget < 0:
            break
        hits += 1
    return hits


def topk_hits(t: Trace, capacity: int) -> int:
    """Hits of a cache holding exactly the ``capacity // size`` most probable keys
    (filled on their first request); uniform IRM traces only."""
    assert t.ranked is not None
    k = capacity // t.sizes[0]
    top = set(list(t.ranked)[:k])
    seen: set[int] = set()
    hits = 0
    for key in t.seq:
        if key in top:
            if key in seen:
                hits += 1
            else:
                seen.add(key)
    return hits


# --------------------------------------------------------------------------- stdlib trace


def read_trace(path: Path, name: str = "stdlib") -> Trace:
    """Load a trace file written by :func:`write_trace`."""
    raw = gzip.decompress(path.read_bytes())
    if raw[:len(_MAGIC)] != _MAGIC:
        raise ValueError(f"{path}: not a cache trace")
    nkeys, nreq = struct.unpack_from("<II", raw, len(_MAGIC))
    pos = len(_MAGIC) + 8
    ids, sizes = [], []
    for _ in range(nkeys):
        ids.append(raw[pos:pos + _ID_LEN])
        sizes.append(struct.unpack_from("<I", raw, pos + _ID_LEN)[0])
        pos += _ID_LEN + 4
    seq = list(struct.unpack_from(f"<{nreq}I", raw, pos))
    return Trace(name, seq, sizes, ids)


def write_trace(path: Path, ids: Sequence[bytes], sizes: Sequence[int], seq: Sequence[int]) -> None:
    """Write ``magic, nkeys, nrequests (u32 LE), nkeys x (id, size u32), seq (u32)``, gzipped."""
    parts = [_MAGIC, struct.pack("<II", len(ids), len(seq))]
    parts += [cid[:_ID_LEN] + struct.pack("<I", n) for cid, n in zip(ids, sizes)]
    parts.append(struct.pack(f"<{len(seq)}I", *seq))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(b"".join(parts), 9, mtime=0))


_IMPORT = re.compile(r"^import\s+([\w.]+(?:\s*,\s*[\w.]+)*)|^from\s+(\.*)([\w.]*)\s+import\s+\(?\s*([\w]+)",
                     re.MULTILINE)


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(text: str, mod: str, is_pkg: bool, known: set[str]) -> list[str]:
    """Top-level imports of a module (unindented ``import`` / ``from`` lines), each
    preceded by its parent packages, resolved to stdlib modules that exist."""
    out: list[str] = []
    package = mod if is_pkg else mod.rpartition(".")[0]
    for m in _IMPORT.finditer(text):
        if m.group(1):
            names = [n.strip() for n in m.group(1).split(",")]
        else:
            dots, base, first = m.group(2), m.group(3), m.group(4)
            if dots:
                anchor = package.split(".")[:len(package.split(".")) - (len(dots) - 1)] if package else []
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{first}" if f"{base}.{first}" in known else base]
        for name in names:
            parts = name.split(".")
            out += [p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in known]
    return out


def record_stdlib(root: Path, runs: int = 2_000, passes: int = 3, skew: float = 1.0,
                  seed: int = 7) -> tuple[list[bytes], list[int], list[int]]:
    """Chunk ids, chunk sizes and the request sequence of the stdlib workload
    described in the module docstring. Deterministic given the tree under ``root``."""
    files = sorted(p.relative_to(root) for p in root.rglob("*.py") if "site-packages" not in p.parts)
    index: dict[bytes, int] = {}
    ids: list[bytes] = []
    sizes: list[int] = []
    file_chunks: list[list[int]] = []
    texts: list[str] = []
    for rel in files:
        data = (root / rel).read_bytes()
        texts.append(data.decode("utf-8", "replace"))
        keys = []
        for off in range(0, len(data), MIN_CHUNK):
            piece = data[off:off + MIN_CHUNK]
            if piece.count(0) == len(piece):
                continue  # a hole: no chunk
            cid = chunk_id(piece)
            if cid not in index:
                index[cid] = len(ids)
                ids.append(cid)
                sizes.append(len(piece))
            keys.append(index[cid])
        file_chunks.append(keys)
    mods = {_module_name(rel): i for i, rel in enumerate(files)}
    known = set(mods)
    deps = {name: _imports(texts[i], name, files[i].name == "__init__.py", known)
            for name, i in mods.items()}
    importers: dict[str, int] = dict.fromkeys(mods, 0)
    for name, ds in deps.items():
        for d in set(ds) - {name}:
            importers[d] += 1
    ranked = sorted(mods, key=lambda m: (-importers[m], m))
    rng, cdf = random.Random(seed), zipf_cdf(len(ranked), skew)
    seq: list[int] = []

    def import_closure(start: str, done: set[str]) -> None:
        stack = [start]
        while stack:
            name = stack.pop()
            if name in done:
                continue
            done.add(name)
            seq.extend(file_chunks[mods[name]])
            stack.extend(reversed(deps[name]))

    walk_total, walked = passes * len(files), 0
    for r in range(runs):
        done: set[str] = set()
        import_closure("site", done)
        import_closure(ranked[_draw(rng, cdf)], done)
        target = walk_total * (r + 1) // runs
        while walked < target:
            seq.extend(file_chunks[walked % len(files)])
            walked += 1
    return ids, sizes, seq


def stdlib_trace(path: Path = STDLIB_TRACE) -> Trace:
    """The recorded stdlib trace."""
    return read_trace(path)


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Row:
    """One line of the table; ratios in percent of requests, None where not defined."""

    trace: str
    pct: int
    lfu: float
    lru: float
    belady: float
    topk: float | None
    pfoo: float | None


def capacity_for(t: Trace, pct: int) -> int:
    """``pct`` % of the working set in bytes (whole chunks for uniform traces, >= 1)."""
    if t.uniform:
        n = len(set(t.seq))
        return max(1, round(n * pct / 100)) * t.sizes[t.seq[0]]
    return max(1, round(t.working_set * pct / 100))


def evaluate(t: Trace, pcts: Sequence[int] = PCTS) -> Iterator[Row]:
    """Rows of trace ``t`` for each cache size."""
    n = len(t.seq)
    for pct in pcts:
        cap = capacity_for(t, pct)
        topk = 100 * topk_hits(t, cap) / n if t.ranked is not None and t.uniform else None
        pfoo = None if t.uniform else 100 * pfoo_upper_hits(t.seq, t.sizes, cap) / n
        yield Row(t.name, pct, 100 * run_ours(t, cap), 100 * run_lru(t, cap),
                  100 * belady_hits(t.seq, t.sizes, cap) / n, topk, pfoo)


def format_table(rows: Sequence[Row]) -> str:
    """The table as aligned text (percent of requests; differences in points)."""
    head = ("trace", "size%", "LFU", "LRU", "Belady", "LFU-LRU", "Belady-LFU", "top-k",
            "top-k-LFU", "PFOO-U")
    lines = ["{:<9} {:>5} {:>6} {:>6} {:>6} {:>8} {:>10} {:>6} {:>9} {:>6}".format(*head)]
    for r in rows:
        topk, gap, pfoo = ("-" if v is None else f"{v:{f}}" for v, f in (
            (r.topk, ".1f"), (None if r.topk is None else r.topk - r.lfu, "+.1f"), (r.pfoo, ".1f")))
        lines.append(f"{r.trace:<9} {r.pct:>5} {r.lfu:>6.1f} {r.lru:>6.1f} {r.belady:>6.1f} "
                     f"{r.lfu - r.lru:>+8.1f} {r.belady - r.lfu:>+10.1f} {topk:>6} {gap:>9} "
                     f"{pfoo:>6}")
    return "\n".join(lines)


def all_traces(quick: bool) -> list[Trace]:
    """The traces of one run: synthetic ones at the chosen scale, then the stdlib one."""
    return synthetic_traces(QUICK if quick else FULL) + [stdlib_trace()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small traces (about 5x fewer requests)")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    p.add_argument("--record-stdlib", type=Path, metavar="FILE",
                   help="record the stdlib trace to FILE and exit")
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                   help="standard library tree to record (default: this Python's)")
    args = p.parse_args(argv)
    if args.record_stdlib:
        ids, sizes, seq = record_stdlib(args.stdlib)
        write_trace(args.record_stdlib, ids, sizes, seq)
        print(f"{args.record_stdlib}: {len(ids)} chunks, {sum(sizes)} bytes, {len(seq)} requests")
        return 0
    started = time.monotonic()
    rows: list[Row] = []
    for t in all_traces(args.quick):
        rows.extend(evaluate(t))
        print(f"  {t.name}: {len(t.seq)} requests, {len(set(t.seq))} chunks, "
              f"working set {t.working_set / 2**20:.1f} MiB", file=sys.stderr)
    table = format_table(rows)
    print(table)
    print(f"({time.monotonic() - started:.0f} s; hit ratios in % of requests; Belady is exact "
          f"for the uniform-size traces, a heuristic for stdlib, where PFOO-U bounds every policy)")
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
