"""The Transposes layout-nchw works with: which nodes are Transposes, one Transpose per (tensor,
perm), and with io=nchw a *virtual* Transpose after each channel-last input, which makes the input
channel-first if the rewrite lets it disappear."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from passes.graph_utils import detach, is_default_domain, unique_name
from passes.layout.handlers import _Site
from passes.layout.perms import Perm, channel_first_perm, invert, transposed_shape


class LayoutGraph:
    """The main graph one run of the pass works on: its Transposes, and with io=nchw the virtual
    Transposes that stand for channel-first model inputs."""

    def __init__(self, graph: gs.Graph, io: str):
        self.graph = graph
        self.io = io
        self.site = _Site(opset=int(graph.opset or 0))
        self.outputs = {id(t) for t in graph.outputs}
        self.virtual: dict[int, tuple[gs.Node, gs.Tensor, gs.Tensor, int]] = {}  # id(V) -> (V, new, old, index)

    # -- graph queries ---------------------------------------------------------------------
    @staticmethod
    def perm_of(node: gs.Node) -> Perm | None:
        perm = node.attrs.get("perm")
        if perm is not None:
            return tuple(int(a) for a in perm)
        shape = node.inputs[0].shape if node.inputs else None
        return tuple(reversed(range(len(shape)))) if shape is not None else None

    def is_transpose(self, node: gs.Node) -> bool:
        return (
            node.op == "Transpose"
            and is_default_domain(node)
            and len(node.inputs) == 1
            and len(node.outputs) == 1
            and self.perm_of(node) is not None
        )

    def count_transposes(self) -> int:
        return sum(1 for n in self.graph.nodes if n.op == "Transpose")

    # -- pre-step: one Transpose per (tensor, perm) ----------------------------------------
    def merge_duplicates(self) -> int:
        """Transposes of the same tensor with the same perm become one."""
        groups: dict[tuple[int, Perm], list[gs.Node]] = {}
        for node in self.graph.nodes:
            if self.is_transpose(node):
                groups.setdefault((id(node.inputs[0]), self.perm_of(node)), []).append(node)
        merged = 0
        for nodes in groups.values():
            if len(nodes) < 2:
                continue
            nodes.sort(key=lambda n: id(n.outputs[0]) not in self.outputs)  # keep an output's name
            keep = nodes[0]
            for dup in nodes[1:]:
                y = dup.outputs[0]
                if id(y) in self.outputs:
                    continue
                for consumer in list(y.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is y:
                            consumer.inputs[i] = keep.outputs[0]
                detach(dup)
                merged += 1
        if merged:
            self.graph.nodes = [n for n in self.graph.nodes if n.inputs or n.outputs]
            self.graph.toposort()
        return merged

    # -- io=nchw: the model's own inputs become channel-first --------------------------------
    def add_virtual_inputs(self) -> None:
        for index, x in enumerate(list(self.graph.inputs)):
            if not isinstance(x, gs.Variable) or x.shape is None or len(x.shape) < 3 or not x.outputs:
                continue
            if x.dtype is None or id(x) in self.outputs:
                continue
            cf = channel_first_perm(len(x.shape))
            new = gs.Variable(x.name, dtype=x.dtype, shape=transposed_shape(x.shape, cf))
            x.name = unique_name(self.graph, f"{new.name}_channel_last")
            v = gs.Node("Transpose", name=unique_name(self.graph, f"{new.name}_to_channel_last"),
                        attrs={"perm": list(invert(cf))}, inputs=[new], outputs=[x])
            self.graph.inputs[index] = new
            self.graph.nodes.insert(0, v)
            self.virtual[id(v)] = (v, new, x, index)

    def drop_virtual_input(self, key: int) -> None:
        v, new, old, index = self.virtual.pop(key)
        detach(v)
        self.graph.nodes = [n for n in self.graph.nodes if n is not v]
        name = new.name
        new.name = unique_name(self.graph, f"{name}_unused")
        old.name = name
        self.graph.inputs[index] = old


