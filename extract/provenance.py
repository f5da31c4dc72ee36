"""Provenance of an extraction: what the archive records about the model, the settings, the data
and each run, and the check that a resumed run is the same run."""
from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage_schemas.provenance import json_digest, library_versions

from . import data as data_mod
from .errors import ResumeError
from .prompts import RESPONSE_RULE, TRUNCATION_RULE, PromptLayout

if TYPE_CHECKING:
    from .extraction import ExtractOptions


def _versions() -> dict[str, str | None]:
    return library_versions(("torch", "transformers", "tokenizers", "pillow", "numpy", "zarr"))


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()})"


def _hash(obj: Any) -> str:
    return "sha256:" + json_digest(obj)


def settings(opts: "ExtractOptions", layers: list[int], layout: PromptLayout, model_dtype: str) -> dict[str, Any]:
    """The extraction settings that determine stored content (batch size and device do not)."""
    return {
        "layers": layers,
        "prompt_layout": layout.describe(),
        "text_token_rule": opts.text_tokens,
        "response_rule": RESPONSE_RULE,
        "max_text_tokens": opts.max_text_tokens,
        "truncation_rule": TRUNCATION_RULE if opts.max_text_tokens is not None else None,
        "dtype": model_dtype,
        "padding_side": "right",
        "forward": "one forward pass per sample, output_hidden_states=True, no generate, no attention maps",
        "hidden_states_index": "0 = embedding output, 1..L = decoder layers (the last after the final norm)",
    }


def run_record(opts: "ExtractOptions", device: str, n_todo: int) -> dict[str, Any]:
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": _device_name(device),
            "batch_size": opts.batch_size, "samples_planned": n_todo, "host": platform.node(),
            "library_versions": _versions()}


def check_resume(existing: dict[str, Any], wanted: dict[str, Any], path: Path) -> None:
    """Refuse to append to an archive whose model, settings, data or shard differ from this run's."""
    problems = []
    em, wm = existing.get("model", {}), wanted["model"]
    keys = ["config_hash", "architecture", "dtype", "hidden_size", "num_hidden_layers", "image_token_id"]
    if em.get("weights_hash") or wm.get("weights_hash"):
        keys.append("weights_hash")
    else:
        keys += ["name_or_path", "revision"]
    for key in keys:
        if em.get(key) != wm.get(key):
            problems.append(f"model.{key}: archive has {em.get(key)!r}, this run has {wm.get(key)!r}")
    ee, we = existing.get("extraction", {}), wanted["extraction"]
    if ee.get("settings_hash") != we["settings_hash"]:
        for key, value in we["settings"].items():
            if ee.get("settings", {}).get(key) != value:
                problems.append(f"extraction.{key}: archive has {ee.get('settings', {}).get(key)!r}, "
                                f"this run has {value!r}")
        if not problems:
            problems.append("extraction settings differ")
    if ee.get("shard") != we.get("shard"):
        problems.append(f"extraction.shard: archive has {ee.get('shard')!r}, this run has {we.get('shard')!r}")
    ed, wd = existing.get("dataset", {}), wanted["dataset"]
    if ed.get("sample_list_hash") != wd["sample_list_hash"]:
        problems.append("dataset.sample_list_hash: the sample list differs (other files, --num, --seed or "
                        "manifest)")
    if problems:
        raise ResumeError(f"cannot resume {path}: it was made by a different run:\n  " + "\n  ".join(problems)
                          + "\nUse a new --out, or --overwrite to start over.")


def provenance(opts: "ExtractOptions", info: Any, layers: list[int], layout: PromptLayout,
               full: data_mod.SampleList, part: data_mod.SampleList, run_record: dict[str, Any],
               drops_mask: bool) -> dict[str, Any]:
    """The root attributes a new archive gets, and that a resumed one must match (check_resume)."""
    sett = settings(opts, layers, layout, info.dtype)
    return {
        "model": info.provenance,
        "extraction": {
            "tool": "mir extract",
            "tool_version": run_record["library_versions"].get("mir-pipeline"),
            "time": run_record["started"],
            "prompt_layout": layout.name,
            "text_token_rule": opts.text_tokens,
            "settings": sett,
            "settings_hash": _hash(sett),
            "shard": {"index": opts.shard[0], "count": opts.shard[1]} if opts.shard else None,
            "device": run_record["device"],
            "batch_size": opts.batch_size,
            "attention_mask": ("omitted: right padding under causal attention makes it redundant"
                               if drops_mask else "passed"),
            "library_versions": run_record["library_versions"],
            "runs": [],
        },
        "dataset": {
            "sources": [f"{k}: {v}" for k, v in full.sources.items() if k in ("images", "texts", "manifest")],
            "selection": {k: v for k, v in full.sources.items() if k not in ("images", "texts", "manifest")},
            "samples": len(full),
            "sample_list_hash": full.hash,
            "shard_samples": len(part),
            "shard_sample_list_hash": part.hash,
        },
    }
