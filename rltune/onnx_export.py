"""Export a (compressed) model to ONNX with its quantized weights stored as int8.

:func:`export_onnx` exports :func:`rltune.metrics.plain_copy` of the model (parametrizations
removed, effective weights baked in, eval mode) with ``torch.onnx.export``: the TorchScript
exporter first (``dynamo=False``: fast, keeps parameter names as initializer names, does not fold
BatchNorm), the dynamo exporter if that one is unavailable or fails. Input ``"input"`` and output
``"logits"`` have a dynamic batch dimension (dimension 0).

The graph is then rewritten so that the weight of every quantized (2..8 bits), non-shared
compressible layer (``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``) is stored as three initializers

* ``<name>_quantized``:  int8, the integer codes ``q`` in ``[-qmax, qmax]`` (the weight's shape),
* ``<name>_scale``:      float32, one scale per output channel,
* ``<name>_zero_point``: int8, zeros (one per output channel),

followed by a ``DequantizeLinear`` node (``axis=0``, the output channel) computing, per output
channel ``c``::

    w = (q - zero_point) * scale          # here: w[c] = q[c] * scale[c]

whose output carries the original initializer's name, so the rest of the graph is untouched. (If
an exporter stored a Linear weight transposed, ``(in, out)``, the codes stay ``(out, in)`` and a
``Transpose`` node after the ``DequantizeLinear`` carries the name.)
For rltune's quantizer ``scale[c] = 2 ** (e_c / 8)`` and the result is bit-identical to the
weight the PyTorch model uses. If an exporter folded a per-channel constant into a weight (the
dynamo exporter folds BatchNorm into convolutions), the scale absorbs that constant instead.
Biases, normalisation layers, weight-shared (codebook) layers and 32-bit layers stay float32; a
layer whose weight cannot be matched with an initializer also stays float (and is counted), and
so does every layer below opset 13 (no per-channel ``DequantizeLinear`` there).

The exporters' warnings and output are silenced by redirecting file descriptors 1 and 2 for the
duration of the export (process-wide: other threads' output is dropped meanwhile).

Needs ``onnx`` (``pip install 'rltune[onnx]'``); :func:`onnx_predict` also needs ``onnxruntime``.
Both are imported lazily, so ``rltune`` itself imports without them.

Example::

    info = export_onnx(student, "student.onnx", torch.randn(8, 40))
    logits = onnx_predict("student.onnx", x)          # numpy array, like plain_copy(student)(x)
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rltune.compression import COMPRESSIBLE, dequantize_codes, exponent_scale, layers, quantize_codes
from rltune.errors import RltuneError, write_atomic
from rltune.metrics import plain_copy

_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "onnxscript")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet():
    """Silence warnings, log records and anything printed (Python or C level) by the exporters."""
    saved_levels = {n: logging.getLogger(n).level for n in _QUIET_LOGGERS}
    saved_fds: list[int] = []
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()          # what was printed before must not be lost with the redirection
    with warnings.catch_warnings(), open(os.devnull, "w") as null, \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for n in _QUIET_LOGGERS:
            logging.getLogger(n).setLevel(logging.CRITICAL + 1)
        try:
            for fd in (1, 2):
                saved_fds.append(os.dup(fd))
                os.dup2(null.fileno(), fd)
        except OSError:  # no real file descriptors (embedded interpreters): Python-level only
            pass
        try:
            yield
        finally:
            for fd, saved in zip((1, 2), saved_fds):
                os.dup2(saved, fd)
                os.close(saved)
            for n, level in saved_levels.items():
                logging.getLogger(n).setLevel(level)


def _torch_export(plain: nn.Module, x: torch.Tensor, opset: int, dynamo: bool) -> bytes:
    buf = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.onnx.export(plain, (x,), buf, dynamo=dynamo, opset_version=opset,
                          do_constant_folding=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    data = buf.getvalue()
    if not data:
        raise RuntimeError("the exporter wrote nothing")
    return data


def _quant_specs(model: nn.Module) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """``(layer name, int8 codes, float32 scale per channel, float32 weight)`` of every quantized,
    non-shared layer; the weight is ``codes * scale`` and equals the layer's effective weight."""
    try:
        ls = layers(model)
    except RltuneError:  # a plain module: nothing is quantized
        return []
    specs = []
    with torch.no_grad():
        for layer in ls:
            wc = layer.compressor
            w = layer.weight.detach()
            if wc.shared or wc.bits >= 32 or w.dtype != torch.float32:
                continue
            codes, e = quantize_codes(w * wc.mask, wc.bits)
            ref = dequantize_codes(codes, e)
            if not torch.equal(ref, layer.effective_weight.detach()):
                continue  # not the documented quantizer: leave it float rather than guess
            specs.append((layer.name, codes.numpy().astype(np.int8), exponent_scale(e).numpy(), ref.numpy()))
    return specs


def _per_channel_scale(codes: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(codes', scale)`` with ``codes' * scale[:, None] ≈ w`` per row (sign folded into the codes),
    or None when some row of ``w`` is not proportional to its codes."""
    c2 = codes.reshape(codes.shape[0], -1)
    w2 = w.reshape(w.shape[0], -1)
    nz = c2 != 0
    if np.any(w2[~nz] != 0):
        return None
    idx = np.argmax(np.abs(c2), axis=1)
    rows = np.arange(c2.shape[0])
    ratio = w2[rows, idx].astype(np.float64) / np.where(nz.any(axis=1), c2[rows, idx], 1)
    ratio = np.where(nz.any(axis=1), ratio, 1.0)
    if not np.all(np.isfinite(ratio)) or np.any(ratio == 0):
        return None
    sign = np.where(ratio < 0, -1, 1).astype(np.int8)
    scale = np.abs(ratio).astype(np.float32)
    q = (c2 * sign[:, None]).astype(np.int8)
    if not np.allclose(q.astype(np.float32) * scale[:, None], w2, rtol=1e-6, atol=0.0):
        return None
    return q.reshape(codes.shape), scale


def _match(spec, arr: np.ndarray, exact: bool):
    """How initializer ``arr`` stores the layer of ``spec``: ``(q, scale, axis)`` or None. Exactly:
    ``arr`` is the effective weight (or its transpose, a Linear weight stored ``(in, out)``).
    Otherwise: every output channel of ``arr`` is proportional to the layer's codes."""
    _, codes, scale, ref = spec
    # only weights stored (out, ...): onnxruntime 1.32 computes DequantizeLinear feeding a
    # transposed weight wrongly (Gemm with axis=1; Transpose -> MatMul at its default optimisation
    # level, measured 0.1 logit off), so a weight an exporter transposed stays float
    for axis in (0,):
        c, r = (codes, ref) if axis == 0 else (codes.T, ref.T)
        if arr.shape != c.shape:
            continue
        if exact:
            if np.array_equal(arr, r):
                return c, scale, axis
        else:
            got = _per_channel_scale(codes, arr if axis == 0 else arr.T)
            if got is not None:
                return (got[0] if axis == 0 else got[0].T), got[1], axis
    return None


def _quantize_graph(proto, specs) -> int:
    """Replace the matching float initializers of ``proto`` by int8 + DequantizeLinear; returns the
    number of layers quantized."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13 or not specs:  # per-channel DequantizeLinear needs opset 13
        return 0
    inits = {t.name: t for t in graph.initializer}
    # a weight read through a Transpose stays float: onnxruntime 1.32 fuses DequantizeLinear ->
    # Transpose -> MatMul (a bias-free Linear) wrongly at its default optimisation level
    transposed = {i for n in graph.node if n.op_type == "Transpose" for i in n.input}
    floats = {n: numpy_helper.to_array(t) for n, t in inits.items()
              if t.data_type == TensorProto.FLOAT and n not in transposed}
    found: dict[str, tuple[str, np.ndarray, np.ndarray, int]] = {}   # layer -> (init, q, scale, axis)
    claimed: set[str] = set()
    for spec in specs:                                     # the initializer named after the weight
        name, key = spec[0], f"{spec[0]}.weight"
        if key in floats:
            hit = _match(spec, floats[key], exact=True) or _match(spec, floats[key], exact=False)
            if hit is not None:
                found[name] = (key, *hit)
                claimed.add(key)
    for spec in specs:                                     # else any unclaimed proportional one
        name = spec[0]
        if name in found:
            continue
        for key, arr in floats.items():
            if key in claimed or arr.size != spec[1].size:
                continue
            hit = _match(spec, arr, exact=False)
            if hit is not None:
                found[name] = (key, *hit)
                claimed.add(key)
                break
    if not found:
        return 0

    taken = set(inits) | {i.name for i in graph.input} | {o for n in graph.node for o in n.output}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    replaced = {key for key, *_ in found.values()}
    new_inits, dq_nodes = [], []
    for key, q, scale, axis in found.values():
        qn, sn, zn = fresh(f"{key}_quantized"), fresh(f"{key}_scale"), fresh(f"{key}_zero_point")
        # a weight stored (in, out) keeps its codes (out, in) and gets a Transpose after the
        # dequantization: onnxruntime 1.32's QDQ fusions get DequantizeLinear(axis=1) -> Gemm wrong
        new_inits += [numpy_helper.from_array(np.ascontiguousarray(q if axis == 0 else q.T, dtype=np.int8), qn),
                      numpy_helper.from_array(scale.astype(np.float32), sn),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), zn)]
        dq_out = key if axis == 0 else fresh(f"{key}_dequantized")
        dq_nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [dq_out], axis=0,
                                         name=fresh(f"{key}_DequantizeLinear")))
        if axis != 0:
            dq_nodes.append(helper.make_node("Transpose", [dq_out], [key], perm=[1, 0],
                                             name=fresh(f"{key}_Transpose")))
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    inputs = [i for i in graph.input if i.name not in replaced]   # initializers listed as inputs
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(dq_nodes + nodes)                    # constants first: stays topologically sorted
    return len(found)


def export_onnx(model: nn.Module, path, example_input: torch.Tensor, opset: int = 17,
                codes: list | None = None) -> dict:
    """Write ``model`` (a prepared rltune student or a plain module) to ``path`` as ONNX.

    ``codes`` gives the quantization of a plain module instead (a reloaded artifact):
    ``(layer name, int8 codes, float32 scale per output channel)`` per quantized layer, as
    ``rltune.load_artifact(..., codes=[])`` fills it.

    Quantized non-shared layers are stored as int8 codes + per-channel scale (see the module
    docstring); onnxruntime then predicts what ``plain_copy(model)`` predicts. The file is written
    atomically. Returns ``{"onnx_bytes", "quantized_layers", "float_layers", "exporter"}`` where
    ``float_layers`` counts the Linear / Conv layers left float32 and ``exporter`` is
    ``"torchscript"`` or ``"dynamo"``. Any problem exporting the model raises :class:`RltuneError`.
    """
    try:
        import onnx
    except ImportError:
        raise RltuneError("ONNX export needs the onnx package: pip install 'rltune[onnx]'") from None
    x = example_input if isinstance(example_input, torch.Tensor) else torch.as_tensor(example_input)
    try:
        plain = plain_copy(model)
        specs = _quant_specs(model)
        if codes:
            specs = [(n, q.astype(np.int8), sc.astype(np.float32),
                      q.astype(np.float32) * sc.astype(np.float32).reshape(-1, *([1] * (q.ndim - 1))))
                     for n, q, sc in codes]
        n_layers = sum(isinstance(m, COMPRESSIBLE) for m in plain.modules())
        with torch.no_grad():
            plain(x)
    except RltuneError:
        raise
    except Exception as exc:
        raise RltuneError(f"the model could not be exported to ONNX: its forward pass failed on the "
                          f"example input: {_first_line(exc)}") from None

    try:
        data, exporter = _torch_export(plain, x[:2], opset, dynamo=False), "torchscript"
    except Exception as first:
        try:
            data, exporter = _torch_export(plain, x[:2], opset, dynamo=True), "dynamo"
        except Exception:
            raise RltuneError(f"the model could not be exported to ONNX: {_first_line(first)}") from None

    try:
        proto = onnx.load_from_string(data)
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise RltuneError(f"the model could not be exported to ONNX: the {exporter} exporter produced "
                          f"an invalid graph for opset {opset}: {_first_line(exc)}") from None
    try:
        quantized = _quantize_graph(proto, specs)
        _strip_metadata(proto.graph)
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
    except Exception as exc:
        raise RltuneError(f"the model could not be exported to ONNX: rewriting its weights as int8 "
                          f"failed: {_first_line(exc)}") from None

    _verify(data, plain, x)
    write_atomic(path, data, "ONNX file")
    return {"onnx_bytes": len(data), "quantized_layers": quantized,
            "float_layers": max(n_layers - quantized, 0), "exporter": exporter}


def _strip_metadata(graph) -> None:
    """Drop the exporter's per-node and per-value annotations (``metadata_props``, ``doc_string``):
    the dynamo exporter records each node's module path, class hierarchy and source stack trace
    there, several times the weights' bytes on a small model (a 667-parameter transformer student's
    file went from 72 kB to 11 kB) and the user's source paths; nothing reads them at inference.
    Subgraphs (If / Loop bodies) are stripped too; shapes (``value_info``) stay."""
    for v in list(graph.value_info) + list(graph.input) + list(graph.output) + list(graph.initializer):
        del v.metadata_props[:]
        v.doc_string = ""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip_metadata(attr.g)
            for g in attr.graphs:
                _strip_metadata(g)


def _onnxruntime():
    """``import onnxruntime`` with its telemetry off unless the user chose (``ORT_DISABLE_TELEMETRY``):
    onnxruntime 1.32 on Linux, once imported, writes a session file into the temp folder
    (``$TMPDIR/.ses``) and a device id and event database under
    ``~/.cache/Microsoft/DeveloperTools/.onnxruntime`` for upload; rltune writes nowhere but its
    output and cache folders. (A process that imported onnxruntime before keeps its setting.)"""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    return onnxruntime


def _verify(data: bytes, plain: nn.Module, x: torch.Tensor) -> None:
    """With onnxruntime installed: the graph (traced on 2 rows) must reproduce the model on all of
    ``x`` (another batch size); a forward that depends on the batch size, or an op traced as a
    constant, is refused rather than written as a file that predicts something else."""
    try:
        _onnxruntime()
    except ImportError:
        return
    if len(x) < 2:
        return
    import tempfile

    with torch.no_grad():
        want = plain(x).detach().cpu().numpy()
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "check.onnx"
        f.write_bytes(data)
        try:
            got = onnx_predict(f, x)
        except RltuneError as e:
            raise RltuneError(f"the exported ONNX graph does not run on a batch of {len(x)}: {str(e).split(': ', 1)[-1]}") from None
    tol = 1e-4 * max(1.0, float(np.abs(want).max()))
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=tol) \
            or not (got.argmax(-1) == want.argmax(-1)).all():
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("nan")
        raise RltuneError(f"the exported ONNX graph does not reproduce the model on a batch of {len(x)} "
                          f"(max difference {diff:.3g}): its forward may depend on the batch size or on "
                          "values the exporter traced as constants")


def onnx_predict(path, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Run the ONNX model at ``path`` on ``x`` with onnxruntime (CPU); returns its first output."""
    try:
        ort = _onnxruntime()
    except ImportError:
        raise RltuneError("ONNX inference needs the onnxruntime package: pip install onnxruntime") from None
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        if inp.type == "tensor(float)":
            arr = arr.astype(np.float32, copy=False)
        return sess.run(None, {inp.name: arr})[0]
    except Exception as exc:
        raise RltuneError(f"cannot run ONNX model {path}: {_first_line(exc)}") from None
