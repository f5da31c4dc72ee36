"""Small pieces of the extraction stage, checked against hand-worked expectations."""
from __future__ import annotations

import json

import numpy as np
import pytest
from extract_helpers import tiny_model
from PIL import Image

from extract import data as data_mod
from extract.errors import DataError, ModelError
from extract.extraction import ExtractError, parse_layers, parse_shard
from extract.loading import config_hash, image_token_id_from_config, weights_hash
from extract.prompts import PromptLayout, expanded_span, token_layout, truncate_text


def test_parse_layers():
    assert parse_layers(None, 4) == [0, 1, 2, 3, 4]
    assert parse_layers("all", 4) == [0, 1, 2, 3, 4]
    assert parse_layers("0, 2-3,-1", 4) == [0, 2, 3, 4]
    assert parse_layers("-2--1", 4) == [3, 4]
    for bad in ("5", "x", "1-9", ","):
        with pytest.raises(ExtractError):
            parse_layers(bad, 4)


def test_parse_shard():
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None
    for bad in ("0/4", "5/4", "1-4", "a/b"):
        with pytest.raises(ExtractError):
            parse_shard(bad)


@pytest.mark.parametrize("n,count", [(10, 3), (8, 8), (3, 5), (7, 1)])
def test_shards_are_disjoint_contiguous_and_cover_the_list(n, count):
    samples = tuple(data_mod.Sample(str(i), data_mod.Path(f"{i}.png"), text=str(i)) for i in range(n))
    full = data_mod.SampleList(samples, {})
    parts = [full.shard(k, count) for k in range(1, count + 1)]
    joined = [s.sample_id for p in parts for s in p.samples]
    assert joined == [s.sample_id for s in samples]
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_story_and_txt_reading(tmp_path):
    story = tmp_path / "a.story"
    story.write_text("\ufeff  Body line one.\n\nBody two.\n\n@highlight\n\nHighlight\n\n@highlight\n\nMore")
    assert data_mod.read_text(data_mod.Sample("a", tmp_path / "x.png", text_path=story)) == \
        "Body line one.\n\nBody two."
    txt = tmp_path / "b.txt"
    txt.write_text("\n Plain @highlight kept in txt \n")
    assert data_mod.read_text(data_mod.Sample("b", tmp_path / "x.png", text_path=txt)) == \
        "Plain @highlight kept in txt"
    with pytest.raises(DataError, match="text file not found"):
        data_mod.read_text(data_mod.Sample("c", tmp_path / "x.png", text_path=tmp_path / "none.txt"))


def test_directory_pairing_is_sorted_and_seeded_draw_is_without_replacement(tmp_path):
    images, texts = tmp_path / "i", tmp_path / "t"
    images.mkdir()
    texts.mkdir()
    for name in ("b.png", "a.jpg", "c.PNG", ".hidden.png", "notes.md"):
        (images / name).write_bytes(b"x")
    for name in ("2.txt", "1.story", "3.txt"):
        (texts / name).write_text("t")
    sl = data_mod.from_directories(images, texts)
    assert [s.sample_id for s in sl.samples] == ["a.jpg|1.story", "b.png|2.txt", "c.PNG|3.txt"]
    drawn = data_mod.from_directories(images, texts, num=2, seed=3)
    assert len({s.image_path for s in drawn.samples}) == 2 and len({s.text_path for s in drawn.samples}) == 2
    assert drawn.hash == data_mod.from_directories(images, texts, num=2, seed=3).hash != sl.hash
    with pytest.raises(DataError, match="--num 4"):
        data_mod.from_directories(images, texts, num=4)
    import shutil  # the same data mounted elsewhere hashes the same (shards on other nodes)

    shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-copy")
    moved = data_mod.from_directories(tmp_path.parent / f"{tmp_path.name}-copy" / "i",
                                      tmp_path.parent / f"{tmp_path.name}-copy" / "t")
    assert moved.hash == sl.hash and moved.samples[0].image_path != sl.samples[0].image_path


def test_sixteen_bit_images_are_scaled_not_clipped():
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    rgb = np.asarray(data_mod.to_rgb(img))
    assert rgb.shape == (1, 3, 3) and rgb[0, :, 0].tolist() == [0, 100, 255]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure cyan-free red: C=0, M=Y=255
    assert np.asarray(data_mod.to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


def test_token_layout_roles():
    # positions: 0 BOS, 1 "USER:", 2-4 image, 5 sep, 6-7 image, 8 "\nASSISTANT:", 9-10 text, 11 "</s>"
    ids = np.array([1, 10, 99, 99, 99, 11, 99, 99, 12, 13, 14, 2])
    offsets = np.array([[0, 0], [0, 5], [5, 6], [6, 7], [7, 8], [8, 9], [9, 10], [10, 11], [11, 23],
                        [23, 28], [28, 33], [33, 37]])
    t = token_layout(ids, offsets, 99, (24, 33), "s")
    assert t.vision_position.tolist() == [2, 3, 4, 6, 7]
    assert t.text_position.tolist() == [0, 1, 5, 8, 9, 10, 11]
    assert t.text_role.tolist() == [0, 0, 1, 2, 3, 3, 2]
    assert t.text_token_id.tolist() == [1, 10, 11, 12, 13, 14, 2]
    with pytest.raises(ModelError, match="no image token"):
        token_layout(ids, offsets, 98, (24, 33), "s")


def test_expanded_span_shifts_by_the_replacements_before_the_text():
    reps = [{"span": (6, 13), "new_span": (6, 106)}]  # "<image>" (7 chars) -> 100 chars
    assert expanded_span((20, 30), reps) == (113, 123)
    assert expanded_span((0, 5), reps) == (0, 5)  # text before the image: unchanged
    with pytest.raises(DataError):
        expanded_span((10, 30), reps)


def test_truncation_cuts_at_the_kth_token_boundary():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("llava"))
    text = "The city council met on Tuesday to discuss the new budget."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cut, was_cut = truncate_text(text, tok, 3)
    assert was_cut and text.startswith(cut) and tok(cut, add_special_tokens=False)["input_ids"] == ids[:3]
    assert truncate_text(text, tok, len(ids)) == (text, False)


def test_prompt_layout_options():
    assert PromptLayout.from_option(None).template is None
    assert PromptLayout.from_option("vicuna_v1").name == "vicuna_v1"
    assert PromptLayout.from_option("X {image} Y {text}").name == "raw"
    for bad in ("no fields", "{image} only", "{text} {text} {image}"):
        with pytest.raises(DataError):
            PromptLayout.from_option(bad)


def test_image_token_id_from_config():
    class C:
        image_token_index = 7

    assert image_token_id_from_config(C(), "m") == 7
    with pytest.raises(ModelError, match="names no image token"):
        image_token_id_from_config(object(), "m")


def test_hashes_follow_content(tmp_path):
    from transformers import AutoConfig

    (tmp_path / "model.safetensors").write_bytes(b"abc")
    h1 = weights_hash(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert weights_hash(tmp_path) != h1 and h1.startswith("sha256:")
    (tmp_path / "empty").mkdir()
    assert weights_hash(tmp_path / "empty") is None
    config = AutoConfig.from_pretrained(tiny_model("llava"))
    h = config_hash(config)
    config.transformers_version = "0.0.0"
    assert config_hash(config) == h
    config.text_config.num_hidden_layers = 9
    assert config_hash(config) != h
    json.dumps(h)
