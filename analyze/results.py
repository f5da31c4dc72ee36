"""From a layer's sufficient statistics to its numbers: FD (and its split), the related statistics
and the diagnostics of the computation. `layer_summary` is the one place that defines the per-layer
numbers an analysis publishes (dataset.to_dataset turns them into the result's Dataset)."""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg as sl
from scipy.sparse.linalg import eigsh
from storage_schemas.schema import MODALITIES

from .activations import massive_summary
from .extrapolate import sensitivity_numbers
from .frechet import FrechetResult, PsdFactor, frechet_distance, symmetrize, trace_sqrt_of_factors
from .gaps import channel_matched_trace, gap_parts
from .gradient import InfluenceMethod, LayerGradient, layer_gradient, trace_solve
from .moments import Moments
from .stats import LayerStats, ModalityStats

LEADING = 5


def _scaled_rows(s: ModalityStats, mean: np.ndarray, a: float) -> np.ndarray | None:
    """Y with Y^T Y = the modality's normalised covariance, when its rows are kept (n < d)."""
    if s.rows is None:
        return None
    return (s.rows - mean) * (a / math.sqrt(len(s.rows) - 1))


def _moments_and_covariance(s: ModalityStats, weights: np.ndarray | None, a: float) -> tuple[Moments, np.ndarray]:
    """The replaced moments (count and mean only: their d x d scatter is dropped as soon as the normalised
    covariance a^2 C is made from it, so the finish holds one d x d per modality; memory.py)."""
    m = s.replaced(weights)
    return Moments(m.n, m.mean, None), m.covariance(a)


def layer_fd(stats: LayerStats, mode: str, weights: np.ndarray | None = None, with_factors: bool = False):
    """FD of one layer on text-normalised data (FD = a^2 x FD of the raw data)."""
    a = stats.scale(weights)
    (mv, cv), (mt, ct) = (_moments_and_covariance(s, weights, a) for s in (stats.vision, stats.text))
    rows = (None, None) if weights is not None else (_scaled_rows(stats.vision, mv.mean, a),
                                                     _scaled_rows(stats.text, mt.mean, a))
    factors = (PsdFactor.of(cv), PsdFactor.of(ct)) if with_factors else None
    result = frechet_distance(mv.mean * a, cv, mt.mean * a, ct, mode, *rows, factors=factors)
    return result, (mv, mt), (cv, ct), a, factors


def _spectrum_stats(cov: np.ndarray, factor: PsdFactor, gap: np.ndarray) -> dict:
    """Variance, participation ratio, leading eigenvalues and eigenvectors (Lanczos), numerical rank and
    condition number (LAPACK estimate from the Cholesky factor), without a full eigendecomposition; and
    |cos| of the modality-gap vector with each leading eigenvector (principal direction)."""
    cov = symmetrize(cov)  # the finish's own array, used here last
    d = cov.shape[0]
    total = float(np.trace(cov))
    frob = float(np.einsum("ij,ij->", cov, cov))
    k = min(LEADING, d)
    if d <= 4 * LEADING:
        values, vectors = sl.eigh(cov, driver="evd")
    else:
        values, vectors = eigsh(cov, k=k, which="LA", v0=np.ones(d))
    order = np.argsort(values)[::-1][:k]
    top, vectors = values[order], vectors[:, order]
    length = float(np.linalg.norm(gap))
    cosines = np.abs(gap @ vectors) / length if length > 0 else np.full(k, np.nan)
    return {
        "gap_cosine": np.pad(cosines, (0, LEADING - k), constant_values=np.nan),
        "total_variance": total,
        "effective_rank": total ** 2 / frob if frob > 0 else 0.0,
        "leading_eigenvalues": np.pad(top, (0, LEADING - k), constant_values=np.nan),
        "condition_number": 1.0 / factor.rcond if factor.rcond > 0 else math.inf,
        "numerical_rank": factor.rank,
    }


def _factors_used(stats: LayerStats, means, a: float, factors) -> list[np.ndarray]:
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
    (extrapolate.py; needs statistics kept per sample group and under the other rules).
    Memory (memory.py, FINISH_COPIES): the covariances are dropped after the spectra, the factors after the
    per-channel trace, so at most six d x d arrays live beside the statistics."""
    fd, (mv, mt), covs, a, factors = layer_fd(stats, mode, with_factors=True)
    ys = _factors_used(stats, (mv, mt), a, factors)
    tau = fd.trace_sqrt if mode == "exact" else trace_sqrt_of_factors(*ys).value
    variances = [np.diag(c).copy() for c in covs]
    gap = gap_vector(stats)
    spectra = [_spectrum_stats(cov, factor, gap) for cov, factor in zip(covs, factors)]
    del covs
    factors = [PsdFactor(np.empty((f.y.shape[0], 0)), f.rank, f.rcond) for f in factors]  # Y no longer needed
    tau_d = channel_matched_trace(*variances, *ys)
    del ys
    diff = (mv.mean - mt.mean) * a
    mean_term = float(diff @ diff)  # float64 whatever the --sqrt mode: the parts are of the exact FD
    out = _summary(stats, fd, mv, mt, a, spectra)
    out.update(gap_parts(mean_term, *variances, tau, tau_d, mv.n, mt.n))
    return _with_sensitivity(out, stats, mean_term, variances, tau, sensitivity)


def layer_summary_and_gradient(stats: LayerStats, mode: str, precision: str, sensitivity: bool = False,
                               method: InfluenceMethod = InfluenceMethod()) -> tuple[dict, LayerGradient]:
    """layer_summary and the layer's FD gradient (the bootstrap's influence read, gradient.py) from one trace
    solve: the eigenvectors of the published trace term's eigensolve are what the gradient needs. Memory:
    the covariances and factors are handed to the gradient, which frees them as it goes."""
    if mode != "exact" or stats.vision.rows is not None or stats.text.rows is not None:
        return layer_summary(stats, mode, sensitivity), layer_gradient(stats, precision, method=method)  # solved twice
    a = stats.scale()
    (mv, cv), (mt, ct) = (_moments_and_covariance(s, None, a) for s in (stats.vision, stats.text))
    covs = [cv, ct]
    del cv, ct
    factors = [PsdFactor.of(cov) for cov in covs]
    gap = gap_vector(stats)
    spectra = [_spectrum_stats(cov, factor, gap) for cov, factor in zip(covs, factors)]
    traces = tuple(s["total_variance"] for s in spectra)
    variances = [np.diag(c).copy() for c in covs]
    ys = [f.y for f in factors]
    del factors
    tau_d = channel_matched_trace(*variances, *ys)
    solve = trace_solve(covs, ys)
    diff = (mv.mean - mt.mean) * a
    mean_term = float(diff @ diff)
    fd = FrechetResult(mean_term + traces[0] + traces[1] - 2.0 * solve.value, mean_term, traces[0], traces[1],
                       solve.value, mode, solve.route, solve.negative_mass)
    summary = _summary(stats, fd, mv, mt, a, spectra)
    summary.update(gap_parts(mean_term, *variances, solve.value, tau_d, mv.n, mt.n))
    summary = _with_sensitivity(summary, stats, mean_term, variances, solve.value, sensitivity)
    return summary, layer_gradient(stats, precision, (a, mv, mt, traces, solve), method)


def _with_sensitivity(out: dict, stats: LayerStats, mean_term: float, variances, tau: float,
                      sensitivity: bool) -> dict:
    """Adds FD-infinity and the outlier-rule variants (extrapolate.py) when asked for."""
    if sensitivity:
        fd_exact = mean_term + float(variances[0].sum() + variances[1].sum()) - 2.0 * tau
        numbers, extra = sensitivity_numbers(stats, fd_exact)
        out.update(numbers)
        for name in MODALITIES:
            out[name].update(extra[name])
    return out


def _summary(stats: LayerStats, fd: FrechetResult, mv, mt, a: float, spectra: list[dict]) -> dict:
    out = {"layer": stats.layer, "fd": fd.fd, "fd_mean_term": fd.mean_term, "fd_covariance_term": fd.covariance_term,
           "trace_sqrt": fd.trace_sqrt, "scale": a, "route": fd.route, "negative_eigenvalue_mass": fd.negative_mass}
    cos = float(mv.mean @ mt.mean / (np.linalg.norm(mv.mean) * np.linalg.norm(mt.mean)))
    out["centroid_cosine"] = cos
    out["gap_norm"] = float(np.linalg.norm(gap_vector(stats)))
    for name, spectrum in zip(MODALITIES, spectra):
        s = stats.modality(name)
        out[name] = {
            "tokens": s.n, "outliers": s.n_outliers, "norm_mean": s.norms.mean, "norm_median": s.norms.median,
            "norm_std": s.norms.std, "outlier_threshold": s.norms.threshold,
            "tokens_per_channel": s.n / s.d, "data_passes": s.passes, **spectrum,
            **massive_summary(s.activations),
        }
    return out


def gap_vector(stats: LayerStats) -> np.ndarray:
    """Liang et al.'s modality gap: mean(v / ||v||) - mean(t / ||t||) over the raw tokens (before the
    outlier replacement; scale-free, so the text normalisation does not enter)."""
    v, t = stats.vision, stats.text
    return v.activations.unit_sum / v.n - t.activations.unit_sum / t.n
