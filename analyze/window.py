"""The median's second byte counted in the same read as the first: a guessed window of top bytes.

Why: the radix selection (radix.py) needs the top byte of every column's median before it can count
the second byte, and a second read of the archive costs as much as everything else together. Each
block therefore guesses, from its own top-byte histogram, which top bytes can hold the median of the
whole column (the bins around its own median, +-WINDOW_QUANTILE of its rows, at most WINDOW_BINS per
column) and counts the second byte of the values in those bins only. After the read the exact top
byte is known; where the window counts of that bin add up to its exact count (every block with
values in the bin counted them), the second byte is exact without another read. Otherwise the
column is not resolved and the analysis reads the data a second time. Never an approximation: a
guess only decides how many reads are needed.

The counts are sparse: one 256-bin row per (column, top byte) slot, keyed by column * 256 + raw top
byte, so blocks with different windows merge by key.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .radix import SUB_ROWS, TOP_ORDER

WINDOW_QUANTILE = 0.1  # the window reaches this share of the block's rows (at least) either side of its median
WINDOW_BINS = 16  # dense top-byte bins per column (a 256-count histogram each), nearest the median first
SPARSE_COUNT = 64  # a bin holding at most this many of the block's values is gathered value by value
SPARSE_VALUES = 1024  # at most this many gathered values per column and block

_NONE, _SPARSE = -1, -2


@dataclass
class WindowCounts:
    """Second-byte counts of the values in a set of (column, top byte) slots: dense slots as 256-bin
    histograms, sparse ones (the many tiny bins near zero) as the gathered second bytes."""

    keys: np.ndarray  # (S,) int64, sorted: column * 256 + raw top byte
    counts: np.ndarray  # (S, 256) int32 counts of the raw second byte (units hold < 2**31 tokens)
    sparse_keys: np.ndarray  # (G,) int32: slot key of each gathered value
    sparse_bytes: np.ndarray  # (G,) uint8: its raw second byte

    @classmethod
    def empty(cls) -> WindowCounts:
        return cls(np.zeros(0, np.int64), np.zeros((0, 256), np.int32), np.zeros(0, np.int32),
                   np.zeros(0, np.uint8))

    def merge(self, other: WindowCounts) -> WindowCounts:
        keys = np.union1d(self.keys, other.keys)
        counts = np.zeros((len(keys), 256), np.int32)
        counts[np.searchsorted(keys, self.keys)] += self.counts
        counts[np.searchsorted(keys, other.keys)] += other.counts
        return WindowCounts(keys, counts, np.concatenate([self.sparse_keys, other.sparse_keys]),
                            np.concatenate([self.sparse_bytes, other.sparse_bytes]))

    def drop_sparse(self) -> None:
        """Forget the gathered values (too many kept): columns needing them get a second read."""
        self.sparse_keys, self.sparse_bytes = self.sparse_keys[:0], self.sparse_bytes[:0]

    def second_byte(self, top: np.ndarray, expected: np.ndarray) -> np.ndarray | None:
        """Counts (d, 256) of the second byte within each column's exact top byte `top` (raw), or None
        unless every column's bin was counted in full (its counts add up to `expected`)."""
        d = len(top)
        want = np.arange(d, dtype=np.int64) * 256 + np.asarray(top, np.int64)
        counts = np.zeros((d, 256), np.int64)
        pos = np.minimum(np.searchsorted(self.keys, want), max(len(self.keys) - 1, 0))
        found = np.zeros(d, bool) if len(self.keys) == 0 else self.keys[pos] == want
        counts[found] = self.counts[pos[found]]
        hit = np.isin(self.sparse_keys, want)
        np.add.at(counts, (self.sparse_keys[hit] // 256, self.sparse_bytes[hit]), 1)
        if np.any(counts.sum(axis=1) != expected):
            return None
        return counts


def choose_window(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slot keys (column * 256 + raw top byte) around each column's median in this block: dense
    ones, and sparse ones (bins with at most SPARSE_COUNT values)."""
    d = hist.shape[0]
    ordered = hist[:, TOP_ORDER]
    cum = np.cumsum(ordered, axis=1)
    n = cum[:, -1:]
    half = (n - 1) // 2
    # small blocks estimate their median's rank less well: widen to 2 / sqrt(n) of the rows
    reach = np.ceil(np.maximum(WINDOW_QUANTILE, 2.0 / np.sqrt(np.maximum(n, 1))) * n).astype(np.int64)
    # distance of every bin from the median, in ranks: 0 for the bin holding it
    distance = np.maximum(np.maximum(cum - ordered - half, half - (cum - 1)), 0)
    never = np.iinfo(np.int64).max
    distance = np.where((ordered > 0) & (distance <= reach), distance, never)
    by_distance = np.argsort(distance, axis=1, kind="stable")
    valid = np.take_along_axis(distance, by_distance, axis=1) < never
    sizes = np.take_along_axis(ordered, by_distance, axis=1)
    dense = valid & (sizes > SPARSE_COUNT)
    sparse = valid & ~dense
    dense &= np.cumsum(dense, axis=1) <= WINDOW_BINS
    sparse &= np.cumsum(np.where(sparse, sizes, 0), axis=1) <= SPARSE_VALUES
    cols = np.broadcast_to(np.arange(d, dtype=np.int64)[:, None] * 256, by_distance.shape)
    keys = cols + TOP_ORDER[by_distance]
    return np.sort(keys[dense]), np.sort(keys[sparse])


def count_window(x: np.ndarray, window: tuple[np.ndarray, np.ndarray]) -> WindowCounts:
    """Second-byte counts of the values of block x (contiguous, float16 or float32) in the slots."""
    keys, sparse_keys = window
    n, d = x.shape
    itemsize = x.dtype.itemsize
    slot_of = np.full(d * 256, _NONE, np.int32)
    slot_of[keys] = np.arange(len(keys), dtype=np.int32)
    slot_of[sparse_keys] = _SPARSE
    counts = np.zeros(len(keys) * 256, np.int64)  # np.add.at is 10x slower into int32
    gathered_keys, gathered_bytes = [], []
    coloff = np.arange(d, dtype=np.uint32) * 256
    for start in range(0, n, SUB_ROWS):
        raw = x[start:start + SUB_ROWS].view(np.uint8).reshape(-1)
        key = np.add(raw[itemsize - 1::itemsize].reshape(-1, d), coloff, dtype=np.uint32).reshape(-1)
        slot = np.take(slot_of, key)
        hit = np.flatnonzero(slot >= 0)
        np.add.at(counts, slot[hit].astype(np.int64) * 256 + raw[hit * itemsize + (itemsize - 2)], 1)
        if len(sparse_keys):
            hit = np.flatnonzero(slot == _SPARSE)
            gathered_keys.append(key[hit].astype(np.int32))
            gathered_bytes.append(raw[hit * itemsize + (itemsize - 2)])
    if gathered_keys:
        return WindowCounts(keys, counts.astype(np.int32).reshape(-1, 256), np.concatenate(gathered_keys),
                            np.concatenate(gathered_bytes))
    return WindowCounts(keys, counts.astype(np.int32).reshape(-1, 256), np.zeros(0, np.int32),
                        np.zeros(0, np.uint8))
