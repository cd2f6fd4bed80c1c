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
    frozen = nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 10))
    frozen[1].weight.requires_grad_(False)   # one path would leave it alone, the batch would train it
    assert "frozen" in batchable([C.prepare_(frozen)])
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


def test_the_batched_vecenv_steps_like_dummyvecenv(tmp_path):
    import numpy as np
    import yaml
    from stable_baselines3.common.vec_env import DummyVecEnv

    from rltune.env import DistillCompressEnv
    from rltune.vecenv import BatchedVecEnv

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({**TINY, "name": "tiny-vec"}))
    make = lambda: DistillCompressEnv(scenarios=[str(f)], targets=["4x", "8x"])  # noqa: E731
    a, b = DummyVecEnv([make] * 4), BatchedVecEnv([make] * 4)
    a.seed(0)
    b.seed(0)
    assert np.array_equal(a.reset(), b.reset())
    rng = np.random.default_rng(0)
    for step in range(5):  # two episodes and a half, through the auto-reset
        act = rng.uniform(-1, 1, (4, 5)).astype(np.float32)
        oa, ra, da, ia = a.step(act)
        ob, rb, db, ib = b.step(act)
        assert np.array_equal(da, db)
        # the same stage in a batch: val accuracy within a sample or two (float summation order)
        assert np.allclose(oa, ob, atol=0.02) and np.allclose(ra, rb, atol=0.5)
        for x, y in zip(ia, ib):
            assert x["plan_final_bits"] == y["plan_final_bits"] and x["stage"] == y["stage"]
            assert ("terminal_observation" in x) == ("terminal_observation" in y)


def test_train_with_the_batched_vecenv(tmp_path):
    import yaml

    from rltune.train import check_config, train

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({**TINY, "name": "tiny-train"}))
    cfg = check_config({"scenarios": [str(f)], "total_timesteps": 16, "n_envs": 4, "vec_env": "batched", "seed": 0,
                        "checkpoint_every": 8, "policy_kwargs": {"net_arch": [8]},
                        "ppo": {"n_steps": 4, "batch_size": 8, "n_epochs": 1}, "env": {"targets": ["4x"]}}, "test")
    run = train(cfg, tmp_path / "run", progress_bar=False, command="pytest")
    assert (run / "agent" / "agent.json").is_file()
    lines = (run / "monitor" / "batched.monitor.csv").read_text().splitlines()
    assert "val_acc" in lines[1] and len(lines) >= 2 + 8  # 16 steps of 2-stage episodes


def test_a_batch_of_episodes_plays_what_the_episodes_play_one_by_one(ctx):
    import numpy as np

    from rltune.env import DistillCompressEnv
    from rltune.tuners import Session

    acts = [np.full(5, v, np.float32) for v in (-0.5, 0.0, 0.5, 0.9)]
    env = DistillCompressEnv(scenarios=[ctx.scenario], targets=["6x"])
    one = Session(env, 0, "6x", 0, 4 * ctx.scenario.training["stages"])
    alone = [one.play_actions(lambda obs, k, a=a: a, {}) for a in acts]
    many = Session(DistillCompressEnv(scenarios=[ctx.scenario], targets=["6x"]), 0, "6x", 0,
                   4 * ctx.scenario.training["stages"])
    together = many.play_batch([lambda obs, k, a=a: a for a in acts], [{}] * 4)
    assert many.stages_used == one.stages_used and many.batch_room(1) == 0
    assert np.allclose(alone, together, atol=0.02)  # the same episodes (within a val sample or two)


@pytest.mark.parametrize("tuner", ["random", "optuna-tpe"])
def test_searchers_in_batches_stay_within_their_budget(ctx, tuner):
    from rltune.env import DistillCompressEnv
    from rltune.tuners import run_tuner

    env = DistillCompressEnv(scenarios=[ctx.scenario], targets=["6x"])
    S = ctx.scenario.training["stages"]
    r = run_tuner(tuner, env, 0, "6x", 0, 7 * S, batch=3)
    assert r.episodes == 7 and r.stages_used == 7 * S and r.val_acc > 0.5


def test_batched_training_resumes_keeping_its_episodes(tmp_path):
    import yaml

    from rltune.train import check_config, train

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({**TINY, "name": "tiny-resume"}))
    cfg = check_config({"scenarios": [str(f)], "total_timesteps": 16, "n_envs": 2, "vec_env": "batched", "seed": 0,
                        "checkpoint_every": 8, "policy_kwargs": {"net_arch": [8]},
                        "ppo": {"n_steps": 4, "batch_size": 8, "n_epochs": 1}, "env": {"targets": ["4x"]}}, "test")
    run = train(cfg, tmp_path / "run", progress_bar=False, command="pytest")
    monitor = run / "monitor" / "batched.monitor.csv"
    before = monitor.read_text().splitlines()
    train({**cfg, "total_timesteps": 24}, run, resume=True, progress_bar=False, command="pytest")
    after = monitor.read_text().splitlines()
    assert after[:len(before)] == before and len(after) == len(before) + 4  # 8 more steps: 4 episodes of 2


def test_tail_averaging_on_the_last_stage_batches_too(ctx, monkeypatch):
    import rltune.stage as stage

    monkeypatch.setattr(stage, "TAIL_AVERAGE", 0.5)

    def states():
        out = [start(ctx, seed=s) for s in range(3)]
        out[0].last = out[2].last = True   # the middle one is not at its last stage: no averaging
        return out

    _compare(ctx, KNOBS[:3], states)
    # the averaged student is not the last iterate: the same stage without averaging ends elsewhere
    a, b = start(ctx, seed=0), start(ctx, seed=0)
    a.last = True
    run_stage(ctx, a, KNOBS[0])
    monkeypatch.setattr(stage, "TAIL_AVERAGE", None)
    run_stage(ctx, b, KNOBS[0])
    assert not torch.allclose(C.layers(a.model)[0].weight, C.layers(b.model)[0].weight)


def test_tail_average_is_the_mean_of_the_last_iterates():
    from rltune.distill import TailAverage

    p = torch.zeros(3)
    avg = TailAverage([p], total=10, share=0.3)   # the last 3 of 10 steps
    for k in range(1, 11):
        p.fill_(float(k))
        avg.step()
    avg.apply()
    assert torch.allclose(p, torch.full((3,), 9.0))   # mean of 8, 9, 10
    q = torch.zeros(2, 2)
    rows = TailAverage([q], total=4, share=0.5, rows=torch.tensor([True, False]))
    for k in range(1, 5):
        q.fill_(float(k))
        rows.step()
    rows.apply()
    assert q[0].tolist() == [3.5, 3.5] and q[1].tolist() == [4.0, 4.0]


def test_tail_averaging_refuses_a_share_outside_0_1_and_refreshes_batchnorm():
    from rltune.distill import TailAverage, TrainSet, train_epochs

    for bad in (0.0, -0.2, 1.5, float("nan")):
        with pytest.raises(RltuneError, match="share"):
            TailAverage([torch.zeros(1)], 10, bad)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(256, 4) * 3 + 1
    data = TrainSet(x, torch.randint(0, 3, (256,)), torch.randn(256, 3))
    train_epochs(m, data, 2, lr=0.05, batch_size=32, tail=0.5)
    # the running statistics are those of the averaged weights over the training rows
    with torch.no_grad():
        h = m[0](x)
    assert torch.allclose(m[1].running_mean, h.mean(0), atol=1e-4)
    assert torch.allclose(m[1].running_var, torch.stack([h[i:i + 32].var(0) for i in range(0, 256, 32)]).mean(0),
                          rtol=1e-3)
