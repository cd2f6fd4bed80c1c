"""The Gymnasium environment: one episode compresses one student, one step is one real stage."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from rltune import compression as C
from rltune.budget import Budget, Meter, enforce_, fill_if_better_, required_sparsity
from rltune.context import Context
from rltune.distill import TrainSet, predict, train_epochs
from rltune.errors import DivergedError, RltuneError, UnsupportedArgumentError
from rltune.metrics import accuracy
from rltune.scenario import Scenario, load_scenario
from rltune.stage import Knobs, Metrics, Reference, StudentState, recipe, reference, run_stage, score_of

BITS = (2, 3, 4, 5, 6, 7, 8)
log = logging.getLogger("rltune")
TAU0, ALPHA0, EXPONENT0 = 4.0, 0.9, 3.0

ACTION_LAYOUT = ["final_bits", "ramp_shape", "temperature", "alpha", "bits_drop"]
OBS_LAYOUT = (
    ["log_params", "n_layers", "chance", "teacher_acc", "float_acc", "teacher_gap", "log_target",
     "transfer_ratio", "recipe_bits"]
    + [f"probe_acc_{b}" for b in BITS] + [f"required_sparsity_{b}" for b in BITS]
    + ["progress", "val_acc", "agreement", "sparsity", "bits", "final_bits", "final_sparsity",
       "cost_to_budget", "temperature", "alpha", "stages", "epochs"]
)


def decode_action(a: np.ndarray, recipe_bits: int, stages: int, knob_ranges: dict) -> dict[str, float]:
    """Map a ``Box(-1, 1)`` action to the corrections it makes to the recipe (pure function).

    ``a = 0`` gives exactly the recipe: the probe's bits, the cubic ramp, τ = 4, α = 0.9, the bits
    dropped for the last quarter of the stages.
    """
    a = np.clip(np.asarray(a, dtype=np.float64), -1.0, 1.0)
    lo_b, hi_b = knob_ranges["bits"]
    t_lo, t_hi = knob_ranges["temperature"]
    a_lo, a_hi = knob_ranges["alpha"]
    late0 = max(1, stages // 4)
    alpha = ALPHA0 + a[3] * ((ALPHA0 - a_lo) if a[3] < 0 else (a_hi - ALPHA0))
    return {
        "final_bits": int(np.clip(recipe_bits + int(np.round(2.0 * a[0])), lo_b, hi_b)),
        "exponent": EXPONENT0 * 2.0 ** a[1],
        "temperature": float(np.clip(TAU0 * 2.0 ** (1.5 * a[2]), t_lo, t_hi)),
        "alpha": float(np.clip(alpha, a_lo, a_hi)),
        "late_stages": int(np.clip(int(np.round(late0 * 2.0 ** a[4])), 1, max(1, stages - 1))),
    }


def nearest_feasible(probe: "Probe", bits: int) -> int:
    """The bit-width nearest ``bits`` at which the probe found the target reachable (ties: fewer)."""
    feasible = [x for x in BITS if probe.required.get(x) is not None]
    return bits if bits in feasible else min(feasible, key=lambda x: (abs(x - bits), x))


def ramp(stage: int, stages: int, final: float, exponent: float) -> float:
    """Sparsity at ``stage`` (1-based): ``final · (1 − (1 − k/R)^p)`` up to R = ¾ of the stages."""
    R = max(1, int(round(0.75 * stages)))
    frac = min(stage / R, 1.0)
    return final * (1.0 - (1.0 - frac) ** exponent)


def probe_pick(accuracy: dict[int, float | None], tolerance: float) -> int:
    """The recipe's bit-width rule: the most bits whose probe accuracy is within ``tolerance`` of
    the best (``None``: infeasible at that bit-width)."""
    feasible = {b: a for b, a in accuracy.items() if a is not None}
    top = max(feasible.values())
    return max(b for b, a in feasible.items() if a >= top - tolerance)


def play_offset(env: "DistillCompressEnv", seed: int, options: dict[str, Any], bits_offset: int) -> dict[str, Any]:
    """One v0 episode of the recipe with its final bit-width moved by ``bits_offset`` (-2..2; the
    action's ``final_bits`` entry only, every other entry 0); the last step's info. Raises
    RltuneError if that width is out of the scenario's range or infeasible (the env would play
    the nearest feasible one instead)."""
    env.reset(seed=seed, options=options)
    want = env.probe_result.recipe_bits + bits_offset
    if nearest_feasible(env.probe_result, want) != want:
        raise RltuneError(f"{env.ctx.scenario.name}: {want} bits is out of range or cannot meet {env.budget}")
    a = np.zeros(env.action_space.shape, np.float32)
    a[0] = bits_offset / 2.0
    done, info = False, {}
    while not done:
        _, _, term, trunc, info = env.step(a)
        done = term or trunc
    return info


@dataclass
class Probe:
    """What the first observation tells the policy about a model: per final bit-width, the sparsity
    the budget requires and the val accuracy after a one-shot prune + quantize and a short KD fine-tune."""

    required: dict[int, float | None]
    accuracy: dict[int, float | None]
    recipe_bits: int


class DistillCompressEnv(gym.Env):
    """Compress a student by distillation, pruning and quantization, one real training stage per step.

    ## Description
    Each episode takes a scenario (a teacher, a float32 KD student, data) and a compression target,
    and runs ``S`` stages (the scenario's ``training.stages``). A stage prunes the student by
    magnitude to a target sparsity (masks persist), sets its bit-width, trains it for E epochs of
    distillation with quantization-aware training, and measures it on the val split. The action
    corrects a strong default schedule (the *recipe*: cubic sparsity ramp reaching the sparsity the
    target requires, 8 bits then the final bit-width for the last quarter of the stages, τ = 4,
    α = 0.9, the final bit-width picked by a sensitivity probe: per bit-width, a one-shot prune to the
    sparsity the target needs, 3 epochs of KD on 4096 samples, val accuracy; the recipe takes the
    most bits within 1.5 pt of the best). The zero action is the recipe.

    ## Action Space
    ``Box(-1, 1, (5,), float32)``, decoded by :func:`decode_action`:

    | idx | name        | effect                                                       | when       |
    |-----|-------------|--------------------------------------------------------------|------------|
    | 0   | final_bits  | final bit-width = recipe's + round(2a), within the knob range | step 0 only |
    | 1   | ramp_shape  | ramp exponent p = 3 · 2^a (larger: prune earlier)             | every step |
    | 2   | temperature | τ = 4 · 2^(1.5a), clipped to the knob range                   | every step |
    | 3   | alpha       | α = 0.9 + a · (0.9 − lo or hi − 0.9)                          | every step |
    | 4   | bits_drop   | stages at the final bits = round(S/4 · 2^a), 1..S−1            | step 0 only |

    The final sparsity is not an action: it is the smallest sparsity that meets the target at the
    committed bit-width, so every episode meets its target whatever the policy does.

    ## Observation Space
    ``Box(-5, 5, (35,), float32)``, normalised by the scenario's own reference points so one policy
    can act on models of any size (names in ``OBS_LAYOUT``):

    | idx   | name                  | value                                                        |
    |-------|-----------------------|--------------------------------------------------------------|
    | 0     | log_params            | log10(student parameters) / 6                                |
    | 1     | n_layers              | compressible layers / 10                                     |
    | 2     | chance                | 1 / classes                                                  |
    | 3-5   | teacher_acc, float_acc, teacher_gap | val accuracy of teacher, float student, their gap |
    | 6     | log_target            | log2(target saving factor) / 6                                |
    | 7     | transfer_ratio        | log10(1 + transfer / train samples) / 2                      |
    | 8     | recipe_bits           | the probe's bit-width / 8                                     |
    | 9-15  | probe_acc_b, b=2..8   | probe val accuracy − float val accuracy (−1: infeasible)      |
    | 16-22 | required_sparsity_b   | sparsity the target needs at b bits (1: infeasible)           |
    | 23    | progress              | stages done / S                                               |
    | 24    | val_acc               | current val accuracy − float val accuracy                     |
    | 25    | agreement             | current val agreement with the teacher                        |
    | 26    | sparsity              | current sparsity                                              |
    | 27    | bits                  | current mean bit-width / 8                                    |
    | 28-29 | final_bits, final_sparsity | committed at step 0 (0 before)                           |
    | 30    | cost_to_budget        | log2(current cost / limit) / 6                                |
    | 31-32 | temperature, alpha    | log2(τ / 4), α of the last stage                              |
    | 33-34 | stages, epochs        | S / 20, epochs per stage / 10                                 |

    ## Rewards
    Budget mode (default): 0 on every step but the last, which pays
    ``reward_scale · (val_acc − float_val_acc)``: accuracy at the target, paid once at the end so
    that putting off pruning earns nothing. With ``reward_baseline="recipe"`` (for training) the
    baseline is instead the recipe's own val accuracy on the same scenario, target and float
    student (one cached episode): the zero action then earns about 0 everywhere, and the return
    says only whether the policy beat the recipe. Every step also pays
    ``−action_penalty · reward_scale · mean(a²)``, a trust region around the recipe.
    Trade-off mode: each step pays ``reward_scale ·`` the change in the efficiency score
    (``rltune.score``), so the return is the final score. A stage that diverges ends the episode
    with ``−divergence_penalty · reward_scale``. ``info`` carries every part
    (``reward_accuracy``, ``reward_action``, ``reward_size``, ...).

    ## Starting State
    A scenario and a target drawn with ``self.np_random`` from the lists given; the float student
    of one of ``n_float_students`` seeds; the probe run on it.

    ## Episode End
    Terminates after ``S`` stages (the budget then enforced) or when a stage diverges (NaN loss:
    ``info["diverged"]`` says why). No truncation.

    ## Arguments
    ``scenarios`` (names, paths or ``Scenario`` objects), ``problems`` (:class:`rltune.Problem`
    objects: a user's own teacher, student and data; episodes draw from scenarios and problems
    alike), ``targets`` (budgets to draw from:
    ``"20x"``, ``"12KB"``, ``"5nJ"`` or numbers as ratios), ``mode`` ("budget" or "tradeoff"),
    ``reward_scale`` (20), ``action_penalty`` (0.05), ``divergence_penalty`` (1.0),
    ``n_float_students`` (1), ``probe_samples`` (4096), ``probe_epochs`` (3), ``probe_tolerance``
    (0.015: the recipe takes the most bits whose probe accuracy is this close to the best),
    ``reward_baseline`` ("float" or "recipe"), ``epochs_per_stage``
    (override the scenarios'), ``render_mode`` (None or ``"ansi"``: ``render()`` returns one line
    of text on the episode so far).

    ## Info
    Every ``info`` holds the same keys (``INFO_DEFAULTS``; NaN, 0 or "" until known), so
    ``Monitor(info_keywords=...)`` can log any of them on every episode, diverged ones included.

    ## Pickling
    The env pickles its configuration, not its caches or the running episode (parametrized
    modules cannot be pickled): an unpickled env is reset before it steps.

    ## Version History
    * v0: initial version. Later additions that keep v0's spaces and dynamics: ``problems=``,
      ``render_mode``, the same info keys on every step, a stage whose training collapses the
      student ends the episode as diverged.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        scenarios: Sequence[str | Path | Scenario] | None = None,
        targets: Sequence[str | float] = ("8x", "12x", "16x"),
        mode: str = "budget",
        reward_scale: float = 20.0,
        action_penalty: float = 0.05,
        divergence_penalty: float = 1.0,
        n_float_students: int = 1,
        probe_samples: int = 4096,
        probe_epochs: int = 3,
        probe_tolerance: float = 0.015,
        epochs_per_stage: int | None = None,
        stages: int | None = None,
        reward_baseline: str = "float",
        problems: Sequence[Any] | None = None,
        render_mode: str | None = None,
        fill_budget: bool = True,
    ):
        if mode not in ("budget", "tradeoff"):
            raise RltuneError(f"mode must be 'budget' or 'tradeoff', got {mode!r}")
        if reward_baseline not in ("float", "recipe"):
            raise RltuneError(f"reward_baseline must be 'float' or 'recipe', got {reward_baseline!r}")
        self.reward_baseline = reward_baseline
        self.fill_budget = bool(fill_budget)
        self._baselines: dict[tuple, float] = {}
        from rltune.problem import Problem
        from rltune.shipped import resolve_scenario

        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise UnsupportedArgumentError(f"render_mode must be one of {self.metadata['render_modes']} or None, "
                                           f"got {render_mode!r}")
        self.render_mode = render_mode
        if scenarios is None and problems is None:
            scenarios = ("digits-linear",)
        if isinstance(scenarios, (str, Path, Scenario, Problem, torch.nn.Module)):
            scenarios = [scenarios]
        if isinstance(problems, (Problem, torch.nn.Module)):
            problems = [problems]
        if isinstance(targets, (str, int, float)):
            targets = [targets]
        sources: list[Any] = []
        for s in list(scenarios or []) + list(problems or []):
            if isinstance(s, torch.nn.Module):
                raise RltuneError(f"got a {type(s).__name__} module where a scenario or Problem is expected: "
                                  "wrap your teacher, student and data in rltune.Problem(...) and pass problems=[...]")
            if isinstance(s, (Problem, Scenario)):
                sources.append(s)
            else:
                sources.append(load_scenario(resolve_scenario(s)))
        if not sources or not targets:
            raise RltuneError("the environment needs at least one scenario or problem and one target")
        if stages is not None or epochs_per_stage is not None:
            over = {k: v for k, v in (("stages", stages), ("epochs_per_stage", epochs_per_stage)) if v is not None}
            for i, s in enumerate(sources):
                if isinstance(s, Problem):
                    s = copy.copy(s)
                    s.scenario = s.scenario.replace(training=over)
                    sources[i] = s
                else:
                    sources[i] = s.replace(training=over)
        # what an episode reads of each (settings: stages, knobs, names) is the Scenario
        self.sources = sources
        self.scenarios = [s.scenario if isinstance(s, Problem) else s for s in sources]
        self.budgets = [Budget.parse(t) for t in targets]
        self.mode = mode
        self.reward_scale = float(reward_scale)
        self.action_penalty = float(action_penalty)
        self.divergence_penalty = float(divergence_penalty)
        self.n_float_students = int(n_float_students)
        self.probe_samples = int(probe_samples)
        self.probe_epochs = int(probe_epochs)
        self.probe_tolerance = float(probe_tolerance)
        self.action_space = spaces.Box(-1.0, 1.0, (len(ACTION_LAYOUT),), np.float32)
        self.observation_space = spaces.Box(-5.0, 5.0, (len(OBS_LAYOUT),), np.float32)
        self._contexts: dict[int, Context] = {}
        self._students: dict[tuple[int, int], tuple[torch.nn.Module, Reference]] = {}
        self._probes: dict[tuple, Probe] = {}
        self.ctx: Context | None = None
        self.state: StudentState | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (for subprocess and Ray workers) keeps the configuration and drops what is
        rebuilt on demand: the per-scenario caches and the running episode (its parametrized
        student cannot be pickled). An unpickled env needs ``reset()`` before ``step()``."""
        state = dict(self.__dict__)
        for k in ("_contexts", "_students", "_probes", "_baselines"):
            state[k] = {}
        for k in ("ctx", "state", "plan", "knobs", "last_metrics", "meter", "probe_result"):
            state[k] = None
        return state

    def share_caches(self, other: "DistillCompressEnv") -> None:
        """Use ``other``'s per-scenario caches (contexts, float students, probes, baselines): envs of
        the same scenarios then share one Context, which a batched vectorised env needs."""
        if [s.to_dict() for s in self.scenarios] != [s.to_dict() for s in other.scenarios] or \
                any(a is not b and not isinstance(a, Scenario) for a, b in zip(self.sources, other.sources)):
            raise RltuneError("only envs of the same scenarios and problems can share their caches")
        self._contexts, self._students = other._contexts, other._students
        self._probes, self._baselines = other._probes, other._baselines

    # -- scenario-level caches (computed once, reused by every episode) --------------------------

    def context(self, i: int) -> Context:
        if i not in self._contexts:
            self._contexts[i] = Context.build(self.sources[i])
        return self._contexts[i]

    def float_student(self, i: int, seed: int) -> tuple[torch.nn.Module, Reference]:
        """The float KD student of scenario/problem ``i`` for ``seed`` and its reference figures (cached)."""
        if (i, seed) not in self._students:
            ctx = self.context(i)
            fs = ctx.float_student(seed)
            self._students[(i, seed)] = (fs, reference(ctx, fs))
        return self._students[(i, seed)]

    def probe(self, i: int, seed: int, budget: Budget) -> Probe:
        key = (i, seed, budget)
        if key in self._probes:
            return self._probes[key]
        ctx = self.context(i)
        fs, ref = self.float_student(i, seed)
        meter = self._meter(ctx, ref, budget)
        sc = ctx.scenario
        lo_b, hi_b = sc.knobs["bits"]
        max_s = sc.knobs["sparsity"][1]
        scope = sc.training["pruning_scope"]
        base = C.prepare_(copy.deepcopy(fs))
        n = len(ctx.train_set.y)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(1234))[: self.probe_samples]
        subset = TrainSet(ctx.train_set.x[idx], ctx.train_set.y[idx], ctx.train_set.t_logits[idx])
        required, acc = {}, {}
        log.info("%s @ %s: probing the bit-widths %d..%d (%d epochs on %d samples each)", sc.name, budget,
                 lo_b, hi_b, self.probe_epochs, min(n, self.probe_samples))
        for b in BITS:
            required[b] = acc[b] = None
            if not lo_b <= b <= hi_b:
                continue
            s = required_sparsity(base, b, meter, max_s, scope)
            required[b] = s
            if s is None:
                continue
            trial = copy.deepcopy(fs)
            C.prepare_(trial)
            if s > 0:
                C.prune_(trial, sparsity=s, scope=scope)
            C.set_bits_(trial, b)
            try:
                train_epochs(trial, subset, self.probe_epochs, TAU0, ALPHA0, lr=sc.training["lr"],
                             batch_size=sc.training["batch_size"], generator=torch.Generator().manual_seed(b))
                acc[b] = accuracy(predict(trial, ctx.data.x_val), ctx.data.y_val)
            except DivergedError:
                acc[b] = 0.0
        feasible = [b for b in BITS if acc[b] is not None]
        if not feasible:
            raise RltuneError(f"{sc.name}: target {budget} cannot be met at any bit-width within "
                              f"{sc.knobs['bits']} and sparsity <= {max_s}")
        # the recipe's rule: the most bits whose probe accuracy is within `probe_tolerance` of the
        # best. A short probe underrates how well the gradual ramp recovers from sparsity (measured:
        # the best-probe pick was 1-2 bits too low on 3 of 3 training scenarios), so near-ties go
        # to more bits and less sparsity
        self._probes[key] = Probe(required, acc, probe_pick(acc, self.probe_tolerance))
        return self._probes[key]

    def recipe_val_acc(self, i: int, seed: int, budget: Budget) -> float:
        """Val accuracy of the recipe (zero action) on this scenario, target and float student, with
        a fixed training seed; computed once. The paired baseline of ``reward_baseline="recipe"``."""
        key = (i, seed, budget)
        if key not in self._baselines:
            ctx = self.context(i)
            fs, ref = self.float_student(i, seed)
            p = self.probe(i, seed, budget)
            sc = ctx.scenario
            model = C.prepare_(copy.deepcopy(fs))
            state = StudentState(model, ref, torch.Generator().manual_seed(0), ctx.make_hint(model))
            try:
                meter = self._meter(ctx, ref, budget)
                plan = recipe(sc.training["stages"], p.required[p.recipe_bits], p.recipe_bits)
                for i, knobs in enumerate(plan):
                    state.fill = meter if self.fill_budget and i == len(plan) - 1 else None
                    state.last = i == len(plan) - 1
                    run_stage(ctx, state, knobs)
                enforced = enforce_(state.model, meter, sc.knobs["sparsity"][1], sc.training["pruning_scope"])
                score = lambda m: self._val_acc(m, ctx)  # noqa: E731
                if (fill_if_better_(state.model, meter, score) if self.fill_budget else 0) or enforced:
                    from rltune.stage import measure

                    state.history[-1] = measure(ctx, state)
                self._baselines[key] = state.history[-1].val_acc
            except DivergedError:
                self._baselines[key] = ref.val_acc
        return self._baselines[key]

    def _val_acc(self, model, ctx: Context | None = None) -> float:
        from rltune.distill import predict
        from rltune.metrics import accuracy

        d = (ctx or self.ctx).data
        return accuracy(predict(model, d.x_val), d.y_val)

    @staticmethod
    def _meter(ctx: Context, ref: Reference, budget: Budget) -> Meter:
        return Meter(budget, ctx.student_spec, ctx.input_shape, ctx.n_classes, ref.float_bytes, ref.energy_pj)

    # -- the MDP ---------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        i = int(options["scenario"]) if "scenario" in options else int(self.np_random.integers(len(self.scenarios)))
        budget = Budget.parse(options["target"]) if "target" in options else self.budgets[int(self.np_random.integers(len(self.budgets)))]
        fs_seed = int(options.get("float_seed", self.np_random.integers(self.n_float_students)))
        self.torch_seed = torch_seed = int(self.np_random.integers(2 ** 31 - 1))
        self.ctx = ctx = self.context(i)
        fs, ref = self.float_student(i, fs_seed)
        self.scenario_index, self.budget, self.float_seed = i, budget, fs_seed
        self.meter = self._meter(ctx, ref, budget)
        self.probe_result = self.probe(i, fs_seed, budget)
        model = C.prepare_(copy.deepcopy(fs))
        self.state = StudentState(model, ref, torch.Generator().manual_seed(torch_seed), ctx.make_hint(model))
        self.stages = ctx.scenario.training["stages"]
        self.k = 0
        self.plan: dict[str, Any] | None = None
        self.knobs: Knobs | None = None
        self.last_metrics = None
        self.last_score = 0.0  # the float student's score: no accuracy lost, nothing saved
        self.last_parts: dict[str, float] = {}
        return self._obs(), self._info()

    def step(self, action):
        knobs, parts = self.knobs_for(action)
        return self.advance(knobs, parts)

    def knobs_for(self, action) -> tuple[Knobs, dict[str, float]]:
        """The next stage's knobs for ``action`` (step 0 also commits the plan) and the action's
        reward part: ``step`` is ``advance(*knobs_for(action))``."""
        if self.state is None:
            raise RltuneError("call reset() before step()")
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        dec = decode_action(a, self.probe_result.recipe_bits, self.stages, self.ctx.scenario.knobs)
        if self.plan is None:  # step 0 commits the episode-shaping decisions
            self.commit(dec["final_bits"], dec["late_stages"])
        sparsity = ramp(self.k + 1, self.stages, self.plan["final_sparsity"], dec["exponent"])
        bits = self.plan["final_bits"] if self.k + 1 > self.stages - self.plan["late_stages"] else 8
        knobs = Knobs(dec["temperature"], dec["alpha"], min(sparsity, 0.999), bits)
        penalty = -self.action_penalty * self.reward_scale * float(np.mean(a ** 2))
        return knobs, {"reward_action": penalty}

    def commit(self, final_bits: int, late_stages: int | None = None) -> dict[str, Any]:
        """Fix the episode's final bit-width (the nearest feasible one) and so its final sparsity,
        the smallest that meets the target at those bits. Done by the first step; a tuner that plays
        its own schedule calls it directly."""
        b = nearest_feasible(self.probe_result, final_bits)
        late = late_stages if late_stages is not None else max(1, self.stages // 4)
        self.plan = {"final_bits": b, "final_sparsity": self.probe_result.required[b], "late_stages": late}
        return self.plan

    def advance(self, knobs: Knobs, parts: dict[str, float] | None = None):
        """Run the next stage with these knobs; the Gymnasium step after decoding. Tuners that play
        their own schedules call it too, so every tuner meets the target the same way."""
        self.begin_stage(knobs)
        try:
            m = run_stage(self.ctx, self.state, knobs)
        except DivergedError as e:
            return self.end_stage(e, parts)
        return self.end_stage(m, parts)

    def begin_stage(self, knobs: Knobs) -> None:
        """The bookkeeping before a stage runs (``advance`` = begin_stage, the stage, end_stage; a
        vectorised env runs the stages of many envs as one batch in between)."""
        if self.plan is None:
            raise RltuneError("commit() the final bit-width before the first stage")
        self.k += 1
        self.knobs = knobs
        # the last stage starts from the whole budget: pruned bytes come back before it trains
        self.state.fill = self.meter if self.fill_budget and self.k >= self.stages else None
        self.state.last = self.k >= self.stages

    def end_stage(self, m: "Metrics | DivergedError", parts: dict[str, float] | None = None):
        """The Gymnasium step's result once the stage begun by :meth:`begin_stage` has run: its
        metrics, or the DivergedError it raised."""
        parts = dict(parts or {"reward_action": 0.0})
        sc = self.ctx.scenario
        terminated = self.k >= self.stages
        if isinstance(m, DivergedError):
            e = m
            parts["reward_diverged"] = -self.divergence_penalty * self.reward_scale
            info = self._info(parts)
            info["diverged"] = str(e) or "diverged"
            log.info("%s @ %s: stage %d/%d diverged: %s", sc.name, self.budget, self.k, self.stages, e)
            return self._obs(), float(sum(parts.values())), True, False, info
        enforced, filled = False, 0
        if terminated:
            t0 = time.perf_counter()
            enforced = enforce_(self.state.model, self.meter, sc.knobs["sparsity"][1], sc.training["pruning_scope"])
            filled = fill_if_better_(self.state.model, self.meter, self._val_acc) if self.fill_budget else 0
            if enforced or filled:
                from rltune.stage import measure

                trained = m
                m = measure(self.ctx, self.state, trained.train_loss)
                extra = time.perf_counter() - t0  # pruning the excess is work outside training
                m.seconds = trained.seconds + extra
                m.seconds_outside_training = trained.seconds_outside_training + extra
                self.state.history[-1] = m
        self.last_metrics = m
        log.info("%s @ %s: stage %d/%d: val %.2f %%, %.1f %% sparse, %.1f bits, %.1fx", sc.name, self.budget,
                 self.k, self.stages, 100 * m.val_acc, 100 * m.sparsity, m.bits, m.ratio)
        ref = self.state.ref
        if self.mode == "budget":
            base = ref.val_acc
            if terminated and self.reward_baseline == "recipe":
                base = self.recipe_val_acc(self.scenario_index, self.float_seed, self.budget)
            parts["reward_accuracy"] = self.reward_scale * (m.val_acc - base) if terminated else 0.0
        else:  # each part is the scaled change of that part of the efficiency score
            score, score_parts = score_of(self.ctx, m, ref)
            for name, v in score_parts.items():
                parts[name] = self.reward_scale * (v - self.last_parts.get(name, 0.0))
            self.last_score, self.last_parts = score, score_parts
        reward = sum(parts.values())
        info = self._info(parts)
        info["budget_enforced"] = enforced
        if terminated:
            cost = self.meter.cost(self.state.model)
            info["budget_met"] = cost <= self.meter.limit
            info["budget_used"] = cost / self.meter.limit
            info["budget_filled"] = filled
        return self._obs(), float(reward), terminated, False, info

    # -- observation and info --------------------------------------------------------------------

    def observe(self) -> np.ndarray:
        """The current observation (what ``reset`` and ``step`` return)."""
        return self._obs()

    def render(self) -> str | None:
        """``render_mode="ansi"``: one line of text on the episode so far."""
        if self.render_mode != "ansi" or self.state is None:
            return None
        m = self.last_metrics
        plan = self.plan or {}
        head = f"{self.ctx.scenario.name} @ {self.budget}: stage {self.k}/{self.stages}"
        if m is None:
            return head + f", float val {100 * self.state.ref.val_acc:.2f} %"
        return (head + f", val {100 * m.val_acc:.2f} %, {m.sparsity:.1%} sparse, {m.bits:.1f} bits, "
                f"{m.ratio:.1f}x, final plan {plan.get('final_bits')} bits")

    def _obs(self) -> np.ndarray:
        return self.global_features()

    def global_features(self) -> np.ndarray:
        """The v0 observation (:data:`OBS_LAYOUT`): what v1 puts its per-layer block after."""
        ctx, ref, p = self.ctx, self.state.ref, self.probe_result
        d = ctx.data
        model = self.state.model
        m = self.last_metrics
        static = [
            math.log10(ref.float_bytes / 4) / 6,
            len(C.layers(model)) / 10,
            1.0 / ctx.n_classes,
            ref.teacher_val_acc,
            ref.val_acc,
            ref.teacher_val_acc - ref.val_acc,
            math.log2(max(self.meter.equivalent_ratio, 1e-6)) / 6,
            math.log10(1 + len(d.x_transfer) / max(len(d.y_train), 1)) / 2,
            p.recipe_bits / 8,
        ]
        static += [(p.accuracy[b] - ref.val_acc) if p.accuracy[b] is not None else -1.0 for b in BITS]
        static += [p.required[b] if p.required[b] is not None else 1.0 for b in BITS]
        if m is None:
            cost = self.meter.float_cost
            dyn = [0.0, 0.0, 1.0, 0.0, 32 / 8]
        else:
            cost = (m.energy_pj if self.budget.kind == "energy" else m.packed_bytes)
            dyn = [self.k / self.stages, m.val_acc - ref.val_acc, m.val_agreement, m.sparsity, m.bits / 8]
        dyn += [
            (self.plan["final_bits"] / 8) if self.plan else 0.0,
            self.plan["final_sparsity"] if self.plan else 0.0,
            math.log2(max(cost, 1e-9) / self.meter.limit) / 6,
            math.log2((self.knobs.temperature if self.knobs else TAU0) / TAU0),
            self.knobs.alpha if self.knobs else ALPHA0,
            self.stages / 20,
            ctx.scenario.training["epochs_per_stage"] / 10,
        ]
        obs = np.asarray(static + dyn, dtype=np.float32)
        return np.clip(np.nan_to_num(obs, nan=0.0), -5.0, 5.0)

    def _info(self, parts: dict[str, float] | None = None) -> dict[str, Any]:
        """Every key of ``INFO_DEFAULTS`` in every info (so ``Monitor(info_keywords=...)`` can log any
        of them on any episode, truncated or diverged ones included); NaN / 0 / "" until known."""
        info: dict[str, Any] = dict(INFO_DEFAULTS)
        info.update({"scenario": self.ctx.scenario.name, "target": str(self.budget), "stage": self.k,
                     "recipe_bits": self.probe_result.recipe_bits, "float_val_acc": self.state.ref.val_acc})
        if self.plan:
            info.update({f"plan_{k}": v for k, v in self.plan.items()})
        if self.knobs:
            info.update({"temperature": self.knobs.temperature, "alpha": self.knobs.alpha,
                         "target_sparsity": float(np.mean(self.knobs.sparsity)), "stage_bits": int(self.knobs.max_bits)})
        if self.last_metrics is not None:
            # wall-clock timings stay on ``self.last_metrics``: info is deterministic per seed
            info.update({k: v for k, v in self.last_metrics.to_dict().items() if not k.startswith("seconds")})
        if parts:
            info.update(parts)
        return info


_NAN = float("nan")
INFO_DEFAULTS: dict[str, Any] = {
    "scenario": "", "target": "", "stage": 0, "recipe_bits": 0,
    "val_acc": _NAN, "float_val_acc": _NAN, "val_agreement": _NAN, "packed_bytes": _NAN, "ratio": _NAN,
    "sparsity": _NAN, "bits": _NAN, "nonzero_macs": _NAN, "dense_macs": _NAN, "energy_pj": _NAN,
    "train_loss": _NAN, "latency_b1_s": None,  # latency is measured on the final student only
    "plan_final_bits": 0, "plan_final_sparsity": _NAN, "plan_late_stages": 0,
    "temperature": _NAN, "alpha": _NAN, "target_sparsity": _NAN, "stage_bits": 0,
    "reward_accuracy": 0.0, "reward_action": 0.0, "reward_diverged": 0.0, "reward_floor": 0.0,
    "reward_size": 0.0, "reward_latency": 0.0, "reward_energy": 0.0, "reward_budget": 0.0,
    "budget_enforced": False, "budget_met": False, "budget_filled": 0, "budget_used": 0.0, "diverged": "",
}
