"""Per-value statistics the scan collects beside the norms: the sum of the unit-normalised rows (for the
modality-gap vector of Liang et al., "Mind the Gap", NeurIPS 2022) and the massive activations of Sun et
al. ("Massive Activations in Large Language Models", 2024): the top-k |h| with their row and channel,
every channel's maximum |h|, and a histogram of |h| from which the median |h| is exact.

Why a histogram of bit patterns: |h| of float16 (and of bfloat16, stored as float32 with zero low bits)
has at most 2^15 distinct values, and for non-negative floats the order of the bit patterns is the order
of the values, so 2^15 counts give the exact lower median of all n x d values in one read, mergeable by
addition. True float32 has 2^31: the same histogram of its top 15 magnitude bits gives the median
truncated to bfloat16 precision (8 significant bits, relative error below 2^-7), reported with
`abs_median_exact = False`.

Everything here is small per partial (2^15 + 2 d + 3 k numbers) and combines exactly (sums, maxima, a
merge of top-k lists), so it rides along the one read at the cost of a few operations per value.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOP_K = 10  # top |h| entries kept per layer and modality
KEYS = 1 << 15  # magnitude keys: 15 bits
MASSIVE_RATIOS = (100.0, 1000.0)  # Sun et al.: a massive activation exceeds 100x (and 1000x) the median |h|


def magnitude_keys(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """|h| as 15-bit keys in value order, and whether a key is the value itself (16-bit formats)."""
    if x.dtype == np.float16:
        return x.view(np.uint16) & np.uint16(0x7FFF), True
    bits = x.view(np.uint32)
    exact = not np.any(bits & np.uint32(0xFFFF))
    return ((bits >> np.uint32(16)) & np.uint32(0x7FFF)).astype(np.uint16), exact


def key_value(key: int, dtype: np.dtype) -> float:
    """The |h| a key stands for (for float32: the value truncated to its top 16 bits)."""
    if np.dtype(dtype) == np.float16:
        return float(np.array([key], np.uint16).view(np.float16)[0])
    return float(np.array([key << 16], np.uint32).view(np.float32)[0])


@dataclass(frozen=True)
class ActivationPartial:
    """The per-value statistics of some consecutive rows of one unit (a layer and modality)."""

    unit_sum: np.ndarray  # (d,) float64: sum of x_i / ||x_i|| (rows of norm 0 add nothing)
    abs_hist: np.ndarray  # (2^15,) int64: counts of |h| keys
    exact: bool  # every key is its value (float16, bfloat16)
    channel_max: np.ndarray  # (d,) float64: max |h| per channel
    top_value: np.ndarray  # (<= k,) float64, descending
    top_row: np.ndarray  # (<= k,) int64: row in the unit
    top_channel: np.ndarray  # (<= k,) int64

    def combine(self, other: "ActivationPartial") -> "ActivationPartial":
        value = np.concatenate([self.top_value, other.top_value])
        row = np.concatenate([self.top_row, other.top_row])
        channel = np.concatenate([self.top_channel, other.top_channel])
        keep = top_order(value, row, channel)
        return ActivationPartial(self.unit_sum + other.unit_sum, self.abs_hist + other.abs_hist,
                                 self.exact and other.exact, np.maximum(self.channel_max, other.channel_max),
                                 value[keep], row[keep], channel[keep])


def top_order(value: np.ndarray, row: np.ndarray, channel: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices of the k largest values, largest first; ties by row, then channel (deterministic)."""
    return np.lexsort((channel, row, -value))[:k]


def activation_partial(x: np.ndarray, norms: np.ndarray, start: int) -> ActivationPartial:
    """The statistics of rows x (stored dtype) whose norms are known; `start`: first row in the unit.
    numpy: the fallback without numba and the reference the compiled kernels are tested against."""
    n, d = x.shape
    keys, exact = magnitude_keys(x)
    hist = np.bincount(keys.ravel(), minlength=KEYS).astype(np.int64)
    unit_sum = np.zeros(d)
    channel_max = np.zeros(d)
    best = (np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
    inverse = np.divide(1.0, norms, out=np.zeros(n), where=norms > 0)
    for lo in range(0, n, 1024):
        rows = x[lo:lo + 1024].astype(np.float64)
        unit_sum += inverse[lo:lo + 1024] @ rows
        mags = np.abs(rows)
        channel_max = np.maximum(channel_max, mags.max(axis=0, initial=0.0))
        flat = mags.ravel()
        pick = np.arange(flat.size)
        if flat.size > TOP_K:  # every value tied with the k-th largest stays a candidate (ties: top_order)
            pick = np.flatnonzero(flat >= np.partition(flat, flat.size - TOP_K)[flat.size - TOP_K])
        value = np.concatenate([best[0], flat[pick]])
        row = np.concatenate([best[1], pick // d + lo + start])
        channel = np.concatenate([best[2], pick % d])
        keep = top_order(value, row, channel)
        best = (value[keep], row[keep], channel[keep])
    return ActivationPartial(unit_sum, hist, exact, channel_max, *best)


@dataclass
class ActivationStats:
    """A unit's per-value statistics, finished: what ModalityStats keeps and the cache stores."""

    unit_sum: np.ndarray  # (d,)
    abs_median: float  # lower median of |h| over all n x d values (raw units)
    abs_median_exact: bool
    channel_max: np.ndarray  # (d,)
    top_value: np.ndarray  # (k,)
    top_row: np.ndarray  # (k,) row in the unit
    top_channel: np.ndarray  # (k,)
    top_sample: list[str] = field(default_factory=list)  # sample id of each top entry (set by the engine)
    top_position: list[int] = field(default_factory=list)  # its token position in the prompt
    top_role: list[str] = field(default_factory=list)  # 'image', or the text token's role

    @classmethod
    def finish(cls, part: ActivationPartial, dtype: np.dtype) -> "ActivationStats":
        total = int(part.abs_hist.sum())
        key = int(np.searchsorted(np.cumsum(part.abs_hist), (total - 1) // 2 + 1))
        return cls(part.unit_sum, key_value(key, dtype), part.exact, part.channel_max, part.top_value,
                   part.top_row, part.top_channel)

    def massive_channels(self, ratio: float) -> np.ndarray:
        """Channels whose max |h| exceeds ratio x the median |h|, largest first."""
        hit = np.flatnonzero(self.channel_max > ratio * self.abs_median)
        return hit[np.argsort(-self.channel_max[hit], kind="stable")]

    def label_rows(self, sample_id: np.ndarray, position: np.ndarray, role: np.ndarray) -> None:
        """Name the top entries' tokens from the unit's per-token coordinates."""
        self.top_sample = [str(sample_id[r]) for r in self.top_row]
        self.top_position = [int(position[r]) for r in self.top_row]
        self.top_role = [str(role[r]) for r in self.top_row]

    def to_json(self) -> dict:
        return {"abs_median": self.abs_median, "abs_median_exact": self.abs_median_exact,
                "top_value": self.top_value.tolist(), "top_row": self.top_row.tolist(),
                "top_channel": self.top_channel.tolist(), "top_sample": self.top_sample,
                "top_position": self.top_position, "top_role": self.top_role}

    @classmethod
    def from_json(cls, doc: dict, unit_sum: np.ndarray, channel_max: np.ndarray) -> "ActivationStats":
        return cls(np.asarray(unit_sum, np.float64), float(doc["abs_median"]), bool(doc["abs_median_exact"]),
                   np.asarray(channel_max, np.float64), np.asarray(doc["top_value"], np.float64),
                   np.asarray(doc["top_row"], np.int64), np.asarray(doc["top_channel"], np.int64),
                   list(doc["top_sample"]), list(doc["top_position"]), list(doc["top_role"]))


def massive_summary(act: ActivationStats) -> dict:
    """The per-layer-and-modality numbers of Sun et al.'s massive activations (raw units): the median |h|,
    the channels whose max |h| exceeds 100x / 1000x it (count, and the 100x ones largest first as text),
    and the top-k |h| with channel, sample id, token position and role (vectors along `top`)."""
    over = {ratio: act.massive_channels(ratio) for ratio in MASSIVE_RATIOS}
    k = len(act.top_value)
    pad = TOP_K - k
    return {
        "abs_median": act.abs_median, "abs_median_exact": act.abs_median_exact,
        "massive_channels_100x": len(over[100.0]), "massive_channels_1000x": len(over[1000.0]),
        "massive_channel_list": " ".join(str(c) for c in over[100.0]),
        "top_abs": np.pad(act.top_value, (0, pad), constant_values=np.nan),
        "top_abs_ratio": np.pad(act.top_value / act.abs_median if act.abs_median > 0 else
                                np.full(k, np.inf), (0, pad), constant_values=np.nan),
        "top_channel": np.pad(act.top_channel, (0, pad), constant_values=-1),
        "top_sample": np.array(act.top_sample + [""] * pad),
        "top_position": np.pad(np.asarray(act.top_position, np.int64), (0, pad), constant_values=-1),
        "top_role": np.array(act.top_role + [""] * pad),
    }
