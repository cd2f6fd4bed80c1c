"""Scenarios: one compression problem each, written as YAML in ``envs/`` and validated.

A scenario file::

    name: digits-mlp
    dataset:                 # where the data comes from (all offline)
      source: digits         # digits | breast_cancer | wine | iris | mnist | synthetic | mnist1d | file
      seed: 0
      val_fraction: 0.2      # fixed sets: stratified split fractions
      test_fraction: 0.2
      # generators (mnist1d, synthetic): n_train, n_val, n_test; synthetic: params for
      # sklearn.datasets.make_classification (n_features, n_classes, n_informative, ...)
      transfer: 0            # unlabeled transfer-set size for distillation (0: none)
      # file: path (.npz with x, y [, x_val, y_val, x_test, y_test, x_transfer] or .csv), relative
      # to this file; label: the CSV's label column (default "label"); standardize: true
    teacher:
      arch: mlp              # linear | mlp | cnn1d | cnn2d
      hidden: [256, 256]     # mlp widths (cnn2d: the widths after its convolutions)
      channels: 25           # cnn1d: channels; cnn2d: a list, one convolution each ([6, 16])
      kernel: 5              # cnn2d: kernel size
      epochs: 100
      lr: 0.001
      batch_size: 128
      weight_decay: 0.0
    student:
      arch: mlp
      hidden: [32]
      pretrain_epochs: 30    # float KD student every episode starts from (cached)
      pretrain_steps: null   # or at least this many optimizer steps (rounded up to whole epochs)
      lr: null               # its learning rate (null: training.lr)
    training:                # the budget of one episode
      stages: 8
      epochs_per_stage: 3
      steps_per_stage: null  # or at least this many optimizer steps a stage (rounded up to epochs)
      batch_size: null       # null: picked from the data size (see rltune.problem.auto_batch_size)
      lr: 0.001
      pruning_scope: global  # global | layer (magnitude threshold over all layers, or per layer)
      weight_sharing: false
      hint_weight: 0.0       # FitNets hint loss weight (MLP students)
    knobs:                   # ranges the tuners may choose from
      temperature: [1, 20]
      alpha: [0, 1]
      sparsity: [0, 0.98]
      bits: [2, 8]           # min and max bit-width; 32 (float) is always allowed
    reward:                  # the efficiency score's weights and budgets (see score.py)
      accuracy_floor: 0.01
      floor_penalty: 5.0
      w_size: 0.02
      w_latency: 0.0
      w_energy: 0.0
      max_bytes: null
      max_energy_pj: null

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
from rltune.errors import RltuneError

# the same names as rltune.data.SOURCES and rltune.models.ARCHS (tested); kept here so that checking
# a scenario file does not import torch
SOURCES = ("digits", "breast_cancer", "wine", "iris", "mnist", "file", "mnist1d", "synthetic")
ARCHS = ("linear", "mlp", "cnn1d", "cnn2d")

DEFAULTS: dict[str, Any] = {
    "dataset": {
        "seed": 0, "val_fraction": 0.2, "test_fraction": 0.2, "transfer": 0,
        "n_train": None, "n_val": None, "n_test": None, "params": {},
        "path": None, "label": "label", "standardize": True,
    },
    "teacher": {
        "arch": "mlp", "hidden": [256, 256], "channels": 25, "kernel": 5, "epochs": 100, "lr": 1e-3,
        "batch_size": 128, "weight_decay": 0.0, "seed": 0,
    },
    "student": {"arch": "mlp", "hidden": [32], "channels": 25, "kernel": 5, "pretrain_epochs": 30,
                "pretrain_steps": None, "temperature": 4.0, "alpha": 0.9, "lr": None},
    "training": {
        "stages": 8, "epochs_per_stage": 3, "steps_per_stage": None, "batch_size": None, "lr": 1e-3,
        "pruning_scope": "global", "weight_sharing": False, "hint_weight": 0.0,
    },
    "knobs": {"temperature": [1.0, 20.0], "alpha": [0.0, 1.0], "sparsity": [0.0, 0.98], "bits": [2, 8]},
    "reward": {
        "accuracy_floor": 0.01, "floor_penalty": 5.0, "w_size": 0.02, "w_latency": 0.0,
        "w_energy": 0.0, "max_bytes": None, "max_energy_pj": None,
    },
}


@dataclass
class Scenario:
    """A validated scenario. Sections are plain dicts with every default filled in."""

    name: str
    dataset: dict[str, Any]
    teacher: dict[str, Any]
    student: dict[str, Any]
    training: dict[str, Any]
    knobs: dict[str, Any]
    reward: dict[str, Any]
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(getattr(self, k))
                for k in ("name", "dataset", "teacher", "student", "training", "knobs", "reward")}

    def replace(self, **sections: dict[str, Any]) -> "Scenario":
        """A copy with some sections' fields overridden, validated again."""
        raw = self.to_dict()
        for key, value in sections.items():
            if isinstance(value, dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        return parse_scenario(raw, self.path or "<scenario>")


MAX_FILE_BYTES = 1 << 20     # a scenario file is a few hundred bytes; refuse megabytes unread
MAX_ROWS = 1_000_000         # samples of a generated split or transfer set
MAX_WIDTH = 16_384           # a hidden layer's width or a convolution's channels
MAX_LAYERS = 16
MAX_EPOCHS = 100_000         # teacher epochs; a stage and the float student get fewer
MAX_SEED = 2 ** 32 - 1
MAX_FEATURES = 10_000        # synthetic inputs


def _short(v: Any, n: int = 60) -> str:
    """A value's repr cut to ``n`` characters, so a crafted value cannot flood a message."""
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, fieldname: str, msg: str) -> None:
        raise RltuneError(f"{self.where}: {fieldname}: {msg}")

    def number(self, sec: dict, key: str, prefix: str, lo=None, hi=None, integer=False, nullable=False):
        v = sec[key]
        name = f"{prefix}.{key}"
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(name, f"expected a number, got {_short(v)}")
        if not math.isfinite(v):
            self.fail(name, f"expected a finite number, got {_short(v)}")
        if hi is not None and v > hi:
            self.fail(name, f"must be <= {hi}, got {_short(v, 30)}")
        if integer and (abs(v) > 2 ** 62 or int(v) != v):
            self.fail(name, f"expected a whole number, got {_short(v)}")
        if lo is not None and v < lo:
            self.fail(name, f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            self.fail(name, f"must be <= {hi}, got {v}")
        sec[key] = int(v) if integer else float(v)
        return sec[key]

    def widths(self, sec: dict, key: str, prefix: str):
        v = sec[key]
        if (not isinstance(v, list) or len(v) > MAX_LAYERS
                or any(isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= MAX_WIDTH for h in v)):
            self.fail(f"{prefix}.{key}", f"expected a list of at most {MAX_LAYERS} whole numbers in 1..{MAX_WIDTH}, "
                                         f"got {_short(v)}")

    def range_(self, sec: dict, key: str, prefix: str, lo: float, hi: float, integer=False):
        v = sec[key]
        name = f"{prefix}.{key}"
        if (not isinstance(v, list) or len(v) != 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in v)):
            self.fail(name, f"expected [min, max], got {_short(v)}")
        a, b = v
        if a > b:
            self.fail(name, f"min {a} is greater than max {b}")
        if a < lo or b > hi:
            self.fail(name, f"must lie within [{lo}, {hi}], got {v}")
        if integer and (int(a) != a or int(b) != b):
            self.fail(name, f"expected whole numbers, got {v}")
        sec[key] = [int(a), int(b)] if integer else [float(a), float(b)]


def parse_scenario(raw: Any, where: str = "<scenario>") -> Scenario:
    """Validate a scenario given as a dict; every problem is one ``RltuneError`` line."""
    c = _Checker(where)
    if not isinstance(raw, dict):
        c.fail("(top level)", f"expected a mapping of sections, got {type(raw).__name__}")
    allowed = {"name", *DEFAULTS}
    for key in raw:
        if key not in allowed:
            c.fail(str(key), f"unknown section (expected {', '.join(sorted(allowed))})")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        c.fail("name", "missing or not a string")
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        c.fail("name", f"{_short(name)} is not a usable name: it names output files, so letters, digits, "
                       "'.', '_', '+', '-' only, at most 100 characters")
    if not isinstance(raw.get("dataset"), dict) or "source" not in raw["dataset"]:
        c.fail("dataset.source", "missing")
    secs: dict[str, dict] = {}
    for sec_name, defaults in DEFAULTS.items():
        given = raw.get(sec_name, {}) or {}
        if not isinstance(given, dict):
            c.fail(sec_name, f"expected a mapping, got {_short(given)}")
        extra = set(given) - set(defaults) - ({"source"} if sec_name == "dataset" else set())
        if extra:
            c.fail(f"{sec_name}.{sorted(extra)[0]}", f"unknown field (expected one of {', '.join(sorted(defaults))})")
        secs[sec_name] = {**copy.deepcopy(defaults), **copy.deepcopy(given)}

    d = secs["dataset"]
    if d["source"] not in SOURCES:
        c.fail("dataset.source", f"unknown dataset {_short(d['source'])} (expected one of {', '.join(SOURCES)})")
    c.number(d, "seed", "dataset", lo=0, hi=MAX_SEED, integer=True)
    c.number(d, "transfer", "dataset", lo=0, hi=MAX_ROWS, integer=True)
    if d["source"] in ("mnist1d", "synthetic"):
        for k in ("n_train", "n_val", "n_test"):
            if d[k] is None:
                c.fail(f"dataset.{k}", f"required for the {d['source']} generator")
            c.number(d, k, "dataset", lo=10, hi=MAX_ROWS, integer=True)
        if d["source"] == "synthetic":
            if not isinstance(d["params"], dict):
                c.fail("dataset.params", "expected a mapping of make_classification arguments")
            ok = {"n_features", "n_informative", "n_redundant", "n_repeated", "n_classes",
                  "n_clusters_per_class", "class_sep", "flip_y", "weights", "hypercube", "shift", "scale"}
            for k in d["params"]:
                if k not in ok:
                    c.fail(f"dataset.params.{_short(k, 40)}", f"not a make_classification argument rltune accepts ({', '.join(sorted(ok))})")
            _check_classification(c, d)
    else:
        c.number(d, "val_fraction", "dataset", lo=0.0 if d["source"] == "file" else 0.05, hi=0.45)
        c.number(d, "test_fraction", "dataset", lo=0.0 if d["source"] == "file" else 0.05, hi=0.45)
    if d["source"] == "file":
        if not isinstance(d["path"], str) or not d["path"] or "\0" in d["path"]:
            c.fail("dataset.path", f"the file source needs a path to a .npz or .csv file, got {_short(d['path'])}")
        if not d["path"].lower().endswith((".npz", ".csv")):
            c.fail("dataset.path", f"expected a .npz or .csv file, got {_short(d['path'])}")
        base = Path(where).parent if where and not where.startswith("<") else Path(".")
        d["path"] = str((base / d["path"]).resolve()) if not Path(d["path"]).is_absolute() else d["path"]
        if not isinstance(d["label"], str) or not d["label"]:
            c.fail("dataset.label", f"expected the name of the CSV's label column, got {_short(d['label'])}")
    elif d["path"] is not None:
        c.fail("dataset.path", f"only the file source reads a path (source is {_short(d['source'])})")
    if not isinstance(d["standardize"], bool):
        c.fail("dataset.standardize", f"expected true or false, got {_short(d['standardize'])}")

    for role in ("teacher", "student"):
        s = secs[role]
        if s["arch"] not in ARCHS:
            c.fail(f"{role}.arch", f"unknown architecture {_short(s['arch'])} (expected one of {', '.join(ARCHS)})")
        c.widths(s, "hidden", role)
        if s["arch"] == "cnn2d":
            if "channels" not in (raw.get(role) or {}):
                s["channels"] = [6, 16]
            elif isinstance(s["channels"], int) and not isinstance(s["channels"], bool):
                s["channels"] = [s["channels"]]
            c.widths(s, "channels", role)
            if not 1 <= len(s["channels"]) <= 4:
                c.fail(f"{role}.channels", f"cnn2d takes 1 to 4 convolutions, got {len(s['channels'])}")
            c.number(s, "kernel", role, lo=1, hi=11, integer=True)
            if d["source"] not in ("mnist", "file"):
                c.fail(f"{role}.arch", f"cnn2d needs image inputs (source mnist or an image file), not {_short(d['source'])}")
        else:
            c.number(s, "channels", role, lo=1, hi=MAX_WIDTH, integer=True)
    t = secs["teacher"]
    c.number(t, "epochs", "teacher", lo=1, hi=MAX_EPOCHS, integer=True)
    c.number(t, "lr", "teacher", lo=1e-6, hi=1.0)
    c.number(t, "batch_size", "teacher", lo=1, hi=65_536, integer=True)
    c.number(t, "weight_decay", "teacher", lo=0.0, hi=10.0)
    c.number(t, "seed", "teacher", lo=0, hi=MAX_SEED, integer=True)
    s = secs["student"]
    c.number(s, "pretrain_epochs", "student", lo=0, hi=10_000, integer=True)
    c.number(s, "pretrain_steps", "student", lo=0, hi=10_000_000, integer=True, nullable=True)
    c.number(s, "temperature", "student", lo=0.1, hi=100)
    c.number(s, "alpha", "student", lo=0.0, hi=1.0)
    c.number(s, "lr", "student", lo=1e-6, hi=1.0, nullable=True)

    tr = secs["training"]
    c.number(tr, "stages", "training", lo=1, hi=100, integer=True)
    c.number(tr, "epochs_per_stage", "training", lo=1, hi=1_000, integer=True)
    c.number(tr, "steps_per_stage", "training", lo=1, hi=1_000_000, integer=True, nullable=True)
    c.number(tr, "batch_size", "training", lo=1, hi=65_536, integer=True, nullable=True)
    c.number(tr, "lr", "training", lo=1e-6, hi=1.0)
    c.number(tr, "hint_weight", "training", lo=0.0, hi=1e6)
    if tr["pruning_scope"] not in ("layer", "global"):
        c.fail("training.pruning_scope", f"expected 'layer' or 'global', got {_short(tr['pruning_scope'])}")
    if not isinstance(tr["weight_sharing"], bool):
        c.fail("training.weight_sharing", f"expected true or false, got {_short(tr['weight_sharing'])}")

    k = secs["knobs"]
    c.range_(k, "temperature", "knobs", 0.1, 100.0)
    c.range_(k, "alpha", "knobs", 0.0, 1.0)
    c.range_(k, "sparsity", "knobs", 0.0, 0.999)
    c.range_(k, "bits", "knobs", 2, 8, integer=True)

    r = secs["reward"]
    c.number(r, "accuracy_floor", "reward", lo=0.0, hi=1.0)
    c.number(r, "floor_penalty", "reward", lo=0.0, hi=1e6)
    for key in ("w_size", "w_latency", "w_energy"):
        c.number(r, key, "reward", lo=0.0, hi=1e6)
    c.number(r, "max_bytes", "reward", lo=1, hi=2 ** 50, nullable=True)
    c.number(r, "max_energy_pj", "reward", lo=0.0, hi=1e18, nullable=True)
    return Scenario(name=name, path=where, **secs)


def _check_classification(c: _Checker, d: dict) -> None:
    """make_classification's own constraints, checked now (it would fail later, mid-run)."""
    p = d["params"]
    for k in ("n_features", "n_informative", "n_redundant", "n_repeated", "n_classes", "n_clusters_per_class"):
        if k in p:
            c.number(p, k, "dataset.params", lo=0 if k in ("n_redundant", "n_repeated") else 1,
                     hi=MAX_FEATURES, integer=True)
    for k in ("class_sep", "flip_y", "shift", "scale"):
        if k in p:
            c.number(p, k, "dataset.params", lo=0.0 if k == "flip_y" else -1e6, hi=1.0 if k == "flip_y" else 1e6)
    if "hypercube" in p and not isinstance(p["hypercube"], bool):
        c.fail("dataset.params.hypercube", f"expected true or false, got {_short(p['hypercube'])}")
    if "weights" in p and p["weights"] is not None:
        w = p["weights"]
        if (not isinstance(w, list) or len(w) > MAX_FEATURES
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 for x in w)):
            c.fail("dataset.params.weights", f"expected a list of class shares, got {_short(w)}")
    # the rules sklearn.datasets.make_classification enforces (checked here without importing it)
    n_features, n_inf = p.get("n_features", 20), p.get("n_informative", 2)
    n_red, n_rep = p.get("n_redundant", 2), p.get("n_repeated", 0)
    n_classes, n_clusters = p.get("n_classes", 2), p.get("n_clusters_per_class", 2)
    if n_inf + n_red + n_rep > n_features:
        c.fail("dataset.params", f"make_classification refuses them: n_informative + n_redundant + n_repeated "
                                 f"({n_inf} + {n_red} + {n_rep}) must be at most n_features ({n_features})")
    if n_classes * n_clusters > 2 ** n_inf:
        c.fail("dataset.params", f"make_classification refuses them: n_classes ({n_classes}) × n_clusters_per_class "
                                 f"({n_clusters}) must be at most 2**n_informative ({2 ** n_inf})")
    if n_classes < 2 and "n_classes" in p:
        c.fail("dataset.params.n_classes", "a classifier needs at least 2 classes")
    w = p.get("weights")
    if w is not None and len(w) not in (n_classes, n_classes - 1):
        c.fail("dataset.params.weights", f"make_classification refuses them: {len(w)} weights for {n_classes} classes")


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without anchors and aliases: a few hundred bytes of nested aliases (a
    "billion laughs") would otherwise expand to gigabytes. A scenario never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases are not accepted (line {event.start_mark.line + 1})")
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise yaml.YAMLError(f"YAML anchors are not accepted (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


def safe_yaml(text: str, where: str) -> Any:
    """Parse YAML as data only (safe loader, no aliases); one-line RltuneError on any problem."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        why = "" if mark is not None else f": {' '.join(str(e).split())[:120]}"
        raise RltuneError(f"{where}: not valid YAML{at}{why}") from None
    except (RecursionError, ValueError, OverflowError) as e:
        raise RltuneError(f"{where}: not valid YAML ({type(e).__name__})") from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file (safe loader, no aliases, at most 1 MiB)."""
    from rltune.errors import check_regular_file

    path = Path(path)
    check_regular_file(path, "scenario file (YAML)")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise RltuneError(f"{path}: {path.stat().st_size} bytes is too large for a scenario file "
                              f"(at most {MAX_FILE_BYTES})")
        text = path.read_text()
    except OSError as e:
        raise RltuneError(f"{path}: cannot read scenario file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise RltuneError(f"{path}: not a text file (not UTF-8)") from None
    return parse_scenario(safe_yaml(text, str(path)), str(path))
