"""Fréchet distance of two Gaussians, and the trace term tr((A B)^1/2) three ways.

`exact` (default): the eigenvalues of A B are those of a symmetric PSD matrix, computed with a
symmetric eigensolver in float64: W W^T with W = Y_a^T Y_b for factors A = Y_a Y_a^T, B = Y_b Y_b^T
(pivoted Cholesky, so rank-deficient covariances are handled and shrink the problem; or, when a
modality has fewer tokens than channels, its centred rows: the token-count-sized form). Negative
eigenvalue mass that had to be clipped is reported, not hidden.

`reference-fast` / `reference-accurate` reproduce the reference code's two routes (mir_util.py of
shikiw/Modality-Integration-Rate): its 5-step float32 iteration, which starts at a fixed point and so
returns A B itself (see MIR_SPEC), and scipy.linalg.sqrtm(C_V @ C_T) on float32 matrices, real part.
They are reproduced with numpy/scipy float32 arithmetic, not torch: same operations and precision,
rounding may differ in the last bits (and more where the float32 inverses are ill-conditioned).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sl
from scipy.linalg import lapack

SQRT_MODES = ("exact", "reference-fast", "reference-accurate")
REFERENCE_ITERATIONS = 5


@dataclass
class TraceResult:
    value: float
    route: str
    negative_mass: float = 0.0  # |sum of clipped negative eigenvalues|, same units as the trace


BAND = 512  # rows of a d x d matrix handled at once by the in-place helpers below


def _sym(a: np.ndarray) -> np.ndarray:
    return (a + a.T) * 0.5


def symmetrize(a: np.ndarray) -> np.ndarray:
    """a <- (a + a^T) / 2 in place, block pair by block pair: the values of `_sym(a)` without its two
    d x d temporaries (memory.py counts the finish's d x d copies)."""
    d = a.shape[0]
    for i in range(0, d, BAND):
        for j in range(i, d, BAND):
            upper, lower = a[i:i + BAND, j:j + BAND], a[j:j + BAND, i:i + BAND]
            both = (upper + lower.T) * 0.5
            upper[...] = both
            lower[...] = both.T
    return a


def _lower_in_place(c: np.ndarray) -> np.ndarray:
    """np.tril(c), in place (c is Fortran-ordered, as LAPACK returns it)."""
    d = c.shape[0]
    for j in range(0, d, BAND):
        c[:j, j:j + BAND] = 0.0
        c[j:j + BAND, j:j + BAND] = np.tril(c[j:j + BAND, j:j + BAND])
    return c


def _one_norm(a: np.ndarray) -> float:
    """max_j sum_i |a_ij|, a band of columns at a time (np.abs(a) would be a d x d temporary)."""
    return max((float(np.abs(a[:, j:j + BAND]).sum(axis=0).max()) for j in range(0, a.shape[1], BAND)),
               default=0.0)


def _clipped_sqrt_sum(eigenvalues: np.ndarray) -> tuple[float, float]:
    negative = float(max(0.0, -eigenvalues[eigenvalues < 0].sum()))
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum()), negative


@dataclass
class PsdFactor:
    """A = Y Y^T from pivoted Cholesky (LAPACK dpstrf), truncated at its rounding-level tolerance;
    gives the numerical rank and, when full rank, LAPACK's estimate of the reciprocal condition number."""

    y: np.ndarray  # (d, rank), rows in the original channel order
    rank: int
    rcond: float  # 0 when rank-deficient

    @classmethod
    def of(cls, a: np.ndarray) -> "PsdFactor":
        """Two d x d arrays at most beside `a` (its symmetrised copy, factored in place, and Y)."""
        a = symmetrize(np.array(a, np.float64))
        d = a.shape[0]
        norm = _one_norm(a) if d else 0.0
        c, piv, rank, info = lapack.dpstrf(a.T, lower=1, overwrite_a=1)  # a is symmetric: a.T is a, Fortran-ordered
        del a
        if info < 0:
            raise ValueError(f"dpstrf argument {-info} is invalid")
        low = _lower_in_place(c)
        y = np.empty((d, rank))
        y[piv - 1] = low[:, :rank]  # P^T A P = L L^T, so A = (P L)(P L)^T
        rcond = 0.0
        if rank == d:
            rcond = float(lapack.dpocon(low, norm, uplo="L")[0])
        return cls(y, int(rank), rcond)


def trace_sqrt_exact(a: np.ndarray, b: np.ndarray, a_rows: np.ndarray | None = None,
                     b_rows: np.ndarray | None = None,
                     factors: tuple[PsdFactor, PsdFactor] | None = None) -> TraceResult:
    """tr((A B)^1/2) for symmetric PSD A, B (float64).

    With A = Y_a Y_a^T and B = Y_b Y_b^T, the eigenvalues of A B are the squared singular values of
    W = Y_a^T Y_b, i.e. the eigenvalues of the symmetric PSD W W^T (or W^T W, the smaller): one
    product and one symmetric eigensolve of size min(rank A, rank B). Y comes from the centred,
    scaled rows when a modality has fewer tokens than channels (`a_rows` / `b_rows`, the
    token-count-sized form), else from pivoted Cholesky (`factors`, computed here if not given).
    """
    d = np.asarray(a).shape[0]
    fa, fb = factors if factors is not None else (None, None)
    ya = a_rows.T if a_rows is not None and len(a_rows) < d else None
    yb = b_rows.T if b_rows is not None and len(b_rows) < d else None
    route = "gram" if ya is not None or yb is not None else "factor"
    ya = ya if ya is not None else (fa or PsdFactor.of(a)).y
    yb = yb if yb is not None else (fb or PsdFactor.of(b)).y
    return trace_sqrt_of_factors(ya, yb, route)


def trace_sqrt_of_factors(ya: np.ndarray, yb: np.ndarray, route: str = "factor") -> TraceResult:
    """tr((A B)^1/2) from factors A = Y_a Y_a^T, B = Y_b Y_b^T: the root singular values of Y_a^T Y_b."""
    w = ya.T @ yb
    if w.size == 0:
        return TraceResult(0.0, f"{route}-0", 0.0)
    form = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    size = min(w.shape)
    del w
    form = symmetrize(form).T  # symmetric: its transpose is the same matrix, Fortran-ordered for LAPACK
    value, negative = _clipped_sqrt_sum(sl.eigh(form, eigvals_only=True, driver="evd", check_finite=False,
                                                overwrite_a=True))
    return TraceResult(value, f"{route}-{size}", negative)


def reference_fast_sqrt(a32: np.ndarray) -> np.ndarray:
    """The reference MatrixSquareRoot.forward, in float32: Y = A, Z = I, five times
    Y <- (Y + Z^-1 A)/2; Z <- (Z + Y^-1 A)/2. Starts at a fixed point: returns A up to rounding."""
    a32 = np.asarray(a32, np.float32)
    y = a32
    z = np.eye(a32.shape[0], dtype=np.float32)
    half = np.float32(0.5)
    for _ in range(REFERENCE_ITERATIONS):
        y = half * (y + np.linalg.inv(z) @ a32)
        z = half * (z + np.linalg.inv(y) @ a32)
    return y


@dataclass
class FrechetResult:
    fd: float
    mean_term: float
    trace_a: float
    trace_b: float
    trace_sqrt: float
    mode: str
    route: str
    negative_mass: float = 0.0

    @property
    def covariance_term(self) -> float:
        return self.fd - self.mean_term


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray,
                     mode: str = "exact", rows_a: np.ndarray | None = None, rows_b: np.ndarray | None = None,
                     factors: tuple[PsdFactor, PsdFactor] | None = None) -> FrechetResult:
    """||mu_a - mu_b||^2 + tr A + tr B - 2 tr((A B)^1/2), the trace term computed by `mode`."""
    if mode == "exact":
        diff = np.asarray(mean_a, np.float64) - np.asarray(mean_b, np.float64)
        mean_term = float(diff @ diff)
        ta, tb = float(np.trace(cov_a)), float(np.trace(cov_b))
        tr = trace_sqrt_exact(cov_a, cov_b, rows_a, rows_b, factors)
        fd = mean_term + ta + tb - 2.0 * tr.value
        return FrechetResult(fd, mean_term, ta, tb, tr.value, mode, tr.route, tr.negative_mass)
    # Reference routes: float32 throughout, as calculate_fid_pytorch / calculate_fid do.
    mu_a, mu_b = np.asarray(mean_a, np.float32), np.asarray(mean_b, np.float32)
    a32, b32 = np.asarray(cov_a, np.float32), np.asarray(cov_b, np.float32)
    diff = mu_a - mu_b
    mean_term = np.sum(diff ** 2)
    ta, tb = np.trace(a32), np.trace(b32)
    if mode == "reference-fast":
        covmean = reference_fast_sqrt(a32 @ b32)
        route = "float32 5-step iteration"
    elif mode == "reference-accurate":
        covmean = sl.sqrtm(a32.dot(b32))
        if np.iscomplexobj(covmean):
            covmean = covmean.real
        route = "scipy.linalg.sqrtm float32"
    else:
        raise ValueError(f"unknown sqrt mode {mode!r}; choose one of {SQRT_MODES}")
    tr = np.trace(covmean)
    fd = mean_term + ta + tb - 2 * tr
    return FrechetResult(float(fd), float(mean_term), float(ta), float(tb), float(tr), mode, route)
