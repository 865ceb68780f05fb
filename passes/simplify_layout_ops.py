"""``simplify-layout-ops``: merge chains of Transpose/Reshape/Squeeze/Unsqueeze/Flatten/Cast and
remove the layout ops that do nothing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.pass_base import register_pass
from passes.cleanup import _bypass
from passes.graph_utils import (
    InferredType,
    all_graphs,
    constant_values,
    infer_tensor_types,
    is_default_domain,
    numpy_dtype,
)
from passes.match import producer
from passes.skips import Skips
from passes.simplify_utils import _MAX_ROUNDS, _Names, _result, _shape, _slice_inputs, _static

#: Ops that only reinterpret the row-major element order under a new shape.
REINTERPRET_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})

#: Slice ends at or above this are "to the end" whatever the dim (exporters write INT32/INT64 max).
_SLICE_TO_END = 2**31 - 1


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
@dataclass(frozen=True)
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
        names = _Names(graph)
        counts: Counter = Counter()
        graphs = list(all_graphs(graph))
        changed = False
        for _ in range(_MAX_ROUNDS):
            # sites still skipped (or kept) after the last round are the ones reported, each once
            skips, kept = Skips(), set()
            round_changed = False
            for g in graphs:
                for node in list(g.nodes):
                    if node.inputs and node.outputs and is_default_domain(node):
                        round_changed |= self._simplify(g, node, types, counts, skips, kept, names)
            changed |= round_changed
            if not round_changed:
                break
        counts["kept_graph_output"] = len(kept)
        return _result(counts, changed, skips)

    def _simplify(self, g: gs.Graph, node: gs.Node, types, counts: Counter, skips: Skips, kept: set[int],
                  names: _Names) -> bool:
        changed = False
        if node.op == "Transpose":
            changed = self._merge_transposes(node, types, counts)
        elif node.op in REINTERPRET_OPS:
            changed = self._merge_reshapes(g, node, types, counts, skips, names)
        elif node.op == "Cast":
            changed = self._merge_casts(node, types, counts, skips)
        if len(node.outputs) == 1 and self._is_identity(node, types, skips):
            if _bypass(g, node):
                counts[f"removed_{node.op.lower()}"] += 1
                return True
            kept.add(id(node))
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

    def _merge_reshapes(self, g: gs.Graph, node: gs.Node, types, counts: Counter, skips: Skips, names: _Names) -> bool:
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
            skips.add("unknown_shape", site=node)
            return False
        target = gs.Constant(names.new(f"{node.outputs[0].name}_shape"), np.array(out, dtype=np.int64))
        node.op = "Reshape"
        node.attrs.clear()
        node.inputs.clear()
        node.inputs.extend([source, target])
        counts["reshape_merged"] += 1
        return True

    def _merge_casts(self, node: gs.Node, types, counts: Counter, skips: Skips) -> bool:
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
                skips.add("unknown_type", site=node)
                break
            if not cast_pair_is_exact(src, int(parent.attrs.get("to", -1)), int(dst)):
                skips.add("lossy_cast", site=node)
                break
            source = parent.inputs[0]
        if source is x:
            return False
        node.inputs[0] = source
        counts["cast_merged"] += 1
        return True

    # identities
    def _is_identity(self, node: gs.Node, types, skips: Skips) -> bool:
        op, x = node.op, node.inputs[0]
        if op == "Transpose":
            perm = _perm(node, _shape(x, types))
            return perm is not None and perm == list(range(len(perm)))
        if op == "Cast":
            src = _elem_type(x, types)
            if src is None:
                skips.add("unknown_type", site=node)
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
                skips.add("unknown_shape", site=node)
                return False
            return before == after
        return False


def _perm(node: gs.Node, input_shape: tuple | None) -> list[int] | None:
    """A Transpose's permutation (default: reversed axes, which needs the rank)."""
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    return None if input_shape is None else list(reversed(range(len(input_shape))))


def _slice_is_whole(node: gs.Node, dims: tuple | None, skips: Skips) -> bool:
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
            skips.add("unknown_shape", site=node)
            return False
        dim = dims[axis]
        if dim is None:
            skips.add("unknown_shape", site=node)
            return False
        if end < dim:
            return False
    return True
