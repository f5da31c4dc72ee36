"""`mir extract --text-tokens` is live: the rule it records is what `mir analyze`, `mir stats` and
`mir compare` use unless told otherwise, in either spelling."""
from __future__ import annotations

import json

from click.testing import CliRunner
from extract_helpers import tiny_model, write_data

from storage_schemas import ArchiveWriter, TextRole, open_archive
from storage_schemas.synth import write_synthetic_archive

from pipelines.cli import main


def _mir(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def _json(*args) -> dict:
    result = CliRunner().invoke(main, [str(a) for a in (*args, "--no-cache", "--json", "-")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_recorded_rule_is_the_default_of_analysis(tmp_path):
    images, texts = write_data(tmp_path / "data", 3)
    out = tmp_path / "r.zarr"
    code, output = _mir("extract", "--model", tiny_model("llava"), "--images", images, "--texts", texts, "--out",
                        out, "--quiet", "--text-tokens", "response")
    assert code == 0, output
    archive = open_archive(out)
    assert archive.attrs["extraction"]["text_token_rule"] == "response"
    assert archive.attrs["extraction"]["settings"]["text_token_rule"] == "response"
    roles = archive.text["role"].values
    default = _json("analyze", out, "--layers", "-1")
    assert default["settings"]["text_tokens"] == "response"
    assert default["n_text_tokens"] == int((roles == TextRole.RESPONSE).sum())
    after = _json("analyze", out, "--layers", "-1", "--text-tokens", "after-image")
    assert after["settings"]["text_tokens"] == "after_image"
    assert after["n_text_tokens"] == int((roles >= TextRole.AFTER_IMAGE_TEMPLATE).sum()) > default["n_text_tokens"]
    assert _json("stats", out, "--layers", "-1")["n_text_tokens"] == default["n_text_tokens"]
    # The rule is one of the settings --resume checks, in either spelling.
    code, output = _mir("extract", "--model", tiny_model("llava"), "--images", images, "--texts", texts, "--out",
                        out, "--quiet", "--resume", "--text-tokens", "after-image")
    assert code == 1 and "text_token_rule" in output


def test_both_spellings_record_the_same_settings(tmp_path):
    images, texts = write_data(tmp_path / "data", 2)
    hashes = []
    for k, spelling in enumerate(("after-image", "after_image")):
        out = tmp_path / f"{k}.zarr"
        code, output = _mir("extract", "--model", tiny_model("llava"), "--images", images, "--texts", texts, "--out",
                            out, "--quiet", "--text-tokens", spelling)
        assert code == 0, output
        hashes.append(open_archive(out).attrs["extraction"]["settings_hash"])
    assert hashes[0] == hashes[1]


def _with_rule(path, rule: str, seed: int):
    write_synthetic_archive(path, layers=2, hidden=8, samples=6, vision_tokens=6, text_tokens=8, seed=seed)
    with ArchiveWriter.open_for_append(path) as writer:
        writer.update_attrs({"extraction": {**writer.attrs["extraction"], "text_token_rule": rule}})
    return path


def test_compare_uses_the_recorded_rule_and_refuses_a_mix(tmp_path):
    a, b = _with_rule(tmp_path / "a.zarr", "response", 0), _with_rule(tmp_path / "b.zarr", "response", 1)
    doc = _json("compare", a, b, "--bootstrap", "0")
    assert [r["settings"]["text_tokens"] for r in doc["archives"]] == ["response", "response"]
    c = _with_rule(tmp_path / "c.zarr", "all", 2)
    code, output = _mir("compare", a, c, "--bootstrap", "0", "--no-cache")
    assert code == 1 and "record different text-token rules" in output
    doc = _json("compare", a, c, "--bootstrap", "0", "--text-tokens", "after-image")
    assert [r["settings"]["text_tokens"] for r in doc["archives"]] == ["after_image", "after_image"]


def test_an_unknown_recorded_rule_is_a_clear_error(tmp_path):
    path = _with_rule(tmp_path / "x.zarr", "sometimes", 0)
    code, output = _mir("analyze", path, "--no-cache")
    assert code == 1 and "extraction.text_token_rule is 'sometimes'" in output and "--text-tokens" in output
    assert _json("analyze", path, "--text-tokens", "all")["settings"]["text_tokens"] == "all"


def test_archives_of_the_older_synth_read_with_the_reference_rule(tmp_path):
    """`mir synth` used to record 'roles' (all roles stored, no rule chosen): those archives still analyse."""
    path = _with_rule(tmp_path / "x.zarr", "roles", 0)
    assert _json("analyze", path, "--no-cache")["settings"]["text_tokens"] == "after_image"
