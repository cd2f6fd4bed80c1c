"""The stage, rltune's unit of real work, and a whole compression run as a schedule of stages.

One stage, given knobs (τ, α, target sparsity, bit-width)::

    1. prune:    magnitude-prune up to the target sparsity (masks only grow, so sparsity never falls)
    2. quantize: set the bit-width (QAT from now on); with weight sharing, re-cluster the codebooks
    3. train:    E epochs of distillation (cached teacher logits) with fake quantization under the masks
    4. measure:  val accuracy, agreement with the teacher, packed bytes of the exported artifact,
                 sparsity, bits, MACs, modelled energy

Pruning and quantizing *before* the epochs lets each stage's training repair the damage it did,
so the student measured at the end of a stage is exactly the one that would be exported. The test
split is never read here: :func:`final_report` reads it once, at the end.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from rltune import compression as C
from rltune.context import Context
from rltune.distill import Hint, predict, train_epochs
from rltune.errors import DivergedError, RltuneError
from rltune.export import packed_size
from rltune.metrics import accuracy, agreement, costs, float_energy, measure_latency
from rltune.score import efficiency_score


@dataclass(frozen=True)
class Knobs:
    """The knobs of one stage. ``sparsity`` is a target fraction of zero weights; ``bits`` 2..8 or 32.
    Either may also be a tuple with one entry per compressible layer (per-layer allocation: that
    layer's own sparsity, layer by layer, and its own bit-width)."""

    temperature: float = 4.0
    alpha: float = 0.9
    sparsity: float | tuple[float, ...] = 0.0
    bits: int | tuple[int, ...] = 32

    def __post_init__(self):
        if not self.temperature > 0:
            raise RltuneError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise RltuneError(f"alpha must be in [0, 1], got {self.alpha}")
        for sp in (self.sparsity if isinstance(self.sparsity, tuple) else (self.sparsity,)):
            if not 0.0 <= sp < 1.0:
                raise RltuneError(f"sparsity must be in [0, 1), got {sp}")
        for b in (self.bits if isinstance(self.bits, tuple) else (self.bits,)):
            C.check_bits(b)

    @property
    def prunes(self) -> bool:
        return any(x > 0 for x in self.sparsity) if isinstance(self.sparsity, tuple) else self.sparsity > 0

    @property
    def max_bits(self) -> int:
        return max(self.bits) if isinstance(self.bits, tuple) else self.bits

    def prune_(self, model: nn.Module, scope: str) -> None:
        """Prune ``model`` to this stage's sparsity (per layer when it is a tuple)."""
        if isinstance(self.sparsity, tuple):
            C.prune_layers_(model, self.sparsity)
        elif self.sparsity > 0:
            C.prune_(model, sparsity=self.sparsity, scope=scope)


@dataclass
class Metrics:
    """What a stage measures (val split), plus the reference points it is normalised by."""

    val_acc: float
    val_agreement: float
    packed_bytes: int
    ratio: float
    sparsity: float
    bits: float
    nonzero_macs: int
    dense_macs: int
    energy_pj: float
    train_loss: float
    seconds: float
    seconds_outside_training: float
    latency_b1_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Reference:
    """The float32 student's figures: what every compressed student is compared with."""

    val_acc: float
    test_acc: float
    float_bytes: int
    energy_pj: float
    teacher_val_acc: float
    teacher_test_acc: float
    latency_b1_s: float | None = None


def reference(ctx: Context, float_student: nn.Module) -> Reference:
    d = ctx.data
    return Reference(
        val_acc=accuracy(predict(float_student, d.x_val), d.y_val),
        test_acc=accuracy(predict(float_student, d.x_test), d.y_test),
        float_bytes=C.float_bytes(float_student),
        energy_pj=float_energy(float_student, ctx.input_shape)["energy_pj"],
        teacher_val_acc=ctx.teacher_info["val_acc"],
        teacher_test_acc=ctx.teacher_info["test_acc"],
    )


@dataclass
class StudentState:
    """A student being compressed: the prepared model and what persists between stages."""

    model: nn.Module
    ref: Reference
    generator: torch.Generator
    hint: Hint | None = None
    history: list[Metrics] = field(default_factory=list)
    fill: Any = None  # a budget Meter: before this stage trains, give pruned bytes back up to it
    last: bool = False  # the next stage is the episode's last (see TAIL_AVERAGE)


def start(ctx: Context, seed: int = 0, float_student: nn.Module | None = None) -> StudentState:
    """A fresh compressible copy of the float student, with its own seeded generator."""
    base = float_student if float_student is not None else ctx.float_student(seed)
    ref = reference(ctx, base)
    model = C.prepare_(copy.deepcopy(base))
    g = torch.Generator().manual_seed(seed)
    return StudentState(model, ref, g, ctx.make_hint(model))


def measure(ctx: Context, state: StudentState, train_loss: float = math.nan) -> Metrics:
    """Measure the student on the val split (never test). The effective (masked, quantized)
    weights are computed once for all the measurements (``parametrize.cached``), not at every read."""
    model, d = state.model, ctx.data
    with parametrize.cached():
        logits = predict(model, d.x_val)
        nbytes = packed_size(model, ctx.student_spec, ctx.input_shape, ctx.n_classes)
        cost = costs(model, ctx.input_shape, packed_bytes=nbytes)
        sparsity, bits = C.weight_sparsity(model), C.model_bits(model)
    return Metrics(
        val_acc=accuracy(logits, d.y_val),
        val_agreement=agreement(logits, ctx.logits["val"]),
        packed_bytes=nbytes,
        ratio=state.ref.float_bytes / nbytes,
        sparsity=sparsity,
        bits=bits,
        nonzero_macs=cost["nonzero_macs"],
        dense_macs=cost["dense_macs"],
        energy_pj=cost["energy_pj"],
        train_loss=train_loss,
        seconds=0.0,
        seconds_outside_training=0.0,
    )


def run_stage(ctx: Context, state: StudentState, knobs: Knobs, epochs: int | None = None,
              teacher_per_batch: bool = False) -> Metrics:
    """One stage: prune, quantize, train E epochs of KD + QAT, measure. Deterministic per seed.

    Raises :class:`rltune.errors.DivergedError` if the loss becomes NaN or infinite, or if the
    stage's training *collapsed* the student (see :func:`collapsed`). ``teacher_per_batch``
    recomputes teacher logits on every batch (only to measure the cache).
    """
    t0 = time.perf_counter()
    tr = ctx.scenario.training
    model = state.model
    knobs.prune_(model, tr["pruning_scope"])
    C.unshare_all_(model)
    C.set_bits_(model, list(knobs.bits) if isinstance(knobs.bits, tuple) else knobs.bits)
    fill_before_training(ctx, state, knobs)
    epochs = epochs if epochs is not None else tr["epochs_per_stage"]
    share = tr["weight_sharing"] and knobs.max_bits < 32
    # with weight sharing: QAT epochs repair the pruning first, then the last third of the
    # epochs (at least one) fine-tunes the k-means centroids (Deep Compression's order)
    phases = [(epochs - max(1, epochs // 3), False), (max(1, epochs // 3), True)] if share else [(epochs, False)]
    before = accuracy(predict(model, ctx.data.x_val), ctx.data.y_val)
    t1 = time.perf_counter()
    loss = math.nan
    for j, (n_epochs, cluster) in enumerate(phases):
        if cluster:
            C.share_weights_(model, knobs.bits if isinstance(knobs.bits, int) else None)
        if n_epochs > 0:
            with user_code(ctx, "training"):
                loss = train_epochs(
                    model, ctx.train_set, n_epochs,
                    temperature=knobs.temperature, alpha=knobs.alpha, lr=tr["lr"], batch_size=tr["batch_size"],
                    generator=state.generator, hint=state.hint, hint_weight=tr["hint_weight"],
                    teacher=ctx.teacher if teacher_per_batch else None,
                    tail=TAIL_AVERAGE if state.last and j == len(phases) - 1 else None,
                )
    t2 = time.perf_counter()
    m = measure(ctx, state, loss)
    why = collapsed(before, m.val_acc, chance_accuracy(ctx.data.y_val))
    if why:
        raise DivergedError(why)
    t3 = time.perf_counter()
    m.seconds = t3 - t0
    m.seconds_outside_training = (t1 - t0) + (t3 - t2)
    state.history.append(m)
    return m


# Before the last stage trains, pruned (or zero-code) weights may come back along the loss
# gradient (:func:`rltune.budget.fill_gradient_`), sized as if at one quantization step up to this
# share of the budget, and the stage's training adapts them; None: they do not. Off because every
# variant measured cost accuracy (recipe, 5 seeds, test %, share of the byte budget used):
#   one step, margin 1.0:   synthetic-10class @24x 88.40 -> 60.51, mnist1d-cnn @16x 85.40 -> 79.02,
#                           mnist1d-lenet @24x 88.45 -> 78.87 (share 0.93 -> 0.96)
#   at zero (RigL), 1.5:    mnist1d-cnn @16x 85.40 -> 84.85 (share 0.957 -> 0.991), mnist1d-lenet
#                           @24x 88.45 -> 87.15 (0.931 -> 0.997), synthetic-10class @24x 88.40 -> 88.17
# (the regrown weights grow past the budget and the pruning after training that takes it back is
# not repaired), and magnitude regrowth before the stage cost mnist1d-lenet @40x 0.9 pt (3 seeds).
# At 2 bits the share cannot reach 98 % by weights alone: the dense ternary student packs under
# the budget (synthetic-10class @24x: every weight back is 86 % of it). After the last stage
# :func:`rltune.budget.fill_if_better_` tops up (kept only if val accuracy does not fall).
FILL_BEFORE_TRAINING: float | None = None
FILL_INIT = "zero"   # how those weights start: "zero" (RigL) or "step" (one quantization step)

# The episode's last stage ends at the mean of its iterates over this share of its optimizer steps
# (tail averaging, :class:`rltune.distill.TailAverage`) instead of its last iterate: the final
# accuracy, the reward, is then less a lottery over where training happened to stop. None: off.
TAIL_AVERAGE: float | None = None


def fill_before_training(ctx: Context, state: StudentState, knobs: Knobs) -> int:
    if state.fill is None or FILL_BEFORE_TRAINING is None:
        return 0
    from rltune.budget import effective_grads, fill_gradient_

    model = state.model   # (weight-shared layers: fill_gradient_ gives nothing back)
    return fill_gradient_(model, state.fill, effective_grads(model, fill_loss(ctx, knobs)), margin=FILL_BEFORE_TRAINING,
                          init=FILL_INIT)


FILL_ROWS = 8192   # training rows the fill's gradient is taken on


def fill_loss(ctx: Context, knobs: "Knobs | None"):
    """The distillation loss of the last stage's knobs on (up to ``FILL_ROWS``) training rows: the
    gradient :func:`fill_before_training` gives bytes back along. Taken in eval mode."""
    from rltune.distill import kd_loss

    ts = ctx.train_set
    n = min(len(ts.y), FILL_ROWS)
    idx = torch.randperm(len(ts.y), generator=torch.Generator().manual_seed(0))[:n]
    tau, alpha = (knobs.temperature, knobs.alpha) if knobs is not None else (4.0, 0.9)

    def loss_of(model: nn.Module) -> torch.Tensor:
        was = model.training
        model.eval()
        try:
            return kd_loss(model(ts.x[idx]), ts.t_logits[idx], ts.y[idx], tau, alpha)
        finally:
            model.train(was)

    return loss_of


@contextlib.contextmanager
def user_code(ctx: Context, doing: str):
    """A user's own student module failing inside training becomes one RltuneError line (a
    built-in one failing is rltune's bug and keeps its traceback)."""
    try:
        yield
    except RltuneError:
        raise
    except Exception as e:
        if ctx.student_spec is not None:
            raise
        text = str(e).strip().splitlines()
        raise RltuneError(f"{ctx.scenario.name}: the student failed during {doing}: {type(e).__name__}: "
                          f"{text[0][:300] if text else ''}") from None


def chance_accuracy(y: torch.Tensor) -> float:
    """The accuracy of always predicting the commonest class."""
    return float(torch.bincount(y).max()) / max(len(y), 1) if len(y) else 0.0


def collapsed(before: float, after: float, chance: float) -> str | None:
    """Why a stage's training collapsed the student, or None. Collapse: training (not the pruning
    or quantization before it, which training repairs) lost more than 10 pt of val accuracy and
    more than half the way from where the stage started down to chance, as a learning rate far too
    large does (digits at lr 1.0: 97 % -> 39 %). Hard compression that training only partly repairs
    starts the stage low and is not a collapse."""
    if before - after > 0.10 and after < chance + 0.5 * (before - chance):
        return (f"training collapsed the student: val accuracy fell from {100 * before:.1f} % to "
                f"{100 * after:.1f} % during the stage (chance {100 * chance:.1f} %); the learning rate may be too high")
    return None


def run_schedule(ctx: Context, schedule: list[Knobs], seed: int = 0,
                 float_student: nn.Module | None = None) -> StudentState:
    """Compress with a fixed list of per-stage knobs (a recipe, a tuner's candidate)."""
    state = start(ctx, seed, float_student)
    for i, knobs in enumerate(schedule):
        state.last = i == len(schedule) - 1
        run_stage(ctx, state, knobs)
    return state


def score_of(ctx: Context, m: Metrics, ref: Reference, acc: float | None = None,
             ref_acc: float | None = None) -> tuple[float, dict[str, float]]:
    """The efficiency score of a measured student (val by default)."""
    return efficiency_score(
        acc=m.val_acc if acc is None else acc,
        ref_acc=ref.val_acc if ref_acc is None else ref_acc,
        bytes_=m.packed_bytes, ref_bytes=ref.float_bytes, weights=ctx.scenario.reward,
        latency=m.latency_b1_s, ref_latency=ref.latency_b1_s,
        energy=m.energy_pj, ref_energy=ref.energy_pj,
    )


def final_report(ctx: Context, state: StudentState, latency: bool = True) -> dict[str, Any]:
    """The test-split figures of the finished student (the only place test is read)."""
    d = ctx.data
    m = state.history[-1] if state.history else measure(ctx, state)
    logits = predict(state.model, d.x_test)
    out = {
        "test_acc": accuracy(logits, d.y_test),
        "test_agreement": agreement(logits, ctx.logits["test"]),
        "float_test_acc": state.ref.test_acc,
        "teacher_test_acc": state.ref.teacher_test_acc,
        **{f"val_{k}" if k in ("acc",) else k: v for k, v in m.to_dict().items()},
        "float_bytes": state.ref.float_bytes,
    }
    score, _ = score_of(ctx, m, state.ref, acc=out["test_acc"], ref_acc=state.ref.test_acc)
    out["test_score"] = score
    out["layers"] = C.layer_summary(state.model)
    if latency:
        out.update(measure_latency(state.model, ctx.input_shape))
    return out


# -- the recipe: the strong default schedule --------------------------------------------------

def cubic_sparsity(stage: int, final: float, ramp_stages: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i − s_f)(1 − t/n)^3`` for stage t = 1..n, then s_f."""
    frac = min(max(stage / max(ramp_stages, 1), 0.0), 1.0)
    return final + (initial - final) * (1.0 - frac) ** 3


def recipe(stages: int, sparsity: float, bits: int, temperature: float = 4.0, alpha: float = 0.9,
           ramp_fraction: float = 0.75, late_bits_stages: int | None = None) -> list[Knobs]:
    """The gradual recipe: cubic sparsity ramp reaching ``sparsity`` at ``ramp_fraction`` of the
    stages, 8 bits until the last ``late_bits_stages`` (default: a quarter, at least 1), then ``bits``."""
    ramp = max(1, int(round(ramp_fraction * stages)))
    late = late_bits_stages if late_bits_stages is not None else max(1, stages // 4)
    out = []
    for k in range(1, stages + 1):
        b = bits if (bits >= 32 or k > stages - late) else 8
        out.append(Knobs(temperature, alpha, cubic_sparsity(k, sparsity, ramp), b))
    return out
