"""Shape inference on weight-free exports (passes/inference_model.py)."""

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs
import pytest

from passes.graph_utils import infer_tensor_types
from passes.inference_model import LIGHT_ELEMENTS, export_light, infer, light_model

MODEL = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[N, 64] x) => (float[N, 2, 32] y) {
    m = MatMul(x, w)
    head = Constant<value = int64[1] {-1}>()
    tail = Constant<value = int64[2] {2, 32}>()
    shape = Concat<axis = 0>(head, tail)
    r = Reshape(m, shape)
    y = Add(r, b)
}
"""


def _graph():
    model = onnx.parser.parse_model(MODEL)  # the weights are added below
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")  # 4096 > LIGHT_ELEMENTS
    b = onnx.numpy_helper.from_array(rng.standard_normal((2, 32)).astype(np.float32), "b")
    model.graph.initializer.extend([w, b])
    return gs.import_onnx(model)


def test_export_light_turns_only_large_constants_into_typed_inputs():
    graph = _graph()
    light = export_light(graph)
    full = gs.export_onnx(graph, do_type_check=False)
    assert 64 * 64 > LIGHT_ELEMENTS >= 2 * 32
    assert [i.name for i in light.graph.input] == ["x", "w"]
    w = light.graph.input[1].type.tensor_type
    assert w.elem_type == onnx.TensorProto.FLOAT and [d.dim_value for d in w.shape.dim] == [64, 64]
    assert [t.name for t in light.graph.initializer] == ["b"]
    assert [n.SerializeToString() for n in light.graph.node] == [n.SerializeToString() for n in full.graph.node]
    assert light.opset_import == full.opset_import and light.ir_version == full.ir_version
    onnx.checker.check_model(light, full_check=True)


@pytest.mark.parametrize("shapes", [None, {"x": (3, 64)}])
def test_inference_on_the_light_export_matches_inference_on_the_full_one(shapes):
    graph = _graph()
    model = gs.export_onnx(graph, do_type_check=False)
    for value in model.graph.input:
        if shapes and value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
                dim.dim_value = size
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    full = {v.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
            for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    types = infer_tensor_types(graph, shapes)
    assert {k: types[k][0] for k in full} == full
    assert types["y"][0] == ((3 if shapes else None), 2, 32)
    assert infer(graph, shapes)[0]["y"] == types["y"]
    assert not any(g.value_info for g in [light_model(graph, shapes).graph])
