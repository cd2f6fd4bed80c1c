"""Which of a v1 policy's decisions pay: its one-episode replay with parts of its action zeroed.

    python experiments/ablate_policy.py --agent agents/ppo-v1 --seeds 5 \
        --cells experiments/results/anytime-v1/tasks/gen0-0210-synthetic.yaml=38x ...

For each cell and seed, the policy's deterministic episode as the harness's ``ppo-replay`` plays it
(same reset seed and float student), and the same episode with

* ``no_layers``:   the per-layer entries (bit offsets, sparsity tilts) zeroed: global pruning;
* ``no_schedule``: the ramp, τ, α and when-bits-drop entries zeroed (its bit-width kept);
* ``bits_only``:   both zeroed: only its bit-width choice is left;

and the zero action (``recipe-plus1``). Test accuracy of each (the test split read for the report
only). Writes ``--out`` (JSON): the command, the rows, and per variant the mean paired difference
to the full policy over every cell and seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

VARIANTS = ("full", "no_layers", "no_schedule", "bits_only", "zero")


def masked(a: np.ndarray, variant: str) -> np.ndarray:
    from rltune.env import ACTION_LAYOUT

    a = np.array(a, np.float32)
    n0 = len(ACTION_LAYOUT)
    if variant in ("no_layers", "bits_only"):
        a[n0:] = 0.0
    if variant in ("no_schedule", "bits_only"):
        keep = ACTION_LAYOUT.index("final_bits")
        a[[i for i in range(n0) if i != keep]] = 0.0
    if variant == "zero":
        a[:] = 0.0
    return a


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agent", default="agents/ppo-v1")
    p.add_argument("--cells", nargs="+", required=True, metavar="SCENARIO=TARGET")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default="experiments/results/ablate_policy.json")
    a = p.parse_args(argv)

    import torch

    from rltune.env_v1 import DistillCompressEnvV1
    from rltune.shipped import recorded_command
    from rltune.stage import final_report
    from rltune.train import run_episode
    from rltune.tuners import _load_agent

    class Masked:  # the agent's deterministic action with a variant's entries zeroed
        def __init__(self, variant: str):
            self.variant = variant

        def predict(self, obs, deterministic: bool = True):
            return masked(agent.predict(obs, deterministic=True), self.variant)

    torch.set_num_threads(1)
    agent = _load_agent(a.agent)
    rows = []
    for cell in a.cells:
        scen, _, target = cell.partition("=")
        env = DistillCompressEnvV1(scenarios=[scen], targets=[target], reward_baseline="float")
        for seed in range(a.seeds):
            row = {"scenario": Path(scen).stem, "target": target, "seed": seed}
            for v in VARIANTS:
                info = run_episode(env, Masked(v), seed=seed * 100_003,
                                   options={"scenario": 0, "target": target, "float_seed": seed})
                rep = final_report(env.context(0), env.state, latency=False)
                row[v] = {"test_acc": rep["test_acc"], "val_acc": float(info["val_acc"]),
                          "bits": env.plan["final_bits"], "per_layer": env.layer_plan is not None,
                          "diverged": info.get("diverged", "")}
            rows.append(row)
            print(row["scenario"], target, seed, {v: round(100 * row[v]["test_acc"], 2) for v in VARIANTS}, flush=True)
    summary = {v: statistics.fmean(100 * (r[v]["test_acc"] - r["full"]["test_acc"]) for r in rows) for v in VARIANTS}
    out = {"command": recorded_command(), "seeds": a.seeds, "cells": a.cells,
           "mean_test_acc": {v: statistics.fmean(100 * r[v]["test_acc"] for r in rows) for v in VARIANTS},
           "mean_minus_full": summary, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"mean_test_acc": out["mean_test_acc"], "mean_minus_full": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
