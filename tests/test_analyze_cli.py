"""`mir analyze` / `mir stats` end to end: outputs, selections, several parts as one, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from pipelines.cli import main
from storage_schemas import ArchiveWriter, open_archive
from storage_schemas.synth import synthetic_records, write_synthetic_archive

KW = dict(layers=3, hidden=12, vision_tokens=10, text_tokens=9, seed=4)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_synthetic_archive(tmp_path_factory.mktemp("cli") / "a.zarr", samples=24, chunk_tokens=32,
                                   chunks_per_shard=2, **KW)


def _mir(args) -> CliRunner:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_analyze_outputs(archive, tmp_path):
    out = _mir(["analyze", archive, "--no-cache", "--json", tmp_path / "r.json", "--netcdf", tmp_path / "r.nc",
                "--plot", tmp_path / "r.png"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("MIR = ") and "trace: exact" in out.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {"mir", "mode", "n_samples", "n_vision_tokens", "n_text_tokens", "layers", "settings",
            "versions"} <= set(doc)
    assert doc["mode"] == "exact" and doc["n_samples"] == 24
    assert [row["layer"] for row in doc["layers"]] == [1, 2, 3]  # layer 0 (embeddings) skipped by default
    assert all({"fd", "fd_mean_term", "fd_covariance_term", "centroid_cosine", "scale"} <= set(r)
               for r in doc["layers"])
    assert abs(np.log10(sum(r["fd"] for r in doc["layers"])) - doc["mir"]) < 1e-12
    ds = xr.open_dataset(tmp_path / "r.nc")
    assert list(ds["layer"].values) == [1, 2, 3] and np.allclose(ds["fd"].values, [r["fd"] for r in doc["layers"]])
    ds.close()
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_and_mode_names(archive):
    out = _mir(["stats", archive, "--no-cache", "--layers", "2"])
    assert out.exit_code == 0, out.output
    assert "eff. rank" in out.output and "centroid cosine" in out.output
    fast = _mir(["analyze", archive, "--no-cache", "--layers", "1", "--sqrt", "reference-fast", "--json", "-"])
    doc = json.loads(fast.stdout)
    assert doc["mode"] == "reference-fast"
    warning = next(w for w in doc["warnings"] if w.startswith("reference-fast"))
    assert "amplified rounding noise" in warning and '"below 1%"' in warning and "section 2.1" in warning


def test_selections(archive, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("# chosen samples\nsynth-000003\nsynth-000005\nsynth-000007\n")
    cases = {
        ("--samples", "0:10,20"): 11,
        ("--samples", f"@{ids}"): 3,
        ("--samples", "random:7:1"): 7,
        ("--where", "row in [1, 4, 9]"): 3,
    }
    for args, expected in cases.items():
        out = _mir(["analyze", archive, "--no-cache", "--layers", "1-2", "--json", "-", *args])
        assert out.exit_code == 0, out.output
        doc = json.loads(out.stdout)
        assert doc["n_samples"] == expected and [r["layer"] for r in doc["layers"]] == [1, 2]
    out = _mir(["analyze", archive, "--no-cache", "--layers", "3", "--json", "-", "--text-tokens", "response",
                "--where", "text_count >= 9 and not contains(sample_id, '0001')"])
    doc = json.loads(out.stdout)
    samples = open_archive(archive).samples
    keep = [c >= 9 and "0001" not in sid for c, sid in zip(samples.text_count.values, samples.sample_id.values)]
    assert doc["n_samples"] == sum(keep)


def test_parts_read_as_one_equal_one_archive(tmp_path):
    whole = write_synthetic_archive(tmp_path / "whole.zarr", samples=12, **KW)
    part_a = write_synthetic_archive(tmp_path / "a.zarr", samples=5, **KW)
    with ArchiveWriter.create(tmp_path / "b.zarr", layers=list(range(4)), hidden_size=12, dtype="float16",
                              attrs={"model": {"name_or_path": "synthetic"}}) as w:
        for rec in synthetic_records(samples=12, start=5, **KW):
            w.append([rec])
    one = json.loads(_mir(["analyze", whole, "--no-cache", "--json", "-"]).stdout)
    two = json.loads(_mir(["analyze", part_a, tmp_path / "b.zarr", "--no-cache", "--json", "-"]).stdout)
    assert two["n_samples"] == 12
    assert abs(one["mir"] - two["mir"]) < 1e-7  # equal up to float32 Gram rounding (other block boundaries)


def test_errors_are_messages_not_tracebacks(archive, tmp_path):
    cases = [
        (["--layers", "9"], "outside 0..3"),
        (["--layers", "-1,9"], "stored layers: 0-3"),
        (["--samples", "0:3,99"], "outside"),
        (["--where", "__import__('os').system('true')"], "only comparisons"),
        (["--where", "row % 2 == 0"], "only comparisons"),
        (["--where", "sample_id.upper() == 'X'"], "only comparisons"),
        (["--where", "nosuchfield == 1"], "unknown field"),
        (["--samples", "random:99:0"], "cannot draw"),
        (["--memory-limit", "lots"], "as a size"),
    ]
    for args, message in cases:
        out = _mir(["analyze", archive, "--no-cache", *args])
        assert out.exit_code != 0 and message in out.output, (args, out.output)
        assert "Traceback" not in out.output
    out = _mir(["analyze", tmp_path / "missing.zarr"])
    assert out.exit_code != 0 and "no archive there" in out.output
