"""The scan's partial result (one chunk, or several combined) and its finish for one unit (a layer
and modality): the exact outlier rule and median top byte, then whatever the scan's guesses allow.

Why a finish on the worker: the raw rows and the window counts a scan carries are only needed until
the exact outlier rule and the median's top byte are known. Finishing as soon as the unit's last
chunk is combined turns them into d x d moments and a 256-bin histogram per column, so the client
never holds more than compact statistics, whatever the number of layers in flight. The limits on
what a partial keeps (ReadConfig) are applied by `bounded`, on every partial, one chunk included.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from .activations import ActivationPartial, ActivationStats
from .config import ReadConfig
from .errors import AnalysisError
from .moments import BlockMoments, Moments, block_moments, gram_precision, merge_all
from .radix import RadixState
from .stats import OUTLIER_RULES, NormSummary, rule_outliers
from .window import WindowCounts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitFacts:
    """What a read's finish needs to know about its unit (one layer and modality)."""

    layer: int
    modality: str
    dtype: np.dtype  # stored dtype
    key_bytes: int  # significant bytes of the median's keys: 2 for float16 and bfloat16-in-float32
    sample_block: np.ndarray  # (n,) bootstrap sample block of every token
    sample_row: np.ndarray  # (n,) archive sample row of every token (for error messages)
    sample_blocks: int  # K
    rules: bool = False  # also the moments under the alternative outlier rules (stats.OUTLIER_RULES)

    def check_finite(self, norms: np.ndarray) -> None:
        bad = ~np.isfinite(norms)
        if bad.any():
            tok = int(np.flatnonzero(bad)[0])
            raise AnalysisError(f"layer {self.layer}, {self.modality}: token {tok} (sample row "
                                f"{int(self.sample_row[tok])}) holds NaN or Inf values ({int(bad.sum())} such "
                                "tokens); MIR is undefined. Exclude those samples with --samples / --where.")


@dataclass(frozen=True)
class ScanPartial:
    """The scan of consecutive rows of one unit."""

    norms: np.ndarray  # (rows,) float64
    hist: np.ndarray  # (d, 256) top-byte counts
    low_bits: bool  # a float32 value with low 16 bits set (only looked for in bfloat16 archives)
    window: WindowCounts | None  # second-byte counts in the guessed windows; None: too many kept, not known
    moments: BlockMoments  # of the sure inliers
    sure: np.ndarray  # (rows,) bool: taken as sure inliers
    raw_index: np.ndarray  # rows (in the unit) not taken as sure, kept raw ...
    raw: np.ndarray  # ... their values
    overflow: bool  # too many raw rows: dropped, the inlier moments need a second read
    config: ReadConfig
    activations: ActivationPartial  # per-value statistics (activations.py)

    def bounded(self, in_place: bool = False) -> "ScanPartial":
        """The same partial within the config's limits: what exceeds them is dropped and marked unknown.
        `in_place`: self is a lane's accumulator (absorb), whose window counts may be changed in place."""
        d, cfg = self.hist.shape[0], self.config
        window = self.window
        gathered = 0 if window is None else len(window.sparse_keys)
        if gathered > max(cfg.sparse_densify, cfg.sparse_values) * d and (gathered > window.densify_after
                                                  or gathered > cfg.sparse_kept_per_column * d):
            window = window.densified(cfg.sparse_densify, cfg.dense_slots_kept(d) - len(window.keys), in_place)
        if window is not None and len(window.sparse_keys) > cfg.sparse_kept_per_column * d:
            window = window.without_sparse()
        if window is not None and len(window.keys) > cfg.dense_slots_kept(d):
            window = None  # the chunks disagree too much: the median needs a second read
        overflow = self.overflow or self.raw.nbytes > cfg.raw_rows_bytes
        raw_index, raw = (self.raw_index[:0], self.raw[:0]) if overflow else (self.raw_index, self.raw)
        return replace(self, window=window, overflow=overflow, raw_index=raw_index, raw=raw)

    def combine(self, other: "ScanPartial") -> "ScanPartial":
        """The scan of self's rows followed by other's: row-wise fields keep their order."""
        window = None if self.window is None or other.window is None else self.window.merge(other.window)
        return self._joined(other, self.moments.combine(other.moments), window)

    def absorb(self, other: "ScanPartial") -> "ScanPartial":
        """`combine`, with the moments (the d x d part) and the window counts summed into self's: for a
        lane's own accumulator."""
        window = None
        if self.window is not None and other.window is not None:
            d = self.hist.shape[0]
            window = self.window.absorb(other.window, self.config.dense_slots_kept(d),
                                        self.config.sparse_kept_per_column * d)
        return self._joined(other, self.moments.absorb(other.moments), window, in_place=True)

    def _joined(self, other: "ScanPartial", moments: BlockMoments, window: WindowCounts | None,
                in_place: bool = False) -> "ScanPartial":
        return ScanPartial(
            np.concatenate([self.norms, other.norms]), self.hist + other.hist, self.low_bits or other.low_bits,
            window, moments, np.concatenate([self.sure, other.sure]),
            np.concatenate([self.raw_index, other.raw_index]), np.concatenate([self.raw, other.raw]),
            self.overflow or other.overflow, self.config, self.activations.combine(other.activations)).bounded(in_place)


@dataclass
class ScanOutcome:
    """What the client learns from the scan of one unit."""

    low_bits: bool
    summary: NormSummary
    outliers: np.ndarray  # (n,) bool
    norms: np.ndarray
    median: RadixState  # top byte fixed, and the second byte when the window held it
    inliers: BlockMoments | None  # None: a guess missed, a second read computes them
    activations: ActivationStats
    rules: dict | None = None  # rule -> (outliers, non-outlier moments); None: not asked, or a second read

    def apply(self, progress) -> None:
        if self.low_bits:
            log.warning("layer %s %s: the archive says bfloat16 but low 16 bits are set; using all 32 bits",
                        progress.facts.layer, progress.facts.modality)
        progress.summary, progress.outliers, progress.norms = self.summary, self.outliers, self.norms
        progress.median, progress.inliers = self.median, self.inliers
        progress.activations, progress.rules = self.activations, self.rules


def finish_scan(scan: ScanPartial, facts: UnitFacts, precision: str) -> ScanOutcome:
    """Exact outlier rule and median top byte; then the second median byte where the window held it, and
    the moments of the non-outlier rows per sample block unless a sure row is an outlier or raw rows
    were dropped."""
    norms = scan.norms
    facts.check_finite(norms)
    summary = NormSummary.of(norms)
    outliers = summary.outliers(norms)
    key_bytes = 4 if scan.low_bits else facts.key_bytes  # not bfloat16 after all: all 32 bits
    state = RadixState.start(facts.dtype, len(norms), scan.hist.shape[0], key_bytes)
    state.apply_histogram(scan.hist)
    if not state.done and scan.window is not None:
        counts = scan.window.second_byte(state.prefix & 0xFF, state.count)
        if counts is not None:
            state.apply_histogram(counts)
    # before the inlier moments below, which absorb the raw rows into the scan's own moments in place
    rules = _rule_moments(scan, facts, gram_precision(summary.maximum, precision)) if facts.rules else None
    inliers = None
    if not scan.overflow and not np.any(outliers & scan.sure):
        index, raw = scan.raw_index, scan.raw
        keep = ~outliers[index]
        products = gram_precision(summary.maximum, precision)
        inliers = scan.moments
        for block, start, stop in runs(facts.sample_block[index]):
            inliers = inliers.absorb(BlockMoments({block: block_moments(raw[start:stop], keep[start:stop],
                                                                        products)}))  # the finish owns the scan
    return ScanOutcome(scan.low_bits, summary, outliers, norms, state, inliers,
                       ActivationStats.finish(scan.activations, facts.dtype), rules)


def _rule_moments(scan: ScanPartial, facts: UnitFacts, products: str) -> dict | None:
    """Moments of the non-outlier rows of each alternative rule from the sure rows' moments and the raw rows,
    when every sure row is an inlier under that rule too; else None (a second read computes them)."""
    flags = [rule_outliers(rule, scan.norms) for rule in OUTLIER_RULES]
    if scan.overflow or any(np.any(f & scan.sure) for f in flags):
        return None
    d = scan.hist.shape[0]
    blocks = list(scan.moments.by_block.values())
    sure = merge_all(blocks, d)
    if any(sure is b for b in blocks):  # one block: a copy, since the finish then absorbs into that block
        sure = Moments(sure.n, sure.mean.copy(), sure.m2.copy())
    return {rule: (int(f.sum()), sure.merge(block_moments(scan.raw, ~f[scan.raw_index], products)))
            for rule, f in zip(OUTLIER_RULES, flags)}


def runs(ids: np.ndarray) -> tuple[tuple[int, int, int], ...]:
    """Runs (id, start, end) of equal consecutive ids."""
    if len(ids) == 0:
        return ()
    cut = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(ids)]])
    return tuple((int(ids[s]), int(s), int(e)) for s, e in zip(starts, ends))
