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
    + sum_X (cov_Xi - n_Xi cov_mean_X) / (n_X - 1)            (covariances and the trace)
    + 2 FD (n_Ti - a u_i) / n_T                               (the scale a = n_T / sum of text norms),
cov = the sum over the sample's rows (normalised, centred: y) of y^T Gamma y, Gamma = I - K K^T, and
cov_mean its value per row at the full selection (replaced rows enter as copies of the median). Exact
(gradient.TriangularForm): ||y||^2 - ||K^T y||^2, cov_mean = tr C - f. Sketched (gradient.SketchForm, the
default): its rank-r part sum_l lam_l (w_l . y)^2, cov_mean = sum_l lam_l, the rest held at its mean (so it
cancels); every CHECK_EVERY-th row also gets the exact term, and the output reports the share of its
variance the sketch keeps (`captured_share`).
"""
from __future__ import annotations

from dataclasses import dataclass

import dask
import numpy as np
from scipy.linalg import blas

from .engine import MODALITIES, ChunkStash, LazyChunk, tree_combine
from .gradient import LayerGradient, ModalityGradient, TriangularForm
from .fused import centred_rows
from .kernels import as_rows
from .memory import return_freed_memory
from .runner import Runner
from .stats import LayerStats, NormSummary

INFLUENCE_VERSION = 2  # 2: the per-token covariance term by InfluenceMethod (exact or sketch), with its check
FIELDS = ("tokens", "outliers", "norm_sum", "lin", "cov", "check_n", "check_e", "check_e2", "check_r", "check_r2")
STEP_ROWS = 4096
CHECK_EVERY = 64  # the sketch's check: the exact covariance term on every 64th row (1/32 of a Gram product)


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
    sums), gram (3, N, N) of the centred sums (vision.vision, vision.text, text.text), what the sketch of
    the covariance term keeps per modality (`captured`, 1 when exact), and the layer's
    mean term, scale and linear mean-term share `d_mean` (raw units except mean_term and d)."""

    d: np.ndarray
    d_mean: np.ndarray
    n_v: np.ndarray
    n_t: np.ndarray
    u: np.ndarray
    lin_v: np.ndarray
    lin_t: np.ndarray
    gram: np.ndarray
    captured: np.ndarray  # (2,) vision, text: influence.captured_share of the per-token covariance term
    mean_term: float
    scale: float

    ARRAYS = ("d", "d_mean", "n_v", "n_t", "u", "lin_v", "lin_t", "gram", "captured")

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
    first: int = 0  # the modality's token index of the chunk's first row (the check rows: index % CHECK_EVERY == 0)


@dataclass(frozen=True)
class InfluenceParams:
    gradient: ModalityGradient  # its form is in the products' precision (gradient.products_dtype)
    norms: NormSummary  # the held outlier rule

    @property
    def prepared(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, direction) in the form's channel order and the products' precision, computed once."""
        cached = self.__dict__.get("_prepared")
        if cached is None:
            form = self.gradient.form
            cached = (self.gradient.mean[form.order].astype(form.dtype),
                      self.gradient.direction[form.order].astype(form.dtype))
            object.__setattr__(self, "_prepared", cached)
        return cached


def map_chunk(x, chunk: SampleChunk, params: InfluenceParams) -> SampleSums:
    """Per-sample counts, outliers, norm sums and the sums over non-outlier rows: the mean direction term,
    the covariance term (gradient.TriangularForm or SketchForm) and, for a sketch, its check on every
    CHECK_EVERY-th row (the exact term e and the residual r = e - sketch: sum, sum of squares). The rows are
    centred once in the form's channel order (everything per row is order-free; the per-sample vectors are put
    back at the end); products in the form's precision, per-sample sums in float64."""
    x = as_rows(x)
    g = params.gradient
    norms = np.empty(len(x))
    out = np.zeros(len(x), bool)
    per_row = np.zeros((len(FIELDS) - 3, len(x)))  # FIELDS[3:] per row
    n, s = chunk.samples, chunk.sample
    vectors = np.zeros((n, x.shape[1]))
    work = g.form.dtype
    mean, direction = params.prepared
    ones = np.ones(min(STEP_ROWS, len(x)), work)
    for start in range(0, len(x), STEP_ROWS):
        rows = slice(start, start + STEP_ROWS)
        block = x[rows][:, g.form.order]  # a view for a sketch, a gathered copy for the triangular form
        norms[rows], y = centred_rows(block, mean, work)  # (rows, d) C order; norms do not depend on the order
        del block
        out[rows] = params.norms.outliers(norms[rows])
        y[out[rows]] = 0
        per_row[0, rows] = y @ direction
        for i, a, b in _runs(s[rows]):  # a sample's rows are contiguous: few runs per step
            vectors[i] += ones[:b - a] @ y[a:b]
        _covariance_terms(y, g, per_row[1:, rows], -(chunk.first + start) % CHECK_EVERY)
    keep = ~out
    back = np.empty_like(vectors)
    back[:, g.form.order] = vectors
    values = np.stack([np.bincount(s, minlength=n).astype(np.float64), np.bincount(s, weights=out, minlength=n),
                       np.bincount(s, weights=norms, minlength=n)]
                      + [np.bincount(s[keep], weights=v[keep], minlength=n) for v in per_row])
    return SampleSums(values, back)


def _covariance_terms(y: np.ndarray, g: ModalityGradient, out: np.ndarray, offset: int) -> None:
    """Into out (6, rows): each row's covariance term (normalised units) and the sketch's check fields on
    rows offset, offset + CHECK_EVERY, ... `y` (raw centred rows in the form's order) is overwritten."""
    a2 = g.scale * g.scale
    form = g.form
    if isinstance(form, TriangularForm):
        out[0] = a2 * np.einsum("ij,ij->i", y, y, dtype=np.float64)
        trmm = blas.strmm if form.tri.dtype == np.float32 else blas.dtrmm
        p = trmm(1.0, form.tri, y.T, side=0, lower=1, trans_a=1, overwrite_b=1)  # y.T: Fortran, no copy
        out[0] -= np.einsum("ji,ji->i", p, p, dtype=np.float64)
        return
    p = y @ form.vectors
    out[0] = np.square(p, dtype=np.float64) @ form.weights
    every = slice(offset, None, CHECK_EVERY)
    sub = y[every]
    e = a2 * np.einsum("ij,ij->i", sub, sub, dtype=np.float64) - np.square(sub @ form.check, dtype=np.float64).sum(1)
    r = e - out[0, every]
    out[1, every] = 1
    out[2, every], out[3, every] = e, e * e
    out[4, every], out[5, every] = r, r * r


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

    def map(self, lazy: LazyChunk, chunk: SampleChunk, params: InfluenceParams) -> SampleSums:
        """The chunk is read here, not by a Dask task of its own, so nothing is read ahead of the maps."""
        return_freed_memory()  # in a dask.distributed worker's process too
        return map_chunk(lazy.load(), chunk, params)

    def finish(self, partial: SampleSums, facts=None) -> SampleSums:
        return partial


def layer_influence(grad: LayerGradient, sums: dict[str, SampleSums]) -> LayerInfluence:
    """D_i of one layer (N,) and the mean term's exact parts, from both modalities' per-sample sums."""
    a, fd = grad.scale, grad.fd
    total = np.zeros(sums["vision"].values.shape[1])
    lins, centred, captured = {}, {}, []
    for m in MODALITIES:
        t = grad.totals[m]
        n_i, o_i, _, lin, cov, *check = sums[m].values
        lins[m] = lin + o_i * t["median_lin"]
        centred[m] = sums[m].vectors + np.outer(o_i, grad.modality(m).median - grad.modality(m).mean)
        total += 2 * a * a * lins[m] / t["n"]
        total += (cov + o_i * t["median_cov"] - n_i * t["cov_mean"]) / (t["n"] - 1)
        captured.append(1.0 if grad.modality(m).form.exact else captured_share(*(c.sum() for c in check)))
    n_t, _, u, *_ = sums["text"].values
    n_total = grad.totals["text"]["n"]
    total += 2 * fd * (n_t - a * u) / n_total
    mean_term = grad.mean_term
    d_mean = 2 * a * a * (lins["vision"] / grad.totals["vision"]["n"] + lins["text"] / n_total) \
        + 2 * mean_term * (n_t - a * u) / n_total
    cv, ct = centred["vision"], centred["text"]
    gram = np.stack([cv @ cv.T, cv @ ct.T, ct @ ct.T])
    return LayerInfluence(total, d_mean, sums["vision"].values[0], n_t, u, lins["vision"], lins["text"], gram,
                          np.array(captured), mean_term, a)


def captured_share(n: float, e: float, e2: float, r: float, r2: float) -> float:
    """1 - var(residual) / var(exact term) over the checked rows: the share of the per-token covariance
    term's variance the sketch keeps (nan with fewer than 2 checked rows)."""
    if n < 2:
        return float("nan")
    var_e = (e2 - e * e / n) / (n - 1)
    var_r = max(0.0, (r2 - r * r / n) / (n - 1))
    return float(1.0 - var_r / var_e) if var_e > 0 else float("nan")


def compute_influence(selection, grads: dict[int, LayerGradient], stats: dict[int, LayerStats],
                      runner: Runner | None = None, stash: ChunkStash | None = None) -> dict[int, LayerInfluence]:
    """Influence values (N,) per layer: one read of the given layers of the selection, both modalities
    (chunks the scan kept in `stash` are taken from it instead of being read again)."""
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
            parts = [dask.delayed(read.map, pure=True)(LazyChunk(x, stash, keep=False),
                                                       SampleChunk(sample[a:b], n, int(a)), params)
                     for x, a, b in zip(arr.to_delayed().ravel(), edges[:-1], edges[1:])]
            graph.append(dask.delayed(read.finish, pure=True)(tree_combine(parts)))
            keys.append((layer, m))
    done = dict(zip(keys, runner.compute(graph, f"influence read: {len(grads)} layer(s)")))
    return {layer: layer_influence(grad, {m: done[(layer, m)] for m in MODALITIES}) for layer, grad in grads.items()}
