"""How layers (Conv, ConvTranspose, Gemm, MatMul) take part in channel groups.

A layer *consumes* the channels of its input (its weights are sliced along the input-channel axis)
and *produces* a new group (its output channels: weights and bias sliced along the output axis).
A depthwise Conv passes channels through instead; other grouped convs block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from passes.graph_utils import constant_values, is_constant_expression
from passes.pruning.edits import _Bias, _bias_add, _GroupAttr, _Slice, weight_values
from passes.pruning.maps import ChannelMap, Segment, _Blocked, _Use

if TYPE_CHECKING:
    from passes.pruning.groups import ChannelAnalysis


def track_layer(analysis: ChannelAnalysis, node: gs.Node) -> None:
    """A Conv/ConvTranspose/Gemm/MatMul: consume the channels of its input, produce a new group."""
    x = node.inputs[0] if node.inputs else None
    xm = analysis.carry.get(x.name) if x is not None else None
    out = node.outputs[0] if node.outputs else None
    for t in node.inputs[1:]:
        if t.name in analysis.carry:
            analysis.block(analysis.carry[t.name], "channels_used_as_weight")
    if out is None or len(node.inputs) < 2:
        analysis.block(xm, "unsupported_layer")
        return
    w_t = node.inputs[1]
    w = weight_values(w_t)
    op = node.op
    group = int(node.attrs.get("group", 1)) if op in ("Conv", "ConvTranspose") else 1
    if op == "Conv" and group > 1:
        _grouped_conv(analysis, node, xm, w, group)
        return
    # -- input side: this layer consumes the channels of x
    if xm is not None:
        try:
            _consumer(analysis, node, x, xm, w, group)
        except _Blocked as blocked:
            analysis.block(xm, str(blocked))
    # -- output side: this layer produces a new group
    _producer(analysis, node, out, w, group)


def _consumer(analysis: ChannelAnalysis, node: gs.Node, x: gs.Tensor, xm: ChannelMap, w: np.ndarray | None, group: int) -> None:
    op = node.op
    if w is None:
        raise _Blocked("consumer_weight_not_constant")
    if op == "ConvTranspose" and group != 1:
        raise _Blocked("grouped_conv")
    if op in ("Conv", "ConvTranspose"):
        if xm.axis != 1:
            raise _Blocked("axis_mismatch")
        w_axis = 1 if op == "Conv" else 0
        pads = node.attrs.get("pads", [0])
        foldable = op == "Conv" and not any(pads) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    elif op == "Gemm":
        if node.attrs.get("transA", 0):
            raise _Blocked("gemm_trans_a")
        if xm.axis != 1:
            raise _Blocked("axis_mismatch")
        w_axis = 1 if node.attrs.get("transB", 0) else 0
        foldable = w.ndim == 2 and (len(node.inputs) < 3 or not node.inputs[2].name or constant_values(node.inputs[2]) is not None)
    else:  # MatMul: x @ W with a constant 2-D W
        if w.ndim != 2:
            raise _Blocked("matmul_weight_not_2d")
        if xm.axis != analysis.rank(x) - 1:
            raise _Blocked("axis_mismatch")
        w_axis, foldable = 0, _bias_add(analysis.graph, node, w.shape[1]) is not None
    if w.shape[w_axis] != xm.size:
        raise _Blocked("shape_mismatch")
    analysis.uses.append(_Use(node, x.name, xm, w_axis, foldable))
    analysis.edits.append(_Slice(node, 1, w_axis, xm))


def _producer(analysis: ChannelAnalysis, node: gs.Node, out: gs.Tensor, w: np.ndarray | None, group: int) -> None:
    op = node.op
    reason = ""
    if w is None:
        if op == "MatMul" and not is_constant_expression(node.inputs[1]):
            return  # activations times activations (attention scores): no channel group
        reason, w_axis, channels = "weight_not_constant", 0, None
    else:
        if op in ("Gemm", "MatMul") and w.ndim != 2:
            return
        w_axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}.get(op, 0 if node.attrs.get("transB", 0) else 1)
        channels = w.shape[w_axis] * (group if op == "ConvTranspose" else 1)
        if op == "ConvTranspose" and group != 1:
            reason = "grouped_conv"
    shape = analysis.shape(out)
    axis = None if shape is None else (len(shape) - 1 if op == "MatMul" else 1)
    if channels is None and axis is not None:
        channels = analysis.dim(out, axis)
    if axis is None or not channels:
        # no map to propagate; the layer is still reported as a blocked group
        analysis.new_source(node, int(channels or 0), out.name, reason or "rank_unknown")
        return
    out_dim = analysis.dim(out, axis)
    if out_dim is not None and out_dim != channels:
        reason = reason or "shape_mismatch"
    if not reason and len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant_values(node.inputs[2])
        if bias is None:
            reason = "bias_not_constant"
        elif op == "Gemm" and bias.ndim >= 1 and bias.shape[-1] not in (1, channels):
            reason = "shape_mismatch"
    sid = analysis.new_source(node, int(channels), out.name, reason)
    cmap = ChannelMap(axis, (Segment(sid, int(channels)),))
    const = _producer_const(analysis, node, w, w_axis, int(channels)) if analysis.track and not reason else None
    analysis.set_out(out, cmap, const)
    if not reason:
        analysis.edits.append(_Slice(node, 1, w_axis, cmap))
        if op != "MatMul":  # also without a bias: folding may add one before slicing
            analysis.edits.append(_Bias(node, cmap))


def _producer_const(analysis: ChannelAnalysis, node: gs.Node, w: np.ndarray, w_axis: int, channels: int) -> np.ndarray:
    """Output channels whose weights are all zero are their bias everywhere (0 without one);
    the others are not constant (NaN)."""
    zero = ~np.any(np.moveaxis(w, w_axis, 0).reshape(channels, -1) != 0, axis=1)
    value = np.zeros(channels)
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant_values(node.inputs[2]).astype(np.float64)
        if node.op == "Gemm":  # beta * C, constant only if C is the same on every row
            bias = bias.reshape((1, -1) if bias.ndim < 2 else bias.shape) * float(node.attrs.get("beta", 1.0))
            rows = np.broadcast_to(bias, (bias.shape[0], channels))
            zero &= np.all(rows == rows[:1], axis=0)
            value = rows[0].copy()
        else:
            value = bias.reshape(-1)
    return np.where(zero, value, np.nan)


def _grouped_conv(analysis: ChannelAnalysis, node: gs.Node, xm: ChannelMap | None, w: np.ndarray | None, group: int) -> None:
    out = node.outputs[0]
    depthwise = w is not None and w.ndim >= 3 and w.shape[1] == 1 and w.shape[0] == group
    if not depthwise:
        reason = "weight_not_constant" if w is None else (
            "depthwise_multiplier" if w.shape[1] == 1 else "grouped_conv"
        )
        analysis.block(xm, reason)
        channels = w.shape[0] if w is not None else analysis.dim(out, 1)
        analysis.new_source(node, int(channels or 0), out.name, reason)
        return
    # depthwise: channel c in -> channel c out; its weights and bias are per-channel params
    if xm is None:
        # fed by something untracked: the depthwise output is not a group of its own
        return
    if xm.axis != 1 or xm.size != group:
        analysis.block(xm, "axis_mismatch" if xm.axis != 1 else "shape_mismatch")
        return
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    bias = constant_values(node.inputs[2]) if has_bias else None
    if has_bias and bias is None:
        analysis.block(xm, "params_not_constant")
        return
    analysis.edits.append(_Slice(node, 1, 0, xm))
    if has_bias:
        analysis.edits.append(_Slice(node, 2, 0, xm))
    analysis.edits.append(_GroupAttr(node, xm))
    const = None
    if analysis.track:
        v = analysis.const_of(node.inputs[0], xm.size)
        b = bias.astype(np.float64).reshape(-1) if bias is not None else np.zeros(xm.size)
        wsum = w.reshape(group, -1).sum(axis=1)
        pads = node.attrs.get("pads", [0])
        exact = not any(pads) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
        const = np.where((v == 0) | exact, v * wsum + b, np.nan)
        const[np.isnan(v)] = np.nan
    analysis.set_out(out, xm, const)
