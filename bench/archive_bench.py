"""Codec choice for hidden-state chunks: compression ratio and write/read throughput, side by side
with a raw copy of the same bytes to and from disk, measured in one run.

    python bench/archive_bench.py [--mb 256] [--hidden 4096]

Data: synthetic float16 activations from `storage_schemas.synth` (realistic means, anisotropic
covariance, outliers), plus the same values as bfloat16-in-float32 to check that storage policy.
Throughputs are MB/s of uncompressed activations.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from storage_schemas.codecs import chunk_tokens_for, hidden_codec, hidden_compressors
from storage_schemas.synth import _LayerModel, _to_dtype

# name -> codec settings as an archive records them (storage.codec); see storage_schemas/codecs.py
CANDIDATES = {
    "none (crc only)": {"cname": "none"},
    "blosc lz4:1 shuffle": {"cname": "lz4", "clevel": 1, "shuffle": "shuffle"},
    "blosc lz4:5 shuffle": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"},
    "blosc zstd1 shuffle": {"cname": "zstd", "clevel": 1, "shuffle": "shuffle"},
    "blosc zstd3 shuffle": {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"},
    "blosc zstd1 bitshuffle": {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"},
}
OLD_DEFAULT = "blosc zstd3 shuffle"  # the default before issue 11, for every dtype


def activations(mb: int, hidden: int, dtype: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    model = _LayerModel(rng, hidden, 8, "vision")
    tokens = mb * 2**20 // (hidden * 2)
    return _to_dtype(model.draw(rng, tokens), dtype)[None]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def drop_page_cache_hint(path: Path) -> None:
    for f in path.rglob("*") if path.is_dir() else [path]:
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def raw_copy(data: np.ndarray, root: Path) -> tuple[float, float]:
    path = root / "raw.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - t0
    drop_page_cache_hint(path)
    t0 = time.perf_counter()
    np.frombuffer(path.read_bytes(), dtype=data.dtype)
    read = time.perf_counter() - t0
    path.unlink()
    return write, read


def best_of(repeat: int, fn, *args):
    """Fastest of `repeat` runs per measured phase: the least disturbed by a noisy machine."""
    runs = [fn(*args) for _ in range(repeat)]
    return tuple(min(r[i] for r in runs) for i in range(len(runs[0])))


def zarr_roundtrip(data: np.ndarray, root: Path, compressors) -> tuple[float, float, int]:
    path = root / "a.zarr"
    hidden = data.shape[2]
    ct = chunk_tokens_for(hidden, data.dtype.itemsize)
    t0 = time.perf_counter()
    arr = zarr.create_array(zarr.storage.LocalStore(path), shape=data.shape, dtype=data.dtype,
                            chunks=(1, ct, hidden), shards=(1, ct * 8, hidden), compressors=compressors)
    arr[:] = data
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    write = time.perf_counter() - t0
    size = dir_bytes(path)
    drop_page_cache_hint(path)
    t0 = time.perf_counter()
    back = zarr.open_array(zarr.storage.LocalStore(path), mode="r")[:]
    read = time.perf_counter() - t0
    assert back.tobytes() == data.tobytes()
    shutil.rmtree(path)
    return write, read, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="uncompressed MB of float16 activations")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3, help="runs per codec; the fastest counts")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mir-bench-", dir=os.environ.get("MIR_BENCH_DIR")))
    try:
        for dtype in ("float16", "bfloat16"):
            data = activations(args.mb, args.hidden, dtype)
            mb = data.nbytes / 2**20
            raw_w, raw_r = best_of(args.repeat, raw_copy, data, root)
            print(f"\n{dtype} activations: {mb:.0f} MB stored as {data.dtype} ({data.shape[1]} tokens x "
                  f"{args.hidden} channels)")
            print(f"raw disk copy: write {mb / raw_w:7.0f} MB/s, read {mb / raw_r:7.0f} MB/s")
            print(f"{'codec':24s} {'ratio':>6s} {'write MB/s':>11s} {'x raw':>6s} {'read MB/s':>10s} {'x raw':>6s}")
            default = hidden_codec(dtype)
            for name, codec in CANDIDATES.items():
                w, r, size = best_of(args.repeat, zarr_roundtrip, data, root, hidden_compressors(codec))
                mark = " *" if codec == default else " o" if name == OLD_DEFAULT else ""
                print(f"{name + mark:24s} {data.nbytes / size:6.2f} {mb / w:11.0f} {raw_w / w:6.2f} {mb / r:10.0f} "
                      f"{raw_r / r:6.2f}")
        print("\n* = the default for this dtype (storage_schemas/codecs.py), o = the old default (zstd3 shuffle). "
              "'x raw' = codec throughput / raw copy throughput.")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
