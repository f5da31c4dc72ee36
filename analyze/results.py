"""From a layer's sufficient statistics to its numbers: FD (and its split), the related statistics
and the diagnostics of the computation. `layer_summary` is the one place that defines the per-layer
numbers an analysis publishes (dataset.to_dataset turns them into the result's Dataset)."""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg as sl
from scipy.sparse.linalg import eigsh
from storage_schemas.schema import MODALITIES

from .extrapolate import sensitivity_numbers
from .frechet import PsdFactor, frechet_distance, trace_sqrt_of_factors
from .gaps import gap_parts
from .stats import LayerStats, ModalityStats

LEADING = 5


def _scaled_rows(s: ModalityStats, mean: np.ndarray, a: float) -> np.ndarray | None:
    """Y with Y^T Y = the modality's normalised covariance, when its rows are kept (n < d)."""
    if s.rows is None:
        return None
    return (s.rows - mean) * (a / math.sqrt(len(s.rows) - 1))


def layer_fd(stats: LayerStats, mode: str, weights: np.ndarray | None = None, with_factors: bool = False):
    """FD of one layer on text-normalised data (FD = a^2 x FD of the raw data)."""
    a = stats.scale(weights)
    mv, mt = stats.vision.replaced(weights), stats.text.replaced(weights)
    cv, ct = mv.covariance() * a * a, mt.covariance() * a * a
    rows = (None, None) if weights is not None else (_scaled_rows(stats.vision, mv.mean, a),
                                                     _scaled_rows(stats.text, mt.mean, a))
    factors = (PsdFactor.of(cv), PsdFactor.of(ct)) if with_factors else None
    result = frechet_distance(mv.mean * a, cv, mt.mean * a, ct, mode, *rows, factors=factors)
    return result, (mv, mt), (cv, ct), a, factors


def _spectrum_stats(cov: np.ndarray, factor: PsdFactor) -> dict:
    """Variance, participation ratio, leading eigenvalues (Lanczos), numerical rank and condition
    number (LAPACK estimate from the Cholesky factor), without a full eigendecomposition."""
    cov = (cov + cov.T) * 0.5
    d = cov.shape[0]
    total = float(np.trace(cov))
    frob = float(np.sum(cov * cov))
    k = min(LEADING, d)
    if d <= 4 * LEADING:
        top = sl.eigh(cov, eigvals_only=True, driver="evd")[::-1][:k]
    else:
        top = np.sort(eigsh(cov, k=k, which="LA", v0=np.ones(d), return_eigenvectors=False))[::-1]
    return {
        "total_variance": total,
        "effective_rank": total ** 2 / frob if frob > 0 else 0.0,
        "leading_eigenvalues": np.pad(top, (0, LEADING - k), constant_values=np.nan),
        "condition_number": 1.0 / factor.rcond if factor.rcond > 0 else math.inf,
        "numerical_rank": factor.rank,
    }


def _factors_used(stats: LayerStats, means, a: float, factors) -> tuple:
    """The factors Y (C = Y Y^T) the exact trace uses: the scaled centred rows when a modality has fewer
    tokens than channels, else the pivoted Cholesky factor."""
    out = []
    for name, moments, factor in zip(MODALITIES, means, factors):
        rows = _scaled_rows(stats.modality(name), moments.mean, a)
        out.append(rows.T if rows is not None and len(rows) < rows.shape[1] else factor.y)
    return out


def layer_summary(stats: LayerStats, mode: str, sensitivity: bool = False) -> dict:
    """Every per-layer number of `mir analyze` / `mir stats` (covariance-derived ones in normalised units,
    norms in the archive's raw units). `sensitivity`: also FD-infinity and the outlier-rule variants
    (extrapolate.py; needs statistics kept per sample group and under the other rules)."""
    fd, (mv, mt), covs, a, factors = layer_fd(stats, mode, with_factors=True)
    out = {"layer": stats.layer, "fd": fd.fd, "fd_mean_term": fd.mean_term, "fd_covariance_term": fd.covariance_term,
           "trace_sqrt": fd.trace_sqrt, "scale": a, "route": fd.route, "negative_eigenvalue_mass": fd.negative_mass}
    cos = float(mv.mean @ mt.mean / (np.linalg.norm(mv.mean) * np.linalg.norm(mt.mean)))
    out["centroid_cosine"] = cos
    y_v, y_t = _factors_used(stats, (mv, mt), a, factors)
    diff = (mv.mean - mt.mean) * a
    mean_term = float(diff @ diff)
    tau = fd.trace_sqrt if mode == "exact" else trace_sqrt_of_factors(y_v, y_t).value
    out.update(gap_parts(mean_term, covs[0], covs[1], tau, y_v, y_t, mv.n, mt.n))
    extra = {m: {} for m in MODALITIES}
    if sensitivity:
        fd_exact = mean_term + float(np.trace(covs[0]) + np.trace(covs[1])) - 2.0 * tau
        numbers, extra = sensitivity_numbers(stats, fd_exact)
        out.update(numbers)
    for name, cov, factor in zip(MODALITIES, covs, factors):
        s = stats.modality(name)
        out[name] = {
            "tokens": s.n, "outliers": s.n_outliers, "norm_mean": s.norms.mean, "norm_median": s.norms.median,
            "norm_std": s.norms.std, "outlier_threshold": s.norms.threshold,
            "tokens_per_channel": s.n / s.d, "data_passes": s.passes, **_spectrum_stats(cov, factor),
            **extra[name],
        }
    return out
