"""Opening archives from a local path or any fsspec URL, and the first checks on what is there."""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import zarr

from .remote import RetryingStore
from .schema import SCHEMA_MAJOR, SCHEMA_NAME, ArchiveError

REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "gcs://", "az://", "abfs://", "memory://")


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(REMOTE_PREFIXES)


def local_path(location: str | Path) -> Path:
    """The directory a local location names (`file://` and `~` accepted)."""
    return Path(str(location).removeprefix("file://")).expanduser()


def open_store(location: str | Path, storage_options: dict | None = None, *, read_only: bool = True):
    """A zarr store for a local directory (`file://` accepted) or an fsspec URL (reads retried, see remote.py).
    Never executes code."""
    location = str(location)
    if is_remote(location):
        try:
            store = zarr.storage.FsspecStore.from_url(location, storage_options=storage_options or {},
                                                      read_only=True)
            return RetryingStore(store, location)
        except ImportError as exc:
            raise ArchiveError(f"reading {location} needs an fsspec backend: {exc}. "
                               "Install the remote extra: pip install 'mir-pipeline[remote]'") from exc
    path = local_path(location)
    if not path.is_dir():
        raise ArchiveError(f"{path}: no archive there (expected a directory written by `mir extract` or "
                           "`mir synth`)")
    return zarr.storage.LocalStore(path, read_only=read_only)


def read_root_attrs(location: str | Path, storage_options: dict | None = None, store=None) -> dict:
    """The root attributes, after checking that this is an archive of a schema version we understand."""
    store = store or open_store(location, storage_options)
    try:
        group = zarr.open_group(store, mode="r", zarr_format=3)
    except FileNotFoundError as exc:
        raise ArchiveError(f"{location}: not a Zarr v3 group (no zarr.json); is this an archive?") from exc
    except (ValueError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArchiveError(f"{location}: the root metadata (zarr.json) is unreadable: {exc}") from exc
    attrs = dict(group.attrs)
    check_schema(attrs, location)
    return attrs


def check_schema(attrs: dict, location) -> None:
    schema = attrs.get("schema")
    if not isinstance(schema, str) or "/" not in schema:
        raise ArchiveError(f"{location}: not a mir archive (root attribute 'schema' is {schema!r}, "
                           f"expected '{SCHEMA_NAME}/{SCHEMA_MAJOR}')")
    name, _, version = schema.partition("/")
    major = version.split(".")[0]
    if name != SCHEMA_NAME or major != str(SCHEMA_MAJOR):
        raise ArchiveError(f"{location}: unknown schema version {schema!r}; this mir-pipeline reads "
                           f"'{SCHEMA_NAME}/{SCHEMA_MAJOR}'. Upgrade mir-pipeline to read it.")
    commit = attrs.get("commit")
    if not isinstance(commit, dict) or not all(isinstance(commit.get(k), int) and commit[k] >= 0 for k in
                                               ("samples", "vision_tokens", "text_tokens", "input_tokens")):
        raise ArchiveError(f"{location}: the commit record (root attribute 'commit') is missing or malformed: "
                           f"{commit!r}")
    storage = attrs.get("storage")
    if not isinstance(storage, dict) or "hidden_size" not in storage or "dtype" not in storage:
        raise ArchiveError(f"{location}: root attribute 'storage' is missing or malformed")


def is_writable_local(location: str | Path) -> bool:
    if is_remote(str(location)):
        return False
    return os.access(local_path(location), os.W_OK)


# Codecs an archive may name. Anything else (e.g. numcodecs' pickle codec, which would run
# code when decoding) is refused before a byte of data is decoded.
ALLOWED_CODECS = frozenset({"bytes", "blosc", "zstd", "gzip", "crc32c", "sharding_indexed", "vlen-utf8",
                            "transpose"})


def check_codecs(array: zarr.Array, location: str, path: str) -> None:
    """Refuse arrays whose codec pipeline names anything outside ALLOWED_CODECS."""
    def names(codecs) -> list[str]:
        found = []
        for codec in codecs or ():
            codec = codec if isinstance(codec, dict) else {"name": str(codec)}
            found.append(codec.get("name", "?"))
            config = codec.get("configuration") or {}
            found += names(config.get("codecs")) + names(config.get("index_codecs"))
        return found

    meta = array.metadata.to_dict()
    bad = sorted(set(names(meta.get("codecs"))) - ALLOWED_CODECS)
    if bad:
        raise ArchiveError(f"{location}: array '{path}' names codecs {bad}, which a mir archive never uses; "
                           "refusing to decode it (an archive must not be able to run code on the reader)")


def chunk_keys(array: zarr.Array, length: int, axis: int, at: dict[int, int] | None = None) -> list[str]:
    """The store keys of the chunk (shard) files that hold the first `length` entries along `axis`, with the
    grid index fixed at `at` ({axis: index}) where given, in the array's own key encoding."""
    grid = array.shards or array.chunks
    ranges = [range(-(-size // step)) for size, step in zip(array.shape, grid)]
    ranges[axis] = range(-(-min(length, array.shape[axis]) // grid[axis]))
    for fixed, index in (at or {}).items():
        ranges[fixed] = range(index, index + 1)
    return [array.metadata.encode_chunk_key(index) for index in itertools.product(*ranges)]


def missing_chunk_files(location: str | Path, path: str, array: zarr.Array, length: int, axis: int) -> list[str]:
    """Chunk (shard) files of array `path` that its first `length` entries along `axis` need but that are
    absent or empty, for a local archive ([] for remote ones, which are not listed).

    Zarr reads a missing chunk as fill values, so a file lost in a copy would otherwise become zeros
    that look like data. The writer stores every chunk, even an all-zero one, so none may be missing.
    """
    location = str(location)
    if is_remote(location) or length <= 0 or 0 in array.shape or axis >= array.ndim:
        return []
    root = local_path(location) / path
    missing = []
    for key in chunk_keys(array, length, axis):
        try:
            if (root / key).stat().st_size == 0:
                missing.append(key)
        except FileNotFoundError:
            missing.append(key)
    return missing
