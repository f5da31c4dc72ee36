"""Shared helpers of the analyze tests: archives from hand-made arrays, and the comparison with the
independent float64 implementation in analyze_reference.py."""
from __future__ import annotations

import math

import numpy as np

from analyze import AnalysisOptions, analyze_selection
from analyze_reference import layer_fd, lower_median
from storage_schemas import ArchiveWriter, SampleRecord, TextRole, open_archive

FD_RTOL = 1e-5
MIR_ATOL = 1e-6


def stored_values(x: np.ndarray, dtype: str) -> np.ndarray:
    """x as an archive of `dtype` stores it: float16, float32, or bfloat16 values (nearest even) in float32."""
    if dtype == "bfloat16":
        bits = x.astype(np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return x.astype(np.float16 if dtype == "float16" else np.float32)


def write_arrays(path, vision: list[np.ndarray], text: list[np.ndarray], *, layers: list[int] | None = None,
                 dtype: str = "float16", chunk_tokens: int = 16, chunks_per_shard: int = 2):
    """One sample per (vision[i], text[i]) pair, each (n_layers, tokens, d); all text tokens are 'response'."""
    n_layers, _, d = vision[0].shape
    layers = layers if layers is not None else list(range(n_layers))
    with ArchiveWriter.create(path, layers=layers, hidden_size=d, dtype=dtype, attrs={"model": {"name_or_path": "t"}},
                              chunk_tokens=chunk_tokens, chunks_per_shard=chunks_per_shard) as w:
        for i, (v, t) in enumerate(zip(vision, text)):
            nv, nt = v.shape[1], t.shape[1]
            seq = nv + nt
            w.append([SampleRecord(
                sample_id=f"s{i:04d}", image=f"img{i}.png", text=f"text-{i}", vision=stored_values(v, dtype),
                vision_position=np.arange(nv), text_hidden=stored_values(t, dtype), text_position=np.arange(nv, seq),
                text_token_id=np.full(nt, 7), text_role=np.full(nt, TextRole.RESPONSE, np.int8),
                input_ids=np.arange(seq))])
    return path


def reference_layers(selection) -> list[dict]:
    """Independent float64 results, one dict per selected layer (reads everything into memory)."""
    out = []
    for i in range(len(selection.layers)):
        v = np.asarray(selection.vision.data[i].compute())
        t = np.asarray(selection.text.data[i].compute())
        ref = layer_fd(v, t)
        ref["median_v"] = lower_median(v.astype(np.float64), axis=0)
        ref["median_t"] = lower_median(t.astype(np.float64), axis=0)
        out.append(ref)
    return out


def assert_matches_reference(selection, result, refs: list[dict] | None = None) -> list[dict]:
    refs = refs if refs is not None else reference_layers(selection)
    total = 0.0
    for ref, got in zip(refs, result.layers):
        assert got["vision"]["outliers"] == ref["outliers_v"], got["layer"]
        assert got["text"]["outliers"] == ref["outliers_t"], got["layer"]
        assert math.isclose(got["scale"], ref["scale"], rel_tol=1e-12)
        assert abs(got["fd"] - ref["fd"]) <= FD_RTOL * abs(ref["fd"]), (got["layer"], got["fd"], ref["fd"])
        total += ref["fd"]
    assert abs(result.mir - math.log10(total)) <= MIR_ATOL
    return refs


def analyze_path(path, options: AnalysisOptions | None = None, **select):
    archive = open_archive(path)
    selection = archive.select(**select)
    return selection, analyze_selection(selection, options or AnalysisOptions(cache=False))
