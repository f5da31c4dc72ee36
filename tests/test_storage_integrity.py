"""Crash safety, locking and validation of damaged archives."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipelines.cli import main
from storage_schemas import ArchiveError, ArchiveWriter, open_archive, validate_archive
from storage_schemas.synth import synthetic_records

CHILD = Path(__file__).with_name("storage_writer_child.py")
N = 12
SPEC = dict(layers=2, hidden=16, samples=N, vision_tokens=6, text_tokens=10, seed=5)


def _run_child(path, kill_at_write=-1, batch=2):
    return subprocess.run([sys.executable, str(CHILD), str(path), str(N), str(batch), str(kill_at_write)],
                          capture_output=True, text=True, timeout=120)


def _assert_is_committed_prefix(path):
    archive = open_archive(path)
    expected = list(synthetic_records(**SPEC))[: archive.n_samples]
    assert archive.samples.sample_id.values.tolist() == [r.sample_id for r in expected]
    if expected:
        assert archive.vision.hidden.values.tobytes() == np.concatenate([r.vision for r in expected], 1).tobytes()
        assert archive.text.hidden.values.tobytes() == np.concatenate([r.text_hidden for r in expected], 1).tobytes()
    return archive.n_samples


# Each batch makes 18 array writes (3 vision, 5 text, then 10 of the samples table);
# these points land at the end of the 1st batch and inside the data writes of the 2nd and 3rd.
@pytest.mark.parametrize("kill_at_write", [17, 18, 21, 26, 33, 40])
def test_sigkill_at_any_write_leaves_valid_committed_prefix_and_resume_completes(tmp_path, kill_at_write):
    path = tmp_path / "a.zarr"
    crashed = _run_child(path, kill_at_write)
    assert crashed.returncode == -signal.SIGKILL
    report = validate_archive(path)
    assert report.ok, report.problems
    committed = _assert_is_committed_prefix(path)
    assert committed == crashed.stdout.count("committed") * 2
    resumed = _run_child(path)
    assert resumed.returncode == 0, resumed.stderr
    assert _assert_is_committed_prefix(path) == N
    assert validate_archive(path).ok and not validate_archive(path).warnings


def test_sigkill_at_random_moments(tmp_path):
    rng = random.Random(0)
    for trial in range(3):
        path = tmp_path / f"r{trial}.zarr"
        proc = subprocess.Popen([sys.executable, str(CHILD), str(path), str(N), "1", "-1"],
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # the first commit has landed
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert validate_archive(path).ok
        _assert_is_committed_prefix(path)
        assert _run_child(path).returncode == 0
        assert _assert_is_committed_prefix(path) == N


def test_interrupted_append_is_a_warning_and_is_rolled_back(tmp_path):
    path = tmp_path / "a.zarr"
    _run_child(path, kill_at_write=17 + 8)  # inside the second batch, after its hidden states
    report = validate_archive(path)
    assert report.ok and any("interrupted" in w for w in report.warnings)
    with ArchiveWriter.open_for_append(path) as writer:
        assert writer.rolled_back_tokens > 0
    assert not validate_archive(path).warnings


def test_lock_of_a_killed_writer_does_not_stick(tmp_path):
    path = tmp_path / "a.zarr"
    _run_child(path, kill_at_write=20)
    ArchiveWriter.open_for_append(path).close()


@pytest.fixture()
def archive(tmp_path):
    path = tmp_path / "a.zarr"
    assert _run_child(path).returncode == 0
    return path


def _shard_files(path, array="vision/hidden"):
    return sorted(p for p in (path / array / "c").rglob("*") if p.is_file())


def test_validate_accepts_a_good_archive(archive):
    result = CliRunner().invoke(main, ["validate", str(archive)])
    assert result.exit_code == 0, result.output
    assert "valid mir-archive/1 archive, 12 samples" in result.output


def test_flipped_byte_is_named_by_array_and_chunk(archive):
    shard = _shard_files(archive)[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard.write_bytes(bytes(data))
    report = validate_archive(archive)
    assert not report.ok
    assert any("'vision/hidden' chunk (layer index" in p for p in report.problems), report.problems
    result = CliRunner().invoke(main, ["validate", str(archive)])
    assert result.exit_code == 1 and "vision/hidden" in result.output


def test_truncated_shard_is_reported(archive):
    shard = _shard_files(archive, "text/hidden")[0]
    shard.write_bytes(shard.read_bytes()[:-20])
    report = validate_archive(archive)
    assert not report.ok and any("'text/hidden' chunk" in p for p in report.problems)


def test_reader_names_the_damaged_chunk_instead_of_returning_numbers(archive):
    shard = _shard_files(archive)[0]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="vision/hidden"):
        open_archive(archive).vision.hidden.values


def test_missing_array_is_reported(archive):
    import shutil
    shutil.rmtree(archive / "text" / "role")
    report = validate_archive(archive)
    assert report.problems == ["array 'text/role' is missing"]


def test_inconsistent_offsets_are_reported(archive):
    offsets = zarr.open_array(archive / "samples" / "vision_offset", mode="r+")
    values = offsets[:]
    values[3] += 1
    offsets[:] = values
    report = validate_archive(archive)
    assert any("samples/vision_offset" in p and "sample 3" in p for p in report.problems)


def test_unknown_schema_version_is_refused(archive):
    meta_path = archive / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["schema"] = "mir-archive/2"
    meta_path.write_text(json.dumps(meta))
    report = validate_archive(archive)
    assert len(report.problems) == 1 and "unknown schema version 'mir-archive/2'" in report.problems[0]
    result = CliRunner().invoke(main, ["inspect", str(archive)])
    assert result.exit_code != 0 and "unknown schema version" in result.output


def test_not_an_archive(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "not a Zarr v3 group" in validate_archive(tmp_path / "empty").problems[0]
    assert "no archive there" in validate_archive(tmp_path / "nothing").problems[0]


@pytest.mark.parametrize("codec", ["numcodecs.pickle", "numcodecs.zlib"])
def test_an_archive_cannot_make_the_reader_run_foreign_codecs(archive, codec):
    meta_path = archive / "samples" / "sample_id" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"] = [meta["codecs"][0], {"name": codec, "configuration": {}}]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArchiveError, match="samples/sample_id"):
        open_archive(archive)
    report = validate_archive(archive)
    assert any("samples/sample_id" in p for p in report.problems)
