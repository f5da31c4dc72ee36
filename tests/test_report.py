"""The HTML reports of `mir analyze --report` and `mir study --report`, opened in a real headless
Chromium (the Debian package) with JavaScript disabled: a screenshot that shows the inline SVG
figure, and the rendered text (printed to PDF, read back with pypdf) holding the MIR values."""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from pipelines.cli import main
from storage_schemas.synth import write_synthetic_archive

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the chromium package (apt-get install -y chromium)")
C0 = np.array([0x1F, 0x77, 0xB4])  # matplotlib's first line colour: the per-layer / by-step curve


def _chromium(tmp_path, page, *flags):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-javascript", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *flags, page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _render(tmp_path, page):
    """(screenshot as an RGB array, the rendered text)."""
    from PIL import Image
    from pypdf import PdfReader

    shot, pdf = tmp_path / f"{page.stem}.png", tmp_path / f"{page.stem}.pdf"
    _chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars")
    _chromium(tmp_path, page, f"--print-to-pdf={pdf}", "--no-pdf-header-footer")
    image = np.asarray(Image.open(shot).convert("RGB"))
    text = "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.read_bytes())).pages)
    return image, re.sub(r"\s+", " ", text)


def _self_contained(page):
    html = page.read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html, re.I)  # nothing fetched
    assert "Content-Security-Policy" in html and "<svg" in html
    return html


def _curve_pixels(image) -> int:
    return int((np.abs(image.astype(int) - C0).sum(axis=2) < 40).sum())


def test_analysis_report_renders_in_chromium(tmp_path):
    archive = tmp_path / "demo.zarr"
    write_synthetic_archive(archive, layers=3, hidden=24, samples=24, vision_tokens=12, text_tokens=10, seed=3)
    page, out = tmp_path / "report.html", tmp_path / "mir.json"
    result = CliRunner().invoke(main, ["analyze", str(archive), "--bootstrap", "40", "--json", str(out),
                                       "--report", str(page)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    html = _self_contained(page)
    assert html.count("<svg") == 1
    image, text = _render(tmp_path, page)
    assert image.shape[1] == 1200 and _curve_pixels(image) > 200  # the inline SVG curve was drawn
    assert f"MIR = {data['mir']:.6g}" in text
    b = data["bootstrap"]
    assert f"[{b['ci_low']:.6g}, {b['ci_high']:.6g}]" in text
    for layer in data["layers"]:  # the per-layer table
        assert f"{layer['fd']:.6g}" in text
    assert "Statistics of the vision tokens" in text and "Provenance" in text and "mir synth" in text
    assert "Versions" in text and "xarray" in text


def test_study_report_shows_mir_by_step(tmp_path):
    for step, seed in ((10, 1), (20, 2), (30, 3)):
        write_synthetic_archive(tmp_path / "made" / f"step-{step}.zarr", layers=2, hidden=16, samples=20,
                                vision_tokens=8, text_tokens=8, seed=seed)
    config = tmp_path / "study.toml"
    config.write_text('[study]\nout = "out"\narchives = "made/step-*.zarr"\n[analyze]\nbootstrap = 30\n')
    page = tmp_path / "study.html"
    result = CliRunner().invoke(main, ["study", str(config), "--report", str(page)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["step"] for r in rows] == [10, 20, 30]
    _self_contained(page)
    image, text = _render(tmp_path, page)
    assert _curve_pixels(image) > 100
    assert "MIR by step" in text
    for r in rows:
        assert f"{r['mir']:.6g} {r['ci_low']:.6g} {r['ci_high']:.6g}" in text  # a row of the step table
