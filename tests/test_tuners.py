import pytest

from rltune.env import DistillCompressEnv
from rltune.errors import RltuneError
from rltune.scenario import parse_scenario
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
    assert r.stages_used == (3 if tuner in ("recipe", "fixed-8bit", "adaptive-tau") else 3 * (budget // 3))
    assert r.test["ratio"] >= 6.0  # the target is met whatever the tuner chose


def test_budget_below_one_episode_is_a_clear_error(env):
    with pytest.raises(RltuneError, match="less than one episode"):
        run_tuner("random", env, 0, "6x", 0, 2)


def test_reported_score_is_the_env_efficiency_score():
    trade = DistillCompressEnv(scenarios=[TINY], targets=["6x"], mode="tradeoff", action_penalty=0.0)
    r = run_tuner("recipe", trade, 0, "6x", 0, 3)
    # the trade-off env pays the change in the efficiency score at each step: its last score is the
    # score of the final student, which is what the tuner reports
    assert r.val_score == pytest.approx(trade.last_score)
    assert r.val_score != 0.0
