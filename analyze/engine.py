"""The reads of the data that turn a Selection into per-layer sufficient statistics.

Most analyses read every block once (the scan, kernels.scan_block): token norms, the median's top
byte, its second byte within a guessed window, and the moments of the rows that are surely not
outliers, with the other rows kept raw. The client then knows, exactly and in memory, each
modality's norm median, std and outlier rows, checks the guesses, and finishes the moments and the
median without reading again. Where a guess missed (an outlier among the rows taken as sure, too
many raw rows, a median outside its window), a second read computes exactly what is missing for
that layer and modality. float32 archives need one or two more median-only reads. Each read is one
Dask computation over a group of layers; memory is a few blocks per worker thread plus the d x d
statistics of the layers in the group; each layer's scan is finished (scan.py) on a worker.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import dask
import numpy as np
from storage_schemas.schema import MODALITIES

from . import kernels
from .errors import AnalysisError
from .moments import Moments, gram_precision
from .radix import RadixState, merge_gathers
from .runner import Runner
from .scan import finish_scan, merge_moments, merge_scan, runs
from .stats import LayerStats, ModalityStats, NormSummary

log = logging.getLogger(__name__)
STATS_VERSION = 1


@dataclass
class Unit:
    """One modality of one layer: its Dask array (token, channel) and per-token sample blocks."""

    layer: int
    modality: str
    array: object  # dask array
    block_ids: np.ndarray  # (n,) sample block of every token
    samples: np.ndarray  # (n,) sample row of every token (for error messages)
    key_bytes: int
    state: RadixState | None = None
    norms: np.ndarray | None = None
    outliers: np.ndarray | None = None
    summary: NormSummary | None = None
    inliers: dict | None = None  # sample block -> Moments of the non-outlier rows, once known
    rows: np.ndarray | None = None  # all rows, small units only
    passes: int = 0

    @property
    def n(self) -> int:
        return int(self.array.shape[0])

    @property
    def d(self) -> int:
        return int(self.array.shape[1])

    @property
    def small(self) -> bool:
        """Fewer tokens than channels: keep the rows (at most d x d values) for the exact Gram form."""
        return self.n < self.d

    def bounds(self) -> list[tuple[int, int]]:
        edges = np.concatenate([[0], np.cumsum(self.array.chunks[0])])
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

    def blocks(self) -> list:
        return list(self.array.to_delayed().ravel())


def sample_blocks(sample_index: np.ndarray, blocks: int) -> np.ndarray:
    """First sample row of each of K blocks of consecutive selected samples."""
    k = max(1, min(int(blocks), len(sample_index)))
    return np.array([part[0] for part in np.array_split(np.asarray(sample_index), k)], dtype=np.int64)


def make_units(selection, layers: list[int], blocks: int) -> list[Unit]:
    starts = sample_blocks(selection.sample_index, blocks)
    archive = selection.archive
    bf16 = archive.source_dtype == "bfloat16" and archive.stored_dtype == "float32"
    units = []
    for m in MODALITIES:
        view = getattr(selection, m)
        rows = view["sample"].values
        ids = np.searchsorted(starts, rows, side="right") - 1
        for layer in layers:
            i = int(np.flatnonzero(selection.layers == layer)[0])
            arr = view.data[i]
            if arr.shape[0] < 2:
                raise AnalysisError(f"layer {layer}: the selection holds {arr.shape[0]} {m} token(s); at least 2 "
                                    "are needed (std and covariance use n - 1). Select more samples or another "
                                    "--text-tokens rule.")
            units.append(Unit(layer, m, arr, ids, rows, 2 if bf16 else arr.dtype.itemsize))
    return units


def _tree(items: list, combine: Callable):
    while len(items) > 1:
        items = [dask.delayed(combine, pure=True)(items[i], items[i + 1]) if i + 1 < len(items) else items[i]
                 for i in range(0, len(items), 2)]
    return items[0]


def _merge_radix(a, b):
    if a[0] == "hist":
        return ("hist", a[1] + b[1])
    return ("gather", merge_gathers([a[1], b[1]]))


def _merge_second(a: dict, b: dict) -> dict:
    out = {"moments": merge_moments(a["moments"], b["moments"])}
    if "radix" in a:
        out["radix"] = _merge_radix(a["radix"], b["radix"])
    return out


# ---------------------------------------------------------------------------- reads
def _scan(units: list[Unit], runner: Runner, precision: str) -> None:
    graph = []
    for u in units:
        check_low = u.key_bytes == 2 and u.array.dtype.itemsize == 4
        parts = []
        for blk, (a, b) in zip(u.blocks(), u.bounds()):
            groups = [] if u.small else runs(u.block_ids[a:b])
            samples = len(runs(u.samples[a:b]))
            parts.append(dask.delayed(kernels.scan_block, pure=True)(blk, a, groups, precision, u.small, check_low,
                                                                     samples))
        graph.append(dask.delayed(finish_scan, pure=True)(_tree(parts, merge_scan), u.block_ids, u.array.dtype,
                                                           u.key_bytes, precision))
    results = runner.compute(graph, "read 1: norms, median bytes, moments")
    for u, found in zip(units, results):
        u.norms = found.norms
        bad = ~np.isfinite(u.norms)
        if bad.any():
            tok = int(np.flatnonzero(bad)[0])
            raise AnalysisError(f"layer {u.layer}, {u.modality}: token {tok} (sample row {int(u.samples[tok])}) "
                                f"holds NaN or Inf values ({int(bad.sum())} such tokens); MIR is undefined. "
                                "Exclude those samples with --samples / --where.")
        if found.low_bits and u.key_bytes == 2:
            log.warning("layer %s %s: the archive says bfloat16 but low 16 bits are set; using all 32 bits",
                        u.layer, u.modality)
        u.summary, u.outliers, u.state = found.summary, found.outliers, found.state
        u.inliers, u.rows = found.inliers, found.rows
        u.passes = 1


def _second_read(units: list[Unit], runner: Runner, precision: str) -> None:
    """For the units whose scan guesses missed: exact inlier moments and/or the next median byte."""
    todo = [u for u in units if not u.small and (u.inliers is None or not u.state.done)]
    if not todo:
        return
    graph = []
    for u in todo:
        step = None if u.state.done else u.state.request()
        precision_u = gram_precision(u.summary.maximum, precision)
        parts = []
        for blk, (a, b) in zip(u.blocks(), u.bounds()):
            groups = [] if u.inliers is not None else runs(u.block_ids[a:b])
            parts.append(dask.delayed(kernels.moments_block, pure=True)(blk, u.outliers[a:b], groups, step,
                                                                        precision_u))
        graph.append(_tree(parts, _merge_second))
    log.info("a second read for %d of %d layer/modality pairs (scan guesses missed)", len(todo), len(units))
    results = runner.compute(graph, "read 2: what the first read's guesses missed")
    for u, res in zip(todo, results):
        if "radix" in res:
            _apply(u.state, res["radix"])
        if u.inliers is None:
            u.inliers = res["moments"]
        u.passes = 2


def _apply(state: RadixState, radix: tuple) -> None:
    if radix[0] == "hist":
        state.apply_histogram(radix[1])
    else:
        state.apply_gather(*radix[1])


def _median_passes(units: list[Unit], runner: Runner) -> None:
    """float32 archives only: more median bytes until every column is fixed."""
    pending = [u for u in units if not u.state.done]
    while pending:
        graph = []
        for u in pending:
            step = u.state.request()
            graph.append(_tree([dask.delayed(kernels.radix_block, pure=True)(b, step) for b in u.blocks()],
                               _merge_radix))
        for u, res in zip(pending, runner.compute(graph, "extra read: median bytes (float32 archive)")):
            _apply(u.state, res)
            u.passes += 1
        pending = [u for u in pending if not u.state.done]


# ---------------------------------------------------------------------------- assembly
def _modality_stats(u: Unit, k: int) -> ModalityStats:
    ids = u.block_ids
    tokens = np.bincount(ids, minlength=k).astype(np.int64)
    norm_sum = np.bincount(ids, weights=u.norms, minlength=k)
    outliers = np.bincount(ids[u.outliers], minlength=k).astype(np.int64)
    median = u.state.values
    rows = None
    if u.small:
        raw = u.rows.astype(np.float64)
        inliers = [_exact_moments(raw[(ids == g) & ~u.outliers]) for g in range(k)]
        raw[u.outliers] = median
        rows = raw
    else:
        inliers = [u.inliers.get(g, Moments.empty(u.d)) for g in range(k)]
    return ModalityStats(u.summary, median, tokens, norm_sum, outliers, inliers, rows, u.passes)


def _exact_moments(rows: np.ndarray) -> Moments:
    if len(rows) == 0:
        return Moments.empty(rows.shape[1])
    mean = rows.mean(axis=0)
    c = rows - mean
    return Moments(len(rows), mean, c.T @ c)


def compute_stats(selection, layers: list[int], *, blocks: int = 1, precision: str = "float32",
                  runner: Runner | None = None) -> dict[int, LayerStats]:
    """Sufficient statistics of the given layers of a selection, reading the data once when the
    scan's guesses hold, twice when they miss, and up to 4 times for true float32 archives."""
    if precision not in ("float32", "float64"):
        raise AnalysisError(f"unknown Gram precision {precision!r}; choose float32 or float64")
    runner = runner or Runner()
    units = make_units(selection, layers, blocks)
    k = len(sample_blocks(selection.sample_index, blocks))
    _scan(units, runner, precision)
    _second_read(units, runner, precision)
    _median_passes(units, runner)
    out = {}
    for layer in layers:
        v, t = (next(u for u in units if u.layer == layer and u.modality == m) for m in MODALITIES)
        out[layer] = LayerStats(layer, _modality_stats(v, k), _modality_stats(t, k),
                                {"blocks": k, "precision": precision})
    return out
