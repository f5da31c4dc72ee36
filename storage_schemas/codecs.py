"""Chunking and codec pipeline of stored arrays.

The default codec of the hidden states depends on what the model computed, by measurement
(bench/archive_bench.py, bench/writer_bench.py): float16 and float32 activations barely compress
(1.09x with Blosc zstd and byte shuffle) while compression costs far more time than the disk
saves, so they are stored raw; bfloat16 stored as float32 has two always-zero low bytes per value,
which byte shuffle followed by a fast LZ4 removes at little CPU cost. Every chunk ends with a CRC32C
either way, so a flipped byte cannot become a number.
"""
from __future__ import annotations

from zarr.codecs import BloscCodec, Crc32cCodec

TARGET_CHUNK_BYTES = 8 * 2**20  # ~8 MiB per inner chunk, uncompressed
CHUNKS_PER_SHARD = 8  # at most ~64 MiB per shard: one shard = one Dask chunk
# The writer holds one shard of tokens per layer in memory per modality (stream.py), so shards
# shrink (by powers of two, to one chunk at least) where the layers' shards would exceed this.
SHARD_ROW_BYTES = 512 * 2**20
MIN_CHUNK_TOKENS = 64
MAX_CHUNK_TOKENS = 65536
INDEX_CHUNK = 65536  # elements per chunk of 1-D per-token / per-sample arrays

NO_COMPRESSION = {"cname": "none"}
# Hidden-state codec per dtype the model computed (storage.source_dtype).
DEFAULT_CODECS = {
    "float16": NO_COMPRESSION,
    "float32": NO_COMPRESSION,
    "bfloat16": {"cname": "lz4", "clevel": 1, "shuffle": "shuffle"},
}
BLOSC_DEFAULTS = {"clevel": 3, "shuffle": "shuffle"}  # for a Blosc compressor named without settings


def chunk_tokens_for(hidden_size: int, itemsize: int) -> int:
    """Largest power of two of tokens whose (1, tokens, hidden) chunk stays within the target."""
    tokens = max(1, TARGET_CHUNK_BYTES // (hidden_size * itemsize))
    power = 1 << (tokens.bit_length() - 1)
    return int(min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, power)))


def chunks_per_shard_for(n_layers: int, chunk_tokens: int, hidden_size: int, itemsize: int) -> int:
    """Chunks per shard: CHUNKS_PER_SHARD, halved while a shard of every layer exceeds SHARD_ROW_BYTES."""
    cps = CHUNKS_PER_SHARD
    while cps > 1 and n_layers * cps * chunk_tokens * hidden_size * itemsize > SHARD_ROW_BYTES:
        cps //= 2
    return cps


def hidden_codec(source_dtype: str, codec: dict | None = None) -> dict:
    """The codec settings an archive of `source_dtype` records: the default, or `codec` completed."""
    if not codec:
        return dict(DEFAULT_CODECS.get(source_dtype, NO_COMPRESSION))
    if codec.get("cname") == "none":
        return dict(NO_COMPRESSION)
    return {**BLOSC_DEFAULTS, **codec}


def hidden_compressors(codec: dict) -> list:
    """Bytes-to-bytes codecs for hidden-state chunks (settings from `hidden_codec`): compression
    (none, or Blosc), then a checksum."""
    if codec.get("cname", "none") == "none":
        return [Crc32cCodec()]
    return [BloscCodec(cname=codec["cname"], clevel=int(codec["clevel"]), shuffle=codec["shuffle"]), Crc32cCodec()]


def index_compressors() -> list:
    """Codecs for the small integer and string arrays."""
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()]
