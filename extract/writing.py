"""The writer stage of extraction: batches from the host copy into the archive, and when to commit.

It runs on its own thread (runner.py), so the forward pass never waits for it while the queue
between them has room. The archive writer streams hidden states to disk as whole shards fill, so
the work here is spread evenly over the run: no commit writes a burst of buffered data.
"""
from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .batching import PreparedSample
from .transfer import PinnedPool, Transfer

STOP = object()  # end of a queue


class Sink(Protocol):
    """What the writer stage writes to (storage_schemas.ArchiveWriter)."""

    def append(self, records: list[Any]) -> None: ...
    def commit(self) -> int: ...
    def flush(self) -> None: ...


@dataclass
class RunStats:
    """What a run did, for the log, the run record and the benchmarks."""

    samples: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0      # CPU time of the whole process (all threads) during the loop
    truncated: int = 0
    commits: int = 0              # commits that published samples, the final one included

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


class CommitPolicy:
    """When samples become durable.

    After every batch, whatever the archive writer already has on disk is committed (cheap: no
    hidden state is written for it). A full commit, which also writes the partly filled boundary
    shards (rewritten once more when they fill), happens every `commit_every` samples if given,
    and when nothing was committed for `commit_seconds`, so a slow run still saves its progress.
    """

    def __init__(self, commit_every: int | None, commit_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds
        self._clock = clock
        self._since_full = 0
        self._last = clock()

    def after_batch(self, n_samples: int, sink: Sink) -> int:
        """Commit as the policy says after a batch of `n_samples` was appended; return commits made."""
        self._since_full += n_samples
        now = self._clock()
        if (self.commit_every and self._since_full >= self.commit_every) or now - self._last >= self.commit_seconds:
            sink.flush()
            self._since_full, self._last = 0, now
            return 1
        if sink.commit():
            self._last = now
            return 1
        return 0


MakeRecord = Callable[[PreparedSample, np.ndarray, np.ndarray], Any]


class WriterStage:
    """Takes transfers off a queue, splits them into per-sample records and appends them."""

    def __init__(self, sink: Sink, make_record: MakeRecord, policy: CommitPolicy, stats: RunStats,
                 pool: PinnedPool | None = None, on_samples: Callable[[int], None] | None = None,
                 on_released: Callable[[], None] | None = None):
        self.sink = sink
        self.on_released = on_released or (lambda: None)  # a batch's host memory is free again
        self.make_record = make_record
        self.policy = policy
        self.stats = stats
        self.pool = pool
        self.on_samples = on_samples or (lambda n: None)

    def consume(self, transfers: queue.Queue) -> None:
        """The writer thread's body: until STOP, write every transfer."""
        while True:
            item = transfers.get()
            if item is STOP:
                return
            self.write(item)

    def write(self, item: Transfer) -> None:
        arr = item.to_numpy()  # a pooled buffer is given back only after the writer has copied it
        records, offset = [], 0
        for ps in item.batch.samples:
            nv, nt = ps.tokens.vision_position.size, ps.tokens.text_position.size
            records.append(self.make_record(ps, arr[:, offset:offset + nv], arr[:, offset + nv:offset + nv + nt]))
            offset += nv + nt
        self.sink.append(records)  # copies what it keeps
        del records, arr
        if item.pooled is not None and self.pool is not None:
            self.pool.put(item.pooled)
        self.on_released()
        self.stats.samples += len(item.batch.samples)
        self.stats.truncated += sum(ps.truncated for ps in item.batch.samples)
        self.stats.commits += self.policy.after_batch(len(item.batch.samples), self.sink)
        self.on_samples(len(item.batch.samples))
