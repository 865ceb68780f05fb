"""Small helpers shared by passes: graph walking, constant access, consumer checks."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx_graphsurgeon as gs

#: Nodes that must never be folded, merged or removed by general-purpose passes.
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
#: Nondeterministic ops: folding or merging them would change what the model computes.
RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


def all_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph`` and every nested subgraph (If branches, Loop and Scan bodies)."""
    yield graph
    for sub in graph.subgraphs(recursive=True):
        yield sub


def is_default_domain(node: gs.Node) -> bool:
    return node.domain in ("", "ai.onnx", None)


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """The values of a constant tensor (initializer or Constant node output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1:
        producer = tensor.inputs[0]
        if producer.op == "Constant" and is_default_domain(producer) and "value" in producer.attrs:
            value = producer.attrs["value"]
            if isinstance(value, gs.Constant):
                return np.asarray(value.values)
    return None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def only_consumer(graph: gs.Graph, tensor: gs.Tensor, node: gs.Node) -> bool:
    """True when ``node`` is the sole reader of ``tensor`` and the tensor is not a graph output."""
    return len(tensor.outputs) == 1 and tensor.outputs[0] is node and not is_graph_output(graph, tensor)


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor name not used in ``graph`` (or its subgraphs)."""
    used = {t.name for g in all_graphs(graph) for t in g.tensors().values()}
    name, i = base, 0
    while name in used:
        i += 1
        name = f"{base}_{i}"
    return name


def is_constant_expression(tensor: gs.Tensor, _memo: dict[int, bool] | None = None) -> bool:
    """True when ``tensor`` is computed only from constants (e.g. ``ConstantOfShape`` weights).

    Such a tensor is fixed for every run, so exact rewrites may build on it with new nodes (which
    ONNX Runtime and TensorRT fold when they load the model). Q/DQ and random ops do not count:
    a dequantized weight must stay a Q/DQ pattern, and random values are not constant.
    """
    memo = {} if _memo is None else _memo
    key = id(tensor)
    if key in memo:
        return memo[key]
    memo[key] = False  # guards against cycles while recursing
    if isinstance(tensor, gs.Constant):
        memo[key] = True
    elif len(tensor.inputs) == 1:
        node = tensor.inputs[0]
        memo[key] = (
            is_default_domain(node)
            and node.op not in QDQ_OPS
            and node.op not in RANDOM_OPS
            and not any(isinstance(v, gs.Graph) for v in node.attrs.values())
            and all(is_constant_expression(t, memo) for t in node.inputs if t.name)
        )
    return memo[key]


def evaluate_constant_expression(tensor: gs.Tensor, opset: int, max_bytes: int = 1 << 20) -> np.ndarray | None:
    """Compute a small constant-expression tensor (see ``is_constant_expression``), else None.

    Used for per-channel parameters generated at run time; evaluation uses onnx's reference
    evaluator on just the nodes that produce ``tensor``. Results over ``max_bytes`` are refused.
    """
    value = constant_values(tensor)
    if value is not None:
        return value
    if not is_constant_expression(tensor):
        return None
    nodes: list[gs.Node] = []
    seen: set[int] = set()

    def collect(t: gs.Tensor) -> None:
        if isinstance(t, gs.Constant) or not t.inputs:
            return
        node = t.inputs[0]
        if id(node) in seen:
            return
        seen.add(id(node))
        for inp in node.inputs:
            if inp.name:
                collect(inp)
        nodes.append(node)

    collect(tensor)
    from onnx.reference import ReferenceEvaluator

    try:
        sub = gs.Graph(nodes=nodes, inputs=[], outputs=[tensor], opset=opset)
        model = gs.export_onnx(sub, do_type_check=False)
        model.ir_version = min(model.ir_version, 10)
        (result,) = ReferenceEvaluator(model).run(None, {})
    except Exception:  # an op the reference evaluator lacks: the caller skips the site
        return None
    result = np.asarray(result)
    return result if result.nbytes <= max_bytes else None
