"""Lazy, Dask-backed views of one or several archives, and selections of samples, layers and tokens.

Only the committed prefix (root attribute `commit`) is ever visible. Hidden states are read
shard by shard (one shard = one Dask chunk); a chunk that fails to decode raises an
ArchiveError naming the archive, array and token range instead of a codec traceback. Opening
checks the structure a reader relies on (dimension names, shapes, the layer lists, offsets
against the commit record), so a schema-breaking edit is refused instead of becoming numbers.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from .schema import (DEFAULT_TEXT_TOKEN_RULE, HIDDEN, HIDDEN_DIMS, MODALITIES, SAMPLE_VARIABLES, SAMPLES_GROUP,
                     TOKEN_VARIABLES, ArchiveError, TextTokenRule, commit_key_for, dimension_names, offsets_mismatch,
                     sample_index_matches)
from .provenance import json_digest
from .remote import StoreAccessError
from .store import check_codecs, is_writable_local, missing_chunk_files, open_store, read_root_attrs

SampleSpec = None | slice | Sequence[int] | np.ndarray | Sequence[str] | Callable[[xr.Dataset], np.ndarray]


# What `mir synth` recorded before the rule was a declared default: every role stored, no rule chosen.
LEGACY_SYNTH_RULE = "roles"

class StoredArraySource:
    """Array-like over one stored array, cut to the committed length; picklable for Dask workers."""

    def __init__(self, location: str, storage_options: dict | None, path: str, shape: tuple, dtype):
        self.location, self.storage_options, self.path = location, storage_options, path
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self._array = None

    def _open(self) -> zarr.Array:
        if self._array is None:
            store = open_store(self.location, self.storage_options)
            self._array = zarr.open_array(store, path=self.path, mode="r", zarr_format=3)
        return self._array

    def __getitem__(self, key):
        try:
            return self._open()[key]
        except StoreAccessError as exc:
            raise StoreAccessError(f"{exc} (reading array '{self.path}', region {_describe(key, self.shape)})") from exc
        except Exception as exc:
            hint = (" If it is served over HTTP, the server must honour Range requests (nginx, Apache, S3 and "
                    "GCS do; `python -m http.server` does not)." if self.location.startswith("http") else "")
            raise ArchiveError(
                f"{self.location}: array '{self.path}', region {_describe(key, self.shape)} cannot be read "
                f"({type(exc).__name__}: {exc}). The archive is damaged; run `mir validate {self.location}`."
                + hint) from exc

    def __getstate__(self):
        return {**self.__dict__, "_array": None}


def _describe(key, shape: tuple) -> str:
    """The region as index ranges, e.g. [1:2, 0:4096, 0:4096] (open ends filled in from the shape)."""
    parts = []
    for k, size in zip(key if isinstance(key, tuple) else (key,), shape):
        if isinstance(k, slice):
            start, stop, _ = k.indices(size)
            parts.append(f"{start}:{stop}")
        else:
            parts.append(str(k))
    return "[" + ", ".join(parts) + "]"


class _Part:
    """One archive on disk or behind a URL."""

    def __init__(self, location: str | Path, storage_options: dict | None = None):
        self.location = str(location)
        self.storage_options = storage_options
        store = open_store(self.location, storage_options)
        self.attrs = read_root_attrs(self.location, storage_options, store=store)
        self.commit = self.attrs["commit"]
        try:
            self.group = zarr.open_group(store, mode="r", zarr_format=3)
            self.layers = self._read_layers()
            self.index = {m: {name: self._read_1d(f"{m}/{name}", f"{m}_tokens") for name in TOKEN_VARIABLES[m]}
                          for m in MODALITIES}
            self.table = {name: self._read_1d(f"{SAMPLES_GROUP}/{name}", commit_key_for(SAMPLES_GROUP, name))
                          for name in SAMPLE_VARIABLES}
            self.hidden = {m: self._hidden(m) for m in MODALITIES}
        except KeyError as exc:
            raise ArchiveError(f"{self.location}: array {exc} is missing; run `mir validate {self.location}`") from exc
        self._check_offsets()

    def _array(self, path: str) -> zarr.Array:
        try:
            arr = self.group[path]
        except (KeyError, StoreAccessError):
            raise
        except Exception as exc:
            raise ArchiveError(f"{self.location}: the metadata of array '{path}' is unreadable "
                               f"({type(exc).__name__}: {exc}); run `mir validate {self.location}`") from exc
        if not isinstance(arr, zarr.Array):
            raise ArchiveError(f"{self.location}: '{path}' is a group, expected an array; run "
                               f"`mir validate {self.location}`")
        check_codecs(arr, self.location, path)
        names, expected = tuple(arr.metadata.dimension_names or ()), dimension_names(path)
        if names != expected:
            raise ArchiveError(f"{self.location}: array '{path}' has dimensions {names}, expected {expected}; the "
                               f"archive does not follow its schema (run `mir validate {self.location}`)")
        # Every chunk file of the committed region must be there: zarr would read a lost one as zeros.
        group, name = path.split("/")
        length = arr.shape[0] if name == "layer" else self.commit[commit_key_for(group, name)]
        missing = missing_chunk_files(self.location, path, arr, length, 1 if name == HIDDEN else 0)
        if missing:
            raise ArchiveError(f"{self.location}: array '{path}' lacks chunk file(s) {', '.join(missing[:5])} of its "
                               "committed region (missing or empty); the archive is incomplete or damaged, was it "
                               "copied completely? (run `mir validate`)")
        return arr

    def _read_layers(self) -> np.ndarray:
        """The stored layer indices; both modalities must list the same distinct ones."""
        found = []
        for m in MODALITIES:
            arr = self._array(f"{m}/layer")
            source = StoredArraySource(self.location, self.storage_options, f"{m}/layer", arr.shape, arr.dtype)
            found.append(np.asarray(source[:], dtype=np.int64))
        vision, text = found
        if not np.array_equal(vision, text) or np.unique(vision).size != vision.size or (vision < 0).any():
            raise ArchiveError(f"{self.location}: 'vision/layer' {vision.tolist()} and 'text/layer' {text.tolist()} "
                               "must list the same distinct layers; the archive is damaged (run `mir validate`)")
        return vision

    def _check_offsets(self) -> None:
        """Each sample's token slices must tile the committed token axes exactly, as the commit record says."""
        for prefix, count_name, total in (("vision", "vision_count", "vision_tokens"),
                                          ("text", "text_count", "text_tokens"),
                                          ("input", "input_length", "input_tokens")):
            counts = self.table[count_name]
            if offsets_mismatch(self.table[f"{prefix}_offset"], counts, self.commit[total])[0]:
                raise ArchiveError(f"{self.location}: 'samples/{prefix}_offset' and 'samples/{count_name}' disagree "
                                   f"with each other or with the commit record ({self.commit[total]} {total}); the "
                                   "archive is damaged (run `mir validate`)")
            if prefix in MODALITIES and not sample_index_matches(self.index[prefix]["sample"], counts):
                raise ArchiveError(f"{self.location}: '{prefix}/sample' does not match 'samples/{count_name}'; "
                                   "the archive is damaged (run `mir validate`)")

    def _read_1d(self, path: str, key: str) -> np.ndarray:
        n = self.commit[key]
        arr = self._array(path)
        if arr.shape[0] < n:
            raise ArchiveError(f"{self.location}: '{path}' holds {arr.shape[0]} entries but the commit record "
                               f"says {n}; the archive is damaged (run `mir validate`)")
        return StoredArraySource(self.location, self.storage_options, path, (n,), arr.dtype)[:n] if n else \
            np.zeros(0, dtype=object if arr.dtype.kind in "OTU" else arr.dtype)

    def _hidden(self, modality: str) -> da.Array:
        arr = self._array(f"{modality}/{HIDDEN}")
        storage = self.attrs["storage"]
        want = (self.layers.size, int(storage["hidden_size"]))
        if arr.ndim != 3 or (arr.shape[0], arr.shape[2]) != want or arr.dtype != np.dtype(storage["dtype"]):
            raise ArchiveError(f"{self.location}: '{modality}/hidden' has shape {arr.shape} and dtype {arr.dtype}, but "
                               f"the layer list and root attribute 'storage' say ({want[0]}, tokens, {want[1]}) "
                               f"{storage['dtype']}; the archive is damaged (run `mir validate`)")
        n = self.commit[f"{modality}_tokens"]
        if arr.shape[1] < n:
            raise ArchiveError(f"{self.location}: '{modality}/hidden' holds {arr.shape[1]} tokens but the commit "
                               f"record says {n}; the archive is damaged (run `mir validate`)")
        shape = (arr.shape[0], n, arr.shape[2])
        shard_tokens = (arr.shards or arr.chunks)[1]
        source = StoredArraySource(self.location, self.storage_options, f"{modality}/{HIDDEN}", shape, arr.dtype)
        name = f"mir-{self.fingerprint()}-{modality}"
        return da.from_array(source, chunks=(1, shard_tokens, shape[2]), name=name, asarray=False,
                             fancy=False, lock=False, meta=np.empty((0, 0, 0), dtype=arr.dtype))

    def fingerprint(self) -> str:
        return _hash([self.attrs.get("archive_uuid"), self.commit])


def _hash(obj) -> str:
    return json_digest(obj, 16)


_COMPAT_MODEL_KEYS = ("weights_hash", "config_hash", "architecture", "hidden_size", "num_hidden_layers")


class Archive:
    """One logical archive over one or more parts (e.g. the `--shard` outputs of one extraction)."""

    def __init__(self, parts: list[_Part]):
        self.parts = parts
        first = parts[0]
        self._check_compatible()
        self.attrs: dict = dict(first.attrs)
        if len(parts) > 1:
            self.attrs["parts"] = [{"location": p.location, "commit": p.commit} for p in parts]
        self.layers = first.layers
        self.hidden_size = int(first.attrs["storage"]["hidden_size"])
        self.stored_dtype = first.attrs["storage"]["dtype"]
        self.source_dtype = first.attrs["storage"].get("source_dtype", self.stored_dtype)
        self.paths = [p.location for p in parts]
        self.read_only = not all(is_writable_local(p.location) for p in parts)
        self.fingerprint = _hash([p.fingerprint() for p in parts])
        self._build()

    def _check_compatible(self) -> None:
        first = self.parts[0]
        for p in self.parts[1:]:
            same_storage = all(p.attrs["storage"].get(k) == first.attrs["storage"].get(k)
                               for k in ("hidden_size", "dtype", "source_dtype"))
            if not np.array_equal(p.layers, first.layers) or not same_storage:
                raise ArchiveError(f"{p.location} does not match {first.location}: different layers, hidden size "
                                   "or stored dtype; only parts of one extraction can be read as one archive")
            for key in _COMPAT_MODEL_KEYS:
                a, b = first.attrs.get("model", {}).get(key), p.attrs.get("model", {}).get(key)
                if a is not None and b is not None and a != b:
                    raise ArchiveError(f"{p.location} was written by a different model than {first.location} "
                                       f"(model.{key}: {b!r} vs {a!r})")
            a = first.attrs.get("extraction", {}).get("settings_hash")
            b = p.attrs.get("extraction", {}).get("settings_hash")
            if a is not None and b is not None and a != b:
                raise ArchiveError(f"{p.location} was extracted with different settings than {first.location}")

    def _build(self) -> None:
        sample_shift = 0
        tables: dict[str, list] = {name: [] for name in SAMPLE_VARIABLES}
        part_of_sample = []
        shifts = {m: 0 for m in MODALITIES} | {"input": 0}
        index = {m: {name: [] for name in TOKEN_VARIABLES[m]} for m in MODALITIES}
        for k, p in enumerate(self.parts):
            for name, values in p.table.items():
                if name.endswith("_offset"):
                    values = values + shifts[name.removesuffix("_offset")]
                tables[name].append(values)
            for m in MODALITIES:
                for name, values in p.index[m].items():
                    index[m][name].append(values + sample_shift if name == "sample" else values)
                shifts[m] += p.commit[f"{m}_tokens"]
            shifts["input"] += p.commit["input_tokens"]
            part_of_sample.append(np.full(p.commit["samples"], k, dtype=np.int32))
            sample_shift += p.commit["samples"]
        table = {name: np.concatenate(v) for name, v in tables.items()}
        for name in ("sample_id", "image", "text"):
            table[name] = np.array(table[name].tolist(), dtype=str)
        ids = table["sample_id"]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if (ids == i).sum() > 1})[:5]
            raise ArchiveError(f"sample ids occur in more than one part or twice: {dup}")
        self.n_samples = int(len(ids))
        self.input_ids = table.pop("input_ids")
        data = {name: ("sample", v) for name, v in table.items()}
        if len(self.parts) > 1:
            data["part"] = ("sample", np.concatenate(part_of_sample))
        self.samples = xr.Dataset(data, attrs={"archive_fingerprint": self.fingerprint})
        self._datasets = {}
        for m in MODALITIES:
            hidden = da.concatenate([p.hidden[m] for p in self.parts], axis=1) if len(self.parts) > 1 \
                else self.parts[0].hidden[m]
            coords = {"layer": self.layers}
            coords.update({name: ("token", np.concatenate(v)) for name, v in index[m].items()})
            self._datasets[m] = xr.Dataset({"hidden": (HIDDEN_DIMS, hidden)}, coords=coords,
                                           attrs={"source_dtype": self.source_dtype})
        self.vision, self.text = self._datasets["vision"], self._datasets["text"]

    # ------------------------------------------------------------------ queries
    def sample_input_ids(self, row: int) -> np.ndarray:
        """The full input token ids of sample `row`, to re-run its forward pass."""
        o, n = int(self.samples.input_offset[row]), int(self.samples.input_length[row])
        return self.input_ids[o:o + n]

    def resolve_samples(self, samples: SampleSpec) -> np.ndarray:
        """Sample rows (sorted, unique) named by a slice, indices, ids or a predicate on the table."""
        n = self.n_samples
        if samples is None:
            return np.arange(n)
        if isinstance(samples, slice):
            return np.arange(n)[samples]
        if callable(samples):
            mask = np.asarray(samples(self.samples), dtype=bool)
            if mask.shape != (n,):
                raise ArchiveError(f"the sample predicate returned shape {mask.shape}, expected ({n},)")
            return np.flatnonzero(mask)
        items = list(samples)
        if items and all(isinstance(s, str) for s in items):
            position = {sid: i for i, sid in enumerate(self.samples.sample_id.values)}
            missing = [s for s in items if s not in position]
            if missing:
                raise ArchiveError(f"sample ids not in the archive: {missing[:5]}"
                                   + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
            return np.unique([position[s] for s in items])
        rows = np.unique(np.asarray(items, dtype=np.int64))
        if rows.size and (rows[0] < 0 or rows[-1] >= n):
            raise ArchiveError(f"sample indices must lie in 0..{n - 1}; got {rows[0]}..{rows[-1]}")
        return rows

    def resolve_layers(self, layers: Sequence[int] | None) -> np.ndarray:
        if layers is None:
            return self.layers.copy()
        wanted = np.asarray(list(layers), dtype=np.int64)
        missing = sorted(set(wanted.tolist()) - set(self.layers.tolist()))
        if missing:
            raise ArchiveError(f"layers {missing} are not stored; this archive has layers "
                               f"{self.layers.tolist()}")
        return wanted

    @property
    def hidden_states_entries(self) -> int:
        """Size of the layer index space (the model's hidden_states: embeddings plus decoder layers), so
        that a negative `--layers` index means the same layer here as in `mir extract`."""
        recorded = self.attrs.get("model", {}).get("num_hidden_layers")
        top = int(self.layers.max()) + 1 if self.layers.size else 0
        return max(int(recorded) + 1, top) if isinstance(recorded, int) else top

    @property
    def text_token_rule(self) -> TextTokenRule:
        """The default text-token rule recorded at extraction (`extraction.text_token_rule`), else the
        reference rule."""
        recorded = self.attrs.get("extraction", {}).get("text_token_rule")
        if recorded is None or recorded == LEGACY_SYNTH_RULE:
            return DEFAULT_TEXT_TOKEN_RULE
        try:
            return TextTokenRule.parse(recorded)
        except ArchiveError:
            raise ArchiveError(f"{self.paths[0]}: root attribute extraction.text_token_rule is {recorded!r}, not a "
                               f"rule this version knows ({', '.join(r.value for r in TextTokenRule)}); choose one "
                               "explicitly (--text-tokens)") from None

    def select(self, samples: SampleSpec = None, layers: Sequence[int] | None = None,
               text_tokens: str | TextTokenRule | None = None) -> "Selection":
        """A lazy view of the chosen samples, layers and text-token rule (None: the archive's own rule)."""
        rule = self.text_token_rule if text_tokens is None else TextTokenRule.parse(text_tokens)
        rows = self.resolve_samples(samples)
        layer_values = self.resolve_layers(layers)
        all_rows = rows.size == self.n_samples
        views = {}
        for m in MODALITIES:
            ds = self._datasets[m]
            keep = np.ones(ds.sizes["token"], dtype=bool) if all_rows else np.isin(ds["sample"].values, rows)
            if m == "text":
                keep &= np.isin(ds["role"].values, rule.roles)
            token = slice(None) if keep.all() else np.flatnonzero(keep)
            views[m] = ds["hidden"].sel(layer=layer_values).isel(token=token)
        return Selection(self, layer_values, rows, rule.value, views["vision"], views["text"])


@dataclass
class Selection:
    """Chosen samples x layers x tokens of an archive; the arrays are lazy (Dask)."""

    archive: Archive
    layers: np.ndarray
    sample_index: np.ndarray
    text_tokens: str
    vision: xr.DataArray
    text: xr.DataArray

    @property
    def sample_ids(self) -> list[str]:
        return self.archive.samples.sample_id.values[self.sample_index].tolist()

    @property
    def key(self) -> dict:
        """JSON identity of this selection: changes with the archive content or any choice made."""
        return {"archive": self.archive.fingerprint, "layers": self.layers.tolist(),
                "samples": _hash(self.sample_index.tolist()), "n_samples": int(self.sample_index.size),
                "text_tokens": self.text_tokens}


def open_archive(location: str | Path | Sequence[str | Path], storage_options: dict | None = None) -> Archive:
    """Open one archive, or several parts of one extraction as one archive. Read-only; runs no code."""
    locations = [location] if isinstance(location, (str, Path)) else list(location)
    if not locations:
        raise ArchiveError("no archive given")
    return Archive([_Part(loc, storage_options) for loc in locations])
