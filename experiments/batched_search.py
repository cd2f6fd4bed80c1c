"""Batched students in the searches (issue 10): a 32-episode Optuna cell and a PPO rollout of 16
episodes, each timed one episode at a time and batched, on the same cell; and search quality at
equal trials: TPE asking 16 trials at a time (constant liar, batched) against sequential TPE.

    python experiments/batched_search.py
    python experiments/batched_search.py --seeds 2 --cells synthetic-6class=16x   # a quick look

One thread. Writes experiments/results/batched_search.json (test accuracy mean and std over the
seeds, paired differences per seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rltune.env import DistillCompressEnv
from rltune.tuners import run_tuner
from rltune.shipped import recorded_command

ROOT = Path(__file__).resolve().parents[1]


def ms(xs):
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def time_optuna_cell(scenario: str, target: str, episodes: int, k: int) -> dict:
    env = DistillCompressEnv(scenarios=[scenario], targets=[target])
    env.reset(seed=0, options={"scenario": 0, "target": target, "float_seed": 0})  # caches warm
    S = env.scenarios[0].training["stages"]
    out = {}
    for name, batch in (("sequential", 1), ("batched", k)):
        t = time.perf_counter()
        r = run_tuner("optuna-tpe", env, 0, target, 0, episodes * S, batch=batch)
        out[name] = {"seconds": time.perf_counter() - t, "episodes": r.episodes, "val_acc": r.val_acc,
                     "test_acc": r.test["test_acc"]}
    out["speedup"] = out["sequential"]["seconds"] / out["batched"]["seconds"]
    return out


def time_ppo_rollout(scenario: str, target: str, k: int) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from rltune.vecenv import BatchedVecEnv

    out = {}
    for name, cls in (("sequential", DummyVecEnv), ("batched", BatchedVecEnv)):
        venv = cls([lambda: DistillCompressEnv(scenarios=[scenario], targets=[target])] * k)
        venv.seed(0)
        S = venv.envs[0].unwrapped.scenarios[0].training["stages"]
        model = PPO("MlpPolicy", venv, n_steps=S, batch_size=k * S, n_epochs=1, seed=0, verbose=0,
                    policy_kwargs={"net_arch": [64, 64]})
        model.learn(k * S)  # warm-up rollout: teachers, float students and probes cached
        t = time.perf_counter()
        model.learn(k * S, reset_num_timesteps=False)  # one rollout: k episodes of S stages
        out[name] = {"seconds": time.perf_counter() - t, "episodes": k, "stages": k * S}
    out["speedup"] = out["sequential"]["seconds"] / out["batched"]["seconds"]
    return out


def quality(scenario: str, target: str, episodes: int, k: int, seeds: int) -> dict:
    env = DistillCompressEnv(scenarios=[scenario], targets=[target])
    S = env.scenarios[0].training["stages"]
    res = {"sequential": [], "batched": [], "seconds": {"sequential": 0.0, "batched": 0.0}}
    for seed in range(seeds):
        for name, batch in (("sequential", 1), ("batched", k)):
            t = time.perf_counter()
            r = run_tuner("optuna-tpe", env, 0, target, seed, episodes * S, batch=batch)
            res["seconds"][name] += time.perf_counter() - t
            res[name].append(r.test["test_acc"])
        print(f"  {scenario} @ {target} seed {seed}: sequential {100 * res['sequential'][-1]:.2f} batched "
              f"{100 * res['batched'][-1]:.2f}", flush=True)
    diffs = [b - s for b, s in zip(res["batched"], res["sequential"])]
    return {"test_acc_sequential": ms(res["sequential"]), "test_acc_batched": ms(res["batched"]),
            "paired_diff": ms(diffs), "seconds": res["seconds"], "episodes": episodes, "k": k}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", nargs="+", default=["synthetic-6class=16x", "digits-mlp=16x"])
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "batched_search.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    cells = [c.split("=") for c in a.cells]
    sc, tg = cells[0]
    out = {"command": recorded_command(), "threads": 1,
           "k": a.k, "seeds": a.seeds}
    out["optuna_cell"] = {"scenario": sc, "target": tg, **time_optuna_cell(sc, tg, a.episodes, a.k)}
    print(f"Optuna cell, {a.episodes} episodes: {out['optuna_cell']['sequential']['seconds']:.1f} s one at a time, "
          f"{out['optuna_cell']['batched']['seconds']:.1f} s in batches of {a.k} ({out['optuna_cell']['speedup']:.2f}x)",
          flush=True)
    out["ppo_rollout"] = {"scenario": sc, "target": tg, **time_ppo_rollout(sc, tg, a.k)}
    print(f"PPO rollout of {a.k} episodes: {out['ppo_rollout']['sequential']['seconds']:.1f} s DummyVecEnv, "
          f"{out['ppo_rollout']['batched']['seconds']:.1f} s BatchedVecEnv ({out['ppo_rollout']['speedup']:.2f}x)",
          flush=True)
    out["search_quality"] = {}
    for sc, tg in cells:
        q = quality(sc, tg, a.episodes, a.k, a.seeds)
        out["search_quality"][f"{sc}@{tg}"] = q
        print(f"{sc} @ {tg}: TPE-{a.episodes} sequential {100 * q['test_acc_sequential']['mean']:.2f} ± "
              f"{100 * q['test_acc_sequential']['std']:.2f}, batched by {a.k} {100 * q['test_acc_batched']['mean']:.2f} ± "
              f"{100 * q['test_acc_batched']['std']:.2f} (paired {100 * q['paired_diff']['mean']:+.2f} ± "
              f"{100 * q['paired_diff']['std']:.2f} pt)", flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
