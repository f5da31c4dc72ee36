"""The trace term: the exact routes agree with each other and with scipy; the reference modes
reproduce the reference code (mir_util.py of shikiw/Modality-Integration-Rate) operation by operation."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from analyze.frechet import frechet_distance, reference_fast_sqrt, trace_sqrt_exact


def _cov(rng, n, d, scale=1.0):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * scale
    return np.cov(x, rowvar=False), x


def _sqrtm_trace(a, b):
    return float(np.real(np.trace(scipy.linalg.sqrtm(a @ b))))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # sqrtm of the singular test matrix
def test_exact_routes_agree():
    rng = np.random.default_rng(0)
    a, _ = _cov(rng, 200, 12)
    b, _ = _cov(rng, 150, 12, 0.3)
    expected = _sqrtm_trace(a, b)
    full = trace_sqrt_exact(a, b)
    assert full.route == "factor-12" and abs(full.value - expected) < 1e-9 * expected
    # rank-deficient: only a 6 x 6 block of A is non-zero; the factor route shrinks to rank 6
    singular = np.zeros_like(a)
    singular[:6, :6] = a[:6, :6]
    part = trace_sqrt_exact(singular, b)
    assert part.route == "factor-6"
    assert abs(part.value - _sqrtm_trace(singular, b)) < 1e-6 * part.value
    assert trace_sqrt_exact(singular, np.zeros_like(b)).value == 0.0
    # Gram form: B from 7 rows in 12 channels (rank 6 after centring)
    rows = rng.standard_normal((7, 12))
    centred = rows - rows.mean(axis=0)
    b_small = centred.T @ centred / 6
    gram = trace_sqrt_exact(a, b_small, b_rows=centred / np.sqrt(6))
    assert gram.route == "gram-7"
    factor = trace_sqrt_exact(a, b_small)
    assert factor.route == "factor-6"
    w = np.linalg.eigvalsh(scipy.linalg.sqrtm(a).real @ b_small @ scipy.linalg.sqrtm(a).real)
    # the 12 x 12 eigenvalue route takes square roots of 6 rounding-noise eigenvalues (~1e-15 each,
    # ~3e-8 after the square root): that noise, which both small forms avoid, bounds the agreement
    assert abs(gram.value - np.sqrt(np.clip(w, 0, None)).sum()) < 1e-7 * gram.value
    assert abs(gram.value - factor.value) < 1e-7 * gram.value


def _literal_reference_fast(cov_a32, cov_b32, mu_a32, mu_b32):
    """calculate_fid_pytorch + MatrixSquareRoot.forward transcribed literally, numpy float32 for torch."""
    inp = cov_a32 @ cov_b32
    max_iter = 5
    eye = np.eye(inp.shape[0], dtype=inp.dtype)
    Y = inp
    Z = eye
    for _ in range(max_iter):
        Y = np.float32(0.5) * (Y + np.linalg.inv(Z) @ inp)
        Z = np.float32(0.5) * (Z + np.linalg.inv(Y) @ inp)
    covmean = Y
    mean_diff = mu_a32 - mu_b32
    return float(np.sum(mean_diff ** 2) + np.trace(cov_a32) + np.trace(cov_b32) - 2 * np.trace(covmean))


def test_reference_fast_reproduces_the_iteration():
    rng = np.random.default_rng(1)
    a, _ = _cov(rng, 300, 10)
    b, _ = _cov(rng, 300, 10, 0.5)
    mu_a, mu_b = rng.standard_normal(10), rng.standard_normal(10)
    got = frechet_distance(mu_a, a, mu_b, b, mode="reference-fast")
    expected = _literal_reference_fast(a.astype(np.float32), b.astype(np.float32), mu_a.astype(np.float32),
                                       mu_b.astype(np.float32))
    assert got.fd == expected


def test_reference_fast_defect():
    """MIR_SPEC: the iteration starts at a fixed point, so for well-conditioned covariances it returns
    A = C_V C_T itself and the 'trace term' is tr(C_V C_T), not tr((C_V C_T)^1/2)."""
    rng = np.random.default_rng(4)
    a = np.cov(rng.standard_normal((4000, 6)) * 2.0, rowvar=False)
    b = np.cov(rng.standard_normal((4000, 6)), rowvar=False)
    a32b32 = a.astype(np.float32) @ b.astype(np.float32)
    assert np.allclose(reference_fast_sqrt(a32b32), a32b32, rtol=1e-4, atol=1e-6)
    fast = frechet_distance(np.zeros(6), a, np.zeros(6), b, mode="reference-fast")
    exact = frechet_distance(np.zeros(6), a, np.zeros(6), b)
    assert abs(fast.trace_sqrt - np.trace(a @ b)) < 1e-4 * np.trace(a @ b)
    assert abs(exact.trace_sqrt - _sqrtm_trace(a, b)) < 1e-9 * exact.trace_sqrt
    assert fast.fd < exact.fd - 10  # A B ~ 4 I: tr(A B) ~ 24 where tr((A B)^1/2) ~ 12


def test_reference_fast_matches_torch_transcription():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    # well-conditioned: with ill-conditioned covariances the float32 inverses amplify the last-bit
    # differences between LAPACK builds (torch vs numpy), and no two implementations agree
    a = np.cov(rng.standard_normal((2000, 8)) * 1.5, rowvar=False)
    b = np.cov(rng.standard_normal((2000, 8)) + rng.standard_normal(8), rowvar=False)
    mu_a, mu_b = rng.standard_normal(8), rng.standard_normal(8)
    ta, tb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    inp = ta @ tb
    Y, Z = inp, torch.eye(8, dtype=torch.float32)
    for _ in range(5):
        Y = 0.5 * (Y + torch.inverse(Z) @ inp)
        Z = 0.5 * (Z + torch.inverse(Y) @ inp)
    mean_diff = torch.tensor(mu_a, dtype=torch.float32) - torch.tensor(mu_b, dtype=torch.float32)
    fid = (torch.sum(mean_diff ** 2) + torch.trace(ta) + torch.trace(tb) - 2 * torch.trace(Y)).item()
    got = frechet_distance(mu_a, a, mu_b, b, mode="reference-fast").fd
    assert abs(got - fid) <= 1e-4 * abs(fid)


def test_reference_accurate_is_scipy_sqrtm_in_float32():
    rng = np.random.default_rng(3)
    a, _ = _cov(rng, 100, 9)
    b, _ = _cov(rng, 100, 9, 2.0)
    mu_a, mu_b = rng.standard_normal(9), rng.standard_normal(9)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    covmean = scipy.linalg.sqrtm(a32.dot(b32))
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu_a.astype(np.float32) - mu_b.astype(np.float32)
    expected = np.sum(diff ** 2) + np.trace(a32) + np.trace(b32) - 2 * np.trace(covmean)
    got = frechet_distance(mu_a, a, mu_b, b, mode="reference-accurate")
    assert got.fd == float(expected)
    assert abs(got.fd - frechet_distance(mu_a, a, mu_b, b).fd) < 1e-3 * got.fd


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown sqrt mode"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), mode="fast")
