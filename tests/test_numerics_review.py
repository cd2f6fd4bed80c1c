"""Numerics and scale (the numerics review): weights the one-byte scale exponent cannot follow,
reported figures against the artifact on disk, diverging and collapsing runs, large students and
concurrent runs.

The contract: a result is either right, or says in one line (RltuneError, or a RltuneWarning for
a result that is legal but likely wrong) what went wrong and what to do; never silently wrong.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import rltune
from rltune.compression import prepare_, scale_range_problems, set_bits_
from rltune.errors import RltuneWarning

from open_world import FAST, MLP, data, teacher  # noqa: F401 (data, teacher: fixtures)


class Rescaled(nn.Module):
    """``module`` on inputs multiplied by ``k`` (a teacher trained on standardised features, given raw ones)."""

    def __init__(self, module, k):
        super().__init__()
        self.m, self.k = module, k

    def forward(self, x):
        return self.m(x / self.k)


def test_scale_range_flags_only_weights_out_of_the_exponent_range():
    def problems(k, bits):
        torch.manual_seed(0)
        m = prepare_(nn.Sequential(nn.Linear(64, 8)))
        with torch.no_grad():
            m[0].parametrizations.weight.original.mul_(8 * k)
            m[0].parametrizations.bias.original.mul_(8 * k)
        set_bits_(m, bits)
        return scale_range_problems(m)

    for k, bits in ((1, 2), (1, 8), (1e-3, 8), (1e5, 2), (1e5, 8), (1e6, 8)):
        assert problems(k, bits) == [], (k, bits)
    assert "too small" in problems(1e-5, 8)[0] and "standardise the inputs" in problems(1e-5, 8)[0]
    assert "too large" in problems(1e6, 2)[0]
    # one nearly dead channel (weights ~1e-4) among live ones rounds off harmlessly: nothing to say
    torch.manual_seed(0)
    m = prepare_(nn.Sequential(nn.Linear(64, 8)))
    with torch.no_grad():
        m[0].parametrizations.weight.original[3].mul_(1e-3)
    set_bits_(m, 8)
    assert scale_range_problems(m) == []
    # an all-zero layer, a one-channel layer, equal weights: nothing to say
    m = prepare_(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1)))
    with torch.no_grad():
        m[0].parametrizations.weight.original.zero_()
        m[1].parametrizations.weight.original.fill_(0.3)
    set_bits_(m, 2)
    assert scale_range_problems(m) == [] and bool((m[1].weight == m[1].weight[0, 0]).all())



def test_weight_sharing_of_weights_past_float16_is_one_line():
    """Weight sharing stores centroids in float16: weights of 1e5 became inf, and the run ended as
    'training diverged: loss became nan'."""
    from rltune.compression import share_weights_
    from rltune.errors import RltuneError

    torch.manual_seed(0)
    m = prepare_(nn.Sequential(nn.Linear(8, 4)))
    with torch.no_grad():
        m[0].parametrizations.weight.original.mul_(1e6)
    with pytest.raises(RltuneError, match=r"layer '0': weight sharing stores its centroids in float16"):
        share_weights_(m, 4)


def test_weights_under_the_smallest_scale_are_a_warning_naming_the_layer(data, teacher):
    """A student trained on raw features of ~1e4 (first-layer weights ~1e-5): at 8 bits its weights
    are a few steps of the smallest scale 2^-16; the result said nothing."""
    k = 1e4
    (x, y), (xv, yv) = data
    student = MLP()
    with torch.no_grad():
        student.a.weight.mul_(1 / k)
    p = rltune.Problem(Rescaled(teacher, k), student, train=(x * k, y), val=(xv * k, yv), name="raw",
                       **{**FAST, "pretrain_epochs": 0}, lr=1e-6)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rltune.compress(p, target="4x", tuner="recipe", seed=0)
    lines = [str(m.message) for m in w if issubclass(m.category, RltuneWarning) and "smallest scale" in str(m.message)]
    assert len(lines) == 1 and "layer 'a'" in lines[0] and "standardise the inputs" in lines[0], lines


class TinyCNN(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, stride=4), nn.Linear(4, c)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_default_transfer_set_of_large_images_is_bounded():
    """The default mixup transfer set was 10 x train rows (2,000..20,000) whatever a row weighs:
    20,000 images of 3x64x64 were 1 GB (4 GB at the peak of making them), of 3x224x224 12 GB."""
    from rltune.data import mixup
    from rltune.problem import TRANSFER_BYTES

    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3, 128, 128)).astype(np.float32)
    y = np.arange(24) % 3
    torch.manual_seed(0)
    p = rltune.Problem(TinyCNN(), TinyCNN(), train=(x, y), val=(x[:6], y[:6]), **FAST)
    assert 0 < p.data.x_transfer.numel() * 4 <= TRANSFER_BYTES
    # made in chunks, the same numbers as in one piece
    small = rng.normal(size=(50, 3, 64, 64)).astype(np.float32)   # 1,000 rows: 49 MB, 3 chunks
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    i, j = r1.integers(0, 50, 1000), r1.integers(0, 50, 1000)
    lam = r1.beta(0.4, 0.4, size=(1000, 1, 1, 1)).astype(np.float32)
    ref = lam * small[i] + (1 - lam) * small[j]
    ref = ref + 0.1 * 2.0 * r1.standard_normal(ref.shape).astype(np.float32)
    assert np.array_equal(mixup(small, 1000, r2, scale=2.0), ref)


def test_two_runs_into_one_output_folder_write_their_files_one_after_the_other(data, teacher, tmp_path):
    """Two `rltune compress` into one --out at once: NAME.rlt of one run could sit beside NAME.json
    and NAME.md of the other (the report measures latencies between the two writes)."""
    import fcntl
    import os
    import threading

    from rltune.pipeline import write_outputs

    p = rltune.Problem(teacher, MLP(), train=data[0], val=data[1], name="both", **FAST)
    r = rltune.compress(p, target="4x", tuner="recipe", seed=0)
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run is writing its files
    t = threading.Thread(target=write_outputs, args=(r, out, {"method": "recipe"}))
    t.start()
    t.join(1.0)
    assert t.is_alive() and not (out / "both.rlt").exists()
    os.close(fd)
    t.join(60)
    assert not t.is_alive() and (out / "both.rlt").exists() and (out / "both.json").exists()
    assert sorted(f.name for f in out.iterdir()) == ["both.json", "both.md", "both.rlt"]


class NormFirst(MLP):
    """Standardises its own inputs (BatchNorm first): large raw features are fine."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(12)

    def forward(self, x):
        return super().forward(self.bn(x))


def test_raw_features_of_order_1e4_are_a_warning_naming_the_layer_before_training(data, teacher):
    """Raw features of ~1e4 with the default lr: the compressed student fell to 18 % from a float
    95 % (digits x 1e5, 16x) with nothing said: Adam's steps of 5e-3 dwarf first-layer weights of
    ~1e-5, and global pruning took the layer."""
    k = 1e4
    (x, y), (xv, yv) = data

    def warned(student, scale):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            p = rltune.Problem(Rescaled(teacher, scale), student, train=(x * scale, y), val=(xv * scale, yv),
                               name="raw", **FAST)
        assert p.name == "raw"
        return [str(m.message) for m in w if issubclass(m.category, RltuneWarning) and "standardise" in str(m.message)]

    lines = warned(MLP(), k)
    assert len(lines) == 1 and lines[0].startswith("student layer 'a'") and "inputs of order" in lines[0], lines
    assert warned(MLP(), 50.0) == []           # features of ~200, as pixels 0..255, are fine
    assert warned(NormFirst(), k) == []        # a student that normalises its own inputs
    assert warned(MLP(), 1.0) == []


def test_val_of_one_class_is_a_warning(data, teacher):
    """Val labels all one class: every choice reads val, and a constant student scores 100 % there;
    the run went through with nothing said."""
    (x, y), (xv, yv) = data
    keep = yv == 1
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rltune.Problem(teacher, MLP(), train=(x, y), val=(xv[keep], yv[keep]), **FAST)
    lines = [str(m.message) for m in w if issubclass(m.category, RltuneWarning)]
    assert len(lines) == 1 and "val holds only class 1" in lines[0], lines


class Clamped(nn.Module):
    """A teacher that clamps its inputs (robust to outlier rows)."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x):
        return self.m(x.clamp(-10, 10))


def test_a_few_outlier_rows_do_not_turn_the_mixup_transfer_set_into_noise(data, teacher):
    """Five train rows of 1e30 among 200: the mixup noise, scaled by each feature's std, made every
    transfer row noise of ~1e28 and the float student trailed its teacher by 18 pt."""
    from rltune.problem import mixup_spread

    (x, y), (xv, yv) = data
    x2 = x.copy()
    x2[50:55] = 1e30
    p = rltune.Problem(Clamped(teacher), MLP(), train=(x2, y), val=(xv, yv), **FAST)
    assert float(p.data.x_transfer.abs().median()) < 10 * float(np.median(np.abs(x)))
    xt = torch.tensor(x)  # clean data: the std, as before
    assert np.array_equal(mixup_spread(xt), xt.std(dim=0).numpy())


def test_training_that_overflows_on_huge_inputs_says_so(data, teacher):
    """Train rows of 3e38 (within float32): the run ended as 'training diverged: loss became inf'."""
    (x, y), (xv, yv) = data
    x2 = x.copy()
    x2[50:55] = 3e38
    p = rltune.Problem(Clamped(teacher), MLP(), train=(x2, y), val=(xv, yv), **FAST)
    with pytest.raises(rltune.RltuneError, match=r"diverged.*inputs reaching 3e\+38: standardise the inputs"):
        rltune.compress(p, target="8x", tuner="recipe", seed=0)
