"""Compression ops on torch primitives: persistent pruning masks, quantization-aware training,
weight sharing. Torch only (no gymnasium, no SB3).

A model is made compressible with :func:`prepare_`, which registers a parametrization
(``torch.nn.utils.parametrize``) on the ``weight`` and ``bias`` of every ``nn.Linear`` and
``nn.Conv1d`` / ``nn.Conv2d``. The parametrization computes the *effective* weight the model uses, both while
training (with a straight-through estimator) and at inference::

    w_eff = Q_b(w * mask)

where ``Q_b`` is symmetric per-output-channel quantization to ``b`` bits::

    qmax  = 2**(b-1) - 1
    e_c   = clamp(ceil(8 * log2(max|w_c| / qmax)), -128, 127)     # one signed byte per channel
    s_c   = 2 ** (e_c / 8)                                         # scale on a 2^(1/8) grid
    x_q   = clamp(round(w / s_c), -qmax, qmax) * s_c

so at most ``2*qmax + 1 <= 2**b`` distinct values per channel, zero exactly representable (pruned
weights stay zero), and the scale is stored in one byte. At 4 bits or fewer the exponent is instead
the one (from max-abs down 12 grid steps) with the least squared quantization error: clipping a few
large weights buys resolution for the rest (see :func:`choose_exponent`; +0.6 to +9 pt at 2-3 bits). With weight sharing (Deep Compression,
Han et al. 2016) a layer's non-zero weights are instead replaced by a learned codebook of ``2**b``
centroids, rounded to float16: ``w_eff = codebook[assign] * mask``.

Biases of a quantized layer are quantized too, per tensor, to 8 bits on the same scale grid.
At ``b = 32`` nothing is quantized (float32).

The effective weights are exactly what the packed artifact stores (see ``rltune.export``), so a
reloaded artifact predicts exactly what the in-memory student predicts.

Example usage::

    model = build_model({"arch": "mlp", "hidden": [32]}, 64, 10)
    prepare_(model)
    prune_(model, sparsity=0.8)        # masks persist; a later call only removes more weights
    set_bits_(model, 4)                # QAT from now on
    ... train ...
    share_weights_(model, 4)           # optional: k-means codebook of 16 centroids per layer
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from rltune.errors import RltuneError

COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 32)
BIAS_BITS = 8


def check_bits(bits: int) -> int:
    if int(bits) != bits or int(bits) not in VALID_BITS:
        raise RltuneError(f"bit-width must be one of 2..8 or 32, got {bits!r}")
    return int(bits)


def scale_exponent(maxabs: torch.Tensor, qmax: int) -> torch.Tensor:
    """The signed-byte exponent ``e`` with ``2**(e/8) >= maxabs/qmax`` (smallest such on the grid)."""
    ratio = maxabs.float() / qmax
    e = torch.ceil(8.0 * torch.log2(ratio.clamp_min(1e-30)))
    # guard against log2 rounding: make sure the scale really covers maxabs
    e = torch.where(torch.exp2(e / 8.0) < ratio, e + 1, e)
    return e.clamp(-128, 127).to(torch.int8)


def exponent_scale(e: torch.Tensor) -> torch.Tensor:
    """Float32 scale from the stored exponent (the same op in training, export and reload)."""
    return torch.exp2(e.float() / 8.0)


MSE_CLIP_BITS = 4      # at this many bits or fewer the scale is chosen to minimise the error
MSE_CLIP_STEPS = 12    # candidates: the max-abs exponent and up to 12 grid steps below (to 35 %)


E_MIN, E_MAX = -128, 127  # the signed byte's range: scales 2**-16 .. 2**(127/8) (about 6e4)


@torch.no_grad()
def choose_exponent(flat: torch.Tensor, qmax: int, bits: int, lo: int = E_MIN, hi: int = E_MAX) -> torch.Tensor:
    """Per-row exponent (float tensor of integers in [-128, 127]) of the quantization scale.

    Above ``MSE_CLIP_BITS`` bits: the smallest grid scale that covers max|w| (nothing clipped).
    At ``MSE_CLIP_BITS`` or fewer: among that exponent and ``MSE_CLIP_STEPS`` smaller ones, the one
    with the least squared error ``‖clamp(round(w/s), ±qmax)·s − w‖²`` (clipping the largest
    weights in exchange for resolution, as in ACIQ / OCS-style clipping); ties keep the larger.
    """
    ratio = flat.abs().amax(dim=1) / qmax
    e = torch.ceil(8.0 * torch.log2(ratio.clamp_min(1e-30)))
    e = torch.where(torch.exp2(e / 8.0) < ratio, e + 1, e).clamp_(lo, hi)
    if bits > MSE_CLIP_BITS:
        return e
    cand = (e[None, :] - torch.arange(MSE_CLIP_STEPS + 1, dtype=e.dtype)[:, None]).clamp_(lo, hi)
    scale = torch.exp2(cand / 8.0)[:, :, None]                       # (K, rows, 1)
    err = ((torch.clamp(torch.round(flat[None] / scale), -qmax, qmax) * scale - flat[None]) ** 2).sum(dim=2)
    best = torch.argmin(err, dim=0)                                  # first minimum: larger scale
    return cand.gather(0, best[None, :])[0]


def quantize_codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes in ``[-qmax, qmax]`` and per-output-channel scale exponents for ``w``."""
    qmax = 2 ** (bits - 1) - 1
    flat = w.detach().reshape(w.shape[0], -1)
    e = choose_exponent(flat, qmax, bits).to(torch.int8)
    scale = exponent_scale(e).reshape(-1, *([1] * (w.dim() - 1)))
    codes = torch.clamp(torch.round(w.detach() / scale), -qmax, qmax)
    return codes.to(torch.int32), e


def dequantize_codes(codes: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    scale = exponent_scale(e).reshape(-1, *([1] * (codes.dim() - 1)))
    return codes.float() * scale


def _fake_quant_value(w: torch.Tensor, qmax: int, per_channel: bool, bits: int = 8) -> torch.Tensor:
    """The same numbers as ``dequantize_codes(*quantize_codes(w))``, without the integer casts
    (every intermediate is an exactly representable integer or power of two, so nothing changes)."""
    flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    scale = torch.exp2(choose_exponent(flat, qmax, bits) / 8.0)
    if per_channel:
        scale = scale.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


@torch.no_grad()
def scale_range_problems(model: nn.Module) -> list[str]:
    """One line per quantized layer whose weights (or bias) the one-byte scale exponent cannot
    follow: channels whose max |w| is below what the smallest scale (``2**-16``) resolves round
    to (nearly) zero, and above what the largest (``2**(127/8)``, about 6e4, times ``qmax``) covers
    are clipped (a bias only when clipped). A layer counts when its squared quantization error is
    over four times what an unbounded exponent would give and over 1e-3 of its weights' energy (a
    channel likewise, for the count). Empty when all is well."""
    out = []
    for l in layers(model):
        wc = l.compressor
        if wc.bits >= 32 or wc.shared:
            continue
        qmax = 2 ** (wc.bits - 1) - 1
        w = (l.weight.detach() * wc.mask).reshape(l.weight.shape[0], -1).float()
        rows = [(w, qmax, wc.bits, "output channels' weights")]
        b = l.module.parametrizations["bias"] if parametrize.is_parametrized(l.module, "bias") else None
        if b is not None:
            rows.append((b.original.detach().reshape(1, -1).float(), 2 ** (BIAS_BITS - 1) - 1, BIAS_BITS, "bias"))
        for t, q, bits, what in rows:
            if not bool(torch.isfinite(t).all()):
                continue  # a diverged layer has its own message
            def err(lo, hi):
                s = torch.exp2(choose_exponent(t, q, bits, lo, hi) / 8.0)[:, None]
                return ((torch.clamp(torch.round(t / s), -q, q) * s - t) ** 2).sum(dim=1)
            energy = (t ** 2).sum(dim=1)
            clamped, free = err(E_MIN, E_MAX), err(-10 ** 6, 10 ** 6)
            # the layer as a whole must lose: a nearly dead channel of weights ~1e-4 among live ones
            # rounds off, harmlessly
            if not (float(clamped.sum()) > 4 * float(free.sum()) and float(clamped.sum()) > 1e-3 * float(energy.sum())):
                continue
            bad = (clamped > 4 * free) & (clamped > 1e-3 * energy)
            maxabs = t.abs().amax(dim=1)[bad]
            small = bool((maxabs < 1.0).all())
            if not bool(bad.any()) or (small and what == "bias"):
                continue  # a bias under 2e-3 is noise beside the weights' products: rounding it is harmless
            n = f"{int(bad.sum())} of {t.shape[0]} {what}" if what != "bias" else "its bias values"
            if small:
                why = (f"are too small for the quantizer's smallest scale (2^-16) at {bits} bits (max |w| "
                       f"{float(maxabs.max()):.2g}) and round to zero or a few levels")
                fix = ("standardise the inputs (zero mean, unit variance: features of ~1e4 make first-layer weights "
                       "of ~1e-5) or rescale the layer so its weights are of order 1e-2..1e2")
            else:
                why = (f"are too large for the quantizer's largest scale (about 6e4 per step) at {bits} bits (max |w| "
                       f"{float(maxabs.max()):.2g}) and are clipped")
                fix = "rescale the layer (or standardise its inputs) so its weights are of order 1e-2..1e2"
            out.append(f"layer {l.name!r}: {n} {why}; the reported accuracy is this quantized model's; {fix}")
    return out


def warn_scale_range(model: nn.Module, name: str = "problem") -> None:
    """A :class:`RltuneWarning` per line of :func:`scale_range_problems`."""
    import warnings

    from rltune.errors import RltuneWarning

    for line in scale_range_problems(model):
        warnings.warn(RltuneWarning(f"{name}: {line}"), stacklevel=3)


def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q_b(w)`` in the forward pass, identity gradient in the backward pass (STE)."""
    with torch.no_grad():
        q = _fake_quant_value(w, 2 ** (bits - 1) - 1, True, bits)
    return w + (q - w.detach())


def quantize_bias_codes(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2 ** (BIAS_BITS - 1) - 1
    e = scale_exponent(b.detach().abs().amax().reshape(1), qmax)
    codes = torch.clamp(torch.round(b.detach() / exponent_scale(e)), -qmax, qmax)
    return codes.to(torch.int32), e


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 in the forward pass, identity gradient."""
    return x + (x.detach().half().float() - x.detach())


class WeightCompressor(nn.Module):
    """Parametrization of a layer's weight: ``w_eff = Q_b(w * mask)`` or ``codebook[assign] * mask``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", torch.ones(weight.shape, dtype=torch.bool))  # contiguous: read flat
        self.register_buffer("assign", torch.zeros(0, dtype=torch.long))
        self.bits = 32
        self.codebook: nn.Parameter | None = None
        self.codebook_init: torch.Tensor | None = None

    @property
    def shared(self) -> bool:
        return self.codebook is not None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.codebook is not None:
            return fp16_round(self.codebook)[self.assign] * self.mask
        w = w * self.mask
        if self.bits < 32:
            w = fake_quantize(w, self.bits)
        return w


class BiasCompressor(nn.Module):
    """Parametrization of a bias: 8-bit per-tensor quantization when its layer is quantized."""

    def __init__(self, weight_compressor: WeightCompressor):
        super().__init__()
        # plain attribute, not a submodule: the weight parametrization owns it
        self.__dict__["_wc"] = weight_compressor

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        if self._wc.bits >= 32:
            return b
        with torch.no_grad():
            q = _fake_quant_value(b, 2 ** (BIAS_BITS - 1) - 1, False).reshape(b.shape)
        return b + (q - b.detach())


def weight_compressor(module: nn.Module) -> WeightCompressor | None:
    """The compression parametrization on ``module.weight``, or None if it has none."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, WeightCompressor):
            return p
    return None


@dataclass
class Layer:
    name: str
    module: nn.Module
    compressor: WeightCompressor

    @property
    def weight(self) -> torch.Tensor:
        """The raw (latent) float weight being trained."""
        return self.module.parametrizations["weight"].original

    @property
    def effective_weight(self) -> torch.Tensor:
        return self.module.weight


def check_untied(model: nn.Module) -> None:
    """Refuse tied weights: a compressible layer's weight or bias held anywhere else in the model,
    by another compressible layer or by any other module (an ``nn.Embedding`` tied to a ``Linear``
    head, a bare ``nn.Parameter`` aliasing a layer's weight). Compression replaces the layer's
    weight by its pruned, quantized one; the other holder would keep reading the float original
    in training while the saved artifact (one tensor) gives it the compressed one. A module used
    twice is fine: it is one layer, compressed once."""
    def original(module: nn.Module, pname: str):
        if parametrize.is_parametrized(module, pname):
            return module.parametrizations[pname].original
        return module._parameters.get(pname)

    mine: dict[int, str] = {}   # a compressible layer's weight / bias -> "layer.weight"
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSIBLE):
            for pname in ("weight", "bias"):
                t = original(module, pname)
                if t is None:
                    continue
                where = f"{name}.{pname}" if name else pname
                if id(t) in mine:
                    raise RltuneError(f"{mine[id(t)]!r} and {where!r} are one tensor (tied weights): rltune cannot "
                                      "compress tied weights; untie them or give the layers their own weights")
                mine[id(t)] = where
    for name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # rltune's own parametrization of a prepared layer: its latent weight
        own = ("weight", "bias") if isinstance(module, COMPRESSIBLE) else ()
        for pname, t in module._parameters.items():
            if t is None or pname in own or id(t) not in mine:
                continue
            where = f"{name}.{pname}" if name else pname
            raise RltuneError(f"{where!r} is the same tensor as {mine[id(t)]!r} (tied weights, e.g. an embedding "
                              "tied to a Linear head): rltune cannot compress tied weights, the compressed layer and "
                              f"{where!r} would hold different values; untie them (give one its own copy)")


def check_python_module(model: nn.Module, role: str = "student", compiled: bool = True) -> None:
    """Refuse a ``torch.jit`` (scripted or traced) or ``torch.compile``'d module anywhere in ``model``:
    rltune swaps its layers' weights for compressed ones and rebuilds its class, which a TorchScript
    module hides (its Linears are not ``nn.Linear``: they would stay float) and Dynamo's wrapper cannot
    trace (an AssertionError from deep inside torch._dynamo). ``compiled=False`` lets a compiled one
    pass (a skeleton only receives weights)."""
    for name, m in model.named_modules():
        where = f"{role}" if not name else f"{role}: its submodule {name!r}"
        if isinstance(m, torch.jit.ScriptModule):
            raise RltuneError(f"{where} is a TorchScript module (torch.jit.script / trace): give rltune the Python "
                              "nn.Module it was made from, and script the compressed result (r.model) if you need to")
        if compiled and type(m).__name__ == "OptimizedModule" and isinstance(getattr(m, "_orig_mod", None), nn.Module):
            raise RltuneError(f"{where} is a torch.compile'd module: give rltune the module itself (its _orig_mod), "
                              "and compile the compressed result (r.model) if you need to")


def check_plain_weights(model: nn.Module) -> None:
    """Refuse a compressible layer whose weight or bias is not a plain parameter: one with a
    parametrization of its own (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``,
    ``orthogonal``, a user's ``register_parametrization``) or one computed by a forward pre-hook
    (the older ``torch.nn.utils.weight_norm``, ``torch.nn.utils.prune``). rltune's own
    parametrizations (a prepared model) are fine."""
    for name, module in model.named_modules():
        if not isinstance(module, COMPRESSIBLE):
            continue
        for pname in ("weight", "bias"):
            if parametrize.is_parametrized(module, pname):
                own = WeightCompressor if pname == "weight" else BiasCompressor
                plist = module.parametrizations[pname]
                if len(plist) == 1 and isinstance(plist[0], own):
                    continue
                kinds = ", ".join(type(p).__name__ for p in plist)
                raise RltuneError(f"layer {name!r}: its {pname} has a parametrization of its own ({kinds}: "
                                  "weight_norm, spectral_norm and the like): rltune compresses plain weights; "
                                  f"remove it first (torch.nn.utils.parametrize.remove_parametrizations(layer, "
                                  f"{pname!r}))")
            if pname == "weight" or getattr(module, pname, None) is not None:
                if not isinstance(module._parameters.get(pname), nn.Parameter):
                    raise RltuneError(f"layer {name!r}: its {pname} is not a parameter but computed by a hook (the "
                                      "older torch.nn.utils.weight_norm, or torch.nn.utils.prune?): rltune compresses "
                                      "plain weights; remove the hook first (torch.nn.utils.remove_weight_norm, "
                                      "torch.nn.utils.prune.remove)")


def prepare_(model: nn.Module) -> nn.Module:
    """Register compression parametrizations on every Linear / Conv1d / Conv2d weight and bias
    (idempotent). Every other module (LayerNorm, BatchNorm, embeddings, custom parameters) stays
    float32. Tied weights (one tensor in two layers) and weights that are not plain parameters
    (:func:`check_plain_weights`) are refused with an :class:`RltuneError`."""
    check_plain_weights(model)
    check_untied(model)
    found = False
    for module in model.modules():
        if isinstance(module, COMPRESSIBLE):
            found = True
            if weight_compressor(module) is not None:
                continue
            if not module.weight.is_contiguous():  # channels_last: masks and pruning index it flat
                module.weight.data = module.weight.data.contiguous()
            wc = WeightCompressor(module.weight)
            parametrize.register_parametrization(module, "weight", wc)
            if module.bias is not None:
                parametrize.register_parametrization(module, "bias", BiasCompressor(wc))
    if not found:
        raise RltuneError("the model has no nn.Linear, nn.Conv1d or nn.Conv2d layer to compress")
    return model


def layers(model: nn.Module) -> list[Layer]:
    """The compressible layers of a prepared model, in module order."""
    out = []
    for name, module in model.named_modules():
        wc = weight_compressor(module) if isinstance(module, COMPRESSIBLE) else None
        if wc is not None:
            out.append(Layer(name, module, wc))
    if not out:
        raise RltuneError("model is not prepared for compression: call prepare_(model) first")
    return out


def _magnitude(layer: Layer) -> torch.Tensor:
    """|w| of the weights still alive (0 where masked); shared layers rank by their centroid."""
    wc = layer.compressor
    w = layer.effective_weight if wc.shared else layer.weight
    return w.detach().abs() * wc.mask


def _keep_one(layer: Layer, mag: torch.Tensor) -> None:
    """Never empty a layer entirely: a magnitude rule may not disconnect the network."""
    if not layer.compressor.mask.any():
        layer.compressor.mask.view(-1)[mag.flatten().argmax()] = True


@torch.no_grad()
def prune_(
    model: nn.Module,
    sparsity: float | None = None,
    threshold: float | None = None,
    scope: str = "layer",
) -> float:
    """Magnitude pruning; masks only ever lose weights, so sparsity can rise over stages.

    Give either ``sparsity`` (the fraction of weights to be zero, layer-wise or ``scope="global"``)
    or ``threshold`` (prune every weight with ``|w| <= threshold``). Returns the sparsity reached.
    """
    if (sparsity is None) == (threshold is None):
        raise RltuneError("prune_ takes exactly one of sparsity or threshold")
    if scope not in ("layer", "global"):
        raise RltuneError(f"pruning scope must be 'layer' or 'global', got {scope!r}")
    ls = layers(model)
    if threshold is not None:
        for layer in ls:
            mag = _magnitude(layer)
            layer.compressor.mask &= mag > threshold
            _keep_one(layer, mag)
        return weight_sparsity(model)
    if not 0.0 <= sparsity < 1.0:
        raise RltuneError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope == "global":
        mags = torch.cat([_magnitude(l).flatten() for l in ls])
        k = int(round(sparsity * mags.numel()))
        if k > 0:
            thr = torch.kthvalue(mags, k).values
            for layer in ls:
                mag = _magnitude(layer)
                layer.compressor.mask &= mag > thr
                _keep_one(layer, mag)
    else:
        for layer in ls:
            mag = _magnitude(layer).flatten()
            k = int(round(sparsity * mag.numel()))
            if k > 0:
                idx = torch.topk(mag, k, largest=False).indices
                layer.compressor.mask.view(-1)[idx] = False
    return weight_sparsity(model)


def prune_layers_(model: nn.Module, sparsities) -> float:
    """Magnitude pruning with one sparsity per compressible layer (masks only lose weights)."""
    ls = layers(model)
    if len(sparsities) != len(ls):
        raise RltuneError(f"got {len(sparsities)} sparsities for {len(ls)} layers")
    for layer, s in zip(ls, sparsities):
        if not 0.0 <= float(s) < 1.0:
            raise RltuneError(f"sparsity must be in [0, 1), got {s}")
        mag = _magnitude(layer).flatten()
        k = int(round(float(s) * mag.numel()))
        if k > 0:
            layer.compressor.mask.view(-1)[torch.topk(mag, k, largest=False).indices] = False
    return weight_sparsity(model)


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of compressible weights that are zero in the effective model."""
    zeros = total = 0
    with torch.no_grad():
        for layer in layers(model):
            w = layer.effective_weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / max(total, 1)


def set_bits_(model: nn.Module, bits: int | list[int]) -> None:
    """Set the bit-width of every compressible layer (an int, or one per layer). Drops any codebook."""
    ls = layers(model)
    per = [bits] * len(ls) if isinstance(bits, int) else list(bits)
    if len(per) != len(ls):
        raise RltuneError(f"got {len(per)} bit-widths for {len(ls)} layers")
    for layer, b in zip(ls, per):
        b = check_bits(b)
        wc = layer.compressor
        if wc.shared and (b != wc.bits):
            unshare_(layer)
        wc.bits = b


@torch.no_grad()
def _kmeans_1d(x: torch.Tensor, k: int, iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means in one dimension with linear initialisation (Deep Compression's best init)."""
    lo, hi = float(x.min()), float(x.max())
    centroids = torch.linspace(lo, hi, k) if k > 1 else x.mean().reshape(1)
    for _ in range(iters):
        assign = torch.argmin((x[:, None] - centroids[None, :]).abs(), dim=1)
        sums = torch.zeros(k).index_add_(0, assign, x)
        counts = torch.zeros(k).index_add_(0, assign, torch.ones_like(x))
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        # an empty cluster (pruned weights leave a gap around zero) moves to the worst-fit point
        for j in torch.nonzero(counts == 0).flatten().tolist():
            err = (x - new[assign]).abs()
            if float(err.max()) == 0.0:
                break
            worst = int(err.argmax())
            new[j] = x[worst]
            assign[worst] = j
        if torch.allclose(new, centroids):
            break
        centroids = new
    assign = torch.argmin((x[:, None] - centroids[None, :]).abs(), dim=1)
    return centroids, assign


def share_weights_(model: nn.Module, bits: int | None = None) -> None:
    """Replace each quantized layer's non-zero weights by a codebook of ``2**bits`` centroids.

    The centroids are trainable (their gradient is the sum over the weights that share them, as in
    Deep Compression) and rounded to float16; the assignment is fixed until the next call.
    Layers at 32 bits are left in float.
    """
    for layer in layers(model):
        wc = layer.compressor
        b = check_bits(bits if bits is not None else wc.bits)
        if b >= 32:
            continue
        with torch.no_grad():
            if wc.shared:
                unshare_(layer)
            w = layer.weight.detach() * wc.mask
            wc.bits = b
            nz = w[wc.mask]
            if nz.numel() == 0:
                nz = torch.zeros(1)
            centroids, assign_nz = _kmeans_1d(nz, 2 ** b)
            big = float(centroids.abs().max())
            if not big <= 65504:  # the codebook is float16: past its largest value a weight is inf (NaN logits)
                raise RltuneError(f"layer {layer.name!r}: weight sharing stores its centroids in float16, whose largest "
                                  f"value is 65504, and its weights reach {big:.2g}: rescale the layer (or standardise "
                                  "its inputs) so its weights are of order 1e-2..1e2, or turn weight sharing off")
            assign = torch.zeros(w.numel(), dtype=torch.long)
            assign[wc.mask.flatten()] = assign_nz
            wc.assign = assign.reshape(w.shape)
        wc.codebook = nn.Parameter(centroids.clone())
        wc.codebook_init = centroids.clone()


@torch.no_grad()
def unshare_(layer: Layer) -> None:
    """Drop the codebook, moving each latent weight by how far its centroid moved in training.

    The latent weights keep their spread within a cluster, so a later ``share_weights_`` at
    another bit-width clusters the real weights, not the previous codebook.
    """
    wc = layer.compressor
    if not wc.shared:
        return
    moved = fp16_round(wc.codebook)[wc.assign] - wc.codebook_init[wc.assign]
    layer.weight.add_(moved * wc.mask)
    wc.codebook = None
    wc.codebook_init = None
    wc.assign = torch.zeros(0, dtype=torch.long)


def unshare_all_(model: nn.Module) -> None:
    for layer in layers(model):
        unshare_(layer)


def iter_params(model: nn.Module) -> Iterator[nn.Parameter]:
    """Trainable parameters, codebooks included (call after every share_weights_)."""
    return iter([p for p in model.parameters() if p.requires_grad])


def model_bits(model: nn.Module) -> float:
    """Mean bit-width over compressible weights (weighted by size)."""
    ls = layers(model)
    total = sum(l.weight.numel() for l in ls)
    return sum(l.compressor.bits * l.weight.numel() for l in ls) / max(total, 1)


def layer_summary(model: nn.Module) -> list[dict]:
    """Per compressible layer: name, kind, weight count, bit-width, sparsity, weight sharing."""
    out = []
    with torch.no_grad():
        for l in layers(model):
            w = l.effective_weight
            out.append({"name": l.name, "kind": type(l.module).__name__.replace("Parametrized", ""),
                        "params": int(w.numel()), "bits": int(l.compressor.bits),
                        "sparsity": float((w == 0).sum()) / max(w.numel(), 1), "shared": bool(l.compressor.shared)})
    return out


def float_bytes(model: nn.Module) -> int:
    """Bytes of the float32 dense model, 4 per parameter: the compression ratio's denominator.

    Codebooks added by weight sharing are not parameters of the dense model and are not counted.
    """
    return 4 * sum(p.numel() for n, p in model.named_parameters() if not n.endswith("codebook"))


