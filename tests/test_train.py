import json

import pytest
import yaml

from rltune.cli import main
from rltune.errors import RltuneError
from rltune.train import check_config, gate, load_hyperparams, train

TINY = {"name": "tiny-wine", "dataset": {"source": "wine", "transfer": 200},
        "teacher": {"arch": "mlp", "hidden": [32], "epochs": 30},
        "student": {"arch": "mlp", "hidden": [16], "pretrain_epochs": 5},
        "training": {"stages": 3, "epochs_per_stage": 1, "batch_size": 64, "lr": 0.005}}
HELD_OUT = {**TINY, "name": "tiny-bc", "dataset": {"source": "breast_cancer", "transfer": 200},
            "student": {"arch": "mlp", "hidden": [12], "pretrain_epochs": 5}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    for s in (TINY, HELD_OUT):
        (d / f"{s['name']}.yaml").write_text(yaml.safe_dump(s))
    cfg = check_config({
        "scenarios": [str(d / "tiny-wine.yaml")], "total_timesteps": 96, "n_envs": 1, "seed": 0,
        "checkpoint_every": 48, "policy_kwargs": {"net_arch": [16], "activation_fn": "tanh", "log_std_init": -1.0},
        "ppo": {"n_steps": 48, "batch_size": 16, "n_epochs": 2, "gamma": 1.0},
        "env": {"targets": ["6x"]}}, "test")
    run = train(cfg, d / "run", progress_bar=False, command="pytest")
    return d, run, cfg


def test_short_ppo_run_writes_its_folder(trained):
    d, run, cfg = trained
    for name in ("config.yaml", "command.txt", "train_summary.json", "agent/agent.json", "agent/policy.safetensors"):
        assert (run / name).exists(), name
    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_48", "step_96"]
    monitor = next((run / "monitor").glob("*.csv")).read_text().splitlines()
    assert "val_acc" in monitor[1] and len(monitor) > 3
    assert "rltune/DistillCompress-v0" in monitor[0]  # built through gym.make: the header names the env
    events = list((run / "tb").rglob("events.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"rltune/val_acc", "rltune/ratio", "rltune/reward_accuracy", "rltune/plan_final_bits"} <= tags
    meta = json.loads((run / "agent" / "agent.json").read_text())
    assert meta["training"]["scenarios"] == cfg["scenarios"]


def test_resume_continues_from_the_last_checkpoint(trained, monkeypatch):
    from stable_baselines3.common.vec_env import DummyVecEnv

    d, run, cfg = trained
    monitor = run / "monitor" / "env0.monitor.csv"
    before = monitor.read_text().splitlines()
    cfg2 = {**cfg, "total_timesteps": 144}
    seeded = []
    real_seed = DummyVecEnv.seed
    monkeypatch.setattr(DummyVecEnv, "seed", lambda self, seed=None: seeded.append(seed) or real_seed(self, seed))
    train(cfg2, run, resume=True, progress_bar=False, command="pytest")
    # the envs are reseeded from the steps done: a resumed run draws new tasks and seeds, not the
    # ones it drew from step 0 (the run's seed 0 gave both the same seeds before)
    from rltune.train import resume_seed

    assert seeded == [resume_seed(0, 96)]
    assert (run / "checkpoints" / "step_144").exists()
    assert (run / "checkpoints" / "step_144" / "optimizer.safetensors").exists()
    after = monitor.read_text().splitlines()
    # continued from step 96: the episodes logged before are kept, and only 48 new steps ran
    # (16 episodes of 3 stages), not a restart from step 0
    assert after[:len(before)] == before and len(after) - len(before) == 48 // 3
    meta = json.loads((run / "agent" / "agent.json").read_text())
    assert meta["training"]["steps_done"] == 144


def test_replay_on_a_scenario_outside_the_training_list(trained, tmp_path):
    d, run, _ = trained
    assert main(["replay", str(run / "agent"), "--scenario", str(d / "tiny-bc.yaml"), "--budget", "5x",
                 "--out", str(tmp_path), "--quiet"]) == 0
    rep = json.loads((tmp_path / "tiny-bc.json").read_text())
    assert rep["in_agent_training_set"] is False
    assert rep["artifact_predicts_same"]
    assert rep["compressed"]["ratio"] >= 5.0
    assert (tmp_path / "tiny-bc.rlt").stat().st_size == rep["compressed"]["bytes"]
    assert (tmp_path / "tiny-bc.md").read_text().count("|") > 10


def test_gate_compares_policy_and_recipe_on_held_out_only(trained):
    d, run, _ = trained
    g = gate(run / "agent", [str(d / "tiny-bc.yaml")], ["5x"], episodes=1)
    assert len(g["rows"]) == 1 and isinstance(g["passed"], bool)
    row = g["rows"][0]
    # the comparison itself: the recipe's episode, replayed independently, gives the row's number,
    # and the verdict follows from the differences
    from rltune.env import DistillCompressEnv
    from rltune.train import run_episode

    env = DistillCompressEnv(scenarios=[str(d / "tiny-bc.yaml")], targets=["5x"])  # the gate's env kwargs: none
    rec = run_episode(env, None, seed=0, options={"scenario": 0, "target": "5x", "float_seed": 0})
    assert rec["val_acc"] == row["recipe_val_acc"]
    assert g["mean_diff"] == pytest.approx(row["policy_val_acc"] - row["recipe_val_acc"])
    assert g["passed"] == (g["mean_diff"] > 0)
    with pytest.raises(RltuneError, match="held out"):
        gate(run / "agent", [str(d / "tiny-wine.yaml")], ["5x"], episodes=1)


def test_hyperparameter_file_default_entry_and_errors(tmp_path):
    cfg = load_hyperparams("agents/ppo.yml", "smoke")
    assert cfg["ppo"]["gamma"] == 1.0 and cfg["total_timesteps"] == 64  # merged over default
    bad = tmp_path / "ppo.yml"
    bad.write_text("default: {scenarios: [a], ppo: {learning_rat: 1}}\n")
    with pytest.raises(RltuneError, match="ppo.learning_rat"):
        load_hyperparams(bad)
    bad.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(RltuneError, match="not valid YAML"):
        load_hyperparams(bad)


def test_cli_replay_of_a_tampered_agent_is_one_line(trained, tmp_path, capsys):
    d, run, _ = trained
    import shutil

    bad = tmp_path / "agent"
    shutil.copytree(run / "agent", bad)
    data = bytearray((bad / "policy.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "policy.safetensors").write_bytes(bytes(data))
    assert main(["replay", str(bad), "--scenario", str(d / "tiny-bc.yaml"), "--budget", "5x", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rltune: error:") and len(err.splitlines()) == 1


def test_resume_seeds_never_repeat_a_start_or_each_other():
    from rltune.train import resume_seed

    seeds = {(s, n): resume_seed(s, n) for s in range(4) for n in (0, 96, 1000, 2048, 8192, 16384)}
    assert len(set(seeds.values())) == len(seeds)  # seed 0 at 1,000 steps is not seed 1 at 0
    starts = {s * 1000 + rank for s in range(100) for rank in range(64)}  # make_env_fn's first resets
    assert not starts & set(seeds.values())
    assert resume_seed(0, 96) == resume_seed(0, 96) and all(0 <= v < 2 ** 31 for v in seeds.values())
