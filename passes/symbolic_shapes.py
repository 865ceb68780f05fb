"""Symbolic shape folding for ``fold-shapes``: a ``Reshape``/``Expand`` whose shape operand is computed
at run time (``Shape -> Gather -> Unsqueeze -> Concat``...) gets a constant operand when onnx shape
inference with data propagation knows its output shape up to symbolic dims it can express as
"copy this input dim" (``0`` for Reshape, ``1`` for Expand) or, once per Reshape, ``-1``.

The symbolic values come from ``onnx.shape_inference.infer_shapes(..., data_prop=True)``, which
propagates ``Shape`` values through Gather/Slice/Concat/Unsqueeze/arithmetic into the output
shapes it infers; no symbolic engine of our own. Equal ``dim_param`` names are equal values.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.graph_utils import all_graphs, is_default_domain

log = logging.getLogger(__name__)

Dim = int | str  # a static size or a symbol
#: ONNX Runtime's symbolic inference (pure Python, ~1 ms a node) backs up onnx's only on graphs up to this size.
ORT_SYMBOLIC_MAX_NODES = 250


def symbolic_shapes(graph: gs.Graph) -> dict[str, tuple[Dim | None, ...]]:
    """Every tensor's inferred shape by name: ints, symbol names, None where unknown."""
    from passes.inference_model import infer

    return infer(graph)[1]


def same_shape(in_dims, out_dims, reshape: bool = True) -> bool:
    """Known to be the same shape: equal rank and every dim but at most one known equal (the last
    one is then equal too: a Reshape/Expand keeps the element count; ``x[N,T] -> Reshape(-1, T)``)."""
    if in_dims is None or out_dims is None or len(in_dims) != len(out_dims):
        return False
    differ = [(d, e) for d, e in zip(in_dims, out_dims) if d is None or d != e]
    # Expand does not keep the element count: there every dim must be known equal.
    return not differ or (reshape and len(differ) == 1 and not all(isinstance(v, int) for v in differ[0]))


def reshape_target(in_dims, out_dims, allowzero: bool = False) -> list[int] | None:
    """A constant Reshape target giving ``out_dims`` from an input of ``in_dims``: static sizes as
    they are, a symbol at the position where the input has the same one as ``0`` (not with
    ``allowzero``), at most one other symbol as ``-1``; None when that is not possible."""
    if in_dims is None or out_dims is None or any(d is None for d in out_dims):
        return None
    target, inferred = [], 0
    for i, d in enumerate(out_dims):
        if isinstance(d, int):
            if d <= 0:  # 0 would mean "copy" (allowzero=0); empty tensors are left alone
                return None
            target.append(d)
        elif not allowzero and i < len(in_dims) and in_dims[i] == d:
            target.append(0)
        else:
            inferred += 1
            target.append(-1)
    return target if inferred <= 1 else None


def expand_target(in_dims, out_dims) -> list[int] | None:
    """A constant Expand shape giving ``out_dims`` from ``in_dims``: ``1`` where the output dim is the
    input's own (right-aligned), the static size elsewhere; None if a symbol would have to be new."""
    if in_dims is None or out_dims is None or any(d is None for d in out_dims) or len(out_dims) < len(in_dims):
        return None
    if any(d is None for d in in_dims):
        return None
    offset = len(out_dims) - len(in_dims)
    target = []
    for i, d in enumerate(out_dims):
        own = in_dims[i - offset] if i >= offset else None
        if own is not None and own == d:
            target.append(1)
        elif isinstance(d, int) and d > 0 and (own is None or own == 1):
            target.append(d)
        else:
            return None
    return target


def fold_symbolic_targets(graph: gs.Graph, names, shapes: dict | None = None) -> dict[str, int]:
    """Give computed Reshape/Expand shape operands constant values; the counts of each.
    ``shapes``: symbolic shapes of ``graph`` as it is now, if already inferred."""
    counts = {"reshapes_folded": 0, "expands_folded": 0, "noop_reshapes": 0}
    candidates = [
        n
        for g in all_graphs(graph)
        for n in g.nodes
        if n.op in ("Reshape", "Expand") and is_default_domain(n) and len(n.inputs) == 2 and len(n.outputs) == 1
        and not isinstance(n.inputs[1], gs.Constant) and n.inputs[0].name and n.outputs[0].name
    ]
    pairs = [(outer, inner) for g in all_graphs(graph) for outer in g.nodes if (inner := _unsqueeze_pair(g, outer))]
    if not candidates and not pairs:
        return counts
    shapes = shapes if shapes is not None else symbolic_shapes(graph)
    counts["unsqueezes_merged"] = sum(_merge_unsqueeze(outer, inner, shapes, names) for outer, inner in pairs)
    unresolved = [n for n in candidates if not _fold_one(n, shapes, names, counts)]
    # Worth asking ONNX Runtime only where onnx lost a symbol (a fresh "unk__" dim in the output).
    lost = [n for n in unresolved
            if any(isinstance(d, str) and d.startswith("unk__") for d in shapes.get(n.outputs[0].name) or ())]
    if lost and sum(len(g.nodes) for g in all_graphs(graph)) <= ORT_SYMBOLIC_MAX_NODES:
        from passes.inference_model import ort_symbolic_shapes

        shapes = ort_symbolic_shapes(graph)
        for node in lost:
            _fold_one(node, shapes, names, counts)
    return counts


def _fold_one(node: gs.Node, shapes, names, counts) -> bool:
    """Fold one Reshape/Expand with ``shapes``; whether it was."""
    x, y = node.inputs[0], node.outputs[0]
    in_dims = tuple(int(d) for d in x.shape) if isinstance(x, gs.Constant) else shapes.get(x.name)
    out_dims = shapes.get(y.name)
    if same_shape(in_dims, out_dims, node.op == "Reshape"):  # reshaped or expanded to its own shape: an Identity
        node.op, node.inputs, node.attrs = "Identity", [x], {}
        counts["noop_reshapes"] += 1
        return True
    if node.op == "Reshape":
        target = reshape_target(in_dims, out_dims, bool(node.attrs.get("allowzero", 0)))
    else:
        target = expand_target(in_dims, out_dims)
    if target is None:
        return False
    node.inputs[1] = gs.Constant(names.new(f"{y.name}_shape"), np.asarray(target, dtype=np.int64))
    counts["reshapes_folded" if node.op == "Reshape" else "expands_folded"] += 1
    return True


def _unsqueeze_axes(node: gs.Node) -> list[int] | None:
    if len(node.inputs) == 2:
        return [int(a) for a in node.inputs[1].values.ravel()] if isinstance(node.inputs[1], gs.Constant) else None
    axes = node.attrs.get("axes")
    return [int(a) for a in axes] if axes is not None and len(node.inputs) == 1 else None


def _unsqueeze_pair(g: gs.Graph, outer: gs.Node) -> gs.Node | None:
    """The Unsqueeze that ``outer`` (an Unsqueeze) reads, if only ``outer`` reads it."""
    if outer.op != "Unsqueeze" or not is_default_domain(outer) or not outer.inputs or not outer.inputs[0].inputs:
        return None
    inner = outer.inputs[0].inputs[0]
    mid = outer.inputs[0]
    if (inner.op != "Unsqueeze" or not is_default_domain(inner) or len(mid.outputs) != 1 or mid in g.outputs
            or len(inner.inputs) != len(outer.inputs)):
        return None
    return inner if _unsqueeze_axes(inner) is not None and _unsqueeze_axes(outer) is not None else None


def _merge_unsqueeze(outer: gs.Node, inner: gs.Node, shapes, names) -> int:
    """``Unsqueeze(Unsqueeze(x, a), b)`` -> ``Unsqueeze(x, a')``: one node, the same output."""
    a, b = _unsqueeze_axes(inner), _unsqueeze_axes(outer)
    x = inner.inputs[0]
    rank = len(x.shape) if isinstance(x, gs.Constant) else len(shapes[x.name]) if x.name in shapes else None
    if any(v < 0 for v in a + b):
        if rank is None:
            return 0
        a = [v + rank + len(a) if v < 0 else v for v in a]
        b = [v + rank + len(a) + len(b) if v < 0 else v for v in b]
    placed = set(b)
    free = (i for i in range(1 << 30) if i not in placed)  # final positions of the intermediate dims, in order
    final = {}
    for i in range(max(a) + 1):
        final[i] = next(free)
    axes = sorted(placed | {final[i] for i in a})
    if len(axes) != len(a) + len(b):
        return 0
    if len(outer.inputs) == 2:
        outer.inputs = [x, gs.Constant(names.new(f"{outer.outputs[0].name}_axes"), np.asarray(axes, dtype=np.int64))]
    else:
        outer.inputs = [x]
        outer.attrs["axes"] = axes
    return 1
