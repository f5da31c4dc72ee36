"""Turning samples into model inputs: images, rendered prompts, token roles, truncation.

Kept apart from the run loop (runner.py) because the dry run and the pre-flight checks need it
without a model: only the processor.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import Sample, load_image, read_text
from .errors import DataError, ModelError
from .prompts import PromptLayout, TokenLayout, expanded_span, render, token_layout, truncate_text


@dataclass
class PreparedSample:
    """A sample's references and token bookkeeping (everything stored but the hidden states)."""

    sample: Sample
    tokens: TokenLayout
    truncated: bool


@dataclass
class PreparedBatch:
    """Model inputs for a batch (CPU tensors) and its samples' bookkeeping."""

    inputs: dict[str, torch.Tensor]
    samples: list[PreparedSample]


class BatchPreparer:
    """Turns samples into model inputs with the processor; pure CPU work."""

    def __init__(self, processor: Any, image_token_id: int, layout: PromptLayout, *,
                 max_text_tokens: int | None = None, max_positions: int | None = None,
                 accepts: set[str] | None = None):
        self.processor = processor
        self.image_token_id = image_token_id
        self.layout = layout
        self.max_text_tokens = max_text_tokens
        self.max_positions = max_positions
        self._accepts = accepts  # the forward's parameter names; None keeps every tensor

    def prepare(self, samples: Sequence[Sample]) -> PreparedBatch:
        processor = self.processor
        images, prompts, spans, truncated = [], [], [], []
        add_special = None
        for s in samples:
            text = read_text(s)
            text, cut = truncate_text(text, processor.tokenizer, self.max_text_tokens)
            rendered = render(self.layout, processor, text, describe(s))
            images.append(load_image(s.image_path))
            prompts.append(rendered.prompt)
            spans.append(rendered.text_span)
            truncated.append(cut)
            add_special = rendered.add_special_tokens
        try:
            enc = processor(images=images, text=prompts, padding=True, return_tensors="pt",
                            return_offsets_mapping=True, return_text_replacement_offsets=True,
                            add_special_tokens=add_special)
        except Exception as exc:  # noqa: BLE001 - the processor's errors are deep; name the samples
            ids = ", ".join(repr(s.sample_id) for s in samples)
            raise ModelError(f"the processor failed on samples {ids}: {exc}") from exc
        offsets = enc.pop("offset_mapping", None)
        replacements = enc.pop("text_replacement_offsets", None)
        if offsets is None:
            raise ModelError("the tokenizer returns no offset mapping (a slow tokenizer?); mir extract needs a "
                             "fast tokenizer to tell the text's tokens from the template's")
        input_ids = enc["input_ids"]
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        prepared = []
        for i, s in enumerate(samples):
            n = int(lengths[i])
            # Right padding: the real tokens are the first n positions.
            if not bool(enc["attention_mask"][i, :n].all()):
                raise ModelError("the tokenizer did not pad on the right")
            if self.max_positions is not None and n > self.max_positions:
                raise DataError(f"sample {s.sample_id!r}: {n} input tokens exceed the model's "
                                f"{self.max_positions} positions; use --max-text-tokens")
            span = expanded_span(spans[i], replacements[i] if replacements else None)
            tokens = token_layout(input_ids[i, :n].numpy(), offsets[i, :n].numpy(), self.image_token_id,
                                  span, f"sample {s.sample_id!r}")
            prepared.append(PreparedSample(s, tokens, truncated[i]))
        inputs = {k: v for k, v in enc.items()
                  if isinstance(v, torch.Tensor) and (self._accepts is None or k in self._accepts)}
        return PreparedBatch(inputs, prepared)


def check_prompts(processor: Any, layout: PromptLayout, samples: Sequence[Sample],
                  max_text_tokens: int | None = None, max_positions: int | None = None) -> None:
    """Render every sample's prompt once (cheap: no images, no model) so that a text the layout
    cannot use fails before anything is written.

    A text longer than the model's positions on its own fails here too: found mid-run, it would
    leave a partial archive that `--resume` cannot finish, since adding --max-text-tokens changes
    the settings. (Text plus image tokens just over the limit is still caught per batch.)
    """
    for s in samples:
        text, _ = truncate_text(read_text(s), processor.tokenizer, max_text_tokens)
        render(layout, processor, text, describe(s))
        # A token covers at least one UTF-8 byte, so only texts this long need counting.
        if max_positions is not None and len(text.encode()) + 8 > max_positions:
            n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > max_positions:
                raise DataError(f"{describe(s)}: the text alone is {n} tokens, more than the model's "
                                f"{max_positions} positions; use --max-text-tokens, or shorten or drop it")


def describe(sample: Sample) -> str:
    """How errors name a sample: its id, and its text file if it has one."""
    return f"sample {sample.sample_id!r}" + (f" ({sample.text_path})" if sample.text_path is not None else "")


def max_positions(model_or_config: Any) -> int | None:
    config = getattr(model_or_config, "config", model_or_config)
    for sub in (getattr(config, "text_config", None), config):
        value = getattr(sub, "max_position_embeddings", None) if sub is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None
