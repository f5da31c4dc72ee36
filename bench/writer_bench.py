"""Writer-bound extraction at the paper's shape: how fast `mir extract`'s writer path accepts hidden
states when the model produces them instantly (what a fast GPU sees), against the raw disk.

Hidden states of LLaVA-1.5-7B shape (33 hidden-state entries x 4096 channels, 576 vision tokens and
700-900 text tokens per sample: about 370 MB per sample in float16) go through the same path as
`mir extract` on a GPU: a transfer per batch in a reused host buffer, the same queue and host-memory
bound (2 batches), the writer thread's copy and record building (extract.writing.WriterStage), the
same commit policy, the archive writer with the format's default codec, chunks and shards. The
source is a thread handing out pre-filled buffers, so nothing but the writer path is measured.

Each case runs in a fresh process (for its peak RSS) and prints, in one run:
  * MB/s of hidden states accepted (uncompressed bytes / wall time including the final fsync);
  * write amplification: bytes the process sent to disk (/proc/self/io write_bytes) per byte of
    the finished archive, and per byte of hidden states;
  * peak RSS against the target (2 batches of hidden states + 1 GB);
  * the raw sequential write speed of the same disk: incompressible bytes, fsynced, same run.

    python bench/writer_bench.py [--samples 40] [--batch-size 2] [--dtypes float16,bfloat16]
        [--layers 33] [--dir DIR] [--compression none|lz4:1|zstd:3]

At the defaults a case writes 15 GB (float16) and passes ~13 shard boundaries per modality and as
many commits; the archives are deleted after each case. Needs ~1.5x the largest case free on disk.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from extract.extraction import parse_compression, record_maker
from extract.transfer import Transfer
from extract.writing import STOP, CommitPolicy, RunStats, WriterStage
from storage_schemas import ArchiveWriter
from storage_schemas.synth import _LayerModel, _to_dtype

VISION_TOKENS = 576
TEXT_TOKENS = (700, 900)


def write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def raw_disk_mb_s(directory: Path, mb: int) -> float:
    """Sequential write of incompressible bytes, fsynced (zeros would measure the virtual disk's
    compression, not its speed)."""
    block = np.random.default_rng(0).integers(0, 256, 64 * 2**20, dtype=np.uint8).tobytes()
    path = directory / "raw-disk-probe.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(max(1, mb // 64)):
            os.write(fd, block[i % 7:] + block[:i % 7])  # no two blocks alike
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return max(1, mb // 64) * 64 * 2**20 / 1e6 / seconds


def fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def token_pool(dtype: str, hidden: int, tokens: int) -> torch.Tensor:
    """Realistic activations (synth's layer model) in the model's dtype, as torch would hold them."""
    rng = np.random.default_rng(0)
    values = _to_dtype(_LayerModel(rng, hidden, 8, "vision").draw(rng, tokens), dtype)
    if dtype == "bfloat16":
        return torch.from_numpy(values).to(torch.bfloat16)
    return torch.from_numpy(values)


def fake_batch(first: int, text_counts: list[int]):
    """The bookkeeping the writer needs for one batch (what BatchPreparer produces)."""
    samples = []
    for k, nt in enumerate(text_counts):
        n = VISION_TOKENS + nt
        tokens = SimpleNamespace(vision_position=np.arange(1, 1 + VISION_TOKENS), text_position=np.r_[0, np.arange(
            1 + VISION_TOKENS, n)], text_token_id=np.full(nt, 7, dtype=np.int64),
            text_role=np.full(nt, 3, dtype=np.int8), input_ids=np.arange(n, dtype=np.int64))
        sample = SimpleNamespace(sample_id=f"s{first + k:06d}", image_ref=f"img{first + k}.jpg",
                                 text_ref=f"txt{first + k}.story")
        samples.append(SimpleNamespace(sample=sample, tokens=tokens, truncated=False))
    return SimpleNamespace(samples=samples)


def run_case(args) -> dict:
    """One writer-bound run in this process."""
    out_dir = Path(args.dir)
    rng = np.random.default_rng(1)
    text_counts = [int(x) for x in rng.integers(TEXT_TOKENS[0], TEXT_TOKENS[1] + 1, args.samples)]
    per_batch = [text_counts[i:i + args.batch_size] for i in range(0, args.samples, args.batch_size)]
    max_tokens = max(args.batch_size * VISION_TOKENS + sum(c) for c in per_batch)
    pool = token_pool(args.dtype, args.hidden, 8192)
    # Host buffers as the pinned pool would hold them: host_batches of them, filled once. Each layer
    # reads the pool at another offset, so no chunk repeats another's values.
    buffers = []
    for b in range(args.host_batches):
        buf = torch.empty((args.layers, max_tokens, args.hidden), dtype=pool.dtype)
        for j in range(args.layers):
            idx = (np.arange(max_tokens) * 7 + 977 * j + 3001 * b) % pool.shape[0]
            buf[j] = pool[torch.from_numpy(idx)]
        buffers.append(buf)
    free: queue.Queue = queue.Queue()
    for buf in buffers:
        free.put(buf)
    del pool

    path = out_dir / "writer-bench.zarr"
    writer = ArchiveWriter.create(path, layers=list(range(args.layers)), hidden_size=args.hidden,
                                  dtype=args.dtype, attrs={}, overwrite=True,
                                  codec=parse_compression(args.compression))
    stats = RunStats()
    transfers: queue.Queue = queue.Queue()
    stage = WriterStage(writer, record_maker(args.dtype), CommitPolicy(None, 120.0), stats,
                        pool=SimpleNamespace(put=free.put))

    def source() -> None:
        first = 0
        for counts in per_batch:
            buf = free.get()  # the host-memory bound: wait for the writer to give a buffer back
            n = len(counts) * VISION_TOKENS + sum(counts)
            transfers.put(Transfer(buf[:, :n], None, buf, fake_batch(first, counts)))
            first += len(counts)
        transfers.put(STOP)

    accepted = sum(len(c) * VISION_TOKENS + sum(c) for c in per_batch) * args.layers * args.hidden * \
        (2 if args.dtype == "float16" else 4)
    w0, t0 = write_bytes(), time.perf_counter()
    feeder = threading.Thread(target=source, daemon=True)
    feeder.start()
    stage.consume(transfers)
    writer.close()
    fsync_tree(path)
    seconds = time.perf_counter() - t0
    written = write_bytes() - w0
    archive = dir_bytes(path)
    storage = dict(writer.attrs["storage"])
    shutil.rmtree(path)
    batch_bytes = max(b[:, :1].nbytes for b in buffers) * max_tokens * (1 if args.dtype == "float16" else 2)
    return {"dtype": args.dtype, "samples": args.samples, "seconds": seconds, "accepted_bytes": accepted,
            "accepted_mb_s": accepted / 1e6 / seconds, "written_bytes": written, "archive_bytes": archive,
            "amplification": written / archive, "written_per_accepted": written / accepted,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_target": 2 * batch_bytes + 2**30, "commits": stats.commits + 1, "codec": storage["codec"],
            "shard_tokens": storage["chunk_tokens"] * storage["chunks_per_shard"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--layers", type=int, default=33, help="hidden-state entries (33 = LLaVA-1.5-7B)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--compression", default=None, help="mir extract --compression (default: the format's)")
    p.add_argument("--host-batches", type=int, default=2)
    p.add_argument("--raw-mb", type=int, default=2048, help="size of the raw disk probe")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder here)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    root = Path(tempfile.mkdtemp(prefix="mir-writer-bench-", dir=args.dir or os.getcwd()))
    try:
        raw_before = raw_disk_mb_s(root, args.raw_mb)
        results = []
        for dtype in args.dtypes.split(","):
            cmd = [sys.executable, __file__, "--case", "1", "--dtype", dtype, "--dir", str(root),
                   "--samples", str(args.samples), "--batch-size", str(args.batch_size), "--layers",
                   str(args.layers), "--hidden", str(args.hidden), "--host-batches", str(args.host_batches)]
            if args.compression:
                cmd += ["--compression", args.compression]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        raw_after = raw_disk_mb_s(root, args.raw_mb)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    raw = (raw_before + raw_after) / 2
    print(f"raw disk (random bytes, fsynced, {args.raw_mb} MB): {raw_before:.0f} MB/s before, {raw_after:.0f} MB/s "
          f"after the cases (mean {raw:.0f})")
    print(f"shape: {args.layers} hidden-state entries x {args.hidden}, {VISION_TOKENS} vision + {TEXT_TOKENS[0]}-"
          f"{TEXT_TOKENS[1]} text tokens per sample, batch size {args.batch_size}")
    for r in results:
        gb = r["accepted_bytes"] / 1e9
        print(f"\n{r['dtype']} ({r['samples']} samples, {gb:.1f} GB of hidden states, codec {r['codec']}, "
              f"{r['shard_tokens']} tokens per shard, {r['commits']} commits)")
        print(f"  accepted        {r['accepted_mb_s']:7.0f} MB/s  = {r['accepted_mb_s'] / raw:.2f}x the raw disk "
              f"(target >= 0.8x)")
        print(f"  written         {r['written_bytes'] / 1e9:7.2f} GB for a {r['archive_bytes'] / 1e9:.2f} GB archive: "
              f"amplification {r['amplification']:.3f}x (target <= 1.2x); {r['written_per_accepted']:.3f} bytes "
              "written per byte accepted")
        print(f"  peak RSS        {r['peak_rss'] / 2**30:7.2f} GiB (target {r['rss_target'] / 2**30:.2f} GiB = "
              "2 batches + 1 GiB)")
        print(f"  disk time       {r['seconds']:.1f} s; at raw speed the archive takes "
              f"{r['archive_bytes'] / 1e6 / raw:.1f} s")


if __name__ == "__main__":
    main()
