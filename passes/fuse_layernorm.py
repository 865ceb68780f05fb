"""``fuse-layernorm``: a decomposed layer normalization becomes one ``LayerNormalization`` (opset 17)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.pass_base import register_pass
from passes.graph_utils import constant_values, detach, is_default_domain, iter_sites, only_consumer, unique_name
from passes.match import match_chain
from passes.skips import Skips
from passes.pattern_utils import (
    FUSABLE_FLOAT_TYPES,
    _fits_rank,
    _node_name,
    _other_input,
    _scalar,
    _Shapes,
    _sole_readers,
)

log = logging.getLogger(__name__)

LAYERNORM_MIN_OPSET = 17


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
@dataclass(frozen=True)
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
        stats, skips = {"fused": 0}, Skips()
        shapes = _Shapes(graph, ctx.input_shapes)
        for g, node in iter_sites(graph, ("Div", "Mul")):
            outcome = self._fuse(g, node, opset, stats, shapes)
            if outcome == "fused":
                stats["fused"] += 1
            elif outcome is not None:
                skips.add(outcome)
        if stats["fused"]:
            log.info("fuse-layernorm: fused %d LayerNormalization(s)", stats["fused"])
        return PassResult(changed=stats["fused"] > 0, stats=stats, skipped=skips)

    def _fuse(self, g: gs.Graph, anchor: gs.Node, opset: int, stats: dict, shapes: _Shapes) -> str | None:
        """Fuse the LayerNorm ending at ``anchor``: "fused", why it is refused, or None (no LayerNorm)."""
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
            return "mismatched_input"
        if square.op == "Pow":
            exponent = _scalar(square.inputs[1])
            if square.inputs[0] is not d or exponent is None or float(exponent.reshape(-1)[0]) != 2.0:
                return "exponent"
        elif square.inputs[0] is not d or square.inputs[1] is not d:
            return "exponent"
        if opset < LAYERNORM_MIN_OPSET:
            return "opset"

        rank = shapes.rank(x, d, div.outputs[0])
        axes = _negative_axes(_reduce_axes(rm1), rank)
        if axes is None or axes != _negative_axes(_reduce_axes(rm2), rank) or axes != tuple(range(-len(axes), 0)):
            return "axes"  # not the same trailing axes in both reductions
        k = len(axes)
        if rm1.attrs.get("keepdims", 1) != 1 or rm2.attrs.get("keepdims", 1) != 1:
            return "keepdims"
        var = rm2.outputs[0]
        eps_tensor = _other_input(add_eps, var)
        eps = _scalar(eps_tensor) if eps_tensor is not None else None
        if eps is None or not _fits_rank(eps, rank):
            return "epsilon"
        dtype = eps.dtype
        if dtype.type not in FUSABLE_FLOAT_TYPES or (x.dtype is not None and np.dtype(x.dtype) != dtype):
            return "dtype"
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
            return "intermediate_shared"

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
        detach(rm1, sub, square, rm2, add_eps, sqrt, div, *([recip] if recip else []), *affine.nodes)
        g.nodes.append(gs.Node(
            "LayerNormalization", name=_node_name(g, rm1.name, "LayerNormalization"),
            attrs={"axis": -k, "epsilon": float(eps.reshape(-1)[0])}, inputs=inputs, outputs=[y],
        ))
        if affine.left_outside:
            stats["affine_left_outside"] = stats.get("affine_left_outside", 0) + affine.left_outside
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
