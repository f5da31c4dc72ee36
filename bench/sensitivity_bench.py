"""What `mir analyze --sensitivity` costs over a plain analysis, measured side by side in one run.

    python bench/sensitivity_bench.py                                     # d = 1024 (synthesised) and d = 4096
    python bench/sensitivity_bench.py --archive paper.zarr  # d = 4096 from an existing archive
    python bench/sensitivity_bench.py --small                             # a quick check of the script

Shapes: the paper's per-sample token counts (100 samples, 576 vision + ~800 text tokens, float16),
2 decoder layers; d = 1024 and the paper's width d = 4096 (fewer layers, never narrower). Per shape:
* `mir analyze --no-cache` and `mir analyze --no-cache --sensitivity` (cold: the statistics are read);
* the same two from a warm cache (no data read): what is left is the finish, so their difference is the
  cost of the extra trace solves (FD at 3 more subset sizes, FD under 2 more outlier rules) per layer.
Wall time, CPU seconds and peak RSS of each run (psutil, all processes), and the MIR values.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analyze_bench import run_measured  # noqa: E402

SHAPES = {"d1024": dict(hidden=1024, samples=100, vision_tokens=576, text_tokens=800),
          "d4096": dict(hidden=4096, samples=100, vision_tokens=576, text_tokens=800)}
SMALL = {"small": dict(hidden=128, samples=24, vision_tokens=48, text_tokens=40)}


def mir_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *map(str, args)]


def synthesise(path: Path, shape: dict) -> Path:
    if not path.exists():
        run_measured(mir_cmd("synth", "--out", path, "--layers", 2, "--hidden", shape["hidden"], "--samples",
                             shape["samples"], "--vision-tokens", shape["vision_tokens"], "--text-tokens",
                             shape["text_tokens"], "--dtype", "float16"))
    return path


def measure(archive: Path, work: Path) -> list[dict]:
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for label, extra in (("plain, cold", ["--no-cache"]),
                         ("--sensitivity, cold", ["--cache-dir", cache, "--sensitivity"]),
                         ("plain, warm", ["--cache-dir", cache]),
                         ("--sensitivity, warm", ["--cache-dir", cache, "--sensitivity"])):
        if label == "plain, warm":  # a plain cache entry next to the sensitivity one
            run_measured(mir_cmd("analyze", archive, "--cache-dir", cache, "--json", work / "w.json"))
        r = run_measured(mir_cmd("analyze", archive, *extra, "--json", work / "r.json"))
        doc = json.loads((work / "r.json").read_text())
        rows.append({"run": label, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "peak_gb": r["peak_rss"] / 1e9,
                     "mir": doc["mir"], "sensitivity": doc["sensitivity"], "layers": len(doc["layers"]),
                     "reused": len(doc["cache"]["layers_reused"] or [])})
    shutil.rmtree(cache, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--archive", default=None, help="an existing d = 4096 archive (e.g. one made by mir synth, README: Benchmarks)")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "mir-sensitivity-bench"))
    args = ap.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    shapes = SMALL if args.small else SHAPES
    for name, shape in shapes.items():
        archive = Path(args.archive) if name == "d4096" and args.archive else synthesise(work / f"{name}.zarr", shape)
        rows = measure(archive, work)
        print(f"\n{name}: {archive} (hidden {shape['hidden']}, {shape['samples']} samples)")
        print(f"{'run':<22} {'wall s':>8} {'CPU s':>8} {'peak GB':>8}  MIR       MIR-inf / no repl / IQR")
        for r in rows:
            s = r["sensitivity"]
            tail = "" if s is None else " / ".join(f"{s[k]:.5f}" for k in ("mir_infinity", "mir_no_replacement",
                                                                             "mir_iqr_rule"))
            print(f"{r['run']:<22} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {r['peak_gb']:>8.2f}  {r['mir']:.6f}  {tail}")
        warm = {r["run"]: r for r in rows}
        extra = warm["--sensitivity, warm"]["wall_s"] - warm["plain, warm"]["wall_s"]
        cold = warm["--sensitivity, cold"]["wall_s"] / warm["plain, cold"]["wall_s"]
        print(f"extra finish (5 trace solves per layer): {extra:.1f} s for {rows[0]['layers']} layers "
              f"({extra / rows[0]['layers']:.1f} s per layer); cold --sensitivity / plain: {cold:.2f}x wall")


if __name__ == "__main__":
    main()
