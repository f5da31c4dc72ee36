"""`mir analyze` and `mir stats`: MIR, per-layer FD and distribution statistics of an archive."""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import click

from analyze import AnalysisError, AnalysisOptions, Runner, analyze_archives
from analyze.frechet import SQRT_MODES
from storage_schemas import ArchiveError


def _selection_options(fn):
    """Options shared by both commands: what to read and how to run."""
    options = [
        click.argument("archives", nargs=-1, required=True),
        click.option("--layers", default=None, help="Layers: N, A:B (half-open), A-B (inclusive), comma-separated, "
                                                    "or 'all'. Default: every stored layer except 0 (embeddings)."),
        click.option("--samples", default=None, help="Samples: row ranges (0:50,60), @FILE of sample ids (one per "
                                                     "line), or random:N:SEED. Default: all."),
        click.option("--where", default=None, help="Predicate on the samples table, e.g. "
                                                   "\"text_count >= 20 and not contains(image, 'cat')\"."),
        click.option("--text-tokens", default="after-image", show_default=True,
                     type=click.Choice(["after-image", "response", "all"]),
                     help="Which non-image tokens count as text (after-image is the reference rule)."),
        click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="dask.distributed scheduler (e.g. tcp://127.0.0.1:8786); default: local threads."),
        click.option("--workers", default=None, type=click.IntRange(min=1), help="Local threads (default: cores)."),
        click.option("--memory-limit", default=None, metavar="SIZE",
                     help="Memory budget, e.g. 2GB: layers are processed in groups that fit. Default: half of RAM."),
        click.option("--precision", default="float32", show_default=True, type=click.Choice(["float32", "float64"]),
                     help="Gram products (accumulated in float64 either way)."),
        click.option("--no-cache", is_flag=True, help="Neither read nor write cached statistics."),
        click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                     help="Cache folder (default: inside the archive if writable, else $MIR_CACHE_DIR or "
                          "~/.cache/mir-pipeline)."),
        click.option("--progress/--no-progress", default=None, help="Progress bars on stderr (default: on a TTY)."),
        click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
                     help="Write all results as JSON ('-' for stdout)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def run_analysis(archives, layers, samples, where, text_tokens, scheduler, workers, memory_limit, precision, no_cache,
         cache_dir, progress, **extra):
    from dask.utils import parse_bytes
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        limit = parse_bytes(memory_limit) if memory_limit else None
    except ValueError as exc:
        raise click.BadParameter(f"cannot read {memory_limit!r} as a size (e.g. 2GB, 512MiB)",
                                 param_hint="--memory-limit") from exc
    if progress is None:
        progress = sys.stderr.isatty()
    runner = Runner(scheduler, workers=workers, progress=progress)
    try:
        options = AnalysisOptions(precision=precision, cache=not no_cache, cache_dir=cache_dir, memory_limit=limit,
                                  **extra)
        return analyze_archives(list(archives), layers=layers, samples=samples, where=where, text_tokens=text_tokens,
                                options=options, runner=runner)
    except (ArchiveError, AnalysisError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        runner.close()


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


def _fmt(x: float, width: int = 11) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return f"{'nan':>{width}}"
    return f"{x:>{width}.5g}"


@click.command("analyze")
@_selection_options
@click.option("--sqrt", "mode", default="exact", show_default=True, type=click.Choice(SQRT_MODES),
              help="Trace term: exact (float64 symmetric eigensolver), or the reference code's fast / accurate modes.")
@click.option("--bootstrap", default=0, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap replicates (samples resampled; delta method) for a 95% confidence interval of MIR "
                   "(0: none).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the bootstrap.")
@click.option("--netcdf", "netcdf_path", default=None, type=click.Path(dir_okay=False),
              help="Write the per-layer xarray Dataset as netCDF.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Plot the per-layer curve (PNG, PDF or SVG by suffix).")
def analyze_cmd(json_path, netcdf_path, plot_path, **kwargs):
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
    lines.append(f"{'layer':>5} {'FD':>11} {'mean term':>11} {'cov term':>11} {'scale a':>11} "
                 f"{'outl. v/t':>11}  route")
    for layer in ds["layer"].values:
        s = ds.sel(layer=layer)
        out = f"{int(s['outliers'].sel(modality='vision'))}/{int(s['outliers'].sel(modality='text'))}"
        lines.append(f"{layer:>5} {_fmt(float(s['fd']))} {_fmt(float(s['fd_mean_term']))} "
                     f"{_fmt(float(s['fd_covariance_term']))} {_fmt(float(s['scale']))} {out:>11}  {s['route'].item()}")
    return "\n".join(lines)


@click.command("stats")
@_selection_options
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
                 f"{'outliers':>8} {'tot. var':>11} {'eff. rank':>9} {'top eig':>11} {'cond':>9}")
    for layer in ds["layer"].values:
        s = ds.sel(layer=layer)
        for m in ("vision", "text"):
            v = {name: s[name].sel(modality=m).values for name in ds.data_vars if "modality" in ds[name].dims}
            lines.append(f"{layer:>5} {m:>8} {int(v['tokens']):>8} {_fmt(float(v['norm_mean']))} "
                         f"{_fmt(float(v['norm_median']))} {_fmt(float(v['norm_std']))} {int(v['outliers']):>8} "
                         f"{_fmt(float(v['total_variance']))} {float(v['effective_rank']):>9.2f} "
                         f"{_fmt(float(v['leading_eigenvalues'][0]))} {_fmt(float(v['condition_number']), 9)}")
        lines.append(f"{'':>5} {'cross':>8} scale a {float(s['scale']):.5g}; FD {float(s['fd']):.5g} = mean term "
                     f"{float(s['fd_mean_term']):.5g} + covariance term {float(s['fd_covariance_term']):.5g}; "
                     f"centroid cosine {float(s['centroid_cosine']):.4f}")
    return "\n".join(lines)
