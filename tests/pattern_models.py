"""Models for the pattern-fusion tests (``fuse-layernorm``, ``fuse-gelu``), written as ONNX text
(a helper module: no tests here)."""

import numpy as np
import onnx
import onnx.parser
from helpers import run_pass
from onnx import numpy_helper

LN_OPS = {"ReduceMean", "Sub", "Pow", "Sqrt", "Div", "Reciprocal"}
GELU_OPS = {"Erf", "Tanh", "Pow"}


def build(text: str, initializers: dict[str, np.ndarray] | None = None, float16: bool = False) -> onnx.ModelProto:
    """A model from ONNX text plus numpy initializers, checked, IR version 10.

    Graph outputs after the first get their inferred type (the text gives placeholders). ``float16`` turns every float
    tensor, constant and type into float16 (the text parser takes float16 values only as bits).
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in (initializers or {}).items())
    if float16:
        _to_float16(model.graph)
    if len(model.graph.output) > 1:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[1:]
        inferred = {v.name: v.type for v in onnx.shape_inference.infer_shapes(probe).graph.value_info}
        for out in model.graph.output[1:]:
            out.type.CopyFrom(inferred[out.name])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _to_float16(graph: onnx.GraphProto) -> None:
    def convert(tensor: onnx.TensorProto) -> None:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))

    for tensor in graph.initializer:
        convert(tensor)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                convert(attr.t)
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16


def fuse(model, spec="cleanup,fuse-layernorm", verify="numeric"):
    result = run_pass(model, spec, verify=verify)
    assert not any(r.error for r in result.records), [r.error for r in result.records]
    return result, result.records[-1].stats
