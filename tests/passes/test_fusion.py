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


# -- BatchNorm into ConvTranspose / Gemm / MatMul, and BN -> Mul+Add ----------------------------
def _bn_inits(c, rng, dtype=np.float32):
    return [
        numpy_helper.from_array(rng.uniform(0.5, 2.0, c).astype(dtype), "gamma"),
        numpy_helper.from_array(rng.normal(size=c).astype(dtype), "beta"),
        numpy_helper.from_array(rng.normal(size=c).astype(dtype), "mean"),
        numpy_helper.from_array(rng.uniform(0.1, 3.0, c).astype(dtype), "var"),
    ]


def _model(nodes, inputs, outputs, inits, opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


BN = helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-3)


@pytest.mark.parametrize("group", [1, 2])
def test_batchnorm_folds_into_conv_transpose(group):
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 6 // group, 3, 3)).astype(np.float32)  # [Cin, Cout/group, k, k]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "b")]
    inits += _bn_inits(6, rng)
    model = _model(
        [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], group=group, strides=[2, 2]), BN],
        [_vi("x", [1, 4, 5, 5])], [_vi("y", [1, 6, 11, 11])], inits,
    )
    result = run_pass(model, "fuse-conv-bn")
    assert op_types(result.model) == ["ConvTranspose"]
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("trans_b,with_c", [(0, True), (1, True), (0, False)])
def test_batchnorm_folds_into_gemm(trans_b, with_c):
    rng = np.random.default_rng(3)
    b = rng.normal(size=(8, 5) if trans_b else (5, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(b, "B")] + _bn_inits(8, rng)
    gemm_inputs = ["x", "B"]
    if with_c:
        inits.append(numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "C"))
        gemm_inputs.append("C")
    model = _model(
        [helper.make_node("Gemm", gemm_inputs, ["c"], transB=trans_b, alpha=0.5, beta=2.0), BN],
        [_vi("x", [3, 5])], [_vi("y", [3, 8])], inits,
    )
    result = run_pass(model, "fuse-conv-bn")
    assert op_types(result.model) == ["Gemm"]
    assert_same_outputs(model, result.model)


def test_batchnorm_folds_into_2d_matmul_as_gemm():
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(size=(5, 8)).astype(np.float32), "W")] + _bn_inits(8, rng)
    model = _model([helper.make_node("MatMul", ["x", "W"], ["c"]), BN], [_vi("x", [3, 5])], [_vi("y", [3, 8])], inits)
    result = run_pass(model, "fuse-conv-bn")
    assert op_types(result.model) == ["Gemm"]
    assert_same_outputs(model, result.model)


def test_batchnorm_without_weighted_producer_becomes_mul_add():
    rng = np.random.default_rng(5)
    model = _model(
        [helper.make_node("Relu", ["x"], ["c"]), BN], [_vi("x", [2, 4, 3, 3])], [_vi("y", [2, 4, 3, 3])], _bn_inits(4, rng)
    )
    assert run_pass(model, "fuse-conv-bn").records[0].stats["skipped_no_conv_producer"] == 1
    result = run_pass(model, "batchnorm-to-affine")
    assert op_types(result.model) == ["Relu", "Mul", "Add"]
    assert_same_outputs(model, result.model)


# -- fuse-affine -------------------------------------------------------------------------------
def _conv_then(op, const, const_first=False, cout=6):
    rng = np.random.default_rng(6)
    inits = [
        numpy_helper.from_array(rng.normal(size=(cout, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.asarray(const, np.float32), "k"),
    ]
    ins = ["k", "c"] if const_first else ["c", "k"]
    return _model(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node(op, ins, ["y"])],
        [_vi("x", [2, 3, 6, 6])], [_vi("y", [2, cout, 6, 6])], inits,
    )


CH = np.linspace(0.5, 2.0, 6)


@pytest.mark.parametrize(
    "op,const,const_first",
    [
        ("Mul", CH.reshape(6, 1, 1), False),
        ("Mul", CH.reshape(1, 6, 1, 1), True),
        ("Add", CH.reshape(6, 1, 1), False),
        ("Add", 0.25, True),
        ("Sub", CH.reshape(6, 1, 1), False),
        ("Div", CH.reshape(6, 1, 1), False),
    ],
)
def test_per_channel_constant_folds_into_conv(op, const, const_first):
    model = _conv_then(op, const, const_first)
    result = run_pass(model, "fuse-affine")
    assert op_types(result.model) == ["Conv"]
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize(
    "op,const,const_first,reason",
    [
        ("Mul", np.linspace(1, 2, 6), False, "skipped_not_per_channel"),  # broadcasts along W
        ("Sub", CH.reshape(6, 1, 1), True, None),  # c - conv is not folded
        ("Div", np.zeros((6, 1, 1)), False, "skipped_division_by_zero"),
    ],
)
def test_affine_refusals(op, const, const_first, reason):
    model = _conv_then(op, const, const_first)
    result = run_pass(model, "fuse-affine", verify="structural")
    assert op_types(result.model) == ["Conv", op]
    if reason:
        assert result.records[0].stats[reason] == 1


def test_gemm_bias_add_folds():
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.normal(size=(5, 8)).astype(np.float32), "B"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "k")]
    model = _model([helper.make_node("Gemm", ["x", "B"], ["c"]), helper.make_node("Add", ["c", "k"], ["y"])],
                   [_vi("x", [3, 5])], [_vi("y", [3, 8])], inits)
    result = run_pass(model, "fuse-affine")
    assert op_types(result.model) == ["Gemm"]
    assert_same_outputs(model, result.model)


# -- fuse-matmul-add, fuse-gemm-transpose -----------------------------------------------------
@pytest.mark.parametrize("bias_shape,bias_first", [((8,), False), ((1, 8), True), ((), False)])
def test_matmul_add_becomes_gemm(bias_shape, bias_first):
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.normal(size=(5, 8)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=bias_shape).astype(np.float32), "bias")]
    ins = ["bias", "m"] if bias_first else ["m", "bias"]
    model = _model([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ins, ["y"])],
                   [_vi("x", [3, 5])], [_vi("y", [3, 8])], inits)
    result = run_pass(model, "fuse-matmul-add")
    assert op_types(result.model) == ["Gemm"]
    assert_same_outputs(model, result.model)


def test_batched_matmul_add_is_left_alone():
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array(rng.normal(size=(5, 8)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "bias")]
    model = _model([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "bias"], ["y"])],
                   [_vi("x", [2, 3, 5])], [_vi("y", [2, 3, 8])], inits)
    result = run_pass(model, "fuse-matmul-add")
    assert op_types(result.model) == ["MatMul", "Add"]
    assert result.records[0].stats["skipped_not_2d"] == 1


def test_transpose_into_gemm_trans_b():
    model = _model(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("Gemm", ["x", "wt"], ["y"])],
        [_vi("x", [3, 5]), _vi("w", [8, 5])], [_vi("y", [3, 8])], [],
    )
    result = run_pass(model, "fuse-gemm-transpose")
    assert op_types(result.model) == ["Gemm"]
    assert result.model.graph.node[0].attribute[0].name == "transB"
    assert_same_outputs(model, result.model)


# -- fuse-pad ----------------------------------------------------------------------------------
def _pad_model(consumer, amounts, mode="constant", opset=13, relu=False, **attrs):
    rng = np.random.default_rng(10)
    inits = [numpy_helper.from_array(np.asarray(amounts, np.int64), "pads")]
    nodes = []
    src = "x"
    if relu:
        nodes.append(helper.make_node("Relu", ["x"], ["r"]))
        src = "r"
    if opset >= 11:
        nodes.append(helper.make_node("Pad", [src, "pads"], ["p"], mode=mode))
    else:
        inits = []
        nodes.append(helper.make_node("Pad", [src], ["p"], mode=mode, pads=list(amounts)))
    if consumer == "Conv":
        inits.append(numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"))
        nodes.append(helper.make_node("Conv", ["p", "w"], ["y"], **attrs))
    else:
        nodes.append(helper.make_node(consumer, ["p"], ["y"], kernel_shape=[3, 3], **attrs))
    model = _model(nodes, [_vi("x", [1, 3, 7, 7])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, opset=opset)
    return model


SPATIAL = [0, 0, 1, 2, 0, 0, 2, 1]


@pytest.mark.parametrize(
    "consumer,opset,relu,attrs",
    [
        ("Conv", 13, False, {"pads": [1, 0, 0, 1]}),
        ("Conv", 9, False, {}),
        ("AveragePool", 13, False, {}),
        ("AveragePool", 13, False, {"count_include_pad": 1, "pads": [1, 0, 0, 1]}),
        ("MaxPool", 13, True, {}),
    ],
)
def test_zero_pad_folds_into_consumer(consumer, opset, relu, attrs):
    model = _pad_model(consumer, SPATIAL, opset=opset, relu=relu, **attrs)
    result = run_pass(model, "fuse-pad")
    assert "Pad" not in op_types(result.model)
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize(
    "consumer,pads,mode,relu,reason",
    [
        ("Conv", [0, 1, 0, 0, 0, 0, 0, 0], "constant", False, "skipped_pads_not_spatial"),
        ("Conv", SPATIAL, "reflect", False, "skipped_not_zero_constant_pad"),
        ("MaxPool", SPATIAL, "constant", False, "skipped_maxpool_input_not_nonnegative"),
        ("AveragePool", [0, 0, 3, 0, 0, 0, 0, 0], "constant", False, "skipped_pool_pads_not_below_kernel"),
    ],
)
def test_pad_refusals(consumer, pads, mode, relu, reason):
    model = _pad_model(consumer, pads, mode, relu=relu)
    result = run_pass(model, "fuse-pad", verify="structural")
    assert "Pad" in op_types(result.model)
    assert result.records[0].stats[reason] == 1
