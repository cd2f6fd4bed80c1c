import math

import pytest
import torch
import torch.nn.functional as F

from rltune.distill import TrainSet, kd_loss, train_epochs
from rltune.errors import DivergedError
from rltune.models import build_model


def test_kd_loss_matches_formula_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.2, 3.0, -1.0]])
    y = torch.tensor([1])
    tau, alpha = 2.0, 0.7
    ps = [math.exp(v / tau) for v in s[0].tolist()]
    pt = [math.exp(v / tau) for v in t[0].tolist()]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    e = [math.exp(v) for v in s[0].tolist()]
    ce = -math.log(e[1] / sum(e))
    expected = alpha * tau * tau * kl + (1 - alpha) * ce
    assert kd_loss(s, t, y, tau, alpha).item() == pytest.approx(expected, rel=1e-5)


def test_unlabeled_rows_drop_the_ce_term():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([-1, -1, -1, -1])
    kl = F.kl_div(F.log_softmax(s / 3, 1), F.log_softmax(t / 3, 1), reduction="none", log_target=True).sum(1)
    assert kd_loss(s, t, y, 3.0, 0.4).item() == pytest.approx((0.4 * 9 * kl).mean().item(), rel=1e-5)


def _data(n=200):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    t = torch.stack([-x[:, 0], x[:, 0]], 1) * 3
    return TrainSet(x, torch.where(torch.arange(n) < n // 2, y, torch.full_like(y, -1)), t)


def test_training_is_deterministic_for_a_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        m = build_model({"arch": "mlp", "hidden": [8]}, 8, 2)
        train_epochs(m, _data(), 3, generator=torch.Generator().manual_seed(5))
        outs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(outs[0], outs[1])


def test_kd_learns_from_transfer_set_and_hard_ignores_it():
    m = build_model({"arch": "linear"}, 8, 2)
    data = _data()
    train_epochs(m, data, 40, lr=0.05, generator=torch.Generator().manual_seed(0))
    acc = (m(data.x).argmax(1) == (data.x[:, 0] > 0).long()).float().mean()
    assert acc >= 0.9


def test_divergence_raises_clean_error():
    m = build_model({"arch": "linear"}, 8, 2)
    data = _data()
    data.x[3, 0] = float("nan")
    with pytest.raises(DivergedError, match="diverged"):
        train_epochs(m, data, 1, generator=torch.Generator().manual_seed(0))
