"""Synthetic archives with realistic LVLM-like activations, written through the real writer.

Per layer, vision and text tokens come from clearly different Gaussians: different means,
scales and anisotropic (low-rank + diagonal) covariances, a few "massive activation" channels,
and a small share of heavy-norm outlier tokens, as seen in real LVLM hidden states. Sizes are
free, so tests and benchmarks get realistic data of any size without a GPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .records import SampleRecord
from .schema import MODALITIES, STORED_DTYPE, TextRole
from .writer import ArchiveWriter

OUTLIER_SHARE = 0.005
OUTLIER_GAIN = 25.0
RANK = 16
BEFORE_IMAGE_TOKENS = 4
TEMPLATE_TOKENS = 3


class _LayerModel:
    """Mean and low-rank+diagonal covariance factors of one modality at one layer."""

    def __init__(self, rng: np.random.Generator, hidden: int, layer: int, modality: str):
        depth = 1.0 + 0.3 * layer
        offset = 0.0 if modality == "text" else 1.5
        self.mean = rng.normal(offset, 0.5, hidden) * depth
        massive = rng.choice(hidden, size=max(1, hidden // 256), replace=False)
        self.mean[massive] += rng.choice([-1, 1], massive.size) * 20.0 * depth
        self.factors = rng.normal(0, 1.0, (RANK, hidden)) * (np.geomspace(2.0, 0.1, RANK)[:, None]) * depth
        self.noise = rng.gamma(2.0, 0.25, hidden) * (0.5 if modality == "vision" else 1.0) * depth

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = rng.standard_normal((n, RANK), dtype=np.float32) @ self.factors.astype(np.float32)
        x += rng.standard_normal((n, self.mean.size), dtype=np.float32) * self.noise.astype(np.float32)
        x += self.mean.astype(np.float32)
        outliers = rng.random(n) < OUTLIER_SHARE
        x[outliers] *= OUTLIER_GAIN
        return x


def _to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # round to nearest even bfloat16, kept in float32
        bits = x.astype(np.float32).view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32)
    return x.astype(STORED_DTYPE[dtype])


def synthetic_records(*, layers: int, hidden: int, samples: int, vision_tokens: int, text_tokens: int,
                      seed: int, dtype: str = "float16", start: int = 0):
    """Yield SampleRecords for samples start..samples-1; deterministic in `seed` for each sample."""
    model_rng = np.random.default_rng(seed)
    models = {m: [_LayerModel(model_rng, hidden, k, m) for k in range(layers + 1)] for m in MODALITIES}
    for i in range(start, samples):
        rng = np.random.default_rng([seed, i])
        n_text = max(BEFORE_IMAGE_TOKENS + TEMPLATE_TOKENS + 1, int(rng.poisson(max(text_tokens, 1))))
        n_response = n_text - BEFORE_IMAGE_TOKENS - TEMPLATE_TOKENS
        seq = BEFORE_IMAGE_TOKENS + vision_tokens + TEMPLATE_TOKENS + n_response
        vis = np.stack([models["vision"][k].draw(rng, vision_tokens) for k in range(layers + 1)])
        txt = np.stack([models["text"][k].draw(rng, n_text) for k in range(layers + 1)])
        roles = np.array([TextRole.BEFORE_IMAGE] * BEFORE_IMAGE_TOKENS + [TextRole.AFTER_IMAGE_TEMPLATE] *
                         TEMPLATE_TOKENS + [TextRole.RESPONSE] * n_response, dtype=np.int8)
        text_pos = np.concatenate([np.arange(BEFORE_IMAGE_TOKENS),
                                   np.arange(BEFORE_IMAGE_TOKENS + vision_tokens, seq)])
        input_ids = rng.integers(10, 32000, seq)
        input_ids[BEFORE_IMAGE_TOKENS:BEFORE_IMAGE_TOKENS + vision_tokens] = 32000  # the image token
        yield SampleRecord(
            sample_id=f"synth-{i:06d}", image=f"synthetic://image/{i}", text=f"synthetic://text/{i}",
            vision=_to_dtype(vis, dtype), vision_position=np.arange(BEFORE_IMAGE_TOKENS,
                                                                    BEFORE_IMAGE_TOKENS + vision_tokens),
            text_hidden=_to_dtype(txt, dtype), text_position=text_pos, text_token_id=input_ids[text_pos],
            text_role=roles, input_ids=input_ids)


def write_synthetic_archive(path: str | Path, *, layers: int, hidden: int, samples: int, vision_tokens: int,
                            text_tokens: int, seed: int, dtype: str = "float16", overwrite: bool = False,
                            **writer_options) -> Path:
    """Write a synthetic archive of `layers` decoder layers plus the embeddings (layer 0)."""
    attrs = {
        "model": {"name_or_path": "synthetic", "architecture": "synthetic", "dtype": dtype,
                  "num_hidden_layers": layers, "hidden_size": hidden, "image_token_id": 32000},
        "extraction": {"prompt_layout": "synthetic", "text_token_rule": "after_image", "tool": "mir synth",
                       "settings": {"vision_tokens": vision_tokens, "text_tokens": text_tokens, "seed": seed}},
        "dataset": {"sources": ["synthetic"], "samples": samples},
    }
    with ArchiveWriter.create(path, layers=list(range(layers + 1)), hidden_size=hidden, dtype=dtype, attrs=attrs,
                              overwrite=overwrite, **writer_options) as writer:
        for record in synthetic_records(layers=layers, hidden=hidden, samples=samples,
                                        vision_tokens=vision_tokens, text_tokens=text_tokens, seed=seed,
                                        dtype=dtype):
            writer.append([record])
    return Path(path)
