"""Run under `torchrun --nproc-per-node 2` by test_launchers.py (not collected).

Each process: `mir extract --shard auto` (its part; the last to finish merges), then, in a gloo
process group, `pipelines.training.mir_at_step` on the live model (each rank extracts its shard of
the probe, rank 0 merges and analyses).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipelines.cli import main  # noqa: E402
from pipelines.training import Probe, mir_at_step  # noqa: E402
from training_helpers import load  # noqa: E402


def run(model_dir: str, manifest: str, out: str, probe_out: str) -> None:
    main(["extract", "--model", model_dir, "--manifest", manifest, "--out", out, "--shard", "auto",
          "--batch-size", "2", "--device", "cpu", "--quiet"], standalone_mode=False)
    dist.init_process_group("gloo")
    model, processor = load(Path(model_dir))
    outcome = mir_at_step(model, processor, Probe(manifest=manifest, out=probe_out, run="ddp", batch_size=2), 7)
    rank = dist.get_rank()
    print(f"rank {rank}: step {outcome.step} archive {outcome.archive} "
          + (f"MIR {outcome.result.mir!r}" if outcome.result is not None else "no result"), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    run(*sys.argv[1:5])
