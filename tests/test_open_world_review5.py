"""Users' own modules and data the earlier reviews did not try (the open-world review, round 5):
recurrent and embedding students, tied weights outside the compressible layers, compiled and
scripted students, channels_last weights, buffers the artifact cannot carry, CSV labels.

Each test holds the contract: one RltuneError line for what rltune cannot do, before training;
otherwise an artifact that reloads predicting what the compressed student in memory predicts.
"""

import numpy as np
import pytest
import torch
from torch import nn

import rltune
from rltune.errors import RltuneError

from open_world import FAST, MLP, split, trained_teacher


@pytest.fixture(scope="module")
def data():
    return split()


@pytest.fixture(scope="module")
def teacher(data):
    return trained_teacher(data)


class TiedToEmbedding(nn.Module):
    """A Linear whose weight is an embedding's (a language model's tied head), over 12 features."""

    def __init__(self):
        super().__init__()
        self.e, self.h = nn.Embedding(24, 12), nn.Linear(12, 12)
        self.o = nn.Linear(12, 24, bias=False)
        self.o.weight = self.e.weight
        self.c = nn.Linear(24, 3)

    def forward(self, x):
        h = torch.tanh(self.h(x)) + self.e.weight.mean(0)
        return self.c(self.o(h))


class ParameterAlias(MLP):
    """A bare parameter of the parent that is a compressible layer's weight."""

    def __init__(self):
        super().__init__()
        self.w = self.b.weight

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + torch.nn.functional.linear(h, self.w)


class SharedBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.m, self.b = nn.Linear(12, 24), nn.Linear(24, 24), nn.Linear(24, 3)
        self.m.bias = self.a.bias

    def forward(self, x):
        return self.b(torch.relu(self.m(torch.relu(self.a(x)))))


@pytest.mark.parametrize("student, names", [(TiedToEmbedding, ("e.weight", "o.weight")),
                                            (ParameterAlias, ("'w'", "b.weight")),
                                            (SharedBias, ("a.bias", "m.bias"))])
def test_a_weight_tied_outside_the_compressible_layers_is_refused(data, teacher, student, names):
    """An embedding tied to a Linear head kept reading the float weight in training while the plain
    model and the artifact gave it the compressed one: the reported accuracy was another model's."""
    with pytest.raises(RltuneError, match="tied weights") as e:
        rltune.Problem(teacher, student(), *data, **FAST)
    assert all(n in str(e.value) for n in names) and "\n" not in str(e.value)
