"""How often the 95% bootstrap interval of `mir analyze --bootstrap` covers the true MIR.

    python bench/coverage_study.py                 # 200 data sets per N = 20, 50, 100 (about a minute)
    python bench/coverage_study.py --sets 20       # a quick check of the script itself

One synthetic population (storage_schemas.synth's model: fixed layer means and covariances, every sample
a fresh draw; 2 decoder layers, d = 32, 24 vision and ~24 text tokens per sample). Its MIR is taken from
a very large draw (--truth samples). Then disjoint data sets of N samples are drawn and each is analysed
in memory by the analysis's own finish code: the in-memory read's statistics (analyze/inmemory.py), the
FD gradient (gradient.py), the influence map and finish (influence.py) and the bootstrap (bootstrap.py),
the same functions `mir analyze --bootstrap` runs after reading an archive (only the storage read is
skipped). Printed per N: coverage of the percentile interval and of the bias-shifted one
([lo - 2 b, hi - 2 b], b = mean of replicates - MIR), the mean bias of MIR and the mean interval width.
Small d keeps the run short; the width of the model is not what coverage depends on (N is).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from analyze.bootstrap import log10_or_nan, replicate_fd_totals, sample_weights
from analyze.gradient import layer_gradient
from analyze.influence import InfluenceParams, SampleChunk, layer_influence, map_chunk
from analyze.inmemory import Rows, finish_rows
from analyze.scan import UnitFacts
from analyze.stats import LayerStats
from storage_schemas.synth import synthetic_records

SHAPE = dict(layers=2, hidden=32, vision_tokens=24, text_tokens=24)
SEED = 11


def draw(start: int, count: int) -> list:
    """Samples start .. start + count - 1 of the population (each a deterministic fresh draw)."""
    return list(synthetic_records(samples=start + count, start=start, seed=SEED, dtype="float32", **SHAPE))


def layer_stats(records: list, layer: int) -> tuple[LayerStats, dict]:
    """Statistics of one layer of some samples through the in-memory read, and the rows per modality."""
    parts, rows = {}, {}
    for m in ("vision", "text"):
        if m == "vision":
            xs = [r.vision[layer] for r in records]
        else:  # the reference text rule: every text position after the image
            xs = [r.text_hidden[layer][r.text_position > r.vision_position[-1]] for r in records]
        x = np.concatenate(xs).astype(np.float32)
        sample = np.repeat(np.arange(len(xs)), [len(v) for v in xs])
        facts = UnitFacts(layer, m, np.dtype(np.float32), 4, np.zeros(len(x), np.int64), sample, 1)
        parts[m] = finish_rows(Rows(x), facts).stats
        rows[m] = (x, sample)
    return LayerStats(layer, parts["vision"], parts["text"]), rows


def analyse(records: list, replicates: int, seed: int) -> tuple[float, np.ndarray]:
    """MIR and its bootstrap replicates, as `mir analyze --bootstrap` computes them."""
    fd_total, layers = 0.0, []
    for layer in range(1, SHAPE["layers"] + 1):
        stats, rows = layer_stats(records, layer)
        grad = layer_gradient(stats)
        sums = {m: map_chunk(x, SampleChunk(s, len(records)), InfluenceParams(grad.modality(m),
                                                                               stats.modality(m).norms))
                for m, (x, s) in rows.items()}
        layers.append(layer_influence(grad, sums))
        fd_total += grad.fd
    influence = np.sum([li.d for li in layers], axis=0)
    w = sample_weights(replicates, len(records), seed)
    return math.log10(fd_total), log10_or_nan(replicate_fd_totals(fd_total, influence, w, layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=200)
    parser.add_argument("--truth", type=int, default=4000, help="samples of the large draw")
    parser.add_argument("--replicates", type=int, default=2000)
    args = parser.parse_args()
    start = time.perf_counter()
    truth, _ = analyse(draw(0, args.truth), 2, 0)
    print(f"population MIR (from {args.truth} samples): {truth:.5f}; shape {SHAPE}")
    print(f"{'N':>5} {'sets':>5} {'coverage':>9} {'bias-shifted':>13} {'mean bias':>10} {'mean width':>11}")
    offset = args.truth
    for n in (20, 50, 100):
        hits = shifted_hits = 0
        biases, widths = [], []
        for j in range(args.sets):
            mir, reps = analyse(draw(offset, n), args.replicates, j)
            offset += n
            lo, hi = np.nanquantile(reps, [0.025, 0.975])
            b = float(np.nanmean(reps)) - mir
            hits += lo <= truth <= hi
            shifted_hits += lo - 2 * b <= truth <= hi - 2 * b
            biases.append(mir - truth)
            widths.append(hi - lo)
        print(f"{n:>5} {args.sets:>5} {hits / args.sets:>9.3f} {shifted_hits / args.sets:>13.3f} "
              f"{np.mean(biases):>+10.4f} {np.mean(widths):>11.4f}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
