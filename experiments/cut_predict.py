"""Can a policy read the one-bit cut's value off its step-0 observation (issue 12)? Cross-validated
on the training tasks, then checked on held-out cells.

    python experiments/cut_predict.py --effects experiments/results/learning-v1-16k/cut_effect.json --set v1s \\
        --held-out experiments/results/anytime-v1 experiments/results/anytime-v1-pick \\
        --out experiments/results/learning-v1-16k/cut_predict.json

The cut (the bit-width, ``final_bits``, committed at step 0) is a one-step decision: the per-task
effects that ``experiments/cut_effect.py`` measured in the training episodes (``rows``: effect of
playing the recipe's width instead of the plus-one width, in points of the accuracy reward) are its
labels, and the features are what the policy sees when it makes it: the env's step-0 observation
of that task (``rltune/DistillCompress-v1`` built from ``--set``'s entry of ``agents/ppo.yml``,
reset on the task; float student 0). Feature sets: ``relative`` (the probe's figures at the two
widths the cut chooses between, read relative to the recipe's width: :func:`relative_features`),
``global+relative``, ``global`` (v0's block,
:data:`rltune.env.OBS_LAYOUT`, the entries that vary), ``layers`` (the per-layer block summarised
without its slot order: the parameter-share-weighted mean, min and max of each feature over the
present layers, the shares renormalised over the covered layers, and the head's), ``global+layers`` and ``full`` (the raw observation). Models:
ridge (standardised, alpha by inner CV), gradient boosting (depth 2) and a random forest, each
scored by ``--repeats`` × ``--folds``-fold cross-validation: R², how often the sign is right and
``gain_pt``, the mean over tasks of the effect where the prediction is positive (cutting where it
predicts a gain; never cutting is 0, ``oracle_gain_pt`` cutting exactly where it paid).

Held-out check: each model is fitted on every training task and predicts each held-out cell of the
``--held-out`` anytime folders (their ``summary.json`` rows) from the cell's own step-0
observation; playing ``--cut-tuner`` (default ``sensitivity-pick``: the allocator at the probe's
pick, 3 bits at least) where it predicts a gain and ``--keep-tuner`` (``sensitivity``, v1s's zero
action) elsewhere gives a mean test accuracy over the cells, against the keep tuner's.

Writes ``{"command", "set", "tasks", "held_out_cells", "baselines", "cv": {set: {model: {"r2",
"sign_accuracy", "gain_pt"}}}, "held_out": {"keep_tuner", "cut_tuner", "keep_test_pct",
"cut_test_pct", "by": {set: {model: {"test_pct", "cells_cut"}}}, "rows"}}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FEATURE_SETS = ("global", "layers", "global+layers", "full", "relative", "global+relative")
MODELS = ("ridge", "gbr", "rf")


def layer_summary(obs, n_global: int, l_max: int, features: list[str]):
    """Per observation: the per-layer block summarised without its slot order (param-share-weighted
    mean, min and max over the present layers of each feature but ``present``, then the head's row)."""
    import numpy as np

    obs = np.asarray(obs, dtype=float)
    blk = obs[:, n_global:n_global + l_max * len(features)].reshape(len(obs), l_max, len(features))
    present = blk[:, :, features.index("present")] > 0
    share = blk[:, :, features.index("param_share")]
    share = share / np.maximum(share.sum(1, keepdims=True), 1e-12)  # the covered layers' shares, summing to 1
    head = blk[:, :, features.index("is_head")] > 0
    cols = []
    for j, f in enumerate(features):
        if f == "present":
            continue
        v = blk[:, :, j]
        cols += [(v * share).sum(1), np.where(present, v, np.inf).min(1), np.where(present, v, -np.inf).max(1),
                 (v * head).sum(1)]
    out = np.stack(cols, 1)
    out[~np.isfinite(out)] = 0.0  # an observation with no present layer
    return out


def relative_features(obs):
    """Per observation: the probe's figures at the two widths the cut chooses between, read relative
    to the recipe's width r (the cut plays r, the zero action r + 1): r, the probe's accuracy at r,
    r + 1 and r − 1 (against the float student's; −1 where infeasible or out of range), the gaps
    between them (0 where either is infeasible) with an indicator, the sparsity the target needs at r
    and r + 1 and its step, and the float student's accuracy, chance, target and teacher gap."""
    import numpy as np

    from rltune.env import BITS, OBS_LAYOUT

    obs = np.asarray(obs, dtype=float)
    ix = {n: i for i, n in enumerate(OBS_LAYOUT)}
    rows = []
    for o in obs:
        r = int(round(8 * o[ix["recipe_bits"]]))
        pa = lambda b: o[ix[f"probe_acc_{b}"]] if b in BITS else -1.0  # noqa: E731
        rq = lambda b: o[ix[f"required_sparsity_{b}"]] if b in BITS else 1.0  # noqa: E731
        up_ok, dn_ok = pa(r + 1) > -1 + 1e-9, pa(r - 1) > -1 + 1e-9
        rows.append([r, pa(r), pa(r + 1), pa(r - 1), pa(r) - pa(r + 1) if up_ok else 0.0, float(up_ok),
                     pa(r - 1) - pa(r) if dn_ok else 0.0, float(dn_ok), rq(r), rq(r + 1), rq(r) - rq(r + 1),
                     o[ix["float_acc"]], o[ix["chance"]], o[ix["log_target"]], o[ix["teacher_gap"]]])
    return np.array(rows)


def feature_sets(obs, n_global: int, l_max: int, features: list[str], keep: list[int] | None = None):
    """``{name: matrix}`` for :data:`FEATURE_SETS`; ``keep`` = the global columns to use (default:
    those that vary over ``obs``), returned so that held-out rows use the same ones."""
    import numpy as np

    obs = np.asarray(obs, dtype=float)
    g = obs[:, :n_global]
    if keep is None:
        keep = [i for i in range(n_global) if g[:, i].std() > 1e-9]
    lay = layer_summary(obs, n_global, l_max, features)
    rel = relative_features(obs)
    return {"global": g[:, keep], "layers": lay, "global+layers": np.hstack([g[:, keep], lay]), "full": obs,
            "relative": rel, "global+relative": np.hstack([g[:, keep], rel])}, keep


def make_model(name: str, seed: int = 0):
    import numpy as np
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "ridge":
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 4, 12)))
    if name == "gbr":
        return GradientBoostingRegressor(n_estimators=100, max_depth=2, learning_rate=0.05, subsample=0.7, random_state=seed)
    if name == "rf":
        return RandomForestRegressor(n_estimators=300, min_samples_leaf=5, random_state=seed, n_jobs=1)
    raise ValueError(name)


def cv_scores(X, y, model: str, folds: int = 10, repeats: int = 5) -> dict[str, float]:
    """Repeated K-fold: mean R², sign accuracy and gain (mean effect where the prediction is > 0)."""
    import numpy as np
    from sklearn.model_selection import KFold, cross_val_predict

    y = np.asarray(y, dtype=float)
    r2, sign, gain = [], [], []
    for rep in range(repeats):
        p = cross_val_predict(make_model(model, rep), X, y, cv=KFold(folds, shuffle=True, random_state=rep))
        r2.append(1 - float(((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum()))
        sign.append(float(((p > 0) == (y > 0)).mean()))
        gain.append(float(np.where(p > 0, y, 0.0).mean()))
    return {"r2": round(float(np.mean(r2)), 3), "sign_accuracy": round(float(np.mean(sign)), 3),
            "gain_pt": round(float(np.mean(gain)), 3)}


def fit_predict(X, y, Xh, model: str, repeats: int = 5):
    """Fitted on every training task (averaged over ``repeats`` model seeds), predictions for ``Xh``."""
    import numpy as np

    return np.mean([make_model(model, rep).fit(X, y).predict(Xh) for rep in range(repeats)], axis=0)


def held_out_cells(folders: list[Path], keep: str, cut: str) -> dict[tuple[str, str], dict[str, float]]:
    """``{(task name, target): {"keep": test %, "cut": test %}}`` for the cells of the anytime
    folders' ``summary.json`` where both tuners have a one-episode row."""
    acc: dict[tuple[str, str], dict[str, float]] = {}
    for f in folders:
        rows = json.loads((f / "summary.json").read_text(encoding="utf-8"))["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise TypeError(f"{f / 'summary.json'}: rows is not a list of objects")
        for r in rows:
            if r.get("tuner") in (keep, cut) and r.get("episodes") == 1 and r.get("test_acc_mean") is not None:
                name = Path(str(r["scenario"])).stem
                arm = "keep" if r["tuner"] == keep else "cut"
                v = 100 * float(r["test_acc_mean"])
                had = acc.setdefault((name, str(r["target"])), {}).get(arm)
                if had is not None and abs(had - v) > 1e-9:
                    raise ValueError(f"{name} @ {r['target']}: two {r['tuner']} rows disagree ({had:.3f} and {v:.3f})")
                acc[(name, str(r["target"]))][arm] = v
    return {k: v for k, v in sorted(acc.items()) if len(v) == 2}


def observations(cfg: dict, wanted: list[tuple[str, str | None]], held_out: bool) -> dict[str, list[float]]:
    """The step-0 observation of each ``(task name, target or None)`` in the v1 env of ``cfg``
    (its task spec, training or held-out slice), built on those tasks only, as
    :func:`rltune.train.gate_tasks` builds its env."""
    from rltune.env_v1 import DistillCompressEnvV1
    from rltune.errors import RltuneError
    from rltune.tasks import generate_tasks

    by_name = {t.name: t for t in generate_tasks(cfg["tasks"]) if t.held_out == held_out}
    missing = [n for n, _ in wanted if n not in by_name]
    if missing:
        raise RltuneError(f"task {missing[0]!r} is not in the {'held-out' if held_out else 'training'} tasks of the set")
    names = list(dict.fromkeys(n for n, _ in wanted))
    kw = {k: v for k, v in (cfg.get("env") or {}).items() if k != "targets"}
    env = DistillCompressEnvV1(tasks=[by_name[n] for n in names], held_out=held_out, **kw)
    out = {}
    for name, target in wanted:
        opts = {"scenario": names.index(name), "float_seed": 0}
        if target is not None:
            opts["target"] = target
        obs, _ = env.reset(options=opts)
        out[f"{name}|{target}"] = [float(x) for x in obs]
    env.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--effects", required=True, help="cut_effect.json (experiments/cut_effect.py)")
    p.add_argument("--set", default="v1s", help="the agents/ppo.yml entry whose env and tasks were trained on")
    p.add_argument("--hyperparams", default="agents/ppo.yml")
    p.add_argument("--held-out", nargs="*", default=[], help="anytime result folders with the two tuners' rows")
    p.add_argument("--keep-tuner", default="sensitivity")
    p.add_argument("--cut-tuner", default="sensitivity-pick")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True, help="JSON file to write")
    a = p.parse_args(argv)
    if a.folds < 2 or a.repeats < 1:
        p.error("--folds >= 2 and --repeats >= 1")
    from rltune.errors import RltuneError, write_json

    try:
        eff = json.loads(Path(a.effects).read_text(encoding="utf-8"))
        rows = [(str(r["task"]), float(r["effect_pt"])) for r in eff["rows"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        p.error(f"--effects {a.effects}: not a cut_effect.json ({e})")
    rows = [(t, y) for t, y in rows if math.isfinite(y)]
    if len(rows) >= 2 and max(y for _, y in rows) - min(y for _, y in rows) < 1e-12:
        p.error(f"--effects {a.effects}: every task has the same effect: nothing to predict")
    if len(rows) < max(3, a.folds):
        p.error(f"--effects {a.effects}: {len(rows)} tasks, too few for {a.folds}-fold cross-validation")
    folders = [Path(f) for f in a.held_out]
    try:
        cells = held_out_cells(folders, a.keep_tuner, a.cut_tuner)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        p.error(f"--held-out: cannot read an anytime summary.json ({e})")
    if folders and not cells:
        p.error(f"--held-out: no cell has one-episode rows of both {a.keep_tuner} and {a.cut_tuner}")

    import numpy as np
    import torch

    from rltune.env import OBS_LAYOUT
    from rltune.env_v1 import L_MAX, LAYER_FEATURES
    from rltune.shipped import recorded_command
    from rltune.train import check_config, load_hyperparams

    torch.set_num_threads(1)
    try:
        cfg = check_config(load_hyperparams(a.hyperparams, a.set), f"{a.hyperparams}:{a.set}")
        if cfg.get("tasks") is None or cfg.get("env_id") != "rltune/DistillCompress-v1":
            raise RltuneError(f"{a.hyperparams}:{a.set} is not a v1 set of generated tasks")
        train_obs = observations(cfg, [(t, None) for t, _ in rows], held_out=False)
        ho_obs = observations(cfg, list(cells), held_out=True) if cells else {}
    except RltuneError as e:
        p.error(str(e))

    y = np.array([v for _, v in rows])
    X_obs = np.array([train_obs[f"{t}|None"] for t, _ in rows])
    sets, keep = feature_sets(X_obs, len(OBS_LAYOUT), L_MAX, list(LAYER_FEATURES))
    cv = {s: {m: cv_scores(X, y, m, a.folds, a.repeats) for m in MODELS} for s, X in sets.items()}

    held: dict = {}
    if cells:
        keys = list(cells)
        Xh_sets, _ = feature_sets(np.array([ho_obs[f"{n}|{t}"] for n, t in keys]), len(OBS_LAYOUT), L_MAX,
                                  list(LAYER_FEATURES), keep)
        by: dict = {}
        preds: dict = {}
        for s in FEATURE_SETS:
            by[s] = {}
            for m in MODELS:
                pr = fit_predict(sets[s], y, Xh_sets[s], m, a.repeats)
                preds[(s, m)] = pr
                played = [cells[k]["cut"] if q > 0 else cells[k]["keep"] for k, q in zip(keys, pr)]
                by[s][m] = {"test_pct": round(float(np.mean(played)), 3), "cells_cut": int((pr > 0).sum())}
        held = {"keep_tuner": a.keep_tuner, "cut_tuner": a.cut_tuner, "cells": len(keys),
                "keep_test_pct": round(float(np.mean([cells[k]["keep"] for k in keys])), 3),
                "cut_test_pct": round(float(np.mean([cells[k]["cut"] for k in keys])), 3),
                "oracle_test_pct": round(float(np.mean([max(cells[k].values()) for k in keys])), 3), "by": by,
                "rows": [{"task": n, "target": t, "keep_test_pct": round(cells[(n, t)]["keep"], 3),
                          "cut_test_pct": round(cells[(n, t)]["cut"], 3),
                          "predicted_pt": {f"{s}/{m}": round(float(preds[(s, m)][i]), 3) for s in FEATURE_SETS for m in MODELS}}
                         for i, (n, t) in enumerate(keys)]}

    result = {"command": recorded_command(), "set": a.set, "effects": a.effects, "tasks": len(rows),
              "features": {s: int(X.shape[1]) for s, X in sets.items()}, "folds": a.folds, "repeats": a.repeats,
              "baselines": {"never_cut_gain_pt": 0.0, "always_cut_gain_pt": round(float(y.mean()), 3),
                            "oracle_gain_pt": round(float(np.clip(y, 0, None).mean()), 3)},
              "cv": cv, "held_out": held}
    try:
        write_json(a.out, result, "--out")
    except RltuneError as e:
        p.error(str(e))
    print(json.dumps({k: v for k, v in result.items() if k in ("tasks", "baselines", "cv")}, indent=1))
    if held:
        print(json.dumps({k: v for k, v in held.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
