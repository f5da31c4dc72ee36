"""`mir compare`: the same analysis on several archives over the samples they share.

Each archive is analysed on exactly the shared sample ids, with the same layers, token rule,
trace mode and bootstrap seed. When the shared samples sit in the same order in every archive
(archives extracted from one sample list, as in a study), the bootstrap replicates are paired:
replicate b resamples the same sample blocks everywhere, so the interval of a difference
excludes the sample-to-sample noise both archives share. Otherwise the replicates are combined
as independent draws, and the output says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from analyze import AnalysisError, AnalysisOptions, Runner, analyze_selection, parse_layers
from storage_schemas import open_archive

CI_LEVEL = 0.95


@dataclass
class Comparison:
    labels: list[str]
    shared_samples: int
    layers: list[int]
    paired: bool
    results: list  # AnalysisResult per archive
    differences: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "labels": self.labels, "shared_samples": self.shared_samples, "layers": self.layers,
            "paired_bootstrap": self.paired, "differences": self.differences,
            "archives": [{"label": lab, **{k: v for k, v in r.to_json().items() if k != "versions"}}
                         for lab, r in zip(self.labels, self.results)],
        }


def shared_sample_ids(archives) -> tuple[list[str], bool]:
    """Ids present in every archive (in the first one's order), and whether all orders agree."""
    id_lists = [a.samples.sample_id.values.tolist() for a in archives]
    common = set(id_lists[0]).intersection(*map(set, id_lists[1:]))
    orders = [[i for i in ids if i in common] for ids in id_lists]
    return orders[0], all(o == orders[0] for o in orders[1:])


def compare_archives(locations: list[str], *, labels: list[str] | None = None, layers: str | None = None,
                     text_tokens: str = "after-image", options: AnalysisOptions | None = None,
                     runner: Runner | None = None, storage_options: dict | None = None) -> Comparison:
    if len(locations) < 2:
        raise AnalysisError("compare needs at least two archives")
    labels = labels or [str(loc).rstrip("/").split("/")[-1] for loc in locations]
    if len(labels) != len(locations) or len(set(labels)) != len(labels):
        raise AnalysisError("give one distinct --label per archive")
    options = options or AnalysisOptions(bootstrap=200)
    archives = [open_archive(loc, storage_options) for loc in locations]
    ids, paired = shared_sample_ids(archives)
    if not ids:
        raise AnalysisError("the archives share no sample id; compare needs the same samples in each")
    common_layers = sorted(set.intersection(*[set(a.layers.tolist()) for a in archives]))
    chosen = parse_layers(layers, np.asarray(common_layers))
    runner = runner or Runner()
    results = []
    for archive in archives:
        selection = archive.select(samples=ids, layers=chosen, text_tokens=text_tokens)
        results.append(analyze_selection(selection, options, runner=runner))
    comparison = Comparison(labels, len(ids), chosen, paired, results)
    comparison.differences = [_difference(labels[0], results[0], labels[i], results[i], paired, options.seed)
                              for i in range(1, len(results))]
    return comparison


def _difference(label_a: str, a, label_b: str, b, paired: bool, seed: int) -> dict:
    """MIR(b) - MIR(a) with a bootstrap interval, and whether it exceeds the noise."""
    out = {"a": label_a, "b": label_b, "difference": b.mir - a.mir}
    if "mir_replicate" not in a.dataset or "mir_replicate" not in b.dataset:
        out.update({"ci_low": None, "ci_high": None, "exceeds_noise": None,
                    "note": "no bootstrap: run with --bootstrap B to judge the difference"})
        return out
    ra, rb = a.dataset["mir_replicate"].values, b.dataset["mir_replicate"].values
    if not paired:  # independent resamples: shuffle one side so replicate b pairs unrelated draws
        rb = np.random.default_rng(seed + 1).permutation(rb)
    diffs = (rb - ra)[np.isfinite(rb - ra)]
    lo, hi = np.quantile(diffs, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2]) if diffs.size else (math.nan, math.nan)
    out.update({"ci_low": float(lo), "ci_high": float(hi), "exceeds_noise": bool(lo > 0 or hi < 0),
                "paired": paired})
    return out


def format_comparison(c: Comparison) -> str:
    width = max(12, *(len(lab) for lab in c.labels))
    lines = [f"{c.shared_samples} shared samples, layers {c.layers[0]}..{c.layers[-1]}, trace "
             f"{c.results[0].mode}; bootstrap {'paired' if c.paired else 'unpaired (sample orders differ)'}", ""]
    lines.append(f"{'':>{width}} " + " ".join(f"{lab:>{width}}" for lab in c.labels))
    for label, getter in (("MIR", lambda r: f"{r.mir:.5f}"),
                          ("95% CI", lambda r: "{mir_ci_low:.4f}-{mir_ci_high:.4f}".format(**r.dataset.attrs)
                           if "mir_ci_low" in r.dataset.attrs else "-")):
        lines.append(f"{label:>{width}} " + " ".join(f"{getter(r):>{width}}" for r in c.results))
    lines.append("")
    lines.append(f"{'layer FD':>{width}} " + " ".join(f"{lab:>{width}}" for lab in c.labels))
    for layer in c.layers:
        lines.append(f"{layer:>{width}} " + " ".join(f"{float(r.dataset['fd'].sel(layer=layer)):>{width}.5g}"
                                                     for r in c.results))
    lines.append("")
    for d in c.differences:
        verdict = ("no bootstrap" if d["exceeds_noise"] is None else
                   "exceeds the noise" if d["exceeds_noise"] else "within the noise")
        ci = f" (95% CI {d['ci_low']:+.4f} to {d['ci_high']:+.4f})" if d["ci_low"] is not None else ""
        lines.append(f"MIR({d['b']}) - MIR({d['a']}) = {d['difference']:+.5f}{ci}: {verdict}")
    return "\n".join(lines)
