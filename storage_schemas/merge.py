"""Combine part archives (e.g. the outputs of `mir extract --shard K/N`) into one, losslessly.

Only the archive content is copied: the parts' sidecars (storage_schemas.sidecars, e.g. the analysis
cache) are derived from the parts' fingerprints, which the merged archive does not share, so it starts
without any."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .reader import Archive, open_archive
from .records import SampleRecord
from .schema import MODALITIES
from .writer import ArchiveWriter

BATCH_BYTES = 128 * 2**20


def _records(archive: Archive, rows: range) -> list[SampleRecord]:
    """Read a run of consecutive samples with one contiguous read per modality."""
    s = archive.samples
    out_tokens = {}
    for m in MODALITIES:
        start = int(s[f"{m}_offset"][rows.start])
        stop = int(s[f"{m}_offset"][rows.stop - 1] + s[f"{m}_count"][rows.stop - 1])
        ds = getattr(archive, m).isel(token=slice(start, stop))
        out_tokens[m] = (start, ds["hidden"].values, {k: ds[k].values for k in ds.coords if k not in ("layer",)})
    records = []
    for i in rows:
        parts = {}
        for m, (base, hidden, coords) in out_tokens.items():
            o = int(s[f"{m}_offset"][i]) - base
            n = int(s[f"{m}_count"][i])
            parts[m] = (hidden[:, o:o + n], {k: v[o:o + n] for k, v in coords.items()})
        vis, vis_c = parts["vision"]
        txt, txt_c = parts["text"]
        records.append(SampleRecord(
            sample_id=str(s.sample_id.values[i]), image=str(s.image.values[i]), text=str(s.text.values[i]),
            vision=np.ascontiguousarray(vis), vision_position=vis_c["position"],
            text_hidden=np.ascontiguousarray(txt), text_position=txt_c["position"],
            text_token_id=txt_c["token_id"], text_role=txt_c["role"],
            input_ids=archive.sample_input_ids(i)))
    return records


def merge_archives(parts: Sequence[str | Path], out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the samples of `parts`, in the order given, into a new archive at `out`."""
    archive = open_archive([str(p) for p in parts])
    attrs = {k: v for k, v in archive.attrs.items()
             if k not in ("schema", "storage", "archive_uuid", "commit", "parts")}
    extraction = dict(attrs.get("extraction", {}))
    extraction.pop("shard", None)
    attrs["extraction"] = {**extraction, "merged_from": [
        {"location": p.location, "archive_uuid": p.attrs.get("archive_uuid"),
         "shard": p.attrs.get("extraction", {}).get("shard"), "samples": p.commit["samples"]}
        for p in archive.parts]}
    storage = archive.attrs["storage"]
    per_sample = max(1, (archive.vision.sizes["token"] + archive.text.sizes["token"]) // max(1, archive.n_samples)
                     * len(archive.layers) * archive.hidden_size * np.dtype(archive.stored_dtype).itemsize)
    step = max(1, BATCH_BYTES // per_sample)
    with ArchiveWriter.create(out, layers=archive.layers.tolist(), hidden_size=archive.hidden_size,
                              dtype=archive.source_dtype, attrs=attrs, overwrite=overwrite,
                              chunk_tokens=storage.get("chunk_tokens"),
                              chunks_per_shard=storage.get("chunks_per_shard", 8),
                              codec=storage.get("codec")) as writer:
        part_of = archive.samples["part"].values if "part" in archive.samples else np.zeros(archive.n_samples, int)
        start = 0
        while start < archive.n_samples:
            stop = min(archive.n_samples, start + step)
            stop = start + int(np.argmax(part_of[start:stop] != part_of[start])) if \
                (part_of[start:stop] != part_of[start]).any() else stop
            writer.append(_records(archive, range(start, stop)))
            start = stop
    return Path(out)
