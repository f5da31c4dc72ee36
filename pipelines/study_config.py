"""The study's TOML file: which checkpoints, and the `extract` / `analyze` settings they share.

    [study]
    out = "study-out"                       # archives/, results/, summary.csv, summary.json, mir.png
    checkpoints = "run/checkpoint-*"        # a glob, or a list of globs / directories
    step_pattern = '(\\d+)$'                # regex on the directory name; group 1 is the step
    cka = true                              # also CKA of each checkpoint to the previous and the first
    # or explicit steps:  [[study.checkpoint]]  path = "run/ckpt-a"  step = 1000

    [extract]                               # any `mir extract` option, '-' or '_' in names
    images = "data/images"
    texts = "data/texts"
    num = 100
    seed = 0

    [analyze]                               # any `mir analyze` option
    bootstrap = 200
    seed = 0

Relative paths are resolved against the TOML file's folder, so a study folder can be moved.
"""
from __future__ import annotations

import glob
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PATH_KEYS = {"images", "texts", "manifest", "out"}
DEFAULT_STEP_PATTERN = r"(\d+)(?!.*\d)"


class StudyConfigError(ValueError):
    """The study file is wrong; the message names the file and the key."""


@dataclass
class Checkpoint:
    name: str
    path: str
    step: int | None
    archive: str | None = None  # an archive made already (e.g. by the Trainer callback): analysed as it is


@dataclass
class StudyConfig:
    source: Path
    out: Path
    checkpoints: list[Checkpoint]
    extract: dict = field(default_factory=dict)
    analyze: dict = field(default_factory=dict)
    cka: bool = False  # linear / debiased CKA to the previous and the first checkpoint (analyze/drift.py)


def _norm(table: dict) -> dict:
    return {k.replace("-", "_"): v for k, v in table.items()}


def _resolve(base: Path, value: str) -> str:
    if "://" in str(value):
        return str(value)
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def discover_checkpoints(specs: list, base: Path, step_pattern: str, source: Path) -> list[Checkpoint]:
    """Checkpoints from globs, directories or {path, step} tables, ordered by step then name."""
    try:
        pattern = re.compile(step_pattern)
    except re.error as exc:
        raise StudyConfigError(f"{source}: [study] step_pattern {step_pattern!r} is not a valid regex: {exc}")
    found: dict[str, Checkpoint] = {}
    for spec in specs:
        if isinstance(spec, dict):
            if "path" not in spec:
                raise StudyConfigError(f"{source}: a [[study.checkpoint]] entry has no 'path'")
            path = _resolve(base, spec["path"])
            if not Path(path).is_dir() and "://" not in path and "/" in path:
                raise StudyConfigError(f"{source}: checkpoint {spec['path']!r} is not a directory")
            step = spec.get("step")
            found[path] = Checkpoint(Path(path).name, path, int(step) if step is not None else _step(pattern, path))
            continue
        spec = str(spec)
        resolved = _resolve(base, spec)
        matches = sorted(glob.glob(resolved)) if glob.has_magic(spec) else [resolved]
        for path in matches:
            if Path(path).is_dir():
                found[path] = Checkpoint(Path(path).name, path, _step(pattern, path))
            elif not glob.has_magic(spec) and "/" not in spec and not spec.startswith("."):
                found[spec] = Checkpoint(spec.replace("/", "--"), spec, _step(pattern, spec))  # a hub id
            elif not glob.has_magic(spec):
                raise StudyConfigError(f"{source}: checkpoint {spec!r} is not a directory")
    names = [c.name for c in found.values()]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise StudyConfigError(f"{source}: several checkpoints share the folder name(s) {sorted(dupes)}; "
                               "list them as [[study.checkpoint]] tables instead")
    return sorted(found.values(), key=lambda c: (c.step is None, c.step or 0, c.name))


def _step(pattern: re.Pattern, path: str) -> int | None:
    match = pattern.search(Path(path).name)
    return int(match.group(1)) if match else None


def load_study(path: str | Path) -> StudyConfig:
    source = Path(path).expanduser().absolute()
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyConfigError(f"{source}: no such study file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StudyConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(raw) - {"study", "extract", "analyze"}
    if unknown:
        raise StudyConfigError(f"{source}: unknown table(s) {sorted(unknown)}; expected [study], [extract], "
                               "[analyze]")
    study = _norm(raw.get("study", {}))
    base = source.parent
    specs = study.get("checkpoints", [])
    specs = [specs] if isinstance(specs, str) else list(specs)
    specs += study.get("checkpoint", [])
    archives = study.get("archives", [])
    archives = [archives] if isinstance(archives, str) else list(archives)
    if not specs and not archives:
        raise StudyConfigError(f"{source}: [study] names no checkpoints (set checkpoints = \"run/checkpoint-*\", "
                               "or archives = \"mir-out/step-*.zarr\" for archives made already)")
    pattern = study.get("step_pattern", DEFAULT_STEP_PATTERN)
    checkpoints = discover_checkpoints(specs, base, pattern, source) if specs else []
    if archives:
        made = discover_checkpoints(archives, base, pattern, source)
        checkpoints = sorted(checkpoints + [Checkpoint(c.name.removesuffix(".zarr"), c.path, c.step, c.path)
                                            for c in made], key=lambda c: (c.step is None, c.step or 0, c.name))
    extract = _norm(raw.get("extract", {}))
    for key in PATH_KEYS & set(extract):
        extract[key] = _resolve(base, extract[key])
    if "model" in extract or "out" in extract:
        raise StudyConfigError(f"{source}: [extract] must not set 'model' or 'out': the study sets them per "
                               "checkpoint")
    cka = study.get("cka", False)
    if not isinstance(cka, bool):
        raise StudyConfigError(f"{source}: [study] cka must be true or false, not {cka!r}")
    return StudyConfig(source=source, out=Path(_resolve(base, study.get("out", "study-out"))),
                       checkpoints=checkpoints, extract=extract, analyze=_norm(raw.get("analyze", {})), cka=cka)
