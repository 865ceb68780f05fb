"""What layout-nchw would move: labels, regions, and the cost model that accepts them.

Every Transpose labels its output; a node with a handler whose inputs are labeled is *flipped*
(it would run on the untransposed tensors) and labels its outputs. Connected labels form a region
(union-find); a region is accepted when rewriting it lowers the number of Transposes (or keeps it,
when the pass lowers it elsewhere), after dead-end branches that would only add Transposes are
un-flipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from passes.graph_utils import UnionFind, is_default_domain, unique_name
from passes.layout.handlers import HANDLERS, Plan
from passes.layout.perms import Perm, channel_first_perm, compose, invert, is_identity, transposed_shape
from passes.layout.transposes import LayoutGraph
from passes.match import producer
from passes.skips import Skips


@dataclass
class _Label:
    pre: gs.Tensor  # the untransposed tensor
    perm: Perm
    comp: int  # union-find key


@dataclass
class _Analysis:
    """Labels of every tensor, the nodes that would run untransposed, and the accepted regions."""

    labels: dict[int, _Label] = field(default_factory=dict)  # id(tensor) -> label
    tensors: dict[int, gs.Tensor] = field(default_factory=dict)  # id(tensor) -> tensor, for labels
    aliases: dict[int, tuple[gs.Tensor, int]] = field(default_factory=dict)  # Transpose output == pre
    plans: dict[int, tuple[gs.Node, Plan]] = field(default_factory=dict)  # flipped nodes, topo order
    transposes: dict[int, gs.Node] = field(default_factory=dict)  # label-producing Transposes
    uf: UnionFind = field(default_factory=UnionFind)
    accepted: set[int] = field(default_factory=set)
    rejected: int = 0
    gain: int = 0  # Transposes the accepted regions remove
    before: dict[int, int] = field(default_factory=dict)  # id(Transpose) -> 1 unless added by io=nchw
    skips: Skips = field(default_factory=Skips)  # nodes a Transpose could not move through, by reason


class Analyzer:
    """Analyzes a ``LayoutGraph``: labels, flips, regions and which of them to accept."""

    def __init__(self, layout: LayoutGraph):
        self.layout = layout

    def analyze(self) -> _Analysis:
        a = _Analysis()
        for node in self.layout.graph.nodes:
            if self.layout.is_transpose(node):
                self._label_transpose(a, node)
                continue
            perms = [a.labels[id(t)].perm if id(t) in a.labels else None for t in node.inputs]
            if not any(p is not None for p in perms):
                continue
            handler = HANDLERS.get(node.op)
            if handler is None or not is_default_domain(node) or _has_subgraph(node):
                a.skips.add("no_handler")
                continue
            plan = handler(node, perms, self.layout.site)
            if isinstance(plan, str):
                a.skips.add(plan)
                continue
            if any(p is not None and i not in plan.pre_inputs for i, p in enumerate(perms)):
                a.skips.add("transposed_parameter")
                continue
            self._flip(a, node, plan, perms)
        self._prune(a)
        self._decide(a)
        return a

    def _label_transpose(self, a: _Analysis, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        perm = self.layout.perm_of(node)
        a.transposes[id(node)] = node
        if id(x) in a.labels:
            label = a.labels[id(x)]
            perm = compose(label.perm, perm)
            pre, key = label.pre, label.comp
        else:
            pre, key = x, id(y)
            if id(x) in a.aliases:
                key = a.aliases[id(x)][1]
        a.uf.union(key, id(y))
        if is_identity(perm):
            a.aliases[id(y)] = (pre, key)
        else:
            a.labels[id(y)] = _Label(pre, perm, key)
            a.tensors[id(y)] = y
        if id(node) not in self.layout.virtual:
            a.before[id(node)] = 1

    def _flip(self, a: _Analysis, node: gs.Node, plan: Plan, perms: list) -> None:
        keys = [a.labels[id(node.inputs[i])].comp for i in plan.pre_inputs if perms[i] is not None]
        for k in keys[1:]:
            a.uf.union(keys[0], k)
        for o, perm in zip(node.outputs, plan.out_perms):
            if perm is None or not o.name:
                continue
            pre = gs.Variable(unique_name(self.layout.graph, f"{o.name}_{_suffix(perm)}"), dtype=o.dtype,
                              shape=transposed_shape(o.shape, invert(perm)))
            a.labels[id(o)] = _Label(pre, perm, keys[0])
            a.tensors[id(o)] = o
        a.plans[id(node)] = (node, plan)

    # -- cost model --------------------------------------------------------------------------
    def convertible_output(self, a: _Analysis, o: gs.Tensor) -> bool:
        """io=nchw: a channel-last graph output that may become channel-first (no Transpose)."""
        label = a.labels[id(o)]
        return self.layout.io == "nchw" and len(label.perm) >= 3 and invert(label.perm) == channel_first_perm(len(label.perm))

    def needs_transpose(self, a: _Analysis, o: gs.Tensor) -> bool:
        """A labeled tensor needs a real Transpose when something reads it in its own layout."""
        for consumer in o.outputs:
            if id(consumer) not in a.plans and id(consumer) not in a.transposes:
                return True
        return id(o) in self.layout.outputs and not self.convertible_output(a, o)

    def _prune(self, a: _Analysis) -> None:
        """Un-flip dead-end branches that would only add Transposes (a labeled tensor sinking into
        a graph output or an op with no handler while its source Transpose stays for others)."""
        changed = True
        while changed:
            changed = False
            for key in reversed(list(a.plans)):
                if key not in a.plans:
                    continue
                group = self._dead_end_group(a, a.plans[key][0])
                if group:
                    for node in group:
                        self._unflip(a, node)
                    changed = True

    def _labeled_outputs(self, a: _Analysis, node: gs.Node) -> list[gs.Tensor]:
        return [o for o in node.outputs if id(o) in a.labels]

    def _dead_end_group(self, a: _Analysis, leaf: gs.Node) -> list[gs.Node]:
        group: dict[int, gs.Node] = {}
        frontier = [leaf]
        while frontier:
            for node in frontier:
                group[id(node)] = node
            if self._unflip_gain(a, group) > 0:
                return list(group.values())
            parents = []
            for node in frontier:
                for t in node.inputs:
                    parent = producer(t) if id(t) in a.labels else None
                    if parent is None or id(parent) not in a.plans or id(parent) in group:
                        continue
                    owned = all(
                        id(c) in group or (id(c) not in a.plans and id(c) not in a.transposes)
                        for o in self._labeled_outputs(a, parent) for c in o.outputs
                    )
                    if owned and all(id(p) != id(parent) for p in parents):
                        parents.append(parent)
            frontier = parents
        return []

    def _unflip_gain(self, a: _Analysis, group: dict[int, gs.Node]) -> int:
        """Transposes saved by un-flipping ``group`` (whose outputs are read by no other flip)."""
        outs = {id(o): o for n in group.values() for o in self._labeled_outputs(a, n)}
        for o in outs.values():
            if any(id(c) in a.transposes or (id(c) in a.plans and id(c) not in group) for c in o.outputs):
                return 0  # not a dead end
        gain = sum(1 for o in outs.values() if self.needs_transpose(a, o))
        ins = {id(t): t for n in group.values() for t in n.inputs if id(t) in a.labels and id(t) not in outs}
        for t in ins.values():
            if not self.needs_transpose(a, t):
                gain -= 1  # un-flipped readers would need it materialized
        return gain

    def _unflip(self, a: _Analysis, node: gs.Node) -> None:
        del a.plans[id(node)]
        for o in node.outputs:
            a.labels.pop(id(o), None)
            a.tensors.pop(id(o), None)

    def _region(self, a: _Analysis, node: gs.Node) -> int:
        """The region (union-find root) of a flipped node or a label-producing Transpose."""
        if node.op == "Transpose" and id(node) in a.transposes:
            out = node.outputs[0]
            label = a.labels.get(id(out))
            return a.uf.find(label.comp if label is not None else a.aliases[id(out)][1])
        node, plan = a.plans[id(node)]
        first = next(i for i in plan.pre_inputs if id(node.inputs[i]) in a.labels)
        return a.uf.find(a.labels[id(node.inputs[first])].comp)

    def _decide(self, a: _Analysis) -> None:
        """Accept each region (connected labels) that lowers its Transpose count. Regions that tie
        are accepted too when the pass lowers the count elsewhere, so Transposes sink to the model
        boundary -- but never to change the model's own inputs."""
        after: dict[int, int] = {}
        before: dict[int, int] = {}
        flips = {self._region(a, node) for node, _ in a.plans.values()}
        virtual = {self._region(a, v) for v, *_ in self.layout.virtual.values()}
        for key, o in a.tensors.items():
            root = a.uf.find(a.labels[key].comp)
            after[root] = after.get(root, 0) + int(self.needs_transpose(a, o))
        for key, node in a.transposes.items():
            root = self._region(a, node)
            before[root] = before.get(root, 0) + a.before.get(key, 0)
        roots = set(before) | set(after)
        better = {r for r in roots if after.get(r, 0) < before.get(r, 0)}
        ties = {r for r in flips - virtual if after.get(r, 0) == before.get(r, 0)} if better else set()
        a.accepted = better | ties
        a.rejected = len(flips - a.accepted)
        a.gain = sum(before.get(r, 0) - after.get(r, 0) for r in a.accepted)

    def accepted(self, a: _Analysis, node: gs.Node) -> bool:
        return self._region(a, node) in a.accepted

    def failed_inputs(self, a: _Analysis) -> list[int]:
        """io=nchw: inputs whose channel-first form would still need a Transpose."""
        return [
            key for key, (v, *_rest) in self.layout.virtual.items()
            if not self.accepted(a, v) or self.needs_transpose(a, v.outputs[0])
        ]


def _suffix(perm: Perm) -> str:
    return "nchw" if invert(perm) == channel_first_perm(len(perm)) and len(perm) >= 3 else "untransposed"


def _has_subgraph(node: gs.Node) -> bool:
    for value in node.attrs.values():
        if isinstance(value, gs.Graph) or (isinstance(value, list) and value and isinstance(value[0], gs.Graph)):
            return True
    return False

