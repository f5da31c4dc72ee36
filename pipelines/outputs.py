"""Writing analysis results to files other tools read."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import xarray as xr


def write_netcdf(ds: xr.Dataset, path: str | Path) -> Path:
    """netCDF4 via h5netcdf (with h5py) when installed; else netCDF3 via scipy (a core dependency), which
    has no 64-bit integers or variable-length strings, so those are converted."""
    path = Path(path)
    if all(importlib.util.find_spec(m) is not None for m in ("h5netcdf", "h5py")):
        ds.to_netcdf(path, engine="h5netcdf")
        return path
    out = ds.copy()
    for name, var in list(out.variables.items()):
        if var.dtype.kind in "iu":
            out[name] = var.astype(np.int32)
        elif var.dtype.kind in "UO":
            out[name] = var.astype("S")
    out.to_netcdf(path, engine="scipy")
    return path
