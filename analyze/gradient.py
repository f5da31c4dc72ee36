"""The gradient of one layer's FD at the full-selection solution: what turns each token into its share of
a sample's influence value (influence.py).

Why a gradient: FD is a smooth function of the text scale, the two means and the two covariances, so
its first-order change under sample weights is a sum over tokens of one scalar each (the nonparametric
delta method / infinitesimal jackknife). For the trace term f = tr((C_V C_T)^1/2), with C_T = Y_b Y_b^T,
f = tr(M^1/2), M = Y_b^T C_V Y_b, so df/dC_V = 1/2 Y_b M^-1/2 Y_b^T = 1/2 K_V K_V^T, K_V = Y_b M^-1/4, on
M's numerical range. With W = Y_a^T Y_b = U S V^T (C_V = Y_a Y_a^T) both sides follow:
K_V = Y_b V S^-1/2, K_T = Y_a U S^-1/2 (U and S from the eigensolve of W W^T, V = W^T U S^-1). Then a token y (centred) contributes ||y||^2 - ||K^T y||^2 to
tr((I - 2 df/dC) y y^T): one triangular product per token (K K^T's pivoted Cholesky factor), the cost
of one Gram product.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sl
from scipy.linalg import lapack

from .frechet import PsdFactor
from .stats import LayerStats

RANGE_RTOL = 1e-13  # eigenvalues of W W^T (squared singular values) below this share of the largest: outside
#                     the numerical range (their square roots are rounding noise at float64)


@dataclass(frozen=True)
class ModalityGradient:
    """What the influence read needs for one modality: in raw units (the map sees stored values)."""

    mean: np.ndarray  # (d,) raw mean after replacement
    direction: np.ndarray  # (d,) raw: mean_V - mean_T (vision) or mean_T - mean_V (text)
    perm: np.ndarray  # (d,) channel order of `tri`
    tri: np.ndarray  # (d, d) lower triangular L, L L^T = a^2 K K^T permuted: ||L^T y[perm]||^2 = ||a K^T y||^2
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


def trace_sqrt_factors(cv: np.ndarray, ct: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """f = tr((C_V C_T)^1/2), and K_V, K_T with df/dC = 1/2 K K^T (float64, normalised units).

    From one symmetric eigensolve of W W^T = U S^2 U^T (the trace term's own form, frechet.py; cheaper
    than an SVD of W): K_T = Y_V U S^-1/2 and, with V = W^T U S^-1, K_V = Y_T W^T U S^-3/2."""
    ya, yb = PsdFactor.of(cv).y, PsdFactor.of(ct).y
    w = ya.T @ yb
    if w.size == 0:
        d = cv.shape[0]
        return 0.0, np.zeros((d, 0)), np.zeros((d, 0))
    lam, u = sl.eigh(w @ w.T, driver="evd", check_finite=False, overwrite_a=True)
    keep = lam > RANGE_RTOL * lam.max() if lam.size and lam.max() > 0 else np.zeros(lam.shape, bool)
    u, s = u[:, keep], np.sqrt(lam[keep])
    k_t = (ya @ u) * s ** -0.5
    del ya
    k_v = ((yb @ w.T) @ u) * s ** -1.5  # d x d matrices are freed as they are used: memory at large d
    return float(np.sqrt(np.clip(lam, 0, None)).sum()), k_v, k_t


def triangular_factor(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(perm, L): L lower triangular with L L^T = (K K^T)[perm][:, perm] (pivoted Cholesky), so that
    ||K^T y||^2 = ||L^T y[perm]||^2 costs a triangular product per row: half a general one."""
    d = k.shape[0]
    c, piv, rank, info = lapack.dpstrf(k @ k.T, lower=1)
    if info < 0:
        raise ValueError(f"dpstrf argument {-info} is invalid")
    tri = np.tril(c)
    tri[:, rank:] = 0.0
    return (piv - 1).astype(np.int64), np.asfortranarray(tri) if d else tri


def layer_gradient(stats: LayerStats) -> LayerGradient:
    """The exact-trace FD of the layer and its gradient pieces (see the module docstring)."""
    a = stats.scale()
    mv, mt = stats.vision.replaced(), stats.text.replaced()
    cv, ct = mv.covariance() * a * a, mt.covariance() * a * a
    f, k_v, k_t = trace_sqrt_factors(cv, ct)
    diff = (mv.mean - mt.mean) * a
    fd = float(diff @ diff + np.trace(cv) + np.trace(ct) - 2 * f)
    grads, totals = {}, {}
    for name, mom, k, sign in (("vision", mv, k_v, 1.0), ("text", mt, k_t, -1.0)):
        s = stats.modality(name)
        perm, tri = triangular_factor(k * a)
        grads[name] = ModalityGradient(mom.mean, sign * (mv.mean - mt.mean), perm, tri, s.median)
        dev = s.median - mom.mean
        totals[name] = {"n": mom.n, "trace_cov": float(np.trace(cv if name == "vision" else ct)),
                        "median_sq": float(dev @ dev), "median_quad": float(np.sum((dev @ k * a) ** 2)),
                        "median_lin": float(sign * (mv.mean - mt.mean) @ dev)}
    return LayerGradient(stats.layer, fd, float(diff @ diff), a, f, grads["vision"], grads["text"], totals)
