"""The read of a unit with fewer tokens than channels: its rows are held in memory (at most d x d
values, no more than one covariance matrix), and everything is computed from them exactly, in float64.

This is the one place that handles that case. Its statistics keep the replaced rows
(ModalityStats.rows), from which the trace term takes its token-count-sized form (frechet.py): the
covariance has rank below d there, and the rows are its exact factor.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .activations import ActivationStats, activation_partial
from .kernels import as_rows, low_bits_set, token_norms
from .moments import Moments
from .scan import UnitFacts
from .stats import OUTLIER_RULES, ModalityStats, NormSummary, rule_outliers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rows:
    """Consecutive rows of one unit, as stored."""

    rows: np.ndarray

    def combine(self, other: "Rows") -> "Rows":
        return Rows(np.concatenate([self.rows, other.rows]))


def read_rows(x) -> Rows:
    return Rows(as_rows(x).copy())


def lower_median(rows: np.ndarray) -> np.ndarray:
    """Column lower median (rank (n - 1) // 2, torch.median's rule) of rows held in memory, as float64."""
    k = (rows.shape[0] - 1) // 2
    return np.partition(rows, k, axis=0)[k].astype(np.float64)


def exact_moments(rows: np.ndarray) -> Moments:
    if len(rows) == 0:
        return Moments.empty(rows.shape[1])
    mean = rows.mean(axis=0)
    c = rows - mean
    return Moments(len(rows), mean, c.T @ c)


@dataclass
class InMemoryOutcome:
    stats: ModalityStats
    low_bits: bool

    def apply(self, progress) -> None:
        if self.low_bits:
            log.warning("layer %s %s: the archive says bfloat16 but low 16 bits are set",
                        progress.facts.layer, progress.facts.modality)
        progress.stats = self.stats


def finish_rows(part: Rows, facts: UnitFacts) -> InMemoryOutcome:
    """Every statistic of the unit from its rows: norms, the outlier rule, the column lower median, the
    per-sample-block moments of the non-outlier rows, and the rows after replacement."""
    rows = part.rows
    norms = token_norms(rows)
    facts.check_finite(norms)
    summary = NormSummary.of(norms)
    outliers = summary.outliers(norms)
    median = lower_median(rows)
    ids, k = facts.sample_block, facts.sample_blocks
    raw = rows.astype(np.float64)
    inliers = [exact_moments(raw[(ids == g) & ~outliers]) for g in range(k)]
    rules = None
    if facts.rules:
        flags = [rule_outliers(rule, norms) for rule in OUTLIER_RULES]
        rules = {rule: (int(f.sum()), exact_moments(raw[~f])) for rule, f in zip(OUTLIER_RULES, flags)}
    raw[outliers] = median
    stats = ModalityStats(summary, median, np.bincount(ids, minlength=k).astype(np.int64),
                          np.bincount(ids, weights=norms, minlength=k), np.bincount(ids[outliers], minlength=k)
                          .astype(np.int64), inliers, raw, passes=1,
                          activations=ActivationStats.finish(activation_partial(rows, norms, 0), rows.dtype),
                          rules=rules)
    check = facts.key_bytes == 2 and rows.dtype.itemsize == 4
    return InMemoryOutcome(stats, check and low_bits_set(rows))
