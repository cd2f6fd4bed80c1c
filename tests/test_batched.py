"""Batched students: K students trained as one computation get what each gets alone."""

import math

import pytest
import torch
from torch import nn

from rltune import compression as C
from rltune.batched import batchable, run_stages_batched, train_epochs_batched
from rltune.context import Context
from rltune.errors import DivergedError, RltuneError
from rltune.scenario import parse_scenario
from rltune.stage import Knobs, run_stage, start

TINY = {"name": "tiny-batched", "dataset": {"source": "digits", "transfer": 1000},
        "teacher": {"arch": "mlp", "hidden": [64], "epochs": 15},
        "student": {"arch": "mlp", "hidden": [24], "pretrain_epochs": 2},
        "training": {"stages": 2, "epochs_per_stage": 2, "batch_size": 128, "lr": 0.005}}
KNOBS = [Knobs(4.0, 0.9, 0.5, 4), Knobs(2.0, 1.0, 0.7, 2), Knobs(8.0, 0.5, 0.0, 32), Knobs(3.0, 0.7, 0.3, 8),
         Knobs(4.0, 0.0, 0.6, 3)]


def _compare(ctx, knobs, make_states):
    single, batch = make_states(), make_states()
    alone = [run_stage(ctx, st, k) for st, k in zip(single, knobs)]
    together = run_stages_batched(ctx, batch, knobs)
    for a, b, s1, s2 in zip(alone, together, single, batch):
        assert a.val_acc == b.val_acc and a.packed_bytes == b.packed_bytes and a.sparsity == b.sparsity
        assert math.isclose(a.train_loss, b.train_loss, rel_tol=1e-5)
        for l1, l2 in zip(C.layers(s1.model), C.layers(s2.model)):
            assert torch.allclose(l1.weight, l2.weight, atol=1e-5)
            assert torch.equal(l1.compressor.mask, l2.compressor.mask) and l1.compressor.bits == l2.compressor.bits
        assert len(s2.history) == 1


@pytest.fixture(scope="module")
def ctx():
    return Context.build(parse_scenario(TINY))


def test_a_batch_of_students_gets_what_each_gets_alone(ctx):
    _compare(ctx, KNOBS, lambda: [start(ctx, seed=s) for s in range(len(KNOBS))])


@pytest.mark.parametrize("arch", [{"arch": "cnn1d", "channels": 4}, {"arch": "linear"}])
def test_other_architectures_batch_too(arch):
    raw = {**TINY, "name": f"tiny-{arch['arch']}", "student": {**arch, "pretrain_epochs": 1}}
    c = Context.build(parse_scenario(raw))
    _compare(c, KNOBS[:3], lambda: [start(c, seed=s) for s in range(3)])


def test_a_users_layernorm_student_batches(ctx):
    class LN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.b = nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 10)

        def forward(self, x):
            h = torch.relu(self.norm(self.a(x)))
            return self.b(h)

    import rltune

    torch.manual_seed(0)
    d = ctx.data
    p = rltune.Problem(ctx.teacher, LN(), train=(d.x_train, d.y_train), val=(d.x_val, d.y_val),
                       transfer=d.x_transfer, name="ln-batched", stages=2, epochs_per_stage=2, batch_size=128,
                       pretrain_epochs=1)
    c = Context.build(p)
    _compare(c, KNOBS[:3], lambda: [start(c, seed=s) for s in range(3)])


def test_what_cannot_batch_says_why_and_falls_back(ctx):
    bn = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    drop = nn.Sequential(nn.Linear(64, 16), nn.Dropout(0.1), nn.Linear(16, 10))
    assert "BatchNorm" in batchable([C.prepare_(bn)])
    assert "Dropout" in batchable([C.prepare_(drop)])
    assert "architecture" in batchable([C.prepare_(nn.Linear(64, 10)), C.prepare_(nn.Sequential(nn.Linear(64, 10)))])
    with pytest.raises(RltuneError, match="BatchNorm"):
        train_epochs_batched([bn], ctx.train_set, 1, [4.0], [0.9])
    shared = start(ctx, seed=0)
    C.set_bits_(shared.model, 4)
    C.share_weights_(shared.model, 4)
    assert batchable([shared.model]) == "weight sharing (codebooks)"


def test_a_diverging_student_does_not_touch_the_others(ctx):
    states = [start(ctx, seed=s) for s in range(3)]
    with torch.no_grad():
        C.layers(states[1].model)[0].weight.fill_(float("nan"))
    out = run_stages_batched(ctx, states, KNOBS[:3])
    assert isinstance(out[1], DivergedError)
    alone = [start(ctx, seed=s) for s in (0, 2)]
    ref = [run_stage(ctx, st, k) for st, k in zip(alone, (KNOBS[0], KNOBS[2]))]
    assert out[0].val_acc == ref[0].val_acc and out[2].val_acc == ref[1].val_acc
