"""The dry run (`mir extract --dry-run`): what a run would do, how big its archive would be, how much
host memory a batch takes and how long the disk needs to write it, from the sources and the
processor alone: no weights loaded, nothing written but a short probe of the disk's speed."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage_schemas.codecs import chunk_tokens_for, chunks_per_shard_for, hidden_codec
from storage_schemas.summary import format_bytes

from . import data as data_mod
from .extraction import ExtractOptions, parse_layers, sample_list
from .prompts import PromptLayout


@dataclass
class Plan:
    """What a run would do, from the processor alone (no weights loaded, nothing written)."""

    out: Path
    samples: int
    samples_total: int
    layers: list[int]
    hidden_size: int
    dtype: str
    mean_vision_tokens: float
    mean_text_tokens: float
    measured_on: int
    bytes_per_value: int
    batch_size: int = 1
    disk_mb_s: float | None = None  # measured where the archive would go; None: not measured

    @property
    def raw_bytes(self) -> float:
        return self.samples * (self.mean_vision_tokens + self.mean_text_tokens) * len(self.layers) * \
            self.hidden_size * self.bytes_per_value

    @property
    def disk_bytes(self) -> float:
        """Expected size on disk: float16 and float32 are stored raw; bfloat16-in-float32 with the
        default lz4 and byte shuffle measured 2.2x smaller (bench/archive_bench.py)."""
        return self.raw_bytes / (2.2 if hidden_codec(self.dtype)["cname"] != "none" else 1.0)

    @property
    def batch_bytes(self) -> float:
        """Host memory of one batch of hidden states, in the model's dtype (bfloat16 stays 2 bytes a
        value on the host: the writer widens it to float32 only into its shard buffers)."""
        per_value = 2 if self.dtype == "bfloat16" else self.bytes_per_value
        return self.batch_size * (self.mean_vision_tokens + self.mean_text_tokens) * len(self.layers) * \
            self.hidden_size * per_value

    @property
    def buffer_bytes(self) -> float:
        """The writer's shard buffers: up to one shard of every layer per modality, as far as the run
        fills them (storage_schemas/stream.py)."""
        ct = chunk_tokens_for(self.hidden_size, self.bytes_per_value)
        shard = ct * chunks_per_shard_for(len(self.layers), ct, self.hidden_size, self.bytes_per_value)
        tokens = sum(min(shard, self.samples * mean) for mean in (self.mean_vision_tokens, self.mean_text_tokens))
        return tokens * len(self.layers) * self.hidden_size * self.bytes_per_value

    def describe(self) -> str:
        memory = 2 * self.batch_bytes + self.buffer_bytes
        if self.disk_mb_s:
            seconds = self.disk_bytes / 1e6 / self.disk_mb_s
            timing = (f"disk          {self.disk_mb_s:.0f} MB/s measured in {self.out.parent} (random bytes, fsynced): "
                      f"writing takes at least {_duration(seconds)}, {seconds / max(self.samples, 1):.2f} s per sample")
        else:
            timing = "disk          not measured"
        return "\n".join([
            f"would write   {self.out}",
            f"samples       {self.samples}" + (f" (of {self.samples_total}, this shard)"
                                               if self.samples != self.samples_total else ""),
            f"layers        {len(self.layers)} hidden_states entries, hidden size {self.hidden_size}",
            f"tokens        {self.mean_vision_tokens:.1f} vision + {self.mean_text_tokens:.1f} text per sample "
            f"(mean of the first {self.measured_on} samples)",
            f"model dtype   {self.dtype} (stored as {'float16' if self.dtype == 'float16' else 'float32'})",
            f"archive size  about {format_bytes(self.raw_bytes)} of hidden states, about {format_bytes(self.disk_bytes)} on disk "
            f"(codec {hidden_codec(self.dtype)['cname']})",
            f"host memory   {format_bytes(self.batch_bytes)} per batch of {self.batch_size}; the run holds at most 2 batches "
            f"plus {format_bytes(self.buffer_bytes)} of shard buffers: about {format_bytes(memory)}",
            timing,
        ])


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def disk_write_speed(directory: Path, mb: int = 256) -> float | None:
    """MB/s of a sequential write of incompressible bytes, fsynced, in `directory` (zeros would
    measure a virtual disk's compression); None when the directory is not writable."""
    path = directory / f".mir-disk-probe-{os.getpid()}"
    block = np.random.default_rng().integers(0, 256, 32 * 2**20, dtype=np.uint8).tobytes()
    try:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for i in range(mb // 32):
                os.write(fd, block[i:] + block[:i])
            os.fsync(fd)
        finally:
            os.close(fd)
        return (mb // 32) * 32 * 2**20 / 1e6 / (time.perf_counter() - t0)
    except OSError:
        return None
    finally:
        path.unlink(missing_ok=True)


def estimate(opts: ExtractOptions, *, probe: int = 16, disk_probe_mb: int = 256) -> Plan:
    """Check sources and model files and estimate the archive size, the host memory and the disk
    time, without loading weights (`disk_probe_mb=0`: do not measure the disk)."""
    from . import batching, loading

    layout = PromptLayout.from_option(opts.template)
    full = sample_list(opts)
    part = full.shard(*opts.shard) if opts.shard else full
    head = part.samples[:probe]
    if opts.preflight:
        data_mod.preflight(part)
    config, processor, image_token_id = loading.load_processor(
        opts.model, trust_remote_code=opts.trust_remote_code, revision=opts.revision)
    text_config = loading._text_config(config)
    num_layers = int(text_config.num_hidden_layers)
    layers = parse_layers(opts.layers, num_layers)
    if opts.dtype != "auto":
        dtype = opts.dtype
    else:
        dtype = str(getattr(text_config, "dtype", None) or getattr(config, "dtype", None) or "float32")
        dtype = dtype.removeprefix("torch.")
    preparer = batching.BatchPreparer(processor, image_token_id, layout, max_text_tokens=opts.max_text_tokens,
                                    max_positions=batching.max_positions(config))
    nv = nt = 0
    for i in range(0, len(head), opts.batch_size):
        batch = preparer.prepare(list(head[i:i + opts.batch_size]))
        nv += sum(ps.tokens.vision_position.size for ps in batch.samples)
        nt += sum(ps.tokens.text_position.size for ps in batch.samples)
    n = max(len(head), 1)
    out = Path(opts.out).expanduser().absolute()
    parent = next((p for p in [out.parent, *out.parents] if p.is_dir()), None)
    return Plan(out=out, samples=len(part), samples_total=len(full), layers=layers,
                hidden_size=int(text_config.hidden_size), dtype=dtype, mean_vision_tokens=nv / n,
                mean_text_tokens=nt / n, measured_on=len(head), bytes_per_value=2 if dtype == "float16" else 4,
                batch_size=opts.batch_size,
                disk_mb_s=disk_write_speed(parent, disk_probe_mb) if parent and disk_probe_mb else None)
