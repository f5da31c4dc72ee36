"""The archive contract: plain-xarray readability, bit-exact values, selections, parts and merging."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from storage_schemas import (ArchiveError, ArchiveLockedError, ArchiveWriter, TextRole,
                             merge_archives, open_archive, validate_archive)
from storage_schemas.synth import synthetic_records, write_synthetic_archive


def _records(dtype="float16", n=7, seed=3, layers=2, hidden=16):
    return list(synthetic_records(layers=layers, hidden=hidden, samples=n, vision_tokens=6, text_tokens=10,
                                  seed=seed, dtype=dtype))


def _write(path, records, dtype="float16", **options):
    layers = list(range(records[0].vision.shape[0]))
    with ArchiveWriter.create(path, layers=layers, hidden_size=records[0].vision.shape[2], dtype=dtype,
                              attrs={"model": {"name_or_path": "test"}}, **options) as writer:
        for rec in records:
            writer.append([rec])
    return path


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_plain_xarray_reads_bit_exact_values(tmp_path, dtype):
    recs = _records(dtype)
    path = _write(tmp_path / "a.zarr", recs, dtype, chunk_tokens=8, chunks_per_shard=2, commit_samples=3)
    vision = xr.open_zarr(path, group="vision", consolidated=False)
    text = xr.open_zarr(path, group="text", consolidated=False)
    samples = xr.open_zarr(path, group="samples", consolidated=False)
    assert vision.hidden.dims == ("layer", "token", "channel")
    assert list(vision.layer.values) == [0, 1, 2]
    assert {"sample", "position"} <= set(vision.coords)
    assert {"sample", "position", "token_id", "role"} <= set(text.coords)
    expected = np.concatenate([r.vision for r in recs], axis=1)
    stored = vision.hidden.values
    assert stored.dtype == (np.float16 if dtype == "float16" else np.float32)
    assert stored.tobytes() == expected.tobytes()  # bit for bit
    assert text.hidden.values.tobytes() == np.concatenate([r.text_hidden for r in recs], axis=1).tobytes()
    assert samples.sample_id.values.tolist() == [r.sample_id for r in recs]
    for i, rec in enumerate(recs):
        o, n = int(samples.vision_offset[i]), int(samples.vision_count[i])
        assert np.array_equal(vision.hidden.values[:, o:o + n], rec.vision)
        assert np.array_equal(vision["sample"].values[o:o + n], np.full(n, i))
        io, il = int(samples.input_offset[i]), int(samples.input_length[i])
        assert np.array_equal(samples.input_ids.values[io:io + il], rec.input_ids)
        to, tn = int(samples.text_offset[i]), int(samples.text_count[i])
        assert np.array_equal(text.role.values[to:to + tn], rec.text_role)
        assert np.array_equal(text.position.values[to:to + tn], rec.text_position)
    root = open_archive(path).attrs
    assert root["schema"] == "mir-archive/1"
    assert root["storage"]["source_dtype"] == dtype
    assert validate_archive(path).ok


def test_bfloat16_archive_refuses_values_that_are_not_bfloat16(tmp_path):
    rec = _records("float32", n=1)[0]
    rec.vision[0, 0, 0] = np.float32(1.0000001)
    with pytest.raises(ArchiveError, match="not bfloat16"):
        _write(tmp_path / "a.zarr", [rec], "bfloat16")


def test_writer_refuses_nan_duplicates_and_wrong_shapes(tmp_path):
    recs = _records()
    with ArchiveWriter.create(tmp_path / "a.zarr", layers=[0, 1, 2], hidden_size=16, dtype="float16",
                              attrs={}) as writer:
        writer.append(recs[:2])
        with pytest.raises(ArchiveError, match="already in"):
            writer.append([recs[0]])
        bad = _records(seed=9, n=1)[0]
        bad.text_hidden[1, 0, 3] = np.nan
        with pytest.raises(ArchiveError, match="NaN/Inf"):
            writer.append([bad])
        short = _records(seed=8, n=1, layers=1)[0]
        with pytest.raises(ArchiveError, match="expected \\(3, tokens, 16\\)"):
            writer.append([short])
    assert open_archive(tmp_path / "a.zarr").n_samples == 2


def test_create_refuses_existing_and_writes_atomically(tmp_path):
    path = _write(tmp_path / "a.zarr", _records(n=2))
    with pytest.raises(ArchiveError, match="already exists"):
        _write(path, _records(n=2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.zarr"]  # no temporary leftovers


def test_second_writer_is_refused_with_a_clear_message(tmp_path):
    path = _write(tmp_path / "a.zarr", _records(n=2))
    first = ArchiveWriter.open_for_append(path)
    try:
        with pytest.raises(ArchiveLockedError, match="being written by another process"):
            ArchiveWriter.open_for_append(path)
    finally:
        first.close()
    ArchiveWriter.open_for_append(path).close()  # free again


def test_append_after_reopen_and_selection(tmp_path):
    recs = _records(n=9)
    path = _write(tmp_path / "a.zarr", recs[:5], chunk_tokens=8, chunks_per_shard=2)
    before = open_archive(path).fingerprint
    with ArchiveWriter.open_for_append(path) as writer:
        assert writer.committed_sample_ids == [r.sample_id for r in recs[:5]]
        writer.append(recs[5:])
    archive = open_archive(path)
    assert archive.fingerprint != before
    assert archive.n_samples == 9
    sel = archive.select(samples=[recs[7].sample_id, recs[2].sample_id], layers=[2], text_tokens="response")
    assert sel.sample_index.tolist() == [2, 7]
    assert sel.vision.shape == (1, 12, 16)
    np.testing.assert_array_equal(sel.vision.values[0], np.concatenate([recs[2].vision[2], recs[7].vision[2]]))
    expected_text = np.concatenate([r.text_hidden[2][r.text_role == TextRole.RESPONSE] for r in (recs[2], recs[7])])
    np.testing.assert_array_equal(sel.text.values[0], expected_text)
    after = archive.select(text_tokens="after-image")
    n_after = sum(int((r.text_role >= TextRole.AFTER_IMAGE_TEMPLATE).sum()) for r in recs)
    assert after.text.sizes["token"] == n_after
    assert archive.select(text_tokens="all").text.sizes["token"] == sum(r.n_text for r in recs)
    by_predicate = archive.select(samples=lambda s: s.vision_offset.values >= 6 * 7)
    assert by_predicate.sample_index.tolist() == [7, 8]
    assert archive.select(samples=slice(0, 3)).sample_ids == [r.sample_id for r in recs[:3]]
    with pytest.raises(ArchiveError, match="not in the archive"):
        archive.select(samples=["nope"])
    with pytest.raises(ArchiveError, match="not stored"):
        archive.select(layers=[7])
    with pytest.raises(ArchiveError, match="unknown text-token rule"):
        archive.select(text_tokens="everything")
    np.testing.assert_array_equal(archive.sample_input_ids(4), recs[4].input_ids)


def test_parts_read_as_one_and_merge_losslessly(tmp_path):
    recs = _records(n=7)
    p1 = _write(tmp_path / "p1.zarr", recs[:3])
    p2 = _write(tmp_path / "p2.zarr", recs[3:])
    whole = _write(tmp_path / "whole.zarr", recs)
    combined = open_archive([p1, p2])
    reference = open_archive(whole)
    for m in ("vision", "text"):
        a, b = getattr(combined, m), getattr(reference, m)
        assert a.hidden.values.tobytes() == b.hidden.values.tobytes()
        for coord in a.coords:
            np.testing.assert_array_equal(a[coord].values, b[coord].values)
    for name in ("vision_offset", "text_offset", "input_offset", "sample_id"):
        np.testing.assert_array_equal(combined.samples[name].values, reference.samples[name].values)
    merged = merge_archives([p1, p2], tmp_path / "merged.zarr")
    m = open_archive(merged)
    assert m.vision.hidden.values.tobytes() == reference.vision.hidden.values.tobytes()
    assert m.text.hidden.values.tobytes() == reference.text.hidden.values.tobytes()
    np.testing.assert_array_equal(m.input_ids, reference.input_ids)
    assert validate_archive(merged).ok
    with pytest.raises(ArchiveError, match="more than one part"):
        open_archive([p1, p1])


def test_synthetic_modalities_differ_and_have_outliers(tmp_path):
    path = write_synthetic_archive(tmp_path / "s.zarr", layers=2, hidden=64, samples=20, vision_tokens=50,
                                   text_tokens=30, seed=0)
    archive = open_archive(path)
    v = archive.vision.hidden.sel(layer=2).values.astype(np.float64)
    t = archive.text.hidden.sel(layer=2).values.astype(np.float64)
    assert np.linalg.norm(v.mean(0) - t.mean(0)) > 1.0
    norms = np.linalg.norm(v, axis=1)
    assert (norms > np.median(norms) + 3 * norms.std()).sum() >= 1  # heavy-norm outlier tokens
    counts = archive.samples.text_count.values
    assert counts.min() != counts.max()  # text-token counts vary per sample


def test_prefetch_reads_exactly_the_selected_layers_shard_files(tmp_path):
    """storage_schemas.prefetch lists the hidden-state shards of the asked layers (every file under their
    layer index, in the array's key encoding) and reads them in a thread; a byte cap stops before it."""
    from storage_schemas.prefetch import prefetch, shard_files
    path = write_synthetic_archive(tmp_path / "a.zarr", layers=3, hidden=16, samples=6, vision_tokens=40,
                                   text_tokens=30, seed=0, chunk_tokens=16, chunks_per_shard=2)
    selection = open_archive(path).select(layers=[1, 3])
    index = {int(layer): i for i, layer in enumerate(selection.archive.parts[0].layers)}
    for layer in (1, 3):
        want = sorted(f for m in ("vision", "text") for f in (tmp_path / "a.zarr" / m / "hidden" / "c" /
                                                                str(index[layer])).rglob("*") if f.is_file())
        assert sorted(shard_files(selection, [layer])) == want and want
    thread = prefetch(selection)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert prefetch(selection, max_bytes=0) is None
