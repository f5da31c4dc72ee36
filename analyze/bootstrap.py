"""Bootstrap confidence interval for MIR from statistics kept per block of samples.

A replicate draws K of the K sample blocks with replacement and merges their statistics with those
multiplicities: no data is reread. Approximation (stated in the output and docs): within a
replicate, the outlier rule (norm median and std) and the column medians that replace outlier rows
are held at their full-selection values; the text scale factor, means, covariances and FD are
recomputed. Resampling blocks of consecutive samples, not single samples, is what keeps memory at
2 x K x d^2 x 8 bytes per layer; with K = 20 the interval itself is a little noisier than a
per-sample bootstrap would give.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import AnalysisError
from .results import layer_fd
from .stats import LayerStats

CI_LEVEL = 0.95


def bootstrap_weights(replicates: int, blocks: int, seed: int) -> np.ndarray:
    """(B, K) multiplicities: each row is a resample of K blocks with replacement."""
    if blocks < 2:
        raise AnalysisError("--bootstrap needs at least 2 samples in the selection (blocks of samples are "
                            "resampled)")
    rng = np.random.default_rng(seed)
    return rng.multinomial(blocks, np.full(blocks, 1.0 / blocks), size=replicates)


def replicate_fds(stats: LayerStats, mode: str, weights: np.ndarray, mapper=None) -> np.ndarray:
    """FD of one layer under every replicate's block weights; `mapper(fn, items)` may run them in parallel."""
    mapper = mapper or (lambda fn, items: [fn(i) for i in items])
    return np.array(mapper(lambda w: layer_fd(stats, mode, w)[0].fd, list(weights)))


def summarize(fd_by_layer: np.ndarray, seed: int, blocks: int) -> dict:
    """MIR replicates from the (B, L) per-layer FDs, and a percentile interval."""
    totals = fd_by_layer.sum(axis=1)
    mir = np.where(totals > 0, np.log10(np.where(totals > 0, totals, 1.0)), np.nan)
    finite = mir[np.isfinite(mir)]
    lo, hi = (np.quantile(finite, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2]) if len(finite) else (math.nan,) * 2)
    return {
        "replicates": int(len(mir)), "seed": int(seed), "blocks": int(blocks), "level": CI_LEVEL,
        "ci_low": float(lo), "ci_high": float(hi), "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else
        math.nan, "mir_replicates": [float(x) for x in mir],
        "approximation": "sample blocks resampled with replacement; outlier rule and column medians held at "
                         "full-selection values",
    }
