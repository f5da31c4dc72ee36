"""Turning a Selection into per-layer sufficient statistics: the reads (reads.py) run as one loop.

Every unit (one modality of one layer) says which read it needs next; each round builds one Dask
graph with, per unit, its read folded over its chunks in a few lanes (one task each: chunks read
in order, each folded into the lane's one accumulator), the lanes tree-combined and finished on a
worker, and applies the outcomes on the client. Most units need one read (the scan): its guesses hold and the
unit is complete. Where a guess missed (an outlier among the rows taken as sure, too many raw rows,
a median outside its window), a second read computes exactly what is missing; true float32 archives
need one or two more median-only reads.

Why lanes: with one task per chunk Dask may run (and read) many chunks before combining, each holding
a d x d scatter (128 MiB at d = 4096), so memory grew with the chunk count. A lane reads its chunk only
when it reaches it and holds one accumulator, so memory is lanes x (accumulator + one chunk in
flight) whatever the number of chunks (memory.py); the lanes chosen change results only by rounding.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import dask
import numpy as np
from storage_schemas.schema import MODALITIES, TextRole

from .config import DEFAULT, ReadConfig
from .errors import AnalysisError
from .kernels import Chunk
from .memory import return_freed_memory
from .reads import Progress, absorb
from .runner import Runner
from .scan import UnitFacts, runs
from .stats import LayerStats

log = logging.getLogger(__name__)
STATS_VERSION = 2  # 2: per-value statistics (activations.py: gap-vector sum, |h| median, top-k)


@dataclass
class Unit:
    """One modality of one layer: its Dask array (token, channel), chunked as stored, and its progress."""

    array: object  # dask array
    progress: Progress

    @property
    def facts(self) -> UnitFacts:
        return self.progress.facts

    def chunks(self) -> list[tuple[object, Chunk]]:
        """(delayed chunk, its Chunk) per storage chunk, with what is known about its rows now."""
        edges = np.concatenate([[0], np.cumsum(self.array.chunks[0])]).astype(int)
        out = []
        for x, a, b in zip(self.array.to_delayed().ravel(), edges[:-1], edges[1:]):
            f = self.facts
            chunk = Chunk(int(a), int(b), () if self.progress.small else runs(f.sample_block[a:b]),
                          len(runs(f.sample_row[a:b])), self.progress.chunk_outliers(a, b),
                          self.progress.chunk_rule_outliers(a, b))
            out.append((x, chunk))
        return out


GROUP_SEED = 0  # the permutation that assigns samples to groups: fixed, so a cache entry names its grouping


def sample_groups(sample_index: np.ndarray, groups: int, seed: int = GROUP_SEED) -> tuple[np.ndarray, int]:
    """The group (0..K-1) of each selected sample, by position in the selection, and K: a seeded permutation
    of the samples cut into K near-equal parts, so that groups do not follow the archive's order (archives
    are often sorted by source or length)."""
    n = len(sample_index)
    k = max(1, min(int(groups), n))
    group = np.empty(n, np.int64)
    group[np.random.default_rng(seed).permutation(n)] = np.arange(n) * k // n
    return group, k


def group_of_samples(selection, blocks: int) -> np.ndarray:
    """The group of each selected sample (all 0 for one block)."""
    index = np.asarray(selection.sample_index, np.int64)
    return sample_groups(index, blocks)[0] if blocks > 1 else np.zeros(len(index), np.int64)


def make_units(selection, layers: list[int], blocks: int, rules: bool = False) -> list[Unit]:
    index = np.asarray(selection.sample_index, np.int64)
    group = group_of_samples(selection, blocks)
    k = int(group.max()) + 1
    position = np.full(int(index.max()) + 1, -1, np.int64)
    position[index] = np.arange(len(index))
    archive = selection.archive
    bf16 = archive.source_dtype == "bfloat16" and archive.stored_dtype == "float32"
    units = []
    for m in MODALITIES:
        view = getattr(selection, m)
        rows = view["sample"].values
        ids = group[position[np.asarray(rows, np.int64)]]
        for layer in layers:
            i = int(np.flatnonzero(selection.layers == layer)[0])
            arr = view.data[i]
            if arr.shape[0] < 2:
                raise AnalysisError(f"layer {layer}: the selection holds {arr.shape[0]} {m} token(s); at least 2 "
                                    "are needed (std and covariance use n - 1). Select more samples or another "
                                    "--text-tokens rule.")
            facts = UnitFacts(int(layer), m, np.dtype(arr.dtype), 2 if bf16 else arr.dtype.itemsize, ids, rows,
                              k, rules)
            units.append(Unit(arr, Progress(facts, small=arr.shape[0] < arr.shape[1])))
    return units


class ChunkStash:
    """Chunks a read keeps for a later read of the same layers, so that their data is decoded once: the
    scan fills it, the bootstrap's influence read empties it (analyze_selection makes one only when the
    batch's stored bytes fit the memory budget beside the plan's peak, and only on local threads, where a
    plain object is shared by reference)."""

    def __init__(self):
        self.chunks: dict = {}

    def __dask_tokenize__(self):
        return ("mir-chunk-stash", id(self))


class LazyChunk:
    """A storage chunk that its lane reads when it reaches it: hidden from Dask (a plain object, not a
    collection), so the graph has no read tasks that the scheduler could run ahead of the folds. With a
    `stash`: `keep` (the scan) looks there first and puts what it reads there; otherwise (the read that
    empties it) a chunk found there is taken out of it, and one read is not kept."""

    def __init__(self, chunk, stash: ChunkStash | None = None, keep: bool = True):  # chunk: a dask Delayed
        self.chunk = chunk
        self.stash = stash
        self.keep = keep

    def load(self) -> np.ndarray:
        if self.stash is not None:
            chunks = self.stash.chunks
            kept = chunks.get(self.chunk.key) if self.keep else chunks.pop(self.chunk.key, None)
            if kept is not None:
                return kept
        x = np.asarray(self.chunk.compute(scheduler="sync"))
        if self.stash is not None and self.keep:
            x.flags.writeable = False  # shared with the later read: no pass may change it
            self.stash.chunks[self.chunk.key] = x
        return x

    def __dask_tokenize__(self):
        return ("mir-lazy-chunk", self.chunk.key)


def fold_lane(read, items: list[tuple[LazyChunk, Chunk]]):
    """One lane: its chunks read in order, each mapped and folded into one accumulator (by the read's
    `fold` where it has one: the chunk's Gram products go straight into the accumulator's scatter)."""
    return_freed_memory()  # also in a dask.distributed worker's process
    accumulator = None
    fold = getattr(read, "fold", None)
    for lazy, chunk in items:
        x = lazy.load()
        if accumulator is None:
            accumulator = read.map(x, chunk)
        elif fold is not None:
            accumulator = fold(accumulator, x, chunk)
        else:
            accumulator = absorb(accumulator, read.map(x, chunk))
        del x  # before the next chunk is loaded: one chunk in flight per lane, not two
    return accumulator


def lanes_of(items: list, lanes: int) -> list[list]:
    """Consecutive runs of a unit's chunks, one per lane (rows stay in order within and across lanes)."""
    lanes = max(1, min(int(lanes), len(items)))
    bounds = np.linspace(0, len(items), lanes + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def unit_graph(unit: Unit, read, lanes: int, stash: ChunkStash | None = None):
    """The delayed outcome of `read` on one unit: lanes folded, tree-combined, finished."""
    parts = [dask.delayed(fold_lane, pure=True)(read, [(LazyChunk(x, stash), c) for x, c in run])
             for run in lanes_of(unit.chunks(), lanes)]
    return dask.delayed(read.finish, pure=True)(tree_combine(parts), unit.facts)


def tree_combine(items: list):
    """Pairwise combination of partials in the graph (depth log2 of the chunk count)."""
    while len(items) > 1:
        items = [dask.delayed(_combine, pure=True)(items[i], items[i + 1]) if i + 1 < len(items) else items[i]
                 for i in range(0, len(items), 2)]
    return items[0]


def _combine(a, b):
    return a.combine(b)


def compute_stats(selection, layers: list[int], *, blocks: int = 1, precision: str = "float32",
                  runner: Runner | None = None, config: ReadConfig = DEFAULT, lanes: int = 1,
                  rules: bool = False, stash: ChunkStash | None = None) -> dict[int, LayerStats]:
    """Sufficient statistics of the given layers of a selection, reading the data once when the
    scan's guesses hold, twice when they miss, and up to 4 times for true float32 archives.
    `lanes`: accumulators per unit (memory.plan chooses them; results differ only by rounding).
    `blocks` K > 1 keeps them per group of samples (sample_groups); `rules` adds the moments under the
    alternative outlier rules (stats.OUTLIER_RULES). `stash`: where the chunks read are kept (ChunkStash)."""
    if precision not in ("float32", "float64"):
        raise AnalysisError(f"unknown Gram precision {precision!r}; choose float32 or float64")
    runner = runner or Runner()
    units = make_units(selection, layers, blocks, rules)
    round_ = 0
    while True:
        pending = [(u, read) for u in units if (read := u.progress.next_read(precision, config)) is not None]
        if not pending:
            break
        round_ += 1
        graph = [unit_graph(u, read, lanes, stash) for u, read in pending]
        labels = sorted({read.label for _, read in pending})
        if round_ > 1:
            log.info("read %d for %d of %d layer/modality pairs (%s)", round_, len(pending), len(units),
                     "; ".join(labels))
        for (u, _), outcome in zip(pending, runner.compute(graph, f"read {round_}: {'; '.join(labels)}")):
            outcome.apply(u.progress)
            u.progress.passes += 1
    out = {}
    labels = {m: token_labels(selection, m) for m in MODALITIES}
    for layer in layers:
        v, t = (next(u for u in units if u.facts.layer == layer and u.facts.modality == m) for m in MODALITIES)
        meta = {"blocks": v.facts.sample_blocks, "precision": precision}
        if v.facts.sample_blocks > 1:
            meta["group_samples"] = np.bincount(group_of_samples(selection, blocks)).tolist()
        out[layer] = LayerStats(layer, v.progress.statistics(), t.progress.statistics(), meta)
        for m in MODALITIES:
            out[layer].modality(m).activations.label_rows(*labels[m])
    return out


def token_labels(selection, modality: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token of a modality's selection: its sample id, position in the prompt, and role name."""
    view = getattr(selection, modality)
    ids = selection.archive.samples.sample_id.values[view["sample"].values]
    if modality == "vision":
        roles = np.full(len(ids), "image")
    else:
        names = np.array([r.name.lower() for r in TextRole])
        roles = names[view["role"].values.astype(np.int64)]
    return ids, view["position"].values, roles
