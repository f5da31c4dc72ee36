"""`mir study` over tiny checkpoints: only new work on re-runs, summary equal to direct analyses."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from analyze.bootstrap import paired_difference
from pipelines.cli import main
from pipelines.compare import influence_by_id

SIZE = dict(hidden=32, layers=3)


def _checkpoint(run: Path, step: int) -> Path:
    from extract.tiny_models import TinySize, build_tiny_model
    return build_tiny_model(run / f"checkpoint-{step}", family="llava", seed=step, size=TinySize(**SIZE))


def _images_and_texts(root: Path) -> tuple[Path, Path]:
    from PIL import Image
    images, texts = root / "images", root / "texts"
    images.mkdir()
    texts.mkdir()
    for i in range(6):
        Image.new("RGB", (40 + 8 * i, 32), (40 * i, 255 - 30 * i, 90)).save(images / f"im{i}.png")
        (texts / f"t{i}.txt").write_text(f"Story number {i}. " + "The council met on Tuesday. " * (i + 1))
    return images, texts


@pytest.fixture()
def study_dir(tmp_path):
    run = tmp_path / "run"
    for step in (100, 200, 300):
        _checkpoint(run, step)
    images, texts = _images_and_texts(tmp_path)
    config = tmp_path / "study.toml"
    config.write_text(f"""
[study]
out = "out"
checkpoints = "run/checkpoint-*"

[extract]
images = "{images.name}"
texts = "{texts.name}"
num = 5
batch-size = 2
device = "cpu"

[analyze]
bootstrap = 30
seed = 1
no-cache = true
""")
    return tmp_path, config


def test_study_does_only_new_work_and_matches_direct_analysis(study_dir):
    root, config = study_dir
    runner = CliRunner()
    first = runner.invoke(main, ["study", str(config)])
    assert first.exit_code == 0, first.output
    assert "3 to extract" in first.output
    archives = root / "out" / "archives"
    mtimes = {p.name: (p / "zarr.json").stat().st_mtime_ns for p in archives.iterdir()}
    assert sorted(mtimes) == ["checkpoint-100.zarr", "checkpoint-200.zarr", "checkpoint-300.zarr"]

    _checkpoint(root / "run", 400)
    second = runner.invoke(main, ["study", str(config)])
    assert second.exit_code == 0, second.output
    assert "3 already extracted, 1 to extract" in second.output
    assert second.output.count("extracting ") == 1 and "extracting checkpoint-400" in second.output
    assert second.output.count("analysing ") == 1
    for name, mtime in mtimes.items():  # untouched
        assert (archives / name / "zarr.json").stat().st_mtime_ns == mtime

    rows = list(csv.DictReader(open(root / "out" / "summary.csv")))
    assert [int(r["step"]) for r in rows] == [100, 200, 300, 400]
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert (root / "out" / "mir_by_step.png").stat().st_size > 0
    previous = None
    for row, js in zip(rows, summary):
        direct = runner.invoke(main, ["analyze", js["archive"], "--bootstrap", "30", "--seed", "1", "--no-cache",
                                      "--json", "-"])
        assert direct.exit_code == 0, direct.output
        expected = json.loads(direct.stdout)
        assert float(row["mir"]) == pytest.approx(expected["mir"], abs=1e-12)
        assert float(row["ci_low"]) == pytest.approx(expected["bootstrap"]["ci_low"], abs=1e-12)
        assert [js["fd"][str(layer["layer"])] for layer in expected["layers"]] == \
            pytest.approx([layer["fd"] for layer in expected["layers"]], rel=1e-12)
        if previous is None:
            assert row["diff_prev"] == row["diff_ci_low"] == "" and js["diff_ci_high"] is None
        else:  # the difference from the previous checkpoint, paired by sample id, as the library computes it
            paired = paired_difference(influence_by_id(previous), influence_by_id(expected), 30, 1)
            assert float(row["diff_prev"]) == pytest.approx(expected["mir"] - previous["mir"], abs=1e-12)
            assert float(row["diff_ci_low"]) == pytest.approx(paired["ci_low"], abs=1e-9)
            assert js["diff_ci_high"] == pytest.approx(paired["ci_high"], abs=1e-9)
            assert row["diff_exceeds_noise"] == str(paired["exceeds_noise"])
            assert paired["paired_samples"] == expected["n_samples"]
        previous = expected
    assert len({r["mir"] for r in rows}) == 4  # different weights, different MIR


def test_study_config_errors_are_clear(study_dir):
    root, config = study_dir
    text = config.read_text().replace("batch-size = 2", "batch-sise = 2")
    config.write_text(text)
    result = CliRunner().invoke(main, ["study", str(config)])
    assert result.exit_code != 0
    assert "[extract]: unknown setting 'batch-sise'" in result.output
    config.write_text(text.replace("batch-sise = 2", "batch-size = \"two\""))
    result = CliRunner().invoke(main, ["study", str(config)])
    assert result.exit_code != 0 and "[extract]" in result.output and "two" in result.output


def test_study_cka_to_previous_and_first(tmp_path):
    """[study] cka = true over archives made already: per checkpoint the CKA rows to the previous and the
    first checkpoint equal analyze.drift between those archives, the CSV carries their layer means, the
    plot has the panel, and a re-run reuses the cached pairs."""
    import numpy as np

    from analyze.drift import compute_drift
    from storage_schemas import ArchiveWriter, open_archive
    from storage_schemas.synth import synthetic_records

    spec = dict(layers=2, hidden=16, samples=8, vision_tokens=6, text_tokens=5)
    rng = np.random.default_rng(0)
    for step, noise in ((10, 0.0), (20, 0.5), (30, 1.5)):  # the same tokens, drifting values
        with ArchiveWriter.create(tmp_path / f"step-{step}.zarr", layers=range(3), hidden_size=16, dtype="float16",
                                  attrs={}) as writer:
            for rec in synthetic_records(seed=0, **spec):
                for name in ("vision", "text_hidden"):
                    x = getattr(rec, name).astype("float32")
                    setattr(rec, name, (x + noise * rng.normal(0, 1, x.shape) * x.std()).astype("float16"))
                writer.append([rec])
    config = tmp_path / "study.toml"
    config.write_text('[study]\nout = "out"\narchives = "step-*.zarr"\ncka = true\n[analyze]\nno-cache = true\n')
    first = CliRunner().invoke(main, ["study", str(config)])
    assert first.exit_code == 0, first.output
    assert "CKA of step-30 to step-20" in first.output and "CKA of step-30 to step-10" in first.output
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert rows[0]["cka"] == {"previous": None, "first": None}

    def direct(a, b):
        return compute_drift(open_archive(tmp_path / f"step-{a}.zarr").select(),
                             open_archive(tmp_path / f"step-{b}.zarr").select(), [1, 2])
    for row, prev, first_step in ((rows[1], 10, 10), (rows[2], 20, 10)):
        for which, other in (("previous", prev), ("first", first_step)):
            want = direct(other, row["step"])
            for got_layer, want_layer in zip(row["cka"][which], want):
                for m in ("vision", "text"):
                    assert got_layer[m]["cka"] == pytest.approx(want_layer[m]["cka"], abs=1e-12)
        assert row["cka_previous_text"] == pytest.approx(sum(r["text"]["cka"] for r in row["cka"]["previous"]) / 2)
    header = (tmp_path / "out" / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == ["cka_previous_vision", "cka_previous_text", "cka_first_vision", "cka_first_text"]
    assert (tmp_path / "out" / "mir_by_step.png").stat().st_size > 0
    again = CliRunner().invoke(main, ["study", str(config)])
    assert again.exit_code == 0 and "CKA of" not in again.output
