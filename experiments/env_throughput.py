"""Environment throughput (issue 3): steps/s per scenario on one thread, the share of a step spent
outside the stage's training, the reset (probe) cost, and PPO's share of wall time in training.
Batched students (issue 10): per scenario, K students' stages (prune, quantize, train, measure)
one at a time and as one batch (rltune.batched), student-stages per core-second both ways.

    python experiments/env_throughput.py
    python experiments/env_throughput.py --scenarios digits-linear --episodes 1 --ppo-steps 128

Writes experiments/results/env_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from rltune.env import DistillCompressEnv
from rltune.shipped import recorded_command

ROOT = Path(__file__).resolve().parent


class StepTimer(gym.Wrapper):
    """Adds up the wall time spent inside env.step and env.reset."""

    def __init__(self, env):
        super().__init__(env)
        self.env_seconds = 0.0

    def step(self, action):
        t = time.perf_counter()
        out = self.env.step(action)
        self.env_seconds += time.perf_counter() - t
        return out

    def reset(self, **kw):
        t = time.perf_counter()
        out = self.env.reset(**kw)
        self.env_seconds += time.perf_counter() - t
        return out


def batched_throughput(env: DistillCompressEnv, k: int, repeats: int) -> dict:
    """Student-stages per second (one thread): K students, each with its own knobs (the recipe's
    middle stage at its own bit-width, τ and α), one at a time with run_stage and as one batch."""
    from rltune.batched import batchable, run_stages_batched
    from rltune.stage import Knobs, run_stage, start

    ctx = env.context(0)
    fs = env.float_student(0, 0)[0]
    bits = [2, 3, 4, 5, 6, 8, 32]
    knobs = [Knobs(2.0 + (i % 5), 0.5 + 0.1 * (i % 5), 0.3 + 0.4 * (i % 4) / 3, bits[i % len(bits)]) for i in range(k)]
    single_s, batched_s = [], []
    for rep in range(repeats + 1):  # the first round warms up
        states = [start(ctx, seed=100 * rep + i, float_student=fs) for i in range(k)]
        t = time.perf_counter()
        for st, kn in zip(states, knobs):
            run_stage(ctx, st, kn)
        if rep:
            single_s.append(time.perf_counter() - t)
        states = [start(ctx, seed=100 * rep + i, float_student=fs) for i in range(k)]
        t = time.perf_counter()
        run_stages_batched(ctx, states, knobs)
        if rep:
            batched_s.append(time.perf_counter() - t)
    single, batched = statistics.median(single_s), statistics.median(batched_s)
    from rltune.batched import BATCH_MAX_PARAMS

    return {"k": k, "student_stages_per_second": k / batched, "single_student_stages_per_second": k / single,
            "batched_path": sum(p.numel() for p in fs.parameters()) <= BATCH_MAX_PARAMS,
            "speedup_vs_single": single / batched, "epochs_per_stage": ctx.scenario.training["epochs_per_stage"],
            "batchable": batchable([start(ctx, 0, fs).model]) is None, "repeats": repeats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", default=["digits-linear", "digits-mlp", "mnist1d-small",
                                                     "synthetic-6class", "mnist1d-lenet"])
    p.add_argument("--target", default="12x")
    p.add_argument("--episodes", type=int, default=2, help="timed episodes per scenario (after one warm-up)")
    p.add_argument("--ppo-scenario", default="digits-linear")
    p.add_argument("--ppo-steps", type=int, default=512)
    p.add_argument("--batched-k", type=int, default=16, help="students per batch for the batched measurement")
    p.add_argument("--batched-repeats", type=int, default=3, help="timed rounds of K student-stages each way")
    p.add_argument("--out", default=str(ROOT / "results"))
    a = p.parse_args()
    torch.set_num_threads(1)
    results = {"command": recorded_command(), "threads": 1, "target": a.target, "scenarios": {}}
    for name in a.scenarios:
        env = DistillCompressEnv(scenarios=[name], targets=[a.target])
        env.reset(seed=0)  # warm-up: teacher, float student, probe cached
        step_s, train_s, reset_s = [], [], []
        for ep in range(a.episodes):
            t = time.perf_counter()
            env.reset(seed=ep + 1)
            reset_s.append(time.perf_counter() - t)
            done = False
            while not done:
                t = time.perf_counter()
                _, _, term, trunc, _ = env.step(np.zeros(5, np.float32))
                step_s.append(time.perf_counter() - t)
                m = env.last_metrics
                train_s.append(m.seconds - m.seconds_outside_training)
                done = term or trunc
        outside = [(s - tr) / s for s, tr in zip(step_s, train_s)]
        r = {"steps_per_second": 1.0 / statistics.fmean(step_s), "step_seconds_median": statistics.median(step_s),
             "outside_training_share_mean": statistics.fmean(outside), "outside_training_share_max": max(outside),
             "reset_seconds_median": statistics.median(reset_s), "steps": len(step_s),
             "probe_cached_between_resets": True}
        r["batched"] = batched_throughput(env, a.batched_k, a.batched_repeats)
        results["scenarios"][name] = r
        print(f"{name}: {r['steps_per_second']:.2f} steps/s, outside training {100 * r['outside_training_share_mean']:.1f} % "
              f"(max {100 * r['outside_training_share_max']:.1f} %), reset {r['reset_seconds_median']:.3f} s; "
              f"batched K={a.batched_k}: {r['batched']['student_stages_per_second']:.2f} student-stages/s, "
              f"{r['batched']['speedup_vs_single']:.2f}x the one-at-a-time path", flush=True)

    from stable_baselines3 import PPO

    env = StepTimer(DistillCompressEnv(scenarios=[a.ppo_scenario], targets=[a.target]))
    env.reset(seed=0)
    env.env_seconds = 0.0
    model = PPO("MlpPolicy", env, n_steps=128, batch_size=64, n_epochs=10, gamma=1.0, ent_coef=0.01,
                policy_kwargs={"net_arch": [64, 64]}, seed=0, verbose=0)
    t = time.perf_counter()
    model.learn(a.ppo_steps)
    wall = time.perf_counter() - t
    results["ppo"] = {"scenario": a.ppo_scenario, "steps": a.ppo_steps, "wall_seconds": wall,
                      "env_seconds": env.env_seconds, "ppo_share_of_wall": 1 - env.env_seconds / wall,
                      "steps_per_second": a.ppo_steps / wall}
    print(f"PPO on {a.ppo_scenario}: {a.ppo_steps / wall:.2f} steps/s, PPO's own share of wall time "
          f"{100 * results['ppo']['ppo_share_of_wall']:.1f} %")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "env_throughput.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
