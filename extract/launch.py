"""`mir extract --shard auto`: each process of a torchrun job or a Slurm array takes its own part.

The launcher's environment says which part and which device: torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK; a Slurm array sets SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT and
SLURM_ARRAY_TASK_MIN. Part K of N is the ordinary `--shard K/N` extraction into
`<out>.parts/part-K-of-N.zarr`. When a part finishes, its process checks whether every part is
complete; the one that finds them all complete first (an exclusive claim file decides between
processes finishing at once) merges them in shard order into `<out>`, which then equals one
unsharded run, and removes the parts. Since each part checks after its own commit, the last part
to finish always sees the others complete. Parts left behind by a failed merge can still be merged
with `mir merge`.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from storage_schemas import ArchiveError
from storage_schemas.store import read_root_attrs

from .errors import ExtractError
from .extraction import ExtractOptions, ExtractResult, extract
from .merge import merge

CLAIM = "merge.claim"


@dataclass(frozen=True)
class AutoShard:
    index: int              # 1-based, as --shard K/N
    count: int
    launcher: str           # "torchrun" or "slurm array"
    local_rank: int | None  # torchrun's device index on this node


def detect(env: Mapping[str, str] | None = None) -> AutoShard:
    """This process's part, from the torchrun or Slurm array environment."""
    env = os.environ if env is None else env
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env["LOCAL_RANK"]) if "LOCAL_RANK" in env else None
            shard = AutoShard(rank + 1, world, "torchrun", local)
        elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            shard = AutoShard(task - first + 1, count, "slurm array", None)
        else:
            raise ExtractError("--shard auto: found neither a torchrun environment (RANK, WORLD_SIZE) nor a Slurm "
                               "array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT); launch with torchrun or sbatch "
                               "--array, or give --shard K/N")
    except ValueError:
        raise ExtractError("--shard auto: the launcher's RANK/WORLD_SIZE or SLURM_ARRAY_* variables are not "
                           "integers") from None
    if not 1 <= shard.index <= shard.count:
        raise ExtractError(f"--shard auto: {shard.launcher} part {shard.index} of {shard.count} is out of range "
                           "(a Slurm array must be contiguous, e.g. --array=0-3)")
    return shard


def part_path(out: str | Path, index: int, count: int) -> Path:
    out = Path(out).expanduser().absolute()
    return out.with_name(out.name + ".parts") / f"part-{index}-of-{count}.zarr"


def _device(opts_device: str, shard: AutoShard) -> str:
    """torchrun: one GPU per local rank when the device is left to `auto`; otherwise as given."""
    if opts_device != "auto" or shard.local_rank is None:
        return opts_device
    import torch

    return f"cuda:{shard.local_rank}" if torch.cuda.is_available() else "cpu"


def _complete(path: Path) -> bool:
    try:
        attrs = read_root_attrs(path)
    except (ArchiveError, OSError):
        return False
    planned = (attrs.get("dataset") or {}).get("shard_samples")
    return planned is not None and attrs["commit"]["samples"] >= planned


def assemble_if_last(out: str | Path, count: int, *, overwrite: bool = False) -> Path | None:
    """Merge the parts into `out` if every one is complete and no other process claimed the merge."""
    parts = [part_path(out, k, count) for k in range(1, count + 1)]
    if not all(_complete(p) for p in parts):
        return None
    claim = parts[0].parent / CLAIM
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None  # another part finished at the same moment and merges
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    final = Path(out).expanduser().absolute()
    merge(final, parts, overwrite=overwrite)
    shutil.rmtree(parts[0].parent, ignore_errors=True)
    return final


def extract_auto(opts: ExtractOptions, *, on_info: Callable[[str], None] | None = None,
                 env: Mapping[str, str] | None = None) -> ExtractResult:
    """Extract this process's part (`opts.shard` is ignored) and assemble `opts.out` if it was the last."""
    say = on_info or (lambda msg: None)
    shard = detect(env)
    if Path(opts.out).exists() and not opts.overwrite:
        raise ExtractError(f"{opts.out} already exists (the parts were merged); pass --overwrite to make it again")
    part = part_path(opts.out, shard.index, shard.count)
    part.parent.mkdir(parents=True, exist_ok=True)
    mine = dataclasses.replace(opts, out=str(part), shard=(shard.index, shard.count),
                               device=_device(opts.device, shard))
    say(f"{shard.launcher}: part {shard.index} of {shard.count} on {mine.device} -> {part}")
    result = extract(mine, on_info=on_info)
    merged = assemble_if_last(opts.out, shard.count, overwrite=opts.overwrite)
    if merged is not None:
        say(f"every part is complete: merged {shard.count} parts into {merged}")
    else:
        say(f"part {shard.index} of {shard.count} done; the last part to finish merges into {opts.out}")
    return result
