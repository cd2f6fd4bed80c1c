"""A vectorised environment that steps K episodes in one process, their stages trained as one batch.

``BatchedVecEnv`` is SB3's ``DummyVecEnv`` (same reset, seeding, buffers and auto-reset) whose
``step_wait`` decodes every env's action, then runs all the stages that share a scenario as one
batched computation (:func:`rltune.batched.run_stages_batched`) instead of one after another, and
hands each env its result. On one core, K small students train at several times the one-at-a-time
rate, so ``rltune train --vec-env batched --n-envs 16`` collects a rollout of 16 episodes for the
price of a few. Per env it gives what stepping that env alone gives (within float tolerance:
tested).

Envs of generated tasks (``rltune/DistillCompress-v1`` with ``tasks=``) would each draw their own
task, and K episodes of K different tasks do not batch; here they play the same task at a time (env
0 draws it, the others follow), a rollout of K-episode rounds over as many tasks.

The envs are the raw :class:`rltune.env.DistillCompressEnv` (no per-env Monitor: wrap the VecEnv
in SB3's ``VecMonitor``); they share their per-scenario caches (contexts, float students, probes),
which is what lets their stages batch.

Example usage::

    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor
    venv = VecMonitor(BatchedVecEnv([lambda: DistillCompressEnv(scenarios=["digits-mlp"])] * 16))
    PPO("MlpPolicy", venv, n_steps=8).learn(1024)
"""

from __future__ import annotations

from copy import deepcopy
from typing import Callable, Sequence

import gymnasium as gym
from stable_baselines3.common.vec_env import DummyVecEnv

from rltune.batched import run_stages_batched
from rltune.env import DistillCompressEnv
from rltune.errors import RltuneError


class BatchedVecEnv(DummyVecEnv):
    """K DistillCompressEnv episodes in one process; their stages are trained as one batch."""

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]]):
        super().__init__(list(env_fns))
        self.raw: list[DistillCompressEnv] = []
        for e in self.envs:
            raw = e.unwrapped
            if not isinstance(raw, DistillCompressEnv):
                raise RltuneError(f"BatchedVecEnv takes rltune's DistillCompressEnv, got {type(raw).__name__}")
            self.raw.append(raw)
        for other in self.raw[1:]:
            other.share_caches(self.raw[0])
        # generated tasks (env v1): the envs play the same task, so their stages batch. Env 0 leads:
        # it draws each new task at its reset, the others take the task the leader is on when they
        # reset (in lockstep that is the leader's new one; an episode that ended early rejoins it)
        sync: dict = {"task": None}
        for j, raw in enumerate(self.raw):
            if getattr(raw, "tasks", None) is not None:
                raw.task_sync, raw.task_leader = sync, j == 0

    def step_wait(self):
        groups: dict[int, list[tuple[int, object]]] = {}
        parts_of: dict[int, dict] = {}
        for i, env in enumerate(self.raw):
            knobs, parts = env.knobs_for(self.actions[i])
            env.begin_stage(knobs)
            parts_of[i] = parts
            groups.setdefault(id(env.ctx), []).append((i, knobs))
        results: dict[int, object] = {}
        for members in groups.values():
            ctx = self.raw[members[0][0]].ctx
            outs = run_stages_batched(ctx, [self.raw[i].state for i, _ in members], [k for _, k in members])
            for (i, _), m in zip(members, outs):
                results[i] = m
        for i, env in enumerate(self.raw):
            obs, self.buf_rews[i], terminated, truncated, self.buf_infos[i] = env.end_stage(results[i], parts_of[i])
            self.buf_dones[i] = terminated or truncated
            self.buf_infos[i]["TimeLimit.truncated"] = truncated and not terminated
            if self.buf_dones[i]:
                self.buf_infos[i]["terminal_observation"] = obs
                obs, self.reset_infos[i] = self.envs[i].reset()
            self._save_obs(i, obs)
        return self._obs_from_buf(), self.buf_rews.copy(), self.buf_dones.copy(), deepcopy(self.buf_infos)
