"""The packed artifact: a compact, pickle-free binary file holding a compressed student.

Its length in bytes is *the* size rltune reports for a student (compression ratio =
``compress.float_bytes(model) / len(artifact)``), so every field is packed to the bit. Loading
only parses numbers (no pickle, no code from the file) and rebuilds a plain ``nn.Module`` whose
weights equal the prepared model's effective weights bit for bit, so the reloaded model predicts
exactly what the in-memory student predicts.

API::

    export_bytes(model, spec=None, in_features=None, out_features=None) -> bytes
    save_artifact(model, path, spec=None, in_features=None, out_features=None) -> int
    packed_size(model, spec=None, in_features=None, out_features=None) -> int
    load_artifact(path_or_bytes, skeleton=None) -> nn.Module       # plain module, eval mode
    entropy_bits(model) -> float                                     # zeroth-order bound, reporting

``spec`` is a built-in architecture (``rltune.models.build_model``); with ``spec=None`` the file
stores only layer shapes and ``load_artifact`` needs ``skeleton=``, an un-prepared module of the
same architecture (it is deep-copied, not modified).

Byte format (version 2; version 1 files still load)
===================================================

::

    file := "RLT" | version:u8 (=2) | body | crc:u32 big-endian
    crc  := zlib.crc32(every byte before it)

``body`` is one bit stream, most significant bit first, zero-padded to a whole byte. Below,
``uN`` is an N-bit unsigned field, ``iN`` N-bit two's complement, ``uv`` a varint: 5-bit groups
``[more:1][nibble:4]``, least significant nibble first (0..15 cost 5 bits, ..255 10, ..4095 15),
``bl(x) = x.bit_length()``.

=========================  =================  ===================================================
field                      encoding           meaning / formula
=========================  =================  ===================================================
arch                       uv                 0 custom (spec=None), 1 linear, 2 mlp, 3 cnn1d, 4 cnn2d
in_features, out_features  uv, uv             arch 1-3 only
n_hidden, hidden[i]        uv, uv each        arch == 2 only: ``spec["hidden"]``
channels                   uv                 arch == 3 only: ``spec["channels"]``
C, H, W, out_features      uv each            arch == 4 only: the input shape and the classes,
n_ch, channels[i]          uv, uv each        then ``spec["channels"]``,
n_hidden, hidden[i]        uv, uv each        ``spec["hidden"]``
kernel                     uv                 and ``spec["kernel"]``
n_layers                   uv                 arch == 0 only, then per compressible layer:
 - type                    u2                 0 nn.Linear (2 dims), 1 nn.Conv1d (3 dims),
                                              2 nn.Conv2d (4 dims); u1 in version 1 (no Conv2d)
 - dims                    uv each            ``weight.shape``
 - has_bias                u1
has_extras                 u1                 then, if 1: count (uv) and per tensor:
 - name                    uv len + u8 each   UTF-8 of the ``state_dict``-style name
 - dtype                   u4                 index in ``_DTYPES`` (float32, float64, ...)
 - ndim, dims              uv, uv each
 - data                    u8 each            the raw little-endian bytes (float32 for BatchNorm)
layer records              see below          one per nn.Linear / nn.Conv1d / nn.Conv2d, in module order
padding                    0..7 zero bits
=========================  =================  ===================================================

Layer record (``N = weight.numel()``, ``C = weight.shape[0]`` output channels, ``n`` non-zeros):

=========================  =================  ===================================================
field                      encoding           meaning / formula
=========================  =================  ===================================================
kind                       u2                 0 float32, 1 quantized, 2 shared (codebook)
bits - 2                   u3                 kind != 0 only; bits in 2..8
layout                     u2                 0 dense, 1 bitmap, 2 relative index (gaps)
bitmap                     u1 x N             layout 1: 1 where the weight is non-zero
k - 1, m, gaps             u4, uv, stream     layout 2: ``m`` gap symbols over alphabet ``2**k``
kind 1: e_min, span        i8, u8             per-channel exponents ``e_c = e_min + s_c``
kind 1: s_c                stream(C, span+1)  (channels with no non-zero code get the most
                                              common exponent: their scale is never used)
kind 1: values             stream             dense: ``c + qmax`` over ``2*qmax+1`` symbols;
                                              sparse: ``c + qmax - (c > 0)`` over ``2*qmax``
kind 2: U                  u(bits+1)          number of distinct non-zero fp16 centroids used
kind 2: codebook           u16 x U            IEEE half bits, ascending bit pattern
kind 2: values             stream             dense: 0 zero, ``j + 1`` centroid j (U+1 symbols);
                                              sparse: centroid index j (U symbols)
kind 0: values             u32 x (N or n)     IEEE float32 bits (dense: all N; sparse: non-zeros)
bias, kind 0               u32 x C            float32 bits, if the layer has a bias
bias, kind 1/2             i8, stream(C,255)  exponent ``e``, then ``code + 127``; the bias is
                                              ``code * 2**(e/8)`` (8-bit, ``quantize_bias_codes``)
=========================  =================  ===================================================

Weights are in ``weight.flatten()`` order; ``qmax = 2**(bits-1) - 1``; a quantized weight is
``c * 2**(e_c / 8)`` (``compress.dequantize_codes``), a shared one the float16 centroid, a float
one the float32 value; every position not listed as non-zero is 0. Gap coding (Deep Compression's
relative indices, with the fillers in their own symbol): the i-th non-zero sits ``d_i`` zeros
after the previous one (the first after position -1); with ``M = 2**k - 1`` it is written as
``d_i // M`` filler symbols ``M`` ("skip M zeros") and then the symbol ``d_i % M``. The encoder
tries every ``k`` and all three layouts and writes the smallest.

``stream(n, A)``: n symbols over the alphabet ``0..A-1`` (nothing at all if ``A <= 1`` or
``n == 0``), then ``mode:u1``; mode 0: each symbol in ``bl(A-1)`` bits; mode 1, a canonical
Huffman code: ``L - 1:u4`` (longest code, L <= 15), ``top:u(bl(A-1))`` (largest symbol present),
``len[0..top]`` in ``bl(L)`` bits each (0 = absent), then the code words. Code words are
assigned in order of (length, symbol): ``code_i = (sum_{j<i} 2**(L - len_j)) >> (L - len_i)``.
The encoder picks the smaller mode.

Loading checks magic, version and CRC, that every field is in range, that the stream ends in
its padding, and (for spec=None) that the skeleton's layers have the stored shapes; anything
wrong raises :class:`rltune.errors.RltuneError` with one line.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from rltune.compression import (
    COMPRESSIBLE,
    dequantize_codes,
    exponent_scale,
    layers,
    quantize_bias_codes,
    quantize_codes,
)
from rltune.errors import RltuneError, write_atomic
from rltune.models import build_model

__all__ = ["export_bytes", "save_artifact", "packed_size", "load_artifact", "entropy_bits",
           "MAGIC", "VERSION"]

MAGIC = b"RLT"
VERSION = 2
READABLE_VERSIONS = (1, 2)
_ARCH_IDS = {"linear": 1, "mlp": 2, "cnn1d": 3, "cnn2d": 4}
_DIMS = {0: 2, 1: 3, 2: 4}  # layer type -> weight dimensions
_ARCH_NAMES = {v: k for k, v in _ARCH_IDS.items()}
KIND_FLOAT, KIND_QUANT, KIND_SHARED = 0, 1, 2
LAYOUT_DENSE, LAYOUT_BITMAP, LAYOUT_GAPS = 0, 1, 2
_MAX_HUFF_LEN = 15
_MAX_GAP_BITS = 15          # alphabets of at most 2**15 symbols: a 15-bit Huffman code always fits
_BIAS_QMAX = 127
_MAX_PARAMS = 1 << 25       # refuse to materialise absurd models described by a (hostile) file
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)


class _Corrupt(Exception):
    """Internal: the body does not parse (turned into an RltuneError naming the file)."""


def _bl(x: int) -> int:
    return int(x).bit_length()


def _uv_bits(x: int) -> int:
    return 5 * max(1, -(-_bl(x) // 4))


# ---------------------------------------------------------------------------------------------
# bit I/O (numpy, MSB first)


def _bits_fixed(vals: np.ndarray, width: int) -> np.ndarray:
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    return ((vals.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).ravel()


def _bits_var(vals: np.ndarray, widths: np.ndarray) -> np.ndarray:
    widths = widths.astype(np.int64)
    total = int(widths.sum())
    ends = np.cumsum(widths)
    shift = (np.repeat(ends, widths) - 1 - np.arange(total, dtype=np.int64)).astype(np.uint64)
    return ((np.repeat(vals.astype(np.uint64), widths) >> shift) & np.uint64(1)).astype(np.uint8)


class _BitWriter:
    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._sv: list[int] = []
        self._sw: list[int] = []

    def uint(self, value: int, width: int) -> None:
        value = int(value)
        if not 0 <= value < (1 << width) and not (width == 0 and value == 0):
            raise ValueError(f"{value} does not fit in {width} bits")
        if width:
            self._sv.append(value)
            self._sw.append(width)

    def sint(self, value: int, width: int) -> None:
        self.uint(int(value) & ((1 << width) - 1), width)

    def uv(self, value: int) -> None:
        value = int(value)
        if value < 0:
            raise ValueError("negative varint")
        while True:
            nib, value = value & 15, value >> 4
            self.uint(((1 if value else 0) << 4) | nib, 5)
            if not value:
                return

    def _flush(self) -> None:
        if self._sv:
            self._parts.append(_bits_var(np.array(self._sv, np.uint64), np.array(self._sw, np.int64)))
            self._sv, self._sw = [], []

    def fixed(self, vals: np.ndarray, width: int) -> None:
        vals = np.asarray(vals)
        if width == 0 or vals.size == 0:
            return
        self._flush()
        self._parts.append(_bits_fixed(vals.ravel(), width))

    def var(self, vals: np.ndarray, widths: np.ndarray) -> None:
        if vals.size == 0:
            return
        self._flush()
        self._parts.append(_bits_var(vals, widths))

    def getvalue(self) -> bytes:
        self._flush()
        if not self._parts:
            return b""
        return np.packbits(np.concatenate(self._parts)).tobytes()


class _BitReader:
    def __init__(self, data: bytes) -> None:
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        self.end = int(bits.size)
        self.bits = np.concatenate([bits, np.zeros(2 * _MAX_HUFF_LEN + 64, np.uint8)])
        self.pos = 0

    def _need(self, nbits: int) -> None:
        if self.pos + nbits > self.end:
            raise _Corrupt("truncated (the body ends inside a field)")

    def uint(self, width: int) -> int:
        if width == 0:
            return 0
        self._need(width)
        v = 0
        for b in self.bits[self.pos:self.pos + width].tolist():
            v = (v << 1) | b
        self.pos += width
        return v

    def sint(self, width: int) -> int:
        v = self.uint(width)
        return v - (1 << width) if v >= 1 << (width - 1) else v

    def uv(self) -> int:
        value = shift = 0
        for _ in range(10):
            g = self.uint(5)
            value |= (g & 15) << shift
            shift += 4
            if not g & 16:
                return value
        raise _Corrupt("a varint is too long")

    def fixed(self, n: int, width: int) -> np.ndarray:
        if n == 0 or width == 0:
            return np.zeros(n, np.int64)
        self._need(n * width)
        seg = self.bits[self.pos:self.pos + n * width].reshape(n, width)
        self.pos += n * width
        weights = np.left_shift(np.int64(1), np.arange(width - 1, -1, -1, dtype=np.int64))
        return seg.astype(np.int64) @ weights


# ---------------------------------------------------------------------------------------------
# symbol streams: fixed width or canonical Huffman


def _tree_lengths(freq: np.ndarray) -> np.ndarray:
    """Huffman code lengths for ``freq`` (all > 0, at least two), two-queue method."""
    n = freq.size
    order = np.argsort(freq, kind="stable")
    w = freq[order].tolist()
    parent = [0] * (2 * n - 1)
    iw: list[int] = []
    i = j = 0
    for k in range(n - 1):
        total = 0
        for _ in range(2):
            if i < n and (j >= len(iw) or w[i] <= iw[j]):
                parent[i] = n + k
                total += w[i]
                i += 1
            else:
                parent[n + j] = n + k
                total += iw[j]
                j += 1
        iw.append(total)
    depth = [0] * (2 * n - 1)
    for node in range(2 * n - 3, -1, -1):
        depth[node] = depth[parent[node]] + 1
    lengths = np.empty(n, np.int64)
    lengths[order] = depth[:n]
    return lengths


def _huffman_lengths(hist: np.ndarray) -> np.ndarray:
    """Code lengths over the alphabet (0 for absent symbols), at most ``_MAX_HUFF_LEN``."""
    present = np.flatnonzero(hist)
    lengths = np.zeros(hist.size, np.int64)
    if present.size == 1:
        lengths[present] = 1
    elif present.size > 1:
        freq = hist[present].astype(np.int64)
        while True:
            ls = _tree_lengths(freq)
            if ls.max() <= _MAX_HUFF_LEN:
                break
            freq = (freq + 1) // 2       # flatten until the tree is shallow enough
        lengths[present] = ls
    return lengths


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symbols sorted by (length, symbol), their lengths, and the code of every symbol."""
    syms = np.flatnonzero(lengths)
    ls = lengths[syms]
    order = np.lexsort((syms, ls))
    syms, ls = syms[order], ls[order]
    big = int(ls.max())
    span = np.left_shift(np.int64(1), big - ls)
    starts = np.concatenate([[0], np.cumsum(span)[:-1]]).astype(np.int64)
    codes = np.zeros(lengths.size, np.int64)
    codes[syms] = starts >> (big - ls)
    return syms, ls, codes


@dataclass
class _Plan:
    bits: int
    lengths: np.ndarray | None = None     # None: fixed width


def _plan(hist: np.ndarray, alphabet: int) -> _Plan:
    """The cheaper of fixed-width and Huffman for a stream with this histogram (exact bit cost)."""
    n = int(hist.sum())
    if alphabet <= 1 or n == 0:
        return _Plan(0)
    width = _bl(alphabet - 1)
    fixed = 1 + n * width
    present = np.flatnonzero(hist)
    top = int(present[-1])
    floor = 1 + 4 + width + (top + 1)
    h = hist[present].astype(np.float64)
    entropy = float(-(h * np.log2(h / n)).sum())
    if floor + entropy >= fixed:
        return _Plan(fixed)
    lengths = _huffman_lengths(hist)
    big = int(lengths.max())
    huff = 1 + 4 + width + (top + 1) * _bl(big) + int((hist * lengths[:hist.size]).sum())
    return _Plan(huff, lengths) if huff < fixed else _Plan(fixed)


def _write_stream(wr: _BitWriter, syms: np.ndarray, alphabet: int, plan: _Plan) -> None:
    if alphabet <= 1 or syms.size == 0:
        return
    width = _bl(alphabet - 1)
    if plan.lengths is None:
        wr.uint(0, 1)
        wr.fixed(syms, width)
        return
    lengths = plan.lengths
    big = int(lengths.max())
    top = int(np.flatnonzero(lengths)[-1])
    wr.uint(1, 1)
    wr.uint(big - 1, 4)
    wr.uint(top, width)
    wr.fixed(lengths[:top + 1], _bl(big))
    _, _, codes = _canonical(lengths)
    wr.var(codes[syms], lengths[syms])


def _read_stream(rd: _BitReader, n: int, alphabet: int) -> np.ndarray:
    if alphabet <= 1 or n == 0:
        return np.zeros(n, np.int64)
    width = _bl(alphabet - 1)
    if n > rd.end - rd.pos:                     # every symbol costs at least one bit
        raise _Corrupt("truncated (a stream is longer than the rest of the body)")
    if rd.uint(1) == 0:
        syms = rd.fixed(n, width)
        if syms.size and int(syms.max()) >= alphabet:
            raise _Corrupt("a symbol is out of range")
        return syms
    big = rd.uint(4) + 1
    top = rd.uint(width)
    if top >= alphabet:
        raise _Corrupt("a Huffman table is out of range")
    lengths = rd.fixed(top + 1, _bl(big))
    if int(lengths.max()) != big:
        raise _Corrupt("a Huffman table is inconsistent")
    syms_sorted, ls, _ = _canonical(lengths)
    span = np.left_shift(np.int64(1), big - ls)
    total = int(span.sum())
    if total > 1 << big:
        raise _Corrupt("a Huffman table is over-subscribed")
    tsym = np.zeros(1 << big, np.int64)
    tlen = np.zeros(1 << big, np.int64)         # 0: no code word starts with these bits
    tsym[:total] = np.repeat(syms_sorted, span)
    tlen[:total] = np.repeat(ls, span)
    # the big-bit window at every bit position the stream may start a code word at
    start = rd.pos
    reach = max(0, min(n * big, rd.end - start))
    win = np.zeros(reach, np.int64)
    bits = rd.bits
    for j in range(big):
        win = (win << 1) | bits[start + j:start + j + reach]
    lens_at = tlen[win].tolist()
    where = [0] * n
    p = 0
    try:
        for i in range(n):
            step = lens_at[p]
            if step == 0:
                raise _Corrupt("an invalid Huffman code word")
            where[i] = p
            p += step
    except IndexError:
        raise _Corrupt("truncated (the body ends inside a Huffman stream)") from None
    if start + p > rd.end:
        raise _Corrupt("truncated (the body ends inside a Huffman stream)")
    rd.pos = start + p
    return tsym[win[np.array(where, np.int64)]]


# ---------------------------------------------------------------------------------------------
# what a layer stores


@dataclass
class _LayerData:
    kind: int
    bits: int
    shape: tuple[int, ...]
    nz: np.ndarray                  # bool, flat: the non-zero effective weights
    dense: np.ndarray | None        # kind 1/2: symbol of every weight; kind 0: float32 bits
    dense_alphabet: int
    sparse: np.ndarray              # symbols (kind 0: float32 bits) of the non-zeros
    sparse_alphabet: int
    exps: np.ndarray | None = None          # kind 1
    codebook: np.ndarray | None = None      # kind 2: uint16 bit patterns
    bias_raw: np.ndarray | None = None      # kind 0 with bias: float32 bits
    bias_exp: int = 0                       # kind 1/2 with bias
    bias_syms: np.ndarray | None = None     # kind 1/2 with bias: code + 127
    has_bias: bool = False


def _latent_bias(module: nn.Module) -> torch.Tensor | None:
    if parametrize.is_parametrized(module, "bias"):
        return module.parametrizations["bias"].original.detach()
    return None if module.bias is None else module.bias.detach()


@torch.no_grad()
def _layer_data(layer) -> _LayerData:
    wc = layer.compressor
    latent = layer.weight.detach()
    if latent.dtype != torch.float32:
        raise RltuneError(f"layer {layer.name!r}: only float32 models can be exported, got {latent.dtype}")
    shape = tuple(latent.shape)
    c_out = shape[0]
    if wc.shared:
        kind = KIND_SHARED
        vals = wc.codebook.detach().half()[wc.assign]
        nz = ((vals != 0) & wc.mask).reshape(-1).numpy()
        pat = vals.reshape(-1).view(torch.int16).numpy().view(np.uint16)[nz]
        codebook, inv = np.unique(pat, return_inverse=True)
        inv = inv.reshape(-1).astype(np.int64)
        dense = np.zeros(nz.size, np.int64)
        dense[nz] = inv + 1
        data = _LayerData(kind, wc.bits, shape, nz, dense, codebook.size + 1, inv, codebook.size,
                          codebook=codebook)
    elif wc.bits < 32:
        kind = KIND_QUANT
        qmax = 2 ** (wc.bits - 1) - 1
        codes, e = quantize_codes(latent * wc.mask, wc.bits)
        c = codes.reshape(-1).numpy().astype(np.int64)
        nz = c != 0
        dense = c + qmax
        sparse = (dense - (c > 0))[nz]
        exps = e.numpy().astype(np.int64)
        used = nz.reshape(c_out, -1).any(axis=1)
        if not used.all():
            # a channel without non-zero codes never uses its scale: give it the commonest one
            fill = int(np.bincount(exps[used] + 128).argmax()) - 128 if used.any() else 0
            exps = np.where(used, exps, fill)
        data = _LayerData(kind, wc.bits, shape, nz, dense, 2 * qmax + 1, sparse, 2 * qmax, exps=exps)
    else:
        kind = KIND_FLOAT
        flat = (latent * wc.mask).reshape(-1).numpy()
        nz = flat != 0
        raw = flat.view(np.uint32).astype(np.int64)
        data = _LayerData(kind, 32, shape, nz, raw, 0, raw[nz], 0)
    bias = _latent_bias(layer.module)
    if bias is not None:
        data.has_bias = True
        if bias.dtype != torch.float32:
            raise RltuneError(f"layer {layer.name!r}: only float32 models can be exported, got {bias.dtype}")
        if kind == KIND_FLOAT:
            data.bias_raw = bias.reshape(-1).numpy().view(np.uint32).astype(np.int64)
        else:
            codes, e = quantize_bias_codes(bias)
            data.bias_exp = int(e.reshape(-1)[0])
            data.bias_syms = codes.reshape(-1).numpy().astype(np.int64) + _BIAS_QMAX
    return data


def _values_plan(d: _LayerData, dense: bool) -> _Plan:
    if d.kind == KIND_FLOAT:
        return _Plan(32 * (d.nz.size if dense else int(d.sparse.size)))
    if dense:
        return _plan(np.bincount(d.dense, minlength=d.dense_alphabet), d.dense_alphabet)
    return _plan(np.bincount(d.sparse, minlength=d.sparse_alphabet), d.sparse_alphabet)


@dataclass
class _GapPlan:
    bits: int
    k: int
    m: int
    plan: _Plan
    d: np.ndarray


def _gap_plan(nz: np.ndarray) -> _GapPlan:
    pos = np.flatnonzero(nz)
    if pos.size == 0:
        return _GapPlan(4 + _uv_bits(0), 1, 0, _Plan(0), pos)
    d = np.diff(pos, prepend=-1) - 1
    maxd = int(d.max())
    best: _GapPlan | None = None
    for k in range(1, min(_MAX_GAP_BITS, _bl(maxd) + 1) + 1):
        big = (1 << k) - 1
        fillers = int((d // big).sum())
        hist = np.bincount(d % big, minlength=big + 1)
        hist[big] += fillers
        m = int(pos.size) + fillers
        plan = _plan(hist, big + 1)
        bits = 4 + _uv_bits(m) + plan.bits
        if best is None or bits < best.bits:
            best = _GapPlan(bits, k, m, plan, d)
    return best


def _gap_symbols(g: _GapPlan) -> np.ndarray:
    big = (1 << g.k) - 1
    fill = g.d // big
    out = np.full(g.m, big, np.int64)
    out[np.cumsum(fill + 1) - 1] = g.d % big
    return out


def _write_layer(wr: _BitWriter, d: _LayerData) -> None:
    wr.uint(d.kind, 2)
    if d.kind != KIND_FLOAT:
        wr.uint(d.bits - 2, 3)
    n_all = d.nz.size
    dense_plan = _values_plan(d, True)
    sparse_plan = _values_plan(d, False)
    gap = _gap_plan(d.nz)
    costs = [dense_plan.bits, n_all + sparse_plan.bits, gap.bits + sparse_plan.bits]
    layout = int(np.argmin(costs))
    wr.uint(layout, 2)
    if layout == LAYOUT_BITMAP:
        wr.fixed(d.nz.astype(np.uint8), 1)
    elif layout == LAYOUT_GAPS:
        wr.uint(gap.k - 1, 4)
        wr.uv(gap.m)
        _write_stream(wr, _gap_symbols(gap), 1 << gap.k, gap.plan)
    dense = layout == LAYOUT_DENSE
    if d.kind == KIND_QUANT:
        emin, emax = int(d.exps.min()), int(d.exps.max())
        wr.sint(emin, 8)
        wr.uint(emax - emin, 8)
        s = d.exps - emin
        _write_stream(wr, s, emax - emin + 1, _plan(np.bincount(s, minlength=emax - emin + 1), emax - emin + 1))
    elif d.kind == KIND_SHARED:
        wr.uint(d.codebook.size, d.bits + 1)
        wr.fixed(d.codebook, 16)
    if d.kind == KIND_FLOAT:
        wr.fixed(d.dense if dense else d.sparse, 32)
    elif dense:
        _write_stream(wr, d.dense, d.dense_alphabet, dense_plan)
    else:
        _write_stream(wr, d.sparse, d.sparse_alphabet, sparse_plan)
    if d.has_bias:
        if d.kind == KIND_FLOAT:
            wr.fixed(d.bias_raw, 32)
        else:
            wr.sint(d.bias_exp, 8)
            a = 2 * _BIAS_QMAX + 1
            _write_stream(wr, d.bias_syms, a, _plan(np.bincount(d.bias_syms, minlength=a), a))


# ---------------------------------------------------------------------------------------------
# model structure: spec header, layer shapes, extra tensors


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape) if isinstance(shape, (tuple, list, torch.Size)) else int(shape)


def _norm_spec(spec: dict[str, Any], model_layers: list, in_features, out_features) -> dict[str, Any]:
    """The header's fields: ``{"arch", "in", "out", ...}`` with ``in`` an int, or (C, H, W) for cnn2d."""
    if not isinstance(spec, dict) or spec.get("arch") not in _ARCH_IDS:
        raise RltuneError(f"unknown student spec {spec!r}: expected arch one of {', '.join(_ARCH_IDS)}")
    arch = spec["arch"]
    first, last = model_layers[0].module, model_layers[-1].module
    if in_features is None:
        if arch in ("cnn1d", "cnn2d"):
            raise RltuneError(f"exporting a {arch} student needs in_features")
        in_features = first.in_features
    if out_features is None:
        out_features = last.out_features
    h: dict[str, Any] = {"arch": arch, "out": int(out_features)}
    if arch == "cnn2d":
        shape = tuple(int(d) for d in in_features) if isinstance(in_features, (tuple, list, torch.Size)) else ()
        if len(shape) != 3:
            raise RltuneError(f"a cnn2d student needs an input shape (C, H, W), got {in_features!r}")
        ch = spec.get("channels", [6, 16])
        h.update({"in": shape, "channels": tuple(int(c) for c in (ch if isinstance(ch, (list, tuple)) else [ch])),
                  "hidden": tuple(int(x) for x in spec.get("hidden", [])), "kernel": int(spec.get("kernel", 5))})
    else:
        h["in"] = _numel(in_features)
        if arch == "mlp":
            h["hidden"] = tuple(int(x) for x in spec.get("hidden", []))
        elif arch == "cnn1d":
            h["channels"] = int(spec.get("channels", 25))
    return h


def _spec_of(h: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"arch": h["arch"]}
    for k in ("hidden", "channels", "kernel"):
        if k in h:
            spec[k] = list(h[k]) if isinstance(h[k], tuple) else h[k]
    return spec


def _build(h: dict[str, Any], meta: bool = True) -> nn.Module:
    """A built-in model from its header: on the meta device (shapes only), or on the CPU without
    touching the caller's random state (the initial weights are overwritten anyway)."""
    if meta:
        with torch.device("meta"):
            return build_model(_spec_of(h), h["in"], h["out"])
    with torch.random.fork_rng(devices=[]):
        return build_model(_spec_of(h), h["in"], h["out"])


@functools.lru_cache(maxsize=64)
def _reference(header: tuple) -> tuple[list, list, type]:
    """What a built-in architecture's header rebuilds (layer signatures, other tensors, class),
    computed once per header: export_bytes runs on every measurement and bisection step."""
    built = _build(dict(header))
    layer_names = [n for n, _ in _plain_layers(built)]
    return ([_signature(m) for _, m in _plain_layers(built)],
            [(n, tuple(t.shape), t.dtype) for n, t in _extras(built, layer_names)], type(built))


def _write_header(wr: "_BitWriter", h: dict[str, Any]) -> None:
    wr.uv(_ARCH_IDS[h["arch"]])
    if h["arch"] == "cnn2d":
        for x in (*h["in"], h["out"], len(h["channels"]), *h["channels"], len(h["hidden"]), *h["hidden"], h["kernel"]):
            wr.uv(x)
        return
    wr.uv(h["in"])
    wr.uv(h["out"])
    if h["arch"] == "mlp":
        wr.uv(len(h["hidden"]))
        for x in h["hidden"]:
            wr.uv(x)
    elif h["arch"] == "cnn1d":
        wr.uv(h["channels"])


def _read_list(rd: "_BitReader", most: int = 1024) -> tuple[int, ...]:
    n = rd.uv()
    if n > most:
        raise _Corrupt("too many layers in the architecture")
    return tuple(rd.uv() for _ in range(n))


def _read_header(rd: "_BitReader", arch: str) -> dict[str, Any]:
    if arch == "cnn2d":
        h = {"arch": arch, "in": (rd.uv(), rd.uv(), rd.uv()), "out": rd.uv()}
        h["channels"] = _read_list(rd, 4)
        h["hidden"] = _read_list(rd)
        h["kernel"] = rd.uv()
        sizes = (*h["in"], h["out"], *h["channels"], *h["hidden"], h["kernel"])
        if not h["channels"] or h["kernel"] > 11 or _numel(h["in"]) > _MAX_PARAMS:
            raise _Corrupt("an architecture size is out of range")
    else:
        h = {"arch": arch, "in": rd.uv(), "out": rd.uv()}
        if arch == "mlp":
            h["hidden"] = _read_list(rd)
        elif arch == "cnn1d":
            h["channels"] = rd.uv()
        sizes = (h["in"], h["out"], *h.get("hidden", ()), *((h["channels"],) if "channels" in h else ()))
    if max(sizes) > _MAX_PARAMS or min(sizes) < 1:
        raise _Corrupt("an architecture size is out of range")
    return h


def _plain_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE)]


def _signature(module: nn.Module) -> tuple:
    w = module.weight if not parametrize.is_parametrized(module, "weight") \
        else module.parametrizations["weight"].original
    kind = 0 if isinstance(module, nn.Linear) else (1 if isinstance(module, nn.Conv1d) else 2)
    return kind, tuple(w.shape), _latent_bias(module) is not None


def _extras(model: nn.Module, layer_names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers other than the compressible layers' weights and biases:
    BatchNorm's, LayerNorm's, a bare ``nn.Parameter``, and those a subclass of ``nn.Linear`` /
    ``nn.Conv*d`` adds (a learned gain, say; not its ``parametrizations``, rltune's own)."""
    names = set(layer_names)
    machinery = tuple(f"{n}.parametrizations" if n else "parametrizations" for n in layer_names)
    out = []
    for mname, mod in model.named_modules():
        if (mname + ".").startswith(tuple(m + "." for m in machinery)):
            continue  # a prepared layer's parametrizations: its latent weight, mask, codebook
        own = ("weight", "bias") if mname in names else ()
        prefix = mname + "." if mname else ""
        for pname, p in mod._parameters.items():
            if p is not None and pname not in own:
                out.append((prefix + pname, p))
        for bname, b in mod._buffers.items():
            if b is not None and bname not in mod._non_persistent_buffers_set:
                out.append((prefix + bname, b))
    return out


def _write_extras(wr: _BitWriter, extras: list[tuple[str, torch.Tensor]]) -> None:
    wr.uint(1 if extras else 0, 1)
    if not extras:
        return
    wr.uv(len(extras))
    for name, t in extras:
        if t.dtype not in _DTYPES:
            raise RltuneError(f"cannot export tensor {name!r} of dtype {t.dtype}")
        raw = name.encode("utf-8")
        wr.uv(len(raw))
        wr.fixed(np.frombuffer(raw, np.uint8), 8)
        wr.uint(_DTYPES.index(t.dtype), 4)
        wr.uv(t.dim())
        for s in t.shape:
            wr.uv(s)
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        wr.fixed(data, 8)


# ---------------------------------------------------------------------------------------------
# public API


def export_bytes(model: nn.Module, spec: dict[str, Any] | None = None,
                 in_features: int | None = None, out_features: int | None = None) -> bytes:
    """The packed artifact of a prepared model (see the module docstring for the format)."""
    ls = layers(model)
    wr = _BitWriter()
    extras = _extras(model, [l.name for l in ls])
    if spec is not None:
        h = _norm_spec(spec, ls, in_features, out_features)
        ref, want, cls = _reference(tuple(sorted(h.items())))
        got = [_signature(l.module) for l in ls]
        have = [(n, tuple(t.shape), t.dtype) for n, t in extras]
        # save only what load_artifact can rebuild: the built-in class with the same layers and the
        # same other tensors (a user's module with LayerNorm and equal Linear shapes is not an mlp)
        if ref != got or want != have or type(model) is not cls:
            raise RltuneError(f"the model is not the built-in {h['arch']} {spec!r} with input {h['in']} and "
                              f"{h['out']} outputs (it is a {type(model).__name__}); export it without a spec "
                              "and load it with skeleton=")
        _write_header(wr, h)
    else:
        wr.uv(0)
        wr.uv(len(ls))
        for l in ls:
            kind, shape, has_bias = _signature(l.module)
            wr.uint(kind, 2)
            for s in shape:
                wr.uv(s)
            wr.uint(int(has_bias), 1)
    _write_extras(wr, extras)
    for l in ls:
        _write_layer(wr, _layer_data(l))
    head = MAGIC + bytes([VERSION]) + wr.getvalue()
    return head + zlib.crc32(head).to_bytes(4, "big")


def packed_size(model: nn.Module, spec: dict[str, Any] | None = None,
                in_features: int | None = None, out_features: int | None = None) -> int:
    """Bytes of the packed artifact: the student's size everywhere in rltune."""
    return len(export_bytes(model, spec, in_features, out_features))


def save_artifact(model: nn.Module, path: str | os.PathLike, spec: dict[str, Any] | None = None,
                  in_features: int | None = None, out_features: int | None = None) -> int:
    """Write the packed artifact to ``path`` (atomically); returns the number of bytes written."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise RltuneError(f"an artifact path must be a non-empty file name, got {path!r:.60}")
    return write_atomic(path, export_bytes(model, spec, in_features, out_features), "artifact")


@dataclass
class _Decoded:
    kind: int
    bits: int
    nz: np.ndarray | None        # None: dense layout
    values: np.ndarray
    exps: np.ndarray | None = None
    codebook: np.ndarray | None = None
    bias: tuple | None = None


def _read_layer(rd: _BitReader, shape: tuple[int, ...], has_bias: bool) -> _Decoded:
    kind = rd.uint(2)
    if kind > KIND_SHARED:
        raise _Corrupt("unknown layer kind")
    bits = 32
    if kind != KIND_FLOAT:
        bits = rd.uint(3) + 2
        if bits > 8:
            raise _Corrupt("bit-width out of range")
    n_all = math.prod(shape)
    c_out = shape[0]
    layout = rd.uint(2)
    nz = None
    if layout == LAYOUT_BITMAP:
        nz = rd.fixed(n_all, 1).astype(bool)
    elif layout == LAYOUT_GAPS:
        k = rd.uint(4) + 1
        m = rd.uv()
        big = (1 << k) - 1
        if m > n_all:
            raise _Corrupt("too many gap symbols")
        g = _read_stream(rd, m, big + 1)
        real = g != big
        where = np.cumsum(np.where(real, g + 1, big)) - 1
        pos = where[real]
        if pos.size and int(pos[-1]) >= n_all:
            raise _Corrupt("a non-zero lies outside its layer")
        nz = np.zeros(n_all, bool)
        nz[pos] = True
    elif layout != LAYOUT_DENSE:
        raise _Corrupt("unknown layout")
    count = n_all if nz is None else int(nz.sum())
    out = _Decoded(kind, bits, nz, np.zeros(0))
    if kind == KIND_QUANT:
        qmax = 2 ** (bits - 1) - 1
        emin = rd.sint(8)
        span = rd.uint(8)
        if emin + span > 127:
            raise _Corrupt("an exponent is out of range")
        out.exps = _read_stream(rd, c_out, span + 1) + emin
        s = _read_stream(rd, count, 2 * qmax + 1 if nz is None else 2 * qmax)
        out.values = s - qmax if nz is None else s - qmax + (s >= qmax)
    elif kind == KIND_SHARED:
        u = rd.uint(bits + 1)
        if u > 1 << bits:
            raise _Corrupt("codebook too large")
        out.codebook = rd.fixed(u, 16)
        if count and u == 0:
            raise _Corrupt("empty codebook")
        out.values = _read_stream(rd, count, u + 1 if nz is None else u)
        if nz is None:
            out.nz = out.values > 0
            out.values = out.values[out.nz] - 1
    else:
        out.values = rd.fixed(count, 32)
    if has_bias:
        if kind == KIND_FLOAT:
            out.bias = ("f", rd.fixed(c_out, 32))
        else:
            e = rd.sint(8)
            out.bias = ("q", e, _read_stream(rd, c_out, 2 * _BIAS_QMAX + 1) - _BIAS_QMAX)
    return out


def _f32(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(raw.astype(np.uint32).view(np.float32).copy())


def _weight(dec: _Decoded, shape: tuple[int, ...]) -> torch.Tensor:
    n_all = math.prod(shape)
    if dec.kind == KIND_QUANT:
        if dec.nz is None:
            codes = dec.values
        else:
            codes = np.zeros(n_all, np.int64)
            codes[dec.nz] = dec.values
        e = torch.from_numpy(dec.exps.astype(np.int8))
        return dequantize_codes(torch.from_numpy(codes.astype(np.int32)).reshape(shape), e)
    if dec.kind == KIND_SHARED:
        cb = torch.from_numpy(dec.codebook.astype(np.uint16).view(np.float16).copy()).float()
        w = torch.zeros(n_all)
        w[torch.from_numpy(dec.nz)] = cb[torch.from_numpy(dec.values)]
        return w.reshape(shape)
    if dec.nz is None:
        return _f32(dec.values).reshape(shape)
    w = torch.zeros(n_all)
    w[torch.from_numpy(dec.nz)] = _f32(dec.values)
    return w.reshape(shape)


def _bias(dec: _Decoded) -> torch.Tensor:
    if dec.bias[0] == "f":
        return _f32(dec.bias[1])
    _, e, codes = dec.bias
    return torch.from_numpy(codes.astype(np.int32)).float() * exponent_scale(torch.tensor([e], dtype=torch.int8))


def _parse(data: bytes, skeleton: nn.Module | None, where: str, version: int = VERSION,
           codes: list | None = None) -> nn.Module:
    rd = _BitReader(data)
    arch_id = rd.uv()
    if arch_id == 0:
        if skeleton is None:
            raise RltuneError(f"{where} holds a custom model: pass skeleton= (an un-prepared module "
                              "of the same architecture; on the command line --skeleton MODULE:CALLABLE) to load it")
        stored = []
        for _ in range(min(rd.uv(), 1 << 20)):
            kind = rd.uint(1 if version == 1 else 2)
            if kind not in _DIMS:
                raise _Corrupt("unknown layer type")
            shape = tuple(rd.uv() for _ in range(_DIMS[kind]))
            stored.append((kind, shape, bool(rd.uint(1))))
        target = skeleton
    elif arch_id in _ARCH_NAMES:
        built = _read_header(rd, _ARCH_NAMES[arch_id])
        try:
            target = _build(built)
        except RltuneError as e:
            raise _Corrupt(f"the architecture cannot be built ({e})") from None
        stored = [_signature(m) for _, m in _plain_layers(target)]
        if skeleton is not None:
            target = skeleton
    else:
        raise _Corrupt(f"unknown architecture id {arch_id}")
    if skeleton is not None:
        target = copy.deepcopy(skeleton)
        for _, m in _plain_layers(target):
            for pname in ("weight", "bias"):
                if parametrize.is_parametrized(m, pname):
                    parametrize.remove_parametrizations(m, pname, leave_parametrized=False)
            if not m.weight.is_contiguous():  # channels_last: as prepare_ trained it, contiguous
                m.weight.data = m.weight.data.contiguous()
    plain = _plain_layers(target)
    have = [_signature(m) for _, m in plain]
    if have != stored:
        raise RltuneError(f"{where}: the skeleton's layers {[h[1] for h in have]} do not match the "
                          f"stored ones {[s[1] for s in stored]}")
    if sum(math.prod(s[1]) for s in stored) > _MAX_PARAMS:
        raise _Corrupt("the model is implausibly large")

    extras = []
    if rd.uint(1):
        for _ in range(rd.uv()):
            nlen = rd.uv()
            name = bytes(rd.fixed(nlen, 8).astype(np.uint8)).decode("utf-8", errors="replace")
            code = rd.uint(4)
            if code >= len(_DTYPES):
                raise _Corrupt("unknown dtype")
            dtype = _DTYPES[code]
            ndim = rd.uv()
            if ndim > 16:
                raise _Corrupt("too many dimensions")
            shape = tuple(rd.uv() for _ in range(ndim))
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            raw = rd.fixed(nbytes, 8).astype(np.uint8)
            extras.append((name, dtype, shape, raw))
    decoded = [_read_layer(rd, s[1], s[2]) for s in stored]
    rest = rd.end - rd.pos
    if rest >= 8 or (rest and rd.bits[rd.pos:rd.end].any()):
        raise _Corrupt("trailing data after the last layer")

    if arch_id != 0 and skeleton is None:
        target = _build(built, meta=False)
        plain = _plain_layers(target)
    want = _extras(target, [n for n, _ in plain])
    if sorted(n for n, _ in want) != sorted(e[0] for e in extras):
        raise RltuneError(f"{where}: the stored extra tensors {[e[0] for e in extras]} do not match "
                          f"the model's {[n for n, _ in want]}")
    with torch.no_grad():
        tensors = dict(want)
        for name, dtype, shape, raw in extras:
            t = tensors[name]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise RltuneError(f"{where}: tensor {name!r} is stored as {dtype} {list(shape)}, "
                                  f"the model has {t.dtype} {list(t.shape)}")
            t.copy_(torch.frombuffer(bytearray(raw.tobytes()), dtype=torch.uint8).view(dtype).reshape(shape))
        for (lname, m), s, dec in zip(plain, stored, decoded):
            m.weight.copy_(_weight(dec, s[1]))
            if codes is not None and dec.kind == KIND_QUANT:
                q = np.zeros(math.prod(s[1]), np.int64)
                if dec.nz is None:
                    q[:] = dec.values
                else:
                    q[dec.nz] = dec.values
                scale = exponent_scale(torch.from_numpy(dec.exps.astype(np.int8))).numpy()
                codes.append((lname, q.reshape(s[1]).astype(np.int8), scale))
            if dec.bias is not None:
                m.bias.copy_(_bias(dec))
    return target.eval()


def load_artifact(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview,
                  skeleton: nn.Module | None = None, codes: list | None = None) -> nn.Module:
    """Rebuild the plain (un-parametrized) model of an artifact, in eval mode.

    Built-in architectures are rebuilt from the file; a custom one (exported with spec=None)
    needs ``skeleton``, an un-prepared module of the same architecture, which is copied.
    ``codes``, a list, receives ``(layer name, int8 codes, float32 scale per output channel)`` of
    every quantized layer (weight = codes × scale), for :func:`rltune.onnx_export.export_onnx`.
    """
    if skeleton is not None and not isinstance(skeleton, nn.Module):
        hint = " (a class: pass an instance, skeleton=MyStudent())" if isinstance(skeleton, type) else ""
        raise RltuneError(f"skeleton must be an nn.Module instance, got {type(skeleton).__name__}{hint}")
    if skeleton is not None:
        from torch.nn.parameter import is_lazy

        from rltune.compression import check_python_module

        check_python_module(skeleton, "the skeleton", compiled=False)
        meta = [n for n, t in (*skeleton.named_parameters(), *skeleton.named_buffers()) if t.is_meta]
        if meta:  # copy_ into a meta tensor does nothing: the model would come back without its weights
            raise RltuneError(f"the skeleton has tensors on the meta device ({', '.join(meta[:3])}"
                              f"{', ...' if len(meta) > 3 else ''}): build it on the CPU (not under "
                              "torch.device('meta')); load_artifact fills in the weights")

        lazy = [n for n, t in (*skeleton.named_parameters(), *skeleton.named_buffers()) if is_lazy(t)]
        if lazy:
            raise RltuneError(f"the skeleton has uninitialized (lazy) tensors ({', '.join(lazy[:3])}"
                              f"{', ...' if len(lazy) > 3 else ''}; nn.LazyLinear and the like): run it once on "
                              "an input of the model's shape before passing it as skeleton=")
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, where = bytes(path_or_bytes), "artifact"
    elif not isinstance(path_or_bytes, (str, os.PathLike)) or not str(path_or_bytes):
        raise RltuneError(f"load_artifact takes a file path or bytes, got {path_or_bytes!r:.60}")
    else:
        where = str(path_or_bytes)
        try:
            data = Path(path_or_bytes).read_bytes()
        except OSError as exc:
            raise RltuneError(f"cannot read artifact {where}: {exc.strerror or exc}") from None
    if data[:len(MAGIC)] != MAGIC[:len(data)] or not data:
        raise RltuneError(f"{where} is not an rltune artifact (bad magic)")
    if len(data) < len(MAGIC) + 1 + 4:
        raise RltuneError(f"{where} is truncated ({len(data)} bytes)")
    version = data[len(MAGIC)]
    if version not in READABLE_VERSIONS:
        raise RltuneError(f"{where}: unsupported artifact version {version} (this rltune reads "
                          f"{', '.join(map(str, READABLE_VERSIONS))})")
    if zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "big"):
        raise RltuneError(f"{where} is corrupt or truncated (checksum mismatch)")
    try:
        return _parse(data[len(MAGIC) + 1:-4], skeleton, where, version, codes)
    except RltuneError:
        raise
    except _Corrupt as exc:
        raise RltuneError(f"{where} is corrupt: {exc}") from None
    except Exception as exc:  # anything a hostile body can provoke while parsing
        raise RltuneError(f"{where} is corrupt: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _entropy(syms: np.ndarray) -> float:
    if syms.size == 0:
        return 0.0
    h = np.bincount(syms).astype(np.float64)
    h = h[h > 0]
    return float(-(h * np.log2(h / syms.size)).sum())


def entropy_bits(model: nn.Module) -> float:
    """Zeroth-order entropy bound of the payload, in bits (for reporting; no headers or tables).

    Per layer: ``N * H2(n / N)`` for the sparsity pattern, the empirical entropy of the non-zero
    symbols (16 bits per centroid and 32 per float value where those are stored raw), of the
    per-channel exponents and of the bias codes.
    """
    total = 0.0
    ls = layers(model)
    for l in ls:
        d = _layer_data(l)
        n_all, n = d.nz.size, int(d.nz.sum())
        if 0 < n < n_all:
            p = n / n_all
            total += -n_all * (p * math.log2(p) + (1 - p) * math.log2(1 - p))
        if d.kind == KIND_FLOAT:
            total += 32 * n
        else:
            total += _entropy(d.sparse)
        if d.kind == KIND_QUANT:
            total += _entropy(d.exps - d.exps.min())
        if d.kind == KIND_SHARED:
            total += 16 * d.codebook.size
        if d.has_bias:
            total += 32 * d.bias_raw.size if d.kind == KIND_FLOAT else 8 + _entropy(d.bias_syms)
    for _, t in _extras(model, [l.name for l in ls]):
        total += 8 * t.numel() * t.element_size()
    return total
