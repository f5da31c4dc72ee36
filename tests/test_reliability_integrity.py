"""Integrity through analysis: damage to any stored file, or a metadata edit that breaks the schema,
makes `mir analyze` (the CLI) exit non-zero with a message naming the array and the region or chunk,
never printing a MIR, and `mir validate` report it.

Every chunk and shard file of a small archive is damaged in four ways (one flipped bit at a seeded
random offset, truncated at a seeded random length, emptied, deleted). tests/test_storage_integrity.py
checks `mir validate` and the reader API on a few of these; this file covers the analysis side and
every file.
"""
from __future__ import annotations

import atexit
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipelines.cli import main
from storage_schemas.synth import write_synthetic_archive

_ROOT = Path(tempfile.mkdtemp(prefix="mir-integrity-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
# 30 files: 2 hidden arrays x 3 layers x 2 shards, and 18 one-chunk arrays (20 arrays in all).
PRISTINE = write_synthetic_archive(_ROOT / "pristine.zarr", layers=2, hidden=12, vision_tokens=10, text_tokens=8,
                                   seed=11, samples=6, chunk_tokens=16, chunks_per_shard=2)
FILES = sorted(str(p.relative_to(PRISTINE)) for p in PRISTINE.rglob("*") if p.is_file() and "/c/" in str(p))
FAULTS = ("flip", "truncate", "empty", "delete")


def _invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _mir_json(*args) -> dict:
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--json", "-"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(PRISTINE, tmp_path / "a.zarr"))


def _damage(path: Path, fault: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if fault == "flip":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    elif fault == "truncate":
        path.write_bytes(bytes(data[: rng.randrange(1, len(data))]))
    elif fault == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()


def _assert_refused(code: int, output: str, array: str) -> None:
    assert code != 0, output
    assert "MIR" not in output and "Traceback" not in output, output
    assert f"'{array}'" in output, output


def test_the_damage_table_covers_every_stored_file():
    arrays = {f.split("/c/")[0] for f in FILES}
    assert len(arrays) == 20 and len(FILES) == 30 and sum("hidden" in f for f in FILES) == 12


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("relpath", FILES)
def test_damaged_file_fails_analyze_and_validate_naming_array_and_region(tmp_path, relpath, fault):
    archive = _copy(tmp_path)
    _damage(archive / relpath, fault, random.Random(f"{relpath}:{fault}"))
    array = relpath.split("/c/")[0]
    code, output = _invoke("analyze", archive, "--layers", "all")
    _assert_refused(code, output, array)
    if fault in ("empty", "delete"):
        assert "lacks chunk file(s) c/" + relpath.split("/c/")[1] in output, output
    else:
        assert "region [" in output, output  # e.g. array 'vision/hidden', region [1:2, 0:32, 0:12]
        if array.endswith("/hidden"):
            layer = int(relpath.split("/c/")[1].split("/")[0])
            assert f"region [{layer}:{layer + 1}, " in output, output
    code, output = _invoke("validate", archive)
    assert code == 1 and any(array in line and "chunk" in line for line in output.splitlines()), output


def test_analysis_reads_only_what_it_uses_and_a_warm_cache_still_gives_the_true_mir(tmp_path):
    """Documented behaviour: a damaged shard of a layer that is not analysed (layer 0 by default)
    does not stop `mir analyze`; cached statistics, computed before the damage, are served without
    reading the shards again, so the MIR printed is the archive's true one. `--no-cache` and
    `mir validate` find the damage."""
    archive = _copy(tmp_path)
    before = _mir_json("analyze", archive)
    _damage(archive / "vision/hidden/c/0/1/0", "flip", random.Random(0))  # layer 0: not analysed
    _damage(archive / "text/hidden/c/2/0/0", "flip", random.Random(1))    # layer 2: cached
    after = _mir_json("analyze", archive)
    assert after["mir"] == before["mir"] and after["cache"]["layers_reused"] == [1, 2]
    code, output = _invoke("analyze", archive, "--no-cache")
    _assert_refused(code, output, "text/hidden")
    assert "region [2:3, 0:32, 0:12]" in output
    code, output = _invoke("validate", archive)
    assert code == 1 and "'vision/hidden' chunk (layer index 0" in output and "'text/hidden' chunk (layer index 2" \
        in output


# ----------------------------------------------------------------------------- metadata edits
def _edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _commit(key, value):
    return lambda a: _edit_json(a / "zarr.json", lambda m: m["attributes"]["commit"].__setitem__(key, value))


def _commit_shift(key, delta):
    return lambda a: _edit_json(a / "zarr.json", lambda m: m["attributes"]["commit"].__setitem__(
        key, m["attributes"]["commit"][key] + delta))


def _array_meta(array, change):
    return lambda a: _edit_json(a / array / "zarr.json", change)


def _set_layer(a: Path) -> None:
    layer = zarr.open_array(a / "vision" / "layer", mode="r+")
    layer[1] = 5


# (name, edit, phrase `mir validate` prints, phrase `mir analyze` prints)
METADATA_EDITS = [
    ("dims_swapped", _array_meta("vision/hidden", lambda m: m.__setitem__("dimension_names",
                                                                         ["token", "layer", "channel"])),
     "array 'vision/hidden' has dimensions ('token', 'layer', 'channel')",
     "array 'vision/hidden' has dimensions ('token', 'layer', 'channel'), expected ('layer', 'token', 'channel')"),
    ("dim_renamed", _array_meta("text/role", lambda m: m.__setitem__("dimension_names", ["tok"])),
     "array 'text/role' has dimensions ('tok',)", "array 'text/role' has dimensions ('tok',), expected ('token',)"),
    ("dims_removed", _array_meta("samples/text_count", lambda m: m.pop("dimension_names")),
     "array 'samples/text_count' has dimensions ()", "array 'samples/text_count' has dimensions ()"),
    ("hidden_missing", lambda a: shutil.rmtree(a / "text" / "hidden"),
     "array 'text/hidden' is missing", "array 'text/hidden' is missing"),
    ("table_array_missing", lambda a: shutil.rmtree(a / "samples" / "vision_count"),
     "array 'samples/vision_count' is missing", "array 'samples/vision_count' is missing"),
    ("array_is_a_group", lambda a: (shutil.rmtree(a / "text" / "role"), zarr.open_group(a / "text" / "role", mode="w")),
     "'text/role' is a group", "'text/role' is a group, expected an array"),
    ("array_metadata_garbage", lambda a: (a / "vision" / "hidden" / "zarr.json").write_text("{not json"),
     "array 'vision/hidden': metadata unreadable", "the metadata of array 'vision/hidden' is unreadable"),
    ("hidden_dtype_changed", _array_meta("vision/hidden", lambda m: m.__setitem__("data_type", "float32")),
     "'vision/hidden' is float32, storage.dtype says float16",
     "'vision/hidden' has shape (3, 60, 12) and dtype float32"),
    ("hidden_channels_changed", _array_meta("text/hidden", lambda m: m["shape"].__setitem__(2, 11)),
     "'text/hidden' has 11 channels", "'text/hidden' has shape (3, 53, 11)"),
    ("storage_hidden_size", lambda a: _edit_json(a / "zarr.json", lambda m: m["attributes"]["storage"].__setitem__(
        "hidden_size", 11)), "storage.hidden_size says 11", "root attribute 'storage' say (3, tokens, 11)"),
    ("layer_relabelled", _set_layer,
     "'vision/layer' and 'text/layer' list different layers", "'vision/layer' [0, 5, 2] and 'text/layer' [0, 1, 2]"),
    ("commit_samples_too_many", _commit("samples", 99),
     "'samples/sample_id' holds 6 entries, the commit record says 99",
     "'samples/sample_id' holds 6 entries but the commit record says 99"),
    ("commit_samples_too_few", _commit_shift("samples", -1),
     "samples/vision_offset and vision_count are inconsistent",
     "'samples/vision_offset' and 'samples/vision_count' disagree"),
    ("commit_vision_tokens_short", _commit_shift("vision_tokens", -5),
     "samples/vision_offset and vision_count are inconsistent", "commit record (55 vision_tokens)"),
    ("commit_text_tokens_short", _commit_shift("text_tokens", -3),
     "samples/text_offset and text_count are inconsistent", "commit record (50 text_tokens)"),
    ("commit_input_tokens_long", _commit_shift("input_tokens", 4),
     "'samples/input_ids' holds", "'samples/input_ids' holds"),
    ("commit_negative", _commit("samples", -1),
     "the commit record (root attribute 'commit') is missing or malformed",
     "the commit record (root attribute 'commit') is missing or malformed"),
    ("commit_not_a_number", _commit("text_tokens", "53"),
     "the commit record (root attribute 'commit') is missing or malformed",
     "the commit record (root attribute 'commit') is missing or malformed"),
    ("commit_missing", lambda a: _edit_json(a / "zarr.json", lambda m: m["attributes"].pop("commit")),
     "the commit record (root attribute 'commit') is missing or malformed: None",
     "the commit record (root attribute 'commit') is missing or malformed: None"),
    ("schema_unknown_version", lambda a: _edit_json(a / "zarr.json", lambda m: m["attributes"].__setitem__(
        "schema", "mir-archive/2")),
     "unknown schema version 'mir-archive/2'", "unknown schema version 'mir-archive/2'"),
    ("schema_missing", lambda a: _edit_json(a / "zarr.json", lambda m: m["attributes"].pop("schema")),
     "not a mir archive (root attribute 'schema' is None", "not a mir archive (root attribute 'schema' is None"),
    ("storage_missing", lambda a: _edit_json(a / "zarr.json", lambda m: m["attributes"].pop("storage")),
     "root attribute 'storage' is missing or malformed", "root attribute 'storage' is missing or malformed"),
    ("root_metadata_garbage", lambda a: (a / "zarr.json").write_text("{not json"),
     "the root metadata (zarr.json) is unreadable", "the root metadata (zarr.json) is unreadable"),
    ("root_metadata_missing", lambda a: (a / "zarr.json").unlink(),
     "not a Zarr v3 group (no zarr.json)", "not a Zarr v3 group (no zarr.json)"),
]


@pytest.mark.parametrize("name,edit,validate_says,analyze_says", METADATA_EDITS, ids=[e[0] for e in METADATA_EDITS])
def test_schema_breaking_metadata_edit_is_reported_by_validate_and_analyze(tmp_path, name, edit, validate_says,
                                                                            analyze_says):
    archive = _copy(tmp_path)
    edit(archive)
    code, output = _invoke("validate", archive)
    assert code == 1 and validate_says in output and "Traceback" not in output, output
    code, output = _invoke("analyze", archive)
    assert code != 0 and analyze_says in output, output
    assert "MIR" not in output and "Traceback" not in output, output


def test_every_chunk_of_a_fresh_archive_is_stored_even_all_zero_ones(tmp_path):
    """A missing chunk file would read as zeros; the writer therefore stores every chunk, so the
    readers can treat any missing one as damage (here: layer list [0] and all-zero hidden states)."""
    from storage_schemas import (
        ArchiveWriter,
        SampleRecord,
        open_archive,
        validate_archive,
    )

    path = tmp_path / "zeros.zarr"
    with ArchiveWriter.create(path, layers=[0], hidden_size=4, dtype="float16", attrs={}, chunk_tokens=4,
                              chunks_per_shard=2) as writer:
        writer.append([SampleRecord(
            sample_id="a", image="i", text="t", vision=np.zeros((1, 9, 4), np.float16),
            vision_position=np.arange(9), text_hidden=np.zeros((1, 3, 4), np.float16),
            text_position=np.arange(9, 12), text_token_id=np.zeros(3, np.int64),
            text_role=np.array([2, 3, 3], np.int8), input_ids=np.zeros(12, np.int64))])
    hidden = path / "vision" / "hidden"
    assert sorted(str(p.relative_to(hidden)) for p in (hidden / "c").rglob("*") if p.is_file()) == \
        ["c/0/0/0", "c/0/1/0"]
    assert (path / "vision" / "layer" / "c" / "0").stat().st_size > 0
    assert validate_archive(path).ok and open_archive(path).n_samples == 1
    (path / "vision" / "hidden" / "c" / "0" / "1" / "0").unlink()
    assert "'vision/hidden' chunk file 'c/0/1/0' is missing" in validate_archive(path).problems[0]
