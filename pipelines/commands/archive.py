"""`mir synth`, `mir inspect`, `mir validate`: making and looking at archives."""
from __future__ import annotations

import json

import click

from storage_schemas import ArchiveError, TextRole, open_archive, validate_archive
from storage_schemas.ranges import compact_ranges
from storage_schemas.sidecars import SIDECARS
from storage_schemas.summary import format_bytes, summarize
from storage_schemas.synth import write_synthetic_archive


@click.command()
@click.option("--out", "out", required=True, type=click.Path(), help="Archive directory to create.")
@click.option("--layers", default=4, show_default=True, type=click.IntRange(min=1), help="Decoder layers (plus the embeddings, layer 0).")
@click.option("--hidden", default=256, show_default=True, type=click.IntRange(min=1), help="Hidden size (channels).")
@click.option("--samples", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--vision-tokens", default=64, show_default=True, type=click.IntRange(min=1), help="Vision tokens per sample.")
@click.option("--text-tokens", default=48, show_default=True, type=click.IntRange(min=1), help="Mean stored text tokens per sample.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32", "bfloat16"]))
@click.option("--overwrite", is_flag=True, help="Replace an existing archive at --out.")
def synth(out, layers, hidden, samples, vision_tokens, text_tokens, seed, dtype, overwrite):
    """Write a synthetic archive with realistic LVLM-like activations (no GPU, no model)."""
    try:
        write_synthetic_archive(out, layers=layers, hidden=hidden, samples=samples, vision_tokens=vision_tokens,
                                text_tokens=text_tokens, seed=seed, dtype=dtype, overwrite=overwrite)
    except ArchiveError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {samples} synthetic samples x {layers + 1} layers x {hidden} channels to {out}")


@click.command("inspect")
@click.argument("archives", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_cmd(archives, as_json):
    """Summarise an archive (several paths: parts read as one): provenance, sizes, compression."""
    try:
        info = summarize(open_archive(list(archives)))
    except ArchiveError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    model, ext, data = info["model"], info["extraction"], info["dataset"]
    role_names = {int(r): r.name.lower() for r in TextRole}
    lines = [
        f"archive      {info['location']}  ({info['schema']}, fingerprint {info['fingerprint']})",
        f"model        {model.get('name_or_path', '?')}  [{model.get('architecture', '?')}]",
        f"             revision {model.get('revision') or '-'}  weights {_short(model.get('weights_hash'))}"
        f"  config {_short(model.get('config_hash'))}",
        f"             model dtype {model.get('dtype', '?')}, {model.get('num_hidden_layers', '?')} decoder layers,"
        f" hidden size {info['hidden_size']}",
        f"extraction   {ext.get('tool', '?')} {ext.get('tool_version', '')}  layout {ext.get('prompt_layout', '?')}"
        f"  time {ext.get('time', info['commit'] and '-')}",
        f"dataset      {', '.join(map(str, data.get('sources', []))) or '-'}  (sample list hash "
        f"{_short(data.get('sample_list_hash'))})",
        f"layers       {len(info['layers'])} stored: {compact_ranges(info['layers'], ', ')}",
        f"samples      {info['samples']}" + _plan(info),
        f"tokens       vision {info['tokens']['vision']}, text {info['tokens']['text']} ("
        + ", ".join(f"{role_names.get(k, k)} {v}" for k, v in info["text_tokens_by_role"].items()) + ")",
        f"dtype        stored {info['stored_dtype']} (model computed {info['source_dtype']})",
        f"size         {format_bytes(info['raw_bytes'])} raw, {format_bytes(info['disk_bytes'])} on disk"
        + (f", compression ratio {info['compression_ratio']:.2f}x" if info["compression_ratio"] else ""),
    ]
    for location, sidecars in info["sidecars"].items():
        for name, size in sidecars.items():
            lines.append(f"sidecar      {name} {format_bytes(size)} ({SIDECARS.get(name, 'undeclared')})"
                         + (f" in {location}" if len(info["sidecars"]) > 1 else ""))
    click.echo("\n".join(lines))


def _plan(info: dict) -> str:
    planned = info["planned_samples"]
    if planned is None:
        return ""
    return f" of {planned} planned" + ("" if info["samples"] >= planned else
                                       " (incomplete: finish it with `mir extract ... --resume`)")


def _short(digest) -> str:
    """First 16 hex digits of a hash, without an algorithm prefix such as 'sha256:'."""
    return str(digest).split(":")[-1][:16] if digest else "-"


@click.command()
@click.argument("archive")
@click.option("--quick", is_flag=True, help="Skip reading every chunk (schema, shapes and offsets only).")
def validate(archive, quick):
    """Check schema, shapes, offsets and every chunk's checksum; exit 1 naming what is wrong."""
    report = validate_archive(archive, check_chunks=not quick)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if not report.ok:
        for problem in report.problems:
            click.echo(f"problem: {problem}", err=True)
        raise SystemExit(1)
    commit = report.attrs.get("commit", {})
    sidecars = f"; sidecars {', '.join(report.sidecars)} (derived data, not checked)" if report.sidecars else ""
    click.echo(f"{archive}: valid {report.attrs.get('schema')} archive, {commit.get('samples')} samples, "
               f"{report.checked_chunks} chunks verified{sidecars}")
