"""Content digests and library versions: the two records every stage writes beside its results, each
computed one way so that a hash or a version list means the same wherever it is read."""
from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterable
from importlib import metadata


def json_digest(obj, length: int | None = None) -> str:
    """sha256 hex digest of `obj` as canonical JSON (sorted keys; non-JSON values by str), cut to `length`."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:length] if length else digest


def library_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Python's version and each installed distribution's (None when it is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("mir-pipeline", *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
