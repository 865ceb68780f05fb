"""Differential tests for ``simplify-layout-ops`` (passes/simplify_layout_ops.py)."""

import numpy as np
import pytest
from helpers import assert_same_outputs, parse_model, random_inputs
from onnx import TensorProto, helper
from simplify_helpers import assert_same_for_both_branches, if_model, ops, run_twice, stats

from passes.simplify_layout_ops import cast_pair_is_exact


def test_transpose_pair_composes_into_one():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 3, 4] x) => (float[3, 2, 4] y) {
            a = Transpose<perm = [1, 2, 0]>(x)
            y = Transpose<perm = [0, 2, 1]>(a)
        }
        """
    )
    result = run_twice(model, "simplify-layout-ops")
    assert ops(result.model) == ["Transpose"]
    perm = helper.get_attribute_value(result.model.graph.node[0].attribute[0])
    assert perm == [1, 0, 2]
    assert stats(result)["transpose_merged"] == 1
    assert_same_outputs(model, result.model)


def test_inverse_transposes_cancel_and_the_output_name_is_kept():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
            r = Relu(x)
            a = Transpose<perm = [0, 2, 1]>(r)
            b = Transpose<perm = [0, 2, 1]>(a)
            c = Transpose<perm = [1, 0, 2]>(b)
            y = Transpose<perm = [1, 0, 2]>(c)
        }
        """
    )
    result = run_twice(model, "simplify-layout-ops")
    assert ops(result.model) == ["Relu"]
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert result.model.graph.node[0].output[0] == "y"
    assert_same_outputs(model, result.model)


def test_identity_transpose_between_graph_input_and_output_is_kept():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            y = Transpose<perm = [0, 1]>(x)
        }
        """
    )
    result = run_twice(model, "simplify-layout-ops")
    assert ops(result.model) == ["Transpose"]
    assert not result.records[0].changed
    assert stats(result)["kept_graph_output"] == 1


def test_transpose_without_perm_reverses_axes_when_composed():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 3, 4] x) => (float[3, N, 4] y) {
            a = Transpose(x)
            y = Transpose<perm = [1, 2, 0]>(a)
        }
        """
    )
    result = run_twice(model, "simplify-layout-ops")
    assert ops(result.model) == ["Transpose"]
    assert_same_outputs(model, result.model, random_inputs(model, shapes={"x": (5, 3, 4)}))


def test_reshape_chain_reads_the_first_input_and_keeps_a_shared_reshape():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 3, 4] x) => (float[N, 12] y, float[N, 4, 3] z) {
            s1 = Constant<value = int64[2] {-1, 4}>()
            a = Reshape(x, s1)
            s2 = Constant<value = int64[3] {-1, 4, 3}>()
            z = Reshape(a, s2)
            s3 = Constant<value = int64[2] {-1, 12}>()
            b = Relu(a)
            y = Reshape(b, s3)
        }
        """
    )
    result = run_twice(model, "simplify-layout-ops")
    nodes = {n.output[0]: n for n in result.model.graph.node}
    assert nodes["z"].input[0] == "x"  # merged even though `a` has another reader
    assert ops(result.model).count("Reshape") == 3
    assert stats(result)["reshape_merged"] == 1
    assert_same_outputs(model, result.model, random_inputs(model, shapes={"x": (2, 3, 4)}))


def test_reshape_with_zero_in_shape_is_not_merged_without_static_shapes():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 3, 4] x) => (float[N, 4, 3] y) {
            s1 = Constant<value = int64[2] {0, -1}>()
            a = Reshape(x, s1)
            s2 = Constant<value = int64[3] {0, 4, 3}>()
            y = Reshape(a, s2)
        }
        """
    )
    result = run_twice(model, "simplify-layout-ops")
    assert ops(result.model) == ["Reshape", "Reshape"]
    assert not result.records[0].changed
    assert stats(result)["skipped_unknown_shape"] >= 1


def test_squeeze_unsqueeze_flatten_chain_becomes_one_reshape():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 1, 3, 4] x) => (float[1, 24] y) {
            ax1 = Constant<value = int64[1] {1}>()
            a = Squeeze(x, ax1)
            ax0 = Constant<value = int64[1] {0}>()
            b = Unsqueeze(a, ax0)
            y = Flatten<axis = 1>(b)
        }
        """
    )
    result = run_twice(model, "simplify-layout-ops")
    assert ops(result.model) == ["Reshape"]
    assert_same_outputs(model, result.model)


def test_squeeze_unsqueeze_round_trip_disappears_in_opset_11():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 11]>
        g (float[2, 1, 3] x) => (float[2, 1, 3] y) {
            r = Relu(x)
            a = Squeeze<axes = [1]>(r)
            y = Unsqueeze<axes = [1]>(a)
        }
        """
    )
    result = run_twice(model, "simplify-layout-ops")
    assert ops(result.model) == ["Relu"]
    assert_same_outputs(model, result.model)


def test_dynamic_squeeze_unsqueeze_chain_is_skipped():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 1, 3] x) => (float[N, 3, 1] y) {
            ax1 = Constant<value = int64[1] {1}>()
            a = Squeeze(x, ax1)
            ax2 = Constant<value = int64[1] {2}>()
            y = Unsqueeze(a, ax2)
        }
        """
    )
    result = run_twice(model, "simplify-layout-ops")
    assert ops(result.model) == ["Squeeze", "Unsqueeze"]
    assert stats(result)["skipped_unknown_shape"] >= 1


CAST_INPUTS = {
    TensorProto.INT32: np.array([[-2_000_000_000, -7, 0], [5, 1_999_999_999, 123456]], np.int32),
    TensorProto.INT64: np.array([[-(2**40), -7, 0], [5, 2**35 + 3, 123456]], np.int64),
    TensorProto.INT8: np.array([[-128, -7, 0], [5, 127, 100]], np.int8),
    TensorProto.UINT8: np.array([[0, 7, 255], [5, 128, 100]], np.uint8),
    TensorProto.FLOAT16: np.array([[-65504, -1.5e-5, 0], [0.1, 3.14, 60000]], np.float16),
    TensorProto.FLOAT: np.array([[-60000.7, -1.234567e-7, 0], [0.1, 3.14159265, 2049.5]], np.float32),
}


@pytest.mark.parametrize(
    "src,mid,dst,expected",
    [
        (TensorProto.INT32, TensorProto.INT64, TensorProto.INT32, ["Neg"]),
        (TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.FLOAT16, ["Neg"]),
        (TensorProto.UINT8, TensorProto.INT32, TensorProto.FLOAT, ["Cast"]),
        (TensorProto.INT8, TensorProto.FLOAT, TensorProto.INT32, ["Neg", "Cast"]),
        (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, ["Neg", "Cast"]),
        (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.FLOAT, ["Neg", "Cast", "Cast"]),
        (TensorProto.INT64, TensorProto.INT32, TensorProto.INT64, ["Neg", "Cast", "Cast"]),
        (TensorProto.FLOAT, TensorProto.INT32, TensorProto.FLOAT, ["Neg", "Cast", "Cast"]),
        (TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.INT32, ["Neg", "Cast", "Cast"]),
    ],
    ids=["i32-i64-i32", "f16-f32-f16", "u8-i32-f32", "i8-f32-i32", "f32-f64-f16", "f32-f16-f32", "i64-i32-i64",
         "f32-i32-f32", "f16-f32-i32"],
)
def test_cast_pairs_merge_only_when_exact(src, mid, dst, expected):
    first = [] if src == TensorProto.UINT8 else [helper.make_node("Neg", ["x"], ["n"])]  # Neg has no uint8 kernel
    nodes = first + [
        helper.make_node("Cast", ["n" if first else "x"], ["a"], to=mid),
        helper.make_node("Cast", ["a"], ["y"], to=dst),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", src, [2, 3])], [helper.make_tensor_value_info("y", dst, [2, 3])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    result = run_twice(model, "simplify-layout-ops")
    assert ops(result.model) == expected
    if len(expected) == 3:
        assert stats(result)["skipped_lossy_cast"] == 1
    assert_same_outputs(model, result.model, {"x": CAST_INPUTS[src]}, rtol=0, atol=0)


def test_cast_pair_table():
    assert cast_pair_is_exact(TensorProto.BOOL, TensorProto.FLOAT, TensorProto.BOOL)
    assert cast_pair_is_exact(TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.BFLOAT16)
    assert not cast_pair_is_exact(TensorProto.UINT16, TensorProto.FLOAT16, TensorProto.UINT16)  # 2049 rounds
    assert not cast_pair_is_exact(TensorProto.INT64, TensorProto.DOUBLE, TensorProto.INT64)  # 2**53 + 1 rounds
    assert not cast_pair_is_exact(TensorProto.INT32, TensorProto.BOOL, TensorProto.INT32)


def test_identity_ops_are_removed():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            r = Relu(x)
            a = Transpose<perm = [0, 1]>(r)
            b = Cast<to = 1>(a)
            s = Constant<value = int64[2] {2, 3}>()
            c = Reshape(b, s)
            one = Constant<value = int64[1] {1}>()
            d = Expand(c, one)
            e = Expand(d, s)
            zero = Constant<value = int64[1] {0}>()
            end = Constant<value = int64[1] {9223372036854775807}>()
            f = Slice(e, zero, end, one)
            three = Constant<value = int64[1] {3}>()
            g = Slice(f, zero, three, one)
            h = Concat<axis = 0>(g)
            ax = Constant<value = int64[1] {0}>()
            i = Unsqueeze(h, ax)
            y = Squeeze(i, ax)
        }
        """
    )
    result = run_twice(model, "simplify-layout-ops")
    assert ops(result.model) == ["Relu"]
    assert result.model.graph.node[0].output[0] == "y"
    assert_same_outputs(model, result.model)


def test_partial_slice_and_broadcasting_expand_are_kept():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 2] y, float[4, 2, 3] z) {
            zero = Constant<value = int64[1] {0}>()
            two = Constant<value = int64[1] {2}>()
            one = Constant<value = int64[1] {1}>()
            y = Slice(x, zero, two, one)
            s = Constant<value = int64[3] {4, 1, 1}>()
            z = Expand(x, s)
        }
        """
    )
    result = run_twice(model, "simplify-layout-ops")
    assert sorted(ops(result.model)) == ["Expand", "Slice"]
    assert not result.records[0].changed


def test_reshape_by_its_own_shape_is_removed_for_dynamic_shapes():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, M] x) => (float[N, M] y) {
            r = Relu(x)
            s = Shape(r)
            a = Reshape(r, s)
            y = Expand(a, s)
        }
        """
    )
    result = run_twice(model, "simplify-layout-ops")
    assert ops(result.model) == ["Relu"]
    assert_same_outputs(model, result.model, random_inputs(model, shapes={"x": (3, 5)}))


def test_layout_ops_are_simplified_inside_if_branches():
    then_nodes = [
        helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0]),
        helper.make_node("Relu", ["t2"], ["t_out"]),
    ]
    else_nodes = [helper.make_node("Cast", ["x"], ["e1"], to=TensorProto.FLOAT), helper.make_node("Neg", ["e1"], ["e_out"])]
    model = if_model(then_nodes, else_nodes, "t_out", "e_out", [2, 3], [2, 3])
    result = run_twice(model, "simplify-layout-ops")
    assert sorted(ops(result.model)) == ["If", "Neg", "Relu"]
    assert_same_for_both_branches(model, result.model, np.arange(6, dtype=np.float32).reshape(2, 3) - 2)
