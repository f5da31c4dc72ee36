"""The analysis stage's exception: a message for the person who has to act on it."""
from __future__ import annotations


class AnalysisError(Exception):
    """Bad input or settings for an analysis (empty selection, non-finite values, damaged cache...)."""
