"""The names, codes and rules of the `mir-archive/1` format: the contract between the stages.

Everything a reader or writer needs to agree on lives here, so the format can be read from one file.
"""
from __future__ import annotations

from enum import Enum, IntEnum

import numpy as np

SCHEMA_NAME = "mir-archive"
SCHEMA_MAJOR = 1
SCHEMA_VERSION = f"{SCHEMA_NAME}/{SCHEMA_MAJOR}"

MODALITIES = ("vision", "text")
SAMPLES_GROUP = "samples"
HIDDEN = "hidden"
HIDDEN_DIMS = ("layer", "token", "channel")
LOCK_FILE = ".mir-writer.lock"

# Stored dtype per dtype the model computed. bfloat16 has no zarr 3 type: float32 holds it exactly.
STORED_DTYPE = {"float16": "float16", "float32": "float32", "bfloat16": "float32"}


class TextRole(IntEnum):
    """Where a non-image token sits in the prompt; stored per text token as `role`."""

    BEFORE_IMAGE = 0
    BETWEEN_IMAGE = 1
    AFTER_IMAGE_TEMPLATE = 2
    RESPONSE = 3


ROLE_MEANINGS = " ".join(r.name.lower() for r in TextRole)


class TextTokenRule(str, Enum):
    """Which stored non-image tokens count as text tokens; AFTER_IMAGE is the reference rule (MIR_SPEC).

    Written `after_image` (archives, JSON, cache keys); `after-image` is accepted on input too.
    """

    AFTER_IMAGE = "after_image"
    RESPONSE = "response"
    ALL = "all"

    @property
    def roles(self) -> tuple[int, ...]:
        return {TextTokenRule.AFTER_IMAGE: (TextRole.AFTER_IMAGE_TEMPLATE, TextRole.RESPONSE),
                TextTokenRule.RESPONSE: (TextRole.RESPONSE,), TextTokenRule.ALL: tuple(TextRole)}[self]

    @classmethod
    def parse(cls, text: "str | TextTokenRule") -> "TextTokenRule":
        """The rule named by `text` in either spelling; ArchiveError naming the choices otherwise."""
        if isinstance(text, cls):
            return text
        try:
            return cls(str(text).strip().lower().replace("-", "_"))
        except ValueError:
            raise ArchiveError(f"unknown text-token rule {text!r}; choose one of "
                               f"{', '.join(r.value for r in cls)}") from None


DEFAULT_TEXT_TOKEN_RULE = TextTokenRule.AFTER_IMAGE

# Per-token 1-D variables of each modality group: name -> dtype.
TOKEN_VARIABLES: dict[str, dict[str, str]] = {
    "vision": {"sample": "int64", "position": "int32"},
    "text": {"sample": "int64", "position": "int32", "token_id": "int64", "role": "int8"},
}

# The samples table: name -> (dim, dtype).
SAMPLE_VARIABLES: dict[str, tuple[str, str]] = {
    "sample_id": ("sample", "str"),
    "image": ("sample", "str"),
    "text": ("sample", "str"),
    "vision_offset": ("sample", "int64"),
    "vision_count": ("sample", "int64"),
    "text_offset": ("sample", "int64"),
    "text_count": ("sample", "int64"),
    "input_offset": ("sample", "int64"),
    "input_length": ("sample", "int64"),
    "input_ids": ("input_token", "int64"),
}

def dimension_names(path: str) -> tuple[str, ...]:
    """The dimension names array `path` ("group/name") must carry."""
    group, name = path.split("/")
    if name == HIDDEN:
        return HIDDEN_DIMS
    if name == "layer":
        return ("layer",)
    if group in MODALITIES:
        return ("token",)
    return (SAMPLE_VARIABLES[name][0],)


# The commit record's keys and which arrays' leading length each one governs.
COMMIT_KEYS = ("samples", "vision_tokens", "text_tokens", "input_tokens")


def commit_key_for(group: str, name: str) -> str:
    """Which commit-record entry bounds the growing axis of array `group/name`."""
    if group in MODALITIES:
        return f"{group}_tokens"
    if name == "input_ids":
        return "input_tokens"
    return "samples"


class ArchiveError(Exception):
    """A problem with an archive or its use, phrased for the person who has to fix it."""


class ArchiveLockedError(ArchiveError):
    """Another live process holds the archive's writer lock."""


def offsets_mismatch(offsets, counts, total: int) -> tuple[bool, int | None]:
    """Whether per-sample `offsets` and `counts` fail to tile a token axis of `total` entries.

    Returns (mismatch, first sample whose offset is off, or None when only the counts or the
    total are wrong). One rule for the reader (which refuses) and `mir validate` (which reports).
    """
    offsets, counts = np.asarray(offsets, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    expected = np.concatenate([[0], np.cumsum(counts)[:-1]]) if counts.size else offsets
    off = np.flatnonzero(offsets != expected) if offsets.shape == expected.shape else np.array([0])
    bad = int(off[0]) if off.size else None
    return bool((counts < 0).any() or bad is not None or int(counts.sum()) != total), bad


def sample_index_matches(sample, counts) -> bool:
    """Whether a token axis' `sample` coordinate is sample 0 `counts[0]` times, then 1, ... in order."""
    sample, counts = np.asarray(sample, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or int(counts.sum()) != sample.size:
        return False
    return bool(np.array_equal(sample, np.repeat(np.arange(counts.size), counts)))
