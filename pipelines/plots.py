"""Figures of analyses, studies and comparisons (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import xarray as xr


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _finish(fig, ax, path: str | Path) -> Path:
    """Integer x ticks (layers, steps), grid, legend; save (format by suffix) and free the figure."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


GAP_PARTS = (("gap_shift", "shift (mean term)"), ("gap_scale", "scale (isotropic)"),
             ("gap_channel", "per channel (diag map)"), ("gap_shape", "shape (what remains)"))


def plot_layer_curve(ds: xr.Dataset, path: str | Path, title: str | None = None) -> Path:
    """Per-layer FD (its mean and covariance terms) with MIR in the title and, below, FD split into its gap
    parts as a stacked bar per layer (a negative per-channel part drawn below zero); PNG/PDF/SVG by suffix."""
    plt = _pyplot()
    layers = ds["layer"].values
    bars = all(name in ds for name, _ in GAP_PARTS)
    if bars:
        fig, (ax, low) = plt.subplots(2, 1, figsize=(7, 6.4), sharex=True, constrained_layout=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
        _gap_bars(low, ds)
    else:
        fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
    ax.plot(layers, ds["fd"].values, marker="o", color="C0", label="FD (per-layer MIR)")
    ax.plot(layers, ds["fd_mean_term"].values, ls="--", color="C1", label="mean term ||Δμ||²")
    ax.plot(layers, ds["fd_covariance_term"].values, ls=":", color="C2", label="covariance term")
    if not bars:
        ax.set_xlabel("layer")
    ax.set_ylabel("Fréchet distance (text-normalised)")
    mir = ds.attrs.get("mir")
    label = f"MIR = {mir:.4f}" if isinstance(mir, float) else "MIR"
    if "mir_ci_low" in ds.attrs:
        label += f"  (95% CI {ds.attrs['mir_ci_low']:.4f} – {ds.attrs['mir_ci_high']:.4f})"
    ax.set_title(title or f"{label}   [trace: {ds.attrs.get('sqrt_mode', '?')}]", fontsize=10)
    if bars:
        _finish_axis(low)
    return _finish(fig, ax, path)


def _gap_bars(ax, ds: xr.Dataset) -> None:
    """Stacked bars of the gap parts: positive parts stacked up from 0, negative ones down from 0."""
    layers = ds["layer"].values
    up, down = [0.0] * len(layers), [0.0] * len(layers)
    for i, (name, label) in enumerate(GAP_PARTS):
        values = ds[name].values
        base = [d if v < 0 else u for v, u, d in zip(values, up, down)]
        ax.bar(layers, values, bottom=base, color=f"C{i + 1}", width=0.7, label=label)
        up = [u + max(v, 0.0) for u, v in zip(up, values)]
        down = [d + min(v, 0.0) for d, v in zip(down, values)]
    ax.plot(layers, ds["fd"].values, ls="none", marker="_", markersize=24, color="black", label="FD (the sum)")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("FD by kind of gap")


def _finish_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=2)


def plot_mir_by_step(rows: list[dict], path: str | Path) -> Path:
    """MIR against training step, with bootstrap intervals where the study computed them; below it, each
    checkpoint's difference from the previous one with its paired interval, when there is one; and its
    linear CKA (mean over layers) to the previous and to the first checkpoint, when the study has them."""
    plt = _pyplot()
    rows = [r for r in rows if r["mir"] is not None]
    xs = [r["step"] if r["step"] is not None else i for i, r in enumerate(rows)]
    ys = [r["mir"] for r in rows]
    diffs = [(x, r) for x, r in zip(xs, rows) if r.get("diff_ci_low") is not None]
    with_cka = any(r.get(f"cka_{w}_{m}") is not None for r in rows for w in ("previous", "first")
                   for m in ("vision", "text"))
    ratios = [2] + [1] * (bool(diffs) + with_cka)
    fig, axes = plt.subplots(len(ratios), 1, figsize=(7, 3.8 + 1.9 * (len(ratios) - 1)), sharex=True,
                             constrained_layout=True, gridspec_kw={"height_ratios": ratios}, squeeze=False)
    ax, others = axes[0, 0], [a[0] for a in axes[1:]]
    if with_cka:
        panel = others.pop()
        for (which, style), (m, color) in [(w, c) for w in (("previous", "-"), ("first", "--"))
                                           for c in (("vision", "tab:blue"), ("text", "tab:orange"))]:
            pts = [(x, r[f"cka_{which}_{m}"]) for x, r in zip(xs, rows) if r.get(f"cka_{which}_{m}") is not None]
            if pts:
                panel.plot(*zip(*pts), style, marker=".", color=color, label=f"{m} CKA to the {which} checkpoint")
        panel.set_ylabel("linear CKA\n(mean over layers)")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=7)
    if diffs:
        low = others.pop()
        dy = [r["diff_prev"] for _, r in diffs]
        err = [[y - r["diff_ci_low"] for y, (_, r) in zip(dy, diffs)],
               [r["diff_ci_high"] - y for y, (_, r) in zip(dy, diffs)]]
        low.errorbar([x for x, _ in diffs], dy, yerr=err, fmt="s", capsize=3, color="tab:red",
                     label="MIR - previous checkpoint's (95% paired CI)")
        low.axhline(0.0, color="grey", lw=0.8)
        low.set_ylabel("change")
        low.legend(fontsize=7)
    if all(r.get("ci_low") is not None for r in rows) and rows:
        err = [[y - r["ci_low"] for y, r in zip(ys, rows)], [r["ci_high"] - y for y, r in zip(ys, rows)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label="MIR (95% bootstrap CI)")
    else:
        ax.plot(xs, ys, marker="o", label="MIR")
    for x, y, r in zip(xs, ys, rows):
        ax.annotate(r["checkpoint"], (x, y), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    axes[-1, 0].set_xlabel("training step" if all(r["step"] is not None for r in rows) else "checkpoint")
    ax.set_ylabel("MIR (lower = better integrated)")
    return _finish(fig, ax, path)


def plot_layer_curves(curves: dict[str, tuple[list[int], list[float], float]], path: str | Path) -> Path:
    """Per-layer FD of several archives on one axis; `curves` maps label -> (layers, fds, mir)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
    for label, (layers, fds, mir) in curves.items():
        ax.plot(layers, fds, marker="o", label=f"{label} (MIR {mir:.4f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("Fréchet distance (text-normalised)")
    ax.set_yscale("log")
    return _finish(fig, ax, path)
