"""Mergeable first and second moments (count, mean, centred scatter), float64.

Why this form: blocks are reduced independently (Dask tasks, blocks of samples for the bootstrap)
and merged pairwise with the Chan–Golub–LeVeque update, which never subtracts two large
uncentred sums, so the large means of LLM hidden states cannot cancel away the covariance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_GRAM_BYTES = 32 * 2**20  # float32 rows converted at once for one Gram product (memory.chunk_working)
FLOAT32_SAFE_NORM = 1e15  # float32 products would overflow beyond ~1e19 per value: float64 above
SHIFT_ROWS = 256  # rows whose mean centres a block: any value near the mean keeps float32 products accurate
OUTER_ROWS = 256  # rows of a rank-one update done at once: no d x d temporary (memory.py counts none)


def add_outer(m2: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """m2 += outer(x, y) in place, a band of rows at a time: the same values as `m2 + np.outer(x, y)`
    without its d x d temporary (at d = 8192 that is 512 MiB)."""
    for start in range(0, len(x), OUTER_ROWS):
        m2[start:start + OUTER_ROWS] += np.outer(x[start:start + OUTER_ROWS], y)
    return m2


@dataclass
class Moments:
    """n rows; their mean; M2 = sum_i (x_i - mean)(x_i - mean)^T."""

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, d: int) -> "Moments":
        return cls(0, np.zeros(d), np.zeros((d, d)))

    def merge(self, other: "Moments") -> "Moments":
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        return Moments(self.n, self.mean, self.m2.copy()).absorb(other)  # self's arrays stay as they are

    def absorb(self, other: "Moments") -> "Moments":
        """The merge, computed into self's arrays (a lane's own accumulator: engine.py): no new d x d."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.n / n)
        self.m2 += other.m2
        add_outer(self.m2, delta, delta * (self.n * other.n / n))
        self.n = n
        return self

    def with_copies(self, value: np.ndarray, count: int) -> "Moments":
        """These moments plus `count` rows equal to `value` (outlier rows replaced by the median)."""
        count = int(count)
        if count == 0:
            return self
        value = np.asarray(value, np.float64)
        if self.n == 0:
            return Moments(count, value.copy(), np.zeros_like(self.m2))
        n = self.n + count
        delta = value - self.mean
        return Moments(n, self.mean + delta * (count / n), add_outer(self.m2.copy(), delta,
                                                                     delta * (self.n * count / n)))

    def covariance(self, scale: float = 1.0) -> np.ndarray:
        """M2 / (n - 1), times `scale` twice (the text-centric a: a^2 C), in one new array."""
        out = np.divide(self.m2, self.n - 1)
        if scale != 1.0:
            out *= scale
            out *= scale
        return out


def merge_all(items: list[Moments], d: int) -> Moments:
    """Pairwise (tree) merge, so rounding grows with log(len(items)) only."""
    items = [m for m in items if m.n] or [Moments.empty(d)]
    while len(items) > 1:
        items = [items[i].merge(items[i + 1]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]


def gram_precision(max_norm: float, precision: str) -> str:
    """The products' precision: float64 where float32 products could overflow, else as asked."""
    return "float64" if max_norm > FLOAT32_SAFE_NORM else precision


def gram_rows(d: int) -> int:
    """Rows per Gram product: big enough for BLAS efficiency, small enough for cache and float32 error."""
    return int(np.clip(MAX_GRAM_BYTES // (4 * d), 1024, 16384))


def block_moments(x: np.ndarray, keep: np.ndarray, precision: str = "float32", convert=None,
                  into: Moments | None = None) -> Moments:
    """Moments of the rows of x (stored dtype) where `keep` is True; with `into`, of its rows and these,
    computed into its arrays (a lane's accumulator, engine.py: no d x d scatter per chunk).

    Rows are shifted by c (the mean of the first kept rows, or into's mean: any close value works), so
    the products see centred data; Gram products of up to gram_rows(d) rows run in `precision` (float32
    meets the 1e-5 contract on centred data and is twice as fast) and are accumulated in float64; the
    exact mean and scatter follow from the shifted sums: mean = c + S/n, M2 = G - S S^T / n, where G
    starts at into's M2 (its rows' scatter about c = its mean) and n counts into's rows too.
    `convert(rows, shift, keep, out)` replaces the numpy conversion of a step of rows with the same
    values computed faster (fused.convert).
    """
    n_rows, d = x.shape
    n = int(np.count_nonzero(keep))
    if n == 0:
        return Moments.empty(d) if into is None else into
    work = np.float32 if precision == "float32" else np.float64
    step = gram_rows(d)
    if into is not None and into.n:  # into's rows about c: sum n (mean - c), scatter M2 + n (mean - c)(mean - c)^T
        shift = into.mean.astype(work)
        offset = into.mean - shift.astype(np.float64)  # float32 rounding of the mean (exactly 0 in float64)
        total, gram = into.n * offset, add_outer(into.m2, offset, into.n * offset) if offset.any() else into.m2
        n += into.n
    else:
        first = np.flatnonzero(keep)[:SHIFT_ROWS]
        shift = x[first].astype(np.float64).mean(axis=0).astype(work)
        total, gram = np.zeros(d), np.zeros((d, d))
    ones = np.ones(step, dtype=work)
    buffer = np.empty((min(step, n_rows), d), work) if convert is not None else None
    for start in range(0, n_rows, step):
        k = keep[start:start + step]
        if not k.any():
            continue
        if convert is not None:
            y = convert(x[start:start + step], shift, k, buffer)
        else:
            y = np.subtract(x[start:start + step], shift, dtype=work)
            if not k.all():
                y[~k] = 0
        total += ones[:len(y)] @ y  # sums of centred values: small, so BLAS precision suffices
        gram += y.T @ y
    mean = shift.astype(np.float64) + total / n
    return Moments(n, mean, add_outer(gram, total, -(total / n)))


@dataclass(frozen=True)
class BlockMoments:
    """Moments per bootstrap sample block (id -> Moments) of some rows: what a read of the moments
    returns. Combines block by block, in any order and grouping (Moments.merge is associative up to
    rounding)."""

    by_block: dict[int, Moments]

    @classmethod
    def none(cls) -> "BlockMoments":
        return cls({})

    def combine(self, other: "BlockMoments") -> "BlockMoments":
        out = dict(self.by_block)
        for k, m in other.by_block.items():
            out[k] = out[k].merge(m) if k in out else m
        return BlockMoments(out)

    def absorb(self, other: "BlockMoments") -> "BlockMoments":
        """The combination, into self's own moments (a lane's accumulator)."""
        for k, m in other.by_block.items():
            self.by_block[k] = self.by_block[k].absorb(m) if k in self.by_block else m
        return self

    def of_block(self, k: int, d: int) -> Moments:
        return self.by_block.get(k, Moments.empty(d))

    def apply(self, progress) -> None:
        """As a read's outcome: the exact moments of the non-outlier rows."""
        progress.inliers = self
