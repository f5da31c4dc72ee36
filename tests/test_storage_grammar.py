"""The shared command-line grammars: index ranges (--layers everywhere, --samples rows) and text-token
rules, each checked against a straightforward reading of its documented definition."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_schemas import ArchiveError, TextTokenRule
from storage_schemas.ranges import RangeSpecError, compact_ranges, parse_index_ranges, parse_layers
from storage_schemas.schema import TextRole


def test_every_form_of_the_grammar():
    assert parse_index_ranges("3", 10) == [3]
    assert parse_index_ranges("-1", 10) == [9]
    assert parse_index_ranges("0:3,7, 9-9", 10) == [0, 1, 2, 7, 9]
    assert parse_index_ranges("2-4", 10) == [2, 3, 4]  # inclusive
    assert parse_index_ranges("2:4", 10) == [2, 3]  # half-open
    assert parse_index_ranges("-4--1", 10) == [6, 7, 8, 9]
    assert parse_index_ranges("-3:", 10) == [7, 8, 9]
    assert parse_index_ranges(":2", 10) == [0, 1]
    assert parse_index_ranges("0:10:4", 10) == [0, 4, 8]
    assert parse_index_ranges(":", 3) == [0, 1, 2]
    assert parse_index_ranges("1,1,0-1", 3) == [0, 1]  # sorted, distinct


@pytest.mark.parametrize("bad, message", [("1..4", "cannot read"), ("10", "outside"), ("-11", "outside"),
                                          ("0:11", "outside"), ("4-2", "A <= B"), ("0:4:0", "at least 1"),
                                          (",", "selects nothing"), ("5:2", "selects nothing"), ("x", "cannot read")])
def test_bad_specs_are_refused(bad, message):
    with pytest.raises(RangeSpecError, match=message):
        parse_index_ranges(bad, 10)
    assert issubclass(RangeSpecError, ArchiveError)


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 40), data=st.data())
def test_ranges_match_python_slicing(size, data):
    """A:B[:S] is Python's slice, A-B is range(A, B + 1), with negatives from the end."""
    start = data.draw(st.integers(-size, size))
    stop = data.draw(st.integers(-size, size))
    step = data.draw(st.integers(1, 4))
    expected = list(range(size))[start:stop:step]
    spec = f"{start}:{stop}:{step}"
    if expected:
        assert parse_index_ranges(spec, size) == expected
    else:
        with pytest.raises(RangeSpecError):
            parse_index_ranges(spec, size)
    a = data.draw(st.integers(-size, size - 1))
    b = data.draw(st.integers(-size, size - 1))
    lo, hi = a % size, b % size
    if lo <= hi:
        assert parse_index_ranges(f"{a}-{b}", size) == list(range(lo, hi + 1))


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(0, 60)))
def test_compaction_reads_back(values):
    text = compact_ranges(values)
    assert (parse_index_ranges(text, 61) if values else []) == sorted(values)
    assert compact_ranges([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"


def test_layers_all_and_default():
    assert parse_layers(None, 5, default=[1, 2]) == [1, 2]
    assert parse_layers(" ALL ", 5, default=[]) == [0, 1, 2, 3, 4]
    assert parse_layers("-1", 5, default=[]) == [4]


def test_text_token_rule_accepts_both_spellings():
    assert TextTokenRule.parse("after-image") is TextTokenRule.parse("after_image") is TextTokenRule.AFTER_IMAGE
    assert TextTokenRule.parse("Response") is TextTokenRule.RESPONSE
    assert TextTokenRule.AFTER_IMAGE.roles == (TextRole.AFTER_IMAGE_TEMPLATE, TextRole.RESPONSE)
    assert TextTokenRule.ALL.roles == tuple(TextRole)
    with pytest.raises(ArchiveError, match="after_image, response, all"):
        TextTokenRule.parse("everything")
