"""Helpers shared by the fusions that recognize decomposed subgraphs (``fuse-layernorm``,
``fuse-gelu``): one-value constants and their tolerance, operands and readers, lazily inferred
shapes and the sole-reader check a rewrite needs.

Exporters (torch's legacy exporter with hand-written modules, tf2onnx, older opsets) spell these
layers out op by op. TensorRT and ONNX Runtime have fast kernels for ``LayerNormalization``
(opset 17) and ``Gelu`` (opset 20); these passes put the native op back, exactly (same math, up to
float rounding), and only where the rewrite provably computes the same thing.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from passes.graph_utils import constant_values, infer_tensor_types, is_default_domain, unique_name

#: Float types the fused ops are emitted in: ONNX Runtime's fused Gelu and LayerNormalization
#: kernels cover these (``graph_utils.FLOAT_TYPES`` also has float64, which fusion leaves alone).
FUSABLE_FLOAT_TYPES = (np.float32, np.float16)

#: Relative tolerance for recognizing the constants of a pattern (0.5, 1, sqrt(2), ...).
CONSTANT_RTOL = 1e-4


def _scalar(tensor: gs.Tensor) -> np.ndarray | None:
    """A constant holding exactly one value (any rank), else None."""
    values = constant_values(tensor)
    return values if values is not None and values.size == 1 else None


def _close(value: np.ndarray, target: float) -> bool:
    """Within CONSTANT_RTOL, or one unit of the constant's own precision (sqrt(2) in float16 is
    1.4140625, 1.1e-4 away)."""
    rtol = max(CONSTANT_RTOL, float(np.finfo(value.dtype).eps)) if value.dtype.kind == "f" else CONSTANT_RTOL
    return math.isclose(float(value.reshape(-1)[0]), target, rel_tol=rtol)


def _other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """For a binary node reading ``tensor``, the other operand (``tensor`` itself for ``f(t, t)``)."""
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is tensor:
        return node.inputs[1]
    if node.inputs[1] is tensor:
        return node.inputs[0]
    return None


def _readers(tensor: gs.Tensor, op: str) -> list[gs.Node]:
    """Default-domain nodes of type ``op`` that read ``tensor`` (each once)."""
    out: list[gs.Node] = []
    for node in tensor.outputs:
        if node.op == op and is_default_domain(node) and all(node is not n for n in out):
            out.append(node)
    return out


class _Shapes:
    """Tensor shapes: graphsurgeon's when it knows the rank, else onnx shape inference, run at most
    once per pass and only when a site needs it (dims are ints, or None/str when unknown)."""

    def __init__(self, graph: gs.Graph, input_shapes: dict[str, tuple[int, ...]]):
        self.graph, self.input_shapes, self.types = graph, input_shapes, None

    def __call__(self, tensor: gs.Tensor) -> tuple | None:
        if tensor.shape is not None and all(isinstance(d, int) for d in tensor.shape):
            return tuple(tensor.shape)
        if self.types is None:
            # on a cleaned-up copy: the graph may already hold nodes this pass disconnected
            self.types = infer_tensor_types(self.graph.copy().cleanup(), self.input_shapes)
        inferred = self.types.get(tensor.name, (None, None))[0]
        if inferred is not None:
            return inferred
        return tuple(tensor.shape) if tensor.shape is not None else None

    def rank(self, *tensors: gs.Tensor) -> int | None:
        """The rank of the first tensor whose rank is known (they all have the same one)."""
        for t in tensors:
            shape = self(t)
            if shape is not None:
                return len(shape)
        return None


def _fits_rank(value: np.ndarray, rank: int | None) -> bool:
    """A broadcast constant must not raise the rank of the result (unknown rank: at most 1-D)."""
    return value.ndim <= (rank if rank is not None else 1)


def _node_name(graph: gs.Graph, like: str, op: str) -> str:
    """``/ln1/ReduceMean`` -> ``/ln1/LayerNormalization``, unique in the graph."""
    return unique_name(graph, f"{like.rsplit('/', 1)[0]}/{op}" if "/" in (like or "") else op)


def _sole_readers(graph: gs.Graph, pairs: list[tuple[gs.Tensor, list[gs.Node]]]) -> bool:
    """Every tensor is read by exactly the listed nodes (with multiplicity) and is no graph output."""
    for tensor, expected in pairs:
        if any(t is tensor for t in graph.outputs):
            return False
        if sorted(id(n) for n in tensor.outputs) != sorted(id(n) for n in expected):
            return False
    return True
