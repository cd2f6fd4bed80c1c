"""Learning benchmark for v1 agents (issue 12): several PPO training seeds of one config, each
through its gate, each replayed on the held-out generated tasks against the zero-search rules.

    python experiments/learning_v1.py --agents agents/ppo-v1s-seed0 agents/ppo-v1s-seed1 agents/ppo-v1s-seed2 \\
        --baseline-from experiments/results/anytime-v1 --out experiments/results/learning-v1

Per agent (one PPO training seed; a shipped agent's folder, or a training run's folder, whose
``agent/`` and ``gate.json`` are read, for a seed that did not pass its gate and so was not shipped):

- ``gate``: its ``gate.json`` as training wrote it (``rltune train`` plays the first ``gate_tasks``
  held-out generated tasks, one episode each, val split, against the env's zero action; ``passed``
  when the mean difference is above 0);
- ``held_out``: ``experiments/anytime.py --held-out-tasks N --tuners ppo-replay`` with this agent
  into ``OUT/AGENT/`` (one deterministic episode per evaluation seed, test split), joined with the
  rules' cells of ``--baseline-from`` (the same task files, targets and seeds: not rerun); its
  ``overall`` (cells where replay ≥ every zero-search rule, below the recipe by more than its std)
  and the rules' and the replay's mean test accuracy over the cells;
- ``training_curve``: from its ``training_monitor.csv`` (the training run's episodes, the
  stochastic policy on the training tasks), the episodes cut into ``--curve-blocks`` consecutive
  blocks, each with its episode count, the mean and std of its accuracy reward in points against
  the zero action (``reward_accuracy / reward_scale``; diverged episodes, told by their
  divergence penalty, :func:`rltune.train.read_monitor`, are left out of the mean and counted) and how many episodes diverged: whether the policy's paid signal rose
  as it trained; ``training_by_bits``: the same episodes grouped by the width they played against
  the recipe's (``plan_final_bits − recipe_bits``; the plus-one zero action's is +1), each group's
  count and mean and std of the accuracy reward: what the width decision paid in training.

Writes ``OUT/learning.json`` (``{"command", "agents": [...], "n_seeds", "all_through_gate",
"replay_mean_over_seeds", "replay_std_over_seeds", "rule_means"}``; ``rule_means``: the
zero-search rules' means over the same cells) and ``OUT/learning.md``. Rerunning resumes (the anytime folders do).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = ("recipe", "recipe-plus1", "sensitivity")  # the zero-search rules (one episode, no agent)


def _anytime():
    spec = importlib.util.spec_from_file_location("anytime_script", HERE / "anytime.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _means(rows: list[dict]) -> dict[str, float]:
    """The one-episode tuners' (the rules' and the replay's) mean over the cells of their per-cell
    mean test accuracy, in %."""
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["tuner"] in (*RULES, "ppo-replay") and r["episodes"] == 1 and r.get("test_acc_mean") is not None:
            out.setdefault(r["tuner"], []).append(r["test_acc_mean"])
    return {t: round(100 * statistics.fmean(v), 2) for t, v in out.items()}


def _stats(vals: list[float]) -> dict:
    return {"reward_pt_mean": round(statistics.fmean(vals), 3) if vals else None,
            "reward_pt_std": round(statistics.stdev(vals), 3) if len(vals) > 1 else None}


def _monitor_rows(monitor: Path, reward_scale: float, divergence_penalty: float) -> list[dict] | None:
    """The training monitor's episodes (:func:`rltune.train.read_monitor`), read once; None without one."""
    from rltune.train import read_monitor

    if not monitor.exists():
        return None
    return read_monitor(monitor, reward_scale, divergence_penalty) or None


def training_curve(rows: list[dict] | None, blocks: int = 4) -> list[dict] | None:
    """The training episodes (``_monitor_rows``) in ``blocks`` consecutive blocks: ``episodes``,
    ``reward_pt_mean``, ``reward_pt_std`` (accuracy reward over ``reward_scale``, in points) and
    ``diverged``; None without a monitor."""
    if rows is None:
        return None
    out = []
    for b in range(blocks):
        part = rows[b * len(rows) // blocks:(b + 1) * len(rows) // blocks]
        vals = [r["reward_pt"] for r in part if r["reward_pt"] is not None]
        out.append({"episodes": len(part), "diverged": len(part) - len(vals), **_stats(vals)})
    return out


def training_by_bits(rows: list[dict] | None) -> dict[str, dict] | None:
    """The training episodes grouped by ``plan_final_bits − recipe_bits`` (keys "-1", "+0", "+1", ...):
    ``episodes`` and the accuracy reward's mean and std (diverged episodes left out); None without
    a monitor or those columns."""
    if rows is None:
        return None
    groups: dict[int, list[float]] = {}
    for r in rows:
        v = r["reward_pt"]
        try:
            off = int(round(float(r["plan_final_bits"]) - float(r["recipe_bits"])))
        except (KeyError, TypeError, ValueError):
            continue
        if v is not None:
            groups.setdefault(off, []).append(v)
    return {f"{k:+d}": {"episodes": len(v), **_stats(v)} for k, v in sorted(groups.items())} or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", nargs="+", required=True, help="agent folders, one per training seed")
    p.add_argument("--baseline-from", default="experiments/results/anytime-v1",
                   help="anytime folder holding the zero-search rules' cells on the held-out tasks")
    p.add_argument("--held-out-tasks", type=int, default=24)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--max-episodes", type=int, default=32, help="as in the baseline folder (it keys its cells)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="experiments/results/learning-v1")
    p.add_argument("--curve-blocks", type=int, default=4, help="blocks of training episodes in training_curve")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.curve_blocks < 1:
        p.error("--curve-blocks must be >= 1")

    from rltune.shipped import recorded_command

    out = Path(a.out)
    anytime = _anytime()
    agents = []
    for path in a.agents:
        folder = Path(path)
        name = folder.name
        if not (folder / "agent.json").exists() and (folder / "agent" / "agent.json").exists():
            folder = folder / "agent"  # a training run's folder: its agent/ and its gate.json
        try:
            meta = json.loads((folder / "agent.json").read_text())
            gate_file = folder / "gate.json" if (folder / "gate.json").exists() else folder.parent / "gate.json"
            gate = json.loads(gate_file.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: no agent.json and gate.json this project wrote ({e})")
        dest = out / name
        argv_any = ["--held-out-tasks", str(a.held_out_tasks), "--tuners", "ppo-replay", "--seeds", str(a.seeds),
                    "--max-episodes", str(a.max_episodes), "--workers", str(a.workers), "--agent", str(folder),
                    "--baseline-from", a.baseline_from, "--out", str(dest)] + (["--no-progress"] if a.no_progress else [])
        if anytime.main(argv_any) != 0:
            raise SystemExit(f"{folder}: the anytime run failed")
        summary = json.loads((dest / "summary.json").read_text())
        training = meta.get("training") or {}
        run_root = folder.parent if folder.name == "agent" else folder
        scale = float((training.get("env") or {}).get("reward_scale", 20.0))
        penalty = float((training.get("env") or {}).get("divergence_penalty", 1.0))
        episodes = _monitor_rows(run_root / "training_monitor.csv", scale, penalty)
        agents.append({
            "agent": str(folder), "training_seed": training.get("seed"), "steps": training.get("steps_done"),
            "env": training.get("env"), "tasks": training.get("tasks"),
            "gate": {k: gate.get(k) for k in ("mean_diff", "std_diff", "passed", "tasks", "episodes")},
            "gate_bits_differ": sum(r["policy_bits"] != r["zero_action_bits"] for r in gate.get("rows", [])),
            "training_curve": training_curve(episodes, a.curve_blocks),
            "training_by_bits": training_by_bits(episodes),
            "held_out": {"folder": str(dest), "overall": summary["overall"], "tuner_means": _means(summary["rows"])},
        })
    replay = [x["held_out"]["tuner_means"].get("ppo-replay") for x in agents]
    result = {"command": recorded_command(), "n_seeds": len(agents), "agents": agents,
              "all_through_gate": all(x["gate"]["passed"] for x in agents),
              "replay_mean_over_seeds": round(statistics.fmean(replay), 2) if None not in replay else None,
              "replay_std_over_seeds": round(statistics.stdev(replay), 2) if None not in replay and len(replay) > 1 else None,
              "rule_means": {t: m for t, m in agents[0]["held_out"]["tuner_means"].items() if t in RULES}}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "learning.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out / "learning.json")
    lines = [f"# Learning benchmark, v1: {len(agents)} training seeds", "", f"`{result['command']}`", "",
             "| agent | training seed | steps | gate: val vs zero action (pt) | passed | held-out replay test % | "
             "replay ≥ every rule | below recipe by > std |", "|---|---|---|---|---|---|---|---|"]
    for x in agents:
        g, o = x["gate"], x["held_out"]["overall"]
        lines.append(f"| {x['agent']} | {x['training_seed']} | {x['steps']} | {100 * g['mean_diff']:+.2f} ± "
                     f"{100 * g['std_diff']:.2f} | {g['passed']} | {x['held_out']['tuner_means'].get('ppo-replay')} | "
                     f"{o.get('replay_ge_every_zero_search')}/{o.get('replay_cells')} | "
                     f"{o.get('replay_below_recipe_by_more_than_its_std')} |")
    lines += ["", "Training curve: accuracy reward against the zero action (pt, mean over the block's episodes, "
              "stochastic policy on training tasks), in consecutive blocks of the training episodes", ""]
    for x in agents:
        c = x["training_curve"]
        lines.append(f"- {x['agent']}: " + ("no training_monitor.csv" if c is None else " → ".join(
            f"{b['reward_pt_mean']:+.2f} ({b['episodes']} ep)" if b["reward_pt_mean"] is not None else f"– ({b['episodes']} ep)"
            for b in c)))
    lines += ["", "Training episodes by the width played against the recipe's (plan_final_bits − recipe_bits; "
              "the zero action's is +1): episodes, accuracy reward against the zero action (pt)", ""]
    for x in agents:
        g = x["training_by_bits"]
        lines.append(f"- {x['agent']}: " + ("–" if g is None else ", ".join(
            f"{k}: {v['episodes']} ep {v['reward_pt_mean']:+.2f}" for k, v in g.items())))
    lines += ["", "Rules on the same cells (test %, mean over cells of the 5-seed means): "
              + ", ".join(f"{t} {m}" for t, m in result["rule_means"].items()), ""]
    (out / "learning.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from rltune.errors import RltuneError

    try:
        sys.exit(main())
    except RltuneError as e:
        print(f"learning_v1: error: {e}", file=sys.stderr)
        sys.exit(2)
