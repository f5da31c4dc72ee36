"""Linear CKA and debiased CKA between two archives (analyze/drift.py) equal the float64 n x n
definitions (analyze_reference_beyond.py): the streaming sums merge exactly in any grouping, with large
means; two archives storing the samples in different orders and with different hidden sizes are aligned
token by token; mismatched token counts are refused naming the sample."""
from __future__ import annotations

import numpy as np
import pytest
from analyze_helpers import write_arrays
from analyze_reference_beyond import linear_cka

from analyze import AnalysisError
from analyze.drift import cka_numbers, compute_drift, cross_moments
from storage_schemas import open_archive


def _pair(rng, n, d1, d2, loc):
    x = rng.normal(loc, 1.0, (n, d1)) * rng.uniform(0.1, 3.0, d1)
    y = x[:, :min(d1, d2)] @ rng.normal(0, 1, (min(d1, d2), d2)) + rng.normal(0, 2.0, (n, d2)) + loc
    return x, y


@pytest.mark.parametrize("n, d1, d2, loc", [(5, 3, 4, 0.0), (37, 6, 6, 300.0), (200, 12, 7, -40.0),
                                            (9, 20, 16, 1e3)])
def test_streaming_sums_equal_the_kernel_definition(n, d1, d2, loc):
    rng = np.random.default_rng(n * 31 + d1)
    x, y = _pair(rng, n, d1, d2, loc)
    want = linear_cka(x, y)
    for cuts in ([n], [1, n - 1], sorted({1, 2, n // 3 or 1, n // 2 or 1, n - 1}) + [n]):
        bounds = [0, *sorted(set(c for c in cuts if 0 < c <= n))]
        if bounds[-1] != n:
            bounds.append(n)
        parts = [cross_moments(x[a:b], y[a:b], "float64") for a, b in zip(bounds[:-1], bounds[1:])]
        merged = parts[0]
        for p in parts[1:]:  # left fold, and a right fold below: the merge is associative
            merged = merged.combine(p)
        right = parts[-1]
        for p in parts[-2::-1]:
            right = p.combine(right)
        for m in (merged, right):
            got = cka_numbers(m)
            assert got["tokens"] == n
            assert abs(got["cka"] - want[0]) <= 1e-9, (cuts, got, want)
            assert abs(got["cka_debiased"] - want[1]) <= 1e-8, (cuts, got, want)


def test_float32_products_and_edge_cases():
    rng = np.random.default_rng(1)
    x, y = _pair(rng, 300, 10, 10, 50.0)
    got, want = cka_numbers(cross_moments(x.astype(np.float16), y.astype(np.float16))), \
        linear_cka(x.astype(np.float16), y.astype(np.float16))
    assert abs(got["cka"] - want[0]) <= 1e-5 and abs(got["cka_debiased"] - want[1]) <= 1e-5
    same = cka_numbers(cross_moments(x, x, "float64"))
    assert abs(same["cka"] - 1) <= 1e-12 and abs(same["cka_debiased"] - 1) <= 1e-12
    three = cka_numbers(cross_moments(x[:3], y[:3], "float64"))  # the unbiased HSIC needs n >= 4
    assert np.isnan(three["cka_debiased"]) and abs(three["cka"] - linear_cka(x[:3], y[:3])[0]) <= 1e-9
    constant = cka_numbers(cross_moments(np.ones((6, 3)), y[:6], "float64"))
    assert np.isnan(constant["cka"]) and np.isnan(constant["cka_debiased"])


def _samples(rng, count, tokens, d, loc):
    return [rng.normal(loc, 1.0, (2, tokens[i % len(tokens)], d)) for i in range(count)]


def test_two_archives_in_step(tmp_path):
    """B stores the samples in reverse order with another hidden size; tiny chunks so every merge runs."""
    rng = np.random.default_rng(7)
    vis, txt = _samples(rng, 6, [9, 7], 12, 3.0), _samples(rng, 6, [5, 11, 4], 12, 0.0)
    mix = rng.normal(0, 1, (12, 10))
    a = write_arrays(tmp_path / "a.zarr", vis, txt, chunk_tokens=8)
    vis_b = [np.tanh(v @ mix) + rng.normal(0, 0.1, v.shape[:2] + (10,)) for v in vis]
    txt_b = [t @ mix for t in txt]
    b = write_arrays(tmp_path / "b.zarr", vis_b[::-1], txt_b[::-1], chunk_tokens=16)
    sel_a = open_archive(a).select()
    # write_arrays names samples by position: give B's the ids of the same samples in A
    arch_b = open_archive(b)
    arch_b.samples["sample_id"] = ("sample", np.array([f"s{5 - i:04d}" for i in range(6)]))
    sel_b = arch_b.select()
    got = compute_drift(sel_a, sel_b, [0, 1], precision="float64")
    for layer, row in zip([0, 1], got):
        assert row["layer"] == layer
        for m, xs, ys in (("vision", vis, vis_b), ("text", txt, txt_b)):
            x = np.concatenate([s[layer].astype(np.float16) for s in xs])
            y = np.concatenate([s[layer].astype(np.float16) for s in ys])
            want = linear_cka(x, y)
            assert row[m]["tokens"] == len(x)
            assert abs(row[m]["cka"] - want[0]) <= 1e-9 and abs(row[m]["cka_debiased"] - want[1]) <= 1e-8, (m, row)
    itself = compute_drift(sel_a, open_archive(a).select(), [1])[0]
    assert all(abs(itself[m]["cka"] - 1) <= 1e-5 and abs(itself[m]["cka_debiased"] - 1) <= 1e-5
               for m in ("vision", "text"))


def test_mismatched_token_counts_are_refused(tmp_path):
    rng = np.random.default_rng(3)
    vis, txt = _samples(rng, 3, [6], 8, 1.0), _samples(rng, 3, [5], 8, 0.0)
    a = write_arrays(tmp_path / "a.zarr", vis, txt)
    txt_b = [t.copy() for t in txt]
    txt_b[1] = txt_b[1][:, :4]
    b = write_arrays(tmp_path / "b.zarr", vis, txt_b)
    with pytest.raises(AnalysisError, match=r"sample 's0001': 5 text tokens .* but 4"):
        compute_drift(open_archive(a).select(), open_archive(b).select(), [0])
