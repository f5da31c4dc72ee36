"""The gradient of one layer's FD at the full-selection solution: what turns each token into its share of
a sample's influence value (influence.py).

Why a gradient: FD is a smooth function of the text scale, the two means and the two covariances, so
its first-order change under sample weights is a sum over tokens of one scalar each (the nonparametric
delta method / infinitesimal jackknife). For the trace term f = tr((C_V C_T)^1/2), with C_V = Y_V Y_V^T,
C_T = Y_T Y_T^T and W = Y_V^T Y_T = U S V^T: df/dC_T = 1/2 K_T K_T^T with K_T = Y_V U S^-1/2, and
df/dC_V = 1/2 K_V K_V^T with K_V = Y_T V S^-1/2 = C_T K_T S^-1, on the numerical range. The eigenvectors
U come from the eigensolve of W W^T that the published trace term needs anyway (`trace_solve`, called once
by results.layer_summary_and_gradient when the bootstrap is on); the second side is then one product with
the other covariance. A token y (centred) contributes ||y||^2 - ||K^T y||^2 to tr((I - 2 df/dC) y y^T):
one triangular product per token (K K^T's pivoted Cholesky factor), the cost of one Gram product.

Memory: d x d float64 matrices are freed as soon as they are used (the inputs are handed over in lists
that the functions empty); DXD_PEAK counts the most that are alive at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sl
from scipy.linalg import blas, lapack

from .frechet import PsdFactor
from .stats import LayerStats

RANGE_RTOL = 1e-13  # eigenvalues of W W^T (squared singular values) below this share of the largest: outside
#                     the numerical range (their square roots are rounding noise at float64)
DXD_PEAK = 4  # most d x d float64 matrices alive at once in trace_solve + layer_gradient from the hand-over of
#               the two covariances and their two factors (not the layer statistics they came from; measured
#               with tracemalloc at d = 600: 4.07). Making the factors (frechet.PsdFactor.of, before the
#               hand-over) briefly needs 3 more next to its input.
DXD_HELD = 1  # d x d float64-equivalents one layer's gradient keeps for the influence read (two float32 factors)


@dataclass(frozen=True)
class ModalityGradient:
    """What the influence read needs for one modality: in raw units (the map sees stored values)."""

    mean: np.ndarray  # (d,) raw mean after replacement
    direction: np.ndarray  # (d,) raw: mean_V - mean_T (vision) or mean_T - mean_V (text)
    perm: np.ndarray  # (d,) channel order of `tri`
    tri: np.ndarray  # (d, d) lower triangular L, Fortran order, in the products' precision:
    #                  L L^T = a^2 K K^T permuted, so ||L^T y[perm]||^2 = ||a K^T y||^2
    median: np.ndarray  # (d,) raw column median, the value of replaced rows


@dataclass(frozen=True)
class LayerGradient:
    """The layer's full-selection numbers the influence formula combines with the per-sample sums."""

    layer: int
    fd: float  # normalised FD (the published one)
    mean_term: float  # its ||mu_V - mu_T||^2 (normalised)
    scale: float  # a
    trace_sqrt: float  # f on normalised covariances
    vision: ModalityGradient
    text: ModalityGradient
    totals: dict  # per modality: n, total variance (normalised), median-row terms

    def modality(self, name: str) -> ModalityGradient:
        return self.vision if name == "vision" else self.text


@dataclass
class TraceSolve:
    """The exact trace term f = sum of the square roots of the eigenvalues of W W^T (or W^T W, the smaller),
    with what the gradient needs of that eigensolve: the factor and eigenvectors of one side."""

    value: float
    negative_mass: float  # |sum of clipped negative eigenvalues|
    route: str
    side: str  # "vision": factor = Y_V, vectors = U; "text": factor = Y_T, vectors = V
    factor: np.ndarray | None  # (d, rank of that side)
    eigenvalues: np.ndarray  # (r,) kept: S^2 on the numerical range
    vectors: np.ndarray | None  # (rank of that side, r)
    other_cov: np.ndarray | None  # the other side's covariance: its K is this one's times it (module docstring)


def trace_solve(covs: list[np.ndarray], factors: list[np.ndarray] | None = None) -> TraceSolve:
    """The trace term and the eigenvectors of its solve, from covs = [C_V, C_T] and optionally their
    factors [Y_V, Y_T] (PsdFactor.y). Both lists are emptied: each matrix is dropped once it is used."""
    ys = factors if factors is not None else [PsdFactor.of(c).y for c in covs]
    y_t, y_v = ys.pop(), ys.pop()
    c_t, c_v = covs.pop(), covs.pop()
    side = "vision" if y_v.shape[1] <= y_t.shape[1] else "text"
    other = c_t if side == "vision" else c_v
    del c_t, c_v
    w = y_v.T @ y_t
    keep_y = y_v if side == "vision" else y_t
    del y_v, y_t
    d = keep_y.shape[0]
    if w.size == 0:
        return TraceSolve(0.0, 0.0, "factor-0", side, np.zeros((d, 0)), np.zeros(0), np.zeros((0, 0)), other)
    form = w @ w.T if side == "vision" else w.T @ w
    del w
    lam, vec = sl.eigh(form.T, driver="evr", overwrite_a=True, check_finite=False)  # .T: Fortran, in place
    del form
    negative = float(max(0.0, -lam[lam < 0].sum()))
    value = float(np.sqrt(np.clip(lam, 0, None)).sum())
    keep = lam > RANGE_RTOL * lam.max() if lam.size and lam.max() > 0 else np.zeros(lam.shape, bool)
    if not keep.all():
        vec = vec[:, keep]
    return TraceSolve(value, negative, f"factor-{lam.size}", side, keep_y, lam[keep], vec, other)


def _k_factors(solve: TraceSolve) -> dict[str, np.ndarray]:
    """{modality: K} with df/dC = 1/2 K K^T; empties `solve` of its d x d matrices as they are used."""
    s = np.sqrt(solve.eigenvalues)
    vec, solve.vectors = solve.vectors, None
    vec *= s ** -0.5
    factor, solve.factor = solve.factor, None
    k_other = factor @ vec  # K of the other modality: Y_V U S^-1/2 is K_T
    del factor, vec
    other, solve.other_cov = solve.other_cov, None
    k_side = other @ k_other
    del other
    k_side *= 1.0 / s
    if solve.side == "vision":
        return {"text": k_other, "vision": k_side}
    return {"vision": k_other, "text": k_side}


def triangular_factor(k: list[np.ndarray], scale: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(perm, L): L lower triangular, Fortran order, in `dtype`, with L L^T = scale^2 (K K^T)[perm][:, perm]
    (pivoted Cholesky), so that ||scale K^T y||^2 = ||L^T y[perm]||^2 costs a triangular product per row:
    the cost of one Gram product. `k` ([K]) is emptied once K K^T is formed."""
    kk = k.pop()
    d = kk.shape[0]
    if d == 0 or kk.shape[1] == 0:
        return np.arange(d, dtype=np.int64), np.zeros((d, d), dtype, order="F")
    g = blas.dsyrk(1.0, kk.T if kk.flags.c_contiguous else kk, trans=1 if kk.flags.c_contiguous else 0, lower=1)
    del kk
    c, piv, rank, info = lapack.dpstrf(g, lower=1, overwrite_a=1)
    del g
    if info < 0:
        raise ValueError(f"dpstrf argument {-info} is invalid")
    for j in range(1, d):  # the upper triangle (Fortran order: column j's first j values) holds no factor
        c[:j, j] = 0.0
    c[:, rank:] = 0.0
    c *= scale
    tri = c if np.dtype(dtype) == np.float64 else np.asfortranarray(c, dtype)
    return (piv - 1).astype(np.int64), tri


def products_dtype(stats: LayerStats, modality: str, precision: str):
    """The influence products' precision for a modality: float64 when its rows are fewer than its channels
    (rows in memory, float64 like their statistics: inmemory.py), else the asked --precision."""
    s = stats.modality(modality)
    return np.float64 if s.n < s.d or precision == "float64" else np.float32


def layer_gradient(stats: LayerStats, precision: str = "float32", solved: tuple | None = None) -> LayerGradient:
    """The exact-trace FD of the layer and its gradient pieces (see the module docstring). `solved`:
    (a, mv, mt, traces, solve) from results.layer_summary_and_gradient, whose trace solve is reused;
    without it everything is computed here."""
    if solved is None:
        a = stats.scale()
        mv, mt = stats.vision.replaced(), stats.text.replaced()
        covs = [mv.covariance(), mt.covariance()]
        for cov in covs:
            cov *= a * a
        traces = (float(np.trace(covs[0])), float(np.trace(covs[1])))
        solve = trace_solve(covs)
    else:
        a, mv, mt, traces, solve = solved
    f = solve.value
    diff = (mv.mean - mt.mean) * a
    fd = float(diff @ diff + traces[0] + traces[1] - 2 * f)
    ks = _k_factors(solve)
    grads, totals = {}, {}
    for name, mom, trace_cov, sign in (("vision", mv, traces[0], 1.0), ("text", mt, traces[1], -1.0)):
        s = stats.modality(name)
        dev = s.median - mom.mean
        median_quad = float(np.sum((dev @ ks[name] * a) ** 2))
        perm, tri = triangular_factor([ks.pop(name)], a, products_dtype(stats, name, precision))
        grads[name] = ModalityGradient(mom.mean, sign * (mv.mean - mt.mean), perm, tri, s.median)
        totals[name] = {"n": mom.n, "trace_cov": trace_cov, "median_sq": float(dev @ dev), "median_quad": median_quad,
                        "median_lin": float(sign * (mv.mean - mt.mean) @ dev)}
    return LayerGradient(stats.layer, fd, float(diff @ diff), a, f, grads["vision"], grads["text"], totals)
