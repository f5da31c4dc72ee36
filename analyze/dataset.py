"""The one result object of an analysis: an xarray Dataset (dims layer, modality, rank, replicate).

Built once from the per-layer numbers (results.layer_summary), whatever they are: a number added
there appears in the Dataset, the JSON, the netCDF and every consumer without another list to keep.
The JSON (`AnalysisResult.to_json`), the tables, the plots, `mir compare` and `mir study` all read it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from storage_schemas import MODALITIES
from storage_schemas.provenance import library_versions

DESCRIPTIONS = {
    "fd": "Frechet distance of text-normalised vision and text tokens",
    "fd_mean_term": "||mu_V - mu_T||^2 (text-normalised)",
    "fd_covariance_term": "tr C_V + tr C_T - 2 tr((C_V C_T)^1/2) (text-normalised)",
    "scale": "text-centric normalisation a = 1 / mean text-token norm (raw units)",
    "norm_mean": "token-norm statistics in the archive's raw units",
    "mir_replicate": "MIR of each bootstrap replicate",
    "fd_influence": "first-order change of the layer's FD per unit weight of the sample (delta method)",
    "influence_captured": "share of a token's covariance-term variance the influence read keeps (1: exact; "
                          "sketch: measured exactly on every 64th row)",
    "gap_norm": "||mean(v/||v||) - mean(t/||t||)||, the modality gap of Liang et al. 2022 (raw tokens)",
    "gap_cosine": "|cos| of the gap vector with the modality's leading principal directions",
    "abs_median": "lower median of |h| over all values of the modality (raw units)",
    "massive_channels_100x": "channels whose max |h| exceeds 100x the median |h| (Sun et al. 2024)",
    "top_abs": "largest |h| values (raw units), with top_channel / top_sample / top_position / top_role",
    "fd_mean_term_unbiased": "||mu_V - mu_T||^2 - tr C_V / n - tr C_T / m (unbiased for iid tokens)",
    "isotropic_scale": "s* = tau / tr C_V, the best isotropic rescaling of the centred vision tokens",
    "cov_term_isotropic": "covariance term after the best isotropic rescaling: tr C_T - tau^2 / tr C_V",
    "cov_term_trace_matched": "covariance term after trace matching: 2 tr C_T - 2 sqrt(tr C_T / tr C_V) tau",
    "cov_term_channel_matched": "covariance term after D = diag(sigma_T / sigma_V) on the vision tokens",
    "gap_shift": "shift part of FD: the mean term",
    "gap_scale": "scale part of FD: (tr C_V - tau)^2 / tr C_V, what the best isotropic rescaling removes",
    "gap_channel": "per-channel part of FD: what the map D removes beyond the isotropic rescaling (may be < 0)",
    "gap_shape": "shape part of FD: the covariance term left after the map D",
    "fd_share": "the layer's share of the summed FD",
    "fd_infinity": "FD extrapolated to infinitely many samples: intercept of FD_N = FD_inf + k / N (OLS)",
    "fd_infinity_slope": "k of FD_N = FD_inf + k / N",
    "fd_no_replacement": "FD without outlier replacement (exact trace)",
    "fd_iqr_rule": "FD with the reference code's IQR rule (1.5 IQR of the token norms; exact trace)",
    "outliers_iqr": "tokens outside [Q1 - 1.5 IQR, Q3 + 1.5 IQR] of the token norms",
}
RUN_NUMBERS = ("fd_layer_mean",)  # run-level numbers always published (Dataset attributes, JSON keys)
SENSITIVITY_NUMBERS = ("mir_infinity", "mir_no_replacement", "mir_iqr_rule")  # with --sensitivity


def to_dataset(summaries: list[dict], attrs: dict, mir_replicates: np.ndarray | None = None,
               influence: tuple[list[str], np.ndarray] | None = None,
               captured: np.ndarray | None = None) -> xr.Dataset:
    """The per-layer numbers as a Dataset: a layer-level number becomes a (layer) variable, a
    per-modality one a (layer, modality) variable, a per-modality vector a (layer, modality, rank) one.
    `influence`: (sample ids, (layer, sample) influence values), the bootstrap's per-sample values;
    `captured` (layer, modality): the share of a token's covariance term the influence read keeps."""
    first = summaries[0]
    data = {}
    for name, value in first.items():
        if name == "layer":
            continue
        if name in MODALITIES:
            for sub, v in value.items():
                dims = ("layer", "modality", vector_dim(sub)) if np.ndim(v) else ("layer", "modality")
                data.setdefault(sub, (dims, np.array([[s[m][sub] for m in MODALITIES] for s in summaries])))
        else:
            data[name] = ("layer", np.array([s[name] for s in summaries]))
    coords = {"layer": np.array([s["layer"] for s in summaries], dtype=np.int64), "modality": list(MODALITIES)}
    for dims, values in data.values():
        if len(dims) == 3:
            coords.setdefault(dims[2], np.arange(1, values.shape[2] + 1))
    if mir_replicates is not None:
        data["mir_replicate"] = ("replicate", np.asarray(mir_replicates, np.float64))
    if influence is not None:
        data["fd_influence"] = (("layer", "sample"), np.asarray(influence[1], np.float64))
        coords["sample_id"] = ("sample", np.asarray(influence[0], dtype=str))
    if captured is not None:
        data["influence_captured"] = (("layer", "modality"), np.asarray(captured, np.float64))
    ds = xr.Dataset(data, coords=coords, attrs=attrs)
    for name, text in DESCRIPTIONS.items():
        if name in ds:
            ds[name].attrs["long_name"] = text
    return ds


def vector_dim(name: str) -> str:
    """The third dimension of a per-modality vector: `top` for the top-k activations (activations.py),
    `rank` for the leading principal directions."""
    return "top" if name.startswith("top_") else "rank"


def _plain(value):
    """A Dataset element as JSON-ready Python (arrays as lists, numpy scalars as Python numbers)."""
    value = value.decode() if isinstance(value, bytes) else value
    return value.tolist() if isinstance(value, np.ndarray) else (value.item() if hasattr(value, "item") else value)


def layer_rows(ds: xr.Dataset) -> list[dict]:
    """The Dataset's per-layer variables as one dict per layer ({name: value, "vision": {...}, "text": {...}})."""
    rows = []
    modalities = [str(m) for m in ds["modality"].values]
    for i, layer in enumerate(ds["layer"].values):
        row = {"layer": int(layer)}
        per_modality = {m: {} for m in modalities}
        for name, var in ds.data_vars.items():
            if var.dims == ("layer",):
                row[name] = _plain(var.values[i])
            elif var.dims[:2] == ("layer", "modality"):
                for j, m in enumerate(modalities):
                    per_modality[m][name] = _plain(var.values[i, j])
        rows.append({**row, **per_modality})
    return rows


def json_safe(obj):
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def versions() -> dict:
    return library_versions(("numpy", "scipy", "dask", "distributed", "zarr", "xarray"))


BOOTSTRAP_ATTRS = {"replicates": "bootstrap_replicates", "seed": "bootstrap_seed", "level": "bootstrap_level",
                   "ci_low": "mir_ci_low", "ci_high": "mir_ci_high", "std": "mir_bootstrap_std",
                   "delta_std": "mir_delta_std", "method": "bootstrap_method", "unit": "bootstrap_unit",
                   "units": "bootstrap_units", "held": "bootstrap_held", "bca_low": "mir_bca_low",
                   "bca_high": "mir_bca_high", "bca_z0": "bootstrap_bca_z0", "bca_acceleration": "bootstrap_bca_acceleration",
                   "influence": "bootstrap_influence", "influence_captured_min": "bootstrap_influence_captured_min"}


def result_attrs(*, mir: float, mode: str, n_samples: int, n_vision_tokens: int, n_text_tokens: int,
                 settings: dict, bootstrap: dict | None, extra: dict | None = None) -> dict:
    """Dataset attributes: the run's scalars (netCDF-compatible types), the bootstrap summary, and `extra`
    run-level numbers (the mean FD per layer; with --sensitivity MIR-infinity and MIR under other rules)."""
    attrs = {"mir": float(mir), "sqrt_mode": mode, "n_samples": int(n_samples), "n_vision_tokens": int(n_vision_tokens),
             "n_text_tokens": int(n_text_tokens), "settings": json.dumps(json_safe(settings)),
             "versions": json.dumps(versions())}
    attrs.update({name: float(value) for name, value in (extra or {}).items()})
    if bootstrap:
        attrs.update({attr: bootstrap[key] for key, attr in BOOTSTRAP_ATTRS.items()})
    return attrs


@dataclass
class AnalysisResult:
    """The Dataset, and what the run says about itself (settings, warnings, cache use, time)."""

    dataset: xr.Dataset
    settings: dict
    warnings: list[str] = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def mir(self) -> float:
        return float(self.dataset.attrs["mir"])

    @property
    def mode(self) -> str:
        return str(self.dataset.attrs["sqrt_mode"])

    @property
    def n_samples(self) -> int:
        return int(self.dataset.attrs["n_samples"])

    @property
    def n_vision_tokens(self) -> int:
        return int(self.dataset.attrs["n_vision_tokens"])

    @property
    def n_text_tokens(self) -> int:
        return int(self.dataset.attrs["n_text_tokens"])

    @property
    def layers(self) -> list[dict]:
        return layer_rows(self.dataset)

    @property
    def sensitivity(self) -> dict | None:
        """MIR-infinity and MIR under the other outlier rules, when --sensitivity computed them."""
        attrs = self.dataset.attrs
        return {k: attrs[k] for k in SENSITIVITY_NUMBERS} if SENSITIVITY_NUMBERS[0] in attrs else None

    @property
    def bootstrap(self) -> dict | None:
        ds = self.dataset
        if "mir_replicate" not in ds:
            return None
        out = {key: _plain(ds.attrs[attr]) for key, attr in BOOTSTRAP_ATTRS.items()}
        out["mir_replicates"] = ds["mir_replicate"].values.tolist()
        if "fd_influence" in ds:
            out["fd_total"] = float(ds["fd"].sum())
            out["sample_ids"] = [str(i) for i in ds["sample_id"].values]
            out["fd_influence"] = ds["fd_influence"].sum("layer").values.tolist()
        return out

    def to_json(self) -> dict:
        return json_safe({
            "mir": self.mir, "mode": self.mode, "n_samples": self.n_samples, "n_vision_tokens": self.n_vision_tokens,
            "n_text_tokens": self.n_text_tokens, **{k: self.dataset.attrs[k] for k in RUN_NUMBERS},
            "sensitivity": self.sensitivity, "layers": self.layers, "bootstrap": self.bootstrap,
            "warnings": self.warnings, "settings": self.settings, "cache": self.cache, "elapsed_s": self.elapsed_s,
            "versions": versions(),
        })
