"""Property tests (hypothesis) of the statistics behind MIR.

- merging per-block moments in any order and grouping equals one pass over all rows;
- a subset selected by sample ids equals the same samples written to an archive of their own;
- scaling every activation by a constant leaves MIR unchanged (the text-centric normalisation).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analyze import AnalysisOptions, analyze_selection
from analyze.moments import Moments, block_moments, merge_all
from storage_schemas import ArchiveWriter, open_archive
from storage_schemas.synth import synthetic_records

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(2, 120), d=st.integers(1, 12),
       cuts=st.lists(st.integers(1, 119), max_size=8), order_seed=st.integers(0, 1000),
       offset=st.floats(-1e3, 1e3))
def test_block_merges_in_any_order_and_grouping_equal_one_pass(seed, n, d, cuts, order_seed, offset):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * rng.uniform(0.1, 10, d) + offset).astype(np.float32)
    edges = sorted({0, n, *[c for c in cuts if c < n]})
    blocks = [block_moments(x[a:b], np.ones(b - a, bool), "float64") for a, b in zip(edges[:-1], edges[1:])]
    order = np.random.default_rng(order_seed).permutation(len(blocks))
    shuffled = merge_all([blocks[i] for i in order], d)
    sequential = Moments.empty(d)
    for b in blocks:
        sequential = sequential.merge(b)
    x64 = x.astype(np.float64)
    mean, centred = x64.mean(0), x64 - x64.mean(0)
    scale = max(1.0, float(np.abs(centred.T @ centred).max()))
    for merged in (shuffled, sequential):
        assert merged.n == n
        np.testing.assert_allclose(merged.mean, mean, rtol=1e-9, atol=1e-9 * max(1.0, abs(offset)))
        np.testing.assert_allclose(merged.m2, centred.T @ centred, rtol=1e-7, atol=1e-9 * scale)


SPEC = dict(layers=2, hidden=12, samples=10, vision_tokens=8, text_tokens=9, seed=11)


def _archive(path, records):
    with ArchiveWriter.create(path, layers=[0, 1, 2], hidden_size=12, dtype="float16", attrs={}) as writer:
        writer.append(records)
    return open_archive(path)


def _mir(selection):
    return analyze_selection(selection, AnalysisOptions(cache=False, precision="float64")).mir


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    records = list(synthetic_records(**SPEC))
    return root, records, _archive(root / "full.zarr", records)


@FAST
@given(subset=st.lists(st.integers(0, 9), min_size=2, max_size=10, unique=True))
def test_subset_by_ids_equals_the_subset_extracted_alone(full, subset):
    root, records, archive = full
    chosen = [records[i] for i in sorted(subset)]
    alone_path = root / f"alone-{'-'.join(map(str, sorted(subset)))}.zarr"
    alone = open_archive(alone_path) if alone_path.exists() else _archive(alone_path, chosen)
    by_ids = archive.select(samples=[r.sample_id for r in reversed(chosen)], layers=[1, 2])
    assert by_ids.vision.values.tobytes() == alone.select(layers=[1, 2]).vision.values.tobytes()
    assert _mir(by_ids) == pytest.approx(_mir(alone.select(layers=[1, 2])), abs=1e-9)


@FAST
@given(power=st.integers(-6, 6))
def test_scaling_all_activations_leaves_mir_unchanged(full, power):
    root, records, archive = full
    path = root / f"scaled-{power}.zarr"
    if not path.exists():
        scaled = []
        for r in records:  # a power of two scales float16 values exactly
            r2 = type(r)(**{**r.__dict__})
            r2.vision = (r.vision.astype(np.float32) * 2.0 ** power).astype(np.float16)
            r2.text_hidden = (r.text_hidden.astype(np.float32) * 2.0 ** power).astype(np.float16)
            scaled.append(r2)
        _archive(path, scaled)
    assert _mir(open_archive(path).select(layers=[1, 2])) == pytest.approx(_mir(archive.select(layers=[1, 2])),
                                                                          abs=1e-9)
