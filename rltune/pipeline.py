"""What the command line writes for a compressed student: the packed artifact (checked to reload and
predict the same), optionally ONNX, and the before/after report (JSON + Markdown). Built on the
public API (:mod:`rltune.api`); the fixed recipe at a given sparsity and bit-width lives here too."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from rltune.api import Result, json_safe, as_problem
from rltune.compression import float_bytes
from rltune.context import Context
from rltune.errors import make_folder, write_atomic
from rltune.export import load_artifact
from rltune.metrics import float_energy, measure_latency, plain_copy
from rltune.models import count_params
from rltune.problem import Problem
from rltune.stage import final_report, recipe, run_schedule


def _fmt_bytes(n: float) -> str:
    return f"{n / 1024:.1f} KB" if n >= 10240 else f"{int(n)} B"


def before_after_table(rows: list[dict]) -> str:
    """Markdown table of teacher / float student / compressed student."""
    head = "| model | test acc | bytes | ratio | latency b1 | energy / inference |\n|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        lat = f"{r['latency_b1_s'] * 1e6:.0f} µs" if r.get("latency_b1_s") else "-"
        energy = f"{r['energy_pj'] / 1e3:.1f} nJ" if r.get("energy_pj") else "-"
        ratio = f"{r['ratio']:.1f}×" if r.get("ratio") else "-"
        acc = "-" if r.get("test_acc") is None else f"{100 * r['test_acc']:.2f} %"
        lines.append(f"| {r['model']} | {acc} | {_fmt_bytes(r['bytes'])} | {ratio} | {lat} | {energy} |")
    return head + "\n".join(lines) + "\n"


def compress_fixed(problem: Problem | str, sparsity: float = 0.8, bits: int = 4, seed: int = 0) -> Result:
    """The gradual recipe at a fixed final sparsity and bit-width (no target, no search)."""
    p = as_problem(problem)
    ctx = Context.build(p)
    fs = ctx.float_student(seed)
    state = run_schedule(ctx, recipe(ctx.scenario.training["stages"], sparsity, bits), seed=seed, float_student=fs)
    rep = json_safe(final_report(ctx, state, latency=False))
    report = {"name": p.name, "tuner": "recipe (fixed)", "sparsity_target": sparsity, "bits_target": bits,
              "seed": seed, **rep}
    from rltune.compression import warn_scale_range

    warn_scale_range(state.model, p.name)
    return Result(plain_copy(state.model), report, p, state.model, ctx.student_spec, ctx.input_shape, ctx.n_classes)


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive ``flock`` on ``folder`` itself (no lock file left behind) while the body runs:
    two runs writing into one output folder at once write their files one after the other, so
    ``NAME.rlt``, ``NAME.json`` and ``NAME.md`` always come from one run. No-op where flock is
    unavailable."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_outputs(result: Result, out_dir: str | Path, how: dict[str, Any], onnx: str | None = None) -> dict[str, Any]:
    """Save the artifact (checking it reloads and predicts the same), ONNX if asked, and the
    before/after report ``NAME.json`` / ``NAME.md`` in ``out_dir``, holding a lock on ``out_dir``
    so that a concurrent run's files do not interleave with these."""
    out = Path(out_dir)
    make_folder(out)
    with folder_lock(out):
        return _write_outputs(result, out, how, onnx)


def _write_outputs(result: Result, out: Path, how: dict[str, Any], onnx: str | None) -> dict[str, Any]:
    p = result.problem
    name = p.name
    artifact = out / f"{name}.rlt"
    nbytes = result.save(artifact)
    skeleton = None if result.spec is not None else p.new_student(0)
    reloaded = load_artifact(artifact, skeleton=skeleton)
    x = p.data.x_test if len(p.data.x_test) else p.data.x_val
    with torch.no_grad():
        same = bool((reloaded(x).argmax(1) == result.model(x).argmax(1)).all())
    if onnx:
        result.export_onnx(onnx)
    shape = p.data.input_shape
    dense = p.new_student(0)
    rep = result.report
    rows = [
        {"model": f"teacher ({type(p.teacher).__name__}, {count_params(p.teacher)} params)",
         "test_acc": rep.get("teacher_test_acc"), "bytes": 4 * count_params(p.teacher),
         "latency_b1_s": measure_latency(p.teacher, shape)["latency_b1_s"],
         "energy_pj": float_energy(p.teacher, shape)["energy_pj"]},
        {"model": f"float student ({count_params(dense)} params)", "test_acc": rep.get("float_test_acc"),
         "bytes": float_bytes(dense), "ratio": 1.0, "latency_b1_s": measure_latency(dense, shape)["latency_b1_s"],
         "energy_pj": float_energy(dense, shape)["energy_pj"]},
        {"model": f"compressed ({rep['sparsity']:.0%} sparse, {rep['bits']:.0f} bits)", "test_acc": rep.get("test_acc"),
         "bytes": nbytes, "ratio": rep["float_bytes"] / nbytes,
         "latency_b1_s": measure_latency(result.compressed, shape)["latency_b1_s"], "energy_pj": rep["energy_pj"]},
    ]
    table = before_after_table(rows)
    report = {"scenario": name, **how, "teacher": rows[0], "float_student": rows[1], "compressed": rows[2],
              "final": rep, "artifact": str(artifact), "artifact_predicts_same": same,
              "onnx": str(onnx) if onnx else None}
    write_atomic(out / f"{name}.json", json.dumps(json_safe(report), indent=1).encode(), "report")
    write_atomic(out / f"{name}.md", f"# {name}: before and after ({how.get('method')})\n\n{table}".encode(), "report")
    return {**report, "table": table, "report_json": str(out / f"{name}.json")}
