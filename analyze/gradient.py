"""The gradient of one layer's FD at the full-selection solution: what turns each token into its share of
a sample's influence value (influence.py).

Why a gradient: FD is a smooth function of the text scale, the two means and the two covariances, so
its first-order change under sample weights is a sum over tokens of one scalar each (the nonparametric
delta method / infinitesimal jackknife). For the trace term f = tr((C_V C_T)^1/2), with C_V = Y_V Y_V^T,
C_T = Y_T Y_T^T and W = Y_V^T Y_T = U S V^T: df/dC_T = 1/2 K_T K_T^T with K_T = Y_V U S^-1/2, and
df/dC_V = 1/2 K_V K_V^T with K_V = Y_T V S^-1/2 = C_T K_T S^-1, on the numerical range. The eigenvectors
U come from the eigensolve of W W^T that the published trace term needs anyway (`trace_solve`, called once
by results.layer_summary_and_gradient when the bootstrap is on); the second side is then one product with
the other covariance. A token y (centred) contributes y^T Gamma y = ||y||^2 - ||K^T y||^2 to
tr((I - 2 df/dC) y y^T). Exactly (InfluenceMethod "exact"), one triangular product per token (K K^T's
pivoted Cholesky factor), the cost of one Gram product; by default its rank-r part in the whitened metric
(covariance_sketch), 2r/d of that, the rest held at its mean and its kept share measured (influence.py).

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
DXD_HELD = 1.25  # d x d float64-equivalents one layer's gradient keeps for the influence read: two float32 d x d
#                  (the exact form's triangular factors, or the sketch's check K) and the sketch's d x r vectors
#                  (r <= d / 4; float32 products: --precision float64 or fewer rows than channels hold twice this)


@dataclass(frozen=True)
class TriangularForm:
    """The exact per-token form: ||a K^T y||^2 = ||L^T y[perm]||^2 (one triangular product per token)."""

    perm: np.ndarray  # (d,) channel order of `tri`
    tri: np.ndarray  # (d, d) lower triangular L, Fortran order, in the products' precision: L L^T = a^2 K K^T permuted
    exact = True

    @property
    def order(self) -> np.ndarray:
        """The channel order rows are gathered into before the products."""
        return self.perm

    @property
    def dtype(self):
        return self.tri.dtype


@dataclass(frozen=True)
class SketchForm:
    """The rank-r per-token form (covariance_sketch): y^T Gamma y ~ sum_l weights_l (vectors_l . y)^2 for a raw
    centred row y, the rest of Gamma held at its mean; `check` = a K (d, m), for the exact form on a row
    subsample (influence.CHECK_EVERY) that measures what the sketch captures. Both in the products' precision."""

    vectors: np.ndarray  # (d, r) a W: raw units
    weights: np.ndarray  # (r,) float64
    check: np.ndarray  # (d, m)
    complete: bool  # the subspace was everything and every direction kept: the form is exact

    order = slice(None)  # rows as stored

    @property
    def exact(self) -> bool:
        return self.complete

    @property
    def dtype(self):
        return self.vectors.dtype


@dataclass(frozen=True)
class ModalityGradient:
    """What the influence read needs for one modality: in raw units (the map sees stored values)."""

    mean: np.ndarray  # (d,) raw mean after replacement
    direction: np.ndarray  # (d,) raw: mean_V - mean_T (vision) or mean_T - mean_V (text)
    median: np.ndarray  # (d,) raw column median, the value of replaced rows
    scale: float  # a: a raw centred row y is a y in normalised units
    form: TriangularForm | SketchForm


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
    totals: dict  # per modality: n, cov_mean (a token's covariance term at the full selection), median-row terms

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


def _k_factors(solve: TraceSolve, dtype=np.float64) -> tuple[dict[str, np.ndarray], dict, dict]:
    """({modality: K} with df/dC = 1/2 K K^T, in `dtype`; {modality: x -> C x} in `dtype`; {modality:
    W -> diag(W^T C W)} in float64, one product each). Empties `solve` of its d x d matrices, which the maps
    then hold (the caller drops them when done: with dtype float32, two float64 and four float32 d x d, the
    4 of DXD_PEAK)."""
    s = np.sqrt(solve.eigenvalues)
    vec, solve.vectors = solve.vectors, None
    vec *= s ** -0.5
    vec = vec.astype(dtype, copy=False)  # the float64 vectors go before the float32 copies are made
    factor64, solve.factor = solve.factor, None
    other64, solve.other_cov = solve.other_cov, None
    factor, other = factor64.astype(dtype, copy=False), other64.astype(dtype, copy=False)
    k_other = factor @ vec  # K of the other modality: Y_V U S^-1/2 is K_T
    del vec
    k_side = other @ k_other
    k_side *= (1.0 / s).astype(dtype)
    other_name = "text" if solve.side == "vision" else "vision"
    covs = {solve.side: lambda x: factor @ (factor.T @ x), other_name: lambda x: other @ x}
    exact = {solve.side: lambda w: np.square(factor64.T @ w).sum(axis=0),
             other_name: lambda w: np.einsum("ij,ij->j", w, other64 @ w)}
    return {solve.side: k_side, other_name: k_other}, covs, exact


@dataclass(frozen=True)
class InfluenceMethod:
    """How a token's covariance term y^T Gamma y (Gamma = I - K K^T, normalised units) enters the influence
    read. "exact": a triangular product per token, about the cost of the scan's Gram product again.
    "sketch" (default): its rank-r part in the whitened metric (covariance_sketch), 2r/d of a Gram product
    per token, the rest held at its mean; r = `rank`, or by default max(SKETCH_MIN_RANK, d / SKETCH_SHARE)
    (128 at d = 4096: 1/16 of a Gram product)."""

    kind: str = "sketch"  # "sketch" | "exact"
    rank: int | None = None

    @classmethod
    def parse(cls, text: str) -> "InfluenceMethod":
        """'auto' (the default sketch), 'exact', or a sketch rank."""
        text = str(text).strip().lower()
        if text in ("auto", "sketch"):
            return cls()
        if text == "exact":
            return cls("exact")
        if text.isdigit() and int(text) > 0:
            return cls("sketch", int(text))
        raise ValueError(f"--influence takes auto, exact or a positive sketch rank, not {text!r}")

    def rank_for(self, d: int) -> int:
        if self.kind == "exact":
            return d
        return min(d, self.rank if self.rank is not None else max(SKETCH_MIN_RANK, -(-d // SKETCH_SHARE)))

    def describe(self, d: int) -> str:
        """What the cache key and the JSON call it: the method and everything its numbers depend on."""
        if self.kind == "exact":
            return "exact"
        return (f"sketch rank {self.rank_for(d)} (+{SKETCH_OVERSAMPLE} oversampling, {SKETCH_POWER} power "
                f"iteration(s), seed {SKETCH_SEED})")


SKETCH_MIN_RANK = 64
SKETCH_SHARE = 32  # default rank d / 32: 1/16 of a Gram product per token
SKETCH_OVERSAMPLE = 8
SKETCH_POWER = 1
SKETCH_SEED = 0
SKETCH_RTOL = 1e-12  # eigenvalues of Q^T C Q below this share of the largest: outside the covariance's range


def covariance_sketch(k: np.ndarray, cov, rank: int, exact_diag=None,
                      seed: int = SKETCH_SEED) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """(W (d, r'), lam (r'), kept mean, complete), r' <= rank: y^T Gamma y ~ sum_l lam_l (w_l . y)^2 with Gamma = I - K K^T,
    for centred rows y of covariance C (`cov`: x -> C x), W^T C W ~ I; the kept mean sum_l lam_l w_l^T C w_l is
    taken with `exact_diag` (W -> diag(W^T C W) in float64; default from `cov`), so kept + held is exact
    whatever the sketch's rounding; `complete`: the subspace was everything and every direction was kept, so
    the form is exact.

    Why this form: in whitened coordinates z = C^-1/2 y (identity covariance) a token's term is z^T E z with
    E = C^1/2 Gamma C^1/2, whose eigenvector directions are uncorrelated terms of variance 2 lam^2 for Gaussian
    rows; keeping the r largest |lam| keeps the most of the variance per product, and what is left has the
    mean tr(Gamma C) - kept mean exactly, so it is held, not lost. E's eigenvectors, mapped back, are those of
    Gamma C: a randomised subspace iteration on Gamma C (Halko, Martinsson & Tropp 2011, with
    SKETCH_OVERSAMPLE extra columns and SKETCH_POWER power iterations), then Rayleigh-Ritz in the C inner
    product. When rank + oversampling reaches d the subspace is everything and the form is exact."""
    d = k.shape[0]
    cols = min(d, rank + SKETCH_OVERSAMPLE)

    def gamma_c(x):
        cx = cov(x)
        return cx - k @ (k.T @ cx)

    rng = np.random.default_rng(seed)
    if cols < d:
        q = np.linalg.qr(gamma_c(rng.standard_normal((d, cols)).astype(k.dtype)))[0]
        for _ in range(SKETCH_POWER):
            q = np.linalg.qr(gamma_c(q))[0]
    else:
        q = np.eye(d, dtype=k.dtype)
    cq = cov(q)
    gcq = cq - k @ (k.T @ cq)
    inner, vec = np.linalg.eigh(_sym(q.T @ cq).astype(np.float64))  # Q^T C Q: the C inner product
    keep = inner > SKETCH_RTOL * inner.max() if inner.size and inner.max() > 0 else np.zeros(inner.shape, bool)
    t = vec[:, keep] / np.sqrt(inner[keep])
    lam, z = np.linalg.eigh(_sym(t.T @ (cq.T @ gcq).astype(np.float64) @ t))
    order = np.argsort(-np.abs(lam), kind="stable")[:rank]
    w = q @ (t @ z[:, order]).astype(q.dtype)
    w64 = w.astype(np.float64)
    diag = exact_diag(w64) if exact_diag is not None else np.einsum("ij,ij->j", w64, cov(w64))
    kept_mean = float(lam[order] @ diag)
    return w, lam[order], kept_mean, cols >= d and len(order) == len(lam)


def _sym(a: np.ndarray) -> np.ndarray:
    return (a + a.T) * 0.5


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


def layer_gradient(stats: LayerStats, precision: str = "float32", solved: tuple | None = None,
                   method: InfluenceMethod = InfluenceMethod()) -> LayerGradient:
    """The exact-trace FD of the layer and its gradient pieces (see the module docstring), with each
    modality's per-token form by `method`. `solved`: (a, mv, mt, traces, solve) from
    results.layer_summary_and_gradient, whose trace solve is reused; without it everything is computed here."""
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
    work = np.float64 if method.kind == "exact" or any(
        products_dtype(stats, m, precision) == np.float64 for m in ("vision", "text")) else np.float32
    ks, covs, exact_covs = _k_factors(solve, work)
    sketches = {}
    if method.kind == "sketch":
        sketches = {name: covariance_sketch(ks[name], covs[name], method.rank_for(stats.vision.d), exact_covs[name])
                    for name in ks}
    del covs, exact_covs  # the factor and the other covariance
    grads, totals = {}, {}
    for name, mom, trace_cov, sign in (("vision", mv, traces[0], 1.0), ("text", mt, traces[1], -1.0)):
        s = stats.modality(name)
        dev = (s.median - mom.mean) * a  # normalised
        dtype = products_dtype(stats, name, precision)
        if name in sketches:
            w, lam, cov_mean, complete = sketches.pop(name)
            form = SketchForm(np.ascontiguousarray(w * a, dtype), lam, (ks.pop(name) * a).astype(dtype), complete)
            median_cov = float(lam @ (dev @ w.astype(np.float64)) ** 2)
        else:
            k = ks.pop(name)
            median_cov, cov_mean = float(dev @ dev - np.sum((dev @ k) ** 2)), trace_cov - f
            perm, tri = triangular_factor([k], a, dtype)
            del k
            form = TriangularForm(perm, tri)
        grads[name] = ModalityGradient(mom.mean, sign * (mv.mean - mt.mean), s.median, a, form)
        totals[name] = {"n": mom.n, "cov_mean": cov_mean, "median_cov": median_cov,
                        "median_lin": float(sign * (mv.mean - mt.mean) @ (s.median - mom.mean))}
    return LayerGradient(stats.layer, fd, float(diff @ diff), a, f, grads["vision"], grads["text"], totals)
