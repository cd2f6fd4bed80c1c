"""Hostile inputs, outside clients (rl-zoo, SB3, Gymnasium wrappers, Optuna) and the regressions a
fresh-clone break run found."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from torch import nn

import rltune
from rltune.cli import main
from rltune.errors import RltuneError

ROOT = Path(__file__).resolve().parents[1]
TINY = {"name": "tiny-hard", "dataset": {"source": "wine", "transfer": 200},
        "teacher": {"arch": "mlp", "hidden": [32], "epochs": 30},
        "student": {"arch": "mlp", "hidden": [16], "pretrain_epochs": 5},
        "training": {"stages": 2, "epochs_per_stage": 1, "batch_size": 64, "lr": 0.005}}


@pytest.fixture()
def scenario(tmp_path):
    path = tmp_path / "tiny-hard.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _one_line_exit_2(argv, capsys, match):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("rltune: error:") and match in err[0], err
    return err[0]


# -- writes where it must not, and tiny inputs that take the machine ---------------------------

@pytest.mark.parametrize("name", ["/x/escaped", "../x", "a/b", "x\0y", "..", "", " lead"])
def test_scenario_names_that_are_not_file_names_are_refused(name, tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": name, "dataset": {"source": "iris"}}))
    _one_line_exit_2(["validate", str(f)], capsys, "name")
    assert not (Path("/x") / "escaped").exists()


def test_a_yaml_bomb_is_refused_fast(tmp_path, capsys):
    bomb = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] +
                     [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")])
    f = tmp_path / "bomb.yaml"
    f.write_text("name: bomb\n" + bomb + "\n")
    t0 = time.perf_counter()
    _one_line_exit_2(["validate", str(f)], capsys, "not accepted")
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("section, field, match", [
    ("teacher", {"epochs": 10 ** 12}, "teacher.epochs: must be <="),
    ("dataset", {"source": "synthetic", "n_train": 10 ** 100, "n_val": 10, "n_test": 10}, "dataset.n_train: must be <="),
    ("teacher", {"hidden": [10 ** 9]}, "teacher.hidden"),
    ("dataset", {"source": "wine", "transfer": 10 ** 12}, "dataset.transfer: must be <="),
    ("training", {"lr": float("nan")}, "training.lr: expected a finite number"),
    ("knobs", {"sparsity": [float("nan"), float("nan")]}, "knobs.sparsity"),
    ("teacher", {"seed": 2 ** 70}, "teacher.seed: must be <="),
    ("training", {"stages": float("inf")}, "training.stages: expected a finite number"),
    ("dataset", {"source": "synthetic", "n_train": 100, "n_val": 100, "n_test": 100,
                 "params": {"n_classes": 10, "n_informative": 2}}, "make_classification refuses"),
])
def test_unbounded_or_impossible_fields_are_refused_before_work(section, field, match, tmp_path, capsys):
    raw = {"name": "x", "dataset": {"source": "wine"}}
    raw[section] = {**raw.get(section, {}), **field}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(raw))
    t0 = time.perf_counter()
    _one_line_exit_2(["validate", str(f)], capsys, match)
    assert time.perf_counter() - t0 < 1.0


def test_output_folder_on_a_file_and_an_unusable_cache_are_one_line(tmp_path, capsys, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("x")
    _one_line_exit_2(["replay", "--scenario", "wine-mlp", "--recipe", "--out", str(f)], capsys, "output folder")
    monkeypatch.setenv("RLTUNE_CACHE", str(f / "cache"))
    _one_line_exit_2(["replay", "--scenario", "wine-mlp", "--recipe", "--out", str(tmp_path / "o")], capsys,
                     "cache folder")


def test_a_corrupt_cached_mnist1d_file_is_regenerated(tmp_cache):
    from rltune.data import _mnist1d  # the cache's own reader

    x, y = _mnist1d(30, 5)
    path = tmp_cache / "mnist1d_30_5.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    x2, y2 = _mnist1d(30, 5)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


# -- agent files -------------------------------------------------------------------------------

def _agent_copy(tmp_path) -> Path:
    dst = tmp_path / "agent"
    shutil.copytree(ROOT / "agents" / "ppo-v0", dst)
    return dst


def _rewrite(agent: Path, fn) -> None:
    meta = json.loads((agent / "agent.json").read_text())
    fn(meta)
    (agent / "agent.json").write_text(json.dumps(meta))


def test_an_agent_with_another_layout_is_refused_where_it_meets_the_env(tmp_path, scenario, capsys):
    agent = _agent_copy(tmp_path)
    _rewrite(agent, lambda m: m.__setitem__("observation_layout", list(reversed(m["observation_layout"]))))
    _one_line_exit_2(["replay", str(agent), "--scenario", str(scenario), "--budget", "4x"], capsys, "layout")


def test_a_huge_agent_json_with_a_late_duplicate_is_refused_fast(tmp_path):
    from rltune.agentfile import load_policy

    agent = _agent_copy(tmp_path)
    n = 150_000
    _rewrite(agent, lambda m: m.update(observation_layout=[f"o{i}" for i in range(n)] + ["o5"],
                                       observation_space={**m["observation_space"], "shape": [n + 1]}))
    t0 = time.perf_counter()
    with pytest.raises(RltuneError):
        load_policy(agent)
    assert time.perf_counter() - t0 < 5.0


def test_a_huge_sparse_weights_file_is_refused_before_reading(tmp_path):
    from rltune.agentfile import load_policy

    agent = _agent_copy(tmp_path)
    with open(agent / "policy.safetensors", "wb") as f:
        f.truncate(64 << 30)  # sparse: 64 GB on paper, no disk used
    with pytest.raises(RltuneError, match="too large"):
        load_policy(agent)


# -- outside clients ---------------------------------------------------------------------------

def test_gymnasium_conventions_render_mode_pickling_and_info_keys(scenario):
    from stable_baselines3.common.monitor import Monitor

    from rltune.env import INFO_DEFAULTS

    env = gym.make("rltune/DistillCompress-v0", scenarios=[str(scenario)], targets=["4x"], render_mode=None)
    env.reset(seed=0)
    ansi = gym.make("rltune/DistillCompress-v0", scenarios=[str(scenario)], targets=["4x"], render_mode="ansi")
    ansi.reset(seed=0)
    assert "tiny-hard" in ansi.render()
    raw = env.unwrapped
    clone = pickle.loads(pickle.dumps(raw))  # after reset: the episode is dropped, the config kept
    obs, _ = clone.reset(seed=0)
    assert clone.observation_space.contains(obs)
    keys = tuple(INFO_DEFAULTS)
    mon = Monitor(gym.make("rltune/DistillCompress-v0", scenarios=[str(scenario)], targets=["4x"]),
                  info_keywords=("budget_met", "diverged", "val_acc"))
    for diverge in (False, True):
        obs, info = mon.reset(seed=1)
        assert set(keys) <= set(info)
        if diverge:  # a stage that diverges: Monitor must still find every key
            from rltune import env as env_module
            from rltune.errors import DivergedError

            def boom(*a, **k):
                raise DivergedError("training diverged: loss became nan")
            original = env_module.run_stage
            env_module.run_stage = boom
        try:
            done = False
            while not done:
                obs, r, term, trunc, info = mon.step(np.zeros(5, np.float32))
                assert set(keys) <= set(info)
                done = term or trunc
        finally:
            if diverge:
                env_module.run_stage = original
        assert ("episode" in info) and (bool(info["diverged"]) == diverge)


def test_a_study_this_evaluation_did_not_create_is_never_deleted(scenario, tmp_path):
    import optuna

    from rltune.harness import evaluate

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    foreign = optuna.create_study(study_name="rltune-optuna-tpe-tiny-hard-4x-0-2ep", storage=storage)
    foreign.enqueue_trial({"x": 1.0})
    with pytest.raises(RltuneError, match="did not create"):
        evaluate([str(scenario)], ["4x"], ["optuna-tpe"], [4], 1, tmp_path / "ev", storage=storage, progress=False)
    assert len(optuna.load_study(study_name=foreign.study_name, storage=storage).trials) == 1
    evaluate([str(scenario)], ["4x"], ["optuna-tpe"], [4], 1, tmp_path / "ev2", storage=storage, progress=False,
             study_prefix="mine")
    ours = optuna.load_study(study_name="mine-optuna-tpe-tiny-hard-4x-0-2ep", storage=storage)
    t = ours.trials[0]
    assert set(t.params) == {f"action_{n}" for n in ("final_bits", "ramp_shape", "temperature", "alpha", "bits_drop")}
    assert {"val_acc", "final_bits", "knobs", "packed_bytes"} <= set(t.user_attrs)
    assert 2 <= t.user_attrs["knobs"]["final_bits"] <= 8
    # the same evaluation folder run again resets its own study instead of refusing
    (tmp_path / "ev2" / "results.jsonl").unlink()
    evaluate([str(scenario)], ["4x"], ["optuna-tpe"], [4], 1, tmp_path / "ev2", storage=storage, progress=False,
             study_prefix="mine")
    assert len(optuna.load_study(study_name=ours.study_name, storage=storage).trials) == 2


def test_rl_zoo_trains_and_enjoys_the_env_and_its_zip_imports(scenario, tmp_path, capsys):
    pytest.importorskip("rl_zoo3")
    kw = [f"scenarios:['{scenario}']", "targets:['4x']"]
    common = ["--algo", "ppo", "--env", "rltune/DistillCompress-v0", "--gym-packages", "rltune", "-f", "logs"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "rl_zoo3.train", *common, "--conf-file",
                          str(ROOT / "agents" / "rl_zoo_ppo.yml"), "-n", "16", "--seed", "0", "--eval-freq", "-1",
                          "--env-kwargs", *kw], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "rl_zoo3.enjoy", *common, "-n", "4", "--no-render",
                          "--env-kwargs", *kw], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    zips = list((tmp_path / "logs").rglob("rltune-DistillCompress-v0.zip"))
    assert len(zips) == 1
    _one_line_exit_2(["import-sb3", str(zips[0]), str(tmp_path / "agent")], capsys, "--trust-pickle")
    assert main(["import-sb3", str(zips[0]), str(tmp_path / "agent"), "--trust-pickle"]) == 0
    assert main(["replay", str(tmp_path / "agent"), "--scenario", str(scenario), "--budget", "4x", "--out",
                 str(tmp_path / "r"), "--quiet"]) == 0
    (zips[0].parent / "vecnormalize.pkl").write_bytes(b"not read")
    _one_line_exit_2(["import-sb3", str(zips[0]), str(tmp_path / "agent2"), "--trust-pickle"], capsys, "VecNormalize")


# -- accepted, then failed or lied -------------------------------------------------------------

def test_a_training_collapse_ends_the_run_as_diverged(tmp_path, capsys):
    raw = {**TINY, "name": "collapse", "dataset": {"source": "digits", "transfer": 1000},
           "student": {"arch": "mlp", "hidden": [32], "pretrain_epochs": 5, "lr": 0.005},
           "training": {"stages": 2, "epochs_per_stage": 1, "lr": 1.0}}
    f = tmp_path / "collapse.yaml"
    f.write_text(yaml.safe_dump(raw))
    _one_line_exit_2(["replay", "--recipe", "--scenario", str(f), "--budget", "4x", "--out", str(tmp_path / "o"), "-q"],
                     capsys, "collapsed")


# -- regressions from the break run --------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(torch.tensor(x[:900])), torch.tensor(y[:900])).backward()
        opt.step()
    return teacher.eval(), (x[:900], y[:900]), (x[900:1300], y[900:1300]), (x[1300:], y[1300:])


FAST = dict(stages=2, epochs_per_stage=1, pretrain_epochs=2, transfer_size=300)


def test_odd_students_that_broke_before(digits, tmp_path):
    pytest.importorskip("onnxruntime")
    from rltune.onnx_export import onnx_predict

    teacher, tr, va, te = digits

    class Twice(nn.Module):  # one module under two names
        def __init__(self):
            super().__init__()
            lin = nn.Linear(64, 64)
            self.a, self.b = lin, lin
            self.out = nn.Linear(64, 10)

        def forward(self, x):
            return self.out(torch.relu(self.a(x)))

    students = {"one-layer": nn.Linear(64, 10), "bias-free": nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(),
                                                                          nn.Linear(32, 10, bias=False)),
                "twice": Twice()}
    for name, student in students.items():
        torch.manual_seed(0)
        p = rltune.Problem(teacher, student, train=tr, val=va, test=te, name=name, seed=np.int64(0), **FAST)
        r = rltune.compress(p, target="2x", tuner="adaptive-tau")
        assert r.report["ratio"] >= 2.0, name
        r.export_onnx(tmp_path / f"{name}.onnx")
        got = onnx_predict(tmp_path / f"{name}.onnx", te[0])
        assert np.allclose(got, r.model(torch.tensor(te[0])).detach().numpy(), atol=1e-4), name


def test_budgets_round_trip_and_argument_mistakes_are_one_line(digits):
    from rltune.budget import Budget

    for t in ("1e9nJ", "2000000x", "16.123456789x", "12KB"):
        b = Budget.parse(t)
        assert Budget.parse(str(b)) == b
    teacher, tr, va, te = digits
    with pytest.raises(RltuneError, match="knobs"):
        rltune.Problem(teacher, nn.Linear(64, 10), train=tr, val=va, knobs=[1, 2])
    with pytest.raises(RltuneError, match="seed"):
        rltune.Problem(teacher, nn.Linear(64, 10), train=tr, val=va, seed=-1)
    with pytest.raises(RltuneError, match="integers"):
        rltune.Problem(nn.Sequential(nn.Embedding(17, 4), nn.Flatten(), nn.Linear(256, 10)),
                       nn.Sequential(nn.Embedding(17, 4), nn.Flatten(), nn.Linear(256, 10)),
                       train=(tr[0].astype(np.int64), tr[1]), val=(va[0].astype(np.int64), va[1]))
    with pytest.raises(RltuneError, match="instance"):
        rltune.load_artifact(b"RLT", skeleton=nn.Linear)
    with pytest.raises(RltuneError, match="file path"):
        rltune.load_artifact(None)
    p = rltune.Problem(teacher, nn.Linear(64, 10), train=tr, val=va, name="tiny-floor", **FAST)
    t0 = time.perf_counter()
    with pytest.raises(RltuneError, match="cannot be met"):
        rltune.compress(p, target="1000x")
    assert time.perf_counter() - t0 < 2.0  # refused before any training


def test_write_atomic_never_replaces_a_folder_or_a_pipe(tmp_path):
    """As root, os.replace onto /dev/null would replace the device: anything there that is not a
    regular file is refused with one line, and left as it was."""
    import os
    import stat

    from rltune.errors import RltuneError, write_atomic

    d = tmp_path / "folder"
    d.mkdir()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for p in (d, fifo):
        with pytest.raises(RltuneError, match="not a regular file"):
            write_atomic(p, b"x", "--out")
    assert d.is_dir() and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["folder", "pipe"]  # no temporary left
    f = tmp_path / "f.json"
    f.write_bytes(b"old")
    assert write_atomic(f, b"new") == 3 and f.read_bytes() == b"new"
