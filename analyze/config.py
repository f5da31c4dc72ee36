"""The settings of the reads: how much the one-read scan guesses and keeps before it gives up and
lets a second read compute exactly what is missing.

None of them changes a result (every guess is checked; a miss costs a read, never exactness): they
trade memory for reads. Passed explicitly (compute_stats(..., config=...)) so a test or a user can
force every fallback path without touching module state.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReadConfig:
    # scan, moments: rows whose norm lies within this block's median +- inlier_spreads robust spreads are
    # taken as sure inliers (the outlier rule keeps 3 std; 2 robust spreads of one block is well inside it)
    inlier_spreads: float = 2.0
    raw_rows_bytes: int = 64 * 2**20  # other rows kept raw per layer and modality; beyond that: a second read
    # scan, median window (window.py): the second median byte counted in the first read
    window_quantile: float = 0.2  # the window reaches this share of a block's rows either side of its median
    window_bins: int = 32  # dense top-byte bins (a quarter octave each) per column at most
    rows_per_bin: int = 512  # ... and at most one per 512 rows: a block's counts stay within ~1/4 of its size
    sparse_count: int = 64  # a bin holding at most this many of a block's values is gathered value by value
    sparse_values: int = 1024  # values gathered per column and block at most
    sparse_densify: int = 256  # a key gathered this often (5 B each) is folded into a 1 KiB row of counts
    sparse_kept_per_column: int = 8192  # gathered values kept per column of a layer and modality; beyond: read 2
    dense_slots_per_column: int = 64  # window histograms kept per column (blocks' windows differ a little)
    dense_slots_bytes: int = 128 * 2**20  # ... and in all, unless 16 per column need more
    # median passes (radix.py): candidates over all columns of one unit selected in memory instead of counted
    gather_budget: int = 2_000_000

    def dense_slots_kept(self, d: int) -> int:
        """Window histograms (1 KiB each) a layer and modality may keep: dense_slots_per_column per column,
        at most dense_slots_bytes unless that leaves fewer than 16 per column (large d)."""
        return min(self.dense_slots_per_column * d, max(16 * d, self.dense_slots_bytes // 1024))


DEFAULT = ReadConfig()
