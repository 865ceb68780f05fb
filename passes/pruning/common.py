"""What the pruning modules share: the verification tolerance, layer ops, node labels."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from optimizer.pass_base import Tolerance

#: Pruning without fine-tuning changes outputs by an amount no fixed bound describes honestly, so
#: verification proves the model is valid and runs with finite outputs of the same names, shapes
#: and types (non-finite values count as mismatches). Accuracy is measured by the evaluation
#: (``--data``) and controlled by the accuracy-budget search.
UNBOUNDED = Tolerance(rtol=float("inf"), atol=float("inf"), min_cosine=None, max_mismatch=0.0)

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _label(node: gs.Node, index: int) -> str:
    return node.name or f"{node.op}_{index}"


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
