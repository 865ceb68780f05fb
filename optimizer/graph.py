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


def export_model(graph: gs.Graph, *, do_type_check: bool = True, value_info: bool = True,
                 weights_as_inputs_over: int | None = None) -> onnx.ModelProto:
    """``gs.export_onnx(graph)``, written straight into the model: graphsurgeon builds a graph and
    then copies it into a model, which copies every weight twice (on a 55 MB model, 20 ms per
    export and as much memory). ``value_info``: export the shapes the graph's tensors carry.
    ``weights_as_inputs_over``: main-graph constants over that many elements become graph inputs
    of their type and shape and their values are not copied at all (for shape inference and the
    checker); initializers listed as graph inputs (IR < 4) are then not inputs."""
    import numpy as np
    from onnx_graphsurgeon.exporters.onnx_exporter import (
        OnnxExporter, check_duplicate_node_names, dtype_to_onnx, update_import_domains,
    )
    from onnx_graphsurgeon.ir.tensor import SparseValues
    from onnx_graphsurgeon.logger import G_LOGGER

    def sparse(t) -> bool:
        return isinstance(t._values, SparseValues)

    def apart(t) -> bool:
        return (weights_as_inputs_over is not None and not sparse(t)
                and int(np.prod(t.shape, dtype=np.int64)) > weights_as_inputs_over)

    check_duplicate_node_names(graph.nodes, level=G_LOGGER.WARNING)
    model = onnx.ModelProto(ir_version=onnx.IR_VERSION)
    g = model.graph
    g.name = graph.name
    if graph.doc_string:
        g.doc_string = graph.doc_string
    g.node.extend(OnnxExporter.export_node(n) for n in graph.nodes)
    tensors = graph.tensors()
    constants = [t for t in tensors.values() if isinstance(t, gs.Constant)]
    inputs = graph.inputs if weights_as_inputs_over is None else [t for t in graph.inputs if not isinstance(t, gs.Constant)]
    g.input.extend(OnnxExporter.export_value_info_proto(t, do_type_check) for t in inputs)
    g.input.extend(onnx.helper.make_tensor_value_info(t.name, dtype_to_onnx(t.export_dtype), list(t.shape))
                   for t in constants if apart(t))
    g.output.extend(OnnxExporter.export_value_info_proto(t, do_type_check) for t in graph.outputs)
    g.initializer.extend(OnnxExporter.export_tensor_proto(t) for t in constants if not sparse(t) and not apart(t))
    g.sparse_initializer.extend(OnnxExporter.export_sparse_tensor_proto(t) for t in constants if sparse(t))
    if value_info:
        for t in list(graph.inputs) + list(graph.outputs):
            tensors.pop(t.name, None)
        g.value_info.extend(OnnxExporter.export_value_info_proto(t, do_type_check) for t in tensors.values()
                            if isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None))
    model.opset_import.extend(update_import_domains(graph))
    model.functions.extend(OnnxExporter.export_function(f) for f in graph.functions)
    model.producer_name, model.producer_version = graph.producer_name, graph.producer_version
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    return model


def metadata_props(model: onnx.ModelProto) -> dict[str, str]:
    """A model's ``metadata_props`` as a dict (a later entry wins over an earlier one of the same key)."""
    return {p.key: p.value for p in model.metadata_props}


def graph_to_model(graph: gs.Graph, template: onnx.ModelProto, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Export ``graph`` keeping ``template``'s model-level fields and a runnable IR version.

    ``metadata``: ``metadata_props`` entries to set over ``template``'s (what passes returned in
    ``PassResult.metadata``, e.g. a changed I/O layout); a graph has no metadata of its own.
    """
    model = export_model(graph)
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
