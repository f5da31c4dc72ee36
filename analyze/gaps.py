"""What kind of gap: FD split into shift, scale, per-channel and shape parts, the unbiased mean term,
and each layer's share of the summed FD. Exact from the moments an analysis keeps; the per-channel part
costs one more product and eigensolve, reusing the vision factor.

With tau = tr((C_V C_T)^1/2) and the covariance term C = tr C_V + tr C_T - 2 tau (FD = mean term + C):

* shift: the mean term ||mu_V - mu_T||^2 (what a translation of the vision tokens removes);
* isotropic rescaling of the centred vision tokens by s: s^2 tr C_V + tr C_T - 2 s tau, least at
  s* = tau / tr C_V, where it is tr C_T - tau^2 / tr C_V; so scale = C - that = (tr C_V - tau)^2 / tr C_V >= 0;
  trace matching (s = sqrt(tr C_T / tr C_V)) gives 2 tr C_T - 2 s tau (reported; it can exceed C);
* the per-channel map D = diag(sigma_T / sigma_V) (MoCa-style calibration; channels without vision variance
  get 0): tr(D C_V D) + tr C_T - 2 tr((D C_V D C_T)^1/2), with D C_V D = (D Y_V)(D Y_V)^T;
  channel = (isotropic remainder) - that: D matches moments, it does not minimise, so this part can be negative;
* shape: what the per-channel map leaves (a squared Bures distance, >= 0).

shift + scale + channel + shape = FD (in exact arithmetic; always of the exact trace).
"""
from __future__ import annotations

import math

import numpy as np

from .frechet import trace_sqrt_of_factors


def channel_matched_trace(var_v: np.ndarray, var_t: np.ndarray, y_vision: np.ndarray, y_text: np.ndarray) -> float:
    """tr((D C_V D C_T)^1/2) for D = diag(sigma_T / sigma_V) (0 where the vision channel has no variance),
    from the factors the trace term used (C = Y Y^T): D C_V D = (D Y_V)(D Y_V)^T, one product and eigensolve."""
    d = channel_map(var_v, var_t)
    return trace_sqrt_of_factors(d[:, None] * y_vision, y_text).value


def channel_map(var_v: np.ndarray, var_t: np.ndarray) -> np.ndarray:
    """The diagonal of D = diag(sigma_T / sigma_V); channels without vision variance get 0."""
    d = np.zeros_like(var_v)
    live = var_v > 0
    d[live] = np.sqrt(np.clip(var_t[live], 0, None) / var_v[live])
    return d


def gap_parts(mean_term: float, var_v: np.ndarray, var_t: np.ndarray, tau: float, tau_d: float,
              n_vision: int, n_text: int) -> dict:
    """The gap decomposition and the unbiased mean term of one layer (text-normalised units), from the
    per-channel variances (diagonals of C_V, C_T), tau and the channel-matched trace tau_d
    (channel_matched_trace)."""
    tv, tt = float(var_v.sum()), float(var_t.sum())
    cov_term = tv + tt - 2.0 * tau
    s_opt = tau / tv if tv > 0 else 0.0
    isotropic = tt - tau * tau / tv if tv > 0 else tt
    s_match = math.sqrt(tt / tv) if tv > 0 else 0.0
    d = channel_map(var_v, var_t)
    channel = float(np.dot(d * d, var_v)) + tt - 2.0 * tau_d
    scale = (tv - tau) ** 2 / tv if tv > 0 else cov_term - isotropic
    return {
        "fd_mean_term_unbiased": mean_term - tv / n_vision - tt / n_text,
        "isotropic_scale": s_opt,
        "cov_term_isotropic": isotropic,
        "cov_term_trace_matched": 2.0 * tt - 2.0 * s_match * tau,
        "cov_term_channel_matched": channel,
        "gap_shift": mean_term,
        "gap_scale": scale,
        "gap_channel": isotropic - channel,
        "gap_shape": channel,
    }


def depth_shares(summaries: list[dict]) -> float:
    """Adds each layer's share FD_k / sum FD to its summary; returns the mean FD per layer (sum / L), the
    depth-free numbers for comparing models with different layer counts."""
    total = sum(s["fd"] for s in summaries)
    for s in summaries:
        s["fd_share"] = s["fd"] / total if total != 0 else math.nan
    return total / len(summaries)
