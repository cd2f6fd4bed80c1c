import pytest

from rltune.env import DistillCompressEnv
from rltune.errors import RltuneError
from rltune.scenario import parse_scenario
from rltune.stage import score_of
from rltune.tuners import TUNERS, run_tuner

TINY = parse_scenario({
    "name": "tiny", "dataset": {"source": "wine", "transfer": 200},
    "teacher": {"arch": "mlp", "hidden": [32], "epochs": 30},
    "student": {"arch": "mlp", "hidden": [16], "pretrain_epochs": 5},
    "training": {"stages": 3, "epochs_per_stage": 1, "batch_size": 64, "lr": 0.005},
})


@pytest.fixture(scope="module")
def env():
    return DistillCompressEnv(scenarios=[TINY], targets=["6x"])


@pytest.mark.parametrize("tuner", [t for t in TUNERS if t != "ppo-replay"])
@pytest.mark.parametrize("budget", [3, 8])
def test_every_tuner_respects_its_stage_budget(env, tuner, budget):
    counted = []
    real = env.advance

    def counting(*a, **k):
        counted.append(1)
        return real(*a, **k)

    env.advance = counting
    try:
        r = run_tuner(tuner, env, 0, "6x", 0, budget)
    finally:
        del env.advance
    assert len(counted) == r.stages_used <= budget
    assert r.stages_used == (3 if tuner in ("recipe", "fixed-8bit") else 3 * (budget // 3))
    assert r.test["ratio"] >= 6.0  # the target is met whatever the tuner chose


def test_budget_below_one_episode_is_a_clear_error(env):
    with pytest.raises(RltuneError, match="less than one episode"):
        run_tuner("random", env, 0, "6x", 0, 2)


def test_reported_score_is_the_env_efficiency_score(env):
    r = run_tuner("optuna-tpe", env, 0, "6x", 1, 6)
    state = env.state
    # rerun the best configuration's episode is not needed: the score stored with the best episode
    # is the same function the env's trade-off reward uses
    assert r.val_score == pytest.approx(max(s for s in [r.config["val_score"]]))
    m = state.history[-1]
    assert score_of(env.ctx, m, state.ref)[0] == pytest.approx(
        __import__("rltune.score", fromlist=["efficiency_score"]).efficiency_score(
            m.val_acc, state.ref.val_acc, m.packed_bytes, state.ref.float_bytes, TINY.reward,
            energy=m.energy_pj, ref_energy=state.ref.energy_pj)[0])
