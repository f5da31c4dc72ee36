"""Full verification of an archive: schema, shapes, offsets, and every chunk's checksum.

Every finding is a sentence naming the array (and chunk) concerned, so a damaged archive is
reported, never turned into numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from .schema import (HIDDEN, HIDDEN_DIMS, MODALITIES, SAMPLE_VARIABLES, SAMPLES_GROUP, TOKEN_VARIABLES,
                     ArchiveError, TextRole, commit_key_for, offsets_mismatch,
                     sample_index_matches)
from .remote import StoreAccessError
from .sidecars import root_findings
from .store import check_codecs, missing_chunk_files, open_store, read_root_attrs


@dataclass
class ValidationReport:
    location: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked_chunks: int = 0
    attrs: dict = field(default_factory=dict)
    sidecars: list[str] = field(default_factory=list)  # declared sidecars present (derived data, not checked)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_archive(location: str | Path, storage_options: dict | None = None, *,
                     check_chunks: bool = True) -> ValidationReport:
    """Check everything a reader relies on. Never raises for a damaged archive: it reports.

    Sidecars (storage_schemas.sidecars) are named in `sidecars`, not checked: they are derived data."""
    report = ValidationReport(str(location))
    try:
        store = open_store(location, storage_options)
        report.attrs = attrs = read_root_attrs(location, storage_options, store=store)
        group = zarr.open_group(store, mode="r", zarr_format=3)
    except ArchiveError as exc:
        report.problems.append(str(exc))
        return report
    report.sidecars, foreign = root_findings(location)
    report.warnings += foreign
    try:
        _check_content(group, attrs, report, check_chunks)
    except StoreAccessError as exc:  # not a finding about the archive: say so, and stop
        report.problems.append(f"validation could not finish: {exc}")
    return report


def _check_content(group: zarr.Group, attrs: dict, report: ValidationReport, check_chunks: bool) -> None:
    commit = attrs["commit"]
    arrays = _open_arrays(group, report)
    if report.problems:
        return
    _check_files(report.location, arrays, commit, report)
    _check_shapes(arrays, attrs, commit, report)
    if report.problems:
        return
    _check_tables(arrays, commit, report)
    if check_chunks:
        for path, arr in arrays.items():
            _check_chunks(path, arr, commit, report)


def _expected_arrays() -> dict[str, tuple[tuple[str, ...], str]]:
    expected = {}
    for m in MODALITIES:
        expected[f"{m}/{HIDDEN}"] = (HIDDEN_DIMS, "float")
        expected[f"{m}/layer"] = (("layer",), "int")
        for name, dt in TOKEN_VARIABLES[m].items():
            expected[f"{m}/{name}"] = (("token",), dt)
    for name, (dim, dt) in SAMPLE_VARIABLES.items():
        expected[f"{SAMPLES_GROUP}/{name}"] = ((dim,), dt)
    return expected


def _open_arrays(group: zarr.Group, report: ValidationReport) -> dict[str, zarr.Array]:
    arrays = {}
    for path, (dims, dt) in _expected_arrays().items():
        try:
            arr = group[path]
        except KeyError:
            report.problems.append(f"array '{path}' is missing")
            continue
        except StoreAccessError:
            raise
        except Exception as exc:  # unreadable metadata
            report.problems.append(f"array '{path}': metadata unreadable ({type(exc).__name__}: {exc})")
            continue
        if not isinstance(arr, zarr.Array):
            report.problems.append(f"'{path}' is a group, expected an array")
            continue
        try:
            check_codecs(arr, report.location, path)
        except ArchiveError as exc:
            report.problems.append(str(exc))
            continue
        names = tuple(arr.metadata.dimension_names or ())
        if names != dims:
            report.problems.append(f"array '{path}' has dimensions {names}, expected {dims}")
        kind = arr.dtype.kind
        ok = (kind == "f" if dt == "float" else kind in "iu" if dt == "int" else
              kind in "OTU" if dt == "str" else arr.dtype == np.dtype(dt))
        if not ok:
            report.problems.append(f"array '{path}' has dtype {arr.dtype}, expected {dt}")
        arrays[path] = arr
    return arrays


def _check_shapes(arrays: dict, attrs: dict, commit: dict, report: ValidationReport) -> None:
    hidden_size = attrs["storage"]["hidden_size"]
    for m in MODALITIES:
        hidden, layer = arrays[f"{m}/{HIDDEN}"], arrays[f"{m}/layer"]
        if hidden.shape[0] != layer.shape[0]:
            report.problems.append(f"'{m}/hidden' has {hidden.shape[0]} layers but '{m}/layer' lists "
                                   f"{layer.shape[0]}")
        if hidden.shape[2] != hidden_size:
            report.problems.append(f"'{m}/hidden' has {hidden.shape[2]} channels, storage.hidden_size says "
                                   f"{hidden_size}")
        if hidden.dtype != np.dtype(attrs["storage"]["dtype"]):
            report.problems.append(f"'{m}/hidden' is {hidden.dtype}, storage.dtype says {attrs['storage']['dtype']}")
    layer_lists = []
    for path in ("vision/layer", "text/layer"):
        try:
            layer_lists.append(arrays[path][:])
        except StoreAccessError:
            raise
        except Exception as exc:  # a damaged chunk: report it instead of crashing
            report.problems.append(f"'{path}' chunk (entries 0:{arrays[path].shape[0]}) is damaged: "
                                   f"{type(exc).__name__}: {exc}")
    if len(layer_lists) == 2 and not np.array_equal(*layer_lists):
        report.problems.append("'vision/layer' and 'text/layer' list different layers")
    interrupted = False
    for path, arr in arrays.items():
        group, name = path.split("/")
        if name == "layer":
            continue
        axis = 1 if name == HIDDEN else 0
        want = commit[commit_key_for(group, name)]
        have = arr.shape[axis]
        if have < want:
            report.problems.append(f"array '{path}' holds {have} entries, the commit record says {want}")
        elif have > want:
            interrupted = True
    if interrupted:
        report.warnings.append("an append was interrupted: some arrays extend past the commit record; readers "
                               "ignore the extra entries and the next writer truncates them")


def _check_files(location: str, arrays: dict, commit: dict, report: ValidationReport) -> None:
    """Chunk files of the committed region that are missing or empty (zarr would read them as zeros)."""
    for path, arr in arrays.items():
        group, name = path.split("/")
        length = arr.shape[0] if name == "layer" else commit[commit_key_for(group, name)]
        for key in missing_chunk_files(location, path, arr, length, 1 if name == HIDDEN else 0):
            report.problems.append(f"'{path}' chunk file '{key}' is missing or empty (inside the committed region)")


def _check_tables(arrays: dict, commit: dict, report: ValidationReport) -> None:
    def read(path: str, key: str):
        try:
            return arrays[path][: commit[key]]
        except StoreAccessError:
            raise
        except Exception as exc:
            report.problems.append(f"array '{path}' cannot be read ({type(exc).__name__}: {exc})")
            return None

    n = commit["samples"]
    table = {name: read(f"{SAMPLES_GROUP}/{name}", commit_key_for(SAMPLES_GROUP, name)) for name in SAMPLE_VARIABLES}
    if any(v is None for v in table.values()):
        return
    ids = np.array(table["sample_id"].tolist(), dtype=str)
    if len(set(ids.tolist())) != n:
        report.problems.append("samples/sample_id: sample ids are not unique")
    for prefix, total_key in (("vision", "vision_tokens"), ("text", "text_tokens"), ("input", "input_tokens")):
        count_name = "input_length" if prefix == "input" else f"{prefix}_count"
        mismatch, bad = offsets_mismatch(table[f"{prefix}_offset"], table[count_name], commit[total_key])
        if mismatch:
            where = f" (first at sample {bad}, id {ids[bad]!r})" if bad is not None else ""
            report.problems.append(f"samples/{prefix}_offset and {count_name} are inconsistent with each other or "
                                   f"with the commit record ({commit[total_key]} tokens){where}")
    for m in MODALITIES:
        sample = read(f"{m}/sample", f"{m}_tokens")
        position = read(f"{m}/position", f"{m}_tokens")
        if sample is None or position is None:
            continue
        if not sample_index_matches(sample, table[f"{m}_count"]):
            report.problems.append(f"'{m}/sample' does not match samples/{m}_offset and {m}_count")
        elif n and ((position < 0) | (position >= table["input_length"][sample])).any():
            report.problems.append(f"'{m}/position' holds positions outside their sample's input sequence")
    role = read("text/role", "text_tokens")
    if role is not None and role.size and (role.min() < min(TextRole) or role.max() > max(TextRole)):
        report.problems.append(f"'text/role' holds codes outside {[int(r) for r in TextRole]}")


def _regions(arr: zarr.Array, length: int, axis: int, step: int):
    for start in range(0, length, step):
        stop = min(length, start + step)
        if arr.ndim == 3:
            for layer in range(arr.shape[0]):
                yield (layer, slice(start, stop), slice(None)), f"layer index {layer}, tokens {start}:{stop}"
        else:
            yield (slice(start, stop),), f"entries {start}:{stop}"


def _check_chunks(path: str, arr: zarr.Array, commit: dict, report: ValidationReport) -> None:
    """Read every committed chunk; checksums and decoding errors name the chunk."""
    group, name = path.split("/")
    if name == "layer":
        length, axis = arr.shape[0], 0
    else:
        axis = 1 if name == HIDDEN else 0
        length = commit[commit_key_for(group, name)]
    outer = (arr.shards or arr.chunks)[axis]
    inner = arr.chunks[axis]
    nonfinite = 0
    for region, label in _regions(arr, length, axis, outer):
        try:
            block = arr[region]
            report.checked_chunks += max(1, -(-(region[axis].stop - region[axis].start) // inner))
            if block.dtype.kind == "f":
                nonfinite += int((~np.isfinite(block)).sum())
        except StoreAccessError:
            raise
        except Exception as exc:
            _locate_bad_chunks(path, arr, region, axis, inner, label, exc, report)
    if nonfinite:
        report.problems.append(f"'{path}' holds {nonfinite} NaN/Inf values")


def _locate_bad_chunks(path, arr, region, axis, inner, label, exc, report) -> None:
    span = region[axis]
    bad = []
    for start in range(span.start, span.stop, inner):
        sub = list(region)
        sub[axis] = slice(start, min(span.stop, start + inner))
        try:
            arr[tuple(sub)]
        except StoreAccessError:
            raise
        except Exception:
            bad.append(f"{start}:{min(span.stop, start + inner)}")
    detail = f"; failing chunks at tokens {', '.join(bad)}" if bad and len(bad) < 8 else ""
    report.problems.append(f"'{path}' chunk ({label}) is damaged: {type(exc).__name__}: {exc}{detail}")
