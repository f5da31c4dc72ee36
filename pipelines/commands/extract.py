"""`mir extract` and `mir merge`: hidden states of a vision-language model into an archive."""
from __future__ import annotations

import click

from storage_schemas import ArchiveError
from storage_schemas.ranges import GRAMMAR

from .options import TEXT_TOKEN_RULE


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.command()
@click.option("--model", required=True, help="Local model directory or Hugging Face hub id.")
@click.option("--out", required=True, type=click.Path(), help="Archive directory to write.")
@click.option("--images", type=click.Path(), help="Directory of images (used in sorted order).")
@click.option("--texts", type=click.Path(), help="Directory of .story (CNN/DailyMail) or .txt files.")
@click.option("--manifest", type=click.Path(), help='JSONL rows {"id", "image", "text"} (instead of the dirs).')
@click.option("--num", type=click.IntRange(min=1), help="Number of samples (default: all available).")
@click.option("--seed", type=int, help="Draw --num samples at random with this seed (default: first N in order).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Model dtype; auto = what the checkpoint says.")
@click.option("--layers", default="all", show_default=True,
              help=f"hidden_states indices to store (0 = embeddings): all, or {GRAMMAR}; e.g. '0,8,16-32', '-4:'.")
@click.option("--template", default=None,
              help="Prompt: default the processor's chat template; 'vicuna_v1' (the reference prompt); or a raw "
                   "string with {image} and {text}.")
@click.option("--text-tokens", default="after_image", show_default=True, type=TEXT_TOKEN_RULE,
              help="The text-token rule `mir analyze` uses on this archive unless told otherwise (every non-image "
                   "token is stored, so any rule can be chosen later).")
@click.option("--max-text-tokens", type=click.IntRange(min=1), help="Cut each text after this many tokens.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (checks model, settings and data).")
@click.option("--overwrite", is_flag=True, help="Replace an existing archive at --out.")
@click.option("--shard", help="K/N: process the K-th of N disjoint slices of the sample list (K = 1..N); 'auto': "
              "take the part (and GPU) torchrun or a Slurm array assigns, the last part to finish merges them.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off by default).")
@click.option("--revision", help="Hub revision (branch, tag or commit).")
@click.option("--attn-implementation", help="e.g. sdpa, flash_attention_2, eager (default: transformers' choice).")
@click.option("--commit-every", type=click.IntRange(min=1), help="Also commit everything after this many "
              "samples (default: samples are committed as their hidden states reach disk, at least every 120 s).")
@click.option("--compression", help="Compressor of the hidden states: none, or Blosc NAME[:LEVEL] (zstd, lz4, "
              "lz4hc, blosclz, zlib); default: none for float16/float32, lz4:1 with byte shuffle for bfloat16.")
@click.option("--no-preflight", is_flag=True, help="Skip decoding every input before the run starts.")
@click.option("--dry-run", is_flag=True,
              help="Check inputs and model; print the plan, archive size, host memory and the write time at "
                   "the disk speed measured at --out; write nothing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(model, out, images, texts, manifest, num, seed, batch_size, device, dtype, layers, template, text_tokens,
            max_text_tokens, resume, overwrite, shard, trust_remote_code, revision, attn_implementation,
            commit_every, compression, no_preflight, dry_run, quiet):
    """Run MODEL once per image-text sample and store every layer's vision- and text-token hidden states."""
    from extract.errors import ExtractError
    from extract.extraction import ExtractOptions, extract, parse_shard
    from extract.plan import estimate

    try:
        opts = ExtractOptions(
            model=model, out=out, images=images, texts=texts, manifest=manifest, num=num, seed=seed,
            batch_size=batch_size, device=device, dtype=dtype, layers=layers, template=template,
            text_tokens=text_tokens, max_text_tokens=max_text_tokens, resume=resume, overwrite=overwrite,
            shard=None if shard == "auto" else parse_shard(shard), trust_remote_code=trust_remote_code,
            revision=revision,
            attn_implementation=attn_implementation, commit_every=commit_every, compression=compression,
            preflight=not no_preflight,
            progress=not quiet)
        if dry_run:
            plan = estimate(opts)
            click.echo(plan.describe())
            return
        if shard == "auto":
            from extract.launch import extract_auto
            result = extract_auto(opts, on_info=click.echo)
        else:
            result = extract(opts, on_info=click.echo)
    except (ExtractError, ArchiveError) as exc:
        raise _fail(exc) from exc
    skipped = f" ({result.samples_skipped} already there)" if result.samples_skipped else ""
    rate = f", {result.samples_per_second:.2f} samples/s" if result.samples_done else ""
    trunc = f"; {result.truncated} texts truncated" if result.truncated else ""
    click.echo(f"extracted {result.samples_done} samples{skipped} in {result.seconds:.1f} s{rate}{trunc} -> "
               f"{result.out}")


@click.command()
@click.argument("out", type=click.Path())
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--overwrite", is_flag=True, help="Replace an existing archive at OUT.")
@click.option("--allow-partial", is_flag=True, help="Merge even if shards are missing or unfinished.")
def merge(out, parts, overwrite, allow_partial):
    """Combine the part archives of a `mir extract --shard K/N` run into one archive OUT (lossless)."""
    from extract.merge import merge as run_merge

    try:
        result = run_merge(out, parts, overwrite=overwrite, allow_partial=allow_partial)
    except ArchiveError as exc:
        raise _fail(exc) from exc
    click.echo(f"merged {result.samples} samples from {result.parts} parts -> {result.out}")
