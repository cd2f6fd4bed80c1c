"""The public Python API: compress a user's model (or a scenario) and get back a deployable student.

Example usage::

    import rltune
    p = rltune.Problem(teacher, student, train=(x, y), val=(x_val, y_val), test=(x_test, y_test))
    r = rltune.compress(p, target="16x", tuner="recipe", seed=0)   # any tuner of the harness
    r = rltune.replay("ppo-v0", p, target="16x", seed=0)            # a learned policy, one episode
    r.model                  # the user's own class, compressed weights in plain float layers
    r.report                 # test_acc, val_acc, packed_bytes, ratio, sparsity, bits, layers, energy_pj, ...
    r.save("m.rlt")          # the packed artifact; returns its bytes (= report["packed_bytes"])
    r.export_onnx("m.onnx")  # ONNX with int8 weights; predicts what r.model predicts
    m = rltune.load_artifact("m.rlt", skeleton=MyStudent())

Every tuner meets the target by construction and chooses on the val split; ``report`` gives the
test split's figures (``None`` where the problem has no test split). This module is the layer the
command line and the experiment scripts call.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from rltune.errors import RltuneError
from rltune.export import load_artifact, save_artifact
from rltune.harness import ONE_EPISODE as ONE_EPISODE_TUNERS  # the one-episode tuners: one list, the harness's
from rltune.problem import Problem
from rltune.scenario import Scenario

log = logging.getLogger("rltune")

DEFAULT_SEARCH_EPISODES = 16


@dataclass
class Result:
    """A compressed student. ``model`` is a plain module (the student's own class, effective
    weights baked into ordinary layers, eval mode); ``report`` the figures, test split."""

    model: nn.Module
    report: dict[str, Any]
    problem: Problem | None = field(default=None, repr=False)
    compressed: nn.Module | None = field(default=None, repr=False)  # the parametrized student
    spec: dict[str, Any] | None = field(default=None, repr=False)
    input_shape: tuple[int, ...] = ()
    n_classes: int = 0

    def save(self, path: str | os.PathLike) -> int:
        """Write the packed artifact (no pickle); returns the bytes written, ``report["packed_bytes"]``.
        Reload it with ``rltune.load_artifact(path, skeleton=...)`` (no skeleton for a built-in
        architecture)."""
        return save_artifact(self.compressed, path, self.spec, self.input_shape, self.n_classes)

    def export_onnx(self, path: str | os.PathLike) -> int:
        """Write the student as ONNX: weights at 8 bits or fewer as int8 initializers dequantized per
        output channel (``DequantizeLinear``), so the file is smaller than float. Returns its bytes.
        Needs the ``onnx`` package (``pip install 'rltune[onnx]'``)."""
        from rltune.onnx_export import export_onnx

        import torch

        x = torch.zeros(2, *self.input_shape)
        if self.problem is not None and len(self.problem.data.x_val) >= 2:
            x = self.problem.data.x_val[:64]  # traced on 2 rows, checked on up to 64
        info = export_onnx(self.compressed, path, x)
        self.report["onnx_bytes"] = info["onnx_bytes"]
        return int(info["onnx_bytes"])


def as_problem(p: Problem | Scenario | str | os.PathLike) -> Problem:
    if isinstance(p, Problem):
        return p
    if isinstance(p, nn.Module):
        raise RltuneError(f"got a {type(p).__name__} module where a Problem is expected: wrap the teacher, "
                          "student and data in rltune.Problem(...)")
    if isinstance(p, (Scenario, str, os.PathLike)):
        return Problem.from_scenario(p)
    raise RltuneError(f"expected an rltune.Problem, a scenario or a scenario name, got {type(p).__name__}")


def json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [json_safe(x) for x in v]
    return v


def compress(problem: Problem | Scenario | str, target: str | float = "16x", tuner: str = "recipe",
             seed: int = 0, *, episodes: int | None = None, budget_stages: int | None = None,
             agent: str | os.PathLike | None = None, batch: int = 1) -> Result:
    """Compress ``problem``'s student to ``target`` (a ratio ``"16x"``, bytes ``"12KB"`` or energy
    ``"5nJ"``) with ``tuner`` (any of ``rltune.tuners.TUNERS``). One-episode tuners run one episode;
    searchers get ``episodes`` (default 16) or ``budget_stages`` stages of training. ``agent`` (a
    shipped agent's name or a folder) for the ``ppo-*`` tuners. ``batch``: ``random``,
    ``optuna-tpe``, ``ppo-best-of-n`` and ``ppo-warm-tpe`` run that many episodes at once, trained as one batch (several times faster for
    small students on one core; Optuna asks for them together, with TPE's constant liar)."""
    from rltune.budget import Budget
    from rltune.env import DistillCompressEnv
    from rltune.tuners import TUNERS, run_tuner

    if tuner not in TUNERS:
        raise RltuneError(f"unknown tuner {tuner!r} (expected one of {', '.join(TUNERS)})")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 31:
        raise RltuneError(f"seed must be a whole number in 0..2**31-1, got {seed!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise RltuneError(f"batch must be a whole number >= 1 (episodes trained at once), got {batch!r}")
    budget = Budget.parse(target)
    if tuner.startswith("ppo") and agent is None:
        raise RltuneError(f"the {tuner} tuner needs an agent (a shipped name such as 'ppo-v0', or a folder)")
    if agent is not None:
        from rltune.shipped import resolve_agent
        from rltune.tuners import check_agent

        agent = resolve_agent(agent)
        # a bad agent fails here, before any training; its layouts are those of the env version it
        # was trained on (v0, or v1 for per-layer agents such as ppo-v1), as the tuners read them
        check_agent(agent)
    p = as_problem(problem)
    stages = p.scenario.training["stages"]
    if budget_stages is None:
        n = 1 if tuner in ONE_EPISODE_TUNERS else (DEFAULT_SEARCH_EPISODES if episodes is None else episodes)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RltuneError(f"episodes must be a whole number >= 1, got {episodes!r}")
        budget_stages = n * stages
    elif isinstance(budget_stages, bool) or not isinstance(budget_stages, int) or budget_stages < stages:
        raise RltuneError(f"budget_stages must be at least one episode ({stages} stages), got {budget_stages!r}")
    check_feasible(p, budget)
    env = DistillCompressEnv(problems=[p], targets=[str(budget)])
    r = run_tuner(tuner, env, 0, str(budget), seed, budget_stages, agent=agent, batch=batch)
    if r.config.get("diverged"):  # the best episode diverged: every episode did
        raise RltuneError(f"{p.name}: {tuner} at {budget}: no episode finished: {r.config['diverged']}")
    from rltune.metrics import plain_copy

    env = r.env if r.env is not None else env  # a v1 agent played in its own (v1) twin of env
    ctx = env.context(0)
    report = {"name": p.name, "tuner": tuner, "target": str(budget), "seed": seed,
              **json_safe(r.test), "val_acc": r.val_acc, "episodes": r.episodes, "stages_used": r.stages_used,
              "budget_limit": env.meter.limit, "recipe_bits": env.probe_result.recipe_bits,
              "config": json_safe(r.config), "seconds": r.seconds}
    cost = report["energy_pj"] if budget.kind == "energy" else report["packed_bytes"]
    report["budget_used"] = cost / env.meter.limit
    if not len(ctx.data.y_test):
        for k in ("test_acc", "test_agreement", "float_test_acc", "teacher_test_acc", "test_score"):
            report[k] = None
    result = Result(plain_copy(r.state.model), report, p, r.state.model, ctx.student_spec, ctx.input_shape,
                    ctx.n_classes)
    from rltune.compression import warn_scale_range

    warn_scale_range(r.state.model, p.name)
    try:
        import onnx  # noqa: F401
    except ImportError:
        report["onnx_bytes"] = None
    else:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                result.export_onnx(Path(tmp) / "student.onnx")
            except RltuneError as e:  # the model does not export: say so in the report, do not fail
                report["onnx_bytes"] = None
                report["onnx_error"] = str(e)
    log.info("%s: %s at %s: test %s, %d bytes (%.1fx)", p.name, tuner, budget,
             "-" if report["test_acc"] is None else f"{100 * report['test_acc']:.2f} %",
             report["packed_bytes"], report["ratio"])
    return result


def check_feasible(p: Problem, budget) -> None:
    """Refuse, before any training, a target the student cannot meet even at the fewest bits and
    the most sparsity its knobs allow; the message gives the smallest it can be."""
    import copy

    from rltune.budget import SIZING_MARGIN, Meter
    from rltune.compression import float_bytes, prepare_, prune_, set_bits_
    from rltune.metrics import float_energy

    sc = p.scenario
    model = prepare_(copy.deepcopy(p.new_student(0)))
    meter = Meter(budget, p.student_spec, p.input_shape, p.n_classes, float_bytes(model),
                  float_energy(model, p.input_shape)["energy_pj"])
    prune_(model, sparsity=min(sc.knobs["sparsity"][1], 0.999), scope=sc.training["pruning_scope"])
    set_bits_(model, sc.knobs["bits"][0])
    least = meter.cost(model)
    # the tuners size sparsity to SIZING_MARGIN of the limit (the bit-width probe finds no width
    # otherwise, after the float student's distillation): refuse here what they would refuse there
    if least > meter.limit * SIZING_MARGIN:
        unit = "pJ" if budget.kind == "energy" else "bytes"
        near = f", over {SIZING_MARGIN:.0%} of the target that the tuners size to" if least <= meter.limit else ""
        raise RltuneError(f"{p.name}: target {budget} ({meter.limit:.0f} {unit}) cannot be met: at "
                          f"{sc.knobs['bits'][0]} bits and {sc.knobs['sparsity'][1]:.0%} sparsity the student is still "
                          f"{least:.0f} {unit} ({meter.float_cost / least:.1f}x{near}); its uncompressed parameters and "
                          "layer headers set a floor")


def replay(agent: str | os.PathLike, problem: Problem | Scenario | str, target: str | float = "16x",
           seed: int = 0) -> Result:
    """A learned policy compresses ``problem`` in one deterministic episode: no search, no training
    of the policy. ``agent``: a shipped agent's name (``"ppo-v0"``) or an agent folder."""
    return compress(problem, target, tuner="ppo-replay", seed=seed, agent=agent)


__all__ = ["Problem", "Result", "compress", "replay", "load_artifact"]
