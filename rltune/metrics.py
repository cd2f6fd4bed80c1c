"""Deployment metrics of a (compressed) model: MACs, latency, modelled energy, accuracy.

Torch and numpy only (no gymnasium, no SB3). Every function accepts a model prepared with
:func:`rltune.compression.prepare_` as well as a plain ``nn.Module`` (a user's own included); only
``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layers are counted, and an un-prepared layer is a dense
float32 one. ``in_features`` is the number of input features, or the shape of one input (without the
batch dimension, e.g. ``(1, 28, 28)`` for an image model).

Example usage::

    model = build_model({"arch": "mlp", "hidden": [32]}, 40, 10)
    prepare_(model); prune_(model, sparsity=0.8); set_bits_(model, 4)
    count_macs(model, 40)            # {"dense_macs": 1600, "nonzero_macs": 320}
    measure_latency(model, 40)       # {"latency_b1_s": ..., "latency_b256_s": ...}
    energy_per_inference(model, 40)  # {"energy_pj": ..., "energy_compute_pj": ..., ...}
    float_energy(model, 40)          # the same model as a dense float32 one
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from rltune.compression import BIAS_BITS, COMPRESSIBLE, weight_compressor

# Energy per operation at 45 nm, 0.9 V, in picojoules.
# Source: M. Horowitz, "Computing's energy problem (and what we can do about it)",
# IEEE ISSCC 2014, pp. 10-14, doi:10.1109/ISSCC.2014.6757323 (the per-operation table of Fig. 1.1.9).
# DRAM is given there as 1.3-2.6 nJ per 64-bit access; we take 2.0 nJ.
HOROWITZ_45NM_PJ: dict[str, float] = {
    "int8_add": 0.03,
    "int8_mult": 0.2,
    "int32_add": 0.1,
    "int32_mult": 3.1,
    "fp16_add": 0.4,
    "fp16_mult": 1.1,
    "fp32_add": 0.9,
    "fp32_mult": 3.7,
    "sram_8kb_read64": 10.0,
    "sram_32kb_read64": 20.0,
    "sram_1mb_read64": 100.0,
    "dram_read64": 2000.0,
}

# (largest storage in bytes, energy-table key) of the memory tiers, smallest first
_MEMORY_TIERS = (
    (8 * 1024, "sram_8kb_read64"),
    (32 * 1024, "sram_32kb_read64"),
    (1024 * 1024, "sram_1mb_read64"),
)


@dataclass
class LayerProfile:
    """One call of a Linear / Conv1d / Conv2d layer during a batch-1 forward pass."""

    name: str
    bits: int                 # weight bit-width (32 = float)
    shared: bool              # weights come from a float16 codebook (weight sharing)
    weights: int              # dense weight count
    nonzero_weights: int      # non-zero effective weights
    biases: int
    positions: int            # output positions the weight is applied at (1 for Linear at batch 1)
    in_activations: int       # elements of the layer's input (batch 1)
    out_activations: int      # elements of the layer's output (batch 1)

    @property
    def dense_macs(self) -> int:
        return self.weights * self.positions

    @property
    def nonzero_macs(self) -> int:
        return self.nonzero_weights * self.positions

    @property
    def quantized(self) -> bool:
        return self.bits < 32


def input_shape(in_features: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """One input's shape (no batch dimension) from a feature count or a shape."""
    if isinstance(in_features, (tuple, list, torch.Size)):
        return tuple(int(d) for d in in_features)
    return (int(in_features),)


@torch.no_grad()
def profile(model: nn.Module, in_features: int | tuple[int, ...], as_float: bool = False) -> list[LayerProfile]:
    """Per-layer counts from one batch-1 forward pass on zeros of shape ``(1, *input_shape)``.

    ``as_float=True`` describes the un-compressed model instead: every layer dense and 32-bit.
    A layer called twice appears twice. The model's train/eval mode is restored afterwards.
    """
    records: list[LayerProfile] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, inputs, output) -> None:
        w = module.weight  # the effective weight when parametrized
        out_dim = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        wc = weight_compressor(module)
        bits = 32 if (wc is None or as_float) else int(wc.bits)
        records.append(LayerProfile(
            name=names.get(module, ""),
            bits=bits,
            shared=bool(wc is not None and wc.shared and not as_float),
            weights=w.numel(),
            nonzero_weights=w.numel() if as_float else int((w != 0).sum()),
            biases=0 if module.bias is None else module.bias.numel(),
            positions=output.numel() // out_dim,
            in_activations=inputs[0].numel(),
            out_activations=output.numel(),
        ))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, COMPRESSIBLE)]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        model(torch.zeros(1, *input_shape(in_features), dtype=dtype, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return records


def count_macs(model: nn.Module, in_features: int | tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates of one inference (batch 1) in the model's Linear / Conv1d layers.

    Linear: ``in * out``; Conv: ``out_channels * output positions * in_channels / groups * kernel size``.
    ``nonzero_macs`` counts only non-zero effective weights (for a conv, non-zeros x output length).
    Biases, activations and pooling are not counted.
    """
    prof = profile(model, in_features)
    return {
        "dense_macs": sum(p.dense_macs for p in prof),
        "nonzero_macs": sum(p.nonzero_macs for p in prof),
    }


def costs(model: nn.Module, in_features: int | tuple[int, ...], packed_bytes: int | None = None) -> dict[str, float]:
    """:func:`count_macs` and :func:`energy_per_inference` together, from one profiling pass
    (what a stage measures every time: one forward with hooks instead of two)."""
    prof = profile(model, in_features)
    return {
        "dense_macs": sum(p.dense_macs for p in prof),
        "nonzero_macs": sum(p.nonzero_macs for p in prof),
        **_energy(prof, packed_bytes),
    }


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every parametrization removed and the effective weights baked in, in eval mode.

    This is what a user deploys: ordinary ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layers holding the pruned and
    quantized float weights, with no masks or quantizers left to run.
    """
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if parametrize.is_parametrized(module):
            # deepcopy shares the injected ``ParametrizedLinear`` class with the original, and
            # remove_parametrizations deletes the property from that class, which would break the
            # original model: give the copy its own clone of the class first
            cls = module.__class__
            body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, body)
            # the bias parametrization reads its weight compressor's bit-width: remove it first
            names = sorted(module.parametrizations.keys(), key=lambda n: n == "weight")
            for name in names:
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return plain.eval()


def measure_latency(
    model: nn.Module,
    in_features: int | tuple[int, ...],
    batch_sizes: tuple[int, ...] = (1, 256),
    repeats: int | None = None,
    warmup: int = 3,
    budget_s: float = 0.2,
    min_repeats: int = 5,
    max_repeats: int = 1000,
) -> dict[str, float]:
    """Median seconds per forward pass of :func:`plain_copy` under ``torch.inference_mode()``.

    Measured on one thread (``torch.set_num_threads(1)``; the previous count is restored afterwards)
    on standard-normal inputs of shape ``(batch, in_features)``. Returns ``latency_b{batch}_s`` per
    batch size. With ``repeats=None`` the number of timed passes adapts to the time budget: about
    ``budget_s`` in total over all batch sizes, but never fewer than ``min_repeats`` passes.
    """
    plain = plain_copy(model)
    param = next(plain.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    per_batch = budget_s / max(len(batch_sizes), 1)
    out: dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for bs in batch_sizes:
                x = torch.randn(int(bs), *input_shape(in_features), generator=gen).to(dtype)
                for _ in range(max(warmup, 1)):
                    t0 = time.perf_counter()
                    plain(x)
                    first = time.perf_counter() - t0
                if repeats is None:
                    n = int(min(max(per_batch / max(first, 1e-9), min_repeats), max_repeats))
                else:
                    n = max(int(repeats), 1)
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    plain(x)
                    times.append(time.perf_counter() - t0)
                out[f"latency_b{int(bs)}_s"] = float(statistics.median(times))
    finally:
        torch.set_num_threads(threads)
    return out


def _tier(storage_bytes: float) -> str:
    for limit, key in _MEMORY_TIERS:
        if storage_bytes <= limit:
            return key
    return "dram_read64"


def _mac_energy_pj(p: LayerProfile) -> float:
    t = HOROWITZ_45NM_PJ
    if not p.quantized:
        return t["fp32_mult"] + t["fp32_add"]
    if p.shared:
        return t["fp16_mult"] + t["fp32_add"]
    return t["int8_mult"] * (p.bits / 8) ** 2 + t["int32_add"]


def _energy(prof: list[LayerProfile], packed_bytes: int | None) -> dict[str, float]:
    t = HOROWITZ_45NM_PJ
    compute = sum(p.nonzero_macs * _mac_energy_pj(p) for p in prof)
    if packed_bytes is not None:
        weight_bits = 8.0 * packed_bytes
    else:
        weight_bits = float(sum(
            p.nonzero_weights * p.bits + p.biases * (BIAS_BITS if p.quantized else 32) for p in prof
        ))
    weight_tier = _tier(weight_bits / 8)
    act_tier = weight_tier if weight_tier != "dram_read64" else "sram_1mb_read64"
    act_bits = 0.0
    if prof:
        act_bits += prof[0].in_activations * (8 if prof[0].quantized else 32)
    act_bits += sum(p.out_activations * (8 if p.quantized else 32) for p in prof)
    memory_weights = weight_bits / 64 * t[weight_tier]
    memory_acts = 2 * act_bits / 64 * t[act_tier]   # each activation written once, read once
    memory = memory_weights + memory_acts
    return {
        "energy_pj": compute + memory,
        "energy_compute_pj": compute,
        "energy_memory_pj": memory,
        "energy_weights_pj": memory_weights,
        "energy_activations_pj": memory_acts,
        "weight_storage_bytes": weight_bits / 8,
    }


def energy_per_inference(model: nn.Module, in_features: int | tuple[int, ...], packed_bytes: int | None = None) -> dict[str, float]:
    """Modelled energy (picojoules) of one batch-1 inference from :data:`HOROWITZ_45NM_PJ`.

    Model (a first-order accelerator estimate, not a measurement):

    * compute = sum over layers of nonzero MACs x (mult + add). A layer quantized to ``b <= 8`` bits
      multiplies at ``int8_mult * (b/8)**2`` -- an assumption: an array multiplier's area and energy
      grow with the product of its operand widths, ~b^2 -- and accumulates with an ``int32_add``.
      A 32-bit layer uses ``fp32_mult + fp32_add``. A weight-shared layer (codebook of float16
      centroids) multiplies at ``fp16_mult`` and accumulates with ``fp32_add``.
    * weights = weight bits read once per inference / 64 x the 64-bit read energy of the memory tier
      that holds them, chosen by their total size (<= 8 KB: 10 pJ, <= 32 KB: 20 pJ, <= 1 MB: 100 pJ,
      else DRAM 2 nJ). The bits are ``8 * packed_bytes`` if given (the real artifact, indices and
      scales included), else nonzero weights x bits + biases x (8 if quantized else 32): sparse
      indices, scales and codebooks are then ignored.
    * activations = the input and every Linear/Conv1d output, at 8 bits if the layer (for the input:
      the first layer) is quantized else 32, each written once and read once, in an SRAM of the same
      tier as the weights (the 1 MB SRAM when the weights are in DRAM).

    Returns ``energy_pj`` (= ``energy_compute_pj + energy_memory_pj``) and the parts.
    """
    return _energy(profile(model, in_features), packed_bytes)


def float_energy(model: nn.Module, in_features: int | tuple[int, ...]) -> dict[str, float]:
    """:func:`energy_per_inference` of the un-compressed model: every layer dense and float32."""
    return _energy(profile(model, in_features, as_float=True), None)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label."""
    if y.numel() == 0:
        return float("nan")
    return float((logits.argmax(dim=-1) == y).float().mean())


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of rows where student and teacher predict the same class (argmax)."""
    if student_logits.shape[0] == 0:
        return float("nan")
    return float((student_logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)).float().mean())
