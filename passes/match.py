"""A small chain matcher shared by the fusion passes.

Fusions look *upwards* from an anchor node along first (or chosen) inputs, in the style of ONNX
Runtime's ``match_parent_path``::

    add = ...                                 #   x -> MatMul -> Add -> y
    chain = match_chain(add, ["Add", "MatMul"])  # -> [add, matmul] or None

Each step may name several op types (``("Mul", "Div")``) and may say which input to follow
(``("Conv", 0)``); by default the first input that is produced by a matching node is followed.
With ``single_consumer=True`` every intermediate tensor must have exactly one reader and must not
be a graph output, which is what a rewrite that deletes the intermediate nodes needs.
"""

from __future__ import annotations

from typing import Sequence, Union

import onnx_graphsurgeon as gs

from passes.graph_utils import is_default_domain, is_graph_output

OpSpec = Union[str, tuple]


def _parse(step: OpSpec) -> tuple[frozenset[str], int | None]:
    if isinstance(step, str):
        return frozenset([step]), None
    ops, index = step[0], (step[1] if len(step) > 1 else None)
    ops = frozenset([ops]) if isinstance(ops, str) else frozenset(ops)
    return ops, index


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node writing ``tensor`` (None for graph inputs, constants and outer-scope tensors)."""
    return tensor.inputs[0] if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 else None


def match_chain(
    anchor: gs.Node,
    ops: Sequence[OpSpec],
    graph: gs.Graph | None = None,
    single_consumer: bool = False,
) -> list[gs.Node] | None:
    """Match ``ops`` from ``anchor`` upwards; return the nodes (anchor first) or None."""
    first_ops, _ = _parse(ops[0])
    if anchor.op not in first_ops or not is_default_domain(anchor):
        return None
    chain = [anchor]
    node = anchor
    for step in ops[1:]:
        wanted, index = _parse(step)
        candidates = [index] if index is not None else range(len(node.inputs))
        found = None
        for i in candidates:
            if i >= len(node.inputs):
                continue
            parent = producer(node.inputs[i])
            if parent is not None and parent.op in wanted and is_default_domain(parent):
                if single_consumer and not _sole_reader(node.inputs[i], node, graph):
                    continue
                found = parent
                break
        if found is None:
            return None
        chain.append(found)
        node = found
    return chain


def _sole_reader(tensor: gs.Tensor, reader: gs.Node, graph: gs.Graph | None) -> bool:
    if graph is not None and is_graph_output(graph, tensor):
        return False
    return len(tensor.outputs) == 1 and tensor.outputs[0] is reader


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """Nodes reading ``tensor`` (subgraph readers included, as graphsurgeon links them)."""
    return list(tensor.outputs)
