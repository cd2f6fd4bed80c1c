"""Anytime curves: every tuner's test accuracy against the episodes it was allowed, N = 1, 2, 4 ... 32.

    python experiments/anytime.py --seeds 5 --batch 16 --workers 2 --max-episodes-for mnist1d-lenet=8
    python experiments/anytime.py --scenario-targets wine-mlp=16x,24x --seeds 1 --max-episodes 4 --out /tmp/anytime

Each searching tuner (``random``, ``optuna-tpe``, ``ppo-best-of-n``, ``ppo-warm-tpe``) runs once per
scenario × target × seed at the largest budget, ``--max-episodes`` episodes, through the harness
(:func:`rltune.harness.evaluate`, cells appended to ``OUT/cells/results.jsonl``: rerunning the
command resumes); every smaller N is read off the run's per-trial record of new bests (the best by
val of its first N episodes, reported on test), nothing is paid for again. ``--batch K`` trains K
trials at a time. The one-episode tuners (``recipe``, ``recipe-plus1``, ``sensitivity``,
``ppo-replay``) have one value, at N = 1 (plotted as a flat line). ``--finetune`` adds
``ppo-finetune``, run at every N on its own (its PPO rollouts and its final replay depend on the
budget, so a prefix of a longer run is not what it does with N).

A run of some scenarios keeps the others in the summary: ``scenario_targets`` is the union over
this folder's runs (this run's targets win), ``commands`` every command that filled it. ``--rerun
NAME=TUNER,...`` drops those tuners' finished cells of NAME at the targets given and runs them again
(after a change to the tuner's code; the command records it). ``--baseline-from DIR`` compares a new
agent with another folder's rules and searchers without rerunning them: that folder's finished
cells of every tuner that needs no agent join the summary (``baseline_from``: the folder, the
tuners and its commands), and its held-out task files are used so the scenario names match.

Writes ``OUT/summary.json``: ``{"command", "commands", "scenario_targets", "max_episodes", "rows", "answers",
"notes"}``; a row per scenario × target × tuner × N with ``scenario``, ``target``, ``tuner``,
``episodes`` (N), ``budget_stages`` (N · stages per episode + the bit-width probe's training in
stage-equivalents, which every tuner of a cell pays once), ``n_seeds``, ``test_acc_mean``,
``test_acc_std``, ``in_agent_training_set`` and, besides, ``episode_stages``, ``probe_stages``,
``val_acc_mean``, ``val_acc_std``, ``source``. ``answers``, per scenario × target: the smallest N
at which optuna-tpe's mean first beats the best zero-search rule's mean (or null), and whether the
better of ppo-best-of-n / ppo-warm-tpe is at least optuna-tpe's mean at every N (the Ns where not).
A plot per scenario, ``OUT/anytime_SCENARIO.png``: test accuracy against episodes (log2), a line
per tuner (mean) with a ± std band, a panel per target.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from rltune.errors import RltuneError

DEFAULT_TARGETS = {  # the held-out scenarios, at two targets each where compression costs accuracy
    "synthetic-10class": ["24x", "32x"],
    "synthetic-8class": ["24x", "32x"],
    "mnist1d-cnn": ["8x", "16x"],
    "mnist1d-lenet": ["20x", "40x"],
    "wine-mlp": ["16x", "24x"],
    "breast-cancer-mlp": ["24x", "32x"],
    "mnist-cnn2d": ["24x", "32x"],
}
TUNERS = ["recipe", "recipe-plus1", "sensitivity", "owl", "ppo-replay", "ppo-best-of-n", "ppo-warm-tpe", "random",
          "optuna-tpe"]
ZERO_SEARCH = ("recipe", "recipe-plus1", "sensitivity", "sensitivity-pick", "owl")
POLICY_SEARCH = ("ppo-best-of-n", "ppo-warm-tpe")
PER_BUDGET = ("ppo-finetune",)  # run at each N on its own


def _pairs(items: list[str], what: str, value) -> dict[str, Any]:
    out = {}
    for item in items:
        name, sep, v = item.partition("=")
        if not sep or not name or not v:
            raise RltuneError(f"{what}: expected NAME=VALUE, got {item!r}")
        out[name] = value(v)
    return out


def _targets(text: str) -> list[str]:
    from rltune.budget import Budget

    ts = text.split(",")
    for t in ts:
        Budget.parse(t)  # a malformed target fails here, before any training
    return ts


def _ms(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def build_rows(results: list[dict[str, Any]], scenario_targets: dict[str, list[str]], tuners: list[str],
               stages: dict[str, int], max_episodes: dict[str, int], seeds: int) -> list[dict[str, Any]]:
    """The summary's rows from the harness's cells (one-episode tuners: their one value at N = 1;
    searchers: their per-trial record; per-budget tuners: their own run at each N)."""
    from rltune.harness import ONE_EPISODE
    from rltune.tuners import anytime_points

    rows = []
    for scenario, targets in scenario_targets.items():
        S, M = stages[scenario], max_episodes[scenario]
        for target in targets:
            for tuner in tuners:
                cells = [r for r in results if r["scenario"] == scenario and r["target"] == target
                         and r["tuner"] == tuner and "part" not in r and r["seed"] < seeds]
                points: list[tuple[int, list[dict], str]] = []
                if tuner in ONE_EPISODE:
                    got = [r for r in cells if r["budget_stages"] == M * S]
                    points.append((1, [{"test_acc": r["test"]["test_acc"], "val_acc": r["val_acc"], "row": r}
                                       for r in got], "one episode"))
                elif tuner in PER_BUDGET:
                    for n in anytime_points(M):
                        got = [r for r in cells if r["budget_stages"] == n * S]
                        points.append((n, [{"test_acc": r["test"]["test_acc"], "val_acc": r["val_acc"], "row": r}
                                           for r in got], "its own run at this budget"))
                else:
                    got = [r for r in cells if r["budget_stages"] == M * S]
                    for n in anytime_points(M):
                        vals = []
                        for r in got:
                            a = next((a for a in r.get("anytime", []) if a["episodes"] == n), None)
                            if a is not None:
                                vals.append({"test_acc": a["test_acc"], "val_acc": a["val_acc"], "row": r})
                        points.append((n, vals, f"best by val of the first N of one {M}-episode run"))
                for n, vals, source in points:
                    if not vals:
                        continue
                    probe = statistics.fmean(v["row"].get("probe_stages", 0.0) for v in vals)
                    acc_m, acc_s = _ms([v["test_acc"] for v in vals])
                    val_m, val_s = _ms([v["val_acc"] for v in vals])
                    rows.append({
                        "scenario": scenario, "target": target, "tuner": tuner, "episodes": n,
                        "budget_stages": round(n * S + probe, 3), "n_seeds": len(vals),
                        "test_acc_mean": acc_m, "test_acc_std": acc_s,
                        "in_agent_training_set": any(v["row"].get("in_agent_training_set") for v in vals),
                        "episode_stages": n * S, "probe_stages": round(probe, 3),
                        "val_acc_mean": val_m, "val_acc_std": val_s, "source": source,
                    })
    return rows


def answers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario × target: when optuna-tpe first beats the best zero-search rule, and whether the
    policy's searchers keep up with it at every N."""
    out = []
    for scenario, target in sorted({(r["scenario"], r["target"]) for r in rows}):
        rs = [r for r in rows if r["scenario"] == scenario and r["target"] == target]
        mean = {(r["tuner"], r["episodes"]): r["test_acc_mean"] for r in rs}
        zero = {t: mean[(t, 1)] for t in ZERO_SEARCH if (t, 1) in mean and math.isfinite(mean[(t, 1)])}
        tpe = sorted((n, m) for (t, n), m in mean.items() if t == "optuna-tpe")
        best_zero = max(zero, key=zero.get) if zero else None
        first = next((n for n, m in tpe if best_zero is not None and m > zero[best_zero]), None)
        below, compared = [], []
        for n, m in tpe:
            pol = [mean[(t, n)] for t in (*POLICY_SEARCH, *PER_BUDGET) if (t, n) in mean]
            if pol:
                compared.append(n)
                if max(pol) < m:
                    below.append(n)
        out.append({
            "scenario": scenario, "target": target,
            "best_zero_search_rule": best_zero, "best_zero_search_acc": zero.get(best_zero) if best_zero else None,
            "tpe_first_beats_zero_search_at": first,
            "policy_search_ge_tpe_at_every_n": (not below) if compared else None,
            "policy_search_below_tpe_at": below, "compared_at": compared,
        })
        std = {(r["tuner"], r["episodes"]): r.get("test_acc_std", 0.0) for r in rs}
        replay = mean.get(("ppo-replay", 1))
        if replay is not None and math.isfinite(replay):  # the one-episode policy against the rules and TPE
            rec = mean.get(("recipe", 1))
            tpe_max = tpe[-1] if tpe else None
            out[-1].update({
                "replay_acc": replay, "replay_ge_every_zero_search": bool(zero) and replay >= max(zero.values()),
                "replay_minus_best_zero_search": replay - max(zero.values()) if zero else None,
                "replay_below_recipe_by_more_than_its_std": (rec is not None and rec - replay > std[("recipe", 1)]),
                "moonshot_tpe_episodes": tpe_max[0] if tpe_max else None,
                "replay_ge_tpe_at_max_n": (replay >= tpe_max[1]) if tpe_max else None,
            })
    return out


def overall(answers_: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets counted over the cells that have them."""
    with_replay = [a for a in answers_ if "replay_acc" in a]
    with_pol = [a for a in answers_ if a["policy_search_ge_tpe_at_every_n"] is not None]
    diffs = [a["replay_minus_best_zero_search"] for a in with_replay if a["replay_minus_best_zero_search"] is not None]
    return {
        "cells": len(answers_),
        "replay_ge_every_zero_search": sum(a["replay_ge_every_zero_search"] for a in with_replay),
        "replay_below_recipe_by_more_than_its_std": sum(a["replay_below_recipe_by_more_than_its_std"] for a in with_replay),
        "replay_minus_best_zero_search_mean": statistics.fmean(diffs) if diffs else None,
        "replay_cells": len(with_replay),
        "policy_search_ge_tpe_at_every_n": sum(a["policy_search_ge_tpe_at_every_n"] for a in with_pol),
        "policy_search_cells": len(with_pol),
        "replay_ge_tpe_at_max_n": sum(bool(a.get("replay_ge_tpe_at_max_n")) for a in with_replay),
    }


def plot(rows: list[dict[str, Any]], out: Path, max_episodes: dict[str, int]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for scenario in sorted({r["scenario"] for r in rows}):
        rs = [r for r in rows if r["scenario"] == scenario]
        targets = sorted({r["target"] for r in rs}, key=lambda t: (len(t), t))
        M = max_episodes.get(scenario, max(r["episodes"] for r in rs))
        fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4), squeeze=False)
        for ax, target in zip(axes[0], targets):
            for i, tuner in enumerate(sorted({r["tuner"] for r in rs if r["target"] == target})):
                pts = sorted((r["episodes"], 100 * r["test_acc_mean"], 100 * r["test_acc_std"])
                             for r in rs if r["target"] == target and r["tuner"] == tuner)
                flat = len(pts) == 1 and pts[0][0] == 1 and M > 1  # a one-episode tuner: a flat line
                if flat:
                    pts = [(1, pts[0][1], pts[0][2]), (M, pts[0][1], pts[0][2])]
                x = [p[0] for p in pts]
                m = [p[1] for p in pts]
                s = [p[2] for p in pts]
                color = f"C{i % 10}"
                ax.plot(x, m, ls="--" if flat else "-", marker=None if flat else "o", ms=3, color=color,
                        label=tuner + (" (1 episode)" if flat else ""))
                ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color,
                                alpha=0.12, lw=0)
            ax.set_xscale("log", base=2)
            ns = sorted({r["episodes"] for r in rs} | {M})
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.minorticks_off()
            ax.set_xlabel("episodes (N)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{Path(scenario).stem} @ {target}")
            ax.legend(fontsize=6)
        fig.tight_layout()
        f = out / f"anytime_{Path(scenario).stem}.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    return files


def held_out_tasks(n: int, seed: int, n_tasks: int, folder: Path, trained_on: bool = False) -> dict[str, list[str]]:
    """The first ``n`` held-out tasks of a generated spec as scenario files in ``folder`` (written
    once; the same spec always gives the same tasks), each at its own target. ``trained_on``: the
    first ``n`` tasks agents train on instead, the families in turn (:func:`rltune.tasks.trained_on`)."""
    import yaml

    from rltune.tasks import TaskSpec, generate_tasks
    from rltune.tasks import trained_on as pick

    spec = TaskSpec(seed=seed, n_tasks=n_tasks)
    tasks = pick(spec, n) if trained_on else [t for t in generate_tasks(spec) if t.held_out][:n]
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for t in tasks:
        f = folder / f"{t.name}.yaml"
        text = yaml.safe_dump(t.load().to_dict(), sort_keys=False)
        if not f.exists() or f.read_text() != text:
            f.write_text(text)
        out[str(f)] = [t.target]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario-targets", nargs="+", metavar="NAME=T1,T2",
                   help="scenarios and their targets (default: the held-out scenarios, two targets each)")
    p.add_argument("--tuners", nargs="+", default=TUNERS, help="tuners (default: %(default)s)")
    p.add_argument("--finetune", action="store_true", help="also ppo-finetune, run at every N on its own")
    p.add_argument("--seeds", type=int, default=5, help="seeds per cell (0..N-1)")
    p.add_argument("--max-episodes", type=int, default=32, help="the searchers' one run, in episodes")
    p.add_argument("--max-episodes-for", nargs="+", default=[], metavar="NAME=N",
                   help="a smaller maximum for some scenarios (e.g. mnist1d-lenet=8 when time forces it)")
    p.add_argument("--batch", type=int, default=1, help="searchers train this many trials at a time (batched)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument("--agent", default="agents/ppo-v0", help="agent for the ppo-* tuners")
    p.add_argument("--out", default="experiments/results/anytime", help="results folder (rerunning resumes)")
    p.add_argument("--rerun", nargs="+", default=[], metavar="NAME=T1,T2",
                   help="drop these tuners' finished cells of scenario NAME (at its targets here) and run them "
                        "again, e.g. after the tuner's code changed")
    p.add_argument("--held-out-tasks", type=int, default=0, metavar="N",
                   help="add the first N held-out generated tasks of TaskSpec(seed=--task-seed, n_tasks=--n-tasks) "
                        "(rltune.tasks; never trained on): each task's scenario is written to OUT/tasks/NAME.yaml "
                        "and evaluated at its own target")
    p.add_argument("--train-tasks", type=int, default=0, metavar="N",
                   help="add the first N generated tasks agents train on (not held out) of the same spec, the "
                        "families in turn, written and evaluated as --held-out-tasks's: what a rule does where a "
                        "policy learned")
    p.add_argument("--baseline-from", metavar="DIR",
                   help="another anytime folder whose finished cells of the tuners that need no agent (the rules "
                        "and optuna-*) join this summary for the same scenarios and targets, so a new agent is "
                        "compared with them without rerunning them; its held-out task files (DIR/tasks) are "
                        "used, so the scenario names match")
    p.add_argument("--sampler-seed-offset", type=int, default=0, metavar="K",
                   help="add K to every Optuna sampler's seed (training seeds, splits and float students stay the "
                        "cell's): the same searches drawn afresh, e.g. optuna-tpe against itself (a folder keeps one K)")
    p.add_argument("--task-seed", type=int, default=0)
    p.add_argument("--n-tasks", type=int, default=240)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    import torch

    from rltune.harness import evaluate, read_results
    from rltune.scenario import load_scenario
    from rltune.shipped import recorded_command, resolve_agent, resolve_scenario
    from rltune.tuners import TUNERS as KNOWN, anytime_points

    torch.set_num_threads(1)
    scenario_targets = _pairs(a.scenario_targets, "--scenario-targets", _targets) if a.scenario_targets \
        else ({} if a.held_out_tasks or a.train_tasks else dict(DEFAULT_TARGETS))
    if a.held_out_tasks < 0 or a.train_tasks < 0:
        raise RltuneError("--held-out-tasks and --train-tasks take whole numbers >= 0")
    base_dir = Path(a.baseline_from) if a.baseline_from else None
    if base_dir is not None and not (base_dir / "cells" / "results.jsonl").is_file():
        raise RltuneError(f"--baseline-from {base_dir}: no cells/results.jsonl there")
    if a.held_out_tasks:
        scenario_targets.update(held_out_tasks(a.held_out_tasks, a.task_seed, a.n_tasks,
                                               (base_dir or Path(a.out)) / "tasks"))
    if a.train_tasks:
        scenario_targets.update(held_out_tasks(a.train_tasks, a.task_seed, a.n_tasks,
                                               (base_dir or Path(a.out)) / "tasks", trained_on=True))
    tuners = list(a.tuners) + (["ppo-finetune"] if a.finetune and "ppo-finetune" not in a.tuners else [])
    unknown = [t for t in tuners if t not in KNOWN]
    if unknown:
        raise RltuneError(f"unknown tuners {unknown} (expected of {', '.join(KNOWN)})")
    if a.max_episodes < 1 or a.seeds < 1 or a.batch < 1 or a.workers < 1:
        raise RltuneError("--max-episodes, --seeds, --batch and --workers take whole numbers >= 1")
    from rltune.harness import check_sampler_seed_offset

    try:  # before anything is written (--rerun drops rows below)
        check_sampler_seed_offset(Path(a.out) / "cells", a.sampler_seed_offset, a.seeds)
    except RltuneError as e:
        raise RltuneError(f"--sampler-seed-offset: {e}") from None
    cap = _pairs(a.max_episodes_for, "--max-episodes-for", int)
    rerun = _pairs(a.rerun, "--rerun", lambda v: v.split(","))
    bad = [f"{n}={t}" for n, ts in rerun.items() for t in ts if n not in scenario_targets or t not in tuners]
    if bad:
        raise RltuneError(f"--rerun {' '.join(bad)}: name a scenario of --scenario-targets and a tuner of --tuners")
    max_episodes = {s: min(a.max_episodes, cap.get(s, a.max_episodes)) for s in scenario_targets}
    stages = {s: load_scenario(resolve_scenario(s)).training["stages"] for s in scenario_targets}
    agent = None
    if any(t.startswith("ppo") for t in tuners):
        from rltune.tuners import _load_agent

        agent = str(resolve_agent(a.agent))
        _load_agent(agent)  # its layouts are its env version's (v0 or v1): checked before any training
    out = Path(a.out)
    cells = out / "cells"
    if rerun and (cells / "results.jsonl").exists():
        kept = [r for r in read_results(cells / "results.jsonl")
                if not (r["scenario"] in rerun and r["tuner"] in rerun[r["scenario"]]
                        and r["target"] in scenario_targets[r["scenario"]])]
        tmp = cells / "results.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, cells / "results.jsonl")
    once = [t for t in tuners if t not in PER_BUDGET]
    per_budget = [t for t in tuners if t in PER_BUDGET]
    for scenario, targets in scenario_targets.items():
        S, M = stages[scenario], max_episodes[scenario]
        common = dict(seeds=a.seeds, out_dir=cells, agent=agent, workers=a.workers, batch=a.batch,
                      progress=not a.no_progress, sampler_seed_offset=a.sampler_seed_offset)
        if once:
            evaluate([scenario], {scenario: targets}, once, [M * S], **common)
        if per_budget:
            evaluate([scenario], {scenario: targets}, per_budget, [n * S for n in anytime_points(M)], **common)

    # the summary covers every scenario a run of this folder gave (a run of some scenarios keeps the others)
    commands = [recorded_command()]
    previous = out / "summary.json"
    if previous.exists():
        try:
            old = json.loads(previous.read_text())
            old_targets, old_max = dict(old["scenario_targets"]), dict(old["max_episodes"])
            commands = [c for c in old.get("commands", [old.get("command")]) if c] + commands
            tuners = list(dict.fromkeys([*old.get("tuners", []), *tuners]))
        except (ValueError, KeyError, TypeError) as e:
            raise RltuneError(f"{previous}: not a summary this script wrote ({e}); move it away to start afresh")
        for s_ in old_targets:
            if s_ not in scenario_targets:
                scenario_targets = {s_: old_targets[s_], **scenario_targets}
                max_episodes[s_] = int(old_max[s_])
                stages[s_] = load_scenario(resolve_scenario(s_)).training["stages"]
        scenario_targets = {s_: scenario_targets[s_] for s_ in [*old_targets, *scenario_targets]}
    commands = list(dict.fromkeys(commands))
    results = read_results(cells / "results.jsonl")
    baseline = None
    if base_dir is not None:  # the agent-free tuners' cells of another folder, for the same scenarios and targets
        own = {r["key"] for r in results}  # a cell this folder ran itself wins
        extra = [r for r in read_results(base_dir / "cells" / "results.jsonl")
                 if not r["tuner"].startswith("ppo") and r["key"] not in own
                 and r["target"] in scenario_targets.get(r["scenario"], [])]
        results = results + extra
        added = list(dict.fromkeys(r["tuner"] for r in extra))
        tuners = list(dict.fromkeys([*added, *tuners]))
        try:
            base_commands = json.loads((base_dir / "summary.json").read_text()).get("commands", [])
        except (OSError, ValueError):
            base_commands = []
        baseline = {"folder": str(base_dir), "tuners": added, "commands": base_commands}
    rows = build_rows(results, scenario_targets, tuners, stages, max_episodes, a.seeds)
    notes = [
        "Searchers (random, optuna-tpe, ppo-best-of-n, ppo-warm-tpe) ran once per seed at the largest N; a "
        "smaller N is the best by val of that run's first N episodes (reported on test). For random and "
        "ppo-best-of-n that is what a run given N episodes plays (the same seeds and draws). For optuna-tpe "
        "and ppo-warm-tpe the study's random start is min(8, max(1, N_max // 4)) trials, so below it the "
        "curve is that of a study still sampling at random (one given N would start TPE sooner).",
        "One-episode tuners (recipe, recipe-plus1, sensitivity, ppo-replay): a row at episodes = 1 only; "
        "plotted as a flat line.",
        "ppo-finetune (with --finetune): its own run at every N (its rollouts and last replay depend on the budget).",
        "budget_stages = episodes x stages per episode + probe_stages (the env's bit-width probe, trained "
        "once per cell whatever the tuner, in stage-equivalents of sample-epochs; sensitivity's own "
        "probes are evaluations, no training).",
        "ppo-warm-tpe's first trial is the policy's own per-step episode (ppo-replay's at the same seed), "
        "told to the study with add_trial; the rest is optuna-tpe's search.",
    ]
    capped = {s: m for s, m in max_episodes.items() if m < a.max_episodes}
    if capped:
        notes.append(f"Stopped early (time): {', '.join(f'{s} at N = {m}' for s, m in capped.items())}.")
    if not a.scenario_targets:
        notes.append("Default targets of wine-mlp (16x, 24x) and breast-cancer-mlp (24x, 32x) were chosen from one "
                     "recipe episode each (seed 0: 2.8 and 8.3 pt below the float student on wine, 1.8 and 2.7 pt on "
                     "breast-cancer; their test sets are 36 and 114 samples); 32x is infeasible for wine-mlp.")
    summary = {"command": recorded_command(), "commands": commands, "scenario_targets": scenario_targets, "max_episodes": max_episodes,
               "seeds": a.seeds, "tuners": tuners, "agent": a.agent if agent else None, "rows": rows,
               "answers": answers(rows), "notes": notes}
    if a.sampler_seed_offset:
        summary["sampler_seed_offset"] = a.sampler_seed_offset
        notes.append(f"Every Optuna sampler's seed is the cell's seed + {a.sampler_seed_offset} (training seeds, splits "
                     "and float students are the cell's): the same searches drawn afresh.")
    if baseline is not None:
        summary["baseline_from"] = baseline
        notes.append(f"The cells of {', '.join(baseline['tuners'])} are those of {baseline['folder']} (same scenarios, "
                     "targets and seeds; their commands in baseline_from.commands), not rerun here.")
    summary["overall"] = overall(summary["answers"])
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out / "summary.json")
    plot(rows, out, max_episodes)
    for ans in summary["answers"]:
        print(f"{ans['scenario']} @ {ans['target']}: optuna-tpe first beats {ans['best_zero_search_rule']} at "
              f"N = {ans['tpe_first_beats_zero_search_at']}; policy search >= optuna-tpe at every N: "
              f"{ans['policy_search_ge_tpe_at_every_n']} (below at {ans['policy_search_below_tpe_at']})")
    print(f"overall: {json.dumps(summary['overall'])}")
    print(f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RltuneError as e:  # a user error: one line, no traceback
        print(f"anytime: error: {e}", file=sys.stderr)
        sys.exit(2)
