"""BF16 on the CPU: an emulated copy of a model that ONNX Runtime's CPU provider can run.

ONNX Runtime's CPU provider has no bfloat16 kernels for compute ops (MatMul, Add, Softmax, Gemm
... are NOT_IMPLEMENTED); only Cast and data movement run in bf16. ``emulate_bfloat16`` rewrites
a copy of the model so that every other node touching bfloat16 runs in float32 between Casts::

    a(bf16) --\\                      a -- Cast(f32) --\\
               MatMul -- y(bf16)  =>                   MatMul(f32) -- Cast(bf16) -- y(bf16)
    b(bf16) --/                       b -- Cast(f32) --/

That is bf16 storage with float32 math, which is how TensorRT runs BF16 layers (it accumulates in
float32), up to accumulation order. Nodes ORT runs natively in bf16 (``NATIVE_BF16_OPS``, each
verified at several opsets in tests/optimizer/test_emulation.py) are left alone; If/Loop/Scan bodies are
rewritten the same way. ONNX Runtime's Python binding can neither take nor return bfloat16
arrays, so bfloat16 graph inputs and outputs become float32 at the boundary (a Cast to bf16
right after an input, a Cast to float32 right before an output): values stay exactly bf16.

A model without bfloat16 anywhere is returned as is after one scan of its element types.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx
from onnx import AttributeProto, TensorProto, helper

from optimizer.graph import fresh_name
from optimizer.stats import iter_graphs

log = logging.getLogger(__name__)

BF16 = TensorProto.BFLOAT16
FLOAT = TensorProto.FLOAT

#: Ops ONNX Runtime's CPU provider runs with bfloat16 tensors at every opset from 13 on (measured
#: with onnxruntime 1.32: Pad has bf16 kernels only from opset 21, Expand/Tile/Where/Resize/Size/
#: DepthToSpace none, so they are wrapped like compute ops -- exact either way).
NATIVE_BF16_OPS = frozenset({
    "Cast", "CastLike", "Constant", "ConstantOfShape", "Identity", "Shape",
    "Transpose", "Concat", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split",
    "Gather", "GatherElements",
})
#: Ops whose bodies are rewritten instead of the node itself (their kernels are type-agnostic).
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


@dataclass
class Emulation:
    """An emulated model: ``model`` (the input itself when it holds no bfloat16), how many nodes
    were wrapped in Casts, and the graph inputs/outputs now exchanged as float32."""

    model: onnx.ModelProto
    wrapped_nodes: int = 0
    float32_inputs: list[str] = field(default_factory=list)
    float32_outputs: list[str] = field(default_factory=list)

    @property
    def emulated(self) -> bool:
        return bool(self.wrapped_nodes or self.float32_inputs or self.float32_outputs)


def has_bfloat16(model: onnx.ModelProto) -> bool:
    """Whether any tensor, constant, Cast target or dtype attribute of ``model`` is bfloat16."""
    for graph in iter_graphs(model.graph):
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.tensor_type.elem_type == BF16:
                return True
        if any(t.data_type == BF16 for t in graph.initializer):
            return True
        if any(s.values.data_type == BF16 for s in graph.sparse_initializer):
            return True
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR and attr.t.data_type == BF16:
                    return True
                if attr.type == AttributeProto.INT and attr.name in ("to", "dtype") and attr.i == BF16:
                    return True
    return False


def emulate_bfloat16(model: onnx.ModelProto) -> Emulation:
    """A copy of ``model`` that ONNX Runtime's CPU provider runs, bf16 math emulated in float32
    (see the module docstring); ``model`` itself when it has no bfloat16. Never modifies ``model``."""
    if not has_bfloat16(model):
        return Emulation(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    types = _elem_types(copy)
    names = {n for g in iter_graphs(copy.graph) for n in _graph_names(g)}
    rewriter = _Rewriter(types, names, _default_opset(copy))
    rewriter.graph(copy.graph)
    inputs, outputs = rewriter.io(copy.graph)
    log.debug("bf16 emulation: %d nodes wrapped, float32 I/O %s", rewriter.wrapped, inputs + outputs)
    return Emulation(copy, rewriter.wrapped, inputs, outputs)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _graph_names(graph: onnx.GraphProto):
    yield from (v.name for v in (*graph.input, *graph.output, *graph.value_info))
    yield from (t.name for t in graph.initializer)
    for node in graph.node:
        yield node.name
        yield from node.input
        yield from node.output


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name (all graphs) from onnx shape inference and declarations."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # > 2 GB, custom ops ...: declared types plus the schema rule below
        log.debug("shape inference failed for bf16 emulation (%s)", exc)
        inferred = model
    types: dict[str, int] = {}
    for graph in (*iter_graphs(model.graph), *iter_graphs(inferred.graph)):
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.tensor_type.elem_type:
                types.setdefault(value.name, value.type.tensor_type.elem_type)
        for t in graph.initializer:
            types.setdefault(t.name, t.data_type)
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.type == AttributeProto.TENSOR:
                        types.setdefault(node.output[0], attr.t.data_type)
    return types


class _Rewriter:
    """Wraps nodes in Casts graph by graph, sharing one float32 copy per bf16 tensor and graph."""

    def __init__(self, types: dict[str, int], names: set[str], opset: int):
        self.types = types
        self.names = names
        self.opset = opset
        self.wrapped = 0

    def fresh(self, base: str) -> str:
        return fresh_name(base, self.names)

    def graph(self, graph: onnx.GraphProto) -> None:
        nodes: list[onnx.NodeProto] = []
        as_float: dict[str, str] = {}  # bf16 tensor -> its float32 copy in this graph
        for node in graph.node:
            bodies = [a for a in node.attribute if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS)]
            for attr in bodies:
                for body in ([attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)):
                    self.graph(body)
            if bodies or node.op_type in NATIVE_BF16_OPS or node.domain not in ("", "ai.onnx"):
                nodes.append(node)
                continue
            ins = [i for i, name in enumerate(node.input) if name and self.types.get(name) == BF16]
            outs = [j for j, name in enumerate(node.output) if name and self._output_is_bf16(node, j)]
            dtype_attrs = [a for a in node.attribute if a.name == "dtype" and a.type == AttributeProto.INT and a.i == BF16]
            if not (ins or outs or dtype_attrs):
                nodes.append(node)
                continue
            for i in ins:
                name = node.input[i]
                if name not in as_float:
                    as_float[name] = self.fresh(f"{name}_emu_f32")
                    nodes.append(helper.make_node("Cast", [name], [as_float[name]], self.fresh(f"{name}_emu_cast"), to=FLOAT))
                node.input[i] = as_float[name]
            for attr in dtype_attrs:
                attr.i = FLOAT
            back = []
            for j in outs:
                name = node.output[j]
                node.output[j] = self.fresh(f"{name}_emu_f32")
                self.types[node.output[j]] = FLOAT
                back.append(helper.make_node("Cast", [node.output[j]], [name], self.fresh(f"{name}_emu_cast"), to=BF16))
            nodes.append(node)
            nodes.extend(back)
            self.wrapped += 1
        del graph.node[:]
        graph.node.extend(nodes)

    def _output_is_bf16(self, node: onnx.NodeProto, j: int) -> bool:
        known = self.types.get(node.output[j])
        if known:
            return known == BF16
        # Not inferred: the output shares its schema type parameter with a bf16 input.
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, node.domain)
        except Exception:
            return False
        formal = lambda params, k: params[min(k, len(params) - 1)].type_str if params else None  # noqa: E731
        out_type = formal(schema.outputs, j)
        return any(
            name and self.types.get(name) == BF16 and formal(schema.inputs, i) == out_type
            for i, name in enumerate(node.input)
        )

    def io(self, graph: onnx.GraphProto) -> tuple[list[str], list[str]]:
        """bf16 graph inputs and outputs become float32, with a Cast on the inside."""
        inputs, outputs, head, tail = [], [], [], []
        initializers = {t.name for t in graph.initializer}
        for value in graph.input:
            if value.type.tensor_type.elem_type != BF16 or value.name in initializers:
                continue
            internal = self.fresh(f"{value.name}_emu_bf16")
            _rename_uses(graph, value.name, internal)
            head.append(helper.make_node("Cast", [value.name], [internal], self.fresh(f"{value.name}_emu_cast"), to=BF16))
            value.type.tensor_type.elem_type = FLOAT
            inputs.append(value.name)
        for value in graph.output:
            if value.type.tensor_type.elem_type != BF16:
                continue
            value.type.tensor_type.elem_type = FLOAT
            outputs.append(value.name)
            if value.name in inputs:  # an input passed straight through is float32 already
                continue
            internal = self.fresh(f"{value.name}_emu_bf16")
            _rename_everywhere(graph, value.name, internal)
            tail.append(helper.make_node("Cast", [internal], [value.name], self.fresh(f"{value.name}_emu_cast"), to=FLOAT))
        nodes = head + list(graph.node) + tail
        del graph.node[:]
        graph.node.extend(nodes)
        return inputs, outputs


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node that reads ``old`` (subgraphs included: they see outer names) reads ``new``."""
    for g in iter_graphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        for value in g.output:
            if value.name == old and g is not graph:
                value.name = new
        _drop_value_info(g, old)


def _rename_everywhere(graph: onnx.GraphProto, old: str, new: str) -> None:
    """``old`` is renamed ``new`` in producers, readers and initializers (the graph output excepted)."""
    _rename_uses(graph, old, new)
    for g in iter_graphs(graph):
        for node in g.node:
            for j, name in enumerate(node.output):
                if name == old:
                    node.output[j] = new
        for t in g.initializer:
            if t.name == old:
                t.name = new


def _drop_value_info(graph: onnx.GraphProto, name: str) -> None:
    kept = [v for v in graph.value_info if v.name != name]
    if len(kept) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(kept)
