"""The extraction loop: batched forward passes whose hidden states go to an archive.

Three stages run at once so the accelerator never waits on Python or disk:
  1. a prefetch thread decodes images, renders prompts and runs the processor for batch k+1;
  2. the main thread runs the forward pass of batch k (forward only: no `generate`, no attention
     maps), gathers the real tokens of the stored layers on the device, and starts an
     asynchronous device-to-host copy into pinned memory (transfer.py);
  3. a writer thread waits for that copy, splits it into per-sample records and appends them to
     the archive, committing as writing.py's policy says (compression and disk writes happen there).
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
from dataclasses import dataclass
from typing import Any

import torch

from .batching import BatchPreparer, PreparedBatch, max_positions
from .data import Sample
from .errors import ExtractError, ModelError
from .loading import ModelInfo
from .prompts import PromptLayout
from .transfer import PinnedPool, gather
from .writing import STOP, CommitPolicy, MakeRecord, RunStats, Sink, WriterStage

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


@dataclass
class Forward:
    """The model's forward pass as extraction calls it: device, dtype, kwargs and mask policy."""

    model: Any
    device: torch.device
    dtype: torch.dtype
    kwargs: dict[str, Any]
    drop_mask: bool

    @classmethod
    def of(cls, model: Any) -> "Forward":
        param = next(model.parameters())
        return cls(model, param.device, param.dtype, forward_kwargs(model), drops_attention_mask(model))

    def hidden_states(self, batch: PreparedBatch, layers: Sequence[int]):
        inputs = to_device(batch.inputs, self.device, self.dtype)
        if self.drop_mask:
            inputs.pop("attention_mask", None)
        out = self.model(**inputs, **self.kwargs)
        hidden = out.hidden_states
        if hidden is None or len(hidden) <= max(layers):
            n = 0 if hidden is None else len(hidden)
            raise ModelError(f"the model returned {n} hidden states; layer {max(layers)} was requested")
        return hidden


def _prefetch(preparer: BatchPreparer, samples: Sequence[Sample], batch_size: int, out: queue.Queue,
              stop: threading.Event) -> None:
    """The prefetch thread's body: prepared batches into `out` until done or stopped, then STOP."""
    try:
        for chunk in _batches(samples, batch_size):
            if stop.is_set():
                return
            item = preparer.prepare(chunk)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
    finally:
        out.put(STOP)


def run(
    info: ModelInfo,
    samples: Sequence[Sample],
    *,
    layers: Sequence[int],
    batch_size: int,
    layout: PromptLayout,
    make_record: MakeRecord,
    sink: Sink,
    commit_every: int | None = None,
    commit_seconds: float = 120.0,
    max_text_tokens: int | None = None,
    progress: bool = True,
    queue_depth: int = 2,
    host_batches: int = 2,
) -> RunStats:
    """Extract `samples` batch by batch into `sink` (an ArchiveWriter); return what was done.

    `make_record(prepared, vision, text)` builds one archive record from a sample's bookkeeping
    and its (n_layers, n, hidden) arrays; writing.CommitPolicy says when samples are committed.
    If anything fails, the batches that were completely extracted are still committed before the
    error propagates, and nothing of a partial batch is. At most `host_batches` batches of hidden
    states are on the host at once (copied, queued or being written), which bounds host memory.
    """
    from tqdm.auto import tqdm

    forward = Forward.of(info.model)
    preparer = BatchPreparer(info.processor, info.image_token_id, layout, max_text_tokens=max_text_tokens,
                             max_positions=max_positions(info.model),
                             accepts=set(inspect.signature(info.model.forward).parameters))
    pool = PinnedPool() if forward.device.type == "cuda" else None
    stats = RunStats()
    prepared_q: queue.Queue = queue.Queue(maxsize=queue_depth)
    transfer_q: queue.Queue = queue.Queue()  # bounded by `on_host`
    on_host = threading.BoundedSemaphore(host_batches)
    stop = threading.Event()
    bar = tqdm(total=len(samples), unit="sample", disable=not progress, dynamic_ncols=True,
               desc="extract", smoothing=0.1)
    stage = WriterStage(sink, make_record, CommitPolicy(commit_every, commit_seconds), stats, pool, bar.update,
                        on_host.release)
    producer = _Thread(lambda: _prefetch(preparer, samples, batch_size, prepared_q, stop), "mir-prefetch")
    writer = _Thread(lambda: stage.consume(transfer_q), "mir-writer")
    t0, c0 = time.perf_counter(), time.process_time()
    producer.start()
    writer.start()
    failure: BaseException | None = None
    try:
        with torch.inference_mode():
            while (item := _get(prepared_q, writer)) is not STOP:
                hidden_states = forward.hidden_states(item, layers)
                if not _acquire(on_host, writer):
                    break  # the writer failed; its error is raised below
                transfer = gather(hidden_states, layers, item, pool)
                del hidden_states
                transfer_q.put(transfer)
        if producer.error is not None:
            raise producer.error
    except BaseException as exc:  # noqa: BLE001 - re-raised below after a clean shutdown
        failure = exc
    finally:
        stop.set()
        _drain(prepared_q)
        _put(transfer_q, STOP, writer)
        writer.join()
        producer.join()
        bar.close()
    if writer.error is not None:
        raise writer.error  # the archive keeps its last commit; the writer's partial batch is dropped
    sink.flush()  # every batch the writer thread received is complete
    stats.commits += 1
    stats.seconds = time.perf_counter() - t0
    stats.cpu_seconds = time.process_time() - c0
    if failure is not None:
        raise failure
    return stats


def _get(q: queue.Queue, writer: _Thread):
    while True:
        if writer.error is not None:
            raise ExtractError(f"writing failed: {writer.error}") from writer.error
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            continue


def _acquire(slot: threading.BoundedSemaphore, writer: _Thread) -> bool:
    """Wait for room on the host; False if the writer died meanwhile."""
    while not slot.acquire(timeout=0.2):
        if writer.error is not None or not writer.is_alive():
            return False
    return True


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
