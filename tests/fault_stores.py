"""Fault injection through zarr's public seam: a `zarr.storage.WrapperStore` around the writer's
LocalStore (`ArchiveWriter.create/open_for_append(..., wrap_store=...)`), so no test patches zarr's
private functions, and a zarr upgrade that changed them could not silently disable a test.

Interrupted writes are real: `tear_next_write` lowers the process's file-size limit, so the kernel
cuts the next file write short and kills the process with SIGXFSZ, leaving the torn temporary file
exactly where zarr put it.
"""
from __future__ import annotations

import resource
import signal
from collections.abc import Callable

from zarr.abc.store import Store
from zarr.storage import WrapperStore

OnSet = Callable[[str, object], None]  # (key, buffer) before each write; may raise or kill the process


class FaultStore(WrapperStore):
    """Delegates everything to the wrapped store; calls `on_set` before each write."""

    def __init__(self, store: Store, on_set: OnSet):
        super().__init__(store)
        self.on_set = on_set

    def _with_store(self, store: Store) -> "FaultStore":
        return type(self)(store, self.on_set)

    async def set(self, key: str, value) -> None:
        self.on_set(key, value)
        await self._store.set(key, value)


def wrapping(on_set: OnSet) -> Callable[[Store], Store]:
    """The `wrap_store` argument of the writer for this hook."""
    return lambda store: FaultStore(store, on_set)


def arm_tearing() -> None:
    """Call once, from the main thread: writing past the file-size limit kills the process (Python
    ignores SIGXFSZ by default), without a core file."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)


def tear_next_write(keep_bytes: int) -> None:
    """From any thread: the kernel writes at most `keep_bytes` of the next file written, then kills
    the process with SIGXFSZ (after `arm_tearing`)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (max(0, keep_bytes), resource.RLIM_INFINITY))
