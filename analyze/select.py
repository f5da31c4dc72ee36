"""Turning user text into a Selection: sample rows (index ranges, @FILE of ids, random draws), layers
(both in the one index-range grammar of storage_schemas.ranges), and a safe metadata predicate
(`--where`), parsed with `ast` and interpreted over whitelisted nodes only: no eval, no attribute
access, no calls other than a few string tests."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np

from storage_schemas import ArchiveError, ranges

from .errors import AnalysisError


def parse_layers(text: str | None, stored: np.ndarray, entries: int | None = None) -> list[int]:
    """Layer values in the shared grammar (storage_schemas.ranges) over the model's `entries` hidden_states
    indices (default: up to the highest stored layer); default: every stored layer except 0 (the
    embeddings, skipped by MIR_SPEC)."""
    stored_list = sorted(int(x) for x in stored)
    entries = entries if entries is not None else (stored_list[-1] + 1 if stored_list else 0)
    if text is not None and text.strip().lower() == "all":
        return stored_list
    default = [x for x in stored_list if x >= 1] or stored_list
    try:
        chosen = ranges.parse_layers(text, entries, default)
    except ArchiveError as exc:
        raise AnalysisError(f"{exc}; stored layers: {ranges.compact_ranges(stored_list)}") from None
    missing = sorted(set(chosen) - set(stored_list))
    if missing:
        raise AnalysisError(f"layers {ranges.compact_ranges(missing)} are not stored in this archive; stored layers: "
                            f"{ranges.compact_ranges(stored_list)}")
    return chosen


def resolve_samples(archive, samples: str | None = None, where: str | None = None,
                    within: np.ndarray | None = None) -> np.ndarray:
    """Sample rows chosen by --samples (index ranges, @FILE of ids, random:N:SEED) and --where, among the
    rows `within` allows (a mask; default all). Only a leading @ names a file, so the meaning never
    depends on what the working directory holds."""
    n = archive.n_samples
    mask = np.ones(n, bool) if where is None else where_mask(where, archive.samples)
    if within is not None:
        mask &= within
    if samples is None or samples.strip() in ("", "all"):
        rows = np.arange(n)
    elif samples.startswith("random:"):
        try:
            _, count, seed = samples.split(":")
            count, seed = int(count), int(seed)
        except ValueError as exc:
            raise AnalysisError(f"--samples {samples!r}: write random:N:SEED, e.g. random:50:0") from exc
        pool = np.flatnonzero(mask)
        if count > len(pool) or count < 1:
            raise AnalysisError(f"--samples {samples!r}: cannot draw {count} of the {len(pool)} eligible samples")
        return np.sort(np.random.default_rng(seed).choice(pool, size=count, replace=False))
    elif samples.startswith("@"):
        rows = archive.resolve_samples(_read_ids(Path(samples[1:]).expanduser()))
    else:
        try:
            rows = np.array(ranges.parse_index_ranges(samples, n, "--samples"), dtype=np.int64)
        except ArchiveError as exc:
            hint = f" (a file of sample ids is written @{samples})" if Path(samples).is_file() else ""
            raise AnalysisError(f"{exc}; the archive has {n} samples{hint}") from None
    rows = rows[mask[rows]]
    if len(rows) == 0:
        raise AnalysisError("the sample selection (--samples / --where) is empty")
    return rows


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise AnalysisError(f"{path}: no such file of sample ids")
    ids = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise AnalysisError(f"{path}: no sample ids in it (one id per line)")
    return ids


# ---------------------------------------------------------------------------- --where
_FUNCS = {
    "contains": lambda col, s: np.char.find(col.astype(str), s) >= 0,
    "startswith": lambda col, s: np.char.startswith(col.astype(str), s),
    "endswith": lambda col, s: np.char.endswith(col.astype(str), s),
    "matches": lambda col, s: np.array([re.search(s, v) is not None for v in col.astype(str)], bool),
}
_CMP = {ast.Eq: np.equal, ast.NotEq: np.not_equal, ast.Lt: np.less, ast.LtE: np.less_equal,
        ast.Gt: np.greater, ast.GtE: np.greater_equal}


def where_mask(expression: str, samples) -> np.ndarray:
    """Evaluate e.g. "text_count >= 20 and not contains(image, 'cat')" over the samples table."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise AnalysisError(f"--where {expression!r} is not a valid expression: {exc.msg}") from exc
    columns = {name: np.asarray(samples[name].values) for name in samples.data_vars}
    columns["row"] = np.arange(samples.sizes["sample"])
    value = _eval(tree.body, columns, expression)
    mask = np.broadcast_to(np.asarray(value), (samples.sizes["sample"],))
    if mask.dtype != bool:
        raise AnalysisError(f"--where {expression!r} does not give true/false per sample")
    return mask.copy()


def _eval(node, cols: dict, expr: str):
    if isinstance(node, ast.BoolOp):
        values = [_eval(v, cols, expr) for v in node.values]
        op = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
        out = values[0]
        for v in values[1:]:
            out = op(out, v)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return np.logical_not(_eval(node.operand, cols, expr))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, cols, expr)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, cols, expr)
        out = True
        for op, comp in zip(node.ops, node.comparators):
            right = _eval(comp, cols, expr)
            if isinstance(op, (ast.In, ast.NotIn)):
                result = np.isin(left, np.asarray(right))
                result = ~result if isinstance(op, ast.NotIn) else result
            elif type(op) in _CMP:
                result = _CMP[type(op)](left, right)
            else:
                raise AnalysisError(f"--where {expr!r}: operator {type(op).__name__} is not supported")
            out = np.logical_and(out, result)
            left = right
        return out
    if isinstance(node, ast.Name):
        if node.id not in cols:
            raise AnalysisError(f"--where {expr!r}: unknown field {node.id!r}; fields: {', '.join(sorted(cols))}")
        return cols[node.id]
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval(e, cols, expr) for e in node.elts]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
            and len(node.args) == 2 and not node.keywords:
        col, pattern = (_eval(a, cols, expr) for a in node.args)
        if not isinstance(pattern, str):
            raise AnalysisError(f"--where {expr!r}: {node.func.id}() takes a field and a quoted string")
        return _FUNCS[node.func.id](np.asarray(col), pattern)
    raise AnalysisError(f"--where {expr!r}: only comparisons of sample fields with constants, and/or/not, "
                        f"'in [...]' and {', '.join(_FUNCS)}(field, 'text') are allowed")
