"""Exceptions of the extraction stage.

One base class so the CLI can turn every expected failure (bad input file, unsuitable model,
mismatched resume) into a one-line message instead of a traceback.
"""
from __future__ import annotations


class ExtractError(Exception):
    """Base class of every expected extraction failure; the message names the file or sample."""


class DataError(ExtractError):
    """An image or text input cannot be used (missing, corrupt, empty, undecodable)."""


class ModelError(ExtractError):
    """The model or its processor cannot be used for extraction (e.g. it has no image token)."""


class ResumeError(ExtractError):
    """`--resume` or `mir merge` found archives whose provenance does not match."""
