"""Many students per core: K students of one architecture trained as one computation.

A stage of one small student spends most of its time on per-batch overhead (Python, kernel
launches), not arithmetic. :func:`train_epochs_batched` stacks the K students' latent parameters
into tensors with a leading K axis, computes every student's *effective* weights at once (its own
mask, bit-width and scales: the same formulas as :mod:`rltune.compression`), runs the forward
pass of the (unmodified) module with ``torch.func.functional_call`` under ``torch.func.vmap``, and
updates all of them with one Adam over the stacked tensors. Adam is elementwise, so that is K
independent Adams; each student draws its own data order from its own generator and has its own
τ and α, so each gets what it would get alone (equal within float tolerance: tested).

:func:`run_stages_batched` is the batched :func:`rltune.stage.run_stage`: per student the same
prune → quantize → train → measure, with the training batched.

Not batched (a caller falls back to the one-student path, :func:`batchable` says why): weight
sharing (codebooks), the FitNets hint, BatchNorm with running statistics and Dropout (their state
and randomness are per call), students of different architectures (batch them separately).

Example usage::

    states = [start(ctx, seed=s) for s in range(16)]
    metrics = run_stages_batched(ctx, states, [Knobs(4.0, 0.9, 0.5, b) for b in (2, 3, ...)])
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.utils import parametrize

from rltune import compression as C
from rltune.distill import TrainSet
from rltune.errors import DivergedError, RltuneError


# Above this many parameters a student's stages run one at a time: batching pays for small students
# (per-batch overhead dominates: 2.6-3.4x at K=16 on 1.6k-3k-parameter students) and loses on large
# ones (0.43x on the 106k-parameter mnist1d-lenet student: 16 students' activations and 4-bit scale
# searches no longer fit in cache). Measured by experiments/env_throughput.py, one thread.
BATCH_MAX_PARAMS = 20_000


def batchable(models: Sequence[nn.Module]) -> str | None:
    """None if these prepared students can train as one batch, else why not."""
    if not models:
        return "no students"
    first = [(l.name, tuple(l.weight.shape)) for l in C.layers(models[0])]
    for m in models:
        ls = C.layers(m)
        if [(l.name, tuple(l.weight.shape)) for l in ls] != first or type(m) is not type(models[0]):
            return "the students differ in architecture"
        if any(l.compressor.shared for l in ls):
            return "weight sharing (codebooks)"
    for mod in models[0].modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
            return "BatchNorm with running statistics"
        if isinstance(mod, nn.Dropout) and mod.p > 0:
            return "Dropout"
    return None


def _latent(module: nn.Module, pname: str) -> torch.Tensor | None:
    if parametrize.is_parametrized(module, pname):
        return module.parametrizations[pname].original
    return getattr(module, pname, None)


def _skeleton(model: nn.Module) -> nn.Module:
    """A plain copy of the student (no parametrizations), whose forward functional_call drives."""
    from rltune.metrics import plain_copy

    return plain_copy(model).train()


def _exponents(flat: torch.Tensor, qmax: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
    """:func:`rltune.compression.choose_exponent` for K students at once: ``flat`` (K, rows, cols),
    ``qmax`` (K,), ``mse`` (K,) bool (at most MSE_CLIP_BITS bits: the least-error clipped scale)."""
    q = qmax.reshape(-1, 1)
    ratio = flat.abs().amax(dim=2) / q
    e = torch.ceil(8.0 * torch.log2(ratio.clamp_min(1e-30)))
    e = torch.where(torch.exp2(e / 8.0) < ratio, e + 1, e).clamp_(-128, 127)
    sel = mse.nonzero().flatten()
    if sel.numel() == 0:
        return e
    # the least-error search, only for the students at MSE_CLIP_BITS bits or fewer
    fs, es, qs = flat[sel], e[sel], q[sel]
    steps = torch.arange(C.MSE_CLIP_STEPS + 1, dtype=e.dtype)
    cand = (es[None] - steps[:, None, None]).clamp_(-128, 127)             # (S, k, rows)
    scale = torch.exp2(cand / 8.0)[..., None]                                # (S, k, rows, 1)
    qq = qs.reshape(1, -1, 1, 1)
    err = ((torch.clamp(torch.round(fs[None] / scale), -qq, qq) * scale - fs[None]) ** 2).sum(dim=3)
    best = torch.argmin(err, dim=0)                                          # (k, rows)
    e = e.clone()
    e[sel] = cand.gather(0, best[None])[0]
    return e


@torch.no_grad()
def _quantized(w: torch.Tensor, qmax: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
    """Per-output-channel fake quantization values of ``w`` (K, out, ...) at each student's qmax."""
    flat = w.reshape(w.shape[0], w.shape[1], -1)
    e = _exponents(flat, qmax, mse)
    scale = torch.exp2(e / 8.0).reshape(*e.shape, *([1] * (w.dim() - 2)))
    q = qmax.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / scale), -q, q) * scale


@torch.no_grad()
def _bias_quantized(b: torch.Tensor) -> torch.Tensor:
    """8-bit per-tensor fake quantization of K biases (K, out) (BiasCompressor's numbers)."""
    qmax = torch.full((b.shape[0],), float(2 ** (C.BIAS_BITS - 1) - 1))
    flat = b.reshape(b.shape[0], 1, -1)
    e = _exponents(flat, qmax, torch.zeros(b.shape[0], dtype=torch.bool))
    scale = torch.exp2(e / 8.0)
    q = qmax.reshape(-1, 1)
    return torch.clamp(torch.round(b / scale), -q, q) * scale


def train_epochs_batched(models: Sequence[nn.Module], data: TrainSet, epochs: int,
                         temperatures: Sequence[float], alphas: Sequence[float], lr: float = 1e-3,
                         batch_size: int = 256, generators: Sequence[torch.Generator] | None = None,
                         weight_decay: float = 0.0) -> list[float]:
    """Train K prepared students (:func:`rltune.compression.prepare_`, same architecture) for
    ``epochs`` epochs of KD + QAT under their masks and bit-widths, as one computation. Returns each
    student's mean loss over its last epoch, NaN for a student whose loss stopped being finite (its
    own parameters only go NaN: nothing crosses between students)."""
    why = batchable(models)
    if why:
        raise RltuneError(f"these students cannot train as one batch: {why}")
    K = len(models)
    gens = list(generators) if generators is not None else [None] * K
    base = _skeleton(models[0])
    layer_names = [l.name for l in C.layers(models[0])]
    per_model_layers = [C.layers(m) for m in models]
    # stacked latent parameters: compressible weights and biases, and every other parameter
    names: list[str] = []
    stacked: dict[str, nn.Parameter] = {}
    for pname, _ in base.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        vals = []
        for m in models:
            mod = m.get_submodule(owner) if owner else m
            vals.append(_latent(mod, leaf).detach())
        stacked[pname] = nn.Parameter(torch.stack(vals).clone())
        names.append(pname)
    bits = [[l.compressor.bits for l in ls] for ls in per_model_layers]
    masks = {name: torch.stack([ls[i].compressor.mask for ls in per_model_layers])
             for i, name in enumerate(layer_names)}
    qinfo = {}
    for i, name in enumerate(layer_names):
        b = torch.tensor([bits[k][i] for k in range(K)])
        qinfo[name] = (b < 32, torch.where(b < 32, 2.0 ** (b.clamp(max=8) - 1) - 1, torch.full_like(b, 127.0).float()),
                       b <= C.MSE_CLIP_BITS)
    taus = torch.tensor([float(t) for t in temperatures]).reshape(K, 1)
    alph = torch.tensor([float(a) for a in alphas]).reshape(K, 1)
    params = list(stacked.values())
    try:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    def effective() -> dict[str, torch.Tensor]:
        out = {}
        for pname in names:
            p = stacked[pname]
            owner, _, leaf = pname.rpartition(".")
            if owner in masks and leaf == "weight":
                quant, qmax, mse = qinfo[owner]
                w = p * masks[owner]
                q = _quantized(w.detach(), qmax, mse)
                sel = quant.reshape(-1, *([1] * (w.dim() - 1)))
                out[pname] = torch.where(sel, w + (q - w.detach()), w)   # STE, as fake_quantize
            elif owner in masks and leaf == "bias":
                quant = qinfo[owner][0]
                q = _bias_quantized(p.detach())
                out[pname] = torch.where(quant.reshape(-1, 1), p + (q - p.detach()), p)
            else:
                out[pname] = p
        return out

    def forward(params, x):
        return functional_call(base, params, (x,))

    batched_forward = vmap(forward, in_dims=(0, 0))
    n = len(data.y)
    diverged = torch.zeros(K, dtype=torch.bool)
    last = [math.nan] * K
    for _ in range(epochs):
        perms = torch.stack([torch.randperm(n, generator=g) for g in gens])      # (K, n)
        totals = torch.zeros(K, dtype=torch.float64)
        count = 0
        for start in range(0, n, batch_size):
            idx = perms[:, start:start + batch_size]
            xb, yb, tb = data.x[idx], data.y[idx], data.t_logits[idx]
            s = batched_forward(effective(), xb)                                   # (K, b, C)
            log_p_s = F.log_softmax(s / taus[..., None], dim=2)
            log_p_t = F.log_softmax(tb / taus[..., None], dim=2)
            kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=2)                  # (K, b)
            ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), yb.reshape(-1), reduction="none",
                                 ignore_index=-1).reshape(K, -1)
            loss_k = (alph * taus * taus * kl + (1.0 - alph) * ce).mean(dim=1)     # (K,)
            bad = ~torch.isfinite(loss_k.detach())
            diverged |= bad
            opt.zero_grad(set_to_none=True)
            torch.where(bad, torch.zeros_like(loss_k), loss_k).sum().backward()
            opt.step()
            totals += loss_k.detach().double() * idx.shape[1]
            count += idx.shape[1]
        last = [float(t / max(count, 1)) for t in totals]
    with torch.no_grad():
        for k, m in enumerate(models):
            for pname in names:
                owner, _, leaf = pname.rpartition(".")
                mod = m.get_submodule(owner) if owner else m
                _latent(mod, leaf).copy_(stacked[pname][k])
            m.eval()
    return [math.nan if bool(diverged[k]) else last[k] for k in range(K)]


def run_stages_batched(ctx, states: list, knobs: list, epochs: int | None = None) -> list:
    """:func:`rltune.stage.run_stage` for K students at once (same context): each is pruned and
    quantized to its own knobs, the K are trained as one batch, each is measured alone. Returns one
    item per student: its :class:`rltune.stage.Metrics`, or the :class:`DivergedError` its stage
    raised (NaN loss or a collapse). Falls back to one student at a time when :func:`batchable` says
    no (or the scenario uses the hint loss)."""
    from rltune.distill import predict
    from rltune.metrics import accuracy
    from rltune.stage import chance_accuracy, collapsed, measure, run_stage

    tr = ctx.scenario.training
    models = [s.model for s in states]
    big = sum(p.numel() for p in models[0].parameters()) > BATCH_MAX_PARAMS
    if big or batchable(models) or (tr["hint_weight"] > 0 and any(s.hint for s in states)) or tr["weight_sharing"]:
        out = []
        for st, kn in zip(states, knobs):
            try:
                out.append(run_stage(ctx, st, kn, epochs))
            except DivergedError as e:
                out.append(e)
        return out
    t0 = time.perf_counter()
    before = []
    for st, kn in zip(states, knobs):
        if kn.sparsity > 0:
            C.prune_(st.model, sparsity=kn.sparsity, scope=tr["pruning_scope"])
        C.unshare_all_(st.model)
        C.set_bits_(st.model, kn.bits)
        before.append(accuracy(predict(st.model, ctx.data.x_val), ctx.data.y_val))
    t1 = time.perf_counter()
    losses = train_epochs_batched(models, ctx.train_set, epochs if epochs is not None else tr["epochs_per_stage"],
                                  [k.temperature for k in knobs], [k.alpha for k in knobs], lr=tr["lr"],
                                  batch_size=tr["batch_size"], generators=[s.generator for s in states])
    t2 = time.perf_counter()
    out: list = []
    chance = chance_accuracy(ctx.data.y_val)
    share = (t1 - t0) / len(states)
    train_share = (t2 - t1) / len(states)
    for st, loss, b in zip(states, losses, before):
        if not math.isfinite(loss):
            out.append(DivergedError("training diverged: loss became nan"))
            continue
        t3 = time.perf_counter()
        m = measure(ctx, st, loss)
        why = collapsed(b, m.val_acc, chance)
        if why:
            out.append(DivergedError(why))
            continue
        m.seconds_outside_training = share + (time.perf_counter() - t3)
        m.seconds = m.seconds_outside_training + train_share
        st.history.append(m)
        out.append(m)
    return out
