"""``fuse-gelu``: the erf and tanh forms of a decomposed GELU become one ``Gelu`` (opset 20)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.pass_base import register_pass
from passes.graph_utils import constant_values, detach, is_default_domain, iter_sites
from passes.match import producer
from passes.skips import Skips
from passes.pattern_utils import (
    FUSABLE_FLOAT_TYPES,
    _close,
    _fits_rank,
    _node_name,
    _other_input,
    _readers,
    _scalar,
    _Shapes,
    _sole_readers,
)

log = logging.getLogger(__name__)

GELU_MIN_OPSET = 20

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_CUBIC = 0.044715


@dataclass
class _GeluMatch:
    anchor: gs.Node  # the Erf or Tanh
    x: gs.Tensor
    nodes: list[gs.Node]
    inner: list[tuple[gs.Tensor, list[gs.Node]]]  # tensors that must have exactly these readers
    constants: list[tuple[np.ndarray, float]]  # (value found, value expected)
    half: np.ndarray  # the 0.5, a Mul operand: its type is the activation's
    output: gs.Tensor


def _half_product(t: gs.Tensor, x: gs.Tensor) -> tuple[list[gs.Node], list, np.ndarray, gs.Tensor] | None:
    """Match ``0.5 * x * t`` written with two Muls in any bracketing and operand order.

    Returns (nodes, inner tensors with their readers, the 0.5 constant, output) or None.
    """
    for m1 in _readers(t, "Mul"):
        a = _other_input(m1, t)
        if a is None:
            continue
        half = _scalar(a)
        if half is not None:  # Mul(x, Mul(0.5, t))
            for m2 in _readers(m1.outputs[0], "Mul"):
                if _other_input(m2, m1.outputs[0]) is x:
                    return [m1, m2], [(t, [m1]), (m1.outputs[0], [m2])], half, m2.outputs[0]
        if a is x:  # Mul(Mul(x, t), 0.5)
            for m2 in _readers(m1.outputs[0], "Mul"):
                other = _other_input(m2, m1.outputs[0])
                half = _scalar(other) if other is not None else None
                if half is not None:
                    return [m1, m2], [(t, [m1]), (m1.outputs[0], [m2])], half, m2.outputs[0]
        p = producer(a)
        if p is not None and p.op == "Mul" and is_default_domain(p):  # Mul(Mul(x, 0.5), t)
            other = _other_input(p, x)
            half = _scalar(other) if other is not None else None
            if half is not None:
                return [p, m1], [(t, [m1]), (a, [m1])], half, m1.outputs[0]
    return None


def _one_plus(t: gs.Tensor) -> list[tuple[gs.Node, np.ndarray]]:
    """The ``Add(t, c)`` readers of ``t`` with a one-element constant c (expected to be 1)."""
    out = []
    for add in _readers(t, "Add"):
        other = _other_input(add, t)
        one = _scalar(other) if other is not None else None
        if one is not None:
            out.append((add, one))
    return out


def _scaled_input(node: gs.Node, div_target: float, mul_target: float):
    """``Div(x, c)`` or ``Mul(x, c)``/``Mul(c, x)``: (x, c, expected c), or None."""
    if node.op == "Div" and len(node.inputs) == 2:
        c = _scalar(node.inputs[1])
        return (node.inputs[0], c, div_target) if c is not None else None
    if node.op == "Mul" and len(node.inputs) == 2:
        for i in (1, 0):
            c = _scalar(node.inputs[i])
            if c is not None and constant_values(node.inputs[1 - i]) is None:
                return node.inputs[1 - i], c, mul_target
    return None


def _cube(w: gs.Tensor, x: gs.Tensor):
    """``Pow(x, 3)`` or ``Mul(x, Mul(x, x))`` in either order: (nodes, inner, constants) or None."""
    p = producer(w)
    if p is None or not is_default_domain(p) or len(p.inputs) != 2:
        return None
    if p.op == "Pow" and p.inputs[0] is x:
        e = _scalar(p.inputs[1])
        return ([p], [], [(e, 3.0)]) if e is not None else None
    if p.op == "Mul":
        for i in (0, 1):
            sq, other = p.inputs[i], p.inputs[1 - i]
            q = producer(sq)
            if (other is x and q is not None and q.op == "Mul" and is_default_domain(q)
                    and len(q.inputs) == 2 and q.inputs[0] is x and q.inputs[1] is x):
                return [p, q], [(sq, [p])], []
    return None


@register_pass
@dataclass(frozen=True)
class FuseGelu(Pass):
    """Fuse a decomposed GELU into one Gelu node (opset >= 20). The erf form::

        x -----------------------------------------+
        |                                          |
        Div(x, 1.41421)                            Mul(x, 0.5)
        |                                          |
        Erf                                        |
        |                                          v
        Add(1) ----------------------------------> Mul --> y
        becomes
        x --> Gelu(approximate="none") --> y

    ``Mul(x, 0.70711)`` may replace the Div, and ``0.5 * x * (1 + erf)`` may be bracketed and
    ordered in any way: ``Mul(Mul(x, 0.5), t)``, ``Mul(Mul(x, t), 0.5)``, ``Mul(x, Mul(0.5, t))``,
    operands either side. The tanh form::

        x --+--> Pow(x, 3) --> Mul(0.044715) --> Add(x, .) --> Mul(0.79788) --> Tanh --> Add(1)
            |                                                                              |
            +--> Mul(x, 0.5) -----------------------------------------------------------> Mul --> y
        becomes
        x --> Gelu(approximate="tanh") --> y

    with the same endings, and ``x^3`` also as ``Mul(x, Mul(x, x))`` (either order).

    Constants (initializers or ``Constant`` nodes holding one value) must equal 0.5, 1, sqrt(2)
    or 1/sqrt(2), 0.044715, sqrt(2/pi) and 3 within 1e-4 relative (float16 constants: within one
    float16 unit, about 1e-3). The type must be float32 or float16, and every tensor inside the
    pattern must have no other reader and not be a graph output. Skipped sites are left intact and
    counted: ``skipped_opset`` (model opset < 20, where Gelu does not exist), ``skipped_constants``,
    ``skipped_dtype``, ``skipped_intermediate_shared``. Stats: ``fused_erf``, ``fused_tanh``.
    """

    name = "fuse-gelu"
    requires_any_op = frozenset({"Erf", "Tanh"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opset = graph.opset or ctx.opset  # the graph's own: upgrade-opset may have raised it
        fused, skips = {"fused_erf": 0, "fused_tanh": 0}, Skips()
        shapes = _Shapes(graph, ctx.input_shapes)
        for g, node in iter_sites(graph, ("Erf", "Tanh"), min_inputs=1):
            match = self._match_erf(node) if node.op == "Erf" else self._match_tanh(node)
            if match is not None:
                outcome = self._fuse(g, match, opset, shapes)
                if outcome in fused:
                    fused[outcome] += 1
                else:
                    skips.add(outcome)
        if any(fused.values()):
            log.info("fuse-gelu: fused %d erf and %d tanh Gelu(s)", fused["fused_erf"], fused["fused_tanh"])
        return PassResult(changed=any(fused.values()), stats=fused, skipped=skips)

    @staticmethod
    def _match_erf(erf: gs.Node) -> _GeluMatch | None:
        """0.5 * x * (1 + erf(x / sqrt(2)))."""
        u = erf.inputs[0]
        scale = producer(u)
        if scale is None or scale.op not in ("Div", "Mul") or not is_default_domain(scale):
            return None
        scaled = _scaled_input(scale, SQRT2, 1.0 / SQRT2)
        if scaled is None:
            return None
        x, c, target = scaled
        for add1, one in _one_plus(erf.outputs[0]):
            product = _half_product(add1.outputs[0], x)
            if product is not None:
                nodes, inner, half, out = product
                return _GeluMatch(
                    erf, x, [scale, erf, add1] + nodes,
                    [(u, [erf]), (erf.outputs[0], [add1])] + inner,
                    [(c, target), (one, 1.0), (half, 0.5)], half, out,
                )
        return None

    @staticmethod
    def _match_tanh(tanh: gs.Node) -> _GeluMatch | None:
        """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""
        u = tanh.inputs[0]
        outer = producer(u)
        if outer is None or outer.op != "Mul" or not is_default_domain(outer):
            return None
        scaled = _scaled_input(outer, 1.0 / SQRT_2_OVER_PI, SQRT_2_OVER_PI)
        if scaled is None:
            return None
        inner_sum, c_outer, outer_target = scaled
        add = producer(inner_sum)
        if add is None or add.op != "Add" or not is_default_domain(add) or len(add.inputs) != 2:
            return None
        for i in (0, 1):
            x, v = add.inputs[i], add.inputs[1 - i]
            cubic = producer(v)
            if cubic is None or cubic.op != "Mul" or not is_default_domain(cubic):
                continue
            found = _scaled_input(cubic, 1.0 / GELU_TANH_CUBIC, GELU_TANH_CUBIC)
            if found is None:
                continue
            w, c_cubic, cubic_target = found
            cube = _cube(w, x)
            if cube is None:
                continue
            cube_nodes, cube_inner, cube_consts = cube
            for add1, one in _one_plus(tanh.outputs[0]):
                product = _half_product(add1.outputs[0], x)
                if product is None:
                    continue
                nodes, inner, half, out = product
                return _GeluMatch(
                    tanh, x, cube_nodes + [cubic, add, outer, tanh, add1] + nodes,
                    cube_inner + [(w, [cubic]), (v, [add]), (inner_sum, [outer]), (u, [tanh]),
                                  (tanh.outputs[0], [add1])] + inner,
                    cube_consts + [(c_cubic, cubic_target), (c_outer, outer_target),
                                   (one, 1.0), (half, 0.5)],
                    half, out,
                )
        return None

    @staticmethod
    def _fuse(g: gs.Graph, m: _GeluMatch, opset: int, shapes: _Shapes) -> str:
        """Replace the matched nodes by one Gelu; return its stats key, or why the site is refused."""
        if not all(_close(value, target) for value, target in m.constants):
            return "constants"
        if opset < GELU_MIN_OPSET:
            return "opset"
        dtype = m.half.dtype
        if dtype.type not in FUSABLE_FLOAT_TYPES or (m.x.dtype is not None and np.dtype(m.x.dtype) != dtype):
            return "dtype"
        if any(v.ndim for v, _ in m.constants):  # a [1]-shaped constant must not raise the rank
            rank = shapes.rank(m.x, m.output)
            if not all(_fits_rank(v, rank) for v, _ in m.constants):
                return "constants"
        if not _sole_readers(g, m.inner):
            return "intermediate_shared"
        erf = m.anchor.op == "Erf"
        y = m.output
        detach(*m.nodes)
        g.nodes.append(gs.Node(
            "Gelu", name=_node_name(g, m.anchor.name, "Gelu"),
            attrs={"approximate": "none" if erf else "tanh"}, inputs=[m.x], outputs=[y],
        ))
        return "fused_erf" if erf else "fused_tanh"
