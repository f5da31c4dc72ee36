"""The streaming radix selection returns numpy's exact lower median for every column, whatever the
values (ties, signed zeros, subnormals, extremes) and however the rows are split into blocks."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from functools import reduce

from analyze.radix import DigitRead, RadixState, byte_histogram

SPECIAL16 = np.array([0.0, -0.0, 2.0 ** -24, -(2.0 ** -24), 6.1e-5, 1.0, -1.0, 65504.0, -65504.0, 0.5, 3.0],
                     dtype=np.float16)


def _stream_median(x: np.ndarray, splits: list[int], key_bytes: int | None = None,
                   gather_budget: int = 2_000_000) -> np.ndarray:
    blocks = np.split(x, sorted(set(min(s, len(x)) for s in splits)))
    state = RadixState.start(x.dtype, len(x), x.shape[1], key_bytes)
    while not state.done:
        read = state.next_read(gather_budget)
        reduce(lambda a, b: a.combine(b), [read.map(b) for b in blocks]).apply_to(state)
    return state.values


def _lower_median(x: np.ndarray) -> np.ndarray:
    return np.sort(x.astype(np.float64), axis=0)[(len(x) - 1) // 2]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(1, 5), seed=st.integers(0, 2**31), dtype=st.sampled_from(["f2", "f4"]),
       splits=st.lists(st.integers(0, 60), max_size=4), special=st.booleans())
def test_stream_median_is_exact(n, d, seed, dtype, splits, special):
    rng = np.random.default_rng(seed)
    if special:
        x = rng.choice(SPECIAL16, (n, d)).astype(dtype)
    else:
        x = (rng.standard_normal((n, d)) * rng.choice([1e-6, 1.0, 300.0])).astype(dtype)
    got = _stream_median(x, splits)
    assert np.array_equal(got, _lower_median(x))  # -0.0 == 0.0 compares equal, as torch.median's value


@pytest.mark.parametrize("budget", [0, 10**9])
def test_float32_all_digit_paths(budget):
    """True float32 with the gather step disabled (four byte histograms) or always allowed."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((301, 7)) * 1e3).astype(np.float32)
    x[:50, 0] = x[0, 0]  # ties
    assert np.array_equal(_stream_median(x, [13, 100, 250], gather_budget=budget), _lower_median(x))


def test_bfloat16_values_need_two_bytes():
    rng = np.random.default_rng(1)
    bits = rng.standard_normal((200, 5)).astype(np.float32).view(np.uint32) & 0xFFFF0000
    x = bits.view(np.float32)
    state = RadixState.start(x.dtype, len(x), 5, key_bytes=2)
    state.apply_histogram(byte_histogram(x, 0, state.prefix))
    read = state.next_read()
    assert isinstance(read, DigitRead)
    read.map(x).apply_to(state)
    assert state.done and np.array_equal(state.values, _lower_median(x))
