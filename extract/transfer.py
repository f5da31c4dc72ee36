"""Hidden states from the device to the host: the tokens of the stored layers, one copy per batch.

The selection (real tokens, stored layers) happens on the device so only the needed values cross
to the host; on CUDA the copy goes into reusable pinned buffers and is asynchronous, so the
forward pass of the next batch starts at once.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batching import PreparedBatch


class PinnedPool:
    """Reusable host buffers (page-locked when `pin`), so each device-to-host copy is asynchronous."""

    def __init__(self, pin: bool = True):
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._pin = pin

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.dtype == dtype and buf.numel() >= numel:
                    return self._free.pop(i)
        return torch.empty(int(numel * 1.25) + 1, dtype=dtype, pin_memory=self._pin)

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)


@dataclass
class Transfer:
    """Hidden states of one batch on their way to the host."""

    host: torch.Tensor            # (n_layers, n_tokens, hidden) on the CPU, maybe a pooled-buffer view
    event: Any                    # CUDA event to wait for, or None
    pooled: torch.Tensor | None   # the pooled buffer to give back
    batch: PreparedBatch

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()

    def to_numpy(self) -> np.ndarray:
        """Wait for the copy; the values as numpy, without a copy: the caller gives a pooled buffer
        back once it is done with them. numpy has no bfloat16, so bfloat16 comes as its raw bits
        (uint16), which the archive writer widens to float32 shard by shard: a float32 copy of the
        batch here would double the host memory of a bfloat16 run."""
        if self.event is not None:
            self.event.synchronize()
        if self.host.dtype == torch.bfloat16:
            return self.host.view(torch.int16).numpy().view(np.uint16)
        return self.host.numpy()


def gather(hidden_states: Sequence[torch.Tensor], layers: Sequence[int], batch: PreparedBatch,
           pool: PinnedPool | None) -> Transfer:
    """Select the real tokens (vision then text, sample by sample) of the stored layers."""
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
        return Transfer(out, None, None, batch)
    if out.device.type == "cuda" and pool is not None:
        buf = pool.get(out.numel(), out.dtype)
        host = buf[: out.numel()].view(out.shape)
        host.copy_(out, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Transfer(host, event, buf, batch)
    return Transfer(out.to("cpu"), None, None, batch)
