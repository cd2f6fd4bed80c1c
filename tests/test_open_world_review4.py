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


# -- import-sb3: a user's own SB3 model trained on v1 (not only v0); one of another env is named ----

def _sb3_zip(env, path):
    from stable_baselines3 import PPO

    PPO("MlpPolicy", env, n_steps=32, batch_size=32, device="cpu", seed=0).save(path)
    return path


def test_import_sb3_takes_a_v1_model_and_records_its_env(tmp_path, capsys):
    import json

    from rltune.cli import main
    from rltune.tuners import check_agent

    env = gym.make("rltune/DistillCompress-v1", problems=[user_problem()], targets=["4x"])
    z = _sb3_zip(env, tmp_path / "v1.zip")
    assert main(["import-sb3", str(z), str(tmp_path / "agent"), "--trust-pickle"]) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "agent" / "agent.json").read_text())
    assert meta["training"]["env_id"] == "rltune/DistillCompress-v1"
    check_agent(tmp_path / "agent")  # its layouts are v1's: replay plays it in a v1 env


def test_import_sb3_of_another_env_is_one_line(tmp_path, capsys):
    from rltune.cli import main

    z = _sb3_zip(gym.make("Pendulum-v1"), tmp_path / "pendulum.zip")
    assert main(["import-sb3", str(z), str(tmp_path / "agent"), "--trust-pickle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not those of an rltune environment" in err[0], err
    assert not (tmp_path / "agent").exists()


# -- a Ray --address with nothing behind it fails fast with one line ------------------------------

def test_a_ray_address_nobody_answers_at_fails_fast_in_one_line():
    """ray.init(address="127.0.0.1:1") retried its GCS connection for minutes (train and evaluate)."""
    import subprocess
    import sys
    import time

    code = ("import sys; sys.path.insert(0, %r)\n"
            "from rltune.errors import RltuneError\nfrom rltune.rayvec import RayVecEnv\n"
            "try:\n    RayVecEnv([dict], address='127.0.0.1:1')\nexcept RltuneError as e:\n    print(e)\n") % (
        str(__import__('pathlib').Path(rltune.__file__).parents[1]),)
    t0 = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("RayVecEnv(address='127.0.0.1:1') was still waiting after 60 s")
    assert "nothing answers at 127.0.0.1:1" in out.stdout, out.stdout + out.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("address", ["notanaddress", "127.0.0.1:1"])
def test_evaluate_on_ray_at_a_bad_address_is_one_line(address, tmp_path, capsys):
    from rltune.cli import main

    import numpy as np

    (x, y), _ = split()
    np.savez(tmp_path / "data.npz", x=x, y=y)
    scen = tmp_path / "s.yaml"
    scen.write_text("name: s\ndataset: {source: file, path: data.npz}\n"
                    "teacher: {arch: mlp, hidden: [16], epochs: 1}\nstudent: {arch: mlp, hidden: [16]}\n"
                    "training: {stages: 2, epochs_per_stage: 1}\n")
    rc = main(["evaluate", "--backend", "ray", "--address", address, "--scenarios", str(scen), "--targets", "4x",
               "--tuners", "recipe", "--budget", "2", "--seeds", "1", "--out", str(tmp_path / "ev"),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("rltune: error: cannot join Ray at"), err


# -- SIGTERM to `rltune train --backend ray` / `evaluate --backend ray`: the CLI's one line, 143 ------

def test_ray_init_keeps_the_sigterm_handler_the_caller_installed():
    """ray.init put its own SIGTERM handler (sys.exit(15)) over the command line's, so a SIGTERM to
    `rltune train --backend ray` was a Ray stack dump and status 15, not one line and 143."""
    import signal

    import ray

    from rltune.rayvec import ray_init

    def mine(signum, frame):
        pass

    if ray.is_initialized():
        ray.shutdown()
    old = signal.signal(signal.SIGTERM, mine)
    try:
        ray_init(ray, None, num_cpus=1, include_dashboard=False, log_to_driver=False)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, old)


def test_sigterm_turned_into_a_plain_keyboardinterrupt_is_still_terminated(monkeypatch, tmp_path, capsys):
    """Ray's ray.wait / ray.get (C code) raise a fresh KeyboardInterrupt when a signal handler raises
    during them: `rltune evaluate --backend ray` on SIGTERM said 'interrupted' and exited 130."""
    import os
    import signal

    import rltune.scenario
    from rltune.cli import main

    def waits_in_c(path):  # what Ray's C code does with the handler's exception
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
            sum(range(1000))
        except KeyboardInterrupt:
            raise KeyboardInterrupt() from None
        raise AssertionError("SIGTERM was not delivered")

    monkeypatch.setattr(rltune.scenario, "load_scenario", waits_in_c)
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a fresh rltune process starts
    try:
        rc = main(["validate", str(tmp_path / "x.yaml")])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert rc == 143
    assert capsys.readouterr().err.strip().splitlines() == ["rltune: terminated (finished work is kept)"]


# -- train --config: a user's scenario files beside the config; the run folder reproduces the run ---

def test_train_config_reads_scenarios_beside_it_and_records_them_whole(tmp_path, monkeypatch, capsys):
    import numpy as np
    import yaml

    from rltune.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (x, y), (xv, yv) = split()
    np.savez(mine / "data.npz", x=x, y=y, x_val=xv, y_val=yv)
    (mine / "user.yaml").write_text(
        "name: user\ndataset: {source: file, path: data.npz, transfer: 100}\n"
        "teacher: {arch: mlp, hidden: [16], epochs: 2}\nstudent: {arch: mlp, hidden: [24], pretrain_epochs: 1}\n"
        "training: {stages: 2, epochs_per_stage: 1}\n")
    (mine / "cfg.yaml").write_text(yaml.safe_dump({
        "scenarios": ["user.yaml"], "total_timesteps": 32, "n_envs": 1, "checkpoint_every": 32,
        "policy_kwargs": {"net_arch": [8]}, "ppo": {"n_steps": 32, "batch_size": 32, "n_epochs": 1},
        "env": {"targets": ["4x"]}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = tmp_path / "run"
    assert main(["train", "--config", str(mine / "cfg.yaml"), "--run-dir", str(run), "--no-progress", "-q"]) == 0, \
        capsys.readouterr().err
    recorded = yaml.safe_load((run / "config.yaml").read_text())["scenarios"]
    assert recorded == [str((mine / "user.yaml").resolve())]  # RUN/config.yaml works from any folder


# -- an SB3 .zip given where an agent folder goes says how to convert it ----------------------------

def test_an_sb3_zip_given_as_the_agent_says_how_to_convert_it(tmp_path):
    z = _sb3_zip(gym.make("rltune/DistillCompress-v0", problems=[user_problem()], targets=["4x"]), tmp_path / "m.zip")
    with pytest.raises(RltuneError, match="is a file.*rltune import-sb3"):
        rltune.replay(str(z), user_problem(), target="4x")


# -- ppo-finetune writes nothing outside the output folder ------------------------------------------

def test_ppo_finetune_makes_no_folder_in_the_system_temp(tmp_path, monkeypatch):
    """SB3's learn() without a logger makes /tmp/SB3-<time> (empty) on every call."""
    import tempfile

    temp = tmp_path / "systemtemp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    r = rltune.compress(user_problem(), "4x", tuner="ppo-finetune", seed=0, episodes=3, agent="ppo-v0")
    assert r.report["packed_bytes"] > 0
    assert [p.name for p in temp.iterdir() if p.name.startswith("SB3-")] == []
