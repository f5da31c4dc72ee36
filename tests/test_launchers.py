"""`mir extract --shard auto` under a real `torchrun --nproc-per-node 2` on CPU and under a
simulated Slurm array (two concurrent processes with SLURM_ARRAY_* set): each process takes its
own part, the last to finish merges, and the result equals an unsharded run. The torchrun job
also runs the training-time `mir_at_step` in a gloo process group (one shard per rank, merged by
rank 0): the same archive again, and one analysis."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from extract_helpers import assert_same_contents, read_archive
from pipelines.cli import main
from training_helpers import probe_manifest, tiny_llava

ARGS = ["--batch-size", "2", "--device", "cpu", "--quiet"]  # 4 samples: the same batches sharded or not


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    model, manifest = tiny_llava(root / "model"), probe_manifest(root / "probe", n=4)
    whole = root / "whole.zarr"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the parts (OMP_NUM_THREADS=1): every reduction runs in the same order
    try:
        result = CliRunner().invoke(main, ["extract", "--model", str(model), "--manifest", str(manifest), "--out",
                                           str(whole), *ARGS])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return model, manifest, read_archive(whole)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **extra}


def _check(out: Path, expected: dict, logs: str) -> None:
    assert out.exists(), logs
    assert not out.with_name(out.name + ".parts").exists()  # parts removed after the merge
    assert_same_contents(read_archive(out), expected, exact=True)
    assert logs.count("merged 2 parts into") == 1, logs  # exactly one process merged


def test_torchrun_two_processes_equal_an_unsharded_run(setup, tmp_path):
    model, manifest, expected = setup
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    out, probe_out = tmp_path / "run.zarr", tmp_path / "during-training"
    cmd = [*launcher, "--standalone", "--nproc-per-node", "2", str(Path(__file__).with_name("launch_child.py")),
           str(model), str(manifest), str(out), str(probe_out)]
    done = subprocess.run(cmd, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs
    assert "torchrun: part 1 of 2" in logs and "torchrun: part 2 of 2" in logs
    _check(out, expected, logs)
    # training-time extraction across ranks: no duplicate sample, equal to the unsharded run
    step = probe_out / "step-7.zarr"
    assert_same_contents(read_archive(step), expected, exact=True)
    assert sorted(p.name for p in probe_out.iterdir()) == ["step-7.zarr"]
    assert "rank 1: step 7" in logs and "no result" in logs and logs.count(" MIR ") == 1


def test_slurm_array_equals_an_unsharded_run(setup, tmp_path):
    model, manifest, expected = setup
    out = tmp_path / "array.zarr"
    cmd = [sys.executable, "-m", "pipelines.cli", "extract", "--model", str(model), "--manifest", str(manifest),
           "--out", str(out), "--shard", "auto", *ARGS]
    tasks = [subprocess.Popen(cmd, env=_env(SLURM_ARRAY_TASK_ID=str(t), SLURM_ARRAY_TASK_COUNT="2",
                                            SLURM_ARRAY_TASK_MIN="3", OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for t in (3, 4)]
    logs = ""
    for task in tasks:
        output, _ = task.communicate(timeout=300)
        logs += output
        assert task.returncode == 0, output
    assert "slurm array: part 1 of 2" in logs and "slurm array: part 2 of 2" in logs
    _check(out, expected, logs)


def test_shard_auto_without_a_launcher_is_a_clear_error(setup, tmp_path, monkeypatch):
    model, manifest, _ = setup
    for key in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(key, raising=False)
    result = CliRunner().invoke(main, ["extract", "--model", str(model), "--manifest", str(manifest), "--out",
                                       str(tmp_path / "x.zarr"), "--shard", "auto", *ARGS])
    assert result.exit_code == 1
    assert "found neither a torchrun environment" in result.output
    assert not (tmp_path / "x.zarr.parts").exists() or not any((tmp_path / "x.zarr.parts").iterdir())
