"""The sidecar namespace (derived data inside an archive, e.g. the analysis cache) as the format
declares it, and the one answer to "is this archive complete?"."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.study import archive_state
from storage_schemas import ArchiveWriter, merge_archives, open_archive, validate_archive
from storage_schemas.sidecars import ANALYSIS_CACHE, SIDECARS, sidecar_dir
from storage_schemas.summary import disk_bytes, is_complete, planned_samples, summarize
from storage_schemas.synth import synthetic_records, write_synthetic_archive

KW = dict(layers=2, hidden=8, vision_tokens=6, text_tokens=8, seed=3)


def _mir(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_the_analysis_cache_is_a_declared_sidecar(tmp_path):
    path = write_synthetic_archive(tmp_path / "a.zarr", samples=6, **KW)
    size = disk_bytes(str(path))
    _mir("analyze", path)
    cache = path / ANALYSIS_CACHE
    assert ANALYSIS_CACHE in SIDECARS and json.loads((cache / "zarr.json").read_text())["node_type"] == "group"
    assert any(p.is_dir() for p in cache.iterdir())
    assert disk_bytes(str(path)) == size  # sizes leave sidecars out
    info = summarize(open_archive(path))
    assert info["sidecars"][str(path)][ANALYSIS_CACHE] > 0
    assert f"sidecar      {ANALYSIS_CACHE}" in _mir("inspect", path).output
    report = validate_archive(path)
    assert report.ok and report.sidecars == [ANALYSIS_CACHE] and not report.warnings
    assert "sidecars _mir_cache (derived data, not checked)" in _mir("validate", path).output
    assert open_archive(path).fingerprint == info["fingerprint"]


def test_unknown_root_entries_are_named(tmp_path):
    path = write_synthetic_archive(tmp_path / "a.zarr", samples=3, **KW)
    (path / "_mir_notes").mkdir()
    (path / "extra").mkdir()
    report = validate_archive(path)
    assert report.ok
    assert any("'_mir_notes' is in the sidecar namespace" in w for w in report.warnings)
    assert any("'extra' is not part of the mir-archive/1 format" in w for w in report.warnings)
    assert sidecar_dir("http://host/a.zarr", ANALYSIS_CACHE) is None
    with pytest.raises(ValueError, match="not a declared sidecar"):
        sidecar_dir(path, "_mir_notes")


def test_merge_leaves_sidecars_behind(tmp_path):
    records = list(synthetic_records(samples=6, **KW))
    parts = []
    for k, chunk in enumerate((records[:3], records[3:])):
        with ArchiveWriter.create(tmp_path / f"p{k}.zarr", layers=range(3), hidden_size=8, dtype="float16",
                                  attrs={}) as writer:
            writer.append(chunk)
        _mir("analyze", tmp_path / f"p{k}.zarr")
        assert (tmp_path / f"p{k}.zarr" / ANALYSIS_CACHE).is_dir()
        parts.append(tmp_path / f"p{k}.zarr")
    merged = merge_archives(parts, tmp_path / "m.zarr")
    assert not (merged / ANALYSIS_CACHE).exists() and open_archive(merged).n_samples == 6


@pytest.mark.parametrize("dataset, committed, planned, complete", [
    ({}, 4, None, True),                                        # no plan recorded (mir synth, foreign writers)
    ({"samples": 6}, 4, 6, False),
    ({"samples": 6}, 6, 6, True),
    ({"samples": 12, "shard_samples": 6}, 6, 6, True),          # a --shard part: its own share counts
    ({"samples": 12, "shard_samples": 6}, 5, 6, False),
])
def test_one_answer_to_is_it_complete(dataset, committed, planned, complete):
    attrs = {"dataset": dataset, "commit": {"samples": committed}}
    assert planned_samples(attrs) == planned and is_complete(attrs) is complete


def test_study_and_inspect_use_that_answer(tmp_path):
    path = write_synthetic_archive(tmp_path / "a.zarr", samples=3, **KW)
    with ArchiveWriter.open_for_append(path) as writer:
        writer.update_attrs({"dataset": {}})
    assert archive_state(path) == "complete"  # was "partial": a study would have re-extracted it
    with ArchiveWriter.open_for_append(path) as writer:
        writer.update_attrs({"dataset": {"samples": 5}})
    assert archive_state(path) == "partial"
    assert "3 of 5 planned (incomplete" in _mir("inspect", path).output
    assert archive_state(tmp_path / "none.zarr") == "missing"
