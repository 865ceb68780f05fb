"""Layout normalization: turn channel-last (TensorFlow/Keras/TFLite-exported) graphs into NCHW
graphs by sinking Transposes through layout-agnostic ops until inverse pairs meet and cancel.

The pass thinks in *labels*: a tensor ``o`` is labeled ``(pre, perm)`` when ``o`` equals
``Transpose(pre, perm)``. Every Transpose labels its output; a layout-agnostic node whose inputs
are labeled can instead run on the ``pre`` tensors (its own axes, pads, scales and constants
permuted), and then labels its outputs; a Transpose of a labeled tensor composes the two
permutations and, for the inverse permutation, leaves the ``pre`` tensor itself. A labeled tensor
only needs a real Transpose where something that cannot take the other layout reads it (a Conv,
an op with no handler, a graph output). The op -> handler table (``HANDLERS``) knows, for each op,
how to run the node on transposed inputs and what its outputs' labels are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.errors import PipelineError
from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.registry import register_pass
from passes.graph_utils import (
    constant_values,
    is_default_domain,
    set_model_metadata,
    unique_name,
)
from passes.match import producer

log = logging.getLogger(__name__)

Perm = tuple[int, ...]

#: ``metadata_props`` keys written with ``io=nchw``: JSON ``{name: perm}``, where the new tensor is
#: ``numpy.transpose(old, perm)`` (so ``[0, 3, 1, 2]`` turns an NHWC input or output into NCHW).
LAYOUT_INPUTS_KEY = "layout.inputs"
LAYOUT_OUTPUTS_KEY = "layout.outputs"


# -- permutations ------------------------------------------------------------------------------
def invert(perm: Perm) -> Perm:
    """The permutation that undoes ``perm``."""
    inv = [0] * len(perm)
    for i, axis in enumerate(perm):
        inv[axis] = i
    return tuple(inv)


def compose(first: Perm, then: Perm) -> Perm:
    """``Transpose(Transpose(x, first), then) == Transpose(x, compose(first, then))``."""
    return tuple(first[i] for i in then)


def is_identity(perm: Perm) -> bool:
    return all(i == axis for i, axis in enumerate(perm))


def channel_first_perm(rank: int) -> Perm:
    """NHWC -> NCHW for any rank >= 3: ``(0, rank-1, 1, ..., rank-2)``."""
    return (0, rank - 1) + tuple(range(1, rank - 1))


def transposed_shape(shape, perm: Perm):
    """The shape of ``Transpose(x, perm)`` for ``x`` of ``shape`` (None stays None)."""
    if shape is None or len(shape) != len(perm):
        return None
    return [shape[a] for a in perm]


# -- handlers ----------------------------------------------------------------------------------
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


# -- analysis ----------------------------------------------------------------------------------
@dataclass
class _Label:
    pre: gs.Tensor  # the untransposed tensor
    perm: Perm
    comp: int  # union-find key


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


@dataclass
class _Analysis:
    """Labels of every tensor, the nodes that would run untransposed, and the accepted regions."""

    labels: dict[int, _Label] = field(default_factory=dict)  # id(tensor) -> label
    tensors: dict[int, gs.Tensor] = field(default_factory=dict)  # id(tensor) -> tensor, for labels
    aliases: dict[int, tuple[gs.Tensor, int]] = field(default_factory=dict)  # Transpose output == pre
    plans: dict[int, tuple[gs.Node, Plan]] = field(default_factory=dict)  # flipped nodes, topo order
    transposes: dict[int, gs.Node] = field(default_factory=dict)  # label-producing Transposes
    uf: _UnionFind = field(default_factory=_UnionFind)
    accepted: set[int] = field(default_factory=set)
    rejected: int = 0
    gain: int = 0  # Transposes the accepted regions remove
    before: dict[int, int] = field(default_factory=dict)  # id(Transpose) -> 1 unless added by io=nchw
    skips: dict[str, int] = field(default_factory=dict)


class _Layout:
    """One run of the pass over a main graph."""

    def __init__(self, graph: gs.Graph, io: str):
        self.graph = graph
        self.io = io
        self.site = _Site(opset=int(graph.opset or 0))
        self.outputs = {id(t) for t in graph.outputs}
        self.virtual: dict[int, tuple[gs.Node, gs.Tensor, gs.Tensor, int]] = {}  # id(V) -> (V, new, old, index)

    # -- graph queries ---------------------------------------------------------------------
    @staticmethod
    def perm_of(node: gs.Node) -> Perm | None:
        perm = node.attrs.get("perm")
        if perm is not None:
            return tuple(int(a) for a in perm)
        shape = node.inputs[0].shape if node.inputs else None
        return tuple(reversed(range(len(shape)))) if shape is not None else None

    def is_transpose(self, node: gs.Node) -> bool:
        return (
            node.op == "Transpose"
            and is_default_domain(node)
            and len(node.inputs) == 1
            and len(node.outputs) == 1
            and self.perm_of(node) is not None
        )

    def count_transposes(self) -> int:
        return sum(1 for n in self.graph.nodes if n.op == "Transpose")

    # -- pre-step: one Transpose per (tensor, perm) ----------------------------------------
    def merge_duplicates(self) -> int:
        """Transposes of the same tensor with the same perm become one."""
        groups: dict[tuple[int, Perm], list[gs.Node]] = {}
        for node in self.graph.nodes:
            if self.is_transpose(node):
                groups.setdefault((id(node.inputs[0]), self.perm_of(node)), []).append(node)
        merged = 0
        for nodes in groups.values():
            if len(nodes) < 2:
                continue
            nodes.sort(key=lambda n: id(n.outputs[0]) not in self.outputs)  # keep an output's name
            keep = nodes[0]
            for dup in nodes[1:]:
                y = dup.outputs[0]
                if id(y) in self.outputs:
                    continue
                for consumer in list(y.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is y:
                            consumer.inputs[i] = keep.outputs[0]
                _detach(dup)
                merged += 1
        if merged:
            self.graph.nodes = [n for n in self.graph.nodes if n.inputs or n.outputs]
            self.graph.toposort()
        return merged

    # -- io=nchw: the model's own inputs become channel-first --------------------------------
    def add_virtual_inputs(self) -> None:
        for index, x in enumerate(list(self.graph.inputs)):
            if not isinstance(x, gs.Variable) or x.shape is None or len(x.shape) < 3 or not x.outputs:
                continue
            if x.dtype is None or id(x) in self.outputs:
                continue
            cf = channel_first_perm(len(x.shape))
            new = gs.Variable(x.name, dtype=x.dtype, shape=transposed_shape(x.shape, cf))
            x.name = unique_name(self.graph, f"{new.name}_channel_last")
            v = gs.Node("Transpose", name=unique_name(self.graph, f"{new.name}_to_channel_last"),
                        attrs={"perm": list(invert(cf))}, inputs=[new], outputs=[x])
            self.graph.inputs[index] = new
            self.graph.nodes.insert(0, v)
            self.virtual[id(v)] = (v, new, x, index)

    def drop_virtual_input(self, key: int) -> None:
        v, new, old, index = self.virtual.pop(key)
        _detach(v)
        self.graph.nodes = [n for n in self.graph.nodes if n is not v]
        name = new.name
        new.name = unique_name(self.graph, f"{name}_unused")
        old.name = name
        self.graph.inputs[index] = old

    # -- analysis ----------------------------------------------------------------------------
    def analyze(self) -> _Analysis:
        a = _Analysis()
        for node in self.graph.nodes:
            if self.is_transpose(node):
                self._label_transpose(a, node)
                continue
            perms = [a.labels[id(t)].perm if id(t) in a.labels else None for t in node.inputs]
            if not any(p is not None for p in perms):
                continue
            handler = HANDLERS.get(node.op)
            if handler is None or not is_default_domain(node) or _has_subgraph(node):
                _add(a.skips, "no_handler")
                continue
            plan = handler(node, perms, self.site)
            if isinstance(plan, str):
                _add(a.skips, plan)
                continue
            if any(p is not None and i not in plan.pre_inputs for i, p in enumerate(perms)):
                _add(a.skips, "transposed_parameter")
                continue
            self._flip(a, node, plan, perms)
        self._prune(a)
        self._decide(a)
        return a

    def _label_transpose(self, a: _Analysis, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        perm = self.perm_of(node)
        a.transposes[id(node)] = node
        if id(x) in a.labels:
            label = a.labels[id(x)]
            perm = compose(label.perm, perm)
            pre, key = label.pre, label.comp
        else:
            pre, key = x, id(y)
            if id(x) in a.aliases:
                key = a.aliases[id(x)][1]
        a.uf.union(key, id(y))
        if is_identity(perm):
            a.aliases[id(y)] = (pre, key)
        else:
            a.labels[id(y)] = _Label(pre, perm, key)
            a.tensors[id(y)] = y
        if id(node) not in self.virtual:
            a.before[id(node)] = 1

    def _flip(self, a: _Analysis, node: gs.Node, plan: Plan, perms: list) -> None:
        keys = [a.labels[id(node.inputs[i])].comp for i in plan.pre_inputs if perms[i] is not None]
        for k in keys[1:]:
            a.uf.union(keys[0], k)
        for o, perm in zip(node.outputs, plan.out_perms):
            if perm is None or not o.name:
                continue
            pre = gs.Variable(unique_name(self.graph, f"{o.name}_{_suffix(perm)}"), dtype=o.dtype,
                              shape=transposed_shape(o.shape, invert(perm)))
            a.labels[id(o)] = _Label(pre, perm, keys[0])
            a.tensors[id(o)] = o
        a.plans[id(node)] = (node, plan)

    # -- cost model --------------------------------------------------------------------------
    def convertible_output(self, a: _Analysis, o: gs.Tensor) -> bool:
        """io=nchw: a channel-last graph output that may become channel-first (no Transpose)."""
        label = a.labels[id(o)]
        return self.io == "nchw" and len(label.perm) >= 3 and invert(label.perm) == channel_first_perm(len(label.perm))

    def needs_transpose(self, a: _Analysis, o: gs.Tensor) -> bool:
        """A labeled tensor needs a real Transpose when something reads it in its own layout."""
        for consumer in o.outputs:
            if id(consumer) not in a.plans and id(consumer) not in a.transposes:
                return True
        return id(o) in self.outputs and not self.convertible_output(a, o)

    def _prune(self, a: _Analysis) -> None:
        """Un-flip dead-end branches that would only add Transposes (a labeled tensor sinking into
        a graph output or an op with no handler while its source Transpose stays for others)."""
        changed = True
        while changed:
            changed = False
            for key in reversed(list(a.plans)):
                if key not in a.plans:
                    continue
                group = self._dead_end_group(a, a.plans[key][0])
                if group:
                    for node in group:
                        self._unflip(a, node)
                    changed = True

    def _labeled_outputs(self, a: _Analysis, node: gs.Node) -> list[gs.Tensor]:
        return [o for o in node.outputs if id(o) in a.labels]

    def _dead_end_group(self, a: _Analysis, leaf: gs.Node) -> list[gs.Node]:
        group: dict[int, gs.Node] = {}
        frontier = [leaf]
        while frontier:
            for node in frontier:
                group[id(node)] = node
            if self._unflip_gain(a, group) > 0:
                return list(group.values())
            parents = []
            for node in frontier:
                for t in node.inputs:
                    parent = producer(t) if id(t) in a.labels else None
                    if parent is None or id(parent) not in a.plans or id(parent) in group:
                        continue
                    owned = all(
                        id(c) in group or (id(c) not in a.plans and id(c) not in a.transposes)
                        for o in self._labeled_outputs(a, parent) for c in o.outputs
                    )
                    if owned and all(id(p) != id(parent) for p in parents):
                        parents.append(parent)
            frontier = parents
        return []

    def _unflip_gain(self, a: _Analysis, group: dict[int, gs.Node]) -> int:
        """Transposes saved by un-flipping ``group`` (whose outputs are read by no other flip)."""
        outs = {id(o): o for n in group.values() for o in self._labeled_outputs(a, n)}
        for o in outs.values():
            if any(id(c) in a.transposes or (id(c) in a.plans and id(c) not in group) for c in o.outputs):
                return 0  # not a dead end
        gain = sum(1 for o in outs.values() if self.needs_transpose(a, o))
        ins = {id(t): t for n in group.values() for t in n.inputs if id(t) in a.labels and id(t) not in outs}
        for t in ins.values():
            if not self.needs_transpose(a, t):
                gain -= 1  # un-flipped readers would need it materialized
        return gain

    def _unflip(self, a: _Analysis, node: gs.Node) -> None:
        del a.plans[id(node)]
        for o in node.outputs:
            a.labels.pop(id(o), None)
            a.tensors.pop(id(o), None)

    def _region(self, a: _Analysis, node: gs.Node) -> int:
        """The region (union-find root) of a flipped node or a label-producing Transpose."""
        if node.op == "Transpose" and id(node) in a.transposes:
            out = node.outputs[0]
            label = a.labels.get(id(out))
            return a.uf.find(label.comp if label is not None else a.aliases[id(out)][1])
        node, plan = a.plans[id(node)]
        first = next(i for i in plan.pre_inputs if id(node.inputs[i]) in a.labels)
        return a.uf.find(a.labels[id(node.inputs[first])].comp)

    def _decide(self, a: _Analysis) -> None:
        """Accept each region (connected labels) that lowers its Transpose count. Regions that tie
        are accepted too when the pass lowers the count elsewhere, so Transposes sink to the model
        boundary -- but never to change the model's own inputs."""
        after: dict[int, int] = {}
        before: dict[int, int] = {}
        flips = {self._region(a, node) for node, _ in a.plans.values()}
        virtual = {self._region(a, v) for v, *_ in self.virtual.values()}
        for key, o in a.tensors.items():
            root = a.uf.find(a.labels[key].comp)
            after[root] = after.get(root, 0) + int(self.needs_transpose(a, o))
        for key, node in a.transposes.items():
            root = self._region(a, node)
            before[root] = before.get(root, 0) + a.before.get(key, 0)
        roots = set(before) | set(after)
        better = {r for r in roots if after.get(r, 0) < before.get(r, 0)}
        ties = {r for r in flips - virtual if after.get(r, 0) == before.get(r, 0)} if better else set()
        a.accepted = better | ties
        a.rejected = len(flips - a.accepted)
        a.gain = sum(before.get(r, 0) - after.get(r, 0) for r in a.accepted)

    def accepted(self, a: _Analysis, node: gs.Node) -> bool:
        return self._region(a, node) in a.accepted

    def failed_inputs(self, a: _Analysis) -> list[int]:
        """io=nchw: inputs whose channel-first form would still need a Transpose."""
        return [
            key for key, (v, *_rest) in self.virtual.items()
            if not self.accepted(a, v) or self.needs_transpose(a, v.outputs[0])
        ]

    # -- rewrite -----------------------------------------------------------------------------
    def commit(self, a: _Analysis) -> tuple[dict[str, int], dict]:
        g = self.graph
        edits = _Edits(g)
        plans = [(node, plan) for node, plan in a.plans.values() if self.accepted(a, node)]
        transposes = [node for node in a.transposes.values() if self.accepted(a, node)]
        labeled = [(o, a.labels[id(o)]) for node in transposes for o in node.outputs if id(o) in a.labels]
        labeled += [(o, a.labels[id(o)]) for node, _ in plans for o in node.outputs if id(o) in a.labels]
        need = {id(o): self.needs_transpose(a, o) for o, _ in labeled}
        cancelled = {id(n.outputs[0]) for n in transposes if id(n.outputs[0]) in a.aliases}

        def real(t: gs.Tensor) -> gs.Tensor:
            """``t``, or the tensor it equals once its (cancelled) Transpose is gone."""
            while id(t) in cancelled:
                t = a.aliases[id(t)][0]
            return t

        # 1. flipped nodes read the untransposed tensors and write untransposed outputs
        for node, plan in plans:
            for i in plan.pre_inputs:
                label = a.labels.get(id(node.inputs[i]))
                if label is not None:
                    node.inputs[i] = real(label.pre)
            if plan.edit is not None:
                plan.edit(node, edits)
            for j, o in enumerate(list(node.outputs)):
                label = a.labels.get(id(o))
                if label is not None:
                    node.outputs[j] = label.pre
        # 2. Transposes go; those composing to the identity hand their readers the source tensor
        inputs_nchw: dict[str, dict] = {}
        for node in transposes:
            out = node.outputs[0]
            if id(node) in self.virtual:
                new = self.virtual[id(node)][1]
                inputs_nchw[new.name] = {"perm": list(channel_first_perm(len(new.shape))), "shape": list(new.shape)}
            if id(out) in a.aliases:
                pre = real(a.aliases[id(out)][0])
                if id(out) in self.outputs:
                    node.op, node.attrs = "Identity", {}  # keeps the output name; cleanup removes it
                    node.inputs[0] = pre
                    continue
                for consumer in list(out.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is out:
                            consumer.inputs[i] = pre
            _detach(node)
        # 3. one Transpose for each labeled tensor still read in its own layout
        new_nodes: list[gs.Node] = []
        outputs_nchw: dict[str, dict] = {}
        made: dict[tuple[int, Perm], gs.Tensor] = {}  # one Transpose per (source, perm)
        for o, label in labeled:
            pre = real(label.pre)
            if need[id(o)]:
                twin = made.get((id(pre), label.perm))
                if twin is not None and id(o) not in self.outputs:
                    for consumer in list(o.outputs):
                        for i, t in enumerate(consumer.inputs):
                            if t is o:
                                consumer.inputs[i] = twin
                else:
                    new_nodes.append(gs.Node("Transpose", name=unique_name(g, f"{o.name}_transpose"),
                                             attrs={"perm": list(label.perm)}, inputs=[pre], outputs=[o]))
                    made.setdefault((id(pre), label.perm), o)
            if id(o) in self.outputs and self.convertible_output(a, o):
                shape = transposed_shape(o.shape, invert(label.perm))
                outputs_nchw[o.name] = {"perm": list(invert(label.perm)), "shape": list(shape) if shape else None}
                new_nodes.extend(self._expose_as_output(o, pre, label.perm))
        g.nodes = [n for n in g.nodes if n.inputs or n.outputs] + new_nodes
        details = {}
        for key, changed in ((LAYOUT_INPUTS_KEY, inputs_nchw), (LAYOUT_OUTPUTS_KEY, outputs_nchw)):
            if changed:
                perms = {name: entry["perm"] for name, entry in changed.items()}
                set_model_metadata(g, key, json.dumps(perms, sort_keys=True))
                details[key] = changed
        g.toposort()
        stats = {
            "moved": len(plans),
            "constants_permuted": edits.constants,
            "inputs_nchw": len(inputs_nchw),
            "outputs_nchw": len(outputs_nchw),
        }
        return stats, details

    def _expose_as_output(self, o: gs.Tensor, pre: gs.Tensor, perm: Perm) -> list[gs.Node]:
        """Make the untransposed ``pre`` the graph output, under ``o``'s name (io=nchw)."""
        g = self.graph
        name = o.name
        o.name = unique_name(g, f"{name}_channel_last")
        indices = [i for i, t in enumerate(g.outputs) if t is o]
        shape = transposed_shape(o.shape, invert(perm))
        local = len(pre.inputs) == 1 and any(n is pre.inputs[0] for n in g.nodes)
        if (
            isinstance(pre, gs.Variable)
            and local
            and not any(t is pre for t in g.inputs)
            and not any(t is pre for t in g.outputs)
        ):
            pre.name = name
            pre.dtype = pre.dtype if pre.dtype is not None else o.dtype
            pre.shape = pre.shape if pre.shape is not None else shape
            for i in indices:
                g.outputs[i] = pre
            return []
        out = gs.Variable(name, dtype=o.dtype, shape=shape)
        for i in indices:
            g.outputs[i] = out
        return [gs.Node("Identity", name=unique_name(g, f"{name}_identity"), inputs=[pre], outputs=[out])]


def _suffix(perm: Perm) -> str:
    return "nchw" if invert(perm) == channel_first_perm(len(perm)) and len(perm) >= 3 else "untransposed"


def _has_subgraph(node: gs.Node) -> bool:
    for value in node.attrs.values():
        if isinstance(value, gs.Graph) or (isinstance(value, list) and value and isinstance(value[0], gs.Graph)):
            return True
    return False


def _detach(node: gs.Node) -> None:
    node.inputs.clear()
    node.outputs.clear()


def _add(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


@register_pass
@dataclass
class LayoutNCHW(Pass):
    """Make channel-last (TensorFlow/Keras/TFLite-exported) graphs NCHW by sinking Transposes
    through layout-agnostic ops until inverse pairs cancel::

        x -> Transpose(0,3,1,2) -> Conv -> Transpose(0,2,3,1) -> Mul([C]) -> Relu -> Transpose(0,3,1,2) -> Conv
        becomes
        x -> Transpose(0,3,1,2) -> Conv -> Mul([C,1,1]) -> Relu -> Conv

    A Transpose moves below an op that has a handler: unary elementwise ops and activations
    (Relu, Sigmoid, Clip, Cast, Dropout ...); broadcasting ops (Add, Mul, Where, PRelu ...) whose
    other inputs carry the same permutation or are constants (permuted here, so a channel-last [C]
    bias becomes [C,1,1] and ``fuse-affine`` folds it into the Conv); Concat, Split, Slice, Pad,
    Reduce*, Softmax/LogSoftmax/Hardmax, ArgMax/ArgMin, Gather (axes and pads remapped); Resize
    (roi/scales/sizes remapped); QuantizeLinear/DequantizeLinear (per-axis ``axis`` remapped).
    Two Transposes in a row merge; inverse ones cancel; Transposes of one tensor with one
    permutation become one. Every rewrite is a permutation: the numerics do not change.

    A region of connected moves is applied only if it lowers the number of Transposes (or keeps it,
    when the pass lowers it elsewhere: the Transposes then sink to the model boundary, so per-channel
    constants meet their Conv). A branch that would only add Transposes is not moved. Graphs with
    nothing to gain (already NCHW) are left unchanged. Stats: ``transposes_before``,
    ``transposes_after`` (Transpose nodes in the main graph), ``moved`` (nodes now running in the
    other layout), ``merged``, ``regions_rejected``, ``skipped_<reason>`` (where a Transpose stopped:
    ``no_handler``, ``non_constant_operand``, ``perm_mismatch`` ...). If/Loop/Scan bodies are not
    rewritten; a Transpose read inside one stays.

    Option ``io``: ``keep`` (default) keeps the model's inputs and outputs as they are (one
    Transpose at each channel-last boundary); ``nchw`` makes channel-last inputs and outputs
    channel-first themselves, removing the boundary Transposes. Only inputs/outputs whose
    Transposes then disappear change; the model records what changed in ``metadata_props``
    (``layout.inputs`` / ``layout.outputs``: JSON of name -> perm, new = transpose(old, perm))
    and the stats count them (``inputs_nchw``, ``outputs_nchw``).
    """

    name = "layout-nchw"
    requires_any_op = frozenset({"Transpose"})
    io: Literal["keep", "nchw"] = "keep"

    def __post_init__(self):
        if self.io not in ("keep", "nchw"):
            raise PipelineError(f"option 'io' of pass 'layout-nchw' must be keep or nchw; got {self.io!r}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        layout = _Layout(graph, self.io)
        before = layout.count_transposes()
        stats: dict[str, int | float] = {"transposes_before": before}
        if before == 0:
            stats["transposes_after"] = 0
            return PassResult(changed=False, stats=stats)
        graph.toposort()
        merged = layout.merge_duplicates()
        if self.io == "nchw":
            layout.add_virtual_inputs()
        analysis = layout.analyze()
        while layout.failed_inputs(analysis):
            for key in layout.failed_inputs(analysis):
                layout.drop_virtual_input(key)
            analysis = layout.analyze()
        stats["merged"] = merged
        stats["regions_rejected"] = analysis.rejected
        stats.update({f"skipped_{k}": v for k, v in sorted(analysis.skips.items())})
        if analysis.gain + merged <= 0:
            stats["transposes_after"] = before
            return PassResult(changed=False, stats=stats)
        counts, details = layout.commit(analysis)
        stats.update(counts)
        after = layout.count_transposes()
        stats["transposes_after"] = after
        if after >= before:  # a safety net: the cost model says this cannot happen
            log.warning("layout-nchw: the rewrite did not lower the Transpose count (%d -> %d); discarded", before, after)
            stats["transposes_after"] = before
            return PassResult(changed=False, stats=stats)
        return PassResult(changed=True, stats=stats, details=details)


# -- io=nchw helpers for callers (verification, evaluation) -------------------------------------
def io_layout(model) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The input and output permutations ``layout-nchw(io=nchw)`` recorded in ``model``."""
    props = {p.key: p.value for p in model.metadata_props}
    inputs = json.loads(props.get(LAYOUT_INPUTS_KEY, "{}"))
    outputs = json.loads(props.get(LAYOUT_OUTPUTS_KEY, "{}"))
    return inputs, outputs


def to_model_inputs(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Original-layout feeds transposed to what ``model`` (after io=nchw) reads."""
    inputs, _ = io_layout(model)
    return {k: (np.ascontiguousarray(np.transpose(v, inputs[k])) if k in inputs else v) for k, v in feeds.items()}


def to_original_outputs(model, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``model``'s outputs (after io=nchw) transposed back to the original layout."""
    _, perms = io_layout(model)
    back = {k: invert(tuple(p)) for k, p in perms.items()}
    return {k: (np.ascontiguousarray(np.transpose(v, back[k])) if k in back else v) for k, v in outputs.items()}
