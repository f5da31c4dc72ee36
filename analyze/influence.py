"""The influence read: one value per sample and layer, the first-order change of the layer's FD when
that sample's weight changes (nonparametric delta method / infinitesimal jackknife).

Declared like the other reads (reads.py): `map` per chunk gives per-sample sums (SampleSums, O(1) per
sample), `combine` adds them, `finish` always runs. It needs the full-selection solution of the layer
(gradient.py), so it runs after the statistics, as one more read of the selection for the layers whose
influence values are not cached. Held at their full-selection values, as stated in the output: each
modality's outlier rule (norm median and std: the rows replaced) and its column medians (their
value). Everything else is differentiated: the text scale, both means, both covariances, the exact trace.

With weights w (one per sample, 1 at the full selection), FD(w) ~ FD + sum_i (w_i - 1) D_i, where
D_i = 2 a^2 sum_X dir_X . e_Xi / n_X                         (means; e = sum of the sample's centred rows)
    + sum_X (a^2 sq_Xi - quad_Xi - n_Xi (tr C_X - f)) / (n_X - 1)   (covariances and the trace)
    + 2 FD (n_Ti - a u_i) / n_T                               (the scale a = n_T / sum of text norms),
sq = sum of squared centred norms and quad = sum of ||K^T y||^2 over the sample's rows (replaced rows
enter as copies of the median).
"""
from __future__ import annotations

from dataclasses import dataclass

import dask
import numpy as np
from scipy.linalg import blas

from .engine import MODALITIES, tree_combine
from .gradient import LayerGradient, ModalityGradient
from .kernels import as_rows, token_norms
from .memory import return_freed_memory
from .runner import Runner
from .stats import LayerStats, NormSummary

INFLUENCE_VERSION = 1
FIELDS = ("tokens", "outliers", "norm_sum", "lin", "sq", "quad")
STEP_ROWS = 4096


@dataclass(frozen=True)
class SampleSums:
    """Per-sample sums over the rows of some chunks: (len(FIELDS), N) float64, and (N, d) the sums of
    the centred non-outlier rows (O(d) per sample: what makes the mean term exact per replicate)."""

    values: np.ndarray
    vectors: np.ndarray

    def combine(self, other: "SampleSums") -> "SampleSums":
        return SampleSums(self.values + other.values, self.vectors + other.vectors)


@dataclass(frozen=True)
class LayerInfluence:
    """What a layer's replicates need, per sample i (N,) unless said: `d` the first-order FD change;
    the mean term's exact parts: counts n_v, n_t, text norm sums u, lin_v / lin_t (direction . centred
    sums), gram (3, N, N) of the centred sums (vision.vision, vision.text, text.text), and the layer's
    mean term, scale and linear mean-term share `d_mean` (raw units except mean_term and d)."""

    d: np.ndarray
    d_mean: np.ndarray
    n_v: np.ndarray
    n_t: np.ndarray
    u: np.ndarray
    lin_v: np.ndarray
    lin_t: np.ndarray
    gram: np.ndarray
    mean_term: float
    scale: float

    ARRAYS = ("d", "d_mean", "n_v", "n_t", "u", "lin_v", "lin_t", "gram")

    def to_arrays(self) -> dict:
        return {**{k: getattr(self, k) for k in self.ARRAYS}, "scalars": np.array([self.mean_term, self.scale])}

    @classmethod
    def from_arrays(cls, arrays: dict) -> "LayerInfluence":
        mean_term, scale = (float(x) for x in arrays["scalars"])
        return cls(*(np.asarray(arrays[k], np.float64) for k in cls.ARRAYS), mean_term, scale)


@dataclass(frozen=True)
class SampleChunk:
    """A chunk's rows: the selection index of each row's sample (0..N-1)."""

    sample: np.ndarray  # (rows,) int64
    samples: int  # N


@dataclass(frozen=True)
class InfluenceParams:
    gradient: ModalityGradient  # its `tri` is in the products' precision (gradient.products_dtype)
    norms: NormSummary  # the held outlier rule

    @property
    def permuted(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, direction) in the factor's channel order and the products' precision, computed once."""
        cached = self.__dict__.get("_permuted")
        if cached is None:
            g, work = self.gradient, self.gradient.tri.dtype
            cached = (g.mean[g.perm].astype(work), g.direction[g.perm].astype(work))
            object.__setattr__(self, "_permuted", cached)
        return cached


def map_chunk(x, chunk: SampleChunk, params: InfluenceParams) -> SampleSums:
    """Per-sample counts, outliers, norm sums and the three sums over non-outlier rows. The rows are
    gathered once into the factor's channel order (everything per row is order-free; the per-sample
    vectors are put back at the end); products in the factor's precision, per-sample sums in float64."""
    x = as_rows(x)
    g = params.gradient
    norms = token_norms(x)
    out = params.norms.outliers(norms)
    keep = ~out
    lin, sq, quad = (np.zeros(len(x)) for _ in range(3))
    n, s = chunk.samples, chunk.sample
    vectors = np.zeros((n, x.shape[1]))
    tri = g.tri
    trmm = blas.strmm if tri.dtype == np.float32 else blas.dtrmm
    mean, direction = params.permuted
    ones = np.ones(min(STEP_ROWS, len(x)), tri.dtype)
    for start in range(0, len(x), STEP_ROWS):
        rows = slice(start, start + STEP_ROWS)
        y = np.subtract(np.take(x[rows], g.perm, axis=1), mean, dtype=tri.dtype)  # (rows, d) C order
        y[out[rows]] = 0
        lin[rows] = y @ direction
        sq[rows] = np.einsum("ij,ij->i", y, y, dtype=np.float64)
        for i, a, b in _runs(s[rows]):  # a sample's rows are contiguous: few runs per step
            vectors[i] += ones[:b - a] @ y[a:b]
        p = trmm(1.0, tri, y.T, side=0, lower=1, trans_a=1, overwrite_b=1)  # y.T: Fortran, no copy
        quad[rows] = np.einsum("ji,ji->i", p, p, dtype=np.float64)
    back = np.empty_like(vectors)
    back[:, g.perm] = vectors
    values = np.stack([np.bincount(s, minlength=n).astype(np.float64), np.bincount(s, weights=out, minlength=n),
                       np.bincount(s, weights=norms, minlength=n)]
                      + [np.bincount(s[keep], weights=v[keep], minlength=n) for v in (lin, sq, quad)])
    return SampleSums(values, back)


def _runs(sample: np.ndarray) -> list[tuple[int, int, int]]:
    """(sample, first row, end row) of each run of equal values."""
    if len(sample) == 0:
        return []
    edges = np.concatenate([[0], np.flatnonzero(np.diff(sample)) + 1, [len(sample)]])
    return [(int(sample[a]), int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


@dataclass(frozen=True)
class InfluenceRead:
    """Declared like reads.py: map per chunk, combine, finish (here the identity: the layer's formula
    needs both modalities, see layer_influence)."""

    label = "per-sample influence"

    def map(self, x, chunk: SampleChunk, params: InfluenceParams) -> SampleSums:
        return_freed_memory()  # in a dask.distributed worker's process too
        return map_chunk(x, chunk, params)

    def finish(self, partial: SampleSums, facts=None) -> SampleSums:
        return partial


def layer_influence(grad: LayerGradient, sums: dict[str, SampleSums]) -> LayerInfluence:
    """D_i of one layer (N,) and the mean term's exact parts, from both modalities' per-sample sums."""
    a, fd, f = grad.scale, grad.fd, grad.trace_sqrt
    total = np.zeros(sums["vision"].values.shape[1])
    lins, centred = {}, {}
    for m in MODALITIES:
        t = grad.totals[m]
        n_i, o_i, _, lin, sq, quad = sums[m].values
        lins[m] = lin + o_i * t["median_lin"]
        centred[m] = sums[m].vectors + np.outer(o_i, grad.modality(m).median - grad.modality(m).mean)
        sq = sq + o_i * t["median_sq"]
        quad = quad + o_i * t["median_quad"]
        total += 2 * a * a * lins[m] / t["n"]
        total += (a * a * sq - quad - n_i * (t["trace_cov"] - f)) / (t["n"] - 1)
    n_t, _, u, *_ = sums["text"].values
    n_total = grad.totals["text"]["n"]
    total += 2 * fd * (n_t - a * u) / n_total
    mean_term = grad.mean_term
    d_mean = 2 * a * a * (lins["vision"] / grad.totals["vision"]["n"] + lins["text"] / n_total) \
        + 2 * mean_term * (n_t - a * u) / n_total
    cv, ct = centred["vision"], centred["text"]
    gram = np.stack([cv @ cv.T, cv @ ct.T, ct @ ct.T])
    return LayerInfluence(total, d_mean, sums["vision"].values[0], n_t, u, lins["vision"], lins["text"], gram,
                          mean_term, a)


def compute_influence(selection, grads: dict[int, LayerGradient], stats: dict[int, LayerStats],
                      runner: Runner | None = None) -> dict[int, LayerInfluence]:
    """Influence values (N,) per layer: one read of the given layers of the selection, both modalities."""
    runner = runner or Runner()
    read = InfluenceRead()
    index = np.asarray(selection.sample_index, np.int64)
    position = np.full(int(index.max()) + 1, -1, np.int64)
    position[index] = np.arange(len(index))
    n = len(index)
    graph, keys = [], []
    for m in MODALITIES:
        view = getattr(selection, m)
        sample = position[np.asarray(view["sample"].values, np.int64)]
        for layer, grad in grads.items():
            arr = view.data[int(np.flatnonzero(selection.layers == layer)[0])]
            held = stats[layer].modality(m).norms
            params = dask.delayed(InfluenceParams(grad.modality(m), held), pure=True)
            edges = np.concatenate([[0], np.cumsum(arr.chunks[0])]).astype(int)
            parts = [dask.delayed(read.map, pure=True)(x, SampleChunk(sample[a:b], n), params)
                     for x, a, b in zip(arr.to_delayed().ravel(), edges[:-1], edges[1:])]
            graph.append(dask.delayed(read.finish, pure=True)(tree_combine(parts)))
            keys.append((layer, m))
    done = dict(zip(keys, runner.compute(graph, f"influence read: {len(grads)} layer(s)")))
    return {layer: layer_influence(grad, {m: done[(layer, m)] for m in MODALITIES}) for layer, grad in grads.items()}
