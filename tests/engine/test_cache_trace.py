"""Trace tests of the chunk cache with tools.bench.cache: our LFUCache against LRU and the
offline optimum on the quick traces (fixed seeds, so hit ratios are deterministic and
the asserted relations are exact), and the correctness of the reference policies and
bounds (Belady against a brute-force optimum on small traces).  No timings are asserted.
"""
from __future__ import annotations

import gzip
import itertools
import random
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import pytest

from cas.chunk.envelope import chunk_id
from cas.config.volume import MIN_CHUNK
from tools.bench import cache as cb

Rows = dict[tuple[str, int], cb.Row]


@pytest.fixture(scope="module")
def rows() -> Rows:
    """Every row of ``python -m tools.bench.cache --quick``, by (trace, size %)."""
    return {(r.trace, r.pct): r for t in cb.all_traces(quick=True) for r in cb.evaluate(t)}


def _of(rows: Rows, prefix: str) -> list[cb.Row]:
    found = [r for key, r in rows.items() if key[0].startswith(prefix)]
    assert found
    return found


# -- the targets --------------------------------------------------------------------


def test_lfu_beats_lru_on_every_zipf_trace_and_size(rows: Rows) -> None:
    for r in _of(rows, "zipf-"):
        assert r.lfu > r.lru, r


def test_lfu_beats_lru_on_the_scan_mixed_trace(rows: Rows) -> None:
    for r in _of(rows, "scan"):
        assert r.lfu > r.lru, r


def test_lfu_within_5_points_of_lru_on_the_shifting_trace(rows: Rows) -> None:
    for r in _of(rows, "shift"):
        assert r.lfu >= r.lru - 5, r


def test_lfu_at_least_lru_on_the_stdlib_trace(rows: Rows) -> None:
    for r in _of(rows, "stdlib"):
        assert r.lfu >= r.lru, r


def test_nothing_beats_the_optimum(rows: Rows) -> None:
    """Belady is the optimum for uniform sizes; PFOO-U bounds every policy otherwise."""
    for r in rows.values():
        if r.pfoo is None:
            assert r.lfu <= r.belady and r.lru <= r.belady, r
        else:
            assert max(r.lfu, r.lru, r.belady) <= r.pfoo, r


def test_lfu_close_to_the_online_optimum_on_stationary_zipf(rows: Rows) -> None:
    """Within 5 points of a cache that statically holds the most popular chunks (the
    best policy without future knowledge under IRM), skews 0.8-1.2, every size."""
    for r in _of(rows, "zipf-"):
        assert r.topk is not None
        if r.trace != "zipf-0.6":
            assert r.topk - r.lfu <= 5, r


def test_zipf_1_0_at_20_percent_reaches_80_percent() -> None:
    """At the full scale (10,000 chunks, 200,000 requests) the online optimum allows
    >= 80 % (82.2 %) and we reach it; at the quick scale (2,000 chunks) even the
    optimum stays below 80 %, so this one trace runs at full scale."""
    t = cb.zipf_trace(1.0, cb.FULL, seed=3)  # the full table's zipf-1.0
    cap = cb.capacity_for(t, 20)
    assert cb.topk_hits(t, cap) / len(t.seq) >= 0.80
    assert cb.run_ours(t, cap) >= 0.80


# -- the reference policies and bounds ------------------------------------------------


def brute_force_hits(seq: Sequence[int], sizes: Sequence[int], capacity: int) -> int:
    """The most hits of any policy: after each request the cache may hold any subset of
    (what it held + the requested key) that fits.  Exponential; tiny traces only."""
    states: dict[frozenset[int], int] = {frozenset(): 0}
    for x in seq:
        nxt: dict[frozenset[int], int] = {}
        for held, hits in states.items():
            gained = hits + (x in held)
            pool = sorted(held | {x})
            for n in range(len(pool) + 1):
                for keep in itertools.combinations(pool, n):
                    if sum(sizes[y] for y in keep) <= capacity:
                        s = frozenset(keep)
                        nxt[s] = max(nxt.get(s, -1), gained)
        states = nxt
    return max(states.values())


HAND_TRACES = [
    ([0, 1, 2, 0, 1, 3, 0, 3, 1, 2, 0], 2),
    ([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3], 3),   # a loop one larger than the cache
    ([0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 0], 1),
    ([4, 3, 2, 1, 0, 1, 2, 3, 4, 0, 4, 0], 2),
    ([0, 1, 2, 3, 4, 0, 1, 2, 3, 4], 4),
]


@pytest.mark.parametrize(("seq", "entries"), HAND_TRACES)
def test_belady_is_optimal_on_hand_made_traces(seq: list[int], entries: int) -> None:
    sizes = [64] * 5
    assert cb.belady_hits(seq, sizes, 64 * entries) == brute_force_hits(seq, sizes, 64 * entries)


def test_belady_is_optimal_for_uniform_sizes_and_pfoo_bounds_variable_sizes() -> None:
    rnd = random.Random(4)
    for _ in range(120):
        nkeys = rnd.randint(2, 5)
        seq = [rnd.randrange(nkeys) for _ in range(rnd.randint(1, 12))]
        entries = rnd.randint(1, nkeys)
        uniform = [10] * nkeys
        best = brute_force_hits(seq, uniform, 10 * entries)
        assert cb.belady_hits(seq, uniform, 10 * entries) == best, (seq, entries)
        assert cb.pfoo_upper_hits(seq, uniform, 10 * entries) >= best
        sizes = [rnd.randint(1, 10) for _ in range(nkeys)]
        cap = rnd.randint(1, 20)
        best = brute_force_hits(seq, sizes, cap)
        assert cb.belady_hits(seq, sizes, cap) <= best <= cb.pfoo_upper_hits(seq, sizes, cap)


def test_our_cache_and_lru_never_beat_brute_force() -> None:
    rnd = random.Random(8)
    for _ in range(60):
        nkeys = rnd.randint(2, 5)
        seq = [rnd.randrange(nkeys) for _ in range(rnd.randint(1, 12))]
        t = cb.Trace("t", seq, [10] * nkeys, [i.to_bytes(8, "little") for i in range(nkeys)])
        cap = 10 * rnd.randint(1, nkeys)
        best = brute_force_hits(seq, t.sizes, cap)
        assert round(cb.run_ours(t, cap) * len(seq)) <= best
        assert round(cb.run_lru(t, cap) * len(seq)) <= best


def test_lru_and_next_uses_and_topk_on_a_hand_trace() -> None:
    seq = [0, 1, 2, 0, 3, 0, 1, 2]
    t = cb.Trace("t", seq, [10] * 4, [bytes([i]) for i in range(4)], ranked=[0, 1, 2, 3])
    assert cb.next_uses(seq) == [3, 6, 7, 5, 8, 8, 8, 8]
    # LRU of 3: 0 1 2 | 0 hit | 3 evicts 1 | 0 hit | 1 evicts 2 | 2 evicts 3
    assert cb.run_lru(t, 30) == pytest.approx(2 / 8)
    # the top 2 (keys 0, 1), filled on first use: 0 hits twice, 1 once
    assert cb.topk_hits(t, 20) == 3


def test_capacity_is_a_share_of_the_working_set() -> None:
    t = cb.Trace("t", [0, 1, 1, 2], [cb.CHUNK] * 4, [bytes([i]) for i in range(4)])
    assert t.uniform and t.working_set == 3 * cb.CHUNK
    assert cb.capacity_for(t, 1) == cb.CHUNK  # at least one chunk
    v = cb.Trace("v", [0, 1], [100, 300], [b"a", b"b"])
    assert not v.uniform and cb.capacity_for(v, 10) == 40


def test_synthetic_traces_are_deterministic_and_shaped() -> None:
    a, b = cb.synthetic_traces(cb.QUICK), cb.synthetic_traces(cb.QUICK)
    assert [t.seq for t in a] == [t.seq for t in b]
    names = [t.name for t in a]
    assert names == ["zipf-0.6", "zipf-0.8", "zipf-1.0", "zipf-1.2", "scan", "shift"]
    scan = a[4]
    pop = cb.QUICK.population
    assert scan.seq[2 * pop:2 * pop + pop // 2] == list(range(pop, pop + pop // 2))
    assert all(len(t.seq) == cb.QUICK.requests for t in a)


# -- the recorded stdlib trace ------------------------------------------------------------


def test_stdlib_trace_file_is_small_and_sane() -> None:
    path = cb.STDLIB_TRACE
    assert path.stat().st_size < 2 << 20
    t = cb.stdlib_trace()
    assert len(t.seq) > 50_000 and len(t.ids) == len(t.sizes) == len(set(t.ids))
    assert set(t.seq) == set(range(len(t.ids)))
    assert all(len(i) == 8 for i in t.ids) and all(0 < n <= MIN_CHUNK for n in t.sizes)
    assert not t.uniform


def test_stdlib_trace_recording_is_deterministic() -> None:
    """Recording twice from this interpreter's stdlib gives the same trace, and one of
    the same shape as the shipped file (recorded from CPython 3.11.7; another version's
    stdlib gives other chunks, so the file itself is compared only in count ranges)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    first = cb.record_stdlib(root)
    assert first == cb.record_stdlib(root)
    ids, sizes, seq = first
    t = cb.stdlib_trace()
    assert len(ids) == len(set(ids)) == len(sizes) and set(seq) == set(range(len(ids)))
    assert 0.5 < len(ids) / len(t.ids) < 2 and 0.5 < len(seq) / len(t.seq) < 2


def test_recorder_cuts_chunks_like_the_engine(tmp_path: Path) -> None:
    """Fixed 64 KiB slots, short last slot, all-zero slots as holes, equal slots shared,
    SHA-256 ids; imports followed depth-first, parents first, once per run."""
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    big = bytes(range(256)) * (MIN_CHUNK // 256)           # one full, non-zero slot
    (root / "site.py").write_bytes(b"import os\n")
    (root / "os.py").write_bytes(big + bytes(MIN_CHUNK) + big + b"tail")  # hole in slot 1
    (root / "pkg" / "__init__.py").write_bytes(b"")          # empty: no chunk
    (root / "pkg" / "mod.py").write_bytes(b"from . import other\nimport os\n")
    (root / "pkg" / "other.py").write_bytes(big)             # same bytes as os.py's slot 0
    ids, sizes, seq = cb.record_stdlib(root, runs=3, passes=1)
    mod, site = b"from . import other\nimport os\n", b"import os\n"
    # files in path order: os.py, pkg/__init__.py, pkg/mod.py, pkg/other.py, site.py
    assert ids == [chunk_id(big), chunk_id(b"tail"), chunk_id(mod), chunk_id(site)]
    assert sizes == [MIN_CHUNK, 4, len(mod), len(site)]
    # run 1 imports site, then os (slots 0 and 2 share a chunk, slot 1 is a hole)
    assert seq[:4] == [3, 0, 0, 1]
    # one walk over the tree in all: every file's chunks appear at least once more
    assert seq.count(2) >= 1 and seq.count(0) >= 2 * 2 + 1


def test_main_prints_and_writes_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    tiny = cb.Trace("tiny", [0, 1, 0, 2, 0, 1], [cb.CHUNK] * 3, [bytes([i]) for i in range(3)])
    monkeypatch.setattr(cb, "all_traces", lambda quick: [tiny])
    out = tmp_path / "table.txt"
    assert cb.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.splitlines()[0].split()[:7] == ["trace", "size%", "LFU", "LRU", "Belady",
                                                "LFU-LRU", "Belady-LFU"]
    assert len(text.splitlines()) == 1 + len(cb.PCTS)
    assert text.strip() in capsys.readouterr().out


def test_trace_file_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "t.trace.gz"
    cb.write_trace(p, [b"A" * 32, b"B" * 32], [5, 70000], [1, 0, 1])
    t = cb.read_trace(p)
    assert list(t.ids) == [b"A" * 8, b"B" * 8] and list(t.sizes) == [5, 70000]
    assert list(t.seq) == [1, 0, 1]
    p.write_bytes(gzip.compress(b"nonsense"))
    with pytest.raises(ValueError):
        cb.read_trace(p)
