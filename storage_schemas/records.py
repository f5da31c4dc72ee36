"""One sample's activations as the writer receives them, and the checks they must pass."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .schema import ArchiveError, TextRole


@dataclass
class SampleRecord:
    """Everything stored for one sample: all stored layers of its vision and non-image tokens.

    `vision` and `text_hidden` are (n_layers, n_tokens, hidden). bfloat16 model output is passed
    as float32 (exact; the writer checks that its low 16 bits are zero) or as its raw bits (uint16,
    see `is_bfloat16_bits`): the writer then widens it to float32 only as it copies it into a shard,
    so no float32 copy of a whole batch exists (at the paper's shape that is 1.5 GiB).
    """

    sample_id: str
    image: str
    text: str
    vision: np.ndarray
    vision_position: np.ndarray
    text_hidden: np.ndarray
    text_position: np.ndarray
    text_token_id: np.ndarray
    text_role: np.ndarray
    input_ids: np.ndarray

    @property
    def n_vision(self) -> int:
        return int(self.vision.shape[1])

    @property
    def n_text(self) -> int:
        return int(self.text_hidden.shape[1])

    def check(self, *, n_layers: int, hidden_size: int, stored_dtype: str, source_dtype: str,
              allow_nonfinite: bool = False) -> None:
        """Raise ArchiveError naming the sample if anything would store a wrong or unreadable value."""
        who = f"sample {self.sample_id!r}"
        if not isinstance(self.sample_id, str) or not self.sample_id:
            raise ArchiveError(f"{who}: sample_id must be a non-empty string")
        for name in ("vision", "text_hidden"):
            arr = getattr(self, name)
            if arr.ndim != 3 or arr.shape[0] != n_layers or arr.shape[2] != hidden_size:
                raise ArchiveError(
                    f"{who}: {name} has shape {arr.shape}, expected ({n_layers}, tokens, {hidden_size})")
            bits = source_dtype == "bfloat16" and is_bfloat16_bits(arr)
            if arr.dtype != np.dtype(stored_dtype) and not bits:
                raise ArchiveError(f"{who}: {name} is {arr.dtype}, the archive stores {stored_dtype}"
                                   + (" (or bfloat16 bits as uint16)" if source_dtype == "bfloat16" else ""))
            if source_dtype == "bfloat16" and not bits and arr.size and not _low_halves_zero(arr):
                raise ArchiveError(f"{who}: {name} holds values that are not bfloat16; refusing to store "
                                   "them in a bfloat16-sourced archive")
            if not allow_nonfinite and arr.size and not _all_finite(arr):
                bad = int(sum((~np.isfinite(widen_bfloat16(layer) if bits else layer)).sum() for layer in arr))
                raise ArchiveError(f"{who}: {name} holds {bad} NaN/Inf values (the model overflowed in its "
                                   "dtype?); try --dtype float32")
        n_text = self.n_text
        for name, expected in (("vision_position", self.n_vision), ("text_position", n_text),
                               ("text_token_id", n_text), ("text_role", n_text)):
            arr = np.asarray(getattr(self, name))
            if arr.shape != (expected,):
                raise ArchiveError(f"{who}: {name} has shape {arr.shape}, expected ({expected},)")
        roles = np.asarray(self.text_role)
        if roles.size and (roles.min() < min(TextRole) or roles.max() > max(TextRole)):
            raise ArchiveError(f"{who}: text_role holds codes outside {[int(r) for r in TextRole]}")
        seq = np.asarray(self.input_ids)
        if seq.ndim != 1:
            raise ArchiveError(f"{who}: input_ids must be 1-D")
        positions = np.concatenate([np.asarray(self.vision_position), np.asarray(self.text_position)])
        if positions.size and (positions.min() < 0 or positions.max() >= seq.size):
            raise ArchiveError(f"{who}: token positions fall outside its {seq.size} input tokens")


def is_bfloat16_bits(arr: np.ndarray) -> bool:
    """Whether `arr` holds bfloat16 values as their raw 16 bits (what torch's bfloat16 looks like
    through `.view(torch.int16).numpy().view(np.uint16)`)."""
    return arr.dtype == np.uint16


def widen_bfloat16(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bits (uint16) as the float32 values they are (exact): the bits become the high half."""
    if out is None:
        out = np.empty(bits.shape, np.float32)
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


# The checks below run on every value the writer stores (hundreds of MB per sample at the paper's
# shape), so they go layer by layer without full-size temporaries: np.isfinite on float16 and a
# masked uint32 copy ran at 0.3-0.45 GB/s, these at 3-4 GB/s. A sample's values are a slice of its
# batch along the token axis, so the whole array is not contiguous but each layer of it is: a copy
# of the whole (up to a quarter GiB at the paper's shape) was the largest transient of a write.
def _rows(arr: np.ndarray, dtype):
    """Each layer's values, flat, reinterpreted as `dtype` (a copy only where a layer is strided)."""
    for layer in arr:
        yield np.ascontiguousarray(layer).reshape(-1).view(dtype)


def _all_finite(arr: np.ndarray) -> bool:
    if arr.dtype in (np.float16, np.uint16):  # finite iff the exponent bits are not all ones
        mask, inf = (0x7FFF, 0x7C00) if arr.dtype == np.float16 else (0x7FFF, 0x7F80)  # float16 / bfloat16
        tmp = np.empty(arr[0].size if len(arr) else 0, np.uint16)
        return all(np.bitwise_and(row, mask, out=tmp).max(initial=0) < inf for row in _rows(arr, np.uint16))
    return all(np.isfinite(row).all() for row in arr)


def _low_halves_zero(arr: np.ndarray) -> bool:
    """Whether every float32 value is a bfloat16 (its low 16 bits are zero; little endian)."""
    return not any(row[0::2].any() for row in _rows(arr.astype("<f4", copy=False), np.uint16))
