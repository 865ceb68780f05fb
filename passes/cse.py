"""``cse``: common subexpression elimination: identical nodes and identical small constants merge."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.pass_base import register_pass
from passes.graph_utils import (
    QDQ_OPS,
    RANDOM_OPS,
    all_graphs,
    is_default_domain,
    is_graph_output,
    numpy_dtype,
)
from passes.skips import Skips
from passes.simplify_utils import _MAX_ROUNDS, _position, _result


def _rewire(tensor: gs.Tensor, replacement: gs.Tensor) -> None:
    """Every reader of ``tensor`` (subgraph readers included) reads ``replacement`` instead."""
    for consumer in list(tensor.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is tensor:
                consumer.inputs[i] = replacement


class _Unmergeable(Exception):
    """An attribute value that cannot be compared safely (function attribute references)."""


_GRAPH_MARK = ("<graph>",)


def _attr_key(value, graph_mark: bool):
    """A hashable, exact representation of an attribute value."""
    if isinstance(value, gs.Graph):
        if graph_mark:
            return _GRAPH_MARK
        raise _Unmergeable
    if isinstance(value, gs.Constant):
        value = np.asarray(value.values)
    if isinstance(value, np.ndarray):
        return ("tensor", value.dtype.str, value.shape, hashlib.sha256(value.tobytes()).hexdigest())
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_attr_key(v, graph_mark) for v in value))
    if isinstance(value, float):
        return ("float", value.hex())  # exact bits: 0.0 and -0.0 differ, NaN equals NaN
    if isinstance(value, np.generic):
        return ("scalar", value.dtype.str, value.tobytes())
    if isinstance(value, (bool, int, str, bytes)):
        return (type(value).__name__, value)
    if hasattr(value, "SerializeToString"):  # TypeProto and other protobuf-valued attributes
        return (type(value).__name__, value.SerializeToString(deterministic=True))
    raise _Unmergeable  # e.g. gs.Node.AttributeRef inside functions


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Compute each distinct value once: merge identical nodes and identical small constants::

        x -> Shape -> a                       x -> Shape -> a -> Gather
        x -> Shape -> b -> Gather   becomes             \\-> Gather'
             (b's readers read a)

    Two nodes merge when they have the same op and domain, the very same input tensors (in order)
    and identical attributes (tensor attributes compared by dtype, shape and bytes; float
    attributes bit for bit). Nodes are visited in topological order, so merges cascade: after two
    ``Shape`` nodes merge, the ``Gather``s reading them become identical and merge too.
    Constants (initializers) with the same dtype, shape and bytes, up to ``max_constant_bytes``
    each, are deduplicated first (by content hash), so nodes reading equal weights can merge.

    ``QuantizeLinear``/``DequantizeLinear`` nodes merge when they read the very same data tensor
    and their scale and zero point are equal in value (dtype, shape and bytes) -- two quantizers of
    one tensor with the same parameters compute the same integers, so the duplicate pair becomes
    one pair with two readers (as a quantizer emits for a residual branch)::

        x -> Q(s, z) -> DQ(s, z) -> Conv          x -> Q(s, z) -> DQ(s, z) -> Conv
        x -> Q(s', z') -> DQ(s', z') -> Add  becomes                       \\-> Add
             (s' == s, z' == z in value)

    Their constant inputs themselves are left as the quantizer wrote them (not deduplicated with
    equal constants elsewhere: ``skipped_qdq`` counts those).

    Never merged (identical twins are counted): random ops and ``Dropout``, whose calls each
    draw new values (``skipped_random``); nodes in a custom domain, whose semantics
    are unknown (``skipped_custom_domain``); nodes with If/Loop/Scan bodies
    (``skipped_subgraph``); nodes without outputs. Output names never change:
    when both nodes' outputs are graph outputs they stay apart (``skipped_graph_outputs``); when
    one is, that one is kept. Each If/Loop/Scan body is simplified on its own.

    Options: ``max_constant_bytes`` (default 1 MiB).
    """

    name = "cse"
    max_constant_bytes: int = 1 << 20

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts: Counter = Counter()
        skipped = Skips()
        for g in list(all_graphs(graph)):
            self._dedupe_constants(g, counts, skipped)
            for _ in range(_MAX_ROUNDS):
                # A merge that keeps a graph output's name renames a tensor earlier nodes read,
                # so repeat until a round merges nothing (that round's skips are the ones reported).
                skips = Skips()
                merged = self._merge_nodes(g, skips)
                counts["nodes_merged"] += merged
                if not merged:
                    skipped.merge(skips)
                    break
        changed = bool(counts["constants_deduplicated"] or counts["nodes_merged"])
        return _result(counts, changed, skipped)

    def _constant_key(self, tensor: gs.Constant, cache: dict[int, tuple | None]) -> tuple | None:
        key = cache.get(id(tensor), ())
        if key != ():
            return key
        key = None
        dtype = numpy_dtype(tensor.dtype)
        # bfloat16/float8 constants (graphsurgeon keeps their type as an ONNX enum) are left alone.
        if dtype is not None and dtype.kind in "biufc" and not isinstance(tensor.dtype, int):
            nbytes = int(np.prod(tensor.shape, dtype=np.int64)) * dtype.itemsize
            if nbytes <= self.max_constant_bytes:
                values = np.asarray(tensor.values)  # not ascontiguousarray: it turns scalars into [1]
                key = (values.dtype.str, values.shape, hashlib.sha256(values.tobytes()).hexdigest())
        cache[id(tensor)] = key
        return key

    def _dedupe_constants(self, g: gs.Graph, counts: Counter, skips: Skips) -> None:
        interface = {id(t) for t in list(g.inputs) + list(g.outputs)}
        canonical: dict[tuple, gs.Constant] = {}
        qdq_keys: dict[tuple, int] = {}  # content -> the first Q/DQ input tensor with it
        cache: dict[int, tuple | None] = {}
        replaced: set[int] = set()
        for node in g.nodes:
            for i, t in enumerate(node.inputs):
                if not isinstance(t, gs.Constant) or id(t) in interface:
                    continue
                key = self._constant_key(t, cache)
                if key is None:
                    continue
                if node.op in QDQ_OPS:  # leave Q/DQ inputs exactly as the quantizer wrote them
                    first = qdq_keys.setdefault(key, id(t))
                    if first != id(t) or (key in canonical and canonical[key] is not t):
                        skips.add("qdq")
                    continue
                keep = canonical.setdefault(key, t)
                if keep is not t:
                    node.inputs[i] = keep
                    replaced.add(id(t))
        counts["constants_deduplicated"] += len(replaced)

    def _merge_nodes(self, g: gs.Graph, skips: Skips) -> int:
        """One sweep in topological order; returns the number of nodes merged away."""
        merged = 0
        seen: dict[tuple, gs.Node] = {}
        refused: set[tuple] = set()
        cache: dict[int, tuple | None] = {}
        for node in list(g.nodes):
            if not node.outputs:
                continue
            reason = _cse_refusal(node)
            try:
                key = _node_key(node, graph_mark=reason == "subgraph")
                if node.op in QDQ_OPS and not reason:
                    key = self._qdq_key(node, key, cache)
            except _Unmergeable:
                continue
            if reason:
                if key in refused:
                    skips.add(reason)
                refused.add(key)
                continue
            keep = seen.setdefault(key, node)
            if keep is node:
                continue
            if _merge_into(g, keep, node):
                merged += 1
            else:
                skips.add("graph_outputs")
        return merged

    def _qdq_key(self, node: gs.Node, key: tuple, cache: dict[int, tuple | None]) -> tuple:
        """``key`` with a Q/DQ node's scale and zero point (inputs after the data) compared by
        value; the data input stays compared by identity."""
        inputs = list(key[2])
        for i, t in enumerate(node.inputs[1:], start=1):
            if isinstance(t, gs.Constant):
                value = self._constant_key(t, cache)
                if value is not None:
                    inputs[i] = ("value", value)
        return key[:2] + (tuple(inputs),) + key[3:]


def _cse_refusal(node: gs.Node) -> str:
    if not is_default_domain(node):
        return "custom_domain"
    if node.op in RANDOM_OPS or node.op == "Dropout":
        return "random"
    if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
        return "subgraph"
    return ""


def _node_key(node: gs.Node, graph_mark: bool) -> tuple:
    attrs = tuple(sorted((k, _attr_key(v, graph_mark)) for k, v in node.attrs.items()))
    inputs = tuple(id(t) if t.name else None for t in node.inputs)
    outputs = tuple(bool(t.name) for t in node.outputs)
    return (node.op, node.domain or "", inputs, attrs, outputs)


def _merge_into(g: gs.Graph, keep: gs.Node, dup: gs.Node) -> bool:
    """Make ``dup``'s readers read ``keep``'s outputs; False if two graph outputs would merge."""
    pairs = [(a, b) for a, b in zip(keep.outputs, dup.outputs) if a.name and b.name]
    if any(is_graph_output(g, a) and is_graph_output(g, b) for a, b in pairs):
        return False
    dup.outputs.clear()
    dup.inputs.clear()
    for a, b in pairs:
        if is_graph_output(g, b):  # keep the output name: ``keep`` now writes b
            _rewire(a, b)
            keep.outputs[_position(keep.outputs, a)] = b
        else:
            _rewire(b, a)
    return True
