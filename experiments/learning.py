"""Learning benchmark (issue 3): does PPO learn a policy better than the recipe on its training scenarios?

For every scenario the agents were trained on and every target, on the test split:

- each trained agent (several PPO training seeds), one deterministic episode per evaluation seed;
- the zero action (the recipe), one episode; and the recipe one bit above the probe's pick
  (``recipe-plus1``: the cheap rule experiments/recipe_bits.py found best), one episode;
- random actions, one episode;
- the best constant setting and the best schedule found by Optuna TPE with ``--trials`` episodes
  (``optuna-const``, ``optuna-tpe``), best by val, reported on test.

Evaluation seed i gives every method the same float student and the same training seed, so
policy − recipe differences are paired. The bar (issue 3): beat the recipe by more than 2 std.

    python experiments/learning.py --agents agents/ppo-v0 agents/ppo-v0-seed1 agents/ppo-v0-seed2 \
        --targets 12x 16x 24x --seeds 5 --trials 16 --out experiments/results/learning

It runs every cell through ``rltune.harness.evaluate`` (one folder per agent and one for the
baselines, each resumable), then writes ``learning.json`` and ``learning.md`` in ``--out``.
``--render`` rewrites those two from the finished cells without running anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from rltune.agentfile import load_policy
from rltune.shipped import resolve_scenario
from rltune.harness import evaluate, read_results
from rltune.scenario import load_scenario


def _ms(xs):
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (None, None)


def _by_seed(rows, scenario, target, tuner):
    return {r["seed"]: r["test"]["test_acc"] for r in rows
            if r["scenario"] == scenario and r["target"] == target and r["tuner"] == tuner and "part" not in r}


def _paired(ppo_by_seed: dict[int, float], base: dict[int, float]) -> dict:
    """PPO − baseline, paired by evaluation seed: mean, std over seeds and standard error."""
    d = [ppo_by_seed[k] - base[k] for k in ppo_by_seed if k in base]
    m, sd = _ms(d)
    return {"mean": m, "std_over_seeds": sd, "se": sd / len(d) ** 0.5 if d else None, "n_seeds": len(d)}


def aggregate(out: Path, agents: list[str], scenarios: list[str], targets: list[str]) -> dict:
    base = read_results(out / "baselines" / "results.jsonl")
    per_agent = {a: read_results(out / Path(a).name / "results.jsonl") for a in agents}
    cells = []
    for sc in scenarios:
        for t in targets:
            recipe = _by_seed(base, sc, t, "recipe")
            plus1 = _by_seed(base, sc, t, "recipe-plus1")
            row = {"scenario": sc, "target": t, "n_seeds": len(recipe)}
            for tuner in ("recipe", "recipe-plus1", "random", "optuna-const", "optuna-tpe"):
                m, s = _ms(list(_by_seed(base, sc, t, tuner).values()))
                row[tuner] = {"test_acc_mean": m, "test_acc_std": s}
            accs = {Path(a).name: _by_seed(per_agent[a], sc, t, "ppo-replay") for a in agents}
            row["agents"] = {}
            for name, acc in accs.items():
                m, s = _ms(list(acc.values()))
                row["agents"][name] = {"test_acc_mean": m, "test_acc_std": s, "episodes": len(acc),
                                       "minus_recipe": _paired(acc, recipe)["mean"]}
            # the policy at evaluation seed k: the mean over the agents (PPO training seeds)
            seeds = set.intersection(*(set(acc) for acc in accs.values())) if accs else set()
            ppo = {k: statistics.fmean(acc[k] for acc in accs.values()) for k in sorted(seeds)}
            m, s = _ms(list(ppo.values()))
            agent_means = [v["test_acc_mean"] for v in row["agents"].values() if v["test_acc_mean"] is not None]
            row["ppo"] = {"test_acc_mean": m, "test_acc_std": s, "std_across_agents": _ms(agent_means)[1],
                          "n_agents": len(agent_means), "episodes": sum(len(a) for a in accs.values())}
            d = _paired(ppo, recipe)
            r_std = row["recipe"]["test_acc_std"]
            d["in_recipe_std"] = d["mean"] / r_std if d["mean"] is not None and r_std else None
            d["in_se"] = d["mean"] / d["se"] if d["mean"] is not None and d["se"] else None
            d["std_across_agents"] = _ms([v["minus_recipe"] for v in row["agents"].values()
                                         if v["minus_recipe"] is not None])[1]
            row["ppo_minus_recipe"] = d
            row["ppo_minus_recipe_plus1"] = _paired(ppo, plus1)
            cells.append(row)
    means = [c["ppo_minus_recipe"]["mean"] for c in cells if c["ppo_minus_recipe"]["mean"] is not None]
    plus1_m = [c["ppo_minus_recipe_plus1"]["mean"] for c in cells if c["ppo_minus_recipe_plus1"]["mean"] is not None]
    summary = {
        "mean_ppo_minus_recipe": statistics.fmean(means) if means else None,
        "mean_ppo_minus_recipe_plus1": statistics.fmean(plus1_m) if plus1_m else None,
        "cells_beating_recipe_by_2_recipe_std": sum(1 for c in cells if (c["ppo_minus_recipe"]["in_recipe_std"] or 0) > 2),
        "cells_beating_recipe_by_2_se": sum(1 for c in cells if (c["ppo_minus_recipe"]["in_se"] or 0) > 2),
        "cells": len(cells),
    }
    return {"agents": agents, "scenarios": scenarios, "targets": targets, "cells": cells, "summary": summary}


def to_markdown(res: dict, command: str) -> str:
    f = lambda d: "–" if d["test_acc_mean"] is None else f"{100 * d['test_acc_mean']:.2f} ± {100 * d['test_acc_std']:.2f}"
    lines = ["# Learning benchmark (generated by experiments/learning.py; do not edit)", "",
             f"Command: `{command}`", "",
             f"Training scenarios of the agents; test accuracy (%), mean ± std over the evaluation seeds. "
             f"PPO: at each evaluation seed the mean of {len(res['agents'])} agents (PPO training seeds), one "
             "deterministic episode each; baselines: one result per evaluation seed (Optuna: the best of its "
             "episodes by val). Δ: PPO − recipe, paired by evaluation seed, mean ± std over seeds; "
             "Δ/σ: Δ in units of the recipe's std over seeds (the issue's bar is > 2); Δ/se: Δ over its "
             "standard error. Per agent: each agent's Δ.", "",
             "| scenario @ target | PPO | recipe | recipe +1 bit | random actions | Optuna const | Optuna schedule | Δ (pt) | Δ/σ | Δ/se | per agent Δ |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in res["cells"]:
        d = c["ppo_minus_recipe"]
        per = ", ".join("–" if v["minus_recipe"] is None else f"{100 * v['minus_recipe']:+.2f}" for v in c["agents"].values())
        dd = "–" if d["mean"] is None else f"{100 * d['mean']:+.2f} ± {100 * d['std_over_seeds']:.2f}"
        ds = "–" if d["in_recipe_std"] is None else f"{d['in_recipe_std']:+.1f}"
        dse = "–" if d["in_se"] is None else f"{d['in_se']:+.1f}"
        lines.append(f"| {c['scenario']} @ {c['target']} | {f(c['ppo'])} | {f(c['recipe'])} | {f(c['recipe-plus1'])} | "
                     f"{f(c['random'])} | {f(c['optuna-const'])} | {f(c['optuna-tpe'])} | {dd} | {ds} | {dse} | {per} |")
    s = res["summary"]
    m = s["mean_ppo_minus_recipe"]
    m1 = s["mean_ppo_minus_recipe_plus1"]
    lines += ["", f"Mean Δ over cells: {'–' if m is None else f'{100 * m:+.2f} pt'}; cells where PPO beats the recipe "
              f"by more than 2 recipe std: {s['cells_beating_recipe_by_2_recipe_std']} of {s['cells']}; by more than "
              f"2 standard errors: {s['cells_beating_recipe_by_2_se']}. "
              f"Mean PPO − (recipe +1 bit): {'–' if m1 is None else f'{100 * m1:+.2f} pt'}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", nargs="+", required=True)
    p.add_argument("--scenarios", nargs="+", help="default: the scenarios every agent was trained on")
    p.add_argument("--targets", nargs="+", default=["12x", "16x", "24x"])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--trials", type=int, default=16, help="Optuna episodes per cell")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="experiments/results/learning")
    p.add_argument("--render", action="store_true", help="only rewrite learning.{json,md}")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    if len({Path(a).name for a in args.agents}) < len(args.agents):
        print("error: --agents: two agents share a folder name (their results would share a folder)", file=sys.stderr)
        return 2
    trained = [set(load_policy(a).meta.get("training", {}).get("scenarios", [])) for a in args.agents]
    scenarios = args.scenarios or sorted(set.intersection(*trained))
    for sc in scenarios:
        if any(sc not in t for t in trained):
            print(f"error: {sc} is not in every agent's training set", file=sys.stderr)
            return 2
    if not args.render:
        for sc in scenarios:
            S = load_scenario(resolve_scenario(sc)).training["stages"]
            evaluate([sc], args.targets, ["recipe", "recipe-plus1", "random"], [S], args.seeds, out / "baselines",
                     workers=args.workers, progress=False)
            evaluate([sc], args.targets, ["optuna-const", "optuna-tpe"], [args.trials * S], args.seeds,
                     out / "baselines", workers=args.workers, progress=False)
            for a in args.agents:
                evaluate([sc], args.targets, ["ppo-replay"], [S], args.seeds, out / Path(a).name, agent=a,
                         workers=args.workers, progress=False)
            print(f"{sc}: done", flush=True)
    res = aggregate(out, args.agents, scenarios, args.targets)
    command = "python experiments/learning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.render and (out / "learning.json").exists():  # keep the command that ran the cells
        command = json.loads((out / "learning.json").read_text()).get("command", command)
    res["command"] = command
    (out / "learning.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res, command)
    (out / "learning.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
