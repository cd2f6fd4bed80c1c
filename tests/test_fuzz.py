"""Property-based fuzzing of the two files users hand rltune: scenario YAML and agent folders.

Whatever the mutation (wrong types, NaN/inf, huge sizes, path-like names, YAML anchors and
aliases, truncation, flipped bytes), reading either file ends in a parsed object or ONE
``RltuneError`` line, fast; never another exception type, a hang or a traceback.
"""

import copy
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rltune.errors import RltuneError

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "envs" / "synthetic-6class.yaml").read_text())
FIELDS = [(sec, key) for sec, body in BASE.items() if isinstance(body, dict) for key in body] + \
    [("dataset", "params"), ("teacher", "epochs"), ("training", "stages"), ("knobs", "bits"), ("reward", "w_size"),
     ("dataset", "path"), ("student", "channels"), (None, "name")]

values = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 80, 2 ** 80), st.sampled_from([10 ** 9, 10 ** 12, 10 ** 100, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["/etc/passwd", "../../x", "a\0b", "x" * 5000, "~", "$HOME", "file.npz", "data.csv"]),
    st.lists(st.one_of(st.integers(-5, 10 ** 10), st.floats(allow_nan=True), st.text(max_size=5)), max_size=6),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
)


def _check_refusal_only(fn, *args):
    t0 = time.perf_counter()
    try:
        fn(*args)
    except RltuneError as e:
        assert "\n" not in str(e) and len(str(e)) < 2000
    assert time.perf_counter() - t0 < 2.0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 400)), alias=st.booleans())
def test_mutated_scenario_files_parse_or_are_one_line(tmp_path, edits, cut, alias):
    from rltune.scenario import load_scenario

    raw = copy.deepcopy(BASE)
    for (sec, key), v in edits:
        if sec is None:
            raw[key] = v
        elif isinstance(raw.get(sec), dict):
            raw[sec][key] = v
    try:
        text = yaml.safe_dump(raw, allow_unicode=True)
    except yaml.YAMLError:
        return
    if alias:  # an anchor and alias pair, or a nested bomb
        text = "x: &a [1, 2]\ny: *a\n" + text
    if cut is not None:
        text = text[:cut]
    f = tmp_path / "s.yaml"
    f.write_bytes(text.encode("utf-8", "surrogatepass"))
    _check_refusal_only(load_scenario, f)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=600))
def test_random_bytes_as_a_scenario_are_one_line(tmp_path_factory, data):
    from rltune.scenario import load_scenario

    f = tmp_path_factory.mktemp("bytes") / "s.yaml"
    f.write_bytes(data)
    _check_refusal_only(load_scenario, f)


AGENT = ROOT / "agents" / "ppo-v0"
META = json.loads((AGENT / "agent.json").read_text())
META_KEYS = sorted(META) + ["policy_kwargs.net_arch", "observation_space.shape", "observation_space.low",
                            "action_space.high", "hyperparameters.n_steps"]


def _set(meta: dict, dotted: str, v) -> None:
    parts = dotted.split(".")
    obj = meta
    for p in parts[:-1]:
        if not isinstance(obj.get(p), dict):
            return
        obj = obj[p]
    obj[parts[-1]] = v


@pytest.fixture(scope="module")
def agent_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("agents")
    return d


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(META_KEYS), values), max_size=3),
       drop=st.lists(st.sampled_from(sorted(META)), max_size=2),
       json_cut=st.one_of(st.none(), st.integers(0, 3000)),
       weight_edit=st.one_of(st.none(), st.tuples(st.integers(0, 60000), st.integers(0, 255))),
       weight_cut=st.one_of(st.none(), st.integers(0, 60000)), fix_sha=st.booleans())
def test_mutated_agent_folders_load_or_are_one_line(agent_base, edits, drop, json_cut, weight_edit, weight_cut, fix_sha):
    from rltune.agentfile import check_layouts, load_policy
    from rltune.env import ACTION_LAYOUT, OBS_LAYOUT

    d = agent_base / f"a{time.perf_counter_ns()}"
    shutil.copytree(AGENT, d)
    weights = bytearray((d / "policy.safetensors").read_bytes())
    if weight_edit is not None and weight_edit[0] < len(weights):
        weights[weight_edit[0]] = weight_edit[1]
    if weight_cut is not None:
        weights = weights[:weight_cut]
    (d / "policy.safetensors").write_bytes(bytes(weights))
    meta = copy.deepcopy(META)
    for key, v in edits:
        _set(meta, key, v)
    for key in drop:
        meta.pop(key, None)
    if fix_sha:  # a crafted file whose checksum matches: the parser itself must hold
        meta["weights_sha256"] = hashlib.sha256(bytes(weights)).hexdigest()
    try:
        text = json.dumps(meta)
    except (ValueError, TypeError):
        text = json.dumps(META)
    if json_cut is not None:
        text = text[:json_cut]
    (d / "agent.json").write_text(text)

    def load():
        agent = load_policy(d)
        check_layouts(agent, OBS_LAYOUT, ACTION_LAYOUT)

    _check_refusal_only(load)
    shutil.rmtree(d, ignore_errors=True)
