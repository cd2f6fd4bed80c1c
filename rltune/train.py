"""Training a PPO agent on scenarios, and the gate a trained agent must pass to ship.

Every run writes its own folder (``runs/train/NAME-TIMESTAMP/`` by default)::

    config.yaml        the resolved configuration (hyperparameters, scenarios, targets)
    command.txt        the exact command line
    monitor/           SB3 Monitor CSVs, one per env, with the reward parts and final metrics
    tb/                TensorBoard logs
    checkpoints/       rltune agent folders every ``checkpoint_every`` steps (safetensors + JSON)
    agent/             the final agent
    gate.json          the trained policy against the recipe on held-out validation scenarios

The folder alone reproduces the run: ``rltune train --config RUN/config.yaml``.
Checkpoints are written in rltune's safe agent format, never SB3's pickled zip; ``--resume``
continues from the newest one (the policy weights; Adam's moments restart).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rltune.errors import RltuneError, make_folder, write_atomic

log = logging.getLogger("rltune")

INFO_KEYWORDS = ("scenario", "target", "val_acc", "float_val_acc", "ratio", "packed_bytes", "sparsity",
                 "plan_final_bits", "recipe_bits", "reward_accuracy", "reward_action")
TB_KEYS = ("val_acc", "ratio", "plan_final_bits", "plan_final_sparsity", "reward_accuracy", "reward_action",
           "reward_diverged")
PPO_KEYS = {"learning_rate", "n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "clip_range",
            "ent_coef", "vf_coef", "max_grad_norm", "target_kl", "normalize_advantage"}
ENV_KEYS = {"targets", "mode", "reward_scale", "action_penalty", "divergence_penalty", "n_float_students",
            "probe_samples", "probe_epochs", "probe_tolerance", "reward_baseline", "epochs_per_stage", "stages",
            "reward_signal", "zero_rule", "tilt_deadzone", "schedule_deadzone"}
TOP_KEYS = {"scenarios", "val_scenarios", "total_timesteps", "n_envs", "seed", "checkpoint_every",
            "policy_kwargs", "ppo", "env", "gate_episodes", "vec_env", "ray_address", "ray_workers", "env_id", "tasks", "gate_tasks"}
VEC_ENVS = ("auto", "dummy", "subproc", "batched", "ray")


def load_hyperparams(path: str | Path, key: str = "default") -> dict[str, Any]:
    """The ``key`` entry of an agents/ppo.yml file, merged over its ``default:`` entry (safe_load only)."""
    path = Path(path)
    from rltune.errors import check_regular_file
    from rltune.scenario import safe_yaml

    check_regular_file(path, "hyperparameter file (YAML)")
    try:
        raw = safe_yaml(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise RltuneError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(raw, dict) or "default" not in raw:
        raise RltuneError(f"{path}: expected a mapping with a 'default:' entry")
    if key not in raw:
        raise RltuneError(f"{path}: no entry {key!r} (have: {', '.join(raw)})")
    cfg = copy.deepcopy(raw["default"])
    for k, v in (raw[key] or {}).items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return check_config(cfg, f"{path}:{key}")


def check_config(cfg: Any, where: str) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise RltuneError(f"{where}: expected a mapping")
    for k in cfg:
        if k not in TOP_KEYS:
            raise RltuneError(f"{where}: {k}: unknown field (expected one of {', '.join(sorted(TOP_KEYS))})")
    for k in cfg.get("ppo", {}) or {}:
        if k not in PPO_KEYS:
            raise RltuneError(f"{where}: ppo.{k}: unknown PPO hyperparameter")
    for k in cfg.get("env", {}) or {}:
        if k not in ENV_KEYS:
            raise RltuneError(f"{where}: env.{k}: unknown environment argument")
    env_id = cfg.get("env_id", "rltune/DistillCompress-v0")
    from rltune.registration import ENV_IDS

    if env_id not in (ENV_IDS[0], ENV_IDS[2]):
        raise RltuneError(f"{where}: env_id: expected {ENV_IDS[0]} or {ENV_IDS[2]}, got {env_id!r} "
                          "(the trade-off env is env: {mode: tradeoff})")
    if cfg.get("tasks") is not None:
        from rltune.tasks import TaskSpec

        if env_id != ENV_IDS[2]:
            raise RltuneError(f"{where}: tasks: generated tasks need env_id: {ENV_IDS[2]}")
        if cfg.get("scenarios"):
            raise RltuneError(f"{where}: give tasks or scenarios, not both")
        from rltune.tasks import generate_tasks

        made = generate_tasks(TaskSpec.from_dict(cfg["tasks"]))  # an impossible spec fails here
        held = sum(t.held_out for t in made)
        if held == 0 or held == len(made):
            raise RltuneError(f"{where}: tasks: the spec gives {held} held-out tasks of {len(made)}: training "
                              "needs some and the gate needs some (change seed, n_tasks or held_out_share)")
    elif not cfg.get("scenarios"):
        raise RltuneError(f"{where}: scenarios: at least one training scenario (or a tasks: spec) is needed")
    gt = cfg.get("gate_tasks")
    if gt is not None and not (isinstance(gt, int) and not isinstance(gt, bool) and gt >= 1):
        raise RltuneError(f"{where}: gate_tasks: expected a whole number >= 1, got {gt!r}")
    if cfg.get("vec_env", "auto") not in VEC_ENVS:
        raise RltuneError(f"{where}: vec_env: expected one of {', '.join(VEC_ENVS)}, got {cfg.get('vec_env')!r}")
    addr, rw = cfg.get("ray_address"), cfg.get("ray_workers")
    if addr is not None and not (isinstance(addr, str) and addr.strip()):
        raise RltuneError(f"{where}: ray_address: expected a Ray address such as ray://head:10001, got {addr!r}")
    if rw is not None and not (isinstance(rw, int) and not isinstance(rw, bool) and 1 <= rw <= 4096):
        raise RltuneError(f"{where}: ray_workers: expected a whole number in 1..4096, got {rw!r}")
    if (addr is not None or rw is not None) and cfg.get("vec_env", "auto") != "ray":
        raise RltuneError(f"{where}: ray_address and ray_workers need vec_env: ray (--backend ray)")
    overlap = set(cfg.get("scenarios", [])) & set(cfg.get("val_scenarios", []) or [])
    if overlap:
        raise RltuneError(f"{where}: val_scenarios: {sorted(overlap)[0]} is also a training scenario")
    return cfg


def _policy_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch.nn as nn

    pk = dict(cfg.get("policy_kwargs", {}) or {})
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU}
    if isinstance(pk.get("activation_fn"), str):
        name = pk["activation_fn"]
        if name not in acts:
            raise RltuneError(f"policy_kwargs.activation_fn: {name!r} is not one of {', '.join(acts)}")
        pk["activation_fn"] = acts[name]
    return pk


def make_env_fn(cfg: dict[str, Any], rank: int, monitor_dir: Path | None, append: bool = False):
    def _init():
        import gymnasium as gym
        from stable_baselines3.common.monitor import Monitor

        from rltune.registration import ENV_IDS

        env_kwargs = dict(cfg.get("env") or {})
        env_id = cfg.get("env_id", ENV_IDS[0])
        if env_id == ENV_IDS[0] and env_kwargs.get("mode") == "tradeoff":
            env_id = ENV_IDS[1]
            env_kwargs.pop("mode", None)
        if cfg.get("tasks") is not None:  # generated tasks, each at its own budget
            env_kwargs.pop("targets", None)
            env = gym.make(env_id, tasks=cfg["tasks"], **env_kwargs)
        else:
            env = gym.make(env_id, scenarios=cfg["scenarios"], **env_kwargs)
        if monitor_dir is not None:  # on --resume the episodes logged before stay: append
            env = Monitor(env, str(monitor_dir / f"env{rank}"), info_keywords=INFO_KEYWORDS,
                          override_existing=not append)
        env.reset(seed=int(cfg.get("seed", 0)) * 1000 + rank)
        return env

    return _init


def anchor_scenarios(cfg: dict[str, Any], base: str | Path | None = None) -> dict[str, Any]:
    """``cfg`` with its scenario files (``scenarios``, ``val_scenarios``) as absolute paths, so the run
    folder's config.yaml reproduces the run from any folder. ``base``: the folder of the file the
    config was read from; a relative path that is no file from here but is one from there (a config
    beside its scenarios, as a scenario's data file is beside it) is taken from there. Shipped
    names and paths that are no file stay as given (the environment names what is wrong)."""
    out = dict(cfg)
    for key in ("scenarios", "val_scenarios"):
        entries = cfg.get(key)
        if not isinstance(entries, list):
            continue
        fixed = []
        for s in entries:
            if isinstance(s, str) and s and "\0" not in s:
                p = Path(s).expanduser()
                try:
                    if base is not None and not p.is_absolute() and not p.is_file() and (Path(base) / p).is_file():
                        p = Path(base) / p
                    if p.is_file():
                        s = str(p.resolve())
                except (OSError, ValueError):
                    pass
            fixed.append(s)
        out[key] = fixed
    return out


def train(cfg: dict[str, Any], run_dir: str | Path, resume: bool = False, progress_bar: bool = True,
          command: str | None = None) -> Path:
    """Train PPO as configured; returns the run folder. See the module docstring for its layout."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    from rltune.agentfile import load_optimizer, load_ppo, save_agent, save_optimizer

    OBS_LAYOUT, ACTION_LAYOUT = layouts(cfg.get("env_id"))
    cfg = anchor_scenarios(cfg)  # config.yaml reproduces the run from any folder

    run = Path(run_dir)
    make_folder(run, "run folder")
    make_folder(run / "monitor", "run folder")
    make_folder(run / "checkpoints", "run folder")
    write_atomic(run / "config.yaml", yaml.safe_dump(cfg, sort_keys=False).encode(), "run config")
    from rltune.shipped import recorded_command

    write_atomic(run / "command.txt", ((command or recorded_command()) + "\n").encode(), "run command")
    n_envs = int(cfg.get("n_envs", 1))
    ckpts = _checkpoints(run) if resume else []
    kind = cfg.get("vec_env", "auto")
    if kind == "auto":
        kind = "subproc" if n_envs > 1 else "dummy"
    if kind in ("batched", "ray"):
        # K episodes in this process (batched), or over Ray actors each stepping its share as one
        # batch (ray: rltune.rayvec, local Ray unless ray_address names a cluster), their stages trained as one batch (rltune.vecenv); one
        # VecMonitor logs them all (per-env Monitors would see no steps)
        from stable_baselines3.common.vec_env import VecMonitor

        from rltune.vecenv import BatchedVecEnv

        from stable_baselines3.common.monitor import ResultsWriter

        fns = [make_env_fn(cfg, r, None) for r in range(n_envs)]
        if kind == "ray":
            from rltune.rayvec import RayVecEnv

            inner = RayVecEnv(fns, n_workers=cfg.get("ray_workers"), address=cfg.get("ray_address"))
        else:
            inner = BatchedVecEnv(fns)
        venv = VecMonitor(inner, None, info_keywords=INFO_KEYWORDS)
        # its CSV is appended to on --resume (VecMonitor itself would truncate it)
        venv.results_writer = ResultsWriter(str(run / "monitor" / "batched"), extra_keys=INFO_KEYWORDS,
                                            header={"t_start": venv.t_start, "env_id": f"rltune/{type(inner).__name__}"},
                                            override_existing=not ckpts)
    else:
        fns = [make_env_fn(cfg, r, run / "monitor", append=bool(ckpts)) for r in range(n_envs)]
        venv = SubprocVecEnv(fns, start_method="fork") if kind == "subproc" else DummyVecEnv(fns)
    total = int(cfg["total_timesteps"])
    training_meta = {"scenarios": list(cfg.get("scenarios") or []), "val_scenarios": list(cfg.get("val_scenarios") or []),
                     "env": cfg.get("env") or {}, "total_timesteps": total, "seed": int(cfg.get("seed", 0)),
                     "command": (run / "command.txt").read_text().strip(),
                     "env_id": cfg.get("env_id", "rltune/DistillCompress-v0")}
    if cfg.get("tasks") is not None:  # what the policy was trained on: the spec, its seed, how many tasks
        from rltune.tasks import TaskSpec, generate_tasks

        spec = TaskSpec.from_dict(cfg["tasks"])
        training_meta.update({"task_spec": spec.to_dict(), "task_seed": spec.seed,
                              "tasks": sum(not t.held_out for t in generate_tasks(spec))})
    t0 = time.perf_counter()
    done_steps = 0
    model = None
    for ckpt in reversed(ckpts):  # the newest checkpoint that loads; a half-written one is skipped
        try:
            model = load_ppo(ckpt, env=venv, tensorboard_log=str(run / "tb"))
        except RltuneError as e:
            log.warning("skipping the checkpoint %s: %s", ckpt, e)
            continue
        done_steps = int(ckpt.name.split("_")[1])
        adam = load_optimizer(model, ckpt)
        model.num_timesteps = done_steps
        # new draws from here on: the envs' task and seed draws and the action noise are seeded from
        # the steps done, not replayed from the run's start (seeded with the plain seed, a resumed
        # run drew the tasks it had already trained on)
        model.set_random_seed(resume_seed(int(cfg.get("seed", 0)), done_steps))
        log.info("resuming from %s (%d steps done; optimizer state %s)", ckpt, done_steps,
                 "restored" if adam else "not found: Adam restarts")
        break
    if model is None:
        if resume:
            log.warning("no usable checkpoint in %s: training starts from step 0", run / "checkpoints")
            if not ckpts:
                for f in (run / "monitor").glob("*.monitor.csv"):
                    f.unlink()
        model = PPO("MlpPolicy", venv, seed=int(cfg.get("seed", 0)), verbose=0, tensorboard_log=str(run / "tb"),
                    policy_kwargs=_policy_kwargs(cfg), **(cfg.get("ppo") or {}))
    every = int(cfg.get("checkpoint_every", 1000))
    hp = {k: v for k, v in (cfg.get("ppo") or {}).items()}

    class Checkpoint(BaseCallback):
        def __init__(self):
            super().__init__()
            self.last = done_steps

        def _on_step(self) -> bool:
            steps = self.num_timesteps  # the model's count: set to the checkpoint's steps on --resume
            if steps - self.last >= every:
                self.last = steps
                # written whole in a temporary folder, then renamed: a kill leaves no half checkpoint
                final = run / "checkpoints" / f"step_{steps}"
                tmp = run / "checkpoints" / f".step_{steps}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                save_agent(self.model, tmp, OBS_LAYOUT, ACTION_LAYOUT, {**training_meta, "steps_done": steps}, hp)
                save_optimizer(self.model, tmp)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            # TensorBoard beside SB3's scalars: the reward parts, val accuracy, ratio and the plan of
            # every episode that ends (averaged over the rollout when SB3 dumps its scalars)
            for info in self.locals.get("infos", []):
                ep = info.get("episode")
                if not ep:
                    continue
                for key in TB_KEYS:
                    v = ep.get(key, info.get(key))
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        self.logger.record_mean(f"rltune/{key}", float(v))
            return True

    remaining = max(total - done_steps, 0)
    try:
        if remaining:
            model.learn(remaining, callback=Checkpoint(), progress_bar=progress_bar,
                        reset_num_timesteps=not resume, tb_log_name="ppo")
    finally:
        venv.close()
    wall = time.perf_counter() - t0
    training_meta.update({"wall_seconds": wall, "steps_done": total})
    save_agent(model, run / "agent", OBS_LAYOUT, ACTION_LAYOUT, training_meta, hp)
    write_atomic(run / "train_summary.json", json.dumps({"wall_seconds": wall, "total_timesteps": total,
                                                         "steps_per_second": remaining / wall if wall else None},
                                                        indent=1).encode(), "train summary")
    return run


def resume_seed(seed: int, done_steps: int) -> int:
    """The seed a run of ``seed`` resumed after ``done_steps`` steps reseeds its envs and action noise
    with: hashed from both (:class:`numpy.random.SeedSequence`) into [2**16, 2**31), so two (seed,
    steps) pairs share one only by a ~2**-31 chance, and it is never a start seed below 2**16
    (``seed * 1000 + rank`` for seeds up to 65); ``seed * 1000 + steps`` made seed 0 resumed at step
    1,000 draw exactly what seed 1 drew at its start."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(done_steps), 0x5E5]).generate_state(1)[0] % (2 ** 31 - 2 ** 16)) + 2 ** 16


def read_monitor(path: str | Path, reward_scale: float = 20.0, divergence_penalty: float = 1.0) -> list[dict[str, Any]]:
    """The episodes of a training monitor (the CSV ``rltune train``'s Monitor / VecMonitor writes,
    a ``#`` JSON line then a header), each row a dict of its columns plus ``diverged`` and
    ``reward_pt`` (the accuracy reward in points against the baseline, ``100 · reward_accuracy /
    reward_scale``; None for a diverged episode, whose ``reward_accuracy`` the env leaves at 0).
    An episode diverged when its return, less its last step's accuracy and action rewards, is below
    half the divergence penalty (``−divergence_penalty · reward_scale``; the earlier steps' action
    penalties are hundredths of it). Raises RltuneError on a file it cannot read as one."""
    import csv

    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise RltuneError(f"{path}: not a training monitor this project wrote ({type(e).__name__}: {e})") from None
    out = []
    for r in rows:
        try:
            ret, acc, act = (float(r[k]) for k in ("r", "reward_accuracy", "reward_action"))
        except (KeyError, TypeError, ValueError):
            raise RltuneError(f"{path}: a row without the r, reward_accuracy and reward_action numbers") from None
        if not all(math.isfinite(x) for x in (ret, acc, act)):
            continue
        diverged = ret - acc - act < -0.5 * divergence_penalty * reward_scale
        out.append({**r, "diverged": diverged, "reward_pt": None if diverged else 100.0 * acc / reward_scale})
    return out


def layouts(env_id: str | None) -> tuple[list[str], list[str]]:
    """The observation and action layouts of an env id (v0 unless it names v1)."""
    if env_id == "rltune/DistillCompress-v1":
        from rltune.env_v1 import ACTION_LAYOUT_V1, OBS_LAYOUT_V1

        return list(OBS_LAYOUT_V1), list(ACTION_LAYOUT_V1)
    from rltune.env import ACTION_LAYOUT, OBS_LAYOUT

    return list(OBS_LAYOUT), list(ACTION_LAYOUT)


def gate_tasks(agent_path: str | Path, spec: dict[str, Any], n_tasks: int = 8, episodes: int = 1,
               env_kwargs: dict | None = None) -> dict[str, Any]:
    """A v1 policy against the zero action (the env's ``zero_rule``) on held-out generated tasks (the first
    ``n_tasks`` of the spec's held-out slice), val split, same seeds; ``passed`` when its mean val
    accuracy is above the zero action's."""
    from rltune.agentfile import check_layouts, load_policy
    from rltune.env_v1 import DistillCompressEnvV1
    from rltune.tasks import generate_tasks

    agent = load_policy(agent_path)
    obs_l, act_l = layouts("rltune/DistillCompress-v1")
    check_layouts(agent, obs_l, act_l)
    held = [t for t in generate_tasks(spec) if t.held_out][:n_tasks]
    if not held:
        raise RltuneError("gate: the task spec has no held-out task")
    kw = {k: v for k, v in (env_kwargs or {}).items() if k not in ("targets",)}
    env = DistillCompressEnvV1(tasks=held, held_out=True, **kw)
    rows = []
    for i, t in enumerate(held):
        for ep in range(episodes):
            opts = {"scenario": i, "float_seed": 0}
            pol = run_episode(env, agent, seed=ep, options=opts)
            zero = run_episode(env, None, seed=ep, options=opts)
            rows.append({"task": t.name, "family": t.family, "target": t.target, "episode": ep,
                         "policy_val_acc": pol["val_acc"], "zero_action_val_acc": zero["val_acc"],
                         "policy_bits": pol["plan_final_bits"], "zero_action_bits": zero["plan_final_bits"]})
    diffs = [r["policy_val_acc"] - r["zero_action_val_acc"] for r in rows]
    return {"rows": rows, "mean_diff": statistics.fmean(diffs),
            "std_diff": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "passed": statistics.fmean(diffs) > 0, "episodes": episodes, "tasks": len(held)}


def _checkpoints(run: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary ``.step_N.tmp`` folders are not)."""
    out = []
    for p in (run / "checkpoints").glob("step_*"):
        tail = p.name.split("_", 1)[1]
        if tail.isdigit() and p.is_dir():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name.split("_")[1]))


def run_episode(env, policy=None, seed: int = 0, options: dict | None = None) -> dict[str, Any]:
    """One episode; ``policy`` None plays the zero action (the recipe). Returns the last info."""
    obs, info = env.reset(seed=seed, options=options)
    done = False
    total = 0.0
    while not done:
        a = np.zeros(env.action_space.shape, np.float32) if policy is None else policy.predict(obs, deterministic=True)
        obs, r, term, trunc, info = env.step(a)
        total += r
        done = term or trunc
    return {**info, "return": total}


def gate(agent_path: str | Path, scenarios: list[str], targets: list[str], episodes: int = 2,
         env_kwargs: dict | None = None) -> dict[str, Any]:
    """The trained policy against the recipe (zero action) on scenarios it was not trained on, val
    split, same seeds. ``passed`` when its mean val accuracy is above the recipe's."""
    from rltune.agentfile import check_layouts, load_policy
    from rltune.env import DistillCompressEnv

    agent = load_policy(agent_path)
    env_id = agent.meta.get("training", {}).get("env_id")
    obs_l, act_l = layouts(env_id)
    check_layouts(agent, obs_l, act_l)
    trained_on = set(agent.meta.get("training", {}).get("scenarios", []))
    bad = trained_on & set(scenarios)
    if bad:
        raise RltuneError(f"gate scenarios must be held out; {sorted(bad)[0]} was trained on")
    kw = {k: v for k, v in (env_kwargs or {}).items() if k not in ("targets",)}
    if env_id == "rltune/DistillCompress-v1":  # its zero action is recipe-plus1: that is what it must beat
        from rltune.env_v1 import DistillCompressEnvV1

        env = DistillCompressEnvV1(scenarios=scenarios, targets=targets, **kw)
    else:
        env = DistillCompressEnv(scenarios=scenarios, targets=targets, **kw)
    rows = []
    for i, name in enumerate(scenarios):
        for t in targets:
            for ep in range(episodes):
                opts = {"scenario": i, "target": t, "float_seed": 0}
                pol = run_episode(env, agent, seed=ep, options=opts)
                rec = run_episode(env, None, seed=ep, options=opts)
                rows.append({"scenario": name, "target": t, "episode": ep,
                             "policy_val_acc": pol["val_acc"], "recipe_val_acc": rec["val_acc"],
                             "policy_bits": pol["plan_final_bits"], "recipe_bits": rec["plan_final_bits"]})
    diffs = [r["policy_val_acc"] - r["recipe_val_acc"] for r in rows]
    return {"rows": rows, "mean_diff": statistics.fmean(diffs),
            "std_diff": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "passed": statistics.fmean(diffs) > 0, "episodes": episodes}
