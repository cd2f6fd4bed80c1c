"""A latency cost model: predict a student's measured latency from cheap features of the model.

As in prior work on hardware-aware compression, latency is regressed on model features with a
polynomial model whose degree is picked by cross-validation: ``StandardScaler ->
PolynomialFeatures(degree) -> Ridge`` in a scikit-learn ``Pipeline``, ``GridSearchCV`` over degree
1..3 with a shuffled ``KFold`` (fixed ``random_state``). R^2 is reported cross-validated (on the
training part) and on a held-out split; the stored model is then refitted on all samples at the
chosen degree. The fitted model is saved as JSON (coefficients, scaler, monomial powers), never pickle.

Note: :func:`rltune.metrics.measure_latency` times the *plain* (de-parametrized) float model, in
which pruned weights are stored as zeros in dense tensors and quantized weights as floats, so on
CPU PyTorch the latency is driven by the dense shapes; sparsity and bits only matter through the
features as far as the data shows.

Example usage::

    samples = collect_samples(60, batch_size=1, seed=0)
    cm = CostModel().fit(samples)
    cm.degree, cm.r2_cv, cm.r2_test
    cm.predict(student, in_features)          # seconds
    CostModel.from_json(cm.to_json())
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from rltune.compression import COMPRESSIBLE, VALID_BITS, prepare_, prune_, set_bits_
from rltune.errors import RltuneError
from rltune.metrics import measure_latency, profile
from rltune.models import MLP

FEATURES = ("nonzero_weights", "dense_weights", "mean_bits", "dense_macs", "nonzero_macs", "n_layers")
JSON_FORMAT = "rltune-costmodel-1"


def features(model: nn.Module, in_features: int) -> dict[str, float]:
    """The cost model's inputs: weight counts, mean bit-width (weighted by size), MACs, layer count."""
    prof = profile(model, in_features)
    dense = sum(p.weights for p in prof)
    return {
        "nonzero_weights": float(sum(p.nonzero_weights for p in prof)),
        "dense_weights": float(dense),
        "mean_bits": float(sum(p.bits * p.weights for p in prof) / max(dense, 1)),
        "dense_macs": float(sum(p.dense_macs for p in prof)),
        "nonzero_macs": float(sum(p.nonzero_macs for p in prof)),
        "n_layers": float(sum(1 for m in model.modules() if isinstance(m, COMPRESSIBLE))),
    }


def random_student(rng: np.random.Generator) -> tuple[nn.Module, int]:
    """A random prepared MLP student (in 8..128, 0-2 hidden layers of 8..512, out 2..10) with random
    layer-wise sparsity in [0, 0.95] and random per-layer bit-widths. Uses torch's global RNG for
    the weights (callers fork it)."""
    in_f = int(rng.integers(8, 129))
    hidden = [int(rng.integers(8, 513)) for _ in range(int(rng.integers(0, 3)))]
    out_f = int(rng.integers(2, 11))
    model = prepare_(MLP(in_f, out_f, hidden))
    sparsity = float(rng.choice([0.0, rng.uniform(0.0, 0.95)]))
    if sparsity > 0:
        prune_(model, sparsity=sparsity)
    set_bits_(model, [int(rng.choice(VALID_BITS)) for _ in range(len(hidden) + 1)])
    return model, in_f


def collect_samples(
    n: int, batch_size: int = 1, seed: int = 0, budget_s: float = 0.05
) -> list[tuple[dict[str, float], float]]:
    """``n`` random students (see :func:`random_student`) as ``(features, median latency in s)``.

    Each latency is :func:`rltune.metrics.measure_latency` at ``batch_size`` with a time budget of
    ``budget_s`` (at least 5 timed passes). Torch's global RNG is left untouched.
    """
    rng = np.random.default_rng(seed)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(n):
            model, in_f = random_student(rng)
            lat = measure_latency(model, in_f, batch_sizes=(batch_size,), budget_s=budget_s)
            out.append((features(model, in_f), lat[f"latency_b{batch_size}_s"]))
    return out


class CostModel:
    """Polynomial latency regressor; degree by cross-validation. Predicts seconds per forward pass."""

    def __init__(self, degrees: tuple[int, ...] = (1, 2, 3), alpha: float = 1e-3, folds: int = 5,
                 test_size: float = 0.25, random_state: int = 0):
        self.degrees = tuple(degrees)
        self.alpha = float(alpha)
        self.folds = int(folds)
        self.test_size = float(test_size)
        self.random_state = int(random_state)
        self.feature_names: list[str] = list(FEATURES)
        self.degree: int | None = None
        self.r2_cv: float | None = None
        self.r2_test: float | None = None
        self.n_samples = 0
        self.batch_size: int | None = None
        # the fitted model in plain arrays: x -> ((x - mean) / scale) -> monomials(powers) . coef + intercept
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.powers: np.ndarray | None = None
        self.coef: np.ndarray | None = None
        self.intercept: float = 0.0

    def _pipeline(self, degree: int = 1):
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import PolynomialFeatures, StandardScaler

        return Pipeline([
            ("scale", StandardScaler()),
            ("poly", PolynomialFeatures(degree=degree, include_bias=False)),
            ("reg", Ridge(alpha=self.alpha)),
        ])

    def fit(self, samples: list[tuple[dict[str, float], float]], batch_size: int | None = None) -> "CostModel":
        """Fit on ``(features, latency_s)`` pairs; sets ``degree``, ``r2_cv`` and ``r2_test``."""
        from sklearn.model_selection import GridSearchCV, KFold, train_test_split

        if len(samples) < 10:
            raise RltuneError(f"the cost model needs at least 10 samples, got {len(samples)}")
        X = np.array([[float(f[k]) for k in self.feature_names] for f, _ in samples], dtype=np.float64)
        y = np.array([float(t) for _, t in samples], dtype=np.float64)
        X_tr, X_te, y_tr, y_te = train_test_split(
            X, y, test_size=self.test_size, random_state=self.random_state)
        cv = KFold(n_splits=min(self.folds, len(y_tr)), shuffle=True, random_state=self.random_state)
        search = GridSearchCV(self._pipeline(), {"poly__degree": list(self.degrees)}, cv=cv, scoring="r2")
        search.fit(X_tr, y_tr)
        self.degree = int(search.best_params_["poly__degree"])
        self.r2_cv = float(search.best_score_)
        self.r2_test = float(search.best_estimator_.score(X_te, y_te))
        final = self._pipeline(self.degree).fit(X, y)
        scaler, poly, reg = final.named_steps["scale"], final.named_steps["poly"], final.named_steps["reg"]
        self.mean = np.asarray(scaler.mean_, dtype=np.float64)
        self.scale = np.asarray(scaler.scale_, dtype=np.float64)
        self.powers = np.asarray(poly.powers_, dtype=np.int64)
        self.coef = np.asarray(reg.coef_, dtype=np.float64).ravel()
        self.intercept = float(np.ravel(reg.intercept_)[0]) if np.ndim(reg.intercept_) else float(reg.intercept_)
        self.n_samples = len(y)
        self.batch_size = batch_size
        return self

    def predict_features(self, feats: dict[str, float] | list[dict[str, float]]) -> np.ndarray | float:
        """Predicted seconds (clipped at 0) for one feature dict or a list of them."""
        if self.coef is None:
            raise RltuneError("the cost model is not fitted")
        single = isinstance(feats, dict)
        rows = [feats] if single else list(feats)
        X = np.array([[float(f[k]) for k in self.feature_names] for f in rows], dtype=np.float64)
        Z = (X - self.mean) / self.scale
        mono = np.prod(Z[:, None, :] ** self.powers[None, :, :], axis=2)
        pred = np.maximum(mono @ self.coef + self.intercept, 0.0)
        return float(pred[0]) if single else pred

    def predict(self, model: nn.Module, in_features: int) -> float:
        """Predicted latency in seconds of ``model`` (prepared or not) at the fitted batch size."""
        return self.predict_features(features(model, in_features))

    def to_dict(self) -> dict[str, Any]:
        if self.coef is None:
            raise RltuneError("the cost model is not fitted")
        return {
            "format": JSON_FORMAT,
            "feature_names": list(self.feature_names),
            "degree": self.degree,
            "alpha": self.alpha,
            "r2_cv": self.r2_cv,
            "r2_test": self.r2_test,
            "n_samples": self.n_samples,
            "batch_size": self.batch_size,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "powers": self.powers.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        try:
            d = json.loads(text)
            if d.get("format") != JSON_FORMAT:
                raise RltuneError(f"not a cost model file (format {d.get('format')!r})")
            cm = cls(alpha=d["alpha"])
            cm.feature_names = [str(k) for k in d["feature_names"]]
            cm.degree = int(d["degree"])
            cm.r2_cv, cm.r2_test = d["r2_cv"], d["r2_test"]
            cm.n_samples = int(d["n_samples"])
            cm.batch_size = d["batch_size"]
            cm.mean = np.array(d["mean"], dtype=np.float64)
            cm.scale = np.array(d["scale"], dtype=np.float64)
            cm.powers = np.array(d["powers"], dtype=np.int64).reshape(-1, len(cm.feature_names))
            cm.coef = np.array(d["coef"], dtype=np.float64)
            cm.intercept = float(d["intercept"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RltuneError(f"malformed cost model JSON: {e}") from e
        if not (len(cm.mean) == len(cm.scale) == len(cm.feature_names) and len(cm.coef) == len(cm.powers)):
            raise RltuneError("malformed cost model JSON: array sizes disagree")
        return cm


def fit_default(n: int = 60, batch_size: int = 1, seed: int = 0) -> CostModel:
    """Collect ``n`` random students, fit a :class:`CostModel` and return it."""
    return CostModel().fit(collect_samples(n, batch_size=batch_size, seed=seed), batch_size=batch_size)


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    cm = fit_default()
    print(f"degree {cm.degree}  R2 cv {cm.r2_cv:.3f}  R2 test {cm.r2_test:.3f}  "
          f"({cm.n_samples} samples, {time.perf_counter() - t0:.1f} s)")
