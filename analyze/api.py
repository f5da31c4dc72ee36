"""`analyze_selection`: MIR and the related statistics of a Selection, with cache and bootstrap.

Layers are processed in batches sized to the memory budget (memory.py: refused before any read when
even one layer does not fit): for each batch the sufficient
statistics are read from the cache or computed (engine), written to the cache, turned into numbers
and, for the bootstrap, into per-sample influence values (one more read of the batch's layers unless
cached; influence.py); then dropped. So memory holds one batch's d x d statistics, however many layers
and samples there are, and the bootstrap keeps N values per layer.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from storage_schemas import MODALITIES, open_archive
from storage_schemas.prefetch import prefetch

from . import bootstrap as boot
from .cache import StatsCache
from .config import ReadConfig
from .dataset import AnalysisResult, result_attrs, to_dataset
from .engine import GROUP_SEED, STATS_VERSION, ChunkStash, compute_stats
from .errors import AnalysisError
from .frechet import SQRT_MODES
from . import memory
from .gaps import depth_shares
from .gradient import InfluenceMethod
from .influence import INFLUENCE_VERSION, LayerInfluence, compute_influence
from .memory import MemoryPlan, Shape
from .results import layer_summary, layer_summary_and_gradient
from .runner import Runner
from .select import parse_layers, resolve_samples
from .stats import OUTLIER_RULES

log = logging.getLogger(__name__)
MIN_STABLE_SAMPLES = 20  # the MIR paper (Table 6) reports MIR stable from N >= 20
SENSITIVITY_GROUPS = 4  # FD at N/4, N/2, 3N/4 and N samples for the FD-infinity fit


@dataclass
class AnalysisOptions:
    mode: str = "exact"  # trace term: exact | reference-fast | reference-accurate
    precision: str = "float32"  # Gram products (float64 accumulation either way)
    bootstrap: int = 0  # replicates; 0 = none
    seed: int = 0
    influence: str = "auto"  # the influence read's covariance term: auto (sketch), exact, or a sketch rank
    cache: bool = True
    cache_dir: str | None = None
    memory_limit: int | None = None  # bytes; None = half the machine's memory
    reads: ReadConfig = field(default_factory=ReadConfig)  # how much the one-read scan guesses (never results)
    sensitivity: bool = False  # FD-infinity and the outlier-rule variants: extra trace solves (extrapolate.py)
    groups: int = SENSITIVITY_GROUPS  # sample groups kept for FD-infinity (with sensitivity only)

    def validate(self) -> None:
        if self.mode not in SQRT_MODES:
            raise AnalysisError(f"unknown --sqrt mode {self.mode!r}; choose one of {', '.join(SQRT_MODES)}")
        if self.bootstrap < 0:
            raise AnalysisError("--bootstrap must be 0 or positive")
        try:
            InfluenceMethod.parse(self.influence)
        except ValueError as exc:
            raise AnalysisError(str(exc)) from None
        if self.sensitivity and self.groups < 2:
            raise AnalysisError("FD-infinity needs at least 2 sample groups")

    @property
    def influence_method(self) -> InfluenceMethod:
        return InfluenceMethod.parse(self.influence)

    @property
    def kept_groups(self) -> int:
        """Sample groups the statistics are kept in: 1 unless --sensitivity asks for FD-infinity."""
        return self.groups if self.sensitivity else 1


def memory_plan(selection, n_layers: int, runner: Runner, options: AnalysisOptions, groups: int = 1) -> MemoryPlan:
    """The batches and lanes for this selection within the budget (memory.py), or AnalysisError before
    any read. The budget: --memory-limit, else half the machine's memory; on a dask.distributed cluster,
    also at most what a worker may use (Runner.worker_memory: the smallest worker memory limit times
    distributed's pause share; each worker then runs as many lanes as it has threads)."""
    budget = options.memory_limit if options.memory_limit is not None else _physical_memory() // 2
    workers = runner.workers
    if runner.distributed:
        limit, threads = runner.worker_memory()
        budget = budget if limit is None else min(budget, limit)
        workers = max(workers, threads)
    return memory.plan(selection_shape(selection), n_layers, workers, int(budget), groups=groups,
                       bootstrap=bool(options.bootstrap), config=options.reads)


def selection_shape(selection) -> Shape:
    """What the memory estimate needs to know about a selection (hidden size, chunk rows, dtype, tokens)."""
    rows = max(max(view.data.chunks[1]) for view in (selection.vision, selection.text))
    tokens = int(selection.vision.sizes["token"]) + int(selection.text.sizes["token"])
    return Shape(int(selection.archive.hidden_size), int(rows), int(selection.vision.dtype.itemsize), tokens)


def layer_batches(layers: list[int], size: int) -> list[list[int]]:
    return [layers[i:i + size] for i in range(0, len(layers), size)]


def _physical_memory() -> int:
    try:
        import os
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _cache_key(selection, layer: int, precision: str, groups: int = 1, rules: bool = False) -> dict:
    """The statistics are of the whole selection (one sample block: the bootstrap resamples samples
    through the influence read); "blocks" stays in the key so entries written earlier keep their names.
    --sensitivity keeps them per sample group (seeded, engine.GROUP_SEED) and under the other outlier rules,
    which the key then says."""
    sel = {k: v for k, v in selection.key.items() if k != "layers"}
    key = {"stats_version": STATS_VERSION, "selection": sel, "layer": int(layer), "blocks": int(groups),
           "precision": precision}
    if groups > 1 or rules:
        key.update(grouping=f"seeded-permutation-{GROUP_SEED}", rules=list(OUTLIER_RULES) if rules else [])
    return key


def _batch_influence(selection, batch: list[int], stats: dict, options: AnalysisOptions,
                     cache: StatsCache | None, runner: Runner, planned_peak: int = 0,
                     stash: ChunkStash | None = None) -> tuple[dict[int, dict], dict[int, LayerInfluence]]:
    """Per-sample influence values of a batch of layers: cached, or one read of the missing layers. Returns
    them with the summaries of the missing layers, computed with their gradients from one trace solve.
    The read takes the chunks the scan kept in `stash`; without them, while the gradients are computed
    (CPU-bound), the missing layers' files are read into the OS page cache in the background, as far as it
    has room (storage_schemas.prefetch), so the read then waits less on disk."""
    method = options.influence_method
    form = method.describe(int(selection.archive.hidden_size))
    keys = {layer: {**_cache_key(selection, layer, options.precision), "kind": "influence",
                    "influence_version": INFLUENCE_VERSION, "influence": form} for layer in batch}
    found, summaries = {}, {}
    if cache is not None:
        for layer in batch:
            values = cache.load_values(keys[layer])
            if values is not None and values["d"].shape == (len(selection.sample_index),):
                found[layer] = LayerInfluence.from_arrays(values)
    missing = [layer for layer in batch if layer not in found]
    if missing:
        if not runner.distributed and not (stash and stash.chunks):  # workers elsewhere read through their caches
            prefetch(selection, missing, memory.page_cache_room(planned_peak))
        solved = runner.map(lambda layer: layer_summary_and_gradient(stats[layer], options.mode, options.precision,
                                                                     options.sensitivity, method), missing)
        summaries = {layer: summary for layer, (summary, _) in zip(missing, solved)}
        grads = {layer: grad for layer, (_, grad) in zip(missing, solved)}
        del solved
        for layer, values in compute_influence(selection, grads, stats, runner, stash).items():
            if cache is not None:
                cache.store_values(keys[layer], values.to_arrays())
            found[layer] = values
    return summaries, found


def _stash_for(selection, batch: list[int], options: AnalysisOptions, runner: Runner,
               plan: MemoryPlan) -> ChunkStash | None:
    """With the bootstrap on local threads, a ChunkStash when the batch's stored bytes fit the budget beside
    the plan's peak: the scan keeps its chunks and the influence read takes them, so the data is decoded once
    (the second read's decoding alone cost about a third of the analysis at d = 256, bench/bootstrap_bench.py)."""
    if not options.bootstrap or runner.distributed:
        return None
    stored = sum(getattr(selection, m).data[0].nbytes for m in MODALITIES) * len(batch)
    return ChunkStash() if plan.peak + stored <= plan.budget else None


def _batch_stats(selection, batch: list[int], options: AnalysisOptions, cache: StatsCache | None,
                 runner: Runner, hits: list[int], lanes: int = 1, reads: ReadConfig | None = None,
                 stash: ChunkStash | None = None) -> dict:
    """Sufficient statistics of a batch of layers: from the cache where present, else computed and cached."""
    groups = min(options.kept_groups, len(selection.sample_index))
    keys = {layer: _cache_key(selection, layer, options.precision, groups, options.sensitivity) for layer in batch}
    stats = {}
    if cache is not None:
        for layer in batch:
            found = cache.load(keys[layer])
            if found is not None:
                stats[layer] = found
                hits.append(layer)
    missing = [layer for layer in batch if layer not in stats]
    if missing:
        for layer, st in compute_stats(selection, missing, blocks=groups, precision=options.precision, runner=runner,
                                        config=reads or options.reads, lanes=lanes, rules=options.sensitivity,
                                        stash=stash).items():
            if cache is not None:
                cache.store(keys[layer], st)
            stats[layer] = st
    return stats


def analyze_archives(locations: list[str] | str, *, layers: str | None = None, samples: str | None = None,
                     where: str | None = None, text_tokens: str | None = None,
                     options: AnalysisOptions | None = None, runner: Runner | None = None,
                     storage_options: dict | None = None) -> AnalysisResult:
    """The library entry point of `mir analyze` / `mir stats` / `mir study`: open the archive (parts read
    as one), select samples and layers from their text form (select.py), and analyse. Raises
    AnalysisError / storage_schemas.ArchiveError with a message for the user."""
    archive = open_archive(list(locations) if isinstance(locations, (list, tuple)) else locations, storage_options)
    rows = resolve_samples(archive, samples, where)
    chosen = parse_layers(layers, archive.layers, archive.hidden_states_entries)
    selection = archive.select(samples=rows, layers=chosen, text_tokens=text_tokens)
    return analyze_selection(selection, options, runner=runner)


def analyze_selection(selection, options: AnalysisOptions | None = None, *, runner: Runner | None = None,
                      layers: list[int] | None = None) -> AnalysisResult:
    """MIR of a Selection (storage_schemas), computed out of core; see MIR_SPEC for the definition."""
    options = options or AnalysisOptions()
    options.validate()
    start = time.perf_counter()
    runner = runner or Runner()
    layers = [int(x) for x in (selection.layers if layers is None else layers)]
    if not layers:
        raise AnalysisError("no layers selected")
    n_samples = int(len(selection.sample_index))
    if n_samples == 0:
        raise AnalysisError("the selection holds no samples")
    if options.bootstrap and n_samples < 2:
        raise AnalysisError("--bootstrap needs at least 2 samples in the selection (samples are resampled)")
    cache = StatsCache.for_archive(selection.archive, options.cache_dir) if options.cache else None
    # --sensitivity keeps K sample groups and the other outlier rules' moments: d x d statistics per modality
    kept = options.kept_groups + (len(OUTLIER_RULES) if options.sensitivity else 0)
    plan = memory_plan(selection, len(layers), runner, options, groups=kept)
    memory.return_freed_memory()
    log.info("memory plan: %s", plan.describe())
    summaries, influence, hits = {}, {}, []
    for batch in layer_batches(layers, plan.layers_per_batch):
        stash = _stash_for(selection, batch, options, runner, plan)
        stats = _batch_stats(selection, batch, options, cache, runner, hits, plan.lanes, plan.config, stash)
        if options.bootstrap:
            solved, values = _batch_influence(selection, batch, stats, options, cache, runner, plan.peak, stash)
            summaries.update(solved)
            influence.update(values)
        del stash  # what the influence read did not take (layers found in the cache)
        rest = [layer for layer in batch if layer not in summaries]
        summaries.update(zip(rest, runner.map(lambda layer: layer_summary(stats[layer], options.mode,
                                                                          options.sensitivity), rest)))
    ordered = [summaries[layer] for layer in layers]
    total = sum(s["fd"] for s in ordered)
    mir = math.log10(total) if total > 0 else math.nan
    extra_attrs = {"fd_layer_mean": depth_shares(ordered)}
    if options.sensitivity:
        extra_attrs.update({name: _log10_sum(ordered, field) for name, field in SENSITIVITY_MIRS.items()})
    settings = {**asdict(options), "layers": layers, "text_tokens": selection.text_tokens,
                "archive": selection.archive.paths, "archive_fingerprint": selection.archive.fingerprint,
                "selection": selection.key, "scheduler": runner.describe(), "memory_plan": plan.describe()}
    summary, per_sample, captured = None, None, None
    if options.bootstrap:
        per_sample = np.stack([influence[layer].d for layer in layers])
        summary = boot.summarize(total, [influence[layer] for layer in layers], options.bootstrap, options.seed,
                                 options.influence_method.describe(int(selection.archive.hidden_size)))
        captured = np.stack([influence[layer].captured for layer in layers])
        if options.mode != "exact":
            summary["method"] += f"; about the {options.mode} FD, with the exact trace's per-sample values"
    attrs = result_attrs(mir=mir, mode=options.mode, n_samples=n_samples,
                         n_vision_tokens=int(selection.vision.sizes["token"]),
                         n_text_tokens=int(selection.text.sizes["token"]), settings=settings, bootstrap=summary,
                         extra=extra_attrs)
    dataset = to_dataset(ordered, attrs, None if summary is None else summary["mir_replicates"],
                         None if per_sample is None else (selection.sample_ids, per_sample), captured)
    result = AnalysisResult(dataset, settings,
                            cache={"location": str(cache.directory) if cache else None, "layers_reused": hits})
    result.warnings = _warnings(dataset, total)
    result.elapsed_s = time.perf_counter() - start
    return result


SENSITIVITY_MIRS = {"mir_infinity": "fd_infinity", "mir_no_replacement": "fd_no_replacement",
                    "mir_iqr_rule": "fd_iqr_rule"}


def _log10_sum(summaries: list[dict], field: str) -> float:
    total = sum(s[field] for s in summaries)
    return math.log10(total) if total > 0 else math.nan


def _warnings(ds, total: float) -> list[str]:
    out = []
    n_samples = int(ds.attrs["n_samples"])
    if n_samples < MIN_STABLE_SAMPLES:
        out.append(f"only {n_samples} samples: the MIR paper reports MIR stable from N >= "
                   f"{MIN_STABLE_SAMPLES} samples; treat this value as noisy")
    if not total > 0:
        out.append(f"the sum of per-layer FDs is {total:.6g} (not positive): MIR = log10(sum) is undefined")
    if ds.attrs["sqrt_mode"] == "reference-fast":
        out.append("reference-fast reproduces the reference code's fast mode, whose iteration starts at a fixed "
                   "point of its update (in exact arithmetic it would return C_V C_T, not its square root); in "
                   "float32 that fixed point is unstable, so its trace term is amplified rounding noise, not "
                   "reproducible beyond that noise (MIR_SPEC measured MIR 0.06-0.095 above the exact value, FD "
                   "14-28% too high, on synthetic archives). The paper (section 2.1) says this shortcut's error "
                   "stays \"below 1%\". Use --sqrt exact for a Fréchet distance")
    scale = ds["total_variance"].sum("modality")
    negative = ds["negative_eigenvalue_mass"]
    for layer in ds["layer"].values:
        at = {"layer": layer}
        if scale.sel(at) > 0 and negative.sel(at) > 1e-6 * scale.sel(at):
            out.append(f"layer {layer}: clipped negative eigenvalue mass {float(negative.sel(at)):.3g} "
                       "in the trace term (rounding in a rank-deficient product)")
        low = [m for m in MODALITIES if ds["tokens_per_channel"].sel(layer=layer, modality=m) < 1]
        if low:
            out.append(f"layer {layer}: fewer {' and '.join(low)} tokens than channels: the covariance is "
                       "rank-deficient (the exact trace handles it; reference modes may be unstable)")
    return out
