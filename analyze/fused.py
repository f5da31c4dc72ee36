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

from .activations import KEYS, TOP_K, ActivationPartial, top_order
from .radix import TOP_ORDER
from .window import NONE, SPARSE, Window, WindowCounts

try:
    if os.environ.get("MIR_KERNELS", "").lower() == "numpy":
        raise ImportError("MIR_KERNELS=numpy")
    from numba import njit
except ImportError:
    njit = None

AVAILABLE = njit is not None
ROWS = 8  # unit-sum block: rows stay in cache between the two loops (d = 1024: 0.016 s per 16384 rows; 4: 0.016, 16: 0.024)
TILE = 16  # transpose tile: 16 rows of 64-byte lines stay in L1 whatever the row stride
_VALUES16 = np.arange(65536, dtype=np.uint16).view(np.float16)
F16_TO_F64 = _VALUES16.astype(np.float64)  # every float16 bit pattern's value (512 KiB, stays in cache)
F16_TO_F32 = _VALUES16.astype(np.float32)

if AVAILABLE:
    _sum = njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})  # sums may be reordered
    _exact = njit(nogil=True, cache=True)

    @_sum
    def _row_norms16(bits, table, out, unit_sum):
        """Row norms, then, per block of ROWS rows still in L1, the sum of the rows divided by their norms.
        Why blocks and a second lookup: storing the looked-up values for reuse keeps the norm loop from
        vectorising (2.4x slower, measured), while a second lookup of rows in L1 costs one norm loop."""
        n, d = bits.shape
        weight = np.empty(ROWS)
        for i0 in range(0, n, ROWS):
            i1 = min(i0 + ROWS, n)
            for i in range(i0, i1):
                acc = 0.0
                for j in range(d):
                    v = table[bits[i, j]]
                    acc += v * v
                out[i] = np.sqrt(acc)
                weight[i - i0] = 1.0 / out[i] if acc > 0.0 else 0.0
            for i in range(i0, i1):
                w = weight[i - i0]
                if w != 0.0:
                    for j in range(d):
                        unit_sum[j] += table[bits[i, j]] * w

    @_sum
    def _centred_rows16(bits, table64, table32, mean, y, norms):
        """Row norms (float64) and the rows minus `mean` in float32, for the influence read: one pass over the
        stored values instead of numpy's float64 copy for the norms and a second conversion for the rows (the
        norm loop and the conversion loop each vectorise; the row is in L1 for the second)."""
        n, d = bits.shape
        for i in range(n):
            acc = 0.0
            for j in range(d):
                v = table64[bits[i, j]]
                acc += v * v
            norms[i] = np.sqrt(acc)
            for j in range(d):
                y[i, j] = table32[bits[i, j]] - mean[j]

    @_sum
    def _row_norms32(x, out, unit_sum):
        n, d = x.shape
        weight = np.empty(ROWS)
        for i0 in range(0, n, ROWS):
            i1 = min(i0 + ROWS, n)
            for i in range(i0, i1):
                acc = 0.0
                for j in range(d):
                    v = np.float64(x[i, j])
                    acc += v * v
                out[i] = np.sqrt(acc)
                weight[i - i0] = 1.0 / out[i] if acc > 0.0 else 0.0
            for i in range(i0, i1):
                w = weight[i - i0]
                if w != 0.0:
                    for j in range(d):
                        unit_sum[j] += np.float64(x[i, j]) * w

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
    def _column_pass(columns, shift, start, hist, abs_hist, channel_max, top_bits, top_row, top_col):
        """Per column: the top-byte histogram, the |h| key histogram and max |h| (magnitude bits); then, only
        for a column whose max beats the current k-th entry, its values against the top-k list (ties:
        lower row, then lower channel first, as activations.top_order)."""
        d, n = columns.shape
        k = top_bits.shape[0]
        mask = 0x7FFF if shift == 8 else 0x7FFFFFFF
        low = 0
        filled = 0
        worst = 0
        for j in range(d):
            m = 0
            if shift == 8:  # float16: literal shifts and masks, no low bits (measured 30% faster than generic)
                for i in range(n):
                    b = columns[j, i]
                    hist[j, b >> 8] += 1
                    a = b & 0x7FFF
                    abs_hist[a] += 1
                    m = max(m, a)
            else:
                for i in range(n):
                    b = columns[j, i]
                    hist[j, b >> 24] += 1
                    a = b & 0x7FFFFFFF
                    abs_hist[a >> 16] += 1
                    low |= b & 0xFFFF
                    m = max(m, a)
            channel_max[j] = m
            if filled == k and m < top_bits[worst]:
                continue
            for i in range(n):
                a = np.int64(columns[j, i] & mask)
                r = start + i
                if filled < k:
                    slot = filled
                    filled += 1
                elif a > top_bits[worst] or (a == top_bits[worst] and r < top_row[worst]):
                    slot = worst
                else:
                    continue
                top_bits[slot], top_row[slot], top_col[slot] = a, r, j
                if filled == k:  # the new worst: smallest value, then highest row, then highest channel
                    worst = 0
                    for s in range(1, k):
                        if top_bits[s] < top_bits[worst] or (top_bits[s] == top_bits[worst] and (
                                top_row[s] > top_row[worst] or (top_row[s] == top_row[worst]
                                                                and top_col[s] > top_col[worst]))):
                            worst = s
        return filled, low != 0

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


def scan_columns(x: np.ndarray, start: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, ActivationPartial]:
    """Token norms (float64), the top-byte histogram (d, 256), the raw bits column by column (d, n) and
    the per-value statistics: what kernels.token_norms, radix.byte_histogram(x, 0, ...) and
    activations.activation_partial compute, and the input of `count_window`. `start`: the first row's
    index in its unit."""
    bits, shift = _bits(x)
    n, d = x.shape
    norms = np.empty(n)
    unit_sum = np.zeros(d)
    if x.dtype == np.float16:
        _row_norms16(bits, F16_TO_F64, norms, unit_sum)
    else:
        _row_norms32(x, norms, unit_sum)
    # a row stride that is not a power of two keeps the tiled copy free of cache-set conflicts
    columns = np.empty((d, n + 32), bits.dtype)[:, :n]
    _transpose(bits, columns)
    hist = np.zeros((d, 256), np.int64)
    abs_hist = np.zeros(KEYS, np.int32 if n * d < 2**31 else np.int64)
    channel_bits = np.zeros(d, bits.dtype)
    top = np.zeros(TOP_K, np.int64), np.zeros(TOP_K, np.int64), np.zeros(TOP_K, np.int64)
    filled, low_bits = _column_pass(columns, shift, start, hist, abs_hist, channel_bits, *top)
    as_float = np.float16 if x.dtype == np.float16 else np.float32
    top_value = top[0][:filled].astype(bits.dtype).view(as_float).astype(np.float64)
    keep = top_order(top_value, top[1][:filled], top[2][:filled])
    part = ActivationPartial(unit_sum, abs_hist.astype(np.int64), not low_bits,
                             channel_bits.view(as_float).astype(np.float64), top_value[keep], top[1][:filled][keep],
                             top[2][:filled][keep])
    return norms, hist, columns, part


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
    # a block's counts fit 16 bits when it has fewer than 2**16 rows (half the memory while it waits to be
    # folded in; counted so directly, without an int32 copy); the discarded last row may wrap, unread
    small = columns.shape[1] < 2**16
    counts = np.zeros((slots + 1) * 256, np.uint16 if small else np.int32)
    sparse_keys = np.empty(capacity, np.int32)
    sparse_bytes = np.empty(capacity, np.uint8)
    filled = _count(columns, shift, dest, counts, sparse_keys, sparse_bytes)
    if filled != capacity:
        raise AssertionError("window: gathered values do not match the block's histogram")
    counts = counts[:-256].reshape(-1, 256)
    return WindowCounts(window.keys, counts, sparse_keys, sparse_bytes)


def convert(x: np.ndarray, shift: np.ndarray, keep: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows of x minus shift in float32, rows not kept zeroed: np.subtract(x, shift, dtype=float32)."""
    y = out[:len(x)]
    if x.dtype == np.float16:
        _convert16(x.view(np.uint16), F16_TO_F32, shift, keep, y)
    else:
        _convert32(x, shift, keep, y)
    return y


def centred_rows(x: np.ndarray, mean: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(norms (n,) float64, x - mean in `dtype`): compiled for float16 rows and float32 products, else numpy
    (kernels.token_norms, np.subtract), which computes the same values up to the norms' summation order."""
    if AVAILABLE and x.dtype == np.float16 and np.dtype(dtype) == np.float32 and x.flags.c_contiguous:
        norms = np.empty(x.shape[0])
        y = np.empty(x.shape, np.float32)
        _centred_rows16(x.view(np.uint16), F16_TO_F64, F16_TO_F32, np.ascontiguousarray(mean, np.float32), y, norms)
        return norms, y
    from .kernels import token_norms
    return token_norms(x), np.subtract(x, mean, dtype=dtype)
