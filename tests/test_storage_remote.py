"""Archives read from real HTTP and S3 servers on 127.0.0.1 equal the same archive read from disk."""
from __future__ import annotations

import pytest

from storage_schemas import ArchiveError, open_archive, validate_archive
from storage_schemas.synth import write_synthetic_archive

from remote_servers import http_server, s3_server, upload_dir


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
