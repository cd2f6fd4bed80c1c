"""A compression problem: the user's trained teacher, a student module and data; or a scenario.

``Problem`` is how a user brings a *new model* to rltune, and what a YAML scenario becomes once
loaded (:meth:`Problem.from_scenario`): one code path serves both. Like a scikit-learn estimator's
``check_X_y``, the constructor checks everything it can before any training and raises
:class:`rltune.errors.RltuneError` with one line naming the argument.

Example usage::

    import rltune
    p = rltune.Problem(teacher, student, train=(x, y), val=(x_val, y_val), test=(x_test, y_test),
                       name="my-model", stages=8, epochs_per_stage=3)
    r = rltune.compress(p, target="16x")
    r.model, r.report["test_acc"], r.save("m.rlt")

Arguments:

- ``teacher``: the user's trained ``nn.Module``. rltune never trains it; it computes its logits once.
- ``student``: any ``nn.Module`` with at least one ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``
  (those are compressed; every other parameter stays float32 and is counted in the bytes).
  Untrained or trained: rltune first distils a float student from it for ``pretrain_epochs``
  (``0`` skips that and starts from the student as given).
- ``train``, ``val``, ``test``: ``(x, y)`` pairs of NumPy arrays or tensors (a ``scipy.sparse``
  matrix or a sparse tensor is made dense); ``x`` one row per
  sample of any shape the models take, ``y`` class numbers ``0..C-1``. ``test`` is optional (then
  the report has no test figures). Rewards and every tuner's choices read ``val``; ``test`` is read
  once, for the final report. The data is used as given (no standardisation).
- ``transfer``: unlabeled inputs for distillation (optional). When absent, ``transfer_size``
  inputs are made by mixup of train pairs plus a little noise (default ``10 × n_train``, clamped to
  2,000..20,000 and to 256 MB of inputs: 5,461 images of 3×64×64).
- Training budget: ``stages`` per episode, and per stage ``epochs_per_stage`` epochs or at least
  ``steps_per_stage`` optimizer steps (rounded up to whole epochs); ``batch_size`` (default: from
  the data size, :func:`auto_batch_size`, so a small set still gets many steps), ``lr``.
  ``pretrain_epochs`` / ``pretrain_steps`` likewise for the float student.
- ``knobs``: the tuners' ranges (``{"bits": [2, 8], "sparsity": [0, 0.98], ...}``, see
  ``rltune.scenario``); ``pruning_scope``: ``"global"`` or ``"layer"``.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rltune.compression import COMPRESSIBLE, check_plain_weights, check_python_module, check_untied
from rltune.context import CACHE_VERSION, load_or_train_teacher
from rltune.data import Dataset, cache_dir, check_label_coverage, mixup, load_dataset, stable_hash
from rltune.distill import has_batchnorm
from rltune.errors import RltuneError
from rltune.scenario import NAME_RE, Scenario, parse_scenario

log = logging.getLogger("rltune")


def check_name(name: Any, where: str = "name") -> str:
    """A problem's name becomes a file name: letters, digits and ``._+-`` only, at most 100."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise RltuneError(f"{where}: {name!r} is not a usable name (letters, digits, '.', '_', '+', '-'; "
                          "at most 100 characters; no path separators)")
    return name


def auto_batch_size(n_rows: int) -> int:
    """The default batch size for ``n_rows`` training rows (train and transfer): about 32 steps an
    epoch for small sets, 256 for large ones: ``clamp(2**floor(log2(n / 32)), 16, 256)``."""
    if n_rows < 64:
        return 16
    return int(min(256, max(16, 2 ** math.floor(math.log2(n_rows / 32)))))


def epochs_for(steps: int | None, epochs: int, n_rows: int, batch_size: int) -> int:
    """Whole epochs for a budget of ``steps`` optimizer steps (``epochs`` when steps is None)."""
    if steps is None:
        return int(epochs)
    per_epoch = max(1, math.ceil(n_rows / batch_size))
    return max(1, math.ceil(steps / per_epoch))


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.layout != torch.strided:  # a sparse COO / CSR tensor: rltune trains on dense rows
            try:
                t = t.to_dense()
            except Exception as e:
                raise RltuneError(f"{what}: a {t.layout} tensor that cannot be made dense ({_first_line(e)})") from None
    elif callable(getattr(value, "toarray", None)) and type(value).__module__.startswith("scipy.sparse"):
        try:  # a scipy.sparse matrix (bag-of-words, one-hot): as dense rows
            t = torch.from_numpy(np.ascontiguousarray(value.toarray()))
        except Exception as e:
            raise RltuneError(f"{what}: a scipy.sparse matrix that cannot be made dense ({_first_line(e)})") from None
        return _as_tensor(t, what)
    else:
        try:
            arr = np.asarray(value)
        except Exception as e:  # ragged lists and the like
            raise RltuneError(f"{what}: cannot be read as an array ({type(e).__name__})") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise RltuneError(f"{what}: expected numbers, got an array of {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    return t


def _inputs(value: Any, what: str) -> torch.Tensor:
    """Float32 inputs (integer arrays, e.g. uint8 images, become floats)."""
    x = _as_tensor(value, what)
    if x.dim() < 2 or x.shape[0] == 0:
        raise RltuneError(f"{what}: expected one row per sample (at least 2 dimensions, at least one row), "
                          f"got shape {tuple(x.shape)}")
    if x.is_complex():
        raise RltuneError(f"{what}: complex inputs are not supported")
    if not torch.isfinite(x).all():
        raise RltuneError(f"{what}: holds NaN or infinite values")
    x32 = x.to(torch.float32)
    if not torch.isfinite(x32).all():
        raise RltuneError(f"{what}: holds values up to {float(x.abs().max()):.3g}, beyond float32's range "
                          "(rltune trains in float32): rescale them")
    return x32.contiguous()


def _labels(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            arr = np.asarray(value)
        except Exception:
            arr = None
        if arr is not None and (arr.dtype.kind in "USO" and arr.size and all(isinstance(v, str) for v in arr.flat[:100])):
            raise RltuneError(f"{what}: labels are strings ({str(arr.flat[0])!r}, ...): give class numbers 0..C-1 in the "
                              "order of the teacher's outputs (sklearn's LabelEncoder numbers names in sorted order)")
    y = _as_tensor(value, what)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        raise RltuneError(f"{what}: expected a 1-D array of class numbers, got shape {tuple(y.shape)}")
    if y.is_floating_point():
        if not torch.isfinite(y).all() or not torch.equal(y, y.round()) or (y.numel() and float(y.abs().max()) > 2 ** 31):
            raise RltuneError(f"{what}: labels must be whole class numbers 0, 1, ... (got non-integers, NaN or huge values)")
    elif y.dtype == torch.bool or y.is_complex():
        raise RltuneError(f"{what}: labels must be class numbers 0, 1, ..., got {y.dtype}")
    y = y.to(torch.int64)
    if y.numel() and int(y.min()) < 0:
        raise RltuneError(f"{what}: labels must be class numbers 0, 1, ..., got {int(y.min())}")
    return y.contiguous()


def _split(value: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise RltuneError(f"{name}: expected an (x, y) pair, got {type(value).__name__}")
    x, y = _inputs(value[0], f"{name} x"), _labels(value[1], f"{name} y")
    if len(x) != len(y):
        raise RltuneError(f"{name}: x has {len(x)} rows but y has {len(y)}")
    return x, y


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


@torch.no_grad()
def _run(model: nn.Module, x: torch.Tensor, role: str, train_mode: bool = False) -> torch.Tensor:
    """The model's logits on ``x`` in eval mode (and, with ``train_mode``, a forward in train mode on
    a copy, as training will run it: BatchNorm and Dropout behave differently there)."""
    was = model.training
    try:
        model.eval()
        out = model(x)
        if train_mode:
            copy.deepcopy(model).train()(x)
    except Exception as e:
        raise RltuneError(f"the {role} cannot run on inputs of shape {tuple(x.shape)}: {_first_line(e)}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RltuneError(f"the {role} must return logits of shape (batch, classes); on a batch of "
                          f"{x.shape[0]} it returned {shape}")
    if not out.is_floating_point():
        raise RltuneError(f"the {role} must return float logits, got {out.dtype}")
    if not torch.isfinite(out).all():
        raise RltuneError(f"the {role} returns NaN or infinite logits on the first rows of train")
    return out


LARGE_INPUT = 1e3  # a compressible layer whose input features are larger (RMS) gets a warning


def _large_layer_inputs(student: nn.Module, x: torch.Tensor) -> list[tuple[str, float]]:
    """(layer, RMS of its largest input feature) for each compressible layer of ``student`` (a copy
    in train mode, as training runs it) whose inputs on ``x`` are over :data:`LARGE_INPUT`; a
    Linear's features are its last dimension, a convolution's its channels."""
    found: dict[str, float] = {}

    def hook(name):
        def pre(module, args):
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if t is None or not t.is_floating_point() or not t.numel():
                return
            t = t.detach().float()
            dims = [d for d in range(t.dim()) if d != (t.dim() - 1 if isinstance(module, nn.Linear) else 1)]
            rms = float(t.pow(2).mean(dim=dims).sqrt().max()) if dims else float(t.abs().max())
            if math.isfinite(rms) and rms > LARGE_INPUT:
                found[name] = max(found.get(name, 0.0), rms)
        return pre

    try:
        model = copy.deepcopy(student).train()
        for name, m in model.named_modules():
            if isinstance(m, COMPRESSIBLE):
                m.register_forward_pre_hook(hook(name))
        with torch.no_grad():
            model(x)
    except Exception:
        return []  # a forward that fails here fails with its own message elsewhere
    return list(found.items())


def _unsaved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors a forward may read that the artifact does not carry (nor would ``state_dict``):
    non-persistent buffers and plain tensor attributes of every module, cloned."""
    out = {}
    for mname, m in model.named_modules():
        prefix = mname + "." if mname else ""
        for b in m._non_persistent_buffers_set:
            t = m._buffers.get(b)
            if isinstance(t, torch.Tensor):
                out[f"'{prefix}{b}' (a buffer registered with persistent=False)"] = t.detach().clone()
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and not k.startswith("__"):
                out[f"'{prefix}{k}' (a plain tensor attribute, not a buffer)"] = v.detach().clone()
    return out


@torch.no_grad()
def _check_state_carried(student: nn.Module, x: torch.Tensor) -> None:
    """Refuse a student whose training forward changes a tensor the artifact does not store: the
    compressed student would end its training with values that a reloaded one never gets."""
    model = copy.deepcopy(student).train()
    before = _unsaved_state(model)
    if not before:
        return
    model(x)
    after = _unsaved_state(model)
    for name, t in before.items():
        u = after.get(name)
        if u is not None and (u.shape != t.shape or u.dtype != t.dtype or not torch.equal(u, t)):
            raise RltuneError(f"student: its forward changes {name} in training; the saved artifact, like "
                              "state_dict(), does not carry it, so the reloaded student would predict differently: "
                              "register it as a persistent buffer (self.register_buffer(name, tensor))")


def _whole(v: Any, name: str, lo: int, hi: int) -> int:
    import numbers

    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= int(v) <= hi:
        raise RltuneError(f"{name}: expected a whole number in {lo}..{hi}, got {v!r}")
    return int(v)


def _module_hash(model: nn.Module, probe: torch.Tensor | None = None) -> str:
    """Content hash of a module: its class source (best effort), repr, every tensor, and what it
    computes on ``probe`` (two modules alike in code and weights but not in behaviour, such as a
    flag kept as a plain attribute, differ there)."""
    h = hashlib.sha256()
    if probe is not None:
        with torch.no_grad():
            was = model.training
            model.eval()
            try:
                h.update(model(probe).detach().cpu().contiguous().numpy().tobytes())
            finally:
                model.train(was)
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}".encode())
    try:
        h.update(inspect.getsource(type(model)).encode())
    except (OSError, TypeError):
        pass
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str((tuple(v.shape), str(v.dtype))).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def mixup_spread(x_tr: torch.Tensor) -> np.ndarray:
    """Per-feature spread of train's inputs, the scale of the mixup transfer set's noise: the standard
    deviation, or where a few outlier rows make it over 3 times the robust one (interquartile range /
    1.349, on up to 4,096 rows, fewer for large inputs) that one: five rows of 1e30 among 200 made
    every mixup row noise of ~1e28 (the std of the outliers), and the float student trailed its
    teacher by 18 pt."""
    std = x_tr.std(dim=0).numpy()
    flat = x_tr.reshape(len(x_tr), -1).numpy()
    rows = max(64, min(4096, (16 << 20) // max(1, flat.shape[1])))  # the percentiles copy: at most ~64 MB
    if len(flat) > rows:
        flat = flat[np.linspace(0, len(flat) - 1, rows).astype(np.int64)]
    q1, q3 = np.percentile(flat, [25, 75], axis=0)
    robust = ((q3 - q1) / 1.349).reshape(std.shape)
    use = (robust > 0) & ~(std <= 3 * robust)  # std of inf or NaN (overflow) counts as over
    return np.where(use, robust, std).astype(np.float32)


TRANSFER_BYTES = 256 << 20  # the default mixup transfer set holds at most this much input


def default_transfer_size(x_tr: torch.Tensor) -> int:
    """``10 × n_train`` mixup rows, clamped to 2,000..20,000 and to :data:`TRANSFER_BYTES` of inputs:
    20,000 rows of 3×64×64 images were 1 GB (and 4 GB at the peak of making them), of 3×224×224
    images 12 GB, where the process was killed with no message."""
    n = int(min(20_000, max(2_000, 10 * len(x_tr))))
    row = max(1, x_tr[:1].numel() * 4)
    if n * row > TRANSFER_BYTES:
        n = max(1, TRANSFER_BYTES // row)
        log.info("the mixup transfer set is %d rows (256 MB of inputs); pass transfer_size= or transfer= for "
                 "another size", n)
    return n


class Problem:
    """One compression problem: a teacher, a student to compress, data, and the training budget.

    See the module docstring for the arguments. The constructor checks them (shapes, labels,
    NaN, that both models run on the data and agree on the number of classes, that the student
    has a layer to compress) and raises one-line :class:`RltuneError` s; it trains nothing.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, train, val, test=None, transfer=None, *,
                 name: str = "problem", stages: int = 8, epochs_per_stage: int = 3,
                 steps_per_stage: int | None = None, batch_size: int | None = None, lr: float = 5e-3,
                 pretrain_epochs: int = 30, pretrain_steps: int | None = None,
                 transfer_size: int | None = None, knobs: dict[str, Any] | None = None,
                 pruning_scope: str = "global", seed: int = 0):
        check_name(name)
        for role, m in (("teacher", teacher), ("student", student)):
            if not isinstance(m, nn.Module):
                raise RltuneError(f"{role}: expected a torch.nn.Module, got {type(m).__name__}")
        if teacher is student:
            raise RltuneError("teacher and student are the same module: pass a separate student to compress")
        check_python_module(student)
        if not any(isinstance(m, COMPRESSIBLE) for m in student.modules()):
            raise RltuneError("student: has no nn.Linear, nn.Conv1d or nn.Conv2d layer to compress")
        for pname, p in student.named_parameters():
            if p.dtype != torch.float32:
                raise RltuneError(f"student: parameter {pname!r} is {p.dtype}; rltune compresses float32 models "
                                  "(call student.float() first)")
        for pname, p in teacher.named_parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                raise RltuneError(f"teacher: parameter {pname!r} is {p.dtype}; rltune runs the teacher on float32 "
                                  "inputs (call teacher.float() first; its logits are computed once)")
        check_plain_weights(student)
        check_untied(student)
        if knobs is not None and not isinstance(knobs, dict):
            raise RltuneError(f"knobs: expected a mapping such as {{'bits': [2, 8]}}, got {type(knobs).__name__}")
        seed = _whole(seed, "seed", 0, 2 ** 32 - 1)
        if transfer_size is not None:
            transfer_size = _whole(transfer_size, "transfer_size", 0, 1_000_000)
        raw_x = train[0] if isinstance(train, (tuple, list)) and len(train) == 2 else None
        x_tr, y_tr = _split(train, "train")
        if len(y_tr) < 2:
            raise RltuneError(f"train: needs at least 2 rows, got {len(y_tr)}")
        x_va, y_va = _split(val, "val")
        if test is not None:
            x_te, y_te = _split(test, "test")
        else:
            x_te, y_te = x_tr[:0], y_tr[:0]
        shape = tuple(x_tr.shape[1:])
        for what, x in (("val", x_va), ("test", x_te)):
            if x.numel() and tuple(x.shape[1:]) != shape:
                raise RltuneError(f"{what} x: samples have shape {tuple(x.shape[1:])}, train's have {shape}")
        if transfer is not None:
            x_u = _inputs(transfer, "transfer")
            if tuple(x_u.shape[1:]) != shape:
                raise RltuneError(f"transfer: samples have shape {tuple(x_u.shape[1:])}, train's have {shape}")
        else:
            x_u = None
        probe = x_tr[:16]
        integer_x = raw_x is not None and not torch.is_floating_point(_as_tensor(raw_x, "train x"))
        def on_floats(model: nn.Module, role: str, **kw) -> torch.Tensor:
            try:
                return _run(model, probe, role, **kw)
            except RltuneError as e:
                if integer_x:  # token ids, say: the model wants integers
                    raise RltuneError(f"train x holds integers (token ids?) and the {role} does not run on them as "
                                      "floats: rltune trains on float inputs (mixup transfer sets, quantization-aware "
                                      "training); an nn.Embedding model works if its forward casts (x.long()) and you "
                                      f"pass transfer= ids ({e})") from None
                raise

        t_out = on_floats(teacher, "teacher")
        s_out = on_floats(student, "student", train_mode=True)
        _check_state_carried(student, probe)
        if not integer_x:  # token ids feed embeddings, not the compressible layers
            large = _large_layer_inputs(student, x_tr[:64])  # 64 rows: a large CNN on 224x224 images too
            if large:
                import warnings

                from rltune.errors import RltuneWarning

                layer, rms = max(large, key=lambda t: t[1])
                more = f" (and {len(large) - 1} more layers)" if len(large) > 1 else ""
                warnings.warn(RltuneWarning(
                    f"student layer {layer!r}{more} takes inputs of order {rms:.2g} (RMS of its largest input feature "
                    "on train): standardise the inputs (zero mean, unit variance; the teacher's too) or normalise "
                    "them in the student's forward: such a layer needs weights of ~1/{:.0g}, which training at lr "
                    "{} moves by far more than their size and the quantizer (smallest scale 2^-16) and global "
                    "pruning (by magnitude across layers) erase, so the compressed student can fall far below the "
                    "float one".format(rms, lr)), stacklevel=2)
        try:  # its MACs and energy are measured on one row (and a split may end in a batch of one)
            _run(student, probe[:1], "student")
            _run(teacher, probe[:1], "teacher")  # its logits are computed in chunks: the last may be one row
        except RltuneError as e:
            raise RltuneError(f"{e} (rltune runs the models on single rows too: the student to measure its energy, "
                              "both on the last rows of a split; a squeeze() that drops the batch dimension breaks "
                              "there)") from None
        classes = int(t_out.shape[1])
        if classes < 2:
            raise RltuneError(f"the teacher returns {classes} logit per sample; a classifier needs at least 2")
        if s_out.shape[1] != classes:
            raise RltuneError(f"the student returns {s_out.shape[1]} logits per sample, the teacher {classes}")
        if bool((t_out >= 0).all()) and bool(torch.allclose(t_out.sum(dim=1), torch.ones(len(t_out)), atol=1e-3)):
            import warnings

            from rltune.errors import RltuneWarning

            warnings.warn("the teacher's outputs look like probabilities (non-negative, each row summing to 1); "
                          "distillation softens them as logits, so its soft targets come out nearly flat: give a "
                          "teacher that returns logits or log-probabilities (e.g. drop its final softmax)",
                          RltuneWarning, stacklevel=2)
        top = max(int(y.max()) for y in (y_tr, y_va, y_te) if y.numel())
        if top >= classes:
            raise RltuneError(f"labels go up to {top} but the teacher has only {classes} outputs (classes 0..{classes - 1})")
        check_label_coverage(y_tr, {"val": y_va, "test": y_te}, f"Problem {name!r}")
        if x_u is None:
            n = transfer_size if transfer_size is not None else default_transfer_size(x_tr)
            if n:
                rng = np.random.default_rng(seed)
                spread = mixup_spread(x_tr)
                x_u = torch.from_numpy(mixup(x_tr.numpy(), n, rng, scale=spread))
            else:
                x_u = x_tr[:0]
        self.name = name
        self.teacher = teacher
        self.student = student
        self.data = Dataset(name, x_tr, y_tr, x_va, y_va, x_te, y_te, x_u.contiguous(), classes=classes)
        raw = {
            "name": name, "dataset": {"source": "iris"},
            "student": {"pretrain_epochs": pretrain_epochs, "pretrain_steps": pretrain_steps},
            "training": {"stages": stages, "epochs_per_stage": epochs_per_stage,
                         "steps_per_stage": steps_per_stage, "batch_size": batch_size, "lr": lr,
                         "pruning_scope": pruning_scope},
            "knobs": dict(knobs or {}),
        }
        sc = parse_scenario(raw, f"Problem {name!r}")
        if sc.training["batch_size"] == 1 and has_batchnorm(student):
            raise RltuneError("batch_size: 1 cannot train a student with BatchNorm (it needs more than one row "
                              "per batch); use batch_size >= 2 or leave it out (picked from the data size)")
        sc.dataset = {"source": "user"}
        sc.teacher = {"arch": "user"}
        sc.student = {**sc.student, "arch": "user"}
        self.scenario = sc
        self.student_spec: dict[str, Any] | None = None  # a user's module: the artifact stores layer shapes
        self.teacher_info: dict[str, Any] = {}
        self.teacher_cache_hit = False
        self._key: str | None = None

    # -- what the rest of rltune reads ---------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.data.input_shape

    @property
    def n_classes(self) -> int:
        return self.data.n_classes

    def new_student(self, seed: int) -> nn.Module:
        """A fresh copy of the student to distil (a scenario's is initialised with ``seed``)."""
        if self.student_spec is not None:
            from rltune.models import build_model

            torch.manual_seed(seed)
            return build_model(self.student_spec, self.input_shape, self.n_classes)
        return copy.deepcopy(self.student)

    def cache_key(self) -> str:
        """What defines the float students distilled for this problem (for the disk cache)."""
        if self._key is None:
            if self.student_spec is not None:
                s = self.scenario
                self._key = stable_hash({"v": CACHE_VERSION, "dataset": s.dataset, "teacher": s.teacher,
                                         "student": self.student_spec, "data": self.data.fingerprint})
            else:
                probe = self.data.x_train[:16]
                self._key = stable_hash({"v": CACHE_VERSION, "data": self.data.content_hash(),
                                         "teacher": _module_hash(self.teacher, probe),
                                         "student": _module_hash(self.student, probe)})
        return self._key

    def __repr__(self) -> str:
        d = self.data
        return (f"Problem({self.name!r}, input {self.input_shape}, {self.n_classes} classes, "
                f"{len(d.y_train)} train / {len(d.y_val)} val / {len(d.y_test)} test / {len(d.x_transfer)} transfer)")

    # -- a scenario through the same path -----------------------------------------------------

    @classmethod
    def from_scenario(cls, scenario: Scenario | str | Path) -> "Problem":
        """The problem a scenario describes: its dataset loaded, its teacher trained once (cached on
        disk under a hash of everything that defines it), its student built from the spec."""
        from rltune.scenario import load_scenario

        if not isinstance(scenario, Scenario):
            from rltune.shipped import resolve_scenario

            scenario = load_scenario(resolve_scenario(str(scenario)))
        check_name(scenario.name, f"{scenario.path or '<scenario>'}: name")
        data = load_dataset(scenario.dataset)
        teacher, info, hit = load_or_train_teacher(scenario, data)
        self = cls.__new__(cls)
        self.name = scenario.name
        self.teacher = teacher
        self.data = data
        self.scenario = scenario
        self.student_spec = dict(scenario.student)
        self.student = None
        self.teacher_info = info
        self.teacher_cache_hit = hit
        self._key = None
        self.student = self.new_student(0)
        return self


__all__ = ["Problem", "auto_batch_size", "epochs_for", "check_name", "cache_dir"]
