"""Prompt layout and the role of every input token.

Default layout (the reference's): the image in the user turn, the text as the assistant turn,
rendered with the processor's chat template. A raw template string (or the `vicuna_v1` preset,
the reference code's exact prompt) can be given instead. Every input position is then either a
vision token (input id == the config's image token id) or a text token with a `TextRole`, so
analysis can pick the reference "after the last image token" rule, the response span only, or
all non-image tokens, without re-extracting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError, ModelError

# The reference code's prompt (LLaVA repository, conv_templates["vicuna_v1"]): system prompt,
# "USER: <image>\n", " ASSISTANT: <story></s>".
PRESETS: dict[str, str] = {
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: {image}\n ASSISTANT: {text}</s>"
    ),
}

TRUNCATION_RULE = (
    "the text is cut after its first K tokens, counted by the model's tokenizer on the text alone "
    "(no special tokens), at the character end of the K-th token; the template is never truncated"
)
RESPONSE_RULE = (
    "a non-image token is 'response' if its character span in the prompt overlaps the text's span; "
    "other non-image tokens are before_image / between_image / after_image_template by position "
    "relative to the first and last image token"
)

# Role codes (the archive's TextRole; repeated here as plain ints so this module needs no storage import).
BEFORE_IMAGE, BETWEEN_IMAGE, AFTER_IMAGE_TEMPLATE, RESPONSE = 0, 1, 2, 3


@dataclass(frozen=True)
class PromptLayout:
    """How a sample's prompt is built: the chat template, or a raw string with {image} and {text}."""

    template: str | None = None  # None: the processor's chat template
    name: str = "chat_template"

    @classmethod
    def from_option(cls, template: str | None) -> "PromptLayout":
        """`--template` value: None (chat template), a preset name, or a raw string."""
        if template is None or template == "chat_template":
            return cls()
        if template in PRESETS:
            return cls(PRESETS[template], template)
        for field in ("{image}", "{text}"):
            if template.count(field) != 1:
                raise DataError(f"--template must contain {field} exactly once (or name a preset: "
                                f"{', '.join(PRESETS)}); got {template!r}")
        return cls(template, "raw")

    def describe(self) -> dict[str, Any]:
        return {"kind": "chat_template" if self.template is None else "raw", "name": self.name,
                "template": self.template,
                "messages": "user: [image]; assistant: [text]" if self.template is None else None}


@dataclass
class RenderedPrompt:
    """One prompt string, the character span of the text in it, and tokenizer flags."""

    prompt: str
    text_span: tuple[int, int]
    add_special_tokens: bool


def render(layout: PromptLayout, processor: Any, text: str, who: str) -> RenderedPrompt:
    """Build the prompt for one sample and locate the text inside it."""
    tokenizer = processor.tokenizer
    for token in _multimodal_tokens(processor):
        if token and token in text:
            raise DataError(f"{who}: the text contains the model's placeholder token {token!r}, which would be "
                            "expanded into image tokens; remove it from the text")
    if layout.template is None:
        if not getattr(processor, "chat_template", None):
            raise ModelError("the processor has no chat template; pass --template (e.g. --template vicuna_v1 "
                             "or a raw string with {image} and {text})")
        messages = [{"role": "user", "content": [{"type": "image"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False)
        start = prompt.rfind(text)
        if start < 0:
            raise ModelError("the chat template changed the text while rendering it; pass --template with a raw "
                             "prompt string instead")
    else:
        head, _, tail = layout.template.partition("{text}")
        head = head.replace("{image}", processor.image_token)
        tail = tail.replace("{image}", processor.image_token)
        prompt = head + text + tail
        start = len(head)
    bos = getattr(tokenizer, "bos_token", None)
    # As ProcessorMixin.apply_chat_template(tokenize=True) does: no second BOS if the prompt has one.
    add_special = not (bos is not None and prompt.startswith(bos))
    return RenderedPrompt(prompt, (start, start + len(text)), add_special)


def _multimodal_tokens(processor: Any) -> list[str]:
    tokens = getattr(processor, "all_special_multimodal_tokens", None)
    if isinstance(tokens, (list, tuple)) and tokens:
        return [t for t in tokens if isinstance(t, str)]
    return [processor.image_token]


def truncate_text(text: str, tokenizer: Any, max_tokens: int | None) -> tuple[str, bool]:
    """Apply TRUNCATION_RULE; return the (possibly) shortened text and whether it was cut."""
    if max_tokens is None:
        return text, False
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= max_tokens:
        return text, False
    end = int(offsets[max_tokens - 1][1])
    return text[:end], True


def expanded_span(span: tuple[int, int], replacements: list[dict] | None) -> tuple[int, int]:
    """Map a character span of the rendered prompt into the processor's expanded prompt.

    The processor replaces each image placeholder by many image tokens (and separators); every
    replacement that ends before the text shifts it by the length gained.
    """
    start, end = span
    shift = 0
    for rep in replacements or []:
        old_start, old_end = rep["span"]
        new_start, new_end = rep["new_span"]
        if old_end <= start:
            shift += (new_end - new_start) - (old_end - old_start)
        elif old_start < end:
            raise DataError("an image placeholder lies inside the text")
    return start + shift, end + shift


@dataclass
class TokenLayout:
    """Per-sample token bookkeeping: which positions are vision, which are text and their roles."""

    input_ids: np.ndarray      # (seq_len,) int64, padding removed
    vision_position: np.ndarray
    text_position: np.ndarray
    text_token_id: np.ndarray
    text_role: np.ndarray      # int8


def token_layout(input_ids: np.ndarray, offsets: np.ndarray, image_token_id: int,
                 response_span: tuple[int, int], who: str) -> TokenLayout:
    """Split one unpadded sequence into vision tokens and text tokens with roles."""
    input_ids = np.asarray(input_ids, dtype=np.int64)
    is_image = input_ids == image_token_id
    vision = np.flatnonzero(is_image)
    if vision.size == 0:
        raise ModelError(f"{who}: the processed prompt holds no image token (id {image_token_id}); the "
                         "template must place the image")
    text = np.flatnonzero(~is_image)
    first, last = vision[0], vision[-1]
    roles = np.full(text.size, AFTER_IMAGE_TEMPLATE, dtype=np.int8)
    roles[text < first] = BEFORE_IMAGE
    roles[(text > first) & (text < last)] = BETWEEN_IMAGE
    rs, re_ = response_span
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[text]
    is_response = (off[:, 1] > off[:, 0]) & (off[:, 0] < re_) & (off[:, 1] > rs)
    roles[is_response] = RESPONSE
    if not is_response.any():
        raise ModelError(f"{who}: no token of the text was found in the tokenized prompt")
    return TokenLayout(input_ids, vision.astype(np.int64), text.astype(np.int64), input_ids[text], roles)
