"""`mir analyze` against its one-pass floor and the reference procedure, measured in one run.

    python bench/analyze_bench.py            # ~6 GB archive, 2 GB budget (several minutes)
    python bench/analyze_bench.py --small    # a quick check of the script itself
    python bench/analyze_bench.py --baseline-tree OTHER_CHECKOUT   # also that checkout's mir analyze, side by side
    python bench/analyze_bench.py --paper [--archive PATH]   # the memory budgets at the paper's shape

`--paper` (the paper's shape: hidden 4096, 2 decoder layers, 100 samples, 576 vision + 800 text tokens,
float16, ~3 GB; `--archive` reuses one written by `mir synth` with those settings) prints `mir analyze`
(no cache, no bootstrap) wall time and peak RSS at the default budget, 4 GB, 2 GB and 1 GB, each as a
ratio to the default run (refusals printed as such), then hidden size 8192 at 2 GB on a small synthetic
archive: within the budget, or refused before reading.

Prints, side by side:
* `mir analyze` on the whole archive (larger than the memory budget it gives Dask): wall time and
  peak RSS of all its processes together (psutil, polled every 20 ms);
* the one-pass floor: reading the same selection once (decompression included, Dask threads) plus the
  bare float32 Gram products X^T X over it (timed on a slice that fits, scaled by token count);
* on a subset of samples that fits in memory: the reference procedure (mir.py / mir_util.py of
  shikiw/Modality-Integration-Rate: float32 torch, torch.median, scipy sqrtm as its accurate mode), in
  memory, against `mir analyze` on the same subset reading from disk, and their MIR values.
torch is used here only, to time the reference as published; analyze/ never imports it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

FULL = dict(layers=8, hidden=1024, samples=384, vision_tokens=576, text_tokens=384, budget="2GB",
            reference_samples=160)
SMALL = dict(layers=2, hidden=256, samples=48, vision_tokens=96, text_tokens=64, budget="600MB",
             reference_samples=24)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_measured(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run a command; wall time, CPU seconds (user + system, all its processes) and peak RSS summed
    over the process and all its children."""
    import resource

    import psutil
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    peak = 0
    done = threading.Event()

    def poll():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss": peak, "stdout": out, "stderr": err}


def read_floor(path: Path, layers: list[int]) -> tuple[float, float, int]:
    """Seconds (wall, CPU) to read and decompress the selection once with Dask threads; tokens read."""
    import dask
    from storage_schemas import open_archive
    sel = open_archive(path).select(layers=layers)
    touch = []
    for view in (sel.vision, sel.text):
        touch.append(view.data.map_blocks(lambda b: np.zeros((1, 1, 1)), chunks=(1, 1, 1), dtype=float).sum())
    start, cpu = time.perf_counter(), time.process_time()
    dask.compute(*touch, scheduler="threads")
    tokens = (sel.vision.sizes["token"] + sel.text.sizes["token"]) * len(layers)
    return time.perf_counter() - start, time.process_time() - cpu, tokens


def gram_floor(path: Path, layer: int, tokens_total: int) -> tuple[float, float, str]:
    """Bare float32 X^T X on a slice of one layer (fits in memory), scaled to tokens_total.

    The faster of two ways to use the machine is taken, so the floor is not inflated by a poor
    BLAS setting: one product on BLAS's own threads, or one single-threaded product per core at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    from storage_schemas import open_archive
    sel = open_archive(path).select(layers=[layer])
    n = min(65536, sel.vision.sizes["token"])
    x = np.asarray(sel.vision.data[0, :n].compute(), dtype=np.float32)
    cores = os.cpu_count() or 1

    def best_of(fn, repeats=3) -> float:
        fn()  # warm-up (threads, pages)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    options = {"BLAS threads": best_of(lambda: x.T @ x)}
    try:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(cores) as pool:
            both = best_of(lambda: list(pool.map(lambda _: x.T @ x, range(cores))))
        options[f"{cores} single-threaded products at once"] = both / cores
    except ImportError:
        pass
    how = min(options, key=options.get)
    cpu = math.inf
    try:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(1, user_api="blas"):
            for _ in range(2):
                t0 = time.thread_time()
                x.T @ x
                cpu = min(cpu, time.thread_time() - t0)
    except ImportError:
        pass
    scale = tokens_total / n
    return options[how] * scale, cpu * scale, options[how], how


# ------------------------------------------------------------------------------ the reference procedure
def reference_procedure(path: str, rows: int, layers: list[int]) -> dict:
    """mir.py's "MIR Eval" loop on the first `rows` samples, data in memory (float16 as extracted)."""
    import torch
    from scipy.linalg import sqrtm

    from storage_schemas import open_archive
    t0 = time.perf_counter()
    sel = open_archive(path).select(samples=slice(0, rows), layers=layers)
    vis = [np.asarray(sel.vision.data[i].compute()) for i in range(len(layers))]
    txt = [np.asarray(sel.text.data[i].compute()) for i in range(len(layers))]
    load_s = time.perf_counter() - t0

    def replace_outliers_with_median_l2(data):
        norms = torch.norm(data, p=2, dim=-1)
        median_norm = torch.median(norms)
        std_dev = torch.std(norms)
        outliers = torch.abs(norms - median_norm) > 3 * std_dev
        median_values = torch.median(data, dim=0).values
        data[outliers, :] = median_values
        return data

    def calculate_fid(tensor_A, tensor_B):
        tensor_A = tensor_A.type(torch.float32)
        tensor_B = tensor_B.type(torch.float32)
        mu_A = tensor_A.mean(dim=0)
        mu_B = tensor_B.mean(dim=0)
        tensor_A_centered = tensor_A - mu_A
        tensor_B_centered = tensor_B - mu_B
        cov_A = tensor_A_centered.T @ tensor_A_centered / (tensor_A.size(0) - 1)
        cov_B = tensor_B_centered.T @ tensor_B_centered / (tensor_B.size(0) - 1)
        cov_A_np = cov_A.cpu().numpy()
        cov_B_np = cov_B.cpu().numpy()
        covmean = sqrtm(cov_A_np.dot(cov_B_np))
        if np.iscomplexobj(covmean):
            covmean = covmean.real
        mean_diff_np = (mu_A - mu_B).cpu().numpy()
        return np.sum(mean_diff_np ** 2) + np.trace(cov_A_np) + np.trace(cov_B_np) - 2 * np.trace(covmean)

    t0, cpu0 = time.perf_counter(), time.process_time()
    fds = []
    for v16, t16 in zip(vis, txt):
        vision_features = torch.from_numpy(v16).float()
        text_features = torch.from_numpy(t16).float()
        scale_factor = 1. / text_features.norm(p=2, dim=-1).mean(0)
        vision_features = scale_factor * vision_features
        text_features = scale_factor * text_features
        vision_features = replace_outliers_with_median_l2(vision_features)
        text_features = replace_outliers_with_median_l2(text_features)
        fds.append(float(calculate_fid(vision_features, text_features)))
    compute_s, compute_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    return {"load_s": load_s, "compute_s": compute_s, "compute_cpu_s": compute_cpu_s, "mir": math.log10(sum(fds)),
            "fds": fds, "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------ memory budgets
PAPER = dict(layers=2, hidden=4096, samples=100, vision_tokens=576, text_tokens=800)
WIDE = dict(layers=1, hidden=8192, samples=6, vision_tokens=576, text_tokens=800)
BUDGETS = (None, "4GB", "2GB", "1GB")


def synth_once(root: Path, spec: dict) -> Path:
    """A synthetic float16 archive of `spec`, written once per spec under root (kept for reruns)."""
    from storage_schemas.synth import write_synthetic_archive
    work = root / "-".join(f"{k}{v}" for k, v in spec.items())
    path, marker = work / "bench.zarr", work / "bench.json"
    if not (path.exists() and marker.exists() and json.loads(marker.read_text()) == spec):
        work.mkdir(parents=True, exist_ok=True)
        print(f"writing synthetic archive {spec} ...", flush=True)
        write_synthetic_archive(path, seed=0, overwrite=True, **spec)
        marker.write_text(json.dumps(spec))
    return path


def analyze_at(path: Path, budget: str | None) -> dict:
    """`mir analyze --no-cache` at a budget: wall, peak RSS of all its processes, or the refusal."""
    cmd = [sys.executable, "-m", "pipelines.cli", "analyze", str(path), "--no-cache", "--json", "-",
           "--no-progress", *(["--memory-limit", budget] if budget else [])]
    try:
        out = run_measured(cmd)
    except SystemExit as exc:
        text = str(exc)
        if "memory budget" not in text:
            raise
        return {"refused": text.strip().splitlines()[-1]}
    doc = json.loads(out["stdout"])
    out["mir"] = doc["mir"]
    out["reads"] = [layer[m]["data_passes"] for layer in doc["layers"] for m in ("vision", "text")]
    return out


def budgets(args) -> None:
    from dask.utils import format_bytes, parse_bytes
    root = Path(args.dir)
    paper, wide = (dict(PAPER, hidden=256, samples=8), dict(WIDE, hidden=512)) if args.small else (PAPER, WIDE)
    path = Path(args.archive) if args.archive else synth_once(root, paper)
    print(f"archive {path} ({format_bytes(dir_bytes(path))} on disk); machine: {os.cpu_count()} cores", flush=True)
    print("reading it once and analysing 10 samples of one layer, untimed (every budget then reads from the page "
          "cache, and numba's kernels are compiled and cached) ...", flush=True)
    from storage_schemas import open_archive
    read_floor(path, [int(x) for x in open_archive(path).layers])
    run_measured([sys.executable, "-m", "pipelines.cli", "analyze", str(path), "--no-cache", "--json", "-",
                  "--no-progress", "--layers", "1", "--samples", "0-9"])
    rows = {}
    for budget in BUDGETS:
        print(f"mir analyze at {budget or 'the default budget'} ...", flush=True)
        rows[budget] = analyze_at(path, budget)
    base = rows[None]
    print(f"\n{'budget':>10} {'wall s':>8} {'ratio':>7} {'peak RSS':>10} {'ratio':>7} {'of budget':>9}  reads  MIR")
    for budget, r in rows.items():
        name = budget or "default"
        if "refused" in r:
            print(f"{name:>10} refused before reading: {r['refused']}")
            continue
        share = f"{r['peak_rss'] / parse_bytes(budget):8.2f}x" if budget else f"{'':9s}"
        print(f"{name:>10} {r['wall_s']:8.1f} {r['wall_s'] / base['wall_s']:6.2f}x {format_bytes(r['peak_rss']):>10} "
              f"{r['peak_rss'] / base['peak_rss']:6.2f}x {share}  {max(r['reads'])}x    {r['mir']:.6f}")
    print(f"\nhidden size {wide['hidden']} at 2GB ({wide['samples']} samples, {wide['layers']} decoder layer):", flush=True)
    wide = synth_once(root, wide)
    r = analyze_at(wide, "2GB")
    if "refused" in r:
        print(f"  refused before reading: {r['refused']}")
    else:
        print(f"  {r['wall_s']:.1f} s, peak RSS {format_bytes(r['peak_rss'])} ({r['peak_rss'] / 2e9:.2f}x the budget)")
    r = analyze_at(wide, "8GB")
    print(f"  at 8GB: " + (f"refused: {r['refused']}" if "refused" in r else
                           f"{r['wall_s']:.1f} s, peak RSS {format_bytes(r['peak_rss'])} "
                           f"({r['peak_rss'] / 8e9:.2f}x the budget)"))


def _best(kept: dict | None, new: dict) -> dict:
    """The run with the lower wall time, with the lower CPU time and peak RSS of the two."""
    if kept is None:
        return new
    best = dict(min(kept, new, key=lambda r: r["wall_s"]))
    best.update(cpu_s=min(kept["cpu_s"], new["cpu_s"]), peak_rss=min(kept["peak_rss"], new["peak_rss"]))
    return best


# ------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes: checks the script in seconds")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "mir-analyze-bench"))
    for key, value in FULL.items():
        ap.add_argument("--" + key.replace("_", "-"), default=None, type=type(value))
    ap.add_argument("--run-reference", nargs=3, metavar=("ARCHIVE", "ROWS", "LAYERS"), help=argparse.SUPPRESS)
    ap.add_argument("--paper", action="store_true", help="wall time and peak RSS at 4 budgets, the paper's shape")
    ap.add_argument("--archive", default=None, help="--paper: an existing archive of the paper's shape")
    ap.add_argument("--baseline-tree", default=None, help="another checkout: its mir analyze on the whole archive "
                    "too, right after this tree's (both against the same floor)")
    ap.add_argument("--rounds", type=int, default=2, help="with --baseline-tree: alternating rounds, best of each")
    args = ap.parse_args()
    if args.paper:
        budgets(args)
        return
    if args.run_reference:
        archive, rows, layers = args.run_reference
        print(json.dumps(reference_procedure(archive, int(rows), [int(x) for x in layers.split(",")])))
        return
    cfg = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in (SMALL if args.small else
                                                                                     FULL).items()}
    spec = {k: cfg[k] for k in ("layers", "hidden", "samples", "vision_tokens", "text_tokens")}
    work = Path(args.dir) / "-".join(str(v) for v in spec.values())  # one archive per size, kept for reruns
    work.mkdir(parents=True, exist_ok=True)
    path = work / "bench.zarr"
    marker = work / "bench.json"
    if not (path.exists() and marker.exists() and json.loads(marker.read_text()) == spec):
        from storage_schemas.synth import write_synthetic_archive
        print(f"writing synthetic archive {spec} ...", flush=True)
        t0 = time.perf_counter()
        write_synthetic_archive(path, seed=0, overwrite=True, **spec)
        marker.write_text(json.dumps(spec))
        print(f"  written in {time.perf_counter() - t0:.1f} s", flush=True)
    size = dir_bytes(path)
    layers = list(range(1, cfg["layers"] + 1))
    from dask.utils import format_bytes, parse_bytes
    budget = parse_bytes(cfg["budget"])
    mir = [sys.executable, "-m", "pipelines.cli", "analyze"]
    cache = str(work / "cache")

    print("reading the archive once, untimed (the floor and the analysis then both read from the page cache) ...",
          flush=True)
    read_floor(path, layers)
    print("measuring the one-pass floor ...", flush=True)
    read_s, read_cpu, tokens = read_floor(path, layers)
    gram_s, gram_cpu, gram_slice_s, gram_how = gram_floor(path, layers[0], tokens)
    floor, floor_cpu = read_s + gram_s, read_cpu + gram_cpu

    whole = [*mir, str(path), "--no-cache", "--memory-limit", cfg["budget"], "--json", "-", "--no-progress"]
    big, base = None, None
    for round_ in range(args.rounds if args.baseline_tree else 1):
        # with a baseline checkout, the two alternate (the machine's load then hits both alike); best of each
        print(f"running mir analyze on the whole archive ({round_ + 1}) ...", flush=True)
        big = _best(big, run_measured(whole))
        if args.baseline_tree:
            tree = Path(args.baseline_tree).resolve()
            print(f"running mir analyze from {tree} on the whole archive ({round_ + 1}) ...", flush=True)
            base = _best(base, run_measured(whole, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}))
    big_doc = json.loads(big["stdout"])

    rows = min(cfg["reference_samples"], cfg["samples"])
    shutil.rmtree(cache, ignore_errors=True)  # the subset run below must read the archive
    print(f"reference procedure and mir analyze on the first {rows} samples ...", flush=True)
    small = run_measured([*mir, str(path), "--samples", f"0:{rows}", "--cache-dir", cache, "--memory-limit",
                          cfg["budget"], "--json", "-", "--no-progress"])
    small_doc = json.loads(small["stdout"])
    accurate_doc = json.loads(run_measured([*mir, str(path), "--samples", f"0:{rows}", "--cache-dir", cache,
                                            "--sqrt", "reference-accurate", "--json", "-", "--no-progress"])["stdout"])
    ref_run = run_measured([sys.executable, __file__, "--run-reference", str(path), str(rows),
                            ",".join(map(str, layers))])
    ref = json.loads(ref_run["stdout"])

    subset_bytes = size * rows / cfg["samples"]
    print()
    print(f"machine: {os.cpu_count()} cores; archive {format_bytes(size)} on disk, {len(layers)} layers x "
          f"{cfg['hidden']} channels, {big_doc['n_samples']} samples, {big_doc['n_vision_tokens']} vision + "
          f"{big_doc['n_text_tokens']} text tokens per layer; Dask memory budget {format_bytes(budget)}")
    print(f"{'':44s} {'wall s':>8} {'ratio':>7}  {'CPU s':>8} {'ratio':>7}")
    print(f"{'mir analyze (whole archive, from disk)':44s} {big['wall_s']:8.2f} {big['wall_s'] / floor:6.2f}x  "
          f"{big['cpu_s']:8.2f} {big['cpu_s'] / floor_cpu:6.2f}x  of the floor")
    if base is not None:
        print(f"{'  the same from the baseline tree':44s} {base['wall_s']:8.2f} {base['wall_s'] / floor:6.2f}x  "
              f"{base['cpu_s']:8.2f} {base['cpu_s'] / floor_cpu:6.2f}x  of the floor; this tree / baseline: "
              f"{big['wall_s'] / base['wall_s']:.3f}x wall, {big['cpu_s'] / base['cpu_s']:.3f}x CPU "
              f"({args.baseline_tree}; best of {args.rounds} alternating rounds each)")
    print(f"{'  one-pass floor = read once + float32 Gram':44s} {floor:8.2f} {'':7s}  {floor_cpu:8.2f}")
    print(f"{'    read + decompress once (Dask threads)':44s} {read_s:8.2f} {'':7s}  {read_cpu:8.2f}")
    print(f"{'    float32 X^T X, scaled from a slice':44s} {gram_s:8.2f} {'':7s}  {gram_cpu:8.2f}   "
          f"({gram_slice_s:.3f} s per 64k tokens, {gram_how})")
    reads = [layer[m]["data_passes"] for layer in big_doc["layers"] for m in ("vision", "text")]
    print(f"{'  reads of the data per layer and modality':44s} {reads.count(1)} of {len(reads)} read once, "
          f"{len(reads) - reads.count(1)} twice or more")
    print(f"{'peak RSS of mir analyze (all processes)':44s} {format_bytes(big['peak_rss']):>8} "
          f"{big['peak_rss'] / budget:6.2f}x  of the budget")
    print(f"subset of {rows} samples ({format_bytes(subset_bytes)} of the archive):")
    print(f"{'  mir analyze (from disk, cold cache)':44s} {small['wall_s']:8.2f} "
          f"{small['wall_s'] / ref['compute_s']:6.2f}x  {small['cpu_s']:8.2f} "
          f"{small['cpu_s'] / ref['compute_cpu_s']:6.2f}x  of the reference")
    print(f"{'  reference procedure, in memory (torch)':44s} {ref['compute_s']:8.2f} {'':7s}  "
          f"{ref['compute_cpu_s']:8.2f}   (+ {ref['load_s']:.1f} s loading; torch threads {ref['torch_threads']})")
    print(f"{'  MIR: mir analyze --sqrt exact':44s} {small_doc['mir']:8.5f}")
    print(f"{'  MIR: mir analyze --sqrt reference-accurate':44s} {accurate_doc['mir']:8.5f}   (from the cache)")
    print(f"{'  MIR: reference procedure (accurate mode)':44s} {ref['mir']:8.5f}")
    print(f"MIR of the whole archive: {big_doc['mir']:.5f}")


if __name__ == "__main__":
    main()
