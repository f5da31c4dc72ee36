"""Shared pieces of the extraction tests: tiny models (built once per process), sample data,
an independent reference forward pass, and reading an archive back per sample.

The reference forward pass deliberately avoids extract's prompt and runner code: it renders the
prompt with the processor's own chat template, calls the processor and the model directly, and
derives the vision mask from the config's image token id.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

FAMILIES = ("llava", "llava_next", "qwen2_vl", "idefics3")

# Different sizes and aspect ratios: LLaVA-NeXT, Qwen2-VL and Idefics3 give each a different
# number of image tokens.
IMAGE_SIZES = [(32, 32), (40, 64), (64, 30), (50, 50), (20, 80), (90, 45), (33, 47), (64, 64)]
STORIES = [
    "The city council met on Tuesday to discuss the new budget.",
    "Scientists said the results were published this week.",
    "The weather was cold and wet, but the crowd stayed.",
    "Police said a man was taken to hospital after the accident.",
    "A new bridge opened over the river on Friday morning.",
    "The team won its third match in a row at home.",
    "Farmers expect a good harvest after a mild spring.",
    "The museum will show paintings from the collection.",
]

_ROOT = Path(tempfile.mkdtemp(prefix="mir-extract-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def tiny_model(family: str, dtype: str = "float32") -> Path:
    """A saved tiny model of `family` (built once per test process)."""
    from extract.tiny_models import build_tiny_model

    return build_tiny_model(_ROOT / f"model-{family}-{dtype}", family, seed=0, dtype=dtype)


def write_data(root: Path, n: int = 6, *, stories: bool = True) -> tuple[Path, Path]:
    """n images (varied sizes, seeded noise) and n texts (.story with highlights, or .txt)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    images, texts = root / "images", root / "texts"
    images.mkdir(parents=True, exist_ok=True)
    texts.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"img{i:02d}.png")
        body = STORIES[i % len(STORIES)]
        if stories:
            (texts / f"s{i:02d}.story").write_text(f"{body}\n\n@highlight\n\nA highlight that is not used\n")
        else:
            (texts / f"s{i:02d}.txt").write_text(body + "\n")
    return images, texts


@functools.lru_cache(maxsize=None)
def shared_data(n: int = 6) -> tuple[Path, Path]:
    return write_data(_ROOT / f"data-{n}", n)


def read_archive(path) -> dict[str, dict]:
    """Every sample of an archive as numpy arrays, keyed by sample id (committed prefix only)."""
    from storage_schemas import open_archive

    a = open_archive(path if isinstance(path, (list, tuple)) else str(path))
    s = a.samples
    vision, text = a.vision.hidden.values, a.text.hidden.values
    out = {}
    for i, sid in enumerate(s.sample_id.values.tolist()):
        vo, vc = int(s.vision_offset[i]), int(s.vision_count[i])
        to, tc = int(s.text_offset[i]), int(s.text_count[i])
        out[sid] = {
            "vision": vision[:, vo:vo + vc], "text": text[:, to:to + tc],
            "vision_position": a.vision.position.values[vo:vo + vc],
            "text_position": a.text.position.values[to:to + tc],
            "token_id": a.text.token_id.values[to:to + tc], "role": a.text.role.values[to:to + tc],
            "input_ids": np.asarray(a.sample_input_ids(i)), "image": str(s.image.values[i]),
            "text_ref": str(s.text.values[i]),
        }
    return out


def assert_same_contents(a: dict, b: dict, *, exact: bool = True, rel: float = 0.0) -> None:
    """Same samples in the same order with the same token bookkeeping; hidden states equal
    (exactly, or to `rel` times the largest magnitude)."""
    assert list(a) == list(b)
    for sid in a:
        for key in ("vision_position", "text_position", "token_id", "role", "input_ids", "image", "text_ref"):
            assert np.array_equal(a[sid][key], b[sid][key]), (sid, key)
        for key in ("vision", "text"):
            x, y = a[sid][key], b[sid][key]
            assert x.shape == y.shape and x.dtype == y.dtype, (sid, key)
            if exact:
                assert np.array_equal(x, y), (sid, key, float(np.abs(x - y).max()))
            else:
                assert np.abs(x - y).max() <= rel * np.abs(x).max(), (sid, key, float(np.abs(x - y).max()))


@functools.lru_cache(maxsize=None)
def _loaded(model_dir: str):
    import transformers
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type == "qwen2_vl":
        # transformers 5 without torchvision cannot build the shipped Qwen2-VL processor.
        from extract.loading import ImageOnlyQwen2VLProcessor as processor_cls
    else:
        processor_cls = AutoProcessor
    processor = processor_cls.from_pretrained(model_dir)
    model = getattr(transformers, config.architectures[0]).from_pretrained(model_dir).eval()
    return config, processor, model


def reference_forward(model_dir: Path, image_path: Path, text: str):
    """Independent forward pass of one sample: (input_ids, hidden (L+1, seq, d), image_token_id)."""
    import torch
    from PIL import Image

    config, processor, model = _loaded(str(model_dir))
    image = Image.open(image_path).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False)
    bos = processor.tokenizer.bos_token
    enc = processor(images=[image], text=[prompt], return_tensors="pt",
                    add_special_tokens=not (bos is not None and prompt.startswith(bos)))
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    hidden = torch.stack(out.hidden_states)[:, 0].numpy()
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = config.image_token_index
    return enc["input_ids"][0].numpy(), hidden, image_token_id
