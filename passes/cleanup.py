"""Graph cleanup and constant folding."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.pass_base import register_pass
from optimizer.runtime import import_onnxruntime
from passes.graph_utils import (
    QDQ_OPS,
    RANDOM_OPS,
    all_graphs,
    constant_values,
    infer_static_shapes,
    is_default_domain,
    is_graph_output,
    unique_name,
)

log = logging.getLogger(__name__)


def _graph_size(graph: gs.Graph) -> tuple[int, int, int]:
    nodes = sum(len(g.nodes) for g in all_graphs(graph))
    tensors = sum(len(g.tensors()) for g in all_graphs(graph))
    return nodes, tensors, len(graph.inputs)


def _bypass(graph: gs.Graph, node: gs.Node) -> bool:
    """Remove a node that passes its first input through unchanged; False if names forbid it.

    ``y = Identity(x)``: readers of ``y`` read ``x`` instead. When ``y`` is a graph output its name
    is part of the model's interface, so instead ``x``'s producer writes ``y`` directly -- possible
    only when ``x`` is an ordinary intermediate tensor of this graph.
    """
    x, y = node.inputs[0], node.outputs[0]
    if not is_graph_output(graph, y):
        for consumer in list(y.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is y:
                    consumer.inputs[i] = x
        node.outputs.clear()
        node.inputs.clear()
        return True
    local = {id(n) for n in graph.nodes}
    producer_ok = len(x.inputs) == 1 and id(x.inputs[0]) in local
    if (
        isinstance(x, gs.Variable)
        and producer_ok
        and not is_graph_output(graph, x)
        and not any(t is x for t in graph.inputs)
        and all(id(c) in local for c in x.outputs)
    ):
        producer = x.inputs[0]
        for consumer in list(x.outputs):
            if consumer is node:
                continue
            for i, t in enumerate(consumer.inputs):
                if t is x:
                    consumer.inputs[i] = y
        producer.outputs[producer.outputs.index(x)] = y
        node.outputs.clear()
        node.inputs.clear()
        return True
    return False


def _dropout_is_identity(graph: gs.Graph, node: gs.Node) -> bool:
    """Inference-mode Dropout: no mask read, and training_mode absent or constant false."""
    if len(node.outputs) > 1 and (node.outputs[1].outputs or is_graph_output(graph, node.outputs[1])):
        return False
    if len(node.inputs) >= 3 and node.inputs[2].name:
        mode = constant_values(node.inputs[2])
        if mode is None or bool(mode.reshape(-1)[0]):
            return False
    return node.attrs.get("is_test", 1) != 0


@register_pass
@dataclass(frozen=True)
class Cleanup(Pass):
    """Remove what does not contribute to the outputs.

    - dead nodes and unused initializers (also inside If/Loop/Scan bodies);
    - ``Identity`` nodes, and ``Dropout`` in inference mode (its mask unused, ``training_mode``
      absent or constant false)::

          x -> Identity -> y -> Conv      becomes      x -> Conv

      When ``y`` is a graph output, its producer is renamed to write ``y`` instead, so output names
      never change; if that is impossible (``x`` is a graph input or another output), the node stays;
    - graph inputs no node reads (option ``remove_unused_inputs``; the model's interface changes,
      so it is reported).

    Options: ``remove_unused_inputs`` (default true).
    """

    name = "cleanup"
    remove_unused_inputs: bool = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = _graph_size(graph)
        identities = dropouts = kept = 0
        for g in all_graphs(graph):
            for node in list(g.nodes):
                if not is_default_domain(node) or not node.inputs or not node.outputs:
                    continue
                if node.op == "Identity":
                    if _bypass(g, node):
                        identities += 1
                    else:
                        kept += 1
                elif node.op == "Dropout" and _dropout_is_identity(g, node):
                    while len(node.outputs) > 1:  # graphsurgeon's lists do not support slice deletion
                        node.outputs.pop()
                    if _bypass(g, node):
                        dropouts += 1
                    else:
                        kept += 1
        inputs_before = len(graph.inputs)
        # Only the main graph's inputs may go: a Loop/Scan body's inputs are positional.
        graph.cleanup(remove_unused_graph_inputs=False)
        if self.remove_unused_inputs:
            graph.inputs = [t for t in graph.inputs if t.outputs or is_graph_output(graph, t)]
            graph.cleanup(remove_unused_graph_inputs=False)
        after = _graph_size(graph)
        removed_nodes = before[0] - after[0]
        stats = {
            "identity_removed": identities,
            "dropout_removed": dropouts,
            "dead_nodes_removed": max(removed_nodes - identities - dropouts, 0),
            "inputs_removed": inputs_before - len(graph.inputs),
            "identity_kept": kept,
        }
        return PassResult(changed=after != before, stats=stats)


def _inline_constant_ifs(graph: gs.Graph) -> int:
    """Replace every ``If`` whose condition is a constant by the nodes of the branch it takes.

    graphsurgeon's ``flatten_subgraphs`` does this too, but pairs ``If`` outputs with branch
    outputs while it detaches them (so an ``If`` with two outputs loses its second one's producer,
    and with three the third gets the second's value), and leaves without a producer an output
    that is not made by a branch node (TorchScript returns one ``ConstantOfShape`` as both ``h0``
    and ``c0``; a branch may return an outer tensor or a folded constant). The model then reads
    tensors no earlier node writes. Here each ``If`` output is written by the branch node that
    wrote the branch output, or by an ``Identity`` where that is impossible; branch tensors
    whose names are taken elsewhere in the model are renamed. Innermost ``If`` nodes go first.
    Returns how many were inlined.
    """
    owners: dict[str, set[int]] = {}  # name -> ids of the tensor objects that carry it
    for g in all_graphs(graph):
        for t in [*g.inputs, *g.outputs, *(t for n in g.nodes for t in [*n.inputs, *n.outputs])]:
            if t.name:
                owners.setdefault(t.name, set()).add(id(t))

    def visit(g: gs.Graph) -> int:
        count = 0
        for node in list(g.nodes):
            for sub in node.subgraphs():
                count += visit(sub)
        nodes: list[gs.Node] = []
        for node in list(g.nodes):
            cond = constant_values(node.inputs[0]) if node.op == "If" and is_default_domain(node) and node.inputs else None
            branch = None
            if cond is not None and cond.size == 1:
                branch = node.attrs.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
            if not isinstance(branch, gs.Graph) or len(branch.outputs) != len(node.outputs):
                nodes.append(node)
                continue
            nodes.extend(_splice_branch(graph, node, branch, owners))
            count += 1
        g.nodes = nodes
        return count

    return visit(graph)


def _splice_branch(root: gs.Graph, node: gs.Node, branch: gs.Graph, owners: dict[str, set[int]]) -> list[gs.Node]:
    """The nodes that replace ``If`` ``node`` by ``branch`` (``node`` is detached)."""
    spliced = list(branch.nodes)
    local = {id(n) for n in spliced}
    mine = {id(t): t for n in spliced for t in n.outputs if t.name}
    mine.update({id(t): t for n in spliced for t in n.inputs if isinstance(t, gs.Constant) and t.name})
    for t in mine.values():
        if owners.get(t.name, set()) - {id(t)}:  # the name is someone else's too
            owners[t.name].discard(id(t))
            t.name = unique_name(root, t.name)
            owners.setdefault(t.name, set()).add(id(t))
    outer = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()
    claimed: dict[int, gs.Tensor] = {}  # branch output -> the If output its producer writes now
    for y, s in zip(outer, branch.outputs):
        producer = s.inputs[0] if isinstance(s, gs.Variable) and len(s.inputs) == 1 else None
        if producer is not None and id(producer) in local and id(s) not in claimed:
            claimed[id(s)] = y
            for reader in list(s.outputs):  # other branch nodes (and their bodies) read y now
                for i, t in enumerate(reader.inputs):
                    if t is s:
                        reader.inputs[i] = y
            producer.outputs[next(i for i, t in enumerate(producer.outputs) if t is s)] = y
        else:  # a repeated, outer-scope or constant branch output
            name = unique_name(root, f"{y.name}_inlined")
            spliced.append(gs.Node("Identity", name=name, inputs=[claimed.get(id(s), s)], outputs=[y]))
    return spliced


#: Ops whose output can be much larger than their inputs (ConstantOfShape([1000,1000]) is 8 bytes
#: in, 4 MB out). Folding them is how simplifiers inflate an 80 kB model to 100 MB.
GROWING_OPS = frozenset(
    {"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot", "EyeLike"}
)


#: Tensors this small (shapes, scalars, small biases) may always be materialized.
SMALL_TENSOR_BYTES = 1024


def _inferred_sizes(graph: gs.Graph) -> dict[str, int]:
    """Bytes of every tensor whose full shape and type shape inference can tell."""
    return {
        name: int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        for name, (shape, dtype) in infer_static_shapes(graph).items()
    }


def _constant_bytes(tensor: gs.Tensor) -> int:
    if isinstance(tensor, gs.Constant):
        return int(np.prod(tensor.shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize
    return 0


@register_pass
@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate subgraphs whose inputs are all constant and replace them by their values.

    Uses onnx-graphsurgeon's folding (evaluated in ONNX Runtime), including shape folding where
    shapes are static, in the main graph and in every If/Loop/Scan body, and inlines ``If`` nodes
    whose condition is constant (counted as ``if_inlined``), folding again what that exposes. It
    refuses to fold:

    - ``QuantizeLinear`` / ``DequantizeLinear``: quantized weights stay quantized (folding a
      ``DequantizeLinear`` of INT8 weights would turn them back into float and lose the Q/DQ pair
      TensorRT needs);
    - random ops (their value changes every run);
    - any node whose outputs would be more than ``max_growth`` times the bytes of its constant
      inputs (beyond a 1 KiB allowance for shape-sized tensors). ``ConstantOfShape``, ``Expand``,
      ``Tile`` ... whose output size shape inference cannot tell are never folded. This is what
      keeps a model that generates its weights at run time at its size, where other simplifiers
      inflate an 80 kB model to 100 MB. Refused folds are counted in the stats.

    Options: ``max_growth`` (default 2.0: a Cast from float16 to float32 folds, a
    ``ConstantOfShape`` that materializes megabytes does not), ``fold_shapes`` (default true).
    """

    name = "fold-constants"
    max_growth: float = 2.0
    fold_shapes: bool = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        import_onnxruntime()  # graphsurgeon evaluates in ONNX Runtime; keep its C++ warnings quiet
        sizes = _inferred_sizes(graph)
        refused: dict[str, set[int]] = {"qdq": set(), "random": set(), "size": set(), "shape_slice": set()}

        def exclude(node: gs.Node) -> bool:
            reason = self._refusal(node, sizes)
            if reason:
                refused[reason].add(id(node))  # graphsurgeon may ask about a node more than once
            return bool(reason)

        before = sum(len(g.nodes) for g in all_graphs(graph))
        inlined = 0
        while True:
            # graphsurgeon's own recursion is off on purpose: it folds If/Loop/Scan bodies without
            # ``should_exclude_node`` (random ops and oversized tensors inside a branch would fold)
            # and inlines constant-condition Ifs wrongly (see _inline_constant_ifs). Outer graphs
            # come first, so a body sees the constants its enclosing graph just folded.
            for g in list(all_graphs(graph)):
                self._fold_one(g, graph, exclude)
            n = _inline_constant_ifs(graph)
            if not n:
                break
            inlined += n  # what was inlined may fold further with the enclosing graph's constants
        graph.cleanup()
        after = sum(len(g.nodes) for g in all_graphs(graph))
        stats = {"folded_nodes": before - after}
        if inlined:
            stats["if_inlined"] = inlined
        stats.update({f"refused_{k}": len(v) for k, v in refused.items() if v})
        return PassResult(changed=after != before, stats=stats)

    def _fold_one(self, g: gs.Graph, root: gs.Graph, exclude) -> None:
        """Fold the constants of ``g`` alone (not its bodies), as graphsurgeon does."""
        if g is not root:
            # graphsurgeon imports If/Loop/Scan bodies without an IR version and would evaluate them
            # at onnx's default (14), which ONNX Runtime 1.31 refuses.
            g.ir_version = min(g.ir_version or root.ir_version or 10, 10)
        options = dict(
            fold_shapes=self.fold_shapes, recurse_subgraphs=False, flatten_subgraphs=False, should_exclude_node=exclude
        )
        try:
            g.fold_constants(error_ok=False, **options)
        except Exception as exc:
            # One node ONNX Runtime cannot evaluate (a custom op, say) makes whole-graph folding fail.
            # Partitioned folding isolates it, at a cost quadratic in graph size, so it is the fallback.
            log.info("constant folding of %s in one piece failed (%s); retrying partitioned", g.name, exc)
            try:
                g.fold_constants(partitioning="basic", error_ok=True, **options)
            except (Exception, RecursionError) as exc2:  # leave the graph as graphsurgeon left it
                log.warning("constant folding of %s gave up: %s", g.name, exc2)

    def _refusal(self, node: gs.Node, sizes: dict[str, int]) -> str:
        """Why ``node`` must not be folded ("" if it may be)."""
        if node.op in QDQ_OPS:
            return "qdq"
        if node.op in RANDOM_OPS:
            return "random"
        if node.op == "Shape" and ("start" in node.attrs or "end" in node.attrs):
            return "shape_slice"  # graphsurgeon's shape folding ignores start/end; fold-shapes handles it
        out_bytes = [sizes.get(t.name) for t in node.outputs]
        if any(b is None for b in out_bytes):
            return "size" if node.op in GROWING_OPS else ""
        in_bytes = sum(_constant_bytes(t) for t in node.inputs)
        if sum(out_bytes) > max(SMALL_TENSOR_BYTES, self.max_growth * in_bytes):
            return "size"
        return ""
