"""Settings from a config file, parsed by the very click command they configure.

A `[extract]` or `[analyze]` table becomes the argument list of `mir extract` / `mir analyze`, and
click parses it: same names, same types, same validation and error messages as on the command line,
so a study file can carry every flag and can never mean something the command would not.
"""
from __future__ import annotations

import click


class ConfigArgsError(ValueError):
    """A config key or value the command does not accept; the message names the table and key."""


def table_to_argv(table: dict, command: click.Command, where: str) -> list[str]:
    """Turn {"batch_size": 8, "resume": true, "layers": "1-4"} into ["--batch-size", "8", "--resume", ...]."""
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    argv: list[str] = []
    for key, value in table.items():
        name = key.replace("-", "_")
        param = options.get(name)
        if param is None:
            known = ", ".join(sorted(n.replace("_", "-") for n in options))
            raise ConfigArgsError(f"{where}: unknown setting {key.replace('_', '-')!r}; `mir {command.name}` accepts: {known}")
        flag = max(param.opts, key=len)
        if param.is_flag and not param.secondary_opts:
            if not isinstance(value, bool):
                raise ConfigArgsError(f"{where}: {key} is a switch; write true or false")
            if value:
                argv.append(flag)
        elif param.is_flag:  # --x/--no-x
            argv.append(flag if value else max(param.secondary_opts, key=len))
        else:
            for item in value if isinstance(value, list) and param.multiple else [value]:
                argv += [flag, str(item)]
    return argv


def parse_with(command: click.Command, argv: list[str], where: str) -> dict:
    """Parse argv exactly as the command line would; return the command's parameters."""
    try:
        with command.make_context(command.name, list(argv), resilient_parsing=False) as ctx:
            return dict(ctx.params)
    except click.ClickException as exc:
        raise ConfigArgsError(f"{where}: {exc.format_message()}") from exc
    except click.exceptions.Exit as exc:  # e.g. --help in a config file
        raise ConfigArgsError(f"{where}: unexpected setting") from exc
