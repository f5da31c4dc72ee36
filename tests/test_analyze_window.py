"""The scan's guessed median window: when its counts are complete they are exactly the second-byte
histogram of the median's bin, and when they are not, it says so (never a wrong count)."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from analyze.config import ReadConfig
from analyze.radix import RadixState, byte_histogram
from analyze import window
from analyze.window import WindowCounts, choose_window, count_window


def _scan_blocks(x: np.ndarray, splits: list[int], rows_per_sample: int | None = None,
                 config: ReadConfig = ReadConfig()) -> tuple[RadixState, WindowCounts, int]:
    """What the scan does per block, merged: the top-byte histogram and the window counts."""
    blocks = [b for b in np.split(x, sorted(set(min(s, len(x)) for s in splits))) if len(b)]
    state = RadixState.start(x.dtype, len(x), x.shape[1], 2 if x.dtype == np.float16 else 4)
    hist = sum(byte_histogram(b, 0, state.prefix) for b in blocks)
    counts = WindowCounts.empty()
    for b in blocks:
        samples = -(-len(b) // rows_per_sample) if rows_per_sample else None
        counts = counts.merge(count_window(b, choose_window(byte_histogram(b, 0, state.prefix), samples, config)))
    state.apply_histogram(hist)
    return state, counts, len(blocks)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 300), d=st.integers(1, 6), seed=st.integers(0, 2**31), dtype=st.sampled_from(["f2", "f4"]),
       splits=st.lists(st.integers(0, 300), max_size=5), scale=st.sampled_from([1e-3, 1.0, 300.0]),
       shift=st.sampled_from([0.0, 0.01, 1.0]), bins=st.sampled_from([0, 1, 16]), sparse=st.sampled_from([0, 4, 64]))
def test_window_counts_are_exact_or_refused(n, d, seed, dtype, splits, scale, shift, bins, sparse):
    rng = np.random.default_rng(seed)
    x = ((rng.standard_normal((n, d)) + shift) * scale).astype(dtype)
    state, counts, blocks = _scan_blocks(x, splits, config=ReadConfig(window_bins=bins, sparse_count=sparse))
    top = state.prefix & 0xFF
    got = counts.second_byte(top, state.count)
    truth = byte_histogram(x, 1, state.prefix)
    if got is not None:
        assert np.array_equal(got, truth)
    else:
        assert bins == 0 or blocks > 1  # a block's window always holds its own median's bin


def test_one_block_always_resolves():
    """A column's median bin is inside its own block's window: one block never needs a second read."""
    rng = np.random.default_rng(0)
    for scale in (1e-4, 1.0, 1e3):
        x = (rng.standard_normal((5000, 40)) * scale + rng.normal(0, scale, 40)).astype(np.float16)
        x[:, 0] = 0.0  # a constant column
        x[:2500, 1] = -0.0  # signed zeros
        state, counts, _ = _scan_blocks(x, [])
        got = counts.second_byte(state.prefix & 0xFF, state.count)
        assert got is not None and np.array_equal(got, byte_histogram(x, 1, state.prefix))


def test_near_zero_medians_use_gathered_values():
    """Medians near zero fall in the many small top-byte bins of tiny values: those bins are gathered
    value by value, so such columns still resolve across blocks."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40000, 16)).astype(np.float16)
    x -= np.median(x.astype(np.float64), axis=0).astype(np.float16)  # medians at (nearly) zero
    state, counts, _ = _scan_blocks(x, [10000, 20000, 30000])
    assert len(counts.sparse_keys) > 0
    got = counts.second_byte(state.prefix & 0xFF, state.count)
    assert got is not None and np.array_equal(got, byte_histogram(x, 1, state.prefix))


def test_samples_that_differ_strongly_still_resolve():
    """Tokens of one sample share an offset per channel (as images do), so a block of ~60 samples
    misplaces each column's median; the default window still holds it."""
    rng = np.random.default_rng(2)
    d, tokens = 16, 576
    centre = rng.normal(0, 1, d) * rng.integers(0, 2, d)  # half the channels centred at zero
    x = np.concatenate([rng.normal(0, 1, (tokens, d)) + centre + rng.normal(0, 1.5, d)
                        for _ in range(240)]).astype(np.float16)
    state, counts, blocks = _scan_blocks(x, list(range(32768, len(x), 32768)), tokens)
    assert blocks == 5
    got = counts.second_byte(state.prefix & 0xFF, state.count)
    assert got is not None and np.array_equal(got, byte_histogram(x, 1, state.prefix))


def test_densified_counts_are_the_same_counts():
    """Folding often-gathered sparse keys into dense rows (what a unit's merged partial does before the
    sparse cap) changes the storage, never the second-byte counts; `room` limits the new rows."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40000, 16)).astype(np.float16)
    x -= np.median(x.astype(np.float64), axis=0).astype(np.float16)  # medians among the small, gathered bins
    state, counts, _ = _scan_blocks(x, [10000, 20000, 30000])
    top, truth = state.prefix & 0xFF, byte_histogram(x, 1, state.prefix)
    per_key = np.bincount(counts.sparse_keys)
    for least, room in ((1, 10**6), (int(per_key.max()), 10**6), (2, 3), (int(per_key.max()) + 1, 10**6)):
        dense = counts.densified(least, room)
        moved = len(counts.sparse_keys) - len(dense.sparse_keys)
        assert len(dense.keys) - len(counts.keys) <= room and moved == dense.counts.sum() - counts.counts.sum()
        assert np.all(np.bincount(dense.sparse_keys, minlength=len(per_key)) < max(least, 1)) or room == 3
        got = dense.second_byte(top, state.count)
        assert got is not None and np.array_equal(got, truth)
    assert len(counts.densified(1, 10**6).sparse_keys) == 0
    assert len(counts.densified(int(per_key.max()) + 1, 10**6).keys) == len(counts.keys)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), d=st.integers(1, 5), blocks=st.integers(1, 8), room=st.sampled_from([3, 40, 10**4]),
       least=st.sampled_from([1, 8, 10**6]), heavy=st.booleans(), repeat=st.booleans(),
       gathered_room=st.sampled_from([0, 10**5]), step=st.sampled_from([7, 1 << 20]))
def test_absorb_in_place_is_the_merge(seed, d, blocks, room, least, heavy, repeat, gathered_room, step):
    """A lane folds chunk after chunk into its accumulator in place (rows in arrival order, a buffer of
    `room` rows, uint16 chunk counts widened, gathered values densified in place): every key's counts,
    the gathered values and the second bytes are exactly those of the copying merge, or absorb says the
    room is exceeded (the scan then drops the window: a second read, never a wrong count).
    heavy: chunk counts near uint16's top, whose sum overflows unless the accumulator widens them;
    gathered_room: gathered values appended within the accumulator's buffers (0: copied out each time);
    step: densified() compacts them in place that many values at a time."""
    window.DENSIFY_VALUES, kept_step = step, window.DENSIFY_VALUES
    try:
        _fold_and_compare(seed, d, blocks, room, least, heavy, repeat, gathered_room)
    finally:
        window.DENSIFY_VALUES = kept_step


def _fold_and_compare(seed, d, blocks, room, least, heavy, repeat, gathered_room):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((60 * blocks, d)) * rng.choice([1e-3, 1.0], d) + rng.choice([0.0, 0.01], d)).astype("f2")
    parts = [x[:60]] * blocks if repeat else np.array_split(x, blocks)  # repeat: no chunk brings new keys
    x = np.concatenate(parts)
    state = RadixState.start(x.dtype, len(x), d, 2)
    state.apply_histogram(sum(byte_histogram(b, 0, state.prefix) for b in parts))
    chunks = [count_window(b, choose_window(byte_histogram(b, 0, state.prefix), None, ReadConfig(sparse_count=4)))
              for b in parts]
    top16 = np.iinfo(np.uint16).max
    chunks = [WindowCounts(c.keys, (c.counts * (top16 // max(1, int(c.counts.max(initial=0))) if heavy else 1)
                                    ).astype(np.uint16), c.sparse_keys, c.sparse_bytes) for c in chunks]
    merged, folded = chunks[0], chunks[0]
    for c in chunks[1:]:
        merged = merged.merge(c)
        if folded is not None:
            folded = folded.absorb(c, room, gathered_room)
            if folded is not None:
                folded = folded.densified(least, room - len(folded.keys), in_place=True)
                merged = merged.densified(least, room - len(merged.keys))
    if folded is None:
        assert len(merged.keys) > room
        return
    assert np.array_equal(folded.keys, merged.keys)
    assert np.array_equal(folded.dense(), merged.dense())
    assert sorted(zip(folded.sparse_keys, folded.sparse_bytes)) == sorted(zip(merged.sparse_keys, merged.sparse_bytes))
    if heavy:
        return
    top = state.prefix & 0xFF
    got, want = folded.second_byte(top, state.count), merged.second_byte(top, state.count)
    assert (got is None and want is None) or np.array_equal(got, want)
    if got is not None:
        assert np.array_equal(got, byte_histogram(x, 1, state.prefix))
