"""Built-in teacher and student architectures.

Every built-in model is described by a small JSON-able *spec* (``{"arch": "mlp", ...}``) so that
a packed artifact can rebuild it without pickle. A user's own ``nn.Module`` works everywhere a
built-in does (the compression ops only look for ``nn.Linear`` / ``nn.Conv1d`` layers); it just
cannot be rebuilt from an artifact without the user handing the skeleton back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rltune.errors import RltuneError

ARCHS = ("linear", "mlp", "cnn1d")


class MLP(nn.Module):
    """Fully connected ReLU network ``in -> hidden[0] -> ... -> out``; ``hidden=[]`` is logistic regression."""

    def __init__(self, in_features: int, out_features: int, hidden: list[int] | tuple[int, ...] = ()):
        super().__init__()
        widths = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.hidden = list(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of the last hidden layer (for hint losses); the input if there is none."""
        h = x.flatten(1)
        for layer in list(self.net)[:-1]:
            h = layer(h)
        return h


class CNN1D(nn.Module):
    """The MNIST-1D paper's 1-D CNN: three stride-2 convolutions and a linear read-out.

    With 40 inputs and 25 channels it has 5.2k parameters (92 % test on MNIST-1D in REFERENCE.md).
    """

    def __init__(self, in_features: int, out_features: int, channels: int = 25):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        length = in_features
        for k, s, p in ((5, 2, 1), (3, 2, 1), (3, 2, 1)):
            length = (length + 2 * p - k) // s + 1
        if length < 1:
            raise RltuneError(f"cnn1d needs at least 8 input features, got {in_features}")
        self.head = nn.Linear(channels * length, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.reshape(x.shape[0], 1, -1)).flatten(1)


def build_model(spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
    """Build a model from its spec: ``{"arch": "linear"}``, ``{"arch": "mlp", "hidden": [32]}``,
    ``{"arch": "cnn1d", "channels": 25}``."""
    arch = spec.get("arch")
    if arch == "linear":
        return MLP(in_features, out_features, [])
    if arch == "mlp":
        return MLP(in_features, out_features, [int(h) for h in spec.get("hidden", [])])
    if arch == "cnn1d":
        return CNN1D(in_features, out_features, int(spec.get("channels", 25)))
    raise RltuneError(f"unknown architecture {arch!r} (expected one of {', '.join(ARCHS)})")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
