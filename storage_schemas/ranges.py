"""The one index-range grammar of the command line (`--layers` in extract and analyze, the row
ranges of `--samples`), and its inverse, so a list printed by one command reads back in any other.

    N        one index; a negative one counts from the end (-1 = the last)
    A:B      half-open, like Python: A, A+1, ..., B-1; either end may be left out or be negative;
    A:B:S    every S-th of them (S >= 1)
    A-B      inclusive: A, ..., B (negatives allowed: -4--1 = the last four)

Items are comma-separated. Values are positions in an index space of `size` entries (for layers:
the model's hidden_states, 0 = embeddings, so -1 is the last decoder layer in every stage); an
index outside it is an error, never silently clipped.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from .schema import ArchiveError

_INT = r"\s*(-?\d+)\s*"
_SLICE = re.compile(rf"^(?:{_INT})?:(?:{_INT})?(?::\s*(\d+)\s*)?$")
_INCLUSIVE = re.compile(rf"^{_INT}-{_INT}$")
_SINGLE = re.compile(rf"^{_INT}$")

GRAMMAR = "N, A:B (half-open), A:B:S, A-B (inclusive), comma-separated; negatives count from the end"


class RangeSpecError(ArchiveError):
    """Text that does not follow the index-range grammar, or names indices outside the space."""


def parse_index_ranges(text: str, size: int, what: str = "index") -> list[int]:
    """The sorted, distinct indices (0 <= i < size) that `text` names; RangeSpecError otherwise."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        out.update(_item(part, size, what))
    if not out:
        raise RangeSpecError(f"{what} {text!r} selects nothing")
    return sorted(out)


def _item(part: str, size: int, what: str) -> range | list[int]:
    def index(raw: str, *, bound: bool = False) -> int:
        value = int(raw)
        resolved = value + size if value < 0 else value
        if not 0 <= resolved < size + bound:
            raise RangeSpecError(f"{what} {part!r}: {value} is outside {_space(size)}")
        return resolved

    if m := _SINGLE.match(part):
        return [index(m.group(1))]
    if m := _INCLUSIVE.match(part):
        first, last = index(m.group(1)), index(m.group(2))
        if first > last:
            raise RangeSpecError(f"{what} {part!r}: A-B needs A <= B (here {first} > {last})")
        return range(first, last + 1)
    if m := _SLICE.match(part):
        start = index(m.group(1), bound=True) if m.group(1) else 0
        stop = index(m.group(2), bound=True) if m.group(2) else size
        step = int(m.group(3)) if m.group(3) else 1
        if step < 1:
            raise RangeSpecError(f"{what} {part!r}: the step must be at least 1")
        return range(start, stop, step)
    raise RangeSpecError(f"cannot read {what} {part!r}: use {GRAMMAR}")


def _space(size: int) -> str:
    return f"0..{size - 1} (or -{size}..-1 from the end)" if size else "an empty index space"


def parse_layers(text: str | None, entries: int, default: Iterable[int]) -> list[int]:
    """Layers named by `text`: 'all' is every one of `entries` hidden_states indices, None is
    `default`; otherwise the index-range grammar over 0..entries-1."""
    if text is None:
        return sorted(set(int(x) for x in default))
    if text.strip().lower() == "all":
        return list(range(entries))
    return parse_index_ranges(text, entries, "--layers")


def compact_ranges(values: Iterable[int], sep: str = ",") -> str:
    """[0, 1, 2, 3, 8, 10, 11] -> '0-3,8,10-11': the inclusive form of the grammar, read back exactly."""
    values = sorted(set(int(v) for v in values))
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return sep.join(parts)
