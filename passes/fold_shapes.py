"""``fold-shapes``: Shape/Size and reads of static dims become constants, then the small
computations on them."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.pass_base import register_pass
from passes.graph_utils import (
    QDQ_OPS,
    RANDOM_OPS,
    all_graphs,
    constant_values,
    evaluate_constant_expressions,
    is_constant_expression,
    is_default_domain,
    is_graph_output,
)
from passes.inference_model import infer
from passes.symbolic_shapes import fold_symbolic_targets
from passes.skips import Skips
from passes.simplify_utils import _Names, _position, _result, _shape, _slice_inputs, _static

log = logging.getLogger(__name__)


@register_pass
@dataclass(frozen=True)
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

    Symbolic dims (``symbolic=true``, the default): a ``Reshape`` or ``Expand`` whose shape operand
    is still computed at run time (``Shape -> Gather -> Unsqueeze -> Concat`` of a dynamic tensor)
    gets a constant operand when shape inference knows its output shape up to symbols it can say
    as "this input dim" -- ``0`` in a Reshape target (not with ``allowzero=1``), ``1`` in an
    Expand shape -- plus, in a Reshape, one ``-1``; one that gives its input's own shape becomes an
    ``Identity``; the chain that computed the operand is then dead. Dynamic dims stay dynamic:
    ``x[N,T,256] -> Reshape(Concat(Shape(x)[0], Shape(x)[1], 4, 64))`` becomes
    ``Reshape(x, [0, 0, 4, 64])``. ``Unsqueeze(Unsqueeze(x, a), b)`` becomes one Unsqueeze. The
    shapes come from onnx's inference with data propagation (run in opset 14 for older models:
    only there does Reshape use propagated values) and, for what that leaves unresolved on graphs
    up to 250 nodes, ONNX Runtime's symbolic shape inference (without ``auto_merge``, which would
    assume conflicting dims equal), which keeps symbols through ``Range`` and broadcasting.
    Not folded: targets needing two new symbols, static 0 sizes; ``Range``/``ConstantOfShape``
    driven by symbolic dims (their values are dynamic). A ``-1`` target cannot be resolved on an
    empty input (a 0-sized dim), where the original's copied dims could.

    Counted: ``shapes_folded``, ``shape_reads_folded``, ``tensors_folded`` (values downstream),
    ``reshapes_folded``/``expands_folded`` (symbolic), ``inputs_made_static``, ``skipped_dynamic``
    (shapes left dynamic), ``skipped_unevaluable``. Q/DQ and random ops are never evaluated.
    Options: ``use_input_shapes`` (default true), ``max_bytes`` (default 1024: shape-sized tensors
    only), ``symbolic`` (default true).
    """

    name = "fold-shapes"
    requires_any_op = frozenset({"Shape", "Size"})
    use_input_shapes: bool = True
    max_bytes: int = 1024
    symbolic: bool = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts: Counter = Counter()
        skips = Skips()
        given = self._given_shapes(graph, ctx, skips) if self.use_input_shapes else {}
        types, symbols = infer(graph, given)
        model_only, symbols = infer(graph) if given else (types, symbols)
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
                    skips.add("dynamic")
            if folded:
                changed = True
                self._fold_downstream(g, folded, types, names, counts, skips)
        if self.symbolic:
            if changed:  # the static folds changed the graph: infer its symbols again
                graph.cleanup(remove_unused_graph_inputs=False).toposort()
                symbols = None
            symbolic = fold_symbolic_targets(graph, names, symbols)
            counts.update({k: v for k, v in symbolic.items() if v})
            changed |= any(symbolic.values())
        if relies_on_given:
            for inp in graph.inputs:
                if inp.name in given:
                    inp.shape = list(given[inp.name])
                    counts["inputs_made_static"] += 1
        return _result(counts, changed, skips)

    def _given_shapes(self, graph: gs.Graph, ctx: PassContext, skips: Skips) -> dict[str, tuple[int, ...]]:
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
                skips.add("input_shapes")
                continue
            usable[inp.name] = shape
        return usable

    def _fold_downstream(self, g: gs.Graph, folded: list[gs.Tensor], types, names: _Names, counts: Counter,
                         skips: Skips) -> None:
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
        for t, value in zip(frontier, evaluate_constant_expressions(frontier, g.opset or 13, self.max_bytes)):
            if value is None:
                skips.add("unevaluable")
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
