"""A report people can send: one self-contained HTML file per analysis or study.

Figures are inline SVG drawn by the same matplotlib functions as `--plot`; there is no script, no
external stylesheet, font or image, and a Content-Security-Policy that forbids both, so the file
renders the same offline, in a mail client's viewer or an archive years later.

The analysis report is built from the per-layer xarray Dataset of the result (its attrs carry MIR,
the interval, the settings and the versions) and the archive's provenance attributes; the study
report from the study's summary rows. Nothing here recomputes a number.
"""
from __future__ import annotations

import html
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import xarray as xr

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
STYLE = """
body { font-family: sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
.mir { font-size: 1.6em; font-weight: bold; } .ci { font-size: 1.1em; color: #444; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f2f2f2; } td.k, th.k { text-align: left; }
.warn { color: #8a4b00; } .fig svg { max-width: 100%; height: auto; }
pre { background: #f7f7f7; padding: 0.5em; font-size: 0.8em; white-space: pre-wrap; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any, digits: int = 6) -> str:
    if x is None:
        return "-"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _e(x)
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return f"{v:.{digits}g}"


def _svg(draw, *args) -> str:
    """Run a pipelines.plots function into a temporary SVG and return the <svg> element."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "mir-report"}), \
            tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "figure.svg"
        draw(*args, path)
        text = path.read_text(encoding="utf-8")
    return '<div class="fig">' + text[text.index("<svg"):] + "</div>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    head = "".join(f'<th class="k">{_e(h)}</th>' if i < left else f"<th>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="k">{_e(c)}</td>' if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv(mapping: Mapping[str, Any]) -> str:
    rows = []
    for key, value in mapping.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        rows.append(f'<tr><th class="k">{_e(key)}</th><td class="k">{_e(text)}</td></tr>')
    return f"<table>{''.join(rows)}</table>"


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def _attr_json(ds: xr.Dataset, key: str) -> dict:
    value = ds.attrs.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return {key: value}
    return dict(value or {})


def _headline(mir: Any, ci_low: Any, ci_high: Any, extra: str) -> str:
    ci = (f'<div class="ci">95% bootstrap interval [{_num(ci_low)}, {_num(ci_high)}]</div>'
          if ci_low is not None else '<div class="ci">no interval (run with --bootstrap B)</div>')
    return f'<div class="mir">MIR = {_num(mir)}</div>{ci}<p>{_e(extra)}</p>'


def _layer_tables(ds: xr.Dataset) -> list[str]:
    layers = ds["layer"].values.tolist()
    cross = [[layer, _num(ds["fd"][i].item()), _num(ds["fd_mean_term"][i].item()),
              _num(ds["fd_covariance_term"][i].item()), _num(ds["trace_sqrt"][i].item()), _num(ds["scale"][i].item()),
              _num(ds["centroid_cosine"][i].item(), 4), _e(ds["route"][i].item())] for i, layer in enumerate(layers)]
    out = ["<h2>Per-layer Fréchet distance</h2>",
           _table(["layer", "FD", "mean term", "covariance term", "tr sqrt", "scale a", "centroid cosine", "route"],
                  cross)]
    names = [("tokens", 0), ("outliers", 0), ("norm_mean", 5), ("norm_median", 5), ("norm_std", 5),
             ("total_variance", 5), ("effective_rank", 4), ("condition_number", 3), ("numerical_rank", 0)]
    for m, modality in enumerate(ds["modality"].values.tolist()):
        rows = [[layer] + [_num(ds[n][i, m].item(), d) if d else _e(int(ds[n][i, m].item())) for n, d in names]
                for i, layer in enumerate(layers)]
        out += [f"<h2>Statistics of the {_e(modality)} tokens</h2>", _table(["layer"] + [n for n, _ in names], rows)]
    return out


def _provenance(archive_attrs: Mapping[str, Any], settings: Mapping[str, Any], versions: Mapping[str, Any]) -> list[str]:
    out = ["<h2>Provenance</h2>"]
    model = archive_attrs.get("model") or {}
    if model:
        out += ["<h3>Model</h3>", _kv(model)]
    data = archive_attrs.get("dataset") or {}
    if data:
        out += ["<h3>Data</h3>", _kv(data)]
    extraction = archive_attrs.get("extraction") or {}
    if extraction:
        out += ["<h3>Extraction settings</h3>", _kv(extraction.get("settings") or {}),
                _kv({k: extraction[k] for k in ("tool", "tool_version", "time", "device", "batch_size")
                     if k in extraction})]
    out += ["<h3>Analysis settings</h3>", _kv(settings), "<h3>Versions</h3>",
            _kv({**(extraction.get("library_versions") or {}), **versions})]
    return out


def analysis_report(ds: xr.Dataset, archive_attrs: Mapping[str, Any], *, title: str = "MIR report",
                    warnings: Sequence[str] = ()) -> str:
    """The HTML of one analysis: `ds` is the result's per-layer Dataset."""
    from .plots import plot_layer_curve

    a = ds.attrs
    extra = (f"{a.get('n_samples')} samples, {a.get('n_vision_tokens')} vision and {a.get('n_text_tokens')} text "
             f"tokens per layer, {ds.sizes['layer']} layers; trace term: {a.get('sqrt_mode')}")
    body = [f"<h1>{_e(title)}</h1>", _headline(a.get("mir"), a.get("mir_ci_low"), a.get("mir_ci_high"), extra)]
    body += [f'<p class="warn">warning: {_e(w)}</p>' for w in warnings]
    body += ["<h2>Per-layer curve</h2>", _svg(plot_layer_curve, ds)]
    body += _layer_tables(ds)
    body += _provenance(archive_attrs, _attr_json(ds, "settings"), _attr_json(ds, "versions"))
    return _page(title, body)


def study_report(rows: Sequence[Mapping[str, Any]], *, settings: Mapping[str, Any],
                 archive_attrs: Mapping[str, Any] | None = None, title: str = "MIR study report") -> str:
    """The HTML of a study: `rows` are its summary rows (step, checkpoint, mir, ci_low, ci_high, fd, ...)."""
    from .plots import plot_mir_by_step

    rows = list(rows)
    body = [f"<h1>{_e(title)}</h1>"]
    if rows:
        last = rows[-1]
        body.append(_headline(last["mir"], last.get("ci_low"), last.get("ci_high"),
                              f"latest checkpoint {last['checkpoint']} (step {last['step']}); "
                              f"{len(rows)} checkpoints, trace term: {last.get('mode')}"))
        body += ["<h2>MIR by step</h2>", _svg(plot_mir_by_step, rows)]
    table = [[r["step"], _num(r["mir"]), _num(r.get("ci_low")), _num(r.get("ci_high")), _e(r.get("n_samples")),
              _e(r["checkpoint"])] for r in rows]
    body += ["<h2>MIR and its interval at each step</h2>",
             _table(["step", "MIR", "CI low", "CI high", "samples", "checkpoint"], table)]
    layers = sorted({int(k) for r in rows for k in r.get("fd", {})})
    if layers:
        body += ["<h2>Per-layer Fréchet distance at each step</h2>",
                 _table(["step"] + [f"layer {k}" for k in layers],
                        [[r["step"]] + [_num(r["fd"].get(str(k))) for k in layers] for r in rows])]
    body += _provenance(archive_attrs or {}, settings, {})
    return _page(title, body)


def write_report(text: str, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_analysis_report(result: Any, archives: Sequence[str], path: str | Path) -> Path:
    """`mir analyze --report`: the report of `result` (an analysis result carrying its Dataset)."""
    from storage_schemas import open_archive

    attrs = open_archive(list(archives)).attrs
    title = "MIR report: " + ", ".join(Path(str(a).rstrip("/")).name for a in archives)
    return write_report(analysis_report(result.dataset, attrs, title=title, warnings=result.warnings), path)


def write_study_report(config: Any, outcomes: Sequence[Any], path: str | Path) -> Path:
    """`mir study --report`: MIR by step with intervals, per-layer FDs, the study's settings."""
    from storage_schemas import open_archive

    from .study import summary_rows

    rows = summary_rows(list(outcomes))
    done = [o for o in outcomes if o.result is not None]
    attrs = dict(open_archive(str(done[-1].archive)).attrs) if done else {}
    settings = {"study file": str(config.source), "extract": config.extract, "analyze": config.analyze,
                "checkpoints": [{"step": o.checkpoint.step, "path": o.checkpoint.path, "archive": str(o.archive)}
                                for o in outcomes],
                "analysis versions": (done[-1].result.get("versions") if done else None)}
    title = f"MIR study report: {config.source.name}"
    return write_report(study_report(rows, settings=settings, archive_attrs=attrs, title=title), path)
