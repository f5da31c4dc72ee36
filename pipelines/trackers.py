"""Experiment trackers for `mir study` and `mir compare`: `--log tensorboard:DIR`, `--log mlflow:URI`.

Each step (a study's checkpoint step; a comparison's archive index) logs MIR, its interval and the
per-layer FD as scalars under the names of pipelines.metrics (the Trainer callback's names), and
the settings as parameters. TensorBoard event files are written with tensorboard's own writer
(no torch or TensorFlow needed) into DIR/<run name>; MLflow runs go through its client, so any
tracking URI works, a local file store included (`mlflow:./mlruns` or `mlflow:file:///...`).
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .metrics import mir_scalars, result_scalars

KINDS = ("tensorboard", "mlflow")
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on a parameter value


class TrackerError(ValueError):
    """A --log target is malformed or its library is missing; the message says which and how to fix it."""


def parse_target(spec: str) -> tuple[str, str]:
    """'tensorboard:DIR' / 'mlflow:URI' -> (kind, where)."""
    kind, sep, where = spec.partition(":")
    if not sep or kind not in KINDS or not where:
        raise TrackerError(f"--log {spec!r}: use tensorboard:DIR or mlflow:URI (e.g. tensorboard:runs, "
                           "mlflow:./mlruns, mlflow:http://mlflow.example:5000)")
    return kind, where


def validate_targets(ctx: Any, param: Any, specs: Sequence[str]) -> tuple[str, ...]:
    """click callback: check every --log target and its library before any work starts."""
    import click

    try:
        for spec in specs:
            kind, _ = parse_target(spec)
            _require(kind)
    except TrackerError as exc:
        raise click.BadParameter(str(exc)) from exc
    return tuple(specs)


def _require(kind: str) -> None:
    module = {"tensorboard": "tensorboard", "mlflow": "mlflow"}[kind]
    try:
        __import__(module)
    except ImportError:
        raise TrackerError(f"--log {kind}:...: the {module} package is not installed; "
                           f"pip install -e '.[{kind}]'") from None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as 'a.b' -> string value (lists and other values as JSON)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = re.sub(r"[^\w\-./ ]", "_", f"{prefix}{key}")
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return out


class TensorBoardTracker:
    """Event files in DIR/<run>: scalars per step, the settings as text and as hparams."""

    def __init__(self, logdir: str, run: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.path = Path(logdir) / run
        self._writer = EventFileWriter(str(self.path))

    def _summary(self, summary: Any, step: int = 0) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self._writer.add_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb
        from tensorboard.plugins.text.summary_v2 import text_pb

        flat = flatten(params)
        rows = "\n".join(f"| {k} | {v.replace('|', '/')} |" for k, v in flat.items())
        self._summary(text_pb("settings", "| setting | value |\n|---|---|\n" + rows))
        self._summary(hparams_pb(flat))

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._summary(Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]), step)

    def close(self) -> None:
        self._writer.close()


class MLflowTracker:
    """One MLflow run (experiment $MLFLOW_EXPERIMENT_NAME, default 'mir') named after the study or comparison."""

    def __init__(self, uri: str, run: str):
        if "://" not in uri or uri.startswith("file:"):
            # A local file store: MLflow 3 keeps it (in maintenance mode) behind this switch; asking for
            # mlflow:PATH is asking for it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            if "://" not in uri and not uri.startswith("file:"):
                uri = Path(uri).expanduser().absolute().as_uri()
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mir")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], v[:MLFLOW_PARAM_CHARS]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(specs: Sequence[str], run: str) -> list[Any]:
    trackers = []
    for spec in specs:
        kind, where = parse_target(spec)
        _require(kind)
        trackers.append(TensorBoardTracker(where, run) if kind == "tensorboard" else MLflowTracker(where, run))
    return trackers


def _log(specs: Sequence[str], run: str, params: Mapping[str, Any], steps: Sequence[tuple[int, dict]]) -> None:
    for tracker in open_trackers(specs, run):
        try:
            tracker.log_params(params)
            for step, scalars in steps:
                tracker.log_scalars(step, scalars)
        finally:
            tracker.close()


def log_study(specs: Sequence[str], config: Any, outcomes: Sequence[Any]) -> None:
    """`mir study --log`: one run named after the study file; step = the checkpoint's training step."""
    if not specs:
        return
    from .study import summary_rows

    rows = summary_rows(list(outcomes))
    steps = [(r["step"] if r["step"] is not None else i,
              mir_scalars(r["mir"], r.get("ci_low"), r.get("ci_high"), r["fd"])) for i, r in enumerate(rows)]
    done = [o.result for o in outcomes if o.result is not None]
    params = {"study": str(config.source), "extract": config.extract, "analyze": config.analyze,
              "checkpoints": len(outcomes), "mode": rows[-1]["mode"] if rows else None,
              "versions": done[-1].get("versions") if done else None}
    _log(specs, config.source.stem, params, steps)


def log_comparison(specs: Sequence[str], comparison: Any, archives: Sequence[str]) -> None:
    """`mir compare --log`: one run; step i = the i-th archive, with its difference from the first."""
    if not specs:
        return
    steps = []
    for i, result in enumerate(comparison.results):
        scalars = result_scalars(result)
        if i > 0:
            d = comparison.differences[i - 1]
            scalars.update({k: v for k, v in (("mir/diff_vs_first", d["difference"]),
                                               ("mir/diff_ci_low", d.get("ci_low")),
                                               ("mir/diff_ci_high", d.get("ci_high"))) if v is not None})
        steps.append((i, scalars))
    first = comparison.results[0]
    params = {"archives": dict(zip(comparison.labels, map(str, archives))), "labels": comparison.labels,
              "shared_samples": comparison.shared_samples, "layers": comparison.layers,
              "paired_bootstrap": comparison.paired, "mode": first.mode,
              "analysis": {k: first.settings.get(k) for k in ("bootstrap", "seed", "precision",
                                                               "text_tokens")}}
    _log(specs, "compare-" + "-vs-".join(comparison.labels), params, steps)
