"""Chunking and codec pipeline of stored arrays.

Measured in bench/archive_bench.py: on float16 activations Blosc-zstd with byte shuffle at a low
level gives most of the attainable ratio at several hundred MB/s; higher levels cost speed for
a percent or two. Every chunk ends with a CRC32C so a flipped byte cannot become a number.
"""
from __future__ import annotations

from zarr.codecs import BloscCodec, Crc32cCodec

TARGET_CHUNK_BYTES = 8 * 2**20  # ~8 MiB per inner chunk, uncompressed
CHUNKS_PER_SHARD = 8  # ~64 MiB per shard: one shard = one Dask chunk
MIN_CHUNK_TOKENS = 64
MAX_CHUNK_TOKENS = 65536
INDEX_CHUNK = 65536  # elements per chunk of 1-D per-token / per-sample arrays

DEFAULT_CODEC = {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"}


def chunk_tokens_for(hidden_size: int, itemsize: int) -> int:
    """Largest power of two of tokens whose (1, tokens, hidden) chunk stays within the target."""
    tokens = max(1, TARGET_CHUNK_BYTES // (hidden_size * itemsize))
    power = 1 << (tokens.bit_length() - 1)
    return int(min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, power)))


def hidden_compressors(codec: dict | None = None) -> list:
    """Bytes-to-bytes codecs for hidden-state chunks: compression, then a checksum."""
    cfg = {**DEFAULT_CODEC, **(codec or {})}
    return [BloscCodec(cname=cfg["cname"], clevel=int(cfg["clevel"]), shuffle=cfg["shuffle"]), Crc32cCodec()]


def index_compressors() -> list:
    """Codecs for the small integer and string arrays."""
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()]
