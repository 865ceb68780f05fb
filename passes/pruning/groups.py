"""Channel groups: the channels that must be removed together, and what blocks them.

``ChannelAnalysis`` walks the graph once; the per-op handlers (``layers``, ``ops``) propagate
channel maps and record the edits pruning would make (``edits``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from passes.graph_utils import (
    UnionFind,
    constant_values,
    evaluate_constant_expression,
    infer_tensor_types,
    is_constant_expression,
    is_default_domain,
    is_graph_output,
)
from passes.pruning.common import LAYER_OPS, _label
from passes.pruning.edits import Edit, _edit_params
from passes.pruning.layers import track_layer
from passes.pruning.maps import ChannelMap, _Blocked, _Source, _Use
from passes.pruning.ops import HANDLERS


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


class ChannelAnalysis:
    """Channel groups of a graph and everything pruning them touches (see ``find_channel_groups``).

    Walks the main graph in topological order, giving each layer output a *source* and each
    activation a ``ChannelMap`` (which source channels lie where along its channel axis). Ops that
    keep channels apart (activations, BN, pooling, elementwise ops with per-channel constants,
    depthwise convs, Concat, Flatten) propagate maps and record the constants to slice; elementwise
    ops between two tracked tensors union their sources; anything else blocks the sources reaching
    it. With ``track_constants``, it also computes which channels are constant for every input
    (``only_zero`` pruning).

    The per-op work is done by handlers that receive this analysis: ``layers.track_layer`` for
    Conv/ConvTranspose/Gemm/MatMul and ``ops.HANDLERS`` for everything else; ``edits`` applies
    what they recorded.
    """

    def __init__(self, graph: gs.Graph, types: dict, track_constants: bool = False):
        self.graph = graph
        self.types = types
        self.track = track_constants
        self.sources: list[_Source] = []
        self.uf = UnionFind()
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
        return self.uf.find(i)

    def union(self, a: int, b: int) -> None:
        roots = self.uf.union(a, b)
        if roots is None:
            return
        ra, rb = roots
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
                    track_layer(self, node)
                    continue
                if not carried:
                    continue
                handler = HANDLERS.get(node.op)
                if handler is None:
                    raise _Blocked(f"unsupported_{node.op.lower()}")
                handler(self, node)
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


def find_channel_groups(graph: gs.Graph, input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[ChannelGroup]:
    """The channel groups of ``graph``'s main graph: what must be pruned together, and what blocks it."""
    return ChannelAnalysis(graph, infer_tensor_types(graph, input_shapes)).groups()
