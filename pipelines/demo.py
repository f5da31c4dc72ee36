"""`mir demo`: the whole pipeline on an embedded default, offline, on a CPU, in well under two minutes.

A tiny LLaVA-style model is built from a config once (seeded, cached in the one per-user cache
folder, analyze.cache.user_cache_dir()) and loaded back through the same path a downloaded
checkpoint takes; the images and texts ship with the package (pipelines/demo_data, see its CREDITS.md).
"""
from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

DEMO_MODEL_VERSION = "1"
TEXT_SHIFTS = 3  # 8 images x 3 text pairings = 24 samples (the paper finds MIR stable from N >= 20)

REAL_MODEL_HINT = """\
This MIR comes from a tiny model with random weights: it only shows that the pipeline works.
For a real model on a GPU (weights from the Hugging Face hub, e.g. LLaVA-1.5-7B):

  mir extract --model llava-hf/llava-1.5-7b-hf --images textvqa/train_images --texts cnn/stories \\
      --num 100 --seed 0 --template vicuna_v1 --dtype float16 --device cuda --batch-size 8 \\
      --max-text-tokens 2048 --out llava15.zarr
  mir analyze llava15.zarr --bootstrap 200 --json llava15.json --plot llava15.png"""


@dataclass
class DemoResult:
    out: Path
    archive: Path
    report: Path
    json: Path
    result: object


def demo_model(echo: Callable[[str], None]) -> Path:
    """The cached tiny model directory; built atomically on first use."""
    from analyze.cache import user_cache_dir
    from extract.tiny_models import TinySize, build_tiny_model

    target = user_cache_dir() / f"demo-llava-v{DEMO_MODEL_VERSION}"
    if (target / "config.json").exists():
        echo(f"model: cached tiny LLaVA at {target}")
        return target
    echo(f"model: building a tiny LLaVA (CLIP 2-layer vision tower, 4-layer Llama) at {target}")
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    size = TinySize(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, vision_hidden=64, vision_layers=2,
                    vision_heads=4, image_size=64, patch=8)
    build_tiny_model(tmp, family="llava", seed=0, size=size)
    try:
        tmp.rename(target)
    except OSError:  # built concurrently by another demo: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_manifest(out: Path) -> Path:
    """A manifest pairing each shipped image with TEXT_SHIFTS of the shipped texts."""
    data = resources.files("pipelines") / "demo_data"
    images = sorted(p for p in (data / "images").iterdir() if p.name.endswith(".jpg"))
    texts = sorted(p for p in (data / "texts").iterdir() if p.name.endswith(".story"))
    rows = []
    for shift in range(TEXT_SHIFTS):
        for i, image in enumerate(images):
            text = texts[(i + shift) % len(texts)]
            rows.append({"id": f"{Path(image.name).stem}+{Path(text.name).stem}", "image": str(image),
                         "text_file": str(text)})
    path = out / "demo_manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_demo(out: str | Path, *, echo: Callable[[str], None] = print, progress: bool = True) -> DemoResult:
    from analyze import AnalysisOptions, analyze_selection
    from extract.extraction import ExtractOptions, extract
    from storage_schemas import open_archive

    from .plots import plot_layer_curve

    out = Path(out).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    model = demo_model(echo)
    manifest = demo_manifest(out)
    archive_path = out / "demo.zarr"
    echo(f"extract: {manifest.name} -> {archive_path}")
    extract(ExtractOptions(model=str(model), out=str(archive_path), manifest=str(manifest), batch_size=8,
                           device="cpu", overwrite=True, progress=progress), on_info=echo)
    echo("analyze: exact MIR with a 200-replicate bootstrap")
    archive = open_archive(archive_path)
    layers = [int(x) for x in archive.layers if x >= 1]
    result = analyze_selection(archive.select(layers=layers), AnalysisOptions(bootstrap=200, seed=0))
    json_path = out / "mir.json"
    json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    report = plot_layer_curve(result.dataset, out / "report.png",
                              title=f"mir demo (tiny random LLaVA, {result.n_samples} samples): MIR = {result.mir:.4f}")
    return DemoResult(out, archive_path, report, json_path, result)
