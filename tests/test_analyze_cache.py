"""Cached sufficient statistics: reused, invalidated by appends, never trusted when incomplete or damaged."""
from __future__ import annotations

import json
import shutil

import pytest

import analyze.api as api
from analyze import AnalysisOptions, analyze_selection
from storage_schemas.sidecars import ANALYSIS_CACHE as GROUP
from storage_schemas import ArchiveWriter, open_archive
from storage_schemas.synth import synthetic_records, write_synthetic_archive

KW = dict(layers=2, hidden=12, vision_tokens=10, text_tokens=8, seed=11)


@pytest.fixture
def archive(tmp_path):
    return write_synthetic_archive(tmp_path / "a.zarr", samples=6, chunk_tokens=16, chunks_per_shard=2, **KW)


def _run(path, **options):
    sel = open_archive(path).select(layers=[1, 2])
    return analyze_selection(sel, AnalysisOptions(**options))


def _forbid_compute(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("statistics were recomputed instead of read from the cache")
    monkeypatch.setattr(api, "compute_stats", fail)


def test_reuse_then_other_mode_without_reading_data(archive, monkeypatch):
    first = _run(archive)
    assert first.cache["layers_reused"] == []
    assert len(list((archive / GROUP).glob("*-L1-*"))) == 1
    _forbid_compute(monkeypatch)
    again = _run(archive)
    assert again.cache["layers_reused"] == [1, 2] and again.mir == first.mir
    other = _run(archive, mode="reference-accurate")  # the trace mode is not part of the key
    assert other.mode == "reference-accurate"


def test_bootstrap_runs_serve_plain_runs(archive, monkeypatch):
    boot = _run(archive, bootstrap=5)
    _forbid_compute(monkeypatch)
    plain = _run(archive)
    assert plain.cache["layers_reused"] == [1, 2]
    assert abs(plain.mir - boot.mir) < 1e-12


def test_append_invalidates(archive):
    before = _run(archive)
    with ArchiveWriter.open_for_append(archive) as w:
        for rec in synthetic_records(samples=9, start=6, **KW):
            w.append([rec])
    after = _run(archive)
    assert after.cache["layers_reused"] == [] and after.n_samples == 9
    assert after.mir != before.mir
    names = [p.name for p in (archive / GROUP).iterdir() if p.is_dir()]
    assert len(names) == 2 and all(n.startswith(open_archive(archive).fingerprint) for n in names)


def test_incomplete_or_damaged_entries_are_recomputed(archive):
    first = _run(archive)
    entries = sorted(p for p in (archive / GROUP).iterdir() if p.is_dir())
    # a run killed before its marker: the completion flag is missing
    meta = json.loads((entries[0] / "zarr.json").read_text())
    meta["attributes"].pop("complete")
    (entries[0] / "zarr.json").write_text(json.dumps(meta))
    # a damaged array chunk: the checksum fails
    chunk = next(p for p in (entries[1] / "vision" / "inlier_m2").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    again = _run(archive)
    assert again.cache["layers_reused"] == []
    assert abs(again.mir - first.mir) < 1e-12
    # a temporary folder left by a killed writer is never read as an entry
    shutil.copytree(entries[0], archive / GROUP / ".tmp-deadbeef")
    assert _run(archive).cache["layers_reused"] == [1, 2]


def test_read_only_archive_uses_local_cache_dir(archive, tmp_path, monkeypatch):
    monkeypatch.setenv("MIR_CACHE_DIR", str(tmp_path / "cache"))
    arch = open_archive(archive)
    arch.read_only = True
    sel = arch.select(layers=[1])
    result = analyze_selection(sel, AnalysisOptions())
    assert str(tmp_path / "cache") in result.cache["location"]
    assert not (archive / GROUP).exists()
    assert analyze_selection(sel, AnalysisOptions()).cache["layers_reused"] == [1]


def test_no_cache_writes_nothing(archive):
    _run(archive, cache=False)
    assert not (archive / GROUP).exists()


def test_one_cache_folder_rule_for_analysis_and_demo(tmp_path, monkeypatch):
    """MIR_CACHE_DIR with ~ expanded, an empty value meaning unset; the demo's model lives there too."""
    from analyze.cache import StatsCache, user_cache_dir
    from pipelines.demo import DEMO_MODEL_VERSION, demo_model

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MIR_CACHE_DIR", "~/mc")
    assert user_cache_dir() == tmp_path / "home" / "mc"
    monkeypatch.setenv("MIR_CACHE_DIR", "")
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "mir-pipeline"
    model = user_cache_dir() / f"demo-llava-v{DEMO_MODEL_VERSION}"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert demo_model(lambda _: None) == model
    archive = open_archive(write_synthetic_archive(tmp_path / "ro.zarr", samples=4, **KW))
    archive.read_only = True  # as for a URL or a folder without write permission
    assert StatsCache.for_archive(archive).directory.parent == user_cache_dir()
