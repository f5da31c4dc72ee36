"""Drift between two checkpoints: linear CKA (Kornblith et al., ICML 2019) and its debiased form, per
layer and modality, between the same tokens of two archives, read out of core and in step.

Definitions, on the n tokens' features X (n x d1) and Y (n x d2), rows centred on their means, with
k_i = ||x_i||^2, l_i = ||y_i||^2 (the diagonals of the linear kernels K = X X^T, L = Y Y^T):
    CKA          = ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F)
    debiased CKA = H(X, Y) / sqrt(H(X, X) H(Y, Y)),
    H(X, Y)      = ||X^T Y||_F^2 - n/(n-2) sum_i k_i l_i + (sum k)(sum l) / ((n-1)(n-2))
H is n(n-3) times Song et al.'s (2012) unbiased HSIC of K and L: with centred rows K 1 = 0, so its
terms 1^T K~ L~ 1 = sum k_i l_i and 1^T K~ 1 = -sum k_i (K~: K with zero diagonal) reduce it to these
feature-space sums. So no n x n matrix is formed: per chunk of tokens the partial holds X^T X, Y^T Y,
X^T Y and the fourth-order sums sum k l, sum k^2, sum l^2, sum k x, sum k y, sum l x, sum l y, about
its own means, and two partials merge exactly by re-centring both on the merged means (`combine`).

"The same tokens": the sample ids both selections hold, token by token within each sample, so every
shared sample must have the same number of tokens of the modality in both archives (else refused,
naming the sample). The hidden sizes may differ (CKA compares representations of any widths).
Each archive is read once when both store the shared samples in the same order; otherwise the second
archive's chunks are gathered to the first's order (Dask indexing), which may read them more than once.
"""
from __future__ import annotations

from dataclasses import dataclass

import dask
import numpy as np
from storage_schemas.schema import MODALITIES

from .engine import tree_combine
from .errors import AnalysisError
from .kernels import as_rows
from .moments import gram_rows
from .runner import Runner

DRIFT_VERSION = 1


@dataclass(frozen=True)
class CrossMoments:
    """Sums over some tokens of two representations, about their own means (sum of the centred rows = 0)."""

    n: int
    mx: np.ndarray
    my: np.ndarray
    sxx: np.ndarray  # sum u u^T, u = x - mx
    syy: np.ndarray  # sum v v^T, v = y - my
    sxy: np.ndarray  # sum u v^T
    kl: float  # sum k l (k = ||u||^2, l = ||v||^2)
    kk: float
    ll: float
    ku: np.ndarray  # sum k u
    kv: np.ndarray
    lu: np.ndarray
    lv: np.ndarray

    def recentred(self, cx: np.ndarray, cy: np.ndarray) -> tuple:
        """The same sums about other centres (rows u - dx, v - dy), in the field order from sxx on."""
        dx, dy = cx - self.mx, cy - self.my
        a, b, n = float(dx @ dx), float(dy @ dy), self.n
        sk, sl = float(np.trace(self.sxx)), float(np.trace(self.syy))
        sxx_dx, syy_dy, sxy_dy, syx_dx = self.sxx @ dx, self.syy @ dy, self.sxy @ dy, self.sxy.T @ dx
        return (self.sxx + n * np.outer(dx, dx), self.syy + n * np.outer(dy, dy), self.sxy + n * np.outer(dx, dy),
                self.kl - 2 * dy @ self.kv + b * sk - 2 * dx @ self.lu + 4 * dx @ sxy_dy + a * sl + n * a * b,
                self.kk - 4 * dx @ self.ku + 2 * a * sk + 4 * dx @ sxx_dx + n * a * a,
                self.ll - 4 * dy @ self.lv + 2 * b * sl + 4 * dy @ syy_dy + n * b * b,
                self.ku - dx * sk - 2 * sxx_dx - n * a * dx, self.kv - dy * sk - 2 * syx_dx - n * a * dy,
                self.lu - dx * sl - 2 * sxy_dy - n * b * dx, self.lv - dy * sl - 2 * syy_dy - n * b * dy)

    def combine(self, other: "CrossMoments") -> "CrossMoments":
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        mx = self.mx + (other.mx - self.mx) * (other.n / n)
        my = self.my + (other.my - self.my) * (other.n / n)
        parts = [a + b for a, b in zip(self.recentred(mx, my), other.recentred(mx, my))]
        return CrossMoments(n, mx, my, *parts)


def cross_moments(x, y, precision: str = "float32") -> CrossMoments:
    """The partial of one chunk: rows centred on the chunk's means in float64, Gram products of steps of
    rows in `precision` (float32 on centred data, as moments.block_moments) accumulated in float64."""
    x, y = as_rows(x), as_rows(y)
    if len(x) != len(y):
        raise AnalysisError(f"drift read: chunks of {len(x)} and {len(y)} tokens (internal alignment error)")
    n, d1, d2 = len(x), x.shape[1], y.shape[1]
    mx, my = x.mean(axis=0, dtype=np.float64), y.mean(axis=0, dtype=np.float64)
    work = np.float32 if precision == "float32" else np.float64
    sums = [np.zeros((d1, d1)), np.zeros((d2, d2)), np.zeros((d1, d2))]
    kl = kk = ll = 0.0
    ku, kv, lu, lv = np.zeros(d1), np.zeros(d2), np.zeros(d1), np.zeros(d2)
    for lo in range(0, n, gram_rows(max(d1, d2))):
        u = x[lo:lo + gram_rows(max(d1, d2))].astype(np.float64) - mx
        v = y[lo:lo + len(u)].astype(np.float64) - my
        k, l = np.einsum("ij,ij->i", u, u), np.einsum("ij,ij->i", v, v)
        kl, kk, ll = kl + float(k @ l), kk + float(k @ k), ll + float(l @ l)
        ku, kv, lu, lv = ku + k @ u, kv + k @ v, lu + l @ u, lv + l @ v
        uw, vw = u.astype(work), v.astype(work)
        sums[0] += uw.T @ uw
        sums[1] += vw.T @ vw
        sums[2] += uw.T @ vw
    return CrossMoments(n, mx, my, *sums, kl, kk, ll, ku, kv, lu, lv)


def cka_numbers(m: CrossMoments) -> dict:
    """Linear CKA and debiased linear CKA from the merged sums (module docstring); NaN where undefined
    (a constant representation; fewer than 4 tokens for the debiased one)."""
    n = m.n
    xy, xx, yy = float(np.sum(m.sxy ** 2)), float(np.sum(m.sxx ** 2)), float(np.sum(m.syy ** 2))
    biased = xy / np.sqrt(xx * yy) if xx > 0 and yy > 0 else np.nan
    debiased = np.nan
    if n >= 4:
        sk, sl = float(np.trace(m.sxx)), float(np.trace(m.syy))

        def h(cross, fourth, a, b):
            return cross - n / (n - 2) * fourth + a * b / ((n - 1) * (n - 2))

        hx, hy = h(xx, m.kk, sk, sk), h(yy, m.ll, sl, sl)
        if hx > 0 and hy > 0:
            debiased = h(xy, m.kl, sk, sl) / np.sqrt(hx * hy)
    return {"cka": float(biased), "cka_debiased": float(debiased), "tokens": int(n)}


@dataclass(frozen=True)
class DriftRead:
    """The two-archive read, declared like reads.py: map over chunk pairs, combine, finish on a worker."""

    precision: str = "float32"
    label = "CKA (two archives in step)"

    def map(self, x, y) -> CrossMoments:
        return cross_moments(x, y, self.precision)

    def finish(self, partial: CrossMoments) -> dict:
        return cka_numbers(partial)


def aligned_rows(sel_a, sel_b, modality: str) -> np.ndarray:
    """For every token of sel_a's modality, the index of the same token (same sample id, same rank within
    the sample) in sel_b's; AnalysisError naming a sample whose token counts differ or that b lacks."""
    ids_a = sel_a.archive.samples.sample_id.values[getattr(sel_a, modality)["sample"].values]
    ids_b = sel_b.archive.samples.sample_id.values[getattr(sel_b, modality)["sample"].values]
    where_b: dict[str, list[int]] = {}
    for i, sid in enumerate(ids_b.tolist()):
        where_b.setdefault(sid, []).append(i)
    counts_a: dict[str, int] = {}
    for sid in ids_a.tolist():
        counts_a[sid] = counts_a.get(sid, 0) + 1
    for sid, count in counts_a.items():
        got = len(where_b.get(sid, []))
        if got != count:
            raise AnalysisError(f"sample {sid!r}: {count} {modality} tokens in {sel_a.archive.paths[0]} but {got} in "
                                f"{sel_b.archive.paths[0]}; CKA needs the same tokens in both archives (same "
                                "prompts and text-token rule); exclude it with --samples / --where")
    if len(ids_b) != len(ids_a):
        extra = sorted(set(where_b) - set(counts_a))[:3]
        raise AnalysisError(f"{sel_b.archive.paths[0]} holds samples the other selection lacks ({extra}); select the "
                            "same sample ids in both")
    seen: dict[str, int] = {}
    out = np.empty(len(ids_a), np.int64)
    for i, sid in enumerate(ids_a.tolist()):
        j = seen.get(sid, 0)
        out[i] = where_b[sid][j]
        seen[sid] = j + 1
    return out


def compute_drift(sel_a, sel_b, layers: list[int], *, runner: Runner | None = None,
                  precision: str = "float32") -> list[dict]:
    """Per layer {"layer", "vision": {cka, cka_debiased, tokens}, "text": {...}} between two selections of
    the same sample ids; one graph per layer (both modalities), so memory holds one layer's d x d sums."""
    runner = runner or Runner()
    read = DriftRead(precision)
    order = {m: aligned_rows(sel_a, sel_b, m) for m in MODALITIES}
    out = []
    for layer in layers:
        graph = []
        for m in MODALITIES:
            a = _layer_array(sel_a, m, layer)
            b = _layer_array(sel_b, m, layer)
            if not np.array_equal(order[m], np.arange(len(order[m]))):
                b = b[order[m]]
            b = b.rechunk({0: a.chunks[0], 1: -1})
            a = a.rechunk({1: -1})
            parts = [dask.delayed(read.map, pure=True)(x, y)
                     for x, y in zip(a.to_delayed().ravel(), b.to_delayed().ravel())]
            graph.append(dask.delayed(read.finish, pure=True)(tree_combine(parts)))
        vision, text = runner.compute(graph, f"{read.label}: layer {layer}")
        out.append({"layer": int(layer), "vision": vision, "text": text})
    return out


def _layer_array(selection, modality: str, layer: int):
    index = int(np.flatnonzero(selection.layers == layer)[0])
    return getattr(selection, modality).data[index]
