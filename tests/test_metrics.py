"""Tests of rltune.metrics (MACs, plain copy, latency, energy, accuracy) and rltune.costmodel."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from rltune.compression import layers, prepare_, prune_, set_bits_, share_weights_
from rltune.costmodel import CostModel, collect_samples, features
from rltune.errors import RltuneError
from rltune.metrics import (
    HOROWITZ_45NM_PJ,
    accuracy,
    agreement,
    count_macs,
    energy_per_inference,
    float_energy,
    measure_latency,
    plain_copy,
)
from rltune.models import build_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mlp(hidden=(32,), in_f=40, out_f=10):
    return build_model({"arch": "mlp", "hidden": list(hidden)}, in_f, out_f)


# ---------------------------------------------------------------- MACs

def test_macs_mlp_by_hand():
    model = mlp([32])
    want = 40 * 32 + 32 * 10
    assert count_macs(model, 40) == {"dense_macs": want, "nonzero_macs": want}
    prepare_(model)
    assert count_macs(model, 40) == {"dense_macs": want, "nonzero_macs": want}
    prune_(model, sparsity=0.5)  # layer-wise: exactly half of 1280 and of 320 (32-bit, no rounding to 0)
    assert count_macs(model, 40) == {"dense_macs": want, "nonzero_macs": 640 + 160}


def test_macs_cnn1d_by_hand():
    model = build_model({"arch": "cnn1d"}, 40, 10)
    # lengths 40 -> 19 -> 10 -> 5 (k, s, p = (5,2,1), (3,2,1), (3,2,1)); 25 channels; head 125 -> 10
    want = 25 * 19 * 1 * 5 + 25 * 10 * 25 * 3 + 25 * 5 * 25 * 3 + 125 * 10
    assert want == 31750
    assert count_macs(model, 40) == {"dense_macs": want, "nonzero_macs": want}
    prepare_(model)
    prune_(model, sparsity=0.5)
    macs = count_macs(model, 40)
    assert macs["dense_macs"] == want
    # per layer ceil(n/2) (or floor) weights stay, each applied at every output position
    lo = 62 * 19 + 937 * 10 + 937 * 5 + 625
    hi = 63 * 19 + 938 * 10 + 938 * 5 + 625
    assert lo <= macs["nonzero_macs"] <= hi


def test_nonzero_macs_follow_effective_weights_and_quantization():
    model = prepare_(mlp([16], in_f=8, out_f=4))
    with torch.no_grad():
        w = layers(model)[0].weight
        w.fill_(1.0)
        w[0, 0] = 1e-4  # rounds to zero at 2 bits (scale ~1), not at 32
    assert count_macs(model, 8)["nonzero_macs"] == 8 * 16 + 16 * 4
    set_bits_(model, 2)
    assert count_macs(model, 8)["nonzero_macs"] < 8 * 16 + 16 * 4


class UserNet(nn.Module):
    """A user's own module: grouped conv on a reshaped input, then a linear layer used twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, groups=2, bias=False)
        self.fc = nn.Linear(8 * 4, 32 // 1)
        self.out = nn.Linear(32, 32)

    def forward(self, x):
        h = torch.relu(self.conv(x.reshape(x.shape[0], 4, 6)))   # length 6 -> 4
        return self.out(self.out(self.fc(h.flatten(1))))


def test_macs_user_module_grouped_conv_and_reused_layer():
    model = UserNet()
    want = 8 * 4 * (4 // 2) * 3 + 32 * 32 + 2 * 32 * 32
    assert count_macs(model, 24)["dense_macs"] == want
    prepare_(model)
    assert count_macs(model, 24)["dense_macs"] == want


# ---------------------------------------------------------------- plain copy

def _any_parametrized(model):
    return any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("arch", ["mlp", "cnn1d"])
def test_plain_copy_predicts_exactly_and_leaves_original_intact(arch):
    spec = {"arch": arch, "hidden": [24]} if arch == "mlp" else {"arch": arch, "channels": 6}
    model = prepare_(build_model(spec, 40, 10))
    prune_(model, sparsity=0.6)
    set_bits_(model, [3] + [5] * (len(layers(model)) - 1))
    model.eval()
    x = torch.randn(17, 40)
    with torch.no_grad():
        before = model(x)
    plain = plain_copy(model)
    assert not _any_parametrized(plain)
    assert not plain.training
    with torch.no_grad():
        assert torch.equal(plain(x), before)
        # the original keeps its parametrizations and still works (deepcopy shares the class)
        assert _any_parametrized(model)
        assert torch.equal(model(x), before)
    share_weights_(model, 2)
    with torch.no_grad():
        assert torch.equal(plain_copy(model)(x), model(x))


def test_plain_copy_of_unprepared_model():
    model = mlp([8])
    x = torch.randn(3, 40)
    with torch.no_grad():
        assert torch.equal(plain_copy(model)(x), model(x))


# ---------------------------------------------------------------- latency

def test_latency_positive_finite_and_restores_threads():
    model = prepare_(mlp([32]))
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        lat = measure_latency(model, 40)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)
    assert set(lat) == {"latency_b1_s", "latency_b256_s"}
    assert all(math.isfinite(v) and v > 0 for v in lat.values())
    lat = measure_latency(model, 40, batch_sizes=(4,), repeats=3, warmup=1)
    assert set(lat) == {"latency_b4_s"} and lat["latency_b4_s"] > 0


# ---------------------------------------------------------------- energy

def test_energy_falls_with_bits_and_sparsity():
    model = prepare_(mlp([64]))
    e32 = energy_per_inference(model, 40)["energy_pj"]
    assert e32 == pytest.approx(float_energy(model, 40)["energy_pj"])
    set_bits_(model, 8)
    e8 = energy_per_inference(model, 40)["energy_pj"]
    set_bits_(model, 4)
    e4 = energy_per_inference(model, 40)
    assert e4["energy_pj"] < e8 < e32
    assert e4["energy_pj"] == pytest.approx(e4["energy_compute_pj"] + e4["energy_memory_pj"])
    prune_(model, sparsity=0.3)
    s3 = energy_per_inference(model, 40)["energy_pj"]
    prune_(model, sparsity=0.8)
    s8 = energy_per_inference(model, 40)["energy_pj"]
    assert s8 < s3 < e4["energy_pj"]
    # the float reference ignores the compression
    assert float_energy(model, 40)["energy_pj"] == pytest.approx(e32)


def _tiny():
    model = prepare_(build_model({"arch": "linear"}, 4, 2))
    with torch.no_grad():
        layers(model)[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.5, -1.0], [0.0, 0.0, 1.0, 1.0]]))
        model.net[0].parametrizations["bias"].original.copy_(torch.tensor([0.1, -0.2]))
    return model


def test_energy_tiny_linear_by_hand():
    t = HOROWITZ_45NM_PJ
    model = _tiny()
    set_bits_(model, 8)
    e = energy_per_inference(model, 4)
    # 5 non-zero weights (0.5 stays non-zero at 8 bits), batch 1 -> 5 MACs
    compute = 5 * (t["int8_mult"] * 1.0 + t["int32_add"])
    weights = (5 * 8 + 2 * 8) / 64 * t["sram_8kb_read64"]        # 7 bytes -> 8 KB SRAM
    acts = 2 * (4 * 8 + 2 * 8) / 64 * t["sram_8kb_read64"]       # input + output, 8-bit, write + read
    assert e["energy_compute_pj"] == pytest.approx(compute) == pytest.approx(1.5)
    assert e["energy_memory_pj"] == pytest.approx(weights + acts) == pytest.approx(8.75 + 15.0)
    assert e["energy_pj"] == pytest.approx(25.25)

    set_bits_(model, 4)
    e4 = energy_per_inference(model, 4)
    assert e4["energy_compute_pj"] == pytest.approx(5 * (t["int8_mult"] * (4 / 8) ** 2 + t["int32_add"]))

    # float: 8 dense MACs at fp32, 10 words of 32 bits, activations at 32 bits
    f = float_energy(model, 4)
    assert f["energy_compute_pj"] == pytest.approx(8 * (3.7 + 0.9))
    assert f["energy_memory_pj"] == pytest.approx(10 * 32 / 64 * 10 + 2 * 6 * 32 / 64 * 10)
    plain = build_model({"arch": "linear"}, 4, 2)
    assert energy_per_inference(plain, 4)["energy_pj"] == pytest.approx(f["energy_pj"])

    # packed bytes override the weight bits and pick the memory tier (2 MB -> DRAM, acts in 1 MB SRAM)
    set_bits_(model, 8)
    big = energy_per_inference(model, 4, packed_bytes=2 * 1024 * 1024)
    assert big["energy_memory_pj"] == pytest.approx(
        2 * 1024 * 1024 * 8 / 64 * t["dram_read64"] + 2 * 48 / 64 * t["sram_1mb_read64"])
    mid = energy_per_inference(model, 4, packed_bytes=16 * 1024)
    assert mid["energy_memory_pj"] == pytest.approx((16 * 1024 * 8 + 2 * 48) / 64 * t["sram_32kb_read64"])


# ---------------------------------------------------------------- accuracy helpers

def test_accuracy_and_agreement():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert agreement(logits, teacher) == 0.75
    assert agreement(logits, logits) == 1.0


# ---------------------------------------------------------------- cost model

def test_features_of_plain_and_prepared_model():
    model = mlp([32])
    f = features(model, 40)
    assert f["mean_bits"] == 32 and f["n_layers"] == 2 and f["dense_macs"] == 1600
    prepare_(model)
    set_bits_(model, [4, 8])
    assert features(model, 40)["mean_bits"] == pytest.approx((4 * 1280 + 8 * 320) / 1600)


def test_cost_model_fit_and_json_round_trip():
    rng_state = torch.get_rng_state()
    samples = collect_samples(30, batch_size=1, seed=1, budget_s=0.01)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert len(samples) == 30 and all(lat > 0 for _, lat in samples)
    cm = CostModel().fit(samples, batch_size=1)
    assert cm.degree in (1, 2, 3)
    assert math.isfinite(cm.r2_cv) and math.isfinite(cm.r2_test)
    text = cm.to_json()
    json.loads(text)  # plain JSON
    back = CostModel.from_json(text)
    assert back.degree == cm.degree and back.r2_test == cm.r2_test
    feats = [f for f, _ in samples]
    assert np.array_equal(back.predict_features(feats), cm.predict_features(feats))
    model = prepare_(mlp([64]))
    p = cm.predict(model, 40)
    assert math.isfinite(p) and p >= 0 and back.predict(model, 40) == p
    with pytest.raises(RltuneError):
        CostModel.from_json('{"format": "something else"}')
    with pytest.raises(RltuneError):
        CostModel().fit(samples[:3])


def test_costs_equals_macs_and_energy_from_one_pass():
    from rltune.compression import prepare_, prune_, set_bits_
    from rltune.metrics import costs, count_macs, energy_per_inference
    from rltune.models import build_model

    m = prepare_(build_model({"arch": "mlp", "hidden": [32]}, 40, 10))
    prune_(m, sparsity=0.6)
    set_bits_(m, 4)
    c = costs(m, 40, packed_bytes=300)
    assert {k: c[k] for k in ("dense_macs", "nonzero_macs")} == count_macs(m, 40)
    assert c["energy_pj"] == energy_per_inference(m, 40, packed_bytes=300)["energy_pj"]
