"""What `mir analyze --bootstrap B` costs at the paper's width, measured side by side in one run.

    python bench/bootstrap_bench.py          # d = 4096, LLaVA-1.5-7B-like shape
    python bench/bootstrap_bench.py --small                         # a quick check of the script itself
    python bench/bootstrap_bench.py --hidden 256 --samples 800      # the same token counts at width 256
    python bench/bootstrap_bench.py --archive paper.zarr   # an existing one

On one synthetic archive shaped like LLaVA-1.5-7B (hidden size 4096, 100 samples, 576 vision + ~800
text tokens per sample; 2 of the decoder layers: scaled down in layer count, never in width), after an
untimed warm-up (the archive read once, so every run reads it from the page cache, and numba's kernels
compiled), `mir analyze` processes, each timed (wall, CPU) with its peak RSS (psutil, all its processes):
1. without bootstrap, cold cache;
2. `--bootstrap 1000`, cold cache (the statistics, then the influence read; the default sketched form);
3. `--bootstrap 1000 --seed 1`, the cache of run 2: must read no data;
4. `--bootstrap 1000 --influence exact`, on run 1's cached statistics (unless --no-exact): the exact
   per-token form, for the sketch's accuracy at this width (sd, interval ends) and its cost.
The archive is deleted afterwards (an --archive given is only read: caches go to a temporary directory).
Target (issue 12): run 2 at most 1.3x run 1.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analyze_bench import read_floor, run_measured  # noqa: E402

FULL = dict(layers=2, hidden=4096, samples=100, vision_tokens=576, text_tokens=800)
SMALL = dict(layers=2, hidden=256, samples=40, vision_tokens=96, text_tokens=64)
REPLICATES = 1000


def mir(*args) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *map(str, args)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--memory-limit", default=None, help="passed to every mir analyze (e.g. 2GB)")
    parser.add_argument("--archive", default=None, help="an existing archive of the paper's shape, instead of synthesising")
    parser.add_argument("--no-exact", action="store_true", help="skip run 4 (the exact influence form)")
    parser.add_argument("--hidden", type=int, default=None, help="synthesise at this width instead (e.g. 256)")
    parser.add_argument("--samples", type=int, default=None, help="synthesise this many samples instead")
    args = parser.parse_args()
    shape = dict(SMALL if args.small else FULL)
    shape.update({k: v for k, v in (("hidden", args.hidden), ("samples", args.samples)) if v is not None})
    work = Path(tempfile.mkdtemp(prefix="mir-bootstrap-bench-"))
    try:
        if args.archive:
            archive = Path(args.archive)
            print(f"archive: {archive} (given)", flush=True)
        else:
            archive = work / "a.zarr"
            synth = run_measured(mir("synth", "--out", archive, "--dtype", "float16", "--seed", 0,
                                     *[x for k, v in shape.items() for x in (f"--{k.replace('_', '-')}", v)]))
            print(f"archive: {shape}, float16; written in {synth['wall_s']:.0f} s", flush=True)
        budget = ["--memory-limit", args.memory_limit] if args.memory_limit else []
        print("reading it once and analysing 10 samples of one layer with the bootstrap, untimed ...", flush=True)
        read_floor(archive, [1, 2])
        run_measured(mir("analyze", archive, "--no-cache", "--no-progress", "--layers", 1, "--samples", "0-9",
                         "--bootstrap", 10, "--json", "-"))
        runs = {}
        plan = [("no bootstrap", ["--cache-dir", work / "c0"]),
                (f"--bootstrap {REPLICATES}", ["--cache-dir", work / "c1", "--bootstrap", REPLICATES]),
                (f"--bootstrap {REPLICATES} --seed 1 (cached)",
                 ["--cache-dir", work / "c1", "--bootstrap", REPLICATES, "--seed", 1])]
        if not args.no_exact:
            plan.append((f"--bootstrap {REPLICATES} --influence exact (run 1's statistics)",
                         ["--cache-dir", work / "c0", "--bootstrap", REPLICATES, "--influence", "exact"]))
        for name, extra in plan:
            out = work / "r.json"
            runs[name] = run_measured(mir("analyze", archive, "--no-progress", *budget, *extra, "--json", out))
            runs[name]["json"] = json.loads(out.read_text())
            print(f"  {name:<58} wall {runs[name]['wall_s']:7.1f} s   CPU {runs[name]['cpu_s']:7.1f} s   "
                  f"peak RSS {runs[name]['peak_rss'] / 1e9:5.2f} GB", flush=True)
        base, boot, again, *exact = runs.values()
        b, b2 = boot["json"]["bootstrap"], again["json"]["bootstrap"]
        layers = again["json"]["settings"]["layers"]
        print(f"\nMIR {boot['json']['mir']:.5f}; 95% CI [{b['ci_low']:.5f}, {b['ci_high']:.5f}] (seed 0), "
              f"[{b2['ci_low']:.5f}, {b2['ci_high']:.5f}] (seed 1); sd {b['std']:.4g} ({b['units']} samples)")
        print(f"influence form: {b['influence']}; least share of a token's covariance term kept: "
              f"{b['influence_captured_min']:.6f}")
        print(f"bootstrap / no bootstrap: wall {boot['wall_s'] / base['wall_s']:.3f}x, CPU "
              f"{boot['cpu_s'] / base['cpu_s']:.3f}x, peak RSS {boot['peak_rss'] / base['peak_rss']:.2f}x "
              "(target <= 1.3x)")
        print(f"rerun with another seed: wall {again['wall_s']:.1f} s; layers from cache "
              f"{again['json']['cache']['layers_reused']} of {layers} (reads no data: "
              f"{again['json']['cache']['layers_reused'] == layers})")
        if exact:
            e = exact[0]["json"]["bootstrap"]
            width = e["ci_high"] - e["ci_low"]
            print(f"exact form: sd {e['std']:.4g}, CI [{e['ci_low']:.5f}, {e['ci_high']:.5f}], delta sd "
                  f"{e['delta_std']:.4g}; sketch / exact: sd {b['std'] / e['std']:.5f}, delta sd "
                  f"{b['delta_std'] / e['delta_std']:.5f}, width {(b['ci_high'] - b['ci_low']) / width:.5f}, ends "
                  f"{(b['ci_low'] - e['ci_low']) / width:+.5f} / {(b['ci_high'] - e['ci_high']) / width:+.5f} widths "
                  "(same seed)")
            print(f"the exact form's bootstrap on cached statistics: wall {exact[0]['wall_s']:.1f} s (the sketch's "
                  f"bootstrap beyond the analysis: {boot['wall_s'] - base['wall_s']:.1f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
