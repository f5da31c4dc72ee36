"""Which image-text samples an extraction runs over, and reading them safely.

Sources: an image directory and a text directory (CNN/DailyMail `.story` files or `.txt`),
paired in sorted order, or a JSONL manifest of `{"id", "image", "text"}` rows. `--num` and
`--seed` draw a random subset the way the MIR paper does. The resulting sample list, and a hash
of it, is what provenance records and what `--resume` and `--shard` rely on.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEXT_SUFFIXES = (".story", ".txt")


@dataclass(frozen=True)
class Sample:
    """One image-text pair. `text` is set for inline manifest texts, else `text_path`."""

    sample_id: str
    image_path: Path
    text_path: Path | None = None
    text: str | None = None
    key: str = ""  # location-independent identity (names relative to the sources), for the list hash

    @property
    def image_ref(self) -> str:
        return str(self.image_path)

    @property
    def text_ref(self) -> str:
        """What the archive stores as the sample's text reference: the file, or the inline text."""
        return str(self.text_path) if self.text_path is not None else (self.text or "")


@dataclass(frozen=True)
class SampleList:
    """The ordered samples of one extraction and a description of where they came from."""

    samples: tuple[Sample, ...]
    sources: dict[str, Any]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def hash(self) -> str:
        """sha256 over the ordered ids and references, relative to the sources (so the same data
        mounted elsewhere, e.g. on another node of a sharded run, hashes the same).

        File contents are not hashed, so a corrupt file can be replaced and the run resumed.
        """
        h = hashlib.sha256()
        for s in self.samples:
            row = [s.sample_id, s.key or [s.image_ref, s.text_ref]]
            h.update(json.dumps(row).encode() + b"\n")
        return "sha256:" + h.hexdigest()

    def shard(self, index: int, count: int) -> "SampleList":
        """The index-th (1-based) of `count` contiguous, disjoint, nearly equal slices."""
        if count < 1 or not 1 <= index <= count:
            raise DataError(f"--shard {index}/{count}: K must lie in 1..N (e.g. --shard 1/4)")
        n = len(self.samples)
        bounds = [round(i * n / count) for i in range(count + 1)]
        return SampleList(self.samples[bounds[index - 1]:bounds[index]], self.sources)


def _list_files(directory: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    if not directory.is_dir():
        raise DataError(f"{directory}: {what} directory not found")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)
    if not files:
        raise DataError(f"{directory}: no {what} files ({', '.join(suffixes)}) in this directory")
    return files


def _draw(n_available: int, num: int | None, seed: int | None, what: str) -> np.ndarray:
    """Indices of the samples to use: the first `num` in order, or a seeded random draw."""
    num = n_available if num is None else num
    if num < 1:
        raise DataError(f"--num must be at least 1, got {num}")
    if num > n_available:
        raise DataError(f"--num {num} asks for more samples than the {n_available} {what} available")
    if seed is None:
        return np.arange(num)
    return np.random.default_rng(seed).choice(n_available, size=num, replace=False)


def from_directories(images: str | Path, texts: str | Path, *, num: int | None = None,
                     seed: int | None = None) -> SampleList:
    """Pair the i-th sorted image with the i-th sorted text; with `seed`, draw both at random.

    MIR compares two token distributions, so which image goes with which text does not matter;
    with a seed, images and texts are drawn independently (without replacement).
    """
    image_files = _list_files(Path(images), IMAGE_SUFFIXES, "image")
    text_files = _list_files(Path(texts), TEXT_SUFFIXES, "text")
    n_pairs = min(len(image_files), len(text_files))
    idx_i = _draw(n_pairs, num, None, "image-text pairs")
    idx_t = idx_i
    if seed is not None:
        rng = np.random.default_rng(seed)
        idx_i = rng.choice(len(image_files), size=idx_i.size, replace=False)
        idx_t = rng.choice(len(text_files), size=idx_i.size, replace=False)
    samples = tuple(
        Sample(sample_id=f"{image_files[i].name}|{text_files[t].name}", image_path=image_files[i].resolve(),
               text_path=text_files[t].resolve(), key=json.dumps([image_files[i].name, text_files[t].name]))
        for i, t in zip(idx_i.tolist(), idx_t.tolist(), strict=True)
    )
    sources = {"images": str(Path(images).resolve()), "texts": str(Path(texts).resolve()),
               "n_images": len(image_files), "n_texts": len(text_files), "num": len(samples), "seed": seed,
               "pairing": "sorted order" if seed is None else "independent random draws"}
    return SampleList(samples, sources)


def from_manifest(manifest: str | Path, *, num: int | None = None, seed: int | None = None) -> SampleList:
    """Rows `{"id", "image", "text"}`; `image` is a path (relative to the manifest's directory),
    `text` the text itself, or `text_file` a path to a `.story`/`.txt` file instead."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest file not found")
    base = manifest.resolve().parent
    rows: list[Sample] = []
    seen: dict[str, int] = {}
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{manifest}: not UTF-8 text ({exc})") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{manifest}, line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not a JSON object ({exc.msg})") from exc
        if not isinstance(row, dict) or "image" not in row or ("text" not in row and "text_file" not in row):
            raise DataError(f'{where}: each row needs "image" and "text" (or "text_file") fields')
        sid = str(row.get("id", f"line{lineno}"))
        if sid in seen:
            raise DataError(f"{where}: id {sid!r} repeats line {seen[sid]}; ids must be unique")
        seen[sid] = lineno
        text_file = row.get("text_file")
        text = row.get("text")
        if text_file is None and not isinstance(text, str):
            raise DataError(f'{where}: "text" must be a string')
        rows.append(Sample(sample_id=sid, image_path=(base / str(row["image"])).resolve(),
                           text_path=(base / str(text_file)).resolve() if text_file is not None else None,
                           text=None if text_file is not None else text,
                           key=json.dumps([str(row["image"]), text_file, text])))
    if not rows:
        raise DataError(f"{manifest}: the manifest has no rows")
    idx = _draw(len(rows), num, seed, "manifest rows")
    samples = tuple(rows[i] for i in idx.tolist())
    sources = {"manifest": str(manifest.resolve()), "n_rows": len(rows), "num": len(samples), "seed": seed}
    return SampleList(samples, sources)


# ----------------------------------------------------------------------------- reading
def read_text(sample: Sample) -> str:
    """The sample's text: a `.story` body before the first `@highlight`, or the whole `.txt`,
    stripped of surrounding whitespace (as the reference code does)."""
    if sample.text_path is None:
        text = (sample.text or "").strip()
        if not text:
            raise DataError(f"sample {sample.sample_id!r}: the manifest text is empty")
        return text
    path = sample.text_path
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: text file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the text file ({exc.strerror})") from exc
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "re-encode the file as UTF-8") from exc
    content = content.removeprefix("\ufeff")
    if path.suffix.lower() == ".story":
        content = content.split("@highlight")[0]
    text = content.strip()
    if not text:
        what = "story body (before the first @highlight)" if path.suffix.lower() == ".story" else "text"
        raise DataError(f"{path}: the {what} is empty")
    return text


def load_image(path: Path):
    """Decode an image fully and convert it to 8-bit RGB; fail naming the file.

    Grayscale, palette, RGBA/LA (alpha dropped, as the reference's `convert("RGB")`), CMYK and
    16-bit images are all accepted.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the image file ({exc.strerror})") from exc
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an image file")
    if size == 0:
        raise DataError(f"{path}: the image file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except UnidentifiedImageError as exc:
        raise DataError(f"{path}: not an image PIL can read (unknown format or corrupt header)") from exc
    except Image.DecompressionBombError as exc:  # not an OSError: it would escape as a traceback
        raise DataError(f"{path}: refused by Pillow's decompression-bomb guard ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: the image is corrupt or truncated ({exc})") from exc


def to_rgb(img):
    """8-bit RGB copy of a PIL image of any common mode (16-bit scaled down, not clipped)."""
    from PIL import Image

    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.int64)
        top = 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        arr8 = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr8 = np.clip(np.round(arr if arr.max(initial=0) > 1.0 else arr * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def preflight(samples: SampleList) -> None:
    """Check every input before anything is written: texts read, images open and decode.

    A failing file stops the run before the archive is created, so nothing half-written exists.
    """
    for s in samples.samples:
        read_text(s)
        load_image(s.image_path)
