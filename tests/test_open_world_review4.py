"""A user who trains and uses their own agent on their own problems, and the Ray paths (the
open-world review, round 4).

The contract: ``gym.make("rltune/DistillCompress-v0" / "-v1", problems=[p], targets=[...])``
works with stable-baselines3 (its ``make_vec_env`` included); a mistake is one ``RltuneError``
line (``rltune: error: ...`` and status 2 on the CLI); loading an agent never runs code from it.
"""

import gymnasium as gym
import pytest

import rltune
from open_world import FAST, MLP, split, trained_teacher
from rltune.errors import RltuneError


def user_problem():
    train, val = split()
    return rltune.Problem(trained_teacher((train, val)), MLP(), train=train, val=val, name="user", **FAST)


# -- SB3's make_vec_env passes render_mode="rgb_array" and retries without it on TypeError -------

@pytest.mark.parametrize("env_id", ["rltune/DistillCompress-v0", "rltune/DistillCompress-v1"])
def test_make_vec_env_builds_the_env(env_id):
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env(env_id, n_envs=1, env_kwargs=dict(problems=[user_problem()], targets=["4x"]))
    assert venv.observation_space.shape == gym.make(env_id, problems=[user_problem()]).observation_space.shape
    venv.close()


def test_an_unsupported_render_mode_is_still_one_rltune_line():
    with pytest.raises(RltuneError, match="render_mode must be one of"):
        gym.make("rltune/DistillCompress-v0", problems=[user_problem()], render_mode="rgb_array")
