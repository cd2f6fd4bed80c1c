"""``rltune/DistillCompress-v1``: per-layer state and actions, paid for what the policy adds.

v0 (:class:`rltune.env.DistillCompressEnv`) stays for the agents trained on it. v1 differs in four
ways (issue 12):

* **The zero action is the strongest zero-search rule measured**: by default ``recipe-plus1``
  (on the held-out ``envs/`` cells the per-layer allocator measured 0.09 pt below it on average,
  ``experiments/results/allocator-v3``): one bit more than the probe's pick, global magnitude
  pruning on the cubic ramp, τ 4, α 0.9; with ``zero_rule="sensitivity"`` the per-layer allocator
  (the best rule on held-out generated tasks: 82.58 against recipe-plus1's 81.78 %,
  ``experiments/results/anytime-v1``). A policy that outputs zeros plays exactly that rule.
* **Observation** = v0's 39 features (:data:`rltune.env.OBS_LAYOUT`) followed by a block of
  :data:`LAYER_FEATURES` for each of :data:`L_MAX` slots (module order; absent layers all zeros,
  ``present`` = 0 is the mask; a model of more than 8 layers gets its first 7 and its head,
  :func:`layer_slots`). Per layer:

  =================  ============================================================================
  feature            meaning
  =================  ============================================================================
  present            1 for a real compressible layer, 0 for padding
  linear, conv1d,    its kind, one-hot
  conv2d
  param_share        its weights / all compressible weights
  log_fan_in         log10(fan-in) / 4 (a row's inputs: in_features, or in_channels × kernel)
  position           its index / (number of layers − 1); the head is 1
  is_head            1 for the last compressible layer (the classifier head)
  centre_sparsity    where the zero action's global magnitude pruning puts it at the plan's width
  dacc_bits_b        val accuracy change with only this layer at b bits (b = 2, 3, 4), one-shot
  dacc_sp_s          val accuracy change with only this layer s-sparse (s = 0.5, 0.8, 0.95)
  log_trace          sign(t) · log10(1 + 10⁴ |t|) / 4, t = Hutchinson trace of its loss Hessian
                     (4 probes, ≤ 1,024 train rows) / its weights
  =================  ============================================================================

  The table is measured once per scenario × float student (no training; cached).
* **Actions** = v0's 5 (:data:`rltune.env.ACTION_LAYOUT`, decoded around the plus-one width) then,
  per layer, a bit offset (``round(a)`` ∈ {−1, 0, +1} bits on the plan's width) and a sparsity
  tilt (``a × TRUST_RADIUS`` on the layer's centre), read at step 0 only. While every per-layer
  entry is within ``DEADZONE`` of 0 the episode prunes globally as the zero action does; otherwise
  each layer reaches its own final sparsity on the cubic ramp, the tilted centres shifted together
  (bisected on the real packed size, each capped at the scenario's sparsity maximum) so the budget
  holds, and its own width in the late stages. If no shift fits, the offsets that add bits are
  dropped, and if that fails too the episode plays the zero rule. Entries for padding slots are ignored.

  ``zero_rule`` picks what the zero action plays, and so what the policy is paid against:
  ``"plus1"`` (default) the recipe one bit up, pruned globally; ``"sensitivity"`` the per-layer
  sensitivity allocator (the ``sensitivity`` tuner: :func:`rltune.layer_sensitivity.allocate`
  around the global split, at the plan's width), whose split is then the layers' centres (the
  ``centre_sparsity`` feature) that the tilts move. ``tilt_deadzone`` (a number in [0, 1)) makes
  the tilts a soft threshold: a tilt ``a`` moves its centre by
  ``sign(a) · max(0, |a| − deadzone) / (1 − deadzone) × TRUST_RADIUS``, so an entry the policy
  has not learned (near 0) changes nothing; ``None`` (default) keeps the hard ``DEADZONE`` above.
  ``schedule_deadzone`` does the same to the ramp shape, τ and α entries (v0's continuous ones)
  before they are decoded; ``None`` (default) reads them as they are.
* **Reward** (mode ``budget``): at the last stage, ``reward_scale × (signal − signal of the zero
  action on the same task and float student)``, the zero action's episode run once per task with a
  fixed training seed and cached; minus the action penalty as in v0. ``reward_signal`` picks the
  signal: ``"val"`` (default) the val accuracy; ``"agreement"`` the student's agreement with the
  teacher over every training row it was distilled on (labeled and transfer, at most
  :data:`FIT_ROWS`), a sample ten times the val split's, whose paired difference between two
  bit-widths had 1.3-5.7× the signal-to-noise of val accuracy's and the test split's sign on 20 of
  20 seeds (``experiments/results/noise.json``); ``"both"`` their mean. ``info`` always carries
  ``val_acc``, ``fit_agreement`` and the zero action's ``zero_action_val_acc`` and
  ``zero_action_fit_agreement``. A **collapse** — val accuracy
  at most a quarter of the way from chance to the float student after any stage from the second
  to the one before last — ends the episode as diverged (``info["diverged"] = "collapsed"``), with v0's divergence
  penalty.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
from gymnasium import spaces
from torch import nn

from rltune import compression as C
from rltune.budget import Budget
from rltune.env import ACTION_LAYOUT, OBS_LAYOUT, DistillCompressEnv, decode_action, nearest_feasible, ramp
from rltune.errors import DivergedError
from rltune.stage import Knobs

L_MAX = 8


def _soft(x: np.ndarray, deadzone: float) -> np.ndarray:
    """Soft threshold: 0 within ``deadzone`` of 0, then linear to ±1 at ±1."""
    return np.sign(x) * np.maximum(np.abs(x) - deadzone, 0.0) / (1.0 - deadzone)


def layer_slots(n: int) -> list[int]:
    """The layers the per-layer block and actions cover, slot by slot: all of them up to L_MAX, else
    the first L_MAX - 1 and the head (the last layer, the one the allocator found most sensitive)."""
    return list(range(n)) if n <= L_MAX else list(range(L_MAX - 1)) + [n - 1]

TABLE_BITS = (2, 3, 4)
TABLE_SPARSITIES = (0.5, 0.8, 0.95)
LAYER_FEATURES = (["present", "linear", "conv1d", "conv2d", "param_share", "log_fan_in", "position", "is_head",
                   "centre_sparsity"] + [f"dacc_bits_{b}" for b in TABLE_BITS]
                  + [f"dacc_sp_{int(round(100 * s))}" for s in TABLE_SPARSITIES] + ["log_trace"])
OBS_LAYOUT_V1 = list(OBS_LAYOUT) + [f"layer{i}_{f}" for i in range(L_MAX) for f in LAYER_FEATURES]
ACTION_LAYOUT_V1 = (list(ACTION_LAYOUT) + [f"bit_offset_{i}" for i in range(L_MAX)]
                    + [f"sparsity_tilt_{i}" for i in range(L_MAX)])
DEADZONE = 0.05
ZERO_RULES = ("plus1", "sensitivity")


def check_zero_rule_options(zero_rule: Any, tilt_deadzone: Any, schedule_deadzone: Any) -> None:
    """One RltuneError line unless ``zero_rule`` is one of :data:`ZERO_RULES` and each deadzone is
    None or a number in [0, 1) (the env's arguments, and what a v1 agent.json records of them)."""
    from rltune.errors import RltuneError

    if not isinstance(zero_rule, str) or zero_rule not in ZERO_RULES:
        raise RltuneError(f"zero_rule must be one of {', '.join(ZERO_RULES)}, got {zero_rule!r}")
    for name, dz in (("tilt_deadzone", tilt_deadzone), ("schedule_deadzone", schedule_deadzone)):
        if dz is not None and (isinstance(dz, bool) or not isinstance(dz, (int, float)) or not 0.0 <= dz < 1.0):
            raise RltuneError(f"{name} must be a number in [0, 1), got {dz!r}")
COLLAPSE_SHARE = 0.25
FIT_ROWS = 20_000
REWARD_SIGNALS = ("val", "agreement", "both")


def fit_agreement(model: nn.Module, train_set: Any, rows: int = FIT_ROWS) -> float:
    """Share of the first ``rows`` training rows (labeled, then transfer) on which ``model``'s class
    is the teacher's."""
    from rltune.distill import predict
    from rltune.metrics import agreement

    n = min(rows, len(train_set.x))
    return agreement(predict(model, train_set.x[:n]), train_set.t_logits[:n])


class DistillCompressEnvV1(DistillCompressEnv):
    """See the module docstring. Takes every argument of :class:`rltune.env.DistillCompressEnv`;
    ``reward_baseline`` defaults to ``"zero"`` (the zero action's val accuracy on the same task).

    ``tasks``: generated tasks instead of ``scenarios`` and ``targets`` — a
    :class:`rltune.tasks.TaskSpec` (or its dict) or a list of :class:`rltune.tasks.Task`; each
    episode draws one task and plays it at its own budget. ``held_out=False`` (training) keeps the
    tasks not flagged held out, ``True`` (evaluation) only those."""

    def __init__(self, *args: Any, reward_baseline: str = "zero", tasks: Any = None, held_out: bool = False,
                 reward_signal: str = "val", zero_rule: str = "plus1", tilt_deadzone: float | None = None,
                 schedule_deadzone: float | None = None, **kwargs: Any):
        from rltune.errors import RltuneError

        if reward_signal not in REWARD_SIGNALS:
            raise RltuneError(f"reward_signal must be one of {', '.join(REWARD_SIGNALS)}, got {reward_signal!r}")
        check_zero_rule_options(zero_rule, tilt_deadzone, schedule_deadzone)
        self.reward_signal = reward_signal
        self.zero_rule = zero_rule
        self.tilt_deadzone = None if tilt_deadzone is None else float(tilt_deadzone)
        self.schedule_deadzone = None if schedule_deadzone is None else float(schedule_deadzone)

        base = "float" if reward_baseline == "zero" else reward_baseline
        self.tasks = None
        if tasks is not None:
            from rltune.tasks import Task, TaskSpec, generate_tasks

            if isinstance(tasks, (TaskSpec, dict)):
                tasks = generate_tasks(tasks)
            tasks = [t for t in tasks if isinstance(t, Task) and t.held_out == bool(held_out)]
            if not tasks:
                raise RltuneError(f"tasks: no {'held-out' if held_out else 'training'} task in what was given")
            if args or kwargs.get("scenarios") is not None or kwargs.get("problems") is not None:
                raise RltuneError("give either tasks or scenarios / problems, not both")
            self.tasks = tasks
            kwargs["scenarios"] = [t.load() for t in tasks]
            kwargs["targets"] = list(dict.fromkeys(t.target for t in tasks))
        super().__init__(*args, reward_baseline=base, **kwargs)
        self.task_budgets = [Budget.parse(t.target) for t in self.tasks] if self.tasks else None
        self.reward_baseline = reward_baseline
        self.observation_space = spaces.Box(-5.0, 5.0, (len(OBS_LAYOUT_V1),), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (len(ACTION_LAYOUT_V1),), np.float32)
        self._tables: dict[tuple, list[dict[str, float]]] = {}
        self._zero: dict[tuple, dict[str, float]] = {}
        self._allocs: dict[tuple, list[float]] = {}
        self.layer_plan: dict[str, Any] | None = None
        self._centres: list[float] | None = None

    @classmethod
    def like(cls, env: DistillCompressEnv, targets: Any = None, zero_rule: str | None = None,
             tilt_deadzone: float | None = None, schedule_deadzone: float | None = None) -> "DistillCompressEnvV1":
        """A v1 env of ``env``'s scenarios or problems and settings, sharing its caches (teachers,
        float students, probes), paid against the float student (no zero-action episodes): what the
        tuners play a v1 policy in, and the zero action's own episodes. ``zero_rule`` and the
        deadzones default to ``env``'s own when it is a v1 env (else to the class defaults)."""
        twin = cls(zero_rule=zero_rule or getattr(env, "zero_rule", "plus1"),
                   tilt_deadzone=tilt_deadzone if tilt_deadzone is not None else getattr(env, "tilt_deadzone", None),
                   schedule_deadzone=(schedule_deadzone if schedule_deadzone is not None
                                      else getattr(env, "schedule_deadzone", None)),
                   scenarios=list(env.sources), targets=targets or [str(b) for b in env.budgets], mode=env.mode,
                   reward_baseline="float", n_float_students=env.n_float_students,
                   probe_samples=env.probe_samples, probe_epochs=env.probe_epochs,
                   probe_tolerance=env.probe_tolerance, fill_budget=env.fill_budget,
                   reward_scale=env.reward_scale, action_penalty=env.action_penalty,
                   divergence_penalty=env.divergence_penalty)
        twin.share_caches(env)
        return twin

    def share_caches(self, other: "DistillCompressEnv") -> None:
        super().share_caches(other)
        if isinstance(other, DistillCompressEnvV1):
            self._tables, self._zero, self._allocs = other._tables, other._zero, other._allocs

    # -- the per-layer table ---------------------------------------------------------------------

    def layer_features(self, i: int, seed: int, budget: Budget) -> list[dict[str, float]]:
        """The per-layer block of scenario ``i``'s float student ``seed`` (cached per scenario × seed;
        the centres depend on the budget, so they are filled in per episode)."""
        key = (i, seed)
        if key not in self._tables:
            from rltune.layer_sensitivity import layer_table

            ctx = self.context(i)
            fs, _ = self.float_student(i, seed)
            d = ctx.data
            n_fit = min(1024, len(d.y_train))
            t = layer_table(fs, d.x_val, d.y_val, d.x_train[:n_fit], d.y_train[:n_fit], bits=TABLE_BITS,
                            sparsities=TABLE_SPARSITIES, probes=4, seed=seed)
            prepared = C.prepare_(copy.deepcopy(fs))
            ls = C.layers(prepared)
            total = sum(l.weight.numel() for l in ls)
            rows = []
            for j, (layer, row) in enumerate(zip(ls, t["layers"])):
                w = layer.weight
                mod = layer.module
                feats = {"present": 1.0, "linear": float(isinstance(mod, nn.Linear)),
                         "conv1d": float(isinstance(mod, nn.Conv1d)), "conv2d": float(isinstance(mod, nn.Conv2d)),
                         "param_share": w.numel() / total,
                         "log_fan_in": math.log10(max(1, w[0].numel())) / 4,
                         "position": j / max(1, len(ls) - 1), "is_head": float(j == len(ls) - 1)}
                for b in TABLE_BITS:
                    feats[f"dacc_bits_{b}"] = float(row["bits"][b])
                for s in TABLE_SPARSITIES:
                    feats[f"dacc_sp_{int(round(100 * s))}"] = float(row["sparsity"][float(s)])
                tr = row["trace"]
                # a 4-probe Hutchinson estimate can be negative (the loss is not at a minimum in every
                # direction): a signed log keeps its size and its sign
                feats["log_trace"] = (math.copysign(math.log10(1 + 1e4 * abs(tr) / w.numel()) / 4, tr)
                                      if math.isfinite(tr) else 0.0)
                rows.append(feats)
            self._tables[key] = rows
        return self._tables[key]

    # -- the MDP ---------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self.layer_plan = None
        self._centres = None
        if self.task_budgets is not None:  # a task is a scenario and its own budget
            import gymnasium as gym

            gym.Env.reset(self, seed=seed)
            options = dict(options or {})
            sync = getattr(self, "task_sync", None)  # set by rltune.vecenv.BatchedVecEnv: one task at a time
            if "scenario" in options:
                i = int(options["scenario"])
            elif sync is not None and not self.task_leader and sync["task"] is not None:
                i = sync["task"]
            else:
                i = int(self.np_random.integers(len(self.scenarios)))
                if sync is not None:
                    sync["task"] = i
            options["scenario"] = i
            options.setdefault("target", str(self.task_budgets[i]))
            return super().reset(seed=None, options=options)
        return super().reset(seed=seed, options=options)

    def _plus1(self) -> int:
        return nearest_feasible(self.probe_result, self.probe_result.recipe_bits + 1)

    def centres(self) -> list[float]:
        """Each layer's sparsity under the zero rule at the plan's width: the recipe's global
        magnitude pruning (``zero_rule="plus1"``), or the sensitivity allocator's split, which
        tilts that one within ``TRUST_RADIUS`` (``"sensitivity"``, cached per task, float student,
        budget and width)."""
        if self._centres is None:
            from rltune.tuners import magnitude_split, sensitivity_split

            fs, _ = self.float_student(self.scenario_index, self.float_seed)
            b = self.plan["final_bits"] if self.plan else self._plus1()
            if self.zero_rule == "sensitivity":
                key = (self.scenario_index, self.float_seed, self.budget, b)
                if key not in self._allocs:
                    self._allocs[key] = [float(x) for x in sensitivity_split(self, fs, b)[1]]
                self._centres = list(self._allocs[key])
            else:
                self._centres = magnitude_split(fs, self.probe_result.required[b], self.ctx.scenario)
        return self._centres

    def knobs_for(self, action) -> tuple[Knobs, dict[str, float]]:
        from rltune.errors import RltuneError

        if self.state is None:
            raise RltuneError("call reset() before step()")
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        if a.shape != (len(ACTION_LAYOUT_V1),):
            raise RltuneError(f"action: expected {len(ACTION_LAYOUT_V1)} numbers, got {a.shape[0]}")
        head = a[: len(ACTION_LAYOUT)].copy()
        if self.schedule_deadzone is not None:  # ramp shape, τ, α: an entry near 0 plays the recipe's
            head[1:4] = _soft(head[1:4], self.schedule_deadzone)
        dec = decode_action(head, self._plus1(), self.stages, self.ctx.scenario.knobs)
        if self.plan is None:
            self.commit(dec["final_bits"], dec["late_stages"])
            self._centres = None
            self._commit_layers(a)
        k = self.k + 1
        late = k > self.stages - self.plan["late_stages"]
        if self.layer_plan is None:
            sparsity: float | tuple[float, ...] = min(ramp(k, self.stages, self.plan["final_sparsity"],
                                                           dec["exponent"]), 0.999)
            bits: int | tuple[int, ...] = self.plan["final_bits"] if late else 8
        else:
            sparsity = tuple(min(ramp(k, self.stages, s, dec["exponent"]), 0.999) for s in self.layer_plan["sparsity"])
            bits = tuple(self.layer_plan["bits"]) if late else 8
        knobs = Knobs(dec["temperature"], dec["alpha"], sparsity, bits)
        penalty = -self.action_penalty * self.reward_scale * float(np.mean(a ** 2))
        return knobs, {"reward_action": penalty}

    def _commit_layers(self, a: np.ndarray) -> None:
        """Step 0: the per-layer plan, or None (global pruning, as the zero action) in the deadzone."""
        n = len(C.layers(self.state.model))
        slots = layer_slots(n)
        off_all = a[len(ACTION_LAYOUT): len(ACTION_LAYOUT) + L_MAX]
        tilt_all = a[len(ACTION_LAYOUT) + L_MAX:]
        off, tilt = np.zeros(n), np.zeros(n)
        for slot, j in enumerate(slots):  # layers without a slot keep the plan's width and centre
            off[j], tilt[j] = off_all[slot], tilt_all[slot]
        if self.tilt_deadzone is not None:  # soft threshold: |a| under the deadzone is no tilt
            tilt = _soft(tilt, self.tilt_deadzone)
            quiet = np.all(np.abs(off) < 0.5) and np.all(tilt == 0.0)
        else:
            quiet = np.all(np.abs(off) < 0.5) and np.all(np.abs(tilt) < DEADZONE)
        if quiet:
            self._zero_plan(n)
            return
        from rltune.layer_sensitivity import TRUST_RADIUS, shift_to_budget

        sc = self.ctx.scenario
        lo_b, hi_b = sc.knobs["bits"]
        top = min(0.99, float(sc.knobs["sparsity"][1]))
        b0 = self.plan["final_bits"]
        base = [c + float(tilt[j]) * TRUST_RADIUS for j, c in enumerate(self.centres())]
        fs, _ = self.float_student(self.scenario_index, self.float_seed)
        # the offsets as asked; if no common shift fits them, the offsets that add bits are dropped;
        # if that fails too, the episode plays the zero rule's split
        asked = [int(np.clip(b0 + int(np.round(off[j])), lo_b, hi_b)) for j in range(n)]
        for bits in (asked, [min(b, b0) for b in asked]):
            shift, sps = shift_to_budget(fs, base, bits, self.meter.cost, self.meter.limit * 0.97, -1.0, 1.0,
                                         top=top, iters=16)
            if shift is not None:
                break
        else:
            self._zero_plan(n)
            return
        self.layer_plan = {"bits": bits, "sparsity": list(sps), "shift": shift}

    def _zero_plan(self, n: int) -> None:
        """The zero rule's layer plan: global pruning (None) for ``"plus1"``; for ``"sensitivity"``
        the allocator's split at the plan's width, as the ``sensitivity`` tuner plays it."""
        if self.zero_rule == "sensitivity":
            self.layer_plan = {"bits": [self.plan["final_bits"]] * n, "sparsity": list(self.centres()), "shift": 0.0}
        else:
            self.layer_plan = None

    def end_stage(self, m, parts: dict[str, float] | None = None):
        obs, reward, terminated, truncated, info = super().end_stage(m, parts)
        if isinstance(m, DivergedError):
            return obs, reward, terminated, truncated, info
        ref = self.state.ref
        chance = 1.0 / self.ctx.n_classes
        floor = chance + COLLAPSE_SHARE * (ref.val_acc - chance)
        if not terminated and self.k >= 2 and info["val_acc"] <= floor:
            parts = {k: info[k] for k in ("reward_action",)}
            parts["reward_diverged"] = -self.divergence_penalty * self.reward_scale
            info.update(parts)
            info["diverged"] = "collapsed"
            return obs, float(sum(parts.values())), True, False, info
        if terminated and self.mode == "budget" and self.reward_baseline == "zero":
            zero = self.zero_metrics(self.scenario_index, self.float_seed, self.budget)
            fit = fit_agreement(self.state.model, self.ctx.train_set)
            info["fit_agreement"] = fit
            info["zero_action_val_acc"] = zero["val_acc"]
            info["zero_action_fit_agreement"] = zero["fit_agreement"]
            d_val, d_fit = info["val_acc"] - zero["val_acc"], fit - zero["fit_agreement"]
            signal = {"val": d_val, "agreement": d_fit, "both": 0.5 * (d_val + d_fit)}[self.reward_signal]
            info["reward_accuracy"] = self.reward_scale * signal
            reward = info["reward_accuracy"] + info["reward_action"]
        return obs, float(reward), terminated, truncated, info

    def zero_val_acc(self, i: int, seed: int, budget: Budget) -> float:
        """Val accuracy of the zero action (its ``zero_rule``) on this task and float student at a fixed
        training seed: an env of its own plays it once; cached."""
        return self.zero_metrics(i, seed, budget)["val_acc"]

    def zero_metrics(self, i: int, seed: int, budget: Budget) -> dict[str, float]:
        """The zero action's ``val_acc`` and ``fit_agreement`` on this task and float student (see
        :meth:`zero_val_acc`)."""
        key = (i, seed, budget, self.zero_rule)
        if key not in self._zero:
            twin = DistillCompressEnvV1.like(self, targets=[str(budget)])
            from rltune.train import run_episode

            info = run_episode(twin, None, seed=0, options={"scenario": i, "target": str(budget), "float_seed": seed})
            if info.get("diverged"):  # its last good stage is no result: the float student stands in
                fs, _ = twin.float_student(i, seed)
                self._zero[key] = {"val_acc": twin.state.ref.val_acc, "fit_agreement": fit_agreement(fs, twin.ctx.train_set)}
            else:
                self._zero[key] = {"val_acc": float(info["val_acc"]),
                                   "fit_agreement": fit_agreement(twin.state.model, twin.ctx.train_set)}
        return self._zero[key]

    # -- observation -------------------------------------------------------------------------------

    def _obs(self) -> np.ndarray:
        head = self.global_features()
        block = np.zeros((L_MAX, len(LAYER_FEATURES)), np.float32)
        rows = self.layer_features(self.scenario_index, self.float_seed, self.budget)
        centres = self.centres()
        for slot, j in enumerate(layer_slots(len(rows))):
            row = dict(rows[j], centre_sparsity=centres[j])
            block[slot] = [row[f] for f in LAYER_FEATURES]
        obs = np.concatenate([head, block.reshape(-1)])
        return np.clip(np.nan_to_num(obs, nan=0.0), -5.0, 5.0).astype(np.float32)
