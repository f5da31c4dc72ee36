"""Sufficient statistics of one layer: everything MIR and the related statistics need, in raw units.

Kept per block of samples (K blocks, K = 1 without bootstrap) so a resample of blocks is a weighted
merge, not a reread. The text-centric scale a enters only at the end (FD scales by a^2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .activations import ActivationStats
from .moments import Moments, merge_all

OUTLIER_SIGMAS = 3.0
OUTLIER_RULES = ("none", "iqr")  # alternatives to the default 3-sigma rule, for --sensitivity


@dataclass
class NormSummary:
    """Token-norm statistics of all rows of one modality (before replacement), float64."""

    count: int
    mean: float
    median: float  # lower median (torch.median's rule)
    std: float  # ddof = 1
    minimum: float
    maximum: float

    @property
    def threshold(self) -> float:
        return OUTLIER_SIGMAS * self.std

    @classmethod
    def of(cls, norms: np.ndarray) -> "NormSummary":
        n = len(norms)
        median = float(np.partition(norms, (n - 1) // 2)[(n - 1) // 2])
        return cls(n, float(norms.mean()), median, float(norms.std(ddof=1)), float(norms.min()),
                   float(norms.max()))

    def outliers(self, norms: np.ndarray) -> np.ndarray:
        return np.abs(norms - self.median) > self.threshold


def iqr_outliers(norms: np.ndarray) -> np.ndarray:
    """The reference code's unused rule (mir_util.replace_outliers_with_iqr_l2): norms outside
    [Q1 - 1.5 IQR, Q3 + 1.5 IQR], quantiles linearly interpolated as torch.quantile does."""
    q1, q3 = np.quantile(norms, [0.25, 0.75])
    return (norms < q1 - 1.5 * (q3 - q1)) | (norms > q3 + 1.5 * (q3 - q1))


def rule_outliers(rule: str, norms: np.ndarray) -> np.ndarray:
    """The outlier rows of an alternative outlier rule (OUTLIER_RULES) from the token norms."""
    if rule == "none":
        return np.zeros(len(norms), bool)
    if rule == "iqr":
        return iqr_outliers(norms)
    raise ValueError(f"unknown outlier rule {rule!r}")


@dataclass
class ModalityStats:
    """One modality at one layer. Per sample block k: token count, sum of token norms, outlier
    count and the moments of the non-outlier rows; overall: the column lower median m over all rows,
    and (only when there are fewer tokens than channels) the rows after replacement."""

    norms: NormSummary
    median: np.ndarray  # (d,)
    block_tokens: np.ndarray  # (K,) int64
    block_norm_sum: np.ndarray  # (K,) float64
    block_outliers: np.ndarray  # (K,) int64
    block_inliers: list[Moments]  # K moments
    rows: np.ndarray | None = None  # (n, d) float64 replaced rows, only when n < d
    passes: int = 2  # passes over the data the exact median needed
    activations: ActivationStats | None = None  # per-value statistics: gap-vector sum, |h| median, top-k
    # per alternative outlier rule (OUTLIER_RULES): (outlier count, moments of its non-outlier rows), all
    # sample blocks merged; only when asked for (--sensitivity)
    rules: dict[str, tuple[int, Moments]] | None = None

    @property
    def d(self) -> int:
        return int(self.median.shape[0])

    @property
    def n(self) -> int:
        return int(self.block_tokens.sum())

    @property
    def n_outliers(self) -> int:
        return int(self.block_outliers.sum())

    def replaced(self, weights: np.ndarray | None = None) -> Moments:
        """Moments after outlier replacement: non-outlier rows plus n_out copies of m.
        `weights` (K,) are bootstrap multiplicities of the sample blocks."""
        if weights is None:
            inliers = merge_all(self.block_inliers, self.d)
            n_out = self.n_outliers
        else:
            inliers = weighted_merge(self.block_inliers, weights, self.d)
            n_out = int(np.dot(weights, self.block_outliers))
        return inliers.with_copies(self.median, n_out) if n_out else inliers

    def replaced_under(self, rule: str) -> Moments:
        """Moments after replacing the outliers of an alternative rule by the same column median m."""
        n_out, inliers = self.rules[rule]
        return inliers.with_copies(self.median, n_out) if n_out else inliers


def weighted_merge(blocks: list[Moments], weights: np.ndarray, d: int) -> Moments:
    """Merge of blocks taken weights[k] times each, centred on the overall mean (no cancellation)."""
    use = [(w, m) for w, m in zip(weights, blocks) if w and m.n]
    if not use:
        return Moments.empty(d)
    n = sum(int(w) * m.n for w, m in use)
    centre = merge_all([m for _, m in use], d).mean
    offsets = np.stack([m.mean - centre for _, m in use])
    counts = np.array([w * m.n for w, m in use], dtype=np.float64)
    shift = counts @ offsets / n
    m2 = np.zeros((d, d))
    for w, m in use:
        m2 += w * m.m2
    dev = (offsets - shift) * np.sqrt(counts)[:, None]
    m2 += dev.T @ dev
    return Moments(n, centre + shift, m2)


@dataclass
class LayerStats:
    layer: int
    vision: ModalityStats
    text: ModalityStats
    meta: dict = field(default_factory=dict)

    def scale(self, weights: np.ndarray | None = None) -> float:
        """Text-centric normalisation a = 1 / mean text-token norm (over all text rows)."""
        t = self.text
        if weights is None:
            return float(t.block_tokens.sum() / t.block_norm_sum.sum())
        return float(np.dot(weights, t.block_tokens) / np.dot(weights, t.block_norm_sum))

    def modality(self, name: str) -> ModalityStats:
        return self.vision if name == "vision" else self.text

    def collapsed(self) -> "LayerStats":
        """The same statistics with all sample blocks merged into one (K = 1)."""
        def one(s: ModalityStats) -> ModalityStats:
            return ModalityStats(s.norms, s.median, s.block_tokens.sum(keepdims=True),
                                 s.block_norm_sum.sum(keepdims=True), s.block_outliers.sum(keepdims=True),
                                 [merge_all(s.block_inliers, s.d)], s.rows, s.passes, s.activations, s.rules)
        return LayerStats(self.layer, one(self.vision), one(self.text), {**self.meta, "blocks": 1})
