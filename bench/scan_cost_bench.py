"""The scan's per-chunk cost (kernels.scan_chunk) in this tree against another checkout of the project,
on the same decompressed chunks, side by side in one run; and a float32 Gram product X^T X of the same
chunks, the one-pass floor's compute, for scale.

    python bench/scan_cost_bench.py --baseline-tree /tmp/base            # synthesises a d = 4096 archive
    python bench/scan_cost_bench.py --archive paper.zarr --baseline-tree /tmp/base

Why: the per-value statistics of activations.py (sum of unit rows, |h| histogram, per-channel max, top-k)
run inside the scan, the loop whose cost the one-pass floor ratio of analyze_bench.py measures. The
default archive has the paper's width (hidden size 4096, 576 vision + 800 text tokens per sample),
scaled down in samples, never in width; the chunks timed are whole storage chunks of one layer, both
modalities, as many as --chunks (default 24; half vision, half text), as `mir analyze` reads them.
Both trees run single-threaded in their own processes, alternating --rounds times, each timing every
chunk --repeat times (best kept); `scan / Gram` divides by the Gram time measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = dict(layers=1, hidden=4096, samples=24, vision_tokens=576, text_tokens=800)


def load_chunks(path: str, layer: int, count: int) -> list:
    """Up to `count` storage chunks of one layer (vision then text), decompressed, as (token, channel)."""
    import numpy as np
    from storage_schemas import open_archive

    selection = open_archive(path).select(layers=[layer])
    out = []
    for m in ("vision", "text"):
        arr = getattr(selection, m).data[0]
        for block in arr.to_delayed().ravel()[: count // 2]:
            out.append(np.ascontiguousarray(np.asarray(block.compute()).reshape(-1, arr.shape[1])))
    return out


def time_tree(path: str, layer: int, count: int, repeat: int) -> dict:
    """Seconds per chunk of kernels.scan_chunk (best of `repeat`) in the tree this process imports from."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    import analyze
    from analyze import kernels
    from analyze.config import ReadConfig

    chunks = load_chunks(path, layer, count)
    config = ReadConfig()
    with threadpool_limits(1):
        kernels.scan_chunk(chunks[0][:64], kernels.Chunk(0, 64, ((0, 0, 64),), 1), "float32", config)  # compile
        scan = gram = 0.0
        for x in chunks:
            chunk = kernels.Chunk(0, len(x), ((0, 0, len(x)),), 2)
            best = min(_timed(lambda: kernels.scan_chunk(x, chunk, "float32", config)) for _ in range(repeat))
            scan += best
            y = x.astype(np.float32)
            gram += _timed(lambda: y.T @ y)  # BLAS time is steady; once is enough
    tokens = sum(len(x) for x in chunks)
    return {"tree": str(Path(analyze.__file__).parent.parent), "chunks": len(chunks), "tokens": tokens,
            "d": int(chunks[0].shape[1]), "dtype": str(chunks[0].dtype), "scan_s": scan, "gram_s": gram}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", help="an archive to read (default: synthesise one of the paper's width)")
    ap.add_argument("--baseline-tree", help="another checkout of the project to time side by side")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--chunks", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the trees (best kept)")
    ap.add_argument("--run-here", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_here:
        print(json.dumps(time_tree(args.archive, args.layer, args.chunks, args.repeat)))
        return
    path = args.archive
    if path is None:
        from storage_schemas.synth import write_synthetic_archive
        path = str(Path(tempfile.gettempdir()) / "mir-scan-cost-bench" / "d4096.zarr")
        if not Path(path).exists():
            print(f"writing synthetic archive {SPEC} ...", flush=True)
            write_synthetic_archive(path, seed=0, overwrite=True, **SPEC)
    trees = [Path(__file__).resolve().parent.parent] + ([Path(args.baseline_tree)] if args.baseline_tree else [])
    results: list[dict | None] = [None] * len(trees)
    for _ in range(args.rounds):  # the trees alternate, so a change in machine load hits both alike
        for i, tree in enumerate(trees):
            env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-here", "--archive", path, "--layer",
                   str(args.layer), "--chunks", str(args.chunks), "--repeat", str(args.repeat)]
            done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"timing in {tree} failed:\n{done.stderr}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            if results[i] is not None:  # best of the rounds, each time separately
                got.update({k: min(got[k], results[i][k]) for k in ("scan_s", "gram_s")})
            results[i] = got
    first = results[0]
    print(f"archive {path}: layer {args.layer}, {first['chunks']} chunks, {first['tokens']} tokens x {first['d']} "
          f"channels ({first['dtype']}); one thread; best of {args.repeat} per chunk, best of {args.rounds} "
          "alternating rounds")
    print(f"{'tree':50s} {'scan s':>8} {'per 64k tok':>12} {'scan / Gram':>12}")
    for r in results:
        print(f"{r['tree'][-50:]:50s} {r['scan_s']:8.3f} {r['scan_s'] * 65536 / r['tokens']:12.3f} "
              f"{r['scan_s'] / r['gram_s']:11.2f}x")
    per = first["gram_s"] * 65536 / first["tokens"]
    print(f"{'float32 X^T X of the same chunks':50s} {first['gram_s']:8.3f} {per:12.3f}")
    if len(results) > 1:
        print(f"scan in this tree / scan in {results[1]['tree']}: {first['scan_s'] / results[1]['scan_s']:.3f}x "
              f"(+{first['scan_s'] - results[1]['scan_s']:.3f} s, "
              f"{(first['scan_s'] - results[1]['scan_s']) / first['gram_s']:.1%} of the Gram products)")


if __name__ == "__main__":
    main()
