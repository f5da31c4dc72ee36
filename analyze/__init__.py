"""Analysis stage: exact MIR and distribution statistics of an archive, out of core on Dask.

Builds on storage_schemas only; never imports torch, transformers or the extraction stage.
"""
from .api import AnalysisOptions, analyze_archives, analyze_selection
from .config import ReadConfig
from .dataset import AnalysisResult
from .errors import AnalysisError
from .frechet import SQRT_MODES, frechet_distance
from .runner import Runner
from .select import parse_layers, resolve_samples, where_mask

__all__ = ["AnalysisError", "AnalysisOptions", "AnalysisResult", "ReadConfig", "Runner", "SQRT_MODES",
           "analyze_archives", "analyze_selection",
           "frechet_distance", "parse_layers", "resolve_samples", "where_mask"]
