"""`mir analyze` and `mir stats`: MIR, per-layer FD and distribution statistics of an archive."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import click

from analyze import analyze_archives
from storage_schemas import MODALITIES

from .options import analysis_options, analysis_run, selection_options, trace_options


def run_analysis(archives, layers, samples, where, text_tokens, scheduler, workers, memory_limit, precision, no_cache,
                 cache_dir, progress, **extra):
    """Open ARCHIVES, resolve the selection the shared options name, and analyse it."""
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    options = analysis_options(precision=precision, no_cache=no_cache, cache_dir=cache_dir, memory_limit=memory_limit,
                               **extra)
    with analysis_run(scheduler, workers, progress) as runner:
        return analyze_archives(list(archives), layers=layers, samples=samples, where=where, text_tokens=text_tokens,
                                options=options, runner=runner)


def _emit_json(result, path: str | None) -> None:
    if path is None:
        return
    text = json.dumps(result.to_json(), indent=2)
    if path == "-":
        click.echo(text)
    else:
        Path(path).write_text(text + "\n")


def _warn(result) -> None:
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)


def _mir_text(x: float) -> str:
    return f"{x:.6f}" if math.isfinite(x) else "nan"


def _fmt(x: float, width: int = 11) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return f"{'nan':>{width}}"
    return f"{x:>{width}.5g}"


def sensitivity_option(fn):
    """The opt-in statistics that cost extra full trace solves per layer (analyze/extrapolate.py)."""
    return click.option("--sensitivity", is_flag=True,
                        help="Also FD-infinity / MIR-infinity (FD at N/4, N/2, 3N/4 and N samples of seeded sample "
                             "groups, fitted as FD_inf + k/N) and MIR without outlier replacement and with the "
                             "reference code's IQR rule: 5 more trace solves per layer, and 6 d x d "
                             "statistics per layer and modality instead of 1, in memory and cache.")(fn)


@click.command("analyze")
@selection_options
@trace_options(bootstrap_default=0)
@sensitivity_option
@click.option("--netcdf", "netcdf_path", default=None, type=click.Path(dir_okay=False),
              help="Write the per-layer xarray Dataset as netCDF.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Plot the per-layer curve (PNG, PDF or SVG by suffix).")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="Write a self-contained HTML report (inline SVG figures, tables, provenance; no scripts).")
def analyze_cmd(json_path, netcdf_path, plot_path, report_path, **kwargs):
    """Compute MIR (log10 of the summed per-layer Fréchet distances) of ARCHIVES (parts read as one)."""
    result = run_analysis(**kwargs)
    _emit_json(result, json_path)
    if json_path != "-":
        click.echo(format_result(result))
    _warn(result)
    if netcdf_path:
        from pipelines.outputs import write_netcdf
        write_netcdf(result.dataset, netcdf_path)
    if plot_path:
        from pipelines.plots import plot_layer_curve
        plot_layer_curve(result.dataset, plot_path)
    if report_path:
        from pipelines.report import write_analysis_report
        write_analysis_report(result, kwargs["archives"], report_path)


def _header(result) -> str:
    cached = result.cache.get("layers_reused") or []
    return (f"{result.n_samples} samples, {result.n_vision_tokens} vision / {result.n_text_tokens} text tokens per "
            f"layer, {result.dataset.sizes['layer']} layers; trace: {result.mode}"
            + (f"; {len(cached)} layer(s) from cache" if cached else "")
            + f"; {result.elapsed_s:.1f} s")


def format_result(result) -> str:
    """The per-layer MIR table printed by `mir analyze` (also used by `mir demo`), from the result's Dataset."""
    ds = result.dataset
    lines = [f"MIR = {result.mir:.6f}   ({_header(result)})"]
    if "mir_replicate" in ds:
        a = ds.attrs
        lines.append(f"95% CI [{a['mir_ci_low']:.6f}, {a['mir_ci_high']:.6f}]  (bootstrap: {a['bootstrap_replicates']} "
                     f"replicates over {a['bootstrap_units']} samples, seed {a['bootstrap_seed']}; sd "
                     f"{a['mir_bootstrap_std']:.2g})")
        if "mir_bca_low" in a:
            lines.append(f"BCa 95% CI [{a['mir_bca_low']:.6f}, {a['mir_bca_high']:.6f}]  (bias-corrected and "
                         "accelerated: covers closer to 95% where the spread changes with MIR; README, Uncertainty)")
    lines.append(f"mean FD per layer {float(ds.attrs['fd_layer_mean']):.6g}" + (
        f"; --sensitivity (exact trace): MIR-infinity {_mir_text(ds.attrs['mir_infinity'])}, without outlier "
        f"replacement {_mir_text(ds.attrs['mir_no_replacement'])}, IQR rule {_mir_text(ds.attrs['mir_iqr_rule'])}"
        if "mir_infinity" in ds.attrs else ""))
    sensitive = "fd_infinity" in ds
    lines.append(f"{'layer':>5} {'FD':>11} {'mean term':>11} {'cov term':>11} {'scale a':>11} "
                 f"{'outl. v/t':>11}  route      {'share':>7}"
                 + (f" {'FD-inf':>11} {'FD no repl':>11} {'FD IQR':>11}" if sensitive else ""))
    for layer in ds["layer"].values:
        s = ds.sel(layer=layer)
        out = f"{int(s['outliers'].sel(modality='vision'))}/{int(s['outliers'].sel(modality='text'))}"
        line = (f"{layer:>5} {_fmt(float(s['fd']))} {_fmt(float(s['fd_mean_term']))} "
                f"{_fmt(float(s['fd_covariance_term']))} {_fmt(float(s['scale']))} {out:>11}  {s['route'].item():<10} "
                f"{float(s['fd_share']):>7.4f}")
        if sensitive:
            line += "".join(f" {_fmt(float(s[name]))}" for name in ("fd_infinity", "fd_no_replacement", "fd_iqr_rule"))
        lines.append(line)
    return "\n".join(lines)


@click.command("stats")
@selection_options
@sensitivity_option
def stats_cmd(json_path, **kwargs):
    """Per-layer, per-modality distribution statistics of ARCHIVES: norms, outliers, variance, spectrum."""
    result = run_analysis(**kwargs)
    _emit_json(result, json_path)
    if json_path != "-":
        click.echo(_stats_table(result))
    _warn(result)


def _stats_table(result) -> str:
    ds = result.dataset
    lines = [_header(result).split("; trace")[0]]
    lines.append(f"{'layer':>5} {'modality':>8} {'tokens':>8} {'norm mean':>11} {'norm med':>11} {'norm std':>11} "
                 f"{'outliers':>8} {'tot. var':>11} {'eff. rank':>9} {'top eig':>11} {'cond':>9} {'median |h|':>11} "
                 f"{'max/median':>11} {'massive':>9}")
    for layer in ds["layer"].values:
        s = ds.sel(layer=layer)
        for m in MODALITIES:
            v = {name: s[name].sel(modality=m).values for name in ds.data_vars if "modality" in ds[name].dims}
            lines.append(f"{layer:>5} {m:>8} {int(v['tokens']):>8} {_fmt(float(v['norm_mean']))} "
                         f"{_fmt(float(v['norm_median']))} {_fmt(float(v['norm_std']))} {int(v['outliers']):>8} "
                         f"{_fmt(float(v['total_variance']))} {float(v['effective_rank']):>9.2f} "
                         f"{_fmt(float(v['leading_eigenvalues'][0]))} {_fmt(float(v['condition_number']), 9)} "
                         f"{_fmt(float(v['abs_median']))} {_fmt(float(v['top_abs_ratio'][0]))} "
                         f"{int(v['massive_channels_100x']):>4}/{int(v['massive_channels_1000x']):<4}")
        lines.append(f"{'':>5} {'cross':>8} scale a {float(s['scale']):.5g}; FD {float(s['fd']):.5g} = mean term "
                     f"{float(s['fd_mean_term']):.5g} + covariance term {float(s['fd_covariance_term']):.5g}; "
                     f"centroid cosine {float(s['centroid_cosine']):.4f}; gap ||d|| {float(s['gap_norm']):.4f}, "
                     f"|cos| with PC1 vision {float(s['gap_cosine'].sel(modality='vision')[0]):.4f} text "
                     f"{float(s['gap_cosine'].sel(modality='text')[0]):.4f}")
        lines.append(f"{'':>5} {'gap':>8} shift {float(s['gap_shift']):.5g} + scale {float(s['gap_scale']):.5g} + "
                     f"channel {float(s['gap_channel']):.5g} + shape {float(s['gap_shape']):.5g}; unbiased mean term "
                     f"{float(s['fd_mean_term_unbiased']):.5g}; share {float(s['fd_share']):.4f}")
        if "fd_infinity" in ds:
            iqr = s["outliers_iqr"]
            lines.append(f"{'':>5} {'sens.':>8} FD-inf {float(s['fd_infinity']):.5g} "
                         f"(k {float(s['fd_infinity_slope']):.5g}); "
                         f"FD without replacement {float(s['fd_no_replacement']):.5g}; FD IQR rule "
                         f"{float(s['fd_iqr_rule']):.5g} (outliers {int(iqr.sel(modality='vision'))}/"
                         f"{int(iqr.sel(modality='text'))})")
    return "\n".join(lines)
