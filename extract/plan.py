"""The dry run (`mir extract --dry-run`): what a run would do and how big its archive would be,
from the sources and the processor alone: no weights loaded, nothing written."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

    @property
    def raw_bytes(self) -> float:
        return self.samples * (self.mean_vision_tokens + self.mean_text_tokens) * len(self.layers) * \
            self.hidden_size * self.bytes_per_value

    def describe(self) -> str:
        return "\n".join([
            f"would write   {self.out}",
            f"samples       {self.samples}" + (f" (of {self.samples_total}, this shard)"
                                               if self.samples != self.samples_total else ""),
            f"layers        {len(self.layers)} hidden_states entries, hidden size {self.hidden_size}",
            f"tokens        {self.mean_vision_tokens:.1f} vision + {self.mean_text_tokens:.1f} text per sample "
            f"(mean of the first {self.measured_on} samples)",
            f"model dtype   {self.dtype} (stored as {'float16' if self.dtype == 'float16' else 'float32'})",
            f"archive size  about {format_bytes(self.raw_bytes)} uncompressed (hidden states compress little)",
        ])


def estimate(opts: ExtractOptions, *, probe: int = 16) -> Plan:
    """Check sources and model files and estimate the archive size, without loading weights."""
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
    return Plan(out=Path(opts.out).expanduser().absolute(), samples=len(part), samples_total=len(full),
                layers=layers, hidden_size=int(text_config.hidden_size), dtype=dtype, mean_vision_tokens=nv / n,
                mean_text_tokens=nt / n, measured_on=len(head), bytes_per_value=2 if dtype == "float16" else 4)
