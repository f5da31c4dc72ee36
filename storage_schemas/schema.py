"""The names, codes and rules of the `mir-archive/1` format: the contract between the stages.

Everything a reader or writer needs to agree on lives here, so the format can be read from one file.
"""
from __future__ import annotations

from enum import IntEnum

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

# Token selections analysis can ask for; "after_image" is the reference rule (MIR_SPEC).
TEXT_SELECTIONS: dict[str, tuple[int, ...]] = {
    "after_image": (TextRole.AFTER_IMAGE_TEMPLATE, TextRole.RESPONSE),
    "response": (TextRole.RESPONSE,),
    "all": tuple(TextRole),
}

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
