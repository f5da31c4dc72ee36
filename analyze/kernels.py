"""What one Dask task computes on one chunk of tokens (the rows of one storage shard of one layer and
modality): the `map` half of the reads (reads.py). Pure numpy on in-memory arrays, so any Dask
scheduler can run them.

The scan (`scan_chunk`) is the one read most analyses need: token norms (float64), the per-value
statistics of activations.py (the sum of the unit-normalised rows, |h| histogram, top-k), the top byte of
every column (the first radix digit of the median), the second byte within a guessed window of top
bytes (window.py), and the moments of the rows that are surely not outliers: rows whose norm lies
within this chunk's own median +- inlier_spreads robust spreads. Every other row comes back raw, so
once the exact outlier rule is known its inliers join the moments exactly (scan.py). What a guess
missed is computed by `inlier_moments` (the exact non-outliers) and the median reads (radix.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import fused
from .activations import activation_partial
from .config import ReadConfig
from .moments import BlockMoments, Moments, block_moments, gram_precision
from .radix import byte_histogram
from .scan import ScanPartial
from .window import WindowCounts, choose_window, count_window

NORM_ROWS = 2048


@dataclass(frozen=True)
class Chunk:
    """Where a chunk sits in its unit, and what is known about its rows when a read is planned."""

    start: int  # first row in the unit
    stop: int
    runs: tuple[tuple[int, int, int], ...]  # (sample block, first row, end row) runs, rows within the chunk
    samples: int  # how many samples its rows come from (see window.choose_window)
    outliers: np.ndarray | None = None  # (stop - start,) once the outlier rule is known
    rule_outliers: tuple[np.ndarray, ...] | None = None  # per alternative rule (stats.OUTLIER_RULES), same shape


def token_norms(x: np.ndarray) -> np.ndarray:
    """Euclidean norm of every row, accumulated in float64 (squares of float16/32 are exact)."""
    out = np.empty(x.shape[0])
    for start in range(0, x.shape[0], NORM_ROWS):
        b = x[start:start + NORM_ROWS].astype(np.float64)
        out[start:start + NORM_ROWS] = np.einsum("ij,ij->i", b, b)
    return np.sqrt(out)


def as_rows(x) -> np.ndarray:
    """A chunk as a contiguous (token, channel) array."""
    x = np.asarray(x)
    if x.ndim == 3:  # (1, token, channel) straight from the archive
        x = x[0]
    return np.ascontiguousarray(x)


def low_bits_set(x: np.ndarray) -> bool:
    """float32 values whose low 16 bits are not all zero: not bfloat16 after all."""
    return bool(np.any(x.view(np.uint16)[:, 0::2]))


def surely_inside(norms: np.ndarray, spreads: float) -> tuple[float, float]:
    """Norm interval whose rows are inliers under any plausible whole-column outlier rule: this chunk's
    median +- `spreads` x min(std, 1.4826 MAD). A guess, checked when the read is finished."""
    median = float(np.median(norms))
    spread = 1.4826 * float(np.median(np.abs(norms - median)))
    if len(norms) > 1:
        spread = min(spread, float(norms.std(ddof=1))) if spread > 0 else float(norms.std(ddof=1))
    return median - spreads * spread, median + spreads * spread


def scan_chunk(x, chunk: Chunk, precision: str, config: ReadConfig, check_low_bits: bool = False,
               into: BlockMoments | None = None) -> ScanPartial:
    """The one read: norms, top-byte histogram, the window's second bytes, and speculative moments (with
    `into`, added into those moments, a lane's accumulator's, and the partial's own are empty)."""
    x = as_rows(x)
    columns = None
    if fused.AVAILABLE:
        norms, hist, columns, activations = fused.scan_columns(x, chunk.start)
    else:
        norms, hist = token_norms(x), byte_histogram(x, 0, np.zeros(x.shape[1], np.int64))
        activations = activation_partial(x, norms, chunk.start)
    window = choose_window(hist, chunk.samples, config)
    if columns is not None:
        counts: WindowCounts = fused.count_window(columns, window, hist)
        del columns
    else:
        counts = count_window(x, window)
    lo, hi = surely_inside(norms, config.inlier_spreads)
    sure = (norms >= lo) & (norms <= hi)
    moments = run_moments(x, sure, chunk.runs, gram_precision(norms.max(initial=0.0), precision), into)
    if into is not None:
        moments = BlockMoments.none()
    outside = np.flatnonzero(~sure)
    return ScanPartial(norms, hist, check_low_bits and low_bits_set(x), counts, moments, sure, outside + chunk.start,
                       x[outside], False, config, activations).bounded()


def run_moments(x: np.ndarray, keep: np.ndarray, runs, precision: str,
                into: BlockMoments | None = None) -> BlockMoments:
    """Moments of the kept rows, per sample block, from the chunk's runs of sample blocks. Blocks of
    interleaved samples (seeded groups) come in many short runs: each block's rows are gathered into one
    product instead of one d x d merge per run. `into`: a lane's accumulator, whose moments the rows
    are added into in place (and which is returned)."""
    convert = fused.convert if fused.AVAILABLE and precision == "float32" else None
    blocks = sorted({block for block, _, _ in runs})
    out = BlockMoments.none() if into is None else into
    if len(blocks) == len(runs):
        for block, start, stop in runs:
            out.by_block[block] = block_moments(x[start:stop], keep[start:stop], precision, convert,
                                                out.by_block.get(block))
        return out
    for block in blocks:
        index = np.concatenate([np.arange(start, stop) for b, start, stop in runs if b == block])
        out.by_block[block] = block_moments(x[index], keep[index], precision, convert, out.by_block.get(block))
    return out


def rule_moments(x, chunk: Chunk, precision: str, into: tuple[Moments, ...] | None = None) -> tuple[Moments, ...]:
    """Moments of the non-outlier rows of each alternative outlier rule (all sample blocks together);
    `into`: a lane's accumulated ones, added into in place."""
    x = as_rows(x)
    into = into or (None,) * len(chunk.rule_outliers)
    return tuple(block_moments(x, ~np.asarray(flags, bool), precision, into=m)
                 for flags, m in zip(chunk.rule_outliers, into))


def inlier_moments(x, chunk: Chunk, precision: str, into: BlockMoments | None = None) -> BlockMoments:
    """Moments of the exact non-outlier rows, per sample block (what the scan's guesses missed)."""
    return run_moments(as_rows(x), ~np.asarray(chunk.outliers, bool), chunk.runs, precision, into)
