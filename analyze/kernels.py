"""What one Dask task computes on one block of tokens (one storage shard of one layer and modality).

Pass 1 (`scan_block`): token norms (float64) and the first radix digit of every column.
Pass 2 (`moments_block`): moments of the non-outlier rows per block of samples, plus the next
radix digit. Later passes (`radix_block`), float32 archives only: more digits of the median.
All functions are pure numpy on in-memory blocks, so any Dask scheduler can run them.
"""
from __future__ import annotations

import numpy as np

from .moments import Moments, block_moments
from .radix import byte_histogram, gather_candidates

NORM_ROWS = 2048


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


def scan_block(x, check_low_bits: bool = False) -> dict:
    """Pass 1 on one block: norms, the top-byte histogram, and (bfloat16 archives) whether any low
    16 bits are set (then the values are not bfloat16 and the median needs all 32 bits)."""
    x = _block(x)
    out = {"norms": token_norms(x), "hist": byte_histogram(x, 0, np.zeros(x.shape[1], np.int64))}
    if check_low_bits:
        out["low_bits"] = bool(np.any(x.view(np.uint16)[:, 0::2]))
    return out


def radix_step(x: np.ndarray, step: tuple[str, int, np.ndarray]):
    kind, fixed, prefix = step
    if kind == "hist":
        return ("hist", byte_histogram(x, fixed, prefix))
    return ("gather", gather_candidates(x, fixed, prefix))


def moments_block(x, outliers: np.ndarray, groups: list[tuple[int, int, int]], step, precision: str,
                  keep_rows: bool = False) -> dict:
    """Pass 2 on one block: per block of samples, the moments of its non-outlier rows.

    `groups` lists (sample block, first row, end row) runs of the block's rows. With `keep_rows`
    (a modality with fewer tokens than channels) the raw rows come back as well, for the
    token-count-sized trace form.
    """
    x = _block(x)
    keep = ~np.asarray(outliers, bool)
    per_group: dict[int, Moments] = {}
    for gid, start, stop in groups:
        m = block_moments(x[start:stop], keep[start:stop], precision)
        per_group[gid] = per_group[gid].merge(m) if gid in per_group else m
    out = {"moments": per_group}
    if step is not None:
        out["radix"] = radix_step(x, step)
    if keep_rows:
        out["rows"] = x.copy()
    return out


def radix_block(x, step) -> tuple:
    """A median-only pass (float32 archives): the next digit, or the remaining candidates."""
    return radix_step(_block(x), step)
