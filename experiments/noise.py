"""How loud is the reward? The signal-to-noise of one decision (issue 12)

The decision: the recipe's bit-width against one bit more (``recipe-plus1``), the one the shipped
policy learned. For each cell the float student is fixed (float seed 0) and the episode is played
with ``--seeds`` training seeds, both arms at the same training seed (paired). Per cell it reports

* ``signal``: the mean paired difference of final val accuracy (plus1 − recipe), in points;
* ``sd_paired`` / ``sd_unpaired``: the spread of that difference over seeds, and of one arm's
  accuracy (the mean of the two arms' std): what one episode's reward carries besides the signal;
* ``eval_se``: of ``sd_paired``, the part that comes from the finite val split alone — the standard
  error of the difference of two *fixed* students' accuracies on these val samples (from their
  per-sample correctness), averaged over seeds; the rest is the training path;
* ``snr``: ``|signal| / sd_paired`` (one episode), and the seeds one needs for a 2-sigma call;
* the same for the test split (the truth the reward stands for, read only to judge it) and for the
  agreement with the teacher on every training row (tens of thousands of rows: a larger evaluation
  than the val split), and how often one seed's val or agreement difference has the test's sign.

``--variant`` picks what the stage does to lower the noise:

* ``base``: today's stage;
* ``tail``: the last stage's latent weights are the average of its iterates over the last half of
  its optimizer steps (tail averaging; :data:`rltune.stage.TAIL_AVERAGE`).

    python experiments/noise.py --cells synthetic-6class=16x mnist1d-small=16x digits-mlp=16x --seeds 10 \
        --variant base --out experiments/results/noise.json

Results for several variants go in one file (a rerun replaces that variant's rows for the cells it
ran). Seeds where either arm diverged are counted (``diverged``) and left out of the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from rltune.env import DistillCompressEnv, nearest_feasible

VARIANTS = ("base", "tail")


def run_pair(scenario: str, target: str, seed: int, variant: str) -> dict:
    """Both arms at training seed ``seed`` (float student 0): val accuracy, val loss, per-sample
    correctness."""
    import torch.nn.functional as F

    import rltune.stage as stage
    from rltune.distill import predict
    from rltune.env import play_offset

    torch.set_num_threads(1)
    stage.TAIL_AVERAGE = 0.5 if variant == "tail" else None
    env = DistillCompressEnv(scenarios=[scenario], targets=[target])
    out = {"scenario": scenario, "target": target, "seed": seed, "variant": variant}
    for arm, off in (("recipe", 0), ("plus1", 1)):
        info = play_offset(env, seed, {"scenario": 0, "target": target, "float_seed": 0}, off)
        d, ts = env.ctx.data, env.ctx.train_set
        logits = predict(env.state.model, d.x_val)
        fit = predict(env.state.model, ts.x).argmax(1) == ts.t_logits.argmax(1)
        out[arm] = {"bits": env.plan["final_bits"], "val_acc": float(info["val_acc"]),
                    "val_loss": float(F.cross_entropy(logits, d.y_val)),
                    # the truth the reward stands for (read here only to judge the reward, never to choose)
                    "test_acc": float((predict(env.state.model, d.x_test).argmax(1) == d.y_test).float().mean()),
                    # agreement with the teacher on every training row (labeled and transfer): a large sample
                    "fit_agreement": float(fit.float().mean()),
                    "diverged": info.get("diverged", ""),
                    "correct": (logits.argmax(1) == d.y_val).int().tolist()}
    return out


def summarise(all_rows: list[dict]) -> dict:
    """The figures over the seeds where neither arm diverged (a diverged episode's val accuracy is
    its last good stage's, not a result)."""
    rows = [r for r in all_rows if not r["recipe"]["diverged"] and not r["plus1"]["diverged"]]
    diffs = [100 * (r["plus1"]["val_acc"] - r["recipe"]["val_acc"]) for r in rows]
    loss_diffs = [r["plus1"]["val_loss"] - r["recipe"]["val_loss"] for r in rows]
    sd_arm = [statistics.stdev(100 * r[arm]["val_acc"] for r in rows) for arm in ("recipe", "plus1")]
    ses = []
    for r in rows:
        c = np.array(r["plus1"]["correct"]) - np.array(r["recipe"]["correct"])
        ses.append(100 * float(np.std(c, ddof=1)) / math.sqrt(len(c)))
    signal, sd = statistics.mean(diffs), statistics.stdev(diffs)

    def snr_of(key: str) -> dict:
        dd = [100 * (r["plus1"][key] - r["recipe"][key]) for r in rows]
        m, s = statistics.mean(dd), statistics.stdev(dd)
        return {"signal": m, "sd_paired": s, "snr": abs(m) / s if s > 0 else math.inf}

    loss_signal, loss_sd = statistics.mean(loss_diffs), statistics.stdev(loss_diffs)
    snr = abs(signal) / sd if sd > 0 else math.inf
    return {
        "n_seeds": len(rows),
        "bits": [rows[0]["recipe"]["bits"], rows[0]["plus1"]["bits"]],
        "recipe_val_acc_mean": statistics.mean(100 * r["recipe"]["val_acc"] for r in rows),
        "plus1_val_acc_mean": statistics.mean(100 * r["plus1"]["val_acc"] for r in rows),
        "signal": signal, "sd_paired": sd, "sd_unpaired": statistics.mean(sd_arm),
        "eval_se": statistics.mean(ses),
        "eval_share_of_variance": min(1.0, statistics.mean(s * s for s in ses) / (sd * sd)) if sd > 0 else None,
        "snr": snr, "seeds_for_2_sigma": math.ceil((2 / snr) ** 2) if snr > 0 else None,
        "loss_signal": loss_signal, "loss_sd_paired": loss_sd,
        "loss_snr": abs(loss_signal) / loss_sd if loss_sd > 0 else math.inf,
        "diverged": sum(bool(r[a]["diverged"]) for r in all_rows for a in ("recipe", "plus1")),
        "n_val": len(rows[0]["recipe"]["correct"]),
        "test": snr_of("test_acc"), "fit_agreement": snr_of("fit_agreement"),
        # does one episode's reward point the way the test split does? (share of seeds)
        "val_sign_agrees_with_test": statistics.mean(
            float((r["plus1"]["val_acc"] - r["recipe"]["val_acc"]) * (r["plus1"]["test_acc"] - r["recipe"]["test_acc"]) > 0)
            for r in rows),
        "fit_sign_agrees_with_test": statistics.mean(
            float((r["plus1"]["fit_agreement"] - r["recipe"]["fit_agreement"]) * (r["plus1"]["test_acc"] - r["recipe"]["test_acc"]) > 0)
            for r in rows),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", nargs="+", default=["synthetic-6class=16x", "mnist1d-small=16x", "digits-mlp=16x"],
                    metavar="NAME=TARGET")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--variant", choices=VARIANTS, default="base")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="experiments/results/noise.json")
    a = ap.parse_args(argv)
    cells = []
    for c in a.cells:
        name, _, target = c.partition("=")
        if not name or not target:
            print(f"noise.py: a cell is NAME=TARGET, got {c!r}", file=sys.stderr)
            return 2
        cells.append((name, target))
    if a.seeds < 2 or a.workers < 1:
        print("noise.py: --seeds takes at least 2, --workers at least 1", file=sys.stderr)
        return 2
    from rltune.errors import RltuneError, write_atomic

    for n, t in cells:   # a bad name or target is one line here, not a worker's traceback
        try:
            env = DistillCompressEnv(scenarios=[n], targets=[t])
            env.reset(seed=0, options={"scenario": 0, "target": t, "float_seed": 0})
            want = env.probe_result.recipe_bits + 1
            if nearest_feasible(env.probe_result, want) != want:
                raise RltuneError(f"{n} @ {t}: one bit more than the recipe ({want}) is out of range or infeasible")
        except RltuneError as e:
            print(f"noise.py: {e}", file=sys.stderr)
            return 2
    jobs = [(n, t, s, a.variant) for n, t in cells for s in range(a.seeds)]
    with ProcessPoolExecutor(a.workers) as pool:
        rows = list(pool.map(run_pair, *zip(*jobs)))
    out_path = Path(a.out)
    doc = json.loads(out_path.read_text()) if out_path.exists() else {"commands": {}, "cells": []}
    from rltune.shipped import recorded_command

    doc["commands"][a.variant] = recorded_command()
    doc["cells"] = [c for c in doc["cells"] if c["variant"] != a.variant or (c["scenario"], c["target"]) not in cells]
    for n, t in cells:
        mine = [r for r in rows if r["scenario"] == n and r["target"] == t]
        s = summarise(mine)
        doc["cells"].append({"scenario": n, "target": t, "variant": a.variant, **s,
                             "val_acc": {arm: [r[arm]["val_acc"] for r in mine] for arm in ("recipe", "plus1")}})
        print(f"{n} @ {t} [{a.variant}]: bits {s['bits']}, signal {s['signal']:+.2f} pt, sd paired {s['sd_paired']:.2f} "
              f"(unpaired {s['sd_unpaired']:.2f}, val split alone {s['eval_se']:.2f}), snr {s['snr']:.2f}, "
              f"loss snr {s['loss_snr']:.2f}; test: signal {s['test']['signal']:+.2f} sd {s['test']['sd_paired']:.2f}; "
              f"fit agreement: signal {s['fit_agreement']['signal']:+.2f} sd {s['fit_agreement']['sd_paired']:.2f} "
              f"snr {s['fit_agreement']['snr']:.2f}", flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, (json.dumps(doc, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
