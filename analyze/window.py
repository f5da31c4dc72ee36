"""The median's second byte counted in the same read as the first: a guessed window of top bytes.

Why: the radix selection (radix.py) needs the top byte of every column's median before it can count
the second byte, and a second read of the archive costs as much as everything else together. Each
block therefore guesses, from its own top-byte histogram, which top bytes can hold the median of the
whole column (the bins around its own median, +-window_quantile of its rows, at most window_bins per
column; config.ReadConfig) and counts the second byte of the values in those bins only. After the read the exact top
byte is known; where the window counts of that bin add up to its exact count (every block with
values in the bin counted them), the second byte is exact without another read. Otherwise the
column is not resolved and the analysis reads the data a second time. Never an approximation: a
guess only decides how many reads are needed.

The counts are sparse: one 256-bin row per (column, top byte) slot, keyed by column * 256 + raw top
byte, so blocks with different windows merge by key.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .config import DEFAULT, ReadConfig
from .radix import SUB_ROWS, TOP_ORDER

NONE, SPARSE = -1, -2
DENSIFY_VALUES = 1 << 20  # gathered values densified() goes through at a time


@dataclass
class WindowCounts:
    """Second-byte counts of the values in a set of (column, top byte) slots: dense slots as 256-bin
    histograms, sparse ones (the many tiny bins near zero) as the gathered second bytes.

    A lane's accumulator (engine.py) folds one chunk's counts in after another with `absorb`, in place:
    its rows are then a buffer with room to spare, in the order keys arrived (`rows` says which row holds
    which key), so a chunk's counts are added where they belong instead of copying the whole accumulator
    per chunk (measured: the copying merge was a fifth of the scan's CPU time at d = 1024)."""

    keys: np.ndarray  # (S,) int64, sorted: column * 256 + raw top byte
    counts: np.ndarray  # (R >= S, 256) counts of the raw second byte: int32 (uint16 for one block)
    sparse_keys: np.ndarray  # (G,) int32: slot key of each gathered value
    sparse_bytes: np.ndarray  # (G,) uint8: its raw second byte
    rows: np.ndarray | None = None  # (S,) row of counts holding each key; None: row i holds keys[i]
    densify_after: int = 0  # gathered values beyond which densified() looks again (it found too few before)
    gathered: tuple | None = None  # an accumulator's buffers (keys, bytes) that sparse_* are the start of

    @classmethod
    def empty(cls) -> WindowCounts:
        return cls(np.zeros(0, np.int64), np.zeros((0, 256), np.int32), np.zeros(0, np.int32),
                   np.zeros(0, np.uint8))

    def dense(self) -> np.ndarray:
        """(S, 256): the counts of each key, in key order."""
        return self.counts[:len(self.keys)] if self.rows is None else self.counts[self.rows]

    def _own_rows(self) -> np.ndarray:
        """(S,) the counts row of each key, in key order."""
        return np.arange(len(self.keys)) if self.rows is None else self.rows

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each of `keys`: whether it is one of self's dense slots, its position in self.keys, and its
        counts row (-1 where it is not a slot)."""
        used = len(self.keys)
        pos = np.minimum(np.searchsorted(self.keys, keys), max(used - 1, 0))
        hit = np.zeros(len(keys), bool) if used == 0 else self.keys[pos] == keys
        return hit, pos, np.where(hit, self._own_rows()[pos] if used else 0, -1)

    @staticmethod
    def _with_fresh(keys: np.ndarray, rows: np.ndarray, fresh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted keys and their rows, with `fresh` keys (none of `keys`) given the rows after the used ones."""
        keys = np.concatenate([keys, fresh.astype(np.int64)])
        order = np.argsort(keys, kind="stable")
        return keys[order], np.concatenate([rows, len(rows) + np.arange(len(fresh))])[order]

    def merge(self, other: WindowCounts) -> WindowCounts:
        keys = np.union1d(self.keys, other.keys)
        counts = np.zeros((len(keys), 256), np.int32)
        counts[np.searchsorted(keys, self.keys)] += self.dense()
        counts[np.searchsorted(keys, other.keys)] += other.dense()
        return WindowCounts(keys, counts, np.concatenate([self.sparse_keys, other.sparse_keys]),
                            np.concatenate([self.sparse_bytes, other.sparse_bytes]),
                            densify_after=max(self.densify_after, other.densify_after))

    def absorb(self, other: WindowCounts, room: int, gathered_room: int = 0) -> WindowCounts | None:
        """`merge`, adding other's counts into self's rows in place: only for an accumulator nothing else
        holds. `room`: the most dense slots kept; beyond it None (the caller then drops the window).
        The buffer is allocated at `room` rows once (np.zeros: pages the counts never touch stay
        uncommitted), so no chunk copies the accumulator; the gathered values likewise, with room for
        `gathered_room`."""
        hit, pos, target = self._find(other.keys)
        counts, keys, rows = self.counts, self.keys, self._own_rows()
        fresh = np.flatnonzero(~hit)
        used = len(keys)
        if used + len(fresh) > room:
            return None
        if used + len(fresh) > len(counts) or counts.dtype != np.int32:  # a chunk's own (exact size, uint16)
            grown = np.zeros((room, 256), np.int32)
            grown[:used] = self.dense()
            counts, rows = grown, np.arange(used)
            target[hit] = pos[hit]
        if len(fresh):
            target[fresh] = used + np.arange(len(fresh))
            keys, rows = self._with_fresh(keys, rows, other.keys[fresh])
        counts[target] += other.dense()
        sparse_keys, sparse_bytes, buffers = self._appended(other, gathered_room)
        return WindowCounts(keys, counts, sparse_keys, sparse_bytes, rows, max(self.densify_after, other.densify_after),
                            buffers)

    def _appended(self, other: WindowCounts, room: int) -> tuple[np.ndarray, np.ndarray, tuple]:
        """self's gathered values followed by other's, written into self's buffers (allocated once with
        room for `room` values, np.empty: untouched pages stay uncommitted), so that no chunk copies them."""
        have, add = len(self.sparse_keys), len(other.sparse_keys)
        buffers = self.gathered
        if buffers is None or have + add > len(buffers[0]):
            size = max(room, have + add)
            buffers = (np.empty(size, np.int32), np.empty(size, np.uint8))
            buffers[0][:have], buffers[1][:have] = self.sparse_keys, self.sparse_bytes
        buffers[0][have:have + add], buffers[1][have:have + add] = other.sparse_keys, other.sparse_bytes
        return buffers[0][:have + add], buffers[1][:have + add], buffers

    def densified(self, least: int, room: int, in_place: bool = False) -> WindowCounts:
        """The same counts with every sparse key of at least `least` gathered values folded into a dense
        256-bin row (at most `room` new rows, the most-gathered first). Why: a bin a chunk found small
        (sparse_count) can be the median bin of the whole column; over many chunks its gathered values
        (5 bytes each) outgrow one row of counts (1 KiB) and would hit sparse_kept_per_column.
        What stays gathered sets `densify_after` (twice as many), so that an accumulator does not count
        all its gathered values again on every chunk it folds in. `in_place`: an accumulator's (absorb):
        what stays is compacted within its own buffers. The values are gone through DENSIFY_VALUES at a
        time, so the temporaries stay small (memory.chunk_working) however many are gathered."""
        if len(self.sparse_keys) == 0 or room <= 0:
            return self
        per_key = np.bincount(self.sparse_keys)
        big = np.flatnonzero(per_key >= least)
        if len(big) > room:
            big = np.sort(big[np.argsort(per_key[big], kind="stable")[::-1][:room]])
        if len(big) == 0:
            return replace(self, densify_after=2 * len(self.sparse_keys))
        rank = np.full(len(per_key), -1, np.int32)
        rank[big] = np.arange(len(big), dtype=np.int32)
        del per_key
        total, used = len(self.sparse_keys), len(self.keys)
        # an accumulator counts them straight into its buffer: into the rows of keys it has as dense slots
        # already (a bin can be dense in one chunk and gathered in another), new keys into its spare rows
        exists, _, row = self._find(big)
        fresh = big[~exists]
        direct = in_place and self.counts.dtype == np.int32 and len(self.counts) >= used + len(fresh)
        if direct:
            flat = self.counts.reshape(-1)
            row[~exists] = used + np.arange(len(fresh))
        else:
            flat, row = np.zeros(len(big) * 256, np.int32), np.arange(len(big))
        out_keys, out_bytes = (self.sparse_keys, self.sparse_bytes) if in_place else \
            (np.empty(total, np.int32), np.empty(total, np.uint8))
        kept = 0
        for a in range(0, total, DENSIFY_VALUES):
            keys, values = self.sparse_keys[a:a + DENSIFY_VALUES], self.sparse_bytes[a:a + DENSIFY_VALUES]
            r = rank[keys]
            moved = r >= 0
            np.add.at(flat, row[r[moved]] * 256 + values[moved], 1)
            stay = ~moved
            n = int(stay.sum())
            # kept <= a: the values written never overtake those still to be read (fancy indexing copies first)
            out_keys[kept:kept + n], out_bytes[kept:kept + n] = keys[stay], values[stay]
            kept += n
        gathered = self.gathered if in_place else None
        if direct:
            keys, rows = self._with_fresh(self.keys, self._own_rows(), fresh)
            return WindowCounts(keys, self.counts, out_keys[:kept], out_bytes[:kept], rows, 2 * kept, gathered)
        extra = WindowCounts(big.astype(np.int64), flat.reshape(-1, 256), self.sparse_keys[:0], self.sparse_bytes[:0])
        rest = WindowCounts(self.keys, self.counts, out_keys[:kept], out_bytes[:kept], self.rows, 2 * kept, gathered)
        if in_place:
            merged = rest.absorb(extra, used + room)
            if merged is not None:
                return merged
        return rest.merge(extra)

    def without_sparse(self) -> WindowCounts:
        """The same counts without the gathered values (too many kept): columns needing them get a second read."""
        return WindowCounts(self.keys, self.counts, self.sparse_keys[:0], self.sparse_bytes[:0], self.rows,
                            gathered=self.gathered)

    def second_byte(self, top: np.ndarray, expected: np.ndarray) -> np.ndarray | None:
        """Counts (d, 256) of the second byte within each column's exact top byte `top` (raw), or None
        unless every column's bin was counted in full (its counts add up to `expected`)."""
        d = len(top)
        want = np.arange(d, dtype=np.int64) * 256 + np.asarray(top, np.int64)
        counts = np.zeros((d, 256), np.int64)
        found, _, rows = self._find(want)
        counts[found] = self.counts[rows[found]]
        hit = np.isin(self.sparse_keys, want)
        np.add.at(counts, (self.sparse_keys[hit] // 256, self.sparse_bytes[hit]), 1)
        if np.any(counts.sum(axis=1) != expected):
            return None
        return counts


@dataclass
class Window:
    """Per column, a run of top-byte bins in value order (positions lo .. lo + span of TOP_ORDER) and
    what each bin of the run is: a dense slot (its index in `keys`), SPARSE (gathered) or NONE."""

    lo: np.ndarray  # (d,) uint8
    span: np.ndarray  # (d,) uint8: the run's length - 1
    kind: np.ndarray  # (d, 256) int32, by offset from lo
    keys: np.ndarray  # (S,) int64 sorted: column * 256 + raw top byte of each dense slot


def choose_window(hist: np.ndarray, samples: int | None = None, config: ReadConfig = DEFAULT) -> Window:
    """Per column, the non-empty top-byte bins nearest (in ranks) to this block's median, within
    +-reach ranks of it, up to config.window_bins dense bins (more than config.sparse_count values)
    and config.sparse_values values in the sparse ones. `samples` (how many samples the block's rows come from)
    widens the reach for blocks of few samples, whose medians stray further."""
    d = hist.shape[0]
    ordered = hist[:, TOP_ORDER]
    cum = np.cumsum(ordered, axis=1)
    n = cum[:, -1:]
    half = (n - 1) // 2
    # blocks of few rows or few samples place their median less well: widen to 2 / sqrt(count)
    share = np.maximum(config.window_quantile, 2.0 / np.sqrt(np.maximum(n, 1)))
    if samples:
        share = np.maximum(share, 2.0 / np.sqrt(samples))
    reach = np.ceil(share * n).astype(np.int64)
    # distance of every bin from the median, in ranks (0 for the bin holding it): it grows away from
    # the median's bin on both sides, so the nearest non-empty bins form one run
    distance = np.maximum(np.maximum(cum - ordered - half, half - (cum - 1)), 0)
    never = np.iinfo(np.int64).max
    distance = np.where((ordered > 0) & (distance <= reach), distance, never)
    nearest = np.argsort(distance, axis=1, kind="stable")
    sizes = np.take_along_axis(ordered, nearest, axis=1)
    valid = np.take_along_axis(distance, nearest, axis=1) < never
    dense = valid & (sizes > config.sparse_count)
    bins = min(config.window_bins, max(8, int(n.max(initial=0)) // config.rows_per_bin))
    take = valid & (np.cumsum(dense, axis=1) <= bins)
    take &= np.cumsum(np.where(valid & ~dense, sizes, 0), axis=1) <= config.sparse_values
    take = np.logical_and.accumulate(take, axis=1)  # the nearest bins up to the first one over a limit
    chosen = np.zeros((d, 256), bool)
    np.put_along_axis(chosen, nearest, take, axis=1)
    chosen[:, 0] |= ~chosen.any(axis=1)  # window_bins = 0: an empty run anchored at 0
    lo = np.argmax(chosen, axis=1)
    span = 255 - np.argmax(chosen[:, ::-1], axis=1) - lo
    offset = np.arange(256)
    pos = np.minimum(lo[:, None] + offset, 255)
    sizes = np.where(offset <= span[:, None], np.take_along_axis(ordered * chosen, pos, axis=1), 0)
    dense = sizes > config.sparse_count
    kind = np.where(sizes > 0, SPARSE, NONE).astype(np.int32)
    keys = (np.arange(d, dtype=np.int64)[:, None] * 256 + TOP_ORDER[pos])[dense]
    order = np.argsort(keys)
    slot = np.empty(len(order), np.int32)
    slot[order] = np.arange(len(order), dtype=np.int32)
    kind[dense] = slot
    return Window(lo.astype(np.uint8), span.astype(np.uint8), kind, keys[order])


def count_window(x: np.ndarray, window: Window) -> WindowCounts:
    """Second-byte counts of the values of block x (contiguous, float16 or float32) in the window."""
    n, d = x.shape
    itemsize = x.dtype.itemsize
    kind = window.kind.reshape(-1)
    dense_index, gathered_keys, gathered_bytes = [], [], []
    for start in range(0, n, SUB_ROWS):
        raw = x[start:start + SUB_ROWS].view(np.uint8)
        top = raw[:, itemsize - 1::itemsize]
        key8 = ((top >> 7) * np.uint8(0x7F)) | np.uint8(0x80)  # value-order position of a raw top byte:
        key8 ^= top  # negatives (sign bit set) flip every bit, positives flip the sign bit
        key8 -= window.lo  # offset inside the column's run (wraps around below it)
        hit = np.flatnonzero(key8 <= window.span)
        col = hit % d
        slot = kind[col * 256 + key8.reshape(-1)[hit]]
        at = hit * itemsize
        second = raw.reshape(-1)[at + (itemsize - 2)]
        dense = slot >= 0
        dense_index.append(slot[dense] * 256 + second[dense])
        sparse = np.flatnonzero(slot == SPARSE)
        if len(sparse):
            tops = raw.reshape(-1)[at[sparse] + (itemsize - 1)]
            gathered_keys.append((col[sparse] * 256 + tops).astype(np.int32))
            gathered_bytes.append(second[sparse])
    # one bincount over the block. Not faster than np.add.at per step (bench/scatter_add_bench.py, one run
    # each: add.at took 0.99x its time at d = 4096, 0.70x at d = 1024); kept because it is not slower at 4096
    counts = np.bincount(np.concatenate(dense_index), minlength=len(window.keys) * 256) if dense_index else \
        np.zeros(0, np.int64)
    sparse_keys = np.concatenate(gathered_keys) if gathered_keys else np.zeros(0, np.int32)
    sparse_bytes = np.concatenate(gathered_bytes) if gathered_bytes else np.zeros(0, np.uint8)
    return WindowCounts(window.keys, counts.astype(np.int32).reshape(-1, 256), sparse_keys, sparse_bytes)
