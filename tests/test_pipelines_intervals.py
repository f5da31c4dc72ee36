"""`mir compare` pairs the per-sample influence values by sample id, whatever order archives store
samples in: an archive and the same samples stored in reverse order differ by 0 within a tight interval,
and a shifted copy stored in another order exceeds the noise."""
from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from pipelines.cli import main
from storage_schemas import ArchiveWriter
from storage_schemas.synth import synthetic_records

SPEC = dict(layers=2, hidden=16, samples=30, vision_tokens=10, text_tokens=12)


def _write(path, records):
    with ArchiveWriter.create(path, layers=range(3), hidden_size=16, dtype="float16", attrs={}) as writer:
        for rec in records:
            writer.append([rec])
    return path


def test_compare_pairs_samples_by_id_in_any_order(tmp_path):
    records = list(synthetic_records(seed=2, **SPEC))
    a = _write(tmp_path / "a.zarr", records)
    reversed_ = _write(tmp_path / "r.zarr", records[::-1])
    shifted = []
    for rec in records[::-1]:
        rec.vision = (rec.vision.astype(np.float32) * 1.02 + 0.05).astype(np.float16)
        shifted.append(rec)
    b = _write(tmp_path / "b.zarr", shifted)
    result = CliRunner().invoke(main, ["compare", str(a), str(reversed_), str(b), "--bootstrap", "2000",
                                       "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    same, other = data["differences"]
    assert data["shared_samples"] == 30 and same["paired_samples"] == other["paired_samples"] == 30
    assert abs(same["difference"]) < 1e-6 and same["exceeds_noise"] is False
    assert same["ci_high"] - same["ci_low"] < 1e-4  # paired: the shared sample noise cancels exactly
    per_archive = data["archives"][0]["bootstrap"]
    assert other["ci_high"] - other["ci_low"] < 0.5 * (per_archive["ci_high"] - per_archive["ci_low"])
    assert other["ci_low"] <= other["difference"] <= other["ci_high"]
