"""The statistics cache under SIGKILL: a `mir analyze` killed while writing its cache entries (before
the first file, mid-entry, just before the completion marker, complete but not yet renamed, just
after publishing, inside the next entry) never leaves an entry that a later run trusts; the later
run gives the same MIR as an uncached run and reuses exactly the entries that were published.

tests/test_analyze_cache.py edits entries by hand (marker removed, a chunk damaged); here a real
process dies at real write points (tests/reliability_analyze_child.py), and every chunk file of a
published entry is deleted in turn.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from storage_schemas.sidecars import ANALYSIS_CACHE as GROUP
from pipelines.cli import main
from storage_schemas.synth import write_synthetic_archive

CHILD = Path(__file__).with_name("reliability_analyze_child.py")
LAYERS = [1, 2, 3]  # `mir analyze` default: every stored layer but the embeddings; one cache entry each


def _child(kill: str, archive: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHILD), kill, "analyze", str(archive), "--json", "-"],
                          capture_output=True, text=True, timeout=120)


def _analyze(archive: Path, *extra: str) -> dict:
    result = CliRunner().invoke(main, ["analyze", str(archive), "--json", "-", *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-kill")
    pristine = write_synthetic_archive(root / "pristine.zarr", layers=3, hidden=12, vision_tokens=10, text_tokens=8,
                                       seed=3, samples=8, chunk_tokens=16, chunks_per_shard=2)
    uncached = _analyze(pristine, "--no-cache")
    counting = root / "count.zarr"
    shutil.copytree(pristine, counting)
    done = _child("count", counting)
    assert done.returncode == 0, done.stderr
    writes = [int(n) for n in re.findall(r"^entry \S+-L\d+-\S+ (\d+)$", done.stdout, re.MULTILINE)]
    assert len(writes) == len(LAYERS) and min(writes) > 3, done.stdout
    return {"root": root, "pristine": pristine, "uncached": uncached, "writes": writes}


# (name, kill point from the per-entry write counts and a generator seeded by the name, entries
# published before the kill)
SCENARIOS = [
    ("first_write", lambda w, rng: "put:1", 0),
    ("mid_entry", lambda w, rng: f"put:{rng.randint(2, w[0] - 2)}", 0),
    ("before_marker", lambda w, rng: f"put:{w[0]}", 0),  # an entry's last write is its `complete` marker
    ("complete_not_renamed", lambda w, rng: "rename:1", 0),
    ("just_published", lambda w, rng: "published:1", 1),
    ("inside_second_entry", lambda w, rng: f"put:{w[0] + rng.randint(1, w[1])}", 1),
]


@pytest.mark.parametrize("name,point,published", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_killed_cache_write_is_never_trusted(setup, name, point, published):
    archive = setup["root"] / f"{name}.zarr"
    shutil.copytree(setup["pristine"], archive)
    kill = point(setup["writes"], random.Random(name))
    crashed = _child(kill, archive)
    assert crashed.returncode == -signal.SIGKILL, (kill, crashed.stdout, crashed.stderr)
    assert '"mir"' not in crashed.stdout  # it died before reporting anything
    entries = [p for p in (archive / GROUP).iterdir() if p.is_dir()]
    published_entries = [p for p in entries if not p.name.startswith(".tmp-")]
    assert len(published_entries) == published
    if kill.startswith(("put:", "rename:")) and kill != "put:1":
        assert any(p.name.startswith(".tmp-") for p in entries)  # the half-written entry is really there

    later = _analyze(archive)
    assert later["cache"]["layers_reused"] == LAYERS[:published]
    uncached = setup["uncached"]
    assert later["mir"] == uncached["mir"]
    assert [r["fd"] for r in later["layers"]] == [r["fd"] for r in uncached["layers"]]

    again = _analyze(archive)  # the later run left complete entries for every layer
    assert again["cache"]["layers_reused"] == LAYERS and again["mir"] == uncached["mir"]


def test_cache_entry_missing_a_chunk_file_is_recomputed_not_read_as_zeros(setup, tmp_path):
    """A file lost from a published entry (e.g. an interrupted copy of the archive with its cache)
    would read as zeros, i.e. wrong statistics behind a MIR that looks right: it is a miss instead.
    Each chunk file of the layer-1 entry is deleted in turn."""
    archive = Path(shutil.copytree(setup["pristine"], tmp_path / "a.zarr"))
    assert _analyze(archive)["mir"] == setup["uncached"]["mir"]
    entry = next((archive / GROUP).glob("*-L1-*"))
    files = sorted(str(p.relative_to(entry)) for p in entry.rglob("*") if p.is_file() and "/c/" in str(p))
    assert len(files) == 18  # 9 arrays per modality, every chunk stored
    for relpath in files:
        (entry / relpath).unlink()
        later = _analyze(archive)
        assert later["cache"]["layers_reused"] == [2, 3], relpath
        assert later["mir"] == setup["uncached"]["mir"], relpath
        assert (entry / relpath).is_file()  # the entry was rewritten whole
