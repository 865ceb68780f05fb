"""Differential tests for ``cleanup`` and ``fold-constants``."""

import numpy as np
import pytest
from helpers import assert_same_outputs, op_types, parse_model, random_inputs, run_pass
from onnx import TensorProto, helper, numpy_helper


def test_identity_dropout_dead_nodes_and_unused_inputs_are_removed():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 13]>
        g (float[2,3] x, float[2,3] unused) => (float[2,3] y) {
            a = Identity(x)
            b = Relu(a)
            c = Dropout(b)
            dead = Sigmoid(x)
            y = Identity(c)
        }
        """
    )
    result = run_pass(model, "cleanup")
    assert op_types(result.model) == ["Relu"]
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert [o.name for o in result.model.graph.output] == ["y"]
    stats = result.records[0].stats
    assert stats["identity_removed"] == 2 and stats["dropout_removed"] == 1 and stats["inputs_removed"] == 1
    assert_same_outputs(model, result.model, random_inputs(model))


def test_identity_between_graph_input_and_output_is_kept():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 13]>
        g (float[4] x) => (float[4] y, float[4] z) {
            y = Identity(x)
            z = Relu(x)
        }
        """
    )
    result = run_pass(model, "cleanup")
    assert "Identity" in op_types(result.model)
    assert [o.name for o in result.model.graph.output] == ["y", "z"]
    assert result.records[0].stats["identity_kept"] == 1


def test_dropout_with_used_mask_or_training_mode_is_kept():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 13]>
        g (float[4] x, bool t) => (float[4] y, bool[4] m) {
            y, m = Dropout(x)
        }
        """
    )
    assert op_types(run_pass(model, "cleanup", verify="structural").model) == ["Dropout"]


def test_cleanup_recurses_into_if_branches():
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t1"]), helper.make_node("Relu", ["t1"], ["t_out"])],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [3])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e_out"])], "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [3])]
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    result = run_pass(model, "cleanup")
    assert "Identity" not in op_types(result.model) and "If" in op_types(result.model)
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    for cond in (True, False):
        assert_same_outputs(model, result.model, {"c": np.array(cond), "x": x})


def test_fold_constants_folds_constant_arithmetic_and_shapes():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 13]>
        g (float[2,6] x) => (float[3,4] y) {
            a = Constant <value = float[6] {1, 2, 3, 4, 5, 6}> ()
            b = Constant <value = float[6] {1, 1, 1, 1, 1, 1}> ()
            c = Add(a, b)
            s = Shape(x)
            n = ReduceProd <keepdims = 0> (s)
            shape = Constant <value = int64[2] {3, 4}> ()
            xs = Mul(x, c)
            y = Reshape(xs, shape)
        }
        """
    )
    result = run_pass(model, "fold-constants")
    assert op_types(result.model) == ["Mul", "Reshape"]
    assert result.records[0].stats["folded_nodes"] >= 3
    assert_same_outputs(model, result.model)


def test_fold_constants_never_folds_dequantize_of_int8_weights():
    w = numpy_helper.from_array(np.arange(-8, 8, dtype=np.int8).reshape(4, 4), "w_q")
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "w_scale")
    zp = numpy_helper.from_array(np.array(0, np.int8), "w_zp")
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        initializer=[w, scale, zp],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    result = run_pass(model, "fold-constants")
    assert op_types(result.model) == ["DequantizeLinear", "MatMul"]
    assert {t.data_type for t in result.model.graph.initializer if t.name == "w_q"} == {TensorProto.INT8}


def test_fold_constants_does_not_inflate_generated_weights():
    # 8 bytes of shape -> 4 MB of zeros: materializing it is what inflates models 1000x.
    shape = numpy_helper.from_array(np.array([1024, 1024], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["w"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    result = run_pass(model, "fold-constants")
    assert "ConstantOfShape" in op_types(result.model)
    assert result.model.ByteSize() < 10_000
    assert result.records[0].stats["refused_size"] == 1


def test_fold_constants_leaves_random_ops():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 13]>
        g (float[2,2] x) => (float[2,2] y) {
            r = RandomUniform <shape = [2, 2], seed = 1.0> ()
            y = Add(x, r)
        }
        """
    )
    result = run_pass(model, "fold-constants", verify="structural")
    assert "RandomUniform" in op_types(result.model)


@pytest.mark.parametrize("spec", ["cleanup", "fold-constants"])
def test_passes_are_idempotent_on_a_small_graph(spec):
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y) {
            one = Constant <value = float[1] {1}> ()
            two = Add(one, one)
            a = Identity(x)
            y = Mul(a, two)
        }
        """
    )
    first = run_pass(model, spec).model
    second = run_pass(first, spec)
    assert not second.records[0].changed
    assert_same_outputs(model, first, random_inputs(model))
