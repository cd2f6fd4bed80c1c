"""Built-in teacher and student architectures.

Every built-in model is described by a small JSON-able *spec* (``{"arch": "mlp", ...}``) so that
a packed artifact can rebuild it without pickle. A user's own ``nn.Module`` works everywhere a
built-in does (the compression ops only look for ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``
layers); it just cannot be rebuilt from an artifact without the user handing the skeleton back.

``in_features`` is a feature count or one input's shape without the batch dimension (``(1, 28, 28)``
for an image); ``mlp``, ``linear`` and ``cnn1d`` flatten their input, ``cnn2d`` needs ``(C, H, W)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rltune.errors import RltuneError

ARCHS = ("linear", "mlp", "cnn1d", "cnn2d")


def _numel(in_features) -> int:
    if isinstance(in_features, (tuple, list, torch.Size)):
        n = 1
        for d in in_features:
            n *= int(d)
        return n
    return int(in_features)


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


class CNN2D(nn.Module):
    """A LeNet-5-like 2-D CNN: per entry of ``channels`` a ``kernel``×``kernel`` convolution ("same"
    padding), ReLU and 2×2 max-pooling; then a ReLU MLP with ``hidden`` widths and a linear read-out.

    ``channels=[6, 16], hidden=[120, 84], kernel=5`` on 1×28×28 inputs is LeNet-5 with same padding.
    """

    def __init__(self, in_shape: tuple[int, int, int], out_features: int, channels=(6, 16), hidden=(120, 84),
                 kernel: int = 5):
        super().__init__()
        if len(in_shape) != 3:
            raise RltuneError(f"cnn2d needs image inputs of shape (channels, height, width), got {tuple(in_shape)}")
        c, h, w = (int(d) for d in in_shape)
        convs: list[nn.Module] = []
        for ch in channels:
            convs += [nn.Conv2d(c, int(ch), kernel, padding=kernel // 2), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = int(ch), h // 2, w // 2
        if h < 1 or w < 1:
            raise RltuneError(f"cnn2d: {len(channels)} poolings do not fit an input of {tuple(in_shape)}")
        self.conv = nn.Sequential(*convs)
        self.head = MLP(c * h * w, out_features, list(hidden))
        self.in_shape = (int(in_shape[0]), int(in_shape[1]), int(in_shape[2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x.reshape(x.shape[0], *self.in_shape)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.features(self.conv(x.reshape(x.shape[0], *self.in_shape)))


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


def build_model(spec: dict[str, Any], in_features, out_features: int) -> nn.Module:
    """Build a model from its spec: ``{"arch": "linear"}``, ``{"arch": "mlp", "hidden": [32]}``,
    ``{"arch": "cnn1d", "channels": 25}``, ``{"arch": "cnn2d", "channels": [6, 16], "hidden": [120, 84],
    "kernel": 5}``. ``in_features``: a feature count or one input's shape."""
    arch = spec.get("arch")
    if arch == "linear":
        return MLP(_numel(in_features), out_features, [])
    if arch == "mlp":
        return MLP(_numel(in_features), out_features, [int(h) for h in spec.get("hidden", [])])
    if arch == "cnn1d":
        return CNN1D(_numel(in_features), out_features, int(spec.get("channels", 25)))
    if arch == "cnn2d":
        shape = tuple(in_features) if isinstance(in_features, (tuple, list, torch.Size)) else (in_features,)
        ch = spec.get("channels", [6, 16])
        return CNN2D(shape, out_features, [int(c) for c in (ch if isinstance(ch, (list, tuple)) else [ch])],
                     [int(h) for h in spec.get("hidden", [])], int(spec.get("kernel", 5)))
    raise RltuneError(f"unknown architecture {arch!r} (expected one of {', '.join(ARCHS)})")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
