"""Mutation testing of analyze/ with cosmic-ray (not in CI: each mutant reruns the analysis tests).

Why: a green suite only says the tests pass on this code; the share of one-token changes to analyze/
(operators, comparisons, constants, removed statements...) that turn the analysis tests red says how
much of the code they actually pin down. Mutants are drawn at random (seeded) from all of cosmic-ray's
argument-less operators over every module of analyze/, and the run stops at a wall-clock budget, so a
run is bounded whatever the code size; the report says how many were drawn and run.

    pip install cosmic-ray==8.7.0
    python bench/mutation_analyze.py --sample 80 --budget 1350 --out /tmp/mut.json
    # another checkout (e.g. a `git worktree` of an older commit), with this venv:
    python bench/mutation_analyze.py --root /tmp/wt-base ...

Each mutant runs `pytest -x` over tests/test_analyze_*.py of --root (with PYTHONPATH=--root), so a
killed mutant usually costs a few seconds and a survivor the whole analysis suite (~30 s on 2 cores).
A mutant that times out counts as killed (cosmic-ray's rule). The file is restored after each mutant.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def work_items(root: Path) -> list:
    """Every mutation cosmic-ray's argument-less operators can make in analyze/*.py."""
    from cosmic_ray.commands.init import init
    from cosmic_ray.work_db import WorkDB, use_db

    modules = sorted((root / "analyze").glob("*.py"))
    with tempfile.TemporaryDirectory() as tmp, use_db(str(Path(tmp) / "session.sqlite"), WorkDB.Mode.create) as db:
        init(modules, db, {})
        return [item.mutations[0] for item in db.work_items]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--sample", type=int, default=80, help="mutants drawn at random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=1350.0, help="seconds; no new mutant starts after this")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per mutant's test run")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (survivors with their diffs)")
    args = parser.parse_args()

    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    root = args.root.resolve()
    os.chdir(root)
    os.environ["PYTHONPATH"] = str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")
    tests = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_analyze_*.py"))
    command = f"{sys.executable} -m pytest -x -q -p no:cacheprovider " + " ".join(tests)
    mutations = work_items(root)
    drawn = random.Random(args.seed).sample(mutations, min(args.sample, len(mutations)))
    print(f"{len(mutations)} mutants in {root / 'analyze'}; {len(drawn)} drawn (seed {args.seed}); "
          f"budget {args.budget:.0f} s", flush=True)
    from cosmic_ray.testing import run_tests
    outcome, output = run_tests(command, args.timeout * 2)
    if outcome != TestOutcome.SURVIVED:
        print("the unmutated code fails its tests; nothing measured:\n" + output[-3000:])
        return 1
    start = time.perf_counter()
    rows = []
    for i, spec in enumerate(drawn):
        if time.perf_counter() - start > args.budget:
            break
        t0 = time.perf_counter()
        result = mutate_and_test([spec], command, args.timeout)
        if result.worker_outcome == WorkerOutcome.NO_TEST:
            continue
        outcome = str(result.test_outcome.value if result.test_outcome else result.worker_outcome.value)
        rows.append({"module": str(Path(spec.module_path).relative_to(root)), "operator": spec.operator_name,
                     "occurrence": spec.occurrence, "line": spec.start_pos[0], "outcome": outcome,
                     "seconds": round(time.perf_counter() - t0, 1), "diff": result.diff})
        print(f"[{i + 1}/{len(drawn)}] {outcome:>11} {rows[-1]['module']}:{spec.start_pos[0]} {spec.operator_name} "
              f"({rows[-1]['seconds']} s)", flush=True)
    killed = sum(r["outcome"] == TestOutcome.KILLED.value for r in rows)
    survived = [r for r in rows if r["outcome"] == TestOutcome.SURVIVED.value]
    ran = killed + len(survived)
    summary = {"root": str(root), "mutants_total": len(mutations), "drawn": len(drawn), "ran": ran,
               "killed": killed, "survived": len(survived), "other": len(rows) - ran,
               "kill_share": killed / ran if ran else None, "seconds": round(time.perf_counter() - start),
               "seed": args.seed, "test_command": command}
    print(json.dumps(summary, indent=1))
    for r in survived:
        print(f"--- survived: {r['module']}:{r['line']} {r['operator']}\n{r['diff']}")
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "mutants": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
