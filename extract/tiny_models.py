"""Tiny vision-language models built offline from `transformers` configs.

Tests, benchmarks and `mir demo` need real models of each supported family without a hub
download. `build_tiny_model(directory, family=...)` creates one with random (seeded) weights and
saves it together with a working processor (an offline-trained byte-level BPE tokenizer, a Pil
image processor and a chat template), so that the directory loads through the same code path
as a downloaded checkpoint. Building takes well under a second per family.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

FAMILIES = ("llava", "llava_next", "qwen2_vl", "idefics3")

# A few sentences to train the BPE merges on, so that words become a few tokens each (a more
# realistic tokens-per-character ratio than raw bytes). Any text still tokenizes: the alphabet
# covers all 256 bytes.
_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: User: Assistant: system user assistant",
    "You are a helpful assistant.",
    "The city council met on Tuesday to discuss the new budget for schools and roads.",
    "Scientists said the results of the study were published in a journal this week.",
    "The weather was cold and wet, but the crowd stayed until the end of the match.",
    "Police said a man was taken to hospital after the accident on the main road.",
    "the of and to in a is that for it as was with be by on not he this are or his from",
]

# Chat templates modelled on the ones the real checkpoints ship (image in the user turn).
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    """Widths and depths of a tiny model (defaults: test size, a few hundred kB of weights)."""

    hidden: int = 32
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 64
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 32   # vision tower input side (LLaVA, LLaVA-NeXT, Idefics3 tiles)
    patch: int = 8         # (image_size / patch)^2 image tokens per LLaVA-1.5 image
    vocab_size: int = 0    # model vocabulary (0: just the tokenizer's; larger adds unused rows)


def _train_tokenizer(special_tokens: list[str], vocab_size: int = 320):
    """Byte-level BPE trained on a fixed corpus; deterministic, offline, a few milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(special_tokens),
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def _wrap_tokenizer(tok, *, bos: str | None, eos: str, pad: str, extra: list[str], add_bos: bool):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    kwargs: dict[str, Any] = {"eos_token": eos, "pad_token": pad}
    if bos is not None:
        kwargs["bos_token"] = bos
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if extra:
        wrapped.add_special_tokens({"additional_special_tokens": extra})
    return wrapped


def _llama_text_config(size: TinySize, vocab: int, tok) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _clip_vision_config(size: TinySize, image_size: int, patch: int) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=image_size,
        patch_size=patch,
        projection_dim=size.vision_hidden,
    )


def _vocab_size(tokenizer, size: TinySize) -> int:
    return max(64 * ((len(tokenizer) + 63) // 64), size.vocab_size)


def _llava_tokenizer():
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = _train_tokenizer(specials)
    return _wrap_tokenizer(tok, bos="<s>", eos="</s>", pad="<pad>", extra=["<image>"], add_bos=True)


def _build_llava(size: TinySize):
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    image_size, patch = size.image_size, size.patch
    tokenizer = _llava_tokenizer()
    config = LlavaConfig(
        vision_config=_clip_vision_config(size, image_size, patch),
        text_config=_llama_text_config(size, _vocab_size(tokenizer, size), tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(image_size // patch) ** 2,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE,
    )
    return LlavaForConditionalGeneration(config), processor


def _build_llava_next(size: TinySize):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    image_size, patch = size.image_size, size.patch
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    tokenizer = _llava_tokenizer()
    config = LlavaNextConfig(
        vision_config=_clip_vision_config(size, image_size, patch),
        text_config=_llama_text_config(size, _vocab_size(tokenizer, size), tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch) ** 2,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE,
    )
    return LlavaNextForConditionalGeneration(config), processor


def _build_qwen2_vl(size: TinySize):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from .loading import ImageOnlyQwen2VLProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = _train_tokenizer(specials)
    tokenizer = _wrap_tokenizer(tok, bos=None, eos="<|im_end|>", pad="<|endoftext|>", extra=specials[1:],
                                add_bos=False)
    patch, merge = 4, 2
    head_dim = size.hidden // size.heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 4), half // 4, half // 4]
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=_vocab_size(tokenizer, size),
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=size.vision_layers,
            embed_dim=size.vision_hidden,
            hidden_size=size.hidden,
            num_heads=size.vision_heads,
            mlp_ratio=2,
            patch_size=patch,
            spatial_merge_size=merge,
            temporal_patch_size=2,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    factor = patch * merge
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        min_pixels=4 * factor * factor, max_pixels=48 * factor * factor,
    )
    processor = ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=_QWEN_TEMPLATE)
    return Qwen2VLForConditionalGeneration(config), processor


def _build_idefics3(size: TinySize):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    image_size, patch, scale = size.image_size, size.patch, 2
    rowcol = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                "<image>", "<global-img>", *rowcol]
    tok = _train_tokenizer(specials)
    tokenizer = _wrap_tokenizer(tok, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>",
                                extra=specials[2:], add_bos=False)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=size.vision_hidden,
            intermediate_size=2 * size.vision_hidden,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.vision_heads,
            image_size=image_size,
            patch_size=patch,
        ),
        text_config=_llama_text_config(size, _vocab_size(tokenizer, size), tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * image_size},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=((image_size // patch) ** 2) // (scale**2),
        chat_template=_IDEFICS3_TEMPLATE,
    )
    return Idefics3ForConditionalGeneration(config), processor


_BUILDERS: dict[str, Callable[[TinySize], tuple[Any, Any]]] = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "qwen2_vl": _build_qwen2_vl,
    "idefics3": _build_idefics3,
}


def build_tiny_model(
    directory: str | Path,
    family: str = "llava",
    *,
    seed: int = 0,
    size: TinySize | None = None,
    dtype: str = "float32",
) -> Path:
    """Create a tiny `family` model with seeded random weights and save it with its processor.

    The directory then loads with `extract.loading.load_model` (or plain `from_pretrained`) like
    any downloaded checkpoint. Same family, seed and size give the same weights and files.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")
    size = size or TinySize()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # fork_rng keeps the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _BUILDERS[family](size)
        _reinit_small(model, seed)
    from .loading import quiet_transformers

    model = model.to(getattr(torch, dtype)).eval()
    with quiet_transformers():
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
    if family == "qwen2_vl":
        _mark_image_only(directory)
    return directory


def _reinit_small(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter seeded, moderately scaled random values.

    The default init leaves some tensors at exactly zero or one (biases, norms); drawing them all
    makes the tests sensitive to any mix-up of tokens, layers or weights.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 16
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def _mark_image_only(directory: Path) -> None:
    """Name the stock Qwen2VLProcessor in the saved files (not the image-only subclass they were
    written by), so the directory looks like a real checkpoint; loading falls back as for one."""
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = directory / name
        if path.exists():
            data = json.loads(path.read_text())
            data["processor_class"] = "Qwen2VLProcessor"
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
