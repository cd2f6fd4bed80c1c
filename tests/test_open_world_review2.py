"""Users' own modules through the other tuners and entry points (the open-world review, round 2).

Each test builds a small problem of the kind a user brings and checks the contract: one
RltuneError line for a mistake before training, otherwise a result that meets the budget, and the
same result for the same seed.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rltune
from rltune.errors import RltuneError

from open_world import FAST, MLP, TransformerStudent, data, trained_teacher  # noqa: F401 (data: a fixture)


class Flat(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def teacher(data):
    return Flat(trained_teacher(data)).eval()


class DropoutStudent(MLP):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x))))


class Dropout2dStudent(nn.Module):
    """(N, 1, 3, 4) input; nn.Dropout2d is not a subclass of nn.Dropout."""

    def __init__(self):
        super().__init__()
        self.c, self.d2, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Dropout2d(0.3), nn.Linear(48, 3)

    def forward(self, x):
        return self.fc(self.d2(torch.relu(self.c(x))).flatten(1))


class FunctionalDropoutStudent(MLP):
    """Dropout in forward, with no module to show it."""

    def forward(self, x):
        return self.b(F.dropout(torch.relu(self.a(x)), 0.3, self.training))


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


# -- Dropout draws from the global RNG: the same seed gave a different student ---------------------

def test_training_a_dropout_student_is_the_same_for_the_same_generator_and_leaves_the_global_rng(data):
    from rltune.distill import TrainSet, train_epochs

    x, y = torch.tensor(data[0][0]), torch.tensor(data[0][1])
    ts = TrainSet(x, y, torch.randn(len(y), 3, generator=torch.Generator().manual_seed(1)))
    torch.manual_seed(5)
    init = _state(DropoutStudent())
    res = []
    for draw in (0, 7):
        torch.manual_seed(draw)            # whatever state the caller left the global RNG in
        m = DropoutStudent()
        m.load_state_dict(init)
        before = torch.random.get_rng_state()
        train_epochs(m, ts, 2, batch_size=32, generator=torch.Generator().manual_seed(3))
        assert torch.equal(torch.random.get_rng_state(), before)   # and it is left as it was
        res.append(_state(m))
    assert all(torch.equal(res[0][k], res[1][k]) for k in res[0])


def test_compress_of_a_dropout_student_is_reproducible(data, teacher):
    p = rltune.Problem(teacher, DropoutStudent(), train=data[0], val=data[1], test=data[1], name="ow2-drop", **FAST)
    runs = []
    for draw in (1, 2):
        torch.manual_seed(draw)
        r = rltune.compress(p, target="3x", tuner="recipe", seed=0)
        runs.append(r)
    a, b = runs
    assert a.report["val_acc"] == b.report["val_acc"] and a.report["packed_bytes"] == b.report["packed_bytes"]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_check_env_passes_on_a_dropout_student(data, teacher):
    import gymnasium as gym
    from gymnasium.utils.env_checker import check_env

    p = rltune.Problem(teacher, DropoutStudent(), train=data[0], val=data[1], name="ow2-drop-env", **FAST)
    env = gym.make("rltune/DistillCompress-v0", problems=[p], targets=["3x"])
    check_env(env.unwrapped, skip_render_check=True)   # its step determinism check failed


# -- the batched path: random ops it cannot see from the modules ------------------------------------

def test_every_dropout_module_and_a_random_forward_are_not_batchable(data):
    from rltune import compression as C
    from rltune.batched import batchable

    x = torch.tensor(data[0][0])
    assert batchable([C.prepare_(Dropout2dStudent())]) == "Dropout"
    assert batchable([C.prepare_(nn.Sequential(nn.Linear(12, 8), nn.AlphaDropout(0.2), nn.Linear(8, 3)))]) == "Dropout"
    assert batchable([C.prepare_(FunctionalDropoutStudent())]) is None          # nothing to see in the modules
    assert "random" in batchable([C.prepare_(FunctionalDropoutStudent())], x)  # found by running it under vmap
    assert batchable([C.prepare_(MLP())], x) is None


@pytest.mark.parametrize("student", [FunctionalDropoutStudent, Dropout2dStudent])
def test_a_batched_search_of_a_random_student_falls_back_to_the_sequential_result(data, teacher, student):
    (x, y), (xv, yv) = data
    if student is Dropout2dStudent:
        x, xv = x.reshape(-1, 1, 3, 4), xv.reshape(-1, 1, 3, 4)
    p = rltune.Problem(teacher, student(), train=(x, y), val=(xv, yv), name=f"ow2-{student.__name__}", **FAST)
    one = rltune.compress(p, target="3x", tuner="ppo-best-of-n", agent="ppo-v0", episodes=2, seed=0, batch=1)
    two = rltune.compress(p, target="3x", tuner="ppo-best-of-n", agent="ppo-v0", episodes=2, seed=0, batch=2)
    assert two.report["packed_bytes"] <= two.report["budget_limit"]
    assert one.report["val_acc"] == two.report["val_acc"] and one.report["packed_bytes"] == two.report["packed_bytes"]


# -- a transformer student: the v1 per-layer table's Hessian traces ---------------------------------

class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (2 * x * g).detach()     # no second derivative


class NoDoubleBackward(MLP):
    def forward(self, x):
        return self.b(_Square.apply(self.a(x)))


def test_hessian_traces_of_a_transformer_and_of_a_forward_without_second_derivatives():
    import math

    from rltune.layer_sensitivity import hessian_traces

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(0)
    t = hessian_traces(TransformerStudent(), x, y, probes=2)
    assert set(t) == {"emb", "enc.self_attn.out_proj", "enc.linear1", "enc.linear2", "head"}
    assert all(math.isfinite(v) for v in t.values())
    t = hessian_traces(NoDoubleBackward(), x.reshape(32, 12), y, probes=2)
    assert set(t) == {"a", "b"} and all(math.isnan(v) for v in t.values())


def test_a_v1_agent_replays_on_a_transformer_student(data, teacher):
    (x, y), (xv, yv) = data
    torch.manual_seed(0)
    p = rltune.Problem(teacher, TransformerStudent(), train=(x.reshape(-1, 3, 4), y), val=(xv.reshape(-1, 3, 4), yv),
                       name="ow2-transformer", **FAST)
    r = rltune.replay("ppo-v1s-seed1", p, target="1.5x", seed=0)
    assert r.report["packed_bytes"] <= r.report["budget_limit"]


# -- an agent.json whose training object the tuners read is malformed ------------------------------

def _agent_with(tmp_path, src, mutate):
    from rltune.shipped import resolve_agent

    d = tmp_path / "agent"
    shutil.copytree(resolve_agent(src), d)
    meta = json.loads((d / "agent.json").read_text())
    mutate(meta["training"])
    (d / "agent.json").write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize("src,mutate,match", [
    ("ppo-v1s-seed1", lambda t: t.update(env=[1, 2]), r"'training.env' must be an object, got list"),
    ("ppo-v1s-seed1", lambda t: t.update(env="sensitivity"), r"'training.env' must be an object, got str"),
    ("ppo-v1s-seed1", lambda t: t["env"].update(zero_rule="__import__('os')"), r"'training.env': zero_rule must be"),
    ("ppo-v1s-seed1", lambda t: t["env"].update(tilt_deadzone="x"), r"'training.env': tilt_deadzone must be"),
    ("ppo-v0", lambda t: t.update(env_id="CartPole-v1"), r"'training.env_id' must be one of"),
])
def test_a_malformed_training_object_in_agent_json_is_one_line_before_training(data, teacher, tmp_path, monkeypatch,
                                                                               src, mutate, match):
    import rltune.context

    agent = _agent_with(tmp_path, src, mutate)
    p = rltune.Problem(teacher, MLP(), train=data[0], val=data[1], name="ow2-agent", **FAST)

    def no_training(*a, **k):
        raise AssertionError("trained before refusing the agent")

    monkeypatch.setattr(rltune.context, "train_epochs", no_training)
    for tuner in ("ppo-replay", "ppo-warm-tpe"):
        with pytest.raises(RltuneError, match=match) as e:
            rltune.compress(p, target="3x", tuner=tuner, agent=agent, episodes=2)
        assert "agent.json" in str(e.value) and "\n" not in str(e.value)


# -- compress's batch argument ------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1.5, 0, -2, True, "2"])
def test_a_bad_batch_is_one_line_before_training(data, teacher, batch):
    p = rltune.Problem(teacher, MLP(), train=data[0], val=data[1], name="ow2-batch", **FAST)
    with pytest.raises(RltuneError, match="batch must be a whole number >= 1"):
        rltune.compress(p, target="3x", tuner="random", episodes=2, batch=batch)


# -- the harness on a user's data -----------------------------------------------------------------

def test_the_harness_refuses_a_problem_and_takes_a_path_and_a_shipped_agent_name(data, teacher, tmp_path):
    from rltune.harness import evaluate

    p = rltune.Problem(teacher, MLP(), train=data[0], val=data[1], name="ow2-harness", **FAST)
    with pytest.raises(RltuneError, match="for an rltune.Problem run rltune.compress") as e:
        evaluate([p], ["3x"], ["recipe"], [2], 1, tmp_path / "out-problem", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out-problem").exists()
    (x, y), (xv, yv) = data
    np.savez(tmp_path / "blobs.npz", x=x, y=y, x_val=xv, y_val=yv, x_test=xv, y_test=yv)
    (tmp_path / "blobs.yaml").write_text(
        "name: ow2-blobs\n"
        "dataset: {source: file, path: blobs.npz, transfer: 100}\n"
        "teacher: {arch: mlp, hidden: [32], epochs: 5, lr: 0.005, batch_size: 64}\n"
        "student: {arch: mlp, hidden: [16], pretrain_epochs: 1}\n"
        "training: {stages: 2, epochs_per_stage: 1, batch_size: 64, lr: 0.005}\n")
    out = evaluate([tmp_path / "blobs.yaml"], ["3x"], ["recipe", "ppo-replay"], [2], 1, tmp_path / "out",
                   agent="ppo-v0", progress=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["tuner"] for r in rows) == ["ppo-replay", "recipe"]
