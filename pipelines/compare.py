"""`mir compare`: the same analysis on several archives over the samples they share.

Each archive is analysed on exactly the shared sample ids, with the same layers, token rule,
trace mode and bootstrap seed. The interval of a difference comes from the per-sample influence
values (analyze/bootstrap.py) paired by sample id, whatever order the archives store them in:
replicate b gives a sample the same weight in both archives, so the sample-to-sample noise both
share cancels from the difference. The difference's replicates are first order in both archives.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analyze import AnalysisError, AnalysisOptions, Runner, analyze_selection, parse_layers, resolve_samples
from analyze.bootstrap import paired_difference
from analyze.drift import compute_drift
from storage_schemas import TextTokenRule, open_archive


@dataclass
class Comparison:
    labels: list[str]
    shared_samples: int
    layers: list[int]
    paired: bool
    results: list  # AnalysisResult per archive
    differences: list[dict] = field(default_factory=list)
    drift: list[dict] = field(default_factory=list)  # CKA of each archive to the first (with --cka)

    def to_json(self) -> dict:
        return {
            "labels": self.labels, "shared_samples": self.shared_samples, "layers": self.layers,
            "paired_bootstrap": self.paired, "differences": self.differences, "drift": self.drift,
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
                     samples: str | None = None, where: str | None = None, text_tokens: str | None = None,
                     options: AnalysisOptions | None = None, runner: Runner | None = None,
                     storage_options: dict | None = None, cka: bool = False) -> Comparison:
    """`samples` and `where` choose among the first archive's samples (as in `mir analyze`); only those every
    archive holds are compared. `text_tokens` None: the rule the archives record (they must agree).
    `cka`: also the linear CKA (and debiased CKA) of every archive's tokens to the first's (analyze/drift.py)."""
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
    if samples is not None or where is not None:
        first = archives[0]
        shared = np.isin(first.samples.sample_id.values, ids)
        chosen_ids = set(first.samples.sample_id.values[resolve_samples(first, samples, where, within=shared)].tolist())
        ids = [i for i in ids if i in chosen_ids]
    rule = _shared_rule(archives, locations, text_tokens)
    chosen = _shared_layers(archives, layers)
    runner = runner or Runner()
    results, selections = [], []
    for archive in archives:
        selection = archive.select(samples=ids, layers=chosen, text_tokens=rule)
        selections.append(selection)
        results.append(analyze_selection(selection, options, runner=runner))
    comparison = Comparison(labels, len(ids), chosen, paired, results)
    if cka:
        comparison.drift = [{"a": labels[0], "b": labels[i], "layers": compute_drift(
            selections[0], selections[i], chosen, runner=runner, precision=options.precision)}
            for i in range(1, len(selections))]
    comparison.differences = [_difference(labels[0], results[0], labels[i], results[i], options)
                              for i in range(1, len(results))]
    return comparison


def drift_between(location_a: str, location_b: str, layers: list[int], *, text_tokens: str | None = None,
                  runner: Runner | None = None, precision: str = "float32", storage_options: dict | None = None
                  ) -> list[dict]:
    """CKA per layer and modality between the tokens of the samples two archives share (analyze/drift.py)."""
    archives = [open_archive(loc, storage_options) for loc in (location_a, location_b)]
    ids, _ = shared_sample_ids(archives)
    if not ids:
        raise AnalysisError(f"{location_a} and {location_b} share no sample id; CKA needs the same samples")
    rule = _shared_rule(archives, [str(location_a), str(location_b)], text_tokens)
    a, b = (arc.select(samples=ids, layers=layers, text_tokens=rule) for arc in archives)
    return compute_drift(a, b, layers, runner=runner, precision=precision)


def _shared_rule(archives, locations: list[str], text_tokens: str | None) -> TextTokenRule:
    if text_tokens is not None:
        return TextTokenRule.parse(text_tokens)
    rules = {a.text_token_rule for a in archives}
    if len(rules) > 1:
        recorded = ", ".join(f"{loc}: {a.text_token_rule.value}" for loc, a in zip(locations, archives))
        raise AnalysisError(f"the archives record different text-token rules ({recorded}); choose one with "
                            "--text-tokens")
    return rules.pop()


def _shared_layers(archives, layers: str | None) -> list[int]:
    """The layers `layers` names in every archive (the same ones, or an error)."""
    common = np.asarray(sorted(set.intersection(*[set(a.layers.tolist()) for a in archives])))
    chosen = [parse_layers(layers, common, a.hidden_states_entries) for a in archives]
    if any(c != chosen[0] for c in chosen[1:]):
        raise AnalysisError(f"--layers {layers!r} names different layers in these archives (their models have "
                            "different depths); name the layers by their positive indices")
    return chosen[0]


def influence_by_id(result) -> tuple[float, dict] | None:
    """(summed FD, {sample id: its influence summed over layers}) of an analysis run with --bootstrap."""
    boot = result.bootstrap if hasattr(result, "bootstrap") else result.get("bootstrap")
    if not boot or "fd_influence" not in boot:
        return None
    return boot["fd_total"], dict(zip(boot["sample_ids"], boot["fd_influence"]))


def _difference(label_a: str, a, label_b: str, b, options: AnalysisOptions) -> dict:
    """MIR(b) - MIR(a) with an interval paired by sample id, and whether it exceeds the noise."""
    out = {"a": label_a, "b": label_b, "difference": b.mir - a.mir}
    ia, ib = influence_by_id(a), influence_by_id(b)
    if ia is None or ib is None:
        out.update({"ci_low": None, "ci_high": None, "exceeds_noise": None,
                    "note": "no bootstrap: run with --bootstrap B to judge the difference"})
        return out
    paired = paired_difference(ia, ib, options.bootstrap, options.seed)
    out.update({k: paired[k] for k in ("ci_low", "ci_high", "std", "exceeds_noise", "paired_samples")})
    out["paired"] = True
    return out


def format_comparison(c: Comparison) -> str:
    width = max(12, *(len(lab) for lab in c.labels))
    lines = [f"{c.shared_samples} shared samples, layers {c.layers[0]}..{c.layers[-1]}, trace "
             f"{c.results[0].mode}; differences paired by sample id"
             + ("" if c.paired else " (the archives store them in different orders)"), ""]
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
    for drift in c.drift:
        lines.append(f"CKA of {drift['b']} to {drift['a']} (same tokens), linear / debiased:")
        lines.append(f"{'layer':>{width}} {'vision':>17} {'text':>17}")
        for row in drift["layers"]:
            cells = [f"{row[m]['cka']:.4f} / {row[m]['cka_debiased']:.4f}" for m in ("vision", "text")]
            lines.append(f"{row['layer']:>{width}} " + " ".join(f"{cell:>17}" for cell in cells))
        lines.append("")
    for d in c.differences:
        verdict = ("no bootstrap" if d["exceeds_noise"] is None else
                   "exceeds the noise" if d["exceeds_noise"] else "within the noise")
        ci = f" (95% CI {d['ci_low']:+.4f} to {d['ci_high']:+.4f})" if d["ci_low"] is not None else ""
        lines.append(f"MIR({d['b']}) - MIR({d['a']}) = {d['difference']:+.5f}{ci}: {verdict}")
    return "\n".join(lines)
