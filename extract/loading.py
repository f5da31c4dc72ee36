"""Load a Hugging Face image-text-to-text model and its processor, and describe it.

The same path serves hub ids and local directories (tiny test models included), so tests
exercise exactly what a user runs. The description (`ModelInfo.provenance`) is what the archive
records and what `--resume` compares.
"""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError

log = logging.getLogger(__name__)

# Files whose bytes define the weights of a local checkpoint.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _image_only(cls: type) -> type:
    """A subclass of a processor class that needs no video processor.

    Qwen2-VL-style processors insist on a video processor, which in transformers 5 needs
    torchvision. For still images it is never used, so the subclass drops it from the
    constructor's signature (ProcessorMixin derives its sub-processors from that signature) and
    passes None to the original constructor.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(f"ImageOnly{cls.__name__}", (cls,), {"__init__": __init__, "__module__": __name__})


def _qwen2_vl_processor_class() -> type:
    from transformers import Qwen2VLProcessor

    return _image_only(Qwen2VLProcessor)


ImageOnlyQwen2VLProcessor = _qwen2_vl_processor_class()


@contextmanager
def quiet_transformers():
    """Silence transformers' per-file progress bars (mir extract shows its own)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@dataclass
class ModelInfo:
    """A loaded model, its processor, and what identifies them."""

    model: Any
    processor: Any
    image_token_id: int
    image_token: str
    num_hidden_layers: int
    hidden_size: int
    dtype: str
    device: str
    provenance: dict[str, Any] = field(default_factory=dict)


def image_token_id_from_config(config: Any, where: str) -> int:
    """The id of the image placeholder token, as named by the model's config.

    The vision-token mask comes from this id, never from a hard-coded count.
    """
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 0:
            return value
    raise ModelError(
        f"{where}: the model config names no image token (neither image_token_id nor "
        f"image_token_index); mir extract needs a model whose processor expands an image "
        f"placeholder into image tokens (e.g. LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics3)"
    )


def processor_tokenizer(processor: Any, image_token_id: int, where: str) -> Any:
    """The processor's tokenizer, once its image token is checked to be the config's image token id."""
    image_token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if image_token is None or tokenizer is None:
        raise ModelError(f"{where}: the processor has no image token or no tokenizer")
    proc_id = tokenizer.convert_tokens_to_ids(image_token)
    if proc_id != image_token_id:
        raise ModelError(f"{where}: the processor's image token {image_token!r} has id {proc_id}, but the "
                         f"config's image token id is {image_token_id}")
    return tokenizer


def _text_config(config: Any) -> Any:
    for name in ("text_config", "language_config", "llm_config"):
        sub = getattr(config, name, None)
        if sub is not None and getattr(sub, "hidden_size", None):
            return sub
    return config


def config_hash(config: Any) -> str:
    """sha256 of the config's content, ignoring fields that name the file or library version."""
    data = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype",
                "_attn_implementation_autoset"):
        data.pop(key, None)

    def scrub(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: scrub(v) for k, v in obj.items()
                    if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}
        if isinstance(obj, (list, tuple)):
            return [scrub(v) for v in obj]
        return obj

    text = json.dumps(scrub(data), sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def weights_hash(directory: str | Path) -> str | None:
    """sha256 over the names and bytes of a local checkpoint's weight files (None if none)."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _load_processor(name_or_path: str, config: Any, *, trust_remote_code: bool,
                    revision: str | None) -> tuple[Any, str]:
    from transformers import AutoProcessor

    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        return AutoProcessor.from_pretrained(name_or_path, **kwargs), "AutoProcessor"
    except Exception as exc:  # noqa: BLE001 - decide below whether a known fallback applies
        model_type = getattr(config, "model_type", "")
        if model_type in ("qwen2_vl", "qwen2_5_vl"):
            # Known transformers 5 limitation: the shipped processor wants a video processor
            # (torchvision). Still images only need the image processor and the tokenizer.
            from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

            base = Qwen2VLProcessor if model_type == "qwen2_vl" else Qwen2_5_VLProcessor
            cls = ImageOnlyQwen2VLProcessor if base is Qwen2VLProcessor else _image_only(base)
            log.info("AutoProcessor failed (%s); using an image-only %s", exc, base.__name__)
            try:
                return cls.from_pretrained(name_or_path, **kwargs), f"image-only {base.__name__}"
            except Exception as exc2:  # noqa: BLE001
                raise ModelError(f"{name_or_path}: cannot load the processor: {exc2}") from exc2
        raise ModelError(f"{name_or_path}: cannot load the processor: {exc}") from exc


def _model_class(config: Any) -> Any:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForImageTextToText


def load_processor(name_or_path: str, *, trust_remote_code: bool = False,
                   revision: str | None = None) -> tuple[Any, Any, int]:
    """Config, processor and image token id, without loading weights (for dry runs)."""
    with quiet_transformers():
        config, processor, image_token_id, _ = _config_and_processor(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    return config, processor, image_token_id


def _config_and_processor(name_or_path: str, *, trust_remote_code: bool,
                          revision: str | None) -> tuple[Any, Any, int, str]:
    from transformers import AutoConfig

    if not Path(name_or_path).is_dir() and Path(name_or_path).exists():
        raise ModelError(f"{name_or_path}: not a model directory")
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as exc:  # noqa: BLE001 - turn any loading failure into one clear line
        raise ModelError(f"{name_or_path}: cannot load the model config: {exc}") from exc
    image_token_id = image_token_id_from_config(config, name_or_path)
    processor, processor_kind = _load_processor(
        name_or_path, config, trust_remote_code=trust_remote_code, revision=revision
    )
    tokenizer = processor_tokenizer(processor, image_token_id, name_or_path)
    # Right padding: real tokens keep positions 0..n-1 and, the attention being causal, never
    # see the padding, so results do not depend on what else is in the batch.
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return config, processor, image_token_id, processor_kind



def load_model(name_or_path: str, **kwargs: Any) -> ModelInfo:
    """Load model and processor from a local directory or a hub id, ready for forward passes.

    Keyword arguments: `device` ("cpu", "cuda", "cuda:1", ...), `dtype` ("auto" = what the
    checkpoint says, "float32", "float16", "bfloat16"), `trust_remote_code` (off unless asked),
    `revision`, `attn_implementation`.
    """
    with quiet_transformers():
        return _load_model(name_or_path, **kwargs)


def _load_model(
    name_or_path: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> ModelInfo:
    import torch
    import transformers
    from transformers.utils import is_accelerate_available

    is_local = Path(name_or_path).is_dir()
    config, processor, image_token_id, processor_kind = _config_and_processor(
        name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    image_token = processor.image_token

    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ModelError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    load_kwargs: dict[str, Any] = {
        "dtype": "auto" if dtype == "auto" else getattr(torch, dtype),
        "trust_remote_code": trust_remote_code,
        "revision": revision,
    }
    if attn_implementation:
        load_kwargs["attn_implementation"] = attn_implementation
    if device != "cpu" and is_accelerate_available():
        load_kwargs["device_map"] = {"": device}  # straight onto the device, no full copy in host memory
    try:
        model = _model_class(config).from_pretrained(name_or_path, **load_kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{name_or_path}: cannot load the model weights: {exc}") from exc
    model = model.to(device).eval()
    param = next(model.parameters())
    text_config = _text_config(model.config)
    num_layers = int(text_config.num_hidden_layers)
    hidden_size = int(text_config.hidden_size)
    model_dtype = str(param.dtype).removeprefix("torch.")

    revision_used = revision or getattr(config, "_commit_hash", None)
    provenance = {
        "name_or_path": str(Path(name_or_path).resolve()) if is_local else name_or_path,
        "revision": revision_used,
        "weights_hash": weights_hash(name_or_path) if is_local else None,
        "config_hash": config_hash(config),
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "dtype": model_dtype,
        "num_hidden_layers": num_layers,
        "hidden_size": hidden_size,
        "image_token_id": image_token_id,
        "image_token": image_token,
        "processor": processor_kind + f" ({type(processor).__name__})",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "trust_remote_code": trust_remote_code,
        "transformers_version": transformers.__version__,
    }
    return ModelInfo(
        model=model,
        processor=processor,
        image_token_id=image_token_id,
        image_token=image_token,
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        dtype=model_dtype,
        device=str(param.device),
        provenance=provenance,
    )
