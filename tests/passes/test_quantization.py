"""quantize-int8: Q/DQ placement per TensorRT's rules, INT8 weights, and accuracy on real data."""

import numpy as np
import onnx
import pytest
from helpers import SAMPLES, op_types
from onnx import TensorProto, helper, numpy_helper

from optimizer import PassContext, PassManager
from optimizer.metrics import compare_outputs
from optimizer.runtime import OrtRunner
from passes.quantization import quantize_weight

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _w(name, shape):
    return numpy_helper.from_array(RNG.normal(size=shape).astype(np.float32), name)


def residual_cnn():
    """x -> Conv -> Relu -> Conv -> Add(residual = relu output) -> Relu -> GlobalAveragePool -> Gemm."""
    inits = [_w("w1", (16, 3, 3, 3)), _w("b1", (16,)), _w("w2", (16, 16, 3, 3)), _w("b2", (16,)), _w("fc", (10, 16)), _w("fcb", (10,))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1, name="fc"),
    ]
    return _model(nodes, [_vi("x", ["n", 3, 8, 8])], [_vi("y", ["n", 10])], inits)


def _run(model, spec="quantize-int8", calibration=None):
    calib = calibration if calibration is not None else {"x": RNG.uniform(-1, 1, (32, 3, 8, 8)).astype(np.float32)}
    ctx = PassContext(calibration=calib)
    return PassManager(spec).run(model, ctx)


def _consumers(model, tensor):
    return [n for n in model.graph.node if tensor in n.input]


def test_placement_follows_tensorrt_rules():
    model = residual_cnn()
    result = _run(model)
    q = result.model
    onnx.checker.check_model(q, full_check=True)
    ops = op_types(q)
    # activations into conv1, conv2 (= the residual branch of the Add, sharing its Q/DQ) and fc
    assert ops.count("QuantizeLinear") == 3
    assert ops.count("DequantizeLinear") == 3 + 3  # + three weight DQs
    nodes = {n.name: n for n in q.graph.node}
    by_output = {o: n for n in q.graph.node for o in n.output}
    for conv in ("conv1", "conv2", "fc"):
        act, weight = nodes[conv].input[0], nodes[conv].input[1]
        assert by_output[act].op_type == "DequantizeLinear" and by_output[by_output[act].input[0]].op_type == "QuantizeLinear"
        wdq = by_output[weight]
        assert wdq.op_type == "DequantizeLinear"
        w_int8 = next(t for t in q.graph.initializer if t.name == wdq.input[0])
        assert w_int8.data_type == TensorProto.INT8
        axis = {a.name: a.i for a in wdq.attribute}.get("axis", 1)
        assert axis == 0  # conv: output channels; Gemm with transB=1: rows of B
    add = nodes["add"]
    assert by_output[add.input[1]].op_type == "DequantizeLinear"  # residual side quantized
    assert by_output[add.input[0]].op_type == "Conv"  # conv side left for TensorRT's Conv+Add fusion
    assert all(by_output[o].op_type != "QuantizeLinear" for o in ("y",))  # outputs not quantized
    record = result.records[0]
    assert record.stats["quantized_nodes"] == 4 and record.details["calibration"]["method"] == "auto: " + record.details["method_selection"]["chosen"]


def test_int8_model_agrees_with_float():
    model = residual_cnn()
    result = _run(model)
    x = RNG.uniform(-1, 1, (16, 3, 8, 8)).astype(np.float32)
    (metrics,) = compare_outputs(OrtRunner(model).run({"x": x}), OrtRunner(result.model).run({"x": x}))
    assert metrics.cosine > 0.99
    assert result.records[0].verification == "passed"


def test_attention_matmul_and_tiny_layers_stay_float():
    inits = [_w("wq", (16, 16)), _w("tiny", (2, 2))]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="proj"),
        helper.make_node("Transpose", ["q"], ["qt"], perm=[1, 0]),
        helper.make_node("MatMul", ["q", "qt"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["y"]),
        helper.make_node("MatMul", ["z", "tiny"], ["y2"], name="tinymm"),
    ]
    model = _model(nodes, [_vi("x", [4, 16]), _vi("z", [4, 2])], [_vi("y", [4, 4]), _vi("y2", [4, 2])], inits)
    # the first dim is fixed to 4: each batch of 4 rows is one calibration step
    calib = {"x": RNG.normal(size=(16, 16)).astype(np.float32), "z": RNG.normal(size=(16, 2)).astype(np.float32)}
    result = _run(model, calibration=calib)
    stats = result.records[0].stats
    assert stats["quantized_nodes"] == 1  # only the projection
    assert stats["skipped_matmul_without_constant_weight"] == 1 and stats["skipped_tiny_layer"] == 1
    scores = next(n for n in result.model.graph.node if n.name == "scores")
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert all(producers.get(i) != "DequantizeLinear" for i in scores.input)


def test_exclude_and_pooling_options():
    model = residual_cnn()
    result = _run(model, "quantize-int8(exclude=[conv1],pooling=true,method=minmax)")
    stats = result.records[0].stats
    assert stats["skipped_excluded"] == 1
    conv1 = next(n for n in result.model.graph.node if n.name == "conv1")
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert producers.get(conv1.input[1]) is None  # float weight kept
    pool = next(n for n in result.model.graph.node if n.op_type == "GlobalAveragePool")
    assert producers[pool.input[0]] == "DequantizeLinear"


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_weight_quantization_error_is_within_half_a_step(axis):
    w = RNG.normal(size=(6, 5, 3, 3)).astype(np.float32) * np.linspace(0.1, 3, 6).reshape(6, 1, 1, 1).astype(np.float32)
    q, scale = quantize_weight(w, axis)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    shape = [1] * 4
    if axis is not None:
        shape[axis] = -1
    restored = q.astype(np.float64) * np.asarray(scale, np.float64).reshape(shape if axis is not None else ())
    step = np.asarray(scale, np.float64).reshape(shape if axis is not None else ())
    assert np.all(np.abs(restored - w) <= step / 2 + 1e-7)


def test_synthetic_calibration_is_flagged():
    result = PassManager("quantize-int8").run(residual_cnn(), PassContext())
    info = result.records[0].details["calibration"]
    assert info["synthetic"] is True


def test_digits_int8_accuracy_and_compression(tmp_path):
    from optimizer import optimize

    digits = SAMPLES / "digits_cnn"
    result = optimize(digits / "model.onnx", "int8", data=digits / "eval.npz", calibration=digits / "calib.npz")
    report = result.report
    assert abs(report.accuracy.task.drop) <= 0.5
    weight_compression = report.original.weight_bytes / report.optimized.weight_bytes
    assert weight_compression >= 3.9, weight_compression
    assert "QuantizeLinear" in op_types(result.model)


def test_lint_is_clean_on_our_output_and_finds_bad_placements():
    quantized = _run(residual_cnn()).model
    clean = PassManager("lint-qdq").run(quantized)
    assert clean.records[0].stats["issues"] == 0 and not clean.records[0].changed
    # break it: a Pad between the activation DQ and conv2
    padded = onnx.ModelProto()
    padded.CopyFrom(quantized)
    graph = padded.graph
    conv2 = next(n for n in graph.node if n.name == "conv2")
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads_bad"))
    graph.node.append(helper.make_node("Pad", [conv2.input[0], "pads_bad"], ["padded"], name="pad_bad"))
    conv2.input[0] = "padded"
    for a in conv2.attribute:
        if a.name == "pads":
            del a.ints[:]
            a.ints.extend([0, 0, 0, 0])
    stats = PassManager("lint-qdq", verify="off").run(padded).records[0].stats
    assert stats["float_op_between_dq_and_layer"] == 1
    # break it differently: the residual Add reads the float tensor instead of its DQ
    residual = onnx.ModelProto()
    residual.CopyFrom(quantized)
    add = next(n for n in residual.graph.node if n.name == "add")
    add.input[1] = "r1"
    lint = PassManager("lint-qdq", verify="off").run(residual)
    assert lint.records[0].stats["float_residual_input"] == 1
    assert [i["node"] for i in lint.records[0].details["issues"]] == ["add"]


def test_accuracy_budget_falls_back_sensitive_layers():
    from optimizer import optimize

    digits = SAMPLES / "digits_cnn"
    # a deliberately poor calibration (4 samples, min-max) so INT8 costs accuracy
    data = np.load(digits / "calib.npz")
    calib = {"input": data["input"][:4] * 0.1}
    result = optimize(digits / "model.onnx", "default,quantize-int8(method=minmax)", data=digits / "eval.npz",
                      calibration=calib, max_accuracy_drop=0.0)
    budget = result.report.budget
    assert budget["metric"] == "task_accuracy"
    assert budget["met"] == (budget["drop"] <= 0.0)
    if budget["fallbacks"]:
        assert set(budget["sensitivity"]) >= {f["node"] for f in budget["fallbacks"]}
    assert result.report.accuracy.task.drop == pytest.approx(budget["drop"], abs=1e-9)
