"""Checks every number `mir analyze` / `mir stats` publish (JSON, netCDF, the printed tables) against
the independent float64 implementation in analyze_reference.py.

`PUBLISHED_LAYER` / `PUBLISHED_MODALITY` list the per-layer fields and how each is compared; a field
the analysis publishes that is not listed here fails `check_document`, so a new number cannot be
published untested.
"""
from __future__ import annotations

import math
import re

import numpy as np
import xarray as xr
import analyze_reference_beyond as beyond
from analyze_reference import iqr_count, layer_fd, layer_numbers, sensitivity_numbers
from analyze_reference_bootstrap import bca_reference, published_bootstrap

FD_RTOL = 1e-5  # float32 Gram products on centred data
EXACT, RAW, FD_SHARE, COSINE, SPECTRUM, CONDITION, PASSES, NEGATIVE, SHARE, EXTRAPOLATED, SLOPE = (
    "exact", "raw", "fd-share", "cosine", "spectrum", "condition", "passes", "negative", "share", "extrapolated",
    "slope")
EXTRAPOLATION_GAIN = 20  # the OLS intercept of K points weighs each FD by up to ~K: errors grow by that much

DIRECTION, LIST = "direction", "list"
PUBLISHED_LAYER = {"layer": EXACT, "fd": SPECTRUM, "fd_mean_term": FD_SHARE, "fd_covariance_term": FD_SHARE,
                   "trace_sqrt": SPECTRUM, "scale": RAW, "route": EXACT, "centroid_cosine": COSINE,
                   "negative_eigenvalue_mass": NEGATIVE, "gap_norm": RAW, "fd_mean_term_unbiased": FD_SHARE,
                   "isotropic_scale": SPECTRUM, "cov_term_isotropic": FD_SHARE, "cov_term_trace_matched": FD_SHARE,
                   "cov_term_channel_matched": FD_SHARE, "gap_shift": FD_SHARE, "gap_scale": FD_SHARE,
                   "gap_channel": FD_SHARE, "gap_shape": FD_SHARE, "fd_share": SHARE}
SENSITIVITY_LAYER = {"fd_infinity": EXTRAPOLATED, "fd_infinity_slope": SLOPE, "fd_no_replacement": SPECTRUM,
                     "fd_iqr_rule": SPECTRUM}
SENSITIVITY_MODALITY = {"outliers_iqr": EXACT}
BOOTSTRAP_MODALITY = {"influence_captured": RAW}
SENSITIVITY_TOP = ("mir_infinity", "mir_no_replacement", "mir_iqr_rule")
PUBLISHED_MODALITY = {"tokens": EXACT, "outliers": EXACT, "norm_mean": RAW, "norm_median": RAW, "norm_std": RAW,
                      "outlier_threshold": RAW, "tokens_per_channel": RAW, "total_variance": SPECTRUM,
                      "effective_rank": SPECTRUM, "leading_eigenvalues": SPECTRUM, "numerical_rank": EXACT,
                      "condition_number": CONDITION, "data_passes": PASSES, "gap_cosine": DIRECTION,
                      "abs_median": RAW, "abs_median_exact": EXACT, "massive_channels_100x": EXACT,
                      "massive_channels_1000x": EXACT, "massive_channel_list": EXACT, "top_abs": LIST,
                      "top_abs_ratio": LIST, "top_channel": LIST, "top_sample": LIST, "top_position": LIST,
                      "top_role": LIST}
PUBLISHED_TOP = {"mir", "mode", "n_samples", "n_vision_tokens", "n_text_tokens", "layers", "bootstrap", "warnings",
                 "settings", "cache", "elapsed_s", "versions", "fd_layer_mean", "sensitivity"}


def reference_inputs(selection) -> list[tuple]:
    """(vision, vision token samples, text, text token samples) of every selected layer, read in full."""
    vs, ts = selection.vision["sample"].values, selection.text["sample"].values
    return [(np.asarray(selection.vision.data[i].compute()), vs, np.asarray(selection.text.data[i].compute()), ts)
            for i in range(len(selection.layers))]


def reference_document(selection, bootstrap: dict | None = None, sensitivity: bool = False) -> dict:
    """What the JSON should say. `bootstrap`: {"replicates", "seed"} when one was asked for; `sensitivity`:
    FD-infinity and the outlier-rule variants too."""
    inputs = reference_inputs(selection)
    layers = [layer_numbers(v, t, int(layer)) for layer, (v, _, t, _) in zip(selection.layers, inputs)]
    for ref, (v, _, t, _) in zip(layers, inputs):
        add_beyond_numbers(ref, selection, v, t)
    total = sum(r["fd"] for r in layers)
    for r in layers:
        r["fd_share"] = r["fd"] / total
    doc = {"mir": math.log10(total), "n_samples": len(selection.sample_index), "fd_layer_mean": total / len(layers),
           "n_vision_tokens": len(inputs[0][0]), "n_text_tokens": len(inputs[0][2]), "layers": layers}
    if sensitivity:
        for r, (v, vs, t, ts) in zip(layers, inputs):
            r.update(sensitivity_numbers(v, vs, t, ts, selection.sample_index))
            r["vision"]["outliers_iqr"], r["text"]["outliers_iqr"] = iqr_count(v.astype(float)), iqr_count(
                t.astype(float))
        sums = {name: sum(r[field] for r in layers) for name, field in (
            ("mir_infinity", "fd_infinity"), ("mir_no_replacement", "fd_no_replacement"),
            ("mir_iqr_rule", "fd_iqr_rule"))}
        doc["sensitivity"] = {name: math.log10(x) if x > 0 else math.nan for name, x in sums.items()}
    if bootstrap:
        doc["bootstrap"] = published_bootstrap(inputs, selection.sample_index, bootstrap["replicates"],
                                               bootstrap["seed"])
        doc["bootstrap"]["sample_ids"] = selection.sample_ids
        d = int(selection.archive.hidden_size)
        assert d <= 64, "the default sketch is complete (exact) only for d <= 64: use influence_captured's reference"
        for r in layers:  # complete: 1 by definition
            r["vision"]["influence_captured"] = r["text"]["influence_captured"] = 1.0
        doc["bootstrap"]["influence_captured_min"] = 1.0
    return doc


def add_beyond_numbers(ref: dict, selection, v: np.ndarray, t: np.ndarray) -> None:
    """The modality gap and massive activations of one layer (analyze_reference_beyond.py) into ref."""
    gap = beyond.gap_vector(v, t)
    ref["gap_norm"] = float(np.linalg.norm(gap))
    ids = selection.archive.samples.sample_id.values
    cov = layer_fd(v.astype(np.float64), t.astype(np.float64))
    for m, x, c in (("vision", v, cov["cov_v"]), ("text", t, cov["cov_t"])):
        view = getattr(selection, m)
        roles = (["image"] * len(x) if m == "vision" else
                 [beyond.ROLE_NAMES[r] for r in view["role"].values.astype(int)])
        ref[m]["gap_cosine"] = beyond.gap_cosines(gap, c)
        ref[m].update(beyond.massive_numbers(x, ids[view["sample"].values], view["position"].values, roles))


def _plain_list(value) -> list:
    return [v.decode() if isinstance(v, bytes) else v for v in np.asarray(value).tolist()]


def _close(kind: str, got, want, fd: float, where: str, rtol: float = FD_RTOL) -> None:
    if isinstance(got, bytes):
        got = got.decode()
    if kind == LIST:  # top-k entries: stored values and their tokens, exactly (ties broken alike)
        g, w = _plain_list(got), _plain_list(want)
        g = [x for x in g if x not in ("", -1, None) and x == x]  # padding beyond the values held
        w = [x if not isinstance(x, float) else float(x) for x in w]
        assert g == w[:len(g)] and len(g) == min(len(w), 10), (where, got, want)
    elif kind == DIRECTION:  # cosines with eigenvectors of covariances from float32 products
        g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert g.shape == w.shape and np.allclose(g, w, atol=1e-3, equal_nan=True), (where, got, want)
    elif kind == EXACT:
        assert got == want, (where, got, want)
    elif kind == RAW:  # float64 from exact squares of stored values
        assert math.isclose(got, want, rel_tol=1e-10), (where, got, want)
    elif kind == FD_SHARE:  # a part of FD: relative to FD, which may be far larger
        assert abs(got - want) <= rtol * (abs(want) + abs(fd)), (where, got, want)
    elif kind == COSINE:
        assert abs(got - want) <= 1e-6, (where, got, want)
    elif kind == SPECTRUM:
        g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert g.shape == w.shape and (np.isnan(g) == np.isnan(w)).all(), (where, got, want)
        scale = np.nanmax(np.abs(w))
        assert np.all(np.abs(g - w)[~np.isnan(w)] <= rtol * scale), (where, got, want)
    elif kind == CONDITION:  # LAPACK's 1-norm estimate (Hager-Higham): a lower bound, rarely 10x off (measured 0.25x on a near-singular
        # float32 case, the value depending on the BLAS threads rounding); JSON null: inf
        got = math.inf if got is None else got
        assert (math.isinf(got) and math.isinf(want)) or 0.1 * want <= got <= want * (1 + 1e-3), (where, got, want)
    elif kind == PASSES:
        assert got in (1, 2, 3, 4), (where, got)
    elif kind == SHARE:  # a ratio of FDs
        assert abs(got - want) <= 2 * rtol, (where, got, want)
    elif kind == EXTRAPOLATED:
        assert abs(got - want) <= EXTRAPOLATION_GAIN * rtol * (abs(want) + abs(fd)), (where, got, want)
    else:
        raise AssertionError(f"no comparison named {kind}")


def _close_log(got, want: float, name: str) -> None:
    """A log10 of summed FDs; nan (JSON null) where the sum is not positive (FD-infinity can be negative)."""
    got = math.nan if got is None else got
    if math.isnan(want):
        assert math.isnan(got), (name, got)
    else:
        assert abs(got - want) <= EXTRAPOLATION_GAIN * FD_RTOL, (name, got, want)


def check_layers(got_layers: list[dict], ref_layers: list[dict], rtol: float = FD_RTOL) -> None:
    """Every published per-layer number equals the reference; every published field is known here."""
    assert [g["layer"] for g in got_layers] == [r["layer"] for r in ref_layers]
    sensitive = "fd_infinity" in ref_layers[0]
    layer_fields = {**PUBLISHED_LAYER, **(SENSITIVITY_LAYER if sensitive else {})}
    modality_fields = {**PUBLISHED_MODALITY, **(SENSITIVITY_MODALITY if sensitive else {}),
                       **(BOOTSTRAP_MODALITY if "influence_captured" in ref_layers[0]["vision"] else {})}
    for got, ref in zip(got_layers, ref_layers):
        assert set(got) == set(layer_fields) | {"vision", "text"}, sorted(set(got) ^ set(layer_fields))
        parts = sum(got[name] for name in ("gap_shift", "gap_scale", "gap_channel", "gap_shape"))
        assert abs(parts - got["fd"]) <= 1e-9 * abs(got["fd"]) + 1e-12, (got["layer"], parts, got["fd"])
        for name, kind in layer_fields.items():
            if kind == SLOPE:  # k ~ N x FD: its error is N times an FD's
                scale = abs(ref[name]) + max(ref["subset_samples"]) * abs(ref["fd"])
                assert abs(got[name] - ref[name]) <= EXTRAPOLATION_GAIN * rtol * scale, (got["layer"], name)
            elif kind == NEGATIVE:
                scale = got["vision"]["total_variance"] + got["text"]["total_variance"]
                assert 0 <= got[name] <= 1e-6 * scale, (got["layer"], name, got[name])
            else:
                _close(kind, got[name], ref[name], ref["fd"], f"layer {got['layer']} {name}", rtol)
        for m in ("vision", "text"):
            assert set(got[m]) == set(modality_fields), sorted(set(got[m]) ^ set(modality_fields))
            for name, kind in modality_fields.items():
                _close(kind, got[m][name], ref[m].get(name), ref["fd"], f"layer {got['layer']} {m} {name}", rtol)


def check_bootstrap(got: dict, ref: dict, influence: tuple | None = None) -> None:
    """The bootstrap fields; `influence`: (summed FD, per-sample influence summed over layers) where `got`
    does not hold them (the netCDF's attributes)."""
    for name in ("replicates", "seed", "level", "unit", "units"):
        assert got[name] == ref[name], (name, got[name], ref[name])
    replicates = np.array([np.nan if x is None else x for x in got["mir_replicates"]], np.float64)  # JSON null: nan
    # as summed FDs, to FD_RTOL of the terms they sum: FD and up to N-fold weighted influence values (a
    # replicate far below FD is a difference of such terms)
    got_fd, want_fd = 10 ** replicates, 10 ** ref["mir_replicates"]
    assert np.array_equal(np.isnan(got_fd), np.isnan(want_fd))
    scale = ref["fd_total"] + len(ref["fd_influence"]) * np.abs(ref["fd_influence"]).max()
    ok = np.isnan(want_fd) | (np.abs(got_fd - want_fd) <= FD_RTOL * (scale + np.abs(want_fd)))
    assert ok.all(), (got_fd[~ok], want_fd[~ok])
    # BCa: the reference formula on the published replicates, estimate and influence values (the replicates
    # are checked against the reference above; z0 counts replicates below MIR, so a replicate that sits next
    # to MIR within the replicates' tolerance may change sides, and in a sparse tail that moves an end far)
    finite = replicates[np.isfinite(replicates)]
    fd_total, values = influence if influence is not None else (got["fd_total"], got["fd_influence"])
    values = np.asarray(values, np.float64)
    want = bca_reference(finite, math.log10(fd_total), values - values.mean())
    for name in ("bca_low", "bca_high", "bca_z0"):
        assert abs(got[name] - want[name]) <= 1e-9 * max(1.0, abs(want[name])), (name, got[name], want[name])
    assert abs(got["bca_z0"] - ref["bca_z0"]) <= 3.0 / math.sqrt(len(finite)), (got["bca_z0"], ref["bca_z0"])
    for name in ("ci_low", "ci_high"):  # as FDs, like the replicates
        g, w = 10 ** got[name], 10 ** ref[name]
        assert abs(g - w) <= FD_RTOL * (scale + w), (name, got[name], ref[name])
    assert abs(got["bca_acceleration"] - ref["bca_acceleration"]) <= 1e-4 * abs(ref["bca_acceleration"]) + 1e-12
    for name in ("std", "delta_std"):
        assert abs(got[name] - ref[name]) <= 1e-4 * abs(ref[name]), (name, got[name], ref[name])
    assert "delta method" in got["method"] and "outlier rule" in got["held"] and "medians" in got["held"]
    assert got["influence"].startswith("sketch rank ") and "at its mean" in got["held"]
    assert got["influence_captured_min"] == ref["influence_captured_min"]
    if "fd_influence" in got:  # the JSON: the per-sample values, summed over layers, by sample id
        assert got["sample_ids"] == ref["sample_ids"]
        np.testing.assert_allclose(got["fd_influence"], ref["fd_influence"], rtol=1e-4,
                                   atol=1e-5 * np.abs(ref["fd_influence"]).max())
        assert abs(got["fd_total"] - ref["fd_total"]) <= 1e-5 * ref["fd_total"]


def check_document(doc: dict, ref: dict, *, mode: str = "exact", rtol: float = FD_RTOL) -> None:
    """The whole JSON of `mir analyze` / `mir stats`."""
    assert set(doc) == PUBLISHED_TOP, sorted(set(doc) ^ PUBLISHED_TOP)
    assert abs(doc["mir"] - ref["mir"]) <= 1e-6 and doc["mode"] == mode
    for name in ("n_samples", "n_vision_tokens", "n_text_tokens"):
        assert doc[name] == ref[name], (name, doc[name], ref[name])
    check_layers(doc["layers"], ref["layers"], rtol)
    assert abs(doc["fd_layer_mean"] - ref["fd_layer_mean"]) <= rtol * ref["fd_layer_mean"]
    if "sensitivity" in ref:
        assert set(doc["sensitivity"]) == set(SENSITIVITY_TOP), doc["sensitivity"]
        for name in SENSITIVITY_TOP:  # log10 of sums of FDs: an FD's relative error / ln 10, extrapolation's gain
            _close_log(doc["sensitivity"][name], ref["sensitivity"][name], name)
    else:
        assert doc["sensitivity"] is None
    if "bootstrap" in ref:
        check_bootstrap(doc["bootstrap"], ref["bootstrap"])
    else:
        assert doc["bootstrap"] is None
    layers = [r["layer"] for r in ref["layers"]]
    assert doc["settings"]["layers"] == layers and doc["settings"]["mode"] == mode
    assert doc["elapsed_s"] >= 0 and doc["versions"]["numpy"] == np.__version__
    warned = {(int(m.group(1)), m.group(2)) for w in doc["warnings"]
              for m in [re.match(r"layer (\d+): fewer (.*) tokens than channels", w)] if m}
    expected = {(r["layer"], " and ".join(m for m in ("vision", "text") if r[m]["tokens_per_channel"] < 1))
                for r in ref["layers"]} - {(r["layer"], "") for r in ref["layers"]}
    assert warned == expected, (warned, expected)
    assert any("N >= 20" in w for w in doc["warnings"]) == (ref["n_samples"] < 20)


def layers_from_dataset(ds: xr.Dataset) -> list[dict]:
    """The netCDF's per-layer variables in the JSON's shape; every variable must have a known name."""
    out = []
    for i, layer in enumerate(ds["layer"].values):
        row = {"layer": int(layer), "vision": {}, "text": {}}
        for name, var in ds.data_vars.items():
            if var.dims in (("replicate",), ("layer", "sample")):
                continue  # the bootstrap's MIR replicates and per-sample values: check_dataset
            known = {**PUBLISHED_LAYER, **PUBLISHED_MODALITY, **SENSITIVITY_LAYER, **SENSITIVITY_MODALITY,
                     **BOOTSTRAP_MODALITY}
            assert name in known, f"netCDF variable {name!r} is not checked"
            if var.dims == ("layer",):
                value = var.values[i]
                row[name] = value.decode() if isinstance(value, bytes) else value.item()
            else:
                for j, m in enumerate(ds["modality"].values.astype(str)):
                    value = var.values[i, j]
                    row[m][name] = value.item() if np.ndim(value) == 0 else value
        out.append(row)
    return out


DATASET_ATTRS = {"mir", "sqrt_mode", "n_samples", "n_vision_tokens", "n_text_tokens", "settings", "versions",
                 "fd_layer_mean"}
BOOTSTRAP_ATTRS = {"bootstrap_replicates": "replicates", "bootstrap_seed": "seed", "bootstrap_level": "level",
                   "mir_ci_low": "ci_low", "mir_ci_high": "ci_high", "mir_bootstrap_std": "std",
                   "mir_delta_std": "delta_std", "bootstrap_method": "method", "bootstrap_unit": "unit",
                   "bootstrap_units": "units", "bootstrap_held": "held", "mir_bca_low": "bca_low",
                   "mir_bca_high": "bca_high", "bootstrap_bca_z0": "bca_z0", "bootstrap_bca_acceleration": "bca_acceleration",
                   "bootstrap_influence": "influence", "bootstrap_influence_captured_min": "influence_captured_min"}


def check_dataset(ds: xr.Dataset, ref: dict, *, mode: str = "exact") -> None:
    """The netCDF: every variable and attribute."""
    check_layers(layers_from_dataset(ds), ref["layers"])
    expected = DATASET_ATTRS | (set(BOOTSTRAP_ATTRS) if "bootstrap" in ref else set()) | \
        (set(SENSITIVITY_TOP) if "sensitivity" in ref else set())
    assert set(ds.attrs) == expected, sorted(set(ds.attrs) ^ expected)
    assert abs(ds.attrs["fd_layer_mean"] - ref["fd_layer_mean"]) <= FD_RTOL * ref["fd_layer_mean"]
    for name in SENSITIVITY_TOP if "sensitivity" in ref else ():
        _close_log(ds.attrs[name], ref["sensitivity"][name], name)
    assert abs(ds.attrs["mir"] - ref["mir"]) <= 1e-6 and ds.attrs["n_samples"] == ref["n_samples"]
    assert ds.attrs["n_vision_tokens"] == ref["n_vision_tokens"] and ds.attrs["n_text_tokens"] == ref["n_text_tokens"]
    assert ds.attrs["sqrt_mode"] == mode
    assert "mir_replicate" in ds.data_vars or "bootstrap" not in ref
    if "bootstrap" in ref:
        got = {key: ds.attrs[attr] for attr, key in BOOTSTRAP_ATTRS.items()}
        got["mir_replicates"] = ds["mir_replicate"].values
        check_bootstrap(got, ref["bootstrap"], (float(ds["fd"].sum()), ds["fd_influence"].sum("layer").values))
        assert ds["fd_influence"].dims == ("layer", "sample")
        assert ds["sample_id"].values.astype(str).tolist() == ref["bootstrap"]["sample_ids"]
        np.testing.assert_allclose(ds["fd_influence"].sum("layer").values, ref["bootstrap"]["fd_influence"],
                                   rtol=1e-4, atol=1e-5 * np.abs(ref["bootstrap"]["fd_influence"]).max())


def _num(text: str) -> float:
    return math.nan if text == "nan" else float(text)


def check_analyze_table(text: str, ref: dict) -> None:
    """The table `mir analyze` prints: MIR, and per layer FD, its two terms, the scale and the outliers."""
    assert abs(float(re.search(r"MIR = (\S+)", text).group(1)) - ref["mir"]) <= 2e-6
    if "bootstrap" in ref:
        low, high = re.search(r"95% CI \[(\S+), (\S+)\]", text).groups()
        boot = ref["bootstrap"]
        scale = boot["fd_total"] + len(boot["fd_influence"]) * np.abs(boot["fd_influence"]).max()
        for got, name in ((low, "ci_low"), (high, "ci_high")):  # as FDs (see check_bootstrap); 6 decimals printed
            w = 10 ** boot[name]
            assert abs(10 ** float(got) - w) <= FD_RTOL * (scale + w) + 3e-6 * w, (got, name)
    assert math.isclose(float(re.search(r"mean FD per layer (\S+?);?\s", text + " ").group(1)), ref["fd_layer_mean"],
                        rel_tol=1e-5)
    if "sensitivity" in ref:
        for label, name in (("MIR-infinity", "mir_infinity"), ("without outlier replacement", "mir_no_replacement"),
                            ("IQR rule", "mir_iqr_rule")):
            _close_log(_num(re.search(label + r" (\S+?)[,\n]", text + "\n").group(1)), ref["sensitivity"][name], label)
    rows = {int(p[0]): p for p in (line.split() for line in text.splitlines()) if p and p[0].isdigit()}
    assert sorted(rows) == [r["layer"] for r in ref["layers"]]
    for r in ref["layers"]:
        p = rows[r["layer"]]
        for got, want in zip(p[1:5], (r["fd"], r["fd_mean_term"], r["fd_covariance_term"], r["scale"])):
            assert abs(_num(got) - want) <= 1e-4 * abs(want) + FD_RTOL * r["fd"], (p, want)
        assert p[5] == f"{r['vision']['outliers']}/{r['text']['outliers']}" and p[6] == r["route"]
        assert abs(float(p[7]) - r["fd_share"]) <= 6e-5, (p, r["fd_share"])
        if "sensitivity" in ref:
            for got, name in zip(p[8:11], ("fd_infinity", "fd_no_replacement", "fd_iqr_rule")):
                slack = EXTRAPOLATION_GAIN * FD_RTOL * r["fd"]
                assert abs(_num(got) - r[name]) <= 1e-4 * abs(r[name]) + slack, (p, name)


def check_stats_table(text: str, ref: dict) -> None:
    """The table `mir stats` prints: per modality the norms, outliers, variance, rank, top eigenvalue,
    condition number; per layer the scale, FD and its terms and the centroid cosine."""
    by_layer = {r["layer"]: r for r in ref["layers"]}
    seen, layer = set(), None
    for line in text.splitlines()[2:]:
        p = line.split()
        if p[0] == "gap":
            r = by_layer[layer]
            m = re.search(r"shift (\S+) \+ scale (\S+) \+ channel (\S+) \+ shape (\S+); unbiased mean term (\S+); "
                          r"share (\S+)", line)
            names = ("gap_shift", "gap_scale", "gap_channel", "gap_shape", "fd_mean_term_unbiased")
            for got, name in zip(m.groups()[:5], names):
                assert abs(float(got) - r[name]) <= 1e-4 * abs(r[name]) + FD_RTOL * r["fd"], (line, name)
            assert abs(float(m.group(6)) - r["fd_share"]) <= 6e-5, line
            seen.add((layer, "gap"))
            continue
        if p[0] == "sens.":
            r = by_layer[layer]
            m = re.search(r"FD-inf (\S+) \(k (\S+)\); FD without replacement (\S+); FD IQR rule (\S+) "
                          r"\(outliers (\d+)/(\d+)\)", line)
            for got, name in zip(m.groups()[:4], ("fd_infinity", "fd_infinity_slope", "fd_no_replacement",
                                                  "fd_iqr_rule")):
                slack = max(r["subset_samples"]) if name == "fd_infinity_slope" else 1
                assert abs(_num(got) - r[name]) <= 1e-4 * abs(r[name]) + EXTRAPOLATION_GAIN * FD_RTOL * slack * \
                    r["fd"], (line, name)
            assert (int(m.group(5)), int(m.group(6))) == (r["vision"]["outliers_iqr"], r["text"]["outliers_iqr"])
            seen.add((layer, "sens."))
            continue
        if p[0] == "cross":
            r = by_layer[layer]
            m = re.search(r"scale a (\S+); FD (\S+) = mean term (\S+) \+ covariance term (\S+); "
                          r"centroid cosine ([^;\s]+)", line)
            for got, want in zip(m.groups()[:4], (r["scale"], r["fd"], r["fd_mean_term"], r["fd_covariance_term"])):
                assert abs(float(got) - want) <= 1e-4 * abs(want) + FD_RTOL * r["fd"], (line, want)
            assert abs(float(m.group(5)) - r["centroid_cosine"]) <= 1e-4, line
            g = re.search(r"gap \|\|d\|\| (\S+), \|cos\| with PC1 vision (\S+) text (\S+)$", line).groups()
            assert abs(float(g[0]) - r["gap_norm"]) <= 1e-4 * r["gap_norm"] + 1e-4, line
            assert abs(float(g[1]) - r["vision"]["gap_cosine"][0]) <= 2e-3, line
            assert abs(float(g[2]) - r["text"]["gap_cosine"][0]) <= 2e-3, line
            seen.add((layer, "cross"))
            continue
        layer, mod = int(p[0]), p[1]
        want = by_layer[layer][mod]
        assert int(p[2]) == want["tokens"] and int(p[6]) == want["outliers"], line
        for got, name in zip((p[3], p[4], p[5], p[7]), ("norm_mean", "norm_median", "norm_std", "total_variance")):
            assert math.isclose(_num(got), want[name], rel_tol=1e-4), (line, name)
        assert abs(float(p[8]) - want["effective_rank"]) <= 0.006, line
        assert math.isclose(_num(p[9]), want["leading_eigenvalues"][0], rel_tol=1e-4), line
        cond = _num(p[10])
        assert (math.isinf(want["condition_number"]) and math.isnan(cond)) or \
            0.1 * want["condition_number"] <= cond <= 1.001 * want["condition_number"], line
        assert math.isclose(_num(p[11]), want["abs_median"], rel_tol=1e-4), line
        assert math.isclose(_num(p[12]), want["top_abs_ratio"][0], rel_tol=1e-4), line
        assert p[13] == f"{want['massive_channels_100x']}/{want['massive_channels_1000x']}", line
        seen.add((layer, mod))
    rows = ("vision", "text", "cross", "gap") + (("sens.",) if "sensitivity" in ref else ())
    assert seen == {(r["layer"], m) for r in ref["layers"] for m in rows}
