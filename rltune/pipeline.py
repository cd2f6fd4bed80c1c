"""End-to-end jobs built from the engine: compress a scenario with a recipe, write the artifact
and the before/after report. Used by the command line and the experiment scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rltune.context import Context
from rltune.distill import predict
from rltune.export import save_artifact
from rltune.metrics import accuracy, float_energy, measure_latency
from rltune.models import count_params
from rltune.scenario import load_scenario
from rltune.stage import final_report, recipe, run_schedule


def compress_with_recipe(scenario_path: str | Path, sparsity: float = 0.8, bits: int = 4, seed: int = 0,
                         out_dir: str | Path = "runs/compress") -> dict[str, Any]:
    """Compress a scenario's float student with the gradual recipe; export it; report before/after."""
    from rltune.cli import before_after_table

    scenario = load_scenario(scenario_path)
    ctx = Context.build(scenario)
    fs = ctx.float_student(seed)
    schedule = recipe(scenario.training["stages"], sparsity, bits)
    state = run_schedule(ctx, schedule, seed=seed, float_student=fs)
    rep = final_report(ctx, state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifact = out / f"{scenario.name}.rlt"
    nbytes = save_artifact(state.model, artifact, scenario.student, ctx.n_features, ctx.n_classes)
    n = ctx.n_features
    rows = [
        {"model": f"teacher ({scenario.teacher['arch']}, {count_params(ctx.teacher)} params)",
         "test_acc": ctx.teacher_info["test_acc"], "bytes": 4 * count_params(ctx.teacher),
         "latency_b1_s": measure_latency(ctx.teacher, n)["latency_b1_s"],
         "energy_pj": float_energy(ctx.teacher, n)["energy_pj"]},
        {"model": f"float student ({count_params(fs)} params)",
         "test_acc": accuracy(predict(fs, ctx.data.x_test), ctx.data.y_test), "bytes": 4 * count_params(fs),
         "ratio": 1.0, "latency_b1_s": measure_latency(fs, n)["latency_b1_s"],
         "energy_pj": float_energy(fs, n)["energy_pj"]},
        {"model": f"compressed ({rep['sparsity']:.0%} sparse, {rep['bits']:.0f} bits)",
         "test_acc": rep["test_acc"], "bytes": nbytes, "ratio": rep["float_bytes"] / nbytes,
         "latency_b1_s": rep["latency_b1_s"], "energy_pj": rep["energy_pj"]},
    ]
    table = before_after_table(rows)
    report = {"scenario": scenario.name, "seed": seed, "recipe": {"sparsity": sparsity, "bits": bits},
              "teacher": rows[0], "float_student": rows[1], "compressed": rows[2], "final": rep,
              "artifact": str(artifact)}
    (out / f"{scenario.name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{scenario.name}.md").write_text(f"# {scenario.name}: before and after\n\n{table}")
    return {**report, "table": table, "report_json": str(out / f"{scenario.name}.json")}
