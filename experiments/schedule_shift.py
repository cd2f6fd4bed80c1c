"""Does the schedule correction Optuna's best configurations share pay on tasks it was not read from?

    python experiments/schedule_shift.py --shift-from experiments/results/anytime-v1 \\
        --entries temperature alpha --train-tasks 40 --seeds 5 --workers 2 \\
        --out experiments/results/schedule_shift/train40.json

Issue 12 asks which decision the policy fails to learn. Its ablation (``ablate_policy.py``) says
its schedule entries (ramp, τ, α, when the bits drop) never leave their deadzones on held-out
tasks; the best configurations TPE finds there lean one way (lower τ and α than the recipe's τ 4,
α 0.9). Is that lean a decision that pays, and could the policy have learned it from its training
tasks?

``--shift-from DIR[:TUNER]`` reads the shift: the mean over cells and seeds of TUNER's
(``optuna-tpe``) best configuration at its largest budget (``config.action``, v0's five action
entries, in ``DIR/cells/results.jsonl``), with the sd of its per-cell means and t (their mean /
(sd / sqrt(cells)); ``None`` when they do not spread): a cell's seeds are not independent draws.
``--entries`` keeps those entries and zeroes the rest; ``--shift NAME=VALUE`` gives entries
outright (after ``--shift-from``'s, over them).

Per cell (scenario × target) and seed, two one-episode plays in the v1 env with ``--zero-rule``
(default ``sensitivity``: the allocator, the zero action ``ppo-v1s-*`` is paid against), no
deadzones, the same reset seed and float student as the harness's: ``zero`` (the zero action, the
``sensitivity`` tuner's episode) and ``shifted`` (the zero action with the shift's entries).
Cells: ``--cells-from`` (an anytime folder's ``summary.json``), ``--cells SCENARIO=TARGET``, or
``--train-tasks N``: N tasks the agents trained on (not ``held_out``) of ``TaskSpec(seed=--task-seed,
n_tasks=--n-tasks)``, taken family by family in turn, each at its own target.

Writes ``--out`` (JSON): the command, the shift played and ``shift_from`` (what it was read from),
``zero_test_pct`` and ``shifted_test_pct`` (mean test %), ``diff_test_pt`` and ``diff_val_pt``
(shifted − zero: the mean over cells of the per-cell mean paired difference) with ``_sd_pt`` (over
cells) and ``_se_pt`` (its standard error), ``cells_ge`` (cells where shifted's mean test accuracy is
>= zero's), the same ``by_family`` and the ``rows`` (each play with ``val_by_stage``: the val
accuracy after each stage). A cell is named by its file stem (a trained-on
task by its name) and target, and played once. Finished cells are kept in ``--out`` +
``.rows.jsonl`` as each finishes, and a rerun with the same shift and ``--zero-rule`` reuses them.
``--train-tasks N`` takes fewer than N if the spec has fewer. Bad input: one line, status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ENTRIES = ("final_bits", "ramp_shape", "temperature", "alpha", "bits_drop")


def read_shift(folder: Path, tuner: str) -> dict:
    """Mean, sd and t of each action entry of ``tuner``'s best configurations (largest budget per
    cell and seed) in ``folder/cells/results.jsonl``."""
    path = folder / "cells" / "results.jsonl"
    best: dict[tuple, tuple[float, list[float]]] = {}
    from rltune.harness import strict_results

    for n, r in strict_results(path):
        if r.get("tuner") != tuner or "part" in r:
            continue
        try:
            act = r["config"]["action"]
            if not isinstance(act, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in act):
                raise TypeError("config.action is not a list of numbers")
            a = [float(x) for x in act]
            budget, seed = r["budget_stages"], r["seed"]
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
                raise TypeError(f"budget_stages {budget!r} is not a finite number")
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed {seed!r} is not a whole number")
            key = (str(r["scenario"]), str(r["target"]), seed)
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
            raise ValueError(f"{path}:{n}: not a result row with config.action ({type(e).__name__}: {e})") from None
        if len(a) != len(ENTRIES) or not all(math.isfinite(x) and -1.0 <= x <= 1.0 for x in a):
            raise ValueError(f"{path}:{n}: config.action is not {len(ENTRIES)} numbers in [-1, 1]")
        if key not in best or budget > best[key][0]:
            best[key] = (budget, a)
    cells: dict[tuple, list[list[float]]] = {}
    for (scenario, target, _), (_, a) in best.items():
        cells.setdefault((scenario, target), []).append(a)
    if len(cells) < 2:
        raise ValueError(f"{path}: {tuner} configurations of fewer than 2 cells to read a shift from")
    acts = [a for _, a in best.values()]
    out = {"folder": str(folder), "tuner": tuner, "n": len(acts), "cells": len(cells),
           "mean": {}, "sd": {}, "t": {}}
    for i, k in enumerate(ENTRIES):
        xs = [a[i] for a in acts]
        per_cell = [statistics.fmean(a[i] for a in v) for v in cells.values()]
        sd = statistics.stdev(per_cell)  # over the cells: a cell's seeds are not independent draws
        out["mean"][k], out["sd"][k] = round(statistics.fmean(xs), 4), round(sd, 4)
        out["t"][k] = round(statistics.fmean(per_cell) / (sd / math.sqrt(len(per_cell))), 2) if sd > 0 else None
    return out


def _good_row(r: dict) -> bool:
    """A kept row this script wrote: both variants with accuracies in [0, 1]."""
    return (isinstance(r["cell"], str) and isinstance(r["target"], str) and isinstance(r["seed"], int)
            and isinstance(r.get("family"), str)
            and all(isinstance(r[v], dict) and all(isinstance(r[v][k], (int, float)) and not isinstance(r[v][k], bool)
                                                   and 0.0 <= r[v][k] <= 1.0 for k in ("test_acc", "val_acc"))
                    for v in ("zero", "shifted")))


def train_tasks(n: int, seed: int, n_tasks: int) -> list:
    """The first ``n`` trained-on tasks, one family after another in turn."""
    from rltune.tasks import TaskSpec, trained_on

    return trained_on(TaskSpec(seed=seed, n_tasks=n_tasks), n)


def play_cell(job: dict) -> list[dict]:
    """Both variants on every seed of one cell (runs in a worker)."""
    import numpy as np
    import torch

    from rltune.env import DistillCompressEnv
    from rltune.env_v1 import ACTION_LAYOUT_V1, DistillCompressEnvV1
    from rltune.stage import final_report
    from rltune.train import run_episode

    torch.set_num_threads(1)
    base = DistillCompressEnv(scenarios=[job["scenario"]], targets=[job["target"]])
    env = DistillCompressEnvV1.like(base, zero_rule=job["zero_rule"])
    shifted = np.zeros(len(ACTION_LAYOUT_V1), np.float32)
    for k, v in job["shift"].items():
        shifted[ENTRIES.index(k)] = v

    class Fixed:
        def __init__(self, a):
            self.a = a

        def predict(self, obs, deterministic=True):
            return self.a

    rows = []
    for seed in job["seeds"]:
        row = {"cell": job["name"], "target": job["target"], "family": job["family"], "seed": seed}
        for name, a in (("zero", np.zeros_like(shifted)), ("shifted", shifted)):
            info = run_episode(env, Fixed(a), seed=seed * 100_003,
                               options={"scenario": 0, "target": job["target"], "float_seed": seed})
            rep = final_report(env.context(0), env.state, latency=False)
            row[name] = {"test_acc": float(rep["test_acc"]), "val_acc": float(info["val_acc"]),
                         "bits": env.plan["final_bits"], "diverged": info.get("diverged", ""),
                         "val_by_stage": [round(float(m.val_acc), 6) for m in env.state.history]}
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["cell"], r["target"]), []).append(r)

    def diff(rs, key):
        return statistics.fmean(100 * (r["shifted"][key] - r["zero"][key]) for r in rs)

    def block(groups):
        out = {"cells": len(groups)}
        for key, name in (("test_acc", "test"), ("val_acc", "val")):
            d = [diff(rs, key) for rs in groups]
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            out[f"diff_{name}_pt"] = round(statistics.fmean(d), 3)
            out[f"diff_{name}_sd_pt"] = round(sd, 3)
            out[f"diff_{name}_se_pt"] = round(sd / math.sqrt(len(d)), 3)
        out["cells_ge"] = sum(diff(rs, "test_acc") >= -1e-9 for rs in groups)
        for v in ("zero", "shifted"):
            out[f"{v}_test_pct"] = round(statistics.fmean(100 * r[v]["test_acc"] for rs in groups for r in rs), 3)
        return out

    fam: dict[str, list] = {}
    for (c, t), rs in cells.items():
        fam.setdefault(rs[0]["family"], []).append(rs)
    return {**block(list(cells.values())), "by_family": {f: block(g) for f, g in sorted(fam.items())}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shift-from", metavar="DIR[:TUNER]")
    p.add_argument("--entries", nargs="+", choices=ENTRIES, help="the entries of --shift-from's mean to play")
    p.add_argument("--shift", nargs="+", default=[], metavar="ENTRY=VALUE")
    p.add_argument("--cells", nargs="+", default=[], metavar="SCENARIO=TARGET")
    p.add_argument("--cells-from", metavar="DIR")
    p.add_argument("--train-tasks", type=int, default=0, metavar="N")
    p.add_argument("--task-seed", type=int, default=0)
    p.add_argument("--n-tasks", type=int, default=240)
    p.add_argument("--zero-rule", default="sensitivity", choices=("sensitivity", "plus1"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from rltune.errors import RltuneError, make_folder, write_atomic
    from rltune.shipped import recorded_command, resolve_scenario

    try:
        if not 1 <= a.seeds <= 1000 or not 1 <= a.workers <= 64 or a.train_tasks < 0:
            raise RltuneError("--seeds (1..1000), --workers (1..64) and --train-tasks (>= 0) are whole numbers in range")
        shift, source = {}, None
        if a.entries and not a.shift_from:
            raise RltuneError("--entries picks entries of --shift-from's mean: give --shift-from too")
        if a.shift_from:
            folder, _, tuner = a.shift_from.rpartition(":") if ":" in a.shift_from else (a.shift_from, "", "")
            try:
                source = read_shift(Path(folder), tuner or "optuna-tpe")
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise RltuneError(f"--shift-from {a.shift_from}: {e}") from None
            if not a.entries:
                raise RltuneError("--shift-from: say which --entries of the mean to play")
            shift = {k: source["mean"][k] for k in a.entries}
        given = set()
        for s in a.shift:
            k, sep, v = s.partition("=")
            try:
                x = float(v)
            except ValueError:
                x = float("nan")
            if not sep or k not in ENTRIES or not -1.0 <= x <= 1.0 or k in given:
                raise RltuneError(f"--shift {s!r}: expected ENTRY=VALUE, ENTRY of {', '.join(ENTRIES)}, VALUE in [-1, 1]")
            shift[k] = x
            given.add(k)
        if not shift or not any(shift.values()):
            raise RltuneError("no shift: give --shift-from with --entries, or --shift")
        jobs = []
        for c in a.cells:
            sc, sep, t = c.partition("=")
            if not sep or not sc or not t:
                raise RltuneError(f"--cells {c!r}: expected SCENARIO=TARGET")
            jobs.append({"scenario": str(resolve_scenario(sc)), "name": Path(sc).stem, "target": t, "family": "cells"})
        if a.cells_from:
            from rltune.harness import anytime_cells

            try:
                cells = [(sc, t) for sc, ts in anytime_cells(a.cells_from).items() for t in ts]
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                raise RltuneError(f"--cells-from {a.cells_from}: not an anytime folder's summary.json ({type(e).__name__})") from None
            for sc, t in cells:
                jobs.append({"scenario": str(resolve_scenario(sc)), "name": Path(sc).stem, "target": t,
                             "family": Path(sc).stem.rsplit("-", 1)[-1]})
        if a.train_tasks:
            for t in train_tasks(a.train_tasks, a.task_seed, a.n_tasks):
                jobs.append({"scenario": t.load(), "name": t.name, "target": t.target, "family": t.family})
        if not jobs:
            raise RltuneError("no cells: give --cells, --cells-from or --train-tasks")
        unique: dict[tuple, dict] = {}
        for j in jobs:  # rows are kept by (name, target): one job each, and one scenario per name
            o = unique.setdefault((j["name"], j["target"]), j)
            if o is not j and isinstance(j["scenario"], str) and o["scenario"] != j["scenario"]:
                raise RltuneError(f"cells {o['scenario']} and {j['scenario']}: the same name {j['name']!r} at {j['target']}")
        jobs = list(unique.values())
        if not a.out.strip():
            raise RltuneError("--out: give the JSON file to write")
        out_path = Path(a.out)
        rows_path = Path(str(out_path) + ".rows.jsonl")
        inputs = []
        if a.shift_from:
            inputs.append(Path(source["folder"]) / "cells" / "results.jsonl")
        if a.cells_from:
            inputs.append(Path(a.cells_from) / "summary.json")
        if any(q.resolve() == f.resolve() for q in (out_path, rows_path) for f in inputs):
            raise RltuneError(f"--out {out_path}: that (or its .rows.jsonl) is one of the inputs")
        for q in (out_path, rows_path):
            if q.exists() and not q.is_file():
                raise RltuneError(f"--out {out_path}: {q} is there and not a file")
        # every scenario and target is checked before any episode is played
        from rltune.env import DistillCompressEnv

        for j in jobs:
            DistillCompressEnv(scenarios=[j["scenario"]], targets=[j["target"]])
        make_folder(out_path.parent)
        done: dict[tuple, dict] = {}
        torn = False
        if rows_path.exists():
            try:
                text = rows_path.read_bytes().decode("utf-8", errors="replace")
            except OSError as e:
                raise RltuneError(f"{rows_path}: {e.strerror or e}") from None
            torn = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    r = json.loads(line)
                    if r.get("shift") == shift and r.get("zero_rule") == a.zero_rule and _good_row(r):
                        done[(r["cell"], r["target"], r["seed"])] = r
                except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                    continue  # a torn or foreign line: played again
        seeds = list(range(a.seeds))
        todo = []
        for j in jobs:
            j.update(shift=shift, zero_rule=a.zero_rule,
                     seeds=[s for s in seeds if (j["name"], j["target"], s) not in done])
            if j["seeds"]:
                todo.append(j)
        try:
            log = open(rows_path, "a", encoding="utf-8")
        except OSError as e:
            raise RltuneError(f"cannot append to {rows_path}: {e.strerror or e}") from None
        with log:
            if torn:  # end the torn line, or the first row kept now would join it
                log.write("\n")

            def keep(rows):
                for r in rows:
                    r.update(shift=shift, zero_rule=a.zero_rule)
                    done[(r["cell"], r["target"], r["seed"])] = r
                    log.write(json.dumps(r) + "\n")
                log.flush()
                r0 = rows[0]
                print(r0["cell"], r0["target"], "shifted − zero test pt:",
                      round(statistics.fmean(100 * (r["shifted"]["test_acc"] - r["zero"]["test_acc"]) for r in rows), 2),
                      flush=True)

            if a.workers == 1:
                for j in todo:
                    keep(play_cell(j))
            else:
                error = None
                with ProcessPoolExecutor(a.workers) as ex:  # each cell kept as it finishes
                    futures = [ex.submit(play_cell, j) for j in todo]
                    for f in as_completed(futures):
                        if f.cancelled():
                            continue
                        if f.exception() is None:
                            keep(f.result())
                        elif error is None:  # the rest not started; the running ones finish and are kept
                            error = f.exception()
                            for g in futures:
                                g.cancel()
                if error is not None:
                    raise error
        rows = [done[(j["name"], j["target"], s)] for j in jobs for s in seeds]
        out = {"command": recorded_command(), "zero_rule": a.zero_rule, "seeds": a.seeds, "shift": shift,
               "shift_from": source, **summarize(rows), "rows": rows}
        write_atomic(out_path, (json.dumps(out, indent=1) + "\n").encode(), "--out")
    except RltuneError as e:
        print("schedule_shift: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in out.items() if k not in ("rows", "by_family", "command")}, indent=1))
    print(json.dumps(out["by_family"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
