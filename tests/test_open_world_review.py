"""Users' own modules and data that broke the public API (found by an open-world review).

Each test builds a small problem of the kind a user brings and checks the README's contract:
one RltuneError line for a mistake before training, a working compression otherwise, and an
artifact that reloads predicting what ``r.model`` predicts.
"""

import pytest
import torch
from torch import nn

import rltune
from rltune.errors import RltuneError

from open_world import FAST, MLP, data, teacher  # noqa: F401 (data, teacher: fixtures)


def _same(m1, m2, x):
    with torch.no_grad():
        return torch.equal(m1(torch.as_tensor(x)), m2(torch.as_tensor(x)))


# -- a v1 agent (per-layer actions) replays through the public API ---------------------------------

@pytest.mark.parametrize("agent", ["ppo-v1", "ppo-v1s-seed1"])
def test_replay_of_a_v1_agent_on_a_user_problem(data, teacher, agent):
    torch.manual_seed(1)
    p = rltune.Problem(teacher, MLP(), train=data[0], val=data[1], name="ow-v1", **FAST)
    r = rltune.replay(agent, p, target="4x", seed=0)
    assert r.report["tuner"] == "ppo-replay" and r.report["budget_used"] <= 1.0
    assert r.report["packed_bytes"] <= r.report["budget_limit"]


def test_cli_agent_argument_accepts_a_v1_agent():
    from rltune.cli import _agent_arg

    assert _agent_arg("ppo-v1").name == "ppo-v1"


# -- BatchNorm: an epoch whose last batch would be a single row ---------------------------------

class BNStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(12, 24), nn.BatchNorm1d(24), nn.Linear(24, 3)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


def test_batchnorm_student_when_the_rows_leave_one_over_a_batch(data, teacher, tmp_path):
    # 17 rows at batch 16 (with the defaults, 227 train rows + 2270 transfer at batch 64 do the same)
    (x, y), val = data
    p = rltune.Problem(teacher, BNStudent(), train=(x[:17], y[:17]), val=val, name="ow-bn17", stages=2,
                       epochs_per_stage=1, pretrain_epochs=1, transfer_size=0, batch_size=16)
    r = rltune.compress(p, target="2x", tuner="recipe", seed=0)
    assert r.report["packed_bytes"] <= r.report["budget_limit"]
    r.save(tmp_path / "bn.rlt")
    assert _same(rltune.load_artifact(tmp_path / "bn.rlt", skeleton=BNStudent()), r.model, val[0])


def test_batch_bounds_never_leave_a_single_row_batch_where_batchnorm_trains():
    from rltune.distill import batch_bounds

    assert batch_bounds(17, 16, merge_single=True) == [(0, 17)]
    assert batch_bounds(33, 16, merge_single=True) == [(0, 16), (16, 33)]
    assert batch_bounds(17, 16, merge_single=False) == [(0, 16), (16, 17)]
    assert batch_bounds(32, 16, merge_single=True) == [(0, 16), (16, 32)]
    assert batch_bounds(1, 16, merge_single=True) == [(0, 1)]


def test_batch_size_one_with_batchnorm_is_refused_before_training(data, teacher):
    with pytest.raises(RltuneError, match="batch_size: 1 cannot train a student with BatchNorm"):
        rltune.Problem(teacher, BNStudent(), train=data[0], val=data[1], name="ow-bn1", batch_size=1, **FAST)


# -- layers whose weight is not a plain parameter: one RltuneError line, before training ----------

def _wrap(kind):
    import warnings

    m = MLP()
    if kind == "weight_norm":
        m.a = torch.nn.utils.parametrizations.weight_norm(m.a)
    elif kind == "spectral_norm":
        m.b = torch.nn.utils.parametrizations.spectral_norm(m.b)
    elif kind == "old_weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.a = torch.nn.utils.weight_norm(m.a)
    elif kind == "prune":
        from torch.nn.utils import prune

        prune.l1_unstructured(m.a, "weight", amount=0.3)
    return m


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "old_weight_norm", "prune"])
def test_a_layer_with_its_own_parametrization_or_weight_hook_is_refused(data, teacher, kind):
    student = _wrap(kind)
    with pytest.raises(RltuneError, match="rltune compresses plain weights"):
        rltune.Problem(teacher, student, train=data[0], val=data[1], name="ow-wn", **FAST)
    from rltune.compression import prepare_

    with pytest.raises(RltuneError, match="rltune compresses plain weights"):
        prepare_(_wrap(kind))


def test_a_prepared_model_still_prepares():
    from rltune.compression import layers, prepare_

    m = prepare_(MLP())
    assert prepare_(m) is m and len(layers(m)) == 2


# -- a subclass of nn.Linear with a tensor of its own ------------------------------------------

class GainLinear(nn.Linear):
    """A Linear with a learned per-output gain (and a persistent buffer), as users write them."""

    def __init__(self, i, o):
        super().__init__(i, o)
        self.gain = nn.Parameter(torch.full((o,), 2.0))
        self.register_buffer("shift", torch.zeros(o))

    def forward(self, x):
        return super().forward(x) * self.gain + self.shift


class GainStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = GainLinear(12, 24), nn.Linear(24, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_linear_subclass_keeps_its_own_tensors_in_the_artifact(data, teacher, tmp_path):
    torch.manual_seed(4)
    p = rltune.Problem(teacher, GainStudent(), train=data[0], val=data[1], name="ow-gain", **FAST)
    r = rltune.compress(p, target="3x", tuner="recipe", seed=0)
    with torch.no_grad():
        r.compressed.a.shift.fill_(0.25)   # a buffer the skeleton does not have at this value
        r.model.a.shift.fill_(0.25)
    n = r.save(tmp_path / "g.rlt")
    loaded = rltune.load_artifact(tmp_path / "g.rlt", skeleton=GainStudent())
    assert _same(loaded, r.model, data[1][0])
    assert not torch.equal(loaded.a.gain, torch.full((24,), 2.0))  # trained, and stored
    assert n == r.report["packed_bytes"] <= r.report["budget_limit"]  # the gain's bytes are counted and met


def test_a_model_that_is_one_plain_layer_has_no_extras():
    from rltune.compression import prepare_
    from rltune.export import export_bytes, load_artifact

    m = prepare_(nn.Linear(5, 3))
    assert torch.equal(load_artifact(export_bytes(m), skeleton=nn.Linear(5, 3)).weight, m.weight)


# -- a student with lazy layers --------------------------------------------------------------

class LazyStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.LazyLinear(24), nn.Linear(24, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_lazy_student_compresses_and_a_lazy_skeleton_is_a_clear_error(data, teacher, tmp_path):
    torch.manual_seed(5)
    p = rltune.Problem(teacher, LazyStudent(), train=data[0], val=data[1], name="ow-lazy", **FAST)
    r = rltune.compress(p, target="3x", tuner="recipe", seed=0)
    r.save(tmp_path / "l.rlt")
    with pytest.raises(RltuneError, match=r"uninitialized \(lazy\) tensors \(a.weight, a.bias;") as e:
        rltune.load_artifact(tmp_path / "l.rlt", skeleton=LazyStudent())
    assert "corrupt" not in str(e.value)
    skeleton = LazyStudent()
    skeleton(torch.zeros(1, 12))  # materialised: it loads
    assert _same(rltune.load_artifact(tmp_path / "l.rlt", skeleton=skeleton), r.model, data[1][0])


# -- a student that breaks on a batch of one row ----------------------------------------------

class SqueezeStudent(MLP):
    def forward(self, x):
        return self.b(torch.relu(self.a(x))).squeeze().log_softmax(dim=1)


def test_a_student_that_fails_on_one_row_is_refused_by_problem(data, teacher):
    with pytest.raises(RltuneError, match="single rows") as e:
        rltune.Problem(teacher, SqueezeStudent(), train=data[0], val=data[1], name="ow-squeeze", **FAST)
    assert "(1, 12)" in str(e.value)


class SqueezeTeacher(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).squeeze()


def test_a_teacher_that_fails_on_one_row_is_refused_by_problem(data, teacher):
    with pytest.raises(RltuneError, match="single rows") as e:
        rltune.Problem(SqueezeTeacher(teacher), MLP(), train=data[0], val=data[1], name="ow-squeeze-t", **FAST)
    assert "teacher" in str(e.value) and "\n" not in str(e.value)


# -- a target just above the smallest the student can be -------------------------------------

class LNStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(12, 48), nn.LayerNorm(48), nn.Linear(48, 3)

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x))))


def test_a_target_within_the_sizing_margin_of_the_floor_is_refused_before_training(data, teacher, monkeypatch):
    import copy

    import rltune.context
    from rltune.compression import prepare_, prune_, set_bits_
    from rltune.export import packed_size

    p = rltune.Problem(teacher, LNStudent(), train=data[0], val=data[1], name="ow-floor", **FAST)
    m = prepare_(copy.deepcopy(p.student))
    prune_(m, sparsity=0.98, scope="global")
    set_bits_(m, 2)
    least = packed_size(m)
    target = f"{int(least / 0.985)}B"          # over the floor, under it with the tuners' 3 % margin

    def no_training(*a, **k):
        raise AssertionError("trained before refusing the target")

    monkeypatch.setattr(rltune.context, "train_epochs", no_training)
    with pytest.raises(RltuneError, match="cannot be met: at 2 bits"):
        rltune.compress(p, target=target, tuner="recipe")


def test_a_float64_teacher_is_one_line_naming_the_fix(data, teacher):
    import copy

    t64 = copy.deepcopy(teacher).double()
    with pytest.raises(RltuneError, match=r"teacher: parameter .* is torch.float64.*teacher\.float\(\)") as e:
        rltune.Problem(t64, MLP(), train=data[0], val=data[1], name="ow-t64", **FAST)
    assert "\n" not in str(e.value)


def test_a_teacher_that_returns_probabilities_is_warned_about_and_log_probabilities_are_not(data, teacher):
    import warnings

    from rltune.errors import RltuneWarning

    with pytest.warns(RltuneWarning, match="look like probabilities"):
        rltune.Problem(nn.Sequential(teacher, nn.Softmax(dim=1)), MLP(), train=data[0], val=data[1],
                       name="ow-probs", **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RltuneWarning)
        rltune.Problem(nn.Sequential(teacher, nn.LogSoftmax(dim=1)), MLP(), train=data[0], val=data[1],
                       name="ow-logprobs", **FAST)
        rltune.Problem(teacher, MLP(), train=data[0], val=data[1], name="ow-logits", **FAST)
