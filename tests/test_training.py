"""MIR during training: the Trainer callback and the plain function against `mir extract` of the
checkpoints the Trainer saved, logging through the trainer, and `mir study` over the archives."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")

from extract_helpers import assert_same_contents, read_archive  # noqa: E402
from pipelines.cli import main  # noqa: E402
from training_helpers import ToyDataset, load, probe_manifest, tiny_llava  # noqa: E402


def _mir_extract(checkpoint, manifest, out):
    result = CliRunner().invoke(main, ["extract", "--model", str(checkpoint), "--manifest", str(manifest), "--out",
                                       str(out), "--batch-size", "2", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_trainer_callback_equals_mir_extract_of_saved_checkpoints(tmp_path, monkeypatch):
    import torch
    from transformers import Trainer, TrainingArguments

    from pipelines.trainer_callback import MIRCallback

    model_dir = tiny_llava(tmp_path / "init")
    manifest = probe_manifest(tmp_path / "probe")
    model, processor = load(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2, save_only_model=True,
                             per_device_train_batch_size=1, learning_rate=5e-3, logging_steps=1,
                             report_to=["tensorboard"], use_cpu=True, dataloader_num_workers=0, seed=0,
                             run_name="toy-run", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ToyDataset(processor), processing_class=processor)
    callback = MIRCallback(manifest, tmp_path / "mir", batch_size=2, bootstrap=20).attach(trainer)
    every = MIRCallback(manifest, tmp_path / "mir-every", every=3, prefix="mir_every", batch_size=2).attach(trainer)
    trainer.train()

    assert model.training  # the callback put the model back in training mode
    assert not torch.equal(before["lm_head.weight"], model.state_dict()["lm_head.weight"])
    assert [o.step for o in callback.history] == [2, 4]
    mirs = []
    for outcome in callback.history:
        ckpt = tmp_path / "run" / f"checkpoint-{outcome.step}"
        ref = _mir_extract(ckpt, manifest, tmp_path / f"ref-{outcome.step}.zarr")
        assert outcome.archive == tmp_path / "mir" / f"step-{outcome.step}.zarr"
        assert_same_contents(read_archive(outcome.archive), read_archive(ref), exact=True)
        # same format and provenance as mir extract, the weights named by run and step
        got, want = (json.loads((p / "zarr.json").read_text())["attributes"] for p in (outcome.archive, ref))
        assert got["extraction"]["settings_hash"] == want["extraction"]["settings_hash"]
        assert got["dataset"]["sample_list_hash"] == want["dataset"]["sample_list_hash"]
        assert got["model"]["config_hash"] == want["model"]["config_hash"]
        assert got["model"]["weights"] == {"source": "live model during training", "run": "toy-run",
                                           "step": outcome.step, "checkpoint": str(ckpt.resolve())}
        ref_json = tmp_path / f"ref-{outcome.step}.json"
        assert CliRunner().invoke(main, ["analyze", str(ref), "--json", str(ref_json), "--bootstrap", "20",
                                                 "--no-cache"]).exit_code == 0
        assert outcome.result.mir == pytest.approx(json.loads(ref_json.read_text())["mir"], abs=1e-12)
        mirs.append(outcome.result.mir)
    assert mirs[0] != mirs[1]

    # logged through trainer.log: in the history and in TensorBoard (read with its own reader)
    logged = {h["step"]: h for h in trainer.state.log_history if "mir/mir" in h}
    assert sorted(logged) == [2, 4]
    for outcome in callback.history:
        row = logged[outcome.step]
        boot = outcome.result.bootstrap
        assert row["mir/mir"] == outcome.result.mir
        assert (row["mir/ci_low"], row["mir/ci_high"]) == (boot["ci_low"], boot["ci_high"])
        assert {k for k in row if k.startswith("mir/fd_layer_")} == {"mir/fd_layer_1", "mir/fd_layer_2"}
    assert [o.step for o in every.history] == [3]  # every N steps, without a checkpoint
    every_attrs = json.loads((tmp_path / "mir-every" / "step-3.zarr" / "zarr.json").read_text())["attributes"]
    assert every_attrs["model"]["weights"]["step"] == 3 and every_attrs["model"]["weights"]["checkpoint"] is None
    assert [h["step"] for h in trainer.state.log_history if "mir_every/mir" in h] == [3]
    scalars = _tensorboard_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["train/mir/mir"]] == [2, 4]
    assert np.allclose([v for _, v in scalars["train/mir/mir"]], mirs, rtol=1e-6)  # TensorBoard stores float32
    assert len(scalars["train/mir/fd_layer_2"]) == 2

    # the archives form a study that `mir study` reads as it is
    (tmp_path / "study.toml").write_text('[study]\nout = "study-out"\narchives = "mir/step-*.zarr"\n'
                                         '[analyze]\nbootstrap = 20\n')
    result = CliRunner().invoke(main, ["study", str(tmp_path / "study.toml")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "study-out" / "summary.json").read_text())
    assert [r["step"] for r in rows] == [2, 4]
    assert [r["mir"] for r in rows] == pytest.approx(mirs, abs=1e-12)
    assert not (tmp_path / "study-out" / "archives").exists() or not any((tmp_path / "study-out" / "archives").iterdir())


def test_plain_loop_function_equals_mir_extract(tmp_path):
    import torch

    from pipelines.training import Probe, mir_at_step

    model_dir = tiny_llava(tmp_path / "init", seed=1)
    manifest = probe_manifest(tmp_path / "probe")
    model, processor = load(model_dir)
    data = ToyDataset(processor, n=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in (1, 2):
        loss = model(**{k: v[None] for k, v in data[step - 1].items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    probe = Probe(manifest=str(manifest), out=str(tmp_path / "mir"), run="plain", batch_size=2)
    processor.tokenizer.padding_side = "left"  # as a training script may leave it
    outcome = mir_at_step(model, processor, probe, 2)
    assert model.training and processor.tokenizer.padding_side == "left"  # the loop's state is restored
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    ref = _mir_extract(tmp_path / "saved", manifest, tmp_path / "ref.zarr")
    assert_same_contents(read_archive(outcome.archive), read_archive(ref), exact=True)
    scalars = outcome.scalars()
    assert scalars["mir/mir"] == outcome.result.mir and "mir/ci_low" not in scalars
    assert sorted(scalars) == ["mir/fd_layer_1", "mir/fd_layer_2", "mir/mir"]


def test_a_broken_probe_stops_training_before_the_first_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    from extract.errors import DataError
    from pipelines.trainer_callback import MIRCallback

    model, processor = load(tiny_llava(tmp_path / "init"))
    manifest = probe_manifest(tmp_path / "probe")
    (tmp_path / "probe" / "p2.png").write_bytes(b"not a png")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=1, report_to=[],
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ToyDataset(processor, n=2), processing_class=processor)
    MIRCallback(manifest, tmp_path / "mir").attach(trainer)
    with pytest.raises(DataError, match="p2.png"):
        trainer.train()
    assert trainer.state.global_step == 0 and not (tmp_path / "run" / "checkpoint-1").exists()
