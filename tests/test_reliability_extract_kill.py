"""`mir extract` killed with SIGKILL at exact points of a run (between batches, inside a batch's array
writes, inside a shard write, inside the commit of a batch), then resumed: every archive ends up
identical to an uninterrupted run, and at the moment of the kill it held exactly the last commit.

The points are drawn with a fixed seed from each kind of moment, so the test is reproducible. One
tiny model family (LLaVA) keeps it fast; tests/test_extract_models.py kills every family once.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from extract_helpers import assert_same_contents, read_archive, tiny_model, write_data

from pipelines.cli import main
from storage_schemas import ArchiveWriter, open_archive, validate_archive
from storage_schemas.writer import TEMPORARY_SUFFIX

DRIVER = Path(__file__).with_name("reliability_extract_driver.py")
N = 10
# Batches of 2, a commit every 4 samples: commits after batches 2 and 4, at the end (sample 10),
# and one more when the run record is written. So some kills land with a batch appended but not
# committed. 18 array writes per commit, 3 commits of data: 54 writes.
RUN_OPTIONS = ["--batch-size", "2", "--commit-every", "4", "--quiet"]

_rng = random.Random(20240606)
SCENARIOS = [
    ("between_batches_before_append", "before_append", _rng.randint(2, 5)),
    ("between_batches_after_commit", "after_commit", _rng.randint(1, 2)),
    ("during_write_a", "write", _rng.randint(1, 18)),
    ("during_write_b", "write", _rng.randint(19, 54)),
    ("torn_shard_write", "torn_chunk", _rng.randint(1, 8)),
    ("commit_before_record", "commit_before", _rng.randint(1, 3)),
    ("commit_record_unrenamed", "commit_unrenamed", _rng.randint(1, 3)),
    ("run_record_commit", "commit_before", 4),  # every sample committed, the run record not yet
]


def _mir(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Inputs, an uninterrupted reference archive, and every scenario's killed archive."""
    root = tmp_path_factory.mktemp("extract-kill")
    images, texts = write_data(root / "data", N)
    args = ["extract", "--model", str(tiny_model("llava")), "--images", str(images), "--texts", str(texts),
            *RUN_OPTIONS]
    reference = root / "reference.zarr"
    _mir(*args, "--out", reference)
    plan = {"args": args, "scenarios": [
        {"name": name, "hook": hook, "at": at, "out": str(root / f"{name}.zarr"), "log": str(root / f"{name}.log")}
        for name, hook, at in SCENARIOS]}
    (root / "plan.json").write_text(json.dumps(plan))
    done = subprocess.run([sys.executable, str(DRIVER), str(root / "plan.json"), str(root / "results.json")],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["name"]: r for r in json.loads((root / "results.json").read_text())}
    return {"args": args, "reference": reference, "root": root, "results": results, "stderr": done.stderr}


def _last_commit(log: Path) -> int:
    lines = log.read_text().split() if log.exists() else []
    return int(lines[-1]) if lines else 0


@pytest.mark.parametrize("name,hook,at", SCENARIOS, ids=[f"{n}@{a}" for n, _, a in SCENARIOS])
def test_sigkill_then_resume_equals_an_uninterrupted_run(runs, name, hook, at):
    result, root = runs["results"][name], runs["root"]
    # A torn write dies where the kernel cut it (SIGXFSZ), every other scenario by SIGKILL.
    expected = signal.SIGXFSZ if hook in ("torn_chunk", "commit_unrenamed") else signal.SIGKILL
    assert result["signal"] == expected and not result["timed_out"], (result, runs["stderr"][-2000:])
    out = root / f"{name}.zarr"
    reference = read_archive(runs["reference"])

    # At the kill: exactly the last commit that returned is visible, and it is a true prefix.
    committed = _last_commit(root / f"{name}.log")
    report = validate_archive(out)
    assert report.ok, report.problems
    assert open_archive(str(out)).n_samples == committed
    partial = read_archive(out)
    assert list(partial) == list(reference)[:committed]
    assert_same_contents(partial, {k: reference[k] for k in partial})
    if hook in ("torn_chunk", "commit_unrenamed"):  # the torn, unpublished file really is there
        assert list(out.rglob(f"*{TEMPORARY_SUFFIX}")), "the kill left no temporary file"

    # The writer lock died with the process; --resume completes the archive.
    output = _mir(*runs["args"], "--out", out, "--resume")
    assert (f"({committed} already there)" in output) == (committed > 0), output
    resumed = read_archive(out)
    assert len(resumed) == N and len(set(resumed)) == N  # nothing missing, nothing twice
    assert_same_contents(reference, resumed)
    report = validate_archive(out)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    assert not list(out.rglob(f"*{TEMPORARY_SUFFIX}")), "the resuming writer removes a killed writer's temporary files"
    runs_recorded = open_archive(str(out)).attrs["extraction"]["runs"]
    assert runs_recorded[-1]["samples_done"] == N - committed
    ArchiveWriter.open_for_append(out).close()  # no stale lock


def test_the_scenarios_cover_every_kind_of_moment(runs):
    """The drawn points really fall where they are meant to: before any commit, between commits with
    a batch in flight, and after all data was committed."""
    committed = {name: _last_commit(runs["root"] / f"{name}.log") for name, _, _ in SCENARIOS}
    assert committed["run_record_commit"] == N
    assert any(0 < c < N for c in committed.values())
    assert all(c % 4 == 0 or c == N for c in committed.values())  # only whole commits are ever visible
