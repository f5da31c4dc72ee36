"""The memory plan (analyze/memory.py): lanes and batches change results only by rounding, a budget that
cannot hold one layer is refused before any read, the estimate bounds a measured peak, and on a
dask.distributed cluster the workers' memory limit is the budget."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from analyze_helpers import assert_matches_reference, reference_layers
from click.testing import CliRunner

from analyze import AnalysisOptions, analyze_selection, memory
from analyze.api import memory_plan, selection_shape
from analyze.engine import LazyChunk, compute_stats, lanes_of
from analyze.errors import AnalysisError
from analyze.memory import Shape
from analyze.runner import WORKER_PAUSE_SHARE, Runner
from pipelines.cli import main
from storage_schemas import open_archive
from storage_schemas.synth import write_synthetic_archive

GIB = 2**30


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """3 layers x 24 channels, 8 chunks per unit (32-row shards), tokens > channels in both modalities."""
    return write_synthetic_archive(tmp_path_factory.mktemp("mem") / "a.zarr", layers=3, hidden=24, samples=8,
                                   vision_tokens=30, text_tokens=24, seed=3, chunk_tokens=16, chunks_per_shard=2)


def _close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-6) -> bool:
    scale = max(float(np.abs(a).max()), 1e-300)
    return float(np.abs(a - b).max()) <= rtol * scale


def test_lanes_of_keeps_every_chunk_in_order():
    items = list(range(10))
    for lanes in (1, 2, 3, 4, 10, 25):
        runs = lanes_of(items, lanes)
        assert [x for run in runs for x in run] == items
        assert len(runs) == min(lanes, 10) and all(runs)


def test_lanes_change_statistics_only_by_rounding(archive):
    """Lanes change only rounding: the Gram products are float32 about each lane's running mean
    (moments.block_moments with `into`), so the moments agree to float32 rounding (1e-6 of their scale;
    the contract against the float64 reference, 1e-5, is tested in test_analyze_exact), and everything
    else exactly."""
    selection = open_archive(archive).select()
    layers = [int(x) for x in selection.layers]
    base = compute_stats(selection, layers, lanes=1)
    for lanes in (2, 3, 8):
        other = compute_stats(selection, layers, lanes=lanes)
        for layer in layers:
            for name in ("vision", "text"):
                a, b = base[layer].modality(name), other[layer].modality(name)
                assert np.array_equal(a.median, b.median)
                assert a.n_outliers == b.n_outliers and a.passes == b.passes
                assert a.norms.median == b.norms.median
                assert np.isclose(a.norms.std, b.norms.std, rtol=1e-13)
                ma, mb = a.replaced(), b.replaced()
                assert ma.n == mb.n and _close(ma.mean, mb.mean) and _close(ma.m2, mb.m2)


def test_batches_and_lanes_agree_with_the_reference(archive):
    selection = open_archive(archive).select()
    refs = reference_layers(selection)
    shape, workers = selection_shape(selection), Runner().workers
    results = []
    for layers in (1, 2, len(selection.layers)):
        budget = max(memory.estimate(shape, layers=layers, lanes=1, workers=workers))
        result = analyze_selection(selection, AnalysisOptions(cache=False, memory_limit=budget))
        assert result.settings["memory_plan"].startswith(f"{layers} layer(s) per batch")
        assert_matches_reference(selection, result, refs)
        results.append(result)
    for other in results[1:]:
        for a, b in zip(results[0].layers, other.layers):
            assert np.isclose(a["fd"], b["fd"], rtol=1e-11, atol=0)


def test_a_budget_below_one_layer_is_refused_before_reading(archive, monkeypatch):
    def no_reads(self):
        raise AssertionError("read the archive although the budget was refused")

    monkeypatch.setattr(LazyChunk, "load", no_reads)
    selection = open_archive(archive).select()
    with pytest.raises(AnalysisError, match=r"memory budget 100.00 MiB is too small for hidden size 24.*"
                                            r"Raise --memory-limit"):
        analyze_selection(selection, AnalysisOptions(cache=False, memory_limit=100 * 2**20))
    out = CliRunner().invoke(main, ["analyze", str(archive), "--no-cache", "--memory-limit", "100MiB"])
    assert out.exit_code != 0 and "is too small for hidden size 24" in out.output
    assert "Traceback" not in out.output


def test_plan_at_the_papers_shape_and_at_8192():
    paper = Shape(d=4096, chunk_rows=8192, itemsize=2, tokens=57600 + 80061)
    default = memory.plan(paper, 2, 2, 12 * GIB)
    assert default.layers_per_batch == 2 and default.peak <= 12 * GIB
    two = memory.plan(paper, 2, 2, 2 * 10**9)
    assert two.layers_per_batch == 1 and two.peak <= 2 * 10**9
    with pytest.raises(AnalysisError, match="hidden size 4096"):
        memory.plan(paper, 2, 2, 10**9)
    wide = Shape(d=8192, chunk_rows=4096, itemsize=2, tokens=6 * 1376)
    with pytest.raises(AnalysisError, match=r"hidden size 8192: one layer at a time needs about"):
        memory.plan(wide, 1, 2, 2 * 10**9)
    assert memory.plan(wide, 1, 2, 8 * 10**9).peak <= 8 * 10**9
    # the terms other code owns are explicit: sample groups and the bootstrap's gradient raise the need
    alone = max(memory.estimate(paper, layers=1, lanes=1, workers=2))
    assert max(memory.estimate(paper, layers=1, lanes=1, workers=2, groups=4)) >= alone + 2 * 3 * paper.square
    _, finish, boot = memory.estimate(paper, layers=1, lanes=1, workers=2, bootstrap=True)
    assert boot >= finish + (memory.GRADIENT_COPIES - memory.FINISH_COPIES) * paper.square


CHILD = """
import json, sys
from analyze import AnalysisOptions, analyze_selection
from analyze.api import memory_plan
from analyze.runner import Runner
from storage_schemas import open_archive
selection = open_archive(sys.argv[1]).select()
options = AnalysisOptions(cache=False, memory_limit=int(sys.argv[2]))
plan = memory_plan(selection, len(selection.layers), Runner(), options)
result = analyze_selection(selection, options)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so it would report the forking parent's
# (pytest's) RSS at the fork whenever that is larger; VmHWM belongs to this process's own address space
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak": peak, "estimate": plan.peak,
                  "plan": plan.describe(), "mir": result.mir}))
"""


def test_the_estimate_bounds_a_measured_peak(tmp_path):
    """In a fresh process at d = 1024 (the d x d terms are 8 MiB each): the peak RSS stays under the
    plan's estimate, at the budget that just holds one layer and at a roomy one."""
    path = write_synthetic_archive(tmp_path / "w.zarr", layers=2, hidden=1024, samples=6, vision_tokens=240,
                                   text_tokens=200, seed=1)
    shape = selection_shape(open_archive(path).select())
    tight = max(memory.estimate(shape, layers=1, lanes=1, workers=Runner().workers))
    for budget in (tight, 4 * GIB):
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(budget)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["estimate"] <= budget
        assert doc["peak"] <= doc["estimate"], doc


def test_on_a_cluster_the_worker_memory_limit_is_the_budget(archive, monkeypatch):
    distributed = pytest.importorskip("distributed")
    # a process LocalCluster sets OMP/MKL/OPENBLAS_NUM_THREADS=1 in this process's environment (its workers'
    # pre-spawn environment); without the restore, later tests' child processes run torch single-threaded
    # and round differently from the same forward pass in this process
    for name in list(os.environ):
        monkeypatch.setenv(name, os.environ[name])
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_"):
        if name not in os.environ:
            monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv(name, "")  # registers the name so teardown removes it
            monkeypatch.delenv(name)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="300MB",
                                  dashboard_address=None) as cluster:
        runner = Runner(cluster.scheduler_address)
        try:
            assert runner.worker_memory() == (int(300 * 10**6 * WORKER_PAUSE_SHARE), 1)  # where it would pause
            selection = open_archive(archive).select()
            options = AnalysisOptions(cache=False)  # the local default (half the RAM) is larger: the worker's wins
            with pytest.raises(AnalysisError, match=r"memory budget 228.88 MiB is too small.*workers' memory limit"):
                memory_plan(selection, 3, runner, options)
            with pytest.raises(AnalysisError, match="is too small"):
                analyze_selection(selection, options, runner=runner)
        finally:
            runner.close()
    # a worker that can hold the plan runs it within it: its own peak (VmHWM) under the plan's estimate,
    # under its pause share of the limit, and the same numbers as local threads
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True, memory_limit="1GB",
                                  dashboard_address=None) as cluster:
        runner = Runner(cluster.scheduler_address)
        try:
            options = AnalysisOptions(cache=False)
            plan = memory_plan(selection, len(selection.layers), runner, options)
            result = analyze_selection(selection, options, runner=runner)
            peaks = runner._connect().run(_own_peak)
            assert plan.budget == int(10**9 * WORKER_PAUSE_SHARE) and max(peaks.values()) <= plan.peak <= plan.budget
            assert np.isclose(result.mir, analyze_selection(selection, options).mir, rtol=1e-9)
        finally:
            runner.close()


def _own_peak() -> int:
    """This process's peak RSS (VmHWM: its own address space's, unlike ru_maxrss)."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
