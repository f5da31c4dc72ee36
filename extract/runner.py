"""The extraction loop: batched forward passes whose hidden states go to an archive.

Three stages run at once so the accelerator never waits on Python or disk:
  1. a prefetch thread decodes images, renders prompts and runs the processor for batch k+1;
  2. the main thread runs the forward pass of batch k (forward only: no `generate`, no attention
     maps), gathers the real tokens of the stored layers on the device, and starts an
     asynchronous device-to-host copy into pinned memory;
  3. a writer thread waits for that copy, splits it into per-sample records and appends them to
     the archive (compression and disk writes happen there).
Queues between the stages are bounded, so memory stays flat however many samples there are.

Padding is on the right: real tokens keep positions 0..n-1 and, attention being causal, never
attend to padding, so a sample's hidden states do not depend on which other samples share its
batch (up to floating-point reassociation across batch shapes). For that reason the padding mask
is redundant in causal decoders and is left out for the model types known to be such.
"""
from __future__ import annotations

import inspect
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .data import Sample, load_image, read_text
from .errors import DataError, ExtractError, ModelError
from .loading import ModelInfo
from .prompts import PromptLayout, TokenLayout, expanded_span, render, token_layout, truncate_text

_STOP = object()

# Model types whose language model is a plain causal decoder. With right padding, a real token's
# causal window holds only real tokens, so the padding mask changes nothing for them (checked per
# family in the tests; bitwise equal on CPU) and leaving it out lets attention use its fast causal
# kernels. The first four are tested; the others share their language models. Every other model
# (e.g. Gemma 3 and PaliGemma, with bidirectional image or prefix attention) keeps the mask.
CAUSAL_MODEL_TYPES = frozenset({
    "llava", "llava_next", "qwen2_vl", "idefics3", "qwen2_5_vl", "llava_onevision", "smolvlm",
})


def drops_attention_mask(model: Any) -> bool:
    """Whether the forward pass may omit the (redundant) right-padding attention mask."""
    return getattr(model.config, "model_type", None) in CAUSAL_MODEL_TYPES


@dataclass
class PreparedSample:
    """A sample's references and token bookkeeping (everything stored but the hidden states)."""

    sample: Sample
    tokens: TokenLayout
    truncated: bool


@dataclass
class PreparedBatch:
    """Model inputs for a batch (CPU tensors) and its samples' bookkeeping."""

    inputs: dict[str, torch.Tensor]
    samples: list[PreparedSample]
    seq_len: int


class BatchPreparer:
    """Turns samples into model inputs with the processor; pure CPU work."""

    def __init__(self, processor: Any, image_token_id: int, layout: PromptLayout, *,
                 max_text_tokens: int | None = None, max_positions: int | None = None,
                 accepts: set[str] | None = None):
        self.processor = processor
        self.image_token_id = image_token_id
        self.layout = layout
        self.max_text_tokens = max_text_tokens
        self.max_positions = max_positions
        self._accepts = accepts  # the forward's parameter names; None keeps every tensor

    def prepare(self, samples: Sequence[Sample]) -> PreparedBatch:
        processor = self.processor
        images, prompts, spans, truncated = [], [], [], []
        add_special = None
        for s in samples:
            text = read_text(s)
            text, cut = truncate_text(text, processor.tokenizer, self.max_text_tokens)
            rendered = render(self.layout, processor, text, describe(s))
            images.append(load_image(s.image_path))
            prompts.append(rendered.prompt)
            spans.append(rendered.text_span)
            truncated.append(cut)
            add_special = rendered.add_special_tokens
        try:
            enc = processor(images=images, text=prompts, padding=True, return_tensors="pt",
                            return_offsets_mapping=True, return_text_replacement_offsets=True,
                            add_special_tokens=add_special)
        except Exception as exc:  # noqa: BLE001 - the processor's errors are deep; name the samples
            ids = ", ".join(repr(s.sample_id) for s in samples)
            raise ModelError(f"the processor failed on samples {ids}: {exc}") from exc
        offsets = enc.pop("offset_mapping", None)
        replacements = enc.pop("text_replacement_offsets", None)
        if offsets is None:
            raise ModelError("the tokenizer returns no offset mapping (a slow tokenizer?); mir extract needs a "
                             "fast tokenizer to tell the text's tokens from the template's")
        input_ids = enc["input_ids"]
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        prepared = []
        for i, s in enumerate(samples):
            n = int(lengths[i])
            # Right padding: the real tokens are the first n positions.
            if not bool(enc["attention_mask"][i, :n].all()):
                raise ModelError("the tokenizer did not pad on the right")
            if self.max_positions is not None and n > self.max_positions:
                raise DataError(f"sample {s.sample_id!r}: {n} input tokens exceed the model's "
                                f"{self.max_positions} positions; use --max-text-tokens")
            span = expanded_span(spans[i], replacements[i] if replacements else None)
            tokens = token_layout(input_ids[i, :n].numpy(), offsets[i, :n].numpy(), self.image_token_id,
                                  span, f"sample {s.sample_id!r}")
            prepared.append(PreparedSample(s, tokens, truncated[i]))
        inputs = {k: v for k, v in enc.items()
                  if isinstance(v, torch.Tensor) and (self._accepts is None or k in self._accepts)}
        return PreparedBatch(inputs, prepared, int(input_ids.shape[1]))


def check_prompts(processor: Any, layout: PromptLayout, samples: Sequence[Sample],
                  max_text_tokens: int | None = None, max_positions: int | None = None) -> None:
    """Render every sample's prompt once (cheap: no images, no model) so that a text the layout
    cannot use fails before anything is written.

    A text longer than the model's positions on its own fails here too: found mid-run, it would
    leave a partial archive that `--resume` cannot finish, since adding --max-text-tokens changes
    the settings. (Text plus image tokens just over the limit is still caught per batch.)
    """
    for s in samples:
        text, _ = truncate_text(read_text(s), processor.tokenizer, max_text_tokens)
        render(layout, processor, text, describe(s))
        # A token covers at least one UTF-8 byte, so only texts this long need counting.
        if max_positions is not None and len(text.encode()) + 8 > max_positions:
            n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > max_positions:
                raise DataError(f"{describe(s)}: the text alone is {n} tokens, more than the model's "
                                f"{max_positions} positions; use --max-text-tokens, or shorten or drop it")


def describe(sample: Sample) -> str:
    """How errors name a sample: its id, and its text file if it has one."""
    return f"sample {sample.sample_id!r}" + (f" ({sample.text_path})" if sample.text_path is not None else "")


def forward_kwargs(model: Any) -> dict[str, Any]:
    """Keyword arguments of the forward pass: hidden states on, no cache, logits for one position only."""
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"output_hidden_states": True, "return_dict": True}
    if "use_cache" in params or "kwargs" in params:
        kwargs["use_cache"] = False
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1  # the LM head over the whole vocabulary is wasted work here
    return kwargs


def to_device(inputs: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Move inputs to the device; floating inputs (pixels) take the model's dtype."""
    out = {}
    for k, v in inputs.items():
        if v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.to(device, non_blocking=True)
    return out


class _PinnedPool:
    """Reusable pinned host buffers, so each batch's device-to-host copy is asynchronous."""

    def __init__(self):
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.dtype == dtype and buf.numel() >= numel:
                    return self._free.pop(i)
        return torch.empty(int(numel * 1.25) + 1, dtype=dtype, pin_memory=True)

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)


@dataclass
class _Transfer:
    """Hidden states of one batch on their way to the host."""

    host: torch.Tensor            # (n_layers, n_tokens, hidden) on the CPU, maybe a pinned-buffer view
    event: Any                    # CUDA event to wait for, or None
    pooled: torch.Tensor | None   # the pinned buffer to give back
    batch: PreparedBatch


def gather(hidden_states: Sequence[torch.Tensor], layers: Sequence[int], batch: PreparedBatch,
           pool: _PinnedPool | None) -> _Transfer:
    """Select the real tokens (vision then text, sample by sample) of the stored layers.

    The selection happens on the device, so only the needed values cross to the host, in one
    copy per batch.
    """
    first = hidden_states[0]
    bsz, seq, hidden = first.shape
    flat = []
    for b, ps in enumerate(batch.samples):
        flat.append(b * seq + ps.tokens.vision_position)
        flat.append(b * seq + ps.tokens.text_position)
    index = torch.from_numpy(np.concatenate(flat)).to(first.device, non_blocking=True)
    out = torch.empty((len(layers), index.numel(), hidden), dtype=first.dtype, device=first.device)
    for j, layer in enumerate(layers):
        torch.index_select(hidden_states[layer].reshape(bsz * seq, hidden), 0, index, out=out[j])
    if out.device.type == "cpu":
        return _Transfer(out, None, None, batch)
    if out.device.type == "cuda" and pool is not None:
        buf = pool.get(out.numel(), out.dtype)
        host = buf[: out.numel()].view(out.shape)
        host.copy_(out, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Transfer(host, event, buf, batch)
    return _Transfer(out.to("cpu"), None, None, batch)


@dataclass
class RunStats:
    """What a run did, for the log and the benchmark."""

    samples: int = 0
    batches: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0      # CPU time of the whole process (all threads) during the loop
    truncated: int = 0
    tokens: int = 0
    commits: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def _batches(samples: Sequence[Sample], size: int) -> Iterator[list[Sample]]:
    for i in range(0, len(samples), size):
        yield list(samples[i:i + size])


class _Thread(threading.Thread):
    """A daemon thread whose exception is kept for the main thread to re-raise."""

    def __init__(self, target: Callable[[], None], name: str):
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc


def run(
    info: ModelInfo,
    samples: Sequence[Sample],
    *,
    layers: Sequence[int],
    batch_size: int,
    layout: PromptLayout,
    make_record: Callable[[PreparedSample, np.ndarray, np.ndarray], Any],
    append: Callable[[list[Any]], None],
    commit: Callable[[], None],
    commit_every: int | None = None,
    commit_seconds: float = 120.0,
    max_text_tokens: int | None = None,
    progress: bool = True,
    queue_depth: int = 2,
) -> RunStats:
    """Extract `samples` batch by batch; `append` receives records, `commit` makes them durable.

    `make_record(prepared, vision, text)` builds one archive record from a sample's bookkeeping
    and its (n_layers, n, hidden) arrays. Commits happen every `commit_every` samples (if given),
    at least every `commit_seconds`, and at the end. If anything fails, the batches that were
    completely extracted are still committed before the error propagates, and nothing of a
    partial batch is.
    """
    from tqdm.auto import tqdm

    model = info.model
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    max_pos = _max_positions(model)
    preparer = BatchPreparer(info.processor, info.image_token_id, layout, max_text_tokens=max_text_tokens,
                             max_positions=max_pos, accepts=set(inspect.signature(model.forward).parameters))
    kwargs = forward_kwargs(model)
    drop_mask = drops_attention_mask(model)
    pool = _PinnedPool() if device.type == "cuda" else None
    stats = RunStats()
    prepared_q: queue.Queue = queue.Queue(maxsize=queue_depth)
    transfer_q: queue.Queue = queue.Queue(maxsize=queue_depth)
    stop = threading.Event()
    bar = tqdm(total=len(samples), unit="sample", disable=not progress, dynamic_ncols=True,
               desc="extract", smoothing=0.1)

    def produce() -> None:
        try:
            for chunk in _batches(samples, batch_size):
                if stop.is_set():
                    return
                item = preparer.prepare(chunk)
                while not stop.is_set():
                    try:
                        prepared_q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        finally:
            prepared_q.put(_STOP)

    def consume() -> None:
        pending = 0
        last_commit = time.monotonic()
        while True:
            item = transfer_q.get()
            if item is _STOP:
                return
            if item.event is not None:
                item.event.synchronize()
            host = item.host
            if host.dtype == torch.bfloat16:
                arr = host.float().numpy()      # exact: every bfloat16 is a float32
            elif item.pooled is not None:
                arr = host.numpy().copy()       # the pinned buffer goes back to the pool
            else:
                arr = host.numpy()
            if item.pooled is not None:
                pool.put(item.pooled)
            records, offset = [], 0
            for ps in item.batch.samples:
                nv, nt = ps.tokens.vision_position.size, ps.tokens.text_position.size
                records.append(make_record(ps, arr[:, offset:offset + nv], arr[:, offset + nv:offset + nv + nt]))
                offset += nv + nt
            append(records)
            stats.samples += len(records)
            stats.batches += 1
            stats.tokens += offset
            stats.truncated += sum(ps.truncated for ps in item.batch.samples)
            pending += len(records)
            now = time.monotonic()
            if (commit_every and pending >= commit_every) or now - last_commit >= commit_seconds:
                commit()
                stats.commits += 1
                pending, last_commit = 0, now
            bar.update(len(records))

    producer = _Thread(produce, "mir-prefetch")
    writer = _Thread(consume, "mir-writer")
    t0, c0 = time.perf_counter(), time.process_time()
    producer.start()
    writer.start()
    failure: BaseException | None = None
    try:
        with torch.inference_mode():
            while True:
                item = _get(prepared_q, producer, writer)
                if item is _STOP:
                    if producer.error is not None:
                        raise producer.error
                    break
                inputs = to_device(item.inputs, device, dtype)
                if drop_mask:
                    inputs.pop("attention_mask", None)
                out = model(**inputs, **kwargs)
                hidden_states = out.hidden_states
                if hidden_states is None or len(hidden_states) <= max(layers):
                    n = 0 if hidden_states is None else len(hidden_states)
                    raise ModelError(f"the model returned {n} hidden states; layer {max(layers)} was requested")
                transfer = gather(hidden_states, layers, item, pool)
                del out, hidden_states
                _put(transfer_q, transfer, writer)
    except BaseException as exc:  # noqa: BLE001 - re-raised below after a clean shutdown
        failure = exc
    finally:
        stop.set()
        _drain(prepared_q)
        _put(transfer_q, _STOP, writer)
        writer.join()
        producer.join()
        bar.close()
    if writer.error is not None:
        raise writer.error  # the archive keeps its last commit; the writer's partial batch is dropped
    commit()  # every batch the writer thread received is complete
    stats.commits += 1
    stats.seconds = time.perf_counter() - t0
    stats.cpu_seconds = time.process_time() - c0
    if failure is not None:
        raise failure
    return stats


def _get(q: queue.Queue, producer: _Thread, writer: _Thread):
    while True:
        if writer.error is not None:
            raise ExtractError(f"writing failed: {writer.error}") from writer.error
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            continue


def _put(q: queue.Queue, item: Any, writer: _Thread) -> None:
    while True:
        if writer.error is not None or not writer.is_alive():
            return
        try:
            q.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


def _max_positions(model_or_config: Any) -> int | None:
    config = getattr(model_or_config, "config", model_or_config)
    for sub in (getattr(config, "text_config", None), config):
        value = getattr(sub, "max_position_embeddings", None) if sub is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None
