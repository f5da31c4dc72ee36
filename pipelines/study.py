"""A retrospective study: MIR across the checkpoints of one training run.

For each checkpoint: extract with the study's shared samples and settings (complete archives are
skipped, partial ones resumed), analyse, then write summary.csv / summary.json and a plot of MIR
against step. Re-running after new checkpoints appear does only the new work: extraction is
skipped for complete archives and analysis for results whose archive fingerprint and settings
are unchanged.

Extraction runs as `mir extract` subprocesses (up to `jobs` at once, one per device when several
are given), so each checkpoint's model is freed with its process; analysis runs in this process,
on local threads or on a dask.distributed cluster.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from storage_schemas import ArchiveError, open_archive
from storage_schemas.store import read_root_attrs
from storage_schemas.summary import is_complete

from .config_args import parse_with, table_to_argv
from .study_config import Checkpoint, StudyConfig

SETTINGS_FILE = "study-settings.json"


class StudyError(RuntimeError):
    """A study step failed; the message names the checkpoint and where its log is."""


@dataclass
class CheckpointOutcome:
    checkpoint: Checkpoint
    archive: Path
    extracted: bool = False
    analyzed: bool = False
    result: dict | None = None
    drift: dict | None = None  # {"previous": per-layer CKA rows or None, "first": ...} when [study] cka = true


def archive_state(path: Path) -> str:
    """'missing', 'partial' or 'complete', from the archive's own commit record and sample plan."""
    if not path.exists():
        return "missing"
    try:
        attrs = read_root_attrs(path)
    except ArchiveError:
        return "partial"  # let `mir extract --resume` say precisely what is wrong
    return "complete" if is_complete(attrs) else "partial"


def _extract_argv(config: StudyConfig) -> list[str]:
    from .commands.extract import extract as extract_cmd

    argv = table_to_argv(config.extract, extract_cmd, f"{config.source} [extract]")
    parse_with(extract_cmd, ["--model", "M", "--out", "O", *argv], f"{config.source} [extract]")
    return argv


def _analyze_params(config: StudyConfig, archive: Path, scheduler: str | None) -> tuple[list[str], dict]:
    from .commands.analyze import analyze_cmd

    table = dict(config.analyze)
    if scheduler:
        table["scheduler"] = scheduler
    argv = table_to_argv(table, analyze_cmd, f"{config.source} [analyze]")
    params = parse_with(analyze_cmd, [str(archive), *argv], f"{config.source} [analyze]")
    for output in ("json_path", "netcdf_path", "plot_path", "report_path"):  # the study writes its own outputs
        params.pop(output, None)
    return argv, params


def _check_settings_unchanged(out: Path, extract_argv: list[str]) -> None:
    """Archives already made must come from the same [extract] settings as this run's."""
    path = out / SETTINGS_FILE
    if path.exists():
        before = json.loads(path.read_text()).get("extract_argv")
        if before != extract_argv and any((out / "archives").glob("*.zarr")):
            raise StudyError(
                f"the [extract] settings changed since {out} was made ({before} -> {extract_argv}); the "
                "archives there would mix settings. Use a new [study] out folder, or delete its archives/.")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"extract_argv": extract_argv}, indent=2) + "\n")


def _run_extraction(ckpt: Checkpoint, archive: Path, argv: list[str], device: str | None, log_dir: Path) -> None:
    cmd = [sys.executable, "-m", "pipelines.cli", "extract", "--model", ckpt.path, "--out", str(archive), *argv,
           "--quiet"]
    if archive.exists():
        cmd.append("--resume")
    if device:
        cmd += ["--device", device]
    log = log_dir / f"{ckpt.name}.extract.log"
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text().strip().splitlines()[-6:]
        raise StudyError(f"extraction of checkpoint {ckpt.name} ({ckpt.path}) failed (exit {code}); log: {log}\n  "
                         + "\n  ".join(tail))


def run_study(config: StudyConfig, *, jobs: int = 1, devices: list[str] | None = None,
              scheduler: str | None = None, echo: Callable[[str], None] = print) -> list[CheckpointOutcome]:
    """Extract and analyse every checkpoint that needs it; write the summary files; return the outcomes."""
    out = config.out
    archives, results, logs = out / "archives", out / "results", out / "logs"
    for d in (archives, results, logs):
        d.mkdir(parents=True, exist_ok=True)
    to_extract = [c for c in config.checkpoints if c.archive is None]
    extract_argv = _extract_argv(config) if to_extract else []
    if to_extract:
        _check_settings_unchanged(out, extract_argv)
    outcomes = [CheckpointOutcome(c, Path(c.archive) if c.archive else archives / f"{c.name}.zarr")
                for c in config.checkpoints]

    pending = [o for o in outcomes if archive_state(o.archive) != "complete" and o.checkpoint.archive is None]
    echo(f"study: {len(outcomes)} checkpoints, {len(outcomes) - len(pending)} already extracted, "
         f"{len(pending)} to extract")
    failures: list[str] = []

    def extract_one(args):
        i, outcome = args
        device = devices[i % len(devices)] if devices else None
        echo(f"extracting {outcome.checkpoint.name}" + (f" on {device}" if device else ""))
        _run_extraction(outcome.checkpoint, outcome.archive, extract_argv, device, logs)
        outcome.extracted = True

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(extract_one, item) for item in enumerate(pending)]:
            try:
                future.result()
            except StudyError as exc:
                failures.append(str(exc))

    for outcome in outcomes:
        if archive_state(outcome.archive) != "complete":
            continue
        argv, params = _analyze_params(config, outcome.archive, scheduler)
        result_path = results / f"{outcome.checkpoint.name}.json"
        fingerprint = open_archive(outcome.archive).fingerprint
        if result_path.exists():
            cached = json.loads(result_path.read_text())
            if cached.get("archive_fingerprint") == fingerprint and cached.get("analyze_argv") == argv:
                outcome.result = cached["result"]
                continue
        echo(f"analysing {outcome.checkpoint.name}")
        result = analyze_checkpoint(params, outcome.checkpoint.name).to_json()
        tmp = result_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"archive_fingerprint": fingerprint, "analyze_argv": argv, "result": result},
                                  indent=1))
        tmp.replace(result_path)  # a killed study never leaves a half-written result
        outcome.result, outcome.analyzed = result, True

    if config.cka:
        study_drift(config, outcomes, results, scheduler, echo)
    write_summary(out, outcomes)
    if failures:
        raise StudyError("\n".join(failures))
    return outcomes


def analyze_checkpoint(params: dict, name: str):
    """One checkpoint's analysis through the library entry point, from its parsed [analyze] settings."""
    from dask.utils import parse_bytes

    from analyze import AnalysisError, AnalysisOptions, Runner, analyze_archives

    p = dict(params)
    try:
        limit = parse_bytes(p["memory_limit"]) if p.get("memory_limit") else None
    except ValueError as exc:
        raise StudyError(f"[analyze] memory-limit {p['memory_limit']!r} is not a size (e.g. 2GB)") from exc
    options = AnalysisOptions(mode=p["mode"], precision=p["precision"], bootstrap=p["bootstrap"], seed=p["seed"],
                              influence=str(p.get("influence", "auto")), cache=not p["no_cache"],
                              cache_dir=p["cache_dir"], memory_limit=limit)
    runner = Runner(p["scheduler"], workers=p["workers"], progress=bool(p["progress"]))
    try:
        return analyze_archives(list(p["archives"]), layers=p["layers"], samples=p["samples"], where=p["where"],
                                text_tokens=p["text_tokens"], options=options, runner=runner)
    except (ArchiveError, AnalysisError) as exc:
        raise StudyError(f"analysis of checkpoint {name} failed: {exc}") from exc
    finally:
        runner.close()


def study_drift(config: StudyConfig, outcomes: list[CheckpointOutcome], results: Path, scheduler: str | None,
                echo: Callable[[str], None]) -> None:
    """CKA of every analysed checkpoint to the previous analysed one and to the first (analyze/drift.py),
    on the samples both archives hold, the layers both analyses used and the [analyze] text-token rule."""
    from analyze import Runner

    done = [o for o in outcomes if o.result is not None]
    if not done:
        return
    _, params = _analyze_params(config, done[0].archive, scheduler)
    runner = Runner(params.get("scheduler"), workers=params.get("workers"))
    try:
        for i, o in enumerate(done):
            o.drift = {"previous": None, "first": None}
            if i:
                o.drift["previous"] = _pair_drift(done[i - 1], o, params, runner, results, echo)
                o.drift["first"] = _pair_drift(done[0], o, params, runner, results, echo)
    finally:
        runner.close()


def _pair_drift(a: CheckpointOutcome, b: CheckpointOutcome, params: dict, runner, results: Path,
                echo: Callable[[str], None]) -> list[dict]:
    """CKA rows of b to a, cached in results/ under both archives' fingerprints and the settings."""
    from analyze import AnalysisError
    from analyze.drift import DRIFT_VERSION

    from .compare import drift_between

    layers = sorted(set(a.result["settings"]["layers"]) & set(b.result["settings"]["layers"]))
    key = {"a": open_archive(a.archive).fingerprint, "b": open_archive(b.archive).fingerprint, "layers": layers,
           "text_tokens": params.get("text_tokens"), "precision": params["precision"], "version": DRIFT_VERSION}
    path = results / f"cka-{a.checkpoint.name}-{b.checkpoint.name}.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if cached.get("key") == key:
        return cached["layers"]
    echo(f"CKA of {b.checkpoint.name} to {a.checkpoint.name}")
    try:
        rows = drift_between(str(a.archive), str(b.archive), layers, text_tokens=params.get("text_tokens"),
                             runner=runner, precision=params["precision"])
    except (ArchiveError, AnalysisError) as exc:
        raise StudyError(f"CKA of {b.checkpoint.name} to {a.checkpoint.name} failed: {exc}") from exc
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "layers": rows}, indent=1))
    tmp.replace(path)  # a killed study never leaves a half-written file
    return rows


def _mean_cka(rows: list[dict] | None, modality: str) -> float | None:
    """Linear CKA averaged over the layers (None without CKA rows)."""
    values = [r[modality]["cka"] for r in rows or [] if r[modality]["cka"] is not None]
    return sum(values) / len(values) if values else None


def summary_rows(outcomes: list[CheckpointOutcome]) -> list[dict]:
    """One row per analysed checkpoint: MIR and its interval, and its difference from the previous
    analysed checkpoint with an interval paired by sample id (when both ran with --bootstrap)."""
    rows, previous = [], None
    for o in outcomes:
        if o.result is None:
            continue
        r, boot = o.result, o.result.get("bootstrap") or {}
        row = {
            "step": o.checkpoint.step, "checkpoint": o.checkpoint.name, "path": o.checkpoint.path,
            "archive": str(o.archive), "mir": r["mir"], "ci_low": boot.get("ci_low"), "ci_high": boot.get("ci_high"),
            "mode": r["mode"], "n_samples": r["n_samples"],
            "fd": {str(layer["layer"]): layer["fd"] for layer in r["layers"]},
            **_difference_from(previous, r),
        }
        if o.drift is not None:
            row["cka"] = o.drift
            row.update({f"cka_{which}_{m}": _mean_cka(o.drift[which], m)
                        for which in ("previous", "first") for m in ("vision", "text")})
        rows.append(row)
        previous = r
    return rows


DIFFERENCE_FIELDS = ("diff_prev", "diff_ci_low", "diff_ci_high", "diff_exceeds_noise")


def _difference_from(previous: dict | None, result: dict) -> dict:
    """MIR(this) - MIR(previous) and its paired interval (analyze/bootstrap.paired_difference)."""
    from analyze.bootstrap import paired_difference

    from .compare import influence_by_id

    out = dict.fromkeys(DIFFERENCE_FIELDS)
    if previous is None:
        return out
    out["diff_prev"] = result["mir"] - previous["mir"] if None not in (result["mir"], previous["mir"]) else None
    a, b = influence_by_id(previous), influence_by_id(result)
    if a is None or b is None or len(set(a[1]) & set(b[1])) < 2:
        return out
    boot = result["bootstrap"]
    paired = paired_difference(a, b, boot["replicates"], boot["seed"])
    out.update({"diff_ci_low": paired["ci_low"], "diff_ci_high": paired["ci_high"],
                "diff_exceeds_noise": paired["exceeds_noise"]})
    return out


def write_summary(out: Path, outcomes: list[CheckpointOutcome]) -> list[dict]:
    rows = summary_rows(outcomes)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    layers = sorted({int(k) for row in rows for k in row["fd"]})
    cka = [f"cka_{w}_{m}" for w in ("previous", "first") for m in ("vision", "text")] \
        if any("cka" in row for row in rows) else []
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "checkpoint", "mir", "ci_low", "ci_high", "mode", "n_samples"]
                        + list(DIFFERENCE_FIELDS) + [f"fd_layer_{k}" for k in layers] + cka)
        for row in rows:
            flag = row["diff_exceeds_noise"]
            writer.writerow([row["step"], row["checkpoint"], _num(row["mir"]), _num(row["ci_low"]),
                             _num(row["ci_high"]), row["mode"], row["n_samples"], _num(row["diff_prev"]),
                             _num(row["diff_ci_low"]), _num(row["diff_ci_high"]), "" if flag is None else str(flag)]
                            + [_num(row["fd"].get(str(k))) for k in layers] + [_num(row.get(c)) for c in cka])
    if rows:
        from .plots import plot_mir_by_step
        plot_mir_by_step(rows, out / "mir_by_step.png")
    return rows


def _num(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))
