"""How strong is the recipe's bit-width rule? (issue 3: make the recipe as strong as a cheap rule can be)

For each scenario, target and float student seed, run the recipe (zero action) at every final
bit-width from one below the probe's pick to two above it (the action's ``final_bits`` entry
only), and record val and test accuracy with the sensitivity probe's readings. Then score cheap
rules that map the probe to a bit-width (the most bits whose probe accuracy is within ``t`` of the
best, for several ``t``; the pick plus one bit) by the val accuracy of the bit-width they choose,
and report the oracle (best bit-width by val) as the ceiling.

    python experiments/recipe_bits.py --scenarios digits-linear digits-mlp mnist1d-small synthetic-6class \
        --targets 8x 12x 16x 24x --seeds 3 --out experiments/results/recipe_bits.json

Rules are chosen on the scenarios given here (use training scenarios) and checked on others with
``--scenarios`` naming held-out ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

TOLERANCES = (0.0, 0.015, 0.03, 0.05, 0.08)


def run_cell(scenario: str, target: str, seed: int) -> list[dict]:
    from rltune.env import BITS, DistillCompressEnv, play_offset
    from rltune.errors import RltuneError
    from rltune.stage import final_report

    torch.set_num_threads(1)
    env = DistillCompressEnv(scenarios=[scenario], targets=[target])
    env.reset(seed=seed, options={"scenario": 0, "target": target, "float_seed": seed})
    p = env.probe_result
    rows = []
    for off in (-1, 0, 1, 2):  # the action reaches the pick ± 2
        b = p.recipe_bits + off
        try:
            info = play_offset(env, seed, {"scenario": 0, "target": target, "float_seed": seed}, off)
        except RltuneError:   # out of the scenario's range, or the target is not reachable there
            continue
        assert env.plan["final_bits"] == b
        test = final_report(env.ctx, env.state, latency=False)
        rows.append({"scenario": scenario, "target": target, "seed": seed, "bits": b, "offset": off,
                     "val_acc": info["val_acc"], "test_acc": test["test_acc"], "float_val_acc": info["float_val_acc"],
                     "probe": {str(k): v for k, v in p.accuracy.items() if k in BITS}, "recipe_bits": p.recipe_bits})
    return rows


def rule_bits(probe: dict[str, float | None], rule: str) -> int:
    from rltune.env import probe_pick

    acc = {int(k): v for k, v in probe.items() if v is not None}
    if rule.startswith("tol"):
        return probe_pick(acc, float(rule[3:]))
    if rule == "pick+1":
        return min(probe_pick(acc, 0.015) + 1, max(acc))
    raise ValueError(rule)


def analyse(rows: list[dict]) -> dict:
    """Each rule's mean val and test accuracy over the cells where every rule's pick was measured."""
    cells: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        cells.setdefault((r["scenario"], r["target"], r["seed"]), {})[r["bits"]] = r
    rules = [f"tol{t}" for t in TOLERANCES] + ["pick+1"]

    def pick(rule: str, by_bits: dict[int, dict]) -> int:
        if rule == "oracle":
            return max(by_bits, key=lambda k: by_bits[k]["val_acc"])
        return rule_bits(next(iter(by_bits.values()))["probe"], rule)

    common = {k: v for k, v in cells.items() if all(pick(r, v) in v for r in rules)}
    out = {}
    for rule in rules + ["oracle"]:
        chosen = {k: v[pick(rule, v)] for k, v in common.items()}
        by_cell: dict[str, list[float]] = {}
        for (sc, tg, _), r in chosen.items():
            by_cell.setdefault(f"{sc}@{tg}", []).append(r["val_acc"])
        out[rule] = {"cells": len(common), "of": len(cells),
                     "val_acc_mean": statistics.fmean(r["val_acc"] for r in chosen.values()),
                     "test_acc_mean": statistics.fmean(r["test_acc"] for r in chosen.values()),
                     "mean_bits": statistics.fmean(r["bits"] for r in chosen.values()),
                     "val_acc_by_cell": {k: statistics.fmean(v) for k, v in by_cell.items()}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", nargs="+", default=["digits-linear", "digits-mlp", "mnist1d-small", "synthetic-6class"])
    ap.add_argument("--targets", nargs="+", default=["8x", "12x", "16x", "24x"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="experiments/results/recipe_bits.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    jobs = [(s, t, seed) for s in args.scenarios for t in args.targets for seed in range(args.seeds)]
    rows: list[dict] = []
    with ProcessPoolExecutor(args.workers) as pool:
        for r in pool.map(run_cell, *zip(*jobs)):
            rows += r
    res = {"command": "python experiments/recipe_bits.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "seconds": time.perf_counter() - t0, "rules": analyse(rows), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    for rule, v in res["rules"].items():
        print(f"{rule:9s} cells {v['cells']}/{v['of']}  bits {v['mean_bits']:.2f}  val {100 * v['val_acc_mean']:.2f}  "
              f"test {100 * v['test_acc_mean']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
