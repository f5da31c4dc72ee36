"""`mir demo`, `mir study`, `mir compare`: the end-to-end flows."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from storage_schemas import ArchiveError

from .options import analysis_options, analysis_run, selection_options, trace_options


def _log_targets(ctx, param, value):
    from pipelines.trackers import validate_targets
    return validate_targets(ctx, param, value)


@click.command()
@click.option("--out", default="mir-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the archive, mir.json and report.png.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out, quiet):
    """Run the whole pipeline on a tiny offline model and the shipped sample data (CPU, < 2 minutes)."""
    from analyze import AnalysisError
    from extract.errors import ExtractError
    from pipelines.commands.analyze import format_result
    from pipelines.demo import REAL_MODEL_HINT, run_demo

    try:
        done = run_demo(out, echo=click.echo, progress=not quiet and sys.stderr.isatty())
    except (ArchiveError, AnalysisError, ExtractError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("")
    click.echo(format_result(done.result))
    for w in done.result.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo("")
    click.echo(f"archive: {done.archive}\nresults: {done.json}\nreport:  {done.report}")
    click.echo("")
    click.echo(REAL_MODEL_HINT)


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Checkpoints extracted at once (separate processes).")
@click.option("--devices", default=None, help="Comma-separated devices handed out to the extraction processes, "
                                              "e.g. cuda:0,cuda:1 (overrides [extract] device).")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="Run the analyses on this dask.distributed "
                                                                    "scheduler (overrides [analyze] scheduler).")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="Write a self-contained HTML report: MIR by step with intervals, per-layer FDs, provenance.")
@click.option("--log", "log_targets", multiple=True, metavar="KIND:WHERE", callback=_log_targets,
              help="Log MIR, its interval, per-layer FDs and the settings to tensorboard:DIR or mlflow:URI "
                   "(repeatable).")
def study(config, jobs, devices, scheduler, report_path, log_targets):
    """Extract and analyse every checkpoint listed in CONFIG (TOML); only new work is done on re-runs."""
    from analyze import AnalysisError
    from pipelines.config_args import ConfigArgsError
    from pipelines.study import StudyError, run_study
    from pipelines.study_config import StudyConfigError, load_study

    try:
        cfg = load_study(config)
        outcomes = run_study(cfg, jobs=jobs, devices=devices.split(",") if devices else None, scheduler=scheduler,
                             echo=click.echo)
    except (StudyConfigError, ConfigArgsError, StudyError, ArchiveError, AnalysisError) as exc:
        raise click.ClickException(str(exc)) from exc
    for o in outcomes:
        for w in (o.result or {}).get("warnings", []) if o.analyzed else []:
            click.echo(f"warning: {o.checkpoint.name}: {w}", err=True)
    click.echo("")
    click.echo(f"{'step':>8} {'checkpoint':<24} {'MIR':>9} {'95% CI':>19}  work")
    for o in outcomes:
        if o.result is None:
            continue
        b = o.result.get("bootstrap") or {}
        ci = f"{b['ci_low']:.4f}-{b['ci_high']:.4f}" if b else "-"
        work = ", ".join(w for w, done in (("extracted", o.extracted), ("analysed", o.analyzed)) if done) or "reused"
        step = "-" if o.checkpoint.step is None else o.checkpoint.step
        click.echo(f"{step:>8} {o.checkpoint.name:<24} {o.result['mir']:>9.5f} {ci:>19}  {work}")
    click.echo(f"\nsummary: {cfg.out / 'summary.csv'}, {cfg.out / 'summary.json'}, {cfg.out / 'mir_by_step.png'}")
    from pipelines.trackers import log_study
    log_study(log_targets, cfg, outcomes)
    if report_path:
        from pipelines.report import write_study_report
        click.echo(f"report: {write_study_report(cfg, outcomes, report_path)}")


@click.command()
@selection_options
@trace_options(bootstrap_default=200)
@click.option("--label", "labels", multiple=True, help="A name per archive (default: folder names).")
@click.option("--cka", is_flag=True, help="Also linear CKA and debiased CKA per layer and modality between the "
              "same tokens of each archive and the first (one more read of both archives).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Plot the per-layer curves together (PNG).")
@click.option("--log", "log_targets", multiple=True, metavar="KIND:WHERE", callback=_log_targets,
              help="Log MIR, its interval, per-layer FDs and the settings to tensorboard:DIR or mlflow:URI "
                   "(repeatable).")
def compare(archives, labels, cka, layers, samples, where, text_tokens, scheduler, workers, memory_limit, precision,
            no_cache, cache_dir, progress, json_path, plot_path, log_targets, **trace):
    """Analyse several ARCHIVES on the sample ids they share, side by side, with the noise of each difference.

    --samples and --where choose among the first archive's samples; only those every archive holds are compared."""
    from pipelines.compare import compare_archives, format_comparison

    options = analysis_options(precision=precision, no_cache=no_cache, cache_dir=cache_dir, memory_limit=memory_limit,
                               **trace)
    with analysis_run(scheduler, workers, progress) as runner:
        result = compare_archives(list(archives), labels=list(labels) or None, layers=layers, samples=samples,
                                  where=where, text_tokens=text_tokens, options=options, runner=runner, cka=cka)
    from pipelines.trackers import log_comparison
    log_comparison(log_targets, result, archives)
    text = json.dumps(result.to_json(), indent=2)
    if json_path == "-":
        click.echo(text)
        return
    click.echo(format_comparison(result))
    if json_path:
        Path(json_path).write_text(text + "\n")
    if plot_path:
        from pipelines.plots import plot_layer_curves
        plot_layer_curves({lab: (result.layers, [s["fd"] for s in r.layers], r.mir)
                           for lab, r in zip(result.labels, result.results)}, plot_path)
        click.echo(f"plot: {plot_path}")
