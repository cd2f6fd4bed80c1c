"""RayVecEnv: SB3's VecEnv over Ray actors gives what the in-process batched VecEnv gives."""

import numpy as np
import pytest

from rltune.env import DistillCompressEnv
from rltune.errors import RltuneError
from rltune.scenario import parse_scenario

ray = pytest.importorskip("ray")

TINY = parse_scenario({
    "name": "tiny-ray", "dataset": {"source": "wine", "transfer": 200},
    "teacher": {"arch": "mlp", "hidden": [32], "epochs": 30},
    "student": {"arch": "mlp", "hidden": [16], "pretrain_epochs": 5},
    "training": {"stages": 3, "epochs_per_stage": 1, "batch_size": 64, "lr": 0.005},
})


def _fns(n):
    return [lambda: DistillCompressEnv(scenarios=[TINY], targets=["6x"]) for _ in range(n)]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _rollout(venv, steps=4):
    venv.seed(7)
    obs = [venv.reset()]
    rng = np.random.default_rng(0)
    rews, dones, infos = [], [], []
    for _ in range(steps):
        a = rng.uniform(-1, 1, (venv.num_envs, *venv.action_space.shape)).astype(np.float32)
        o, r, d, i = venv.step(a)
        obs.append(o), rews.append(r), dones.append(d), infos.append(i)
    return np.stack(obs), np.stack(rews), np.stack(dones), infos


def test_ray_workers_give_what_the_batched_vecenv_gives(local_ray):
    from rltune.rayvec import RayVecEnv
    from rltune.vecenv import BatchedVecEnv

    ref = BatchedVecEnv(_fns(3))
    venv = RayVecEnv(_fns(3), n_workers=2)  # 2 + 1 envs
    try:
        assert venv.num_envs == 3 and venv.observation_space == ref.observation_space
        o1, r1, d1, i1 = _rollout(ref)
        o2, r2, d2, i2 = _rollout(venv)
        np.testing.assert_allclose(o2, o1, atol=1e-4)
        np.testing.assert_allclose(r2, r1, atol=1e-4)
        assert (d2 == d1).all() and d1[2].all()  # 3 stages: every episode ended, auto-reset
        assert all("terminal_observation" in i for i in i2[2])
        assert venv.get_attr("stages") == ref.get_attr("stages")
        assert venv.get_attr("stages", indices=[2]) == [3]
        venv.set_attr("probe_tolerance", 0.02, indices=[0, 2])
        assert venv.get_attr("probe_tolerance") == [0.02, ref.get_attr("probe_tolerance")[1], 0.02]
        assert venv.env_is_wrapped(type(None).__class__) == [False] * 3
        assert len(venv.reset_infos) == 3  # refreshed by the auto-resets
    finally:
        venv.close()
        ref.close()
    assert ray.is_initialized()  # it did not own the Ray it joined


def test_ppo_learns_from_ray_workers(local_ray):
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor

    from rltune.rayvec import RayVecEnv

    venv = VecMonitor(RayVecEnv(_fns(2), n_workers=2))
    try:
        model = PPO("MlpPolicy", venv, n_steps=3, batch_size=6, n_epochs=1, seed=0)
        model.learn(6)
        assert model.num_timesteps == 6
    finally:
        venv.close()


def test_bad_arguments_are_one_clear_error(local_ray):
    from rltune.rayvec import RayVecEnv

    with pytest.raises(RltuneError, match="at least one"):
        RayVecEnv([])
    with pytest.raises(RltuneError, match="n_workers"):
        RayVecEnv(_fns(1), n_workers=0)
    with pytest.raises(RltuneError, match="already running"):   # not silently the local Ray
        RayVecEnv(_fns(1), address="10.0.0.9:6379")
    own = RayVecEnv(_fns(1), address=ray.get_runtime_context().gcs_address)   # the running one is fine
    own.close()
    wide = RayVecEnv(_fns(3), n_workers=5)  # more actors than the 2 CPUs would wait for ever
    try:
        assert len(wide.workers) == 2 and wide.num_envs == 3
    finally:
        wide.close()


def test_a_worker_whose_env_cannot_be_built_is_one_line(local_ray):
    from rltune.rayvec import RayVecEnv

    def broken():
        raise RltuneError("scenario nowhere.yaml: not found")

    with pytest.raises(RltuneError, match="nowhere.yaml"):
        RayVecEnv([broken], n_workers=1)


def test_rltune_train_backend_ray(tmp_path, capsys):
    import yaml

    from rltune.cli import main

    ray.shutdown()  # the CLI starts (and ends) its own local Ray
    s = tmp_path / "s.yaml"
    s.write_text(yaml.safe_dump(TINY.to_dict()))
    hp = tmp_path / "ppo.yml"
    hp.write_text(yaml.safe_dump({"default": {
        "scenarios": [str(s)], "total_timesteps": 12, "n_envs": 2, "seed": 0, "checkpoint_every": 6,
        "policy_kwargs": {"net_arch": [8]}, "ppo": {"n_steps": 3, "batch_size": 6, "n_epochs": 1},
        "env": {"targets": ["6x"]}, "gate_episodes": 1}}))
    run = tmp_path / "run"
    code = main(["train", "--hyperparams", str(hp), "--run-dir", str(run), "--backend", "ray", "--ray-workers", "2",
                 "--no-progress", "-q"])
    assert code in (0, None)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["vec_env"] == "ray" and cfg["ray_workers"] == 2
    lines = (run / "monitor" / "batched.monitor.csv").read_text().splitlines()
    assert "rltune/RayVecEnv" in lines[0] and len(lines) >= 2 + 4  # 12 steps of 3-stage episodes
    assert not ray.is_initialized()
    # wrong combinations: one line, status 2
    for args in (["--address", "ray://nowhere:1"], ["--backend", "ray", "--vec-env", "subproc"]):
        assert main(["train", "--hyperparams", str(hp), "--run-dir", str(tmp_path / "x"), *args, "-q"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
