"""The packed artifact: exact round trips, honest sizes, and clean failures on bad files."""

import zlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from rltune import export as E
from rltune.compression import (
    float_bytes,
    iter_params,
    layers,
    prepare_,
    prune_,
    set_bits_,
    share_weights_,
)
from rltune.errors import RltuneError
from rltune.models import build_model

ARCHS = {
    "linear": ({"arch": "linear"}, 64, 10),
    "mlp": ({"arch": "mlp", "hidden": [48, 24]}, 40, 10),
    "cnn1d": ({"arch": "cnn1d", "channels": 8}, 40, 10),
}
# (sparsity, bits, shared bits)
STATES = {
    "float": (0.0, 32, None),
    "pruned-float": (0.7, 32, None),
    "pruned-2bit": (0.6, 2, None),
    "pruned-4bit": (0.8, 4, None),
    "8bit": (0.0, 8, None),
    "pruned-8bit": (0.5, 8, None),
    "shared-3bit": (0.5, 3, 3),
    "shared-5bit": (0.9, 5, 5),
}


def _step(model, fin, seed, steps=2):
    """A few SGD steps on random data, so the latent weights and codebooks are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(iter_params(model), lr=0.05)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, fin, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _student(arch, state, seed=0, train=True):
    spec, fin, fout = ARCHS[arch]
    sparsity, bits, shared = STATES[state]
    torch.manual_seed(seed)
    model = prepare_(build_model(spec, fin, fout))
    if train:
        _step(model, fin, seed)
    if sparsity:
        prune_(model, sparsity=sparsity)
    if bits != 32:
        set_bits_(model, bits)
    if train:
        _step(model, fin, seed + 1)
    if shared:
        share_weights_(model, shared)
        if train:
            _step(model, fin, seed + 2)
    return model.eval(), spec, fin, fout


def _assert_same(loaded, model, fin):
    assert not any(parametrize.is_parametrized(m) for m in loaded.modules())
    assert not loaded.training
    plain = [m for m in loaded.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]
    with torch.no_grad():
        for layer, m in zip(layers(model), plain, strict=True):
            assert torch.equal(m.weight, layer.effective_weight), layer.name
            if m.bias is not None:
                assert torch.equal(m.bias, layer.module.bias), layer.name
        x = torch.randn(33, fin, generator=torch.Generator().manual_seed(9))
        assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_is_exact_and_sizes_agree(arch, state, tmp_path):
    model, spec, fin, fout = _student(arch, state)
    data = E.export_bytes(model, spec, fin, fout)
    path = tmp_path / "s.rlt"
    written = E.save_artifact(model, path, spec, fin, fout)
    assert written == len(data) == E.packed_size(model, spec, fin, fout) == path.stat().st_size
    assert path.read_bytes() == data          # deterministic
    _assert_same(E.load_artifact(path), model, fin)
    _assert_same(E.load_artifact(data), model, fin)
    assert 0 < E.entropy_bits(model) <= 8 * len(data)


def test_untrained_states_round_trip():
    for arch in ARCHS:
        for state in ("pruned-4bit", "shared-3bit"):
            model, spec, fin, fout = _student(arch, state, seed=3, train=False)
            _assert_same(E.load_artifact(E.export_bytes(model, spec, fin, fout)), model, fin)


def test_mixed_bits_and_an_empty_layer_round_trip():
    spec, fin, fout = ARCHS["mlp"]
    torch.manual_seed(1)
    model = prepare_(build_model(spec, fin, fout))
    prune_(model, sparsity=0.5)
    set_bits_(model, [32, 3, 8])
    layers(model)[1].compressor.mask.zero_()          # a fully pruned layer
    layers(model)[2].compressor.mask[:3] = False      # some fully pruned output channels
    _step(model, fin, 5)
    model.eval()
    _assert_same(E.load_artifact(E.export_bytes(model, spec, fin, fout)), model, fin)


def test_inferred_features_and_scenario_style_spec():
    spec = {"arch": "mlp", "hidden": [48, 24], "channels": 25, "pretrain_epochs": 30}
    torch.manual_seed(0)
    model = prepare_(build_model(spec, 40, 10)).eval()
    prune_(model, sparsity=0.5)
    data = E.export_bytes(model, spec)
    assert data == E.export_bytes(model, spec, 40, 10)
    _assert_same(E.load_artifact(data), model, 40)


def test_spec_must_match_the_model():
    model, spec, fin, fout = _student("mlp", "pruned-4bit", train=False)
    with pytest.raises(RltuneError):
        E.export_bytes(model, {"arch": "mlp", "hidden": [48, 25]}, fin, fout)
    with pytest.raises(RltuneError):
        E.export_bytes(model, {"arch": "resnet"}, fin, fout)
    with pytest.raises(RltuneError):
        E.export_bytes(build_model(spec, fin, fout), spec, fin, fout)     # not prepared


def test_loading_leaves_the_global_rng_alone():
    model, spec, fin, fout = _student("cnn1d", "pruned-4bit", train=False)
    data = E.export_bytes(model, spec, fin, fout)
    state = torch.random.get_rng_state()
    E.load_artifact(data)
    E.export_bytes(model, spec, fin, fout)
    assert torch.equal(state, torch.random.get_rng_state())


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 6, 5, stride=2)
        self.bn = nn.BatchNorm1d(6)
        self.body = nn.Sequential(nn.Linear(6 * 18, 20, bias=False), nn.Tanh())
        self.head = nn.Linear(20, 4)
        self.gain = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("offset", torch.arange(4, dtype=torch.float32))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x[:, None, :]))).flatten(1)
        return self.head(self.body(h)) * self.gain + self.offset


def _custom_student():
    torch.manual_seed(2)
    model = prepare_(Custom())
    prune_(model, sparsity=0.6)
    set_bits_(model, [5, 32, 4])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(iter_params(model), lr=0.05)
    for _ in range(3):                       # train mode: BatchNorm's running stats move too
        x = torch.randn(16, 40, generator=g)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 4, (16,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    share_weights_(model)                    # the quantized layers at their own bit-widths
    return model.eval()


def test_custom_module_needs_its_skeleton(tmp_path):
    model = _custom_student()
    path = tmp_path / "c.rlt"
    assert E.save_artifact(model, path) == E.packed_size(model) == path.stat().st_size
    with pytest.raises(RltuneError, match="skeleton"):
        E.load_artifact(path)
    skeleton = Custom()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    loaded = E.load_artifact(path, skeleton=skeleton)
    _assert_same(loaded, model, 40)
    assert torch.equal(loaded.bn.running_var, model.bn.running_var)
    assert loaded.bn.num_batches_tracked.item() == 3
    assert all(torch.equal(v, skeleton.state_dict()[k]) for k, v in before.items())   # untouched
    # a prepared skeleton works too (its parametrizations are dropped from the copy)
    _assert_same(E.load_artifact(path, skeleton=prepare_(Custom())), model, 40)


def test_skeleton_of_another_architecture_is_refused():
    data = E.export_bytes(_custom_student())
    with pytest.raises(RltuneError, match="do not match"):
        E.load_artifact(data, skeleton=build_model({"arch": "mlp", "hidden": [20]}, 108, 4))
    other = Custom()
    other.extra = nn.BatchNorm1d(3)          # same layers, one more stored tensor expected
    with pytest.raises(RltuneError):
        E.load_artifact(data, skeleton=other)


def _recrc(body_and_header: bytes) -> bytes:
    return body_and_header + zlib.crc32(body_and_header).to_bytes(4, "big")


def test_bad_files_raise_one_line_errors(tmp_path):
    model, spec, fin, fout = _student("mlp", "shared-3bit")
    data = E.export_bytes(model, spec, fin, fout)
    bad = [b"", b"RLT", b"PK\x03\x04" + data[4:], b"RLT\x09" + data[4:], data + b"\x00",
           _recrc(data[:-4] + b"\x00"),                    # trailing byte under a valid checksum
           _recrc(data[:-4][:-3])]                         # truncated body, valid checksum
    bad += [data[:n] for n in (5, 9, len(data) // 2, len(data) - 1)]
    for i in range(0, len(data), max(1, len(data) // 40)):
        flipped = bytearray(data)
        flipped[i] ^= 0x10
        bad.append(bytes(flipped))
    for blob in bad:
        with pytest.raises(RltuneError) as info:
            E.load_artifact(blob)
        assert "\n" not in str(info.value)
    with pytest.raises(RltuneError, match="cannot read"):
        E.load_artifact(tmp_path / "missing.rlt")
    path = tmp_path / "t.rlt"
    path.write_bytes(data[:-7])
    with pytest.raises(RltuneError, match="t.rlt"):
        E.load_artifact(path)


def test_fuzzed_bodies_with_valid_checksums_never_crash():
    """Tampering that keeps the CRC valid: a clean error or some model, never another exception."""
    rng = np.random.default_rng(0)
    for arch, state in (("linear", "pruned-4bit"), ("cnn1d", "shared-5bit"), ("mlp", "pruned-float")):
        model, spec, fin, fout = _student(arch, state, train=False)
        data = E.export_bytes(model, spec, fin, fout)
        body = data[4:-4]
        for _ in range(60):
            b = bytearray(body)
            for i in rng.integers(0, len(b), size=rng.integers(1, 4)):
                b[i] ^= 1 << int(rng.integers(0, 8))
            try:
                out = E.load_artifact(_recrc(data[:4] + bytes(b)))
            except RltuneError as exc:
                assert "\n" not in str(exc)
            else:
                assert isinstance(out, nn.Module)


def test_size_shrinks_with_sparsity_and_bits():
    spec, fin, fout = {"arch": "mlp", "hidden": [100]}, 40, 10

    def size(sparsity, bits):
        torch.manual_seed(0)
        model = prepare_(build_model(spec, fin, fout))
        if sparsity:
            prune_(model, sparsity=sparsity)
        if bits != 32:
            set_bits_(model, bits)
        return E.packed_size(model, spec, fin, fout)

    by_sparsity = [size(s, 4) for s in (0.0, 0.5, 0.8, 0.95)]
    assert by_sparsity == sorted(by_sparsity, reverse=True) and len(set(by_sparsity)) == 4
    by_bits = [size(0.5, b) for b in (32, 8, 6, 4, 3, 2)]
    assert by_bits == sorted(by_bits, reverse=True) and len(set(by_bits)) == 6
    # a dense float model costs its float bytes plus a few bytes of header and checksum
    assert 0 < size(0.0, 32) - 4 * (40 * 100 + 100 + 100 * 10 + 10) <= 24


def test_tiny_students_reach_their_ratios():
    torch.manual_seed(0)
    linear = prepare_(build_model({"arch": "linear"}, 64, 10))
    prune_(linear, sparsity=0.9)
    set_bits_(linear, 4)
    _step(linear, 64, 0)
    assert float_bytes(linear) / E.packed_size(linear, {"arch": "linear"}, 64, 10) >= 15
    spec = {"arch": "mlp", "hidden": [300, 300]}
    mlp = prepare_(build_model(spec, 40, 10))
    prune_(mlp, sparsity=0.95)
    set_bits_(mlp, 4)
    share_weights_(mlp, 4)
    _step(mlp, 40, 0)
    assert float_bytes(mlp) / E.packed_size(mlp, spec, 40, 10) >= 40


@pytest.mark.parametrize("alphabet", [2, 3, 15, 255, 4096])
def test_symbol_streams_round_trip(alphabet):
    rng = np.random.default_rng(alphabet)
    for n, skew in ((1, 1.0), (7, 1.0), (500, 0.0), (3000, 2.5), (2000, 25.0)):
        p = np.exp(-skew * np.arange(alphabet) / alphabet)
        syms = rng.choice(alphabet, size=n, p=p / p.sum()).astype(np.int64)
        plan = E._plan(np.bincount(syms, minlength=alphabet), alphabet)
        wr = E._BitWriter()
        wr.uv(n)
        E._write_stream(wr, syms, alphabet, plan)
        wr.uint(5, 3)
        data = wr.getvalue()
        assert len(data) == -(-(E._uv_bits(n) + plan.bits + 3) // 8)     # the plan's cost is exact
        rd = E._BitReader(data)
        assert rd.uv() == n
        assert np.array_equal(E._read_stream(rd, n, alphabet), syms)
        assert rd.uint(3) == 5


def test_huffman_lengths_are_limited_and_prefix_free():
    hist = np.array([int(1.7 ** i) for i in range(40)])       # Fibonacci-like: a deep tree
    lengths = E._huffman_lengths(hist)
    assert lengths.max() <= E._MAX_HUFF_LEN
    assert sum(2.0 ** -int(l) for l in lengths) <= 1.0
