"""Facts about an archive for people: provenance, sizes, compression. Used by `mir inspect`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .reader import Archive
from .store import is_remote


CACHE_DIR = "_mir_cache"  # analysis statistics kept beside the data; not part of the archive's size


def disk_bytes(location: str) -> int | None:
    """Bytes of stored data under a local archive directory (None for URLs)."""
    if is_remote(location):
        return None
    root = Path(location.removeprefix("file://"))
    return sum(f.stat().st_size for f in root.rglob("*")
               if f.is_file() and CACHE_DIR not in f.relative_to(root).parts)


def summarize(archive: Archive) -> dict:
    """A JSON-able summary: what `mir inspect` prints."""
    attrs = archive.attrs
    itemsize = np.dtype(archive.stored_dtype).itemsize
    n_layers = len(archive.layers)
    tokens = {m: int(getattr(archive, m).sizes["token"]) for m in ("vision", "text")}
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
        "fingerprint": archive.fingerprint,
    }
