"""Shared by the open-world review tests: a small user dataset, a teacher trained on it, and the
training budget that keeps such a problem to seconds."""

import numpy as np
import pytest
import torch
from torch import nn

FAST = dict(stages=2, epochs_per_stage=1, pretrain_epochs=1, transfer_size=100)


def blobs(n=260, d=12, c=3, seed=0):
    """``n`` rows of ``c`` Gaussian blobs in ``d`` dimensions (float32) and their labels."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)) * 3
    y = rng.integers(0, c, n)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def split():
    """(train, val) of :func:`blobs`: 200 and 60 rows."""
    x, y = blobs()
    return (x[:200], y[:200]), (x[200:], y[200:])


def trained_teacher(data) -> nn.Module:
    """A 12-32-3 MLP trained on ``data``'s train split (60 Adam steps), in eval mode."""
    torch.manual_seed(0)
    t = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(t.parameters(), 1e-2)
    x, y = torch.tensor(data[0][0]), torch.tensor(data[0][1])
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(t(x), y).backward()
        opt.step()
    return t.eval()


@pytest.fixture(scope="module")
def data():
    """The shared split, once per test module that imports this fixture."""
    return split()


@pytest.fixture(scope="module")
def teacher(data):
    """A teacher trained on :func:`data`, once per test module that imports this fixture."""
    return trained_teacher(data)


class MLP(nn.Module):
    """The plain student of the reviews: a 12-24-3 MLP."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 24), nn.Linear(24, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class TransformerStudent(nn.Module):
    """(N, 3, 4): a sequence of 3 steps of 4 features."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))
