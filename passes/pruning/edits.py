"""What pruning a group changes: weights, biases and per-channel constants sliced along the kept
channels, depthwise ``group`` attributes and shape constants updated, and the contribution of
removed constant channels folded into the biases of the layers that read them.

The analysis (``groups``) records the edits (``_Slice``, ``_Bias``, ``_GroupAttr``,
``_ShapeEntry``) while it walks the graph; ``apply_edits`` carries them out for the channels a
plan keeps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from passes.graph_utils import (
    FLOAT_TYPES,
    constant_values,
    evaluate_constant_expression,
    is_default_domain,
    is_graph_output,
    unique_name,
)
from passes.match import producer
from passes.pruning.common import _norm_axis
from passes.pruning.maps import ChannelMap, _Use

if TYPE_CHECKING:
    from passes.pruning.groups import ChannelAnalysis


@dataclass
class _Slice:
    """Slice input ``index`` of ``node`` (a constant or a DequantizeLinear of constants) along ``axis``."""

    node: gs.Node
    index: int
    axis: int
    cmap: ChannelMap


@dataclass
class _Bias:
    """Slice a producer's bias (Conv B along axis 0, Gemm C along its last axis if per column)."""

    node: gs.Node
    cmap: ChannelMap


@dataclass
class _GroupAttr:
    """A depthwise Conv's ``group`` follows its channel count."""

    node: gs.Node
    cmap: ChannelMap


@dataclass
class _ShapeEntry:
    """Entry ``position`` of a 1-D shape constant (Reshape shape, Resize sizes) follows the channels."""

    node: gs.Node
    index: int
    position: int
    cmap: ChannelMap


Edit = _Slice | _Bias | _GroupAttr | _ShapeEntry


# ============================================================================ weights
def _dq_parts(tensor: gs.Tensor):
    """(DequantizeLinear node, int values, scale, zero point or None) for a DQ of constants."""
    dq = producer(tensor)
    if dq is None or dq.op != "DequantizeLinear" or not is_default_domain(dq) or dq.attrs.get("block_size", 0):
        return None
    q = constant_values(dq.inputs[0])
    scale = constant_values(dq.inputs[1]) if len(dq.inputs) > 1 else None
    zp = constant_values(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else None
    if q is None or scale is None or (len(dq.inputs) > 2 and dq.inputs[2].name and zp is None):
        return None
    return dq, q, scale, zp


def weight_values(tensor: gs.Tensor) -> np.ndarray | None:
    """A layer weight as float64: a float constant, or a DequantizeLinear of constants; else None."""
    values = constant_values(tensor)
    if values is not None:
        return values.astype(np.float64) if values.dtype.type in FLOAT_TYPES else None
    parts = _dq_parts(tensor)
    if parts is None:
        return None
    dq, q, scale, zp = parts
    axis = _norm_axis(int(dq.attrs.get("axis", 1)), q.ndim)
    shape = [1] * q.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[axis] = -1
    zp64 = zp.astype(np.float64).reshape(shape) if zp is not None else 0.0
    return (q.astype(np.float64) - zp64) * scale.astype(np.float64).reshape(shape if scale.ndim else ())


def _pruned_name(g: gs.Graph, name: str, suffix: str = "pruned") -> str:
    base = re.sub(rf"(_{suffix})+(_\d+)?$", "", name or "const")
    return unique_name(g, f"{base}_{suffix}")


def _take_input(g: gs.Graph, node: gs.Node, index: int, axis: int, idx: np.ndarray) -> None:
    """Replace input ``index`` of ``node`` by its slice ``idx`` along ``axis`` (new tensors)."""
    tensor = node.inputs[index]
    values = constant_values(tensor)
    parts = _dq_parts(tensor) if values is None else None
    if values is None and parts is None:  # computed from constants (Unsqueeze(c) ...): small, materialize
        values = evaluate_constant_expression(tensor, g.opset)
    if values is not None:
        sliced = np.ascontiguousarray(np.take(values, idx, axis=axis))
        node.inputs[index] = gs.Constant(_pruned_name(g, tensor.name), sliced)
        return
    dq, q, scale, zp = parts
    q_axis = _norm_axis(int(dq.attrs.get("axis", 1)), q.ndim)
    per_axis = scale.ndim == 1 and scale.size > 1 and q_axis == axis
    inputs = [gs.Constant(_pruned_name(g, dq.inputs[0].name), np.ascontiguousarray(np.take(q, idx, axis=axis)))]
    inputs.append(gs.Constant(_pruned_name(g, dq.inputs[1].name), np.ascontiguousarray(scale[idx])) if per_axis else dq.inputs[1])
    if zp is not None:
        inputs.append(gs.Constant(_pruned_name(g, dq.inputs[2].name), np.ascontiguousarray(zp[idx])) if per_axis and zp.ndim == 1 else dq.inputs[2])
    out = gs.Variable(_pruned_name(g, tensor.name), dtype=tensor.dtype)
    g.nodes.append(gs.Node("DequantizeLinear", _pruned_name(g, dq.name or "DequantizeLinear"), dict(dq.attrs), inputs, [out]))
    node.inputs[index] = out


def _edit_params(edit: Edit) -> list[str]:
    if isinstance(edit, _Slice):
        t = edit.node.inputs[edit.index]
        parts = _dq_parts(t) if not isinstance(t, gs.Constant) and constant_values(t) is None else None
        return [parts[0].inputs[0].name] if parts else [t.name]
    if isinstance(edit, _Bias) and len(edit.node.inputs) > 2 and edit.node.inputs[2].name:
        return [edit.node.inputs[2].name]
    return []


def _bias_add(g: gs.Graph, matmul: gs.Node, columns: int) -> tuple[gs.Node, int] | None:
    """The ``Add(matmul_out, bias)`` right after a MatMul, with a constant [N] (or [1,...,N]) bias:
    (the Add, the bias input index); None when there is none to fold a constant into."""
    out = matmul.outputs[0]
    if len(out.outputs) != 1 or is_graph_output(g, out):
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2 or not is_default_domain(add):
        return None
    index = 1 if add.inputs[0] is out else 0
    bias = constant_values(add.inputs[index])
    if bias is None or bias.dtype.type not in FLOAT_TYPES or bias.size != columns:
        return None
    if bias.ndim and any(d != 1 for d in bias.shape[:-1]):
        return None
    return add, index


def _add_to_bias(g: gs.Graph, node: gs.Node, delta: np.ndarray) -> None:
    """``node``'s output += ``delta`` (per output channel): Conv bias, or Gemm C with beta folded in."""
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    w_dtype = weight_values(node.inputs[1]).dtype
    out_dtype = node.outputs[0].dtype
    dtype = np.dtype(out_dtype) if out_dtype is not None else np.dtype(np.float32)
    if dtype.type not in FLOAT_TYPES:
        dtype = np.dtype(w_dtype) if w_dtype.type in FLOAT_TYPES else np.dtype(np.float32)
    if node.op == "Gemm":
        beta = float(node.attrs.get("beta", 1.0))
        c = constant_values(node.inputs[2]).astype(np.float64) * beta if has_bias else np.zeros(())
        new = c + delta if c.ndim >= 1 else np.broadcast_to(c, delta.shape) + delta
        node.attrs["beta"] = 1.0
    else:
        c = constant_values(node.inputs[2]).astype(np.float64).reshape(-1) if has_bias else np.zeros(delta.shape)
        new = c + delta
        dtype = np.dtype(constant_values(node.inputs[2]).dtype) if has_bias else dtype
    name = _pruned_name(g, node.inputs[2].name if has_bias else f"{node.name or node.op}_bias", "folded")
    const = gs.Constant(name, np.ascontiguousarray(new.astype(dtype)))
    if has_bias:
        node.inputs[2] = const
    else:
        while len(node.inputs) < 2:
            node.inputs.append(gs.Variable(""))
        if len(node.inputs) == 2:
            node.inputs.append(const)
        else:
            node.inputs[2] = const


def fold_constants(analysis: ChannelAnalysis, g: gs.Graph, kept: dict[int, np.ndarray]) -> int:
    """Add the contribution of removed constant channels to the consumers' biases (exact)."""
    vectors = {u.tensor: analysis.const_of(u.tensor, u.cmap.size) for u in analysis.uses}
    return fold_into_bias(analysis, g, kept, vectors, [u for u in analysis.uses if u.foldable])


def fold_into_bias(analysis: ChannelAnalysis, g: gs.Graph, kept: dict[int, np.ndarray], vectors: dict[str, np.ndarray],
                   uses: list[_Use]) -> int:
    """For every use, add ``value * weights`` of the removed input positions to the layer's bias,
    where ``vectors[use.tensor]`` holds one value per position (NaN or 0: nothing to add).
    Returns the number of layers changed."""
    changed = 0
    for use in uses:
        vec = vectors.get(use.tensor)
        if vec is None or not analysis.touches(use.cmap, kept) or use.node.op not in ("Conv", "Gemm", "MatMul"):
            continue
        removed = np.setdiff1d(np.arange(use.cmap.size), analysis.positions(use.cmap, kept))
        removed = removed[np.nan_to_num(vec[removed], nan=0.0) != 0]
        if removed.size == 0:
            continue
        node = use.node
        rows = np.moveaxis(weight_values(node.inputs[1]), use.weight_axis, 0)[removed]
        if node.op == "Conv":  # a constant input channel adds value * sum(kernel) to every output
            delta = np.einsum("r,ro->o", vec[removed], rows.reshape(removed.size, rows.shape[1], -1).sum(axis=2))
        else:  # Gemm/MatMul: rows are [removed, N]
            alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
            delta = alpha * (vec[removed] @ rows.reshape(removed.size, -1))
        if node.op == "MatMul":
            add = _bias_add(g, node, delta.size)
            if add is None:
                continue
            reader, index = add
            bias = constant_values(reader.inputs[index])
            new = np.broadcast_to(bias.astype(np.float64).reshape(-1), delta.shape) + delta
            reader.inputs[index] = gs.Constant(_pruned_name(g, reader.inputs[index].name, "folded"),
                                               np.ascontiguousarray(new.astype(bias.dtype)))
        else:
            _add_to_bias(g, node, delta)
        changed += 1
    return changed


def apply_edits(analysis: ChannelAnalysis, g: gs.Graph, kept: dict[int, np.ndarray]) -> None:
    """Slice every constant, attribute and shape entry of the groups in ``kept``."""
    for edit in analysis.edits:
        if not analysis.touches(edit.cmap, kept):
            continue
        idx = analysis.positions(edit.cmap, kept)
        if isinstance(edit, _Slice):
            _take_input(g, edit.node, edit.index, edit.axis, idx)
        elif isinstance(edit, _Bias):
            node, size = edit.node, edit.cmap.size
            if len(node.inputs) < 3 or not node.inputs[2].name:
                continue
            bias = constant_values(node.inputs[2])
            if node.op == "Gemm":
                if bias.ndim >= 1 and bias.shape[-1] == size:
                    _take_input(g, node, 2, bias.ndim - 1, idx)
            else:
                _take_input(g, node, 2, 0, idx)
        elif isinstance(edit, _GroupAttr):
            edit.node.attrs["group"] = int(idx.size)
        elif isinstance(edit, _ShapeEntry):
            values = constant_values(edit.node.inputs[edit.index]).copy()
            values.reshape(-1)[edit.position] = idx.size
            name = edit.node.inputs[edit.index].name
            edit.node.inputs[edit.index] = gs.Constant(_pruned_name(g, name), values)
    tensors = g.tensors()
    for name, cmap in analysis.carry.items():
        tensor = tensors.get(name)
        if isinstance(tensor, gs.Variable) and analysis.touches(cmap, kept) and not is_graph_output(g, tensor):
            tensor.shape = None  # stale: export and shape inference recompute it
