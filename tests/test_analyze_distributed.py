"""`--scheduler ADDRESS`: the same result on a real dask.distributed cluster (a `dask scheduler` and two
`dask worker` processes on 127.0.0.1) as with local threads."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from pipelines.cli import main
from storage_schemas.synth import write_synthetic_archive

distributed = pytest.importorskip("distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    address = f"tcp://127.0.0.1:{_free_port()}"
    common = ["--no-dashboard"]
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port",
                               address.rsplit(":", 1)[1], *common], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "dask", "worker", address, "--nthreads", "1",
                                           "--memory-limit", "1GB", "--no-nanny", *common],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while True:
            try:
                with distributed.Client(address, timeout="5s") as client:
                    client.wait_for_workers(2, timeout=max(1, deadline - time.time()))
                break
            except (OSError, TimeoutError):
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_distributed_equals_local(cluster, tmp_path):
    path = write_synthetic_archive(tmp_path / "a.zarr", layers=2, hidden=16, samples=10, vision_tokens=12,
                                   text_tokens=10, seed=2, chunk_tokens=16, chunks_per_shard=2)
    args = ["analyze", str(path), "--no-cache", "--json", "-", "--bootstrap", "5"]
    local = CliRunner().invoke(main, args, catch_exceptions=False)
    remote = CliRunner().invoke(main, [*args, "--scheduler", cluster, "--progress"], catch_exceptions=False)
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert b["settings"]["scheduler"] == f"dask.distributed at {cluster}"
    assert a["mir"] == b["mir"]  # same blocks, same arithmetic: bit-identical
    assert a["bootstrap"]["mir_replicates"] == b["bootstrap"]["mir_replicates"]


def test_unreachable_scheduler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("analyze.runner.CONNECT_TIMEOUT", "1s")
    path = write_synthetic_archive(tmp_path / "a.zarr", layers=1, hidden=8, samples=3, vision_tokens=5,
                                   text_tokens=5, seed=0)
    out = CliRunner().invoke(main, ["analyze", str(path), "--no-cache", "--scheduler",
                                    f"tcp://127.0.0.1:{_free_port()}"])
    assert out.exit_code != 0 and "cannot reach the Dask scheduler" in out.output
