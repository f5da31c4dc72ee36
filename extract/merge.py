"""`mir merge`: combine the part archives of one `--shard K/N` extraction into one archive.

The value-for-value copy is the storage layer's `merge_archives`; this module adds what only
extraction knows: that the parts come from one sharded run, that none is missing or unfinished,
and that they go in shard order, so the result equals one unsharded run.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from storage_schemas import ArchiveError, ArchiveWriter, merge_archives, open_archive
from storage_schemas.summary import is_complete, planned_samples


@dataclass
class MergeResult:
    out: Path
    parts: int
    samples: int


def _shard_of(attrs: dict) -> dict | None:
    return (attrs.get("extraction") or {}).get("shard")


def order_parts(parts: Sequence[str | Path], *, allow_partial: bool = False) -> list[str]:
    """Check that `parts` are the complete shards of one run; return them in shard order.

    Archives that are not shard parts (no `extraction.shard`) are kept in the order given.
    """
    if not parts:
        raise ArchiveError("no part archives given")
    archives = [open_archive(str(p)) for p in parts]
    shards = [_shard_of(a.attrs) for a in archives]
    if all(s is None for s in shards):
        return [str(p) for p in parts]
    if any(s is None for s in shards):
        raise ArchiveError("some archives are --shard parts and some are not; merge the parts of one sharded run")
    counts = {s["count"] for s in shards}
    lists = {(a.attrs.get("dataset") or {}).get("sample_list_hash") for a in archives}
    if len(counts) != 1 or len(lists) != 1:
        raise ArchiveError("the parts come from different sharded runs (another N in --shard K/N, or another "
                           "sample list)")
    indices = [s["index"] for s in shards]
    if len(set(indices)) != len(indices):
        raise ArchiveError(f"shard indices repeat: {sorted(indices)}")
    missing = sorted(set(range(1, counts.pop() + 1)) - set(indices))
    if missing and not allow_partial:
        raise ArchiveError(f"shards {missing} are missing; give every part (or --allow-partial)")
    for a in archives:
        if not is_complete(a.attrs) and not allow_partial:
            raise ArchiveError(f"{a.paths[0]} holds {a.n_samples} of its {planned_samples(a.attrs)} samples; finish "
                               "it with `mir extract ... --resume` first (or --allow-partial)")
    return [str(parts[i]) for i in sorted(range(len(parts)), key=lambda i: indices[i])]


def merge(out: str | Path, parts: Sequence[str | Path], *, overwrite: bool = False,
          allow_partial: bool = False) -> MergeResult:
    """Write one archive holding every sample of `parts`, in shard order, values unchanged."""
    out = Path(out)
    if any(Path(p).resolve() == out.resolve() for p in parts):
        raise ArchiveError(f"{out} is one of the parts; write the merged archive elsewhere")
    ordered = order_parts(parts, allow_partial=allow_partial)
    runs = [run for p in ordered for run in (open_archive(p).attrs.get("extraction") or {}).get("runs", [])]
    merge_archives(ordered, out, overwrite=overwrite)
    with ArchiveWriter.open_for_append(out) as writer:
        # The merged archive describes the whole run: no shard, every part's run records.
        dataset = {k: v for k, v in (writer.attrs.get("dataset") or {}).items()
                   if k not in ("shard_samples", "shard_sample_list_hash")}
        extraction = {**(writer.attrs.get("extraction") or {}), "shard": None, "runs": runs}
        writer.update_attrs({"dataset": dataset, "extraction": extraction})
        samples = writer.committed["samples"]
    return MergeResult(out=out, parts=len(ordered), samples=samples)
