"""The once-per-scenario work: data, the teacher (trained once, cached), its logits, the float student.

``Context.build(scenario)`` loads the dataset, loads or trains the teacher (cached on disk under a
hash of everything that defines it, as safetensors + JSON), computes the teacher's logits on every
split and on the transfer set once, and keeps them in memory: no stage ever runs the teacher.
``ctx.float_student(seed)`` returns the float32 KD student every episode starts from (also cached).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rltune.data import Dataset, cache_dir, load_dataset, stable_hash
from rltune.distill import Hint, TrainSet, predict, train_epochs
from rltune.metrics import accuracy
from rltune.models import build_model
from rltune.scenario import Scenario

CACHE_VERSION = 1


def _save_model(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def _load_model(model: nn.Module, path: Path) -> nn.Module:
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def train_teacher(scenario: Scenario, data: Dataset) -> tuple[nn.Module, dict[str, Any]]:
    """Train the teacher on the train split with labels, keeping the epoch with the best val accuracy."""
    spec = scenario.teacher
    g = torch.Generator().manual_seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec, data.n_features, data.n_classes)
    ts = TrainSet(data.x_train, data.y_train, torch.zeros(len(data.y_train), data.n_classes))
    best, best_state, chunk = -1.0, None, max(1, spec["epochs"] // 20)
    done = 0
    while done < spec["epochs"]:
        step = min(chunk, spec["epochs"] - done)
        train_epochs(model, ts, step, lr=spec["lr"], batch_size=spec["batch_size"], generator=g,
                     targets="hard", weight_decay=spec["weight_decay"])
        done += step
        acc = accuracy(predict(model, data.x_val), data.y_val)
        if acc > best:
            best, best_state = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval(), {"val_acc": best, "epochs": spec["epochs"]}


@dataclass
class Context:
    scenario: Scenario
    data: Dataset
    teacher: nn.Module
    logits: dict[str, torch.Tensor]
    train_set: TrainSet
    teacher_info: dict[str, Any] = field(default_factory=dict)
    teacher_cache_hit: bool = False

    @classmethod
    def build(cls, scenario: Scenario) -> "Context":
        torch.set_num_threads(1)
        data = load_dataset(scenario.dataset)
        # the transfer set does not change the teacher (trained on labeled train only)
        labeled = {k: v for k, v in scenario.dataset.items() if k != "transfer"}
        key = stable_hash({"v": CACHE_VERSION, "dataset": labeled, "teacher": scenario.teacher})
        path = cache_dir() / f"teacher_{key}.safetensors"
        teacher = build_model(scenario.teacher, data.n_features, data.n_classes)
        hit = path.exists()
        if hit:
            try:
                _load_model(teacher, path)
                info = json.loads(path.with_suffix(".json").read_text())
            except Exception:  # a corrupt cache entry is retrained, never trusted
                hit = False
        if not hit:
            teacher, info = train_teacher(scenario, data)
            _save_model(teacher, path, info)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        logits = {split: predict(teacher, getattr(data, f"x_{split}"))
                  for split in ("train", "val", "test", "transfer")}
        feats = None
        if scenario.training["hint_weight"] > 0 and hasattr(teacher, "features"):
            with torch.no_grad():
                feats = torch.cat([teacher.features(data.x_train), teacher.features(data.x_transfer)])
        x = torch.cat([data.x_train, data.x_transfer])
        y = torch.cat([data.y_train, torch.full((len(data.x_transfer),), -1, dtype=torch.long)])
        train_set = TrainSet(x, y, torch.cat([logits["train"], logits["transfer"]]), feats)
        info = {**info, "test_acc": accuracy(logits["test"], data.y_test),
                "val_acc": accuracy(logits["val"], data.y_val), "cache_key": key}
        return cls(scenario, data, teacher, logits, train_set, info, hit)

    @property
    def n_features(self) -> int:
        return self.data.n_features

    @property
    def n_classes(self) -> int:
        return self.data.n_classes

    @property
    def pretrain_lr(self) -> float:
        lr = self.scenario.student["lr"]
        return float(lr) if lr is not None else float(self.scenario.training["lr"])

    def new_student(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(self.scenario.student, self.n_features, self.n_classes)

    def make_hint(self, student: nn.Module) -> Hint | None:
        if self.train_set.t_feats is None or not hasattr(student, "features"):
            return None
        with torch.no_grad():
            dim = student.features(self.data.x_train[:1]).shape[1]
        return Hint(dim, self.train_set.t_feats.shape[1])

    def float_student(self, seed: int = 0) -> nn.Module:
        """The float32 KD student episodes start from: ``student.pretrain_epochs`` of KD at the
        student's τ and α on train ∪ transfer. Cached on disk per seed."""
        s = self.scenario
        key = stable_hash({"v": CACHE_VERSION, "dataset": s.dataset, "teacher": s.teacher,
                           "student": s.student, "batch": s.training["batch_size"],
                           "lr": self.pretrain_lr, "seed": seed})
        path = cache_dir() / f"student_{key}.safetensors"
        model = self.new_student(seed)
        if path.exists():
            try:
                return _load_model(model, path)
            except Exception:
                pass
        g = torch.Generator().manual_seed(seed)
        if s.student["pretrain_epochs"] > 0:
            train_epochs(model, self.train_set, s.student["pretrain_epochs"],
                         temperature=s.student["temperature"], alpha=s.student["alpha"],
                         lr=self.pretrain_lr, batch_size=s.training["batch_size"], generator=g)
        _save_model(model, path, {"val_acc": accuracy(predict(model, self.data.x_val), self.data.y_val)})
        return model.eval()
