"""Generated tasks (issue 12): how many distinct ones a spec makes, and what one episode of each costs.

    python experiments/task_episodes.py --sample 12 --out experiments/results/task_episodes.json

Generates the tasks of ``--spec`` (a JSON TaskSpec, default ``TaskSpec()``), counts them (distinct
tasks, training / held-out, per family, per budget kind), then for ``--sample`` of them spread over
the families and student architectures times, on one thread: the teacher and float student (trained once and
cached, or read from the cache), the bit-width probe (the env's reset), and one recipe episode (the
zero action at every stage), the figure the issue bounds at ~10 s. Writes a JSON with the counts,
one row per sampled task (``family``, ``target``, ``student``, ``params``, ``episode_s``,
``reset_s``, ``setup_s``, ``val_acc``, ``float_val_acc``) and per family the median and largest
episode seconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="{}", help="a TaskSpec as JSON (default: the defaults)")
    p.add_argument("--sample", type=int, default=12, help="tasks to time (spread over the list)")
    p.add_argument("--out", default="experiments/results/task_episodes.json")
    a = p.parse_args(argv)

    from rltune.env import DistillCompressEnv
    from rltune.errors import RltuneError
    from rltune.models import count_params
    from rltune.shipped import recorded_command
    from rltune.tasks import TaskSpec, generate_tasks

    try:
        spec = TaskSpec.from_dict(json.loads(a.spec))
    except (ValueError, RltuneError) as e:
        print(f"task_episodes: --spec: {e}", file=sys.stderr)
        return 2
    if a.sample < 0:
        print("task_episodes: --sample must be >= 0", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    tasks = generate_tasks(spec)
    counts = {
        "tasks": len(tasks), "distinct": len({t.key for t in tasks}),
        "training_tasks": sum(not t.held_out for t in tasks), "held_out_tasks": sum(t.held_out for t in tasks),
        "datasets": len({json.dumps([t.scenario["dataset"], t.scenario["teacher"]], sort_keys=True) for t in tasks}),
        "by_family": dict(collections.Counter(t.family for t in tasks)),
        "by_budget": dict(collections.Counter({"x": "ratio", "B": "bytes", "J": "energy"}[t.target[-1]] for t in tasks)),
        "by_student": dict(collections.Counter(t.scenario["student"]["arch"] for t in tasks)),
    }
    print(json.dumps(counts))
    # spread the sample over the families and student kinds: evenly spaced tasks of each
    # (family, student architecture) group, round-robin
    groups: dict[tuple, list] = collections.defaultdict(list)
    for t in tasks:
        groups[(t.family, t.scenario["student"]["arch"])].append(t)
    per = -(-a.sample // max(1, len(groups)))
    picks = {g: [ts[j] for j in sorted(set(np.linspace(0, len(ts) - 1, min(per, len(ts))).round().astype(int)))]
             for g, ts in sorted(groups.items())}
    sample = [t for k in range(per) for g in picks if k < len(picks[g]) for t in [picks[g][k]]][: a.sample]
    rows = []
    for t in sample:
        t0 = time.perf_counter()
        env = DistillCompressEnv(scenarios=[t.load()], targets=[t.target])
        env.reset(seed=0, options={"scenario": 0, "target": t.target, "float_seed": 0})  # trains or loads
        t2 = time.perf_counter()
        env.reset(seed=0, options={"scenario": 0, "target": t.target, "float_seed": 0})  # cached: the probe only
        t3 = time.perf_counter()
        done, info = False, {}
        zero = np.zeros(env.action_space.shape, np.float32)
        while not done:
            _, _, term, trunc, info = env.step(zero)
            done = term or trunc
        t4 = time.perf_counter()
        row = {"name": t.name, "family": t.family, "target": t.target, "student": t.scenario["student"],
               "params": count_params(env.ctx.new_student(0)), "setup_s": round(t2 - t0, 3),
               "reset_s": round(t3 - t2, 3), "episode_s": round(t4 - t3, 3),
               "stages": t.scenario["training"]["stages"], "val_acc": info.get("val_acc"),
               "float_val_acc": env.state.ref.val_acc if env.state is not None else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    fam_secs: dict[str, list[float]] = collections.defaultdict(list)
    for r in rows:
        fam_secs[r["family"]].append(r["episode_s"])
    out = {"command": recorded_command(), "spec": spec.to_dict(), "counts": counts, "rows": rows,
           "episode_s_by_family": {f: {"median": statistics.median(v), "max": max(v), "n": len(v)}
                                   for f, v in sorted(fam_secs.items())},
           "episode_s_max": max((r["episode_s"] for r in rows), default=None),
           "threads": 1}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
