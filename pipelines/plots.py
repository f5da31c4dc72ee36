"""Figures of analysis results (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import xarray as xr


def plot_layer_curve(ds: xr.Dataset, path: str | Path, title: str | None = None) -> Path:
    """Per-layer FD (its mean and covariance terms stacked) with MIR in the title; PNG/PDF/SVG by suffix."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    layers = ds["layer"].values
    fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
    ax.plot(layers, ds["fd"].values, marker="o", color="C0", label="FD (per-layer MIR)")
    ax.plot(layers, ds["fd_mean_term"].values, ls="--", color="C1", label="mean term ||Δμ||²")
    ax.plot(layers, ds["fd_covariance_term"].values, ls=":", color="C2", label="covariance term")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("Fréchet distance (text-normalised)")
    mir = ds.attrs.get("mir")
    label = f"MIR = {mir:.4f}" if isinstance(mir, float) else "MIR"
    if "mir_ci_low" in ds.attrs:
        label += f"  (95% CI {ds.attrs['mir_ci_low']:.4f} – {ds.attrs['mir_ci_high']:.4f})"
    ax.set_title(title or f"{label}   [trace: {ds.attrs.get('sqrt_mode', '?')}]", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
