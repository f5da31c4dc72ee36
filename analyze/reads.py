"""The reads of the data, each declared as a reducer over the chunks of one unit (a layer and
modality), in the spirit of Dask's chunk / combine / aggregate:

* `map(x, chunk) -> partial` on every chunk (a Dask task each, kernels.py); optionally
  `fold(accumulator, x, chunk)`, the same as absorbing map's partial, computed into the accumulator;
* `partial.combine(other) -> partial`, associative, tree-combined in the graph;
* `finish(partial, facts) -> outcome`, always run (one chunk included), on a worker;
* `outcome.apply(progress)` on the client: what the unit now knows.

`Progress.next_read` says which read a unit needs next, from what it knows; compute_stats (engine.py)
runs them until no unit needs one. Adding a statistic that needs the data means adding a read here
(or a field to a partial) and its use in `Progress.statistics`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import kernels
from .activations import ActivationStats
from .config import ReadConfig
from .inmemory import finish_rows, read_rows
from .kernels import Chunk
from .moments import BlockMoments, gram_precision
from .radix import DigitRead, GatherRead, RadixState
from .scan import ScanOutcome, UnitFacts, finish_scan
from .stats import OUTLIER_RULES, ModalityStats, NormSummary, rule_outliers


@dataclass(frozen=True)
class ScanRead:
    """The one read most units need (kernels.scan_chunk, scan.finish_scan)."""

    precision: str
    config: ReadConfig
    check_low_bits: bool
    label = "norms, median bytes, moments"

    def map(self, x, chunk: Chunk):
        return kernels.scan_chunk(x, chunk, self.precision, self.config, self.check_low_bits)

    def fold(self, accumulator, x, chunk: Chunk):
        """map and absorb in one, the chunk's rows added into the accumulator's moments: no d x d per chunk."""
        partial = kernels.scan_chunk(x, chunk, self.precision, self.config, self.check_low_bits, accumulator.moments)
        return accumulator.absorb(partial)

    def finish(self, partial, facts: UnitFacts) -> ScanOutcome:
        return finish_scan(partial, facts, self.precision)


@dataclass(frozen=True)
class InMemoryRead:
    """Fewer tokens than channels: the rows themselves (inmemory.py)."""

    label = "rows (fewer tokens than channels)"

    def map(self, x, chunk: Chunk):
        return read_rows(x)

    def finish(self, partial, facts: UnitFacts):
        return finish_rows(partial, facts)


@dataclass(frozen=True)
class InlierMomentsRead:
    """Moments of the exact non-outlier rows per sample block, when the scan's guesses missed."""

    precision: str
    label = "inlier moments"

    def map(self, x, chunk: Chunk) -> BlockMoments:
        return kernels.inlier_moments(x, chunk, self.precision)

    def fold(self, accumulator: BlockMoments, x, chunk: Chunk) -> BlockMoments:
        return kernels.inlier_moments(x, chunk, self.precision, accumulator)

    def finish(self, partial: BlockMoments, facts: UnitFacts) -> BlockMoments:
        return partial


@dataclass(frozen=True)
class RuleMoments:
    """Moments of the non-outlier rows of each alternative outlier rule: the outcome of RuleMomentsRead."""

    parts: tuple  # Moments per rule, in stats.OUTLIER_RULES order

    def combine(self, other: "RuleMoments") -> "RuleMoments":
        return RuleMoments(tuple(a.merge(b) for a, b in zip(self.parts, other.parts)))

    def apply(self, progress) -> None:
        flags = progress.rule_flags()
        progress.rules = {rule: (int(f.sum()), m) for rule, f, m in zip(OUTLIER_RULES, flags, self.parts)}


@dataclass(frozen=True)
class RuleMomentsRead:
    """The alternative outlier rules' moments, when the scan's sure rows did not cover them (--sensitivity)."""

    precision: str
    label = "moments under other outlier rules"

    def map(self, x, chunk: Chunk) -> RuleMoments:
        return RuleMoments(kernels.rule_moments(x, chunk, self.precision))

    def fold(self, accumulator: RuleMoments, x, chunk: Chunk) -> RuleMoments:
        return RuleMoments(kernels.rule_moments(x, chunk, self.precision, accumulator.parts))

    def finish(self, partial: RuleMoments, facts: UnitFacts) -> RuleMoments:
        return partial


@dataclass(frozen=True)
class MedianOutcome:
    counts: object  # radix.DigitCounts | radix.Candidates

    def apply(self, progress) -> None:
        self.counts.apply_to(progress.median)


@dataclass(frozen=True)
class MedianRead:
    """The next digit (or the last candidates) of every column's lower median (radix.py)."""

    step: DigitRead | GatherRead
    label = "median bytes"

    def map(self, x, chunk: Chunk):
        return self.step.map(kernels.as_rows(x))

    def finish(self, partial, facts: UnitFacts) -> MedianOutcome:
        return MedianOutcome(partial)


@dataclass(frozen=True)
class Together:
    """Several partials of one pass over the same chunks."""

    parts: tuple

    def combine(self, other: "Together") -> "Together":
        return Together(tuple(a.combine(b) for a, b in zip(self.parts, other.parts)))

    def absorb(self, other: "Together") -> "Together":
        return Together(tuple(absorb(a, b) for a, b in zip(self.parts, other.parts)))

    def apply(self, progress) -> None:
        for outcome in self.parts:
            outcome.apply(progress)


def absorb(accumulator, partial):
    """accumulator.combine(partial), in place where the partial type allows it (its d x d moments):
    only for an accumulator nothing else holds, a lane's (engine.py)."""
    fold = getattr(accumulator, "absorb", None)
    return fold(partial) if fold is not None else accumulator.combine(partial)


@dataclass(frozen=True)
class Fused:
    """Several reads done in one pass over the data."""

    reads: tuple

    @property
    def label(self) -> str:
        return " + ".join(r.label for r in self.reads)

    def map(self, x, chunk: Chunk) -> Together:
        x = kernels.as_rows(x)
        return Together(tuple(r.map(x, chunk) for r in self.reads))

    def fold(self, accumulator: Together, x, chunk: Chunk) -> Together:
        x = kernels.as_rows(x)
        return Together(tuple(r.fold(a, x, chunk) if hasattr(r, "fold") else absorb(a, r.map(x, chunk))
                              for r, a in zip(self.reads, accumulator.parts)))

    def finish(self, partial: Together, facts: UnitFacts) -> Together:
        return Together(tuple(r.finish(p, facts) for r, p in zip(self.reads, partial.parts)))


@dataclass
class Progress:
    """What is known about one unit so far; each field is None until the read that sets it is applied."""

    facts: UnitFacts
    small: bool  # fewer tokens than channels: one in-memory read gives everything
    passes: int = 0
    stats: ModalityStats | None = None  # set by the in-memory read, which gives everything at once
    summary: NormSummary | None = None
    outliers: np.ndarray | None = None
    norms: np.ndarray | None = field(default=None, repr=False)
    median: RadixState | None = None
    inliers: BlockMoments | None = None
    activations: ActivationStats | None = None
    rules: dict | None = None  # asked for by facts.rules
    flags: list | None = field(default=None, repr=False)  # the alternative rules' outlier rows, once known

    def next_read(self, precision: str, config: ReadConfig):
        """The read this unit needs next, or None when its statistics are complete."""
        if self.stats is not None:
            return None
        if self.summary is None:
            if self.small:
                return InMemoryRead()
            check = self.facts.key_bytes == 2 and np.dtype(self.facts.dtype).itemsize == 4
            return ScanRead(precision, config, check)
        reads = []
        if self.inliers is None:
            reads.append(InlierMomentsRead(gram_precision(self.summary.maximum, precision)))
        if self.facts.rules and self.rules is None:
            reads.append(RuleMomentsRead(gram_precision(self.summary.maximum, precision)))
        if not self.median.done:
            reads.append(MedianRead(self.median.next_read(config.gather_budget)))
        if not reads:
            return None
        return reads[0] if len(reads) == 1 else Fused(tuple(reads))

    def chunk_outliers(self, start: int, stop: int) -> np.ndarray | None:
        return None if self.outliers is None else self.outliers[start:stop]

    def rule_flags(self) -> list[np.ndarray]:
        if self.flags is None:
            self.flags = [rule_outliers(rule, self.norms) for rule in OUTLIER_RULES]
        return self.flags

    def chunk_rule_outliers(self, start: int, stop: int) -> tuple[np.ndarray, ...] | None:
        if not self.facts.rules or self.norms is None or self.rules is not None:
            return None
        return tuple(f[start:stop] for f in self.rule_flags())

    def statistics(self) -> ModalityStats:
        """The unit's sufficient statistics, once every read it needed is applied."""
        if self.stats is not None:
            return self.stats
        ids, k = self.facts.sample_block, self.facts.sample_blocks
        d = len(self.median.values)
        return ModalityStats(self.summary, self.median.values, np.bincount(ids, minlength=k).astype(np.int64),
                             np.bincount(ids, weights=self.norms, minlength=k),
                             np.bincount(ids[self.outliers], minlength=k).astype(np.int64),
                             [self.inliers.of_block(g, d) for g in range(k)], None, self.passes, self.activations,
                             self.rules)
