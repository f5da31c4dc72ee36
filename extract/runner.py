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

from .data import Sample
from .errors import ExtractError, ModelError
from .loading import ModelInfo
from .batching import BatchPreparer, PreparedBatch, PreparedSample, max_positions
from .prompts import PromptLayout

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
    max_pos = max_positions(model)
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
