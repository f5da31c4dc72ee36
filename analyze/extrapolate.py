"""The statistics of `--sensitivity`, which cost extra full trace solves per layer:

* FD-infinity (Chong & Forsyth, "Effectively Unbiased FID and Inception Score and where to find them",
  CVPR 2020): FD of nested unions of the K cached sample groups (engine.sample_groups: a seeded
  permutation, so no group follows the archive's order), N_j = the samples in groups 0..j-1, fitted by
  ordinary least squares as FD_N = FD_inf + k / N. Each subset's FD recomputes the text scale and the
  means and covariances from its groups' moments; the outlier rule and the column medians are held at their
  full-selection values (as the bootstrap holds them). K - 1 extra solves per layer; nothing is reread.
* FD under the alternative outlier rules (stats.OUTLIER_RULES): no replacement, and the reference code's
  unused IQR rule (rows with norm outside [Q1 - 1.5 IQR, Q3 + 1.5 IQR] replaced by the same column
  median). Two extra solves per layer.

All with the exact trace, whatever --sqrt says.
"""
from __future__ import annotations

import math

import numpy as np
from storage_schemas.schema import MODALITIES

from .frechet import frechet_distance
from .moments import Moments
from .stats import OUTLIER_RULES, LayerStats

RULE_FIELDS = {"none": "fd_no_replacement", "iqr": "fd_iqr_rule"}


def fit_infinity(samples: np.ndarray, fds: np.ndarray) -> tuple[float, float]:
    """OLS fit of FD_N = FD_inf + k / N over the finite points: (FD_inf, k); nan with fewer than 2 sizes."""
    ok = np.isfinite(fds)
    x, y = 1.0 / np.asarray(samples, np.float64)[ok], np.asarray(fds, np.float64)[ok]
    if len(np.unique(x)) < 2:
        return math.nan, math.nan
    k, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(k)


def subset_fds(stats: LayerStats, full_fd: float) -> tuple[np.ndarray, np.ndarray]:
    """(samples N_j, FD_j) of the nested unions of groups 0..j-1, j = 1..K (the last, the whole selection, is
    `full_fd`); FD nan where a subset holds fewer than 2 tokens of a modality."""
    group_samples = np.asarray(stats.meta["group_samples"], np.int64)
    k = len(group_samples)
    sizes, fds = [], []
    for j in range(1, k):
        weights = (np.arange(k) < j).astype(np.int64)
        sizes.append(int(group_samples[:j].sum()))
        tokens = [int(weights @ stats.modality(m).block_tokens) for m in MODALITIES]
        if min(tokens) < 2:
            fds.append(math.nan)
            continue
        fds.append(_fd(stats.vision.replaced(weights), stats.text.replaced(weights), stats.scale(weights)))
    return np.array(sizes + [int(group_samples.sum())]), np.array(fds + [full_fd])


def _fd(mv: Moments, mt: Moments, a: float) -> float:
    """Exact FD of the text-normalised Gaussians of two modalities' moments (raw units, scale a)."""
    return frechet_distance(mv.mean * a, mv.covariance() * a * a, mt.mean * a, mt.covariance() * a * a).fd


def sensitivity_numbers(stats: LayerStats, full_fd: float) -> tuple[dict, dict]:
    """Per-layer FD_inf, its slope k and FD under each alternative outlier rule; per modality the IQR rule's
    outlier count. `full_fd`: the layer's exact FD (the subset of all groups)."""
    sizes, fds = subset_fds(stats, full_fd)
    fd_inf, slope = fit_infinity(sizes, fds)
    out = {"fd_infinity": fd_inf, "fd_infinity_slope": slope}
    a = stats.scale()
    for rule in OUTLIER_RULES:
        out[RULE_FIELDS[rule]] = _fd(stats.vision.replaced_under(rule), stats.text.replaced_under(rule), a)
    per_modality = {m: {"outliers_iqr": stats.modality(m).rules["iqr"][0]} for m in MODALITIES}
    return out, per_modality
