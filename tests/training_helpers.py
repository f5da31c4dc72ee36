"""Shared pieces of the training tests: a tiny LLaVA, a probe manifest, a toy training set.

Not collected. The training data are the probe's own prompts with labels = input ids; what is
learnt does not matter, only that the weights move between saves.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIZE = dict(hidden=32, layers=2)


def tiny_llava(directory: Path, seed: int = 0) -> Path:
    from extract.tiny_models import TinySize, build_tiny_model

    return build_tiny_model(directory, "llava", seed=seed, size=TinySize(**SIZE))


def probe_manifest(root: Path, n: int = 4) -> Path:
    """n seeded noise images with short texts, as a `mir extract --manifest` JSONL."""
    from PIL import Image

    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24 + 4 * i, 32, 3), dtype=np.uint8)).save(root / f"p{i}.png")
        rows.append({"id": f"probe{i}", "image": f"p{i}.png",
                     "text": f"Probe text {i}: the council met again. " * (1 + i % 2)})
    path = root / "probe.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class ToyDataset:
    """Processor outputs of a few image-text pairs, one per item (batch size 1, no padding)."""

    def __init__(self, processor, n: int = 4):
        from PIL import Image

        rng = np.random.default_rng(5)
        self.items = []
        for i in range(n):
            image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            prompt = f"{processor.image_token} Caption {i}: a noisy square."
            enc = processor(images=[image], text=[prompt], return_tensors="pt")
            item = {k: v[0] for k, v in enc.items()}
            item["labels"] = item["input_ids"].clone()
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def load(directory: Path):
    """Model (float32, train mode) and processor of a saved tiny model."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(directory), AutoProcessor.from_pretrained(directory)
