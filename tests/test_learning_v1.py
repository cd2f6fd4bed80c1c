"""experiments/learning_v1.py: training seeds, each with its gate and its held-out replay."""

import json
from pathlib import Path

import pytest

from rltune.env_v1 import ACTION_LAYOUT_V1, OBS_LAYOUT_V1, DistillCompressEnvV1
from rltune.scenario import parse_scenario
from experiment_loader import load_experiment

TINY = parse_scenario({
    "name": "tiny-lv1", "dataset": {"source": "wine", "transfer": 200},
    "teacher": {"arch": "mlp", "hidden": [32], "epochs": 30},
    "student": {"arch": "mlp", "hidden": [16], "pretrain_epochs": 5},
    "training": {"stages": 3, "epochs_per_stage": 1, "batch_size": 64, "lr": 0.005},
})


def _script(name):
    return load_experiment(name)


def test_learning_v1_gathers_each_seeds_gate_and_held_out_replay(tmp_path):
    from stable_baselines3 import PPO

    from rltune.agentfile import save_agent

    env = DistillCompressEnvV1(scenarios=[TINY], targets=["6x"])
    agents = []
    for seed, passed in ((0, True), (1, False)):
        model = PPO("MlpPolicy", env, policy_kwargs={"net_arch": [8]}, n_steps=16, batch_size=16, seed=seed)
        path = save_agent(model, tmp_path / f"a{seed}", OBS_LAYOUT_V1, ACTION_LAYOUT_V1,
                          {"scenarios": [], "env_id": "rltune/DistillCompress-v1", "seed": seed, "steps_done": 16})
        gate = {"rows": [{"policy_bits": 4, "zero_action_bits": 5}], "mean_diff": 0.01 if passed else -0.01,
                "std_diff": 0.0, "passed": passed, "tasks": 1, "episodes": 1}
        (Path(path) / "gate.json").write_text(json.dumps(gate))
        if seed == 0:  # a training monitor as rltune train's VecMonitor writes it; the last episode diverged
            (Path(path) / "training_monitor.csv").write_text(
                '#{"t_start": 0}\nr,l,t,scenario,plan_final_bits,recipe_bits,reward_accuracy,reward_action\n'
                "0.1,8,1,a,5,4,0.2,-0.01\n0.1,8,2,a,4,4,-0.4,-0.01\n0.1,8,3,a,5,4,0.6,-0.01\n"
                "-20.03,3,4,a,3,4,0.0,-0.01\n")  # diverged: the env leaves reward_accuracy 0, the penalty is -20
        agents.append(str(path))
    base = tmp_path / "base"
    common = ["--held-out-tasks", "1", "--seeds", "1", "--max-episodes", "1", "--workers", "1", "--no-progress"]
    assert _script("anytime").main([*common, "--tuners", "recipe", "--out", str(base)]) == 0
    out = tmp_path / "learning"
    assert _script("learning_v1").main(["--agents", *agents, "--baseline-from", str(base), "--held-out-tasks", "1",
                                        "--seeds", "1", "--max-episodes", "1", "--workers", "1", "--no-progress",
                                        "--out", str(out)]) == 0
    res = json.loads((out / "learning.json").read_text())
    assert res["n_seeds"] == 2 and res["all_through_gate"] is False
    assert [x["training_seed"] for x in res["agents"]] == [0, 1] and res["agents"][0]["gate_bits_differ"] == 1
    assert set(res["agents"][0]["held_out"]["tuner_means"]) == {"recipe", "ppo-replay"}
    assert res["rule_means"]["recipe"] == res["agents"][1]["held_out"]["tuner_means"]["recipe"]
    assert (out / "learning.md").read_text().count("| ") > 4
    curve = res["agents"][0]["training_curve"]  # reward_scale 20 (the default): 0.2 is 1 pt
    assert [b["episodes"] for b in curve] == [1, 1, 1, 1] and [b["diverged"] for b in curve] == [0, 0, 0, 1]
    assert [b["reward_pt_mean"] for b in curve] == [1.0, -2.0, 3.0, None]
    by_bits = res["agents"][0]["training_by_bits"]  # the diverged episode (-1) has no reward: left out
    assert by_bits == {"+0": {"episodes": 1, "reward_pt_mean": -2.0, "reward_pt_std": None},
                       "+1": {"episodes": 2, "reward_pt_mean": 2.0, "reward_pt_std": round(2 ** 0.5, 3)}}
    assert res["agents"][1]["training_curve"] is None and "no training_monitor.csv" in (out / "learning.md").read_text()
    with pytest.raises(SystemExit):
        _script("learning_v1").main(["--agents", str(tmp_path / "nothing"), "--out", str(out)])
