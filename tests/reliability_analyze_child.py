"""Child of the statistics-cache crash tests: `mir analyze` that SIGKILLs itself at an exact point of
writing its cache entries (analyze/cache.py: files written into a hidden temporary folder, the
`complete` marker last, then one rename publishes the entry).

Usage: python reliability_analyze_child.py KILL mir-arguments...
  put:K        just before the K-th file write inside an entry's temporary folder (counted over the run)
  rename:K     the K-th entry is complete in its temporary folder; die before the rename that publishes it
  published:K  die right after the K-th rename (entry published, stale entries not yet purged)
  count        no kill; print "entry <final name> <file writes>" for every entry published
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import zarr
from fault_stores import FaultStore

import analyze.cache as cache
from pipelines.cli import main

kill = sys.argv[1]
mode, _, at = kill.partition(":")
at = int(at or 0)
lock = threading.Lock()
state = {"puts": 0, "renames": 0, "per_tmp": {}, "published": []}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def before_write(path: Path) -> None:
    tmp = next((part for part in path.parts if part.startswith(".tmp-")), None)
    if tmp is not None:
        with lock:  # zarr writes chunks from several threads
            state["puts"] += 1
            state["per_tmp"][tmp] = state["per_tmp"].get(tmp, 0) + 1
            if mode == "put" and state["puts"] == at:
                _die()


class _Storage:
    """zarr.storage as analyze.cache sees it: a LocalStore comes wrapped in a FaultStore (zarr's public
    WrapperStore seam), which sees every file write."""

    def __getattr__(self, name):
        return getattr(zarr.storage, name)

    @staticmethod
    def LocalStore(root, **kwargs):  # noqa: N802 - zarr's name
        store = zarr.storage.LocalStore(root, **kwargs)
        return FaultStore(store, lambda key, value: before_write(Path(store.root) / key))


class _Zarr:
    """The zarr module as analyze.cache sees it, with the storage above."""

    storage = _Storage()

    def __getattr__(self, name):
        return getattr(zarr, name)


class _OS:
    """The os module as analyze.cache sees it, with a rename that can die around publishing."""

    def __getattr__(self, name):
        return getattr(os, name)

    def rename(self, src, dst):
        if Path(src).name.startswith(".tmp-"):
            state["renames"] += 1
            if mode == "rename" and state["renames"] == at:
                _die()
            os.rename(src, dst)
            state["published"].append((Path(dst).name, state["per_tmp"].get(Path(src).name, 0)))
            if mode == "published" and state["renames"] == at:
                _die()
            return
        os.rename(src, dst)


cache.zarr = _Zarr()
cache.os = _OS()
try:
    main(sys.argv[2:], standalone_mode=False)
finally:
    if mode == "count":
        for name, writes in state["published"]:
            print(f"entry {name} {writes}", flush=True)
