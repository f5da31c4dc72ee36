"""An independent, literal float64 in-memory implementation of MIR_SPEC, used to check analyze/.

Deliberately naive: stacks every token in memory, follows the spec line by line, and computes the
trace term with scipy.linalg.sqrtm in float64 (a different route from analyze's eigensolvers).
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg


def lower_median(x: np.ndarray, axis=None):
    """torch.median's rule: for an even count, the lower of the two middle values."""
    n = x.shape[0] if axis == 0 else x.size
    s = np.sort(x, axis=axis)
    return s[(n - 1) // 2] if axis is not None or x.ndim == 1 else s.ravel()[(n - 1) // 2]


def replace_outliers(x: np.ndarray) -> tuple[np.ndarray, int]:
    norms = np.sqrt((x * x).sum(axis=1))
    med = lower_median(norms)
    sd = np.std(norms, ddof=1)
    outliers = np.abs(norms - med) > 3 * sd
    m = lower_median(x, axis=0)
    out = x.copy()
    out[outliers] = m
    return out, int(outliers.sum())


def trace_sqrt(a: np.ndarray, b: np.ndarray) -> float:
    """tr((A B)^1/2) via sqrtm of the symmetric PSD A^1/2 B A^1/2 (float64)."""
    ra = scipy.linalg.sqrtm(a)
    ra = np.real(ra)
    inner = ra @ b @ ra
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet(v: np.ndarray, t: np.ndarray) -> dict:
    mv, mt = v.mean(axis=0), t.mean(axis=0)
    cv = np.cov(v, rowvar=False, ddof=1)
    ct = np.cov(t, rowvar=False, ddof=1)
    cv, ct = np.atleast_2d(cv), np.atleast_2d(ct)
    tr = trace_sqrt(cv, ct)
    mean_term = float(((mv - mt) ** 2).sum())
    return {"fd": mean_term + np.trace(cv) + np.trace(ct) - 2 * tr, "mean_term": mean_term,
            "trace_sqrt": tr, "cov_v": cv, "cov_t": ct, "mean_v": mv, "mean_t": mt}


def layer_fd(vision: np.ndarray, text: np.ndarray) -> dict:
    """One layer: V (r x d) and T (s x d), stored values; returns FD and the intermediate values."""
    v = vision.astype(np.float64)
    t = text.astype(np.float64)
    a = 1.0 / np.sqrt((t * t).sum(axis=1)).mean()
    v, t = a * v, a * t
    v, nv = replace_outliers(v)
    t, nt = replace_outliers(t)
    out = frechet(v, t)
    out.update(scale=a, outliers_v=nv, outliers_t=nt)
    return out


def mir(layers: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, list[float]]:
    fds = [layer_fd(v, t)["fd"] for v, t in layers]
    return math.log10(sum(fds)), fds


# ---------------------------------------------------------------------------- every published number
LEADING = 5  # eigenvalues published per modality, largest first
CI_LEVEL = 0.95


def norm_numbers(x: np.ndarray) -> dict:
    """Token-norm statistics of one modality in the archive's raw units (before normalisation)."""
    norms = np.sqrt((x * x).sum(axis=1))
    med = float(lower_median(norms))
    sd = float(np.std(norms, ddof=1))
    return {"tokens": len(x), "outliers": int((np.abs(norms - med) > 3 * sd).sum()), "norm_mean": float(norms.mean()),
            "norm_median": med, "norm_std": sd, "outlier_threshold": 3 * sd, "tokens_per_channel": len(x) / x.shape[1]}


def spectrum_numbers(cov: np.ndarray) -> dict:
    """Numbers of one normalised covariance (after outlier replacement), from a full eigendecomposition."""
    w = np.linalg.eigvalsh(cov)[::-1]
    top = np.full(LEADING, np.nan)
    top[:min(LEADING, len(w))] = w[:LEADING]
    rank = int(np.linalg.matrix_rank(cov, hermitian=True))
    return {"total_variance": float(w.sum()), "effective_rank": float(w.sum() ** 2 / (w ** 2).sum()),
            "leading_eigenvalues": top, "numerical_rank": rank,
            "condition_number": float(np.linalg.cond(cov, 1)) if rank == len(cov) else math.inf}


def layer_numbers(vision: np.ndarray, text: np.ndarray, layer: int) -> dict:
    """Every per-layer number `mir analyze --json` publishes, shaped like its JSON rows."""
    v, t = vision.astype(np.float64), text.astype(np.float64)
    ref = layer_fd(v, t)
    mv, mt = ref["mean_v"], ref["mean_t"]
    out = {"layer": layer, "fd": float(ref["fd"]), "fd_mean_term": ref["mean_term"],
           "fd_covariance_term": float(np.trace(ref["cov_v"]) + np.trace(ref["cov_t"]) - 2 * ref["trace_sqrt"]),
           "trace_sqrt": ref["trace_sqrt"], "scale": float(ref["scale"]),
           "centroid_cosine": float(mv @ mt / np.sqrt((mv @ mv) * (mt @ mt)))}
    for name, x, cov in (("vision", v, ref["cov_v"]), ("text", t, ref["cov_t"])):
        out[name] = {**norm_numbers(x), **spectrum_numbers(cov)}
    # the trace term's problem size: a modality with fewer tokens than channels enters by its rows
    widths = [len(x) if len(x) < x.shape[1] else out[name]["numerical_rank"]
              for name, x in (("vision", v), ("text", t))]
    small = any(len(x) < x.shape[1] for x in (v, t))
    out["route"] = f"{'gram' if small else 'factor'}-{min(widths)}"
    out.update(gap_numbers(ref, len(v), len(t)))
    return out



# ---------------------------------------------------------------------------- beyond MIR: what kind of gap
def gap_numbers(ref: dict, n_vision: int, n_text: int) -> dict:
    """The gap parts of one layer, literally: each remainder is the covariance term of the vision tokens
    after the map, recomputed from the mapped covariance by sqrtm (not from the closed forms)."""
    cv, ct = ref["cov_v"], ref["cov_t"]
    tv, tt, tau = float(np.trace(cv)), float(np.trace(ct)), ref["trace_sqrt"]

    def cov_term(mapped: np.ndarray) -> float:  # vision covariance after a map, text unchanged
        return float(np.trace(mapped) + tt - 2 * trace_sqrt(mapped, ct))

    grid = np.linspace(0.0, 2.0 * math.sqrt(tt / tv), 2001)  # the best isotropic s, by search, refined below
    best = min(grid, key=lambda s: s * s * tv - 2 * s * tau)
    s_opt = tau / tv
    assert abs(best - s_opt) <= grid[1]  # the closed form is the minimum
    sv, st = np.sqrt(np.diag(cv)), np.sqrt(np.diag(ct))
    d = np.where(sv > 0, st / np.where(sv > 0, sv, 1), 0.0)
    full = cov_term(cv)
    isotropic = cov_term(s_opt ** 2 * cv)
    channel = cov_term(cv * np.outer(d, d))
    return {"fd_mean_term_unbiased": ref["mean_term"] - tv / n_vision - tt / n_text, "isotropic_scale": s_opt,
            "cov_term_isotropic": isotropic, "cov_term_trace_matched": cov_term(tt / tv * cv),
            "cov_term_channel_matched": channel, "gap_shift": ref["mean_term"], "gap_scale": full - isotropic,
            "gap_channel": isotropic - channel, "gap_shape": channel}


# ---------------------------------------------------------------------------- --sensitivity
GROUPS = 4
GROUP_SEED = 0


def sample_groups(n: int, k: int = GROUPS, seed: int = GROUP_SEED) -> np.ndarray:
    """Group of each of n selected samples (by position): a permutation by default_rng(seed), cut in k parts."""
    k = min(k, n)
    group = np.empty(n, np.int64)
    for rank, pos in enumerate(np.random.default_rng(seed).permutation(n)):
        group[pos] = rank * k // n
    return group


def _held_fd(v: np.ndarray, t: np.ndarray, keep_v: np.ndarray, keep_t: np.ndarray) -> float:
    """FD of the rows kept, with the full selection's outlier rows and column medians (held), the subset's scale."""
    parts = []
    for x, keep in ((v, keep_v), (t, keep_t)):
        norms = np.sqrt((x * x).sum(axis=1))
        out = np.abs(norms - lower_median(norms)) > 3 * np.std(norms, ddof=1)
        y = x.copy()
        y[out] = lower_median(x, axis=0)
        parts.append(y[keep])
    tk = t[keep_t]
    a = 1.0 / np.sqrt((tk * tk).sum(axis=1)).mean()
    return frechet(a * parts[0], a * parts[1])["fd"]


def _rule_fd(v: np.ndarray, t: np.ndarray, rule: str) -> float:
    a = 1.0 / np.sqrt((t * t).sum(axis=1)).mean()
    out = []
    for x in (a * v, a * t):
        if rule == "iqr":  # mir_util.replace_outliers_with_iqr_l2, in float64
            norms = np.sqrt((x * x).sum(axis=1))
            q1, q3 = np.percentile(norms, 25), np.percentile(norms, 75)
            bad = (norms < q1 - 1.5 * (q3 - q1)) | (norms > q3 + 1.5 * (q3 - q1))
            x = x.copy()
            x[bad] = lower_median(x, axis=0)
        out.append(x)
    return frechet(*out)["fd"]


def iqr_count(x: np.ndarray) -> int:
    norms = np.sqrt((x * x).sum(axis=1))
    q1, q3 = np.percentile(norms, 25), np.percentile(norms, 75)
    return int(((norms < q1 - 1.5 * (q3 - q1)) | (norms > q3 + 1.5 * (q3 - q1))).sum())


def sensitivity_numbers(vision, v_samples, text, t_samples, selected: np.ndarray) -> dict:
    """FD_inf and k by least squares over FD of nested unions of the seeded groups; FD under the other rules."""
    v, t = vision.astype(np.float64), text.astype(np.float64)
    group = dict(zip(np.asarray(selected).tolist(), sample_groups(len(selected)).tolist()))
    gv = np.array([group[s] for s in v_samples])
    gt = np.array([group[s] for s in t_samples])
    k = max(group.values()) + 1
    sizes, fds = [], []
    for j in range(1, k + 1):
        kv, kt = gv < j, gt < j
        sizes.append(sum(1 for g in group.values() if g < j))
        fds.append(_held_fd(v, t, kv, kt) if kv.sum() >= 2 and kt.sum() >= 2 else math.nan)
    ok = np.isfinite(fds)
    design = np.stack([np.ones(ok.sum()), 1.0 / np.array(sizes)[ok]], axis=1)
    (fd_inf, slope), *_ = np.linalg.lstsq(design, np.array(fds)[ok], rcond=None)
    return {"fd_infinity": float(fd_inf), "fd_infinity_slope": float(slope),
            "fd_no_replacement": _rule_fd(v, t, "none"), "fd_iqr_rule": _rule_fd(v, t, "iqr"),
            "subset_samples": sizes, "subset_fds": fds}
