"""What one Dask task computes on one block of tokens (one storage shard of one layer and modality).

The scan (`scan_block`) is the one read most analyses need: token norms (float64), the top byte of
every column (the first radix digit of the median), the second byte within a guessed window of top
bytes (window.py), and the moments of the rows that are surely not outliers: rows whose norm lies
within this block's own median +- INLIER_SPREADS robust spreads. Every other row comes back raw, so
once the exact outlier rule is known its inliers join the moments exactly. The client checks the
guesses; what they missed is computed by a second read (`moments_block`: moments of the exact
non-outliers and/or the next median byte). Later reads (`radix_block`), float32 archives only: more
digits of the median. All functions are pure numpy on in-memory blocks, so any Dask scheduler can
run them.
"""
from __future__ import annotations

import numpy as np

from . import fused
from .moments import Moments, block_moments, gram_precision
from .radix import byte_histogram, gather_candidates
from .window import choose_window, count_window

NORM_ROWS = 2048
INLIER_SPREADS = 2.0  # the outlier rule keeps 3 std; 2 robust spreads of one block is well inside it


def token_norms(x: np.ndarray) -> np.ndarray:
    """Euclidean norm of every row, accumulated in float64 (squares of float16/32 are exact)."""
    out = np.empty(x.shape[0])
    for start in range(0, x.shape[0], NORM_ROWS):
        b = x[start:start + NORM_ROWS].astype(np.float64)
        out[start:start + NORM_ROWS] = np.einsum("ij,ij->i", b, b)
    return np.sqrt(out)


def _block(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:  # (1, token, channel) straight from the archive
        x = x[0]
    return np.ascontiguousarray(x)


def surely_inside(norms: np.ndarray) -> tuple[float, float]:
    """Norm interval whose rows are inliers under any plausible whole-column outlier rule: this block's
    median +- INLIER_SPREADS x min(std, 1.4826 MAD). A guess, checked by the client."""
    median = float(np.median(norms))
    spread = 1.4826 * float(np.median(np.abs(norms - median)))
    if len(norms) > 1:
        spread = min(spread, float(norms.std(ddof=1))) if spread > 0 else float(norms.std(ddof=1))
    return median - INLIER_SPREADS * spread, median + INLIER_SPREADS * spread


def scan_block(x, start: int, groups: list[tuple[int, int, int]], precision: str, keep_rows: bool = False,
               check_low_bits: bool = False, samples: int | None = None) -> dict:
    """The one read: norms, top-byte histogram, the window's second bytes, and speculative moments.

    `groups` lists (sample block, first row, end row) runs of the block's rows; `start` is the
    block's first row in its unit. With `keep_rows` (fewer tokens than channels) the rows come back
    instead of moments and window: the client has everything in memory. `samples`: how many samples
    the block's rows come from (see window.choose_window).
    """
    x = _block(x)
    columns = None
    if fused.AVAILABLE and not keep_rows:
        norms, hist, columns = fused.scan_columns(x)
    else:
        norms, hist = token_norms(x), byte_histogram(x, 0, np.zeros(x.shape[1], np.int64))
    out = {"norms": norms, "hist": hist}
    if check_low_bits:
        out["low_bits"] = bool(np.any(x.view(np.uint16)[:, 0::2]))
    if keep_rows:
        out["rows"] = x.copy()
        return out
    window = choose_window(hist, samples)
    lo, hi = surely_inside(norms)
    gram = (norms >= lo) & (norms <= hi)
    precision = gram_precision(norms.max(initial=0.0), precision)
    if columns is not None:
        out["window"] = fused.count_window(columns, window, hist)
        del columns
    else:
        out["window"] = count_window(x, window)
    out["moments"] = group_moments(x, gram, groups, precision)
    out["gram"] = gram
    outside = np.flatnonzero(~gram)
    out["raw_index"] = outside + start
    out["raw"] = x[outside]
    return out


def group_moments(x: np.ndarray, keep: np.ndarray, groups: list[tuple[int, int, int]],
                  precision: str) -> dict[int, Moments]:
    convert = fused.convert if fused.AVAILABLE and precision == "float32" else None
    per_group: dict[int, Moments] = {}
    for gid, start, stop in groups:
        m = block_moments(x[start:stop], keep[start:stop], precision, convert)
        per_group[gid] = per_group[gid].merge(m) if gid in per_group else m
    return per_group


def radix_step(x: np.ndarray, step: tuple[str, int, np.ndarray]):
    kind, fixed, prefix = step
    if kind == "hist":
        return ("hist", byte_histogram(x, fixed, prefix))
    return ("gather", gather_candidates(x, fixed, prefix))


def moments_block(x, outliers: np.ndarray, groups: list[tuple[int, int, int]], step, precision: str) -> dict:
    """The second read, for what the scan's guesses missed: per block of samples, the moments of the
    exact non-outlier rows (no groups: not needed), and the next median byte (step None: not needed)."""
    x = _block(x)
    out = {"moments": group_moments(x, ~np.asarray(outliers, bool), groups, precision)}
    if step is not None:
        out["radix"] = radix_step(x, step)
    return out


def radix_block(x, step) -> tuple:
    """A median-only pass (float32 archives): the next digit, or the remaining candidates."""
    return radix_step(_block(x), step)
