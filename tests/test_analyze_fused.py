"""The compiled scan kernels (numba) compute exactly what the numpy kernels compute: the same
histograms and window counts bit for bit, the same float32 conversion, norms to float64 rounding."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyze import fused, kernels
from analyze.activations import activation_partial
from analyze.config import ReadConfig
from analyze.radix import byte_histogram
from analyze.window import choose_window, count_window

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed")

SPECIAL16 = np.array([0.0, -0.0, 2.0 ** -24, -(2.0 ** -24), 6.1e-5, 1.0, -1.0, 65504.0, -65504.0, 0.5, 3.0],
                     dtype=np.float16)


def _block(seed: int, n: int, d: int, dtype: str, special: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if special:
        return rng.choice(SPECIAL16, (n, d)).astype(dtype)
    x = rng.standard_normal((n, d)) * rng.choice([1e-3, 1.0, 300.0]) + rng.normal(0, 1, d)
    if dtype == "bf16":  # bfloat16-sourced float32: low 16 bits zero
        return (x.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    return x.astype(dtype)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 700), d=st.integers(1, 40),
       dtype=st.sampled_from(["float16", "float32", "bf16"]), special=st.booleans())
def test_compiled_scan_equals_numpy(seed, n, d, dtype, special):
    x = _block(seed, n, d, dtype, special and dtype == "float16")
    norms, hist, columns, act = fused.scan_columns(x, 7)
    np.testing.assert_allclose(norms, kernels.token_norms(x), rtol=1e-13, atol=0)
    want_act = activation_partial(x, kernels.token_norms(x), 7)
    assert np.array_equal(act.abs_hist, want_act.abs_hist) and act.exact == want_act.exact
    assert np.array_equal(act.channel_max, want_act.channel_max)
    for name in ("top_value", "top_row", "top_channel"):  # the same entries, ties broken the same way
        assert np.array_equal(getattr(act, name), getattr(want_act, name)), name
    np.testing.assert_allclose(act.unit_sum, want_act.unit_sum, rtol=1e-10, atol=1e-10 * max(1, n))
    assert np.array_equal(hist, byte_histogram(x, 0, np.zeros(d, np.int64)))
    window = choose_window(hist)
    got, want = fused.count_window(columns, window, hist), count_window(x, window)
    assert np.array_equal(got.keys, want.keys) and np.array_equal(got.counts, want.counts)
    order_got = np.lexsort((got.sparse_bytes, got.sparse_keys))
    order_want = np.lexsort((want.sparse_bytes, want.sparse_keys))
    assert np.array_equal(got.sparse_keys[order_got], want.sparse_keys[order_want])
    assert np.array_equal(got.sparse_bytes[order_got], want.sparse_bytes[order_want])
    keep = np.random.default_rng(seed).random(n) < 0.8
    shift = np.float32(0.25) * np.arange(d, dtype=np.float32)
    expected = np.subtract(x, shift, dtype=np.float32)
    expected[~keep] = 0
    assert np.array_equal(fused.convert(x, shift, keep, np.empty((n, d), np.float32)), expected)


def test_scan_block_same_either_way(monkeypatch):
    x = _block(3, 3000, 64, "float16", False)
    chunk = kernels.Chunk(0, 3000, ((0, 0, 1000), (1, 1000, 3000)), 3)
    compiled = kernels.scan_chunk(x, chunk, "float32", ReadConfig())
    monkeypatch.setattr(fused, "AVAILABLE", False)
    plain = kernels.scan_chunk(x, chunk, "float32", ReadConfig())
    assert np.array_equal(compiled.hist, plain.hist) and np.array_equal(compiled.sure, plain.sure)
    for gid in (0, 1):
        a, b = compiled.moments.by_block[gid], plain.moments.by_block[gid]
        assert a.n == b.n and np.array_equal(a.mean, b.mean) and np.array_equal(a.m2, b.m2)
    for name in ("abs_hist", "channel_max", "top_value", "top_row", "top_channel"):
        assert np.array_equal(getattr(compiled.activations, name), getattr(plain.activations, name)), name


def test_numpy_kernels_can_be_forced():
    """MIR_KERNELS=numpy runs without numba, e.g. to rule the compiled kernels out."""
    code = "from analyze import fused; print(fused.AVAILABLE)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MIR_KERNELS": "numpy"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 300), d=st.integers(1, 40), special=st.booleans())
def test_compiled_centred_rows_equal_numpy(seed, n, d, special):
    """The influence read's rows: norms to float64 rounding, the centred float32 rows bit for bit."""
    x = _block(seed, n, d, "float16", special)
    mean = np.random.default_rng(seed).normal(0, 1, d).astype(np.float32)
    norms, y = fused.centred_rows(x, mean, np.float32)
    np.testing.assert_allclose(norms, kernels.token_norms(x), rtol=1e-12, atol=0)
    np.testing.assert_array_equal(y, np.subtract(x, mean, dtype=np.float32))
