"""Beyond MIR: the gap decomposition and, with --sensitivity, FD-infinity and the outlier-rule variants
equal the independent float64 implementation (analyze_reference.py) on several archive shapes, through
the one-read path and the second reads; the gap parts behave as defined on constructed cases."""
from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from analyze_helpers import write_arrays
from analyze_published import (check_analyze_table, check_dataset, check_document, check_stats_table,
                               reference_document)
from analyze_reference import sample_groups as reference_groups
from click.testing import CliRunner

from analyze import AnalysisOptions, ReadConfig, analyze_selection
from analyze.engine import sample_groups
from analyze.extrapolate import fit_infinity
from analyze.frechet import PsdFactor
from analyze.gaps import channel_matched_trace, gap_parts
from pipelines.cli import main
from storage_schemas import open_archive
from storage_schemas.synth import write_synthetic_archive


def _rows(rng, samples: int, tokens: int, d: int, loc: float, heavy: bool, drift: float = 0.0):
    """Gaussian rows per sample (2 layers); sample means drift with the sample index (an ordered archive);
    one token of sample 0 with 30x the norm when `heavy`."""
    out = [rng.normal(loc + drift * i, 1.0, (2, tokens, d)) + rng.normal(0, 0.3, d) for i in range(samples)]
    if heavy:
        out[0][:, 1] *= 30.0
    return out


def _archive(tmp_path, case: str, dtype: str = "float16"):
    rng = np.random.default_rng(7)
    if case == "synthetic":
        return write_synthetic_archive(tmp_path / "a.zarr", layers=2, hidden=24, samples=13, vision_tokens=20,
                                       text_tokens=14, seed=5, dtype=dtype, chunk_tokens=16, chunks_per_shard=2), [1, 2]
    if case == "text-below-channels":  # 24 text tokens in 32 channels: the Gram route, rows in memory
        vis, txt = _rows(rng, 8, 9, 32, 1.0, True, 0.05), _rows(rng, 8, 3, 32, 0.0, True)
    else:  # "ordered": 16 samples whose means drift with the index, d = 8
        vis, txt = _rows(rng, 16, 7, 8, 1.0, True, 0.1), _rows(rng, 16, 6, 8, 0.0, False, -0.05)
    return write_arrays(tmp_path / "a.zarr", vis, txt, dtype=dtype, chunk_tokens=16), [0, 1]


def _mir(*args) -> str:
    out = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    return out.stdout


@pytest.mark.parametrize("case,dtype", [("synthetic", "float16"), ("synthetic", "float32"),
                                        ("text-below-channels", "bfloat16"), ("ordered", "float16")])
def test_sensitivity_numbers_match_the_reference(tmp_path, case, dtype):
    path, layers = _archive(tmp_path, case, dtype)
    spec = ",".join(map(str, layers))
    samples = "1:" if case == "ordered" else None  # a selection that does not start at row 0
    extra = ["--samples", samples] if samples else []
    selection = open_archive(path).select(layers=layers, samples=slice(1, None) if samples else None)
    ref = reference_document(selection, sensitivity=True)
    table = _mir("analyze", path, "--no-cache", "--layers", spec, "--sensitivity", *extra, "--json",
                 tmp_path / "r.json", "--netcdf", tmp_path / "r.nc")
    check_analyze_table(table, ref)
    check_stats_table(_mir("stats", path, "--no-cache", "--layers", spec, "--sensitivity", *extra), ref)
    doc = json.loads((tmp_path / "r.json").read_text())
    check_document(doc, ref)
    with xr.open_dataset(tmp_path / "r.nc") as ds:
        check_dataset(ds, ref)
    check_document(json.loads(_mir("stats", path, "--no-cache", "--layers", spec, "--sensitivity", *extra,
                                   "--json", "-")), ref)
    assert doc["settings"]["sensitivity"] is True and doc["settings"]["groups"] == 4


@pytest.mark.parametrize("config", [{"raw_rows_bytes": 0}, {"inlier_spreads": 1e6}])
def test_rule_moments_the_scan_missed_cost_a_second_read(tmp_path, config):
    """Raw rows dropped, or IQR outliers among the rows taken as sure: a second read computes the rules'
    moments, and the numbers still match."""
    path, layers = _archive(tmp_path, "ordered")
    selection = open_archive(path).select(layers=layers)
    ref = reference_document(selection, sensitivity=True)
    result = analyze_selection(selection, AnalysisOptions(cache=False, sensitivity=True, reads=ReadConfig(**config)))
    check_document(result.to_json(), ref)
    assert {r["vision"]["data_passes"] for r in result.layers} == {2}  # its heavy token is an outlier of each rule


def test_sensitivity_statistics_are_cached(tmp_path, monkeypatch):
    path, layers = _archive(tmp_path, "ordered")
    selection = open_archive(path).select(layers=layers)
    first = analyze_selection(selection, AnalysisOptions(cache_dir=str(tmp_path / "c"), sensitivity=True))
    from analyze import api
    monkeypatch.setattr(api, "compute_stats", lambda *a, **k: pytest.fail("statistics were recomputed"))
    again = analyze_selection(selection, AnalysisOptions(cache_dir=str(tmp_path / "c"), sensitivity=True))
    assert again.to_json()["sensitivity"] == first.to_json()["sensitivity"]
    assert again.to_json()["layers"] == first.to_json()["layers"]


def test_groups_are_a_seeded_permutation():
    group, k = sample_groups(np.arange(10, 30), 4)
    assert k == 4 and np.array_equal(group, reference_groups(20)) and np.bincount(group).tolist() == [5, 5, 5, 5]
    assert not np.array_equal(group, np.sort(group))  # not consecutive runs of the archive's order
    assert sample_groups(np.arange(3), 4)[1] == 3  # never more groups than samples


def test_fit_infinity_recovers_a_line_in_one_over_n():
    n = np.array([25, 50, 75, 100])
    assert np.allclose(fit_infinity(n, 2.5 + 40.0 / n), (2.5, 40.0))
    assert np.allclose(fit_infinity(n, np.array([np.nan, 3.3, 3.0, 2.9])),
                       np.polyfit(1.0 / n[1:], [3.3, 3.0, 2.9], 1)[::-1])
    assert all(np.isnan(fit_infinity(n, np.array([np.nan, np.nan, np.nan, 1.0]))))


def _parts(v: np.ndarray, t: np.ndarray) -> dict:
    cv, ct = np.cov(v, rowvar=False), np.cov(t, rowvar=False)
    fv, ft = PsdFactor.of(cv), PsdFactor.of(ct)
    w = np.linalg.svd(fv.y.T @ ft.y, compute_uv=False)
    mean = float(((v.mean(0) - t.mean(0)) ** 2).sum())
    var_v, var_t = np.diag(cv).copy(), np.diag(ct).copy()
    tau_d = channel_matched_trace(var_v, var_t, fv.y, ft.y)
    parts = gap_parts(mean, var_v, var_t, float(w.sum()), tau_d, len(v), len(t))
    fd = mean + np.trace(cv) + np.trace(ct) - 2 * w.sum()
    assert abs(sum(parts[k] for k in ("gap_shift", "gap_scale", "gap_channel", "gap_shape")) - fd) <= 1e-9 * fd
    return parts


def test_gap_parts_name_the_kind_of_gap():
    rng = np.random.default_rng(0)
    t = rng.normal(0, 1, (4000, 6)) @ rng.normal(0, 1, (6, 6))
    shifted = _parts(t + 3.0, t)  # a pure shift: nothing but the mean term
    assert shifted["gap_shift"] == pytest.approx(6 * 3.0 ** 2, rel=1e-9)
    assert abs(shifted["gap_scale"]) < 1e-9 and abs(shifted["gap_shape"]) < 1e-9
    scaled = _parts(2.5 * t, t)  # an isotropic rescaling: the scale part, nothing left after s*
    assert scaled["isotropic_scale"] == pytest.approx(0.4, rel=1e-9)
    assert scaled["cov_term_isotropic"] < 1e-9 * scaled["gap_scale"] and abs(scaled["gap_shape"]) < 1e-9
    assert abs(scaled["cov_term_trace_matched"]) < 1e-9
    per_channel = _parts(t * np.array([1, 2, 3, 0.5, 1, 4]), t)  # per-channel scales: gone after D
    assert per_channel["gap_channel"] > 0.1 * per_channel["gap_scale"] and abs(per_channel["gap_shape"]) < 1e-8
    dead = t.copy()
    dead[:, 2] = 1.0  # a constant vision channel: D is 0 there, the part stays defined
    parts = _parts(dead, t)
    assert np.isfinite(list(parts.values())).all() and parts["gap_shape"] > 0
