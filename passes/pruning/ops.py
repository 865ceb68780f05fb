"""Per-op handlers of the channel analysis: how each op between layers carries channels.

``HANDLERS`` maps an op type to a function ``(analysis, node)`` that propagates the channel maps
of the node's inputs to its outputs, records the constants to slice with them (BatchNorm
parameters, per-channel constants, Q/DQ scales, shape entries) and, with ``track_constants``,
which channels stay constant. A handler raises ``_Blocked`` when the channels cannot be pruned
through the node; ops without a handler block the channels that reach them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from passes.graph_utils import FLOAT_TYPES, constant_values, is_graph_output
from passes.pruning.common import _norm_axis
from passes.pruning.edits import _ShapeEntry, _Slice
from passes.pruning.maps import ChannelMap, Segment, _Blocked

if TYPE_CHECKING:
    from passes.pruning.groups import ChannelAnalysis

#: Unary ops -> the value of a constant channel after them (None: Clip and Cast are computed in
#: ``_unary``; after the others a channel is not known to be constant).
_UNARY = {
    "Relu": lambda v, n: np.maximum(v, 0.0),
    "LeakyRelu": lambda v, n: np.where(v < 0, v * n.attrs.get("alpha", 0.01), v),
    "Sigmoid": lambda v, n: 1.0 / (1.0 + np.exp(-v)),
    "Tanh": lambda v, n: np.tanh(v),
    "HardSigmoid": lambda v, n: np.clip(n.attrs.get("alpha", 0.2) * v + n.attrs.get("beta", 0.5), 0, 1),
    "HardSwish": lambda v, n: v * np.clip(v / 6.0 + 0.5, 0, 1),
    "Elu": lambda v, n: np.where(v < 0, n.attrs.get("alpha", 1.0) * (np.exp(v) - 1), v),
    "Selu": lambda v, n: n.attrs.get("gamma", 1.0507009873554805) * np.where(v < 0, n.attrs.get("alpha", 1.6732632423543772) * (np.exp(v) - 1), v),
    "Softplus": lambda v, n: np.log1p(np.exp(v)),
    "Gelu": lambda v, n: 0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2))) if n.attrs.get("approximate", "none") == "none" else np.full_like(v, np.nan),
    "Erf": lambda v, n: np.vectorize(math.erf)(v),
    "Exp": lambda v, n: np.exp(v),
    "Abs": lambda v, n: np.abs(v),
    "Neg": lambda v, n: -v,
    "Sqrt": lambda v, n: np.sqrt(v),
    "Reciprocal": lambda v, n: 1.0 / v,
    "Floor": lambda v, n: np.floor(v),
    "Ceil": lambda v, n: np.ceil(v),
    "Sign": lambda v, n: np.sign(v),
    "Identity": lambda v, n: v,
    "Dropout": lambda v, n: v,
    "Clip": None,  # min/max are inputs (opset >= 11) or attributes
    "Cast": None,
    "Mish": None,
    "Softsign": None,
    "Log": None,
    "Round": None,
    "Sin": None,
    "Cos": None,
    "Celu": None,
    "ThresholdedRelu": None,
}
_ELEMENTWISE = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
    "Pow": lambda a, b: np.power(a, b),
    "Max": np.maximum,
    "Min": np.minimum,
    "Sum": lambda a, b: a + b,
    "Mean": None,
    "PRelu": lambda a, b: np.where(a < 0, a * b, a),
}
_POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
_REDUCES = (
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2",
    "ReduceProd", "ReduceLogSum", "ReduceLogSumExp",
)


def _only_first_input_carried(analysis: ChannelAnalysis, node: gs.Node) -> ChannelMap:
    if any(t.name in analysis.carry for t in node.inputs[1:]):
        raise _Blocked("channels_used_as_parameter")
    cmap = analysis.carry.get(node.inputs[0].name)
    if cmap is None:
        raise _Blocked("channels_used_as_parameter")
    return cmap


def _unary(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
        raise _Blocked("dropout_mask")
    const = None
    if analysis.track:
        v = analysis.const_of(node.inputs[0], cmap.size)
        fn = _UNARY.get(node.op)
        with np.errstate(all="ignore"):
            if node.op == "Clip":
                lo = node.attrs.get("min", -np.inf)
                hi = node.attrs.get("max", np.inf)
                if len(node.inputs) > 1 and node.inputs[1].name:
                    lo_v = constant_values(node.inputs[1])
                    lo = float(lo_v) if lo_v is not None and lo_v.size == 1 else np.nan
                if len(node.inputs) > 2 and node.inputs[2].name:
                    hi_v = constant_values(node.inputs[2])
                    hi = float(hi_v) if hi_v is not None and hi_v.size == 1 else np.nan
                const = np.clip(v, lo, hi) if not (np.isnan(lo) or np.isnan(hi)) else np.full_like(v, np.nan)
            elif node.op == "Cast":
                to = node.outputs[0].dtype
                const = v if to is not None and np.dtype(to).type in FLOAT_TYPES else np.full_like(v, np.nan)
            elif fn is not None:
                const = fn(v, node)
    for out in node.outputs[:1]:
        analysis.set_out(out, cmap, const)


def _elementwise(analysis: ChannelAnalysis, node: gs.Node) -> None:
    out = node.outputs[0]
    out_rank = analysis.rank(out)
    axes = set()
    for t in node.inputs:
        if t.name in analysis.carry:
            axes.add(analysis.carry[t.name].axis + out_rank - analysis.rank(t))
    if len(axes) != 1:
        raise _Blocked("axis_mismatch")
    axis = axes.pop()
    out_dim = analysis.dim(out, axis)
    full: list[ChannelMap] = []
    params: list[tuple[int, int]] = []
    operands: list[tuple[str, object]] = []  # for constant tracking
    for i, t in enumerate(node.inputs):
        if not t.name:
            continue
        r = analysis.rank(t)
        a = axis - (out_rank - r)
        cmap = analysis.carry.get(t.name)
        if cmap is not None:
            if cmap.size == 1 and out_dim is not None and out_dim > 1:
                raise _Blocked("broadcast_channel")
            full.append(cmap)
            operands.append(("carried", t))
            continue
        values = analysis.constant(t)
        if values is not None:
            d = values.shape[a] if 0 <= a < values.ndim else 1
            if d != 1:
                params.append((i, a, d))
            operands.append(("const", (values, a)))
            continue
        d = analysis.dim(t, a) if a >= 0 else 1
        if d != 1:
            raise _Blocked("graph_input_operand" if not t.inputs else "untracked_operand")
        operands.append(("other", None))
    ref = full[0]
    for other in full[1:]:
        _unify(analysis, ref, other)
    if any(d != ref.size for _, _, d in params):
        raise _Blocked("shape_mismatch")
    for i, a, _ in params:
        analysis.edits.append(_Slice(node, i, a, ref))
    const = None
    if analysis.track:
        const = _elementwise_const(analysis, node, operands, ref.size)
    analysis.set_out(out, ChannelMap(axis, ref.segments), const)


def _elementwise_const(analysis: ChannelAnalysis, node: gs.Node, operands, size: int) -> np.ndarray:
    vectors = []
    for kind, payload in operands:
        if kind == "carried":
            vectors.append(analysis.const_of(payload, size))
        elif kind == "const":
            values, a = payload
            values = values.astype(np.float64)
            if values.ndim == 0 or a < 0:
                if values.size != 1:
                    vectors.append(np.full(size, np.nan))
                else:
                    vectors.append(np.full(size, float(values.reshape(()))))
                continue
            moved = np.moveaxis(values, a, 0).reshape(values.shape[a], -1)
            if moved.shape[1] != 1:
                vectors.append(np.full(size, np.nan))  # varies over positions: not constant
            else:
                vectors.append(np.broadcast_to(moved[:, 0], (size,)).astype(np.float64))
        else:
            vectors.append(np.full(size, np.nan))
    with np.errstate(all="ignore"):
        if node.op == "Mean":
            return np.sum(vectors, axis=0) / len(vectors)
        fn = _ELEMENTWISE[node.op]
        result = vectors[0]
        for v in vectors[1:]:
            result = fn(result, v)
    return np.asarray(result, np.float64)


def _unify(analysis: ChannelAnalysis, a: ChannelMap, b: ChannelMap) -> None:
    """Tie the channels of two tensors that meet elementwise (residual Add ...)."""
    if [(s.length, s.block) for s in a.segments] != [(s.length, s.block) for s in b.segments]:
        raise _Blocked("misaligned_channels")
    for sa, sb in zip(a.segments, b.segments):
        analysis.union(sa.source, sb.source)


def _batchnorm(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    if node.attrs.get("training_mode", 0) or any(o.outputs or is_graph_output(analysis.graph, o) for o in node.outputs[1:]):
        raise _Blocked("training_mode")
    if cmap.axis != 1:
        raise _Blocked("axis_mismatch")
    params = [analysis.constant(t) for t in node.inputs[1:5]]
    if len(params) != 4 or any(p is None or p.size != cmap.size for p in params):
        raise _Blocked("params_not_constant")
    for i in range(1, 5):
        analysis.edits.append(_Slice(node, i, 0, cmap))
    const = None
    if analysis.track:
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        eps = float(node.attrs.get("epsilon", 1e-5))
        v = analysis.const_of(node.inputs[0], cmap.size)
        const = (v - mean) / np.sqrt(var + eps) * gamma + beta
    analysis.set_out(node.outputs[0], cmap, const)


def _instancenorm(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    if cmap.axis != 1:
        raise _Blocked("axis_mismatch")
    params = [analysis.constant(t) for t in node.inputs[1:3]]
    if any(p is None or p.size != cmap.size for p in params):
        raise _Blocked("params_not_constant")
    analysis.edits += [_Slice(node, 1, 0, cmap), _Slice(node, 2, 0, cmap)]
    const = None
    if analysis.track:  # a constant channel normalizes to exactly its bias
        v = analysis.const_of(node.inputs[0], cmap.size)
        const = np.where(np.isnan(v), np.nan, params[1].astype(np.float64).reshape(-1))
    analysis.set_out(node.outputs[0], cmap, const)


def _pool(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    if cmap.axis != 1:
        raise _Blocked("axis_mismatch")
    if node.op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].outputs:
        raise _Blocked("maxpool_indices")
    const = None
    if analysis.track:
        v = analysis.const_of(node.inputs[0], cmap.size)
        exact = node.op in ("MaxPool", "GlobalAveragePool", "GlobalMaxPool") or (
            node.op == "AveragePool" and (not any(node.attrs.get("pads", [0])) or not node.attrs.get("count_include_pad", 0))
            and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
        )
        const = v if exact else np.where(v == 0, 0.0, np.nan)
    analysis.set_out(node.outputs[0], cmap, const)


def _axes(node: gs.Node, index: int = 1) -> list[int] | None:
    """Axes from the ``axes`` attribute or a constant input; None when absent; raises if unknown."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > index and node.inputs[index].name:
        values = constant_values(node.inputs[index])
        if values is None:
            raise _Blocked("axes_not_constant")
        return [int(a) for a in values.reshape(-1)]
    return None


def _reduce(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    rank = analysis.rank(node.inputs[0])
    axes = _axes(node)
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            axes = []
        else:
            raise _Blocked("reduces_over_channels")
    axes = [_norm_axis(a, rank) for a in axes]
    if cmap.axis in axes:
        raise _Blocked("reduces_over_channels")
    axis = cmap.axis if node.attrs.get("keepdims", 1) else cmap.axis - sum(a < cmap.axis for a in axes)
    const = None
    if analysis.track:
        v = analysis.const_of(node.inputs[0], cmap.size)
        if node.op in ("ReduceMean", "ReduceMax", "ReduceMin"):
            const = v
        elif node.op in ("ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2"):
            const = np.where(v == 0, 0.0, np.nan)
    analysis.set_out(node.outputs[0], cmap.moved(axis), const)


def _concat(analysis: ChannelAnalysis, node: gs.Node) -> None:
    out = node.outputs[0]
    rank = analysis.rank(out)
    axis = _norm_axis(int(node.attrs.get("axis", 0)), rank)
    carried = [analysis.carry.get(t.name) for t in node.inputs]
    if any(m is not None and m.axis != axis for m in carried):
        # concatenation along another axis: the inputs must carry the same channels
        if any(m is None for m in carried) or any(m.axis != carried[0].axis for m in carried):
            raise _Blocked("concat_untracked_operand")
        for m in carried[1:]:
            _unify(analysis, carried[0], m)
        const = None
        if analysis.track:
            vecs = [analysis.const_of(t, carried[0].size) for t in node.inputs]
            const = np.where(np.all([v == vecs[0] for v in vecs], axis=0), vecs[0], np.nan)
        analysis.set_out(out, carried[0], const)
        return
    segments: list[Segment] = []
    consts: list[np.ndarray] = []
    for t, m in zip(node.inputs, carried):
        if m is None:  # an untracked input keeps its channels: a fixed segment of its own
            d = analysis.dim(t, axis)
            if d is None:
                raise _Blocked("shape_unknown")
            sid = analysis.new_source(None, d, t.name, "fixed_channels")
            m = ChannelMap(axis, (Segment(sid, d),))
        segments.extend(m.segments)
        if analysis.track:
            consts.append(analysis.const_of(t, m.size))
    cmap = ChannelMap(axis, tuple(segments))
    analysis.set_out(out, cmap, np.concatenate(consts) if analysis.track else None)


def _flatten_like(analysis: ChannelAnalysis, x: gs.Tensor, out: gs.Tensor, cmap: ChannelMap, axis: int) -> None:
    """Channels on ``axis`` followed by dims ``post``: each channel becomes a block of prod(post)."""
    shape = analysis.shape(x)
    if cmap.axis != axis:
        raise _Blocked("flatten_mixes_channels")
    post = shape[axis + 1:]
    if any(d is None for d in post):
        raise _Blocked("shape_unknown")
    block = int(np.prod(post, dtype=np.int64)) if post else 1
    const = None
    if analysis.track:
        const = np.repeat(analysis.const_of(x, cmap.size), block)
    analysis.set_out(out, cmap.moved(axis, block), const)


def _flatten(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    rank = analysis.rank(node.inputs[0])
    axis = _norm_axis(int(node.attrs.get("axis", 1)), rank)
    if axis != cmap.axis or axis == 0:
        raise _Blocked("flatten_mixes_channels")
    _flatten_like(analysis, node.inputs[0], node.outputs[0], cmap, axis)


def _reshape(analysis: ChannelAnalysis, node: gs.Node) -> None:
    """Only the Flatten case (``[N, C, H, W] -> [N, C*H*W]``) and adding/removing trailing 1s."""
    cmap = _only_first_input_carried(analysis, node)
    x, out = node.inputs[0], node.outputs[0]
    target = constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
    in_shape, out_shape = analysis.shape(x), analysis.shape(out)
    if target is None or in_shape is None or out_shape is None or node.attrs.get("allowzero", 0):
        raise _Blocked("unsupported_reshape")
    target = [int(v) for v in target.reshape(-1)]
    a = cmap.axis
    # the dims before the channel axis must be copied (0) or restated exactly
    lead_ok = len(out_shape) > a and len(target) > a and all(
        target[i] == 0 or (in_shape[i] is not None and target[i] == in_shape[i]) for i in range(a)
    )
    if not lead_ok:
        raise _Blocked("unsupported_reshape")
    post = in_shape[a + 1:]
    if any(d is None for d in post):
        raise _Blocked("shape_unknown")
    block = int(np.prod(post, dtype=np.int64)) if post else 1
    entry = target[a]
    if len(target) == a + 1 and out_shape[a] == cmap.size * block:
        # flatten-like: the channel entry is -1, the exact size, or 0 (only when nothing follows)
        if entry == 0 and block != 1:
            raise _Blocked("unsupported_reshape")
        if entry > 0:
            analysis.edits.append(_ShapeEntry(node, 1, a, cmap.moved(a, block)))
        _flatten_like(analysis, x, out, cmap, a)
        return
    if all(d == 1 for d in post) and out_shape[a] == cmap.size and all(t == 1 for t in target[a + 1:]):
        # [N, C] <-> [N, C, 1, 1]
        if entry > 0:
            analysis.edits.append(_ShapeEntry(node, 1, a, cmap))
        const = analysis.const_of(x, cmap.size) if analysis.track else None
        analysis.set_out(out, cmap, const)
        return
    raise _Blocked("unsupported_reshape")


def _squeeze(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    shape = analysis.shape(node.inputs[0])
    rank = len(shape) if shape is not None else analysis.rank(node.inputs[0])
    axes = _axes(node)
    if axes is None:
        if shape is None or any(d is None for d in shape):
            raise _Blocked("shape_unknown")
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = [_norm_axis(a, rank) for a in axes]
    if cmap.axis in axes:
        raise _Blocked("squeezes_channels")
    const = analysis.const_of(node.inputs[0], cmap.size) if analysis.track else None
    analysis.set_out(node.outputs[0], cmap.moved(cmap.axis - sum(a < cmap.axis for a in axes)), const)


def _unsqueeze(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    out_rank = analysis.rank(node.outputs[0])
    axes = _axes(node)
    if axes is None:
        raise _Blocked("axes_not_constant")
    inserted = sorted(_norm_axis(a, out_rank) for a in axes)
    kept = [i for i in range(out_rank) if i not in inserted]
    const = analysis.const_of(node.inputs[0], cmap.size) if analysis.track else None
    analysis.set_out(node.outputs[0], cmap.moved(kept[cmap.axis]), const)


def _slice(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    rank = analysis.rank(node.inputs[0])
    if "starts" in node.attrs:
        axes = node.attrs.get("axes", list(range(len(node.attrs["starts"]))))
    else:
        starts = constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
        if starts is None:
            raise _Blocked("slice_not_constant")
        axes = _axes(node, 3)
        axes = list(range(starts.size)) if axes is None else axes
    if cmap.axis in [_norm_axis(int(a), rank) for a in axes]:
        raise _Blocked("slices_channels")
    const = analysis.const_of(node.inputs[0], cmap.size) if analysis.track else None
    analysis.set_out(node.outputs[0], cmap, const)


def _split(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    rank = analysis.rank(node.inputs[0])
    if _norm_axis(int(node.attrs.get("axis", 0)), rank) == cmap.axis:
        raise _Blocked("splits_channels")
    const = analysis.const_of(node.inputs[0], cmap.size) if analysis.track else None
    for out in node.outputs:
        analysis.set_out(out, cmap, const)


def _pad(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    rank = analysis.rank(node.inputs[0])
    if "pads" in node.attrs:
        pads, axes, value = list(node.attrs["pads"]), list(range(rank)), float(node.attrs.get("value", 0.0))
    else:
        pads_v = constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads_v is None:
            raise _Blocked("pads_not_constant")
        pads = [int(p) for p in pads_v.reshape(-1)]
        axes = _axes(node, 3) or list(range(rank))
        value = 0.0
        if len(node.inputs) > 2 and node.inputs[2].name:
            v = constant_values(node.inputs[2])
            value = float(v.reshape(-1)[0]) if v is not None and v.size else np.nan
    n = len(axes)
    for i, ax in enumerate(axes):
        if _norm_axis(int(ax), rank) == cmap.axis and (pads[i] or pads[i + n]):
            raise _Blocked("pads_channels")
    const = None
    if analysis.track:
        v = analysis.const_of(node.inputs[0], cmap.size)
        mode = node.attrs.get("mode", "constant")
        const = v if mode != "constant" or not any(pads) else np.where(v == value, v, np.nan)
    analysis.set_out(node.outputs[0], cmap, const)


def _resize(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    if cmap.axis != 1 or "axes" in node.attrs:
        raise _Blocked("unsupported_resize")
    a = cmap.axis
    if node.op == "Upsample" and "scales" in node.attrs:
        scales, sizes = np.asarray(node.attrs["scales"]), None
    else:
        scale_index = 1 if node.op == "Upsample" or len(node.inputs) == 2 else 2
        scales = constant_values(node.inputs[scale_index]) if len(node.inputs) > scale_index and node.inputs[scale_index].name else None
        sizes = constant_values(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    if scales is not None and scales.size:
        if scales.reshape(-1)[a] != 1:
            raise _Blocked("resizes_channels")
    elif sizes is not None and sizes.size:
        analysis.edits.append(_ShapeEntry(node, 3, a, cmap))
    else:
        raise _Blocked("unsupported_resize")
    const = None
    if analysis.track:
        v = analysis.const_of(node.inputs[0], cmap.size)
        exact = node.attrs.get("mode", "nearest") in ("nearest", "linear") and node.attrs.get(
            "coordinate_transformation_mode", "half_pixel") != "tf_crop_and_resize"
        const = v if exact else np.where(v == 0, 0.0, np.nan)
    analysis.set_out(node.outputs[0], cmap, const)


def _softmax(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    rank = analysis.rank(node.inputs[0])
    if analysis.graph.opset >= 13:
        axis = _norm_axis(int(node.attrs.get("axis", -1)), rank)
        crosses = axis == cmap.axis
    else:  # older opsets normalize over every dim from `axis` on
        crosses = cmap.axis >= _norm_axis(int(node.attrs.get("axis", 1)), rank)
    if crosses:
        raise _Blocked("reduces_over_channels")
    analysis.set_out(node.outputs[0], cmap)


def _layernorm(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    rank = analysis.rank(node.inputs[0])
    if cmap.axis >= _norm_axis(int(node.attrs.get("axis", -1)), rank):
        raise _Blocked("reduces_over_channels")
    if any(o.outputs for o in node.outputs[1:]):
        raise _Blocked("training_mode")
    analysis.set_out(node.outputs[0], cmap)


def _qdq(analysis: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _only_first_input_carried(analysis, node)
    scale = constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
    zp = constant_values(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if scale is None or (len(node.inputs) > 2 and node.inputs[2].name and zp is None) or node.attrs.get("block_size", 0):
        raise _Blocked("qdq_params_not_constant")
    rank = analysis.rank(node.inputs[0])
    per_axis = scale.ndim == 1 and scale.size > 1
    if per_axis:
        if _norm_axis(int(node.attrs.get("axis", 1)), rank) != cmap.axis or scale.size != cmap.size:
            raise _Blocked("qdq_axis")
        analysis.edits.append(_Slice(node, 1, 0, cmap))
        if zp is not None and zp.ndim == 1:
            analysis.edits.append(_Slice(node, 2, 0, cmap))
    const = None
    if analysis.track:
        v = analysis.const_of(node.inputs[0], cmap.size)
        s = np.broadcast_to(scale.astype(np.float64).reshape(-1), (cmap.size,)) if per_axis else float(scale.reshape(-1)[0])
        z = 0.0 if zp is None else (np.broadcast_to(zp.astype(np.float64).reshape(-1), (cmap.size,)) if per_axis else float(zp.reshape(-1)[0]))
        with np.errstate(all="ignore"):
            if node.op == "QuantizeLinear":
                info = np.iinfo(zp.dtype if zp is not None else np.uint8) if (zp is None or zp.dtype.kind in "iu") else None
                const = np.clip(np.round(v / s) + z, info.min, info.max) if info is not None else np.full_like(v, np.nan)
            else:
                const = (v - z) * s
    analysis.set_out(node.outputs[0], cmap, const)


#: op type -> handler. Ops not listed block the channels that reach them.
HANDLERS = {
    **{op: _unary for op in _UNARY},
    **{op: _elementwise for op in _ELEMENTWISE},
    **{op: _pool for op in _POOLS},
    **{op: _reduce for op in _REDUCES},
    "BatchNormalization": _batchnorm,
    "InstanceNormalization": _instancenorm,
    "Concat": _concat,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Slice": _slice,
    "Split": _split,
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Hardmax": _softmax,
    "LayerNormalization": _layernorm,
    "QuantizeLinear": _qdq,
    "DequantizeLinear": _qdq,
}
