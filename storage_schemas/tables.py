"""The small arrays of committed samples: per-token bookkeeping and the samples table.

A commit writes these for the samples whose hidden states are already on disk (stream.py), then
the commit record; they are small (bytes per token against kilobytes of hidden states).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from .records import SampleRecord
from .schema import COMMIT_KEYS, SAMPLES_GROUP
from .stream import WriteFn


@dataclass(frozen=True)
class Pending:
    """An accepted sample without its hidden states (those went to the token streams)."""

    sample_id: str
    image: str
    text: str
    n_vision: int
    n_text: int
    vision_position: np.ndarray
    text_position: np.ndarray
    text_token_id: np.ndarray
    text_role: np.ndarray
    input_ids: np.ndarray

    @classmethod
    def of(cls, rec: SampleRecord) -> "Pending":
        return cls(rec.sample_id, rec.image, rec.text, rec.n_vision, rec.n_text,
                   *(np.array(x, copy=True) for x in (rec.vision_position, rec.text_position, rec.text_token_id,
                                                      rec.text_role, rec.input_ids)))


def write_tables(group: zarr.Group, commit: dict, records: list[Pending], write: WriteFn) -> dict:
    """Write the per-token and per-sample arrays of `records` past the commit record (their hidden
    states are already on disk); return the record that commits them."""
    n0, v0, t0, i0 = (commit[k] for k in COMMIT_KEYS)
    n_vis = np.array([r.n_vision for r in records], dtype=np.int64)
    n_txt = np.array([r.n_text for r in records], dtype=np.int64)
    n_inp = np.array([r.input_ids.size for r in records], dtype=np.int64)
    rows = np.arange(n0, n0 + len(records), dtype=np.int64)
    token_data = {
        "vision": {"sample": np.repeat(rows, n_vis),
                   "position": np.concatenate([r.vision_position for r in records]).astype("int32")},
        "text": {"sample": np.repeat(rows, n_txt),
                 "position": np.concatenate([r.text_position for r in records]).astype("int32"),
                 "token_id": np.concatenate([r.text_token_id for r in records]).astype("int64"),
                 "role": np.concatenate([r.text_role for r in records]).astype("int8")},
    }
    starts = {"vision": v0, "text": t0}
    for modality, variables in token_data.items():
        for name, values in variables.items():
            write(group[f"{modality}/{name}"], 0, starts[modality], values)
    table = {
        "sample_id": np.array([r.sample_id for r in records], dtype=object),
        "image": np.array([r.image for r in records], dtype=object),
        "text": np.array([r.text for r in records], dtype=object),
        "vision_offset": v0 + np.concatenate([[0], np.cumsum(n_vis)[:-1]]),
        "vision_count": n_vis,
        "text_offset": t0 + np.concatenate([[0], np.cumsum(n_txt)[:-1]]),
        "text_count": n_txt,
        "input_offset": i0 + np.concatenate([[0], np.cumsum(n_inp)[:-1]]),
        "input_length": n_inp,
    }
    for name, values in table.items():
        write(group[f"{SAMPLES_GROUP}/{name}"], 0, n0, values)
    write(group[f"{SAMPLES_GROUP}/input_ids"], 0, i0,
                  np.concatenate([r.input_ids.astype(np.int64) for r in records]))
    return {"samples": n0 + len(records), "vision_tokens": v0 + int(n_vis.sum()),
            "text_tokens": t0 + int(n_txt.sum()), "input_tokens": i0 + int(n_inp.sum())}
