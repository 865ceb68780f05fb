"""Per-channel scale migration between an activation and the MatMul/Gemm layers that read it.

SmoothQuant and AWQ both rewrite ``Y = X·W`` as ``Y = (X / s)·(diag(s)·W)``: the activation is
divided per input channel ``j`` (the last axis of ``X``, the ``K`` axis of the weights) and each
consumer's weight row ``j`` multiplied by ``s_j``. Mathematically nothing changes; numerically
only float rounding does. This module does the graph surgery; the passes choose ``s``.

``fold_input_scales`` puts the ``1/s`` into the op that produces ``X``, so no node is added::

    LayerNormalization(x, gamma, beta) ─> [Reshape/Transpose keeping the last axis] ─> X ─┬─> MatMul(W_q)
                                                                                         ├─> MatMul(W_k)
    becomes LayerNormalization(x, gamma/s, beta/s) ─> ... ─> X/s ─> MatMul(s·W_q), ...  └─> MatMul(W_v)

Foldable producers (default domain, float32 constants):

* ``LayerNormalization``: its scale and bias (last dim = the channels) are divided;
* ``MatMul``/``Gemm`` with a constant weight: the weight's output columns (``Gemm`` with
  ``transB=1``: its rows) and the bias (``Gemm``'s C, or a constant ``Add`` right after the MatMul,
  which counts as part of it) are divided;
* ``Mul`` by a constant: the constant is divided (broadcast to the channels when it was a scalar).

Between the producer and ``X`` there may be ``Transpose`` (that keeps the last axis last) and
``Reshape`` (from and to tensors whose last dim is the channel count, known statically: a constant
target shape, the graph's shapes or ``shapes``) nodes. Every intermediate tensor must be read only by the next node of that
chain and ``X`` only by the given consumers -- a residual ``Add`` reading the LayerNorm output
would see ``X/s`` -- unless ``clone_producer=True``: then a cheap producer (LayerNormalization,
Mul) and the chain are duplicated for the consumers and the original keeps feeding the others.

Consumers are ``MatMul`` (weight ``[K, N]``) and ``Gemm`` (``transA=0``; weight ``[K, N]``, or
``[N, K]`` with ``transB=1``) nodes reading ``X`` as their first input, with a 2-D float32 constant
weight read by no node outside the group (one weight read by several consumers is scaled once).

Anything else changes nothing and returns a reason, one word: ``graph_input``,
``constant_input``, ``producer_not_foldable`` (activation functions, attention, ...),
``output_has_other_consumers``, ``weight_shared`` (a producer or consumer weight matrix read by
other nodes), ``parameter_not_constant``, ``not_float32``, ``channel_mismatch``,
``reshape_changes_channels``, ``consumer_not_matmul``, ``consumer_weight_not_constant``,
``consumer_weight_not_2d``, ``gemm_transA``. Shared small vectors (a LayerNorm scale, a bias)
are copied instead.

``insert_input_scale`` is the fallback when folding is impossible: it inserts ``Mul(X, 1/s)``
before the consumers (which then read it) and scales their weights the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from passes.graph_utils import is_default_domain, is_graph_output, unique_name

CLONEABLE = ("LayerNormalization", "Mul")


@dataclass
class _Edit:
    """Divide (``scale=False``: multiply) constant input ``index`` of ``node`` per channel along ``axis``."""

    node: gs.Node
    index: int
    axis: int  # axis of the channels in the constant (negative: from the end)
    matrix: bool  # a weight matrix (refuse when shared) rather than a small vector (copy when shared)


@dataclass
class FoldPlan:
    """How ``fold_input_scales`` would rewrite one site (``plan_fold``)."""

    tensor: gs.Variable
    consumers: list[gs.Node]
    producer: gs.Node
    through: list[gs.Node]  # Reshape/Transpose nodes from the producer down to ``tensor``, in order
    producer_edits: list[_Edit]
    consumer_edits: list[tuple[gs.Constant, int]]  # (weight, K axis), one per distinct weight
    clone: bool = False
    nodes: list[gs.Node] = field(default_factory=list)  # producer + through: what a clone copies

    @property
    def channels(self) -> int:
        weight, axis = self.consumer_edits[0]
        return int(weight.shape[axis])


def _readers_outside(tensor: gs.Tensor, allowed: list[gs.Node]) -> bool:
    ids = {id(n) for n in allowed}
    return any(id(r) not in ids for r in tensor.outputs)


def _last_dim(tensor: gs.Tensor, shapes: dict | None) -> int | None:
    """The static size of ``tensor``'s last axis (from the graph, else ``shapes``), or None."""
    def known(shape) -> bool:
        return bool(shape) and isinstance(shape[-1], (int, np.integer)) and shape[-1] >= 0

    shape = tensor.shape if known(tensor.shape) else (shapes or {}).get(tensor.name)
    return int(shape[-1]) if known(shape) else None


def consumer_weights(graph: gs.Graph, tensor: gs.Tensor, consumers: list[gs.Node]) -> list[tuple[gs.Constant, int]] | str:
    """The distinct consumer weights and their ``K`` axis, or a reason why the group is unusable."""
    if not consumers or len({id(c) for c in consumers}) != len(consumers):
        raise ValueError("consumers must be a non-empty list of distinct nodes")
    edits: dict[int, tuple[gs.Constant, int]] = {}
    channels = None
    for node in consumers:
        if node.op not in ("MatMul", "Gemm") or not is_default_domain(node) or len(node.inputs) < 2 or node.inputs[0] is not tensor:
            return "consumer_not_matmul"
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return "gemm_transA"
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant):
            return "consumer_weight_not_constant"
        if np.asarray(weight.values).dtype != np.float32:
            return "not_float32"
        if len(weight.shape) != 2:
            return "consumer_weight_not_2d"
        axis = 1 if node.op == "Gemm" and node.attrs.get("transB", 0) else 0
        if channels is None:
            channels = int(weight.shape[axis])
        if int(weight.shape[axis]) != channels:
            return "channel_mismatch"
        if id(weight) in edits and edits[id(weight)][1] != axis:
            return "weight_shared"  # read as [K, N] by one consumer and [N, K] by another
        if _readers_outside(weight, consumers) or is_graph_output(graph, weight):
            return "weight_shared"
        edits[id(weight)] = (weight, axis)
    return list(edits.values())


def weight_rows(node: gs.Node) -> np.ndarray:
    """A consumer's constant weight as ``[K, N]`` (rows = input channels), float64."""
    w = np.asarray(node.inputs[1].values, np.float64)
    return w.T if node.op == "Gemm" and node.attrs.get("transB", 0) else w


def _passes_last_axis(node: gs.Node, channels: int, shapes: dict | None) -> str | None:
    """None when ``node`` (Transpose/Reshape) keeps the last axis as the channels, else a reason."""
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        if perm is None or list(perm)[-1] != len(perm) - 1:
            return "producer_not_foldable"
        return None
    # A Reshape keeps every element's channel when the input's and the output's last dims both
    # equal the channel count: the flat (row-major) index modulo C is the channel on both sides.
    target = node.inputs[1] if len(node.inputs) > 1 else None
    out_last = None
    if isinstance(target, gs.Constant):
        shape = np.asarray(target.values).reshape(-1)
        out_last = int(shape[-1]) if shape.size and int(shape[-1]) > 0 else None
    if out_last is None:
        out_last = _last_dim(node.outputs[0], shapes)
    if out_last != channels or _last_dim(node.inputs[0], shapes) != channels:
        return "reshape_changes_channels"
    return None


def _channel_param(node: gs.Node, index: int, channels: int, exact: bool) -> str | None:
    """Checks a producer parameter: constant float32 whose last dim is the channels (or 1/scalar
    when ``exact`` is false, then broadcast)."""
    if index >= len(node.inputs) or not node.inputs[index].name:
        return None
    t = node.inputs[index]
    if not isinstance(t, gs.Constant):
        return "parameter_not_constant"
    values = np.asarray(t.values)
    if values.dtype != np.float32:
        return "not_float32"
    last = values.shape[-1] if values.ndim else 1
    if last != channels and (exact or last != 1):
        return "channel_mismatch"
    return None


def _constant_side(node: gs.Node) -> int | None:
    """Which input of a binary node is a constant (the other one not), else None."""
    if len(node.inputs) != 2:
        return None
    const = [isinstance(t, gs.Constant) for t in node.inputs]
    return const.index(True) if const.count(True) == 1 else None


def _producer_edits(graph: gs.Graph, out: gs.Tensor, channels: int) -> tuple[gs.Node, list[_Edit], list[gs.Node]] | str:
    """The producer of ``out`` (a bias Add counts as part of its MatMul/Gemm) and its edits."""
    node = out.inputs[0]
    if not is_default_domain(node) or node.outputs[0] is not out:
        return "producer_not_foldable"  # e.g. LayerNormalization's Mean/InvStdDev outputs
    extra: list[gs.Node] = []
    if node.op == "Add":
        side = _constant_side(node)
        inner = node.inputs[1 - side] if side is not None else None
        if side is None or len(inner.inputs) != 1 or inner.inputs[0].op not in ("MatMul", "Gemm"):
            return "producer_not_foldable"
        if len(inner.outputs) != 1 or is_graph_output(graph, inner):
            return "output_has_other_consumers"
        reason = _channel_param(node, side, channels, exact=False)
        if reason:
            return reason
        extra = [node]
        add_edit = _Edit(node, side, -1, False)
        node = inner.inputs[0]
        if not is_default_domain(node):
            return "producer_not_foldable"
    else:
        add_edit = None
    edits: list[_Edit] = []
    if node.op == "LayerNormalization":
        for index in (1, 2):
            reason = _channel_param(node, index, channels, exact=True)
            if reason:
                return reason
            if index < len(node.inputs) and node.inputs[index].name:
                edits.append(_Edit(node, index, -1, False))
    elif node.op in ("MatMul", "Gemm"):
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if not isinstance(weight, gs.Constant) or isinstance(node.inputs[0], gs.Constant):
            return "producer_not_foldable"  # attention (two activations) or a constant-only MatMul
        values = np.asarray(weight.values)
        if values.dtype != np.float32:
            return "not_float32"
        trans_b = node.op == "Gemm" and node.attrs.get("transB", 0)
        axis = 0 if trans_b else -1
        if values.ndim < 2 or (node.op == "Gemm" and values.ndim != 2) or values.shape[axis] != channels:
            return "channel_mismatch"
        edits.append(_Edit(node, 1, axis, True))
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            reason = _channel_param(node, 2, channels, exact=False)
            if reason:
                return reason
            edits.append(_Edit(node, 2, -1, False))
    elif node.op == "Mul":
        side = _constant_side(node)
        if side is None:
            return "producer_not_foldable"
        reason = _channel_param(node, side, channels, exact=False)
        if reason:
            return reason
        edits.append(_Edit(node, side, -1, False))
    else:
        return "producer_not_foldable"
    if add_edit is not None:
        edits.append(add_edit)
    return node, edits, [node] + extra


def plan_fold(
    graph: gs.Graph,
    tensor: gs.Variable,
    consumers: list[gs.Node],
    *,
    clone_producer: bool = False,
    shapes: dict | None = None,
) -> FoldPlan | str:
    """What ``fold_input_scales`` would do (a ``FoldPlan``), or the reason it refuses; no edits."""
    weights = consumer_weights(graph, tensor, consumers)
    if isinstance(weights, str):
        return weights
    channels = int(weights[0][0].shape[weights[0][1]])
    if isinstance(tensor, gs.Constant):
        return "constant_input"
    needs_clone = _readers_outside(tensor, consumers) or is_graph_output(graph, tensor)
    through: list[gs.Node] = []
    current = tensor
    while len(current.inputs) == 1 and current.inputs[0].op in ("Transpose", "Reshape") and is_default_domain(current.inputs[0]):
        node = current.inputs[0]
        reason = _passes_last_axis(node, channels, shapes)
        if reason:
            return reason
        through.insert(0, node)
        current = node.inputs[0]
        if isinstance(current, gs.Constant):
            return "constant_input"
        needs_clone |= len(current.outputs) != 1 or is_graph_output(graph, current)
    if not current.inputs:
        return "graph_input"
    found = _producer_edits(graph, current, channels)
    if isinstance(found, str):
        return found
    producer, edits, nodes = found
    if needs_clone and not (clone_producer and producer.op in CLONEABLE and len(nodes) == 1):
        return "output_has_other_consumers"
    if not needs_clone:
        for edit in edits:
            param = edit.node.inputs[edit.index]
            if edit.matrix and (_readers_outside(param, [edit.node]) or is_graph_output(graph, param)):
                return "weight_shared"
    return FoldPlan(tensor, list(consumers), producer, through, edits, weights, needs_clone, nodes + through)


def _per_channel(values: np.ndarray, scales: np.ndarray, axis: int, divide: bool) -> np.ndarray:
    """``values`` divided (or multiplied) by ``scales`` along ``axis``, broadcast to the channels
    first when that axis has size 1 (or ``values`` is a scalar)."""
    v = np.asarray(values, np.float64)
    if v.ndim == 0:
        v = v.reshape(1)
    axis = axis % v.ndim
    if v.shape[axis] == 1 and scales.size != 1:
        shape = list(v.shape)
        shape[axis] = scales.size
        v = np.broadcast_to(v, shape)
    shape = [1] * v.ndim
    shape[axis] = scales.size
    s = scales.reshape(shape)
    return (v / s if divide else v * s).astype(np.float32)


def _set_values(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray, copy: bool) -> None:
    """Give ``node``'s constant input new values: in place when only ``node`` reads it, else a copy."""
    constant = node.inputs[index]
    if copy or _readers_outside(constant, [node]) or is_graph_output(graph, constant):
        node.inputs[index] = gs.Constant(unique_name(graph, f"{constant.name}_smooth"), values)
    else:
        constant.values = values


def _check_scales(scales: np.ndarray, channels: int) -> np.ndarray:
    s = np.asarray(scales, np.float64).reshape(-1)
    if s.size != channels or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"scales must be {channels} finite positive values, got shape {np.shape(scales)}")
    return s


def _scale_consumers(plan_weights: list[tuple[gs.Constant, int]], s: np.ndarray) -> None:
    for weight, axis in plan_weights:
        weight.values = _per_channel(weight.values, s, axis, divide=False)


def _clone_chain(graph: gs.Graph, plan: FoldPlan) -> dict[int, gs.Node]:
    """Duplicate the producer and the Reshape/Transpose chain; the consumers read the copy."""
    copies: dict[int, gs.Node] = {}
    previous_out: gs.Tensor | None = None
    for node in plan.nodes:
        out = node.outputs[0]
        new_out = gs.Variable(unique_name(graph, f"{out.name}_smooth"), dtype=out.dtype, shape=out.shape)
        inputs = list(node.inputs)
        if previous_out is not None:
            inputs[0] = previous_out
        copy = gs.Node(node.op, unique_name(graph, f"{node.name or node.op}_smooth"), dict(node.attrs), inputs, [new_out],
                       domain=node.domain)
        graph.nodes.append(copy)
        copies[id(node)] = copy
        previous_out = new_out
    for consumer in plan.consumers:
        consumer.inputs[0] = previous_out
    return copies


def apply_fold(graph: gs.Graph, plan: FoldPlan, scales: np.ndarray) -> None:
    """Carry out a ``FoldPlan``: ``X`` becomes ``X / scales`` and the consumers' weight rows ``· scales``."""
    s = _check_scales(scales, plan.channels)
    copies = _clone_chain(graph, plan) if plan.clone else {}
    for edit in plan.producer_edits:
        node = copies.get(id(edit.node), edit.node)
        values = _per_channel(node.inputs[edit.index].values, s, edit.axis, divide=True)
        _set_values(graph, node, edit.index, values, copy=plan.clone)
    _scale_consumers(plan.consumer_edits, s)


def fold_input_scales(
    graph: gs.Graph,
    tensor: gs.Variable,
    consumers: list[gs.Node],
    scales: np.ndarray,
    *,
    clone_producer: bool = False,
    shapes: dict | None = None,
) -> str | None:
    """Divide ``tensor`` per last-axis channel by ``scales`` (folded into its producer) and multiply
    the consumers' weight rows by them; None on success, else the one-word reason (nothing changed).

    ``clone_producer``: when other nodes read the producer's output, duplicate a LayerNormalization
    or Mul producer for the consumers instead of refusing. ``shapes``: ``{name: dims}`` for tensors
    whose shape the graph does not carry (used to check that a Reshape keeps the channels).
    """
    plan = plan_fold(graph, tensor, consumers, clone_producer=clone_producer, shapes=shapes)
    if isinstance(plan, str):
        return plan
    apply_fold(graph, plan, scales)
    return None


def insert_input_scale(graph: gs.Graph, tensor: gs.Tensor, consumers: list[gs.Node], scales: np.ndarray) -> str | None:
    """``Mul(tensor, 1/scales)`` inserted before ``consumers`` (other readers keep ``tensor``) and the
    consumers' weight rows multiplied by ``scales``; None on success, else the reason."""
    weights = consumer_weights(graph, tensor, consumers)
    if isinstance(weights, str):
        return weights
    s = _check_scales(scales, int(weights[0][0].shape[weights[0][1]]))
    inverse = gs.Constant(unique_name(graph, f"{tensor.name}_inv_scale"), (1.0 / s).astype(np.float32))
    scaled = gs.Variable(unique_name(graph, f"{tensor.name}_scaled"), dtype=tensor.dtype, shape=tensor.shape)
    graph.nodes.append(gs.Node("Mul", unique_name(graph, f"{tensor.name}_input_scale"), {}, [tensor, inverse], [scaled]))
    for consumer in consumers:
        consumer.inputs[0] = scaled
    _scale_consumers(weights, s)
    return None
