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
