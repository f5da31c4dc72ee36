"""Safety of shared models: `trust_remote_code` is off unless --trust-remote-code is given, and a model
directory that ships its own Python code (an `auto_map` in config.json) does not get it run.

(Archives: tests/test_storage_integrity.py refuses codecs that would run code, e.g. numcodecs'
pickle; tests/test_analyze_select.py and test_analyze_cli.py check that --where runs no code.)
"""
from __future__ import annotations

import json
import shutil

import transformers
from click.testing import CliRunner
from extract_helpers import read_archive, tiny_model, write_data

from pipelines.cli import main


def _extract(model, images, texts, out, *extra) -> str:
    result = CliRunner().invoke(main, ["extract", "--model", str(model), "--images", str(images), "--texts",
                                       str(texts), "--out", str(out), "--quiet", "--num", "2", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_trust_remote_code_reaches_every_loader_only_when_asked(tmp_path, monkeypatch):
    images, texts = write_data(tmp_path / "data", 2)
    seen: list[tuple[str, object]] = []

    def spy(name, real):
        def load(*args, **kwargs):
            seen.append((name, kwargs.get("trust_remote_code", "not passed")))
            return real(*args, **kwargs)
        return load

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        spy("config", transformers.AutoConfig.from_pretrained))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        spy("processor", transformers.AutoProcessor.from_pretrained))
    real_model = transformers.PreTrainedModel.from_pretrained.__func__

    def load_model(cls, *args, **kwargs):
        seen.append(("model", kwargs.get("trust_remote_code", "not passed")))
        return real_model(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(load_model))
    for flag, expected in (((), False), (("--trust-remote-code",), True)):
        seen.clear()
        _extract(tiny_model("llava"), images, texts, tmp_path / f"{expected}.zarr", *flag)
        assert {name for name, _ in seen} >= {"config", "processor", "model"}, seen
        assert all(value is expected for _, value in seen), seen


def test_code_shipped_in_a_model_directory_is_not_run(tmp_path):
    images, texts = write_data(tmp_path / "data", 2)
    shared = tmp_path / "shared-model"
    shutil.copytree(tiny_model("llava"), shared)
    marker = tmp_path / "EXECUTED"
    (shared / "configuration_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('custom code ran')\n"
        "from transformers import LlavaConfig\n\n\nclass CustomConfig(LlavaConfig):\n    pass\n")
    config = json.loads((shared / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (shared / "config.json").write_text(json.dumps(config))
    _extract(shared, images, texts, tmp_path / "out.zarr")
    assert not marker.exists(), "the model directory's own code was imported without --trust-remote-code"
    assert len(read_archive(tmp_path / "out.zarr")) == 2  # the built-in LLaVA classes did the work
