"""Which of a v1 policy's decisions pay: its one-episode replay with parts of its action zeroed.

    python experiments/ablate_policy.py --agent agents/ppo-v1 --seeds 5 \
        --cells experiments/results/anytime-v1/tasks/gen0-0210-synthetic.yaml=38x ...
    python experiments/ablate_policy.py --agent agents/ppo-v1s-seed1 --seeds 5 \
        --cells-from experiments/results/anytime-v1s --rules-from experiments/results/anytime-v1 \
        --out experiments/results/ablate_policy_v1s.json

For each cell and seed, the policy's deterministic episode as the harness's ``ppo-replay`` plays it
(same env: the v1 twin of the harness's env with the zero rule and deadzones the agent was trained
with, ``training.env`` in its agent.json; same reset seed and float student), and the same episode
with

* ``no_layers``:   the per-layer entries (bit offsets, sparsity tilts) zeroed: global pruning;
* ``no_schedule``: the ramp, τ, α and when-bits-drop entries zeroed (its bit-width kept);
* ``bits_only``:   both zeroed: only its bit-width choice is left;

and the zero action (``zero``: the agent's zero rule, ``recipe-plus1`` for ``ppo-v1``, the allocator
for ``ppo-v1s-*``). Test accuracy of each (the test split read for the report only). Each row also
keeps the full policy's raw step-0 action (``step0_action``, the per-layer entries of the model's
layers only), and ``step0`` sums up how far its entries are from the thresholds where they act:
the width moves a bit once ``|final_bits|`` >= 0.25 (``round(2a)``), a layer's bit offset once
``|a|`` >= 0.5, a tilt and a schedule entry once past the agent's deadzone. ``--cells-from``
takes the cells of an anytime folder's ``summary.json`` (every scenario at its targets).
``--rules-from`` (an anytime folder) adds, per variant, the cells where its mean over the seeds is >=
every zero-search rule's there (``recipe``, ``recipe-plus1``, ``sensitivity``; the issue's replay
target, asked of each part of the policy). Writes ``--out`` (JSON): the command, the rows, per variant
the mean test accuracy and the mean paired difference to the full policy over every cell and seed,
``same_as_full`` (variant: the cell-seeds where its test accuracy equals the full policy's, of
``rows_n``), ``cells_bits_differ_from_zero`` (cells where the policy's bit-width differs from the
``zero action's in some seed), ``step0``, ``by_cell`` (each variant's mean per cell and the mean
step-0 ``final_bits`` entry) and with ``--rules-from`` ``ge_every_rule`` (variant:
count) and ``rules_cells``. Bad input: one line, status 2.
"""

from __future__ import annotations

import argparse
import json
import math
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


RULES = ("recipe", "recipe-plus1", "sensitivity")


def summarize(rows: list[dict], rules: dict[tuple[str, str], dict[str, float]] | None = None) -> dict:
    """Per variant: mean test %, mean paired difference to ``full``, the per-cell means and, given
    the rules' mean test accuracies per (scenario stem, target), the cells where the variant's mean
    is >= every rule's."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["scenario"], r["target"]), []).append(r)
    by_cell = [{"scenario": sc, "target": t, "seeds": len(rs),
                **{v: statistics.fmean(100 * r[v]["test_acc"] for r in rs) for v in VARIANTS},
                "seeds_bits_differ_from_zero": sum(r["full"].get("bits") != r["zero"].get("bits") for r in rs),
                **({"final_bits_action": statistics.fmean(r["step0_action"]["final_bits"] for r in rs)}
                   if all("step0_action" in r for r in rs) else {})}
               for (sc, t), rs in cells.items()]
    out = {"mean_test_acc": {v: statistics.fmean(100 * r[v]["test_acc"] for r in rows) for v in VARIANTS},
           "mean_minus_full": {v: statistics.fmean(100 * (r[v]["test_acc"] - r["full"]["test_acc"]) for r in rows)
                               for v in VARIANTS},
           "same_as_full": {v: sum(r[v]["test_acc"] == r["full"]["test_acc"] for r in rows) for v in VARIANTS},
           "rows_n": len(rows),
           "cells_bits_differ_from_zero": sum(c["seeds_bits_differ_from_zero"] > 0 for c in by_cell),
           **({"step0": step0_summary([r["step0_action"] for r in rows])}
              if rows and all("step0_action" in r for r in rows) else {}),
           "by_cell": by_cell}
    if rules is not None:
        have = [c for c in by_cell if (c["scenario"], c["target"]) in rules]
        for c in have:
            c["rules"] = {k: 100 * v for k, v in rules[(c["scenario"], c["target"])].items()}
        out["rules_cells"] = len(have)
        out["ge_every_rule"] = {v: sum(c[v] >= max(c["rules"].values()) - 1e-9 for c in have) for v in VARIANTS}
    return out


def step0_action(a: np.ndarray, n_layers: int) -> dict:
    """The raw step-0 action by entry: v0's five by name, the bit offsets and tilts of the slots
    the model's ``n_layers`` layers fill (padding slots are ignored by the env)."""
    from rltune.env import ACTION_LAYOUT
    from rltune.env_v1 import L_MAX, layer_slots

    a = np.asarray(a, np.float64).reshape(-1)
    n0, slots = len(ACTION_LAYOUT), range(len(layer_slots(n_layers)))
    return {**{k: round(float(a[i]), 4) for i, k in enumerate(ACTION_LAYOUT)},
            "bit_offsets": [round(float(a[n0 + i]), 4) for i in slots],
            "tilts": [round(float(a[n0 + L_MAX + i]), 4) for i in slots]}


def step0_summary(acts: list[dict]) -> dict:
    """Range of the width entry and the largest magnitude of the other entries, over the rows."""
    def top(xs):
        return max((abs(x) for x in xs), default=0.0)

    return {"final_bits_min": min(a["final_bits"] for a in acts), "final_bits_max": max(a["final_bits"] for a in acts),
            "width_moves_at": 0.25,
            "schedule_max_abs": top(a[k] for a in acts for k in ("ramp_shape", "temperature", "alpha")),
            "bits_drop_max_abs": top(a["bits_drop"] for a in acts),
            "bit_offset_max_abs": top(x for a in acts for x in a["bit_offsets"]), "bit_offset_moves_at": 0.5,
            "tilt_max_abs": top(x for a in acts for x in a["tilts"])}


def read_summary_cells(folder: Path) -> dict[str, list[str]]:
    """{scenario: [targets]} of an anytime folder's summary.json."""
    from rltune.harness import anytime_cells

    return anytime_cells(folder)


def read_rules(folder: Path) -> dict[tuple[str, str], dict[str, float]]:
    """{(scenario stem, target): {rule: mean test accuracy}} of an anytime folder's summary.json,
    for the cells that have every rule."""
    d = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    got: dict[tuple[str, str], dict[str, float]] = {}
    for r in d["rows"]:
        if r["tuner"] in RULES and r["episodes"] == 1:
            acc = float(r["test_acc_mean"])
            if not math.isfinite(acc):
                raise ValueError(f"a {r['tuner']} row with test_acc_mean {acc}")
            got.setdefault((Path(r["scenario"]).stem, str(r["target"])), {})[r["tuner"]] = acc
    return {k: v for k, v in got.items() if set(v) == set(RULES)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agent", default="agents/ppo-v1")
    p.add_argument("--cells", nargs="+", default=[], metavar="SCENARIO=TARGET")
    p.add_argument("--cells-from", metavar="DIR", help="the cells of an anytime folder's summary.json")
    p.add_argument("--rules-from", metavar="DIR", help="an anytime folder with the rules' cells (summary.json)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default="experiments/results/ablate_policy.json")
    a = p.parse_args(argv)

    import torch

    from rltune import compression as C
    from rltune.env import DistillCompressEnv
    from rltune.errors import RltuneError, make_folder, write_atomic
    from rltune.shipped import recorded_command, resolve_scenario
    from rltune.stage import final_report
    from rltune.train import run_episode
    from rltune.tuners import V1, Session, _env_id, _load_agent, _policy_env

    class Masked:  # the agent's deterministic action with a variant's entries zeroed
        def __init__(self, variant: str):
            self.variant = variant
            self.first = None  # the raw action at the episode's first step

        def predict(self, obs, deterministic: bool = True):
            raw = agent.predict(obs, deterministic=True)
            if self.first is None:
                self.first = np.array(raw, np.float64).reshape(-1)
            return masked(raw, self.variant)

    try:
        if a.seeds < 1:
            raise RltuneError("--seeds takes a whole number >= 1")
        cells = [c.partition("=") for c in a.cells]
        if any(not sep or not sc or not t for sc, sep, t in cells):
            raise RltuneError("--cells: expected SCENARIO=TARGET")
        pairs = [(sc, t) for sc, _, t in cells]
        try:
            if a.cells_from:
                pairs += [(sc, t) for sc, ts in read_summary_cells(Path(a.cells_from)).items() for t in ts]
            rules = read_rules(Path(a.rules_from)) if a.rules_from else None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise RltuneError(f"--cells-from / --rules-from: not an anytime folder's summary.json ({type(e).__name__}: {e})") from None
        pairs = list(dict.fromkeys(pairs))  # a cell given twice is played once
        if not pairs:
            raise RltuneError("no cells: give --cells or --cells-from")
        if rules is not None:
            missing = [f"{sc}={t}" for sc, t in pairs if (Path(sc).stem, t) not in rules]
            if missing:
                raise RltuneError(f"--rules-from {a.rules_from}: no recipe, recipe-plus1 and sensitivity rows for "
                                  f"{missing[0]} (cells are matched by file name and target as written)")
        out_path = Path(a.out)
        inputs = [Path(d) / "summary.json" for d in (a.cells_from, a.rules_from) if d]
        if any(out_path.resolve() == f.resolve() for f in inputs):
            raise RltuneError(f"--out {out_path}: that is one of the inputs")
        torch.set_num_threads(1)
        agent = _load_agent(a.agent)
        if _env_id(agent) != V1:
            raise RltuneError(f"{a.agent}: not a v1 agent (its per-layer entries are what this ablates)")
        make_folder(out_path.parent)
        # every cell's env first: a bad scenario or target is told before any episode is played
        bases = {(scen, target): DistillCompressEnv(scenarios=[str(resolve_scenario(scen))], targets=[target])
                 for scen, target in pairs}
        rows = []
        for scen, target in pairs:
            base = bases[(scen, target)]
            # the env ppo-replay plays the agent in (its caches shared over the seeds and variants)
            env = _policy_env(Session(base, 0, target, 0, base.scenarios[0].training["stages"]), agent)
            for seed in range(a.seeds):
                row = {"scenario": Path(scen).stem, "target": target, "seed": seed}
                for v in VARIANTS:
                    player = Masked(v)
                    info = run_episode(env, player, seed=seed * 100_003,
                                       options={"scenario": 0, "target": target, "float_seed": seed})
                    if v == "full":
                        row["step0_action"] = step0_action(player.first, len(C.layers(env.state.model)))
                    rep = final_report(env.context(0), env.state, latency=False)
                    row[v] = {"test_acc": rep["test_acc"], "val_acc": float(info["val_acc"]),
                              "bits": env.plan["final_bits"], "per_layer": env.layer_plan is not None,
                              "diverged": info.get("diverged", "")}
                rows.append(row)
                print(row["scenario"], target, seed, {v: round(100 * row[v]["test_acc"], 2) for v in VARIANTS},
                      flush=True)
        out = {"command": recorded_command(), "agent": a.agent, "seeds": a.seeds,
               "cells": [f"{sc}={t}" for sc, t in pairs], "rules_from": a.rules_from, **summarize(rows, rules),
               "rows": rows}
        if "step0" in out:  # where the tilts and schedule entries start to act for this agent
            from rltune.env_v1 import DEADZONE

            trained = (agent.meta.get("training") or {}).get("env") or {}
            tdz, sdz = trained.get("tilt_deadzone"), trained.get("schedule_deadzone")
            out["step0"]["tilt_acts_at"] = DEADZONE if tdz is None else tdz
            out["step0"]["schedule_acts_at"] = 0.0 if sdz is None else sdz
        write_atomic(out_path, (json.dumps(out, indent=1) + "\n").encode(), "--out")
    except RltuneError as e:
        print("ablate_policy: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(json.dumps({k: out[k] for k in ("mean_test_acc", "mean_minus_full", "same_as_full", "rows_n",
                                          "cells_bits_differ_from_zero", "step0", "ge_every_rule", "rules_cells")
                      if k in out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
