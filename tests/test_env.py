import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rltune  # noqa: F401  (registers the ids)
from rltune import compression as C
from rltune.env import ACTION_LAYOUT, OBS_LAYOUT, DistillCompressEnv, decode_action
from rltune.registration import ENV_IDS
from rltune.scenario import parse_scenario
from rltune.budget import enforce_, fill_, fill_if_better_
from rltune.stage import measure, StudentState, recipe, run_stage

TINY = parse_scenario({
    "name": "tiny", "dataset": {"source": "wine", "transfer": 200},
    "teacher": {"arch": "mlp", "hidden": [32], "epochs": 30},
    "student": {"arch": "mlp", "hidden": [16], "pretrain_epochs": 5},
    "training": {"stages": 4, "epochs_per_stage": 1, "batch_size": 64, "lr": 0.005},
})
OTHER = TINY.replace(name="tiny-bc", dataset={"source": "breast_cancer"}, student={"hidden": [12]})


@pytest.fixture(scope="module")
def env():
    return DistillCompressEnv(scenarios=[TINY, OTHER], targets=["6x", "10x", "600B"])


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_checkers_pass_on_every_registered_id(env_id):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    e = gym.make(env_id, scenarios=[TINY], targets=["8x"])
    check_env(e.unwrapped)
    sb3_check_env(e.unwrapped)
    if env_id.endswith("-v1"):
        from rltune.env_v1 import ACTION_LAYOUT_V1, OBS_LAYOUT_V1

        obs_layout, action_layout = OBS_LAYOUT_V1, ACTION_LAYOUT_V1
    else:
        obs_layout, action_layout = OBS_LAYOUT, ACTION_LAYOUT
    assert len(obs_layout) == e.observation_space.shape[0] and len(action_layout) == e.action_space.shape[0]


def test_decode_zero_action_is_the_recipe_and_extremes_stay_in_range():
    ranges = TINY.knobs
    d = decode_action(np.zeros(5), 4, 8, ranges)
    assert d == {"final_bits": 4, "exponent": 3.0, "temperature": 4.0, "alpha": 0.9, "late_stages": 2}
    for a in (-np.ones(5), np.ones(5), np.array([0.3, -0.7, 0.9, -0.2, 0.5])):
        d = decode_action(a, 4, 8, ranges)
        assert ranges["bits"][0] <= d["final_bits"] <= ranges["bits"][1]
        assert ranges["temperature"][0] <= d["temperature"] <= ranges["temperature"][1]
        assert ranges["alpha"][0] <= d["alpha"] <= ranges["alpha"][1]
        assert 1 <= d["late_stages"] <= 7 and d["exponent"] > 0
    assert decode_action(np.ones(5), 4, 8, ranges)["final_bits"] == 6
    assert decode_action(-np.ones(5), 4, 8, ranges)["final_bits"] == 2


def test_zero_action_reproduces_the_recipe_exactly(env):
    obs, info = env.reset(seed=3, options={"scenario": 0, "target": "10x"})
    knobs, accs = [], []
    done = False
    while not done:
        obs, r, done, _, info = env.step(np.zeros(5, dtype=np.float32))
        knobs.append(env.knobs)
        accs.append(info["val_acc"])
    plan = env.plan
    expected = recipe(env.stages, plan["final_sparsity"], env.probe_result.recipe_bits)
    assert knobs == expected
    # the same schedule run directly on the engine, same seed: identical numbers
    fs, ref = env.float_student(0, env.float_seed)
    model = C.prepare_(copy.deepcopy(fs))
    state = StudentState(model, ref, torch.Generator().manual_seed(env.torch_seed), None)
    direct = []
    for i, k in enumerate(expected):
        state.fill = env.meter if i == len(expected) - 1 else None  # the last stage starts from the whole budget
        direct.append(run_stage(env.ctx, state, k).val_acc)
    sc = env.ctx.scenario
    enforced = enforce_(state.model, env.meter, sc.knobs["sparsity"][1], sc.training["pruning_scope"])
    filled = fill_if_better_(state.model, env.meter, env._val_acc)
    if enforced or filled:  # the env prunes the excess / gives bytes back and measures again: so must we
        direct[-1] = measure(env.ctx, state).val_acc
    assert enforced == info["budget_enforced"] and filled == info["budget_filled"]
    assert direct == accs


def test_fill_gives_bytes_back_up_to_the_budget_and_never_over(env):
    env.reset(seed=0, options={"scenario": 0, "target": "10x"})
    fs, ref = env.float_student(0, env.float_seed)
    model = C.prepare_(copy.deepcopy(fs))
    C.set_bits_(model, 4)
    C.prune_(model, sparsity=0.95, scope="global")   # far more than 10x needs at 4 bits
    before = env.meter.cost(model) / env.meter.limit
    n = fill_(model, env.meter)
    after = env.meter.cost(model) / env.meter.limit
    assert before < 0.6 and n > 0 and 0.98 <= after <= 1.0
    assert fill_(model, env.meter) == 0 or env.meter.cost(model) <= env.meter.limit
    # a model already over its budget is left alone
    over = C.prepare_(copy.deepcopy(fs))
    C.set_bits_(over, 8)
    mask = [l.compressor.mask.clone() for l in C.layers(over)]
    assert fill_(over, env.meter) == 0 and all(torch.equal(a, l.compressor.mask) for a, l in zip(mask, C.layers(over)))


def test_fill_if_better_keeps_the_largest_part_of_the_fill_that_does_not_lower_val(env):
    env.reset(seed=0, options={"scenario": 0, "target": "10x"})
    fs, ref = env.float_student(0, env.float_seed)
    model = C.prepare_(copy.deepcopy(fs))
    C.set_bits_(model, 4)
    C.prune_(model, sparsity=0.95, scope="global")
    pruned = sum(int((~l.compressor.mask).sum()) for l in C.layers(model))
    kept = lambda m: sum(int(l.compressor.mask.sum()) for l in C.layers(m))  # noqa: E731
    start = kept(model)
    whole = fill_(copy.deepcopy(model), env.meter)
    assert 0 < whole < pruned
    # a score that falls once more than a third of the whole fill comes back: a quarter is kept
    score = lambda m: 1.0 if kept(m) - start <= whole // 3 else 0.0  # noqa: E731
    n = fill_if_better_(model, env.meter, score)
    assert n == whole >> 2 and kept(model) - start == n and env.meter.cost(model) <= env.meter.limit
    # a score that falls at once: nothing is kept, the masks are as they were
    again = C.prepare_(copy.deepcopy(fs))
    C.set_bits_(again, 4)
    C.prune_(again, sparsity=0.95, scope="global")
    assert fill_if_better_(again, env.meter, lambda m: 1.0 if kept(m) == start else 0.0) == 0 and kept(again) == start


def test_budget_used_is_reported_and_close_to_whole(env):
    env.reset(seed=2, options={"scenario": 1, "target": "10x"})
    done = False
    while not done:
        _, _, done, _, info = env.step(np.full(5, -1.0, dtype=np.float32))   # 2 bits: the case that ended short
    assert info["budget_met"] and 0.9 <= info["budget_used"] <= 1.0


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), actions=st.lists(
    st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=5, max_size=5), min_size=4, max_size=4))
def test_budget_met_whatever_the_actions(env, seed, actions):
    obs, info = env.reset(seed=seed)
    for a in actions:
        obs, r, term, trunc, info = env.step(np.asarray(a, dtype=np.float32))
        assert env.observation_space.contains(obs)
        if term:
            break
    assert term and info["budget_met"]
    assert env.meter.cost(env.state.model) <= env.meter.limit


def test_reward_is_paid_at_the_end_in_budget_mode(env):
    env.reset(seed=1, options={"scenario": 1, "target": "6x"})
    rewards = [env.step(np.zeros(5, dtype=np.float32))[1] for _ in range(env.stages)]
    assert all(r == 0.0 for r in rewards[:-1])
    assert rewards[-1] == pytest.approx(20 * (env.last_metrics.val_acc - env.state.ref.val_acc))


def test_diverging_stage_ends_the_episode_cleanly():
    e = DistillCompressEnv(scenarios=[TINY], targets=["6x"])
    e.reset(seed=0)
    e.ctx.train_set.x[0, 0] = float("nan")  # poison the training data
    try:
        obs, r, term, trunc, info = e.step(np.zeros(5, dtype=np.float32))
    finally:
        e.ctx.train_set.x[0, 0] = 0.0
    assert term and info["diverged"] and r < 0
    assert e.observation_space.contains(obs)


def test_tradeoff_mode_return_is_the_final_score():
    e = DistillCompressEnv(scenarios=[TINY], targets=["8x"], mode="tradeoff", action_penalty=0.0)
    e.reset(seed=0)
    total = sum(e.step(np.zeros(5, dtype=np.float32))[1] for _ in range(e.stages))
    assert total == pytest.approx(20 * e.last_score, abs=1e-6)


def test_impossible_target_is_a_clear_error():
    from rltune.errors import RltuneError

    e = DistillCompressEnv(scenarios=[TINY], targets=["100000x"])
    with pytest.raises(RltuneError, match="cannot be met"):
        e.reset(seed=0)


def test_recipe_baseline_pays_zero_for_the_zero_action_with_the_same_seed():
    e = DistillCompressEnv(scenarios=[TINY], targets=["6x"], reward_baseline="recipe")
    e.reset(seed=0)
    base = e.recipe_val_acc(0, 0, e.budget)
    e.torch_seed = 0
    e.state.generator.manual_seed(0)  # the baseline's training seed: the same episode exactly
    rewards = [e.step(np.zeros(5, dtype=np.float32))[1] for _ in range(e.stages)]
    assert e.last_metrics.val_acc == base and rewards[-1] == 0.0


@pytest.mark.parametrize("init", ["step", "zero"])
def test_gradient_fill_stays_under_the_budget_and_brings_weights_back_one_step_or_at_zero(env, init):
    from rltune.budget import effective_grads, fill_gradient_
    from rltune.stage import fill_loss

    env.reset(seed=0, options={"scenario": 0, "target": "10x"})
    fs, ref = env.float_student(0, env.float_seed)
    model = C.prepare_(copy.deepcopy(fs))
    C.set_bits_(model, 4)
    C.prune_(model, sparsity=0.95, scope="global")
    before = [l.effective_weight.detach().clone() for l in C.layers(model)]
    n = fill_gradient_(model, env.meter, effective_grads(model, fill_loss(env.ctx, None)), init=init)
    assert n > 0 and env.meter.cost(model) <= env.meter.limit
    for l, b in zip(C.layers(model), before):
        back = (b == 0) & (l.effective_weight.detach() != 0)
        if init == "zero":
            assert not back.any()        # at zero: nothing changes until training moves them
        else:                            # one step of their row: the smallest nonzero code
            codes, e = C.quantize_codes(l.weight.detach() * l.compressor.mask, 4)
            assert codes[back].abs().max() == 1


def test_play_offset_plays_the_recipe_one_bit_up_and_refuses_a_width_out_of_range(env):
    from rltune.env import play_offset
    from rltune.errors import RltuneError

    opts = {"scenario": 0, "target": "6x", "float_seed": 0}
    info = play_offset(env, 1, opts, 1)
    assert env.plan["final_bits"] == env.probe_result.recipe_bits + 1 and env.k == env.stages and "val_acc" in info
    with pytest.raises(RltuneError, match="out of range"):
        play_offset(env, 1, opts, 9)


def test_only_the_last_stage_is_flagged_last(env, monkeypatch):
    import rltune.stage as stage

    seen = []
    real = stage.train_epochs

    def spy(model, *a, tail=None, **k):
        seen.append(tail)
        return real(model, *a, tail=tail, **k)

    monkeypatch.setattr(stage, "TAIL_AVERAGE", 0.5)
    monkeypatch.setattr(stage, "train_epochs", spy)
    env.reset(seed=4, options={"scenario": 0, "target": "6x"})
    done = False
    while not done:
        _, _, done, _, _ = env.step(np.zeros(5, np.float32))
    assert seen == [None] * (env.stages - 1) + [0.5]
    seen.clear()   # a fixed schedule (the pipeline's recipe) averages its last stage too
    stage.run_schedule(env.ctx, recipe(3, 0.5, 4), seed=0)
    assert seen == [None, None, 0.5]
