"""`mir extract` on tiny models of every supported family, built offline and loaded through the
real loading path: stored values against an independent forward pass, token bookkeeping, batch-size
independence, shard-and-merge, and resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from extract_helpers import (
    FAMILIES,
    STORIES,
    assert_same_contents,
    read_archive,
    reference_forward,
    shared_data,
    tiny_model,
)

from pipelines.cli import main

N = 8


def mir(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def extract_args(family: str, out: Path, *extra: str) -> list[str]:
    images, texts = shared_data(N)
    return ["extract", "--model", tiny_model(family), "--images", images, "--texts", texts, "--out", out,
            "--quiet", *extra]


@pytest.fixture(scope="module")
def batch1(tmp_path_factory):
    """Per family: an archive extracted with batch size 1 (float32), built on first use."""
    root = tmp_path_factory.mktemp("batch1")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            out = root / f"{family}.zarr"
            mir(*extract_args(family, out, "--batch-size", "1"))
            made[family] = out
        return made[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_states_equal_an_independent_forward_pass(family, batch1):
    """Exactly equal in float32, for every sample, layer and token; positions, ids and roles right."""
    out = batch1(family)
    stored = read_archive(out)
    assert len(stored) == N
    from storage_schemas import open_archive

    archive = open_archive(str(out))
    n_layers = archive.attrs["model"]["num_hidden_layers"]
    assert archive.layers.tolist() == list(range(n_layers + 1))
    assert archive.attrs["storage"]["source_dtype"] == "float32"
    _, processor, _ = __import__("extract_helpers")._loaded(str(tiny_model(family)))
    counts = set()
    for i, rec in enumerate(stored.values()):
        text = STORIES[i % len(STORIES)]
        ids, hidden, image_token_id = reference_forward(tiny_model(family), Path(rec["image"]), text)
        is_image = ids == image_token_id
        assert np.array_equal(rec["input_ids"], ids)
        assert np.array_equal(rec["vision_position"], np.flatnonzero(is_image))
        assert np.array_equal(rec["text_position"], np.flatnonzero(~is_image))
        assert np.array_equal(rec["token_id"], ids[~is_image])
        assert np.array_equal(rec["vision"], hidden[:, is_image])
        assert np.array_equal(rec["text"], hidden[:, ~is_image])
        counts.add(int(is_image.sum()))
        # roles: by position relative to the image tokens; the response decodes to the text
        first, last = np.flatnonzero(is_image)[[0, -1]]
        pos, role = rec["text_position"], rec["role"]
        assert np.all(role[pos < first] == 0)
        assert np.all(role[(pos > first) & (pos < last)] == 1)
        assert np.all(role[pos > last] >= 2)
        response = processor.tokenizer.decode(rec["token_id"][role == 3])
        assert text in response and len(response) <= len(text) + 2, (response, text)
        assert rec["text_ref"].endswith(".story")
    if family in ("llava_next", "qwen2_vl", "idefics3"):
        assert len(counts) > 1, "variable image-token counts expected for this family"
    else:
        assert counts == {16}


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_size_does_not_change_contents(family, batch1, tmp_path):
    """Batch 4 (padded) gives the same tokens, ids, roles and positions as batch 1, and the same
    hidden states up to float32 rounding: other batch shapes (padding length, a mask instead of the
    plain causal path) reorder floating-point sums, which moves values by a few ulps (measured
    about 5e-7 of the largest magnitude); a padding or mask bug would show as O(1) differences."""
    out = tmp_path / "b4.zarr"
    mir(*extract_args(family, out, "--batch-size", "4"))
    assert_same_contents(read_archive(batch1(family)), read_archive(out), exact=False, rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_shards_merge_into_one_run(family, batch1, tmp_path):
    parts = [tmp_path / "p2.zarr", tmp_path / "p1.zarr", tmp_path / "p3.zarr"]
    for k, part in zip((2, 1, 3), parts, strict=True):
        mir(*extract_args(family, part, "--batch-size", "1", "--shard", f"{k}/3"))
    sizes = [len(read_archive(p)) for p in parts]
    assert sum(sizes) == N and min(sizes) >= 2
    merged = tmp_path / "merged.zarr"
    mir("merge", merged, *parts)  # given out of order: merge orders by shard index
    single = read_archive(batch1(family))
    assert_same_contents(single, read_archive(merged))
    assert_same_contents(single, read_archive([str(parts[1]), str(parts[0]), str(parts[2])]))
    from storage_schemas import open_archive, validate_archive

    assert validate_archive(str(merged)).ok
    attrs = open_archive(str(merged)).attrs
    assert attrs["extraction"]["shard"] is None and len(attrs["extraction"]["merged_from"]) == 3
    assert [m["shard"]["index"] for m in attrs["extraction"]["merged_from"]] == [1, 2, 3]
    assert "shard_samples" not in attrs["dataset"] and len(attrs["extraction"]["runs"]) == 3
    code = CliRunner().invoke(main, ["merge", str(tmp_path / "m2.zarr"), str(parts[0]), str(parts[2])]).exit_code
    assert code == 1  # shard 1 missing
    assert attrs["dataset"]["sample_list_hash"] == open_archive(str(batch1(family))).attrs["dataset"][
        "sample_list_hash"]


def _committed(out: Path) -> int:
    try:
        return json.loads((out / "zarr.json").read_text())["attributes"]["commit"]["samples"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_after_sigkill_equals_uninterrupted_run(family, tmp_path):
    args = ["--batch-size", "2", "--commit-every", "2"]
    full = tmp_path / "full.zarr"
    mir(*extract_args(family, full, *args))
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, str(Path(__file__).with_name("extract_child.py")),
           *map(str, extract_args(family, out, *args))]
    env = {**os.environ, "MIR_TEST_BATCH_DELAY": "0.4"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _committed(out) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the child never committed"
            time.sleep(0.01)
        time.sleep(0.2)  # land somewhere in the next batch (forward, write or commit)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    at_kill = _committed(out)
    assert 2 <= at_kill < N, at_kill
    output = mir(*extract_args(family, out, *args, "--resume"))
    assert f"({at_kill} already there)" in output
    assert_same_contents(read_archive(full), read_archive(out))
    from storage_schemas import validate_archive

    assert validate_archive(str(out)).ok


def test_bfloat16_and_float16_storage(tmp_path, batch1):
    """bfloat16 output is stored as float32 (exact, source dtype recorded); float16 stays float16."""
    from storage_schemas import open_archive

    ref = read_archive(batch1("llava"))
    for dtype, stored in (("bfloat16", np.float32), ("float16", np.float16)):
        out = tmp_path / f"{dtype}.zarr"
        mir(*extract_args("llava", out, "--dtype", dtype, "--batch-size", "1"))
        archive = open_archive(str(out))
        assert archive.source_dtype == dtype and archive.attrs["model"]["dtype"] == dtype
        got = read_archive(out)
        for sid, rec in got.items():
            assert rec["vision"].dtype == stored
            if dtype == "bfloat16":
                assert not np.any(rec["vision"].view(np.uint32) & 0xFFFF)  # bfloat16 values, unrounded
            scale = np.abs(ref[sid]["vision"]).max()
            assert np.abs(rec["vision"].astype(np.float32) - ref[sid]["vision"]).max() < 0.1 * scale
            assert np.array_equal(rec["vision_position"], ref[sid]["vision_position"])


def test_layer_subset_and_provenance(tmp_path, batch1):
    out = tmp_path / "sub.zarr"
    mir(*extract_args("llava", out, "--layers", "0,2-3,-1", "--batch-size", "1", "--compression", "lz4"))
    from storage_schemas import open_archive

    archive = open_archive(str(out))
    assert archive.layers.tolist() == [0, 2, 3, 4]
    assert archive.attrs["storage"]["codec"]["cname"] == "lz4"  # lossless all the same (compared below)
    full, sub = read_archive(batch1("llava")), read_archive(out)
    for sid in full:
        assert np.array_equal(sub[sid]["vision"], full[sid]["vision"][[0, 2, 3, 4]])
        assert np.array_equal(sub[sid]["text"], full[sid]["text"][[0, 2, 3, 4]])
    model, ext, data = archive.attrs["model"], archive.attrs["extraction"], archive.attrs["dataset"]
    assert model["weights_hash"].startswith("sha256:") and model["config_hash"].startswith("sha256:")
    assert model["architecture"] == "LlavaForConditionalGeneration" and model["image_token_id"] >= 0
    assert ext["settings"]["layers"] == [0, 2, 3, 4] and ext["prompt_layout"] == "chat_template"
    assert ext["batch_size"] == 1 and "torch" in ext["library_versions"] and ext["device"].startswith("cpu")
    assert ext["runs"][0]["samples_done"] == N
    assert data["sample_list_hash"].startswith("sha256:") and data["samples"] == N
    json.dumps(archive.attrs)  # JSON only


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_mask_is_redundant_under_right_padding(family):
    """mir extract omits the attention mask for causal decoders (faster attention kernels). With
    right padding a real token's causal window holds only real tokens, so the real tokens' hidden
    states must not change; on CPU they are bitwise identical (asserted to 1e-6 relative so that
    other kernels may differ by rounding)."""
    import torch

    from extract.data import from_directories
    from extract.loading import load_model
    from extract.prompts import PromptLayout
    from extract.runner import BatchPreparer, drops_attention_mask, forward_kwargs

    info = load_model(str(tiny_model(family)))
    assert drops_attention_mask(info.model)
    images, texts = shared_data(N)
    batch = BatchPreparer(info.processor, info.image_token_id, PromptLayout()).prepare(
        list(from_directories(images, texts).samples[:4]))
    lengths = batch.inputs["attention_mask"].sum(1).tolist()
    unmasked = {k: v for k, v in batch.inputs.items() if k != "attention_mask"}
    with torch.inference_mode():
        masked_out = info.model(**batch.inputs, **forward_kwargs(info.model)).hidden_states
        unmasked_out = info.model(**unmasked, **forward_kwargs(info.model)).hidden_states
    for a, b in zip(masked_out, unmasked_out, strict=True):
        for i, n in enumerate(lengths):
            x, y = a[i, :n].numpy(), b[i, :n].numpy()
            assert np.abs(x - y).max() <= 1e-6 * np.abs(x).max()
    assert len(set(lengths)) > 1  # the batch really is padded
