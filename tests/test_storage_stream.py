"""The streaming writer: every hidden-state shard reaches the store once unless a full commit made
its tail durable early; commits publish exactly the samples whose hidden states are on disk; the
values equal a plain concatenation of the records, across commits, reopening and rollback; the
per-value checks equal numpy's straightforward ones."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from fault_stores import wrapping

from storage_schemas import ArchiveError, ArchiveWriter, SampleRecord, open_archive, validate_archive
from storage_schemas.records import _all_finite, _low_halves_zero, widen_bfloat16
from storage_schemas.synth import synthetic_records

SPEC = dict(layers=2, hidden=16, vision_tokens=6, text_tokens=10, seed=11)  # 6 vision, ~10 text tokens
SHARD = 16  # chunk_tokens=8 x chunks_per_shard=2


def _create(path, writes, **options):
    def count(key, value):
        writes[key] += 1
    return ArchiveWriter.create(path, layers=[0, 1, 2], hidden_size=16, dtype="float16", attrs={},
                                chunk_tokens=8, chunks_per_shard=SHARD // 8, wrap_store=wrapping(count), **options)


def _assert_holds(path, records):
    archive = open_archive(path)
    assert archive.samples.sample_id.values.tolist() == [r.sample_id for r in records]
    for modality, field in (("vision", "vision"), ("text", "text_hidden")):
        expected = np.concatenate([getattr(r, field) for r in records], axis=1)
        assert getattr(archive, modality).hidden.values.tobytes() == expected.tobytes()
    assert validate_archive(path).ok


def test_soft_commits_write_each_hidden_shard_once(tmp_path):
    records = list(synthetic_records(samples=30, **SPEC))
    writes: Counter = Counter()
    path = tmp_path / "a.zarr"
    writer = _create(path, writes)
    committed = []
    for rec in records:
        writer.append([rec])
        writer.commit()
        committed.append(writer.committed["samples"])
        # Only samples whose tokens lie in written (whole) shards are committed.
        n = committed[-1]
        assert sum(r.n_vision for r in records[:n]) <= writer.committed["vision_tokens"] <= n * 6
        assert writer.committed["vision_tokens"] // SHARD * SHARD <= writer._streams["vision"].durable
    assert 0 < committed[5] < committed[-1] < 30  # commits advanced during the run, behind the appends
    writer.close()
    _assert_holds(path, records)
    shards = {k: n for k, n in writes.items() if "/hidden/c/" in k}
    assert shards and max(shards.values()) == 1, shards  # no shard file was ever rewritten


def test_full_commits_rewrite_only_the_boundary_shard(tmp_path):
    records = list(synthetic_records(samples=12, **SPEC))
    writes: Counter = Counter()
    path = tmp_path / "a.zarr"
    writer = _create(path, writes)
    for rec in records:
        writer.append([rec])
        writer.flush()  # every sample durable at once: its partial shard is written, later rewritten
    writer.close()
    _assert_holds(path, records)
    for modality in ("vision", "text"):
        counts = [n for k, n in writes.items() if k.startswith(f"{modality}/hidden/c/")]
        n_tokens = sum(getattr(r, "n_vision" if modality == "vision" else "n_text") for r in records)
        # Each flush writes at most the one boundary shard it lands in (per layer).
        assert sum(counts) <= 3 * (len(records) + -(-n_tokens // SHARD)), (modality, counts)


@pytest.mark.parametrize("cut", [1, 5, 9])
def test_reopening_mid_shard_and_rollback_keep_the_values(tmp_path, cut):
    """Reopened at an unaligned commit, the writer continues inside the boundary shard (zarr reads
    it back once); a failed append rolls back to the last commit and can be repeated."""
    records = list(synthetic_records(samples=14, **SPEC))
    path = tmp_path / "a.zarr"
    with _create(path, Counter()) as writer:
        writer.append(records[:cut])
    with ArchiveWriter.open_for_append(path) as writer:
        writer.append(records[cut:cut + 3])
        writer.commit()
        writer.abort()  # drop what commit() did not publish: the next writer rolls it back
    kept = open_archive(path).n_samples
    assert cut <= kept <= cut + 3
    with ArchiveWriter.open_for_append(path) as writer:
        writer.append(records[kept:])
    _assert_holds(path, records)


def test_value_checks_equal_numpy(tmp_path):
    rng = np.random.default_rng(0)
    for trial in range(40):
        shape = (int(rng.integers(1, 4)), int(rng.integers(0, 7)), int(rng.integers(1, 9)))
        values = (rng.standard_normal(shape) * 10 ** rng.uniform(-3, 4)).astype(np.float32)
        if values.size and trial % 2:
            flat = values.reshape(-1)
            flat[rng.integers(0, flat.size, 2)] = rng.choice([np.inf, -np.inf, np.nan, 65504.0, 70000.0], 2)
        with np.errstate(over="ignore"):
            half = values.astype(np.float16)
        assert _all_finite(half) == bool(np.isfinite(half).all())
        assert _all_finite(values) == bool(np.isfinite(values).all())
        bf = (values.view(np.uint32) & 0xFFFF0000).view(np.float32)
        assert _low_halves_zero(bf)
        assert _low_halves_zero(values) == (not np.any(values.view(np.uint32) & 0xFFFF))
        bits = (bf.view(np.uint32) >> 16).astype(np.uint16)  # the same values as bfloat16 bits
        assert np.array_equal(widen_bfloat16(bits).view(np.uint32), bf.view(np.uint32))
        assert _all_finite(bits) == bool(np.isfinite(bf).all())
        if shape[1] > 2:  # a sample is a token slice of its batch: strided as a whole
            for arr in (half, values, bits):
                assert _all_finite(arr[:, 1:-1]) == _all_finite(np.ascontiguousarray(arr[:, 1:-1]))
            assert _low_halves_zero(values[:, 1:-1]) == (not np.any(values[:, 1:-1].view(np.uint32) & 0xFFFF))


def _bfloat16_batches(rng, n_batches=6, layers=3, hidden=16):
    """Batches as extraction hands them over: bfloat16 bits of (layers, tokens, hidden), 2 samples each."""
    for b in range(n_batches):
        counts = [(int(rng.integers(2, 9)), int(rng.integers(1, 13))) for _ in range(2)]
        values = rng.standard_normal((layers, sum(nv + nt for nv, nt in counts), hidden)).astype(np.float32)
        yield counts, (values.view(np.uint32) >> 16).astype(np.uint16)


def _records_of(b, counts, batch, widen):
    out, o = [], 0
    for k, (nv, nt) in enumerate(counts):
        vis, txt = batch[:, o:o + nv], batch[:, o + nv:o + nv + nt]
        o += nv + nt
        if widen:
            vis, txt = widen_bfloat16(vis), widen_bfloat16(txt)
        out.append(SampleRecord(f"s{b}-{k}", "i", "t", vis, np.arange(1, 1 + nv), txt, np.r_[0, np.arange(
            1 + nv, nv + nt)], np.zeros(nt, np.int64), np.full(nt, 3, np.int8), np.arange(nv + nt)))
    return out


def test_bfloat16_bits_store_the_same_archive_as_float32(tmp_path):
    """Records holding bfloat16 bits (no float32 copy of the batch) give byte-identical hidden
    states to the same records widened to float32 first, across shard boundaries and flushes."""
    batches = list(_bfloat16_batches(np.random.default_rng(3)))
    archives = {}
    for widen in (False, True):
        path = tmp_path / f"widen-{widen}.zarr"
        with ArchiveWriter.create(path, layers=[0, 1, 2], hidden_size=16, dtype="bfloat16", attrs={},
                                  chunk_tokens=8, chunks_per_shard=2) as writer:
            for b, (counts, batch) in enumerate(batches):
                writer.append(_records_of(b, counts, batch, widen))
                writer.flush() if b == 2 else writer.commit()
        assert validate_archive(path).ok
        archives[widen] = open_archive(path)
    for modality in ("vision", "text"):
        bits, widened = (getattr(archives[w], modality).hidden.values for w in (False, True))
        assert bits.dtype == np.float32 and bits.tobytes() == widened.tobytes()
    expected = np.concatenate([batch[:, :counts[0][0]] for counts, batch in batches], axis=1)
    first_vision = archives[False].vision.hidden.values[:, :batches[0][0][0][0]]
    assert np.array_equal(first_vision.view(np.uint32) >> 16, expected[:, :batches[0][0][0][0]])


def test_bfloat16_bits_are_checked_and_only_for_bfloat16_archives(tmp_path):
    (counts, batch), = _bfloat16_batches(np.random.default_rng(4), n_batches=1)
    bad = batch.copy()
    bad[1, counts[0][0] + 1, 5] = 0x7FC0  # a bfloat16 NaN in the first sample's text
    with ArchiveWriter.create(tmp_path / "b.zarr", layers=[0, 1, 2], hidden_size=16, dtype="bfloat16",
                              attrs={}) as writer:
        with pytest.raises(ArchiveError, match=r"sample 's0-0': text_hidden holds 1 NaN/Inf"):
            writer.append(_records_of(0, counts, bad, widen=False))
        assert writer.pending_samples == 0
    with ArchiveWriter.create(tmp_path / "h.zarr", layers=[0, 1, 2], hidden_size=16, dtype="float16",
                              attrs={}) as writer:
        with pytest.raises(ArchiveError, match="is uint16, the archive stores float16"):
            writer.append(_records_of(0, counts, batch, widen=False))
