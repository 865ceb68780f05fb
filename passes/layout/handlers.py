"""The op -> handler table of layout-nchw: how each layout-agnostic op runs on untransposed inputs.

A handler gets the node, the label permutation of each input (None where unlabeled) and the site
context, and returns a ``Plan`` (which inputs read the untransposed tensors, each output's label,
the edits to attributes and constants) or the reason it cannot move, counted as
``skipped_<reason>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from passes.graph_utils import constant_values, unique_name
from passes.layout.perms import Perm, invert, is_identity


@dataclass
class Plan:
    """How a node runs on untransposed inputs.

    ``pre_inputs``: the inputs that read the untransposed tensor (every labeled input must be one);
    ``out_perms``: each output's label (None: the output's value is unchanged, e.g. a reduction to
    a vector); ``edit``: changes to attributes and constant inputs, applied only if the site is
    rewritten.
    """

    out_perms: list[Perm | None]
    pre_inputs: tuple[int, ...]
    edit: Callable[[gs.Node, _Edits], None] | None = None


#: A handler: (node, label permutation of each input or None, site context) -> a Plan, or the
#: reason (a short snake_case string, reported as ``skipped_<reason>``) why it cannot move.
Handler = Callable[[gs.Node, list, "_Site"], "Plan | str"]


@dataclass
class _Site:
    opset: int

    @staticmethod
    def constant(tensor: gs.Tensor) -> np.ndarray | None:
        return constant_values(tensor) if tensor.name else None


class _Edits:
    """Creates the permuted constants of a rewrite (shared between sites that need the same one)."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.cache: dict[tuple, gs.Constant] = {}
        self.constants = 0

    def constant(self, base: str, values: np.ndarray, key: tuple | None = None) -> gs.Constant:
        if key is not None and key in self.cache:
            return self.cache[key]
        const = gs.Constant(unique_name(self.graph, base), np.ascontiguousarray(values))
        self.constants += 1
        if key is not None:
            self.cache[key] = const
        return const


def _first_perm(perms: list) -> Perm:
    return next(p for p in perms if p is not None)


def _only_data_input(perms: list) -> str:
    """'' when only input 0 is labeled, else a refusal reason."""
    if perms[0] is None:
        return "transposed_parameter"
    if any(p is not None for p in perms[1:]):
        return "transposed_parameter"
    return ""


def _axis(node: gs.Node, rank: int, default: int = 0) -> int:
    return int(node.attrs.get("axis", default)) % rank


def _set_attr(name: str, value) -> Callable[[gs.Node, _Edits], None]:
    def edit(node: gs.Node, edits: _Edits) -> None:
        node.attrs[name] = value

    return edit


def _reduced_perm(perm: Perm, removed: set[int]) -> Perm | None:
    """The label of ``reduce(Transpose(x, perm), axes=removed, keepdims=0)`` (None if identity)."""
    kept = [i for i in range(len(perm)) if i not in removed]
    pre_kept = sorted(perm[i] for i in kept)
    out = tuple(pre_kept.index(perm[i]) for i in kept)
    return None if is_identity(out) else out


def _broadcast_constant_to_pre(c: np.ndarray, perm: Perm) -> np.ndarray:
    """``c`` (broadcast against a rank-len(perm) tensor) for the untransposed tensor.

    ``[C]`` against NHWC becomes ``[C,1,1]`` against NCHW: leading 1s are dropped, which
    broadcasting restores, so per-channel constants end up in the [C,1,1] form fusions fold.
    """
    rank = len(perm)
    full = c.reshape((1,) * (rank - c.ndim) + c.shape)
    pre = np.transpose(full, invert(perm))
    keep = next((i for i, d in enumerate(pre.shape) if d != 1), pre.ndim)
    return pre.reshape(pre.shape[keep:])


def handle_unary(node, perms, site):
    """Elementwise ops of one tensor (other inputs, e.g. Clip's bounds, are scalars)."""
    reason = _only_data_input(perms)
    if reason:
        return reason
    p = perms[0]
    return Plan([p if t.name else None for t in node.outputs], (0,))


def handle_broadcast(node, perms, site):
    """Broadcasting elementwise ops: every input labeled with the same perm, or a constant."""
    p = _first_perm(perms)
    rank = len(p)
    constants: dict[int, np.ndarray] = {}
    for i, (t, q) in enumerate(zip(node.inputs, perms)):
        if q is not None:
            if q != p:
                return "perm_mismatch"
            continue
        if not t.name:
            continue
        c = site.constant(t)
        if c is not None:
            if c.ndim > rank:
                return "constant_rank"
            if any(d != 1 for d in c.shape):
                constants[i] = c  # all-ones shapes broadcast the same in any layout
            continue
        shape = t.shape
        if shape is not None and len(shape) <= rank and all(d == 1 for d in shape):
            continue  # a computed scalar broadcasts the same in any layout
        return "non_constant_operand"

    def edit(node: gs.Node, edits: _Edits) -> None:
        for i, c in constants.items():
            src = node.inputs[i]
            node.inputs[i] = edits.constant(
                f"{src.name}_perm", _broadcast_constant_to_pre(c, p), key=("bcast", id(src), p)
            )

    pre = tuple(i for i, q in enumerate(perms) if q is not None)
    return Plan([p], pre, edit if constants else None)


def handle_quantize(node, perms, site):
    """QuantizeLinear/DequantizeLinear: the per-axis ``axis`` follows its axis."""
    reason = _only_data_input(perms)
    if reason:
        return reason
    if int(node.attrs.get("block_size", 0) or 0):
        return "blocked_quantization"
    p = perms[0]
    if site.opset < 13 and "axis" not in node.attrs:
        return Plan([p], (0,))  # opset 10: per-tensor only, no axis attribute
    axis = _axis(node, len(p), default=1)
    return Plan([p], (0,), _set_attr("axis", p[axis]))


def handle_softmax(node, perms, site):
    """Softmax/LogSoftmax/Hardmax on one axis (opset >= 13); older opsets flatten the axes from
    ``axis`` on, which survives only permutations that keep that set (and, for Hardmax, order)."""
    reason = _only_data_input(perms)
    if reason:
        return reason
    p = perms[0]
    rank = len(p)
    if site.opset >= 13:
        return Plan([p], (0,), _set_attr("axis", p[_axis(node, rank, default=-1)]))
    axis = _axis(node, rank, default=1)
    tail_ok = sorted(p[axis:]) == list(range(axis, rank))
    if node.op == "Hardmax":
        tail_ok = list(p[axis:]) == list(range(axis, rank))  # ties go to the first in flat order
    if not tail_ok:
        return "flattening_softmax_before_opset13"
    return Plan([p], (0,))


def handle_arg(node, perms, site):
    """ArgMax/ArgMin: remap ``axis``; without keepdims the output label drops that axis."""
    reason = _only_data_input(perms)
    if reason:
        return reason
    p = perms[0]
    axis = _axis(node, len(p))
    out = p if int(node.attrs.get("keepdims", 1)) else _reduced_perm(p, {axis})
    return Plan([out], (0,), _set_attr("axis", p[axis]))


def handle_reduce(node, perms, site):
    """Reduce*: remap the axes (attribute, or constant input from opset 13/18)."""
    reason = _only_data_input(perms)
    if reason:
        return reason
    p = perms[0]
    rank = len(p)
    keepdims = int(node.attrs.get("keepdims", 1))
    from_input = len(node.inputs) > 1 and bool(node.inputs[1].name)
    if from_input:
        axes = site.constant(node.inputs[1])
        if axes is None:
            return "axes_not_constant"
        axes = [int(a) for a in axes.reshape(-1)]
    else:
        axes = [int(a) for a in node.attrs["axes"]] if "axes" in node.attrs else []
    if not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            return Plan([p], (0,))  # the node is an identity
        return Plan([p if keepdims else None], (0,))  # reduces every axis
    removed = {a % rank for a in axes}
    new_axes = [p[a % rank] for a in axes]
    out = p if keepdims else _reduced_perm(p, removed)

    def edit(node: gs.Node, edits: _Edits) -> None:
        if from_input:
            node.inputs[1] = edits.constant(f"{node.inputs[1].name}_perm", np.array(new_axes, np.int64))
        else:
            node.attrs["axes"] = new_axes

    return Plan([out], (0,), edit)


def handle_concat(node, perms, site):
    """Concat: every input labeled with the same perm or a constant (transposed here)."""
    p = _first_perm(perms)
    constants: dict[int, np.ndarray] = {}
    for i, (t, q) in enumerate(zip(node.inputs, perms)):
        if q is not None:
            if q != p:
                return "perm_mismatch"
            continue
        c = site.constant(t)
        if c is None:
            return "non_constant_operand"
        if c.ndim != len(p):
            return "constant_rank"
        constants[i] = c
    axis = _axis(node, len(p))

    def edit(node: gs.Node, edits: _Edits) -> None:
        node.attrs["axis"] = p[axis]
        for i, c in constants.items():
            src = node.inputs[i]
            node.inputs[i] = edits.constant(f"{src.name}_perm", np.transpose(c, invert(p)), key=("full", id(src), p))

    pre = tuple(i for i, q in enumerate(perms) if q is not None)
    return Plan([p], pre, edit)


def handle_split(node, perms, site):
    """Split: remap ``axis``; the split sizes stay."""
    reason = _only_data_input(perms)
    if reason:
        return reason
    p = perms[0]
    return Plan([p if t.name else None for t in node.outputs], (0,), _set_attr("axis", p[_axis(node, len(p))]))


def handle_slice(node, perms, site):
    """Slice: remap ``axes`` (constant input from opset 10, attribute before)."""
    reason = _only_data_input(perms)
    if reason:
        return reason
    p = perms[0]
    rank = len(p)
    if len(node.inputs) < 3:  # opset < 10: attributes
        starts = node.attrs.get("starts")
        if starts is None:
            return "slice_params_unknown"
        axes = list(node.attrs.get("axes", range(len(starts))))
        return Plan([p], (0,), _set_attr("axes", [p[int(a) % rank] for a in axes]))
    axes_t = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    starts = site.constant(node.inputs[1])
    if axes_t is not None:
        axes = site.constant(axes_t)
        if axes is None:
            return "axes_not_constant"
        dtype = axes.dtype
        axes = [int(a) for a in axes.reshape(-1)]
    else:
        count = starts.size if starts is not None else (node.inputs[1].shape or [None])[0]
        if not isinstance(count, int):
            return "slice_params_unknown"
        axes, dtype = list(range(count)), (starts.dtype if starts is not None else np.dtype(np.int64))
    new_axes = np.array([p[a % rank] for a in axes], dtype=dtype)

    def edit(node: gs.Node, edits: _Edits) -> None:
        const = edits.constant(f"{node.name or 'slice'}_axes", new_axes)
        if len(node.inputs) > 3:
            node.inputs[3] = const
        else:
            node.inputs.append(const)

    return Plan([p], (0,), edit)


def _pre_pads(pads: np.ndarray, perm: Perm) -> np.ndarray:
    rank = len(perm)
    out = np.zeros_like(pads)
    for i in range(rank):
        out[perm[i]] = pads[i]
        out[perm[i] + rank] = pads[i + rank]
    return out


def handle_pad(node, perms, site):
    """Pad (any mode): remap pads, or the ``axes`` input (opset 18)."""
    if perms[0] is None or any(q is not None for q in perms[1:]):
        return "transposed_parameter"
    p = perms[0]
    rank = len(p)
    if "pads" in node.attrs:  # opset < 11
        pads = np.asarray(node.attrs["pads"], np.int64)
        if pads.size != 2 * rank:
            return "pads_length"
        return Plan([p], (0,), _set_attr("pads", [int(v) for v in _pre_pads(pads, p)]))
    axes_t = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    if axes_t is not None:
        axes = site.constant(axes_t)
        if axes is None:
            return "axes_not_constant"
        new_axes = np.array([p[int(a) % rank] for a in axes.reshape(-1)], dtype=axes.dtype)

        def edit_axes(node: gs.Node, edits: _Edits) -> None:
            node.inputs[3] = edits.constant(f"{axes_t.name}_perm", new_axes)

        return Plan([p], (0,), edit_axes)
    pads = site.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None:
        return "pads_not_constant"
    pads = pads.reshape(-1)
    if pads.size != 2 * rank:
        return "pads_length"
    new_pads = _pre_pads(pads, p)

    def edit(node: gs.Node, edits: _Edits) -> None:
        node.inputs[1] = edits.constant(f"{node.inputs[1].name}_perm", new_pads)

    return Plan([p], (0,), edit)


def handle_resize(node, perms, site):
    """Resize: remap roi/scales/sizes (or the ``axes`` attribute, opset 18)."""
    reason = _only_data_input(perms)
    if reason:
        return reason
    p = perms[0]
    rank = len(p)
    if "axes" in node.attrs:
        return Plan([p], (0,), _set_attr("axes", [p[int(a) % rank] for a in node.attrs["axes"]]))
    vectors: dict[int, np.ndarray] = {}
    for i in range(1, len(node.inputs)):
        t = node.inputs[i]
        if not t.name:
            continue
        v = site.constant(t)
        if v is None:
            return "resize_params_not_constant"
        v = v.reshape(-1)
        if v.size == 0:
            continue
        is_roi = site.opset >= 11 and i == 1
        if v.size != (2 * rank if is_roi else rank):
            return "resize_params_length"
        vectors[i] = _pre_pads(v, p) if is_roi else v[list(invert(p))]

    def edit(node: gs.Node, edits: _Edits) -> None:
        for i, v in vectors.items():
            node.inputs[i] = edits.constant(f"{node.inputs[i].name}_perm", v)

    return Plan([p], (0,), edit)


def handle_gather(node, perms, site):
    """Gather on the data input: remap ``axis``; scalar indices drop that axis from the label."""
    reason = _only_data_input(perms)
    if reason:
        return reason
    p = perms[0]
    axis = _axis(node, len(p))
    indices = site.constant(node.inputs[1])
    rank = indices.ndim if indices is not None else (len(node.inputs[1].shape) if node.inputs[1].shape is not None else None)
    if rank not in (0, 1):
        return "gather_indices_rank"
    out = p if rank == 1 else _reduced_perm(p, {axis})
    return Plan([out], (0,), _set_attr("axis", p[axis]))


UNARY_OPS = (
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BitwiseNot", "Cast", "Ceil",
    "Celu", "Clip", "Cos", "Cosh", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu",
    "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish", "Neg",
    "Not", "Reciprocal", "Relu", "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh",
    "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
)
BROADCAST_OPS = (
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "BitShift", "BitwiseAnd",
    "BitwiseOr", "BitwiseXor", "PRelu", "Where",
)
REDUCE_OPS = (
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
)

#: op type -> handler. Ops not listed stop a Transpose (it stays in front of them).
HANDLERS: dict[str, Handler] = {
    **{op: handle_unary for op in UNARY_OPS},
    **{op: handle_broadcast for op in BROADCAST_OPS},
    **{op: handle_reduce for op in REDUCE_OPS},
    "QuantizeLinear": handle_quantize,
    "DequantizeLinear": handle_quantize,
    "Softmax": handle_softmax,
    "LogSoftmax": handle_softmax,
    "Hardmax": handle_softmax,
    "ArgMax": handle_arg,
    "ArgMin": handle_arg,
    "Concat": handle_concat,
    "Split": handle_split,
    "Slice": handle_slice,
    "Pad": handle_pad,
    "Resize": handle_resize,
    "Gather": handle_gather,
}
