"""`mir demo`, `mir compare`, and analysis of shared archives read over HTTP and S3."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from analyze import AnalysisOptions, analyze_selection
from pipelines.cli import main
from storage_schemas import ArchiveWriter, open_archive
from storage_schemas.synth import synthetic_records, write_synthetic_archive

from remote_servers import http_server, s3_server, upload_dir


def test_demo_runs_offline_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("MIR_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--quiet"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "MIR = " in out and "layer" in out and "FD" in out
    assert f"report:  {tmp_path / 'demo' / 'report.png'}" in out
    assert (tmp_path / "demo" / "report.png").stat().st_size > 10_000
    assert "random weights" in out and "llava-hf/llava-1.5-7b-hf" in out
    saved = json.loads((tmp_path / "demo" / "mir.json").read_text())
    assert saved["n_samples"] == 24 and len(saved["layers"]) == 4
    again = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--quiet"])
    assert "cached tiny LLaVA" in again.stdout  # the model is built once
    assert json.loads((tmp_path / "demo" / "mir.json").read_text())["mir"] == saved["mir"]


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    spec = dict(layers=3, hidden=24, samples=24, vision_tokens=12, text_tokens=10)
    a = write_synthetic_archive(root / "a.zarr", seed=0, **spec)
    a2 = write_synthetic_archive(root / "a_again.zarr", seed=0, **spec)
    b = root / "b.zarr"  # the same samples with vision tokens pushed away from the text tokens
    with ArchiveWriter.create(b, layers=range(4), hidden_size=24, dtype="float16", attrs={}) as writer:
        for rec in synthetic_records(seed=0, **spec):
            rec.vision = (rec.vision.astype("float32") + 4.0).astype("float16")
            writer.append([rec])
    return a, a2, b


def test_compare_flags_real_differences_and_not_identical_ones(archives, tmp_path):
    a, a2, b = archives
    runner = CliRunner()
    result = runner.invoke(main, ["compare", str(a), str(a2), str(b), "--label", "base", "--label", "same",
                                  "--label", "other", "--bootstrap", "50", "--json", str(tmp_path / "c.json"),
                                  "--plot", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    assert "24 shared samples" in result.stdout and "paired" in result.stdout
    data = json.loads((tmp_path / "c.json").read_text())
    same, other = data["differences"]
    assert same["b"] == "same" and same["difference"] == 0.0 and same["exceeds_noise"] is False
    assert other["b"] == "other" and other["exceeds_noise"] is True
    assert "MIR(other) - MIR(base)" in result.stdout and "exceeds the noise" in result.stdout
    assert (tmp_path / "c.png").stat().st_size > 0
    direct = analyze_selection(open_archive(b).select(layers=[1, 2, 3]), AnalysisOptions(cache=False))
    # per-sample-block statistics (for the bootstrap) merge in another order: float32 Gram rounding only
    assert data["archives"][2]["mir"] == pytest.approx(direct.mir, abs=1e-7)


def test_compare_uses_only_shared_samples(archives, tmp_path):
    a = archives[0]
    part = tmp_path / "part.zarr"
    records = list(synthetic_records(layers=3, hidden=24, samples=24, vision_tokens=12, text_tokens=10, seed=0))
    with ArchiveWriter.create(part, layers=range(4), hidden_size=24, dtype="float16", attrs={}) as writer:
        writer.append(records[5:20])  # 15 of the 24 samples
    result = CliRunner().invoke(main, ["compare", str(a), str(part), "--bootstrap", "0", "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["shared_samples"] == 15
    assert data["differences"][0]["difference"] == pytest.approx(0.0, abs=1e-9)  # the same 15 samples
    assert data["archives"][0]["n_samples"] == 15


def test_compare_takes_the_analyze_option_set(archives, tmp_path):
    """--samples, --where, --precision, --workers, --memory-limit, --no-cache mean what they mean in analyze."""
    a, _, b = archives
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"synth-{i:06d}\n" for i in range(3, 15)))
    common = ["--layers", "-2:", "--precision", "float64", "--workers", "1", "--memory-limit", "1GB", "--no-cache",
              "--json", "-"]
    for selection, expected in ((["--samples", "0:10", "--where", "row >= 4"], list(range(4, 10))),
                                (["--samples", f"@{ids}"], list(range(3, 15))),
                                (["--where", "text_count >= 12"], None)):
        result = CliRunner().invoke(main, ["compare", str(a), str(b), "--bootstrap", "0", *selection, *common])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        archive = open_archive(a)
        rows = expected if expected is not None else \
            [i for i in range(24) if int(archive.samples.text_count.values[i]) >= 12]
        assert data["shared_samples"] == len(rows) and data["layers"] == [2, 3]
        direct = analyze_selection(open_archive(b).select(samples=rows, layers=[2, 3]),
                                   AnalysisOptions(cache=False, precision="float64"))
        assert data["archives"][1]["mir"] == pytest.approx(direct.mir, abs=1e-9)
        assert data["archives"][1]["settings"]["precision"] == "float64"
        assert [r["cache"]["location"] for r in data["archives"]] == [None, None]  # --no-cache
    bad = CliRunner().invoke(main, ["compare", str(a), str(b), "--memory-limit", "lots"])
    assert bad.exit_code != 0 and "as a size" in bad.output


def _mir(location, **kw):
    # Equal up to float32-Gram rounding: a cached multi-block entry may serve a one-block request.
    archive = open_archive(location, **kw)
    return analyze_selection(archive.select(layers=[1, 2, 3]), AnalysisOptions(cache=True)).mir


def test_shared_archive_over_http_and_s3_gives_the_same_mir(archives, tmp_path, monkeypatch):
    monkeypatch.setenv("MIR_CACHE_DIR", str(tmp_path / "cache"))
    a = archives[0]
    local = _mir(a)
    with http_server(a.parent) as base:
        assert _mir(f"{base}/{a.name}") == pytest.approx(local, abs=1e-7)
        cli = CliRunner().invoke(main, ["analyze", f"{base}/{a.name}", "--json", "-"])
        assert cli.exit_code == 0, cli.output
        assert json.loads(cli.stdout)["mir"] == pytest.approx(local, abs=1e-7)
    with s3_server() as (_, options):
        upload_dir(a, "s3://lab/runs/a.zarr", options)
        assert _mir("s3://lab/runs/a.zarr", storage_options=options) == pytest.approx(local, abs=1e-7)
    assert any((tmp_path / "cache").rglob("*")), "read-only sources keep their statistics cache locally"


def test_compare_cka_of_the_same_tokens(archives, tmp_path):
    """`mir compare --cka`: per layer and modality, CKA of each archive to the first, equal to the n x n
    float64 definitions on the tokens read; a constant shift of the vision tokens (archive b) moves MIR
    but leaves CKA near 1 (it centres the features), and the table prints both forms."""
    from analyze_reference_beyond import linear_cka

    a, a2, b = archives
    result = CliRunner().invoke(main, ["compare", str(a), str(a2), str(b), "--bootstrap", "0", "--layers", "1,3",
                                       "--cka", "--json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    assert "CKA of b.zarr to a.zarr (same tokens), linear / debiased" in result.stdout
    drift = json.loads((tmp_path / "c.json").read_text())["drift"]
    assert [(d["a"], d["b"]) for d in drift] == [("a.zarr", "a_again.zarr"), ("a.zarr", "b.zarr")]
    sel_a, sel_b = open_archive(a).select(layers=[1, 3]), open_archive(b).select(layers=[1, 3])
    for i, row in enumerate(drift[1]["layers"]):
        for m in ("vision", "text"):
            x = getattr(sel_a, m).data[i].compute()
            y = getattr(sel_b, m).data[i].compute()
            want = linear_cka(x, y)
            assert abs(row[m]["cka"] - want[0]) <= 1e-5 and abs(row[m]["cka_debiased"] - want[1]) <= 1e-5
        assert row["vision"]["cka"] > 0.99 and row["text"]["cka"] == pytest.approx(1.0, abs=1e-6)
    assert all(abs(row[m][k] - 1) <= 1e-6 for row in drift[0]["layers"] for m in ("vision", "text")
               for k in ("cka", "cka_debiased"))
