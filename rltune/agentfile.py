"""Agent files: a trained stable-baselines3 PPO policy stored without pickle.

SB3's own ``PPO.load`` unpickles (cloudpickle) parts of the ``.zip``, so a crafted zip runs code
when it is loaded. rltune never does that by default: an agent is a folder ::

    NAME/
      policy.safetensors   the policy's state_dict (safetensors: a JSON header plus raw numbers)
      agent.json           everything needed to rebuild the policy, as plain JSON

Loading parses JSON and safetensors only (no pickle, no import or call of a name from the files)
and validates everything before building any module: the JSON's fields and their types, the
activation name against an allow-list, the format and its version, the SHA-256 of the weights,
the safetensors structure, and the tensor names, shapes and dtypes against the policy built from
the JSON (then ``load_state_dict(strict=True)``). Any problem raises :class:`RltuneError` with one
line naming the file and what is wrong.

``agent.json`` (format_version 1)::

    format            "rltune-agent"
    format_version    1
    rltune_version    rltune.__version__ of the writer (informational)
    algo              "PPO"
    policy_kwargs     {"net_arch": [64, 64] | {"pi": [...], "vf": [...]},
                       "activation_fn": "tanh" | "relu", "log_std_init": float, "ortho_init": bool}
    observation_space {"type": "Box", "shape": [...], "low": nested list, "high": nested list,
                       "dtype": "float32" | "float64"}   (infinite bounds as "inf" / "-inf")
    action_space      same form
    observation_layout one name per observation element (flattened order)
    action_layout     one name per action element
    hyperparameters   PPO constructor arguments, JSON scalars (see HYPERPARAMETERS)
    training          free-form JSON object from the caller (scenarios, timesteps, seed, ...)
    weights_sha256    hex SHA-256 of policy.safetensors' bytes

API::

    save_agent(model, path, observation_layout, action_layout, training, hyperparameters=None) -> Path
    load_policy(path) -> LoadedAgent          # .policy (eval mode), .meta, spaces, .predict(obs)
    load_ppo(path, env=None, **ppo_overrides) -> PPO   # for fine-tuning; fresh optimizer state
    import_sb3_zip(zip_path, out_path, trust_pickle=False, ...) -> Path   # runs pickle: opt-in
    ppo_hyperparameters(model) -> dict        # the JSON-able constructor hyperparameters of a PPO

Not stored: optimizer state, the rollout counters and any VecNormalize statistics; only
``MlpPolicy`` (``ActorCriticPolicy`` with the default flatten extractor) on Box spaces, no gSDE.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import rltune
from rltune.errors import RltuneError, write_atomic

FORMAT = "rltune-agent"
FORMAT_VERSION = 1
WEIGHTS_NAME = "policy.safetensors"
META_NAME = "agent.json"

# the only activations an agent file may name; never resolved by importing a name from the file
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}

_FIELDS = (
    "format", "format_version", "rltune_version", "algo", "policy_kwargs", "observation_space",
    "action_space", "observation_layout", "action_layout", "hyperparameters", "training",
    "weights_sha256",
)
_POLICY_KWARGS = ("net_arch", "activation_fn", "log_std_init", "ortho_init")
_SPACE_FIELDS = ("type", "shape", "low", "high", "dtype")
_DTYPES = {"float32": np.float32, "float64": np.float64}
_TORCH_DTYPES = {"F32": torch.float32, "F64": torch.float64}

# PPO constructor arguments an agent file may carry: name -> (kind, may be null)
#   kind: "int+" positive int, "num+" positive number, "num" any finite number,
#         "unit" number in [0, 1], "bool"
HYPERPARAMETERS: dict[str, tuple[str, bool]] = {
    "learning_rate": ("num+", False),
    "n_steps": ("int+", False),
    "batch_size": ("int+", False),
    "n_epochs": ("int+", False),
    "gamma": ("unit", False),
    "gae_lambda": ("unit", False),
    "clip_range": ("num+", False),
    "clip_range_vf": ("num+", True),
    "normalize_advantage": ("bool", False),
    "ent_coef": ("num", False),
    "vf_coef": ("num", False),
    "max_grad_norm": ("num+", False),
    "target_kl": ("num+", True),
    "stats_window_size": ("int+", False),
}

_MAX_JSON_BYTES = 4 << 20
_MAX_WEIGHTS_BYTES = 512 << 20  # checked with stat() before the file is read
_MAX_WIDTH = 1 << 20
_MAX_LAYERS = 64
_MAX_DIMS = 8


# ----------------------------------------------------------------------------------- helpers


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (non-finite numbers are not allowed)")


def _to_json_value(x: Any) -> Any:
    """``json.dumps`` default hook: numpy scalars and arrays become plain JSON, nothing else does."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON (got {_short(x)})")


def _json_copy(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False, default=_to_json_value))
    except (TypeError, ValueError) as exc:
        raise RltuneError(f"{what} must hold JSON values only: {_one_line(exc)}") from None


def _prod(shape: list[int] | tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ----------------------------------------------------------------------------------- spaces


def _bound_to_json(arr: np.ndarray) -> Any:
    def conv(v: Any) -> Any:
        if isinstance(v, list):
            return [conv(e) for e in v]
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            raise RltuneError("a Box space bound is NaN; cannot store it")
        return v

    return conv(np.asarray(arr, dtype=np.float64).tolist())


def _space_to_json(space: gym.Space, what: str) -> dict[str, Any]:
    if not isinstance(space, gym.spaces.Box):
        raise RltuneError(f"the {what} space must be a gymnasium Box, got {type(space).__name__}")
    dtype = np.dtype(space.dtype).name
    if dtype not in _DTYPES:
        raise RltuneError(f"the {what} space dtype must be float32 or float64, got {dtype}")
    return {"type": "Box", "shape": [int(d) for d in space.shape], "low": _bound_to_json(space.low),
            "high": _bound_to_json(space.high), "dtype": dtype}


def _bound_from_json(value: Any, shape: list[int], err: Any, field: str) -> np.ndarray:
    def conv(v: Any, depth: int) -> Any:
        if depth == len(shape):
            if v == "inf":
                return math.inf
            if v == "-inf":
                return -math.inf
            if not _is_num(v):
                err(f"field '{field}' must hold numbers (or \"inf\"/\"-inf\"), found {_short(v)}")
            return float(v)
        if not isinstance(v, list) or len(v) != shape[depth]:
            err(f"field '{field}' must be a nested list of shape {shape}")
        return [conv(e, depth + 1) for e in v]

    return np.array(conv(value, 0), dtype=np.float64).reshape(shape)


def _space_from_json(value: Any, err: Any, field: str) -> gym.spaces.Box:
    if not isinstance(value, dict):
        err(f"field '{field}' must be an object, got {_short(value)}")
    _check_keys(value, _SPACE_FIELDS, err, field)
    if value["type"] != "Box":
        err(f"field '{field}.type' must be \"Box\", got {_short(value['type'])}")
    shape = value["shape"]
    if (not isinstance(shape, list) or not 1 <= len(shape) <= _MAX_DIMS
            or not all(_is_int(d) and d >= 1 for d in shape)):
        err(f"field '{field}.shape' must be a list of 1..{_MAX_DIMS} positive integers, got {_short(shape)}")
    if _prod(shape) > 1 << 24:
        err(f"field '{field}.shape' {shape} is implausibly large")
    if value["dtype"] not in _DTYPES:
        err(f"field '{field}.dtype' must be one of {sorted(_DTYPES)}, got {_short(value['dtype'])}")
    low = _bound_from_json(value["low"], shape, err, f"{field}.low")
    high = _bound_from_json(value["high"], shape, err, f"{field}.high")
    if np.any(low > high):
        err(f"field '{field}': low exceeds high")
    dtype = _DTYPES[value["dtype"]]
    try:
        return gym.spaces.Box(low=low.astype(dtype), high=high.astype(dtype), shape=tuple(shape), dtype=dtype)
    except Exception as exc:  # gymnasium's own checks
        err(f"field '{field}' is not a valid Box: {_one_line(exc)}")
        raise  # unreachable


# ------------------------------------------------------------------------------ validation


def _check_keys(obj: dict, expected: tuple[str, ...], err: Any, where: str | None) -> None:
    prefix = f"'{where}' " if where else ""
    bad = [k for k in obj if not isinstance(k, str)]
    missing = [k for k in expected if k not in obj]
    extra = [k for k in obj if k not in expected]
    if bad or missing:
        err(f"{prefix}is missing field(s) {', '.join(repr(k) for k in missing)}" if missing
            else f"{prefix}has non-string keys")
    if extra:
        err(f"{prefix}has unknown field(s) {', '.join(repr(k) for k in extra[:5])}"
            f" (allowed: {', '.join(expected)})")


def _net_arch_from_json(value: Any, err: Any) -> list[int] | dict[str, list[int]]:
    def layers(v: Any) -> bool:
        return (isinstance(v, list) and len(v) <= _MAX_LAYERS
                and all(_is_int(w) and 1 <= w <= _MAX_WIDTH for w in v))

    if layers(value):
        return list(value)
    if isinstance(value, dict) and set(value) == {"pi", "vf"} and layers(value["pi"]) and layers(value["vf"]):
        return {"pi": list(value["pi"]), "vf": list(value["vf"])}
    err(f"field 'policy_kwargs.net_arch' must be a list of layer widths (1..{_MAX_WIDTH}) or "
        f"{{\"pi\": [...], \"vf\": [...]}}, got {_short(value)}")
    raise AssertionError  # unreachable


def _check_hyperparameters(hp: Any, err: Any, field: str = "hyperparameters") -> dict[str, Any]:
    if not isinstance(hp, dict):
        err(f"field '{field}' must be an object, got {_short(hp)}")
    for key, v in hp.items():
        if key not in HYPERPARAMETERS:
            err(f"field '{field}' has unknown PPO hyperparameter {key!r} "
                f"(allowed: {', '.join(HYPERPARAMETERS)})")
        kind, nullable = HYPERPARAMETERS[key]
        if v is None and nullable:
            continue
        ok = {
            "int+": _is_int(v) and v >= 1,
            "num+": _is_num(v) and v > 0,
            "num": _is_num(v),
            "unit": _is_num(v) and 0 <= v <= 1,
            "bool": isinstance(v, bool),
        }[kind]
        if not ok:
            want = {"int+": "a positive integer", "num+": "a positive number", "num": "a number",
                    "unit": "a number in [0, 1]", "bool": "true or false"}[kind]
            err(f"field '{field}.{key}' must be {want}{' or null' if nullable else ''}, got {_short(v)}")
    return dict(hp)


def _check_layout(value: Any, size: int, err: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
        err(f"field '{field}' must be a list of non-empty names, got {_short(value)}")
    if len(value) != size:
        err(f"field '{field}' has {len(value)} names but the space has {size} elements")
    seen: set[str] = set()
    for n in value:  # linear, not quadratic: a crafted file may hold millions of names
        if n in seen:
            err(f"field '{field}' repeats the name {_short(n)}")
        seen.add(n)
    return list(value)


@dataclass
class _Spec:
    """What a validated agent.json describes."""

    meta: dict[str, Any]
    observation_space: gym.spaces.Box
    action_space: gym.spaces.Box
    policy_kwargs: dict[str, Any]  # python form, ready for ActorCriticPolicy


def _validate_meta(meta: Any, where: str) -> _Spec:
    """Check every field of an agent.json dict; raise RltuneError naming ``where`` on the first problem."""

    def err(msg: str) -> None:
        raise RltuneError(f"{where}: {msg}")

    if not isinstance(meta, dict):
        err(f"must hold a JSON object, got {type(meta).__name__}")
    # format first, so a different kind of file gets the clearest message
    if meta.get("format") != FORMAT:
        err(f"not an rltune agent (field 'format' must be {FORMAT!r}, got {_short(meta.get('format'))})")
    version = meta.get("format_version")
    if not _is_int(version):
        err(f"field 'format_version' must be an integer, got {_short(version)}")
    if version != FORMAT_VERSION:
        newer = " (written by a newer rltune)" if version > FORMAT_VERSION else ""
        err(f"format_version {version} is not supported{newer}; this rltune reads version {FORMAT_VERSION}")
    _check_keys(meta, _FIELDS, err, None)
    if not isinstance(meta["rltune_version"], str):
        err(f"field 'rltune_version' must be a string, got {_short(meta['rltune_version'])}")
    if meta["algo"] != "PPO":
        err(f"field 'algo' must be \"PPO\", got {_short(meta['algo'])}")

    pk = meta["policy_kwargs"]
    if not isinstance(pk, dict):
        err(f"field 'policy_kwargs' must be an object, got {_short(pk)}")
    _check_keys(pk, _POLICY_KWARGS, err, "policy_kwargs")
    net_arch = _net_arch_from_json(pk["net_arch"], err)
    act = pk["activation_fn"]
    if not isinstance(act, str) or act not in ACTIVATIONS:
        err(f"field 'policy_kwargs.activation_fn' must be one of {', '.join(ACTIVATIONS)}, got {_short(act)}")
    if not _is_num(pk["log_std_init"]):
        err(f"field 'policy_kwargs.log_std_init' must be a number, got {_short(pk['log_std_init'])}")
    if not isinstance(pk["ortho_init"], bool):
        err(f"field 'policy_kwargs.ortho_init' must be true or false, got {_short(pk['ortho_init'])}")

    obs_space = _space_from_json(meta["observation_space"], err, "observation_space")
    act_space = _space_from_json(meta["action_space"], err, "action_space")
    _check_layout(meta["observation_layout"], _prod(obs_space.shape), err, "observation_layout")
    _check_layout(meta["action_layout"], _prod(act_space.shape), err, "action_layout")
    _check_hyperparameters(meta["hyperparameters"], err)
    if not isinstance(meta["training"], dict):
        err(f"field 'training' must be an object, got {_short(meta['training'])}")
    sha = meta["weights_sha256"]
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        err(f"field 'weights_sha256' must be 64 lowercase hex digits, got {_short(sha)}")

    policy_kwargs = {"net_arch": net_arch, "activation_fn": ACTIVATIONS[act],
                     "log_std_init": float(pk["log_std_init"]), "ortho_init": pk["ortho_init"]}
    return _Spec(meta, obs_space, act_space, policy_kwargs)


def _expected_numel(spec: _Spec) -> int:
    """Parameter count of the ActorCriticPolicy the spec describes (checked before building it)."""
    features = _prod(spec.observation_space.shape)
    n_act = _prod(spec.action_space.shape)
    arch = spec.policy_kwargs["net_arch"]
    pi, vf = (arch["pi"], arch["vf"]) if isinstance(arch, dict) else (arch, arch)

    def mlp(widths: list[int]) -> tuple[int, int]:
        total, last = 0, features
        for w in widths:
            total, last = total + last * w + w, w
        return total, last

    n_pi, last_pi = mlp(pi)
    n_vf, last_vf = mlp(vf)
    return n_pi + n_vf + (last_pi * n_act + n_act) + n_act + (last_vf + 1)


# ------------------------------------------------------------------------------- reading


def _agent_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    try:
        p.stat()
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:  # a name the OS refuses (too long, ...)
        raise RltuneError(f"{str(p)[:80]}: not a usable agent path ({_one_line(exc)})") from None
    if p.is_file() and p.name in (META_NAME, WEIGHTS_NAME):
        return p.parent
    if not p.exists():
        raise RltuneError(f"{p}: no such agent (expected a folder holding {META_NAME} and {WEIGHTS_NAME})")
    if not p.is_dir():
        hint = (" (an SB3 .zip can be converted with import_sb3_zip / --trust-pickle, which runs pickle)"
                if p.suffix == ".zip" else "")
        raise RltuneError(f"{p}: an rltune agent is a folder holding {META_NAME} and {WEIGHTS_NAME}, "
                          f"not a file{hint}")
    return p


def _read_bytes(path: Path, limit: int | None = None) -> bytes:
    try:
        if not path.is_file():
            raise RltuneError(f"{path}: missing (an rltune agent folder holds {META_NAME} "
                              f"and {WEIGHTS_NAME})")
        if limit is not None and path.stat().st_size > limit:
            raise RltuneError(f"{path}: too large ({path.stat().st_size} bytes) for an agent file")
        return path.read_bytes()
    except OSError as exc:
        raise RltuneError(f"{path}: cannot read: {_one_line(exc)}") from None


def _parse_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes (no pickle involved), after a structural check of the header."""
    if len(data) < 10:
        raise RltuneError(f"{path}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or data[8:9] != b"{":
        kind = ("a pickle" if data[:1] == b"\x80" else "a zip archive" if data[:2] == b"PK"
                else "something else")
        raise RltuneError(f"{path}: not a safetensors file (looks like {kind}); refusing to load it")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RltuneError(f"{path}: not a safetensors file (bad header: {_one_line(exc)})") from None
    if not isinstance(header, dict):
        raise RltuneError(f"{path}: not a safetensors file (header is not a JSON object)")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in _TORCH_DTYPES:
            raise RltuneError(f"{path}: tensor {name!r} has dtype {_short(dtype)}; "
                              f"agent weights are F32 or F64")
    try:
        from safetensors.torch import load as st_load

        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise RltuneError(f"{path}: not a valid safetensors file: {_one_line(exc)}") from None
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise RltuneError(f"{path}: tensor {name!r} holds NaN or infinite values")
    return tensors


def _read_agent(path: str | os.PathLike) -> tuple[_Spec, dict[str, torch.Tensor], Path]:
    folder = _agent_dir(path)
    meta_path, weights_path = folder / META_NAME, folder / WEIGHTS_NAME
    raw = _read_bytes(meta_path, _MAX_JSON_BYTES)
    try:
        meta = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise RltuneError(f"{meta_path}: not valid JSON (not UTF-8 text)") from None
    except ValueError as exc:
        raise RltuneError(f"{meta_path}: not valid JSON: {_one_line(exc)}") from None
    except RecursionError:
        raise RltuneError(f"{meta_path}: not valid JSON (nested too deeply)") from None
    spec = _validate_meta(meta, str(meta_path))

    data = _read_bytes(weights_path, _MAX_WEIGHTS_BYTES)
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["weights_sha256"]:
        raise RltuneError(f"{weights_path}: sha256 {digest[:12]}... does not match weights_sha256 "
                          f"{meta['weights_sha256'][:12]}... in {META_NAME}: the weights were tampered "
                          f"with or belong to another agent")
    tensors = _parse_safetensors(data, weights_path)
    # checked before building anything, so a JSON cannot make us allocate a huge network
    numel = sum(t.numel() for t in tensors.values())
    expected = _expected_numel(spec)
    if numel != expected:
        raise RltuneError(f"{weights_path}: holds {numel} weights but the policy described in {META_NAME} "
                          f"(net_arch {spec.meta['policy_kwargs']['net_arch']}) has {expected}")
    return spec, tensors, weights_path


def _zero_schedule(_: float) -> float:
    return 0.0


def _build_policy(spec: _Spec, where: Path) -> Any:
    from stable_baselines3.common.policies import ActorCriticPolicy

    try:
        with torch.random.fork_rng(devices=[]):  # initialisation must not disturb the caller's RNG
            return ActorCriticPolicy(spec.observation_space, spec.action_space, lr_schedule=_zero_schedule,
                                     **spec.policy_kwargs)
    except Exception as exc:
        raise RltuneError(f"{where}: cannot build the policy it describes: {_one_line(exc)}") from None


def _load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy ``tensors`` into ``module`` after checking names, shapes and dtypes match exactly."""
    target = module.state_dict()
    missing = [k for k in target if k not in tensors]
    extra = [k for k in tensors if k not in target]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
        raise RltuneError(f"{where}: tensor names do not match the policy: {'; '.join(parts)}")
    for name, ref in target.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise RltuneError(f"{where}: tensor {name!r} has shape {list(t.shape)}, "
                              f"the policy needs {list(ref.shape)}")
        if t.dtype != ref.dtype:
            raise RltuneError(f"{where}: tensor {name!r} has dtype {t.dtype}, the policy needs {ref.dtype}")
    try:
        module.load_state_dict(tensors, strict=True)
    except Exception as exc:
        raise RltuneError(f"{where}: weights do not fit the policy: {_one_line(exc)}") from None


# ------------------------------------------------------------------------------- public API


@dataclass
class LoadedAgent:
    """A policy read from an agent file, in eval mode."""

    policy: Any  # stable_baselines3 ActorCriticPolicy
    meta: dict[str, Any]
    observation_space: gym.spaces.Box
    action_space: gym.spaces.Box
    path: str = "agent"

    def predict(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        """Action(s) for one observation (shape = observation shape) or a batch (leading batch axis)."""
        arr = np.asarray(obs)
        shape = tuple(self.observation_space.shape)
        if arr.shape != shape and arr.shape[1:] != shape:
            raise RltuneError(f"observation has shape {list(arr.shape)}, the agent expects {list(shape)} "
                              f"or a batch of them")
        action, _ = self.policy.predict(obs, deterministic=deterministic)
        return action


def check_layouts(agent: "LoadedAgent", observation_layout: list[str], action_layout: list[str],
                  where: str = "the environment") -> None:
    """Refuse an agent whose observation or action layout is not exactly ``where``'s: a policy
    trained on other features (or in another order) would act on the wrong numbers."""
    mine_o, mine_a = agent.meta.get("observation_layout"), agent.meta.get("action_layout")
    for what, mine, theirs in (("observation", mine_o, observation_layout), ("action", mine_a, action_layout)):
        if list(mine or []) != list(theirs):
            diff = next((i for i, (a, b) in enumerate(zip(mine or [], theirs)) if a != b), min(len(mine or []), len(theirs)))
            raise RltuneError(f"{agent.path}: its {what} layout ({len(mine or [])} names) does not "
                              f"match {where}'s ({len(theirs)} names; first difference at index {diff}): it was "
                              "trained for another environment version")


def ppo_hyperparameters(model: Any) -> dict[str, Any]:
    """The PPO constructor hyperparameters of ``model`` that are constants (schedules are left out)."""

    def const(v: Any) -> Any:
        from stable_baselines3.common.utils import ConstantSchedule, FloatSchedule

        if isinstance(v, FloatSchedule):
            v = v.value_schedule
        if isinstance(v, ConstantSchedule):
            v = v.val
        if isinstance(v, np.generic):
            v = v.item()
        return v

    values = {
        "learning_rate": model.learning_rate, "n_steps": model.n_steps, "batch_size": model.batch_size,
        "n_epochs": model.n_epochs, "gamma": model.gamma, "gae_lambda": model.gae_lambda,
        "clip_range": model.clip_range, "clip_range_vf": model.clip_range_vf,
        "normalize_advantage": model.normalize_advantage, "ent_coef": model.ent_coef,
        "vf_coef": model.vf_coef, "max_grad_norm": model.max_grad_norm, "target_kl": model.target_kl,
        "stats_window_size": getattr(model, "_stats_window_size", 100),
    }
    out = {}
    for key, v in values.items():
        v = const(v)
        if v is None or isinstance(v, (bool, int, float)):
            if isinstance(v, float) and not math.isfinite(v):
                continue
            out[key] = v
    return out



def save_agent(model: Any, path: str | os.PathLike, observation_layout: list[str], action_layout: list[str],
               training: dict[str, Any], hyperparameters: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s policy as the agent folder ``path`` (created if needed); return the folder.

    ``hyperparameters`` defaults to :func:`ppo_hyperparameters` of the model. The weights are written
    first, then agent.json (each to a temp file, then ``os.replace``), so a reader racing a save
    sees either the old agent, the new one, or a sha256 mismatch, never a silently mixed agent.
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.policies import ActorCriticPolicy

    out = Path(path)
    where = f"save_agent({out})"
    if not isinstance(model, PPO):
        raise RltuneError(f"{where}: expected a stable_baselines3 PPO model, got {type(model).__name__}")
    policy = model.policy
    if type(policy) is not ActorCriticPolicy:
        raise RltuneError(f"{where}: only MlpPolicy (ActorCriticPolicy) agents can be stored, "
                          f"got {type(policy).__name__}")
    if model.use_sde:
        raise RltuneError(f"{where}: gSDE (use_sde=True) policies cannot be stored")
    unknown = [k for k in (model.policy_kwargs or {}) if k not in _POLICY_KWARGS]
    if unknown:
        raise RltuneError(f"{where}: policy_kwargs {', '.join(map(repr, unknown))} cannot be stored "
                          f"(supported: {', '.join(_POLICY_KWARGS)})")
    act_name = next((n for n, cls in ACTIVATIONS.items() if policy.activation_fn is cls), None)
    if act_name is None:
        act = getattr(policy.activation_fn, "__name__", policy.activation_fn)
        raise RltuneError(f"{where}: activation_fn {act!r} is not allowed (allowed: {', '.join(ACTIVATIONS)})")
    arch = policy.net_arch
    if isinstance(arch, dict):
        if set(arch) != {"pi", "vf"}:
            raise RltuneError(f"{where}: net_arch dict must have exactly the keys 'pi' and 'vf', "
                              f"got {sorted(arch)}")
        net_arch: Any = {"pi": [int(w) for w in arch["pi"]], "vf": [int(w) for w in arch["vf"]]}
    else:
        net_arch = [int(w) for w in arch]
    if hyperparameters is None:
        hyperparameters = ppo_hyperparameters(model)

    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in policy.state_dict().items()}
    from safetensors.torch import save as st_save

    data = st_save(tensors, metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rltune_version": rltune.__version__,
        "algo": "PPO",
        "policy_kwargs": {"net_arch": net_arch, "activation_fn": act_name,
                          "log_std_init": float(policy.log_std_init), "ortho_init": bool(policy.ortho_init)},
        "observation_space": _space_to_json(model.observation_space, "observation"),
        "action_space": _space_to_json(model.action_space, "action"),
        "observation_layout": _json_copy(list(observation_layout), f"{where}: observation_layout"),
        "action_layout": _json_copy(list(action_layout), f"{where}: action_layout"),
        "hyperparameters": _json_copy(dict(hyperparameters), f"{where}: hyperparameters"),
        "training": _json_copy(dict(training), f"{where}: training"),
        "weights_sha256": hashlib.sha256(data).hexdigest(),
    }
    spec = _validate_meta(meta, where)  # never write a file that load_policy would refuse
    if _expected_numel(spec) != sum(t.numel() for t in tensors.values()):
        raise RltuneError(f"{where}: the policy's parameters do not match its net_arch {net_arch}")
    text = json.dumps(meta, indent=2, allow_nan=False) + "\n"

    if out.exists() and not out.is_dir():
        raise RltuneError(f"{out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RltuneError(f"{out}: cannot create the agent folder: {_one_line(exc)}") from None
    write_atomic(out / WEIGHTS_NAME, data, "agent file")
    write_atomic(out / META_NAME, text.encode("utf-8"), "agent file")
    return out


def load_policy(path: str | os.PathLike) -> LoadedAgent:
    """Read and validate an agent folder; return its policy in eval mode. Never unpickles."""
    spec, tensors, weights_path = _read_agent(path)
    policy = _build_policy(spec, weights_path.parent / META_NAME)
    _load_weights(policy, tensors, weights_path)
    policy.set_training_mode(False)
    return LoadedAgent(policy=policy, meta=spec.meta, observation_space=spec.observation_space,
                       action_space=spec.action_space, path=str(weights_path.parent))


class _SpacesOnlyEnv(gym.Env):
    """Stands in for the environment of an agent loaded without one: it has the spaces, nothing else."""

    def __init__(self, observation_space: gym.spaces.Box, action_space: gym.spaces.Box):
        self.observation_space = observation_space
        self.action_space = action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        space = self.observation_space
        return np.clip(np.zeros(space.shape, space.dtype), space.low, space.high).astype(space.dtype), {}

    def step(self, action):
        raise RltuneError("this PPO was loaded without an environment: pass env= to load_ppo "
                          "or call model.set_env(env) before learn()")


def load_ppo(path: str | os.PathLike, env: Any = None, **ppo_overrides: Any) -> Any:
    """A PPO built from the agent's policy_kwargs and hyperparameters, holding its weights.

    ``ppo_overrides`` go to the PPO constructor (``device`` defaults to "cpu"); the optimizer starts
    fresh. Without ``env`` the model gets a stand-in env with the stored spaces (``learn`` then
    raises until ``set_env``); a given env must have exactly the stored spaces.
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.policies import ActorCriticPolicy

    spec, tensors, weights_path = _read_agent(path)
    meta_path = weights_path.parent / META_NAME
    if "policy_kwargs" in ppo_overrides or "policy" in ppo_overrides:
        raise RltuneError(f"{meta_path}: policy and policy_kwargs come from the agent file; "
                          f"do not override them")
    kwargs = {**spec.meta["hyperparameters"], "device": "cpu", **ppo_overrides}
    if env is None:
        env = _SpacesOnlyEnv(spec.observation_space, spec.action_space)
    try:
        model = PPO(ActorCriticPolicy, env, policy_kwargs=dict(spec.policy_kwargs), **kwargs)
    except RltuneError:
        raise
    except Exception as exc:
        raise RltuneError(f"{meta_path}: cannot build PPO from it: {_one_line(exc)}") from None
    for what, mine, theirs in (("observation", spec.observation_space, model.observation_space),
                               ("action", spec.action_space, model.action_space)):
        if mine != theirs:
            raise RltuneError(f"{meta_path}: the env's {what} space {theirs} differs from the agent's {mine}")
    _load_weights(model.policy, tensors, weights_path)
    return model


def import_sb3_zip(zip_path: str | os.PathLike, out_path: str | os.PathLike, trust_pickle: bool = False,
                   observation_layout: list[str] | None = None, action_layout: list[str] | None = None,
                   training: dict[str, Any] | None = None,
                   hyperparameters: dict[str, Any] | None = None,
                   env_layouts: dict[str, tuple[list[str], list[str]]] | None = None,
                   zero_rule: str | None = None) -> Path:
    """Convert an SB3 PPO ``.zip`` into an rltune agent folder.

    Reading the zip runs pickle (SB3's ``PPO.load``), which can execute arbitrary code, so this
    refuses unless ``trust_pickle is True``. Layouts default to ``obs_<i>`` / ``act_<i>``.
    ``env_layouts`` (env id -> (observation layout, action layout)), instead of the two layouts:
    the env whose sizes are the model's is taken and its id stored as ``training.env_id``; a model
    that fits none is refused with one line naming its sizes and theirs.
    ``zero_rule`` (with ``env_layouts``): what the zero action of the v1 env the model was trained
    in played (``plus1`` or ``sensitivity``; see :mod:`rltune.env_v1`), recorded where a v1 agent
    keeps it (``training.env.zero_rule``; ``plus1`` when not given); refused for a v0 model, whose
    env has no zero rule.
    """
    from rltune.registration import ENV_IDS

    v1 = ENV_IDS[2]
    zip_path = Path(zip_path)
    if zero_rule is not None:
        from rltune.env_v1 import check_zero_rule_options

        check_zero_rule_options(zero_rule, None, None)
        if not env_layouts or v1 not in env_layouts:
            raise RltuneError(f"{zip_path}: a zero rule is a {v1} agent's; pass env_layouts with its layouts")
    if trust_pickle is not True:
        raise RltuneError(f"{zip_path}: converting an SB3 .zip runs pickle from the file, which can execute "
                          f"arbitrary code; pass --trust-pickle (trust_pickle=True) only for files you trust")
    try:
        ok = zip_path.is_file()
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise RltuneError(f"{zip_path}: no such file")
    if not zipfile.is_zipfile(zip_path):
        raise RltuneError(f"{zip_path}: not a zip archive (an SB3 model file is a .zip)")
    from stable_baselines3 import PPO

    try:
        model = PPO.load(str(zip_path), device="cpu")
    except Exception as exc:
        raise RltuneError(f"{zip_path}: cannot load as an SB3 PPO model: {_one_line(exc)}") from None
    n_obs = _prod(model.observation_space.shape or (1,))
    n_act = _prod(model.action_space.shape or (1,))
    training = dict(training) if training is not None else {"imported_from": zip_path.name}
    if env_layouts:
        fits = [(eid, o, a) for eid, (o, a) in env_layouts.items()
                if isinstance(model.observation_space, gym.spaces.Box) and isinstance(model.action_space, gym.spaces.Box)
                and (n_obs, n_act) == (len(o), len(a))]
        if not fits:
            theirs = "; ".join(f"{eid}: {len(o)} and {len(a)}" for eid, (o, a) in env_layouts.items())
            raise RltuneError(f"{zip_path}: its observation space {model.observation_space} and action space "
                              f"{model.action_space} are not those of an rltune environment (observation and "
                              f"action sizes {theirs}): it was trained on another environment")
        env_id, observation_layout, action_layout = fits[0]
        training.setdefault("env_id", env_id)
        if training["env_id"] == v1:
            env = training.get("env")
            training["env"] = {**(env if isinstance(env, dict) else {}), "zero_rule": zero_rule or "plus1"}
        elif zero_rule is not None:
            raise RltuneError(f"{zip_path}: its spaces are those of {training['env_id']}, which has no zero rule: "
                              f"--zero-rule (zero_rule) is for a model trained on {v1}")
    return save_agent(
        model, out_path,
        observation_layout if observation_layout is not None else [f"obs_{i}" for i in range(n_obs)],
        action_layout if action_layout is not None else [f"act_{i}" for i in range(n_act)],
        training,
        hyperparameters,
    )


# ------------------------------------------------------------------------ optimizer state (resume)

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"


def save_optimizer(model: Any, folder: str | os.PathLike) -> None:
    """Write the policy optimizer's state (Adam's moments and step counts) beside an agent, as
    safetensors + JSON (no pickle), so ``--resume`` continues training where it stopped."""
    from safetensors.torch import save as st_save

    folder = Path(folder)
    sd = model.policy.optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            elif isinstance(v, (int, float, bool)):
                scalars[f"{idx}.{k}"] = v
    groups = [{k: v for k, v in g.items() if isinstance(v, (int, float, bool, list, tuple)) or v is None}
              for g in sd["param_groups"]]
    write_atomic(folder / OPTIMIZER_TENSORS, st_save(tensors or {"_": torch.zeros(1)}), "optimizer state")
    write_atomic(folder / OPTIMIZER_META, json.dumps({"param_groups": groups, "scalars": scalars,
                                                      "num_timesteps": int(model.num_timesteps)}).encode(),
                 "optimizer state")


def load_optimizer(model: Any, folder: str | os.PathLike) -> bool:
    """Restore what :func:`save_optimizer` wrote; False (and nothing changed) if it is missing or
    does not fit the model's optimizer."""
    folder = Path(folder)
    try:
        meta = json.loads(_read_bytes(folder / OPTIMIZER_META, _MAX_JSON_BYTES).decode("utf-8"))
        tensors = _parse_safetensors(_read_bytes(folder / OPTIMIZER_TENSORS, _MAX_WEIGHTS_BYTES),
                                     folder / OPTIMIZER_TENSORS)
        state: dict[int, dict[str, Any]] = {}
        for key, t in tensors.items():
            if key == "_":
                continue
            idx, _, name = key.partition(".")
            state.setdefault(int(idx), {})[name] = t
        for key, v in meta["scalars"].items():
            idx, _, name = key.partition(".")
            state.setdefault(int(idx), {})[name] = v
        current = model.policy.optimizer.state_dict()
        groups = []
        for mine, saved in zip(current["param_groups"], meta["param_groups"]):
            g = dict(mine)
            g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
            groups.append(g)
        if len(groups) != len(current["param_groups"]):
            return False
        model.policy.optimizer.load_state_dict({"state": state, "param_groups": groups})
        return True
    except (RltuneError, OSError, ValueError, KeyError, TypeError, RuntimeError):
        return False
