"""The scan's per-value work compiled (numba), instead of a dozen numpy passes over each block.

Why: beyond reading the data and the Gram products (the one-pass floor), the scan has per-value
work: squares for the norms, the top-byte histogram, the window counts, and the conversion to
shifted float32 for the products. As numpy operations each streams the block through memory with
temporaries, and the histograms scatter into tables too large for the cache; together they cost as
much as the products. Here the norms come from one row-major loop, the block is transposed once
(a tiled copy) so that each column's histogram and window counts stay in L1 while its values
stream by, and the float32 conversion reads each value once. The numpy kernels (kernels.py,
window.py) stay: they are the fallback without numba (or with MIR_KERNELS=numpy) and the
independent implementation the tests compare with.
"""
from __future__ import annotations

import os

import numpy as np

from .radix import TOP_ORDER
from .window import NONE, SPARSE, Window, WindowCounts

try:
    if os.environ.get("MIR_KERNELS", "").lower() == "numpy":
        raise ImportError("MIR_KERNELS=numpy")
    from numba import njit
except ImportError:
    njit = None

AVAILABLE = njit is not None
TILE = 16  # transpose tile: 16 rows of 64-byte lines stay in L1 whatever the row stride
_VALUES16 = np.arange(65536, dtype=np.uint16).view(np.float16)
F16_TO_F64 = _VALUES16.astype(np.float64)  # every float16 bit pattern's value (512 KiB, stays in cache)
F16_TO_F32 = _VALUES16.astype(np.float32)

if AVAILABLE:
    _sum = njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})  # sums may be reordered
    _exact = njit(nogil=True, cache=True)

    @_sum
    def _row_norms16(bits, table, out):
        n, d = bits.shape
        for i in range(n):
            acc = 0.0
            for j in range(d):
                v = table[bits[i, j]]
                acc += v * v
            out[i] = np.sqrt(acc)

    @_sum
    def _row_norms32(x, out):
        n, d = x.shape
        for i in range(n):
            acc = 0.0
            for j in range(d):
                v = np.float64(x[i, j])
                acc += v * v
            out[i] = np.sqrt(acc)

    @_exact
    def _transpose(bits, out):
        n, d = bits.shape
        for i0 in range(0, n, TILE):
            i1 = min(i0 + TILE, n)
            for j0 in range(0, d, TILE):
                for j in range(j0, min(j0 + TILE, d)):
                    for i in range(i0, i1):
                        out[j, i] = bits[i, j]

    @_exact
    def _top_histogram(columns, shift, hist):
        d, n = columns.shape
        for j in range(d):
            for i in range(n):
                hist[j, (columns[j, i] >> shift) & 0xFF] += 1

    @_exact
    def _count(columns, shift, dest, counts, sparse_keys, sparse_bytes):
        """dest[j, top]: where the second-byte counts of (column j, top byte) start in `counts`
        (values outside the window land in a last, discarded row); -1: a sparse bin, gathered."""
        d, n = columns.shape
        p = 0
        for j in range(d):
            for i in range(n):
                b = columns[j, i]
                top = (b >> shift) & 0xFF
                base = dest[j, top]
                second = (b >> (shift - 8)) & 0xFF
                if base >= 0:
                    counts[base + second] += 1
                else:
                    sparse_keys[p] = j * 256 + top
                    sparse_bytes[p] = second
                    p += 1
        return p

    @_exact
    def _convert16(bits, table, shift, keep, out):
        n, d = bits.shape
        for i in range(n):
            if keep[i]:
                for j in range(d):
                    out[i, j] = table[bits[i, j]] - shift[j]
            else:
                for j in range(d):
                    out[i, j] = 0.0

    @_exact
    def _convert32(x, shift, keep, out):
        n, d = x.shape
        for i in range(n):
            if keep[i]:
                for j in range(d):
                    out[i, j] = x[i, j] - shift[j]
            else:
                for j in range(d):
                    out[i, j] = 0.0


def _bits(x: np.ndarray) -> tuple[np.ndarray, int]:
    """The raw bits and the shift that brings the top byte down."""
    if x.dtype == np.float16:
        return x.view(np.uint16), 8
    return x.view(np.uint32), 24


def scan_columns(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token norms (float64), the top-byte histogram (d, 256) and the raw bits column by column
    (d, n): what kernels.token_norms and radix.byte_histogram(x, 0, ...) compute, and the input of
    `count_window`."""
    bits, shift = _bits(x)
    n, d = x.shape
    norms = np.empty(n)
    if x.dtype == np.float16:
        _row_norms16(bits, F16_TO_F64, norms)
    else:
        _row_norms32(x, norms)
    # a row stride that is not a power of two keeps the tiled copy free of cache-set conflicts
    columns = np.empty((d, n + 32), bits.dtype)[:, :n]
    _transpose(bits, columns)
    hist = np.zeros((d, 256), np.int64)
    _top_histogram(columns, shift, hist)
    return norms, hist, columns


def count_window(columns: np.ndarray, window: Window, hist: np.ndarray) -> WindowCounts:
    """window.count_window on the columns from scan_columns."""
    d = columns.shape[0]
    shift = 8 if columns.dtype == np.uint16 else 24
    slots = len(window.keys)
    offset = np.arange(256)
    raw = TOP_ORDER[np.minimum(window.lo[:, None].astype(np.int64) + offset, 255)]
    kind = np.where(offset <= window.span[:, None], window.kind, NONE)
    rows = np.broadcast_to(np.arange(d)[:, None], raw.shape)
    dense, sparse = kind >= 0, kind == SPARSE
    dest = np.full((d, 256), slots * 256, np.int64)
    dest[rows[dense], raw[dense]] = kind[dense].astype(np.int64) * 256
    dest[rows[sparse], raw[sparse]] = -1
    capacity = int(hist[rows[sparse], raw[sparse]].sum())
    counts = np.zeros((slots + 1) * 256, np.int32)  # a block holds fewer than 2**31 values per bin
    sparse_keys = np.empty(capacity, np.int32)
    sparse_bytes = np.empty(capacity, np.uint8)
    filled = _count(columns, shift, dest, counts, sparse_keys, sparse_bytes)
    if filled != capacity:
        raise AssertionError("window: gathered values do not match the block's histogram")
    counts = counts[:-256].reshape(-1, 256)
    if columns.shape[1] < 2**16:  # a block's counts fit 16 bits: half the memory while partials wait to merge
        counts = counts.astype(np.uint16)
    return WindowCounts(window.keys, counts, sparse_keys, sparse_bytes)


def convert(x: np.ndarray, shift: np.ndarray, keep: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows of x minus shift in float32, rows not kept zeroed: np.subtract(x, shift, dtype=float32)."""
    y = out[:len(x)]
    if x.dtype == np.float16:
        _convert16(x.view(np.uint16), F16_TO_F32, shift, keep, y)
    else:
        _convert32(x, shift, keep, y)
    return y
