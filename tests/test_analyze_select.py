"""Parsing of --samples / --layers / --where: ranges as documented, and no code execution."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from analyze import AnalysisError, parse_layers, where_mask
from analyze.select import parse_ranges


def test_ranges():
    assert parse_ranges("0:3,7, 9-11", 20, "x") == [0, 1, 2, 7, 9, 10, 11]
    assert parse_ranges("15:", 18, "x") == [15, 16, 17]
    assert parse_ranges("0:10:4", 20, "x") == [0, 4, 8]
    with pytest.raises(AnalysisError, match="cannot read"):
        parse_ranges("1..4", 10, "x")


def test_layers_default_skips_embeddings():
    stored = np.array([0, 1, 2, 3])
    assert parse_layers(None, stored) == [1, 2, 3]
    assert parse_layers("all", stored) == [0, 1, 2, 3]
    assert parse_layers("2:4", stored) == [2, 3]
    assert parse_layers(None, np.array([0])) == [0]
    with pytest.raises(AnalysisError, match="not stored"):
        parse_layers("1-5", stored)


@pytest.fixture
def table():
    return xr.Dataset({"sample_id": ("sample", np.array(["a1", "b2", "c3", "a4"])),
                       "image": ("sample", np.array(["cat.png", "dog.png", "cat2.jpg", "x.png"])),
                       "text_count": ("sample", np.array([5, 30, 12, 40]))})


def test_where(table):
    assert where_mask("text_count >= 12", table).tolist() == [False, True, True, True]
    assert where_mask("startswith(sample_id, 'a') or text_count == 30", table).tolist() == [True, True, False, True]
    assert where_mask("not contains(image, 'cat') and 10 < text_count < 35", table).tolist() == [False, True, False,
                                                                                                  False]
    assert where_mask("sample_id in ['a1', 'c3']", table).tolist() == [True, False, True, False]
    assert where_mask("matches(image, '\\\\.jpg$')", table).tolist() == [False, False, True, False]
    assert where_mask("row != 0", table).tolist() == [False, True, True, True]


@pytest.mark.parametrize("expr", ["__import__('os').system('echo hi')", "image.upper() == 'X'", "(lambda: 1)()",
                                  "text_count + 1 > 3", "open('/etc/passwd')", "[x for x in image]"])
def test_where_runs_no_code(table, expr):
    with pytest.raises(AnalysisError, match="only comparisons"):
        where_mask(expr, table)
