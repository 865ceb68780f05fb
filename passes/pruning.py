"""Pruning: structured channel pruning, 2:4 structured sparsity, unstructured magnitude pruning.

All three are lossy and need no data. ``prune-channels`` makes the model smaller *and* faster on
any runtime (fewer channels, smaller dense kernels); ``sparsify-2to4`` makes eligible layers faster
only on GPUs with sparse tensor cores when the TensorRT engine is built with sparsity enabled;
``prune-magnitude`` only makes weights compressible.

Channel pruning rests on **channel groups** (``find_channel_groups``): the channels that must be
removed together because one layer writes them and others read them::

    Conv_a --> BN --> Relu --+--> Conv_c        group {a, b}: a's and b's output channels,
                             |                   the BN's parameters, Conv_c's and Conv_d's
    Conv_b --> Mul(k) --> Add --> Conv_d         input channels, the per-channel constant k

Residual Adds tie their branches into one group; Concat lays the groups of its inputs side by side
(channel ranges at offsets); depthwise convs pass channels through; Flatten (or a Reshape that
flattens) maps each channel to a block of H*W columns of the next Gemm/MatMul. Anything not
understood blocks the groups that reach it, with a reason.
"""

from __future__ import annotations

import json
import logging
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.errors import InputError
from optimizer.pass_base import Pass, PassContext, PassResult, Tolerance
from optimizer.registry import register_pass
from passes.graph_utils import (
    constant_values,
    count_macs,
    evaluate_constant_expression,
    infer_tensor_types,
    is_constant_expression,
    is_default_domain,
    is_graph_output,
    model_metadata,
    set_model_metadata,
    unique_name,
)
from passes.match import producer

log = logging.getLogger(__name__)

#: Pruning without fine-tuning changes outputs by an amount no fixed bound describes honestly, so
#: verification proves the model is valid and runs with finite outputs of the same names, shapes
#: and types (non-finite values count as mismatches). Accuracy is measured by the evaluation
#: (``--data``) and controlled by the accuracy-budget search.
UNBOUNDED = Tolerance(rtol=float("inf"), atol=float("inf"), min_cosine=None, max_mismatch=0.0)

#: Model metadata keys (``set_model_metadata``).
PRUNING_KEY = "pruning.channels"
SPARSITY_KEY = "sparsity.2to4"

FLOAT_TYPES = (np.float16, np.float32, np.float64)
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# ============================================================================ channel maps
@dataclass(frozen=True)
class Segment:
    """``length`` channels of source ``source``, each spanning ``block`` consecutive positions."""

    source: int
    length: int
    block: int = 1


@dataclass(frozen=True)
class ChannelMap:
    """Which group channels sit where along axis ``axis`` of a tensor (segments in order)."""

    axis: int
    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return sum(s.length * s.block for s in self.segments)

    def moved(self, axis: int, block: int = 1) -> ChannelMap:
        return ChannelMap(axis, tuple(Segment(s.source, s.length, s.block * block) for s in self.segments))


@dataclass
class ChannelGroup:
    """Channels that must be pruned together.

    ``producers``: layers whose output channels these are (Conv, ConvTranspose, Gemm, MatMul);
    ``consumers``: layers whose input channels are sliced with them; ``tensors``: activations
    that carry them; ``params``: constants sliced with them (weights, biases, BatchNorm
    parameters, per-channel constants, depthwise weights, Q/DQ scales); ``blocked``: why the group
    cannot be pruned ("" when it can), ``reasons``: every reason found.
    """

    producers: list[str]
    consumers: list[str]
    tensors: list[str]
    params: list[str]
    channels: int
    blocked: str = ""
    reasons: list[str] = field(default_factory=list)
    root: int = field(default=-1, repr=False, compare=False)


@dataclass
class _Source:
    producer: gs.Node | None
    channels: int
    tensor: str


@dataclass
class _Slice:
    """Slice input ``index`` of ``node`` (a constant or a DequantizeLinear of constants) along ``axis``."""

    node: gs.Node
    index: int
    axis: int
    cmap: ChannelMap


@dataclass
class _Bias:
    """Slice a producer's bias (Conv B along axis 0, Gemm C along its last axis if per column)."""

    node: gs.Node
    cmap: ChannelMap


@dataclass
class _GroupAttr:
    """A depthwise Conv's ``group`` follows its channel count."""

    node: gs.Node
    cmap: ChannelMap


@dataclass
class _ShapeEntry:
    """Entry ``position`` of a 1-D shape constant (Reshape shape, Resize sizes) follows the channels."""

    node: gs.Node
    index: int
    position: int
    cmap: ChannelMap


@dataclass
class _Use:
    """A layer reading group channels: its input ``tensor`` carries ``cmap``."""

    node: gs.Node
    tensor: str
    cmap: ChannelMap
    weight_axis: int
    foldable: bool  # a constant input channel can be folded into its bias exactly


Edit = _Slice | _Bias | _GroupAttr | _ShapeEntry


def _label(node: gs.Node, index: int) -> str:
    return node.name or f"{node.op}_{index}"


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ============================================================================ weights
def _dq_parts(tensor: gs.Tensor):
    """(DequantizeLinear node, int values, scale, zero point or None) for a DQ of constants."""
    dq = producer(tensor)
    if dq is None or dq.op != "DequantizeLinear" or not is_default_domain(dq) or dq.attrs.get("block_size", 0):
        return None
    q = constant_values(dq.inputs[0])
    scale = constant_values(dq.inputs[1]) if len(dq.inputs) > 1 else None
    zp = constant_values(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else None
    if q is None or scale is None or (len(dq.inputs) > 2 and dq.inputs[2].name and zp is None):
        return None
    return dq, q, scale, zp


def weight_values(tensor: gs.Tensor) -> np.ndarray | None:
    """A layer weight as float64: a float constant, or a DequantizeLinear of constants; else None."""
    values = constant_values(tensor)
    if values is not None:
        return values.astype(np.float64) if values.dtype.type in FLOAT_TYPES else None
    parts = _dq_parts(tensor)
    if parts is None:
        return None
    dq, q, scale, zp = parts
    axis = _norm_axis(int(dq.attrs.get("axis", 1)), q.ndim)
    shape = [1] * q.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[axis] = -1
    zp64 = zp.astype(np.float64).reshape(shape) if zp is not None else 0.0
    return (q.astype(np.float64) - zp64) * scale.astype(np.float64).reshape(shape if scale.ndim else ())


def _pruned_name(g: gs.Graph, name: str, suffix: str = "pruned") -> str:
    base = re.sub(rf"(_{suffix})+(_\d+)?$", "", name or "const")
    return unique_name(g, f"{base}_{suffix}")


def _take_input(g: gs.Graph, node: gs.Node, index: int, axis: int, idx: np.ndarray) -> None:
    """Replace input ``index`` of ``node`` by its slice ``idx`` along ``axis`` (new tensors)."""
    tensor = node.inputs[index]
    values = constant_values(tensor)
    parts = _dq_parts(tensor) if values is None else None
    if values is None and parts is None:  # computed from constants (Unsqueeze(c) ...): small, materialize
        values = evaluate_constant_expression(tensor, g.opset)
    if values is not None:
        sliced = np.ascontiguousarray(np.take(values, idx, axis=axis))
        node.inputs[index] = gs.Constant(_pruned_name(g, tensor.name), sliced)
        return
    dq, q, scale, zp = parts
    q_axis = _norm_axis(int(dq.attrs.get("axis", 1)), q.ndim)
    per_axis = scale.ndim == 1 and scale.size > 1 and q_axis == axis
    inputs = [gs.Constant(_pruned_name(g, dq.inputs[0].name), np.ascontiguousarray(np.take(q, idx, axis=axis)))]
    inputs.append(gs.Constant(_pruned_name(g, dq.inputs[1].name), np.ascontiguousarray(scale[idx])) if per_axis else dq.inputs[1])
    if zp is not None:
        inputs.append(gs.Constant(_pruned_name(g, dq.inputs[2].name), np.ascontiguousarray(zp[idx])) if per_axis and zp.ndim == 1 else dq.inputs[2])
    out = gs.Variable(_pruned_name(g, tensor.name), dtype=tensor.dtype)
    g.nodes.append(gs.Node("DequantizeLinear", _pruned_name(g, dq.name or "DequantizeLinear"), dict(dq.attrs), inputs, [out]))
    node.inputs[index] = out


# ============================================================================ analysis
_UNARY = {
    "Relu": lambda v, n: np.maximum(v, 0.0),
    "LeakyRelu": lambda v, n: np.where(v < 0, v * n.attrs.get("alpha", 0.01), v),
    "Sigmoid": lambda v, n: 1.0 / (1.0 + np.exp(-v)),
    "Tanh": lambda v, n: np.tanh(v),
    "HardSigmoid": lambda v, n: np.clip(n.attrs.get("alpha", 0.2) * v + n.attrs.get("beta", 0.5), 0, 1),
    "HardSwish": lambda v, n: v * np.clip(v / 6.0 + 0.5, 0, 1),
    "Elu": lambda v, n: np.where(v < 0, n.attrs.get("alpha", 1.0) * (np.exp(v) - 1), v),
    "Selu": lambda v, n: n.attrs.get("gamma", 1.0507009873554805) * np.where(v < 0, n.attrs.get("alpha", 1.6732632423543772) * (np.exp(v) - 1), v),
    "Softplus": lambda v, n: np.log1p(np.exp(v)),
    "Gelu": lambda v, n: 0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2))) if n.attrs.get("approximate", "none") == "none" else np.full_like(v, np.nan),
    "Erf": lambda v, n: np.vectorize(math.erf)(v),
    "Exp": lambda v, n: np.exp(v),
    "Abs": lambda v, n: np.abs(v),
    "Neg": lambda v, n: -v,
    "Sqrt": lambda v, n: np.sqrt(v),
    "Reciprocal": lambda v, n: 1.0 / v,
    "Floor": lambda v, n: np.floor(v),
    "Ceil": lambda v, n: np.ceil(v),
    "Sign": lambda v, n: np.sign(v),
    "Identity": lambda v, n: v,
    "Dropout": lambda v, n: v,
    "Clip": None,  # min/max are inputs (opset >= 11) or attributes
    "Cast": None,
    "Mish": None,
    "Softsign": None,
    "Log": None,
    "Round": None,
    "Sin": None,
    "Cos": None,
    "Celu": None,
    "ThresholdedRelu": None,
}
_ELEMENTWISE = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
    "Pow": lambda a, b: np.power(a, b),
    "Max": np.maximum,
    "Min": np.minimum,
    "Sum": lambda a, b: a + b,
    "Mean": None,
    "PRelu": lambda a, b: np.where(a < 0, a * b, a),
}
_POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
_REDUCES = (
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2",
    "ReduceProd", "ReduceLogSum", "ReduceLogSumExp",
)


class _Blocked(Exception):
    """Raised by handlers: the channels reaching this node cannot be pruned, for ``reason``."""


class ChannelAnalysis:
    """Channel groups of a graph and everything pruning them touches (see ``find_channel_groups``).

    Walks the main graph in topological order, giving each layer output a *source* and each
    activation a ``ChannelMap`` (which source channels lie where along its channel axis). Ops that
    keep channels apart (activations, BN, pooling, elementwise ops with per-channel constants,
    depthwise convs, Concat, Flatten) propagate maps and record the constants to slice; elementwise
    ops between two tracked tensors union their sources; anything else blocks the sources reaching
    it. With ``track_constants``, it also computes which channels are constant for every input
    (``only_zero`` pruning).
    """

    def __init__(self, graph: gs.Graph, types: dict, track_constants: bool = False):
        self.graph = graph
        self.types = types
        self.track = track_constants
        self.sources: list[_Source] = []
        self.parent: list[int] = []
        self.reasons: dict[int, list[str]] = {}
        self.carry: dict[str, ChannelMap] = {}
        self.const: dict[str, np.ndarray] = {}
        self.edits: list[Edit] = []
        self.uses: list[_Use] = []
        self.labels: dict[int, str] = {}
        self._evaluated: dict[str, np.ndarray | None] = {}
        self._walk()

    # -- union-find ------------------------------------------------------------------------
    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        merged = self.reasons.pop(ra, []) + [r for r in self.reasons.pop(rb, []) if r not in self.reasons.get(ra, [])]
        if merged:
            self.reasons[ra] = list(dict.fromkeys(merged))

    def block_source(self, source: int, reason: str) -> None:
        root = self.find(source)
        reasons = self.reasons.setdefault(root, [])
        if reason not in reasons:
            reasons.append(reason)

    def block(self, cmap: ChannelMap | None, reason: str) -> None:
        if cmap is not None:
            for s in cmap.segments:
                self.block_source(s.source, reason)

    def new_source(self, node: gs.Node | None, channels: int, tensor: str, blocked: str = "") -> int:
        self.sources.append(_Source(node, channels, tensor))
        self.parent.append(len(self.parent))
        sid = len(self.sources) - 1
        if blocked:
            self.block_source(sid, blocked)
        return sid

    def constant(self, tensor: gs.Tensor) -> np.ndarray | None:
        """A constant's values, also when the model computes it from constants (Unsqueeze(c) ...)."""
        values = constant_values(tensor)
        if values is None and tensor.name and is_constant_expression(tensor):
            if tensor.name not in self._evaluated:
                self._evaluated[tensor.name] = evaluate_constant_expression(tensor, self.graph.opset)
            values = self._evaluated[tensor.name]
        return values

    # -- shapes ----------------------------------------------------------------------------
    def shape(self, tensor: gs.Tensor) -> tuple[int | None, ...] | None:
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        known = self.types.get(tensor.name, (None, None))[0]
        if known is None and tensor.shape is not None:
            known = tuple(d if isinstance(d, int) and d >= 0 else None for d in tensor.shape)
        return known

    def rank(self, tensor: gs.Tensor) -> int:
        s = self.shape(tensor)
        if s is None:
            raise _Blocked("rank_unknown")
        return len(s)

    def dim(self, tensor: gs.Tensor, axis: int) -> int | None:
        s = self.shape(tensor)
        return s[axis] if s is not None and 0 <= axis < len(s) else None

    def set_out(self, tensor: gs.Tensor, cmap: ChannelMap, const: np.ndarray | None = None) -> None:
        self.carry[tensor.name] = cmap
        if self.track:
            self.const[tensor.name] = const if const is not None else np.full(cmap.size, np.nan)

    def const_of(self, tensor: gs.Tensor | str, size: int) -> np.ndarray:
        """Per-position constant values of a tracked tensor (NaN where not constant)."""
        vec = self.const.get(tensor if isinstance(tensor, str) else tensor.name)
        return vec if vec is not None and vec.shape == (size,) else np.full(size, np.nan)

    # -- walk ------------------------------------------------------------------------------
    def _walk(self) -> None:
        graph = self.graph
        graph.toposort()
        main = {id(n) for n in graph.nodes}
        for i, node in enumerate(graph.nodes):
            self.labels[id(node)] = _label(node, i)
        for node in graph.nodes:
            carried = [self.carry[t.name] for t in node.inputs if t.name in self.carry]
            try:
                if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
                    raise _Blocked("subgraph")
                if not is_default_domain(node):
                    raise _Blocked(f"unsupported_{node.op.lower()}")
                if node.op in LAYER_OPS:
                    self._layer(node)
                    continue
                if not carried:
                    continue
                handler = self._handler(node.op)
                if handler is None:
                    raise _Blocked(f"unsupported_{node.op.lower()}")
                handler(node)
            except _Blocked as blocked:
                for cmap in carried:
                    self.block(cmap, str(blocked))
                for out in node.outputs:  # what the node wrote is not tracked
                    self.carry.pop(out.name, None)
        tensors = graph.tensors()
        for name, cmap in self.carry.items():
            tensor = tensors.get(name)
            if tensor is None:
                continue
            if is_graph_output(graph, tensor):
                self.block(cmap, "graph_output")
            if any(id(c) not in main for c in tensor.outputs):
                self.block(cmap, "subgraph")

    def _handler(self, op: str):
        if op in _UNARY:
            return self._unary
        if op in _ELEMENTWISE:
            return self._elementwise
        if op in _POOLS:
            return self._pool
        if op in _REDUCES:
            return self._reduce
        return {
            "BatchNormalization": self._batchnorm,
            "InstanceNormalization": self._instancenorm,
            "Concat": self._concat,
            "Flatten": self._flatten,
            "Reshape": self._reshape,
            "Squeeze": self._squeeze,
            "Unsqueeze": self._unsqueeze,
            "Slice": self._slice,
            "Split": self._split,
            "Pad": self._pad,
            "Resize": self._resize,
            "Upsample": self._resize,
            "Softmax": self._softmax,
            "LogSoftmax": self._softmax,
            "Hardmax": self._softmax,
            "LayerNormalization": self._layernorm,
            "QuantizeLinear": self._qdq,
            "DequantizeLinear": self._qdq,
        }.get(op)

    def _only_first_input_carried(self, node: gs.Node) -> ChannelMap:
        if any(t.name in self.carry for t in node.inputs[1:]):
            raise _Blocked("channels_used_as_parameter")
        cmap = self.carry.get(node.inputs[0].name)
        if cmap is None:
            raise _Blocked("channels_used_as_parameter")
        return cmap

    # -- layers ----------------------------------------------------------------------------
    def _layer(self, node: gs.Node) -> None:
        x = node.inputs[0] if node.inputs else None
        xm = self.carry.get(x.name) if x is not None else None
        out = node.outputs[0] if node.outputs else None
        for t in node.inputs[1:]:
            if t.name in self.carry:
                self.block(self.carry[t.name], "channels_used_as_weight")
        if out is None or len(node.inputs) < 2:
            self.block(xm, "unsupported_layer")
            return
        w_t = node.inputs[1]
        w = weight_values(w_t)
        op = node.op
        group = int(node.attrs.get("group", 1)) if op in ("Conv", "ConvTranspose") else 1
        if op == "Conv" and group > 1:
            self._grouped_conv(node, xm, w, group)
            return
        # -- input side: this layer consumes the channels of x
        if xm is not None:
            try:
                self._consumer(node, x, xm, w, group)
            except _Blocked as blocked:
                self.block(xm, str(blocked))
        # -- output side: this layer produces a new group
        self._producer(node, out, w, group)

    def _consumer(self, node: gs.Node, x: gs.Tensor, xm: ChannelMap, w: np.ndarray | None, group: int) -> None:
        op = node.op
        if w is None:
            raise _Blocked("consumer_weight_not_constant")
        if op == "ConvTranspose" and group != 1:
            raise _Blocked("grouped_conv")
        if op in ("Conv", "ConvTranspose"):
            if xm.axis != 1:
                raise _Blocked("axis_mismatch")
            w_axis = 1 if op == "Conv" else 0
            pads = node.attrs.get("pads", [0])
            foldable = op == "Conv" and not any(pads) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
        elif op == "Gemm":
            if node.attrs.get("transA", 0):
                raise _Blocked("gemm_trans_a")
            if xm.axis != 1:
                raise _Blocked("axis_mismatch")
            w_axis = 1 if node.attrs.get("transB", 0) else 0
            foldable = w.ndim == 2 and (len(node.inputs) < 3 or not node.inputs[2].name or constant_values(node.inputs[2]) is not None)
        else:  # MatMul: x @ W with a constant 2-D W
            if w.ndim != 2:
                raise _Blocked("matmul_weight_not_2d")
            if xm.axis != self.rank(x) - 1:
                raise _Blocked("axis_mismatch")
            w_axis, foldable = 0, _bias_add(self.graph, node, w.shape[1]) is not None
        if w.shape[w_axis] != xm.size:
            raise _Blocked("shape_mismatch")
        self.uses.append(_Use(node, x.name, xm, w_axis, foldable))
        self.edits.append(_Slice(node, 1, w_axis, xm))

    def _producer(self, node: gs.Node, out: gs.Tensor, w: np.ndarray | None, group: int) -> None:
        op = node.op
        reason = ""
        if w is None:
            if op == "MatMul" and not is_constant_expression(node.inputs[1]):
                return  # activations times activations (attention scores): no channel group
            reason, w_axis, channels = "weight_not_constant", 0, None
        else:
            if op in ("Gemm", "MatMul") and w.ndim != 2:
                return
            w_axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}.get(op, 0 if node.attrs.get("transB", 0) else 1)
            channels = w.shape[w_axis] * (group if op == "ConvTranspose" else 1)
            if op == "ConvTranspose" and group != 1:
                reason = "grouped_conv"
        shape = self.shape(out)
        axis = None if shape is None else (len(shape) - 1 if op == "MatMul" else 1)
        if channels is None and axis is not None:
            channels = self.dim(out, axis)
        if axis is None or not channels:
            # no map to propagate; the layer is still reported as a blocked group
            self.new_source(node, int(channels or 0), out.name, reason or "rank_unknown")
            return
        out_dim = self.dim(out, axis)
        if out_dim is not None and out_dim != channels:
            reason = reason or "shape_mismatch"
        if not reason and len(node.inputs) > 2 and node.inputs[2].name:
            bias = constant_values(node.inputs[2])
            if bias is None:
                reason = "bias_not_constant"
            elif op == "Gemm" and bias.ndim >= 1 and bias.shape[-1] not in (1, channels):
                reason = "shape_mismatch"
        sid = self.new_source(node, int(channels), out.name, reason)
        cmap = ChannelMap(axis, (Segment(sid, int(channels)),))
        const = self._producer_const(node, w, w_axis, int(channels)) if self.track and not reason else None
        self.set_out(out, cmap, const)
        if not reason:
            self.edits.append(_Slice(node, 1, w_axis, cmap))
            if op != "MatMul":  # also without a bias: folding may add one before slicing
                self.edits.append(_Bias(node, cmap))

    def _producer_const(self, node: gs.Node, w: np.ndarray, w_axis: int, channels: int) -> np.ndarray:
        """Output channels whose weights are all zero are their bias everywhere (0 without one);
        the others are not constant (NaN)."""
        zero = ~np.any(np.moveaxis(w, w_axis, 0).reshape(channels, -1) != 0, axis=1)
        value = np.zeros(channels)
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = constant_values(node.inputs[2]).astype(np.float64)
            if node.op == "Gemm":  # beta * C, constant only if C is the same on every row
                bias = bias.reshape((1, -1) if bias.ndim < 2 else bias.shape) * float(node.attrs.get("beta", 1.0))
                rows = np.broadcast_to(bias, (bias.shape[0], channels))
                zero &= np.all(rows == rows[:1], axis=0)
                value = rows[0].copy()
            else:
                value = bias.reshape(-1)
        return np.where(zero, value, np.nan)

    def _grouped_conv(self, node: gs.Node, xm: ChannelMap | None, w: np.ndarray | None, group: int) -> None:
        out = node.outputs[0]
        depthwise = w is not None and w.ndim >= 3 and w.shape[1] == 1 and w.shape[0] == group
        if not depthwise:
            reason = "weight_not_constant" if w is None else (
                "depthwise_multiplier" if w.shape[1] == 1 else "grouped_conv"
            )
            self.block(xm, reason)
            channels = w.shape[0] if w is not None else self.dim(out, 1)
            self.new_source(node, int(channels or 0), out.name, reason)
            return
        # depthwise: channel c in -> channel c out; its weights and bias are per-channel params
        if xm is None:
            # fed by something untracked: the depthwise output is not a group of its own
            return
        if xm.axis != 1 or xm.size != group:
            self.block(xm, "axis_mismatch" if xm.axis != 1 else "shape_mismatch")
            return
        has_bias = len(node.inputs) > 2 and node.inputs[2].name
        bias = constant_values(node.inputs[2]) if has_bias else None
        if has_bias and bias is None:
            self.block(xm, "params_not_constant")
            return
        self.edits.append(_Slice(node, 1, 0, xm))
        if has_bias:
            self.edits.append(_Slice(node, 2, 0, xm))
        self.edits.append(_GroupAttr(node, xm))
        const = None
        if self.track:
            v = self.const_of(node.inputs[0], xm.size)
            b = bias.astype(np.float64).reshape(-1) if bias is not None else np.zeros(xm.size)
            wsum = w.reshape(group, -1).sum(axis=1)
            pads = node.attrs.get("pads", [0])
            exact = not any(pads) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
            const = np.where((v == 0) | exact, v * wsum + b, np.nan)
            const[np.isnan(v)] = np.nan
        self.set_out(out, xm, const)

    # -- per-channel ops ----------------------------------------------------------------------
    def _unary(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            raise _Blocked("dropout_mask")
        const = None
        if self.track:
            v = self.const_of(node.inputs[0], cmap.size)
            fn = _UNARY.get(node.op)
            with np.errstate(all="ignore"):
                if node.op == "Clip":
                    lo = node.attrs.get("min", -np.inf)
                    hi = node.attrs.get("max", np.inf)
                    if len(node.inputs) > 1 and node.inputs[1].name:
                        lo_v = constant_values(node.inputs[1])
                        lo = float(lo_v) if lo_v is not None and lo_v.size == 1 else np.nan
                    if len(node.inputs) > 2 and node.inputs[2].name:
                        hi_v = constant_values(node.inputs[2])
                        hi = float(hi_v) if hi_v is not None and hi_v.size == 1 else np.nan
                    const = np.clip(v, lo, hi) if not (np.isnan(lo) or np.isnan(hi)) else np.full_like(v, np.nan)
                elif node.op == "Cast":
                    to = node.outputs[0].dtype
                    const = v if to is not None and np.dtype(to).type in FLOAT_TYPES else np.full_like(v, np.nan)
                elif fn is not None:
                    const = fn(v, node)
        for out in node.outputs[:1]:
            self.set_out(out, cmap, const)

    def _elementwise(self, node: gs.Node) -> None:
        out = node.outputs[0]
        out_rank = self.rank(out)
        axes = set()
        for t in node.inputs:
            if t.name in self.carry:
                axes.add(self.carry[t.name].axis + out_rank - self.rank(t))
        if len(axes) != 1:
            raise _Blocked("axis_mismatch")
        axis = axes.pop()
        out_dim = self.dim(out, axis)
        full: list[ChannelMap] = []
        params: list[tuple[int, int]] = []
        operands: list[tuple[str, object]] = []  # for constant tracking
        for i, t in enumerate(node.inputs):
            if not t.name:
                continue
            r = self.rank(t)
            a = axis - (out_rank - r)
            cmap = self.carry.get(t.name)
            if cmap is not None:
                if cmap.size == 1 and out_dim is not None and out_dim > 1:
                    raise _Blocked("broadcast_channel")
                full.append(cmap)
                operands.append(("carried", t))
                continue
            values = self.constant(t)
            if values is not None:
                d = values.shape[a] if 0 <= a < values.ndim else 1
                if d != 1:
                    params.append((i, a, d))
                operands.append(("const", (values, a)))
                continue
            d = self.dim(t, a) if a >= 0 else 1
            if d != 1:
                raise _Blocked("graph_input_operand" if not t.inputs else "untracked_operand")
            operands.append(("other", None))
        ref = full[0]
        for other in full[1:]:
            self._unify(ref, other)
        if any(d != ref.size for _, _, d in params):
            raise _Blocked("shape_mismatch")
        for i, a, _ in params:
            self.edits.append(_Slice(node, i, a, ref))
        const = None
        if self.track:
            const = self._elementwise_const(node, operands, ref.size)
        self.set_out(out, ChannelMap(axis, ref.segments), const)

    def _elementwise_const(self, node: gs.Node, operands, size: int) -> np.ndarray:
        vectors = []
        for kind, payload in operands:
            if kind == "carried":
                vectors.append(self.const_of(payload, size))
            elif kind == "const":
                values, a = payload
                values = values.astype(np.float64)
                if values.ndim == 0 or a < 0:
                    if values.size != 1:
                        vectors.append(np.full(size, np.nan))
                    else:
                        vectors.append(np.full(size, float(values.reshape(()))))
                    continue
                moved = np.moveaxis(values, a, 0).reshape(values.shape[a], -1)
                if moved.shape[1] != 1:
                    vectors.append(np.full(size, np.nan))  # varies over positions: not constant
                else:
                    vectors.append(np.broadcast_to(moved[:, 0], (size,)).astype(np.float64))
            else:
                vectors.append(np.full(size, np.nan))
        with np.errstate(all="ignore"):
            if node.op == "Mean":
                return np.sum(vectors, axis=0) / len(vectors)
            fn = _ELEMENTWISE[node.op]
            result = vectors[0]
            for v in vectors[1:]:
                result = fn(result, v)
        return np.asarray(result, np.float64)

    def _unify(self, a: ChannelMap, b: ChannelMap) -> None:
        """Tie the channels of two tensors that meet elementwise (residual Add ...)."""
        if [(s.length, s.block) for s in a.segments] != [(s.length, s.block) for s in b.segments]:
            raise _Blocked("misaligned_channels")
        for sa, sb in zip(a.segments, b.segments):
            self.union(sa.source, sb.source)

    def _batchnorm(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        if node.attrs.get("training_mode", 0) or any(o.outputs or is_graph_output(self.graph, o) for o in node.outputs[1:]):
            raise _Blocked("training_mode")
        if cmap.axis != 1:
            raise _Blocked("axis_mismatch")
        params = [self.constant(t) for t in node.inputs[1:5]]
        if len(params) != 4 or any(p is None or p.size != cmap.size for p in params):
            raise _Blocked("params_not_constant")
        for i in range(1, 5):
            self.edits.append(_Slice(node, i, 0, cmap))
        const = None
        if self.track:
            gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
            eps = float(node.attrs.get("epsilon", 1e-5))
            v = self.const_of(node.inputs[0], cmap.size)
            const = (v - mean) / np.sqrt(var + eps) * gamma + beta
        self.set_out(node.outputs[0], cmap, const)

    def _instancenorm(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        if cmap.axis != 1:
            raise _Blocked("axis_mismatch")
        params = [self.constant(t) for t in node.inputs[1:3]]
        if any(p is None or p.size != cmap.size for p in params):
            raise _Blocked("params_not_constant")
        self.edits += [_Slice(node, 1, 0, cmap), _Slice(node, 2, 0, cmap)]
        const = None
        if self.track:  # a constant channel normalizes to exactly its bias
            v = self.const_of(node.inputs[0], cmap.size)
            const = np.where(np.isnan(v), np.nan, params[1].astype(np.float64).reshape(-1))
        self.set_out(node.outputs[0], cmap, const)

    def _pool(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        if cmap.axis != 1:
            raise _Blocked("axis_mismatch")
        if node.op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].outputs:
            raise _Blocked("maxpool_indices")
        const = None
        if self.track:
            v = self.const_of(node.inputs[0], cmap.size)
            exact = node.op in ("MaxPool", "GlobalAveragePool", "GlobalMaxPool") or (
                node.op == "AveragePool" and (not any(node.attrs.get("pads", [0])) or not node.attrs.get("count_include_pad", 0))
                and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
            )
            const = v if exact else np.where(v == 0, 0.0, np.nan)
        self.set_out(node.outputs[0], cmap, const)

    def _axes(self, node: gs.Node, index: int = 1) -> list[int] | None:
        """Axes from the ``axes`` attribute or a constant input; None when absent; raises if unknown."""
        if "axes" in node.attrs:
            return [int(a) for a in node.attrs["axes"]]
        if len(node.inputs) > index and node.inputs[index].name:
            values = constant_values(node.inputs[index])
            if values is None:
                raise _Blocked("axes_not_constant")
            return [int(a) for a in values.reshape(-1)]
        return None

    def _reduce(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        rank = self.rank(node.inputs[0])
        axes = self._axes(node)
        if not axes:
            if node.attrs.get("noop_with_empty_axes", 0):
                axes = []
            else:
                raise _Blocked("reduces_over_channels")
        axes = [_norm_axis(a, rank) for a in axes]
        if cmap.axis in axes:
            raise _Blocked("reduces_over_channels")
        axis = cmap.axis if node.attrs.get("keepdims", 1) else cmap.axis - sum(a < cmap.axis for a in axes)
        const = None
        if self.track:
            v = self.const_of(node.inputs[0], cmap.size)
            if node.op in ("ReduceMean", "ReduceMax", "ReduceMin"):
                const = v
            elif node.op in ("ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2"):
                const = np.where(v == 0, 0.0, np.nan)
        self.set_out(node.outputs[0], cmap.moved(axis), const)

    def _concat(self, node: gs.Node) -> None:
        out = node.outputs[0]
        rank = self.rank(out)
        axis = _norm_axis(int(node.attrs.get("axis", 0)), rank)
        carried = [self.carry.get(t.name) for t in node.inputs]
        if any(m is not None and m.axis != axis for m in carried):
            # concatenation along another axis: the inputs must carry the same channels
            if any(m is None for m in carried) or any(m.axis != carried[0].axis for m in carried):
                raise _Blocked("concat_untracked_operand")
            for m in carried[1:]:
                self._unify(carried[0], m)
            const = None
            if self.track:
                vecs = [self.const_of(t, carried[0].size) for t in node.inputs]
                const = np.where(np.all([v == vecs[0] for v in vecs], axis=0), vecs[0], np.nan)
            self.set_out(out, carried[0], const)
            return
        segments: list[Segment] = []
        consts: list[np.ndarray] = []
        for t, m in zip(node.inputs, carried):
            if m is None:  # an untracked input keeps its channels: a fixed segment of its own
                d = self.dim(t, axis)
                if d is None:
                    raise _Blocked("shape_unknown")
                sid = self.new_source(None, d, t.name, "fixed_channels")
                m = ChannelMap(axis, (Segment(sid, d),))
            segments.extend(m.segments)
            if self.track:
                consts.append(self.const_of(t, m.size))
        cmap = ChannelMap(axis, tuple(segments))
        self.set_out(out, cmap, np.concatenate(consts) if self.track else None)

    def _flatten_like(self, x: gs.Tensor, out: gs.Tensor, cmap: ChannelMap, axis: int) -> None:
        """Channels on ``axis`` followed by dims ``post``: each channel becomes a block of prod(post)."""
        shape = self.shape(x)
        if cmap.axis != axis:
            raise _Blocked("flatten_mixes_channels")
        post = shape[axis + 1:]
        if any(d is None for d in post):
            raise _Blocked("shape_unknown")
        block = int(np.prod(post, dtype=np.int64)) if post else 1
        const = None
        if self.track:
            const = np.repeat(self.const_of(x, cmap.size), block)
        self.set_out(out, cmap.moved(axis, block), const)

    def _flatten(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        rank = self.rank(node.inputs[0])
        axis = _norm_axis(int(node.attrs.get("axis", 1)), rank)
        if axis != cmap.axis or axis == 0:
            raise _Blocked("flatten_mixes_channels")
        self._flatten_like(node.inputs[0], node.outputs[0], cmap, axis)

    def _reshape(self, node: gs.Node) -> None:
        """Only the Flatten case (``[N, C, H, W] -> [N, C*H*W]``) and adding/removing trailing 1s."""
        cmap = self._only_first_input_carried(node)
        x, out = node.inputs[0], node.outputs[0]
        target = constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
        in_shape, out_shape = self.shape(x), self.shape(out)
        if target is None or in_shape is None or out_shape is None or node.attrs.get("allowzero", 0):
            raise _Blocked("unsupported_reshape")
        target = [int(v) for v in target.reshape(-1)]
        a = cmap.axis
        # the dims before the channel axis must be copied (0) or restated exactly
        lead_ok = len(out_shape) > a and len(target) > a and all(
            target[i] == 0 or (in_shape[i] is not None and target[i] == in_shape[i]) for i in range(a)
        )
        if not lead_ok:
            raise _Blocked("unsupported_reshape")
        post = in_shape[a + 1:]
        if any(d is None for d in post):
            raise _Blocked("shape_unknown")
        block = int(np.prod(post, dtype=np.int64)) if post else 1
        entry = target[a]
        if len(target) == a + 1 and out_shape[a] == cmap.size * block:
            # flatten-like: the channel entry is -1, the exact size, or 0 (only when nothing follows)
            if entry == 0 and block != 1:
                raise _Blocked("unsupported_reshape")
            if entry > 0:
                self.edits.append(_ShapeEntry(node, 1, a, cmap.moved(a, block)))
            self._flatten_like(x, out, cmap, a)
            return
        if all(d == 1 for d in post) and out_shape[a] == cmap.size and all(t == 1 for t in target[a + 1:]):
            # [N, C] <-> [N, C, 1, 1]
            if entry > 0:
                self.edits.append(_ShapeEntry(node, 1, a, cmap))
            const = self.const_of(x, cmap.size) if self.track else None
            self.set_out(out, cmap, const)
            return
        raise _Blocked("unsupported_reshape")

    def _squeeze(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        shape = self.shape(node.inputs[0])
        rank = len(shape) if shape is not None else self.rank(node.inputs[0])
        axes = self._axes(node)
        if axes is None:
            if shape is None or any(d is None for d in shape):
                raise _Blocked("shape_unknown")
            axes = [i for i, d in enumerate(shape) if d == 1]
        axes = [_norm_axis(a, rank) for a in axes]
        if cmap.axis in axes:
            raise _Blocked("squeezes_channels")
        const = self.const_of(node.inputs[0], cmap.size) if self.track else None
        self.set_out(node.outputs[0], cmap.moved(cmap.axis - sum(a < cmap.axis for a in axes)), const)

    def _unsqueeze(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        out_rank = self.rank(node.outputs[0])
        axes = self._axes(node)
        if axes is None:
            raise _Blocked("axes_not_constant")
        inserted = sorted(_norm_axis(a, out_rank) for a in axes)
        kept = [i for i in range(out_rank) if i not in inserted]
        const = self.const_of(node.inputs[0], cmap.size) if self.track else None
        self.set_out(node.outputs[0], cmap.moved(kept[cmap.axis]), const)

    def _slice(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        rank = self.rank(node.inputs[0])
        if "starts" in node.attrs:
            axes = node.attrs.get("axes", list(range(len(node.attrs["starts"]))))
        else:
            starts = constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
            if starts is None:
                raise _Blocked("slice_not_constant")
            axes = self._axes(node, 3)
            axes = list(range(starts.size)) if axes is None else axes
        if cmap.axis in [_norm_axis(int(a), rank) for a in axes]:
            raise _Blocked("slices_channels")
        const = self.const_of(node.inputs[0], cmap.size) if self.track else None
        self.set_out(node.outputs[0], cmap, const)

    def _split(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        rank = self.rank(node.inputs[0])
        if _norm_axis(int(node.attrs.get("axis", 0)), rank) == cmap.axis:
            raise _Blocked("splits_channels")
        const = self.const_of(node.inputs[0], cmap.size) if self.track else None
        for out in node.outputs:
            self.set_out(out, cmap, const)

    def _pad(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        rank = self.rank(node.inputs[0])
        if "pads" in node.attrs:
            pads, axes, value = list(node.attrs["pads"]), list(range(rank)), float(node.attrs.get("value", 0.0))
        else:
            pads_v = constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
            if pads_v is None:
                raise _Blocked("pads_not_constant")
            pads = [int(p) for p in pads_v.reshape(-1)]
            axes = self._axes(node, 3) or list(range(rank))
            value = 0.0
            if len(node.inputs) > 2 and node.inputs[2].name:
                v = constant_values(node.inputs[2])
                value = float(v.reshape(-1)[0]) if v is not None and v.size else np.nan
        n = len(axes)
        for i, ax in enumerate(axes):
            if _norm_axis(int(ax), rank) == cmap.axis and (pads[i] or pads[i + n]):
                raise _Blocked("pads_channels")
        const = None
        if self.track:
            v = self.const_of(node.inputs[0], cmap.size)
            mode = node.attrs.get("mode", "constant")
            const = v if mode != "constant" or not any(pads) else np.where(v == value, v, np.nan)
        self.set_out(node.outputs[0], cmap, const)

    def _resize(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        if cmap.axis != 1 or "axes" in node.attrs:
            raise _Blocked("unsupported_resize")
        a = cmap.axis
        if node.op == "Upsample" and "scales" in node.attrs:
            scales, sizes = np.asarray(node.attrs["scales"]), None
        else:
            scale_index = 1 if node.op == "Upsample" or len(node.inputs) == 2 else 2
            scales = constant_values(node.inputs[scale_index]) if len(node.inputs) > scale_index and node.inputs[scale_index].name else None
            sizes = constant_values(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        if scales is not None and scales.size:
            if scales.reshape(-1)[a] != 1:
                raise _Blocked("resizes_channels")
        elif sizes is not None and sizes.size:
            self.edits.append(_ShapeEntry(node, 3, a, cmap))
        else:
            raise _Blocked("unsupported_resize")
        const = None
        if self.track:
            v = self.const_of(node.inputs[0], cmap.size)
            exact = node.attrs.get("mode", "nearest") in ("nearest", "linear") and node.attrs.get(
                "coordinate_transformation_mode", "half_pixel") != "tf_crop_and_resize"
            const = v if exact else np.where(v == 0, 0.0, np.nan)
        self.set_out(node.outputs[0], cmap, const)

    def _softmax(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        rank = self.rank(node.inputs[0])
        if self.graph.opset >= 13:
            axis = _norm_axis(int(node.attrs.get("axis", -1)), rank)
            crosses = axis == cmap.axis
        else:  # older opsets normalize over every dim from `axis` on
            crosses = cmap.axis >= _norm_axis(int(node.attrs.get("axis", 1)), rank)
        if crosses:
            raise _Blocked("reduces_over_channels")
        self.set_out(node.outputs[0], cmap)

    def _layernorm(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        rank = self.rank(node.inputs[0])
        if cmap.axis >= _norm_axis(int(node.attrs.get("axis", -1)), rank):
            raise _Blocked("reduces_over_channels")
        if any(o.outputs for o in node.outputs[1:]):
            raise _Blocked("training_mode")
        self.set_out(node.outputs[0], cmap)

    def _qdq(self, node: gs.Node) -> None:
        cmap = self._only_first_input_carried(node)
        scale = constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
        zp = constant_values(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if scale is None or (len(node.inputs) > 2 and node.inputs[2].name and zp is None) or node.attrs.get("block_size", 0):
            raise _Blocked("qdq_params_not_constant")
        rank = self.rank(node.inputs[0])
        per_axis = scale.ndim == 1 and scale.size > 1
        if per_axis:
            if _norm_axis(int(node.attrs.get("axis", 1)), rank) != cmap.axis or scale.size != cmap.size:
                raise _Blocked("qdq_axis")
            self.edits.append(_Slice(node, 1, 0, cmap))
            if zp is not None and zp.ndim == 1:
                self.edits.append(_Slice(node, 2, 0, cmap))
        const = None
        if self.track:
            v = self.const_of(node.inputs[0], cmap.size)
            s = np.broadcast_to(scale.astype(np.float64).reshape(-1), (cmap.size,)) if per_axis else float(scale.reshape(-1)[0])
            z = 0.0 if zp is None else (np.broadcast_to(zp.astype(np.float64).reshape(-1), (cmap.size,)) if per_axis else float(zp.reshape(-1)[0]))
            with np.errstate(all="ignore"):
                if node.op == "QuantizeLinear":
                    info = np.iinfo(zp.dtype if zp is not None else np.uint8) if (zp is None or zp.dtype.kind in "iu") else None
                    const = np.clip(np.round(v / s) + z, info.min, info.max) if info is not None else np.full_like(v, np.nan)
                else:
                    const = (v - z) * s
        self.set_out(node.outputs[0], cmap, const)

    # -- results ---------------------------------------------------------------------------
    def roots(self) -> list[int]:
        return sorted({self.find(i) for i in range(len(self.sources))})

    def members(self, root: int) -> list[int]:
        return [i for i in range(len(self.sources)) if self.find(i) == root]

    def groups(self) -> list[ChannelGroup]:
        """One ``ChannelGroup`` per group with at least one producer layer, in graph order."""
        by_root: dict[int, ChannelGroup] = {}
        for root in self.roots():
            producers = [self.labels[id(self.sources[i].producer)] for i in self.members(root) if self.sources[i].producer is not None]
            if not producers:
                continue
            reasons = list(self.reasons.get(root, []))
            by_root[root] = ChannelGroup(producers, [], [], [], self.sources[root].channels,
                                         reasons[0] if reasons else "", reasons, root)
        for name, cmap in self.carry.items():
            for root in {self.find(s.source) for s in cmap.segments}:
                if root in by_root:
                    by_root[root].tensors.append(name)
        for use in self.uses:
            for root in {self.find(s.source) for s in use.cmap.segments}:
                if root in by_root and self.labels[id(use.node)] not in by_root[root].consumers:
                    by_root[root].consumers.append(self.labels[id(use.node)])
        for edit in self.edits:
            names = _edit_params(edit)
            for root in {self.find(s.source) for s in edit.cmap.segments}:
                if root in by_root:
                    by_root[root].params.extend(n for n in names if n not in by_root[root].params)
        return list(by_root.values())

    # -- pruning ---------------------------------------------------------------------------
    def positions(self, cmap: ChannelMap, kept: dict[int, np.ndarray]) -> np.ndarray:
        """Indices along ``cmap``'s axis that survive when each root keeps ``kept[root]``."""
        parts, offset = [], 0
        for s in cmap.segments:
            k = kept.get(self.find(s.source))
            k = np.arange(s.length) if k is None else k
            parts.append(offset + (k[:, None] * s.block + np.arange(s.block)[None, :]).reshape(-1))
            offset += s.length * s.block
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def touches(self, cmap: ChannelMap, kept: dict[int, np.ndarray]) -> bool:
        return any(self.find(s.source) in kept for s in cmap.segments)

    def removable(self, root: int) -> np.ndarray:
        """Channels of ``root`` whose removal is exact: constant at every consumer, and either zero
        there or read by a layer that can fold the constant into its bias (pads=0 Conv, Gemm)."""
        ok = np.ones(self.sources[root].channels, bool)
        for use in self.uses:
            vec = self.const_of(use.tensor, use.cmap.size)
            offset = 0
            for s in use.cmap.segments:
                span = s.length * s.block
                if self.find(s.source) == root:
                    seg = vec[offset:offset + span].reshape(s.length, s.block)
                    known = ~np.isnan(seg).any(axis=1)
                    zero = known & ~np.any(seg != 0, axis=1)
                    ok &= zero | (known & use.foldable)
                offset += span
        return ok

    def fold_constants(self, g: gs.Graph, kept: dict[int, np.ndarray]) -> int:
        """Add the contribution of removed constant channels to the consumers' biases (exact)."""
        vectors = {u.tensor: self.const_of(u.tensor, u.cmap.size) for u in self.uses}
        return self.fold_into_bias(g, kept, vectors, [u for u in self.uses if u.foldable])

    def fold_into_bias(self, g: gs.Graph, kept: dict[int, np.ndarray], vectors: dict[str, np.ndarray], uses: list[_Use]) -> int:
        """For every use, add ``value * weights`` of the removed input positions to the layer's bias,
        where ``vectors[use.tensor]`` holds one value per position (NaN or 0: nothing to add).
        Returns the number of layers changed."""
        changed = 0
        for use in uses:
            vec = vectors.get(use.tensor)
            if vec is None or not self.touches(use.cmap, kept) or use.node.op not in ("Conv", "Gemm", "MatMul"):
                continue
            removed = np.setdiff1d(np.arange(use.cmap.size), self.positions(use.cmap, kept))
            removed = removed[np.nan_to_num(vec[removed], nan=0.0) != 0]
            if removed.size == 0:
                continue
            node = use.node
            rows = np.moveaxis(weight_values(node.inputs[1]), use.weight_axis, 0)[removed]
            if node.op == "Conv":  # a constant input channel adds value * sum(kernel) to every output
                delta = np.einsum("r,ro->o", vec[removed], rows.reshape(removed.size, rows.shape[1], -1).sum(axis=2))
            else:  # Gemm/MatMul: rows are [removed, N]
                alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
                delta = alpha * (vec[removed] @ rows.reshape(removed.size, -1))
            if node.op == "MatMul":
                add = _bias_add(g, node, delta.size)
                if add is None:
                    continue
                reader, index = add
                bias = constant_values(reader.inputs[index])
                new = np.broadcast_to(bias.astype(np.float64).reshape(-1), delta.shape) + delta
                reader.inputs[index] = gs.Constant(_pruned_name(g, reader.inputs[index].name, "folded"),
                                                   np.ascontiguousarray(new.astype(bias.dtype)))
            else:
                _add_to_bias(g, node, delta)
            changed += 1
        return changed

    def apply(self, g: gs.Graph, kept: dict[int, np.ndarray]) -> None:
        """Slice every constant, attribute and shape entry of the groups in ``kept``."""
        for edit in self.edits:
            if not self.touches(edit.cmap, kept):
                continue
            idx = self.positions(edit.cmap, kept)
            if isinstance(edit, _Slice):
                _take_input(g, edit.node, edit.index, edit.axis, idx)
            elif isinstance(edit, _Bias):
                node, size = edit.node, edit.cmap.size
                if len(node.inputs) < 3 or not node.inputs[2].name:
                    continue
                bias = constant_values(node.inputs[2])
                if node.op == "Gemm":
                    if bias.ndim >= 1 and bias.shape[-1] == size:
                        _take_input(g, node, 2, bias.ndim - 1, idx)
                else:
                    _take_input(g, node, 2, 0, idx)
            elif isinstance(edit, _GroupAttr):
                edit.node.attrs["group"] = int(idx.size)
            elif isinstance(edit, _ShapeEntry):
                values = constant_values(edit.node.inputs[edit.index]).copy()
                values.reshape(-1)[edit.position] = idx.size
                name = edit.node.inputs[edit.index].name
                edit.node.inputs[edit.index] = gs.Constant(_pruned_name(g, name), values)
        tensors = g.tensors()
        for name, cmap in self.carry.items():
            tensor = tensors.get(name)
            if isinstance(tensor, gs.Variable) and self.touches(cmap, kept) and not is_graph_output(g, tensor):
                tensor.shape = None  # stale: export and shape inference recompute it


def _edit_params(edit: Edit) -> list[str]:
    if isinstance(edit, _Slice):
        t = edit.node.inputs[edit.index]
        parts = _dq_parts(t) if not isinstance(t, gs.Constant) and constant_values(t) is None else None
        return [parts[0].inputs[0].name] if parts else [t.name]
    if isinstance(edit, _Bias) and len(edit.node.inputs) > 2 and edit.node.inputs[2].name:
        return [edit.node.inputs[2].name]
    return []


def _bias_add(g: gs.Graph, matmul: gs.Node, columns: int) -> tuple[gs.Node, int] | None:
    """The ``Add(matmul_out, bias)`` right after a MatMul, with a constant [N] (or [1,...,N]) bias:
    (the Add, the bias input index); None when there is none to fold a constant into."""
    out = matmul.outputs[0]
    if len(out.outputs) != 1 or is_graph_output(g, out):
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2 or not is_default_domain(add):
        return None
    index = 1 if add.inputs[0] is out else 0
    bias = constant_values(add.inputs[index])
    if bias is None or bias.dtype.type not in FLOAT_TYPES or bias.size != columns:
        return None
    if bias.ndim and any(d != 1 for d in bias.shape[:-1]):
        return None
    return add, index


def _add_to_bias(g: gs.Graph, node: gs.Node, delta: np.ndarray) -> None:
    """``node``'s output += ``delta`` (per output channel): Conv bias, or Gemm C with beta folded in."""
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    w_dtype = weight_values(node.inputs[1]).dtype
    out_dtype = node.outputs[0].dtype
    dtype = np.dtype(out_dtype) if out_dtype is not None else np.dtype(np.float32)
    if dtype.type not in FLOAT_TYPES:
        dtype = np.dtype(w_dtype) if w_dtype.type in FLOAT_TYPES else np.dtype(np.float32)
    if node.op == "Gemm":
        beta = float(node.attrs.get("beta", 1.0))
        c = constant_values(node.inputs[2]).astype(np.float64) * beta if has_bias else np.zeros(())
        new = c + delta if c.ndim >= 1 else np.broadcast_to(c, delta.shape) + delta
        node.attrs["beta"] = 1.0
    else:
        c = constant_values(node.inputs[2]).astype(np.float64).reshape(-1) if has_bias else np.zeros(delta.shape)
        new = c + delta
        dtype = np.dtype(constant_values(node.inputs[2]).dtype) if has_bias else dtype
    name = _pruned_name(g, node.inputs[2].name if has_bias else f"{node.name or node.op}_bias", "folded")
    const = gs.Constant(name, np.ascontiguousarray(new.astype(dtype)))
    if has_bias:
        node.inputs[2] = const
    else:
        while len(node.inputs) < 2:
            node.inputs.append(gs.Variable(""))
        if len(node.inputs) == 2:
            node.inputs.append(const)
        else:
            node.inputs[2] = const


def find_channel_groups(graph: gs.Graph, input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[ChannelGroup]:
    """The channel groups of ``graph``'s main graph: what must be pruned together, and what blocks it."""
    return ChannelAnalysis(graph, infer_tensor_types(graph, input_shapes)).groups()


# ============================================================================ bookkeeping
def _live_params(graph: gs.Graph) -> int:
    """Elements of the constants that live nodes read (initializers and Constant nodes); nodes a
    rewrite left unused (cleaned up later) do not count."""
    live: set[int] = set()
    stack = [t for t in graph.outputs]
    while stack:
        tensor = stack.pop()
        for node in tensor.inputs:
            if id(node) not in live:
                live.add(id(node))
                stack.extend(node.inputs)
    total, seen = 0, set()
    for node in graph.nodes:
        if id(node) not in live:
            continue
        for t in node.inputs:
            if isinstance(t, gs.Constant) and t.name not in seen:
                seen.add(t.name)
                total += int(np.prod(t.shape, dtype=np.int64))
        value = node.attrs.get("value") if node.op == "Constant" else None
        if isinstance(value, gs.Constant):
            total += int(np.prod(value.shape, dtype=np.int64))
    return total


def _shapes(types: dict) -> dict[str, tuple]:
    return {name: shape for name, (shape, _) in types.items() if shape is not None}


_RECORD_LINE = re.compile(rf"^{re.escape(PRUNING_KEY)}: (\{{.*\}})$", re.MULTILINE)


def read_pruning_record(graph: gs.Graph) -> dict[str, int]:
    """Original channel counts of the groups already pruned, by producer layer name."""
    text = model_metadata(graph).get(PRUNING_KEY)
    if text is None:
        match = _RECORD_LINE.search(graph.doc_string or "")
        text = match.group(1) if match else None
    try:
        record = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {str(k): int(v) for k, v in record.items()} if isinstance(record, dict) else {}


def _write_pruning_record(graph: gs.Graph, record: dict[str, int]) -> None:
    # Model metadata is the record's home; the graph's doc_string keeps a copy because it survives
    # every export, so a second run knows what was pruned (and from how many channels).
    text = json.dumps(dict(sorted(record.items())), sort_keys=True)
    set_model_metadata(graph, PRUNING_KEY, text)
    doc = _RECORD_LINE.sub("", graph.doc_string or "").strip()
    graph.doc_string = (doc + "\n" if doc else "") + f"{PRUNING_KEY}: {text}"


def _parse_ratios(items: list[str]) -> dict[str, float]:
    ratios = {}
    for item in items:
        name, sep, value = str(item).rpartition(":")
        if not sep or not name:
            raise ValueError(f"ratios entries are 'layer:ratio' (e.g. conv1:0.5); got {item!r}")
        try:
            r = float(value)
        except ValueError:
            raise ValueError(f"ratio of '{name}' must be a number in [0, 1); got {value!r}") from None
        if not 0.0 <= r < 1.0:
            raise ValueError(f"ratio of '{name}' must be in [0, 1); got {r}")
        ratios[name] = r
    return ratios


def kept_count(original: int, ratio: float, multiple: int, min_channels: int) -> int:
    """Channels to keep out of ``original``: remove ``ratio`` of them, round the kept count up to a
    multiple of ``multiple``, never below ``min_channels`` and never all of them."""
    keep = original - math.floor(original * ratio + 1e-9)
    keep = int(math.ceil(keep / multiple) * multiple)
    return max(1, min(original, max(keep, min_channels)))


# ============================================================================ prune-channels
@register_pass
@dataclass
class PruneChannels(Pass):
    """Structured channel pruning: remove whole output channels of Conv/ConvTranspose/Gemm/MatMul
    layers together with everything that reads or transforms them::

        x -> Conv_a(64) -> BN -> Relu -> Conv_b(in 64)       becomes
        x -> Conv_a(48) -> BN(48) -> Relu -> Conv_b(in 48)   (weights, bias, BN params sliced)

    Channels are pruned per *group* (see ``find_channel_groups``): a residual ``Add``/``Sum`` ties
    all its branches into one group; ``Concat`` maps each input's channels to a range of the output;
    depthwise convs are pruned along with their group (channel c in -> c out, ``group`` updated);
    per-channel ``Mul``/``Add``/BN/InstanceNorm/PRelu constants and per-channel Q/DQ scales are
    sliced; ``Flatten`` (or a Reshape that flattens) before a Gemm/MatMul maps a channel to its H*W
    rows; MatMul layers on [batch, tokens, features] prune features (the last axis). Blocked, and
    counted as ``blocked_<reason>``: graph outputs, Transpose, other Reshapes, ops that mix
    channels (Softmax/LayerNorm/reductions over them, LRN), grouped (non-depthwise) convs, weights
    that are not constants (or DequantizeLinear of constants), subgraphs, unknown ops.

    Options:

    - ``ratio`` (0.3): fraction of each group's channels to remove. ``multiple`` (8): the kept
      count is rounded *up* to a multiple, so TensorRT's kernels stay efficient; ``min_channels``
      (8): never keep fewer (and never remove all).
    - ``ratios``: per-group overrides ``[layer:ratio, ...]`` keyed by producer layer name, e.g.
      ``prune-channels(ratios=[conv1:0.5,conv3:0.25])``; a group with several producers takes the
      largest ratio named. Names that match no prunable group are listed in ``ratios_unmatched``.
    - ``scope``: layer (every group loses ``ratio``) | global (importances normalized per group and
      ranked across groups: ``ratio`` of all channels go, taken where they matter least).
    - ``importance``: l1 | l2 (norm of each output channel's weights) | bn-gamma (|gamma| of a
      BatchNormalization right after the layer; run it before ``fuse-conv-bn``) | activation
      (std of the channel on the calibration data x the norm of the weights reading it: the error
      its removal leaves once its mean is compensated). Without the needed BN or data it falls
      back to l1 (counted in ``importance_fallback_l1``).
    - ``compensate`` (true): with calibration data (``--calib``), the mean of every removed channel
      at each Conv/Gemm (or MatMul followed by ``Add(bias)``) that reads it is folded into that
      layer's bias, so the layer keeps its average output. Without calibration data nothing is compensated (details say so); the
      evaluation data is never used for this.
    - ``only_zero``: remove only channels whose removal is exact. A channel is constant when its
      producers' weights are all zero (it is then its bias); BN, activations, per-channel
      constants and depthwise convs map constants to constants. It may go when, at every layer
      reading it, the constant is 0, or that layer can absorb it into its bias exactly (a Conv
      without padding, a Gemm, a MatMul followed by ``Add(bias)``). A zero channel after a BN with beta != 0 feeding a padded conv
      stays. ``multiple``/``min_channels`` still apply: set them to 1 to remove every such channel.

    Ratios are relative to a group's channel count before any pruning: the model records what was
    pruned (metadata ``pruning.channels``, mirrored in the graph doc string), so running the pass
    again with the same options changes nothing, and a larger ratio prunes further. With
    ``scope=global`` a group is ranked once; later global runs leave it alone.

    Accuracy: pruning without fine-tuning changes the outputs by an amount that depends on the
    model and no fixed bound describes, so verification checks validity only (the model loads,
    runs, keeps its outputs' names, shapes and types). Measure accuracy with ``--data`` and choose
    ratios with the accuracy-budget search. Stats: ``params_before/after``, ``macs_before/after``
    (Conv/Gemm/MatMul, per sample), ``groups``, ``groups_pruned``, ``groups_blocked``,
    ``blocked_<reason>``, ``channels_removed``; details: every pruned group (producers, consumers,
    channels, kept, removed, original) and every blocked group with its reasons.
    """

    name = "prune-channels"
    lossy = True
    uses_calibration = True
    tolerance = UNBOUNDED

    importance: Literal["l1", "l2", "bn-gamma", "activation"] = "l1"
    ratio: float = 0.3
    scope: Literal["layer", "global"] = "layer"
    multiple: int = 8
    min_channels: int = 8
    ratios: list[str] = field(default_factory=list)
    only_zero: bool = False
    compensate: bool = True

    def __post_init__(self):
        if self.importance not in ("l1", "l2", "bn-gamma", "activation"):
            raise ValueError(f"importance must be l1, l2, bn-gamma or activation; got {self.importance!r}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be layer or global; got {self.scope!r}")
        if not 0.0 <= float(self.ratio) < 1.0:
            raise ValueError(f"ratio must be in [0, 1); got {self.ratio}")
        if int(self.multiple) < 1 or int(self.min_channels) < 1:
            raise ValueError("multiple and min_channels must be >= 1")
        _parse_ratios(self.ratios)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        types = infer_tensor_types(graph, ctx.input_shapes)
        analysis = ChannelAnalysis(graph, types, track_constants=self.only_zero)
        groups = analysis.groups()
        stats: dict[str, int | float] = {"groups": len(groups)}
        blocked = [grp for grp in groups if grp.blocked]
        for grp in blocked:
            key = f"blocked_{grp.blocked}"
            stats[key] = stats.get(key, 0) + 1
        stats["groups_blocked"] = len(blocked)
        details: dict = {
            "blocked": [{"producers": g.producers, "channels": g.channels, "reason": g.blocked, "reasons": g.reasons} for g in blocked],
        }
        record = read_pruning_record(graph)
        activations = None
        if not self.only_zero and (self.compensate or self.importance == "activation"):
            if ctx.calibration is not None:
                try:
                    activations = channel_statistics(graph, sorted({u.tensor for u in analysis.uses}), analysis, ctx)
                    details["calibration_samples"] = activations.pop("__samples__", 0)
                except InputError as exc:  # data that does not fit, a model ONNX Runtime cannot run
                    log.warning("prune-channels: no activation statistics (%s); pruning without them", exc)
                    details["calibration"] = f"unusable: {exc}"
            else:
                details["calibration"] = "none: no compensation, activation importance falls back to l1"
        plan, info = self._plan(analysis, [g for g in groups if not g.blocked], record, stats, details, activations)
        stats["groups_pruned"] = len(plan)
        if not plan:
            stats["channels_removed"] = 0
            return PassResult(False, stats=stats, details=details)
        params_before = _live_params(graph)
        macs_before = count_macs(graph, _shapes(types))
        sparse_before = _sparse_consumers(analysis, plan)
        if self.only_zero:
            stats["layers_folded"] = analysis.fold_constants(graph, plan)
        elif self.compensate and activations is not None:
            means = {name: mean for name, (mean, _) in activations.items()}
            stats["layers_compensated"] = analysis.fold_into_bias(graph, plan, means, analysis.uses)
        analysis.apply(graph, plan)
        broken = sorted(label for label, use in sparse_before.items()
                        if not is_2to4(weight_values(use.node.inputs[1]), use.weight_axis))
        if broken:
            # slicing input channels shifts the blocks of 4: prune first, then sparsify-2to4
            stats["layers_2to4_broken"] = len(broken)
            details["layers_2to4_broken"] = broken
            log.warning("prune-channels broke the 2:4 sparsity of %s; run sparsify-2to4 after prune-channels", ", ".join(broken))
        for grp in groups:
            # global scope decides every group it ranked once; layer scope only records what it pruned
            decided = self.scope == "global" and not grp.blocked and not self.only_zero
            if grp.root in plan or decided:
                for p in grp.producers:
                    record.setdefault(p, grp.channels)
        _write_pruning_record(graph, record)
        after = infer_tensor_types(graph, ctx.input_shapes)
        stats.update(
            channels_removed=sum(i["removed"] for i in info),
            params_before=params_before,
            params_after=_live_params(graph),
            macs_before=macs_before,
            macs_after=count_macs(graph, _shapes(after)),
        )
        details["groups"] = info
        return PassResult(True, stats=stats, details=details)

    # -- choosing channels ---------------------------------------------------------------------
    def _plan(self, analysis: ChannelAnalysis, groups: list[ChannelGroup], record: dict[str, int], stats, details,
              activations: dict | None = None):
        ratios = _parse_ratios(self.ratios)
        named = {p for g in groups for p in g.producers}
        unmatched = sorted(set(ratios) - named)
        if unmatched:
            details["ratios_unmatched"] = unmatched
            stats["ratios_unmatched"] = len(unmatched)
            log.warning("prune-channels: no prunable group is produced by %s", ", ".join(unmatched))
        plan: dict[int, np.ndarray] = {}
        info: list[dict] = []
        fallbacks = 0
        scores: dict[int, np.ndarray] = {}
        for grp in groups:
            if not self.only_zero:
                scores[grp.root], fell_back = self._importance(analysis, grp, activations)
                fallbacks += fell_back
        if self.importance in ("bn-gamma", "activation"):
            stats["importance_fallback_l1"] = fallbacks
        targets: dict[int, int] = {}
        pool: list[ChannelGroup] = []
        for grp in groups:
            original = max([record.get(p, 0) for p in grp.producers] + [grp.channels])
            explicit = [ratios[p] for p in grp.producers if p in ratios]
            if self.only_zero:
                removable = analysis.removable(grp.root)
                stats["removable_channels"] = stats.get("removable_channels", 0) + int(removable.sum())
                keep = kept_count(grp.channels, removable.sum() / grp.channels, self.multiple, self.min_channels)
                keep = max(keep, int((~removable).sum()))
                if keep < grp.channels:
                    # keep every channel that is not removable, then as few removable ones as rounding needs
                    order = np.lexsort((np.arange(grp.channels), removable))
                    targets[grp.root] = keep
                    scores[grp.root] = np.where(removable, 0.0, 1.0)
                    plan[grp.root] = np.sort(order[:keep])
                continue
            if explicit:
                targets[grp.root] = kept_count(original, max(explicit), self.multiple, self.min_channels)
            elif self.scope == "global":
                if any(p in record for p in grp.producers):
                    stats["skipped_already_pruned"] = stats.get("skipped_already_pruned", 0) + 1
                    continue
                pool.append(grp)
            else:
                targets[grp.root] = kept_count(original, self.ratio, self.multiple, self.min_channels)
        if pool:
            targets.update(self._global_targets(pool, scores))
        for grp in groups:
            keep = targets.get(grp.root)
            if keep is None or keep >= grp.channels:
                continue
            if grp.root not in plan:
                order = np.lexsort((np.arange(grp.channels), -scores[grp.root]))
                plan[grp.root] = np.sort(order[:keep])
            info.append({
                "producers": grp.producers,
                "consumers": grp.consumers,
                "channels": grp.channels,
                "kept": int(plan[grp.root].size),
                "removed": int(grp.channels - plan[grp.root].size),
                "original": max([record.get(p, 0) for p in grp.producers] + [grp.channels]),
            })
        return plan, info

    def _global_targets(self, pool: list[ChannelGroup], scores: dict[int, np.ndarray]) -> dict[int, int]:
        entries = []
        for grp in pool:
            s = scores[grp.root]
            mean = float(s.mean()) if s.size else 0.0
            normalized = s / mean if mean > 0 else np.zeros_like(s)
            entries.extend((float(v), grp.root, c) for c, v in enumerate(normalized))
        entries.sort()
        budget = math.floor(len(entries) * self.ratio + 1e-9)
        removed: dict[int, int] = {}
        for _, root, _ in entries[:budget]:
            removed[root] = removed.get(root, 0) + 1
        targets = {}
        for grp in pool:
            n = removed.get(grp.root, 0)
            targets[grp.root] = kept_count(grp.channels, n / grp.channels, self.multiple, self.min_channels) if n else grp.channels
        return targets

    def _importance(self, analysis: ChannelAnalysis, grp: ChannelGroup, activations: dict | None) -> tuple[np.ndarray, int]:
        """Per-channel importance of a group: each producer's scores normalized by their mean, summed."""
        total = np.zeros(grp.channels)
        if self.importance == "activation" and activations is not None:
            scores = _activation_importance(analysis, grp.root, activations)
            if scores is not None:
                return scores, 0
        fallbacks = 0
        for i in analysis.members(grp.root):
            src = analysis.sources[i]
            node = src.producer
            if node is None:
                continue
            scores = None
            if self.importance == "bn-gamma":
                scores = _bn_gamma(analysis.graph, node)
                fallbacks += scores is None
            elif self.importance == "activation":
                fallbacks += 1
            if scores is None:
                w = weight_values(node.inputs[1])
                axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}.get(node.op, 0 if node.attrs.get("transB", 0) else 1)
                rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
                scores = np.abs(rows).sum(axis=1) if self.importance != "l2" else np.sqrt((rows * rows).sum(axis=1))
            mean = float(np.mean(scores)) if scores.size else 0.0
            total += scores / mean if mean > 0 else scores
        return total, fallbacks


def _sparse_consumers(analysis: ChannelAnalysis, plan: dict[int, np.ndarray]) -> dict[str, _Use]:
    """Layers whose input channels are about to be sliced and whose weights are 2:4 sparse now."""
    found = {}
    for use in analysis.uses:
        if analysis.touches(use.cmap, plan) and use.node.op in ("Conv", "Gemm", "MatMul"):
            w = weight_values(use.node.inputs[1])
            if w is not None and w.shape[use.weight_axis] % 4 == 0 and is_2to4(w, use.weight_axis):
                found[analysis.labels[id(use.node)]] = use
    return found


def _activation_importance(analysis: ChannelAnalysis, root: int, activations: dict) -> np.ndarray | None:
    """sum over consumers of std(channel at the consumer input) * ||consumer weights of the channel||:
    the error a removed channel leaves once its mean is compensated. None without measurements."""
    total = np.zeros(analysis.sources[root].channels)
    found = False
    for use in analysis.uses:
        if use.tensor not in activations:
            continue
        std = activations[use.tensor][1]
        rows = np.moveaxis(weight_values(use.node.inputs[1]), use.weight_axis, 0)
        norms = np.sqrt((rows.reshape(rows.shape[0], -1) ** 2).sum(axis=1))
        offset = 0
        for s in use.cmap.segments:
            span = s.length * s.block
            if analysis.find(s.source) == root:
                total += (std[offset:offset + span] * norms[offset:offset + span]).reshape(s.length, s.block).sum(axis=1)
                found = True
            offset += span
    return total if found else None


def channel_statistics(graph: gs.Graph, tensors: list[str], analysis: ChannelAnalysis, ctx: PassContext,
                       max_samples: int = 512) -> dict:
    """Per-position mean and std (along each tensor's channel axis) on the calibration data.

    Returns ``{tensor: (mean, std)}`` plus ``"__samples__"``. Tensors that cannot be measured are left out.
    """
    import onnx

    from calibration.collect import augment_model
    from calibration.sources import open_source
    from optimizer.manager import graph_to_model
    from optimizer.runtime import OrtRunner, input_specs

    template = onnx.ModelProto()
    template.ir_version = 10
    model = graph_to_model(graph.copy(), template)
    specs = input_specs(model)
    source = open_source(ctx.calibration, specs, shapes=ctx.input_shapes)
    runner = OrtRunner(augment_model(model, tensors))
    runner.output_names = list(tensors)
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    samples = 0
    for feeds in source.batches(specs, 32):
        outputs = runner.run(feeds)
        for name, value in outputs.items():
            axis = analysis.carry[name].axis
            if value.ndim <= axis or value.dtype.kind != "f":
                continue
            v = np.moveaxis(value.astype(np.float64), axis, 0).reshape(value.shape[axis], -1)
            sums[name] = sums.get(name, 0.0) + v.sum(axis=1)
            squares[name] = squares.get(name, 0.0) + (v * v).sum(axis=1)
            counts[name] = counts.get(name, 0) + v.shape[1]
        samples += next((int(a.shape[0]) for a in feeds.values() if a.ndim), 1)
        if samples >= max_samples:
            break
    result: dict = {"__samples__": samples}
    for name, total in sums.items():
        mean = total / counts[name]
        std = np.sqrt(np.maximum(squares[name] / counts[name] - mean * mean, 0.0))
        if np.all(np.isfinite(mean)) and np.all(np.isfinite(std)):
            result[name] = (mean, std)
    return result


def _bn_gamma(graph: gs.Graph, layer: gs.Node) -> np.ndarray | None:
    """|gamma| of the BatchNormalization reading ``layer``'s output, if there is one."""
    for reader in layer.outputs[0].outputs:
        if reader.op == "BatchNormalization" and reader.inputs[0] is layer.outputs[0]:
            gamma = constant_values(reader.inputs[1])
            if gamma is not None:
                return np.abs(gamma.astype(np.float64).reshape(-1))
    return None


# ============================================================================ 2:4 sparsity
def _reduction_axis(node: gs.Node, w: np.ndarray) -> int | None:
    """Axis of the weight that the layer sums over (input channels / K)."""
    if node.op == "Conv":
        return 1
    if node.op == "Gemm":
        return 1 if node.attrs.get("transB", 0) else 0
    if node.op == "MatMul" and w.ndim == 2:
        return 0
    return None


def _output_axis(node: gs.Node, w: np.ndarray) -> int:
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1


def sparsify_2to4(w: np.ndarray, axis: int) -> np.ndarray:
    """Keep the 2 largest magnitudes of every 4 consecutive values along ``axis`` (size % 4 == 0)."""
    moved = np.moveaxis(w, axis, -1)
    blocks = moved.reshape(-1, 4)
    order = np.argsort(-np.abs(blocks), axis=1, kind="stable")
    mask = np.zeros(blocks.shape, bool)
    np.put_along_axis(mask, order[:, :2], True, axis=1)
    pruned = np.where(mask, blocks, np.zeros((), w.dtype)).reshape(moved.shape)
    return np.ascontiguousarray(np.moveaxis(pruned, -1, axis))


def is_2to4(w: np.ndarray, axis: int) -> bool:
    """True when every 4 consecutive values along ``axis`` hold at most 2 nonzeros."""
    if w.shape[axis] % 4:
        return False
    blocks = np.moveaxis(w, axis, -1).reshape(-1, 4)
    return bool(np.all(np.count_nonzero(blocks, axis=1) <= 2))


@register_pass
@dataclass
class Sparsify2to4(Pass):
    """2:4 structured sparsity for TensorRT's sparse tensor cores: in every 4 consecutive weights
    along the reduction axis, keep the 2 largest magnitudes and zero the others::

        Conv W[Cout, Cin, kh, kw]: blocks of 4 input channels, for each (Cout, kh, kw)
        Gemm/MatMul B[K, N] (or [N, K] with transB): blocks of 4 along K

    Eligible layers: Conv with ``group=1``, Gemm, and MatMul with a constant 2-D weight, whose
    weight is a float constant, whose reduction size (Cin or K) is a multiple of 4, and whose input
    and output channels are both at least ``min_channels`` (64). The layers made (or found) 2:4
    sparse are listed in the model metadata ``sparsity.2to4`` (a JSON list of node names) and in
    the details, so the engine build can enable sparsity.

    TensorRT uses sparse kernels only when the engine is built with sparsity enabled
    (``BuilderFlag.SPARSE_WEIGHTS``, ``trtexec --sparsity=enable``), on GPUs with sparse tensor cores
    (Ampere and newer), in FP16/INT8 precision, and only for layers where a sparse kernel is faster
    than the dense one: typically large layers (hundreds of channels; small ones gain nothing).
    The model keeps its size (the zeros are stored).

    Accuracy: zeroing half the weights without fine-tuning (e.g. NVIDIA ASP) costs accuracy;
    verification checks validity only. Measure it with ``--data``. Skipped layers are counted as
    ``skipped_<reason>``.
    """

    name = "sparsify-2to4"
    lossy = True
    tolerance = UNBOUNDED

    min_channels: int = 64
    exclude: list[str] = field(default_factory=list)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        skips: dict[str, int] = {}
        marked: list[str] = []
        layers: list[dict] = []
        done: dict[tuple[str, int], gs.Constant] = {}
        changed = 0
        for i, node in enumerate(graph.nodes):
            if node.op not in ("Conv", "Gemm", "MatMul") or not is_default_domain(node) or len(node.inputs) < 2:
                continue
            label = _label(node, i)
            reason = self._check(node, label)
            if reason:
                skips[reason] = skips.get(reason, 0) + 1
                continue
            w_t = node.inputs[1]
            w = constant_values(w_t)
            axis = _reduction_axis(node, w)
            if is_2to4(w, axis):
                new_w = w
            else:
                key = (w_t.name, axis)
                if key not in done:
                    done[key] = gs.Constant(_pruned_name(graph, w_t.name, "sparse24"), sparsify_2to4(w, axis))
                node.inputs[1] = done[key]
                new_w = done[key].values
                changed += 1
            marked.append(label)
            layers.append({"layer": label, "weight": node.inputs[1].name, "shape": list(w.shape), "axis": axis,
                           "zeros": round(float(np.mean(new_w == 0)), 4)})
        if marked:
            set_model_metadata(graph, SPARSITY_KEY, json.dumps(marked))
        stats = {"layers_2to4": len(marked), "layers_sparsified": changed,
                 **{f"skipped_{k}": v for k, v in sorted(skips.items())}}
        return PassResult(changed > 0, stats=stats, details={SPARSITY_KEY: marked, "layers": layers})

    def _check(self, node: gs.Node, label: str) -> str:
        if label in self.exclude:
            return "excluded"
        w = constant_values(node.inputs[1])
        if w is None:
            return "weight_not_constant"
        if w.dtype.type not in FLOAT_TYPES:
            return "weight_not_float"
        if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
            return "grouped_conv"
        axis = _reduction_axis(node, w)
        if axis is None or w.ndim < 2:
            return "weight_not_2d"
        if w.shape[axis] % 4:
            return "reduction_not_multiple_of_4"
        if min(w.shape[axis], w.shape[_output_axis(node, w)]) < self.min_channels:
            return "too_small"
        return ""


# ============================================================================ magnitude pruning
@register_pass
@dataclass
class PruneMagnitude(Pass):
    """Unstructured magnitude pruning: zero the smallest-magnitude weights of Conv, ConvTranspose,
    Gemm and MatMul layers until a fraction ``sparsity`` (0.5) of them is zero::

        W = [0.9, -0.01, 0.3, 0.002]   --sparsity=0.5-->   [0.9, 0, 0.3, 0]

    ``scope`` layer (each weight tensor reaches ``sparsity``) | global (one magnitude threshold for
    all of them, so layers with small weights lose more). Only float constant weights; biases are
    kept. ``exclude`` lists layer names to leave dense.

    What it buys, honestly: the model file has the same size and dense kernels (TensorRT, ONNX
    Runtime) run at the same speed; zeros only pay off when the weights are compressed (zip, a
    sparse storage format) or run by a sparse kernel. The details report each layer's sparsity
    and ``compressed_bytes_before/after`` (zlib size of the pruned weights). For a speed-up on
    TensorRT use ``sparsify-2to4`` or ``prune-channels``. Accuracy: without fine-tuning it drops;
    verification checks validity only, so measure accuracy with ``--data``.
    """

    name = "prune-magnitude"
    lossy = True
    tolerance = UNBOUNDED

    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "layer"
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1); got {self.sparsity}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be layer or global; got {self.scope!r}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        skips: dict[str, int] = {}
        weights: dict[str, tuple[np.ndarray, list[tuple[gs.Node, str]]]] = {}
        for i, node in enumerate(graph.nodes):
            if node.op not in LAYER_OPS or not is_default_domain(node) or len(node.inputs) < 2:
                continue
            label = _label(node, i)
            w = constant_values(node.inputs[1])
            reason = "excluded" if label in self.exclude else "weight_not_constant" if w is None else (
                "weight_not_float" if w.dtype.type not in FLOAT_TYPES else "")
            if reason:
                skips[reason] = skips.get(reason, 0) + 1
                continue
            name = node.inputs[1].name
            weights.setdefault(name, (w, []))[1].append((node, label))
        if not weights:
            return PassResult(False, stats={f"skipped_{k}": v for k, v in sorted(skips.items())})
        masks = self._masks({name: w for name, (w, _) in weights.items()})
        total = sum(w.size for w, _ in weights.values())
        zeros_before = sum(int(np.count_nonzero(w == 0)) for w, _ in weights.values())
        layers, pruned, bytes_before, bytes_after = [], 0, 0, 0
        for name, (w, users) in weights.items():
            mask = masks.get(name)
            new_w = w if mask is None else np.where(mask, np.zeros((), w.dtype), w)
            newly = int(np.count_nonzero(new_w == 0) - np.count_nonzero(w == 0))
            if newly > 0:
                bytes_before += len(zlib.compress(w.tobytes(), 6))
                bytes_after += len(zlib.compress(new_w.tobytes(), 6))
                const = gs.Constant(_pruned_name(graph, name, "sparse"), np.ascontiguousarray(new_w))
                for node, _ in users:
                    node.inputs[1] = const
                pruned += newly
            layers.append({"layers": [label for _, label in users], "weight": name, "elements": int(w.size),
                           "sparsity": round(float(np.mean(new_w == 0)), 4)})
        stats = {
            "layers": sum(len(users) for _, users in weights.values()),
            "weights_pruned": pruned,
            "sparsity_before": round(zeros_before / total, 4),
            "sparsity_after": round((zeros_before + pruned) / total, 4),
            "compressed_bytes_before": bytes_before,
            "compressed_bytes_after": bytes_after,
            **{f"skipped_{k}": v for k, v in sorted(skips.items())},
        }
        return PassResult(pruned > 0, stats=stats, details={"layers": layers})

    def _masks(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Which weights to zero: the smallest magnitudes, only where too few are zero already."""
        masks = {}
        if self.scope == "layer":
            for name, w in weights.items():
                k = math.floor(w.size * self.sparsity + 1e-9)
                if np.count_nonzero(w == 0) >= k or k == 0:
                    continue
                flat = np.abs(w.astype(np.float64)).reshape(-1)
                order = np.argsort(flat, kind="stable")[:k]
                mask = np.zeros(w.size, bool)
                mask[order] = True
                masks[name] = mask.reshape(w.shape)
            return masks
        names = list(weights)
        flat = np.concatenate([np.abs(weights[n].astype(np.float64)).reshape(-1) for n in names])
        k = math.floor(flat.size * self.sparsity + 1e-9)
        if k == 0 or np.count_nonzero(flat == 0) >= k:
            return masks
        chosen = np.zeros(flat.size, bool)
        chosen[np.argsort(flat, kind="stable")[:k]] = True
        offset = 0
        for n in names:
            size = weights[n].size
            masks[n] = chosen[offset:offset + size].reshape(weights[n].shape)
            offset += size
        return masks
