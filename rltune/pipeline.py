"""End-to-end jobs built from the engine: compress a scenario with the recipe or replay a learned
policy on it, export the artifact and write the before/after report (JSON + Markdown). Used by the
command line and the experiment scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from rltune.context import Context
from rltune.distill import predict
from rltune.export import load_artifact, save_artifact
from rltune.metrics import accuracy, float_energy, measure_latency
from rltune.models import count_params
from rltune.scenario import load_scenario
from rltune.stage import StudentState, final_report, recipe, run_schedule


def write_report(ctx: Context, float_student: nn.Module, state: StudentState, out_dir: str | Path,
                 how: dict[str, Any]) -> dict[str, Any]:
    """Export the compressed student, check the artifact predicts the same, and write the
    before/after table (teacher, float student, compressed student; test split)."""
    from rltune.cli import before_after_table

    scenario = ctx.scenario
    rep = final_report(ctx, state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifact = out / f"{scenario.name}.rlt"
    nbytes = save_artifact(state.model, artifact, scenario.student, ctx.n_features, ctx.n_classes)
    reloaded = load_artifact(artifact)
    x = ctx.data.x_test
    same = bool((reloaded(x).argmax(1) == predict(state.model, x).argmax(1)).all())
    n = ctx.n_features
    rows = [
        {"model": f"teacher ({scenario.teacher['arch']}, {count_params(ctx.teacher)} params)",
         "test_acc": ctx.teacher_info["test_acc"], "bytes": 4 * count_params(ctx.teacher),
         "latency_b1_s": measure_latency(ctx.teacher, n)["latency_b1_s"],
         "energy_pj": float_energy(ctx.teacher, n)["energy_pj"]},
        {"model": f"float student ({count_params(float_student)} params)",
         "test_acc": accuracy(predict(float_student, x), ctx.data.y_test), "bytes": 4 * count_params(float_student),
         "ratio": 1.0, "latency_b1_s": measure_latency(float_student, n)["latency_b1_s"],
         "energy_pj": float_energy(float_student, n)["energy_pj"]},
        {"model": f"compressed ({rep['sparsity']:.0%} sparse, {rep['bits']:.0f} bits)",
         "test_acc": rep["test_acc"], "bytes": nbytes, "ratio": rep["float_bytes"] / nbytes,
         "latency_b1_s": rep["latency_b1_s"], "energy_pj": rep["energy_pj"]},
    ]
    table = before_after_table(rows)
    report = {"scenario": scenario.name, **how, "teacher": rows[0], "float_student": rows[1],
              "compressed": rows[2], "final": rep, "artifact": str(artifact),
              "artifact_predicts_same": same,
              "stages": [m.to_dict() for m in state.history]}
    (out / f"{scenario.name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{scenario.name}.md").write_text(f"# {scenario.name}: before and after ({how.get('method')})\n\n{table}")
    return {**report, "table": table, "report_json": str(out / f"{scenario.name}.json")}


def compress_with_recipe(scenario_path: str | Path, sparsity: float = 0.8, bits: int = 4, seed: int = 0,
                         out_dir: str | Path = "runs/compress") -> dict[str, Any]:
    """Compress a scenario's float student with the gradual recipe; export it; report before/after."""
    scenario = load_scenario(scenario_path)
    ctx = Context.build(scenario)
    fs = ctx.float_student(seed)
    state = run_schedule(ctx, recipe(scenario.training["stages"], sparsity, bits), seed=seed, float_student=fs)
    return write_report(ctx, fs, state, out_dir, {"method": "recipe", "seed": seed,
                                                  "recipe": {"sparsity": sparsity, "bits": bits}})


def replay(agent_path: str | Path, scenario_path: str | Path, budget: str, seed: int = 0,
           out_dir: str | Path = "runs/replay", recipe_only: bool = False) -> dict[str, Any]:
    """Run a learned policy deterministically for one episode at ``budget``: no search, no new
    training of the policy. ``recipe_only`` plays the zero action instead (the recipe)."""
    from rltune.agentfile import load_policy
    from rltune.env import DistillCompressEnv
    from rltune.train import run_episode

    agent = None if recipe_only else load_policy(agent_path)
    env = DistillCompressEnv(scenarios=[load_scenario(scenario_path)], targets=[budget])
    info = run_episode(env, agent, seed=seed, options={"float_seed": 0})
    if "diverged" in info:
        from rltune.errors import RltuneError

        raise RltuneError(f"the episode ended early: {info['diverged']}")
    fs, _ = env.float_student(0, 0)
    trained_on = agent.meta.get("training", {}).get("scenarios", []) if agent else []
    how = {"method": "recipe" if recipe_only else "ppo-replay", "agent": None if recipe_only else str(agent_path),
           "budget": budget, "seed": seed, "in_agent_training_set": env.ctx.scenario.name in trained_on,
           "plan": env.plan, "recipe_bits": env.probe_result.recipe_bits}
    return write_report(env.ctx, fs, env.state, out_dir, how)
