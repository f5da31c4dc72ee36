"""Bootstrap confidence intervals for MIR from per-sample influence values (influence.py).

The resampling unit is the sample (all N). A replicate draws N samples with replacement (multiplicities
w, numpy default_rng(seed)); its per-layer FD is the first-order expansion FD_k + sum_i (w_i - 1) D_ki
about the full-selection solution, except the mean term ||a(mu_V - mu_T)||^2, which is recomputed
exactly per replicate from per-sample centred sums (through their N x N Gram matrices: it is the term
whose curvature matters at small N); MIR is log10 of their sum. Any B costs O(B N^2) per layer, and what
it needs is a few numbers per sample and layer, cached with the statistics: another seed or B, or a
paired comparison of two archives over their shared samples, reads no data.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr, ndtri

from .errors import AnalysisError

CI_LEVEL = 0.95
METHOD = ("nonparametric delta method (infinitesimal jackknife) over samples; mean term exact per replicate; "
          "percentile interval, and BCa (bca_low, bca_high; acceleration from the influence values)")
BATCH = 2048  # replicates evaluated at once (B x N x N products)
TIE_TOLERANCE = 1e-9  # BCa's z0: replicates this close to MIR (relative) count half below, half above
HELD = "each modality's outlier rule (norm median and std) and column medians, at their full-selection values"
HELD_SKETCH = ("; and, beyond the sketch's rank, each token's covariance term at its mean (influence_captured: the "
               "share of that term's variance the sketch keeps, measured exactly on every 64th row)")


def sample_weights(replicates: int, samples: int, seed: int) -> np.ndarray:
    """(B, N) multiplicities: each row a resample of N samples with replacement."""
    if samples < 2:
        raise AnalysisError("--bootstrap needs at least 2 samples in the selection (samples are resampled)")
    rng = np.random.default_rng(seed)
    return rng.multinomial(samples, np.full(samples, 1.0 / samples), size=replicates)


def replicate_fd_totals(fd_total: float, influence: np.ndarray, weights: np.ndarray,
                        layers: list | None = None) -> np.ndarray:
    """Summed FD of every replicate: FD + (w - 1) . D, with D the (N,) influence summed over layers, and,
    given the layers' LayerInfluence, their mean terms exact instead of linear."""
    w = np.asarray(weights, np.float64)
    out = fd_total + (w - 1) @ np.asarray(influence, np.float64)
    for layer in layers or []:
        for start in range(0, len(w), BATCH):
            part = w[start:start + BATCH]
            out[start:start + BATCH] += exact_mean_terms(layer, part) - layer.mean_term - (part - 1) @ layer.d_mean
    return out


def exact_mean_terms(layer, w: np.ndarray) -> np.ndarray:
    """a(w)^2 ||mu_V(w) - mu_T(w)||^2 for each row of sample weights w (held outlier rule and medians)."""
    n_v, n_t = w @ layer.n_v, w @ layer.n_t
    a = n_t / (w @ layer.u)
    g_vv, g_vt, g_tt = (np.sum((w @ g) * w, axis=1) for g in layer.gram)  # w^T G w per row, by BLAS
    raw = layer.mean_term / layer.scale ** 2 + 2 * (w @ layer.lin_v / n_v + w @ layer.lin_t / n_t) \
        + g_vv / n_v ** 2 - 2 * g_vt / (n_v * n_t) + g_tt / n_t ** 2
    return a * a * raw


def log10_or_nan(totals: np.ndarray) -> np.ndarray:
    return np.where(totals > 0, np.log10(np.where(totals > 0, totals, 1.0)), np.nan)


def interval(values: np.ndarray) -> tuple[float, float, float]:
    """(low, high, sd) of the finite replicates: central CI_LEVEL percentile interval."""
    finite = values[np.isfinite(values)]
    if finite.size < 2:
        return math.nan, math.nan, math.nan
    lo, hi = np.quantile(finite, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
    return float(lo), float(hi), float(np.std(finite, ddof=1))


def bca_interval(values: np.ndarray, estimate: float, influence: np.ndarray) -> tuple[float, float, float, float]:
    """(low, high, z0, acceleration) of the BCa interval (Efron 1987): the percentile interval's levels moved
    by the bias correction z0 = Phi^-1(share of replicates below the estimate) and the acceleration
    a = sum u^3 / (6 (sum u^2)^3/2) of the centred per-sample influence values u, which the delta method
    gives for free. Why: where the statistic's sd changes with its value (measured: bench/coverage_study.py)
    the percentile interval undercovers; a is that rate of change."""
    finite = values[np.isfinite(values)]
    u = np.asarray(influence, np.float64) - np.mean(influence)
    spread = float(np.sum(u * u))
    if finite.size < 2 or not math.isfinite(estimate) or spread <= 0:
        return math.nan, math.nan, math.nan, math.nan
    accel = float(np.sum(u ** 3) / (6 * spread ** 1.5))
    tie = np.abs(finite - estimate) <= TIE_TOLERANCE * max(abs(estimate), 1.0)  # equal up to rounding: half below
    share = (np.sum((finite < estimate) & ~tie) + 0.5 * np.sum(tie)) / finite.size
    z0 = float(ndtri(min(max(share, 0.5 / finite.size), 1 - 0.5 / finite.size)))
    z = z0 + ndtri(np.array([(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2]))
    levels = ndtr(z0 + z / (1 - accel * z))
    lo, hi = np.quantile(finite, levels)
    return float(lo), float(hi), float(z0), accel


def delta_sd(fd_total: float, influence: np.ndarray) -> float:
    """The closed-form bootstrap sd of MIR to first order: sqrt(sum (D_i - mean D)^2) / (FD ln 10)."""
    d = np.asarray(influence, np.float64)
    return float(np.sqrt(np.sum((d - d.mean()) ** 2)) / (fd_total * math.log(10))) if fd_total > 0 else math.nan


def summarize(fd_total: float, layers: list, replicates: int, seed: int, influence_form: str = "exact") -> dict:
    """MIR replicates and the intervals (percentile, and BCa: `bca_low` / `bca_high`), with what the interval
    is (method, unit, what is held, the influence read's covariance form and the least share of a token's
    covariance term its sketch keeps over layers and modalities). `layers`: the LayerInfluence of every layer."""
    influence = np.sum([layer.d for layer in layers], axis=0)
    n = len(influence)
    mir = log10_or_nan(replicate_fd_totals(fd_total, influence, sample_weights(replicates, n, seed), layers))
    lo, hi, sd = interval(mir)
    estimate = math.log10(fd_total) if fd_total > 0 else math.nan
    b_lo, b_hi, z0, accel = bca_interval(mir, estimate, influence)
    return {"replicates": int(replicates), "seed": int(seed), "level": CI_LEVEL, "ci_low": lo, "ci_high": hi,
            "bca_low": b_lo, "bca_high": b_hi, "bca_z0": z0, "bca_acceleration": accel,
            "std": sd, "delta_std": delta_sd(fd_total, influence), "method": METHOD, "unit": "sample",
            "units": int(n), "held": HELD + ("" if influence_form == "exact" else HELD_SKETCH),
            "influence": influence_form, "influence_captured_min": _least([layer.captured for layer in layers]),
            "mir_replicates": mir}


def _least(values: list) -> float:
    """The smallest finite value (nan where none is: a sketch checked on fewer than 2 rows)."""
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.min()) if finite.size else math.nan


def paired_difference(a: tuple[float, dict], b: tuple[float, dict], replicates: int, seed: int) -> dict:
    """MIR(b) - MIR(a) with its interval (first order in both), the samples paired by id over the shared
    ones, in any order: replicate r gives a sample the same weight in both. `a`, `b`: (summed FD,
    {sample id: influence summed over layers})."""
    (fd_a, inf_a), (fd_b, inf_b) = a, b
    shared = [i for i in inf_a if i in inf_b]
    if len(shared) < 2:
        raise AnalysisError("a paired interval needs at least 2 shared sample ids")
    w = sample_weights(replicates, len(shared), seed)
    ra = log10_or_nan(replicate_fd_totals(fd_a, np.array([inf_a[i] for i in shared]), w))
    rb = log10_or_nan(replicate_fd_totals(fd_b, np.array([inf_b[i] for i in shared]), w))
    lo, hi, sd = interval(rb - ra)
    diff = math.log10(fd_b) - math.log10(fd_a) if fd_a > 0 and fd_b > 0 else math.nan
    return {"difference": diff, "ci_low": lo, "ci_high": hi, "std": sd, "paired_samples": len(shared),
            "exceeds_noise": bool(lo > 0 or hi < 0) if math.isfinite(lo) else None}
