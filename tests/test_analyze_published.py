"""Every number `mir analyze --json`, `--netcdf`, `mir stats` and their tables publish equals the
independent float64 implementation (analyze_reference.py), on float16, bfloat16 and float32 archives,
with even and odd token counts, and with fewer tokens than channels (the Gram route) in either modality,
outliers included there, so the column median that replaces them (the lower one, for an even count)
decides the result."""
from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from analyze_helpers import write_arrays
from analyze_published import (check_analyze_table, check_dataset, check_document, check_stats_table,
                               reference_document)
from click.testing import CliRunner

from pipelines.cli import main
from storage_schemas import open_archive
from storage_schemas.synth import write_synthetic_archive

DTYPES = ["float16", "bfloat16", "float32"]


def _outlier_rows(rng, samples: int, tokens: int, d: int, layers: int, loc: float, heavy: int | None):
    """Gaussian rows per sample; token `heavy` of sample 0 has 30x the norm (an outlier)."""
    out = [rng.normal(loc, 1.0, (layers, tokens, d)) + rng.normal(0, 0.3, d) for _ in range(samples)]
    if heavy is not None:
        out[0][:, heavy] *= 30.0
    return out


def _archive(tmp_path, case: str, dtype: str):
    rng = np.random.default_rng(abs(hash((case, dtype))) % 2**32)
    if case == "synthetic":  # d = 24 > 20: leading eigenvalues by Lanczos
        path = write_synthetic_archive(tmp_path / "a.zarr", layers=2, hidden=24, samples=9, vision_tokens=20,
                                       text_tokens=14, seed=5, dtype=dtype, chunk_tokens=16, chunks_per_shard=2)
        return path, [1, 2]
    if case == "text-below-channels":  # 18 text tokens (even) in 32 channels, 39 vision tokens (odd)
        vis = _outlier_rows(rng, 3, 13, 32, 2, 1.0, 4)
        txt = _outlier_rows(rng, 3, 6, 32, 2, 0.0, 2)
    elif case == "vision-below-channels":  # 25 vision tokens (odd) in 32 channels, 40 text tokens (even)
        vis = _outlier_rows(rng, 5, 5, 32, 2, 0.5, 1)
        txt = _outlier_rows(rng, 5, 8, 32, 2, 0.0, None)
    else:  # "narrow": d = 8 <= 20: leading eigenvalues from a full eigendecomposition; 42 / 35 tokens
        vis = _outlier_rows(rng, 7, 6, 8, 2, 1.0, 3)
        txt = _outlier_rows(rng, 7, 5, 8, 2, 0.0, 0)
    return write_arrays(tmp_path / "a.zarr", vis, txt, dtype=dtype, chunk_tokens=16), [0, 1]


def _mir(*args) -> str:
    out = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    return out.stdout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["synthetic", "text-below-channels", "vision-below-channels", "narrow"])
def test_every_published_number_matches_the_reference(tmp_path, case, dtype):
    path, layers = _archive(tmp_path, case, dtype)
    selection = open_archive(path).select(layers=layers)
    ref = reference_document(selection)
    if case.endswith("below-channels"):
        small = "text" if case.startswith("text") else "vision"
        assert all(r[small]["tokens_per_channel"] < 1 and r[small]["outliers"] > 0 for r in ref["layers"])
        assert all(r["route"].startswith("gram-") for r in ref["layers"])
    spec = ",".join(map(str, layers))
    table = _mir("analyze", path, "--no-cache", "--layers", spec, "--json", tmp_path / "r.json",
                 "--netcdf", tmp_path / "r.nc")
    check_document(json.loads((tmp_path / "r.json").read_text()), ref)
    check_analyze_table(table, ref)
    with xr.open_dataset(tmp_path / "r.nc") as ds:
        check_dataset(ds, ref)
    stats = _mir("stats", path, "--no-cache", "--layers", spec)
    check_stats_table(stats, ref)
    check_document(json.loads(_mir("stats", path, "--no-cache", "--layers", spec, "--json", "-")), ref)


@pytest.mark.parametrize("case", ["synthetic", "text-below-channels"])
def test_published_bootstrap_matches_the_reference(tmp_path, case):
    path, layers = _archive(tmp_path, case, "float16")
    selection = open_archive(path).select(layers=layers)
    ref = reference_document(selection, {"replicates": 40, "seed": 3})
    spec = ",".join(map(str, layers))
    table = _mir("analyze", path, "--no-cache", "--layers", spec, "--bootstrap", 40, "--seed", 3,
                 "--json", tmp_path / "r.json", "--netcdf", tmp_path / "r.nc")
    check_document(json.loads((tmp_path / "r.json").read_text()), ref)
    check_analyze_table(table, ref)
    with xr.open_dataset(tmp_path / "r.nc") as ds:
        check_dataset(ds, ref)


@pytest.mark.parametrize("case", ["synthetic", "narrow"])
def test_float64_products_meet_float64_accuracy(tmp_path, case):
    """--precision float64: every covariance-derived number to ~1e-9 of the reference, not float32's 1e-5
    (rows held in memory, with fewer tokens than channels, are float64 whatever the precision)."""
    path, layers = _archive(tmp_path, case, "float32")
    ref = reference_document(open_archive(path).select(layers=layers))
    doc = json.loads(_mir("analyze", path, "--no-cache", "--layers", ",".join(map(str, layers)), "--precision",
                          "float64", "--json", "-"))
    check_document(doc, ref, rtol=1e-9)
