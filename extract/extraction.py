"""One extraction job: samples -> model -> archive, with provenance, resume and sharding.

`extract(ExtractOptions(...))` is what `mir extract` calls; it owns the order of the checks so
that bad input fails before anything is written, and a resumed run refuses an archive made
with another model, other settings or other data.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from storage_schemas import ArchiveError, ArchiveWriter, SampleRecord, TextTokenRule, ranges
from storage_schemas.records import is_bfloat16_bits

from . import data as data_mod
from . import provenance
from .errors import DataError, ExtractError, ResumeError
from .prompts import PromptLayout

log = logging.getLogger(__name__)


@dataclass
class ExtractOptions:
    """Everything `mir extract` can be told (`mir extract --help` and the README say what each means)."""

    model: str
    out: str
    images: str | None = None
    texts: str | None = None
    manifest: str | None = None
    num: int | None = None
    seed: int | None = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    layers: str | None = None
    template: str | None = None
    text_tokens: str = "after_image"
    max_text_tokens: int | None = None
    resume: bool = False
    overwrite: bool = False
    shard: tuple[int, int] | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: str | None = None
    commit_every: int | None = None
    commit_seconds: float = 120.0
    compression: str | None = None  # "cname[:level]" of the Blosc codec; None: the format's default
    preflight: bool = True
    progress: bool = True


@dataclass
class ExtractResult:
    """What a run did."""

    out: Path
    samples_total: int
    samples_skipped: int
    samples_done: int
    seconds: float
    samples_per_second: float
    truncated: int
    cpu_seconds: float = 0.0
    attrs: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- options
def parse_layers(spec: str | None, num_hidden_layers: int) -> list[int]:
    """Hidden-states indices 0..L named by `spec` (default all), in the shared grammar of storage_schemas.ranges."""
    n = num_hidden_layers + 1
    try:
        return ranges.parse_layers(spec, n, default=range(n))
    except ArchiveError as exc:
        raise ExtractError(f"{exc} (this model's hidden states are 0..{n - 1}; 0 = embeddings)") from None


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """'K/N' -> (K, N), 1 <= K <= N."""
    if spec is None:
        return None
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ExtractError(f"--shard {spec!r}: use K/N, e.g. --shard 1/4") from None
    if n < 1 or not 1 <= k <= n:
        raise ExtractError(f"--shard {spec!r}: K must lie in 1..N")
    return k, n


BLOSC_NAMES = ("zstd", "lz4", "lz4hc", "blosclz", "zlib")


def parse_compression(spec: str | None) -> dict | None:
    """'none', 'zstd:3', 'lz4', ... -> the writer's codec settings (None keeps the format's default)."""
    if spec is None:
        return None
    if spec == "none":
        return {"cname": "none"}
    name, _, level = spec.partition(":")
    if name not in BLOSC_NAMES or (level and not (level.isdigit() and 0 <= int(level) <= 9)):
        raise ExtractError(f"--compression {spec!r}: use none, or NAME[:LEVEL] with NAME one of "
                           f"{', '.join(BLOSC_NAMES)} and LEVEL 0..9 (e.g. zstd:3, lz4:1)")
    return {"cname": name, "clevel": int(level) if level else 5 if name.startswith("lz4") else 3}


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError(f"--device {device}: CUDA is not available on this machine")
    return device


def sample_list(opts: ExtractOptions) -> data_mod.SampleList:
    """The full (unsharded) sample list the options describe."""
    if opts.manifest and (opts.images or opts.texts):
        raise DataError("give either --manifest or --images and --texts, not both")
    if opts.manifest:
        return data_mod.from_manifest(opts.manifest, num=opts.num, seed=opts.seed)
    if not (opts.images and opts.texts):
        raise DataError("give --images DIR and --texts DIR, or --manifest FILE.jsonl")
    return data_mod.from_directories(opts.images, opts.texts, num=opts.num, seed=opts.seed)


# ----------------------------------------------------------------------------- the job
def extract(opts: ExtractOptions, *, on_info: Callable[[str], None] | None = None,
            model_info: Any = None) -> ExtractResult:
    """Run one extraction (or resume one); return what it did.

    `model_info` (a loading.ModelInfo) extracts with a model already in memory, e.g. one being
    trained; `opts.model`, `device`, `dtype` and the loading options are then not used.
    """
    from . import loading, runner

    say = on_info or (lambda msg: log.info(msg))
    check_options(opts)
    out = Path(opts.out).expanduser().absolute()
    layout = PromptLayout.from_option(opts.template)
    full = sample_list(opts)
    part = full.shard(*opts.shard) if opts.shard else full
    resuming = opts.resume and out.exists()
    if out.exists() and not (opts.resume or opts.overwrite):
        raise ExtractError(f"{out} already exists; pass --resume to continue it or --overwrite to replace it")
    if opts.preflight and not resuming:
        data_mod.preflight(part)  # fail on a bad file before the archive exists

    if model_info is not None:
        info, device = model_info, model_info.device
    else:
        device = resolve_device(opts.device)
        info = loading.load_model(opts.model, device=device, dtype=opts.dtype,
                                  trust_remote_code=opts.trust_remote_code, revision=opts.revision,
                                  attn_implementation=opts.attn_implementation)
    layers = parse_layers(opts.layers, info.num_hidden_layers)
    run_record = provenance.run_record(opts, device, 0)
    attrs = provenance.provenance(opts, info, layers, layout, full, part, run_record,
                                  runner.drops_attention_mask(info.model))
    writer, todo, base_extraction = open_or_create(opts, out, info, layout, layers, attrs, part, resuming, say)
    run_record["samples_planned"] = len(todo)
    try:
        stats = runner.run(
            info, todo, layers=layers, batch_size=opts.batch_size, layout=layout,
            make_record=record_maker(info.dtype), sink=writer, commit_every=opts.commit_every,
            commit_seconds=opts.commit_seconds, max_text_tokens=opts.max_text_tokens, progress=opts.progress)
    except BaseException as exc:
        translated = _translate_failure(exc, writer, out, len(part), resuming, opts.batch_size)
        if translated is exc:
            raise
        raise translated from exc
    run_record.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "samples_done": stats.samples,
                       "seconds": round(stats.seconds, 3), "truncated": stats.truncated, "commits": stats.commits})
    extraction = {**base_extraction, "runs": list(base_extraction.get("runs", [])) + [run_record]}
    writer.update_attrs({"extraction": extraction})
    writer.close()
    return ExtractResult(out=out, samples_total=len(part), samples_skipped=len(part) - len(todo),
                         samples_done=stats.samples, seconds=stats.seconds,
                         samples_per_second=stats.samples_per_second, truncated=stats.truncated,
                         cpu_seconds=stats.cpu_seconds, attrs={**attrs, "extraction": extraction})


def check_options(opts: ExtractOptions) -> None:
    """Refuse option values that need no file or model to be found wrong."""
    try:
        opts.text_tokens = TextTokenRule.parse(opts.text_tokens).value  # one spelling in the hashed settings
    except ArchiveError as exc:
        raise ExtractError(f"--text-tokens: {exc}") from None
    if opts.batch_size < 1:
        raise ExtractError("--batch-size must be at least 1")
    if opts.max_text_tokens is not None and opts.max_text_tokens < 1:
        raise ExtractError("--max-text-tokens must be at least 1")
    if opts.resume and opts.overwrite:
        raise ExtractError("--resume and --overwrite exclude each other")
    parse_compression(opts.compression)


def open_or_create(opts: ExtractOptions, out: Path, info: Any, layout: PromptLayout, layers: list[int],
                   attrs: dict[str, Any], part: data_mod.SampleList, resuming: bool,
                   say: Callable[[str], None]) -> tuple[ArchiveWriter, list, dict[str, Any]]:
    """The writer, the samples still to do and the extraction attributes to extend: a resumed
    archive is checked against this run first; a new one is created only once the texts pass."""
    from . import batching

    max_pos = batching.max_positions(info.model)
    if not resuming:  # cheap (texts only), so even with --no-preflight
        batching.check_prompts(info.processor, layout, part.samples, opts.max_text_tokens, max_pos)
        writer = ArchiveWriter.create(out, layers=layers, hidden_size=info.hidden_size, dtype=info.dtype,
                                      attrs=attrs, overwrite=opts.overwrite, codec=parse_compression(opts.compression))
        return writer, list(part.samples), dict(attrs["extraction"])
    writer = ArchiveWriter.open_for_append(out)
    try:
        provenance.check_resume(writer.attrs, attrs, out)
        done = set(writer.committed_sample_ids)
        todo = [s for s in part.samples if s.sample_id not in done]
        stray = done - {s.sample_id for s in part.samples}
        if stray:
            raise ResumeError(f"cannot resume {out}: it holds samples not in this run's list, e.g. {sorted(stray)[:3]}")
        say(f"resuming {out}: {len(done)} of {len(part)} samples already committed")
        if opts.preflight:
            data_mod.preflight(data_mod.SampleList(tuple(todo), part.sources))
        batching.check_prompts(info.processor, layout, todo, opts.max_text_tokens, max_pos)
    except BaseException:
        writer.abort()
        raise
    return writer, todo, dict(writer.attrs.get("extraction", {}))


def record_maker(model_dtype: str) -> Callable[..., SampleRecord]:
    """`make_record(prepared, vision, text)` for the run loop, in the archive's stored dtype."""
    stored_dtype = np.float16 if model_dtype == "float16" else np.float32

    def stored(values: np.ndarray) -> np.ndarray:
        if model_dtype == "bfloat16" and is_bfloat16_bits(values):
            return values  # the writer widens the bits to float32 as it copies them into shards
        return values.astype(stored_dtype, copy=False)

    def make_record(ps: Any, vision: np.ndarray, text: np.ndarray) -> SampleRecord:
        t = ps.tokens
        return SampleRecord(
            sample_id=ps.sample.sample_id, image=ps.sample.image_ref, text=ps.sample.text_ref,
            vision=stored(vision), vision_position=t.vision_position,
            text_hidden=stored(text), text_position=t.text_position,
            text_token_id=t.text_token_id, text_role=t.text_role, input_ids=t.input_ids)

    return make_record


def _translate_failure(exc: BaseException, writer: ArchiveWriter, out: Path, n_part: int, resuming: bool,
                       batch_size: int) -> BaseException:
    """Release the archive and say what a failed run left behind and how to continue."""
    import torch

    committed = writer.committed["samples"]
    writer.abort()
    if committed == 0 and not resuming:
        shutil.rmtree(out, ignore_errors=True)  # the empty archive this run created
        note = f"nothing was written to {out}"
    else:
        note = (f"{committed} of {n_part} samples are committed in {out}; "
                f"fix the problem and rerun with --resume to continue")
    if isinstance(exc, KeyboardInterrupt):
        return ExtractError(f"interrupted; {note}")
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return ExtractError(f"out of device memory at --batch-size {batch_size}; use a smaller batch size ({note})")
    if isinstance(exc, (ExtractError, ArchiveError)):
        return type(exc)(f"{exc}\n({note})")
    return exc
