"""Agent files: exact round trips, and refusal (without unpickling) of anything tampered or crafted."""

import base64
import hashlib
import json
import pickle
import shutil
import warnings
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from stable_baselines3 import PPO
from torch import nn

from rltune.agentfile import (META_NAME, WEIGHTS_NAME, import_sb3_zip, load_policy, load_ppo,
                              ppo_hyperparameters, save_agent)
from rltune.errors import RltuneError

torch.set_num_threads(1)

OBS_LAYOUT = ["x0", "x1", "x2", "budget", "progress"]
ACT_LAYOUT = ["sparsity", "bits", "temperature"]


class TinyEnv(gym.Env):
    """Reward = -||action - obs[:3]||^2: PPO can learn to copy the first three observations."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (5,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self._t = 0
        self._obs = np.zeros(5, np.float32)

    def _new_obs(self):
        self._obs = self.np_random.uniform(-1, 1, 5).astype(np.float32)
        return self._obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return self._new_obs(), {}

    def step(self, action):
        reward = -float(np.sum((np.asarray(action) - self._obs[:3]) ** 2))
        self._t += 1
        return self._new_obs(), reward, False, self._t >= 8, {}


class Evil:
    """Unpickling this creates (opens for writing) ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


TRAINING = {"scenarios": ["digits-mlp"], "total_timesteps": 256, "wall_seconds": 1.5,
            "command": "rltune train digits-mlp", "seed": 0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained PPO and its saved agent folder (tests copy the folder before tampering)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PPO("MlpPolicy", TinyEnv(), n_steps=64, batch_size=32, policy_kwargs={"net_arch": [16]},
                    seed=0, device="cpu")
        model.learn(256)
    folder = save_agent(model, tmp_path_factory.mktemp("agents") / "tiny", OBS_LAYOUT, ACT_LAYOUT,
                        TRAINING, ppo_hyperparameters(model))
    return model, folder


@pytest.fixture
def agent(trained, tmp_path):
    """A fresh copy of the saved agent folder, free to tamper with."""
    return shutil.copytree(trained[1], tmp_path / "agent")


def _obs_batch(n=64):
    return np.random.default_rng(1).uniform(-1.5, 1.5, (n, 5)).astype(np.float32)


def _meta(folder):
    return json.loads((folder / META_NAME).read_text())


def _write_meta(folder, meta):
    (folder / META_NAME).write_text(json.dumps(meta))


def _rehash(folder, meta=None):
    meta = _meta(folder) if meta is None else meta
    meta["weights_sha256"] = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    _write_meta(folder, meta)


def _refused(folder, *patterns, loader=load_policy):
    with pytest.raises(RltuneError) as info:
        loader(folder)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for p in patterns:
        assert p.lower() in msg.lower(), msg
    return msg


# ------------------------------------------------------------------------------- round trips


def test_layout_and_meta(trained):
    _, folder = trained
    assert sorted(p.name for p in folder.iterdir()) == [META_NAME, WEIGHTS_NAME]
    meta = _meta(folder)
    assert meta["format"] == "rltune-agent" and meta["format_version"] == 1 and meta["algo"] == "PPO"
    assert meta["policy_kwargs"] == {"net_arch": [16], "activation_fn": "tanh", "log_std_init": 0.0,
                                     "ortho_init": True}
    assert meta["observation_space"] == {"type": "Box", "shape": [5], "low": [-1.0] * 5, "high": [1.0] * 5,
                                         "dtype": "float32"}
    assert meta["observation_layout"] == OBS_LAYOUT and meta["action_layout"] == ACT_LAYOUT
    assert meta["training"] == TRAINING
    assert meta["hyperparameters"]["n_steps"] == 64 and meta["hyperparameters"]["batch_size"] == 32
    assert meta["weights_sha256"] == hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()


def test_load_policy_predicts_exactly(trained):
    model, folder = trained
    rng_before = torch.get_rng_state()
    agent = load_policy(folder)
    assert torch.equal(rng_before, torch.get_rng_state())  # loading does not disturb the caller's RNG
    assert not agent.policy.training
    assert agent.observation_space == model.observation_space and agent.action_space == model.action_space
    obs = _obs_batch()
    ours = agent.predict(obs, deterministic=True)
    assert ours.shape == (64, 3)
    assert np.array_equal(ours, model.predict(obs, deterministic=True)[0])
    assert np.array_equal(agent.predict(obs[0]), model.predict(obs[0], deterministic=True)[0])
    assert agent.predict(obs[0]).shape == (3,)
    with pytest.raises(RltuneError):
        agent.predict(np.zeros(4, np.float32))


def test_load_ppo_predicts_exactly_and_fine_tunes(trained):
    model, folder = trained
    obs = _obs_batch()
    expected = model.predict(obs, deterministic=True)[0]
    loaded = load_ppo(folder)
    assert isinstance(loaded, PPO)
    assert loaded.n_steps == 64 and loaded.batch_size == 32
    assert np.array_equal(loaded.predict(obs, deterministic=True)[0], expected)
    with pytest.raises(RltuneError, match="without an environment"):
        loaded.learn(64)
    # with a real env (and an override) it trains
    tuned = load_ppo(folder, env=TinyEnv(), n_epochs=1, seed=1)
    assert np.array_equal(tuned.predict(obs, deterministic=True)[0], expected)
    tuned.learn(64)
    # an env with other spaces is refused
    other = TinyEnv()
    other.action_space = gym.spaces.Box(-2.0, 2.0, (3,), np.float32)
    with pytest.raises(RltuneError, match="action space"):
        load_ppo(folder, env=other)


def test_save_refuses_unknown_activation(tmp_path):
    model = PPO("MlpPolicy", TinyEnv(), n_steps=64, batch_size=32, device="cpu",
                policy_kwargs={"net_arch": [4], "activation_fn": nn.ELU})
    with pytest.raises(RltuneError, match="activation_fn"):
        save_agent(model, tmp_path / "a", OBS_LAYOUT, ACT_LAYOUT, {}, {})
    model = PPO("MlpPolicy", TinyEnv(), n_steps=64, batch_size=32, device="cpu",
                policy_kwargs={"net_arch": [4], "activation_fn": nn.ReLU})
    with pytest.raises(RltuneError, match="observation_layout"):
        save_agent(model, tmp_path / "a", OBS_LAYOUT[:4], ACT_LAYOUT, {}, {})
    with pytest.raises(RltuneError, match="training"):
        save_agent(model, tmp_path / "a", OBS_LAYOUT, ACT_LAYOUT, {"f": object()}, {})
    assert not (tmp_path / "a").exists()
    save_agent(model, tmp_path / "a", OBS_LAYOUT, ACT_LAYOUT, {}, {})
    assert _meta(tmp_path / "a")["policy_kwargs"]["activation_fn"] == "relu"
    assert load_policy(tmp_path / "a").policy.activation_fn is nn.ReLU


# ------------------------------------------------------------------------------ tampering


def test_tampered_weights(agent):
    data = bytearray((agent / WEIGHTS_NAME).read_bytes())
    data[-5] ^= 0x01
    (agent / WEIGHTS_NAME).write_bytes(bytes(data))
    _refused(agent, "sha256", "tampered")
    _refused(agent, "sha256", loader=load_ppo)


def _set(path, value):
    def mutate(meta):
        obj = meta
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return mutate


def _delete(key):
    return lambda meta: meta.pop(key)


@pytest.mark.parametrize("mutate, pattern", [
    (_set(["policy_kwargs", "activation_fn"], "os.system"), "activation_fn"),
    (_set(["policy_kwargs", "activation_fn"], "torch.nn.modules.activation.Tanh"), "activation_fn"),
    (_set(["policy_kwargs", "net_arch"], "16"), "net_arch"),
    (_set(["policy_kwargs", "net_arch"], [16.0]), "net_arch"),
    (_set(["policy_kwargs", "net_arch"], {"pi": [16]}), "net_arch"),
    (_set(["policy_kwargs", "ortho_init"], 1), "ortho_init"),
    (_set(["policy_kwargs", "features_extractor_class"], "builtins.eval"), "features_extractor_class"),
    (_delete("action_layout"), "action_layout"),
    (_delete("weights_sha256"), "weights_sha256"),
    (_set(["extra"], 1), "extra"),
    (_set(["format"], "sb3"), "format"),
    (_set(["format_version"], 2), "format_version"),
    (_set(["format_version"], "1"), "format_version"),
    (_set(["algo"], "SAC"), "algo"),
    (_set(["weights_sha256"], "00"), "weights_sha256"),
    (_set(["observation_layout"], ["a", "b"]), "observation_layout"),
    (_set(["action_layout"], ["a", "a", "b"]), "action_layout"),
    (_set(["observation_space", "shape"], [6]), "observation_space"),
    (_set(["observation_space", "low"], [-1, -1, -1, -1, "x"]), "observation_space.low"),
    (_set(["action_space", "type"], "Discrete"), "action_space"),
    (_set(["action_space", "dtype"], "object"), "action_space.dtype"),
    (_set(["hyperparameters", "policy"], "builtins.exec"), "hyperparameters"),
    (_set(["hyperparameters", "n_steps"], "64"), "n_steps"),
    (_set(["hyperparameters", "batch_size"], True), "batch_size"),
    (_set(["training"], []), "training"),
    (lambda meta: meta.clear() or meta.update(format="rltune-agent"), "format_version"),
])
def test_tampered_json(agent, mutate, pattern):
    meta = _meta(agent)
    mutate(meta)
    _write_meta(agent, meta)
    msg = _refused(agent, pattern, META_NAME)
    assert str(agent) in msg
    _refused(agent, pattern, loader=load_ppo)


@pytest.mark.parametrize("text", [b"not json at all", b"{\"format\": ", b"[1, 2]", b"\xff\xfe\x00",
                                  b'{"format": "rltune-agent", "format_version": NaN}', b"[" * 100000])
def test_json_not_an_agent(agent, text):
    (agent / META_NAME).write_bytes(text)
    _refused(agent, META_NAME)


def test_missing_files(agent, tmp_path):
    _refused(tmp_path / "nowhere", "no such agent")
    (agent / WEIGHTS_NAME).unlink()
    _refused(agent, WEIGHTS_NAME, "missing")
    (agent / META_NAME).unlink()
    _refused(agent, META_NAME, "missing")


# ---------------------------------------------------------------------- crafted pickles / zips


def _evil_pickle(marker):
    return pickle.dumps(Evil(marker))


def test_payload_is_live(tmp_path):
    """Control: the crafted payload really does create its marker when something unpickles it."""
    marker = tmp_path / "control-marker"
    pickle.loads(_evil_pickle(marker)).close()
    assert marker.exists()


def test_pickle_as_weights_is_refused_without_unpickling(agent, tmp_path):
    marker = tmp_path / "pwned"
    (agent / WEIGHTS_NAME).write_bytes(_evil_pickle(marker))
    _rehash(agent)
    _refused(agent, WEIGHTS_NAME, "not a safetensors file")
    _refused(agent, "not a safetensors file", loader=load_ppo)
    assert not marker.exists()


def test_torch_save_zip_as_weights_is_refused(agent, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": Evil(marker)}, agent / WEIGHTS_NAME)  # a torch zip holding a pickle
    _rehash(agent)
    _refused(agent, "not a safetensors file")
    assert not marker.exists()


def _sb3_style_zip(path, marker):
    payload = base64.b64encode(_evil_pickle(marker)).decode()
    data = {"policy_class": {":type:": "<class 'abc.ABCMeta'>", ":serialized:": payload},
            "learning_rate": {":type:": "<class 'function'>", ":serialized:": payload}}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data", json.dumps(data))
        zf.writestr("policy.pth", _evil_pickle(marker))
        zf.writestr("pytorch_variables.pth", _evil_pickle(marker))
        zf.writestr("_stable_baselines3_version", "2.9.2")
    return path


def test_sb3_zip_needs_trust(tmp_path):
    marker = tmp_path / "pwned"
    zpath = _sb3_style_zip(tmp_path / "evil.zip", marker)
    with pytest.raises(RltuneError, match="--trust-pickle") as info:
        import_sb3_zip(zpath, tmp_path / "out", trust_pickle=False)
    assert "\n" not in str(info.value)
    with pytest.raises(RltuneError, match="--trust-pickle"):
        import_sb3_zip(zpath, tmp_path / "out", False)
    with pytest.raises(RltuneError, match="--trust-pickle"):
        import_sb3_zip(zpath, tmp_path / "out", trust_pickle="yes")  # only True means yes
    _refused(zpath, "import_sb3_zip")  # handing the zip to load_policy is refused too
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_sb3_zip_imports_when_trusted(trained, tmp_path):
    model, _ = trained
    zpath = tmp_path / "model.zip"
    model.save(zpath)
    out = import_sb3_zip(zpath, tmp_path / "imported", trust_pickle=True, observation_layout=OBS_LAYOUT,
                         action_layout=ACT_LAYOUT)
    obs = _obs_batch()
    assert np.array_equal(load_policy(out).predict(obs), model.predict(obs, deterministic=True)[0])
    assert _meta(out)["training"] == {"imported_from": "model.zip"}


# ------------------------------------------------------------------------------ wrong shapes


def test_json_net_arch_differs_from_weights(agent):
    meta = _meta(agent)
    meta["policy_kwargs"]["net_arch"] = [32]
    _rehash(agent, meta)
    _refused(agent, WEIGHTS_NAME, "net_arch")
    meta["policy_kwargs"]["net_arch"] = [16, 16]
    _rehash(agent, meta)
    _refused(agent, "net_arch", loader=load_ppo)


def _rewrite_weights(folder, change):
    tensors = dict(st_load((folder / WEIGHTS_NAME).read_bytes()))
    change(tensors)
    (folder / WEIGHTS_NAME).write_bytes(st_save(tensors))
    _rehash(folder)


def test_weights_with_same_count_but_wrong_structure(agent):
    # same number of parameters, so only the per-tensor checks can catch these
    original = dict(st_load((agent / WEIGHTS_NAME).read_bytes()))

    def transpose(t):
        t["action_net.weight"] = t["action_net.weight"].T.contiguous()

    _rewrite_weights(agent, transpose)
    _refused(agent, "action_net.weight", "shape")

    (agent / WEIGHTS_NAME).write_bytes(st_save(original))

    def rename(t):
        t["action_net.weight_evil"] = t.pop("action_net.weight")

    _rewrite_weights(agent, rename)
    _refused(agent, "tensor names")

    def to_double(t):
        t.clear()
        t.update({k: v.double() for k, v in original.items()})

    _rewrite_weights(agent, to_double)
    _refused(agent, "dtype")

    def int_weights(t):
        t["log_std"] = t["log_std"].to(torch.int32)

    (agent / WEIGHTS_NAME).write_bytes(st_save(original))
    _rewrite_weights(agent, int_weights)
    _refused(agent, "dtype")

    def nan_weights(t):
        t["log_std"] = torch.full_like(t["log_std"], float("nan"))

    (agent / WEIGHTS_NAME).write_bytes(st_save(original))
    _rewrite_weights(agent, nan_weights)
    _refused(agent, "NaN")
