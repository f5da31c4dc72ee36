"""The bootstrap over samples (influence read, analyze/bootstrap.py): per-sample influence values equal
an independent finite-difference derivative; the interval and sd match a brute-force float64
sample-level bootstrap that recomputes everything per replicate; seeds repeat; another seed or B reads
no data."""
from __future__ import annotations

import math

import numpy as np
import pytest
from analyze_published import reference_inputs
from analyze_reference_bootstrap import brute_force_bootstrap, finite_difference_influence, influence_captured

import storage_schemas.synth as synth
from analyze import AnalysisError, AnalysisOptions, analyze_selection
from analyze import api as analysis_api
from analyze.bootstrap import paired_difference, sample_weights
from analyze.gradient import InfluenceMethod, covariance_sketch
from storage_schemas import open_archive

BRUTE_REPLICATES = 1500  # Monte Carlo error of the brute-force 95% ends: about 0.03 widths
CASES = {  # name: (archive shape, outlier share)
    "few-samples": (dict(hidden=12, samples=10, vision_tokens=9, text_tokens=14), 0.005),
    "many-outliers": (dict(hidden=10, samples=30, vision_tokens=12, text_tokens=12), 0.05),
    "tokens-below-channels": (dict(hidden=32, samples=14, vision_tokens=2, text_tokens=6), 0.005),
}


def _selection(tmp_path, monkeypatch, case: str, dtype: str):
    shape, share = CASES[case]
    monkeypatch.setattr(synth, "OUTLIER_SHARE", share)
    path = synth.write_synthetic_archive(tmp_path / "a.zarr", layers=2, seed=5, dtype=dtype, chunk_tokens=16,
                                         chunks_per_shard=2, **shape)
    return open_archive(path).select(layers=[1, 2])


@pytest.mark.parametrize("case", sorted(CASES))
def test_influence_values_equal_finite_differences(tmp_path, monkeypatch, case):
    selection = _selection(tmp_path, monkeypatch, case, "float32")
    got = analyze_selection(selection, AnalysisOptions(bootstrap=10, cache=False, precision="float64"))
    inputs = reference_inputs(selection)
    # the reference's sqrtm of a rank-deficient covariance rounds at ~1e-8: a wider step keeps that out
    step, tol = (1e-2, 5e-5) if case == "tokens-below-channels" else (1e-4, 1e-6)
    for i, layer in enumerate(inputs):
        want = finite_difference_influence(layer, selection.sample_index, step)
        np.testing.assert_allclose(got.dataset["fd_influence"].values[i], want, rtol=0,
                                   atol=tol * np.abs(want).max())


@pytest.mark.parametrize("influence", ["auto", "2"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_interval_matches_a_brute_force_sample_bootstrap(tmp_path, monkeypatch, case, dtype, influence):
    """Width within 15%, ends within 0.2 widths, sd within 15% of the bootstrap that recomputes scale,
    outlier rule, medians, means, covariances and the exact trace per replicate; with the covariance term's
    sketch at its full rank here (auto: d <= 64) and forced down to rank 2 (of 10 to 32 channels)."""
    selection = _selection(tmp_path, monkeypatch, case, dtype)
    b = analyze_selection(selection, AnalysisOptions(bootstrap=10000, cache=False, influence=influence)).bootstrap
    brute = brute_force_bootstrap(reference_inputs(selection), selection.sample_index, BRUTE_REPLICATES, seed=1)
    lo, hi = np.quantile(brute, [0.025, 0.975])
    width = hi - lo
    assert abs((b["ci_high"] - b["ci_low"]) / width - 1) <= 0.15, (b["ci_low"], b["ci_high"], lo, hi)
    assert abs(b["ci_low"] - lo) <= 0.2 * width and abs(b["ci_high"] - hi) <= 0.2 * width
    sd_brute, sd_mine = np.std(brute, ddof=1), b["std"]
    assert abs(sd_mine / sd_brute - 1) <= 0.15, (sd_mine, sd_brute)


def test_seeds_repeat_and_what_the_json_says(tmp_path, monkeypatch):
    selection = _selection(tmp_path, monkeypatch, "few-samples", "float16")
    one = analyze_selection(selection, AnalysisOptions(seed=1, bootstrap=30, cache=False))
    same = analyze_selection(selection, AnalysisOptions(seed=1, bootstrap=30, cache=False))
    other = analyze_selection(selection, AnalysisOptions(seed=2, bootstrap=30, cache=False))
    b = one.bootstrap
    assert b["replicates"] == 30 and len(b["mir_replicates"]) == 30 and b["unit"] == "sample" and b["units"] == 10
    assert "delta method" in b["method"] and "outlier rule" in b["held"] and "medians" in b["held"]
    assert b["mir_replicates"] == same.bootstrap["mir_replicates"] != other.bootstrap["mir_replicates"]
    assert b["ci_low"] < one.mir < b["ci_high"] and math.isfinite(b["std"]) and b["std"] > 0
    assert b["sample_ids"] == selection.sample_ids and len(b["fd_influence"]) == 10
    assert one.to_json()["bootstrap"]["units"] == 10 and one.dataset.attrs["mir_ci_low"] == b["ci_low"]


def test_another_seed_or_b_reads_no_data(tmp_path, monkeypatch):
    selection = _selection(tmp_path, monkeypatch, "few-samples", "float16")
    cache = str(tmp_path / "cache")
    first = analyze_selection(selection, AnalysisOptions(bootstrap=50, seed=1, cache_dir=cache))

    def forbidden(*args, **kwargs):
        raise AssertionError("the data was read again")

    monkeypatch.setattr(analysis_api, "compute_stats", forbidden)
    monkeypatch.setattr(analysis_api, "compute_influence", forbidden)
    again = analyze_selection(selection, AnalysisOptions(bootstrap=2000, seed=7, cache_dir=cache))
    assert again.bootstrap["fd_influence"] == first.bootstrap["fd_influence"]
    assert again.bootstrap["replicates"] == 2000 and again.bootstrap["ci_low"] != first.bootstrap["ci_low"]


def test_paired_difference_pairs_by_id_in_any_order():
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(40)]
    shared = rng.normal(0, 1, 40)  # sample-to-sample noise both archives share
    a = (10.0, dict(zip(ids, shared)))
    b_items = list(zip(ids, shared * 1.05 + rng.normal(0, 0.01, 40)))
    b = (10.5, dict(b_items[::-1]))  # another order
    paired = paired_difference(a, b, 4000, seed=0)
    assert paired["paired_samples"] == 40 and paired["exceeds_noise"]
    assert paired["ci_low"] < math.log10(10.5 / 10) < paired["ci_high"]
    unpaired_sd = math.hypot(*(np.std(list(d.values()), ddof=0) * math.sqrt(40) / (fd * math.log(10))
                               for fd, d in (a, b)))
    assert paired["std"] < 0.3 * unpaired_sd  # the shared noise cancels


def test_weights_resample_all_samples():
    w = sample_weights(50, 7, seed=0)
    assert w.shape == (50, 7) and (w.sum(axis=1) == 7).all()
    with pytest.raises(AnalysisError, match="at least 2 samples"):
        sample_weights(5, 1, seed=0)


def test_one_trace_solve_publishes_the_same_numbers_and_gradient(tmp_path, monkeypatch):
    """With the bootstrap, the published trace solve also yields the gradient (results.py): its numbers equal
    the run without bootstrap, and its gradient the one gradient.py computes on its own."""
    from analyze.engine import compute_stats
    from analyze.gradient import layer_gradient
    from analyze.results import layer_summary, layer_summary_and_gradient
    selection = _selection(tmp_path, monkeypatch, "many-outliers", "float32")
    plain = analyze_selection(selection, AnalysisOptions(cache=False))
    boot = analyze_selection(selection, AnalysisOptions(bootstrap=20, cache=False))
    for name in ("fd", "trace_sqrt", "total_variance", "effective_rank", "condition_number"):
        np.testing.assert_allclose(boot.dataset[name].values, plain.dataset[name].values, rtol=1e-10)
    stats = compute_stats(selection, [1])[1]
    exact = InfluenceMethod("exact")
    summary, grad = layer_summary_and_gradient(stats, "exact", "float64", method=exact)
    alone = layer_gradient(stats, "float64", method=exact)
    assert summary["fd"] == pytest.approx(layer_summary(stats, "exact")["fd"], rel=1e-12)
    assert grad.fd == pytest.approx(alone.fd, rel=1e-12) and grad.trace_sqrt == pytest.approx(alone.trace_sqrt)
    sketched = layer_summary_and_gradient(stats, "exact", "float64", method=InfluenceMethod("sketch", 3))[1]
    sketched_alone = layer_gradient(stats, "float64", method=InfluenceMethod("sketch", 3))
    for m in ("vision", "text"):
        got, want = grad.modality(m).form, alone.modality(m).form
        full = [np.empty_like(g.tri) for g in (got, want)]
        for out, g in zip(full, (got, want)):
            out[np.ix_(g.perm, g.perm)] = g.tri @ g.tri.T  # a^2 K K^T in channel order
        np.testing.assert_allclose(full[0], full[1], rtol=0, atol=1e-9 * np.abs(full[1]).max())
        assert grad.totals[m] == pytest.approx(alone.totals[m], rel=1e-9)
        forms = [g.modality(m).form for g in (sketched, sketched_alone)]
        kept = [(f.vectors * f.weights) @ f.vectors.T for f in forms]  # sum_l lam_l w_l w_l^T, raw units
        np.testing.assert_allclose(kept[0], kept[1], rtol=0, atol=1e-8 * np.abs(kept[1]).max())


def test_covariance_sketch_is_exact_at_full_rank_and_finds_the_leading_directions():
    """gradient.covariance_sketch against a float64 eigendecomposition of E = C^1/2 Gamma C^1/2: at full rank
    it reproduces y^T Gamma y for any y, with W^T C W = I and the kept mean tr(Gamma C); on a rank-deficient C
    it does so on C's range; below full rank it keeps the leading |lambda| (here after a spectral gap)."""
    rng = np.random.default_rng(3)
    d = 80
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    k = rng.standard_normal((d, d)) * 0.05
    k[:, :3] += rng.standard_normal((d, 3)) * 2  # three strong directions: a gap after the third
    gamma = np.eye(d) - k @ k.T
    for spectrum in (np.geomspace(100, 0.01, d), np.r_[np.geomspace(100, 1, 30), np.zeros(d - 30)]):
        c = (q * spectrum) @ q.T
        w, lam, kept, complete = covariance_sketch(k, lambda x: c @ x, d)
        y = rng.standard_normal((7, d)) @ (q * np.sqrt(spectrum)).T  # rows in C's range
        exact = np.einsum("ij,jk,ik->i", y, gamma, y)
        np.testing.assert_allclose(((y @ w) ** 2) @ lam, exact, rtol=1e-9, atol=1e-9 * np.abs(exact).max())
        np.testing.assert_allclose(w.T @ c @ w, np.eye(len(lam)), atol=1e-9)
        assert kept == pytest.approx(np.trace(gamma @ c), rel=1e-10)
        assert len(lam) == np.count_nonzero(spectrum) and complete
    root = (q * np.sqrt(spectrum)) @ q.T
    e = np.linalg.eigvalsh(root @ gamma @ root)
    leading = e[np.argsort(-np.abs(e))][:3]
    _, lam, _, complete = covariance_sketch(k, lambda x: c @ x, 3)
    assert not complete
    np.testing.assert_allclose(lam, leading, rtol=1e-5)


@pytest.mark.parametrize("case, rank", [("many-outliers", 2), ("few-samples", 3), ("tokens-below-channels", 4)])
def test_influence_captured_equals_the_reference(tmp_path, monkeypatch, case, rank):
    """The published share of the covariance term the sketch keeps, against an independent float64 route
    (closed-form gradient, full eigendecomposition of C^1/2 Gamma C^1/2, the same check rows)."""
    selection = _selection(tmp_path, monkeypatch, case, "float32")
    got = analyze_selection(selection, AnalysisOptions(bootstrap=10, cache=False, precision="float64",
                                                       influence=str(rank)))
    assert got.bootstrap["influence"].startswith(f"sketch rank {rank} ") and "at its mean" in got.bootstrap["held"]
    captured = got.dataset["influence_captured"]
    assert got.bootstrap["influence_captured_min"] == pytest.approx(float(captured.min()))
    for i, layer in enumerate(reference_inputs(selection)):
        want = influence_captured(layer, rank)
        for j, m in enumerate(("vision", "text")):
            if math.isnan(want[m]):  # fewer than 2 check rows
                assert math.isnan(captured.values[i, j]), (i, m)
            else:
                assert float(captured.values[i, j]) == pytest.approx(want[m], abs=1e-4), (i, m)


def test_influence_captured_flags_a_sketch_that_keeps_little(tmp_path, monkeypatch):
    """Diagonal-only covariances (flat spectra): rank 2 of 48 keeps a small share of the per-token covariance
    term, and the output says so; at rank 24 most of it. The share is per token, so it is conservative for the
    sd: the per-sample sums and the mean and scale terms keep the interval close to the exact one (measured:
    0.02%), which is why the sd is also compared here."""
    monkeypatch.setattr(synth, "RANK", 0)
    path = synth.write_synthetic_archive(tmp_path / "flat.zarr", layers=2, seed=5, dtype="float32", chunk_tokens=64,
                                         chunks_per_shard=2, hidden=48, samples=30, vision_tokens=64, text_tokens=64)
    selection = open_archive(path).select(layers=[1, 2])
    runs = {inf: analyze_selection(selection, AnalysisOptions(bootstrap=2000, cache=False, influence=inf)).bootstrap
            for inf in ("exact", "2", "24")}
    assert runs["exact"]["influence_captured_min"] == 1.0 and runs["exact"]["influence"] == "exact"
    assert runs["2"]["influence_captured_min"] < 0.5 < 0.9 < runs["24"]["influence_captured_min"] < 1.0
    for inf in ("2", "24"):
        assert runs[inf]["std"] == pytest.approx(runs["exact"]["std"], rel=0.02)


def test_the_scan_keeps_its_chunks_for_the_influence_read(tmp_path, monkeypatch):
    """Within the budget the influence read takes the chunks the scan decoded (engine.ChunkStash) instead of
    reading them again (and so does the scan's own second read, which this small archive needs): the same
    values, and each storage chunk read once."""
    from storage_schemas import reader
    selection = _selection(tmp_path, monkeypatch, "many-outliers", "float32")
    reads = []
    original = reader.StoredArraySource.__getitem__

    def counted(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(reader.StoredArraySource, "__getitem__", counted)
    plain = analyze_selection(selection, AnalysisOptions(cache=False))  # the scan reads this archive twice
    scan_reads = len(reads)
    reads.clear()
    kept = analyze_selection(selection, AnalysisOptions(bootstrap=50, cache=False))
    one_pass = len(reads)
    assert 2 * one_pass == scan_reads  # neither the scan's second read nor the influence read read again
    reads.clear()
    monkeypatch.setattr(analysis_api, "_stash_for", lambda *args: None)
    again = analyze_selection(selection, AnalysisOptions(bootstrap=50, cache=False))
    assert len(reads) == scan_reads + one_pass
    assert kept.bootstrap["fd_influence"] == again.bootstrap["fd_influence"]
    assert kept.mir == again.mir == pytest.approx(plain.mir, rel=1e-12)  # plain: values-only eigensolver
