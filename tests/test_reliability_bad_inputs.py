"""Bad and unusual inputs to `mir extract` that tests/test_extract_inputs.py does not try: each row is
an input and either the clear error it must give (a phrase, and the file or sample it must name,
with nothing written) or its documented behaviour (checked on the stored result).

Documented behaviour pinned here:
  * 16-bit images (RGB, RGBA, gray, gray+alpha) are scaled to 8 bits: a 16-bit copy of an 8-bit
    image (each value v stored as 257 v) gives exactly the hidden states of the 8-bit image.
  * 1x1 and 4000x3000 images are resized by the model's processor like any other.
  * A text longer than the model's positions on its own is refused before anything is written; with
    --max-text-tokens K it is cut after its first K tokens. A text that fits alone but not with the
    image tokens is refused when its batch is prepared: complete batches before it stay committed.
  * Manifest paths are resolved relative to the manifest, whatever the working directory.
"""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from extract_helpers import read_archive, tiny_model, write_data
from PIL import Image

from pipelines.cli import main
from storage_schemas import ArchiveWriter, open_archive, validate_archive


def run_mir(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def extract(out, *extra, images=None, texts=None, family="llava"):
    sources = ["--images", images, "--texts", texts] if images is not None else []
    return run_mir("extract", "--model", tiny_model(family), *sources, "--out", out, "--quiet", *extra)


def assert_refused(code: int, output: str, phrase: str, names: str | Path, out: Path | None = None) -> None:
    assert code == 1, output
    assert phrase in output and str(names) in output, output
    assert "Traceback" not in output, output
    if out is not None:
        assert not out.exists(), "a refused run left an archive behind"


# ----------------------------------------------------------------------------- images
def _png(path: Path, values: np.ndarray, color_type: int, width: int | None = None, height: int | None = None,
         bit_depth: int = 16) -> None:
    """A PNG written by hand (Pillow cannot write 16-bit colour): color type 0 gray, 2 RGB, 4 gray+alpha,
    6 RGBA. `width`/`height` override the header (a decompression bomb declares a huge size)."""
    h, w = values.shape[:2]
    raw = values.astype(">u2" if bit_depth == 16 else "u1").reshape(h, -1)
    rows = b"".join(b"\x00" + row.tobytes() for row in raw)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width or w, height or h, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


RGB8 = np.random.default_rng(7).integers(0, 256, (20, 30, 3), dtype=np.uint8)
GRAY8 = RGB8[..., 0]
OPAQUE = np.full((20, 30, 1), 255, np.uint8)

# name -> (which 8-bit image it must equal, writer of the 16-bit file)
SIXTEEN_BIT = {
    "png16_rgb": ("rgb", lambda p: _png(p, RGB8.astype(np.uint16) * 257, 2)),
    "png16_rgba": ("rgb", lambda p: _png(p, np.concatenate([RGB8, OPAQUE], 2).astype(np.uint16) * 257, 6)),
    "png16_gray": ("gray", lambda p: _png(p, GRAY8.astype(np.uint16) * 257, 0)),
    "png16_gray_alpha": ("gray", lambda p: _png(p, np.concatenate([GRAY8[..., None], OPAQUE], 2).astype(np.uint16)
                                                * 257, 4)),
}


@pytest.fixture(scope="module")
def eight_bit(tmp_path_factory):
    """Two 8-bit images (RGB and gray) with texts, and their archive: what the 16-bit copies must give."""
    root = tmp_path_factory.mktemp("eight-bit")
    images, texts = write_data(root, 2)
    Image.fromarray(RGB8).save(images / "img00.png")
    Image.fromarray(GRAY8).save(images / "img01.png")
    out = root / "ref.zarr"
    assert extract(out, images=images, texts=texts)[0] == 0
    stored = read_archive(out)
    return root, {"rgb": stored["img00.png|s00.story"], "gray": stored["img01.png|s01.story"]}


@pytest.mark.parametrize("name", sorted(SIXTEEN_BIT))
def test_16_bit_png_gives_exactly_the_8_bit_image_states(name, eight_bit, tmp_path):
    root, reference = eight_bit
    which, write = SIXTEEN_BIT[name]
    images = Path(shutil.copytree(root / "images", tmp_path / "images"))
    target = images / ("img00.png" if which == "rgb" else "img01.png")
    write(target)
    assert Image.open(target).mode in ("RGB", "RGBA", "I;16") and target.read_bytes()[24] == 16  # 16-bit depth
    out = tmp_path / "out.zarr"
    code, output = extract(out, images=images, texts=root / "texts")
    assert code == 0, output
    stored = read_archive(out)[f"{target.name}|{'s00' if which == 'rgb' else 's01'}.story"]
    assert np.array_equal(stored["vision"], reference[which]["vision"])
    assert np.array_equal(stored["text"], reference[which]["text"])


@pytest.mark.parametrize("size", [(1, 1), (4000, 3000)], ids=["1x1", "4000x3000"])
def test_tiny_and_huge_images_are_resized_by_the_processor(size, tmp_path):
    images, texts = write_data(tmp_path / "data", 2)
    w, h = size
    gradient = (np.add.outer(np.arange(h), np.arange(w)) % 256).astype(np.uint8)
    Image.fromarray(np.stack([gradient] * 3, 2)).save(images / "img00.png", compress_level=1)
    out = tmp_path / "out.zarr"
    code, output = extract(out, images=images, texts=texts)
    assert code == 0, output
    stored = read_archive(out)
    image_tokens = {rec["vision"].shape[1] for rec in stored.values()}
    assert image_tokens == {16}  # tiny LLaVA: (32 / 8)^2 tokens, whatever the input size
    assert all(np.isfinite(rec["vision"]).all() for rec in stored.values())


def _bomb(path: Path) -> None:
    _png(path, np.zeros((1, 1), np.uint8), 0, width=20000, height=10000, bit_depth=8)


def _extreme_aspect(path: Path) -> None:
    Image.fromarray(np.full((1, 300, 3), 90, np.uint8)).save(path)


# (name, family, writer of img00.png, phrase, what the message must name: "file" = the image path,
#  "sample" = the sample id)
IMAGE_ERRORS = [
    ("decompression_bomb", "llava", _bomb, "decompression-bomb guard", "file"),
    ("aspect_ratio_over_200_qwen2_vl", "qwen2_vl", _extreme_aspect, "aspect ratio must be smaller than 200", "sample"),
]


@pytest.mark.parametrize("name,family,write,phrase,names", IMAGE_ERRORS, ids=[r[0] for r in IMAGE_ERRORS])
def test_unusable_image_is_refused_naming_it(name, family, write, phrase, names, tmp_path):
    images, texts = write_data(tmp_path / "data", 2)
    bad = images / "img00.png"
    write(bad)
    out = tmp_path / "out.zarr"
    code, output = extract(out, images=images, texts=texts, family=family)
    assert_refused(code, output, phrase, bad if names == "file" else "'img00.png|s00.story'", out)


# ----------------------------------------------------------------------------- texts
def _long_text(n_words: int) -> str:
    return " ".join(f"word{i}" for i in range(n_words))


def _text_of_tokens(n_tokens: int) -> str:
    """A text of about n_tokens tokens of the tiny model's tokenizer."""
    from transformers import AutoTokenizer

    text = _long_text(n_tokens)
    offsets = AutoTokenizer.from_pretrained(tiny_model("llava"))(text, add_special_tokens=False,
                                                                  return_offsets_mapping=True)["offset_mapping"]
    return text[: offsets[n_tokens - 1][1]]


def test_whitespace_only_texts_are_refused_naming_file_or_sample(tmp_path):
    images, texts = write_data(tmp_path / "data", 2, stories=False)
    bad = texts / "s01.txt"
    bad.write_text("\u00a0 \u2003\t\n\u3000\n")  # no-break, em and ideographic spaces
    out = tmp_path / "out.zarr"
    assert_refused(*extract(out, images=images, texts=texts), "the text is empty", bad, out)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "blank", "image": "data/images/img00.png", "text": " \n\t "}) + "\n")
    assert_refused(*extract(out, "--manifest", manifest), "the manifest text is empty", "'blank'", out)


def test_over_long_text_is_refused_up_front_or_cut_with_max_text_tokens(tmp_path):
    images, texts = write_data(tmp_path / "data", 3, stories=False)
    long_file = texts / "s01.txt"
    long_file.write_text(_long_text(2000))  # ~13k tokens: more than the tiny model's 4096 positions
    out = tmp_path / "out.zarr"
    code, output = extract(out, "--batch-size", "1", "--commit-every", "1", "--no-preflight",
                           images=images, texts=texts)
    assert_refused(code, output, "more than the model's 4096 positions; use --max-text-tokens", long_file, out)
    code, output = extract(out, "--max-text-tokens", "64", images=images, texts=texts)
    assert code == 0 and "texts truncated" in output, output
    stored = read_archive(out)["img01.png|s01.txt"]
    assert 62 <= int((stored["role"] == 3).sum()) <= 66  # the response is the first 64 tokens
    assert open_archive(str(out)).attrs["extraction"]["runs"][-1]["truncated"] >= 1


def test_text_that_fits_alone_but_not_with_the_image_keeps_earlier_batches(tmp_path):
    images, texts = write_data(tmp_path / "data", 3, stories=False)
    (texts / "s02.txt").write_text(_text_of_tokens(4090))  # + 16 image tokens + template > 4096
    out = tmp_path / "out.zarr"
    code, output = extract(out, "--batch-size", "1", "--commit-every", "1", images=images, texts=texts)
    assert code == 1 and "sample 'img02.png|s02.txt'" in output and "exceed the model's 4096 positions" in output
    assert "2 of 3 samples are committed" in output and "Traceback" not in output, output
    assert validate_archive(out).ok and list(read_archive(out)) == ["img00.png|s00.txt", "img01.png|s01.txt"]


# ----------------------------------------------------------------------------- manifests
def _rows(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


IMG = "data/images/img00.png"
# (name, manifest text, phrase, what the message must name: a path relative to tmp_path, or a quoted phrase)
MANIFEST_ERRORS = [
    ("duplicate_id_far_apart", _rows({"id": "a", "image": IMG, "text": "x"}, {"id": "b", "image": IMG, "text": "y"},
                                     {"id": "a", "image": IMG, "text": "z"}),
     "id 'a' repeats line 1; ids must be unique", "m.jsonl, line 3"),
    ("implicit_id_collides", _rows({"image": IMG, "text": "x"}, {"id": "line1", "image": IMG, "text": "y"}),
     "id 'line1' repeats line 1", "m.jsonl, line 2"),
    ("missing_image_field", _rows({"id": "a", "text": "x"}), 'each row needs "image" and "text"', "m.jsonl, line 1"),
    ("missing_text_fields", _rows({"id": "a", "image": IMG}, {"id": "b", "image": IMG, "text": "y"}),
     'each row needs "image" and "text" (or "text_file")', "m.jsonl, line 1"),
    ("text_not_a_string", _rows({"id": "a", "image": IMG, "text": 42}), '"text" must be a string', "m.jsonl, line 1"),
    ("row_not_json", _rows({"id": "a", "image": IMG, "text": "x"}, "{id: b}"), "not a JSON object", "m.jsonl, line 2"),
    ("row_is_a_list", _rows(["a", IMG, "x"]), 'each row needs "image"', "m.jsonl, line 1"),
    ("no_rows", "\n\n", "the manifest has no rows", "m.jsonl"),
    ("image_path_missing", _rows({"id": "a", "image": "data/images/nope.png", "text": "x"}),
     "image file not found", "data/images/nope.png"),
    ("text_file_missing", _rows({"id": "a", "image": IMG, "text_file": "texts/gone.txt"}),
     "text file not found", "texts/gone.txt"),
    ("image_is_a_directory", _rows({"id": "a", "image": "data/images", "text": "x"}),
     "is a directory, not an image file", "data/images"),
]


@pytest.mark.parametrize("name,content,phrase,names", MANIFEST_ERRORS, ids=[r[0] for r in MANIFEST_ERRORS])
def test_bad_manifest_is_refused_naming_file_line_or_path(name, content, phrase, names, tmp_path, monkeypatch):
    write_data(tmp_path / "data", 1)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(content)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # paths resolve relative to the manifest, not the working directory
    out = tmp_path / "out.zarr"
    code, output = extract(out, "--manifest", manifest)
    named = str(tmp_path / names) if "/" in names and "line" not in names else names
    assert_refused(code, output, phrase, named, out)


def test_manifest_missing_or_not_utf8(tmp_path):
    out = tmp_path / "out.zarr"
    assert_refused(*extract(out, "--manifest", tmp_path / "none.jsonl"), "manifest file not found",
                   tmp_path / "none.jsonl", out)
    manifest = tmp_path / "latin1.jsonl"
    manifest.write_bytes(json.dumps({"id": "a", "image": "x.png", "text": "caf\u00e9"}).encode().replace(
        b"\\u00e9", "\u00e9".encode("latin-1")))
    assert_refused(*extract(out, "--manifest", manifest), "not UTF-8 text", manifest, out)


def test_manifest_paths_resolve_relative_to_the_manifest(tmp_path, monkeypatch):
    """Documented behaviour: `../` and absolute paths work; the stored references are absolute."""
    images, _ = write_data(tmp_path / "data", 2)
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "m.jsonl"
    manifest.write_text(_rows({"id": "up", "image": "../data/images/img00.png", "text": "A text."},
                              {"id": "abs", "image": str(images / "img01.png"), "text": "Another text."}))
    monkeypatch.chdir(images)
    out = tmp_path / "out.zarr"
    code, output = extract(out, "--manifest", manifest)
    assert code == 0, output
    stored = read_archive(out)
    assert [stored[i]["image"] for i in ("up", "abs")] == [str(images / "img00.png"), str(images / "img01.png")]


# ----------------------------------------------------------------------------- --resume on a foreign archive
def _set_schema(out: Path) -> None:
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["schema"] = "mir-archive/7"
    (out / "zarr.json").write_text(json.dumps(meta))


def _other_weights_model(tmp_path: Path) -> Path:
    from extract.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path / "other-llava", "llava", seed=1)


RESUME_ERRORS = ["unknown_schema_version", "different_weights_same_architecture", "synthetic_archive",
                 "not_an_archive", "locked_by_a_live_writer"]


@pytest.mark.parametrize("case", RESUME_ERRORS)
def test_resume_refuses_an_archive_it_cannot_continue_and_leaves_it_untouched(case, tmp_path):
    images, texts = write_data(tmp_path / "data", 3)
    out = tmp_path / "out.zarr"
    model = tiny_model("llava")
    phrase = {"unknown_schema_version": "unknown schema version 'mir-archive/7'",
              "different_weights_same_architecture": "model.weights_hash: archive has 'sha256:",
              "synthetic_archive": "model.architecture: archive has 'synthetic'",
              "not_an_archive": "not a Zarr v3 group (no zarr.json)",
              "locked_by_a_live_writer": "is being written by another process"}[case]
    if case == "synthetic_archive":
        assert run_mir("synth", "--out", out, "--layers", "2", "--hidden", "8", "--samples", "2")[0] == 0
    elif case == "not_an_archive":
        out.mkdir()
        (out / "notes.txt").write_text("not an archive")
    else:
        assert extract(out, "--num", "2", images=images, texts=texts)[0] == 0
        if case == "unknown_schema_version":
            _set_schema(out)
        elif case == "different_weights_same_architecture":
            model = _other_weights_model(tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".mir-writer.lock"}
    holder = ArchiveWriter.open_for_append(out) if case == "locked_by_a_live_writer" else None
    try:
        code, output = run_mir("extract", "--model", model, "--images", images, "--texts", texts, "--out", out,
                               "--quiet", "--num", "2", "--resume")
    finally:
        if holder is not None:
            holder.abort()
    assert_refused(code, output, phrase, out)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".mir-writer.lock"}
    assert after == before  # nothing written, nothing rolled back
