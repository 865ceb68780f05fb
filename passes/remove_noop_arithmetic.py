"""``remove-noop-arithmetic``: ``x*1``, ``x+0``, ``x-0``, ``x/1``, ``x**1`` where the constant
really is neutral and does not broadcast."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.pass_base import register_pass
from passes.cleanup import _bypass
from passes.graph_utils import constant_values, infer_tensor_types, iter_sites
from passes.skips import Skips
from passes.simplify_utils import _result, _shape, _static

#: op -> (neutral element, input positions where it is neutral)
_NEUTRAL = {"Add": (0, (1, 0)), "Sub": (0, (1,)), "Mul": (1, (1, 0)), "Div": (1, (1,)), "Pow": (1, (1,))}


@register_pass
@dataclass(frozen=True)
class RemoveNoopArithmetic(Pass):
    """Remove arithmetic with a neutral constant::

        x -> Mul(1) -> y      x -> Add(0) -> y      x -> Sub(0) -> y      becomes      x -> y
        x -> Div(1) -> y      x -> Pow(1) -> y      (and 1*x, 0+x)

    The constant must be all ones (or all zeros) -- an initializer or ``Constant`` node -- and must
    not broadcast: the output must have x's shape. That is proven from static shapes, or, with
    only x's rank known, when every dim of the constant is 1 (or equals x's static dim) and the
    constant's rank is at most x's. Otherwise the site is skipped and counted
    (``skipped_broadcast``: the constant enlarges x, e.g. ``[3] * ones[2,3]``;
    ``skipped_unknown_shape``: it cannot be told). The output type is x's type by the ops'
    type rules, so no cast is needed.

    Exactness: ``x*1``, ``x/1``, ``x-0`` and ``x^1`` return x bit for bit (NaN stays NaN);
    ``x+0`` does too except that ``-0.0 + 0.0 = +0.0``, so a negative zero may stay negative
    where the original made it positive: accepted, as the two compare equal and only ops that look
    at the sign of zero (division by it, ``Atan2``-like formulas) can tell them apart.
    If y is a graph output its name is kept (x's producer writes it); when impossible the node
    stays (``kept_graph_output``). Runs inside If/Loop/Scan bodies too. No options.
    """

    name = "remove-noop-arithmetic"
    requires_any_op = frozenset({"Mul", "Add", "Sub", "Div", "Pow"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        types = infer_tensor_types(graph)
        counts: Counter = Counter()
        skips = Skips()
        changed = False
        for g, node in iter_sites(graph, _NEUTRAL, min_inputs=2):
            if len(node.inputs) == 2 and len(node.outputs) == 1:
                changed |= self._remove(g, node, types, counts, skips)
        return _result(counts, changed, skips)

    def _remove(self, g: gs.Graph, node: gs.Node, types, counts: Counter, skips: Skips) -> bool:
        neutral, sides = _NEUTRAL[node.op]
        for side in sides:
            c = constant_values(node.inputs[side])
            if c is None or c.size == 0 or c.dtype.kind not in "biuf" or not np.all(c == neutral):
                continue
            reason = _keeps_shape(node.inputs[1 - side], node.outputs[0], c, types)
            if reason:
                skips.add(reason)
                return False
            original = list(node.inputs)
            if side == 0:  # commutative op with the constant first: put x first for _bypass
                node.inputs.clear()
                node.inputs.extend(original[::-1])
            if _bypass(g, node):
                counts[f"removed_{node.op.lower()}"] += 1
                return True
            node.inputs.clear()
            node.inputs.extend(original)
            counts["kept_graph_output"] += 1
            return False
        return False


def _keeps_shape(x: gs.Tensor, y: gs.Tensor, c: np.ndarray, types) -> str:
    """'' when broadcasting ``x`` with constant ``c`` gives x's shape; else why not proven."""
    xs, ys = _shape(x, types), _shape(y, types)
    if _static(xs) is not None and _static(ys) is not None:
        return "" if xs == ys else "broadcast"
    if xs is None:
        return "unknown_shape"
    if c.ndim > len(xs):
        return "broadcast"
    for cd, xd in zip(reversed(c.shape), reversed(xs)):
        if cd == 1 or cd == xd:
            continue
        return "unknown_shape" if xd is None else "broadcast"
    return ""
