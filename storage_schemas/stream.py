"""Hidden states on their way to disk: every shard written once, whole; only the tail in memory.

A Zarr shard is one file, rewritten whole whenever any part of it changes. Writing each commit's
tokens straight into the arrays therefore rewrote the partly filled boundary shard of every layer
at every commit: 3.5x the archive's size went to disk at the paper's shape (issue 11). Here the
tokens of each modality are copied into a buffer that ends at the next shard boundary; a full
buffer is written once, as complete shards (zarr then reads nothing back), and the buffer starts
over at the boundary. The tail is written only when a commit must make it durable (`flush`), and
is then rewritten once more, complete, when it fills up.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import zarr

from .records import is_bfloat16_bits, widen_bfloat16

WriteFn = Callable[[zarr.Array, int, int, np.ndarray], None]  # (array, axis, start, values)


class TokenStream:
    """The growing `hidden` array of one modality, seen as a stream of (layer, token, channel) rows.

    Invariant: tokens `[0, start)` are on disk; the buffer holds tokens `[start, start + count)`,
    all before the next shard boundary; `durable` tokens (>= start) are on disk.
    """

    def __init__(self, array: zarr.Array, start: int, write: WriteFn):
        self.array = array
        self.shard_tokens = int((array.shards or array.chunks)[1])
        self._write = write
        self._buffer: np.ndarray | None = None
        self.reset(start)

    def reset(self, start: int) -> None:
        """Forget the buffer: everything before `start` is on disk (after opening or a rollback)."""
        self.start = int(start)
        self.count = 0
        self.durable = int(start)

    @property
    def end(self) -> int:
        """Tokens accepted so far (on disk or buffered)."""
        return self.start + self.count

    @property
    def boundary(self) -> int:
        """The shard boundary the buffer ends at."""
        return (self.start // self.shard_tokens + 1) * self.shard_tokens

    @property
    def buffered_bytes(self) -> int:
        return 0 if self._buffer is None else self.count * self._buffer[:, :1].nbytes

    def push(self, values: np.ndarray) -> None:
        """Append (layers, n, channels) values (bfloat16 bits are widened to float32 here, on the
        copy into the buffer); write each shard that fills, once."""
        offset, n = 0, values.shape[1]
        while offset < n:
            take = min(self.boundary - self.end, n - offset)
            buf = self._buffer_for(values)
            if is_bfloat16_bits(values) and buf.dtype == np.float32:
                widen_bfloat16(values[:, offset:offset + take], out=buf[:, self.count:self.count + take])
            else:
                buf[:, self.count:self.count + take] = values[:, offset:offset + take]
            self.count += take
            offset += take
            if self.end == self.boundary:
                boundary = self.boundary
                self._write(self.array, 1, self.start, buf[:, :self.count])
                self.start, self.count, self.durable = boundary, 0, boundary

    def flush(self) -> None:
        """Make the buffered tail durable (a partial shard, rewritten whole once it fills)."""
        if self.count and self.durable < self.end:
            self._write(self.array, 1, self.start, self._buffer[:, :self.count])
            self.durable = self.end

    def _buffer_for(self, values: np.ndarray) -> np.ndarray:
        # One shard of tokens for every layer. np.empty maps pages lazily, so a small archive
        # (whose shard is far longer than its data) only ever touches what it uses.
        if self._buffer is None:
            self._buffer = np.empty((values.shape[0], self.shard_tokens, values.shape[2]), dtype=self.array.dtype)
        return self._buffer
