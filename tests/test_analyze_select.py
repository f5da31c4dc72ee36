"""Parsing of --samples / --layers / --where: ranges as documented, and no code execution."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from analyze import AnalysisError, parse_layers, resolve_samples, where_mask
from storage_schemas import open_archive
from storage_schemas.synth import write_synthetic_archive


def test_layers_default_skips_embeddings():
    stored = np.array([0, 1, 2, 3])
    assert parse_layers(None, stored) == [1, 2, 3]
    assert parse_layers("all", stored) == [0, 1, 2, 3]
    assert parse_layers("2:4", stored) == [2, 3]
    assert parse_layers(None, np.array([0])) == [0]
    with pytest.raises(AnalysisError, match="not stored"):
        parse_layers("1-5", stored, entries=6)
    with pytest.raises(AnalysisError, match="outside"):
        parse_layers("1-5", stored)


def test_negative_layers_count_from_the_model_end():
    """-1 is the model's last hidden state, as in `mir extract`, even when only some layers are stored."""
    stored = np.array([0, 8, 16, 32])
    assert parse_layers("-1", stored, entries=33) == [32]
    assert parse_layers("-17,-1", stored, entries=33) == [16, 32]
    with pytest.raises(AnalysisError, match="layers 31 are not stored"):
        parse_layers("-2", stored, entries=33)


def test_samples_only_at_names_a_file(tmp_path, monkeypatch):
    archive = open_archive(write_synthetic_archive(tmp_path / "a.zarr", layers=1, hidden=4, samples=6,
                                                   vision_tokens=3, text_tokens=5, seed=0))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "3").write_text("synth-000000\nsynth-000001\n")
    assert resolve_samples(archive, "3").tolist() == [3]  # a row index, although a file named 3 exists
    assert resolve_samples(archive, "@3").tolist() == [0, 1]
    assert resolve_samples(archive, "-2:").tolist() == [4, 5]
    with pytest.raises(AnalysisError, match="@ids.txt"):
        (tmp_path / "ids.txt").write_text("synth-000002\n")
        resolve_samples(archive, "ids.txt")


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
