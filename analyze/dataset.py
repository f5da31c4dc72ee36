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
    "gap_norm": "||mean(v/||v||) - mean(t/||t||)||, the modality gap of Liang et al. 2022 (raw tokens)",
    "gap_cosine": "|cos| of the gap vector with the modality's leading principal directions",
    "abs_median": "lower median of |h| over all values of the modality (raw units)",
    "massive_channels_100x": "channels whose max |h| exceeds 100x the median |h| (Sun et al. 2024)",
    "top_abs": "largest |h| values (raw units), with top_channel / top_sample / top_position / top_role",
}


def to_dataset(summaries: list[dict], attrs: dict, mir_replicates: np.ndarray | None = None,
               influence: tuple[list[str], np.ndarray] | None = None) -> xr.Dataset:
    """The per-layer numbers as a Dataset: a layer-level number becomes a (layer) variable, a
    per-modality one a (layer, modality) variable, a per-modality vector a (layer, modality, rank) one.
    `influence`: (sample ids, (layer, sample) influence values), the bootstrap's per-sample values."""
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
                   "bca_high": "mir_bca_high", "bca_z0": "bootstrap_bca_z0", "bca_acceleration": "bootstrap_bca_acceleration"}


def result_attrs(*, mir: float, mode: str, n_samples: int, n_vision_tokens: int, n_text_tokens: int,
                 settings: dict, bootstrap: dict | None) -> dict:
    """Dataset attributes: the run's scalars (netCDF-compatible types) and the bootstrap summary."""
    attrs = {"mir": float(mir), "sqrt_mode": mode, "n_samples": int(n_samples), "n_vision_tokens": int(n_vision_tokens),
             "n_text_tokens": int(n_text_tokens), "settings": json.dumps(json_safe(settings)),
             "versions": json.dumps(versions())}
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
            "n_text_tokens": self.n_text_tokens, "layers": self.layers, "bootstrap": self.bootstrap,
            "warnings": self.warnings, "settings": self.settings, "cache": self.cache, "elapsed_s": self.elapsed_s,
            "versions": versions(),
        })
