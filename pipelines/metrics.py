"""One naming of the scalars MIR produces, shared by the Trainer callback and the trackers, so a
TensorBoard or MLflow run shows the same names whether it came from training or from `mir study`."""
from __future__ import annotations

import math
from collections.abc import Mapping


def mir_scalars(mir: float | None, ci_low: float | None, ci_high: float | None,
                fd: Mapping[int | str, float], prefix: str = "mir") -> dict[str, float]:
    """`{prefix}/mir`, `{prefix}/ci_low`, `{prefix}/ci_high` (with a bootstrap) and
    `{prefix}/fd_layer_<k>` per layer; undefined values are left out (trackers reject NaN)."""
    out: dict[str, float] = {}
    for name, value in (("mir", mir), ("ci_low", ci_low), ("ci_high", ci_high)):
        if value is not None and math.isfinite(float(value)):
            out[f"{prefix}/{name}"] = float(value)
    for layer, value in sorted(fd.items(), key=lambda kv: int(kv[0])):
        if value is not None and math.isfinite(float(value)):
            out[f"{prefix}/fd_layer_{int(layer)}"] = float(value)
    return out


def result_scalars(result, prefix: str = "mir") -> dict[str, float]:
    """The scalars of an analysis: its per-layer xarray Dataset, or a result object carrying one."""
    ds = getattr(result, "dataset", result)
    fd = dict(zip(ds["layer"].values.tolist(), ds["fd"].values.tolist()))
    return mir_scalars(ds.attrs.get("mir"), ds.attrs.get("mir_ci_low"), ds.attrs.get("mir_ci_high"), fd, prefix)
