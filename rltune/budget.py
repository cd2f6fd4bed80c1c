"""Compression targets (budgets) and meeting them by construction.

A budget is a compression ratio (``"20x"``), packed bytes (``"12KB"``, ``"900B"``) or modelled
energy per inference (``"5nJ"``, ``"800pJ"``). Every tuner meets it the way AMC's
resource-constrained protocol does: the final sparsity is the smallest that brings the student's
cost under the budget at the chosen bit-width (found by bisection on the real exported size or
the energy model), and after the last stage any excess is pruned away.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from rltune import compression as C
from rltune.errors import RltuneError
from rltune.export import packed_size
from rltune.metrics import energy_per_inference

_UNITS = {"b": 1, "kb": 1024, "mb": 1024 ** 2, "pj": 1.0, "nj": 1e3, "uj": 1e6, "µj": 1e6}


@dataclass(frozen=True)
class Budget:
    """``kind`` is ``ratio`` (× against the float32 dense student), ``bytes`` or ``energy`` (pJ)."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in ("ratio", "bytes", "energy"):
            raise RltuneError(f"budget kind must be ratio, bytes or energy, got {self.kind!r}")
        if not self.value > 0 or (self.kind == "ratio" and self.value < 1):
            raise RltuneError(f"budget must be positive (a ratio at least 1x), got {self.value}")

    @classmethod
    def parse(cls, text: str | float) -> "Budget":
        """``20x`` / ``20`` -> ratio; ``12KB``, ``900B`` -> bytes; ``5nJ``, ``800pJ`` -> energy."""
        if isinstance(text, (int, float)):
            return cls("ratio", float(text))
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Zµ×]*)\s*", str(text))
        if not m:
            raise RltuneError(f"cannot read budget {text!r} (examples: 20x, 12KB, 5nJ)")
        value, unit = float(m.group(1)), m.group(2).lower()
        if unit in ("", "x", "×"):
            return cls("ratio", value)
        if unit in ("b", "kb", "mb"):
            return cls("bytes", value * _UNITS[unit])
        if unit in ("pj", "nj", "uj", "µj"):
            return cls("energy", value * _UNITS[unit])
        raise RltuneError(f"unknown budget unit {m.group(2)!r} in {text!r} (use x, B, KB, MB, pJ, nJ)")

    def __str__(self) -> str:
        if self.kind == "ratio":
            return f"{self.value:.12g}x"
        if self.kind == "bytes":
            return f"{self.value:.12g}B"  # parses back to the same budget
        return f"{self.value / 1e3:.12g}nJ"


class Meter:
    """The cost a budget limits, for one scenario: packed bytes or modelled energy."""

    def __init__(self, budget: Budget, spec: dict | None, in_features, out_features: int,
                 float_bytes: int, float_energy_pj: float):
        self.budget, self.spec, self.in_f, self.out_f = budget, spec, in_features, out_features
        if budget.kind == "ratio":
            self.limit = float_bytes / budget.value
        elif budget.kind == "bytes":
            self.limit = budget.value
        else:
            self.limit = budget.value
        self.float_cost = float_energy_pj if budget.kind == "energy" else float(float_bytes)

    def cost(self, model: nn.Module) -> float:
        nbytes = packed_size(model, self.spec, self.in_f, self.out_f)
        if self.budget.kind == "energy":
            return energy_per_inference(model, self.in_f, packed_bytes=nbytes)["energy_pj"]
        return float(nbytes)

    @property
    def equivalent_ratio(self) -> float:
        """The budget as a saving factor against the float student (for observations)."""
        return self.float_cost / self.limit

    def met(self, model: nn.Module) -> bool:
        return self.cost(model) <= self.limit


def _masks(model: nn.Module) -> list[torch.Tensor]:
    return [l.compressor.mask.clone() for l in C.layers(model)]


def _restore(model: nn.Module, masks: list[torch.Tensor]) -> None:
    for l, m in zip(C.layers(model), masks):
        l.compressor.mask.copy_(m)


def lowest_fitting(fits, lo: float, hi: float, iters: int) -> float:
    """Bisection, ``iters`` halvings: the smallest value in ``[lo, hi]`` for which ``fits`` holds,
    given that it holds at ``hi`` (returns a value at which it holds)."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


SIZING_MARGIN = 0.97  # sparsity is sized to this share of the limit (training moves the packed size)


def required_sparsity(model: nn.Module, bits: int, meter: Meter, max_sparsity: float, scope: str,
                      margin: float = SIZING_MARGIN, iters: int = 12) -> float | None:
    """Smallest sparsity (one-shot magnitude pruning of ``model`` at ``bits``) whose cost is under
    ``margin`` × the limit; None if even ``max_sparsity`` is not enough. ``model`` is unchanged."""
    saved_masks = _masks(model)
    saved_bits = [l.compressor.bits for l in C.layers(model)]
    C.unshare_all_(model)
    limit = meter.limit * margin

    def cost_at(s: float) -> float:
        _restore(model, saved_masks)
        if s > 0:
            C.prune_(model, sparsity=s, scope=scope)
        return meter.cost(model)

    try:
        C.set_bits_(model, bits)
        if cost_at(0.0) <= limit:
            return 0.0
        if cost_at(max_sparsity) > limit:
            return None
        return lowest_fitting(lambda x: cost_at(x) <= limit, 0.0, max_sparsity, iters)
    finally:
        _restore(model, saved_masks)
        C.set_bits_(model, saved_bits)


def enforce_(model: nn.Module, meter: Meter, max_sparsity: float, scope: str, iters: int = 14) -> bool:
    """Prune ``model`` further (no training) until its cost is under the limit. Returns whether
    any pruning was needed. Raises if even ``max_sparsity`` cannot meet it."""
    if meter.met(model):
        return False
    start = C.weight_sparsity(model)
    saved = _masks(model)

    def met_at(s: float) -> bool:
        _restore(model, saved)
        C.prune_(model, sparsity=s, scope=scope)
        return meter.met(model)

    top = max(max_sparsity, start)
    if not met_at(top):
        top = 0.999
        if not met_at(top):
            _restore(model, saved)
            raise RltuneError(f"budget {meter.budget} cannot be met even at {top:.1%} sparsity")
    met_at(lowest_fitting(met_at, start, top, iters))
    return True


@torch.no_grad()
def _regrowth(model: nn.Module, meter: Meter, limit: float):
    """``(apply, total)``: ``apply(n)`` puts the masks back as they are now, unprunes the ``n``
    pruned weights whose latent magnitude is largest (across all layers) and returns the cost;
    ``total`` is how many are pruned. ``(None, 0)`` where nothing can come back: weight-shared
    layers, nothing pruned, or a cost already over ``limit``."""
    ls = C.layers(model)
    if any(l.compressor.shared for l in ls) or meter.cost(model) > limit:
        return None, 0
    where, mags = [], []
    for i, l in enumerate(ls):
        off = (~l.compressor.mask).flatten().nonzero().flatten()
        where.append(torch.stack([torch.full_like(off, i), off], dim=1))
        mags.append(l.weight.detach().abs().flatten()[off])
    where_t, mags_t = torch.cat(where), torch.cat(mags)
    if mags_t.numel() == 0:
        return None, 0
    order = where_t[torch.argsort(mags_t, descending=True, stable=True)]
    saved = _masks(model)

    def apply(n: int) -> float:
        _restore(model, saved)
        for i, l in enumerate(ls):
            idx = order[:n][order[:n, 0] == i, 1]
            l.compressor.mask.view(-1)[idx] = True
        return meter.cost(model)

    return apply, int(order.shape[0])


@torch.no_grad()
def fill_(model: nn.Module, meter: Meter, margin: float = 1.0, iters: int = 20) -> int:
    """Give bytes back: unprune the pruned weights whose latent magnitude is largest (across all
    layers) while the cost stays under ``margin`` × the limit. Returns how many weights came back.

    Pruning sizes sparsity before training with a margin and :func:`enforce_` only ever prunes
    more, so a student can end well under its budget; low-bit students most of all (their packed
    size shrinks as training moves weights to zero codes). Not for weight-shared layers."""
    limit = meter.limit * margin
    apply, total = _regrowth(model, meter, limit)
    return largest_fitting_count(apply, total, limit, iters) if apply is not None else 0


def largest_fitting_count(cost_with, total: int, limit: float, iters: int = 20) -> int:
    """The largest ``n`` in ``[0, total]`` (nearly) with ``cost_with(n) <= limit``, left applied
    (``cost_with(n)`` is called last). The packed size is not monotone in the count (a layer's
    layout switches between gap-coded, bitmap and dense; entropy-coded streams): a coarse scan
    first, then bisection past the largest count that fits."""
    grid = sorted({round(total * j / 32) for j in range(33)})
    fits = [n for n in grid if cost_with(n) <= limit]
    lo = max(fits) if fits else 0
    above = [n for n in grid if n > lo]
    hi = above[0] if above else lo
    for _ in range(iters):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        if cost_with(mid) <= limit:
            lo = mid
        else:
            hi = mid
    cost_with(lo)
    return lo


@torch.no_grad()
def _restore_latent(model: nn.Module, saved: list[torch.Tensor]) -> None:
    for l, w in zip(C.layers(model), saved):
        l.weight.copy_(w)


def effective_grads(model: nn.Module, loss_of) -> list[torch.Tensor]:
    """The gradient of ``loss_of(model)`` (a scalar tensor) with respect to each compressible
    layer's *effective* weight ``Q_b(w · mask)``: where a weight is pruned it says which way, and
    how much, the loss would move if the weight came back."""
    from torch.nn.utils import parametrize

    ls = C.layers(model)
    with parametrize.cached():
        ws = [l.effective_weight for l in ls]
        loss = loss_of(model)
        grads = torch.autograd.grad(loss, ws, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g.detach() for w, g in zip(ws, grads)]


@torch.no_grad()
def fill_gradient_(model: nn.Module, meter: Meter, grads: list[torch.Tensor], margin: float = 1.0,
                   iters: int = 20, init: str = "step") -> int:
    """Give bytes back along the loss gradient: weights whose code is zero (pruned, or trained to
    zero) come back at one quantization step, ``-sign(g) · step`` of their row, the largest
    first-order gains ``|g| · step`` first, while the cost stays under ``margin`` × the limit.
    Returns how many weights came back.

    One step never moves a row's scale (it is below the row's largest weight), so no other weight
    of the row changes; a weight regrown at its stale magnitude can (measured: 2-3 pt lost at 2-3
    bits, see :func:`fill_if_better_`). Layers at float width come back at ``-sign(g) · 1e-2 ·
    max|w|`` of their row. Not for weight-shared layers."""
    limit = meter.limit * margin
    ls = C.layers(model)
    if any(l.compressor.shared for l in ls) or meter.cost(model) > limit:
        return 0
    where, gains, values = [], [], []
    for i, (l, g) in enumerate(zip(ls, grads)):
        w_eff = l.effective_weight.detach()
        rows = w_eff.reshape(w_eff.shape[0], -1)
        b = l.compressor.bits
        if b < 32:
            qmax = 2 ** (b - 1) - 1
            step = torch.exp2(C.choose_exponent((l.weight.detach() * l.compressor.mask).reshape(rows.shape[0], -1),
                                                qmax, b) / 8.0)
        else:
            step = 1e-2 * rows.abs().amax(dim=1)
        step = step.reshape(-1, 1).expand_as(rows).reshape(-1)
        gf = g.reshape(-1)
        off = ((w_eff.reshape(-1) == 0) & (gf != 0)).nonzero().flatten()
        where.append(torch.stack([torch.full_like(off, i), off], dim=1))
        gains.append(gf[off].abs() * step[off])
        values.append(-torch.sign(gf[off]) * step[off])
    where_t, gains_t, values_t = torch.cat(where), torch.cat(gains), torch.cat(values)
    if gains_t.numel() == 0:
        return 0
    order = torch.argsort(gains_t, descending=True, stable=True)
    where_t, values_t = where_t[order], values_t[order]
    saved, saved_w = _masks(model), [l.weight.detach().clone() for l in ls]

    def cost_with(n: int) -> float:
        _restore(model, saved)
        _restore_latent(model, saved_w)
        for i, l in enumerate(ls):
            sel = where_t[:n, 0] == i
            idx = where_t[:n][sel, 1]
            l.compressor.mask.view(-1)[idx] = True
            l.weight.view(-1)[idx] = values_t[:n][sel]
        return meter.cost(model)

    lo = largest_fitting_count(cost_with, int(where_t.shape[0]), limit, iters)
    if init == "zero":   # RigL's regrowth: sized as if at one step, they start at zero and training decides
        for i, l in enumerate(ls):
            sel = where_t[:lo, 0] == i
            l.weight.view(-1)[where_t[:lo][sel, 1]] = 0.0
    return lo


def fill_if_better_(model: nn.Module, meter: Meter, score, margin: float = 1.0, halvings: int = 3) -> int:
    """:func:`fill_`, kept only if ``score(model)`` (val accuracy) does not fall; where the whole fill
    lowers it, the first of half, a quarter, an eighth of it (the largest weights first) that does
    not. Weights given back without training keep the value they had when pruned, and at 2-3 bits
    one such weight can quantize to a full step (measured: a silent fill after the last stage cost
    mnist1d-lenet @40x 3 pt). Bringing weights back at one step along the gradient instead
    (:func:`fill_gradient_`) is no better without training: 84 of them took mnist1d-lenet @24x from
    83.6 % val to 24.5 %. Returns how many weights came back (0 if the fill was undone)."""
    limit = meter.limit * margin
    apply, total = _regrowth(model, meter, limit)
    if apply is None:
        return 0
    before = score(model)
    n = largest_fitting_count(apply, total, limit)
    for k in [n] + [n >> h for h in range(1, halvings + 1)]:
        if k > 0 and apply(k) <= limit and score(model) >= before:
            return k
    apply(0)
    return 0
