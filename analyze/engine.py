"""The passes over the data that turn a Selection into per-layer sufficient statistics.

Pass 1 reads every block once: token norms and the first byte of every column's median. The
client then knows, exactly and in memory, each modality's norm median, std and outlier rows.
Pass 2 reads every block again: moments of the non-outlier rows per block of samples, and the
second median byte (which completes it for float16 and bfloat16 archives). float32 archives need
one or two more median-only passes. Each pass is one Dask computation over a group of layers;
memory is a few blocks per worker thread plus the d x d statistics of the layers in the group.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import dask
import numpy as np

from . import kernels
from .errors import AnalysisError
from .moments import Moments
from .radix import RadixState, merge_gathers
from .runner import Runner
from .stats import LayerStats, ModalityStats, NormSummary

log = logging.getLogger(__name__)
MODALITIES = ("vision", "text")
STATS_VERSION = 1
FLOAT32_SAFE_NORM = 1e15


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
    result: dict | None = None
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


def _groups(ids: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs (block id, start, end) of equal consecutive ids."""
    if len(ids) == 0:
        return []
    cut = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(ids)]])
    return [(int(ids[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def _tree(items: list, combine: Callable):
    while len(items) > 1:
        items = [dask.delayed(combine, pure=True)(items[i], items[i + 1]) if i + 1 < len(items) else items[i]
                 for i in range(0, len(items), 2)]
    return items[0]


def _field(result: dict, name: str):
    return result.get(name, False)


def _add(a, b):
    return a + b


def _any(a, b):
    return a or b


def _merge_radix(a, b):
    if a[0] == "hist":
        return ("hist", a[1] + b[1])
    return ("gather", merge_gathers([a[1], b[1]]))


def _merge_pass2(a: dict, b: dict) -> dict:
    out = {}
    moments = dict(a["moments"])
    for gid, m in b["moments"].items():
        moments[gid] = moments[gid].merge(m) if gid in moments else m
    out["moments"] = moments
    if "radix" in a:
        out["radix"] = _merge_radix(a["radix"], b["radix"])
    if "rows" in a:
        out["rows"] = np.concatenate([a["rows"], b["rows"]])
    return out


# ---------------------------------------------------------------------------- passes
def _pass1(units: list[Unit], runner: Runner) -> None:
    graph = []
    for u in units:
        scans = [dask.delayed(kernels.scan_block, pure=True)(b, u.key_bytes == 2 and u.array.dtype.itemsize == 4)
                 for b in u.blocks()]
        norms = [dask.delayed(_field, pure=True)(s, "norms") for s in scans]
        hist = _tree([dask.delayed(_field, pure=True)(s, "hist") for s in scans], _add)
        low = _tree([dask.delayed(_field, pure=True)(s, "low_bits") for s in scans], _any)
        graph.append((norms, hist, low))
    results = runner.compute(graph, "pass 1/2: token norms and first median byte")
    for u, (norms, hist, low) in zip(units, results):
        u.norms = np.concatenate(norms)
        bad = ~np.isfinite(u.norms)
        if bad.any():
            tok = int(np.flatnonzero(bad)[0])
            raise AnalysisError(f"layer {u.layer}, {u.modality}: token {tok} (sample row {int(u.samples[tok])}) "
                                f"holds NaN or Inf values ({int(bad.sum())} such tokens); MIR is undefined. "
                                "Exclude those samples with --samples / --where.")
        if low and u.key_bytes == 2:
            log.warning("layer %s %s: the archive says bfloat16 but low 16 bits are set; using all 32 bits",
                        u.layer, u.modality)
            u.key_bytes = 4
        u.summary = NormSummary.of(u.norms)
        u.outliers = u.summary.outliers(u.norms)
        u.state = RadixState.start(u.array.dtype, u.n, u.d, u.key_bytes)
        u.state.apply_histogram(hist)
        u.passes = 1


def _pass2(units: list[Unit], runner: Runner, precision: str) -> None:
    graph = []
    for u in units:
        step = None if u.state.done else u.state.request()
        # float32 products would overflow beyond ~1e19 per value: such data gets float64 products
        precision_u = "float64" if u.summary.maximum > FLOAT32_SAFE_NORM else precision
        parts = []
        for blk, (a, b) in zip(u.blocks(), u.bounds()):
            groups = [] if u.small else _groups(u.block_ids[a:b])
            parts.append(dask.delayed(kernels.moments_block, pure=True)(
                blk, u.outliers[a:b], groups, step, precision_u, u.small))
        graph.append(_tree(parts, _merge_pass2))
    label = "pass 2/2: moments of non-outlier tokens" + (", median bytes" if any(not u.state.done for u in units)
                                                         else "")
    results = runner.compute(graph, label)
    for u, res in zip(units, results):
        if "radix" in res:
            _apply(u.state, res["radix"])
        u.result = res
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
        for u, res in zip(pending, runner.compute(graph, "extra pass: median bytes (float32 archive)")):
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
        raw = u.result["rows"].astype(np.float64)
        inliers = [_exact_moments(raw[(ids == g) & ~u.outliers]) for g in range(k)]
        raw[u.outliers] = median
        rows = raw
    else:
        found = u.result["moments"]
        inliers = [found.get(g, Moments.empty(u.d)) for g in range(k)]
    return ModalityStats(u.summary, median, tokens, norm_sum, outliers, inliers, rows, u.passes)


def _exact_moments(rows: np.ndarray) -> Moments:
    if len(rows) == 0:
        return Moments.empty(rows.shape[1])
    mean = rows.mean(axis=0)
    c = rows - mean
    return Moments(len(rows), mean, c.T @ c)


def compute_stats(selection, layers: list[int], *, blocks: int = 1, precision: str = "float32",
                  runner: Runner | None = None) -> dict[int, LayerStats]:
    """Sufficient statistics of the given layers of a selection, reading the data 2 times
    (float16 / bfloat16) or up to 4 times (float32)."""
    if precision not in ("float32", "float64"):
        raise AnalysisError(f"unknown Gram precision {precision!r}; choose float32 or float64")
    runner = runner or Runner()
    units = make_units(selection, layers, blocks)
    k = len(sample_blocks(selection.sample_index, blocks))
    _pass1(units, runner)
    _pass2(units, runner, precision)
    _median_passes(units, runner)
    out = {}
    for layer in layers:
        v, t = (next(u for u in units if u.layer == layer and u.modality == m) for m in MODALITIES)
        out[layer] = LayerStats(layer, _modality_stats(v, k), _modality_stats(t, k),
                                {"blocks": k, "precision": precision})
    return out
