"""Out-of-core MIR equals an independent float64 in-memory implementation of MIR_SPEC.

Archives use tiny storage chunks, so every layer spans many Dask blocks and every merge path runs.
"""
from __future__ import annotations

import numpy as np
import pytest
from analyze_helpers import analyze_path, assert_matches_reference, reference_layers, write_arrays

from analyze import AnalysisOptions, memory
from analyze.api import selection_shape
from analyze.runner import Runner
from storage_schemas.synth import write_synthetic_archive


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_synthetic_archive_matches_reference(tmp_path, dtype):
    path = write_synthetic_archive(tmp_path / "a.zarr", layers=2, hidden=24, samples=9, vision_tokens=20,
                                   text_tokens=14, seed=5, dtype=dtype, chunk_tokens=16, chunks_per_shard=2)
    selection, result = analyze_path(path, layers=[1, 2])
    refs = assert_matches_reference(selection, result)
    assert result.mode == "exact" and result.n_samples == 9
    # the out-of-core column medians are the exact lower medians (checked through the stored statistics)
    assert all(layer["vision"]["data_passes"] >= (2 if dtype == "float32" else 1) for layer in result.layers)
    assert refs[0]["outliers_v"] + refs[0]["outliers_t"] > 0  # synthetic data has heavy-norm tokens


def _gaussian(rng, samples, tokens, d, layers=1, loc=0.0, scale=1.0):
    return [rng.normal(loc, scale, (layers, tokens if np.isscalar(tokens) else tokens[i], d)) for i in range(samples)]


def test_one_sample(tmp_path):
    rng = np.random.default_rng(0)
    path = write_arrays(tmp_path / "a.zarr", _gaussian(rng, 1, 41, 8, loc=2.0), _gaussian(rng, 1, 30, 8))
    selection, result = analyze_path(path)
    assert_matches_reference(selection, result)
    assert any("N >= 20" in w for w in result.warnings)


@pytest.mark.parametrize("tokens", [(7, 6), (8, 9), (64, 63)])
def test_even_and_odd_counts(tmp_path, tokens):
    rng = np.random.default_rng(sum(tokens))
    nv, nt = tokens
    path = write_arrays(tmp_path / "a.zarr", _gaussian(rng, 3, nv, 6, layers=2, loc=1.0),
                        _gaussian(rng, 3, nt, 6, layers=2, scale=2.0))
    selection, result = analyze_path(path, layers=[0, 1])
    assert_matches_reference(selection, result)


def test_ties_at_the_median(tmp_path):
    rng = np.random.default_rng(1)
    vis = [rng.integers(-2, 3, (1, 40, 10)).astype(np.float64) for _ in range(4)]
    txt = [rng.integers(0, 2, (1, 30, 10)).astype(np.float64) * 0.5 for _ in range(4)]
    path = write_arrays(tmp_path / "a.zarr", vis, txt)
    selection, result = analyze_path(path)
    assert_matches_reference(selection, result)


def test_no_outliers(tmp_path):
    rng = np.random.default_rng(2)
    # uniform data: token norms are bounded, no norm lies 3 standard deviations from the median
    vis = [rng.uniform(1, 2, (1, 50, 12)) for _ in range(3)]
    txt = [rng.uniform(-1, 1, (1, 40, 12)) for _ in range(3)]
    path = write_arrays(tmp_path / "a.zarr", vis, txt)
    selection, result = analyze_path(path)
    assert_matches_reference(selection, result)
    assert result.layers[0]["vision"]["outliers"] == result.layers[0]["text"]["outliers"] == 0


def test_many_outliers(tmp_path):
    rng = np.random.default_rng(3)
    vis, txt = _gaussian(rng, 4, 60, 10, loc=0.5), _gaussian(rng, 4, 50, 10)
    for arr in vis + txt:
        arr[:, rng.random(arr.shape[1]) < 0.05] *= 40.0
        arr[:, rng.random(arr.shape[1]) < 0.05] *= 0.01
    path = write_arrays(tmp_path / "a.zarr", vis, txt)
    selection, result = analyze_path(path)
    refs = assert_matches_reference(selection, result)
    assert refs[0]["outliers_v"] >= 5 and refs[0]["outliers_t"] >= 5


def test_fewer_text_tokens_than_channels(tmp_path):
    rng = np.random.default_rng(4)
    path = write_arrays(tmp_path / "a.zarr", _gaussian(rng, 3, 40, 48, loc=1.0), _gaussian(rng, 3, 9, 48))
    selection, result = analyze_path(path)
    assert_matches_reference(selection, result)
    assert result.layers[0]["route"] == "gram-27"  # the token-count-sized form
    assert result.layers[0]["text"]["numerical_rank"] <= 26
    assert any("rank-deficient" in w for w in result.warnings)


def test_float16_extremes(tmp_path):
    rng = np.random.default_rng(5)
    tiny = np.float16(2.0 ** -24)  # smallest subnormal
    vis = [rng.choice(np.array([65504.0, -65504.0, 60000.0, 1.0, 0.0, -0.0, float(tiny), -float(tiny)]),
                      (1, 37, 8)) for _ in range(3)]
    txt = [rng.choice(np.array([float(tiny), 2 * float(tiny), 6.1e-5, -3 * float(tiny), 0.0, 65504.0]),
                      (1, 33, 8)) for _ in range(3)]
    path = write_arrays(tmp_path / "a.zarr", vis, txt)
    selection, result = analyze_path(path)
    assert_matches_reference(selection, result)


def test_single_stored_layer(tmp_path):
    rng = np.random.default_rng(6)
    path = write_arrays(tmp_path / "a.zarr", _gaussian(rng, 5, 20, 8, loc=1.0), _gaussian(rng, 5, 15, 8),
                        layers=[7])
    selection, result = analyze_path(path)
    assert [s["layer"] for s in result.layers] == [7]
    assert_matches_reference(selection, result)


def test_memory_groups_and_float64_precision_agree(tmp_path):
    path = write_synthetic_archive(tmp_path / "a.zarr", layers=3, hidden=16, samples=6, vision_tokens=12,
                                   text_tokens=10, seed=8, chunk_tokens=16, chunks_per_shard=2)
    selection, one_group = analyze_path(path, layers=[1, 2, 3])
    refs = reference_layers(selection)
    one_layer = max(memory.estimate(selection_shape(selection), layers=1, lanes=1, workers=Runner().workers))
    _, grouped = analyze_path(path, AnalysisOptions(cache=False, memory_limit=one_layer), layers=[1, 2, 3])
    assert grouped.settings["memory_plan"].startswith("1 layer(s) per batch")
    _, exact64 = analyze_path(path, AnalysisOptions(cache=False, precision="float64"), layers=[1, 2, 3])
    for result in (one_group, grouped, exact64):
        assert_matches_reference(selection, result, refs)


def test_huge_float32_values_use_float64_products(tmp_path):
    rng = np.random.default_rng(9)
    path = write_arrays(tmp_path / "a.zarr", _gaussian(rng, 3, 30, 6, loc=3e24, scale=1e24),
                        _gaussian(rng, 3, 25, 6, scale=2e24), dtype="float32")
    selection, result = analyze_path(path)
    assert_matches_reference(selection, result)
