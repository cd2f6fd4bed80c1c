"""Rollout throughput on Ray (issue 12): env steps/s of the same vectorised env in one process
(``BatchedVecEnv``) and over Ray actors (``RayVecEnv``) with 1 and 2 workers.

Every backend steps the same ``--n-envs`` environments (each over all of ``--scenarios``, an
episode drawing one; target ``--target``) with random actions for ``--rollouts`` whole episodes each,
after one untimed episode (teachers, float students and probes are built then and cached). A step
is one real stage of training. Run it alone on the machine: parallel jobs distort it.

    python experiments/ray_throughput.py --scenarios synthetic-6class digits-mlp --n-envs 8 --rollouts 2

Writes experiments/results/ray_throughput.json: rows of ``backend``, ``workers``, ``n_envs``,
``steps``, ``seconds``, ``steps_per_s``, and the speed-up of 2 Ray workers over 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def make_fns(scenarios: list[str], target: str, n_envs: int):
    """``n_envs`` envs over the same scenarios (a batched group shares its caches), each episode
    drawing one of them."""
    from rltune.env import DistillCompressEnv

    return [lambda: DistillCompressEnv(scenarios=list(scenarios), targets=[target]) for _ in range(n_envs)]


def time_rollouts(venv, rollouts: int, seed: int = 0) -> tuple[int, float]:
    """Steps and seconds of ``rollouts`` episodes per env (random actions), after one untimed one."""
    rng = np.random.default_rng(seed)
    n = venv.num_envs
    venv.seed(seed)
    venv.reset()

    def episodes(k: int) -> int:
        steps, done_eps = 0, np.zeros(n, int)
        while (done_eps < k).any():
            acts = rng.uniform(-1, 1, (n, *venv.action_space.shape)).astype(np.float32)
            _, _, dones, _ = venv.step(acts)
            steps += n
            done_eps += dones.astype(int)
        return steps

    episodes(1)   # warm-up: builds and caches teachers, float students, probes
    t0 = time.perf_counter()
    steps = episodes(rollouts)
    return steps, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", nargs="+", default=["synthetic-6class", "digits-mlp"])
    ap.add_argument("--target", default="16x")
    ap.add_argument("--n-envs", type=int, default=8)
    ap.add_argument("--rollouts", type=int, default=2, help="timed episodes per env")
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="Ray worker counts to time")
    ap.add_argument("--out", default="experiments/results/ray_throughput.json")
    a = ap.parse_args(argv)
    if a.n_envs < 1 or a.rollouts < 1 or any(w < 1 for w in a.workers):
        print("ray_throughput.py: --n-envs, --rollouts and --workers take whole numbers >= 1", file=sys.stderr)
        return 2
    import torch

    from rltune.errors import RltuneError, write_atomic
    from rltune.shipped import recorded_command
    from rltune.vecenv import BatchedVecEnv

    torch.set_num_threads(1)
    rows: list[dict] = []

    def write() -> None:   # after every backend: what was measured is kept if a later one fails
        by = {(r["backend"], r["workers"]): r["steps_per_s"] for r in rows}
        doc = {"command": recorded_command(), "scenarios": a.scenarios, "target": a.target, "n_envs": a.n_envs,
               "rollouts": a.rollouts, "cpus": os.cpu_count(), "rows": rows,
               "ray_2_over_1": by[("ray", 2)] / by[("ray", 1)] if ("ray", 1) in by and ("ray", 2) in by else None}
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, (json.dumps(doc, indent=1) + "\n").encode())

    def measure(backend: str, build) -> bool:
        try:
            venv = build()
        except RltuneError as e:
            print(f"ray_throughput.py: {e}", file=sys.stderr)
            return False
        try:
            got = len(getattr(venv, "workers", [None]))
            steps, secs = time_rollouts(venv, a.rollouts)
        finally:
            venv.close()
        rows.append({"backend": backend, "workers": got, "n_envs": a.n_envs, "steps": steps, "seconds": secs,
                     "steps_per_s": steps / secs})
        print(f"{backend}, {got} worker(s): {steps / secs:.2f} steps/s ({steps} steps, {secs:.1f} s)", flush=True)
        write()
        return True

    if not measure("batched", lambda: BatchedVecEnv(make_fns(a.scenarios, a.target, a.n_envs))):
        return 2
    from rltune.rayvec import RayVecEnv

    for w in a.workers:
        if not measure("ray", lambda: RayVecEnv(make_fns(a.scenarios, a.target, a.n_envs), n_workers=w)):
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
