"""Graph simplification: layout-op chains, no-op arithmetic, common subexpressions, shape subgraphs.

Every rewrite here is exact (the optimized model computes bit-identical values, with the one
documented exception of ``x + 0`` turning ``-0.0`` into ``+0.0``). Static shapes come from onnx
shape inference; where a shape or type is not known statically, the site is skipped and counted.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.registry import register_pass
from passes.cleanup import _bypass
from passes.graph_utils import (
    QDQ_OPS,
    RANDOM_OPS,
    InferredType,
    all_graphs,
    constant_values,
    evaluate_constant_expression,
    infer_tensor_types,
    is_constant_expression,
    is_default_domain,
    is_graph_output,
    numpy_dtype,
)
from passes.match import producer

log = logging.getLogger(__name__)

#: Ops that only reinterpret the row-major element order under a new shape.
REINTERPRET_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})

#: Slice ends at or above this are "to the end" whatever the dim (exporters write INT32/INT64 max).
_SLICE_TO_END = 2**31 - 1

#: Safety bound on simplification rounds inside one run (each round only ever removes work).
_MAX_ROUNDS = 32


# -- shared helpers ---------------------------------------------------------------------------


class _Names:
    """Fresh tensor names for one pass run (computing the used set once, not per name)."""

    def __init__(self, graph: gs.Graph):
        self.used = {t.name for g in all_graphs(graph) for t in g.tensors().values()}

    def new(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _shape(tensor: gs.Tensor, types: dict[str, InferredType]) -> tuple[int | None, ...] | None:
    """Dims of ``tensor`` (None for unknown ones), or None when even the rank is unknown."""
    if isinstance(tensor, gs.Constant):
        return tuple(int(d) for d in tensor.shape)
    entry = types.get(tensor.name)
    if entry is not None and entry[0] is not None:
        return entry[0]
    if tensor.shape is not None:
        return tuple(d if isinstance(d, int) and d >= 0 else None for d in tensor.shape)
    return None


def _static(shape: tuple[int | None, ...] | None) -> tuple[int, ...] | None:
    return shape if shape is not None and all(d is not None for d in shape) else None


def _elem_type(tensor: gs.Tensor, types: dict[str, InferredType]) -> int | None:
    """The ONNX element type (``TensorProto.FLOAT`` ...) of ``tensor``, or None if unknown."""
    entry = types.get(tensor.name)
    dtype = entry[1] if entry is not None and entry[1] is not None else numpy_dtype(tensor.dtype)
    if dtype is None:
        return None
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(dtype))
    except Exception:  # a type numpy or onnx cannot map (e.g. a custom element type)
        return None


def _position(tensors: list[gs.Tensor], tensor: gs.Tensor) -> int:
    """Index of ``tensor`` itself in ``tensors`` (``list.index`` would compare tensors by value)."""
    return next(i for i, t in enumerate(tensors) if t is tensor)


def _rewire(tensor: gs.Tensor, replacement: gs.Tensor) -> None:
    """Every reader of ``tensor`` (subgraph readers included) reads ``replacement`` instead."""
    for consumer in list(tensor.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is tensor:
                consumer.inputs[i] = replacement


def _result(counts: Counter, changed: bool) -> PassResult:
    return PassResult(changed=changed, stats={k: int(v) for k, v in sorted(counts.items()) if v})


# -- simplify-layout-ops -----------------------------------------------------------------------

_T = onnx.TensorProto
_FLOATS = frozenset({_T.FLOAT16, _T.BFLOAT16, _T.FLOAT, _T.DOUBLE})
_NUMERIC = frozenset(
    {_T.UINT8, _T.INT8, _T.UINT16, _T.INT16, _T.UINT32, _T.INT32, _T.UINT64, _T.INT64} | _FLOATS
)
#: LOSSLESS[a] = the types that hold every value of type ``a`` exactly.
LOSSLESS_CASTS: dict[int, frozenset[int]] = {
    _T.BOOL: _NUMERIC,
    _T.UINT8: frozenset({_T.UINT16, _T.INT16, _T.UINT32, _T.INT32, _T.UINT64, _T.INT64} | _FLOATS),
    _T.INT8: frozenset({_T.INT16, _T.INT32, _T.INT64} | _FLOATS),
    _T.UINT16: frozenset({_T.UINT32, _T.INT32, _T.UINT64, _T.INT64, _T.FLOAT, _T.DOUBLE}),
    _T.INT16: frozenset({_T.INT32, _T.INT64, _T.FLOAT, _T.DOUBLE}),
    _T.UINT32: frozenset({_T.UINT64, _T.INT64, _T.DOUBLE}),
    _T.INT32: frozenset({_T.INT64, _T.DOUBLE}),
    _T.FLOAT16: frozenset({_T.FLOAT, _T.DOUBLE}),
    _T.BFLOAT16: frozenset({_T.FLOAT, _T.DOUBLE}),
    _T.FLOAT: frozenset({_T.DOUBLE}),
}


def cast_pair_is_exact(src: int, mid: int, dst: int) -> bool:
    """True when ``Cast(Cast(x: src, to=mid), to=dst)`` equals ``Cast(x, to=dst)`` for every x.

    The first cast must be lossless (``mid`` holds every ``src`` value), so both sides cast the
    same value. We further require a target whose conversion depends on the value alone in every
    runtime: back to ``src`` (a round trip, i.e. the identity), another lossless type, bool
    (``v != 0``), or float-to-float rounding. Float-to-integer targets are excluded: out-of-range
    and NaN conversions are implementation-defined and could differ between the two paths.
    """
    if mid not in LOSSLESS_CASTS.get(src, frozenset()):
        return False
    return (
        dst == src
        or dst in LOSSLESS_CASTS.get(src, frozenset())
        or dst == _T.BOOL
        or (src in _FLOATS and mid in _FLOATS and dst in _FLOATS)
    )


@register_pass
@dataclass
class SimplifyLayoutOps(Pass):
    """Merge chains of layout ops and remove layout ops that do nothing.

    Merges (the first node of a chain stays only if something else still reads it)::

        x -> Transpose(p1) -> Transpose(p2) -> y      x -> Transpose(p1[p2[i]]) -> y
        x -> Reshape/Flatten/Squeeze/Unsqueeze -> Reshape(s) -> y          x -> Reshape(s) -> y
             (s constant with no 0 entries, or allowzero=1: a reshape only reinterprets the
             row-major element order, so what came before it does not matter)
        x -> Squeeze -> Unsqueeze -> Flatten -> y       x -> Reshape(static shape of y) -> y
             (any chain of reshape-like ops, when y's shape is statically known)
        x -> Cast(mid) -> Cast(dst) -> y                x -> Cast(dst) -> y
             only when the first cast is lossless (``mid`` holds every value of x's type) and
             ``dst`` is x's own type, another lossless type, bool, or all three types are floats.
             So int32->int64->int32 and float16->float32->float16 disappear (every half value is
             a float, and casting it back is exact), while float32->float16->float32 (rounds to
             half precision), int64->int32->int64 (wraps) and float32->int32->float32 (truncates)
             stay. NaN stays NaN; its payload may be canonicalized, as by any cast.

    Removes as identities (readers read the input instead): ``Transpose`` with the identity
    permutation; ``Reshape``/``Flatten``/``Squeeze``/``Unsqueeze``/``Expand`` whose output shape
    equals the input shape (statically known, or ``Reshape``/``Expand`` by ``Shape`` of the same
    tensor, or ``Expand`` by a constant all-ones shape no longer than the input's rank); ``Cast``
    to the input's own type; ``Slice`` taking the whole tensor (constant starts 0, ends >= the
    dim or INT_MAX, steps 1); a single-input ``Concat``. When the removed node's output is a
    graph output its name is kept (the producer of the input writes it instead); when that is
    impossible (the input is a graph input or another output) the node stays.

    Shapes and types come from onnx shape inference over the whole model, including If/Loop/Scan
    bodies (inference does not assume loop-carried shapes are fixed). Sites whose shape or type
    is unknown are skipped and counted (``skipped_unknown_shape``, ``skipped_unknown_type``), as
    are lossy cast pairs (``skipped_lossy_cast``) and identities kept for an output name
    (``kept_graph_output``). No options.
    """

    name = "simplify-layout-ops"
    requires_any_op = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Slice", "Concat", "Expand"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        types = infer_tensor_types(graph)
        self._names = _Names(graph)
        counts: Counter = Counter()
        skips: set[tuple[str, int]] = set()  # (reason, id(node)): each site counted once
        graphs = list(all_graphs(graph))
        changed = False
        for _ in range(_MAX_ROUNDS):
            skips = set()  # sites still skipped after the last round are the ones reported
            round_changed = False
            for g in graphs:
                for node in list(g.nodes):
                    if node.inputs and node.outputs and is_default_domain(node):
                        round_changed |= self._simplify(g, node, types, counts, skips)
            changed |= round_changed
            if not round_changed:
                break
        counts.update(reason for reason, _ in skips)
        return _result(counts, changed)

    def _simplify(self, g: gs.Graph, node: gs.Node, types, counts: Counter, skips: set) -> bool:
        changed = False
        if node.op == "Transpose":
            changed = self._merge_transposes(node, types, counts)
        elif node.op in REINTERPRET_OPS:
            changed = self._merge_reshapes(g, node, types, counts, skips)
        elif node.op == "Cast":
            changed = self._merge_casts(node, types, counts, skips)
        if len(node.outputs) == 1 and self._is_identity(node, types, skips):
            if _bypass(g, node):
                counts[f"removed_{node.op.lower()}"] += 1
                return True
            skips.add(("kept_graph_output", id(node)))
        return changed

    # merges
    def _merge_transposes(self, node: gs.Node, types, counts: Counter) -> bool:
        x = node.inputs[0]
        perm = _perm(node, _shape(x, types))
        if perm is None:
            return False
        source = x
        while True:
            parent = producer(source)
            if parent is None or parent.op != "Transpose" or not is_default_domain(parent) or len(parent.outputs) != 1:
                break
            inner = _perm(parent, (None,) * len(perm))  # a transpose keeps the rank
            if inner is None or len(inner) != len(perm):
                break
            perm = [inner[i] for i in perm]
            source = parent.inputs[0]
        if source is x:
            return False
        node.inputs[0] = source
        node.attrs["perm"] = perm
        counts["transpose_merged"] += 1
        return True

    def _merge_reshapes(self, g: gs.Graph, node: gs.Node, types, counts: Counter, skips: set) -> bool:
        x = node.inputs[0]
        source = x
        while True:
            parent = producer(source)
            if parent is None or parent.op not in REINTERPRET_OPS or not is_default_domain(parent):
                break
            if len(parent.outputs) != 1 or not parent.inputs:
                break
            source = parent.inputs[0]
        if source is x:
            return False
        if node.op == "Reshape" and len(node.inputs) >= 2:
            target = constant_values(node.inputs[1])
            if target is not None and (node.attrs.get("allowzero", 0) or not np.any(target == 0)):
                node.inputs[0] = source
                counts["reshape_merged"] += 1
                return True
        out = _static(_shape(node.outputs[0], types))
        if out is None or 0 in out or (g.opset or 13) < 5:
            skips.add(("skipped_unknown_shape", id(node)))
            return False
        target = gs.Constant(self._names.new(f"{node.outputs[0].name}_shape"), np.array(out, dtype=np.int64))
        node.op = "Reshape"
        node.attrs.clear()
        node.inputs.clear()
        node.inputs.extend([source, target])
        counts["reshape_merged"] += 1
        return True

    def _merge_casts(self, node: gs.Node, types, counts: Counter, skips: set) -> bool:
        dst = node.attrs.get("to")
        if dst is None:
            return False
        x = node.inputs[0]
        source = x
        while True:
            parent = producer(source)
            if parent is None or parent.op != "Cast" or not is_default_domain(parent) or len(parent.outputs) != 1:
                break
            src = _elem_type(parent.inputs[0], types)
            if src is None:
                skips.add(("skipped_unknown_type", id(node)))
                break
            if not cast_pair_is_exact(src, int(parent.attrs.get("to", -1)), int(dst)):
                skips.add(("skipped_lossy_cast", id(node)))
                break
            source = parent.inputs[0]
        if source is x:
            return False
        node.inputs[0] = source
        counts["cast_merged"] += 1
        return True

    # identities
    def _is_identity(self, node: gs.Node, types, skips: set) -> bool:
        op, x = node.op, node.inputs[0]
        if op == "Transpose":
            perm = _perm(node, _shape(x, types))
            return perm is not None and perm == list(range(len(perm)))
        if op == "Cast":
            src = _elem_type(x, types)
            if src is None:
                skips.add(("skipped_unknown_type", id(node)))
                return False
            return src == node.attrs.get("to")
        if op == "Concat":
            return len(node.inputs) == 1
        if op == "Slice":
            return _slice_is_whole(node, _shape(x, types), skips)
        if op in REINTERPRET_OPS or op == "Expand":
            if op in ("Reshape", "Expand") and len(node.inputs) >= 2:
                shape_of = producer(node.inputs[1])
                if (
                    shape_of is not None
                    and shape_of.op == "Shape"
                    and is_default_domain(shape_of)
                    and shape_of.inputs[0] is x
                    and not shape_of.attrs.get("start", 0)
                    and shape_of.attrs.get("end") is None
                ):
                    return True
            if op == "Expand" and len(node.inputs) >= 2:
                target, rank = constant_values(node.inputs[1]), _shape(x, types)
                if target is not None and rank is not None and target.size <= len(rank) and np.all(target == 1):
                    return True
            before, after = _static(_shape(x, types)), _static(_shape(node.outputs[0], types))
            if before is None or after is None:
                skips.add(("skipped_unknown_shape", id(node)))
                return False
            return before == after
        return False


def _perm(node: gs.Node, input_shape: tuple | None) -> list[int] | None:
    """A Transpose's permutation (default: reversed axes, which needs the rank)."""
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    return None if input_shape is None else list(reversed(range(len(input_shape))))


def _slice_inputs(node: gs.Node) -> list[np.ndarray | None] | None:
    """A Slice's starts, ends, axes, steps inputs (opset >= 10) as flat constants, None where
    omitted; None altogether if a given one is not constant."""
    values: list[np.ndarray | None] = []
    for i in range(1, 5):
        t = node.inputs[i] if i < len(node.inputs) else None
        if t is None or not t.name:
            values.append(None)
            continue
        value = constant_values(t)
        if value is None:
            return None
        values.append(value.reshape(-1))
    return values


def _slice_is_whole(node: gs.Node, dims: tuple | None, skips: set) -> bool:
    """True for a Slice with constant starts 0, ends past the end and steps 1 on every sliced axis."""
    if len(node.inputs) >= 3:  # opset >= 10: starts, ends, axes, steps are inputs
        values = _slice_inputs(node)
        if values is None:
            return False
        starts, ends, axes, steps = (None if v is None else v.tolist() for v in values)
    else:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes"), None
    if starts is None or ends is None:
        return False
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = list(steps) if steps is not None else [1] * len(starts)
    if any(s != 1 for s in steps) or any(s != 0 for s in starts):
        return False
    for axis, end in zip(axes, ends):
        if end >= _SLICE_TO_END:
            continue
        if dims is None or not -len(dims) <= axis < len(dims):
            skips.add(("skipped_unknown_shape", id(node)))
            return False
        dim = dims[axis]
        if dim is None:
            skips.add(("skipped_unknown_shape", id(node)))
            return False
        if end < dim:
            return False
    return True


# -- remove-noop-arithmetic --------------------------------------------------------------------

#: op -> (neutral element, input positions where it is neutral)
_NEUTRAL = {"Add": (0, (1, 0)), "Sub": (0, (1,)), "Mul": (1, (1, 0)), "Div": (1, (1,)), "Pow": (1, (1,))}


@register_pass
@dataclass
class RemoveNoopArithmetic(Pass):
    """Remove arithmetic with a neutral constant::

        x -> Mul(1) -> y      x -> Add(0) -> y      x -> Sub(0) -> y      becomes      x -> y
        x -> Div(1) -> y      x -> Pow(1) -> y      (and 1*x, 0+x)

    The constant must be all ones (or all zeros) -- an initializer or ``Constant`` node -- and must
    not broadcast: the output must have x's shape. That is proven from static shapes, or, with
    only x's rank known, when every dim of the constant is 1 (or equals x's static dim) and the
    constant's rank is at most x's. Otherwise the site is skipped and counted
    (``skipped_broadcast``: the constant enlarges x, e.g. ``[3] * ones[2,3]``;
    ``skipped_unknown_shape``: it cannot be told). The output type is x's type by the ops'
    type rules, so no cast is needed.

    Exactness: ``x*1``, ``x/1``, ``x-0`` and ``x^1`` return x bit for bit (NaN stays NaN);
    ``x+0`` does too except that ``-0.0 + 0.0 = +0.0``, so a negative zero may stay negative
    where the original made it positive: accepted, as the two compare equal and only ops that look
    at the sign of zero (division by it, ``Atan2``-like formulas) can tell them apart.
    If y is a graph output its name is kept (x's producer writes it); when impossible the node
    stays (``kept_graph_output``). Runs inside If/Loop/Scan bodies too. No options.
    """

    name = "remove-noop-arithmetic"
    requires_any_op = frozenset({"Mul", "Add", "Sub", "Div", "Pow"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        types = infer_tensor_types(graph)
        counts: Counter = Counter()
        changed = False
        for g in list(all_graphs(graph)):
            for node in list(g.nodes):
                if node.op not in _NEUTRAL or not is_default_domain(node):
                    continue
                if len(node.inputs) != 2 or len(node.outputs) != 1:
                    continue
                changed |= self._remove(g, node, types, counts)
        return _result(counts, changed)

    def _remove(self, g: gs.Graph, node: gs.Node, types, counts: Counter) -> bool:
        neutral, sides = _NEUTRAL[node.op]
        for side in sides:
            c = constant_values(node.inputs[side])
            if c is None or c.size == 0 or c.dtype.kind not in "biuf" or not np.all(c == neutral):
                continue
            reason = _keeps_shape(node.inputs[1 - side], node.outputs[0], c, types)
            if reason:
                counts[reason] += 1
                return False
            original = list(node.inputs)
            if side == 0:  # commutative op with the constant first: put x first for _bypass
                node.inputs.clear()
                node.inputs.extend(original[::-1])
            if _bypass(g, node):
                counts[f"removed_{node.op.lower()}"] += 1
                return True
            node.inputs.clear()
            node.inputs.extend(original)
            counts["kept_graph_output"] += 1
            return False
        return False


def _keeps_shape(x: gs.Tensor, y: gs.Tensor, c: np.ndarray, types) -> str:
    """'' when broadcasting ``x`` with constant ``c`` gives x's shape; else why not proven."""
    xs, ys = _shape(x, types), _shape(y, types)
    if _static(xs) is not None and _static(ys) is not None:
        return "" if xs == ys else "skipped_broadcast"
    if xs is None:
        return "skipped_unknown_shape"
    if c.ndim > len(xs):
        return "skipped_broadcast"
    for cd, xd in zip(reversed(c.shape), reversed(xs)):
        if cd == 1 or cd == xd:
            continue
        return "skipped_unknown_shape" if xd is None else "skipped_broadcast"
    return ""


# -- cse -------------------------------------------------------------------------------------


class _Unmergeable(Exception):
    """An attribute value that cannot be compared safely (function attribute references)."""


_GRAPH_MARK = ("<graph>",)


def _attr_key(value, graph_mark: bool):
    """A hashable, exact representation of an attribute value."""
    if isinstance(value, gs.Graph):
        if graph_mark:
            return _GRAPH_MARK
        raise _Unmergeable
    if isinstance(value, gs.Constant):
        value = np.asarray(value.values)
    if isinstance(value, np.ndarray):
        return ("tensor", value.dtype.str, value.shape, hashlib.sha256(value.tobytes()).hexdigest())
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_attr_key(v, graph_mark) for v in value))
    if isinstance(value, float):
        return ("float", value.hex())  # exact bits: 0.0 and -0.0 differ, NaN equals NaN
    if isinstance(value, np.generic):
        return ("scalar", value.dtype.str, value.tobytes())
    if isinstance(value, (bool, int, str, bytes)):
        return (type(value).__name__, value)
    if hasattr(value, "SerializeToString"):  # TypeProto and other protobuf-valued attributes
        return (type(value).__name__, value.SerializeToString(deterministic=True))
    raise _Unmergeable  # e.g. gs.Node.AttributeRef inside functions


@register_pass
@dataclass
class CommonSubexpressionElimination(Pass):
    """Compute each distinct value once: merge identical nodes and identical small constants::

        x -> Shape -> a                       x -> Shape -> a -> Gather
        x -> Shape -> b -> Gather   becomes             \\-> Gather'
             (b's readers read a)

    Two nodes merge when they have the same op and domain, the very same input tensors (in order)
    and identical attributes (tensor attributes compared by dtype, shape and bytes; float
    attributes bit for bit). Nodes are visited in topological order, so merges cascade: after two
    ``Shape`` nodes merge, the ``Gather``s reading them become identical and merge too.
    Constants (initializers) with the same dtype, shape and bytes, up to ``max_constant_bytes``
    each, are deduplicated first (by content hash), so nodes reading equal weights can merge.

    Never merged (identical twins are counted): random ops and ``Dropout``, whose calls each
    draw new values (``skipped_random``); ``QuantizeLinear``/``DequantizeLinear`` and their
    constant inputs, since Q/DQ placement is what a quantization tool produced and TensorRT reads
    and no general pass rewrites it (``skipped_qdq``); nodes in a custom domain, whose semantics
    are unknown (``skipped_custom_domain``); nodes with If/Loop/Scan bodies
    (``skipped_subgraph``); nodes without outputs. Output names never change:
    when both nodes' outputs are graph outputs they stay apart (``skipped_graph_outputs``); when
    one is, that one is kept. Each If/Loop/Scan body is simplified on its own.

    Options: ``max_constant_bytes`` (default 1 MiB).
    """

    name = "cse"
    max_constant_bytes: int = 1 << 20

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts: Counter = Counter()
        for g in list(all_graphs(graph)):
            self._dedupe_constants(g, counts)
            for _ in range(_MAX_ROUNDS):
                # A merge that keeps a graph output's name renames a tensor earlier nodes read,
                # so repeat until a round merges nothing (that round's skips are the ones reported).
                skips: Counter = Counter()
                merged = self._merge_nodes(g, skips)
                counts["nodes_merged"] += merged
                if not merged:
                    counts.update(skips)
                    break
        changed = bool(counts["constants_deduplicated"] or counts["nodes_merged"])
        return _result(counts, changed)

    def _constant_key(self, tensor: gs.Constant, cache: dict[int, tuple | None]) -> tuple | None:
        key = cache.get(id(tensor), ())
        if key != ():
            return key
        key = None
        dtype = numpy_dtype(tensor.dtype)
        # bfloat16/float8 constants (graphsurgeon keeps their type as an ONNX enum) are left alone.
        if dtype is not None and dtype.kind in "biufc" and not isinstance(tensor.dtype, int):
            nbytes = int(np.prod(tensor.shape, dtype=np.int64)) * dtype.itemsize
            if nbytes <= self.max_constant_bytes:
                values = np.asarray(tensor.values)  # not ascontiguousarray: it turns scalars into [1]
                key = (values.dtype.str, values.shape, hashlib.sha256(values.tobytes()).hexdigest())
        cache[id(tensor)] = key
        return key

    def _dedupe_constants(self, g: gs.Graph, counts: Counter) -> None:
        interface = {id(t) for t in list(g.inputs) + list(g.outputs)}
        canonical: dict[tuple, gs.Constant] = {}
        qdq_keys: dict[tuple, int] = {}  # content -> the first Q/DQ input tensor with it
        cache: dict[int, tuple | None] = {}
        replaced: set[int] = set()
        for node in g.nodes:
            for i, t in enumerate(node.inputs):
                if not isinstance(t, gs.Constant) or id(t) in interface:
                    continue
                key = self._constant_key(t, cache)
                if key is None:
                    continue
                if node.op in QDQ_OPS:  # leave Q/DQ inputs exactly as the quantizer wrote them
                    first = qdq_keys.setdefault(key, id(t))
                    if first != id(t) or (key in canonical and canonical[key] is not t):
                        counts["skipped_qdq"] += 1
                    continue
                keep = canonical.setdefault(key, t)
                if keep is not t:
                    node.inputs[i] = keep
                    replaced.add(id(t))
        counts["constants_deduplicated"] += len(replaced)

    def _merge_nodes(self, g: gs.Graph, counts: Counter) -> int:
        """One sweep in topological order; returns the number of nodes merged away."""
        merged = 0
        seen: dict[tuple, gs.Node] = {}
        refused: set[tuple] = set()
        for node in list(g.nodes):
            if not node.outputs:
                continue
            reason = _cse_refusal(node)
            try:
                key = _node_key(node, graph_mark=reason == "subgraph")
            except _Unmergeable:
                continue
            if reason:
                if key in refused:
                    counts[f"skipped_{reason}"] += 1
                refused.add(key)
                continue
            keep = seen.setdefault(key, node)
            if keep is node:
                continue
            if _merge_into(g, keep, node):
                merged += 1
            else:
                counts["skipped_graph_outputs"] += 1
        return merged


def _cse_refusal(node: gs.Node) -> str:
    if not is_default_domain(node):
        return "custom_domain"
    if node.op in RANDOM_OPS or node.op == "Dropout":
        return "random"
    if node.op in QDQ_OPS:
        return "qdq"
    if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
        return "subgraph"
    return ""


def _node_key(node: gs.Node, graph_mark: bool) -> tuple:
    attrs = tuple(sorted((k, _attr_key(v, graph_mark)) for k, v in node.attrs.items()))
    inputs = tuple(id(t) if t.name else None for t in node.inputs)
    outputs = tuple(bool(t.name) for t in node.outputs)
    return (node.op, node.domain or "", inputs, attrs, outputs)


def _merge_into(g: gs.Graph, keep: gs.Node, dup: gs.Node) -> bool:
    """Make ``dup``'s readers read ``keep``'s outputs; False if two graph outputs would merge."""
    pairs = [(a, b) for a, b in zip(keep.outputs, dup.outputs) if a.name and b.name]
    if any(is_graph_output(g, a) and is_graph_output(g, b) for a, b in pairs):
        return False
    dup.outputs.clear()
    dup.inputs.clear()
    for a, b in pairs:
        if is_graph_output(g, b):  # keep the output name: ``keep`` now writes b
            _rewire(a, b)
            keep.outputs[_position(keep.outputs, a)] = b
        else:
            _rewire(b, a)
    return True


# -- fold-shapes -----------------------------------------------------------------------------


@register_pass
@dataclass
class FoldShapes(Pass):
    """Replace shape computations with constants where the shapes are static::

        x[2,16,32] -> Shape -> Gather(0) -> Unsqueeze --\\
                                           Constant(4) --+-> Concat -> Reshape(q, .)
        becomes     Constant([2,16,2,16]) -> Reshape(q, .)

    ``Shape`` (honouring its ``start``/``end`` attributes) and ``Size`` of a tensor whose shape
    is statically known become constants; so do ``Gather``/``Slice`` reads of only the static
    dims of a partly dynamic shape (``Shape(x[N,3,4])[2]`` is 4). Then every small computation
    that depends on those constants and on nothing else (``Gather``, ``Unsqueeze``, ``Concat``,
    ``Cast``, arithmetic ...; outputs up to ``max_bytes`` each, by shape inference) is evaluated
    and replaced by its value where something else reads it, typically the shape input of a
    ``Reshape``, ``Expand`` or ``ConstantOfShape`` -- whose large outputs are never materialized.
    Shapes come from onnx shape inference over the whole model (If/Loop/Scan bodies included).
    ``fold-constants`` does part of this (it folds ``Shape`` of graph inputs with static shapes);
    this pass also folds shapes of intermediate tensors, honours ``Shape(start, end)``, and can
    use ``--shapes``.

    Dynamic inputs: without ``--shapes`` (``ctx.input_shapes``) dynamic dims are never folded;
    only the static parts of shapes are. With ``--shapes name:2x16x32`` and
    ``use_input_shapes=true`` (the default), the given shapes are used **and baked into the
    model**: if any fold depends on them, every dynamic graph input named in ``--shapes`` gets
    its given static shape (reported as ``inputs_made_static``), so the model says what it now
    computes -- it only accepts inputs of those shapes afterwards. Use this for a fixed-shape
    TensorRT engine, not with a min/opt/max profile (only the opt shape is seen here). Given
    shapes that contradict the model's static dims or the verification inputs are not used
    (``skipped_input_shapes``).

    Counted: ``shapes_folded``, ``shape_reads_folded``, ``tensors_folded`` (values downstream),
    ``inputs_made_static``, ``skipped_dynamic`` (shapes left dynamic), ``skipped_unevaluable``.
    Q/DQ and random ops are never evaluated. Options: ``use_input_shapes`` (default true),
    ``max_bytes`` (default 1024: shape-sized tensors only).
    """

    name = "fold-shapes"
    requires_any_op = frozenset({"Shape", "Size"})
    use_input_shapes: bool = True
    max_bytes: int = 1024

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts: Counter = Counter()
        given = self._given_shapes(graph, ctx, counts) if self.use_input_shapes else {}
        types = infer_tensor_types(graph, given)
        model_only = infer_tensor_types(graph) if given else types
        names = _Names(graph)
        changed = relies_on_given = False
        for g in list(all_graphs(graph)):
            local = {id(n) for n in g.nodes}
            folded: list[gs.Tensor] = []
            for node in list(g.nodes):
                if node.op not in ("Shape", "Size") or not is_default_domain(node):
                    continue
                if len(node.inputs) != 1 or len(node.outputs) != 1 or not node.outputs[0].name:
                    continue
                out, x = node.outputs[0], node.inputs[0]
                # What the model itself says comes first; given shapes only fold what is left.
                value = _shape_value(node, _shape(x, model_only))
                live = list(out.outputs)
                if value is None and node.op == "Shape":
                    dims = _selected_dims(node, _shape(x, model_only))
                    for reader in list(out.outputs):
                        if id(reader) not in local or len(reader.outputs) != 1 or not reader.outputs[0].name:
                            continue
                        read = _shape_read(reader, out, dims)
                        if read is not None:
                            folded.append(_replace_with_constant(g, reader.outputs[0], read, names, local))
                            counts["shape_reads_folded"] += 1
                            live = [r for r in live if r is not reader]
                if value is None and (live or is_graph_output(g, out)):
                    value = _shape_value(node, _shape(x, types))
                    relies_on_given |= value is not None
                if value is not None:
                    folded.append(_replace_with_constant(g, out, value, names, local))
                    counts["shapes_folded"] += 1
                elif live or is_graph_output(g, out):
                    counts["skipped_dynamic"] += 1
            if folded:
                changed = True
                self._fold_downstream(g, folded, types, names, counts)
        if relies_on_given:
            for inp in graph.inputs:
                if inp.name in given:
                    inp.shape = list(given[inp.name])
                    counts["inputs_made_static"] += 1
        return _result(counts, changed)

    def _given_shapes(self, graph: gs.Graph, ctx: PassContext, counts: Counter) -> dict[str, tuple[int, ...]]:
        """The ``--shapes`` of dynamic graph inputs that agree with the model and the verification data."""
        usable = {}
        for inp in graph.inputs:
            shape = ctx.input_shapes.get(inp.name)
            if shape is None:
                continue
            shape = tuple(int(d) for d in shape)
            declared = inp.shape
            if declared is not None and all(isinstance(d, int) and d >= 0 for d in declared):
                continue  # already static: nothing to bake
            reference = (ctx.reference_inputs or {}).get(inp.name)
            if (
                declared is None
                or len(declared) != len(shape)
                or any(d < 0 for d in shape)
                or any(isinstance(d, int) and d >= 0 and d != s for d, s in zip(declared, shape))
                or (reference is not None and tuple(np.shape(reference)) != shape)
            ):
                log.info("fold-shapes: not using the given shape %s of input '%s'", shape, inp.name)
                counts["skipped_input_shapes"] += 1
                continue
            usable[inp.name] = shape
        return usable

    def _fold_downstream(self, g: gs.Graph, folded: list[gs.Tensor], types, names: _Names, counts: Counter) -> None:
        """Evaluate the small computations that depend only on ``folded`` and other constants."""
        derived = {id(t) for t in folded}
        nodes: list[gs.Node] = []
        for node in g.nodes:
            if not node.outputs or not any(id(t) in derived for t in node.inputs):
                continue
            if (
                not is_default_domain(node)
                or node.op in QDQ_OPS
                or node.op in RANDOM_OPS
                or any(isinstance(v, (gs.Graph, gs.Node.AttributeRef)) for v in node.attrs.values())
            ):
                continue
            if not all(not t.name or id(t) in derived or is_constant_expression(t) for t in node.inputs):
                continue
            if not all(_small(t, types, self.max_bytes) for t in node.outputs if t.name):
                continue
            derived.update(id(t) for t in node.outputs)
            nodes.append(node)
        inside = {id(n) for n in nodes}
        local = {id(n) for n in g.nodes}
        frontier = [
            t
            for n in nodes
            for t in n.outputs
            if t.name and (is_graph_output(g, t) or any(id(r) not in inside for r in t.outputs))
        ]
        for t in frontier:
            value = evaluate_constant_expression(t, g.opset or 13, self.max_bytes)
            if value is None:
                counts["skipped_unevaluable"] += 1
                continue
            _replace_with_constant(g, t, value, names, local)
            counts["tensors_folded"] += 1


def _small(tensor: gs.Tensor, types, max_bytes: int) -> bool:
    entry = types.get(tensor.name)
    if entry is None or entry[1] is None or _static(entry[0]) is None:
        return False
    return int(np.prod(entry[0], dtype=np.int64)) * entry[1].itemsize <= max_bytes


def _selected_dims(node: gs.Node, dims: tuple | None) -> list[int | None] | None:
    """The dims a ``Shape`` node returns (its ``start``/``end`` applied), unknown ones None."""
    if dims is None:
        return None
    rank = len(dims)

    def clamp(v: int) -> int:
        return min(max(v + rank if v < 0 else v, 0), rank)

    start = clamp(int(node.attrs.get("start", 0)))
    end = clamp(int(node.attrs["end"])) if node.attrs.get("end") is not None else rank
    return list(dims[start:end])


def _shape_value(node: gs.Node, dims: tuple | None) -> np.ndarray | None:
    """The value of a ``Shape`` or ``Size`` node when every dim it reads is static."""
    if node.op == "Size":
        static = _static(dims)
        return None if static is None else np.array(int(np.prod(static, dtype=np.int64)), dtype=np.int64)
    selected = _selected_dims(node, dims)
    if selected is None or any(d is None for d in selected):
        return None
    return np.array(selected, dtype=np.int64)


def _shape_read(reader: gs.Node, shape_out: gs.Tensor, dims: list | None) -> np.ndarray | None:
    """The value of a ``Gather``/``Slice`` of a partly dynamic shape that reads only static dims."""
    if dims is None or not is_default_domain(reader) or not reader.inputs or reader.inputs[0] is not shape_out:
        return None
    n = len(dims)
    if reader.op == "Gather" and len(reader.inputs) == 2 and int(reader.attrs.get("axis", 0)) in (0, -1):
        indices = constant_values(reader.inputs[1])
        if indices is None or indices.dtype.kind not in "iu":
            return None
        picked = []
        for i in indices.reshape(-1).tolist():
            i = i + n if i < 0 else i
            if not 0 <= i < n or dims[i] is None:
                return None
            picked.append(dims[i])
        return np.array(picked, dtype=np.int64).reshape(indices.shape)
    if reader.op == "Slice" and len(reader.inputs) >= 3:
        values = _slice_inputs(reader)
        if values is None or any(v is not None and (v.size != 1 or v.dtype.kind not in "iu") for v in values):
            return None
        start, end, axis, step = (None if v is None else int(v[0]) for v in values)
        if (axis is not None and axis not in (0, -1)) or step == 0:
            return None
        # Python slicing clamps like ONNX Slice does on a 1-D tensor, for either step sign.
        picked = dims[slice(start, end, 1 if step is None else step)]
        if any(d is None for d in picked):
            return None
        return np.array(picked, dtype=np.int64)
    return None


def _replace_with_constant(
    g: gs.Graph, tensor: gs.Tensor, value: np.ndarray, names: _Names, local: set[int]
) -> gs.Tensor:
    """Make ``tensor`` a constant with ``value``, detaching it from its producer (which dies)."""
    node = tensor.inputs[0]
    node.outputs[_position(node.outputs, tensor)] = gs.Variable(names.new(f"{tensor.name}_unused"))
    if is_graph_output(g, tensor) or any(id(r) not in local for r in tensor.outputs):
        # A graph output or a tensor read inside a subgraph keeps being a node's output.
        tensor.dtype, tensor.shape = value.dtype, list(value.shape)
        const = gs.Node("Constant", name=names.new(f"{tensor.name}_const"), attrs={"value": gs.Constant("", value)})
        const.outputs.append(tensor)
        g.nodes.append(const)
        return tensor
    return tensor.to_constant(value)
