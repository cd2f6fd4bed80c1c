"""Frontier benchmark of the compression engine (issue 2).

For each scenario and seed:
  * teacher, hard-label student, KD student (best τ of a small grid at α = 0.9, picked on val;
    with and without the transfer set) and the teacher's hard pseudo-labels on the same transfer
    set; every float student keeps its best-val epoch (early stopping), so each is trained to
    convergence on its own data;
  * the fixed gradual recipe (cubic sparsity ramp, 8 bits then the final bit-width late) over a
    grid of final sparsities × bit-widths, starting from the scenario's float KD student;
  * one stage timed with cached teacher logits and with the teacher recomputed on every batch.

Writes experiments/results/frontier.json and a generated frontier.md. Test accuracy is what is
reported; the τ choice and the epochs are selected on val.

    python experiments/frontier.py                       # all shipped training scenarios, 5 seeds
    python experiments/frontier.py --scenarios digits-mlp --seeds 2 --out /tmp/f   # quick look
    python experiments/frontier.py --scenarios mnist1d-lenet --allocator 48x,56x,64x --allocator-only --workers 2

``--allocator T1,T2,...`` adds the zero-search per-layer allocator (the harness's ``sensitivity``
tuner: per-layer bits and sparsity from the measured sensitivity, under the byte budget of each
target ratio, the recipe's schedule and KD) as more points of the same frontier, run through
:func:`rltune.harness.evaluate` (cells in ``OUT/frontier_allocator/results.jsonl``, so a rerun
resumes); ``max_ratio_within_1pt`` is then the best over the recipe grid *and* the allocator points,
the grid's own figure kept as ``recipe_max_ratio_within_1pt``. ``--allocator-only`` keeps a
scenario's distillation table and recipe grid from ``OUT/frontier.json`` instead of recomputing them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rltune.shipped import resolve_scenario
from rltune.context import Context
from rltune.distill import predict, train_epochs
from rltune.metrics import accuracy
from rltune.models import count_params
from rltune.scenario import load_scenario
from rltune.stage import Knobs, final_report, recipe, run_schedule, run_stage, start
from rltune.shipped import recorded_command

ROOT = Path(__file__).resolve().parent
# tiny students cannot lose many weights: their frontier is in the bits
SMALL_GRID = "0.0:6,0.0:4,0.3:5,0.3:4,0.3:3,0.5:5,0.5:4,0.5:3,0.5:2,0.7:4,0.7:3,0.7:2,0.8:4,0.8:3,0.9:3"
LARGE_GRID = "0.9:4,0.92:4,0.94:4,0.95:4,0.9:3,0.93:3,0.95:3,0.97:3"


@dataclass
class Args:
    """Command-line arguments."""

    scenarios: list[str] = field(default_factory=lambda: [
        "digits-linear", "digits-mlp", "mnist1d-small", "mnist1d-lenet", "synthetic-6class"])
    """shipped scenario names or YAML paths"""
    seeds: int = 5
    """seeds per cell (student init and data order; the teacher is trained once per scenario)"""
    taus: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    """temperatures tried for the KD student (α = 0.9), the best picked on mean val accuracy"""
    float_epochs: int = 30
    """epochs over train ∪ transfer for float students with a transfer set"""
    labeled_epochs: int = 200
    """epochs over the labeled train split alone (hard labels, KD without transfer)"""
    grid: str = "auto"
    """sparsity:bits points of the gradual recipe; auto: SMALL_GRID below 10k parameters, else LARGE_GRID"""
    out: str = str(ROOT / "results")
    """folder for frontier.json and frontier.md"""
    allocator: list[str] = field(default_factory=list)
    """target ratios (or byte budgets) at which the per-layer allocator runs, e.g. 16x,24x"""
    allocator_only: bool = False
    """keep the distillation table and recipe grid already in frontier.json; only add allocator points"""
    workers: int = 1
    """worker processes for the allocator cells"""


def parse_args() -> Args:
    d = Args()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", default=d.scenarios)
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--taus", nargs="+", type=float, default=d.taus)
    p.add_argument("--float-epochs", type=int, default=d.float_epochs)
    p.add_argument("--labeled-epochs", type=int, default=d.labeled_epochs)
    p.add_argument("--grid", default=d.grid)
    p.add_argument("--out", default=d.out)
    p.add_argument("--render", action="store_true", help="only re-render frontier.md from frontier.json")
    p.add_argument("--allocator", default="", help="target ratios for the per-layer allocator, comma-separated")
    p.add_argument("--allocator-only", action="store_true",
                   help="keep the distillation table and recipe grid in frontier.json; add allocator points")
    p.add_argument("--workers", type=int, default=d.workers)
    a = p.parse_args()
    allocator = [t for t in a.allocator.split(",") if t]
    from rltune.budget import Budget

    for t in allocator:
        try:
            Budget.parse(t)
        except Exception as e:  # noqa: BLE001 - one clear line, before any training
            p.exit(2, f"frontier.py: --allocator: {e}\n")
    if a.allocator_only and not allocator:
        p.exit(2, "frontier.py: --allocator-only needs --allocator\n")
    if a.seeds < 1 or a.workers < 1:
        p.exit(2, "frontier.py: --seeds and --workers must be at least 1\n")
    if a.render:
        path = Path(a.out)
        (path / "frontier.md").write_text(to_markdown(json.loads((path / "frontier.json").read_text())))
        sys.exit(0)
    return Args(a.scenarios, a.seeds, a.taus, a.float_epochs, a.labeled_epochs, a.grid, a.out, allocator,
                a.allocator_only, a.workers)


def ms(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def float_student(ctx: Context, seed: int, targets: str, tau: float, transfer: bool, epochs: int) -> tuple[float, float]:
    """Train a float student from scratch; keep the best-val epoch. Returns (val_acc, test_acc)."""
    s = ctx.scenario
    data = ctx.train_set if transfer else ctx.train_set.labeled_only()
    model = ctx.new_student(seed)
    g = torch.Generator().manual_seed(seed)
    best, best_state = -1.0, None
    chunk = max(1, epochs // 15)
    done = 0
    while done < epochs:
        step = min(chunk, epochs - done)
        train_epochs(model, data, step, temperature=tau, alpha=0.9, lr=ctx.pretrain_lr,
                     batch_size=s.training["batch_size"], generator=g, targets=targets)
        done += step
        acc = accuracy(predict(model, ctx.data.x_val), ctx.data.y_val)
        if acc > best:
            best, best_state = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return best, accuracy(predict(model, ctx.data.x_test), ctx.data.y_test)


def distillation_table(ctx: Context, a: Args) -> dict:
    has_transfer = len(ctx.data.x_transfer) > 0
    res: dict = {"teacher_acc": ctx.teacher_info["test_acc"], "transfer_size": len(ctx.data.x_transfer)}
    hard = [float_student(ctx, s, "hard", 1.0, False, a.labeled_epochs) for s in range(a.seeds)]
    res["hard_acc"] = ms([t for _, t in hard])
    variants = {"kd_labeled": (False, a.labeled_epochs)}
    if has_transfer:
        variants["kd_transfer"] = (True, a.float_epochs)
    per_tau: dict = {}
    for name, (transfer, epochs) in variants.items():
        runs = {tau: [float_student(ctx, s, "soft", tau, transfer, epochs) for s in range(a.seeds)] for tau in a.taus}
        best_tau = max(runs, key=lambda t: statistics.fmean(v for v, _ in runs[t]))
        per_tau[name] = {str(t): ms([x for _, x in r]) for t, r in runs.items()}
        res[f"{name}_acc"] = {**ms([t for _, t in runs[best_tau]]), "tau": best_tau}
    res["kd_by_tau"] = per_tau
    best_kd = res["kd_transfer_acc"] if has_transfer else res["kd_labeled_acc"]
    res["kd_acc"] = best_kd
    if has_transfer:
        pseudo = [float_student(ctx, s, "pseudo", 1.0, True, a.float_epochs) for s in range(a.seeds)]
        res["pseudo_acc"] = ms([t for _, t in pseudo])
    gap = res["teacher_acc"] - res["hard_acc"]["mean"]
    res["gap_closed"] = (best_kd["mean"] - res["hard_acc"]["mean"]) / gap if gap > 0 else None
    res["kd_gain_over_2std"] = best_kd["mean"] - res["hard_acc"]["mean"] > 2 * max(best_kd["std"], res["hard_acc"]["std"])
    return res


def compression_table(ctx: Context, a: Args) -> dict:
    stages = ctx.scenario.training["stages"]
    float_accs = [ctx_float_test(ctx, s) for s in range(a.seeds)]
    points = []
    grid = a.grid
    if grid == "auto":
        grid = SMALL_GRID if count_params(ctx.new_student(0)) < 10_000 else LARGE_GRID
    for item in grid.split(","):
        sp, bits = item.split(":")
        sp, bits = float(sp), int(bits)
        accs, ratios, sizes, energies = [], [], [], []
        t0 = time.perf_counter()
        for seed in range(a.seeds):
            state = run_schedule(ctx, recipe(stages, sp, bits), seed=seed)
            rep = final_report(ctx, state, latency=False)
            accs.append(rep["test_acc"])
            ratios.append(rep["ratio"])
            sizes.append(rep["packed_bytes"])
            energies.append(rep["energy_pj"])
        pt = {"sparsity": sp, "bits": bits, "test_acc": ms(accs), "ratio": ms(ratios), "bytes": ms(sizes),
              "energy_pj": ms(energies), "seconds_per_run": (time.perf_counter() - t0) / a.seeds}
        points.append(pt)
        print(f"  recipe {sp:.2f}/{bits}b: test {100 * pt['test_acc']['mean']:.2f} ± {100 * pt['test_acc']['std']:.2f} "
              f"ratio {pt['ratio']['mean']:.1f}× ({pt['bytes']['mean']:.0f} B)", flush=True)
    c = {"float_student_acc": ms(float_accs), "recipe_points": points}
    best_within_1pt(c)
    return c


def allocator_points(scenario: str, a: Args, command: str) -> list[dict]:
    """The ``sensitivity`` tuner at each target of ``a.allocator``, ``a.seeds`` seeds, via the harness."""
    from rltune.harness import evaluate, read_results

    folder = Path(a.out) / "frontier_allocator"
    evaluate([scenario], {scenario: a.allocator}, ["sensitivity"], [8], a.seeds, folder, workers=a.workers,
             progress=False)
    rows = [r for r in read_results(folder / "results.jsonl") if r["scenario"] == scenario and r["tuner"] == "sensitivity"
            and r["target"] in a.allocator and r["seed"] < a.seeds]
    points = []
    for target in a.allocator:
        rs = sorted((r for r in rows if r["target"] == target), key=lambda r: r["seed"])
        tests = [r["test"] for r in rs]
        pt = {"allocator": "sensitivity", "target": target, "test_acc": ms([t["test_acc"] for t in tests]),
              "ratio": ms([t["ratio"] for t in tests]), "bytes": ms([t["packed_bytes"] for t in tests]),
              "energy_pj": ms([t["energy_pj"] for t in tests]), "bits": ms([t["bits"] for t in tests]),
              "sparsity": ms([t["sparsity"] for t in tests]),
              "budget_used": ms(used) if (used := [t["budget_used"] for t in tests if t.get("budget_used") is not None]) else None,
              "float_student_acc": ms([t["float_test_acc"] for t in tests]),
              "layers": [t.get("layers") for t in tests], "command": command}
        points.append(pt)
        print(f"  allocator @{target}: test {100 * pt['test_acc']['mean']:.2f} ± {100 * pt['test_acc']['std']:.2f} "
              f"ratio {pt['ratio']['mean']:.1f}× ({pt['bytes']['mean']:.0f} B, mean bits {pt['bits']['mean']:.2f}, "
              f"sparsity {pt['sparsity']['mean']:.3f})", flush=True)
    return points


def best_within_1pt(c: dict) -> None:
    """``max_ratio_within_1pt`` over the recipe grid and the allocator points (the grid's own kept)."""
    float_mean = c["float_student_acc"]["mean"]
    rec = [p for p in c["recipe_points"] if p["test_acc"]["mean"] >= float_mean - 0.01]
    alloc = [p for p in c.get("allocator_points", []) if p["test_acc"]["mean"] >= float_mean - 0.01]
    best_rec = max(rec, key=lambda p: p["ratio"]["mean"]) if rec else None
    c["recipe_max_ratio_within_1pt"] = best_rec["ratio"]["mean"] if best_rec else None
    best = max(rec + alloc, key=lambda p: p["ratio"]["mean"]) if rec + alloc else None
    c["max_ratio_within_1pt"] = best["ratio"]["mean"] if best else None
    if best is None:
        c["max_ratio_setting"] = None
    elif "allocator" in best:
        c["max_ratio_setting"] = {"allocator": best["allocator"], "target": best["target"],
                                  "sparsity": best["sparsity"]["mean"], "bits": best["bits"]["mean"],
                                  "test_acc": best["test_acc"]}
    else:
        c["max_ratio_setting"] = {k: best[k] for k in ("sparsity", "bits")} | {"test_acc": best["test_acc"]}


def ctx_float_test(ctx: Context, seed: int) -> float:
    return accuracy(predict(ctx.float_student(seed), ctx.data.x_test), ctx.data.y_test)


def stage_timing(ctx: Context, repeats: int = 3) -> dict:
    """Seconds of one 8-bit, 50 %-sparse stage, cached teacher logits vs recomputed per batch."""
    out = {}
    for name, per_batch in (("cached", False), ("recomputed", True)):
        secs, outside = [], []
        for r in range(repeats):
            state = start(ctx, seed=r)
            m = run_stage(ctx, state, Knobs(4.0, 0.9, 0.5, 8), teacher_per_batch=per_batch)
            secs.append(m.seconds)
            outside.append(m.seconds_outside_training / m.seconds)
        out[name] = {"seconds": statistics.median(secs), "outside_training_share": statistics.median(outside)}
    out["speedup"] = out["recomputed"]["seconds"] / out["cached"]["seconds"]
    return out


def to_markdown(results: dict) -> str:
    lines = [
        "# Compression frontier (generated by experiments/frontier.py; do not edit)", "",
        *[f"Command: `{c}`  " for c in dict.fromkeys(r.get("command", results["command"]) for r in results["scenarios"].values())],
        f"Seeds per cell: {results['seeds']} (mean ± std of test accuracy, %).", "",
        "## Distillation", "",
        "| scenario | teacher | hard labels | KD, labeled only (τ) | KD + transfer (τ) | pseudo-labels + transfer | gap closed | KD gain > 2 std |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(x):
        return f"{100 * x['mean']:.2f} ± {100 * x['std']:.2f}" if x else "-"

    for name, r in results["scenarios"].items():
        d = r["distillation"]
        kt = d.get("kd_transfer_acc")
        lines.append(
            f"| {name} | {100 * d['teacher_acc']:.2f} | {f(d['hard_acc'])} | {f(d['kd_labeled_acc'])} ({d['kd_labeled_acc']['tau']:g}) "
            f"| {f(kt) + ' (' + format(kt['tau'], 'g') + ')' if kt else '-'} | {f(d.get('pseudo_acc'))} "
            f"| {'-' if d['gap_closed'] is None else format(100 * d['gap_closed'], '.0f') + ' %'} | {'yes' if d['kd_gain_over_2std'] else 'no'} |")
    lines += ["", "## Gradual recipe: packed compression against test accuracy", ""]
    for name, r in results["scenarios"].items():
        c = r["compression"]
        lines += [f"### {name} (float KD student {f(c['float_student_acc'])})", "",
                  f"`{r.get('command', results['command'])}`", "",
                  "| sparsity | bits | test acc | ratio (packed) | bytes |", "|---|---|---|---|---|"]
        for p in c["recipe_points"]:
            lines.append(f"| {p['sparsity']:.2f} | {p['bits']} | {f(p['test_acc'])} | {p['ratio']['mean']:.1f}× | {p['bytes']['mean']:.0f} |")
        if c.get("allocator_points"):
            cmd = c["allocator_points"][0]["command"]
            lines += ["", f"Per-layer allocator (`sensitivity`, zero search), `{cmd}`:", "",
                      "| target | test acc | ratio (packed) | bytes | mean bits | sparsity | budget used |",
                      "|---|---|---|---|---|---|---|"]
            for p in c["allocator_points"]:
                used = p["budget_used"]["mean"] if p["budget_used"] else float("nan")
                lines.append(f"| {p['target']} | {f(p['test_acc'])} | {p['ratio']['mean']:.1f}× | {p['bytes']['mean']:.0f} "
                             f"| {p['bits']['mean']:.2f} | {p['sparsity']['mean']:.3f} | "
                             f"{'-' if used != used else format(100 * used, '.1f') + ' %'} |")
        best = c["max_ratio_within_1pt"]
        st = c["max_ratio_setting"]
        if not best:
            where = "max_ratio_within_1pt: none of the points stayed within 1 pt"
        elif "allocator" in st:
            where = (f"max_ratio_within_1pt: **{best:.1f}×** by the allocator at {st['target']} (mean sparsity "
                     f"{st['sparsity']:.3f}, mean bits {st['bits']:.2f}); recipe grid alone: "
                     f"{c['recipe_max_ratio_within_1pt'] or 0:.1f}×")
        else:
            where = f"max_ratio_within_1pt: **{best:.1f}×** at {st['sparsity']:.2f} / {st['bits']} bits"
            if c.get("allocator_points"):
                where += " (the recipe grid; no allocator point within 1 pt went further)"
        lines += ["", where, ""]
    lines += ["## Cost of a stage", "", "| scenario | cached logits (s) | teacher per batch (s) | speed-up | outside training |", "|---|---|---|---|---|"]
    for name, r in results["scenarios"].items():
        t = r["stage_seconds"]
        lines.append(f"| {name} | {t['cached']['seconds']:.3f} | {t['recomputed']['seconds']:.3f} | {t['speedup']:.2f}× | {100 * t['cached']['outside_training_share']:.1f} % |")
    return "\n".join(lines) + "\n"


def main() -> None:
    a = parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = recorded_command()
    results = {"command": command, "seeds": a.seeds, "taus": a.taus, "scenarios": {}}
    previous = out / "frontier.json"
    if previous.exists():  # a rerun of some scenarios replaces their entries and keeps the others
        old = json.loads(previous.read_text())
        results["scenarios"] = old.get("scenarios", {})
        for entry in results["scenarios"].values():
            entry.setdefault("command", old.get("command"))
            entry.setdefault("seeds", old.get("seeds"))
    t_start = time.perf_counter()
    for name in a.scenarios:
        scenario = load_scenario(resolve_scenario(name))
        t0 = time.perf_counter()
        if a.allocator_only:
            r = results["scenarios"].get(scenario.name)
            if r is None:
                print(f"frontier.py: {scenario.name} has no entry in {previous} to add allocator points to; "
                      "run it without --allocator-only first", file=sys.stderr)
                sys.exit(2)
            r["compression"]["allocator_points"] = allocator_points(name, a, command)
            best_within_1pt(r["compression"])
            r["max_ratio_within_1pt"] = r["compression"]["max_ratio_within_1pt"]
            r["max_ratio_setting"] = r["compression"]["max_ratio_setting"]
            print(f"  max_ratio_within_1pt {r['max_ratio_within_1pt']}", flush=True)
            (out / "frontier.json").write_text(json.dumps(results, indent=1))
            continue
        ctx = Context.build(scenario)
        print(f"{scenario.name}: teacher {100 * ctx.teacher_info['test_acc']:.2f} % test "
              f"({'cached' if ctx.teacher_cache_hit else 'trained'} in {time.perf_counter() - t0:.1f} s)", flush=True)
        r = {"teacher_acc": ctx.teacher_info["test_acc"]}
        r["stage_seconds"] = stage_timing(ctx)
        r["distillation"] = distillation_table(ctx, a)
        d = r["distillation"]
        print(f"  hard {100 * d['hard_acc']['mean']:.2f}  KD {100 * d['kd_acc']['mean']:.2f} (τ {d['kd_acc']['tau']:g})"
              f"  pseudo {100 * d['pseudo_acc']['mean']:.2f}" if "pseudo_acc" in d else "", flush=True)
        r["compression"] = compression_table(ctx, a)
        if a.allocator:
            r["compression"]["allocator_points"] = allocator_points(name, a, command)
            best_within_1pt(r["compression"])
        r.update({k: d[k] for k in ("hard_acc", "kd_acc", "gap_closed")})
        if "pseudo_acc" in d:
            r["pseudo_acc"] = d["pseudo_acc"]
        r["max_ratio_within_1pt"] = r["compression"]["max_ratio_within_1pt"]
        r["max_ratio_setting"] = r["compression"]["max_ratio_setting"]
        r["seconds"] = time.perf_counter() - t0
        r["command"] = command
        r["seeds"] = a.seeds
        results["scenarios"][scenario.name] = r
        print(f"  max_ratio_within_1pt {r['max_ratio_within_1pt']}  stage speed-up {r['stage_seconds']['speedup']:.2f}×  "
              f"({r['seconds']:.0f} s)", flush=True)
        (out / "frontier.json").write_text(json.dumps(results, indent=1))
    results["total_seconds_last_run"] = time.perf_counter() - t_start
    (out / "frontier.json").write_text(json.dumps(results, indent=1))
    (out / "frontier.md").write_text(to_markdown(results))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
