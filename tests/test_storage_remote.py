"""Archives read from real HTTP and S3 servers on 127.0.0.1 equal the same archive read from disk; a
server that fails a few requests and recovers gives the archive unchanged; one that keeps failing, or
is down, is reported as unreachable, never as a damaged archive."""
from __future__ import annotations

import dask
import numpy as np
import pytest
from click.testing import CliRunner

from pipelines.cli import main
from storage_schemas import ArchiveError, open_archive, remote, validate_archive
from storage_schemas.remote import StoreAccessError, classify
from storage_schemas.synth import write_synthetic_archive

from remote_servers import down_url, flaky_http_server, http_server, s3_server, upload_dir


@pytest.fixture(scope="module")
def local_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    write_synthetic_archive(root / "a.zarr", layers=2, hidden=32, samples=6, vision_tokens=10, text_tokens=8,
                            seed=4, chunk_tokens=16, chunks_per_shard=2)
    return root / "a.zarr"


def _same(a, b):
    assert a.fingerprint == b.fingerprint
    for m in ("vision", "text"):
        assert getattr(a, m).hidden.values.tobytes() == getattr(b, m).hidden.values.tobytes()
    assert a.samples.sample_id.values.tolist() == b.samples.sample_id.values.tolist()


def test_http(local_archive):
    with http_server(local_archive.parent) as base:
        url = f"{base}/a.zarr"
        remote = open_archive(url)
        assert remote.read_only
        _same(remote, open_archive(local_archive))
        report = validate_archive(url)
        assert report.ok, report.problems
        with pytest.raises(ArchiveError, match="no archive there|not a Zarr v3 group"):
            open_archive(f"{base}/missing.zarr")


def test_s3(local_archive):
    with s3_server() as (_, options):
        upload_dir(local_archive, "s3://shared/runs/a.zarr", options)
        remote = open_archive("s3://shared/runs/a.zarr", storage_options=options)
        assert remote.read_only
        _same(remote, open_archive(local_archive))
        assert validate_archive("s3://shared/runs/a.zarr", storage_options=options).ok


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_DELAYS", (0.01, 0.02, 0.04))  # 4 attempts, as many as the default's shape


@pytest.mark.parametrize("mode", ["status", "drop"])
def test_transient_failures_are_retried(local_archive, mode, quick_retries):
    expected = open_archive(local_archive).vision.hidden.values
    with flaky_http_server(local_archive.parent) as (base, plan):
        plan.fail_next(3, mode)  # while opening: the root metadata
        archive = open_archive(f"{base}/a.zarr")
        plan.fail_next(3, mode)  # while reading data
        values = archive.vision.hidden.values
        assert plan.failed == 6
    np.testing.assert_array_equal(values, expected)


def test_a_store_that_keeps_failing_is_unreachable_not_damaged(local_archive, quick_retries):
    with flaky_http_server(local_archive.parent) as (base, plan):
        archive = open_archive(f"{base}/a.zarr")
        plan.fail_next(10_000)
        with dask.config.set(scheduler="synchronous"), pytest.raises(StoreAccessError) as info:
            archive.text.hidden.values
        assert plan.failed == 4  # bounded: one attempt and three retries per read, then it gives up
    message = str(info.value)
    assert "cannot reach the store" in message and "not known to be damaged" in message
    assert "text/hidden" in message and "mir validate" not in message


def test_a_down_server(local_archive, quick_retries):
    url = f"{down_url()}/a.zarr"
    with pytest.raises(StoreAccessError, match="cannot reach the store"):
        open_archive(url)
    report = validate_archive(url)
    assert not report.ok and all("cannot reach" in p for p in report.problems)
    with http_server(local_archive.parent) as base:
        archive = open_archive(f"{base}/a.zarr")
    with pytest.raises(StoreAccessError, match="cannot reach the store"):  # the server went down after opening
        archive.vision.hidden.values
    out = CliRunner().invoke(main, ["analyze", url, "--no-cache"])
    assert out.exit_code == 1 and "cannot reach the store" in out.output and "is damaged" not in out.output


def test_classification():
    class Response(Exception):
        def __init__(self, status):
            self.status = status

    assert classify(Response(503)) == "transient" and classify(Response(429)) == "transient"
    assert classify(Response(403)) == "refused" and classify(PermissionError("denied")) == "refused"
    assert classify(ConnectionResetError()) == "transient" and classify(TimeoutError()) == "transient"
    assert classify(ValueError("checksum mismatch")) is None and classify(Response(404)) is None
    assert issubclass(StoreAccessError, ArchiveError)


def test_an_s3_store_that_went_down(local_archive, quick_retries):
    with s3_server() as (_, options):
        upload_dir(local_archive, "s3://shared/down/a.zarr", options)
        options = {**options, "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
        archive = open_archive("s3://shared/down/a.zarr", storage_options=options)
    with pytest.raises(StoreAccessError, match="cannot reach the store") as info:
        archive.vision.hidden.values
    assert "EndpointConnectionError" in str(info.value) and "is damaged" not in str(info.value)
