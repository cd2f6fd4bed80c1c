
import pytest
import torch

from rltune.context import Context
from rltune.export import load_artifact, save_artifact
from rltune.scenario import parse_scenario
from rltune.score import efficiency_score
from rltune.stage import Knobs, cubic_sparsity, final_report, recipe, run_schedule, run_stage, start
from rltune.errors import RltuneError

TINY = {"name": "tiny", "dataset": {"source": "wine", "transfer": 200},
        "teacher": {"arch": "mlp", "hidden": [32], "epochs": 30},
        "student": {"arch": "mlp", "hidden": [16], "pretrain_epochs": 5},
        "training": {"stages": 4, "epochs_per_stage": 2, "batch_size": 64, "lr": 0.005}}


@pytest.fixture(scope="module")
def ctx():
    return Context.build(parse_scenario(TINY))


def test_stage_is_deterministic_for_a_seed(ctx):
    runs = []
    for _ in range(2):
        state = run_schedule(ctx, recipe(4, 0.6, 4), seed=3)
        runs.append((state.history[-1].val_acc, state.history[-1].packed_bytes,
                     torch.cat([l.flatten() for l in state.model.state_dict().values()])))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][2], runs[1][2])


def test_stage_reaches_knobs_and_reports_artifact_size(ctx, tmp_path):
    state = start(ctx, seed=0)
    m = run_stage(ctx, state, Knobs(4.0, 0.9, 0.7, 3))
    assert m.sparsity >= 0.7 - 1e-3 and m.bits == 3
    path = tmp_path / "s.rlt"
    n = save_artifact(state.model, path, ctx.scenario.student, ctx.n_features, ctx.n_classes)
    assert n == path.stat().st_size == m.packed_bytes
    assert m.ratio == pytest.approx(state.ref.float_bytes / n)
    loaded = load_artifact(path)
    x = ctx.data.x_test
    assert torch.equal(loaded(x), state.model.eval()(x))
    assert 0 < m.seconds_outside_training < m.seconds


def test_weight_sharing_stage(ctx):
    shared = Context.build(parse_scenario({**TINY, "training": {**TINY["training"], "weight_sharing": True}}))
    state = start(shared, seed=0)
    run_stage(shared, state, Knobs(4.0, 0.9, 0.5, 3))
    from rltune import compression as C
    assert all(l.compressor.shared and l.compressor.codebook.numel() == 8 for l in C.layers(state.model))


def test_recipe_is_the_cubic_ramp_then_late_bits():
    r = recipe(8, 0.9, 4)
    assert [k.bits for k in r] == [8] * 6 + [4] * 2
    assert r[5].sparsity == pytest.approx(0.9) and r[-1].sparsity == pytest.approx(0.9)
    assert r[0].sparsity == pytest.approx(0.9 * (1 - (1 - 1 / 6) ** 3))
    assert all(a.sparsity <= b.sparsity for a, b in zip(r, r[1:]))
    assert all(k.temperature == 4.0 and k.alpha == 0.9 for k in r)
    assert cubic_sparsity(0, 0.9, 6) == 0.0


def test_final_report_reads_test_and_scores(ctx):
    state = run_schedule(ctx, recipe(4, 0.5, 8), seed=0)
    rep = final_report(ctx, state, latency=True)
    assert 0 <= rep["test_acc"] <= 1 and rep["latency_b1_s"] > 0
    expected, _ = efficiency_score(rep["test_acc"], state.ref.test_acc, rep["packed_bytes"],
                                   state.ref.float_bytes, ctx.scenario.reward,
                                   energy=rep["energy_pj"], ref_energy=state.ref.energy_pj)
    assert rep["test_score"] == pytest.approx(expected)


def test_score_parts_by_hand():
    w = {"accuracy_floor": 0.01, "floor_penalty": 5.0, "w_size": 0.02, "max_bytes": 100}
    score, parts = efficiency_score(0.80, 0.85, 200, 3200, w)
    assert parts["reward_accuracy"] == pytest.approx(-0.05)
    assert parts["reward_floor"] == pytest.approx(-5 * 0.04)
    assert parts["reward_size"] == pytest.approx(0.02 * 4)
    assert parts["reward_budget"] == pytest.approx(-5 * 1.0)
    assert score == pytest.approx(sum(parts.values()))


def test_bad_knobs_are_clear_errors():
    with pytest.raises(RltuneError, match="bit-width"):
        Knobs(bits=1)
    with pytest.raises(RltuneError, match="alpha"):
        Knobs(alpha=1.5)
