"""The option set of the commands that analyse archives (`mir analyze`, `mir stats`, `mir compare`),
declared once so the three accept the same words with the same meaning, and turned into a Runner
and AnalysisOptions in one place."""
from __future__ import annotations

import contextlib
import sys

import click

from storage_schemas import ArchiveError, TextTokenRule
from storage_schemas.ranges import GRAMMAR


class TextTokenRuleType(click.ParamType):
    """A text-token rule in either spelling (`after_image` or `after-image`), as the enum value."""

    name = "rule"

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(r.value for r in TextTokenRule) + "]"

    def convert(self, value, param, ctx) -> str:
        try:
            return TextTokenRule.parse(value).value
        except ArchiveError as exc:
            self.fail(str(exc), param, ctx)


TEXT_TOKEN_RULE = TextTokenRuleType()


def selection_options(fn):
    """What to read and how to run: shared by analyze, stats and compare."""
    options = [
        click.argument("archives", nargs=-1, required=True),
        click.option("--layers", default=None, help=f"Layers: {GRAMMAR}; or 'all'. Default: every stored layer "
                                                    "except 0 (embeddings)."),
        click.option("--samples", default=None, help=f"Samples: row ranges ({GRAMMAR}), @FILE of sample ids (one "
                                                     "per line), or random:N:SEED. Default: all."),
        click.option("--where", default=None, help="Predicate on the samples table, e.g. "
                                                   "\"text_count >= 20 and not contains(image, 'cat')\"."),
        click.option("--text-tokens", default=None, type=TEXT_TOKEN_RULE,
                     help="Which non-image tokens count as text (after_image is the reference rule; after-image "
                          "is accepted). Default: the rule recorded in the archive at extraction."),
        click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="dask.distributed scheduler (e.g. tcp://127.0.0.1:8786); default: local threads."),
        click.option("--workers", default=None, type=click.IntRange(min=1), help="Local threads (default: cores)."),
        click.option("--memory-limit", default=None, metavar="SIZE",
                     help="Budget for the run's peak memory, e.g. 2GB (on a cluster: at most the workers' limit): "
                          "layers are analysed in groups that fit; refused before reading when one layer "
                          "cannot. Default: half of RAM."),
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


def trace_options(bootstrap_default: int):
    """The trace mode and the bootstrap: shared by analyze and compare (which differ in the default B)."""
    from analyze.frechet import SQRT_MODES

    def decorate(fn):
        options = [
            click.option("--sqrt", "mode", default="exact", show_default=True, type=click.Choice(SQRT_MODES),
                         help="Trace term: exact (float64 symmetric eigensolver), or the reference code's fast / "
                              "accurate modes."),
            click.option("--bootstrap", default=bootstrap_default, show_default=True, type=click.IntRange(min=0),
                         help="Bootstrap replicates (samples resampled; delta method) for 95% confidence intervals "
                              "(0: none)."),
            click.option("--seed", default=0, show_default=True, type=int, help="Seed of the bootstrap."),
            click.option("--influence", default="auto", show_default=True, metavar="auto|exact|RANK",
                         help="The bootstrap's per-token covariance term: auto (a rank max(64, d/32) sketch in the "
                              "whitened metric, about 1/16 of a Gram product per token; the rest held at its mean, "
                              "and the share it keeps reported as influence_captured), exact (a triangular product "
                              "per token: about a second Gram pass), or a sketch RANK."),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


@contextlib.contextmanager
def analysis_run(scheduler: str | None, workers: int | None, progress: bool | None):
    """The Dask runner the options ask for (progress bars default to on when stderr is a terminal); archive
    and analysis errors inside become one-line messages, and the runner is closed after."""
    from analyze import AnalysisError, Runner

    runner = Runner(scheduler, workers=workers, progress=sys.stderr.isatty() if progress is None else progress)
    try:
        yield runner
    except (ArchiveError, AnalysisError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        runner.close()


def analysis_options(*, precision: str, no_cache: bool, cache_dir: str | None, memory_limit: str | None, **extra):
    """AnalysisOptions from the shared options (and the trace options in `extra`)."""
    from dask.utils import parse_bytes

    from analyze import AnalysisOptions

    try:
        limit = parse_bytes(memory_limit) if memory_limit else None
    except ValueError as exc:
        raise click.BadParameter(f"cannot read {memory_limit!r} as a size (e.g. 2GB, 512MiB)",
                                 param_hint="--memory-limit") from exc
    return AnalysisOptions(precision=precision, cache=not no_cache, cache_dir=cache_dir, memory_limit=limit, **extra)
