"""Where Dask graphs run: local threads (default) or an existing dask.distributed cluster.

One place decides the scheduler and the progress display, so the passes of the analysis do not care.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, redirect_stdout

import dask

from .errors import AnalysisError

CONNECT_TIMEOUT = "10s"
WORKER_PAUSE_SHARE = 0.8  # distributed's default memory.pause: a worker pauses its threads above it


def blas_threads(limit: int):
    """BLAS limited to `limit` threads (threadpoolctl); the BLAS default where it is not installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=max(1, int(limit)), user_api="blas")


def single_threaded_blas():
    """BLAS limited to one thread while our own threads run BLAS calls side by side.

    Measured on a 2-core machine: OpenBLAS's own thread pool on top of Dask's threads (or under any
    other load) made a 256 x 256 eigh 100x slower and the passes 3x slower. Uses threadpoolctl (a
    declared dependency); should an install lack it, the BLAS default stays.
    """
    return blas_threads(1)


class Runner:
    """Computes Dask collections; `scheduler` is None (local threads) or a scheduler address."""

    def __init__(self, scheduler: str | None = None, *, workers: int | None = None, progress: bool = False):
        self.address = scheduler
        self.workers = workers or os.cpu_count() or 1
        self.progress = progress
        self._client = None

    @property
    def distributed(self) -> bool:
        return self.address is not None

    def _connect(self):
        if self._client is None:
            try:
                from distributed import Client
                self._client = Client(self.address, timeout=CONNECT_TIMEOUT, set_as_default=False)
            except (OSError, TimeoutError) as exc:
                raise AnalysisError(f"cannot reach the Dask scheduler at {self.address}: {exc}. Start one with "
                                    "`dask scheduler` and workers with `dask worker ADDRESS`") from exc
        return self._client

    def compute(self, graph, label: str = ""):
        """Compute a (nested) structure of Dask collections / delayed objects."""
        if self.distributed:
            client = self._connect()
            future = client.compute(dask.delayed(graph))
            if self.progress:
                from distributed import progress
                if label:
                    print(label, file=sys.stderr)
                with client.as_current(), redirect_stdout(sys.stderr):  # its text bar writes to stdout
                    progress(future)
            return client.gather(future)
        bar = nullcontext()
        if self.progress:
            from dask.diagnostics import ProgressBar
            if label:
                print(label, file=sys.stderr)
            bar = ProgressBar(out=sys.stderr, dt=0.5)
        with bar, single_threaded_blas() if self.workers > 1 else nullcontext():
            return dask.compute(graph, scheduler="threads", num_workers=self.workers)[0]

    def map(self, fn, items: list) -> list:
        """fn over items on local threads (dense linear algebra per layer; LAPACK releases the GIL). BLAS
        gets the threads the items leave free (workers // items, 1 when there are at least as many items
        as workers): never more threads than workers, since on a loaded machine OpenBLAS's own threads on
        top of ours made an eigendecomposition of d = 2048 thirty times slower (measured: 11.8 s against
        0.36 s); but one layer alone (a small memory budget) would otherwise leave all but one core idle."""
        threads = min(self.workers, len(items))
        with blas_threads(self.workers // max(1, threads)):
            if threads < 2:
                return [fn(item) for item in items]
            with ThreadPoolExecutor(threads) as pool:
                return list(pool.map(fn, items))

    def worker_memory(self) -> tuple[int | None, int]:
        """(the memory a worker may use, None when no worker has a limit; the most threads a worker has):
        what memory.plan takes as the budget per worker. That memory is the smallest worker memory limit
        times the share at which distributed pauses a worker (distributed.worker.memory.pause, 0.8 by
        default; at 0.95 it kills it): a plan up to the limit itself would stall or lose workers."""
        info = self._connect().scheduler_info()
        workers = list(info.get("workers", {}).values())
        limits = [int(w["memory_limit"]) for w in workers if w.get("memory_limit")]
        threads = max([int(w.get("nthreads", 1)) for w in workers] or [1])
        if not limits:
            return None, threads
        share = dask.config.get("distributed.worker.memory.pause", WORKER_PAUSE_SHARE)
        share = share if isinstance(share, (int, float)) and 0 < share <= 1 else WORKER_PAUSE_SHARE
        return int(min(limits) * share), threads

    def describe(self) -> str:
        if self.distributed:
            return f"dask.distributed at {self.address}"
        return f"local threads ({self.workers})"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
