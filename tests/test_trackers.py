"""`mir study --log` and `mir compare --log`: the runs read back with TensorBoard's own event
reader and MLflow's own client (a local file store)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipelines.cli import main
from storage_schemas.synth import write_synthetic_archive

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def _archives(root, steps=(10, 20, 30)):
    for step in steps:
        write_synthetic_archive(root / f"step-{step}.zarr", layers=2, hidden=16, samples=20, vision_tokens=8,
                                text_tokens=8, seed=step)


def _tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    settings = acc.Tensors("settings")[0].tensor_proto.string_val[0].decode()
    return scalars, settings, acc.PluginTagToContent("hparams")


def _mlflow(uri, run_name):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("mir").experiment_id],
                              filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1
    run = runs[0]
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    return history, run.data.params, run.info.status


def test_study_logs_every_step_to_tensorboard_and_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    _archives(tmp_path / "made")
    (tmp_path / "study.toml").write_text('[study]\nout = "out"\narchives = "made/step-*.zarr"\n'
                                         '[analyze]\nbootstrap = 30\nseed = 2\n')
    result = CliRunner().invoke(main, ["study", "study.toml", "--log", "tensorboard:tb", "--log", "mlflow:mlruns"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["step"] for r in rows] == [10, 20, 30]

    scalars, settings, hparams = _tensorboard(tmp_path / "tb" / "study")
    history, params, status = _mlflow((tmp_path / "mlruns").as_uri(), "study")
    assert status == "FINISHED"
    for name, key in (("mir/mir", "mir"), ("mir/ci_low", "ci_low"), ("mir/ci_high", "ci_high")):
        assert [s for s, _ in scalars[name]] == [10, 20, 30]
        assert [v for _, v in scalars[name]] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32 events
        assert history[name] == [(r["step"], r[key]) for r in rows]  # MLflow keeps float64
    for layer in ("1", "2"):
        assert history[f"mir/fd_layer_{layer}"] == [(r["step"], r["fd"][layer]) for r in rows]
        assert len(scalars[f"mir/fd_layer_{layer}"]) == 3
    assert params["analyze.bootstrap"] == "30" and params["analyze.seed"] == "2" and params["mode"] == "exact"
    assert "versions.xarray" in params
    assert "| analyze.bootstrap | 30 |" in settings and hparams  # the settings as text and as hparams


def test_compare_logs_each_archive_and_the_difference(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    _archives(tmp_path, steps=(1, 2))
    out, uri = tmp_path / "cmp.json", (tmp_path / "mlruns").as_uri()
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "step-1.zarr"), str(tmp_path / "step-2.zarr"),
                                       "--label", "a", "--label", "b", "--bootstrap", "30", "--json", str(out),
                                       "--log", f"mlflow:{uri}", "--log", f"tensorboard:{tmp_path / 'tb'}"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    history, params, _ = _mlflow(uri, "compare-a-vs-b")
    assert history["mir/mir"] == [(0, data["archives"][0]["mir"]), (1, data["archives"][1]["mir"])]
    d = data["differences"][0]
    assert history["mir/diff_vs_first"] == [(1, d["difference"])]
    assert history["mir/diff_ci_low"] == [(1, d["ci_low"])] and history["mir/diff_ci_high"] == [(1, d["ci_high"])]
    assert json.loads(params["labels"]) == ["a", "b"] and params["analysis.bootstrap"] == "30"
    scalars, _, _ = _tensorboard(tmp_path / "tb" / "compare-a-vs-b")
    assert [s for s, _ in scalars["mir/mir"]] == [0, 1]


def test_bad_log_target_is_refused_before_any_work(tmp_path):
    _archives(tmp_path, steps=(1, 2))
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "step-1.zarr"), str(tmp_path / "step-2.zarr"),
                                       "--log", "wandb:project"])
    assert result.exit_code == 2
    assert "use tensorboard:DIR or mlflow:URI" in result.output
