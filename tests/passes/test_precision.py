"""convert-fp16: FP16 where safe, float32 kept for big values, reductions and the model's I/O."""

import numpy as np
import onnx
import pytest
from helpers import SAMPLE_MODELS, SAMPLES, random_inputs
from onnx import TensorProto, helper, numpy_helper

from optimizer import PassContext, PassManager
from optimizer.io import load_model
from optimizer.metrics import compare_outputs
from optimizer.runtime import OrtRunner


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _node_types(model):
    """Element type of each node's first output, from shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return {n.name or n.output[0]: types.get(n.output[0]) for n in model.graph.node}


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=[p.parent.name for p in SAMPLE_MODELS])
def test_sample_models_fp16_agree_on_eval_data(path):
    model, _ = load_model(path)
    data = dict(np.load(path.parent / "eval.npz"))
    labels = data.pop("labels", None)
    result = PassManager("default,convert-fp16").run(model, PassContext(calibration=path.parent / "calib.npz"))
    fp16 = result.model
    onnx.checker.check_model(fp16, full_check=True)
    assert [i.type.tensor_type.elem_type for i in fp16.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in fp16.graph.output] == [TensorProto.FLOAT]
    halves = sum(1 for t in fp16.graph.initializer if t.data_type == TensorProto.FLOAT16)
    assert halves > 0
    for (metrics,) in [compare_outputs(OrtRunner(model).run(data), OrtRunner(fp16).run(data))]:
        assert metrics.mismatch == 0  # no NaN/Inf
        assert metrics.max_rel <= 1e-2
        if labels is not None:
            assert metrics.argmax_agreement == 1.0


def test_large_constants_and_reductions_stay_float32():
    big = numpy_helper.from_array(np.array([1e5, 1.0, 2.0], np.float32), "big")
    small = numpy_helper.from_array(np.array([0.5, 1.0, 2.0], np.float32), "small")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("Mul", ["x", "small"], ["a"], name="mul_small"),
        helper.make_node("Add", ["a", "big"], ["b"], name="add_big"),
        helper.make_node("ReduceSum", ["b", "axes"], ["c"], name="reduce"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])], [big, small, axes])
    result = PassManager("convert-fp16", verify="structural").run(model)
    types = _node_types(result.model)
    assert types["mul_small"] == TensorProto.FLOAT16
    assert types["add_big"] == TensorProto.FLOAT and types["reduce"] == TensorProto.FLOAT
    stats = result.records[0].stats
    assert stats["fp32_constant_out_of_range"] == 1 and stats["fp32_kept_op"] == 1


def test_activations_beyond_threshold_stay_float32():
    k = numpy_helper.from_array(np.array(1000.0, np.float32), "k")
    nodes = [helper.make_node("Mul", ["x", "k"], ["a"], name="scale_up"), helper.make_node("Relu", ["a"], ["y"], name="relu")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [k])
    calib = {"x": np.random.default_rng(0).uniform(-1, 1, (16, 4)).astype(np.float32)}
    result = PassManager("convert-fp16", verify="structural").run(model, PassContext(calibration=calib))
    types = _node_types(result.model)
    assert types["scale_up"] == TensorProto.FLOAT and types["relu"] == TensorProto.FLOAT
    assert result.records[0].stats["fp32_activation_out_of_range"] >= 1


def test_keep_io_types_false_makes_io_half():
    path = SAMPLES / "digits_cnn" / "model.onnx"
    model, _ = load_model(path)
    result = PassManager("convert-fp16(keep_io_types=false)").run(model)
    assert result.model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    inputs = random_inputs(model)
    (metrics,) = compare_outputs(OrtRunner(model).run(inputs), OrtRunner(result.model).run(inputs))
    assert metrics.max_rel <= 1e-2
