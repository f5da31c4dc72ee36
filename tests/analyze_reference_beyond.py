"""Independent float64 in-memory definitions of the modality-gap and massive-activation numbers
(Liang et al. 2022; Sun et al. 2024) and of linear CKA and its debiased form (Kornblith et al. 2019;
Song et al. 2012's unbiased HSIC), written from the papers' formulas with n x n kernel matrices, for
the tests of analyze/activations.py and analyze/drift.py."""
from __future__ import annotations

import numpy as np
from analyze_reference import lower_median

from storage_schemas import TextRole

TOP_K = 10
LEADING = 5
ROLE_NAMES = [r.name.lower() for r in TextRole]


def gap_vector(vision: np.ndarray, text: np.ndarray) -> np.ndarray:
    """mean(v / ||v||) - mean(t / ||t||) over the raw tokens; a zero row counts as the zero vector."""
    def unit_mean(x):
        x = x.astype(np.float64)
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, n, out=np.zeros_like(x), where=n > 0).mean(axis=0)
    return unit_mean(vision) - unit_mean(text)


def gap_cosines(gap: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """|cos| of the gap with the leading eigenvectors of cov (full eigendecomposition)."""
    w, u = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1][:LEADING]
    out = np.full(LEADING, np.nan)
    out[:len(order)] = np.abs(gap @ u[:, order]) / np.linalg.norm(gap)
    return out


def abs_median(x: np.ndarray) -> tuple[float, bool]:
    """Lower median of |h| over all values; float32 values with low 16 bits set: truncated to bfloat16."""
    med = float(lower_median(np.abs(x.astype(np.float64)).ravel()))
    if x.dtype == np.float32 and np.any(x.view(np.uint32) & 0xFFFF):
        bits = np.array([med], np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
        return float(bits.view(np.float32)[0]), False
    return med, True


def massive_numbers(x: np.ndarray, sample_id, position, role) -> dict:
    """Per modality: median |h|, channels over 100x / 1000x it, the top-k |h| with their tokens."""
    mags = np.abs(x.astype(np.float64))
    med, exact = abs_median(x)
    cmax = mags.max(axis=0)
    hundred = [int(c) for c in sorted(np.flatnonzero(cmax > 100 * med), key=lambda c: (-cmax[c], c))]
    rows, cols = np.unravel_index(np.arange(mags.size), mags.shape)
    order = np.lexsort((cols, rows, -mags.ravel()))[:TOP_K]
    r, c = rows[order], cols[order]
    return {"abs_median": med, "abs_median_exact": exact, "massive_channels_100x": len(hundred),
            "massive_channels_1000x": int((cmax > 1000 * med).sum()),
            "massive_channel_list": " ".join(map(str, hundred)), "top_abs": mags.ravel()[order],
            "top_abs_ratio": mags.ravel()[order] / med, "top_channel": c.tolist(),
            "top_sample": [str(sample_id[i]) for i in r], "top_position": [int(position[i]) for i in r],
            "top_role": [str(role[i]) for i in r]}


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), Eq. 5: the unbiased HSIC estimator on n x n kernel matrices."""
    n = k.shape[0]
    if n < 4:  # the estimator divides by n - 3
        return float("nan")
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    term = np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ k @ l @ one)
    return float(term / (n * (n - 3)))


def linear_cka(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(linear CKA, debiased linear CKA) of the same n tokens in two representations, in float64:
    biased from centred Gram matrices (Kornblith et al. 2019), debiased from the unbiased HSIC of the
    linear kernels of the centred features."""
    x = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    y = y.astype(np.float64) - y.astype(np.float64).mean(axis=0)
    k, l = x @ x.T, y @ y.T
    biased = float(np.sum(k * l) / (np.linalg.norm(k) * np.linalg.norm(l)))
    debiased = hsic_unbiased(k, l) / np.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l, l))
    return biased, float(debiased)
