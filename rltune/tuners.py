"""Tuners: anything that, given a scenario, a compression target and a budget of stages of real
training, returns the best compressed student it found (by val), reported on test.

Every tuner plays its episodes through :class:`rltune.env.DistillCompressEnv`, so every one meets
the target the same way (final sparsity from the committed bit-width, excess pruned after the last
stage) and is measured by the same code. One episode costs the scenario's ``S`` stages; a tuner
given ``budget_stages`` runs ``budget_stages // S`` episodes and never more (``stages_used``).

| name           | what it does                                                                     |
|----------------|----------------------------------------------------------------------------------|
| recipe         | the zero action: cubic ramp, 8 bits then the probe's bits late, τ 4, α 0.9 (1 episode) |
| recipe-plus1   | the recipe with one bit more than the probe's pick (a cheap rule; 1 episode)     |
| fixed-8bit     | what a practitioner would do: τ 4, α 0.9, cubic ramp, 8 bits throughout (1 episode) |
| adaptive-tau   | the recipe's ramp and bits; τ from 8, halved whenever val accuracy stalls (1 episode) |
| random         | uniformly random actions at every step, best episode by val                       |
| optuna-const   | Optuna TPE over constant knobs (τ, α, bits; the target's sparsity from stage 1)    |
| optuna-tpe     | Optuna TPE over the schedule's parameters (the 5 action dimensions, held per episode) |
| sensitivity    | zero search: per-layer bits and sparsity from Hessian-trace damage, an exact 0/1    |
|                | program under the budget, then the recipe's ramp and KD (1 episode)               |
| sensitivity-   | the same allocator at the probe's own pick (the recipe's width) when it is 3+     |
| pick           | bits, else one bit more (the width decision measured on v1's training tasks)      |
| owl            | zero search: OWL's per-layer sparsity from outlier ratios, shifted to the budget, |
|                | the sensitivity rule's bit-width, the recipe's ramp and KD (1 episode)            |
| ppo-replay     | a trained policy, one deterministic episode, zero-shot                            |
| ppo-best-of-n  | the policy replayed deterministically once per episode of the budget, each with   |
|                | its own training seed, best by val (the searchers' lottery over training noise)   |
| ppo-warm-tpe   | optuna-tpe whose first trial is the policy's own episode (told to the study)      |
| ppo-finetune   | the trained policy fine-tuned by PPO on this cell for the budget, then replayed   |
"""

from __future__ import annotations

import math
import time
import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from rltune.env import ALPHA0, TAU0, DistillCompressEnv
from rltune.errors import RltuneError
from rltune.stage import Knobs, final_report


@dataclass
class TuneResult:
    tuner: str
    scenario: str
    target: str
    seed: int
    budget_stages: int
    stages_used: int
    episodes: int
    val_acc: float
    val_score: float
    test: dict[str, Any]
    config: dict[str, Any]
    episode_val_accs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    state: Any = field(default=None, repr=False, compare=False)  # the best student (not serialised)
    # every new best by val as it appeared: {"episode": 0-based index, "val_acc", "val_score",
    # "test_acc", "test_score"} (the test figures are the report's; nothing chooses on them)
    improvements: list[dict[str, Any]] = field(default_factory=list)
    # the anytime curve: for N = 1, 2, 4, ... (and the episodes run), the best-by-val student of
    # the first N episodes: {"episodes": N, "best_episode", "val_acc", "val_score", "test_acc", "test_score"}
    anytime: list[dict[str, Any]] = field(default_factory=list)
    # stage-equivalents of training spent on the cell's bit-width probe (once per cell, every tuner)
    probe_stages: float = 0.0
    # the env the episodes were played in: the caller's, or the v1 twin a v1 agent plays in (its
    # meter and probe are the ones the result was measured with; not serialised)
    env: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in ("state", "env")}


class Session:
    """Runs episodes of one (scenario, target, seed) cell and keeps the best by val."""

    def __init__(self, env: DistillCompressEnv, scenario: int, target: str, seed: int, budget_stages: int):
        self.env, self.scenario, self.target, self.seed = env, scenario, target, seed
        self.budget_stages = budget_stages
        self.stages_used = 0
        self.best: tuple[float, Any, dict] | None = None
        self.best_test: dict[str, Any] | None = None  # the test report of ``best``'s student
        self.improvements: list[dict[str, Any]] = []  # every new best as it appeared (TuneResult.improvements)
        self.val_accs: list[float] = []
        self.val_scores: list[float] = []

    @property
    def stages_per_episode(self) -> int:
        return self.env.scenarios[self.scenario].training["stages"]

    def can_run(self) -> bool:
        return self.stages_used + self.stages_per_episode <= self.budget_stages

    def _reset(self) -> None:
        if not self.can_run():
            raise RltuneError("stage budget exhausted")
        n = len(self.val_accs)
        self.env.reset(seed=self.seed * 100_003 + n,
                       options={"scenario": self.scenario, "target": self.target, "float_seed": self.seed})

    def _finish(self, info: dict, config: dict, env: DistillCompressEnv | None = None) -> float:
        env = env or self.env
        self.stages_used += env.k
        acc = info["val_acc"] if not info.get("diverged") else -1.0
        if not math.isfinite(acc):
            acc = -1.0
        from rltune.stage import score_of

        m = env.last_metrics
        score = score_of(env.ctx, m, env.state.ref)[0] if m is not None and not info.get("diverged") else -math.inf
        key = score if env.mode == "tradeoff" else acc
        self.val_accs.append(acc)
        self.val_scores.append(score)
        if info.get("diverged"):
            config = dict(config, diverged=info["diverged"])
        if self.best is None or key > self.best[0]:
            # env.reset gives every episode a new StudentState, so this one is never touched again;
            # its test report is taken now (the test split read for the report only), so the best
            # of every first N episodes is known without rerunning them
            self.best = (key, env.state, dict(config, val_acc=acc, val_score=score))
            self.best_test = final_report(self.env.context(self.scenario), env.state, latency=False)
            self.best_test["budget_used"] = env.meter.cost(env.state.model) / env.meter.limit
            self.improvements.append({"episode": len(self.val_accs) - 1, "val_acc": acc, "val_score": score,
                                      "test_acc": self.best_test["test_acc"],
                                      "test_score": self.best_test["test_score"]})
        return key

    def batch_room(self, k: int) -> int:
        """How many of ``k`` episodes the remaining stage budget allows."""
        return max(0, min(k, (self.budget_stages - self.stages_used) // self.stages_per_episode))

    def play_batch(self, policies: list[Callable[[np.ndarray, int], np.ndarray]], configs: list[dict]) -> list[float]:
        """Episodes ``len(policies)`` at once: the same seeds, knobs and measurements as playing them
        one after another, their stages trained as one batch (:mod:`rltune.batched`). Returns each
        episode's key (val accuracy, or score in trade-off mode)."""
        from rltune.batched import run_stages_batched

        K = len(policies)
        if K == 0 or self.batch_room(K) < K:
            raise RltuneError("stage budget exhausted")
        n0 = len(self.val_accs)
        envs = [self.env] + [copy.copy(self.env) for _ in range(K - 1)]  # shallow: one set of caches
        for j, env in enumerate(envs):
            env.reset(seed=self.seed * 100_003 + n0 + j,
                      options={"scenario": self.scenario, "target": self.target, "float_seed": self.seed})
        obs = [env.observe() for env in envs]
        infos: list[dict | None] = [None] * K
        k = 0
        while any(i is None for i in infos):
            active = [j for j in range(K) if infos[j] is None]
            steps = [envs[j].knobs_for(policies[j](obs[j], k)) for j in active]
            for j, (knobs, _) in zip(active, steps):
                envs[j].begin_stage(knobs)
            outs = run_stages_batched(envs[active[0]].ctx, [envs[j].state for j in active], [kn for kn, _ in steps])
            for j, (_, parts), m in zip(active, steps, outs):
                obs[j], _, term, trunc, info = envs[j].end_stage(m, parts)
                if term or trunc:
                    infos[j] = info
            k += 1
        return [self._finish(info, cfg, env) for info, cfg, env in zip(infos, configs, envs)]

    def play_actions(self, policy: Callable[[np.ndarray, int], np.ndarray], config: dict) -> float:
        """An episode of env steps; ``policy(obs, k)`` gives the action of step k."""
        self._reset()
        obs = self.env.observe()
        done, k, info = False, 0, {}
        while not done:
            obs, _, term, trunc, info = self.env.step(policy(obs, k))
            done, k = term or trunc, k + 1
        return self._finish(info, config)

    def play_knobs(self, final_bits: int | None, knobs_at: Callable[[int, float], Knobs], config: dict,
                   late_stages: int | None = None) -> float:
        """An episode of a tuner's own schedule: ``knobs_at(stage, final_sparsity)``; ``final_bits``
        None: the recipe's probe pick (known once the episode is reset)."""
        self._reset()
        if final_bits is None:
            final_bits = self.env.probe_result.recipe_bits
        plan = self.env.commit(final_bits, late_stages)
        done, k, info = False, 0, {}
        while not done:
            k += 1
            _, _, term, trunc, info = self.env.advance(knobs_at(k, plan["final_sparsity"]))
            done = term or trunc
        return self._finish(info, {**config, "final_bits": plan["final_bits"]})

    def result(self, tuner: str, t0: float) -> TuneResult:
        if self.best is None:
            raise RltuneError(f"{tuner}: the budget of {self.budget_stages} stages is less than one episode "
                              f"({self.stages_per_episode} stages)")
        _, state, config = self.best
        env = self.env
        return TuneResult(tuner, env.scenarios[self.scenario].name, str(self.target), self.seed,
                          self.budget_stages, self.stages_used, len(self.val_accs), config["val_acc"],
                          config["val_score"], self.best_test, config, self.val_accs, time.perf_counter() - t0,
                          state, improvements=list(self.improvements),
                          anytime=anytime_curve(self.improvements, len(self.val_accs)),
                          probe_stages=probe_stages(env), env=env)


def anytime_points(episodes: int) -> list[int]:
    """N = 1, 2, 4, ... up to ``episodes``, and ``episodes`` itself when it is not a power of two."""
    ns, n = [], 1
    while n <= episodes:
        ns.append(n)
        n *= 2
    if episodes >= 1 and ns[-1] != episodes:
        ns.append(episodes)
    return ns


def anytime_curve(improvements: list[dict[str, Any]], episodes: int) -> list[dict[str, Any]]:
    """For each N of :func:`anytime_points`, the best by val of the first N episodes, from the
    record of new bests (``improvements``, in episode order): no episode is rerun."""
    out = []
    for n in anytime_points(episodes):
        seen = [r for r in improvements if r["episode"] < n]
        if seen:
            b = seen[-1]
            out.append({"episodes": n, "best_episode": b["episode"], "val_acc": b["val_acc"],
                        "val_score": b["val_score"], "test_acc": b["test_acc"], "test_score": b["test_score"]})
    return out


def probe_stages(env: DistillCompressEnv) -> float:
    """What the env's bit-width probe trained for this cell, in stages: per feasible bit-width
    ``probe_epochs`` epochs on at most ``probe_samples`` samples, against a stage's
    ``epochs_per_stage`` epochs on the whole training set (sample-epochs over sample-epochs). The
    probe runs once per cell (cached), whatever the tuner, so every tuner of a cell pays the same."""
    p = getattr(env, "probe_result", None)
    if p is None or env.ctx is None:
        return 0.0
    n = len(env.ctx.train_set.y)
    feasible = sum(1 for r in p.required.values() if r is not None)
    return feasible * env.probe_epochs * min(n, env.probe_samples) / (env.ctx.scenario.training["epochs_per_stage"] * n)


def tune_recipe(s: Session, bits8: bool = False) -> None:
    if bits8:  # a practitioner's fixed recipe: 8 bits throughout, cubic ramp, τ 4, α 0.9
        S = s.stages_per_episode
        from rltune.env import ramp

        s.play_knobs(8, lambda k, sf: Knobs(TAU0, ALPHA0, min(ramp(k, S, sf, 3.0), 0.999), s.env.plan["final_bits"]),
                     {"bits": 8}, late_stages=S)
    else:
        s.play_actions(lambda obs, k: np.zeros(s.env.action_space.shape, np.float32), {"action": [0.0] * 5})


def tune_recipe_plus1(s: Session) -> None:
    """The recipe at one bit more than the probe's pick (the nearest feasible bit-width): the cheap
    rule that experiments/recipe_bits.py found best on the training scenarios."""
    a = np.zeros(s.env.action_space.shape, np.float32)
    a[0] = 0.5  # decode_action: final bits = recipe bits + round(2 * 0.5)
    s.play_actions(lambda obs, k: a if k == 0 else np.zeros_like(a), {"action": a.tolist()})


def tune_adaptive_tau(s: Session, start: float = 8.0, decay: float = 0.5, floor: float = 1.0) -> None:
    """The recipe's sparsity and bits, with τ starting at ``start`` and multiplied by ``decay``
    whenever the last stage did not raise val accuracy (the seeds' adaptive temperature schedule)."""
    from rltune.env import ramp

    S = s.stages_per_episode
    tau = {"value": start, "best": -1.0}

    def knobs_at(k: int, sf: float) -> Knobs:
        hist = s.env.state.history
        if hist:
            if hist[-1].val_acc <= tau["best"]:
                tau["value"] = max(floor, tau["value"] * decay)
            tau["best"] = max(tau["best"], hist[-1].val_acc)
        bits = s.env.plan["final_bits"] if k > S - s.env.plan["late_stages"] else 8
        return Knobs(tau["value"], ALPHA0, min(ramp(k, S, sf, 3.0), 0.999), bits)

    s.play_knobs(None, knobs_at, {"tau_start": start, "decay": decay})


# sensitivity-pick: the probe's own pick is kept from this many bits up (below, one bit more). On v1
# training tasks (experiments/results/learning-v1-16k/cut_effect.json, 109 tasks, the allocator's
# split at both widths) playing the pick rather than one bit more cost 1.3 pt where the pick was 2
# bits (22 tasks) and paid 0.1 to 0.9 pt at 3 to 7 bits; on the 24 held-out generated cells it
# measured 82.45 % against sensitivity's 82.58 (experiments/results/anytime-v1-pick)
PICK_MIN_BITS = 3


def tune_sensitivity(s: Session, width: str = "plus1") -> None:
    """The zero-search allocator (:func:`rltune.layer_sensitivity.allocate`): per-layer final
    sparsity minimising the *measured* one-shot damage (val loss with only that layer pruned and
    quantized, no training) under the budget, by an exact 0/1 program; the bit-width is the
    probe's pick plus one, uniform (per-layer widths chosen the same way measured worse: 87.8 vs
    88.2 on synthetic-10class @32x, 72.9 vs 76.4 on synthetic-8class @24x, 3 seeds). Reached by
    the recipe's cubic ramp per layer, 8 bits until the last quarter of the stages, τ 4, α 0.9.
    Every layer's sparsity stays within ``TRUST_RADIUS`` of where the recipe's magnitude pruning at
    the same width puts it: the rule starts from ``recipe-plus1``'s split and tilts it.
    Costs one episode; its probes are evaluations only (no training, no stages).

    ``width="pick"`` (the ``sensitivity-pick`` tuner): the same allocator at the probe's own pick
    (the recipe's width) when that is at least :data:`PICK_MIN_BITS`, else one bit more: the width
    decision measured on v1's training tasks, tested on tasks it was not found on."""
    s._reset()
    env = s.env
    fs, _ = env.float_student(s.scenario, env.float_seed)
    from rltune.env import nearest_feasible

    pick = env.probe_result.recipe_bits
    if width == "pick" and pick >= PICK_MIN_BITS:
        b = pick
    else:
        b = nearest_feasible(env.probe_result, pick + 1)
    bits, sps, info = sensitivity_split(env, fs, b)
    _play_per_layer(s, bits, sps, {"bits": list(bits), "sparsity": list(sps), "predicted_damage": info["predicted_damage"],
                                   "top_up": info.get("top_up"), "width_rule": width})


def sensitivity_split(env: DistillCompressEnv, fs, width: int):
    """The ``sensitivity`` rule's per-layer ``(bits, sparsities, info)`` for float student ``fs``
    of ``env``'s current episode at ``width`` bits: :func:`rltune.layer_sensitivity.allocate` under
    the budget, damage measured on val, around the recipe's global split at that width. The
    ``sensitivity`` tuner plays it, and v1's ``zero_rule="sensitivity"`` takes its split."""
    from rltune.layer_sensitivity import allocate

    d = env.ctx.data
    around = magnitude_split(fs, env.probe_result.required[width], env.ctx.scenario)
    return allocate(fs, None, env.meter.cost, env.meter.limit * 0.97, bits=(width,), val=(d.x_val, d.y_val),
                    around=around)


def magnitude_split(model, sparsity: float, scenario) -> list[float]:
    """Each compressible layer's sparsity when ``model`` is magnitude-pruned to ``sparsity`` the
    way the recipe prunes it (the scenario's pruning scope): where ``recipe-plus1`` puts each layer."""
    from rltune import compression as C

    m = C.prepare_(copy.deepcopy(model))
    if sparsity > 0:
        C.prune_(m, sparsity=sparsity, scope=scenario.training["pruning_scope"])
    return [float(1.0 - l.compressor.mask.float().mean()) for l in C.layers(m)]


def _play_per_layer(s: Session, bits: tuple[int, ...], sps: tuple[float, ...], config: dict) -> None:
    """One episode reaching per-layer final sparsities ``sps`` and bit-widths ``bits`` (after the
    reset): the recipe's cubic ramp per layer, 8 bits until the last quarter, τ 4, α 0.9."""
    from rltune.stage import cubic_sparsity

    env = s.env
    env.commit(max(bits))
    S = s.stages_per_episode
    ramp_n = max(1, int(round(0.75 * S)))
    late = max(1, S // 4)
    done, k, last = False, 0, {}
    while not done:
        k += 1
        knobs = Knobs(TAU0, ALPHA0, tuple(min(cubic_sparsity(k, x, ramp_n), 0.999) for x in sps),
                      tuple(b if k > S - late else 8 for b in bits))
        _, _, term, trunc, last = env.advance(knobs)
        done = term or trunc
    s._finish(last, config)


def tune_owl(s: Session) -> None:
    """OWL-style zero-search rule (:func:`rltune.layer_sensitivity.owl_allocate`): per-layer
    sparsity from each layer's outlier ratio (λ 0.08, M 5, OWL's defaults) around where the recipe's
    magnitude pruning puts each layer, a common shift bisected to the budget, at the probe's pick
    plus one bit (as ``sensitivity``), then the same ramp and KD.
    One episode; no probes beyond the env's."""
    from rltune.layer_sensitivity import owl_allocate

    s._reset()
    env = s.env
    fs, _ = env.float_student(s.scenario, env.float_seed)
    from rltune.env import nearest_feasible

    req = env.probe_result.required
    width = nearest_feasible(env.probe_result, env.probe_result.recipe_bits + 1)
    sps, info = owl_allocate(fs, env.meter.cost, env.meter.limit * 0.97, width,
                             centres=magnitude_split(fs, req[width], env.ctx.scenario))
    bits = tuple(width for _ in sps)
    _play_per_layer(s, bits, sps, {"bits": list(bits), "sparsity": list(sps), "outlier_ratios": info["outlier_ratios"],
                                   "centres": info["centres"]})


def tune_random(s: Session, batch: int = 1) -> None:
    rng = np.random.default_rng(s.seed)
    while batch > 1 and s.batch_room(batch) > 1:
        k = s.batch_room(batch)
        s.play_batch([lambda obs, step, r=np.random.default_rng(rng.integers(2 ** 63)):
                      r.uniform(-1, 1, s.env.action_space.shape).astype(np.float32) for _ in range(k)],
                     [{"random": True}] * k)
    while s.can_run():
        s.play_actions(lambda obs, k: rng.uniform(-1, 1, s.env.action_space.shape).astype(np.float32),
                       {"random": True})


RUN_ATTR = "rltune_run"


def study_name(prefix: str, tuner: str, scenario: str, target: str, seed: int, episodes: int) -> str:
    return f"{prefix}-{tuner}-{scenario}-{target}-{seed}-{episodes}ep"


def own_study(storage: str, name: str, run_id: str, fresh: bool):
    """The study ``name`` created (or, with ``fresh``, made again) for the evaluation ``run_id``;
    an existing study that another run created is left alone: RltuneError."""
    import optuna

    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        if existing.user_attrs.get(RUN_ATTR) != run_id:
            raise RltuneError(f"the Optuna study {name!r} already exists in {storage.split('://')[0]} storage and "
                              "this evaluation did not create it: it is left alone; pass another --study-prefix")
        if not fresh:
            return existing
        optuna.delete_study(study_name=name, storage=storage)
    study = optuna.create_study(direction="maximize", storage=storage, study_name=name)
    study.set_user_attr(RUN_ATTR, run_id)
    return study


def _optuna_study(s: Session, name: str, storage: str | None, sampler_seed: int | None = None,
                  study_episodes: int | None = None, study_prefix: str = "rltune", run_id: str | None = None,
                  constant_liar: bool = False, sampler_seed_offset: int = 0):
    """The cell's study, named ``PREFIX-tuner-scenario-target-seed-Nep`` (cells of other budgets
    never share one). Several processes may share it (same storage, same name: the parts of one
    cell, ``sampler_seed`` set, each with its own seed); ``study_episodes`` is the whole study's
    episode budget (it sets the random start). ``sampler_seed_offset`` is added to the sampler's
    seed (the episodes' training seeds stay the cell's): the same tuner's search drawn afresh.

    A study is marked with the evaluation's ``run_id`` (user attribute ``rltune_run``) when this
    run creates it. A cell run whole starts afresh: a study of that name that this evaluation
    created (an interrupted earlier attempt: its students were not kept) is deleted and made again;
    one it did not create is never deleted or joined: that is an error (use another prefix)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    episodes = study_episodes or s.budget_stages // s.stages_per_episode
    seed = (s.seed if sampler_seed is None else sampler_seed) + sampler_seed_offset
    sampler = optuna.samplers.TPESampler(seed=seed,
                                         n_startup_trials=min(8, max(1, episodes // 4)),
                                         constant_liar=constant_liar)
    name = study_name(study_prefix, name, s.env.scenarios[s.scenario].name, s.target, s.seed, episodes)
    if storage is not None:
        # a whole cell starts afresh; the parts of a split cell join the study the harness made
        own_study(storage, name, run_id or "", fresh=sampler_seed is None)
    return optuna.create_study(direction="maximize", sampler=sampler, storage=storage,
                               study_name=name, load_if_exists=storage is not None)


def tune_optuna_const(s: Session, storage: str | None = None, **study: Any) -> None:
    """Constant knobs for every stage: τ, α and the bits; the target's sparsity from stage 1."""
    sc = s.env.scenarios[s.scenario]
    study = _optuna_study(s, "optuna-const", storage, **study)
    S = s.stages_per_episode
    while s.can_run():
        trial = study.ask()
        tau = trial.suggest_float("temperature", *sc.knobs["temperature"], log=True)
        alpha = trial.suggest_float("alpha", *sc.knobs["alpha"])
        bits = trial.suggest_int("bits", *sc.knobs["bits"])
        value = s.play_knobs(bits, lambda k, sf: Knobs(tau, alpha, min(sf, 0.999), s.env.plan["final_bits"]),
                             {"temperature": tau, "alpha": alpha, "bits": bits}, late_stages=S)
        _trial_attrs(trial, s)
        study.tell(trial, value)


def tune_optuna_schedule(s: Session, storage: str | None = None, batch: int = 1, **study: Any) -> None:
    """The schedule's parameters: the 5 action dimensions (bits, ramp shape, τ, α, when bits drop).
    ``batch`` > 1: trials asked ``batch`` at a time (TPE's constant liar keeps them apart), their
    episodes run as one batched computation, then told."""
    study = _optuna_study(s, "optuna-tpe", storage, constant_liar=batch > 1, **study)
    _schedule_trials(s, study, batch)


def _schedule_trials(s: Session, study, batch: int = 1) -> None:
    """optuna-tpe's trials until the budget is spent: one action vector in [-1, 1]^5 per trial
    (params ``action_<name>``), held for every step of its episode."""
    from rltune.env import ACTION_LAYOUT

    while batch > 1 and s.batch_room(batch) > 1:
        trials = [study.ask() for _ in range(s.batch_room(batch))]
        acts = [np.array([t.suggest_float(f"action_{n}", -1.0, 1.0) for n in ACTION_LAYOUT], np.float32)
                for t in trials]
        values = s.play_batch([lambda obs, k, a=a: a for a in acts], [{"action": a.tolist()} for a in acts])
        for t, a, v in zip(trials, acts, values):
            t.set_user_attr("val_acc", v)
            study.tell(t, v)
    while s.can_run():
        trial = study.ask()
        a = np.array([trial.suggest_float(f"action_{n}", -1.0, 1.0) for n in ACTION_LAYOUT], np.float32)
        value = s.play_actions(lambda obs, k: a, {"action": a.tolist()})
        _trial_attrs(trial, s, a)
        study.tell(trial, value)


def _trial_attrs(trial, s: Session, action: np.ndarray | None = None) -> None:
    """What the trial's episode did, decoded, as the trial's user attributes (its params are the
    searched values; for optuna-tpe raw actions in [-1, 1])."""
    for k, v in _episode_attrs(s, action).items():
        trial.set_user_attr(k, v)


def _episode_attrs(s: Session, action: np.ndarray | None = None) -> dict[str, Any]:
    """The last episode's figures for a trial's user attributes (non-finite values left out)."""
    from rltune.env import decode_action

    env = s.env
    attrs: dict[str, Any] = {"val_acc": s.val_accs[-1], "final_bits": (env.plan or {}).get("final_bits"),
                             "final_sparsity": (env.plan or {}).get("final_sparsity")}
    if action is not None:
        dec = decode_action(action, env.probe_result.recipe_bits, env.stages, env.ctx.scenario.knobs)
        attrs.update({"knobs": {k: (float(v) if isinstance(v, float) else v) for k, v in dec.items()}})
    m = env.last_metrics
    if m is not None:
        attrs.update({"packed_bytes": int(m.packed_bytes), "ratio": float(m.ratio), "sparsity": float(m.sparsity),
                      "bits": float(m.bits)})
    return {k: v for k, v in attrs.items() if v is not None and not (isinstance(v, float) and not math.isfinite(v))}


V1 = "rltune/DistillCompress-v1"


def _env_id(agent) -> str:
    return (agent.meta.get("training") or {}).get("env_id") or "rltune/DistillCompress-v0"


def _trained_env(agent) -> dict[str, Any]:
    """The v1 env options the agent was trained with (``training.env`` in its agent.json)."""
    return (agent.meta.get("training") or {}).get("env") or {}


def _check_training(agent, where: str) -> None:
    """What the tuners read from an agent.json's free-form ``training`` object, checked before any
    training: ``env_id`` one of rltune's env ids, and for a v1 agent ``env`` an object whose
    ``zero_rule`` and deadzones are the env's. A malformed value was an AttributeError traceback
    (``env`` not an object) or an error naming no file; an unknown ``env_id`` was taken as v0."""
    from rltune.env_v1 import check_zero_rule_options
    from rltune.registration import ENV_IDS

    training = agent.meta.get("training") or {}
    env_id = training.get("env_id")
    if env_id is not None and env_id not in ENV_IDS:
        raise RltuneError(f"{where}: field 'training.env_id' must be one of {', '.join(ENV_IDS)}, got {env_id!r}")
    if env_id != V1:
        return
    env = training.get("env")
    if env is not None and not isinstance(env, dict):
        raise RltuneError(f"{where}: field 'training.env' must be an object, got {type(env).__name__}")
    env = env or {}
    try:
        check_zero_rule_options(env.get("zero_rule", "plus1"), env.get("tilt_deadzone"), env.get("schedule_deadzone"))
    except RltuneError as e:
        raise RltuneError(f"{where}: field 'training.env': {e}") from None


def _load_agent(agent_path: str | Path):
    """The agent's policy, refused unless its observation and action layouts are those of the env
    version it was trained on (v0 or v1, ``training.env_id`` in its agent.json)."""
    from rltune.agentfile import check_layouts, load_policy
    from rltune.shipped import resolve_agent
    from rltune.train import layouts

    folder = resolve_agent(agent_path)
    agent = load_policy(folder)
    _check_training(agent, str(Path(folder) / "agent.json"))
    check_layouts(agent, *layouts(_env_id(agent)))
    return agent


def check_agent(agent_path: str | Path):
    """The public face of :func:`_load_agent` (the API and the command line call it before any
    training): the policy, or one RltuneError line if its layouts are not its env version's."""
    return _load_agent(agent_path)


def _policy_env(s: Session, agent) -> DistillCompressEnv:
    """The env the agent's episodes run in: the Session's own for a v0 agent; for a v1 agent
    (per-layer observation and actions) a :class:`rltune.env_v1.DistillCompressEnvV1` of the same
    scenarios and settings sharing its caches, with the ``zero_rule`` and deadzones it was
    trained with (``training.env`` in its agent.json). The Session plays in it from here on (:func:`tune_ppo_warm_tpe` switches back)."""
    from rltune.env_v1 import DistillCompressEnvV1

    if _env_id(agent) == V1 and not isinstance(s.env, DistillCompressEnvV1):
        trained = _trained_env(agent)  # the zero rule it was paid against (checked by _load_agent)
        s.env = DistillCompressEnvV1.like(s.env, zero_rule=trained.get("zero_rule", "plus1"),
                                          tilt_deadzone=trained.get("tilt_deadzone"),
                                          schedule_deadzone=trained.get("schedule_deadzone"))
    return s.env


def tune_ppo_replay(s: Session, agent_path: str | Path) -> None:
    agent = _load_agent(agent_path)
    _policy_env(s, agent)
    s.play_actions(lambda obs, k: agent.predict(obs, deterministic=True), {"agent": str(agent_path)})


def tune_ppo_best_of_n(s: Session, agent_path: str | Path, batch: int = 1) -> None:
    """The policy replayed deterministically as many episodes as the budget allows, each with its
    own training seed (the Session's per-episode seed), best by val: the lottery over training
    noise that every search trial gets, given to the policy. Its first episode is ``ppo-replay``'s.
    ``batch`` > 1: the episodes run ``batch`` at a time as one batched computation."""
    agent = _load_agent(agent_path)
    _policy_env(s, agent)
    act = lambda obs, k: agent.predict(obs, deterministic=True)  # noqa: E731
    while batch > 1 and s.batch_room(batch) > 1:
        k = s.batch_room(batch)
        s.play_batch([act] * k, [{"agent": str(agent_path), "replay": len(s.val_accs) + j} for j in range(k)])
    while s.can_run():
        s.play_actions(act, {"agent": str(agent_path), "replay": len(s.val_accs)})


def tune_ppo_warm_tpe(s: Session, agent_path: str | Path, storage: str | None = None, batch: int = 1,
                      **study: Any) -> None:
    """Optuna TPE over optuna-tpe's search space (the 5 action dimensions, one vector held for the
    whole episode), its first trial the policy's own episode.

    The policy acts per step (each action depends on what the stages so far measured), which one
    held action vector cannot express: an enqueued trial would replay a different schedule. So
    the first trial *is* the policy's deterministic episode (``ppo-replay``'s, at the same seed),
    handed to the study with ``study.add_trial`` as a finished trial whose value is that episode's
    val and whose params are the held action nearest it: ``final_bits`` and ``bits_drop`` as the
    policy chose them at step 0 (they act only then), ``ramp_shape``, ``temperature`` and ``alpha``
    averaged over its steps. Its per-step actions are the trial's user attribute
    ``policy_actions``. TPE models from there; the rest is optuna-tpe's search (``batch`` > 1:
    trials asked ``batch`` at a time with the constant liar, their episodes batched)."""
    import optuna

    from rltune.env import ACTION_LAYOUT

    agent = _load_agent(agent_path)
    study = _optuna_study(s, "ppo-warm-tpe", storage, constant_liar=batch > 1, **study)
    if not s.can_run():
        return  # less than one episode: Session.result says so
    actions: list[np.ndarray] = []

    def act(obs, k):
        a = np.asarray(agent.predict(obs, deterministic=True), np.float32)
        actions.append(np.clip(a, -1.0, 1.0))
        return a

    own = s.env
    _policy_env(s, agent)
    value = s.play_actions(act, {"agent": str(agent_path), "policy_trial": True})
    steps = np.stack(actions)[:, : len(ACTION_LAYOUT)]  # a v1 policy's per-layer entries have no place in TPE's space
    held = steps.mean(axis=0)
    for once in ("final_bits", "bits_drop"):
        held[ACTION_LAYOUT.index(once)] = steps[0, ACTION_LAYOUT.index(once)]
    attrs = _episode_attrs(s)
    if s.env is not own:  # a v1 policy: its bits are decoded around recipe-plus1, TPE's around the recipe
        plan, probe = s.env.plan, s.env.probe_result
        held[ACTION_LAYOUT.index("final_bits")] = (plan["final_bits"] - probe.recipe_bits) / 2.0
        s.env = own
    attrs.update(policy=str(agent_path), policy_actions=steps.astype(float).tolist())
    dist = optuna.distributions.FloatDistribution(-1.0, 1.0)
    study.add_trial(optuna.trial.create_trial(
        params={f"action_{n}": float(np.clip(held[i], -1.0, 1.0)) for i, n in enumerate(ACTION_LAYOUT)},
        distributions={f"action_{n}": dist for n in ACTION_LAYOUT}, value=value, user_attrs=attrs))
    _schedule_trials(s, study, batch)


class CellEnv(gym.Env):
    """A Session's cell as a Gymnasium env for SB3: every reset starts an episode of this scenario,
    target and float student, and every finished episode is a candidate (best by val). A reset when
    fewer than ``reserve + S`` stages are left runs nothing and sets ``exhausted``, so a callback can
    stop learning before another stage is trained."""

    def __init__(self, s: Session, reserve: int = 0):
        self.s, self.reserve = s, reserve
        self.observation_space = s.env.observation_space
        self.action_space = s.env.action_space
        self.exhausted = False
        self.episodes = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        s = self.s
        if s.stages_used + s.stages_per_episode + self.reserve > s.budget_stages:
            self.exhausted = True
            return np.zeros(self.observation_space.shape, np.float32), {}
        s._reset()
        return s.env.observe(), {}

    def step(self, action):
        if self.exhausted:
            raise RltuneError("ppo-finetune: the stage budget is spent")
        obs, r, term, trunc, info = self.s.env.step(action)
        if term or trunc:
            self.episodes += 1
            self.s._finish(info, {"finetune_episode": self.episodes})
        return obs, r, term, trunc, info


def tune_ppo_finetune(s: Session, agent_path: str | Path, episodes_per_update: int = 4) -> None:
    """Fine-tune the agent with PPO on this one cell, ``episodes_per_update`` episodes per rollout,
    keeping one episode of the budget for a last deterministic replay of the fine-tuned policy.
    Every episode, exploratory or not, meets the target and is a candidate; the best by val wins.
    The reward is the env's (accuracy at the target; with one scenario and target a baseline would
    only shift it). Adam starts fresh; the other PPO hyperparameters are the agent's."""
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    from rltune.agentfile import load_ppo

    S = s.stages_per_episode
    if s.budget_stages < 2 * S:  # no room to fine-tune: the zero-shot replay
        tune_ppo_replay(s, agent_path)
        return
    _policy_env(s, _load_agent(agent_path))
    cell = CellEnv(s, reserve=S)
    # a rollout of at most `episodes_per_update` episodes, fewer when the budget is small, so that
    # even two fine-tuning episodes give a PPO update (a last partial rollout is not used)
    n_steps = min(episodes_per_update, s.budget_stages // S - 1) * S
    from rltune.shipped import resolve_agent

    model = load_ppo(resolve_agent(agent_path), env=DummyVecEnv([lambda: cell]), n_steps=n_steps,
                     batch_size=min(n_steps, 64), seed=s.seed, verbose=0)
    from stable_baselines3.common.logger import Logger

    # a logger that writes nowhere: without one, learn() makes an empty SB3-<time> folder in the
    # system temp folder on every call, a write outside the output folder
    model.set_logger(Logger(None, []))

    class Stop(BaseCallback):
        # stop when the budget is spent, unless this step completes a rollout: PPO then updates on
        # it, and learn() ends there because num_timesteps has reached total_timesteps
        def _on_step(self) -> bool:
            return not cell.exhausted or self.locals["n_steps"] + 1 >= self.locals["n_rollout_steps"]

    train_steps = (s.budget_stages - s.stages_used - S) // S * S
    model.learn(total_timesteps=train_steps, callback=Stop(), progress_bar=False)
    s.play_actions(lambda obs, k: model.predict(obs, deterministic=True)[0],
                   {"agent": str(agent_path), "finetuned_episodes": cell.episodes})


TUNERS = ("recipe", "recipe-plus1", "sensitivity", "sensitivity-pick", "owl", "fixed-8bit", "adaptive-tau", "random", "optuna-const", "optuna-tpe", "ppo-replay",
          "ppo-best-of-n", "ppo-warm-tpe", "ppo-finetune")
STUDY_TUNERS = ("optuna-const", "optuna-tpe", "ppo-warm-tpe")  # tuners that keep an Optuna study


def run_tuner(name: str, env: DistillCompressEnv, scenario: int, target: str, seed: int, budget_stages: int,
              agent: str | Path | None = None, storage: str | None = None, sampler_seed: int | None = None,
              study_episodes: int | None = None, study: dict[str, Any] | None = None,
              batch: int = 1) -> TuneResult:
    """Run one tuner on one cell; every tuner stays within ``budget_stages`` stages of training.

    ``sampler_seed`` and ``study_episodes`` let several processes share one Optuna study (a part of
    the cell's budget each, the storage shared); see :func:`rltune.harness.evaluate`."""
    s = Session(env, scenario, target, seed, budget_stages)
    t0 = time.perf_counter()
    if name == "recipe":
        tune_recipe(s)
    elif name == "recipe-plus1":
        tune_recipe_plus1(s)
    elif name == "fixed-8bit":
        tune_recipe(s, bits8=True)
    elif name == "sensitivity":
        tune_sensitivity(s)
    elif name == "sensitivity-pick":
        tune_sensitivity(s, width="pick")
    elif name == "owl":
        tune_owl(s)
    elif name == "adaptive-tau":
        tune_adaptive_tau(s)
    elif name == "random":
        tune_random(s, batch)
    elif name == "optuna-const":
        tune_optuna_const(s, storage, sampler_seed=sampler_seed, study_episodes=study_episodes, **(study or {}))
    elif name == "optuna-tpe":
        tune_optuna_schedule(s, storage, batch=batch, sampler_seed=sampler_seed, study_episodes=study_episodes,
                             **(study or {}))
    elif name in ("ppo-replay", "ppo-best-of-n", "ppo-warm-tpe", "ppo-finetune"):
        if agent is None:
            raise RltuneError(f"{name} needs an agent (--agent)")
        if name == "ppo-best-of-n":
            tune_ppo_best_of_n(s, agent, batch)
        elif name == "ppo-warm-tpe":
            tune_ppo_warm_tpe(s, agent, storage, batch=batch, study_episodes=study_episodes, **(study or {}))
        else:
            (tune_ppo_replay if name == "ppo-replay" else tune_ppo_finetune)(s, agent)
    else:
        raise RltuneError(f"unknown tuner {name!r} (expected one of {', '.join(TUNERS)})")
    assert s.stages_used <= budget_stages
    return s.result(name, t0)
