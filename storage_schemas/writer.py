"""The only code that writes archives: create, append in committed batches, recover.

Commit protocol (see README.md, "Growth and crash safety"): hidden states are written ahead, as
their shards fill; a commit writes the per-token and per-sample arrays of the samples whose hidden
states are on disk, then rewrites the root attribute `commit` in one atomic file replace (zarr's
LocalStore writes through a temporary file and a rename). Readers trust only the commit record, so
a crash at any moment leaves the committed prefix intact and readable.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import Crc32cCodec, ZstdCodec

from .codecs import INDEX_CHUNK, chunk_tokens_for, chunks_per_shard_for, hidden_codec, hidden_compressors, \
    index_compressors
from .lock import WriterLock
from .records import SampleRecord
from .schema import (COMMIT_KEYS, HIDDEN, HIDDEN_DIMS, MODALITIES, ROLE_MEANINGS, SAMPLE_VARIABLES,
                     SAMPLES_GROUP, SCHEMA_VERSION, STORED_DTYPE, TOKEN_VARIABLES, ArchiveError, TextRole,
                     commit_key_for)
from .store import is_remote, local_path, read_root_attrs
from .stream import TokenStream
from .tables import Pending, write_tables

DEFAULT_COMMIT_SAMPLES = 4096  # accepted but uncommitted samples before `append` commits by itself
# Shards zarr encodes and writes at once. Each one in flight holds about two copies of a shard
# (the checksummed chunk and the assembled shard: 16 MiB at 4096 channels); zarr's default of 10
# added 160 MiB to the writer's peak memory at the paper's shape, 4 adds 64 MiB. The disk, not the
# encoding, sets the write speed (bench/writer_bench.py).
WRITE_CONCURRENCY = 4


class ArchiveWriter:
    """Appends samples to one archive; holds its writer lock while open. Use as a context manager.

    `append` streams hidden states to disk as whole shards fill (stream.py), so disk writes are
    spread over the run and each shard is written once. `commit` publishes every sample that is
    already on disk (cheap: only the small per-token and per-sample arrays and the commit record);
    `flush` also writes the partial boundary shards, so it commits everything accepted.
    """

    def __init__(self, path: Path, group: zarr.Group, lock: WriterLock, *,
                 commit_samples: int = DEFAULT_COMMIT_SAMPLES):
        self.path = path
        self.group = group
        self._lock = lock
        self.attrs: dict = dict(group.attrs)
        storage = self.attrs["storage"]
        self.layers = [int(x) for x in group["vision/layer"][:]]
        self.hidden_size = int(storage["hidden_size"])
        self.stored_dtype = storage["dtype"]
        self.source_dtype = storage["source_dtype"]
        self.commit_samples = commit_samples
        self._pending: list[Pending] = []  # accepted, not committed; their hidden states are streamed
        self._pending_attrs: dict = {}
        commit = self.attrs["commit"]
        with zarr.config.set({"array.write_empty_chunks": True}):  # an array takes the setting when opened
            self._streams = {m: TokenStream(group[f"{m}/{HIDDEN}"], commit[f"{m}_tokens"], _append_along)
                             for m in MODALITIES}
        n = commit["samples"]
        self._ids: set[str] = set(str(x) for x in group[f"{SAMPLES_GROUP}/sample_id"][:n]) if n else set()

    # ----------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | Path, *, layers: Sequence[int], hidden_size: int, dtype: str, attrs: dict,
               overwrite: bool = False, chunk_tokens: int | None = None,
               chunks_per_shard: int | None = None, codec: dict | None = None,
               **writer_options) -> "ArchiveWriter":
        """Create an empty archive atomically (built beside `path`, then renamed into place)."""
        path = _local_path(path)
        if dtype not in STORED_DTYPE:
            raise ArchiveError(f"dtype {dtype!r} is not storable; choose one of {sorted(STORED_DTYPE)}")
        if path.exists():
            if not overwrite:
                raise ArchiveError(f"{path} already exists; pass overwrite (--overwrite) to replace it, "
                                   "or resume (--resume) to append to it")
            shutil.rmtree(path)
        layers = [int(x) for x in layers]
        if not layers or len(set(layers)) != len(layers):
            raise ArchiveError(f"layers must be a non-empty list of distinct indices, got {layers}")
        stored = STORED_DTYPE[dtype]
        ct = chunk_tokens or chunk_tokens_for(hidden_size, np.dtype(stored).itemsize)
        chunks_per_shard = chunks_per_shard or chunks_per_shard_for(len(layers), ct, hidden_size,
                                                                    np.dtype(stored).itemsize)
        codec = hidden_codec(dtype, codec)
        tmp = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex[:8]}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            root = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3)
            root.attrs.update({
                "schema": SCHEMA_VERSION,
                **{k: attrs.get(k, {}) for k in ("model", "extraction", "dataset")},
                **{k: v for k, v in attrs.items() if k not in ("model", "extraction", "dataset")},
                "storage": {"dtype": stored, "source_dtype": dtype, "hidden_size": int(hidden_size),
                            "chunk_tokens": ct, "chunks_per_shard": chunks_per_shard,
                            "codec": codec, "created": _now()},
                "archive_uuid": uuid.uuid4().hex,
                "commit": {**{k: 0 for k in COMMIT_KEYS}, "generation": 0},
            })
            for modality in MODALITIES:
                _create_modality(root, modality, layers, hidden_size, stored, dtype, ct, chunks_per_shard, codec)
            samples = root.create_group(SAMPLES_GROUP)
            for name, (dim, dt) in SAMPLE_VARIABLES.items():
                _create_1d(samples, name, dim, dt)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open_for_append(path, **writer_options)

    @classmethod
    def open_for_append(cls, path: str | Path, *, wrap_store: Callable[[Store], Store] | None = None,
                        **writer_options) -> "ArchiveWriter":
        """Open an existing archive for appending: take the lock, roll back any interrupted append.

        `wrap_store` wraps the LocalStore every write goes through (e.g. a zarr.storage.WrapperStore
        that injects faults: the tests' seam, so they never patch zarr's internals)."""
        path = _local_path(path)
        attrs = read_root_attrs(str(path))  # raises a clear ArchiveError for non-archives / versions
        lock = WriterLock(path).acquire()
        try:
            store = zarr.storage.LocalStore(path)
            group = zarr.open_group(wrap_store(store) if wrap_store else store, mode="r+", zarr_format=3)
            _remove_partial_files(path)
            rolled = _truncate_to_commit(group, attrs["commit"])
            writer = cls(path, group, lock, **writer_options)
            writer.rolled_back_tokens = rolled
            return writer
        except BaseException:
            lock.release()
            raise

    # ----------------------------------------------------------------- appending
    @property
    def committed(self) -> dict:
        return dict(self.attrs["commit"])

    @property
    def committed_sample_ids(self) -> list[str]:
        n = self.attrs["commit"]["samples"]
        return [str(x) for x in self.group[f"{SAMPLES_GROUP}/sample_id"][:n]] if n else []

    def update_attrs(self, attrs: dict) -> None:
        """Merge JSON attributes into the root; they land with the next commit (or flush)."""
        self._pending_attrs.update(attrs)

    @property
    def pending_samples(self) -> int:
        """Samples accepted but not yet committed."""
        return len(self._pending)

    def append(self, records: Sequence[SampleRecord]) -> None:
        """Accept records and stream their hidden states to disk; nothing is committed here (unless
        `commit_samples` are pending). Duplicate or malformed samples are refused, the whole call."""
        batch_ids: set[str] = set()
        for rec in records:
            rec.check(n_layers=len(self.layers), hidden_size=self.hidden_size,
                      stored_dtype=self.stored_dtype, source_dtype=self.source_dtype)
            if rec.sample_id in self._ids or rec.sample_id in batch_ids:
                raise ArchiveError(f"sample {rec.sample_id!r} is already in {self.path} (sample ids must be "
                                   "unique)")
            batch_ids.add(rec.sample_id)
        for rec in records:
            self._ids.add(rec.sample_id)
            self._pending.append(Pending.of(rec))
            self._guarded(lambda: (self._streams["vision"].push(rec.vision),
                                   self._streams["text"].push(rec.text_hidden)))
        if len(self._pending) >= self.commit_samples:
            self.flush()

    def commit(self) -> int:
        """Commit every accepted sample whose hidden states are already on disk; write no hidden state.
        Returns the number of samples this committed."""
        vision = self._streams["vision"].durable - self.attrs["commit"]["vision_tokens"]
        text = self._streams["text"].durable - self.attrs["commit"]["text_tokens"]
        k = 0
        for rec in self._pending:
            if rec.n_vision > vision or rec.n_text > text:
                break
            vision, text, k = vision - rec.n_vision, text - rec.n_text, k + 1
        if k:
            self._commit(k)
        return k

    def flush(self) -> None:
        """Write everything accepted (the partial boundary shards too) and commit it. On failure the
        archive keeps its last commit."""
        if not self._pending and not self._pending_attrs:
            return
        self._guarded(lambda: [stream.flush() for stream in self._streams.values()])
        self._commit(len(self._pending))

    def close(self) -> None:
        """Commit what is accepted and release the lock."""
        try:
            self.flush()
        finally:
            self._lock.release()

    def abort(self) -> None:
        """Drop what is not committed and release the lock (the archive keeps its last commit; the
        next writer rolls back hidden states written past it)."""
        self._forget_pending()
        self._lock.release()

    def __enter__(self) -> "ArchiveWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ----------------------------------------------------------------- committing
    def _commit(self, k: int) -> None:
        """Write the small arrays of the first k pending samples, then the commit record."""
        records = self._pending[:k]
        before = self.committed

        def write() -> dict:
            new = write_tables(self.group, before, records, _append_along) if records else before
            update = {**self._pending_attrs, "commit": {**new, "generation": before["generation"] + 1}}
            self.group.attrs.update(update)  # the commit point: one atomic replace of zarr.json
            return update

        update = self._guarded(write)
        self.attrs.update(update)
        self._pending = self._pending[k:]
        self._pending_attrs = {}

    def _guarded(self, action):
        """Run a write; on failure roll back to the last commit and say what the archive still holds."""
        try:
            with zarr.config.set({"array.write_empty_chunks": True,  # see store.missing_chunk_files
                                  "async.concurrency": WRITE_CONCURRENCY}):
                return action()
        except BaseException as exc:
            before, dropped = self.committed, len(self._pending)
            self._forget_pending()
            try:
                _truncate_to_commit(self.group, before)
            except Exception:  # the next writer rolls back instead
                pass
            if isinstance(exc, OSError):
                raise ArchiveError(f"writing to {self.path} failed ({exc}); the archive still holds its "
                                   f"{before['samples']} committed samples and nothing of the {dropped} "
                                   "accepted after them") from exc
            raise

    def _forget_pending(self) -> None:
        for rec in self._pending:
            self._ids.discard(rec.sample_id)
        self._pending = []
        for modality, stream in self._streams.items():
            stream.reset(self.attrs["commit"][f"{modality}_tokens"])


# --------------------------------------------------------------------- helpers
def _local_path(path: str | Path) -> Path:
    if is_remote(str(path)):
        raise ArchiveError(f"{path}: archives are written to a local directory; copy or sync it to remote "
                           "storage afterwards (reading from URLs is supported)")
    return local_path(path).absolute()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _create_modality(root: zarr.Group, modality: str, layers: list[int], hidden_size: int, stored: str,
                     source: str, ct: int, cps: int, codec: dict) -> None:
    grp = root.create_group(modality)
    token_vars = TOKEN_VARIABLES[modality]
    grp.create_array(
        HIDDEN, shape=(len(layers), 0, hidden_size), dtype=stored, chunks=(1, ct, hidden_size),
        shards=(1, ct * cps, hidden_size), compressors=hidden_compressors(codec), fill_value=0,
        dimension_names=HIDDEN_DIMS,
        attributes={"coordinates": " ".join(token_vars), "source_dtype": source,
                    "long_name": f"{modality}-token hidden states"})
    # Checksummed like every other array: without it a flipped byte silently relabels layers.
    grp.create_array("layer", shape=(len(layers),), dtype="int32", dimension_names=("layer",),
                     compressors=index_compressors(),
                     attributes={"long_name": "index into the model's hidden_states tuple"})
    with zarr.config.set({"array.write_empty_chunks": True}):  # [0] equals the fill value, store it anyway
        grp["layer"][:] = np.asarray(layers, dtype="int32")
    for name, dt in token_vars.items():
        extra = {"flag_values": [int(r) for r in TextRole], "flag_meanings": ROLE_MEANINGS} if name == "role" else {}
        _create_1d(grp, name, "token", dt, extra)


def _create_1d(grp: zarr.Group, name: str, dim: str, dtype: str, attributes: dict | None = None) -> None:
    compressors = [ZstdCodec(level=3), Crc32cCodec()] if dtype == "str" else index_compressors()
    grp.create_array(name, shape=(0,), dtype=str if dtype == "str" else dtype, chunks=(INDEX_CHUNK,),
                     compressors=compressors, dimension_names=(dim,), attributes=attributes or {})


def _growing_arrays(group: zarr.Group):
    """Yield (array, axis, commit key) for every array that grows with appends."""
    for modality in MODALITIES:
        yield group[f"{modality}/{HIDDEN}"], 1, f"{modality}_tokens"
        for name in TOKEN_VARIABLES[modality]:
            yield group[f"{modality}/{name}"], 0, f"{modality}_tokens"
    for name in SAMPLE_VARIABLES:
        yield group[f"{SAMPLES_GROUP}/{name}"], 0, commit_key_for(SAMPLES_GROUP, name)


# zarr's LocalStore writes `<key>.<uuid>.partial`, then renames it into place; the crash tests
# check that a real interrupted write leaves exactly such a file.
TEMPORARY_SUFFIX = ".partial"


def _remove_partial_files(path: Path) -> None:
    """Delete temporary files a killed writer left behind. Safe here: the caller holds the writer
    lock, so no live writer owns them."""
    for leftover in path.rglob(f"*{TEMPORARY_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def _truncate_to_commit(group: zarr.Group, commit: dict) -> int:
    """Shrink arrays an interrupted append left longer than the commit record; return tokens dropped."""
    dropped = 0
    for arr, axis, key in _growing_arrays(group):
        if arr.shape[axis] > commit[key]:
            if key.endswith("_tokens") and axis == 1:
                dropped += arr.shape[axis] - commit[key]
            shape = list(arr.shape)
            shape[axis] = commit[key]
            arr.resize(tuple(shape))
    return dropped


def _append_along(arr: zarr.Array, axis: int, start: int, values: np.ndarray) -> None:
    shape = list(arr.shape)
    shape[axis] = start + values.shape[axis]
    arr.resize(tuple(shape))
    if values.shape[axis]:
        region = [slice(None)] * arr.ndim
        region[axis] = slice(start, start + values.shape[axis])
        arr[tuple(region)] = values
