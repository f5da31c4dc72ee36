"""Independent float64 in-memory bootstraps of MIR over samples, used to check analyze/bootstrap.py.

* `brute_force_bootstrap`: every replicate draws N samples with replacement and recomputes everything
  from the resampled rows, literally per MIR_SPEC (analyze_reference.layer_fd): scale, outlier rule,
  medians, means, covariances, exact trace. The target the delta method must approximate.
* `finite_difference_influence`: the published influence values by central differences of a weighted
  FD (outlier rule and medians held), a route independent of analyze/'s closed-form gradient.
"""
from __future__ import annotations

import math

import numpy as np
from analyze_reference import CI_LEVEL, layer_fd, lower_median, trace_sqrt

Layer = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # vision, its token samples, text, its token samples


def _rows_of(samples: np.ndarray, selected: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(samples == s) for s in selected]


def brute_force_bootstrap(layers: list[Layer], selected: np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """MIR of every replicate, recomputed from the resampled samples' rows."""
    rng = np.random.default_rng(seed)
    n = len(selected)
    prepared = [(v.astype(np.float64), _rows_of(vs, selected), t.astype(np.float64), _rows_of(ts, selected))
                for v, vs, t, ts in layers]
    out = np.empty(replicates)
    for b in range(replicates):
        pick = rng.integers(0, n, n)
        total = 0.0
        for v, v_rows, t, t_rows in prepared:
            iv = np.concatenate([v_rows[i] for i in pick])
            it = np.concatenate([t_rows[i] for i in pick])
            total += layer_fd(v[iv], t[it])["fd"]
        out[b] = math.log10(total) if total > 0 else math.nan
    return out


def _held(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows after replacement under the full-selection rule, and the raw norms."""
    norms = np.sqrt((x * x).sum(axis=1))
    out = np.abs(norms - lower_median(norms)) > 3 * np.std(norms, ddof=1)
    replaced = x.copy()
    replaced[out] = lower_median(x, axis=0)
    return replaced, norms


def _weighted_moments(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = w.sum()
    mean = w @ x / n
    c = x - mean
    return mean, (c * w[:, None]).T @ c / (n - 1)


def weighted_fd(layer: Layer, selected: np.ndarray, sample_weight: np.ndarray, mean_only: bool = False) -> float:
    """FD of one layer (or only its mean term) with every sample's rows weighted by sample_weight (held
    outlier rule and medians)."""
    v, vs, t, ts = layer
    index = {int(s): i for i, s in enumerate(selected)}
    rv, _ = _held(v.astype(np.float64))
    rt, norms_t = _held(t.astype(np.float64))
    wv = sample_weight[[index[int(s)] for s in vs]]
    wt = sample_weight[[index[int(s)] for s in ts]]
    a = wt.sum() / (wt @ norms_t)
    mv, cv = _weighted_moments(a * rv, wv)
    mt, ct = _weighted_moments(a * rt, wt)
    if mean_only:
        return float(((mv - mt) ** 2).sum())
    return float(((mv - mt) ** 2).sum() + np.trace(cv) + np.trace(ct) - 2 * trace_sqrt(cv, ct))


def finite_difference_influence(layer: Layer, selected: np.ndarray, step: float = 1e-4,
                                mean_only: bool = False) -> np.ndarray:
    """dFD / dw_i (or of the mean term) at w = 1 for every sample, by central differences."""
    n = len(selected)
    out = np.empty(n)
    for i in range(n):
        e = np.zeros(n)
        e[i] = step
        out[i] = (weighted_fd(layer, selected, 1 + e, mean_only) -
                  weighted_fd(layer, selected, 1 - e, mean_only)) / (2 * step)
    return out


def published_bootstrap(layers: list[Layer], selected: np.ndarray, replicates: int, seed: int) -> dict:
    """What `mir analyze --bootstrap` publishes: replicate b weights sample i by w_bi (numpy
    default_rng(seed) multinomial); per layer FD + (w - 1) . (D - D_mean) + the exact weighted mean term,
    with D, D_mean the finite-difference influence of FD and of its mean term (the JSON's fd_influence is
D summed over layers)."""
    n = len(selected)
    w = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)
    ones = np.ones(n)
    totals = np.zeros(replicates)
    influence = np.zeros(n)
    for layer in layers:
        d = finite_difference_influence(layer, selected)
        d_mean = finite_difference_influence(layer, selected, mean_only=True)
        influence += d
        totals += weighted_fd(layer, selected, ones) - weighted_fd(layer, selected, ones, mean_only=True)
        totals += (w - 1) @ (d - d_mean) + np.array([weighted_fd(layer, selected, row, mean_only=True) for row in w])
    fd_total = sum(weighted_fd(layer, selected, ones) for layer in layers)
    mirs = np.where(totals > 0, np.log10(np.abs(totals)), np.nan)
    finite = mirs[np.isfinite(mirs)]
    d = influence - influence.mean()
    bca = bca_reference(finite, math.log10(fd_total), d)
    return {**bca, "replicates": replicates, "seed": seed, "level": CI_LEVEL, "unit": "sample", "units": n,
            "ci_low": float(np.quantile(finite, (1 - CI_LEVEL) / 2)),
            "ci_high": float(np.quantile(finite, (1 + CI_LEVEL) / 2)), "std": float(np.std(finite, ddof=1)),
            "delta_std": float(np.sqrt(d @ d) / (fd_total * math.log(10))), "mir_replicates": mirs,
            "fd_influence": influence, "fd_total": fd_total}



def bca_reference(finite: np.ndarray, estimate: float, u: np.ndarray) -> dict:
    """Efron's BCa interval with the acceleration from the (centred) per-sample influence values."""
    from scipy.stats import norm
    accel = float(np.sum(u ** 3) / (6 * np.sum(u ** 2) ** 1.5))
    tie = np.isclose(finite, estimate, rtol=0, atol=1e-9 * max(abs(estimate), 1.0))  # equal up to rounding
    share = (np.sum(finite < estimate - 1e-9 * max(abs(estimate), 1.0)) + 0.5 * np.sum(tie)) / len(finite)
    z0 = float(norm.ppf(np.clip(share, 0.5 / len(finite), 1 - 0.5 / len(finite))))
    za = norm.ppf([(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
    low, high = np.quantile(finite, norm.cdf(z0 + (z0 + za) / (1 - accel * (z0 + za))))
    return {"bca_low": float(low), "bca_high": float(high), "bca_z0": z0, "bca_acceleration": accel}


CHECK_EVERY = 64  # the rows the sketch is checked on: token index % 64 == 0 (analyze/influence.py)


def _roots(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C^1/2 and the pseudo-inverse of C^1/2 (symmetric PSD, on its numerical range)."""
    w, u = np.linalg.eigh((c + c.T) / 2)
    keep = w > 1e-12 * max(w.max(), 1e-300)
    return (u[:, keep] * np.sqrt(w[keep])) @ u[:, keep].T, (u[:, keep] / np.sqrt(w[keep])) @ u[:, keep].T


def covariance_gradients(cv: np.ndarray, ct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dFD/dC_V and dFD/dC_T = I - 2 df/dC for f = tr((C_V C_T)^1/2), by the closed form
    df/dC_T = 1/2 C_V^1/2 (C_V^1/2 C_T C_V^1/2)^-1/2 C_V^1/2 (and its mirror), inverse roots on the range."""
    out = []
    for a, b in ((ct, cv), (cv, ct)):  # dC_V: the roles of the two swap
        ra, _ = _roots(a)
        _, inv_root = _roots(ra @ b @ ra)
        out.append(np.eye(len(a)) - ra @ inv_root @ ra)
    return out[0], out[1]


def influence_captured(layer: Layer, rank: int) -> dict:
    """What `influence_captured` should be per modality for a sketch of `rank`: over the check rows that are
    not outliers, 1 - var(e - s) / var(e) with e = y^T Gamma y the exact covariance term of a centred
    normalised row and s its rank-r part: the r largest-|lambda| eigenpairs of C^1/2 Gamma C^1/2."""
    v, _, t, _ = layer
    v, t = v.astype(np.float64), t.astype(np.float64)
    a = 1.0 / np.sqrt((t * t).sum(axis=1)).mean()
    rows, kept = {}, {}
    for name, x in (("vision", v), ("text", t)):
        replaced, norms = _held(x)
        out = np.abs(norms - lower_median(norms)) > 3 * np.std(norms, ddof=1)
        rows[name] = a * replaced
        kept[name] = (~out) & (np.arange(len(x)) % CHECK_EVERY == 0)
    covs = {name: np.cov(x, rowvar=False, ddof=1) for name, x in rows.items()}
    grads = dict(zip(("vision", "text"), covariance_gradients(covs["vision"], covs["text"])))
    result = {}
    for name, x in rows.items():
        y = (x - x.mean(axis=0))[kept[name]]
        root, inv_root = _roots(covs[name])
        lam, z = np.linalg.eigh(root @ grads[name] @ root)
        top = np.argsort(-np.abs(lam), kind="stable")[:rank]
        e = np.einsum("ij,jk,ik->i", y, grads[name], y)
        s = ((y @ inv_root @ z[:, top]) ** 2) @ lam[top]
        result[name] = float(1 - np.var(e - s, ddof=1) / np.var(e, ddof=1)) if len(e) >= 2 else math.nan
    return result
