"""Size statistics of a model: nodes, parameters and bytes, counted through subgraphs."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper


@dataclass(frozen=True)
class ModelStats:
    """Counts that the report compares before and after each pass."""

    nodes: int
    initializers: int
    params: int  # elements in initializers and Constant nodes
    weight_bytes: int  # bytes of those elements
    model_bytes: int  # serialized size (weights included)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def tensor_elements_and_bytes(tensor: onnx.TensorProto) -> tuple[int, int]:
    """``(elements, bytes stored)`` of a tensor: raw data as stored (INT4 packed two per byte),
    external data by its recorded length."""
    elements = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    if tensor.HasField("raw_data"):
        return elements, len(tensor.raw_data)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        length = next((int(e.value) for e in tensor.external_data if e.key == "length"), 0)
        return elements, length
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize if tensor.data_type else 0
    return elements, elements * itemsize


def iter_graphs(graph: onnx.GraphProto):
    """Yield ``graph`` and every subgraph (If/Loop/Scan bodies) inside it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def op_histogram(model: onnx.ModelProto) -> Counter:
    """How many nodes of each op type, subgraphs included."""
    return Counter(node.op_type for g in iter_graphs(model.graph) for node in g.node)


def stored_tensors(model: onnx.ModelProto):
    """Every stored tensor of ``model``, subgraphs included: the initializers, then the values of
    ``Constant`` nodes."""
    for graph in iter_graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        yield attr.t


def model_stats(model: onnx.ModelProto) -> ModelStats:
    """Count nodes, initializers, parameters and bytes of ``model``."""
    nodes = sum(len(graph.node) for graph in iter_graphs(model.graph))
    initializers = sum(len(graph.initializer) for graph in iter_graphs(model.graph))
    params = weight_bytes = 0
    for tensor in stored_tensors(model):
        n, b = tensor_elements_and_bytes(tensor)
        params += n
        weight_bytes += b
    try:
        model_bytes = serialized_size(model)
    except Exception:  # protobuf refuses to size messages over 2 GB; weights dominate then
        model_bytes = weight_bytes
    return ModelStats(nodes, initializers, params, weight_bytes, model_bytes)


def serialized_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()``, computed without encoding the whole model at once (which protobuf's
    ``ByteSize`` does: 0.17 s on a 55 MB model, against 0.03 s here): the main graph's
    initializers are sized one by one and the rest of the model as a copy without them, then
    combined by protobuf's encoding of length-delimited fields (``graph`` is field 7 of
    ``ModelProto``, ``initializer`` field 5 of ``GraphProto``: one-byte tags)."""
    rest = onnx.ModelProto()
    copy_fields(model, rest, skip="graph")
    if not model.HasField("graph"):
        return rest.ByteSize()
    graph = onnx.GraphProto()
    copy_fields(model.graph, graph, skip="initializer")
    graph_size = graph.ByteSize() + sum(_field_size(_tensor_size(t)) for t in model.graph.initializer)
    return rest.ByteSize() + _field_size(graph_size)


def _tensor_size(tensor: onnx.TensorProto) -> int:
    """``tensor.ByteSize()``; for large raw data the rest of the tensor plus the data's length
    (``raw_data`` is field 9: a one-byte tag), which copies the bytes once instead of encoding them."""
    raw = len(tensor.raw_data) if tensor.HasField("raw_data") else 0
    if raw < 1 << 16:
        return tensor.ByteSize()
    rest = onnx.TensorProto()
    copy_fields(tensor, rest, skip="raw_data")
    return rest.ByteSize() + _field_size(raw)


def copy_fields(source, target, skip: str) -> None:
    """Every set field of protobuf message ``source`` but ``skip`` (never read, so a large
    ``raw_data`` or ``initializer`` is not copied) into ``target``."""
    for field in source.DESCRIPTOR.fields:
        if field.name == skip:
            continue
        value = getattr(source, field.name)
        if field.is_repeated:
            if len(value):
                getattr(target, field.name).extend(value)
        elif field.has_presence and not source.HasField(field.name):
            continue
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _field_size(length: int) -> int:
    """Encoded size of one length-delimited field with a one-byte tag: tag, varint length, payload."""
    varint = 1
    while length >> (7 * varint):
        varint += 1
    return 1 + varint + length
