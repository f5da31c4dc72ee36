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
    return out

