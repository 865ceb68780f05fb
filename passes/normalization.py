"""Normalization and activation fusions: decomposed LayerNorm and GELU become native ONNX ops.

Exporters (torch's legacy exporter with hand-written modules, tf2onnx, older opsets) spell these
layers out op by op. TensorRT and ONNX Runtime have fast kernels for ``LayerNormalization``
(opset 17) and ``Gelu`` (opset 20); these passes put the native op back, exactly (same math, up to
float rounding), and only where the rewrite provably computes the same thing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.registry import register_pass
from passes.graph_utils import (
    all_graphs,
    constant_values,
    infer_tensor_types,
    is_default_domain,
    only_consumer,
    unique_name,
)
from passes.match import match_chain, producer

log = logging.getLogger(__name__)

FLOAT_TYPES = (np.float32, np.float16)
LAYERNORM_MIN_OPSET = 17
GELU_MIN_OPSET = 20
#: Relative tolerance for recognizing the constants of a pattern (0.5, 1, sqrt(2), ...).
CONSTANT_RTOL = 1e-4

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_CUBIC = 0.044715


# --------------------------------------------------------------------------- shared helpers
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


def _disconnect(nodes: list[gs.Node]) -> None:
    for node in nodes:
        node.outputs.clear()
        node.inputs.clear()


class _Counts:
    """Fusions and skipped sites by reason, reported as ``skipped_<reason>``."""

    def __init__(self) -> None:
        self.stats: dict[str, int] = {}

    def add(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def result(self, fused_keys: tuple[str, ...]) -> PassResult:
        stats = {k: self.stats.get(k, 0) for k in fused_keys}
        stats.update({k: v for k, v in sorted(self.stats.items()) if k not in fused_keys})
        return PassResult(changed=any(stats[k] for k in fused_keys), stats=stats)


# --------------------------------------------------------------------------- LayerNormalization
def _reduce_axes(node: gs.Node) -> tuple[int, ...] | None | str:
    """ReduceMean axes (attribute before opset 18, constant input from 18); "all"; None if unknown."""
    if "axes" in node.attrs:
        return tuple(int(a) for a in node.attrs["axes"])
    if len(node.inputs) > 1 and node.inputs[1].name:
        values = constant_values(node.inputs[1])
        return None if values is None else tuple(int(a) for a in values.reshape(-1))
    return None if node.attrs.get("noop_with_empty_axes", 0) else "all"


def _negative_axes(axes: tuple[int, ...] | str | None, rank: int | None) -> tuple[int, ...] | None:
    """Reduction axes as sorted negative indices (positive ones need a known rank), else None."""
    if axes is None or (axes == "all" and rank is None):
        return None
    if axes == "all":
        return tuple(range(-rank, 0))
    if not axes or (rank is None and any(a >= 0 for a in axes)):
        return None
    neg = sorted({a - rank if a >= 0 else a for a in axes})
    if len(neg) != len(axes) or (rank is not None and neg[0] < -rank):
        return None
    return tuple(neg)


def _normalized_shape(k: int, shapes: _Shapes, *tensors: gs.Tensor) -> tuple[int, ...] | None:
    """The static shape of the last k axes, from the first tensor of the pattern that knows it."""
    for t in tensors:
        shape = shapes(t)
        if shape is not None and len(shape) >= k:
            dims = shape[len(shape) - k:]
            if all(isinstance(d, int) and d >= 0 for d in dims):
                return tuple(dims)
    return None


def _affine_param(values: np.ndarray, k: int, rank: int | None, norm: tuple[int, ...] | None) -> np.ndarray | None:
    """gamma/beta in LayerNormalization's form (the normalized shape), or None if they broadcast
    over a non-normalized axis or would raise the output's rank."""
    if values.ndim > k:
        if any(d != 1 for d in values.shape[: values.ndim - k]) or rank is None or values.ndim > rank:
            return None
        values = values.reshape(values.shape[values.ndim - k:])
    values = values.reshape((1,) * (k - values.ndim) + values.shape)
    if norm is None:
        return values  # broadcastable to the normalized shape, which LayerNormalization allows
    if any(v not in (1, n) for v, n in zip(values.shape, norm)):
        return None
    return np.ascontiguousarray(np.broadcast_to(values, norm))


@dataclass
class _Affine:
    nodes: list[gs.Node] = field(default_factory=list)
    gamma: tuple[gs.Tensor, np.ndarray] | None = None
    beta: tuple[gs.Tensor, np.ndarray] | None = None
    left_outside: int = 0


@register_pass
@dataclass
class FuseLayerNorm(Pass):
    """Fuse a decomposed layer normalization into one LayerNormalization node (opset >= 17)::

        x -------------------------+
        |                          |
        ReduceMean(axes)           |
        |                          v
        +-----------------> Sub(x, mean) = d ----------------+
                                   |                         |
                                   Pow(d, 2)                 |
                                   |                         |
                                   ReduceMean(axes)          |
                                   |                         |
                                   Add(var, eps)             |
                                   |                         |
                                   Sqrt                      v
                                   +-----------------> Div(d, std)
                                                             |
                                                             Mul(gamma)      (optional)
                                                             |
                                                             Add(beta)       (optional)
                                                             |
                                                             y
        becomes
        x --> LayerNormalization(x, gamma, beta, axis=-k, epsilon=eps) --> y

    Also matched: ``Mul(d, Reciprocal(Sqrt(...)))`` instead of the Div; ``Mul(d, d)`` instead of
    ``Pow(d, 2)``; eps, gamma and beta in either operand order, as initializers or ``Constant``
    nodes; ReduceMean axes as an attribute (opset < 18) or a constant input (opset >= 18). Without
    ``Mul(gamma)`` the scale is ones; without ``Add(beta)`` the bias is omitted. gamma/beta are
    stored with the normalized shape when it is known.

    Conditions: both ReduceMeans reduce the same *last* axes (``[-1]``, ``[-2, -1]``, or positive
    axes when the rank is known) with ``keepdims=1``; the Sub reads the same ``x`` as the first
    ReduceMean and the Div reads the Sub's output; the exponent is 2; eps is a one-element
    constant; the type is float32 or float16; every tensor inside the pattern has no other reader
    and is not a graph output. Otherwise the site is left alone and counted in the stats:
    ``skipped_opset`` (model opset < 17), ``skipped_mismatched_input``, ``skipped_exponent``,
    ``skipped_axes``, ``skipped_keepdims``, ``skipped_epsilon``, ``skipped_dtype``,
    ``skipped_intermediate_shared``.

    A ``Mul``/``Add`` after the normalization that is not a gamma/beta stays after the fused node:
    a non-constant one (a residual Add) or one whose input has other readers is simply not part of
    the pattern; a constant one that varies along a non-normalized axis (or would raise the rank)
    is counted as ``affine_left_outside``.

    Stats: ``fused`` and the skip counts. Numerics: LayerNormalization (stash_type=1) computes in
    float32; float32 results match the decomposed graph within float rounding (about 1e-7 of the
    output scale on the samples); float16 models gain precision.
    """

    name = "fuse-layernorm"
    requires_any_op = frozenset({"ReduceMean"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opset = graph.opset or ctx.opset  # the graph's own: upgrade-opset may have raised it
        counts = _Counts()
        shapes = _Shapes(graph, ctx.input_shapes)
        for g in all_graphs(graph):
            for node in list(g.nodes):
                if node.op in ("Div", "Mul") and is_default_domain(node):
                    outcome = self._fuse(g, node, opset, counts, shapes)
                    if outcome is not None:
                        counts.add(outcome)
        result = counts.result(("fused",))
        if result.changed:
            log.info("fuse-layernorm: fused %d LayerNormalization(s)", result.stats["fused"])
        return result

    def _fuse(self, g: gs.Graph, anchor: gs.Node, opset: int, counts: _Counts, shapes: _Shapes) -> str | None:
        """Fuse the LayerNorm ending at ``anchor``: "fused", "skipped_<why>", or None (no LayerNorm)."""
        tail = ["Sqrt", "Add", "ReduceMean", (("Pow", "Mul"), 0), ("Sub", 0), ("ReduceMean", 1)]
        if anchor.op == "Div":
            chain = match_chain(anchor, ["Div", ("Sqrt", 1)] + tail[1:])
            recip = None
        else:
            chain = match_chain(anchor, ["Mul", "Reciprocal"] + tail)
            recip = chain.pop(1) if chain else None
        if chain is None:
            return None
        div, sqrt, add_eps, rm2, square, sub, rm1 = chain
        x, mean, d = rm1.inputs[0], rm1.outputs[0], sub.outputs[0]
        std = (recip or sqrt).outputs[0]
        if sub.inputs[0] is not x or sub.inputs[1] is not mean or _other_input(div, std) is not d:
            return "skipped_mismatched_input"
        if square.op == "Pow":
            exponent = _scalar(square.inputs[1])
            if square.inputs[0] is not d or exponent is None or float(exponent.reshape(-1)[0]) != 2.0:
                return "skipped_exponent"
        elif square.inputs[0] is not d or square.inputs[1] is not d:
            return "skipped_exponent"
        if opset < LAYERNORM_MIN_OPSET:
            return "skipped_opset"

        rank = shapes.rank(x, d, div.outputs[0])
        axes = _negative_axes(_reduce_axes(rm1), rank)
        if axes is None or axes != _negative_axes(_reduce_axes(rm2), rank) or axes != tuple(range(-len(axes), 0)):
            return "skipped_axes"  # not the same trailing axes in both reductions
        k = len(axes)
        if rm1.attrs.get("keepdims", 1) != 1 or rm2.attrs.get("keepdims", 1) != 1:
            return "skipped_keepdims"
        var = rm2.outputs[0]
        eps_tensor = _other_input(add_eps, var)
        eps = _scalar(eps_tensor) if eps_tensor is not None else None
        if eps is None or not _fits_rank(eps, rank):
            return "skipped_epsilon"
        dtype = eps.dtype
        if dtype.type not in FLOAT_TYPES or (x.dtype is not None and np.dtype(x.dtype) != dtype):
            return "skipped_dtype"
        square_readers = [square, square] if square.op == "Mul" else [square]
        inner = [
            (mean, [sub]),
            (d, square_readers + [div]),
            (square.outputs[0], [rm2]),
            (var, [add_eps]),
            (add_eps.outputs[0], [sqrt]),
            (sqrt.outputs[0], [recip or div]),
        ] + ([(recip.outputs[0], [div])] if recip else [])
        if not _sole_readers(g, inner):
            return "skipped_intermediate_shared"

        norm = _normalized_shape(k, shapes, x, d, div.outputs[0])
        affine = self._affine(g, div, dtype, k, rank, norm)
        last = (affine.nodes or [div])[-1]
        y = last.outputs[0]
        if affine.gamma is not None:
            scale = self._param(g, *affine.gamma, f"{rm1.name or 'layernorm'}_scale")
        else:
            ones = np.ones(norm if norm is not None else (1,) * k, dtype)
            scale = gs.Constant(unique_name(g, f"{rm1.name or 'layernorm'}_scale"), ones)
        inputs = [x, scale]
        if affine.beta is not None:
            inputs.append(self._param(g, *affine.beta, f"{rm1.name or 'layernorm'}_bias"))
        _disconnect([rm1, sub, square, rm2, add_eps, sqrt, div] + ([recip] if recip else []) + affine.nodes)
        g.nodes.append(gs.Node(
            "LayerNormalization", name=_node_name(g, rm1.name, "LayerNormalization"),
            attrs={"axis": -k, "epsilon": float(eps.reshape(-1)[0])}, inputs=inputs, outputs=[y],
        ))
        for _ in range(affine.left_outside):
            counts.add("affine_left_outside")
        return "fused"

    @staticmethod
    def _affine(g: gs.Graph, div: gs.Node, dtype: np.dtype, k: int, rank: int | None,
                norm: tuple[int, ...] | None) -> _Affine:
        """The ``Mul(gamma)`` / ``Add(beta)`` after the normalization that can be absorbed."""
        affine = _Affine()
        y = div.outputs[0]
        for op in ("Mul", "Add"):
            readers = [n for n in y.outputs]
            if len(readers) != 1 or readers[0].op != op or not is_default_domain(readers[0]):
                if op == "Mul":
                    continue  # no gamma: maybe an Add(beta) directly
                break
            node = readers[0]
            other = _other_input(node, y)
            values = constant_values(other) if other is not None and other is not y else None
            if values is None or values.dtype != dtype:
                if op == "Mul":
                    continue
                break
            param = _affine_param(values, k, rank, norm)
            if param is None or not only_consumer(g, y, node):
                affine.left_outside += 1
                break
            if op == "Mul":
                affine.gamma = (other, param)
            else:
                affine.beta = (other, param)
            affine.nodes.append(node)
            y = node.outputs[0]
        return affine

    @staticmethod
    def _param(g: gs.Graph, tensor: gs.Tensor, values: np.ndarray, base: str) -> gs.Tensor:
        """Reuse the constant when it already has the wanted shape, else a reshaped copy."""
        if tuple(np.asarray(constant_values(tensor)).shape) == values.shape:
            return tensor
        return gs.Constant(unique_name(g, base), values)


# --------------------------------------------------------------------------- Gelu
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
@dataclass
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
        counts = _Counts()
        shapes = _Shapes(graph, ctx.input_shapes)
        for g in all_graphs(graph):
            for node in list(g.nodes):
                if node.op in ("Erf", "Tanh") and is_default_domain(node) and node.inputs:
                    match = self._match_erf(node) if node.op == "Erf" else self._match_tanh(node)
                    if match is not None:
                        counts.add(self._fuse(g, match, opset, shapes))
        result = counts.result(("fused_erf", "fused_tanh"))
        if result.changed:
            log.info("fuse-gelu: fused %d erf and %d tanh Gelu(s)",
                     result.stats["fused_erf"], result.stats["fused_tanh"])
        return result

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
        """Replace the matched nodes by one Gelu; return the stats key."""
        if not all(_close(value, target) for value, target in m.constants):
            return "skipped_constants"
        if opset < GELU_MIN_OPSET:
            return "skipped_opset"
        dtype = m.half.dtype
        if dtype.type not in FLOAT_TYPES or (m.x.dtype is not None and np.dtype(m.x.dtype) != dtype):
            return "skipped_dtype"
        if any(v.ndim for v, _ in m.constants):  # a [1]-shaped constant must not raise the rank
            rank = shapes.rank(m.x, m.output)
            if not all(_fits_rank(v, rank) for v, _ in m.constants):
                return "skipped_constants"
        if not _sole_readers(g, m.inner):
            return "skipped_intermediate_shared"
        erf = m.anchor.op == "Erf"
        y = m.output
        _disconnect(m.nodes)
        g.nodes.append(gs.Node(
            "Gelu", name=_node_name(g, m.anchor.name, "Gelu"),
            attrs={"approximate": "none" if erf else "tanh"}, inputs=[m.x], outputs=[y],
        ))
        return "fused_erf" if erf else "fused_tanh"
