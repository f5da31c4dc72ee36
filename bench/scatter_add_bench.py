"""np.add.at versus np.bincount for the two histogram patterns of the numpy kernels, side by side.

    python bench/scatter_add_bench.py [--hidden 4096] [--rows 8192] [--repeats 5]

1. radix.byte_histogram: per step of SUB_ROWS rows, count the top byte of every value into one
   persistent (d * 256) table: `np.add.at(out, idx, 1)` versus `out += np.bincount(idx, minlength)`.
2. window counts: indices gathered over a whole block, counted once: one `np.bincount` versus
   `np.add.at` per step. (Both patterns also run with the other function, so the choice is measured.)

Data: float16 normal values at the paper's width (d = 4096, one shard's worth of rows by default).
Prints the best of `--repeats` runs, in ns per counted element, and the ratios. This is the
fallback path (MIR_KERNELS=numpy or no numba); the compiled kernels do not use either function.
"""
from __future__ import annotations

import argparse
import timeit

import numpy as np

from analyze.radix import SUB_ROWS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    d, n = args.hidden, args.rows
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float16)
    coloff = np.arange(d, dtype=np.uint32) * 256
    steps = [np.add(x[s:s + SUB_ROWS].view(np.uint8)[:, 1::2], coloff, dtype=np.uint32).ravel()
             for s in range(0, n, SUB_ROWS)]
    whole = np.concatenate(steps)

    def add_at_steps():
        out = np.zeros(d * 256, np.int64)
        for idx in steps:
            np.add.at(out, idx, 1)
        return out

    def bincount_steps():
        out = np.zeros(d * 256, np.int64)
        for idx in steps:
            out += np.bincount(idx, minlength=d * 256)
        return out

    def bincount_once():
        return np.bincount(whole, minlength=d * 256)

    assert np.array_equal(add_at_steps(), bincount_steps()) and np.array_equal(add_at_steps(), bincount_once())
    per = 1e9 / whole.size
    t = {name: min(timeit.repeat(fn, number=1, repeat=args.repeats)) * per for name, fn in
         (("np.add.at per step", add_at_steps), ("np.bincount per step", bincount_steps),
          ("np.bincount once per block", bincount_once))}
    print(f"d = {d}, {n} rows ({whole.size} values), steps of {SUB_ROWS} rows, numpy {np.__version__}")
    for name, ns in t.items():
        print(f"  {name:<28} {ns:6.2f} ns per value")
    add_at = t["np.add.at per step"]
    print(f"  ratio add.at / bincount, per step:        {add_at / t['np.bincount per step']:.2f}")
    print(f"  ratio add.at per step / bincount once:    {add_at / t['np.bincount once per block']:.2f}")


if __name__ == "__main__":
    main()
