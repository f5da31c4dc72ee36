"""The memory plan: how many layers are analysed together and how many lanes read each unit, from
one explicit model of the peak resident memory, checked against the budget before anything is read.

Why a model and not a guess: the budget (`--memory-limit`, or a dask.distributed worker's memory limit)
is a promise about the process's peak RSS. The peak is the largest of three phases, each a sum of
terms that follow from the code (D2 = one d x d float64 matrix, 8 d^2 bytes):

* read: every lane (engine.py: one task folding a run of chunks into one accumulator, in order) holds
  its accumulator (`groups` D2 of moments plus the scan's bounded side data: histograms, window counts,
  raw rows, at most ReadConfig's caps, which the plan lowers when a small budget needs it); the lanes
  running at once (at most one per worker thread) each add the larger of the chunk's working set
  (while it is mapped; its Gram products go straight into the accumulator's scatter, reads.ScanRead.fold,
  so no chunk has a D2 of its own) and what folding it in holds (the chunk's
  side data, and one transient copy of the accumulator's window counts or raw rows: the counts are
  added in place, scan.ScanPartial.absorb). Measured at the paper's shape, one unit's accumulated
  side data: ~110k window slots, ~17M gathered values, ~40 MB of raw rows (d = 4096); ~45k, ~4.7M,
  ~29 MB (d = 1024).
* finish: the d x d statistics of the layers in the batch (2 modalities x `groups` D2), plus, per layer
  finished at once, the copies of the trace solve and spectrum statistics (results.layer_summary,
  frechet.trace_sqrt_exact): FINISH_COPIES D2.
* bootstrap (when on): the gradient's copies per layer (gradient.layer_gradient: GRADIENT_COPIES D2),
  then the influence read's triangular factors per layer next to its chunks in flight.

Plus BASE_MEMORY, the interpreter, numpy/scipy/dask/zarr/numba and the archive's metadata (measured:
peak RSS 271-293 MiB of `mir analyze` on a tiny archive, kernels compiled and Dask threads started;
rounded up for the allocator's slack). When even one layer with one lane does not fit, `plan` raises AnalysisError
before any read, naming the budget, the need and what to do.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from dask.utils import format_bytes

from .config import DEFAULT, ReadConfig
from .errors import AnalysisError
from .gradient import DXD_HELD, DXD_PEAK
from .moments import gram_rows
from . import fused
from .kernels import NORM_ROWS
from .window import DENSIFY_VALUES

BASE_MEMORY = 320 * 2**20  # interpreter, libraries, numba kernels, Dask threads: 271-293 MiB measured, + slack
FINISH_COPIES = 6  # d x d float64 arrays alive at once in one layer's finish, beyond its statistics
# the bootstrap's finish (results.layer_summary_and_gradient + gradient.layer_gradient): the gradient's own
# peak beyond the statistics (gradient.DXD_PEAK, measured) plus the 3 that making the factors needs next to
# its input; then each layer keeps gradient.DXD_HELD for the influence read (two float32 triangular factors)
GRADIENT_COPIES = DXD_PEAK + 3
INFLUENCE_COPIES = DXD_HELD
MAX_LANES = 4  # beyond this, more accumulators buy no speed on the machines we target
# the scan's side-data caps tried, as (dense window slots, gathered values) shares of the configured ones:
# the gathered values first, since at the paper's shape they use about half their cap (measured: 4.3k of
# 8192 per column) where the dense slots use 84% of theirs (110k of 131k), and a window that overflows
# costs a second, median-only read
CAP_SHARES = ((1.0, 1.0), (1.0, 0.75), (0.5, 0.5), (0.25, 0.25), (0.125, 0.125))


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know about the selection."""

    d: int  # hidden size
    chunk_rows: int  # rows of the largest storage chunk (a map task's input)
    itemsize: int  # stored bytes per value
    tokens: int  # vision + text tokens of one layer

    @property
    def square(self) -> int:
        """Bytes of one d x d float64 matrix."""
        return 8 * self.d * self.d

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.d * self.itemsize


@dataclass(frozen=True)
class MemoryPlan:
    """How a selection is analysed within a budget, and the estimated peak of each phase (bytes)."""

    budget: int
    layers_per_batch: int
    lanes: int  # accumulators per unit (one layer and modality)
    workers: int
    read: int
    finish: int
    bootstrap: int
    config: ReadConfig = DEFAULT  # the reads' caps, lowered where the budget needs it (more reads, same results)

    @property
    def peak(self) -> int:
        return max(self.read, self.finish, self.bootstrap)

    def describe(self) -> str:
        return (f"{self.layers_per_batch} layer(s) per batch, {self.lanes} lane(s) per layer and modality; "
                f"estimated peak {format_bytes(self.peak)} of {format_bytes(self.budget)}")


MMAP_THRESHOLD = 8 << 20  # arrays from 8 MiB up get their own pages from the OS, given back when freed
_MALLOC_SET = False


def return_freed_memory() -> None:
    """Have glibc map every allocation from MMAP_THRESHOLD up on its own and unmap it when freed (once
    per process; nothing where glibc's mallopt is missing). Why: glibc raises its mmap threshold up to
    32 MiB as large blocks are freed, after which the scan's many 1-32 MiB arrays (raw rows, gathered
    values, histograms) come from its heaps and stay resident when freed. Measured at the paper's shape
    under --memory-limit 2GB: peak RSS 1.92 GiB (1.03x the budget) with glibc's default, 1.72 GiB with
    the threshold fixed at 1 MiB, 1.75 GiB (0.94x) at 8 MiB. Fresh pages cost page faults: on 4 layers
    at d = 1024 the analysis took 14% more CPU at 1 MiB, 4% more at 8 MiB (one run each)."""
    global _MALLOC_SET
    if _MALLOC_SET:
        return
    _MALLOC_SET = True
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; fixing it also stops glibc's adjustments
    except (OSError, AttributeError):
        pass


def capped(config: ReadConfig, share: float, gathered: float | None = None) -> ReadConfig:
    """The config with the median window's caps (window slots, gathered values) at `share` of theirs.
    ReadConfig's caps trade memory for reads, never results: what exceeds them is dropped and a second,
    median-only read (histograms, no Gram products) computes it exactly. The raw-row cap stays: beyond it
    the second read would recompute every Gram product."""
    gathered = share if gathered is None else gathered
    if share >= 1.0 and gathered >= 1.0:
        return config
    return replace(config, dense_slots_per_column=max(1, int(config.dense_slots_per_column * share)),
                   dense_slots_bytes=int(config.dense_slots_bytes * share),
                   sparse_kept_per_column=max(1, int(config.sparse_kept_per_column * gathered)))


def side_bytes(shape: Shape, config: ReadConfig = DEFAULT) -> int:
    """A scan accumulator's data beside its moments: top-byte histogram (d x 256 int64), window counts
    (at most ReadConfig's dense slots, 1 KiB each, and its gathered values), raw rows (at most
    raw_rows_bytes), per-row norms and flags (9 bytes a token)."""
    d, values = shape.d, shape.tokens * shape.d
    dense = min(config.dense_slots_per_column * d, config.dense_slots_kept(d), 256 * d)
    window = dense * 1032 + min(config.sparse_kept_per_column * d, values) * 5
    return 2048 * d + window + min(config.raw_rows_bytes, values * shape.itemsize) + 9 * shape.tokens


def chunk_side(shape: Shape, config: ReadConfig = DEFAULT) -> int:
    """One chunk's side data: its window counts (at most window_bins dense slots per column, counted as
    uint16, 512 B each; sparse_values gathered values per column, 5 B each), its top-byte histogram and
    its raw rows (at most the chunk, at most the unit's raw-row cap)."""
    d = shape.d
    dense = min(config.window_bins * d, config.dense_slots_kept(d), 256 * d)
    raw = min(shape.chunk_bytes, config.raw_rows_bytes, shape.tokens * d * shape.itemsize)
    return dense * 512 + config.sparse_values * d * 5 + 2048 * d + raw


def chunk_working(shape: Shape, config: ReadConfig = DEFAULT) -> int:
    """What a running lane holds beside its accumulator, at the largest of the steps of one chunk
    (kernels.scan_chunk, reads.ScanRead.fold), each holding the chunk itself:
    * scan: its bits transposed (fused.scan_columns), its histogram and window counts being made;
    * moments: its window counts and raw rows, the float32 rows of one Gram step, their float32 d x d
      product (added into the accumulator's float64 scatter), the float64 rows of one norm step where
      numba is missing (kernels.token_norms);
    * fold: its side data and one transient: the first chunk's window counts when they move into the
      accumulator's buffer (window.WindowCounts.absorb, once per lane: at most one chunk's counts), the
      accumulated raw rows when the chunk's are appended, or densifying's key tables and blocks of
      gathered values (window.WindowCounts.densified; it counts straight into the accumulator's buffer).
    Reading a chunk (before any of these) holds its decoded buffer and the array made from it."""
    d, chunk = shape.d, shape.chunk_bytes
    side = chunk_side(shape, config)
    counts = min(config.window_bins * d, config.dense_slots_kept(d), 256 * d) * 512
    raw_cap = min(config.raw_rows_bytes, shape.tokens * d * shape.itemsize)
    scan = chunk + side + (0 if fused.AVAILABLE else 8 * NORM_ROWS * d)
    moments = side + 4 * gram_rows(d) * d + 4 * d * d
    densify = 12 * 256 * d + 32 * DENSIFY_VALUES
    fold = side + max(counts, raw_cap, densify)
    return max(2 * chunk, chunk + max(scan, moments, fold))


def estimate(shape: Shape, *, layers: int, lanes: int, workers: int, groups: int = 1, bootstrap: bool = False,
             config: ReadConfig = DEFAULT) -> tuple[int, int, int]:
    """(read, finish, bootstrap) peaks in bytes for `layers` layers together, `lanes` lanes per unit,
    `workers` threads; `groups` sample groups kept per modality (K d x d moments each)."""
    units = 2 * layers
    d2 = shape.square
    accumulator = groups * d2 + side_bytes(shape, config)
    running = min(workers, units * lanes)
    # a running lane holds, beside its accumulator, either the chunk's working set (while mapping it) or
    # what folding it in holds
    read = BASE_MEMORY + units * lanes * accumulator + running * chunk_working(shape, config)
    stats = units * groups * d2 + layers * 9 * shape.tokens
    finishing = min(workers, layers)
    finish = BASE_MEMORY + stats + finishing * FINISH_COPIES * d2
    boot = 0
    if bootstrap:
        gradients = BASE_MEMORY + stats + finishing * GRADIENT_COPIES * d2
        influence = BASE_MEMORY + stats + layers * INFLUENCE_COPIES * d2 + workers * chunk_working(shape)
        boot = max(gradients, influence)
    return read, finish, boot


def plan(shape: Shape, n_layers: int, workers: int, budget: int, *, groups: int = 1, bootstrap: bool = False,
         config: ReadConfig = DEFAULT) -> MemoryPlan:
    """The fastest plan within the budget: the most layers per batch (up to all), then enough lanes
    that every worker thread has a unit's lane to read (at most MAX_LANES per unit), with the scan's
    caps as configured, or lowered (CAP_SHARES) when one layer does not fit otherwise; raises
    AnalysisError when one layer with one lane does not fit even so."""
    def make(layers: int, lanes: int, reads: ReadConfig) -> MemoryPlan:
        r, f, b = estimate(shape, layers=layers, lanes=lanes, workers=workers, groups=groups, bootstrap=bootstrap,
                           config=reads)
        return MemoryPlan(budget, layers, lanes, workers, r, f, b, reads)

    for share, gathered in CAP_SHARES:
        smallest = make(1, 1, capped(config, share, gathered))
        if smallest.peak <= budget:
            break
    if smallest.peak > budget:
        phase = max(("reading", smallest.read), ("finishing a layer", smallest.finish),
                    ("the bootstrap", smallest.bootstrap), key=lambda kv: kv[1])[0]
        raise AnalysisError(
            f"the memory budget {format_bytes(budget)} is too small for hidden size {shape.d}: one layer at a "
            f"time needs about {format_bytes(smallest.peak)} (peak while {phase}; each d x d float64 matrix is "
            f"{format_bytes(shape.square)}). Raise --memory-limit (or the Dask workers' memory limit) to at least "
            f"{format_bytes(smallest.peak)}" + (", or run without --bootstrap" if bootstrap else "") + ".")
    best = smallest
    for layers in range(1, n_layers + 1):
        wanted = min(MAX_LANES, max(1, -(-workers // (2 * layers))))
        fits = [p for lanes in range(wanted, 0, -1) if (p := make(layers, lanes, smallest.config)).peak <= budget]
        if not fits:
            break
        best = fits[0]
    return best


def page_cache_room(reserved: int) -> int:
    """Bytes of file data the OS can keep cached beside this run: half of MemAvailable (Linux /proc/meminfo)
    less `reserved` (the run's own planned peak); 0 where unknown. Bounds the influence read's prefetch
    (storage_schemas.prefetch), so that it never evicts what it has just read."""
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0
    return max(0, (available - reserved) // 2)

