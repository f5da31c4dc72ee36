"""Driver of the `mir extract` crash tests: runs each kill scenario in a forked child that SIGKILLs
itself at an exact point of the run.

Usage: python reliability_extract_driver.py PLAN.json RESULTS.json

PLAN: {"args": [extract arguments without --out], "scenarios": [{"name", "hook", "at", "out", "log"}]}.
torch, transformers and the model's classes are imported once here, before any tensor work, and
every scenario runs in a fork, so each costs a model load and a partial run (~0.3 s) instead of a
fresh interpreter (~3 s). The hooks only
decide *when* the process dies; the extraction and writer code run unchanged. Store writes are
watched through a zarr WrapperStore (fault_stores.py), never by patching zarr:

  before_append  the k-th batch reaches the archive writer (nothing of it written yet)
  after_commit   the k-th commit has returned (between batches)
  write          just before the k-th array write of the run (inside a batch's data writes)
  torn_chunk     the k-th hidden-state shard write is cut by the kernel half-way (a real torn
                 temporary file; the process dies of SIGXFSZ)
  commit_before  the k-th commit is about to replace the root zarr.json (the commit record)
  commit_unrenamed  the k-th new root zarr.json is being written to its temporary file and the
                 kernel cuts it one byte short: it is never renamed into place (SIGXFSZ)

Each child appends "committed N" to its log after every commit that returned, so the parent knows
exactly what was durable when it died.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from fault_stores import arm_tearing, tear_next_write, wrapping

import extract.extraction  # what `mir extract` imports lazily: imported once here, before forking
import extract.runner  # noqa: F401  (torch)
from extract.loading import load_processor
from pipelines.cli import main
from storage_schemas import writer as writer_module
from storage_schemas.writer import ArchiveWriter

CHILD_TIMEOUT_S = 120


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(hook: str, at: int, out: Path, log_fd: int) -> None:
    counts = {"append": 0, "commit": 0, "write": 0, "chunk": 0, "commit_put": 0}
    in_commit = {"on": False}
    real_append, real_commit, real_open = ArchiveWriter.append, ArchiveWriter._commit, ArchiveWriter.open_for_append
    real_append_along = writer_module._append_along

    def append(self, records):
        counts["append"] += 1
        if hook == "before_append" and counts["append"] == at:
            _die()
        return real_append(self, records)

    def commit(self, k):
        in_commit["on"] = True
        try:
            real_commit(self, k)
        finally:
            in_commit["on"] = False
        counts["commit"] += 1
        os.write(log_fd, f"committed {self.committed['samples']}\n".encode())
        if hook == "after_commit" and counts["commit"] == at:
            _die()

    def append_along(*args, **kwargs):
        counts["write"] += 1
        if hook == "write" and counts["write"] == at:
            _die()
        return real_append_along(*args, **kwargs)

    def on_set(key, value):
        if hook == "torn_chunk" and "/hidden/c/" in key:
            counts["chunk"] += 1
            if counts["chunk"] == at:
                tear_next_write(len(value) // 2)
        if in_commit["on"] and key == "zarr.json":
            counts["commit_put"] += 1
            if counts["commit_put"] == at:
                if hook == "commit_before":
                    _die()
                if hook == "commit_unrenamed":
                    tear_next_write(len(value) - 1)

    def open_for_append(path, **options):
        return real_open(path, wrap_store=wrapping(on_set), **options)

    arm_tearing()
    ArchiveWriter.append, ArchiveWriter._commit = append, commit
    ArchiveWriter.open_for_append = staticmethod(open_for_append)
    writer_module._append_along = append_along


def _preload(model: str) -> None:
    """Import the model's transformers classes here, once: a fork inherits them (no tensor work yet)."""
    import transformers

    config, _, _ = load_processor(model)
    getattr(transformers, config.architectures[0])


def _run_scenario(args: list[str], scenario: dict) -> dict:
    out, log = Path(scenario["out"]), Path(scenario["log"])
    pid = os.fork()
    if pid == 0:  # the child: run `mir extract` until the hook kills it
        code = 3
        try:
            log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            _install(scenario["hook"], scenario["at"], out, log_fd)
            main([*args, "--out", str(out)], standalone_mode=False)
            code = 0  # the hook never fired
        except BaseException as exc:
            print(f"{scenario['name']}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            code = 4
        finally:
            os._exit(code)
    deadline, timed_out = time.monotonic() + CHILD_TIMEOUT_S, False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline and not timed_out:  # never leave a hung child behind
            os.kill(pid, signal.SIGKILL)
            timed_out = True
        time.sleep(0.02)
    return {"name": scenario["name"], "timed_out": timed_out,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}


if __name__ == "__main__":
    plan = json.loads(Path(sys.argv[1]).read_text())
    _preload(plan["args"][plan["args"].index("--model") + 1])
    results = [_run_scenario(plan["args"], s) for s in plan["scenarios"]]
    Path(sys.argv[2]).write_text(json.dumps(results))
