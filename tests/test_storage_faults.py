"""Faults during writing (a full disk) and a reader racing a writer."""
from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fault_stores import wrapping

from storage_schemas import ArchiveError, ArchiveWriter, open_archive, validate_archive
from storage_schemas.synth import synthetic_records

SPEC = dict(layers=2, hidden=16, samples=12, vision_tokens=6, text_tokens=10, seed=5)
CHILD = Path(__file__).with_name("storage_writer_child.py")


@pytest.mark.parametrize("fail_at", [0, 3, 9, 17])
def test_full_disk_during_a_write_keeps_the_committed_prefix(tmp_path, monkeypatch, fail_at):
    records = list(synthetic_records(**SPEC))
    path = tmp_path / "a.zarr"
    disk = {"full": False, "writes": 0}

    def fill_up(key, value):
        if disk["full"]:
            disk["writes"] += 1
            if disk["writes"] > fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")

    writer = ArchiveWriter.create(path, layers=[0, 1, 2], hidden_size=16, dtype="float16", attrs={},
                                  chunk_tokens=8, chunks_per_shard=2, wrap_store=wrapping(fill_up))
    writer.append(records[:4])
    writer.flush()
    disk["full"] = True
    with pytest.raises(ArchiveError, match="still holds its 4 committed samples"):
        writer.append(records[4:8])  # whole shards are written as they fill,
        writer.flush()               # the rest and the commit record here
    disk["full"] = False  # space freed
    assert validate_archive(path).ok
    assert open_archive(path).samples.sample_id.values.tolist() == [r.sample_id for r in records[:4]]
    writer.append(records[4:])  # the failed batch can be appended again
    writer.close()
    archive = open_archive(path)
    assert archive.n_samples == 12
    assert archive.vision.hidden.values.tobytes() == np.concatenate([r.vision for r in records], 1).tobytes()
    assert validate_archive(path).ok


def test_reader_sees_a_consistent_committed_prefix_while_a_writer_appends(tmp_path):
    path = tmp_path / "a.zarr"
    expected = list(synthetic_records(**SPEC))
    proc = subprocess.Popen([sys.executable, str(CHILD), str(path), "12", "1", "-1"], stdout=subprocess.PIPE,
                            text=True)
    proc.stdout.readline()
    seen = set()
    while proc.poll() is None or not seen or max(seen) < 12:
        archive = open_archive(path)
        n = archive.n_samples
        seen.add(n)
        ids = archive.samples.sample_id.values.tolist()
        assert ids == [r.sample_id for r in expected[:n]]
        vision = archive.vision.hidden.values
        assert vision.tobytes() == np.concatenate([r.vision for r in expected[:n]], 1).tobytes()
        if proc.poll() is not None and n == 12:
            break
    assert proc.wait(timeout=60) == 0
    assert len(seen) >= 2  # the reader really overlapped the appends
