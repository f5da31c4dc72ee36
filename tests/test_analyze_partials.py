"""The reads' partial results combine associatively: any grouping of the chunks (and any order, where
the partial does not carry rows in order) finishes to the same outcome as one chunk holding all rows;
and the finish applies the same limits to one chunk as to many (hypothesis)."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from analyze.config import ReadConfig
from analyze.inmemory import Rows, finish_rows, read_rows
from analyze.kernels import Chunk, inlier_moments, scan_chunk
from analyze.moments import BlockMoments
from analyze.radix import DigitRead, GatherRead, RadixState
from analyze.reads import Fused, InlierMomentsRead, MedianRead
from analyze.scan import UnitFacts, finish_scan, runs


def _data(seed: int, n: int, d: int, dtype: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 1.0, (n, d)) + rng.normal(0, 0.3, d)
    x[rng.random(n) < 0.05] *= 25.0  # outliers
    return x.astype(dtype)


def _facts(n: int, dtype, samples: int = 3, blocks: int = 2) -> UnitFacts:
    sample_row = np.repeat(np.arange(samples), -(-n // samples))[:n]
    block = np.searchsorted([0, samples // blocks], sample_row, side="right") - 1
    return UnitFacts(1, "vision", np.dtype(dtype), np.dtype(dtype).itemsize, block, sample_row, blocks)


def _chunks(n: int, cuts: list[int], facts: UnitFacts) -> list[Chunk]:
    edges = sorted({0, n, *(c % (n + 1) for c in cuts)})
    return [Chunk(a, b, runs(facts.sample_block[a:b]), len(runs(facts.sample_row[a:b])))
            for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _grouped(parts: list, draw):
    """Combine consecutive parts in a drawn tree shape (any grouping, order kept)."""
    if len(parts) == 1:
        return parts[0]
    cut = draw(st.integers(1, len(parts) - 1))
    return _grouped(parts[:cut], draw).combine(_grouped(parts[cut:], draw))


def _same_moments(a: BlockMoments, b: BlockMoments) -> None:
    assert sorted(a.by_block) == sorted(b.by_block)
    for k, m in a.by_block.items():
        o = b.by_block[k]
        assert m.n == o.n
        np.testing.assert_allclose(m.mean, o.mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(m.m2, o.m2, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(o.m2).max()))


CASE = dict(seed=st.integers(0, 2**31), n=st.integers(2, 120), d=st.integers(1, 9),
            dtype=st.sampled_from(["float16", "float32"]), cuts=st.lists(st.integers(0, 200), max_size=6))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), **CASE)
def test_scan_partials_combine_in_any_grouping(data, seed, n, d, dtype, cuts):
    x = _data(seed, n, d, dtype)
    facts = _facts(n, dtype)
    config = ReadConfig(window_bins=data.draw(st.sampled_from([0, 2, 32])), sparse_count=4)
    whole = finish_scan(scan_chunk(x, _chunks(n, [], facts)[0], "float64", config), facts, "float64")
    parts = [scan_chunk(x[c.start:c.stop], c, "float64", config) for c in _chunks(n, cuts, facts)]
    got = finish_scan(_grouped(parts, data.draw), facts, "float64")
    assert got.summary == whole.summary and np.array_equal(got.outliers, whole.outliers)
    top = [m.prefix >> (8 * (m.fixed - 1)) for m in (got.median, whole.median)]
    assert np.array_equal(*top)  # the top byte of every column's median; a finished median is exact:
    if got.median.done:
        np.testing.assert_array_equal(got.median.values, np.sort(x.astype(np.float64), axis=0)[(n - 1) // 2])
    if got.inliers is not None and whole.inliers is not None:
        _same_moments(got.inliers, whole.inliers)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), **CASE)
def test_commutative_partials_combine_in_any_order_and_grouping(data, seed, n, d, dtype, cuts):
    """Moments per sample block, median digit counts and gathered candidates do not depend on row order."""
    x = _data(seed, n, d, dtype)
    facts = _facts(n, dtype)
    outliers = np.random.default_rng(seed).random(n) < 0.1
    chunks = [Chunk(c.start, c.stop, c.runs, c.samples, outliers[c.start:c.stop]) for c in _chunks(n, cuts, facts)]
    state = RadixState.start(dtype, n, d)
    DigitRead(0, state.prefix).map(x).apply_to(state)
    reads = (InlierMomentsRead("float64"), MedianRead(DigitRead(state.fixed, state.prefix)),
             MedianRead(GatherRead(state.fixed, state.prefix)))
    fused = Fused(reads)
    whole = fused.map(x, Chunk(0, n, runs(facts.sample_block), 3, outliers))
    parts = [fused.map(x[c.start:c.stop], c) for c in chunks]
    order = data.draw(st.permutations(range(len(parts))))
    got = _grouped([parts[i] for i in order], data.draw)
    _same_moments(got.parts[0], whole.parts[0])
    assert np.array_equal(got.parts[1].counts, whole.parts[1].counts)
    pairs = sorted(zip(got.parts[2].cols.tolist(), got.parts[2].raw.tolist()))
    assert pairs == sorted(zip(whole.parts[2].cols.tolist(), whole.parts[2].raw.tolist()))
    # the moments equal the direct float64 moments of the kept rows of each sample block
    for k, m in got.parts[0].by_block.items():
        rows = x[(facts.sample_block == k) & ~outliers].astype(np.float64)
        assert m.n == len(rows)
        if len(rows):
            np.testing.assert_allclose(m.mean, rows.mean(axis=0), rtol=1e-9, atol=1e-9)
    assert inlier_moments(x, chunks[0], "float64").by_block.keys() <= got.parts[0].by_block.keys()


@settings(max_examples=25, deadline=None)
@given(data=st.data(), **CASE)
def test_in_memory_rows_combine_in_any_grouping(data, seed, n, d, dtype, cuts):
    x = _data(seed, n, d, dtype)
    facts = _facts(n, dtype)
    parts = [read_rows(x[c.start:c.stop]) for c in _chunks(n, cuts, facts)]
    got = finish_rows(_grouped(parts, data.draw), facts).stats
    want = finish_rows(Rows(x), facts).stats
    assert np.array_equal(got.rows, want.rows) and np.array_equal(got.median, want.median)
    assert got.n_outliers == want.n_outliers and got.passes == 1


def test_one_chunk_obeys_the_same_limits_as_many():
    """A unit of one chunk is never combined; its partial is bounded all the same, so a limit exceeded
    by one chunk costs the same second read as one exceeded by a combination."""
    x = _data(0, 3000, 8, "float16")
    facts = _facts(3000, "float16")
    chunk = _chunks(3000, [], facts)[0]
    full = finish_scan(scan_chunk(x, chunk, "float32", ReadConfig()), facts, "float32")
    assert full.inliers is not None and full.median.done
    few_raw = finish_scan(scan_chunk(x, chunk, "float32", ReadConfig(raw_rows_bytes=0)), facts, "float32")
    assert few_raw.inliers is None
    no_window = scan_chunk(x, chunk, "float32", ReadConfig(dense_slots_per_column=0, sparse_kept_per_column=0))
    assert no_window.window is None and not finish_scan(no_window, facts, "float32").median.done
