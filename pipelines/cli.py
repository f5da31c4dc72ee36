"""The `mir` command.

Subcommands are loaded lazily (click's documented lazy-group pattern) so that `mir analyze`
on a light install never imports torch, and `mir --help` stays fast.
"""
from __future__ import annotations

import importlib

import click

# command name -> "module:attribute". Each command family lives in its own module.
LAZY_COMMANDS: dict[str, str] = {
    "synth": "pipelines.commands.archive:synth",
    "inspect": "pipelines.commands.archive:inspect_cmd",
    "validate": "pipelines.commands.archive:validate",
    "analyze": "pipelines.commands.analyze:analyze_cmd",
    "stats": "pipelines.commands.analyze:stats_cmd",
    "extract": "pipelines.commands.extract:extract",
    "merge": "pipelines.commands.extract:merge",
    "demo": "pipelines.commands.flows:demo",
    "study": "pipelines.commands.flows:study",
    "compare": "pipelines.commands.flows:compare",
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when it is invoked."""

    def __init__(self, *args, lazy_subcommands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_subcommands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_subcommands:
            module_name, attr = self.lazy_subcommands[cmd_name].split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, lazy_subcommands=LAZY_COMMANDS)
@click.version_option(package_name="mir-pipeline")
def main() -> None:
    """mir: extract LVLM hidden states into a Zarr archive and measure the Modality Integration Rate."""


if __name__ == "__main__":  # pragma: no cover
    main()
