"""How many times the analysis reads the data: once when the scan's guesses hold, twice when one
misses; exact either way. Every way a guess can miss is forced here and checked against the
independent float64 implementation."""
from __future__ import annotations

import numpy as np
import pytest
from analyze_helpers import analyze_path, assert_matches_reference, write_arrays

from analyze import AnalysisOptions, fused
from analyze.config import ReadConfig


def _archive(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    vis, txt = [], []
    for _ in range(6):
        v = rng.normal(0.3, 1.0, (2, 70, 12)) + rng.normal(0, 0.2, 12)
        t = rng.normal(0.0, 2.0, (2, 50, 12))
        v[:, rng.random(70) < 0.04] *= 30.0  # heavy-norm tokens: outliers
        t[:, rng.random(50) < 0.04] *= 0.01
        vis.append(v)
        txt.append(t)
    return write_arrays(tmp_path / "a.zarr", vis, txt, layers=[0, 1], chunk_tokens=32, chunks_per_shard=2)


def _passes(result) -> set[int]:
    return {layer[m]["data_passes"] for layer in result.layers for m in ("vision", "text")}


@pytest.mark.parametrize("compiled", [True, False])
def test_well_behaved_data_is_read_once(tmp_path, monkeypatch, compiled):
    if not compiled:
        monkeypatch.setattr(fused, "AVAILABLE", False)
    selection, result = analyze_path(_archive(tmp_path), layers=[0, 1])
    refs = assert_matches_reference(selection, result)
    assert refs[0]["outliers_v"] > 0 and refs[0]["outliers_t"] > 0
    assert _passes(result) == {1}


@pytest.mark.parametrize("miss", ["outlier among sure rows", "too many raw rows", "median outside window",
                                  "everything"])
def test_a_missed_guess_costs_a_second_read_not_exactness(tmp_path, monkeypatch, miss):
    config = {}
    if miss in ("outlier among sure rows", "everything"):
        config["inlier_spreads"] = 1e6  # every row is taken as a sure inlier
    if miss in ("too many raw rows", "everything"):
        config["raw_rows_bytes"] = 0
    if miss in ("median outside window", "everything"):
        config.update(window_bins=0, sparse_count=0)
    options = AnalysisOptions(cache=False, reads=ReadConfig(**config))
    selection, result = analyze_path(_archive(tmp_path), options, layers=[0, 1])
    assert_matches_reference(selection, result)
    assert _passes(result) == {2}


def test_second_read_keeps_the_bootstrap_blocks(tmp_path):
    """Per-sample-block moments from a second read equal those of the one-read path."""
    path = _archive(tmp_path)
    from analyze.engine import compute_stats
    from storage_schemas import open_archive
    selection = open_archive(path).select(layers=[1])
    once = compute_stats(selection, [1], blocks=3)[1]
    twice = compute_stats(selection, [1], blocks=3, config=ReadConfig(raw_rows_bytes=0))[1]
    assert twice.vision.passes == 2 and once.vision.passes == 1
    for a, b in zip(once.vision.block_inliers + once.text.block_inliers,
                    twice.vision.block_inliers + twice.text.block_inliers):
        assert a.n == b.n
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6, atol=1e-7)  # float32 products either way
        np.testing.assert_allclose(a.m2, b.m2, rtol=1e-5, atol=1e-6 * np.abs(b.m2).max())


def test_window_too_large_to_keep_costs_a_second_read(tmp_path):
    options = AnalysisOptions(cache=False, reads=ReadConfig(dense_slots_per_column=0, sparse_kept_per_column=0))
    selection, result = analyze_path(_archive(tmp_path), options, layers=[0, 1])
    assert_matches_reference(selection, result)
    assert 2 in _passes(result)
