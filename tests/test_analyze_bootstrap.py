"""Bootstrap from per-block statistics: block statistics add up to the full ones, a replicate equals a
direct computation on the resampled rows (given the held outlier rule and medians), seeds repeat."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analyze import AnalysisError, AnalysisOptions, analyze_selection
from analyze.bootstrap import bootstrap_weights
from analyze.engine import compute_stats, sample_blocks
from analyze.results import layer_fd
from analyze_reference import frechet
from storage_schemas import open_archive
from storage_schemas.synth import write_synthetic_archive


@pytest.fixture(scope="module")
def selection(tmp_path_factory):
    path = write_synthetic_archive(tmp_path_factory.mktemp("b") / "a.zarr", layers=2, hidden=10, samples=12,
                                   vision_tokens=9, text_tokens=8, seed=3, chunk_tokens=16, chunks_per_shard=2)
    return open_archive(path).select(layers=[1, 2])


@pytest.mark.parametrize("precision,tol", [("float64", 1e-10), ("float32", 1e-6)])
def test_blocks_merge_to_the_full_statistics(selection, precision, tol):
    full = compute_stats(selection, [1], blocks=1, precision=precision)[1]
    per_block = compute_stats(selection, [1], blocks=4, precision=precision)[1]
    a = layer_fd(full, "exact")[0].fd
    b = layer_fd(per_block, "exact")[0].fd
    c = layer_fd(per_block, "exact", np.ones(4, int))[0].fd
    assert abs(a - b) < tol * a and abs(a - c) < tol * a


def test_replicate_equals_direct_computation_on_resampled_rows(selection):
    k = 4
    stats = compute_stats(selection, [2], blocks=k)[2]
    weights = np.array([2, 0, 1, 1])
    got = layer_fd(stats, "exact", weights)[0].fd
    starts = sample_blocks(selection.sample_index, k)

    def resample(view, s):
        x = np.asarray(view.data[1].compute(), np.float64)
        norms = np.sqrt((x * x).sum(axis=1))
        out = np.abs(norms - s.norms.median) > 3 * s.norms.std  # held at full-selection values
        x[out] = s.median
        block = np.searchsorted(starts, view["sample"].values, side="right") - 1
        return np.concatenate([x[block == b] for b in range(k) for _ in range(weights[b])]), norms, block

    v, _, _ = resample(selection.vision, stats.vision)
    t, norms_t, block_t = resample(selection.text, stats.text)
    a = 1.0 / np.concatenate([norms_t[block_t == b] for b in range(k) for _ in range(weights[b])]).mean()
    expected = frechet(a * v, a * t)["fd"]
    assert abs(got - expected) < 1e-8 * expected


def test_bootstrap_interval_and_seeds(selection):
    opts = dict(cache=False, bootstrap=30, blocks=6)
    one = analyze_selection(selection, AnalysisOptions(seed=1, **opts))
    same = analyze_selection(selection, AnalysisOptions(seed=1, **opts))
    other = analyze_selection(selection, AnalysisOptions(seed=2, **opts))
    b = one.bootstrap
    assert b["replicates"] == 30 and b["blocks"] == 6 and len(b["mir_replicates"]) == 30
    assert b["mir_replicates"] == same.bootstrap["mir_replicates"]
    assert b["mir_replicates"] != other.bootstrap["mir_replicates"]
    assert b["ci_low"] < b["ci_high"] and math.isfinite(b["std"]) and b["std"] > 0
    assert one.dataset.attrs["mir_ci_low"] == b["ci_low"]


def test_weights_resample_all_blocks():
    w = bootstrap_weights(50, 7, seed=0)
    assert w.shape == (50, 7) and (w.sum(axis=1) == 7).all()
    with pytest.raises(AnalysisError, match="at least 2 samples"):
        bootstrap_weights(5, 1, seed=0)
