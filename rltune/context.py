"""The once-per-problem work: the teacher's logits, the train set, the float student.

``Context.build(problem)`` takes a :class:`rltune.problem.Problem` (a user's teacher, student and
data) or a scenario (which becomes a Problem first: its dataset loaded, its teacher loaded or
trained and cached on disk under a hash of everything that defines it, as safetensors + JSON),
computes the teacher's logits on every split and on the transfer set once, and keeps them in
memory: no stage ever runs the teacher. ``ctx.float_student(seed)`` returns the float32 KD student
every episode starts from (cached on disk under a hash of its problem's content and settings).
Progress goes to the ``rltune`` logger (the command line shows it on stderr).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from rltune.data import Dataset, cache_dir, stable_hash
from rltune.distill import Hint, TrainSet, predict, train_epochs
from rltune.metrics import accuracy
from rltune.models import build_model
from rltune.errors import RltuneError, RltuneWarning
from rltune.scenario import Scenario

if TYPE_CHECKING:
    from rltune.problem import Problem

CACHE_VERSION = 2
log = logging.getLogger("rltune")


def _save_model(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """Cache ``model`` at ``path`` with ``meta`` beside it (``.json``), each whole or not at all, the
    metadata first: a run that finds the weights also finds their metadata complete (a half-written
    ``.json`` read by a second run on the same cache made it train the teacher again)."""
    from rltune.errors import write_atomic

    write_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1).encode(), "cache entry")
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    # safetensors' save_model/load_model handle one tensor under two names (a module registered twice)
    save_model(model, str(tmp))
    os.replace(tmp, path)


def _load_model(model: nn.Module, path: Path) -> nn.Module:
    missing, unexpected = load_model(model, str(path), strict=True)
    return model.eval()


def train_teacher(scenario: Scenario, data: Dataset) -> tuple[nn.Module, dict[str, Any]]:
    """Train the teacher on the train split with labels, keeping the epoch with the best val accuracy."""
    spec = scenario.teacher
    g = torch.Generator().manual_seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec, data.input_shape, data.n_classes)
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
        if done == spec["epochs"] or (done // chunk) % 5 == 0:
            log.info("%s: teacher epoch %d/%d, val %.2f %%", scenario.name, done, spec["epochs"], 100 * acc)
    model.load_state_dict(best_state)
    return model.eval(), {"val_acc": best, "epochs": spec["epochs"]}


def teacher_key(scenario: Scenario, data: Dataset) -> str:
    """What defines a scenario's teacher: its labeled dataset and spec (the transfer set does not
    change it: it is trained on the labeled train split only)."""
    labeled = {k: v for k, v in scenario.dataset.items() if k != "transfer"}
    return stable_hash({"v": 1, "dataset": labeled, "teacher": scenario.teacher, "data": data.fingerprint})


def load_or_train_teacher(scenario: Scenario, data: Dataset) -> tuple[nn.Module, dict[str, Any], bool]:
    """A scenario's teacher from the disk cache, or trained (and cached). Returns (teacher, info, hit)."""
    key = teacher_key(scenario, data)
    path = cache_dir() / f"teacher_{key}.safetensors"
    teacher = build_model(scenario.teacher, data.input_shape, data.n_classes)
    hit = path.exists()
    if hit:
        try:
            _load_model(teacher, path)
            info = json.loads(path.with_suffix(".json").read_text())
        except Exception:  # a corrupt cache entry is retrained, never trusted
            hit = False
    if not hit:
        log.info("%s: training the teacher (%s, %d epochs; cached for later runs)", scenario.name,
                 scenario.teacher["arch"], scenario.teacher["epochs"])
        teacher, info = train_teacher(scenario, data)
        _save_model(teacher, path, info)
    return teacher.eval(), {**info, "cache_key": key}, hit


def resolve_training(scenario: Scenario, n_rows: int) -> Scenario:
    """The scenario with its training budget in whole numbers: the batch size picked from the data
    size where it is null, and step budgets turned into whole epochs."""
    from rltune.problem import auto_batch_size, epochs_for

    tr, st = dict(scenario.training), dict(scenario.student)
    if tr.get("batch_size") is None:
        tr["batch_size"] = auto_batch_size(n_rows)
    tr["epochs_per_stage"] = epochs_for(tr.get("steps_per_stage"), tr["epochs_per_stage"], n_rows, tr["batch_size"])
    if st.get("pretrain_steps") is not None:
        st["pretrain_epochs"] = epochs_for(st["pretrain_steps"], st["pretrain_epochs"], n_rows, tr["batch_size"])
    out = copy.copy(scenario)
    out.training, out.student = tr, st
    return out


@dataclass
class Context:
    """Everything an episode reads, built once per problem: data, teacher logits, the train set."""

    scenario: Scenario
    data: Dataset
    teacher: nn.Module
    logits: dict[str, torch.Tensor]
    train_set: TrainSet
    teacher_info: dict[str, Any] = field(default_factory=dict)
    teacher_cache_hit: bool = False
    problem: Any = None

    @classmethod
    def build(cls, source: "Problem | Scenario") -> "Context":
        """From a :class:`rltune.problem.Problem` (a user's modules and data) or a scenario (which
        becomes a Problem first: one code path for both)."""
        from rltune.problem import Problem

        torch.set_num_threads(1)
        problem = source if isinstance(source, Problem) else Problem.from_scenario(source)
        data = problem.data
        teacher = problem.teacher
        was_training = teacher.training
        logits = {}
        try:
            for split in ("train", "val", "test", "transfer"):
                logits[split] = predict(teacher, getattr(data, f"x_{split}"))  # no_grad, eval mode
        except Exception as e:
            if (problem.scenario.teacher or {}).get("arch") != "user":  # rltune's own teacher: its bug, keep it
                raise
            text = str(e).strip().splitlines()
            hint = (" (the transfer split is your transfer= inputs, or mixup of train's when none are given: "
                    "pass transfer= inputs your teacher takes)" if split == "transfer" else "")
            raise RltuneError(f"{problem.name}: the teacher failed on the {split} split: {type(e).__name__}: "
                              f"{text[0][:300] if text else ''}{hint}") from None
        finally:
            teacher.train(was_training)  # the user's module is left as it was given
        bad = [k for k, v in logits.items() if v.numel() and not torch.isfinite(v).all()]
        if bad:
            raise RltuneError(f"{problem.name}: the teacher returns NaN or infinite logits on the {bad[0]} split")
        scenario = resolve_training(problem.scenario, len(data.y_train) + len(data.x_transfer))
        feats = None
        if scenario.training["hint_weight"] > 0 and hasattr(teacher, "features"):
            with torch.no_grad():
                feats = torch.cat([teacher.features(data.x_train), teacher.features(data.x_transfer)])
        x = torch.cat([data.x_train, data.x_transfer])
        y = torch.cat([data.y_train, torch.full((len(data.x_transfer),), -1, dtype=torch.long)])
        train_set = TrainSet(x, y, torch.cat([logits["train"], logits["transfer"]]), feats)
        info = {**problem.teacher_info, "test_acc": accuracy(logits["test"], data.y_test),
                "val_acc": accuracy(logits["val"], data.y_val)}
        return cls(scenario, data, teacher, logits, train_set, info, problem.teacher_cache_hit, problem)

    @property
    def n_features(self) -> int:
        return self.data.n_features

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input's shape (no batch dimension): what metrics and exports feed the student."""
        return self.data.input_shape

    @property
    def n_classes(self) -> int:
        return self.data.n_classes

    @property
    def student_spec(self) -> dict[str, Any] | None:
        """The built-in architecture of the student (the artifact rebuilds it), None for a user's module."""
        return self.problem.student_spec

    @property
    def pretrain_lr(self) -> float:
        lr = self.scenario.student["lr"]
        return float(lr) if lr is not None else float(self.scenario.training["lr"])

    def new_student(self, seed: int) -> nn.Module:
        return self.problem.new_student(seed)

    def make_hint(self, student: nn.Module) -> Hint | None:
        if self.train_set.t_feats is None or not hasattr(student, "features"):
            return None
        with torch.no_grad():
            dim = student.features(self.data.x_train[:1]).shape[1]
        return Hint(dim, self.train_set.t_feats.shape[1])

    def float_student(self, seed: int = 0) -> nn.Module:
        """The float32 KD student episodes start from: ``student.pretrain_epochs`` of KD at the
        student's τ and α on train ∪ transfer (0: the student as given). Cached on disk per seed.
        Warns (:class:`RltuneWarning`) when it trails the teacher by more than 5 pt on val."""
        s = self.scenario
        key = stable_hash({"v": CACHE_VERSION, "problem": self.problem.cache_key(), "student": s.student,
                           "batch": s.training["batch_size"], "lr": self.pretrain_lr, "seed": seed,
                           "transfer": len(self.data.x_transfer)})
        path = cache_dir() / f"student_{key}.safetensors"
        model = self.new_student(seed)
        loaded = False
        if path.exists():
            try:
                _load_model(model, path)
                loaded = True
            except Exception:
                model = self.new_student(seed)
        if not loaded:
            g = torch.Generator().manual_seed(seed)
            if s.student["pretrain_epochs"] > 0:
                log.info("%s: distilling the float student (%d epochs, batch %d; cached for later runs)",
                         s.name, s.student["pretrain_epochs"], s.training["batch_size"])
                from rltune.stage import user_code

                with user_code(self, "the float student's distillation"):
                    train_epochs(model, self.train_set, s.student["pretrain_epochs"],
                                 temperature=s.student["temperature"], alpha=s.student["alpha"],
                                 lr=self.pretrain_lr, batch_size=s.training["batch_size"], generator=g)
        model.eval()
        acc = accuracy(predict(model, self.data.x_val), self.data.y_val)
        if not loaded:
            _save_model(model, path, {"val_acc": acc})
        gap = self.teacher_info["val_acc"] - acc
        y = self.data.y_val
        chance = float(torch.bincount(y).max()) / len(y) if len(y) else 0.0
        teacher = self.teacher_info["val_acc"]
        near_chance = teacher - chance > 0.2 and acc < chance + 0.25 * (teacher - chance)
        log.info("%s: float student val %.2f %% (teacher %.2f %%)", s.name, 100 * acc, 100 * self.teacher_info["val_acc"])
        if gap > 0.05 and seed not in self._warned:
            self._warned.add(seed)
            advice = (f"near chance ({100 * chance:.1f} %): too few optimizer steps (pretrain_epochs, pretrain_steps) "
                      f"or a learning rate too high ({self.pretrain_lr:g})" if near_chance and s.student["pretrain_epochs"]
                      else "a larger student, more pretrain_epochs/pretrain_steps or a transfer set may help")
            warnings.warn(RltuneWarning(
                f"{s.name}: the float student trails the teacher by {100 * gap:.1f} pt on val "
                f"({100 * acc:.1f} % vs {100 * self.teacher_info['val_acc']:.1f} %); {advice}"), stacklevel=2)
        return model

    @property
    def _warned(self) -> set:
        if "_warned_seeds" not in self.__dict__:
            self.__dict__["_warned_seeds"] = set()
        return self.__dict__["_warned_seeds"]
