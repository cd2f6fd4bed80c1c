import pytest
import torch

from rltune import compression as C
from rltune.errors import RltuneError
from rltune.models import build_model


def mlp(seed=0, hidden=(32,)):
    torch.manual_seed(seed)
    return C.prepare_(build_model({"arch": "mlp", "hidden": list(hidden)}, 64, 10))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.8, 0.95])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_reaches_target_sparsity(sparsity, scope):
    m = mlp()
    reached = C.prune_(m, sparsity=sparsity, scope=scope)
    assert abs(reached - sparsity) < 0.01
    if scope == "layer":
        for layer in C.layers(m):
            frac = float((layer.effective_weight == 0).float().mean())
            assert abs(frac - sparsity) < 1.0 / layer.weight.numel() + 1e-6


def test_masks_persist_and_only_grow():
    m = mlp()
    C.prune_(m, sparsity=0.5)
    before = [l.compressor.mask.clone() for l in C.layers(m)]
    with torch.no_grad():  # pruned weights regrowing in the latent weights must stay pruned
        for l in C.layers(m):
            l.weight.add_(10.0)
    C.prune_(m, sparsity=0.3)
    for l, b in zip(C.layers(m), before):
        assert torch.equal(l.compressor.mask, b)
        assert bool((l.effective_weight[~b] == 0).all())
    C.prune_(m, sparsity=0.7)
    for l, b in zip(C.layers(m), before):
        assert not bool((l.compressor.mask & ~b).any())


def test_prune_by_magnitude_threshold():
    m = mlp()
    C.prune_(m, threshold=0.05)
    for l in C.layers(m):
        w = l.weight.detach()
        assert torch.equal(l.compressor.mask, w.abs() > 0.05)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_quantization_at_most_2_pow_b_values_per_channel(bits):
    m = mlp()
    C.prune_(m, sparsity=0.5)
    C.set_bits_(m, bits)
    for l in C.layers(m):
        w = l.effective_weight.detach()
        for row in w:
            assert len(torch.unique(row)) <= 2 ** bits
        # pruned weights stay exactly zero
        assert bool((w[~l.compressor.mask] == 0).all())


def test_fake_quantize_formula_by_hand():
    w = torch.tensor([[0.5, -0.25, 0.1, 0.0]])
    # 4 bits: qmax 7; max|w| = 0.5; e = ceil(8 log2(0.5/7)); s = 2^(e/8)
    import math
    e = math.ceil(8 * math.log2(0.5 / 7))
    s = 2 ** (e / 8)
    expected = torch.tensor([[max(-7, min(7, round(v / s))) * s for v in (0.5, -0.25, 0.1, 0.0)]])
    out = C.fake_quantize(w, 4)
    assert torch.allclose(out, expected, atol=1e-7)
    assert s >= 0.5 / 7  # the scale covers the largest weight: nothing is clipped


def test_straight_through_gradient():
    w = torch.randn(4, 6, requires_grad=True)
    C.fake_quantize(w, 3).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_weight_sharing_codebook_size_and_training():
    m = mlp()
    C.prune_(m, sparsity=0.6)
    C.share_weights_(m, 3)
    for l in C.layers(m):
        assert l.compressor.codebook.numel() == 8
        nz = l.effective_weight[l.compressor.mask]
        assert len(torch.unique(nz)) <= 8
    # centroids receive the summed gradient of their weights
    x = torch.randn(16, 64)
    m(x).pow(2).sum().backward()
    assert all(l.compressor.codebook.grad is not None for l in C.layers(m))
    # re-clustering at more bits uses the latent weights, not the old codebook
    C.share_weights_(m, 5)
    assert max(len(torch.unique(l.effective_weight[l.compressor.mask])) for l in C.layers(m)) > 8


def test_float_bytes_ignores_parametrization_and_codebooks():
    m = build_model({"arch": "mlp", "hidden": [32]}, 64, 10)
    n = 4 * sum(p.numel() for p in m.parameters())
    C.prepare_(m)
    C.share_weights_(m, 4)
    assert C.float_bytes(m) == n


def test_bad_bits_and_sparsity_are_clear_errors():
    m = mlp()
    with pytest.raises(RltuneError, match="bit-width"):
        C.set_bits_(m, 9)
    with pytest.raises(RltuneError, match="sparsity"):
        C.prune_(m, sparsity=1.0)
    with pytest.raises(RltuneError, match="no nn.Linear"):
        C.prepare_(torch.nn.ReLU())


def test_prune_layers_gives_each_layer_its_own_sparsity():
    import torch
    from torch import nn

    from rltune import compression as C
    from rltune.errors import RltuneError
    from rltune.stage import Knobs

    torch.manual_seed(0)
    m = C.prepare_(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4)))
    C.prune_layers_(m, [0.5, 0.25])
    ls = C.layers(m)
    assert (~ls[0].compressor.mask).sum() == 100 and (~ls[1].compressor.mask).sum() == 20
    with pytest.raises(RltuneError):
        C.prune_layers_(m, [0.5])
    with pytest.raises(RltuneError):
        Knobs(4.0, 0.9, (0.5, 1.0), 4)
    with pytest.raises(RltuneError):
        Knobs(4.0, 0.9, 0.5, (4, 9))
    k = Knobs(4.0, 0.9, (0.0, 0.3), (8, 3))
    assert k.prunes and k.max_bits == 8 and not Knobs(4.0, 0.9, (0.0, 0.0), 4).prunes
