"""How often the 95% bootstrap interval of `mir analyze --bootstrap` covers the true MIR.

    python bench/coverage_study.py                 # 200 data sets per N = 20, 50, 100 (about a minute)
    python bench/coverage_study.py --sets 20       # a quick check of the script itself
    python bench/coverage_study.py --influence 4   # the covariance term sketched at rank 4 of 32

One synthetic population (storage_schemas.synth's model: fixed layer means and covariances, every sample
a fresh draw; 2 decoder layers, d = 32, 24 vision and ~24 text tokens per sample). Its MIR is taken as the mean
of two disjoint very large draws (--truth samples each; their difference shows the truth's own noise). Then disjoint data sets of N samples are drawn and each is analysed
in memory by the analysis's own finish code: the in-memory read's statistics (analyze/inmemory.py), the
FD gradient (gradient.py), the influence map and finish (influence.py) and the bootstrap (bootstrap.py),
the same functions `mir analyze --bootstrap` runs after reading an archive (only the storage read is
skipped). Printed per N: coverage of the percentile interval (and on which side it misses) and of the BCa interval
(bootstrap.bca_interval, the JSON's bca_low / bca_high), the coverage of an oracle interval (MIR +- 1.96 x
the sd of MIR across data sets), the mean bias, the sd across data sets against the replicates' mean sd,
the correlation of each data set's error with its replicates' sd, and BCa's mean acceleration.
Small d keeps the run short; the width of the model is not what coverage depends on (N is).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from analyze.bootstrap import bca_interval, interval, log10_or_nan, replicate_fd_totals, sample_weights
from analyze.gradient import InfluenceMethod, layer_gradient
from analyze.influence import InfluenceParams, SampleChunk, layer_influence, map_chunk
from analyze.inmemory import Rows, finish_rows
from analyze.scan import UnitFacts
from analyze.stats import LayerStats
from storage_schemas.synth import synthetic_records

SHAPE = dict(layers=2, hidden=32, vision_tokens=24, text_tokens=24)
SEED = 11
TRUTH_OFFSET = 10**6  # the two large draws: samples from 10^6 and 2 x 10^6 on, disjoint from the data sets


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


def analyse(records: list, replicates: int, seed: int,
            method: InfluenceMethod = InfluenceMethod()) -> tuple[float, np.ndarray, np.ndarray]:
    """MIR, its bootstrap replicates and the per-sample influence values (summed over layers), as
    `mir analyze --bootstrap` computes them."""
    fd_total, layers = 0.0, []
    for layer in range(1, SHAPE["layers"] + 1):
        stats, rows = layer_stats(records, layer)
        grad = layer_gradient(stats, method=method)
        sums = {m: map_chunk(x, SampleChunk(s, len(records)), InfluenceParams(grad.modality(m),
                                                                               stats.modality(m).norms))
                for m, (x, s) in rows.items()}
        layers.append(layer_influence(grad, sums))
        fd_total += grad.fd
    influence = np.sum([li.d for li in layers], axis=0)
    w = sample_weights(replicates, len(records), seed)
    return math.log10(fd_total), log10_or_nan(replicate_fd_totals(fd_total, influence, w, layers)), influence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=200)
    parser.add_argument("--truth", type=int, default=4000, help="samples of each of the two large draws")
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--influence", default="auto", help="the covariance term's form: auto (here d = 32: the "
                        "complete sketch, exact), exact, or a sketch rank below d")
    args = parser.parse_args()
    start = time.perf_counter()
    method = InfluenceMethod.parse(args.influence)
    draws = [analyse(draw(k * TRUTH_OFFSET, args.truth), 2, 0)[0] for k in (1, 2)]
    truth = float(np.mean(draws))
    print(f"population MIR {truth:.5f}: mean of two disjoint draws of {args.truth} samples ({draws[0]:.5f}, "
          f"{draws[1]:.5f}); shape {SHAPE}")
    print(f"{'N':>5} {'sets':>5} {'percentile':>10} {'(below, above)':>15} {'BCa':>6} {'oracle':>7} {'bias':>8} "
          f"{'sd across':>9} {'mean sd':>8} {'corr(err, sd)':>13} {'accel':>7}")
    offset = 0
    for n in (20, 50, 100):
        rows = []
        for j in range(args.sets):
            mir, reps, influence = analyse(draw(offset, n), args.replicates, j, method)
            offset += n
            lo, hi, sd = interval(reps)
            b_lo, b_hi, _, accel = bca_interval(reps, mir, influence)
            rows.append((mir, lo, hi, sd, b_lo, b_hi, accel))
        mir, lo, hi, sd, b_lo, b_hi, accel = np.array(rows).T
        err = mir - truth
        spread = float(np.std(mir, ddof=1))
        print(f"{n:>5} {args.sets:>5} {np.mean((lo <= truth) & (truth <= hi)):>10.3f} "
              f"{f'({np.mean(truth < lo):.3f}, {np.mean(truth > hi):.3f})':>15} "
              f"{np.mean((b_lo <= truth) & (truth <= b_hi)):>6.3f} {np.mean(np.abs(err) <= 1.96 * spread):>7.3f} "
              f"{np.mean(err):>+8.4f} {spread:>9.4f} {np.mean(sd):>8.4f} {np.corrcoef(err, sd)[0, 1]:>+13.2f} "
              f"{np.mean(accel):>+7.3f}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s) percentile / BCa: how often each 95% interval covers the population "
          "MIR; (below, above): how often it lies below / above the interval; oracle: MIR +- 1.96 x the sd across "
          "data sets; corr(err, sd): of MIR - truth with the replicates' sd; accel: BCa's acceleration (mean)")


if __name__ == "__main__":
    main()
