"""Facts about an archive for people: provenance, sizes, compression. Used by `mir inspect`."""
from __future__ import annotations

import numpy as np

from .reader import Archive
from .schema import MODALITIES
from .sidecars import content_files, sidecar_bytes
from .store import is_remote


def disk_bytes(location: str) -> int | None:
    """Bytes of the archive's content under a local archive directory, sidecars left out (None for URLs)."""
    if is_remote(location):
        return None
    return sum(f.stat().st_size for f in content_files(location))


def summarize(archive: Archive) -> dict:
    """A JSON-able summary: what `mir inspect` prints."""
    attrs = archive.attrs
    itemsize = np.dtype(archive.stored_dtype).itemsize
    n_layers = len(archive.layers)
    tokens = {m: int(getattr(archive, m).sizes["token"]) for m in MODALITIES}
    raw = sum(tokens.values()) * n_layers * archive.hidden_size * itemsize
    on_disk = [disk_bytes(p) for p in archive.paths]
    total_disk = None if any(b is None for b in on_disk) else sum(on_disk)
    roles = archive.text["role"].values
    return {
        "location": archive.paths if len(archive.paths) > 1 else archive.paths[0],
        "schema": attrs.get("schema"),
        "model": attrs.get("model", {}),
        "extraction": attrs.get("extraction", {}),
        "dataset": attrs.get("dataset", {}),
        "layers": archive.layers.tolist(),
        "hidden_size": archive.hidden_size,
        "samples": archive.n_samples,
        "tokens": tokens,
        "text_tokens_by_role": {int(r): int((roles == r).sum()) for r in np.unique(roles)},
        "stored_dtype": archive.stored_dtype,
        "source_dtype": archive.source_dtype,
        "raw_bytes": int(raw),
        "disk_bytes": total_disk,
        "compression_ratio": (raw / total_disk) if total_disk else None,
        "commit": attrs.get("commit"),
        "planned_samples": planned_samples(attrs) if len(archive.parts) == 1 else None,
        "sidecars": {p: sidecar_bytes(p) for p in archive.paths},
        "fingerprint": archive.fingerprint,
    }


def planned_samples(attrs: dict) -> int | None:
    """How many samples the extraction that wrote this archive planned (its shard's share for a `--shard`
    part), from `dataset.shard_samples` or `dataset.samples`; None when it recorded no plan."""
    dataset = attrs.get("dataset") or {}
    planned = dataset.get("shard_samples", dataset.get("samples"))
    return int(planned) if isinstance(planned, int) else None


def is_complete(attrs: dict) -> bool:
    """Whether the archive holds every sample its extraction planned. One recording no plan (`mir synth`,
    a foreign writer) holds what it meant to: complete."""
    planned = planned_samples(attrs)
    return planned is None or attrs["commit"]["samples"] >= planned


def format_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB' (binary units); None -> 'n/a (remote)'."""
    if n is None:
        return "n/a (remote)"
    units, k = ("B", "KiB", "MiB", "GiB", "TiB"), 0
    while n >= 1024 and k < len(units) - 1:
        n, k = n / 1024, k + 1
    return f"{int(n)} B" if k == 0 else f"{n:.1f} {units[k]}"
