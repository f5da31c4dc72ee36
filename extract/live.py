"""Extraction with a model already in memory: the one a training loop is updating.

`mir extract` loads a checkpoint from disk; during training the weights are in the process
already, on their device and in their dtype, so reloading them would cost time and memory. This
module describes such a live model the way `loading.load_model` describes a loaded one (same
provenance keys, the weights identified by run and step instead of a file hash) and runs the
ordinary extraction job with it: no grad, eval mode for the pass, the caller's mode restored.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .extraction import ExtractOptions, ExtractResult, extract
from .loading import (ModelInfo, _text_config, config_hash, image_token_id_from_config, processor_tokenizer,
                      weights_hash)


def live_model_info(model: Any, processor: Any, *, run: str, step: int, checkpoint: str | Path | None = None,
                    hash_checkpoint: bool = False) -> ModelInfo:
    """Describe a model in memory; `run` and `step` identify its weights. `checkpoint` names the
    folder the same weights were saved to; `hash_checkpoint` adds its weights hash (it reads every
    weight file, so it is off by default)."""
    import transformers

    config = model.config
    where = f"run {run!r} at step {step}"
    image_token_id = image_token_id_from_config(config, where)
    processor_tokenizer(processor, image_token_id, where)  # checks the image token
    image_token = processor.image_token
    param = next(model.parameters())
    text_config = _text_config(config)
    dtype = str(param.dtype).removeprefix("torch.")
    provenance = {
        "name_or_path": getattr(config, "_name_or_path", None) or type(model).__name__,
        "revision": None,
        "weights_hash": weights_hash(checkpoint) if hash_checkpoint and checkpoint and Path(checkpoint).is_dir()
        else None,
        "weights": {"source": "live model during training", "run": run, "step": int(step),
                    "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None},
        "config_hash": config_hash(_as_saved(config)),
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "dtype": dtype,
        "num_hidden_layers": int(text_config.num_hidden_layers),
        "hidden_size": int(text_config.hidden_size),
        "image_token_id": image_token_id,
        "image_token": image_token,
        "processor": f"given ({type(processor).__name__})",
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "trust_remote_code": False,
        "transformers_version": transformers.__version__,
    }
    return ModelInfo(model=model, processor=processor, image_token_id=image_token_id, image_token=image_token,
                     num_hidden_layers=int(text_config.num_hidden_layers), hidden_size=int(text_config.hidden_size),
                     dtype=dtype, device=str(param.device), provenance=provenance)


def _as_saved(config: Any) -> Any:
    """The config as `save_pretrained` writes it, so its hash equals that of the checkpoint's: a
    trainer changes runtime-only fields in memory (Trainer sets `use_cache = False`)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        return type(config).from_pretrained(tmp)


@contextmanager
def _inference_state(model: Any, tokenizer: Any) -> Iterator[None]:
    """Eval mode and right padding for the pass; the training loop's own state afterwards."""
    training = model.training
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    model.eval()
    tokenizer.padding_side = "right"  # results must not depend on the batch (see runner.py)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        model.train(training)
        tokenizer.padding_side = side
        if pad is None:
            try:
                tokenizer.pad_token = None
            except (AttributeError, ValueError, TypeError):  # some tokenizers refuse; eos padding is harmless
                pass


def extract_live(model: Any, processor: Any, opts: ExtractOptions, *, run: str, step: int,
                 checkpoint: str | Path | None = None, hash_checkpoint: bool = False) -> ExtractResult:
    """`mir extract` with `model` as it is now (its device and dtype; `opts.model` is not loaded)."""
    info = live_model_info(model, processor, run=run, step=step, checkpoint=checkpoint,
                           hash_checkpoint=hash_checkpoint)
    with _inference_state(model, processor.tokenizer):
        return extract(opts, model_info=info)
