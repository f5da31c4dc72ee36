"""The scan's results for one layer and modality: merged block by block, then finished in one task.

Why a finishing task: the raw rows and the window counts a scan carries are only needed until the
exact outlier rule and the median's top byte are known. Finishing on the worker, as soon as the
layer's last block is merged, turns them into d x d moments and a 256-bin histogram per column, so
the client never holds more than compact statistics, whatever the number of layers in flight.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .moments import Moments, block_moments, gram_precision
from .radix import RadixState
from .stats import NormSummary
from .window import WindowCounts

RAW_ROWS_BYTES = 64 * 2**20  # raw rows kept per layer and modality; beyond that: a second read
SPARSE_KEPT_PER_COLUMN = 8192  # gathered median candidates per column of a layer and modality; beyond: idem
DENSE_SLOTS_PER_COLUMN = 64  # window histograms kept per column (blocks' windows differ a little); beyond: idem
DENSE_SLOTS_BYTES = 128 * 2**20  # ... and in all, unless 16 per column need more


@dataclass
class ScanResult:
    """What the client learns from the scan of one layer and modality."""

    norms: np.ndarray
    low_bits: bool
    summary: NormSummary | None = None
    outliers: np.ndarray | None = None
    state: RadixState | None = None  # median: top byte fixed, and the second byte when the window held it
    inliers: dict[int, Moments] | None = None  # per sample block; None when a second read must compute them
    rows: np.ndarray | None = None  # every row, for layers with fewer tokens than channels


def merge_moments(a: dict, b: dict) -> dict:
    out = dict(a)
    for gid, m in b.items():
        out[gid] = out[gid].merge(m) if gid in out else m
    return out


def merge_scan(a: dict, b: dict) -> dict:
    """Merge the scans of two consecutive row ranges (a before b): row-wise fields keep their order."""
    out = {"norms": np.concatenate([a["norms"], b["norms"]]), "hist": a["hist"] + b["hist"],
           "low_bits": a.get("low_bits", False) or b.get("low_bits", False)}
    if "rows" in a:
        out["rows"] = np.concatenate([a["rows"], b["rows"]])
        return out
    out["window"] = a["window"].merge(b["window"])
    if len(out["window"].sparse_keys) > SPARSE_KEPT_PER_COLUMN * out["hist"].shape[0]:
        out["window"].drop_sparse()
    if len(out["window"].keys) > dense_slots_kept(out["hist"].shape[0]):
        out["window"] = WindowCounts.empty()  # the blocks disagree too much: the median needs a second read
    out["moments"] = merge_moments(a["moments"], b["moments"])
    out["gram"] = np.concatenate([a["gram"], b["gram"]])
    out["overflow"] = a.get("overflow", False) or b.get("overflow", False) or \
        a["raw"].nbytes + b["raw"].nbytes > RAW_ROWS_BYTES
    if out["overflow"]:
        out["raw_index"], out["raw"] = np.zeros(0, np.int64), a["raw"][:0]
    else:
        out["raw_index"] = np.concatenate([a["raw_index"], b["raw_index"]])
        out["raw"] = np.concatenate([a["raw"], b["raw"]])
    return out


def dense_slots_kept(d: int) -> int:
    """Window histograms (1 KiB each) a layer and modality may keep: DENSE_SLOTS_PER_COLUMN per column,
    at most DENSE_SLOTS_BYTES unless that leaves fewer than 16 per column (large d)."""
    return min(DENSE_SLOTS_PER_COLUMN * d, max(16 * d, DENSE_SLOTS_BYTES // 1024))


def finish_scan(scan: dict, block_ids: np.ndarray, dtype, key_bytes: int, precision: str) -> ScanResult:
    """Exact outlier rule and median top byte; then whatever the scan's guesses allow: the second
    median byte, and the moments of the non-outlier rows per sample block."""
    norms = scan["norms"]
    found = ScanResult(norms, bool(scan.get("low_bits", False)))
    if not np.isfinite(norms).all():
        return found  # the client names the token
    if found.low_bits:
        key_bytes = 4  # not bfloat16 after all: the median needs all 32 bits
    found.summary = NormSummary.of(norms)
    found.outliers = found.summary.outliers(norms)
    n, d = len(norms), scan["hist"].shape[0]
    found.state = RadixState.start(dtype, n, d, key_bytes)
    if "rows" in scan:
        found.rows = scan["rows"]
        found.state.values = lower_median(found.rows)
        return found
    found.state.apply_histogram(scan["hist"])
    if not found.state.done:
        counts = scan["window"].second_byte(found.state.prefix & 0xFF, found.state.count)
        if counts is not None:
            found.state.apply_histogram(counts)
    if scan.get("overflow") or scan["raw"].nbytes > RAW_ROWS_BYTES or np.any(found.outliers & scan["gram"]):
        return found  # a row taken as a sure inlier is an outlier, or too many raw rows: read again
    precision = gram_precision(found.summary.maximum, precision)
    index, raw = scan["raw_index"], scan["raw"]
    keep = ~found.outliers[index]
    found.inliers = dict(scan["moments"])
    for gid, start, stop in runs(block_ids[index]):
        m = block_moments(raw[start:stop], keep[start:stop], precision)
        found.inliers[gid] = found.inliers[gid].merge(m) if gid in found.inliers else m
    return found


def lower_median(rows: np.ndarray) -> np.ndarray:
    """Column lower median (rank (n - 1) // 2) of rows held in memory, as float64."""
    k = (rows.shape[0] - 1) // 2
    return np.partition(rows, k, axis=0)[k].astype(np.float64)


def runs(ids: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs (id, start, end) of equal consecutive ids."""
    if len(ids) == 0:
        return []
    cut = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(ids)]])
    return [(int(ids[s]), int(s), int(e)) for s, e in zip(starts, ends)]
