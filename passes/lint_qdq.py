"""``lint-qdq``: report Q/DQ placements TensorRT cannot fuse (changes nothing)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult, register_pass
from passes.graph_utils import constant_values
from passes.match import producer


def _scale_of(graph_node: gs.Node) -> np.ndarray | None:
    return constant_values(graph_node.inputs[1]) if len(graph_node.inputs) > 1 else None


@register_pass
@dataclass(frozen=True)
class LintQdq(Pass):
    """Report Q/DQ placements TensorRT cannot fuse; changes nothing.

    Findings (counted in the stats, listed in the report's details):

    - ``float_op_between_dq_and_layer``: a float op (Pad, Cast, Mul ...) sits between a
      DequantizeLinear and the Conv/Gemm/MatMul it feeds, so TensorRT runs that layer in float::

          DQ -> Pad -> Conv        (fold the Pad into the Conv, or move the Q/DQ below it)

    - ``partially_quantized_layer``: one input of a Conv/Gemm/MatMul is dequantized, the other not;
    - ``float_residual_input``: an Add joins a quantized Conv's output with a float tensor, so
      TensorRT cannot fuse the Add into the Conv;
    - ``concat_scale_mismatch``: Concat inputs come from DequantizeLinear nodes with different
      scales (TensorRT needs equal scales to keep the Concat in INT8);
    - ``qdq_pair_mismatch``: a QuantizeLinear feeds a DequantizeLinear with a different scale.
    """

    name = "lint-qdq"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        issues: list[dict] = []

        def report(kind: str, node: gs.Node, detail: str) -> None:
            issues.append({"kind": kind, "node": node.name, "op": node.op, "detail": detail})

        def is_dq(t: gs.Tensor) -> bool:
            p = producer(t)
            return p is not None and p.op == "DequantizeLinear"

        weighted = ("Conv", "ConvTranspose", "Gemm", "MatMul")
        for node in graph.nodes:
            if node.op in weighted and len(node.inputs) >= 2:
                flags = [is_dq(node.inputs[i]) for i in (0, 1)]
                if any(flags) and not all(flags):
                    report("partially_quantized_layer", node, f"inputs dequantized: {flags}")
                for i in (0, 1):
                    p = producer(node.inputs[i])
                    if p is not None and p.op not in ("DequantizeLinear",) and p.inputs and is_dq(p.inputs[0]):
                        report("float_op_between_dq_and_layer", node, f"{p.op} '{p.name}' between DequantizeLinear and input {i}")
            elif node.op == "Add" and len(node.inputs) == 2:
                producers = [producer(t) for t in node.inputs]
                for i, p in enumerate(producers):
                    other = node.inputs[1 - i]
                    if (
                        p is not None and p.op == "Conv" and p.inputs and is_dq(p.inputs[0])
                        and constant_values(other) is None and not is_dq(other)
                        and not (producers[1 - i] is not None and producers[1 - i].op == "Conv")
                    ):
                        report("float_residual_input", node, f"input {1 - i} ('{other.name}') is float")
                        break
            elif node.op == "Concat":
                scales = [_scale_of(producer(t)) for t in node.inputs if is_dq(t)]
                if len(scales) > 1 and any(s is None or not np.array_equal(s, scales[0]) for s in scales):
                    report("concat_scale_mismatch", node, "inputs dequantized with different scales")
            elif node.op == "DequantizeLinear":
                q = producer(node.inputs[0])
                if q is not None and q.op == "QuantizeLinear":
                    a, b = _scale_of(q), _scale_of(node)
                    if a is None or b is None or not np.array_equal(a, b):
                        report("qdq_pair_mismatch", node, f"scale differs from QuantizeLinear '{q.name}'")
        stats: dict[str, int | float] = {"issues": len(issues)}
        for issue in issues:
            stats[issue["kind"]] = stats.get(issue["kind"], 0) + 1
        return PassResult(False, stats=stats, details={"issues": issues})
