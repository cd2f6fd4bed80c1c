"""DistillCompress-v1: per-layer observation and actions; the zero action is recipe-plus1."""

import gymnasium as gym
import numpy as np
import pytest

import rltune.env_v1 as V1
from rltune.env import ACTION_LAYOUT, OBS_LAYOUT, DistillCompressEnv
from rltune.env_v1 import ACTION_LAYOUT_V1, L_MAX, LAYER_FEATURES, OBS_LAYOUT_V1, DistillCompressEnvV1
from rltune.scenario import parse_scenario

TINY = parse_scenario({
    "name": "tiny-v1", "dataset": {"source": "wine", "transfer": 200},
    "teacher": {"arch": "mlp", "hidden": [32], "epochs": 30},
    "student": {"arch": "mlp", "hidden": [16, 8], "pretrain_epochs": 5},
    "training": {"stages": 3, "epochs_per_stage": 1, "batch_size": 64, "lr": 0.005},
})


@pytest.fixture(scope="module")
def env():
    return DistillCompressEnvV1(scenarios=[TINY], targets=["6x"])


def _play(env, action, seed):
    env.reset(seed=seed)
    done, info, total = False, {}, 0.0
    while not done:
        _, r, term, trunc, info = env.step(action)
        total += r
        done = term or trunc
    return total, info


def test_spaces_and_the_per_layer_block(env):
    obs, _ = env.reset(seed=0)
    assert env.observation_space.shape == (len(OBS_LAYOUT) + L_MAX * len(LAYER_FEATURES),) == obs.shape
    assert env.action_space.shape == (len(ACTION_LAYOUT) + 2 * L_MAX,) == (len(ACTION_LAYOUT_V1),)
    block = obs[len(OBS_LAYOUT):].reshape(L_MAX, len(LAYER_FEATURES))
    col = {f: i for i, f in enumerate(LAYER_FEATURES)}
    assert block[:3, col["present"]].tolist() == [1, 1, 1] and not block[3:].any()  # 3 layers, the rest padding
    assert block[:3, col["linear"]].tolist() == [1, 1, 1] and block[:3, col["is_head"]].tolist() == [0, 0, 1]
    assert block[:3, col["param_share"]].sum() == pytest.approx(1.0, abs=1e-5)
    assert (block[:3, col["dacc_sp_95"]] <= block[:3, col["dacc_sp_50"]] + 1e-6).all()
    assert len(OBS_LAYOUT_V1) == obs.shape[0]


def test_the_zero_action_is_recipe_plus1(env):
    v0 = DistillCompressEnv(scenarios=[TINY], targets=["6x"])
    plus1 = np.zeros(len(ACTION_LAYOUT), np.float32)
    plus1[0] = 0.5  # the recipe-plus1 tuner's step-0 action
    v0.reset(seed=3)
    done, k = False, 0
    while not done:
        _, _, term, trunc, info0 = v0.step(plus1 if k == 0 else np.zeros_like(plus1))
        k += 1
        done = term or trunc
    reward, info1 = _play(env, np.zeros(len(ACTION_LAYOUT_V1), np.float32), seed=3)
    assert env.layer_plan is None
    assert info1["plan_final_bits"] == info0["plan_final_bits"] and info1["val_acc"] == info0["val_acc"]
    assert info1["packed_bytes"] == info0["packed_bytes"]
    # paid relative to the zero action on the same task: its own episode at a fixed training seed
    assert info1["zero_action_val_acc"] == env.zero_val_acc(0, env.float_seed, env.budget)
    assert reward == pytest.approx(info1["reward_accuracy"])


def test_per_layer_actions_set_each_layers_bits_and_sparsity_within_the_budget(env):
    a = np.zeros(len(ACTION_LAYOUT_V1), np.float32)
    a[5:8] = [1.0, 0.0, -1.0]            # bit offsets of the 3 real layers
    a[5 + L_MAX: 8 + L_MAX] = [0.8, -0.8, 0.0]  # sparsity tilts
    a[8:5 + L_MAX] = 1.0                 # padding layers' entries are ignored
    _, info = _play(env, a, seed=1)
    plan = env.layer_plan
    b = info["plan_final_bits"]
    assert plan["bits"] == [min(b + 1, 8), b, max(b - 1, 2)]
    assert info["budget_met"] and not info["diverged"]
    layers = env.state.model
    from rltune import compression as C

    got = [1 - float(l.compressor.mask.float().mean()) for l in C.layers(layers)]
    assert got[0] > got[1] - 0.2 and all(0 <= x < 1 for x in got)


def test_a_collapse_ends_the_episode_as_diverged(env, monkeypatch):
    monkeypatch.setattr(V1, "COLLAPSE_SHARE", 1.5)  # the floor above the float student: any stage collapses
    _, info = _play(env, np.zeros(len(ACTION_LAYOUT_V1), np.float32), seed=2)
    assert info["diverged"] == "collapsed" and info["stage"] == 2 and info["reward_diverged"] < 0


def test_registered_id():
    import rltune  # noqa: F401 - registers the ids

    e = gym.make("rltune/DistillCompress-v1", scenarios=[TINY], targets=["6x"])
    assert isinstance(e.unwrapped, DistillCompressEnvV1)


def test_generated_tasks_each_at_its_own_budget():
    from rltune.errors import RltuneError
    from rltune.tasks import TaskSpec, generate_tasks

    tasks = [t for t in generate_tasks(TaskSpec(seed=0, n_tasks=240)) if t.family == "tabular"][:6]
    train = [t for t in tasks if not t.held_out]
    env = DistillCompressEnvV1(tasks=train)
    assert [s.name for s in env.scenarios] == [t.name for t in train]
    for seed in range(3):
        env.reset(seed=seed)
        assert str(env.budget) == str(env.task_budgets[env.scenario_index])
    with pytest.raises(RltuneError, match="held-out"):
        DistillCompressEnvV1(tasks=train, held_out=True)
    with pytest.raises(RltuneError, match="not both"):
        DistillCompressEnvV1(tasks=train, scenarios=[TINY])


def test_train_v1_on_generated_tasks_records_them_and_gates_on_held_out_ones(tmp_path, capsys):
    import json

    import yaml

    from rltune.cli import main

    from rltune.tasks import generate_tasks

    def spec_of(seed):
        return {"seed": seed, "n_tasks": 8, "families": ["tabular"], "held_out_share": 0.5, "students_per_dataset": 2}

    spec = next(spec_of(s) for s in range(50) if 0 < sum(t.held_out for t in generate_tasks(spec_of(s))) < 8)
    hp = tmp_path / "ppo.yml"
    hp.write_text(yaml.safe_dump({"default": {
        "env_id": "rltune/DistillCompress-v1", "tasks": spec, "total_timesteps": 4, "n_envs": 1, "seed": 0,
        "checkpoint_every": 4, "policy_kwargs": {"net_arch": [8]}, "ppo": {"n_steps": 4, "batch_size": 4, "n_epochs": 1},
        "env": {"stages": 2, "epochs_per_stage": 1}, "gate_tasks": 1, "gate_episodes": 1}}))
    run = tmp_path / "run"
    assert main(["train", "--hyperparams", str(hp), "--run-dir", str(run), "--no-progress", "-q"]) in (0, None)
    meta = json.loads((run / "agent" / "agent.json").read_text())

    n_train = sum(not t.held_out for t in generate_tasks(spec))
    tr = meta["training"]
    assert tr["env_id"] == "rltune/DistillCompress-v1" and tr["task_seed"] == spec["seed"]
    assert tr["tasks"] == n_train and isinstance(tr["tasks"], int) and tr["task_spec"]["n_tasks"] == 8
    gate = json.loads((run / "gate.json").read_text())
    assert gate["tasks"] == 1 and {"policy_val_acc", "zero_action_val_acc"} <= set(gate["rows"][0])
    held = {t.name for t in generate_tasks(spec) if t.held_out}
    assert gate["rows"][0]["task"] in held
    assert "held-out generated tasks" in capsys.readouterr().out


def test_layer_slots_keep_the_head_of_a_deep_model():
    assert V1.layer_slots(3) == [0, 1, 2]
    assert V1.layer_slots(8) == list(range(8))
    assert V1.layer_slots(12) == [0, 1, 2, 3, 4, 5, 6, 11]


def test_a_byte_budget_survives_its_own_string():
    from rltune.budget import Budget

    b = Budget.parse("12.3KB")
    assert Budget.parse(str(b)) == b


def test_a_task_spec_without_a_held_out_or_training_slice_is_refused():
    from rltune.errors import RltuneError
    from rltune.train import check_config

    base = {"env_id": "rltune/DistillCompress-v1", "total_timesteps": 4}
    for share in (0.0, 0.999):
        with pytest.raises(RltuneError, match="held-out tasks"):
            check_config({**base, "tasks": {"n_tasks": 12, "families": ["tabular"], "held_out_share": share}}, "t")
    with pytest.raises(RltuneError, match="need env_id"):
        check_config({"total_timesteps": 4, "tasks": {"n_tasks": 12}}, "t")


@pytest.mark.parametrize("signal", ["agreement", "both"])
def test_reward_signal_pays_the_agreement_over_the_training_rows_or_its_mean_with_val(env, signal):
    e = DistillCompressEnvV1(scenarios=[TINY], targets=["6x"], reward_signal=signal, action_penalty=0.0)
    e.share_caches(env)
    a = np.zeros(len(ACTION_LAYOUT_V1), np.float32)
    a[0] = -1.0  # two bits fewer than the zero action: a different student
    reward, info = _play(e, a, seed=2)
    fit = V1.fit_agreement(e.state.model, e.ctx.train_set)
    assert info["fit_agreement"] == pytest.approx(fit) and 0.0 <= fit <= 1.0
    d_fit = fit - info["zero_action_fit_agreement"]
    d_val = info["val_acc"] - info["zero_action_val_acc"]
    want = d_fit if signal == "agreement" else 0.5 * (d_fit + d_val)
    assert reward == pytest.approx(e.reward_scale * want)
    assert d_fit != 0.0


def test_an_unknown_reward_signal_is_refused():
    from rltune.errors import RltuneError

    with pytest.raises(RltuneError, match="reward_signal"):
        DistillCompressEnvV1(scenarios=[TINY], targets=["6x"], reward_signal="test")


def test_tuners_play_a_v1_agent_in_a_v1_env_and_tpe_goes_on_in_v0(tmp_path):
    from stable_baselines3 import PPO

    from rltune.agentfile import save_agent
    from rltune.tuners import run_tuner

    v1 = DistillCompressEnvV1(scenarios=[TINY], targets=["6x"])
    model = PPO("MlpPolicy", v1, policy_kwargs={"net_arch": [8]}, n_steps=16, batch_size=16, seed=0)
    path = save_agent(model, tmp_path / "a", OBS_LAYOUT_V1, ACTION_LAYOUT_V1,
                      {"scenarios": [], "env_id": "rltune/DistillCompress-v1"})
    v0 = DistillCompressEnv(scenarios=[TINY], targets=["6x"])
    r = run_tuner("ppo-replay", v0, 0, "6x", 0, 3, agent=path)
    assert r.stages_used == 3 and r.test["ratio"] >= 6.0
    # warm TPE: the policy episode in v1, the trials in the session's own v0 env
    w = run_tuner("ppo-warm-tpe", v0, 0, "6x", 0, 9, agent=path)
    assert w.episodes == 3 and w.episode_val_accs[0] == pytest.approx(r.val_acc)
    b = run_tuner("ppo-best-of-n", v0, 0, "6x", 0, 6, agent=path, batch=2)
    assert b.episodes == 2 and b.episode_val_accs[0] == pytest.approx(r.val_acc)


def test_batched_envs_of_generated_tasks_play_one_task_at_a_time():
    from rltune.tasks import TaskSpec, generate_tasks
    from rltune.vecenv import BatchedVecEnv

    tasks = [t for t in generate_tasks(TaskSpec(seed=0, n_tasks=240)) if t.family == "tabular" and not t.held_out][:4]
    fns = [lambda: DistillCompressEnvV1(tasks=tasks, stages=3, epochs_per_stage=1, reward_baseline="float")] * 3
    venv = BatchedVecEnv(fns)
    venv.seed(5)
    venv.reset()
    seen = []
    for _ in range(3 * 3):
        assert len({e.scenario_index for e in venv.raw}) == 1  # one task: the stages batch
        seen.append(venv.raw[0].scenario_index)
        venv.step(np.zeros((3, len(ACTION_LAYOUT_V1)), np.float32))
    assert len(set(seen)) >= 2  # the leader draws a new task each episode


def test_a_sensitivity_zero_rule_plays_the_sensitivity_tuner_and_is_paid_against_it():
    from rltune.tuners import run_tuner

    env = DistillCompressEnvV1(scenarios=[TINY], targets=["6x"], zero_rule="sensitivity")
    r = run_tuner("sensitivity", DistillCompressEnv(scenarios=[TINY], targets=["6x"]), 0, "6x", 0, 3)
    reward, info = _play(env, np.zeros(len(ACTION_LAYOUT_V1), np.float32), seed=0)
    plan = env.layer_plan
    assert plan["bits"] == r.config["bits"] and plan["sparsity"] == pytest.approx(r.config["sparsity"])
    assert info["val_acc"] == pytest.approx(r.val_acc) and info["budget_met"]
    assert info["zero_action_val_acc"] == env.zero_val_acc(0, env.float_seed, env.budget)
    # its centres are the allocator's split, not the global one the plus1 rule prunes to
    assert env.centres() == pytest.approx(r.config["sparsity"])


def test_a_soft_tilt_deadzone_ignores_small_tilts_and_scales_the_rest():
    from rltune.layer_sensitivity import TRUST_RADIUS

    env = DistillCompressEnvV1(scenarios=[TINY], targets=["6x"], zero_rule="sensitivity", tilt_deadzone=0.5)
    a = np.zeros(len(ACTION_LAYOUT_V1), np.float32)
    a[5 + L_MAX: 8 + L_MAX] = [0.45, -0.3, 0.2]  # inside the deadzone: the zero rule's plan
    env.reset(seed=0)
    env.step(a)
    centres = env.centres()
    assert env.layer_plan["sparsity"] == pytest.approx(centres) and env.layer_plan["shift"] == 0.0
    a[5 + L_MAX] = 1.0  # one full tilt: that layer's centre moves a whole TRUST_RADIUS before the common shift
    env.reset(seed=0)
    env.step(a)
    sps, shift = env.layer_plan["sparsity"], env.layer_plan["shift"]
    assert sps[0] - sps[1] == pytest.approx(centres[0] + TRUST_RADIUS - centres[1], abs=0.02)


def test_a_schedule_deadzone_reads_small_ramp_tau_and_alpha_entries_as_the_recipes():
    from rltune.env import TAU0

    env = DistillCompressEnvV1(scenarios=[TINY], targets=["6x"], schedule_deadzone=0.5)
    env.reset(seed=0)
    zero, _ = env.knobs_for(np.zeros(len(ACTION_LAYOUT_V1), np.float32))
    a = np.zeros(len(ACTION_LAYOUT_V1), np.float32)
    a[1:4] = [0.3, -0.45, 0.49]
    small, _ = env.knobs_for(a)
    assert small == zero and zero.temperature == TAU0
    a[2] = 1.0  # a full τ entry: the whole range, as without the deadzone
    full, _ = env.knobs_for(a)
    assert full.temperature == pytest.approx(min(TAU0 * 2 ** 1.5, TINY.knobs["temperature"][1]))


@pytest.mark.parametrize("kw, match", [({"zero_rule": "owl"}, "zero_rule"), ({"tilt_deadzone": 1.0}, "tilt_deadzone"),
                                       ({"tilt_deadzone": "x"}, "tilt_deadzone"),
                                       ({"schedule_deadzone": -0.1}, "schedule_deadzone"),
                                       ({"schedule_deadzone": True}, "schedule_deadzone")])
def test_bad_zero_rule_or_deadzone_is_refused(kw, match):
    from rltune.errors import RltuneError

    with pytest.raises(RltuneError, match=match):
        DistillCompressEnvV1(scenarios=[TINY], targets=["6x"], **kw)


def test_a_v1_agent_replays_against_the_zero_rule_it_was_trained_with(tmp_path):
    from stable_baselines3 import PPO

    from rltune.agentfile import save_agent
    from rltune.tuners import Session, _load_agent, _policy_env

    v1 = DistillCompressEnvV1(scenarios=[TINY], targets=["6x"], zero_rule="sensitivity", tilt_deadzone=0.5)
    model = PPO("MlpPolicy", v1, policy_kwargs={"net_arch": [8]}, n_steps=16, batch_size=16, seed=0)
    path = save_agent(model, tmp_path / "a", OBS_LAYOUT_V1, ACTION_LAYOUT_V1,
                      {"scenarios": [], "env_id": "rltune/DistillCompress-v1",
                       "env": {"zero_rule": "sensitivity", "tilt_deadzone": 0.5, "schedule_deadzone": 0.3}})
    s = Session(DistillCompressEnv(scenarios=[TINY], targets=["6x"]), 0, "6x", 0, 3)
    env = _policy_env(s, _load_agent(path))
    assert env.zero_rule == "sensitivity" and env.tilt_deadzone == 0.5 and env.schedule_deadzone == 0.3
