"""Graph <-> model: importing a ``ModelProto`` into an onnx-graphsurgeon graph and exporting it
back with the model-level fields (IR version, producer, metadata) a pass cannot see.

Part of the kernel: the manager and the passes (which run ONNX Runtime on intermediate graphs)
both build on it, so it imports nothing above it.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from optimizer.io import pin_ir_version


def import_graph(model) -> gs.Graph:
    """``gs.import_onnx(model)``, keeping the types that graph inputs and outputs declare.

    graphsurgeon imports a graph's ``value_info`` before its inputs and outputs and keeps the first
    tensor it made for a name. A ``value_info`` entry for an input or output name with an element
    type but no shape -- what tools write for ``com.microsoft`` outputs (``DynamicQuantizeLSTM``,
    ``MatMulIntegerToFloat``...), whose shapes onnx shape inference cannot infer -- thereby
    replaces the declared shape, and the exported model has a main-graph input or output without
    a shape, which the checker rejects ("Field 'shape' of 'type' is required but missing"). Here
    the declared type fills in what such an entry lacks (as graphsurgeon merges repeated
    ``value_info`` entries), in every subgraph too.
    """
    graph = gs.import_onnx(model)
    _restore_declared_types(graph, model.graph)
    return graph


def _restore_declared_types(graph: gs.Graph, proto) -> None:
    import onnx
    from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

    declared = {v.name: v for v in list(proto.input) + list(proto.output)}
    for tensor in list(graph.inputs) + list(graph.outputs):
        value = declared.get(tensor.name)
        if not isinstance(tensor, gs.Variable) or value is None or not value.type.ByteSize():
            continue
        if tensor.dtype is None or tensor.shape is None:
            parsed = OnnxImporter.import_tensor(value)
            tensor.dtype = tensor.dtype if tensor.dtype is not None else parsed.dtype
            tensor.shape = tensor.shape if tensor.shape is not None else parsed.shape
    # Right after import, graphsurgeon's nodes are the proto's, in order, with its attribute names.
    for node, node_proto in zip(graph.nodes, proto.node):
        for attr in node_proto.attribute:
            sub = node.attrs.get(attr.name)
            if attr.type == onnx.AttributeProto.GRAPH and isinstance(sub, gs.Graph):
                _restore_declared_types(sub, attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS and isinstance(sub, list):
                for g, g_proto in zip(sub, attr.graphs):
                    if isinstance(g, gs.Graph):
                        _restore_declared_types(g, g_proto)


def fresh_name(base: str, used: set[str]) -> str:
    """``base``, or the first of ``base_1``, ``base_2`` ... not in ``used``; it is added to ``used``."""
    name, i = base, 0
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


def metadata_props(model: onnx.ModelProto) -> dict[str, str]:
    """A model's ``metadata_props`` as a dict (a later entry wins over an earlier one of the same key)."""
    return {p.key: p.value for p in model.metadata_props}


def graph_to_model(graph: gs.Graph, template: onnx.ModelProto, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Export ``graph`` keeping ``template``'s model-level fields and a runnable IR version.

    ``metadata``: ``metadata_props`` entries to set over ``template``'s (what passes returned in
    ``PassResult.metadata``, e.g. a changed I/O layout); a graph has no metadata of its own.
    """
    model = gs.export_onnx(graph)
    model.ir_version = template.ir_version
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, name, getattr(template, name))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    for key, value in (metadata or {}).items():
        existing = next((p for p in model.metadata_props if p.key == key), None)
        if existing is None:
            model.metadata_props.add(key=key, value=value)
        else:
            existing.value = value
    pin_ir_version(model, template.ir_version)
    return model
