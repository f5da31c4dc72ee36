"""`mir extract` on bad and unusual input: clear errors naming the file, nothing half-written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from extract_helpers import assert_same_contents, read_archive, tiny_model, write_data
from PIL import Image

from pipelines.cli import main


def run_mir(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def mir(*args) -> str:
    code, output = run_mir(*args)
    assert code == 0, output
    return output


def extract(images, texts, out, *extra, family="llava"):
    return run_mir("extract", "--model", tiny_model(family), "--images", images, "--texts", texts, "--out", out,
                   "--quiet", *extra)


@pytest.fixture
def data(tmp_path):
    images, texts = write_data(tmp_path / "data", 4)
    return images, texts


# ----------------------------------------------------------------------------- images
def _break(path: Path, kind: str) -> None:
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "not_an_image":
        path.write_text("hello, I am text")


@pytest.mark.parametrize("kind", ["corrupt", "zero_byte", "truncated", "not_an_image"])
def test_bad_image_fails_naming_the_file_and_writes_nothing(kind, data, tmp_path):
    images, texts = data
    bad = images / "img02.png"
    _break(bad, kind)
    out = tmp_path / "out.zarr"
    code, output = extract(images, texts, out)
    assert code == 1
    assert str(bad) in output and "Traceback" not in output
    assert not out.exists()


def test_missing_image_in_manifest_fails_naming_it(data, tmp_path):
    images, _ = data
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": "data/images/img00.png", "text": "Some text."}) + "\n"
                        + json.dumps({"id": "b", "image": "data/images/nope.png", "text": "More text."}) + "\n")
    out = tmp_path / "out.zarr"
    code, output = run_mir("extract", "--model", tiny_model("llava"), "--manifest", manifest, "--out", out, "--quiet")
    assert code == 1 and str(tmp_path / "data/images/nope.png") in output and "not found" in output
    assert not out.exists()


def test_unusual_image_modes_are_converted(tmp_path):
    images, texts = write_data(tmp_path / "data", 6)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(images / "img00.png")                       # grayscale
    Image.fromarray(rgb).convert("RGBA").save(images / "img01.png")                    # alpha
    Image.fromarray(rgb).convert("CMYK").save(images / "img02.jpg")                    # CMYK JPEG
    (images / "img02.png").unlink()
    Image.fromarray(rgb).convert("P").save(images / "img03.png")                       # palette
    Image.fromarray((rng.integers(0, 65536, (30, 30))).astype(np.uint16)).save(images / "img04.png")  # 16-bit
    Image.fromarray(rgb).convert("LA").save(images / "img05.png")                      # gray + alpha
    modes = [Image.open(p).mode for p in sorted(images.iterdir())]
    assert {"L", "RGBA", "CMYK", "P", "LA"} <= set(modes) and any(m.startswith("I") for m in modes), modes
    out = tmp_path / "out.zarr"
    code, output = extract(images, texts, out)
    assert code == 0, output
    stored = read_archive(out)
    assert len(stored) == 6 and all(rec["vision"].shape[1] == 16 for rec in stored.values())


# ----------------------------------------------------------------------------- texts
@pytest.mark.parametrize("kind", ["empty_txt", "empty_story_body", "not_utf8"])
def test_bad_text_fails_naming_the_file_and_writes_nothing(kind, data, tmp_path):
    images, texts = data
    if kind == "empty_txt":
        bad = texts / "s01.txt"
        bad.write_text("  \n\t\n")
        (texts / "s01.story").unlink()
        expected = "empty"
    elif kind == "empty_story_body":
        bad = texts / "s01.story"
        bad.write_text("\n\n@highlight\n\nonly a highlight\n")
        expected = "empty"
    else:
        bad = texts / "s01.story"
        bad.write_bytes("Caf\u00e9 au lait".encode("latin-1"))
        expected = "UTF-8"
    out = tmp_path / "out.zarr"
    code, output = extract(images, texts, out)
    assert code == 1 and str(bad) in output and expected in output, output
    assert not out.exists()


def test_text_containing_the_image_placeholder_is_refused(data, tmp_path):
    images, texts = data
    (texts / "s00.story").write_text("A story that mentions <image> literally.")
    out = tmp_path / "out.zarr"
    code, output = extract(images, texts, out)
    assert code == 1 and "placeholder" in output and "s00.story" in output
    assert not out.exists()


# ----------------------------------------------------------------------------- models
def test_model_without_image_token_is_refused(tmp_path, data):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    images, texts = data
    text_only = tmp_path / "text-only"
    tok = AutoTokenizer.from_pretrained(tiny_model("llava"))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(text_only)
    tok.save_pretrained(text_only)
    out = tmp_path / "out.zarr"
    code, output = run_mir("extract", "--model", text_only, "--images", images, "--texts", texts, "--out", out,
                           "--quiet")
    assert code == 1 and "names no image token" in output and str(text_only) in output
    assert not out.exists()


def test_model_whose_processor_disagrees_on_the_image_token_is_refused(tmp_path, data):
    images, texts = data
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model("llava"), broken)
    config = json.loads((broken / "config.json").read_text())
    config["image_token_id"] = 3
    (broken / "config.json").write_text(json.dumps(config))
    code, output = run_mir("extract", "--model", broken, "--images", images, "--texts", texts,
                           "--out", tmp_path / "out.zarr", "--quiet")
    assert code == 1 and "image token" in output and "3" in output


# ----------------------------------------------------------------------------- mid-run failure
def test_failure_mid_run_commits_only_whole_batches_and_resume_completes(tmp_path):
    images, texts = write_data(tmp_path / "data", 8)
    clean = tmp_path / "clean.zarr"
    args = ("--batch-size", "2", "--commit-every", "2")
    assert extract(images, texts, clean, *args)[0] == 0
    good = (images / "img05.png").read_bytes()
    (images / "img05.png").write_bytes(b"garbage")
    out = tmp_path / "out.zarr"
    code, output = extract(images, texts, out, *args, "--no-preflight")
    assert code == 1 and str(images / "img05.png") in output
    assert "4 of 8 samples are committed" in output and "--resume" in output
    from storage_schemas import validate_archive

    assert validate_archive(str(out)).ok
    partial, full = read_archive(out), read_archive(clean)
    assert list(partial) == list(full)[:4]
    assert_same_contents(partial, {k: full[k] for k in partial})
    (images / "img05.png").write_bytes(good)
    assert extract(images, texts, out, *args, "--resume")[0] == 0
    assert_same_contents(full, read_archive(out))


# ----------------------------------------------------------------------------- resume checks
def test_resume_refuses_a_different_model_settings_or_data(data, tmp_path):
    images, texts = data
    out = tmp_path / "out.zarr"
    assert extract(images, texts, out, "--num", "3")[0] == 0
    code, output = extract(images, texts, out, "--num", "3")
    assert code == 1 and "already exists" in output
    code, output = extract(images, texts, out, "--num", "3", "--resume", "--layers", "0,1")
    assert code == 1 and "extraction.layers" in output
    code, output = extract(images, texts, out, "--num", "3", "--resume", family="llava_next")
    assert code == 1 and "model." in output
    code, output = extract(images, texts, out, "--num", "4", "--resume")
    assert code == 1 and "sample list" in output
    code, output = extract(images, texts, out, "--num", "3", "--resume", "--max-text-tokens", "5")
    assert code == 1 and "max_text_tokens" in output
    assert len(read_archive(out)) == 3  # untouched by the refused attempts


# ----------------------------------------------------------------------------- sources & options
def test_manifest_rows_relative_paths_and_inline_or_file_texts(data, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.txt").write_text("A text kept in a file.\n")
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "first", "image": "data/images/img00.png", "text": "An inline text."},
            {"id": "second", "image": "data/images/img01.png", "text_file": "sub/t.txt"}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.zarr"
    mir("extract", "--model", tiny_model("llava"), "--manifest", manifest, "--out", out, "--quiet")
    stored = read_archive(out)
    assert list(stored) == ["first", "second"]
    assert stored["first"]["text_ref"] == "An inline text."
    assert stored["second"]["text_ref"] == str(tmp_path / "sub" / "t.txt")
    assert stored["first"]["image"] == str(tmp_path / "data/images/img00.png")
    manifest.write_text("\n".join(json.dumps({**r, "id": "same"}) for r in rows) + "\n")
    code, output = run_mir("extract", "--model", tiny_model("llava"), "--manifest", manifest,
                           "--out", tmp_path / "o2.zarr", "--quiet")
    assert code == 1 and "line 2" in output and "unique" in output


def test_seeded_random_draw_is_reproducible(tmp_path):
    images, texts = write_data(tmp_path / "data", 8)
    ids = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / f"{name}.zarr"
        mir("extract", "--model", tiny_model("llava"), "--images", images, "--texts", texts, "--out", out,
            "--num", "3", "--seed", seed, "--quiet")
        ids.append(list(read_archive(out)))
    assert ids[0] == ids[1] and ids[0] != ids[2] and all(len(x) == 3 for x in ids)
    names = {p.name for p in images.iterdir()}
    assert all(i.split("|")[0] in names for i in ids[0])


def test_max_text_tokens_truncates_the_text_only(data, tmp_path):
    images, texts = data
    out, full = tmp_path / "cut.zarr", tmp_path / "full.zarr"
    mir("extract", "--model", tiny_model("llava"), "--images", images, "--texts", texts, "--out", out,
        "--max-text-tokens", "3", "--quiet")
    mir("extract", "--model", tiny_model("llava"), "--images", images, "--texts", texts, "--out", full, "--quiet")
    cut, whole = read_archive(out), read_archive(full)
    for sid in cut:
        n_cut, n_full = (cut[sid]["role"] == 3).sum(), (whole[sid]["role"] == 3).sum()
        assert 2 <= n_cut <= 4 < n_full
        for role in (0, 2):  # the template is never truncated
            assert (cut[sid]["role"] == role).sum() == (whole[sid]["role"] == role).sum()
    from storage_schemas import open_archive

    ext = open_archive(str(out)).attrs["extraction"]
    assert ext["settings"]["max_text_tokens"] == 3 and "first K tokens" in ext["settings"]["truncation_rule"]
    assert ext["runs"][-1]["truncated"] == 4


def test_vicuna_preset_and_raw_template(data, tmp_path):
    from transformers import AutoTokenizer

    images, texts = data
    tok = AutoTokenizer.from_pretrained(tiny_model("llava"))
    out = tmp_path / "vicuna.zarr"
    mir("extract", "--model", tiny_model("llava"), "--images", images, "--texts", texts, "--out", out,
        "--template", "vicuna_v1", "--quiet")
    for rec in read_archive(out).values():
        assert rec["input_ids"][0] == tok.bos_token_id and rec["input_ids"][-1] == tok.eos_token_id
        decoded = tok.decode(rec["token_id"][rec["role"] == 0])
        assert decoded.startswith("<s>A chat between a curious user") and decoded.endswith("USER: ")
        assert tok.decode(rec["token_id"][rec["role"] == 2]).startswith("\n ASSISTANT:")
        assert rec["role"][-1] == 2  # </s> belongs to the template
    raw = tmp_path / "raw.zarr"
    mir("extract", "--model", tiny_model("llava"), "--images", images, "--texts", texts, "--out", raw,
        "--template", "Text: {text} Image: {image} end", "--quiet")
    for rec in read_archive(raw).values():
        first_image = rec["vision_position"][0]
        assert np.all(rec["text_position"][rec["role"] == 3] < first_image)
        assert tok.decode(rec["token_id"][rec["role"] == 2]).strip() == "end"


def test_dry_run_writes_nothing(data, tmp_path):
    images, texts = data
    out = tmp_path / "out.zarr"
    output = mir("extract", "--model", tiny_model("llava_next"), "--images", images, "--texts", texts, "--out", out,
                 "--dry-run")
    assert "archive size" in output and "vision" in output and not out.exists()
