"""Cache of per-layer sufficient statistics, so re-analysis (other sqrt mode, bootstrap, layers) is cheap.

Where: inside the archive, in its declared analysis-cache sidecar (storage_schemas.sidecars; one
subgroup per entry), when the archive is one local writable directory; otherwise in a local
directory (user_cache_dir(): $MIR_CACHE_DIR, else ~/.cache/mir-pipeline), one folder per
archive. An entry's name carries the archive fingerprint, which changes with every commit, so
appending samples invalidates every entry; stale entries are deleted when a new one is written.

Crash safety: an entry is written completely in a hidden temporary folder, marked complete last,
then renamed into place (atomic on one filesystem). A reader accepts an entry only if the marker
is set, the recorded key equals the wanted key and the arrays have the expected shapes; chunks carry
CRC32C checksums, and every chunk file must be there (one lost in a copy would read as zeros).
Anything else is a miss: the entry is removed and recomputed.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from storage_schemas.provenance import json_digest
from storage_schemas.schema import MODALITIES
from storage_schemas.sidecars import ANALYSIS_CACHE, sidecar_dir

from .activations import ActivationStats
from .moments import Moments
from .stats import OUTLIER_RULES, LayerStats, ModalityStats, NormSummary

log = logging.getLogger(__name__)
FORMAT = "mir-analysis-cache/1"
STALE_TMP_SECONDS = 3600
MAX_ENTRY_BYTES = 2 * 2**30  # per-block statistics of big models are not worth the disk (d=4096, K=20: 5 GB)


def user_cache_dir() -> Path:
    """mir-pipeline's per-user cache folder: $MIR_CACHE_DIR (`~` expanded; empty means unset), else
    ~/.cache/mir-pipeline. The analysis cache of read-only archives and the demo's model live there."""
    configured = os.environ.get("MIR_CACHE_DIR", "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mir-pipeline"


def _hash(obj) -> str:
    return json_digest(obj, 16)


class StatsCache:
    """Per-layer entries for one archive; `directory` holds the entries."""

    def __init__(self, directory: Path, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    @classmethod
    def for_archive(cls, archive, cache_dir: str | Path | None = None) -> "StatsCache":
        """Inside the archive when it is one writable local folder, else a local cache folder."""
        if cache_dir is None and not archive.read_only and len(archive.paths) == 1:
            try:
                return cls(sidecar_dir(archive.paths[0], ANALYSIS_CACHE, create=True), archive.fingerprint)
            except OSError as exc:
                log.warning("cannot create the analysis cache inside %s (%s); using %s", archive.paths[0], exc,
                            user_cache_dir())
        root = Path(cache_dir).expanduser() if cache_dir is not None else user_cache_dir()
        identity = _hash(sorted(str(p) for p in archive.paths))
        return cls(root / identity, archive.fingerprint)

    # ------------------------------------------------------------------ names
    def entry_name(self, key: dict) -> str:
        """<fingerprint>-L<layer>-<hash of everything but the block count>-K<blocks>."""
        rest = {k: v for k, v in key.items() if k != "blocks"}
        return f"{self.fingerprint}-L{key['layer']}-{_hash(rest)}-K{key['blocks']}"

    # ------------------------------------------------------------------ read
    def load(self, key: dict) -> LayerStats | None:
        """The entry for `key`; for K = 1, an entry kept per sample block serves too (blocks merged)."""
        found = self._load_exact(key)
        if found is None and key["blocks"] == 1:
            stem = self.entry_name(key).removesuffix("-K1")
            for path in sorted(self.directory.glob(stem + "-K*")) if self.directory.is_dir() else []:
                other = self._load_exact({**key, "blocks": int(path.name.rsplit("-K", 1)[1])})
                if other is not None:
                    return other.collapsed()
        return found

    def _load_exact(self, key: dict) -> LayerStats | None:
        path = self.directory / self.entry_name(key)
        if not path.is_dir():
            return None
        try:
            stats = _read_entry(path, key)
        except Exception as exc:  # any damage makes it a miss
            log.warning("ignoring damaged analysis cache entry %s (%s); it will be recomputed", path, exc)
            shutil.rmtree(path, ignore_errors=True)
            return None
        return stats

    # ------------------------------------------------------------------ write
    def store(self, key: dict, stats: LayerStats) -> Path | None:
        """Write an entry atomically; returns its path, or None when not written (too big, not writable)."""
        k, d = len(stats.vision.block_inliers), stats.vision.d
        k += len(OUTLIER_RULES) if stats.vision.rules is not None else 0
        if 2 * k * d * d * 8 > MAX_ENTRY_BYTES:
            log.info("not caching layer %s: %d blocks of %d x %d statistics exceed %d bytes", stats.layer, k, d, d,
                     MAX_ENTRY_BYTES)
            return None
        return self._publish(self.entry_name(key), lambda tmp: _write_entry(tmp, key, stats))

    def _publish(self, name: str, write: Callable[[Path], None]) -> Path | None:
        """Write an entry into a temporary folder, then rename it into place (atomic: readers never see
        half an entry); None when the cache folder is not writable."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".tmp-{uuid.uuid4().hex}"
            write(tmp)
            final = self.directory / name
            try:
                os.rename(tmp, final)
            except OSError:  # a concurrent run wrote the same entry first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
            self._purge()
            return final
        except OSError as exc:
            log.warning("cannot write the analysis cache in %s (%s); continuing without it", self.directory, exc)
            return None

    def store_values(self, key: dict, values: dict[str, np.ndarray]) -> Path | None:
        """Small float64 arrays (a layer's per-sample influence values), written atomically like an entry."""
        def write(tmp: Path) -> None:
            root = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3)
            for name, value in values.items():
                arr = np.asarray(value, np.float64)
                root.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=arr.shape, **_codecs())
                with zarr.config.set({"array.write_empty_chunks": True}):
                    root[name][...] = arr
            root.attrs.update({"format": FORMAT, "key": key, "complete": True})

        return self._publish(self.values_name(key), write)

    def load_values(self, key: dict) -> dict[str, np.ndarray] | None:
        """The arrays stored under `key`, or None (missing, incomplete, another key, damaged: then removed)."""
        path = self.directory / self.values_name(key)
        if not path.is_dir():
            return None
        try:
            root = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r", zarr_format=3)
            attrs = dict(root.attrs)
            if attrs.get("complete") is not True or json.loads(json.dumps(attrs.get("key"))) != \
                    json.loads(json.dumps(key)):
                raise ValueError("incomplete entry or another key")
            return {name: np.asarray(arr[...], np.float64) for name, arr in root.arrays()}
        except Exception as exc:  # any damage makes it a miss
            log.warning("ignoring damaged analysis cache entry %s (%s); it will be recomputed", path, exc)
            shutil.rmtree(path, ignore_errors=True)
            return None

    def values_name(self, key: dict) -> str:
        return f"{self.fingerprint}-L{key['layer']}-{_hash(key)}-V"

    def _purge(self) -> None:
        """Remove entries of other archive contents and temporary folders abandoned by killed runs."""
        now = time.time()
        for child in self.directory.iterdir():
            if child.name.startswith(".tmp-"):
                if now - child.stat().st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(child, ignore_errors=True)
            elif child.is_dir() and not child.name.startswith(self.fingerprint + "-"):
                shutil.rmtree(child, ignore_errors=True)


def _codecs():
    return {"compressors": [ZstdCodec(level=1), Crc32cCodec()]}


def _write_entry(path: Path, key: dict, stats: LayerStats) -> None:
    root = zarr.open_group(zarr.storage.LocalStore(path), mode="w", zarr_format=3)
    meta = {"format": FORMAT, "key": key, "layer": stats.layer, "meta": stats.meta, "norms": {}, "passes": {}}
    for m in MODALITIES:
        s = stats.modality(m)
        g = root.create_group(m)
        arrays = {
            "median": s.median, "block_tokens": s.block_tokens, "block_norm_sum": s.block_norm_sum,
            "block_outliers": s.block_outliers,
            "inlier_n": np.array([b.n for b in s.block_inliers], np.int64),
            "inlier_mean": np.stack([b.mean for b in s.block_inliers]),
            "inlier_m2": np.stack([b.m2 for b in s.block_inliers]),
        }
        if s.rows is not None:
            arrays["rows"] = s.rows
        if s.activations is not None:
            arrays["unit_sum"], arrays["channel_max"] = s.activations.unit_sum, s.activations.channel_max
            meta.setdefault("activations", {})[m] = s.activations.to_json()
        if s.rules is not None:  # in OUTLIER_RULES order
            parts = [s.rules[rule] for rule in OUTLIER_RULES]
            arrays.update({"rule_outliers": np.array([c for c, _ in parts], np.int64),
                           "rule_n": np.array([m.n for _, m in parts], np.int64),
                           "rule_mean": np.stack([m.mean for _, m in parts]),
                           "rule_m2": np.stack([m.m2 for _, m in parts])})
        for name, value in arrays.items():
            value = np.asarray(value)
            chunks = (1,) + value.shape[1:] if name in ("inlier_m2", "rule_m2") else value.shape
            g.create_array(name, shape=value.shape, dtype=value.dtype, chunks=chunks, **_codecs())
            with zarr.config.set({"array.write_empty_chunks": True}):  # every chunk on disk: see _read_entry
                g[name][...] = value
        meta["norms"][m] = vars(s.norms)
        meta["passes"][m] = s.passes
    meta["complete"] = True  # the marker, written last; the rename that follows publishes the entry
    root.attrs.update(meta)


def _read_entry(path: Path, key: dict) -> LayerStats:
    root = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r", zarr_format=3)
    attrs = dict(root.attrs)
    if attrs.get("format") != FORMAT or attrs.get("complete") is not True:
        raise ValueError("incomplete entry")
    if json.loads(json.dumps(attrs.get("key"))) != json.loads(json.dumps(key)):
        raise ValueError("entry key differs")
    mods = {}
    for m in MODALITIES:
        g = root[m]
        for name, arr in g.arrays():  # a lost chunk file would read as zeros, i.e. wrong statistics
            if arr.nchunks_initialized < arr.nchunks:
                raise ValueError(f"'{m}/{name}' lacks chunk files")
        median = g["median"][...]
        d = median.shape[0]
        n_in, means, m2 = g["inlier_n"][...], g["inlier_mean"][...], g["inlier_m2"][...]
        k = n_in.shape[0]
        if means.shape != (k, d) or m2.shape != (k, d, d) or g["block_tokens"].shape != (k,):
            raise ValueError("array shapes disagree")
        rows = g["rows"][...] if "rows" in g else None
        doc = attrs.get("activations", {}).get(m)
        activations = None if doc is None else ActivationStats.from_json(doc, g["unit_sum"][...],
                                                                         g["channel_max"][...])
        rules = None
        if "rule_m2" in g:
            counts, ns, rmeans, rm2 = (g[name][...] for name in ("rule_outliers", "rule_n", "rule_mean", "rule_m2"))
            if rm2.shape != (len(OUTLIER_RULES), d, d):
                raise ValueError("outlier-rule arrays disagree")
            rules = {rule: (int(counts[i]), Moments(int(ns[i]), rmeans[i], rm2[i]))
                     for i, rule in enumerate(OUTLIER_RULES)}
        mods[m] = ModalityStats(NormSummary(**attrs["norms"][m]), median, g["block_tokens"][...],
                                g["block_norm_sum"][...], g["block_outliers"][...],
                                [Moments(int(n), means[i], m2[i]) for i, n in enumerate(n_in)], rows,
                                int(attrs["passes"][m]), activations, rules)
    return LayerStats(int(attrs["layer"]), mods["vision"], mods["text"], dict(attrs.get("meta", {})))
