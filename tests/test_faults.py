"""Faults: training and evaluation killed (SIGKILL) at random points, then resumed; what is kept."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

TINY = {"name": "tiny-fault", "dataset": {"source": "wine", "transfer": 200},
        "teacher": {"arch": "mlp", "hidden": [32], "epochs": 30},
        "student": {"arch": "mlp", "hidden": [16], "pretrain_epochs": 5},
        "training": {"stages": 3, "epochs_per_stage": 1, "batch_size": 64, "lr": 0.005}}


def _rltune(args, cwd, **kw):
    return subprocess.Popen([sys.executable, "-m", "rltune", "--quiet", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture()
def scenario(tmp_path):
    path = tmp_path / "tiny-fault.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _wait_for(pred, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_evaluate_killed_at_random_points_resumes_to_the_same_results(scenario, tmp_path):
    args = ["evaluate", "--scenarios", str(scenario), "--targets", "6x", "--tuners", "recipe", "random",
            "--budget", "6", "--seeds", "2", "--workers", "2", "--no-progress"]
    ref = _rltune([*args, "--out", str(tmp_path / "ref")], tmp_path)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    rng = random.Random(0)
    out = tmp_path / "killed"
    for attempt in range(3):
        p = _rltune([*args, "--out", str(out)], tmp_path)
        assert _wait_for(lambda: _children(p.pid) or p.poll() is not None, 60)
        time.sleep(rng.uniform(0.5, 4.0))
        workers = _children(p.pid)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        # the pool's workers do not outlive their parent
        assert _wait_for(lambda: not any(_alive(w) for w in workers), 15), "pool workers outlived kill -9"
    final = _rltune([*args, "--out", str(out)], tmp_path)
    assert final.wait(timeout=600) == 0, final.stderr.read()

    def rows(d):
        lines = (d / "results.jsonl").read_text().splitlines()
        return {r["key"]: r for r in map(json.loads, lines)}

    a, b = rows(tmp_path / "ref"), rows(out)
    assert set(a) == set(b) and len(a) == 4  # no cell lost, none duplicated
    for k in a:
        assert a[k]["val_acc"] == b[k]["val_acc"] and a[k]["test"]["test_acc"] == b[k]["test"]["test_acc"]


def test_training_killed_after_a_checkpoint_resumes_keeping_episodes_and_adam(scenario, tmp_path):
    hp = {"default": {"scenarios": [str(scenario)], "total_timesteps": 72, "n_envs": 1, "seed": 0,
                      "checkpoint_every": 24, "policy_kwargs": {"net_arch": [16]},
                      "ppo": {"n_steps": 24, "batch_size": 12, "n_epochs": 2}, "env": {"targets": ["6x"]}}}
    (tmp_path / "ppo.yml").write_text(yaml.safe_dump(hp))
    run = tmp_path / "run"
    args = ["train", "--hyperparams", str(tmp_path / "ppo.yml"), "--run-dir", str(run), "--no-progress"]
    p = _rltune(args, tmp_path)
    assert _wait_for(lambda: (run / "checkpoints" / "step_24").is_dir() or p.poll() is not None, 300)
    time.sleep(random.Random(1).uniform(0.0, 1.0))
    p.send_signal(signal.SIGKILL)
    p.wait()
    monitor = run / "monitor" / "env0.monitor.csv"
    before = monitor.read_text().splitlines()
    assert len(before) > 2  # header lines and at least one episode
    # a checkpoint half-written by a kill, and a newer corrupt one, are skipped on --resume
    (run / "checkpoints" / ".step_48.tmp").mkdir(exist_ok=True)
    bad = run / "checkpoints" / "step_999"
    bad.mkdir()
    (bad / "agent.json").write_text("{not json")
    resumed = _rltune([*args, "--resume"], tmp_path)
    resumed.stderr  # noqa: B018
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    after = monitor.read_text().splitlines()
    assert after[:len(before)] == before and len(after) > len(before)  # earlier episodes kept
    assert (run / "agent" / "agent.json").is_file()
    ckpts = sorted(int(c.name.split("_")[1]) for c in (run / "checkpoints").glob("step_*") if c.name != "step_999")
    assert ckpts[-1] >= 48 and (run / "checkpoints" / f"step_{ckpts[-1]}" / "optimizer.safetensors").is_file()


def test_resume_restores_the_optimizer_state(scenario, tmp_path):
    from stable_baselines3 import PPO

    from rltune.agentfile import load_optimizer, save_optimizer
    from rltune.env import DistillCompressEnv

    env = DistillCompressEnv(scenarios=[str(scenario)], targets=["6x"], stages=2)
    model = PPO("MlpPolicy", env, n_steps=8, batch_size=4, n_epochs=1, policy_kwargs={"net_arch": [8]}, seed=0)
    model.learn(8)
    save_optimizer(model, tmp_path)
    fresh = PPO("MlpPolicy", env, n_steps=8, batch_size=4, n_epochs=1, policy_kwargs={"net_arch": [8]}, seed=1)
    assert not fresh.policy.optimizer.state_dict()["state"]
    assert load_optimizer(fresh, tmp_path)
    a, b = model.policy.optimizer.state_dict()["state"], fresh.policy.optimizer.state_dict()["state"]
    assert a.keys() == b.keys()
    for k in a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert (a[k][name] == b[k][name]).all()
    (tmp_path / "optimizer.json").write_text("{broken")
    assert not load_optimizer(fresh, tmp_path)  # a damaged file is refused, not half-applied
