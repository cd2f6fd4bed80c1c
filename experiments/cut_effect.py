"""What the one-bit cut paid, task by task, in v1 training episodes (issue 12): is there a per-task
signal to learn, and do simple task features predict it?

    python experiments/cut_effect.py --monitors experiments/results/learning-v1-16k/runs/v1s16k-seed*/training_monitor.csv \\
        --out experiments/results/learning-v1-16k/cut_effect.json

Reads the training monitors ``rltune train`` writes (one row per episode: the stochastic policy on
a training task; ``plan_final_bits``, ``recipe_bits``, ``reward_accuracy``). Per task, the cut's
effect is the mean accuracy reward (in points against the zero action, ``reward_accuracy /
reward_scale``) of its episodes at the recipe's width minus that of its episodes one bit above
(the plus-one width the zero action plays); tasks with fewer than ``--min-episodes`` episodes in
either arm are left out, and so are diverged episodes (told by their divergence penalty,
:func:`rltune.train.read_monitor`).

Writes ``{"command", "monitors", "episodes", "tasks", "mean_effect_pt", "sd_effect_pt",
"share_positive", "oracle_gain_pt", "split_half": {"tasks", "pearson", "spearman"},
"by_family", "by_recipe_bits", "below_recipe_by_recipe_bits", "predicted": {"features", "folds", "r2",
"sign_accuracy", "gain_pt"}, "rows"}``:
``below_recipe_by_recipe_bits`` is the same per-task effect for a cut one bit *under* the recipe's
width against the recipe's width (at 8 bits, where the plus-one width is the recipe's own, the
cut the policy can take goes there), grouped by the recipe's width;
``split_half`` correlates the per-task effect over two halves of each task's episodes (each arm's
episodes dealt alternately; a per-task signal repeats, noise does not); ``oracle_gain_pt`` is the mean over tasks of max(effect, 0), what cutting
exactly where it pays would add; ``predicted`` is a ridge regression from the family (one-hot),
the recipe's width, the float student's val accuracy and the log of the episode's ratio,
``folds``-fold cross-validated: R², how often it gets the sign, and the mean gain of cutting
where it predicts a gain.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path


def load(monitors: list[Path], reward_scale: float, divergence_penalty: float = 1.0) -> list[dict]:
    """The episodes of the monitors that have an accuracy reward (not diverged, finite columns)."""
    from rltune.train import read_monitor

    rows = []
    for m in monitors:
        for r in read_monitor(m, reward_scale, divergence_penalty):
            if r["reward_pt"] is None:
                continue  # a diverged episode: no accuracy reward
            try:
                row = {"task": r["scenario"], "acc": r["reward_pt"],
                       "db": int(round(float(r["plan_final_bits"]) - float(r["recipe_bits"]))),
                       "recipe_bits": int(float(r["recipe_bits"])),
                       "float_val_acc": float(r["float_val_acc"]), "ratio": float(r["ratio"])}
            except (KeyError, TypeError, ValueError, OverflowError):
                continue  # another kind of monitor, or a row cut short
            if math.isfinite(row["float_val_acc"]) and math.isfinite(row["ratio"]) and row["ratio"] > 0:
                rows.append(row)
    return rows


def effects(rows: list[dict], min_episodes: int, arms: tuple[int, int] = (0, 1)) -> dict[str, dict]:
    """Per task: the cut's effect (mean at the recipe's width − mean one bit above) and its counts;
    ``arms=(-1, 0)``: a cut one bit below the recipe's width against the recipe's (``cut`` and
    ``plus1`` then count those two arms)."""
    by: dict[str, dict[int, list[float]]] = {}
    meta: dict[str, dict] = {}
    lo, hi = arms
    for r in rows:
        if r["db"] in (lo, hi):
            by.setdefault(r["task"], {0: [], 1: []})[r["db"] - lo].append(r["acc"])
            meta.setdefault(r["task"], {"recipe_bits": r["recipe_bits"], "float_val_acc": r["float_val_acc"], "ratios": []})
            meta[r["task"]]["ratios"].append(r["ratio"])
    out = {}
    for t, arms in by.items():
        if min(len(arms[0]), len(arms[1])) >= min_episodes:
            m = meta[t]
            out[t] = {"effect_pt": statistics.fmean(arms[0]) - statistics.fmean(arms[1]), "cut": len(arms[0]),
                      "plus1": len(arms[1]), "family": t.split("-")[2] if t.count("-") >= 2 else t,
                      "recipe_bits": m["recipe_bits"], "float_val_acc": m["float_val_acc"],
                      "log_ratio": math.log(statistics.median(m["ratios"]))}
    return out


def _group(eff: dict[str, dict], key: str) -> dict[str, dict]:
    g: dict[str, list[float]] = {}
    for e in eff.values():
        g.setdefault(str(e[key]), []).append(e["effect_pt"])
    return {k: {"tasks": len(v), "mean_pt": round(statistics.fmean(v), 3),
                "sd_pt": round(statistics.stdev(v), 3) if len(v) > 1 else None} for k, v in sorted(g.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--monitors", nargs="+", required=True, help="training_monitor.csv files (one per training seed)")
    p.add_argument("--reward-scale", type=float, default=20.0)
    p.add_argument("--divergence-penalty", type=float, default=1.0, help="the env's, to tell diverged episodes")
    p.add_argument("--min-episodes", type=int, default=3, help="episodes per arm for a task to count")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--out", required=True, help="JSON file to write")
    a = p.parse_args(argv)
    if a.min_episodes < 1 or a.folds < 2 or not a.reward_scale > 0 or not a.divergence_penalty > 0:
        p.error("--min-episodes >= 1, --folds >= 2, --reward-scale > 0 and --divergence-penalty > 0")
    monitors = [Path(m) for m in a.monitors]
    for m in monitors:
        if not m.is_file():
            p.error(f"{m}: no such file")
    from rltune.errors import RltuneError, write_json

    try:
        rows = load(monitors, a.reward_scale, a.divergence_penalty)
    except RltuneError as e:
        p.error(str(e))
    eff = effects(rows, a.min_episodes)
    below = effects(rows, a.min_episodes, arms=(-1, 0))  # a bit under the recipe's width against it
    if len(eff) < max(3, a.folds):
        p.error(f"only {len(eff)} tasks have {a.min_episodes}+ episodes in both arms: too few")

    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    # split-half: each task's episodes of each arm dealt alternately into two halves (in the order
    # the monitors list them), the effect measured in each half
    seen: dict[tuple, int] = {}
    half_of = []
    for r in rows:
        k = (r["task"], r["db"])
        half_of.append(seen.get(k, 0) % 2)
        seen[k] = seen.get(k, 0) + 1
    halves = [effects([r for r, h in zip(rows, half_of) if h == half], a.min_episodes) for half in (0, 1)]
    common = sorted(set(halves[0]) & set(halves[1]))
    x0 = [halves[0][t]["effect_pt"] for t in common]
    x1 = [halves[1][t]["effect_pt"] for t in common]
    split = {"tasks": len(common),
             "pearson": round(float(pearsonr(x0, x1)[0]), 3) if len(common) > 2 else None,
             "spearman": round(float(spearmanr(x0, x1)[0]), 3) if len(common) > 2 else None}

    tasks = sorted(eff)
    y = np.array([eff[t]["effect_pt"] for t in tasks])
    fams = sorted({eff[t]["family"] for t in tasks})
    X = np.array([[eff[t]["family"] == f for f in fams] + [eff[t]["recipe_bits"], eff[t]["float_val_acc"], eff[t]["log_ratio"]]
                  for t in tasks], dtype=float)
    pred = cross_val_predict(RidgeCV(alphas=[0.1, 1.0, 10.0, 100.0]), X, y,
                             cv=KFold(a.folds, shuffle=True, random_state=0))
    r2 = 1 - float(((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    from rltune.shipped import recorded_command

    result = {
        "command": recorded_command(), "monitors": [str(m) for m in monitors], "episodes": len(rows),
        "tasks": len(eff), "mean_effect_pt": round(float(y.mean()), 3), "sd_effect_pt": round(float(y.std(ddof=1)), 3),
        "share_positive": round(float((y > 0).mean()), 3), "oracle_gain_pt": round(float(np.clip(y, 0, None).mean()), 3),
        "split_half": split, "by_family": _group(eff, "family"), "by_recipe_bits": _group(eff, "recipe_bits"),
        "below_recipe_by_recipe_bits": _group(below, "recipe_bits") if below else {},
        "predicted": {"features": [f"family={f}" for f in fams] + ["recipe_bits", "float_val_acc", "log_ratio"],
                      "folds": a.folds, "r2": round(r2, 3), "sign_accuracy": round(float(((pred > 0) == (y > 0)).mean()), 3),
                      "gain_pt": round(float(np.where(pred > 0, y, 0.0).mean()), 3)},
        "rows": [{"task": t, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in eff[t].items()}} for t in tasks],
    }
    try:
        write_json(a.out, result, "--out")
    except RltuneError as e:
        p.error(str(e))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "command", "monitors")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
