"""Bias correction for INT8 weight quantization.

Rounding a layer's weights to INT8 shifts the mean of its output: per output channel ``o``,

    E[W·x]_o - E[Wq·x]_o = sum_i (W - Wq)[o, i] * E[x]_i

which does not average out over samples whenever the layer's input has a non-zero mean (after a
Relu it always has). Adding that shift to the layer's bias removes it in expectation (Nagel et
al., "Data-Free Quantization Through Weight Equalization and Bias Correction", 2019, the empirical
variant with ``E[x]`` from calibration data). ``Wq`` is what the quantizer stores, dequantized the
way ``DequantizeLinear`` computes it (``dequantized_weight_values``: ``quantize_weight`` then
``int8 * scale`` in float32).

How the quantize pass uses this module::

    targets = correction_targets(weight_sites, skipped)            # before rewiring the weights
    means = collect_channel_means(float_model, mean_tensors(targets), source)
    corrections = corrections_for(targets, means.means, skipped)
    ... replace the weights with DequantizeLinear(int8, scale) ...
    apply_bias_correction(graph, corrections, skipped)

Skip reasons are counted in ``skipped`` (a ``passes.skips.Skips``: the pass's ``skipped_<reason>``
stats), e.g. ``no_bias_to_correct`` for a MatMul that no constant bias Add follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from passes.graph_utils import constant_values, is_graph_output, unique_name
from passes.quant_formats import quantize_weight
from passes.skips import Skips

SUPPORTED_OPS = ("Conv", "Gemm", "MatMul")


def _count(skipped: Skips | None, reason: str) -> None:
    if skipped is not None:
        skipped.add(reason)


def dequantized_weight_values(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """``Wq``: ``weight`` quantized by ``passes.quantization.quantize_weight`` and dequantized
    as ``DequantizeLinear`` does (``int8 * scale`` in float32, zero point 0)."""
    q, scale = quantize_weight(weight, axis)
    if axis is None:
        return q.astype(np.float32) * np.float32(scale)
    shape = [1] * weight.ndim
    shape[axis] = -1
    return q.astype(np.float32) * scale.astype(np.float32).reshape(shape)


def input_channel_axis(op: str) -> int:
    """The axis of the activation input (input 0) that the weight reduces over: 1 for Conv
    (NCHW), -1 for Gemm and MatMul."""
    if op == "Conv":
        return 1
    if op in ("Gemm", "MatMul"):
        return -1
    raise ValueError(f"bias correction supports {', '.join(SUPPORTED_OPS)}, not {op}")


def bias_shift(
    node_op: str,
    weight: np.ndarray,
    dequantized_weight: np.ndarray,
    input_mean: np.ndarray,
    attrs: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Per output channel ``E[W·x] - E[Wq·x]``, in the layer's output space (float64, ``[O]``/``[N]``).

    ``input_mean`` is ``E[x]`` per input channel (axis 1 of a Conv input, the last axis of a
    Gemm/MatMul input). ``attrs`` are the node's attributes:

    * Conv: weight ``[O, I/g, k...]`` (any number of spatial dims), ``group`` g; output channel
      ``o`` belongs to group ``o // (O/g)`` and reads input channels ``g_o*(I/g) .. +I/g`` (the
      depthwise case is ``I/g == 1``). Padding is ignored: the shift assumes every kernel tap
      sees the channel mean, which is exact for ``pads=0`` and off only in the border outputs
      whose taps read zero padding (also dilations and strides do not matter).
    * Gemm: ``Y = alpha * A·B + beta * C``; weight ``B`` is ``[K, N]``, or ``[N, K]`` with
      ``transB``; the shift includes ``alpha`` (``apply_bias_correction`` divides by ``beta``).
      ``transA`` is not supported (the quantizer skips it too).
    * MatMul: a 2-D constant weight ``[K, N]``.
    """
    attrs = dict(attrs or {})
    delta = np.asarray(weight, np.float64) - np.asarray(dequantized_weight, np.float64)
    mean = np.asarray(input_mean, np.float64).reshape(-1)
    if node_op == "Conv":
        if delta.ndim < 3:
            raise ValueError(f"Conv weight must be [O, I/g, k...], got shape {delta.shape}")
        group = int(attrs.get("group", 1))
        out_channels, per_group = delta.shape[0], delta.shape[1]
        if group < 1 or out_channels % group:
            raise ValueError(f"Conv group {group} does not divide {out_channels} output channels")
        if mean.size != group * per_group:
            raise ValueError(f"Conv input mean has {mean.size} channels; the weight {delta.shape} with group {group} reads {group * per_group}")
        taps = delta.sum(axis=tuple(range(2, delta.ndim)))  # [O, I/g]
        group_of = np.arange(out_channels) // (out_channels // group)
        return np.sum(taps * mean.reshape(group, per_group)[group_of], axis=1)
    if node_op == "Gemm":
        if attrs.get("transA", 0):
            raise ValueError("Gemm with transA is not supported")
        if delta.ndim != 2:
            raise ValueError(f"Gemm weight must be 2-D, got shape {delta.shape}")
        w = delta.T if attrs.get("transB", 0) else delta  # [K, N]
        if mean.size != w.shape[0]:
            raise ValueError(f"Gemm input mean has {mean.size} values, the weight reads K={w.shape[0]}")
        return float(attrs.get("alpha", 1.0)) * (mean @ w)
    if node_op == "MatMul":
        if delta.ndim != 2:
            raise ValueError(f"MatMul bias correction needs a 2-D weight [K, N], got shape {delta.shape}")
        if mean.size != delta.shape[0]:
            raise ValueError(f"MatMul input mean has {mean.size} values, the weight reads K={delta.shape[0]}")
        return mean @ delta
    raise ValueError(f"bias correction supports {', '.join(SUPPORTED_OPS)}, not {node_op}")


# ---------------------------------------------------------------------------------------------
# planning: which nodes, which means


@dataclass
class CorrectionTarget:
    """A weighted node to correct: its float weight, the quantizer's axis, and its input's name."""

    node: gs.Node
    weight: np.ndarray
    axis: int | None
    input_name: str
    channel_axis: int


def correction_targets(sites, skipped: Skips | None = None) -> list[CorrectionTarget]:
    """Targets from the quantizer's weight ``QuantSite``s (call before the weights are rewired).

    Sites of other ops (ConvTranspose), Gemm with ``transA``, MatMul with a weight that is not
    2-D and non-float32 weights are skipped (``bias_correction_unsupported``).
    """
    targets = []
    for site in sites:
        if getattr(site, "kind", "weight") != "weight":
            continue
        node = site.node
        weight = constant_values(node.inputs[site.index]) if len(node.inputs) > site.index else None
        if (
            node.op not in SUPPORTED_OPS or site.index != 1 or weight is None or weight.dtype != np.float32
            or (node.op == "Gemm" and node.attrs.get("transA", 0))
            or (node.op == "MatMul" and weight.ndim != 2)
            or (node.op == "Conv" and weight.ndim < 3)
        ):
            _count(skipped, "bias_correction_unsupported")
            continue
        targets.append(CorrectionTarget(node, weight, site.axis, node.inputs[0].name, input_channel_axis(node.op)))
    return targets


def mean_tensors(targets: list[CorrectionTarget], skipped: Skips | None = None) -> dict[str, int]:
    """``{input tensor: channel axis}`` for ``collect_channel_means``. A tensor read both as a Conv
    input (axis 1) and a Gemm/MatMul input (axis -1) keeps the first axis asked for; the others'
    corrections are then skipped by ``corrections_for`` (``channel_axis_conflict``)."""
    tensors: dict[str, int] = {}
    for t in targets:
        tensors.setdefault(t.input_name, t.channel_axis)
    return tensors


def corrections_for(
    targets: list[CorrectionTarget],
    means: Mapping[str, np.ndarray],
    skipped: Skips | None = None,
    axes: Mapping[str, int] | None = None,
) -> list[tuple[gs.Node, np.ndarray]]:
    """``(node, shift)`` for every target whose input has a mean (``no_channel_mean`` otherwise).

    ``axes`` is the dict given to ``collect_channel_means`` (default: ``mean_tensors(targets)``).
    """
    axes = mean_tensors(targets) if axes is None else axes
    out = []
    for t in targets:
        if axes.get(t.input_name) != t.channel_axis:
            _count(skipped, "channel_axis_conflict")
            continue
        mean = means.get(t.input_name)
        if mean is None or not np.all(np.isfinite(mean)):
            _count(skipped, "no_channel_mean")
            continue
        try:
            shift = bias_shift(t.node.op, t.weight, dequantized_weight_values(t.weight, t.axis), mean, t.node.attrs)
        except ValueError:
            _count(skipped, "bias_correction_unsupported")
            continue
        out.append((t.node, shift))
    return out


# ---------------------------------------------------------------------------------------------
# applying


def _set_constant_input(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray, base: str) -> None:
    """Feed ``values`` to ``node.inputs[index]``: in place when the old input is an initializer
    only ``node`` reads, else (shared, a Constant node's output, a graph output) as a new constant."""
    old = node.inputs[index] if index < len(node.inputs) else None
    if (
        isinstance(old, gs.Constant) and len(old.outputs) == 1 and old.outputs[0] is node
        and sum(1 for t in node.inputs if t is old) == 1 and not is_graph_output(graph, old)
    ):
        old.values = values  # a new array: the old one may be shared with a copy of the graph
        return
    new = gs.Constant(unique_name(graph, base), values)
    if old is None:
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(new)
    else:
        node.inputs[index] = new


def _corrected(bias: np.ndarray, shift: np.ndarray) -> np.ndarray | None:
    """``bias + shift`` (shift along the last axis) in the bias's dtype, or None if the result's
    shape would change how the bias broadcasts (its last dim is neither 1 nor len(shift))."""
    if bias.dtype.kind != "f":
        return None
    if bias.ndim and bias.shape[-1] not in (1, shift.size):
        return None
    return (bias.astype(np.float64) + shift).astype(bias.dtype)


def apply_bias_correction(
    graph: gs.Graph,
    corrections: list[tuple[gs.Node, np.ndarray]],
    skipped: Skips | None = None,
) -> int:
    """Add each ``shift`` (from ``bias_shift``) to its node's bias; returns how many nodes changed.

    * Conv: input 2, created as float32 zeros when absent.
    * Gemm: C gets ``shift / beta`` (created as a ``[N]`` tensor when absent; an existing C whose
      last dim is 1 or N broadcasts the same after it). ``beta == 0`` cannot carry a bias.
    * MatMul: the constant bias of the one Add that alone reads the MatMul's output (the output
      is no graph output); the bias must broadcast along the last axis (``[N]``, ``[1, N]``,
      ``[..., N]``, a scalar or ``[1]``).

    Constants that other nodes also read (or that come from Constant nodes) are copied, never
    edited in place. Everything else is skipped and counted in ``skipped["no_bias_to_correct"]``;
    shifts with NaN/inf in ``skipped["nonfinite_bias_shift"]``.
    """
    applied = 0
    for node, shift in corrections:
        shift = np.asarray(shift, np.float64).reshape(-1)
        if not np.all(np.isfinite(shift)):
            _count(skipped, "nonfinite_bias_shift")
            continue
        base = f"{node.name or node.op}_bias_corrected"
        if node.op == "Conv":
            has_bias = len(node.inputs) > 2 and node.inputs[2].name
            bias = constant_values(node.inputs[2]) if has_bias else np.zeros(shift.size, np.float32)
            new = _corrected(bias, shift) if bias is not None and bias.shape == (shift.size,) else None
            if new is None:
                _count(skipped, "no_bias_to_correct")
                continue
            _set_constant_input(graph, node, 2, new, base)
        elif node.op == "Gemm":
            beta = float(node.attrs.get("beta", 1.0))
            has_bias = len(node.inputs) > 2 and node.inputs[2].name
            bias = constant_values(node.inputs[2]) if has_bias else np.zeros(shift.size, np.float32)
            new = _corrected(bias, shift / beta) if bias is not None and beta != 0.0 and bias.ndim <= 2 else None
            if new is None:
                _count(skipped, "no_bias_to_correct")
                continue
            _set_constant_input(graph, node, 2, new, base)
        elif node.op == "MatMul":
            target = _matmul_bias(graph, node)
            if target is None:
                _count(skipped, "no_bias_to_correct")
                continue
            add, index, bias = target
            new = _corrected(bias, shift)
            if new is None:
                _count(skipped, "no_bias_to_correct")
                continue
            _set_constant_input(graph, add, index, new, base)
        else:
            _count(skipped, "bias_correction_unsupported")
            continue
        applied += 1
    return applied


def _matmul_bias(graph: gs.Graph, node: gs.Node) -> tuple[gs.Node, int, np.ndarray] | None:
    """``(add, bias input index, bias values)`` for ``MatMul -> Add(constant)``, else None."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or is_graph_output(graph, out):
        return None
    add = out.outputs[0]
    if add.op != "Add" or add.domain not in ("", "ai.onnx", None) or len(add.inputs) != 2:
        return None
    if sum(1 for t in add.inputs if t is out) != 1:
        return None
    index = 1 if add.inputs[0] is out else 0
    bias = constant_values(add.inputs[index])
    if bias is None:
        return None
    return add, index, bias
