"""MIR during training, from any PyTorch loop: extract a fixed probe set with the live model into
`<out>/step-<N>.zarr` (the `mir extract` format), analyse it, and return the scalars to log.

The Trainer callback (pipelines/trainer_callback.py) is a thin layer over `mir_at_step`. Under a
multi-process run (torch.distributed initialised) every rank extracts its own contiguous shard of
the probe with its own replica, rank 0 merges the parts in shard order (each sample exactly once,
as one unsharded run) and analyses; the other ranks get no result.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import result_scalars


@dataclass
class Probe:
    """The fixed probe set and the settings every step uses (names as `mir extract` / `mir analyze`)."""

    manifest: str                       # JSONL as `mir extract --manifest`
    out: str                            # folder of the step-<N>.zarr archives
    run: str = "run"                    # names the run in the archives' provenance
    num: int | None = None
    seed: int | None = None
    batch_size: int = 8
    layers: str = "all"                 # stored layers
    template: str | None = None
    text_tokens: str = "after_image"
    max_text_tokens: int | None = None
    compression: str | None = None
    analyze_layers: str | None = None   # default: every stored decoder layer
    bootstrap: int = 0                  # replicates for the interval (0: none)
    bootstrap_seed: int = 0
    extra: dict = field(default_factory=dict)  # further ExtractOptions fields

    def archive(self, step: int) -> Path:
        return Path(self.out) / f"step-{int(step)}.zarr"


@dataclass
class StepMIR:
    """One step's archive and, on the rank that analysed it, the analysis."""

    step: int
    archive: Path
    result: Any = None                  # analyze.AnalysisResult, or None on ranks > 0

    def scalars(self, prefix: str = "mir") -> dict[str, float]:
        """MIR, its interval and the per-layer FD, named as pipelines.metrics names them."""
        return {} if self.result is None else result_scalars(self.result, prefix)


def _process_group() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _options(probe: Probe, out: Path, shard: tuple[int, int] | None):
    from extract.extraction import ExtractOptions

    return ExtractOptions(model=probe.run, out=str(out), manifest=probe.manifest, num=probe.num, seed=probe.seed,
                          batch_size=probe.batch_size, layers=probe.layers, template=probe.template,
                          text_tokens=probe.text_tokens, max_text_tokens=probe.max_text_tokens, overwrite=True,
                          shard=shard, compression=probe.compression, progress=False, **probe.extra)


def check_probe(probe: Probe) -> int:
    """Read the manifest and decode every image and text now, so a bad probe stops the run before
    training starts rather than at the first save; returns the number of samples."""
    from extract import data as data_mod
    from extract.extraction import sample_list

    samples = sample_list(_options(probe, Path(probe.out) / "check", None))
    data_mod.preflight(samples)
    return len(samples)


def analyse_archive(path: str | Path, *, layers: str | None = None, text_tokens: str = "after_image",
                    bootstrap: int = 0, seed: int = 0):
    """`mir analyze` of one archive with local threads; returns the analyze.AnalysisResult."""
    from analyze import AnalysisOptions, Runner, analyze_selection, parse_layers
    from storage_schemas import open_archive

    archive = open_archive(str(path))
    selection = archive.select(layers=parse_layers(layers, archive.layers), text_tokens=text_tokens)
    runner = Runner(progress=False)
    try:
        return analyze_selection(selection, AnalysisOptions(bootstrap=bootstrap, seed=seed), runner=runner)
    finally:
        runner.close()


def mir_at_step(model: Any, processor: Any, probe: Probe, step: int, *,
                checkpoint: str | Path | None = None) -> StepMIR:
    """Extract `probe` with `model` as it is (no reload, no grad, eval mode and back, its own device
    and dtype) into `probe.archive(step)`, analyse it, and return the result.

    An archive already at that path is replaced: the live weights at this step are the truth.
    """
    from extract.live import extract_live
    from extract.merge import merge

    rank, world = _process_group()
    final = probe.archive(step)
    final.parent.mkdir(parents=True, exist_ok=True)
    if world == 1:
        extract_live(model, processor, _options(probe, final, None), run=probe.run, step=step, checkpoint=checkpoint)
    else:
        from extract.extraction import sample_list

        n = len(sample_list(_options(probe, final, None)))
        if n < world:
            raise ValueError(f"the probe has {n} samples, fewer than the {world} processes that would each extract "
                             "a shard of it; use a larger probe")
        parts = final.parent / f".step-{int(step)}.parts"
        part = parts / f"part-{rank + 1}-of-{world}.zarr"
        parts.mkdir(parents=True, exist_ok=True)
        extract_live(model, processor, _options(probe, part, (rank + 1, world)), run=probe.run, step=step,
                     checkpoint=checkpoint)
        _barrier()  # every part is complete
        if rank == 0:
            merge(final, sorted(parts.glob("part-*.zarr")), overwrite=True)
            shutil.rmtree(parts, ignore_errors=True)
        _barrier()  # no rank starts the next step's parts before this merge is done
    if rank != 0:
        return StepMIR(step, final)
    result = analyse_archive(final, layers=probe.analyze_layers, text_tokens=probe.text_tokens,
                             bootstrap=probe.bootstrap, seed=probe.bootstrap_seed)
    return StepMIR(step, final, result)
