"""Known gaps mended: labels that skip classes, import-sb3's zero rule, Ray's INFO lines under -q,
torch inductor's temp folder on the ppo-finetune path, a Ray --address where a non-Ray program
listens."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import rltune
from rltune.errors import RltuneError, RltuneWarning

# -- 1. labels with gaps -----------------------------------------------------------------------


def _rltune_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, RltuneWarning)]


def _blobs(labels, n=40, seed=0):
    """n rows per label in ``labels``, the class in feature 0 (so any model can learn it)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.asarray(labels, dtype=np.int64), n)
    x = rng.normal(size=(len(y), 4)).astype(np.float32)
    x[:, 0] += 3 * y
    return x, y


def _mlp(classes):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, classes))


def _problem(train, val, test=None, classes=4):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rltune.Problem(_mlp(classes), _mlp(classes), train, val, test, transfer_size=0)
    return _rltune_warnings(record)


def test_a_train_split_that_skips_a_class_is_a_warning_naming_it():
    msgs = _problem(_blobs([0, 1, 3]), _blobs([0, 1, 3], n=5))
    assert len(msgs) == 1 and "train has no rows of class 2 " in msgs[0], msgs


def test_labels_without_gaps_warn_nothing():
    assert _problem(_blobs([0, 1, 2, 3]), _blobs([0, 1, 2, 3], n=5), _blobs([0, 1, 2, 3], n=5)) == []
    # classes above train's top label that no split shows: a teacher head with more outputs, fine
    assert _problem(_blobs([0, 1]), _blobs([0, 1], n=5), classes=6) == []


def test_a_val_or_test_class_with_no_train_rows_is_a_warning():
    msgs = _problem(_blobs([0, 1, 2]), _blobs([0, 1, 2, 3], n=5), _blobs([0, 3], n=5))
    assert len(msgs) == 2, msgs
    assert "val has 5 of 20 rows of class 3, which train has no rows of" in msgs[0]
    assert "test has 5 of 10 rows of class 3, which train has no rows of" in msgs[1]


def test_a_val_label_past_the_models_outputs_is_an_error():
    with pytest.raises(RltuneError, match="labels go up to 4 but the teacher has only 4 outputs"):
        _problem(_blobs([0, 1, 2, 3]), _blobs([0, 4], n=5))


def test_a_data_file_with_gaps_warns_once_per_gap(tmp_path):
    from rltune.data import load_dataset
    from rltune.scenario import parse_scenario

    x, y = _blobs([0, 1, 3])
    xv, yv = _blobs([0, 1, 3, 4], n=5, seed=1)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_val=xv, y_val=yv)
    raw = {"name": "mine", "dataset": {"source": "file", "path": str(tmp_path / "d.npz")},
           "teacher": {"hidden": [8], "epochs": 1}, "student": {"hidden": [4], "pretrain_epochs": 1},
           "training": {"stages": 2, "epochs_per_stage": 1}}
    sc = parse_scenario(raw, str(tmp_path / "mine.yaml"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        d = load_dataset(sc.dataset)
    msgs = _rltune_warnings(record)
    assert d.n_classes == 5
    assert len(msgs) == 2, msgs
    assert "d.npz: train has no rows of class 2 (its labels go up to 3)" in msgs[0]
    assert "val has 5 of 20 rows of class 4, which train has no rows of" in msgs[1]
    assert not any(": test has" in m for m in msgs)  # test came from train's stratified split


def test_the_cli_prints_a_label_gap_as_one_warning_line(tmp_path, capsys):
    import sys
    import subprocess

    x, y = _blobs([0, 1, 3], n=30)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    (tmp_path / "s.yaml").write_text(
        "name: gaps\ndataset: {source: file, path: d.npz, transfer: 50}\n"
        "teacher: {hidden: [8], epochs: 1}\nstudent: {hidden: [4], pretrain_epochs: 1}\n"
        "training: {stages: 1, epochs_per_stage: 1}\n")
    p = subprocess.run([sys.executable, "-m", "rltune", "compress", "--scenario", str(tmp_path / "s.yaml"), "--budget", "2x",
                        "--tuner", "recipe", "--out", str(tmp_path / "out"), "-q"],
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if "train has no rows" in ln]
    assert len(lines) == 1 and lines[0].startswith("rltune: warning: "), p.stderr
    assert "Traceback" not in p.stderr


# -- 2. import-sb3 --zero-rule: a v1 model's zero rule recorded, refused for a v0 model ----------


def _sb3_zip(env_id, path):
    """An untrained SB3 PPO .zip whose spaces are those of ``env_id`` (no env is built)."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    from rltune.agentfile import _SpacesOnlyEnv
    from rltune.train import layouts

    o, a = layouts(env_id)
    env = _SpacesOnlyEnv(gym.spaces.Box(-5.0, 5.0, (len(o),), np.float32), gym.spaces.Box(-1.0, 1.0, (len(a),), np.float32))
    PPO("MlpPolicy", env, n_steps=32, batch_size=32, device="cpu", seed=0).save(path)
    return path


def _agent_env(folder):
    import json

    return json.loads((folder / "agent.json").read_text())["training"].get("env")


@pytest.mark.parametrize("rule", ["sensitivity", "plus1", None])
def test_import_sb3_records_a_v1_models_zero_rule(tmp_path, capsys, rule):
    from rltune.cli import main
    from rltune.tuners import _trained_env, check_agent

    z = _sb3_zip("rltune/DistillCompress-v1", tmp_path / "v1.zip")
    extra = ["--zero-rule", rule] if rule else []
    assert main(["import-sb3", str(z), str(tmp_path / "agent"), "--trust-pickle", "-q", *extra]) == 0, \
        capsys.readouterr().err
    assert _agent_env(tmp_path / "agent") == {"zero_rule": rule or "plus1"}
    agent = check_agent(tmp_path / "agent")  # the tuners read it back: the twin env plays that rule
    assert _trained_env(agent)["zero_rule"] == (rule or "plus1")


def test_import_sb3_zero_rule_of_a_v0_model_is_one_line(tmp_path, capsys):
    from rltune.cli import main

    z = _sb3_zip("rltune/DistillCompress-v0", tmp_path / "v0.zip")
    assert main(["import-sb3", str(z), str(tmp_path / "agent"), "--trust-pickle", "--zero-rule", "sensitivity"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no zero rule" in err[0] and "--zero-rule" in err[0], err
    assert not (tmp_path / "agent").exists()
    assert main(["import-sb3", str(z), str(tmp_path / "agent"), "--trust-pickle", "-q"]) == 0  # without: as before
    assert _agent_env(tmp_path / "agent") is None


def test_import_sb3_zero_rule_is_checked(tmp_path, capsys):
    from rltune.agentfile import import_sb3_zip
    from rltune.cli import build_parser, main
    from rltune.env_v1 import ZERO_RULES

    z = _sb3_zip("rltune/DistillCompress-v1", tmp_path / "v1.zip")
    with pytest.raises(SystemExit) as e:
        main(["import-sb3", str(z), str(tmp_path / "agent"), "--trust-pickle", "--zero-rule", "minus1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'minus1'" in err[0], err
    action = next(a for s in build_parser()._subparsers._group_actions for n, p in s.choices.items()
                  if n == "import-sb3" for a in p._actions if a.dest == "zero_rule")
    assert tuple(action.choices) == ZERO_RULES
    with pytest.raises(RltuneError, match="zero_rule must be one of plus1, sensitivity"):
        import_sb3_zip(z, tmp_path / "agent", trust_pickle=True, zero_rule="minus1")
    assert not (tmp_path / "agent").exists()


# -- 3. Ray's INFO lines follow the command line's --quiet ----------------------------------------


def _tiny_scenario(tmp_path):
    x, y = _blobs([0, 1, 2], n=30)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    scen = tmp_path / "s.yaml"
    scen.write_text("name: s\ndataset: {source: file, path: data.npz}\n"
                    "teacher: {arch: mlp, hidden: [8], epochs: 1}\nstudent: {arch: mlp, hidden: [8]}\n"
                    "training: {stages: 2, epochs_per_stage: 1}\n")
    return scen


@pytest.fixture
def ray_init_kwargs(monkeypatch):
    """Ray's init replaced by one that records its kwargs and fails (no Ray is started)."""
    ray = pytest.importorskip("ray")
    calls = []

    def fake_init(address=None, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("not started in this test")

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return calls


@pytest.mark.parametrize("quiet", [True, False])
def test_evaluate_on_ray_is_quiet_under_q(tmp_path, capsys, ray_init_kwargs, quiet):
    from rltune.cli import main

    rc = main(["evaluate", "--backend", "ray", "--scenarios", str(_tiny_scenario(tmp_path)), "--targets", "4x",
               "--tuners", "recipe", "--budget", "2", "--seeds", "1", "--out", str(tmp_path / "ev"),
               "--no-progress", *(["-q"] if quiet else [])])
    assert rc == 2 and "not started in this test" in capsys.readouterr().err
    (kw,) = ray_init_kwargs
    assert kw["log_to_driver"] is False
    if quiet:
        assert kw["logging_level"] == __import__("logging").WARNING
    else:
        assert "logging_level" not in kw  # Ray's own default (INFO), as before


@pytest.mark.parametrize("quiet", [True, False])
def test_train_on_ray_is_quiet_under_q(tmp_path, capsys, ray_init_kwargs, quiet):
    import yaml

    from rltune.cli import main

    hp = tmp_path / "ppo.yml"
    hp.write_text(yaml.safe_dump({"default": {
        "scenarios": [str(_tiny_scenario(tmp_path))], "total_timesteps": 4, "n_envs": 2, "seed": 0,
        "policy_kwargs": {"net_arch": [8]}, "ppo": {"n_steps": 2, "batch_size": 4, "n_epochs": 1},
        "env": {"targets": ["4x"]}, "gate_episodes": 1}}))
    rc = main(["train", "--hyperparams", str(hp), "--run-dir", str(tmp_path / "run"), "--backend", "ray",
               "--no-progress", *(["-q"] if quiet else [])])
    assert rc == 2 and "not started in this test" in capsys.readouterr().err
    (kw,) = ray_init_kwargs
    assert ("logging_level" in kw) is quiet


def test_a_real_ray_start_prints_no_info_line_when_quiet(tmp_path):
    """Ray 2.x logs 'Started a local Ray instance.' at INFO on stderr; under -q it is gone."""
    pytest.importorskip("ray")
    import os
    import subprocess
    import sys

    code = ("import ray, sys\nfrom rltune.cli import _progress\nfrom rltune.rayvec import ray_init\n"
            "_progress(sys.argv[1] == 'q')\n"
            "ray_init(ray, None, include_dashboard=False, log_to_driver=False, num_cpus=1)\nray.shutdown()\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for mode, shown in (("q", False), ("loud", True)):
        p = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=180, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        assert ("Started a local Ray instance" in p.stderr) is shown, (mode, p.stderr)


# -- 4. no torchinductor_<user> folder in the temp folder ----------------------------------------


def _cli_env(tmp_path, **extra):
    import os

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**env, "TMPDIR": str(tmp_path / "tmp"), "RLTUNE_CACHE": str(tmp_path / "cache"), **extra}


def test_ppo_finetune_leaves_no_torchinductor_folder_in_the_temp_folder(tmp_path):
    """torch's Optimizer.add_param_group imports torch._dynamo on first use, and that import makes
    $TMPDIR/torchinductor_<user> (every training path, ppo-finetune's PPO included); the CLI puts it
    in rltune's cache folder."""
    import subprocess
    import sys

    scen = _tiny_scenario(tmp_path)
    p = subprocess.run([sys.executable, "-m", "rltune", "compress", "--scenario", str(scen), "--budget", "4x",
                        "--tuner", "ppo-finetune", "--episodes", "3", "--out", str(tmp_path / "out"), "-q"],
                       capture_output=True, text=True, timeout=300, env=_cli_env(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    assert not list((tmp_path / "tmp").glob("torchinductor*")), list((tmp_path / "tmp").iterdir())
    assert (tmp_path / "cache" / "torchinductor").is_dir()


def test_a_torch_cache_the_user_set_or_an_unusable_rltune_cache_is_left_to_torch(tmp_path, monkeypatch):
    import os

    from rltune.cli import _torch_cache_in_rltunes

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    _torch_cache_in_rltunes()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("RLTUNE_CACHE", str(tmp_path / "afile"))  # a file in the way: torch's default, no error
    _torch_cache_in_rltunes()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("RLTUNE_CACHE", str(tmp_path / "c"))
    _torch_cache_in_rltunes()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c" / "torchinductor")


# -- 5. a Ray --address where a non-Ray program listens fails in seconds, in one line -------------


@pytest.fixture
def web_server():
    """An HTTP server on all interfaces (Ray dials this machine's address for 127.0.0.1), in a thread."""
    import http.server
    import threading

    srv = http.server.ThreadingHTTPServer(("0.0.0.0", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def bare_grpc_server():
    """A gRPC server with no services (a gRPC program that is not Ray)."""
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = srv.add_insecure_port("0.0.0.0:0")
    srv.start()
    yield port
    srv.stop(None)


def test_a_ray_address_where_a_web_server_listens_fails_in_seconds(web_server, tmp_path):
    """ray.init(address=...) at an HTTP server retried its GCS connection for minutes (the TCP probe
    passed: something answers). Checked in a subprocess so a regression fails rather than hangs."""
    import subprocess
    import sys
    import time

    pytest.importorskip("ray")
    code = ("import ray, sys\nfrom rltune.errors import RltuneError\nfrom rltune.rayvec import ray_init\n"
            "try:\n    ray_init(ray, sys.argv[1], include_dashboard=False, log_to_driver=False)\n"
            "except RltuneError as e:\n    print(e)\nelse:\n    print('joined')\n")
    for address in (f"127.0.0.1:{web_server}", f"localhost:{web_server}"):
        t0 = time.monotonic()
        try:
            p = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"ray_init at a web server ({address}) was still waiting after 90 s")
        assert time.monotonic() - t0 < 60
        out = p.stdout.strip().splitlines()
        assert len(out) == 1 and out[0].startswith(f"cannot join Ray at {address}: another program listens at"), \
            p.stdout + p.stderr[-2000:]
        assert "does not speak gRPC" in out[0]


def test_the_cli_at_a_web_server_is_one_line_status_2(web_server, tmp_path):
    import subprocess
    import sys

    pytest.importorskip("ray")
    scen = _tiny_scenario(tmp_path)
    try:
        p = subprocess.run([sys.executable, "-m", "rltune", "evaluate", "--backend", "ray", "--address",
                            f"127.0.0.1:{web_server}", "--scenarios", str(scen), "--targets", "4x", "--tuners",
                            "recipe", "--budget", "2", "--seeds", "1", "--out", str(tmp_path / "ev"), "--no-progress"],
                           capture_output=True, text=True, timeout=120, env=_cli_env(tmp_path))
    except subprocess.TimeoutExpired:
        pytest.fail("rltune evaluate --backend ray at a web server was still waiting after 120 s")
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("rltune: error: cannot join Ray at"), p.stderr


def test_a_grpc_server_that_is_not_ray(bare_grpc_server):
    from rltune.rayvec import check_address

    with pytest.raises(RltuneError, match="a gRPC server that is not a Ray GCS listens at"):
        check_address(f"127.0.0.1:{bare_grpc_server}")
    check_address(f"ray://127.0.0.1:{bare_grpc_server}")  # speaks gRPC: the Ray client judges the rest


def test_a_ray_client_address_at_a_web_server_fails_before_rays_30_s(web_server):
    import time

    from rltune.rayvec import check_address

    t0 = time.monotonic()
    with pytest.raises(RltuneError, match="is not a Ray client server"):
        check_address(f"ray://127.0.0.1:{web_server}", timeout=1.0)
    assert time.monotonic() - t0 < 10


def test_a_real_ray_gcs_passes_the_check():
    ray = pytest.importorskip("ray")
    import os

    from rltune.rayvec import check_address

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level=30)
    try:
        gcs = ray.get_runtime_context().gcs_address
        check_address(gcs)
        check_address(f"127.0.0.1:{gcs.rpartition(':')[2]}")  # Ray dials this machine's address: so does the check
    finally:
        if started:
            ray.shutdown()


def test_a_cached_model_is_never_seen_without_its_whole_metadata(tmp_path, monkeypatch):
    """The teacher / float-student cache writes its .json whole before the weights appear: a second
    run on the same cache that found the weights read a half-written .json and trained again."""
    import json as _json
    import os as _os

    import torch as _torch

    import rltune.context as ctx

    seen = []
    real = _os.replace

    def spy(src, dst):
        if str(dst).endswith(".safetensors"):
            seen.append(_json.loads((tmp_path / "teacher_k.json").read_text()))
        return real(src, dst)

    monkeypatch.setattr(ctx.os, "replace", spy)
    ctx._save_model(_torch.nn.Linear(3, 2), tmp_path / "teacher_k.safetensors", {"val_acc": 0.5, "epochs": 3})
    assert seen == [{"val_acc": 0.5, "epochs": 3}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher_k.json", "teacher_k.safetensors"]
