"""Datasets, all made offline: scikit-learn's bundled sets, seeded synthetic sets, MNIST-1D.

Every dataset has fixed, seeded train / val / test splits, standardised with the train split's
statistics, and optionally an unlabeled *transfer set* for distillation:

- generators (``mnist1d``, ``synthetic``) draw fresh inputs from the same distribution;
- fixed sets (``digits``, ``breast_cancer``, ``wine``, ``iris``) make them by mixup of two train
  inputs plus Gaussian noise (labels are not used: the teacher labels them).

MNIST-1D is generated with the ``mnist1d`` package's ``make_dataset`` (never its download path)
and cached on disk as ``.npz`` (no pickle). scikit-learn's ``make_classification`` draws its class
structure after the samples, so the labeled and unlabeled parts come from one call.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rltune.errors import RltuneError

FIXED_SOURCES = ("digits", "breast_cancer", "wine", "iris")
GENERATED_SOURCES = ("mnist1d", "synthetic")
SOURCES = FIXED_SOURCES + GENERATED_SOURCES


def cache_dir() -> Path:
    """Where datasets, teachers and teacher logits are cached (``$RLTUNE_CACHE``, else ``~/.cache/rltune``)."""
    path = Path(os.environ.get("RLTUNE_CACHE", Path.home() / ".cache" / "rltune"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Dataset:
    """Standardised float32 inputs and int64 labels; ``x_transfer`` is unlabeled (or empty)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_transfer: torch.Tensor

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_val.max(), self.y_test.max())) + 1


def _stratified_split(y: np.ndarray, fractions: tuple[float, float], rng: np.random.Generator):
    """Indices of train / val / test, stratified by class; ``fractions`` = (val, test)."""
    tr, va, te = [], [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(fractions[0] * len(idx)))
        n_test = int(round(fractions[1] * len(idx)))
        va.extend(idx[:n_val])
        te.extend(idx[n_val:n_val + n_test])
        tr.extend(idx[n_val + n_test:])
    return rng.permutation(tr), rng.permutation(va), rng.permutation(te)


def _mnist1d(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` MNIST-1D samples from the package's generator, without touching global RNG state."""
    path = cache_dir() / f"mnist1d_{n}_{seed}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            return f["x"], f["y"]
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = n
    args.train_split = 1.0
    args.seed = seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        ds = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x, y = ds["x"].astype(np.float32), ds["y"].astype(np.int64)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)
    return x, y


def _sklearn_fixed(source: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
    }[source]
    bunch = loader()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64)


def _mixup(x: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.1) -> np.ndarray:
    """Unlabeled inputs by mixup of random train pairs (λ ~ Beta(0.4, 0.4)) plus Gaussian noise."""
    i, j = rng.integers(0, len(x), n), rng.integers(0, len(x), n)
    lam = rng.beta(0.4, 0.4, size=(n, 1)).astype(np.float32)
    out = lam * x[i] + (1 - lam) * x[j]
    return out + noise * rng.standard_normal(out.shape).astype(np.float32)


def load_dataset(spec: dict[str, Any]) -> Dataset:
    """Build a dataset from a validated ``dataset:`` section of a scenario (see ``scenario.py``)."""
    source = spec["source"]
    seed = int(spec.get("seed", 0))
    n_transfer = int(spec.get("transfer", 0))
    rng = np.random.default_rng(seed)
    if source in FIXED_SOURCES:
        x, y = _sklearn_fixed(source)
        tr, va, te = _stratified_split(y, (spec.get("val_fraction", 0.2), spec.get("test_fraction", 0.2)), rng)
        x_u = None
    else:
        n_train, n_val, n_test = (int(spec[k]) for k in ("n_train", "n_val", "n_test"))
        n = n_train + n_val + n_test
        if source == "mnist1d":
            x, y = _mnist1d(n, seed)
            # another seed gives fresh inputs from the same templates: a transfer set
            x_u = _mnist1d(n_transfer, seed + 7919)[0] if n_transfer else None
        else:
            from sklearn.datasets import make_classification

            params = dict(spec.get("params", {}))
            xa, ya = make_classification(n_samples=n + n_transfer, random_state=seed, **params)
            x, y = xa[:n].astype(np.float32), ya[:n].astype(np.int64)
            x_u = xa[n:].astype(np.float32) if n_transfer else None
        idx = rng.permutation(n)
        tr, va, te = idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:]
    mean = x[tr].mean(axis=0)
    std = x[tr].std(axis=0)
    std[std < 1e-8] = 1.0
    z = (x - mean) / std
    if x_u is None and n_transfer:
        x_u = _mixup(z[tr], n_transfer, rng)
    elif x_u is not None:
        x_u = (x_u - mean) / std
    if x_u is None:
        x_u = np.zeros((0, x.shape[1]), dtype=np.float32)

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    ds = Dataset(
        name=source,
        x_train=t(z[tr].astype(np.float32)), y_train=t(y[tr]),
        x_val=t(z[va].astype(np.float32)), y_val=t(y[va]),
        x_test=t(z[te].astype(np.float32)), y_test=t(y[te]),
        x_transfer=t(x_u.astype(np.float32)),
    )
    if len(ds.y_val) == 0 or len(ds.y_test) == 0 or len(ds.y_train) == 0:
        raise RltuneError(f"dataset {source!r}: a split is empty; check its sizes or fractions")
    return ds
