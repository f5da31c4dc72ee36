"""Sidecar namespaces: derived data a tool keeps inside an archive directory, beside the format's groups.

A sidecar is a root-level Zarr group whose name starts with `_mir_` and is declared in SIDECARS. It
is not part of the archive's content: it is outside the fingerprint and the sizes, `mir validate`
names it but does not check its data, `mir merge` does not copy it (it is derived from the parts,
whose fingerprints the merged archive does not share), and deleting it loses nothing but time.
Only local, writable archives get one; readers of a shared archive keep such data elsewhere.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import zarr

from .schema import LOCK_FILE, MODALITIES, SAMPLES_GROUP
from .store import is_remote, local_path

SIDECAR_PREFIX = "_mir_"
ANALYSIS_CACHE = "_mir_cache"
SIDECARS: dict[str, str] = {
    ANALYSIS_CACHE: "mir analyze: cached per-layer sufficient statistics; safe to delete",
}
# What the format itself puts at the root of an archive directory.
FORMAT_ENTRIES = frozenset({"zarr.json", LOCK_FILE, SAMPLES_GROUP, *MODALITIES})


def is_sidecar(name: str) -> bool:
    """Whether a root-level name lies in the sidecar namespace (declared or not)."""
    return name.startswith(SIDECAR_PREFIX)


def sidecar_dir(location: str | Path, name: str, *, create: bool = False) -> Path | None:
    """The directory of sidecar `name` of a local archive (None for a URL); with `create`, made a valid
    (empty) Zarr group so Zarr tools reading the archive see well-formed metadata. OSError if not writable."""
    if name not in SIDECARS:
        raise ValueError(f"{name!r} is not a declared sidecar ({', '.join(SIDECARS)})")
    if is_remote(location):
        return None
    directory = local_path(location) / name
    if create and not (directory / "zarr.json").exists():
        directory.mkdir(exist_ok=True)
        zarr.open_group(zarr.storage.LocalStore(directory), mode="a", zarr_format=3,
                        attributes={"about": SIDECARS[name]})
    return directory


def content_files(location: str | Path) -> Iterator[Path]:
    """Every file of a local archive's content, sidecars left out."""
    root = local_path(location)
    for child in root.iterdir():
        if is_sidecar(child.name):
            continue
        if child.is_file():
            yield child
        elif child.is_dir():
            yield from (f for f in child.rglob("*") if f.is_file())


def sidecar_bytes(location: str | Path) -> dict[str, int]:
    """Bytes on disk per sidecar present in a local archive ({} for a URL)."""
    if is_remote(location):
        return {}
    root = local_path(location)
    return {child.name: sum(f.stat().st_size for f in child.rglob("*") if f.is_file())
            for child in sorted(root.iterdir()) if is_sidecar(child.name) and child.is_dir()}


def root_findings(location: str | Path) -> tuple[list[str], list[str]]:
    """(declared sidecars present, warnings about root entries the format does not know) for a local
    archive; URLs are not listed."""
    if is_remote(location):
        return [], []
    found, warnings = [], []
    for child in sorted(local_path(location).iterdir()):
        name = child.name
        if name in FORMAT_ENTRIES or name.endswith(".partial"):  # .partial: an interrupted write's temporary
            continue
        if name in SIDECARS:
            found.append(name)
            if not (child / "zarr.json").is_file():
                warnings.append(f"sidecar '{name}' has no zarr.json; Zarr tools will not see it as a group "
                                "(it is safe to delete)")
        elif is_sidecar(name):
            warnings.append(f"'{name}' is in the sidecar namespace ({SIDECAR_PREFIX}*) but is not a declared "
                            f"sidecar ({', '.join(SIDECARS)}); readers ignore it")
        else:
            warnings.append(f"'{name}' is not part of the mir-archive/1 format; readers ignore it")
    return found, warnings
