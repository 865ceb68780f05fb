"""Differential tests for ``fuse-conv-bn``."""

import numpy as np
import pytest
from helpers import assert_same_outputs, op_types, random_inputs, run_pass
from onnx import TensorProto, helper, numpy_helper


def conv_bn_model(cin=4, cout=8, group=1, bias=True, extra_reader=False, bn_is_output=False, opset=13, dtype=np.float32):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(cout, cin // group, 3, 3)).astype(dtype)
    inits = [numpy_helper.from_array(w, "w")]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=cout).astype(dtype), "b"))
        conv_inputs.append("b")
    for name, values in (
        ("gamma", rng.uniform(0.5, 2.0, cout)),
        ("beta", rng.normal(size=cout)),
        ("mean", rng.normal(size=cout)),
        ("var", rng.uniform(0.1, 3.0, cout)),
    ):
        inits.append(numpy_helper.from_array(values.astype(dtype), name))
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], group=group),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["y"]),
    ]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    outputs = [helper.make_tensor_value_info("y", elem, [2, cout, 5, 5])]
    if extra_reader:
        nodes.append(helper.make_node("Sigmoid", ["c"], ["side"]))
        outputs.append(helper.make_tensor_value_info("side", elem, [2, cout, 5, 5]))
    if bn_is_output:
        outputs.append(helper.make_tensor_value_info("c", elem, [2, cout, 5, 5]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, [2, cin, 5, 5])], outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bias": False},
        {"cin": 8, "cout": 8, "group": 2},
        {"cin": 8, "cout": 8, "group": 8, "bias": False},  # depthwise
        {"opset": 9},
        {"opset": 17},
    ],
    ids=["bias", "no-bias", "grouped", "depthwise", "opset9", "opset17"],
)
def test_batchnorm_folds_into_conv(kwargs):
    model = conv_bn_model(**kwargs)
    result = run_pass(model, "fuse-conv-bn")
    assert op_types(result.model) == ["Conv", "Relu"]
    assert result.records[0].stats["folded"] == 1
    assert result.records[0].verification == "passed"
    assert_same_outputs(model, result.model, random_inputs(model, seed=3), rtol=1e-5)


def test_float16_conv_bn_folds_within_half_precision():
    model = conv_bn_model(dtype=np.float16)
    result = run_pass(model, "fuse-conv-bn", verify="structural")
    assert op_types(result.model) == ["Conv", "Relu"]
    assert_same_outputs(model, result.model, random_inputs(model, seed=3), rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("kwargs,reason", [
    ({"extra_reader": True}, "skipped_conv_output_shared"),
    ({"bn_is_output": True}, "skipped_conv_output_shared"),
])
def test_unsafe_sites_are_skipped_and_counted(kwargs, reason):
    model = conv_bn_model(**kwargs)
    result = run_pass(model, "fuse-conv-bn")
    assert "BatchNormalization" in op_types(result.model)
    assert not result.records[0].changed
    assert result.records[0].stats[reason] == 1


def test_conv_behind_dequantize_is_not_folded():
    model = conv_bn_model()
    graph = model.graph
    w = next(t for t in graph.initializer if t.name == "w")
    q = numpy_helper.from_array(np.clip(np.round(numpy_helper.to_array(w) / 0.02), -127, 127).astype(np.int8), "w_q")
    graph.initializer.remove(w)
    graph.initializer.extend([q, numpy_helper.from_array(np.array(0.02, np.float32), "w_s")])
    graph.node.insert(0, helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"]))
    result = run_pass(model, "fuse-conv-bn")
    assert op_types(result.model) == ["DequantizeLinear", "Conv", "BatchNormalization", "Relu"]
    assert result.records[0].stats["skipped_weight_not_constant_float"] == 1


def test_shared_weight_is_not_modified_in_place():
    model = conv_bn_model()
    graph = model.graph
    graph.node.append(helper.make_node("Conv", ["x", "w"], ["c2"], pads=[1, 1, 1, 1]))
    graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, [2, 8, 5, 5]))
    result = run_pass(model, "fuse-conv-bn")
    assert result.records[0].stats["folded"] == 1
    assert_same_outputs(model, result.model)
