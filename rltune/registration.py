"""Gymnasium ids (lazy string entry points, as Gymnasium's own environments do)."""

import gymnasium as gym

ENV_IDS = ("rltune/DistillCompress-v0", "rltune/DistillCompressTradeoff-v0", "rltune/DistillCompress-v1")


def register_envs() -> None:
    if ENV_IDS[0] in gym.registry:
        return
    gym.register(id=ENV_IDS[0], entry_point="rltune.env:DistillCompressEnv")
    gym.register(id=ENV_IDS[1], entry_point="rltune.env:DistillCompressEnv", kwargs={"mode": "tradeoff"})
    gym.register(id=ENV_IDS[2], entry_point="rltune.env_v1:DistillCompressEnvV1")
