"""Differential tests for ``simplify-layout-ops``, ``remove-noop-arithmetic``, ``cse`` and ``fold-shapes``."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import assert_same_outputs, op_types, parse_model, random_inputs, run_pass
from onnx import TensorProto, helper, numpy_helper

from optimizer import PassManager
from optimizer.pass_base import PassContext
from passes.graph_utils import infer_static_shapes, infer_tensor_types
from passes.simplify import cast_pair_is_exact


def run_twice(model, spec, verify="numeric", ctx=None):
    """Run ``spec``; check a second run changes nothing; return the first run."""
    first = PassManager(spec, verify=verify).run(model, ctx)
    second = PassManager(spec, verify="structural").run(first.model, ctx)
    assert not second.records[0].changed, f"{spec} is not idempotent: {second.records[0].stats}"
    return first


def ops(model):
    """Op types without ``Constant`` nodes (test models write small constants as nodes)."""
    return [op for op in op_types(model) if op != "Constant"]


def stats(result):
    return result.records[0].stats


def input_shape(model, index=0):
    dims = model.graph.input[index].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def if_model(then_nodes, else_nodes, then_out, else_out, x_shape, y_shape, opset=17, elem=TensorProto.FLOAT):
    """``y = If(c, then, else)``; both branches read the outer input ``x``."""
    out = lambda name: helper.make_tensor_value_info(name, elem, y_shape)  # noqa: E731
    then_g = helper.make_graph(then_nodes, "then", [], [out(then_out)])
    else_g = helper.make_graph(else_nodes, "else", [], [out(else_out)])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
        "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", elem, x_shape)],
        [out("y")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def assert_same_for_both_branches(model, optimized, x):
    for cond in (True, False):
        assert_same_outputs(model, optimized, {"c": np.array(cond), "x": x})


# -- shape helpers ------------------------------------------------------------------------------


def test_inferred_shapes_use_given_input_shapes_without_changing_the_graph():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] y) {
            y = Relu(x)
        }
        """
    )
    graph = gs.import_onnx(model)
    assert infer_tensor_types(graph)["y"][0] == (None, 3)
    assert "y" not in infer_static_shapes(graph)
    assert infer_static_shapes(graph, {"x": (5, 3)})["y"] == ((5, 3), np.dtype(np.float32))
    assert graph.inputs[0].shape == ["N", 3]


# -- simplify-layout-ops ------------------------------------------------------------------------


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


@pytest.mark.parametrize("spec", ["simplify-layout-ops", "remove-noop-arithmetic", "cse", "fold-shapes"])
def test_bfloat16_constants_and_casts_are_handled(spec):
    bf16_ones = helper.make_tensor("w", TensorProto.BFLOAT16, [3], [1.0, 1.0, 1.0])
    bf16_copy = helper.make_tensor("w2", TensorProto.BFLOAT16, [3], [1.0, 1.0, 1.0])
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BFLOAT16),
            helper.make_node("Cast", ["b"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["f"], ["b2"], to=TensorProto.BFLOAT16),
            helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["w2"], ["wf2"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["b2"], ["g"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["g", "wf"], ["h"]),
            helper.make_node("Mul", ["h", "wf2"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[bf16_ones, bf16_copy],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    result = run_twice(model, spec)
    if spec == "simplify-layout-ops":  # bf16 -> f32 -> bf16 is exact; f32 -> bf16 -> f32 is not
        assert stats(result)["cast_merged"] == 1 and stats(result)["removed_cast"] == 1
        assert stats(result)["skipped_lossy_cast"] == 2  # x -> bf16 -> f32, seen from two readers
    assert_same_outputs(model, result.model, rtol=0, atol=0)


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


# -- remove-noop-arithmetic ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    ["y = Mul(r, one)", "y = Mul(one, r)", "y = Add(r, zero)", "y = Add(zero, r)", "y = Sub(r, zero)",
     "y = Div(r, one)", "y = Pow(r, one)", "y = Mul(r, ones3)", "y = Add(r, zeros13)"],
)
def test_neutral_constants_are_removed(body):
    model = parse_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] y)
        <float one = {{1.0}}, float[3] ones3 = {{1.0, 1.0, 1.0}}, float[1, 3] zeros13 = {{0.0, -0.0, 0.0}}> {{
            zero = Constant<value = float {{0.0}}>()
            r = Relu(x)
            {body}
        }}
        """
    )
    result = run_twice(model, "remove-noop-arithmetic")
    assert ops(result.model) == ["Relu"]
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert_same_outputs(model, result.model, random_inputs(model, shapes={"x": (4, 3)}), rtol=0, atol=0)


@pytest.mark.parametrize(
    "x_type,body,reason",
    [
        ("float[3]", "y = Mul(x, ones23)", "skipped_broadcast"),  # the constant enlarges x
        ("float[2, 3]", "y = Mul(x, ones113)", "skipped_broadcast"),  # adds a dim
        ("float[N, M]", "y = Add(x, zeros3)", "skipped_unknown_shape"),  # M may be 1 (broadcast) or 3
        ("float[2, 3]", "y = Mul(x, almost)", None),
        ("float[2, 3]", "y = Sub(zero, x)", None),
        ("float[2, 3]", "y = Div(one, x)", None),
    ],
)
def test_arithmetic_that_is_not_a_noop_is_kept(x_type, body, reason):
    out = {"float[3]": "float[2, 3]", "float[2, 3]": "float[2, 3]", "float[N, M]": "float[N, 3]"}[x_type]
    if "ones113" in body:
        out = "float[1, 2, 3]"
    model = parse_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g ({x_type} x) => ({out} y)
        <float one = {{1.0}}, float zero = {{0.0}}, float[2, 3] ones23 = {{1.0, 1.0, 1.0, 1.0, 1.0, 1.0}},
         float[1, 1, 3] ones113 = {{1.0, 1.0, 1.0}}, float[3] zeros3 = {{0.0, 0.0, 0.0}},
         float[3] almost = {{1.0, 1.0, 1.0001}}> {{
            {body}
        }}
        """
    )
    result = run_twice(model, "remove-noop-arithmetic")
    assert len(ops(result.model)) == 1
    assert not result.records[0].changed
    if reason:
        assert stats(result)[reason] == 1


def test_noop_on_graph_input_feeding_graph_output_is_kept():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (int64[4] x) => (int64[4] y, int64[4] z)
        <int64 zero = {0}> {
            y = Add(x, zero)
            r = Neg(x)
            z = Add(r, zero)
        }
        """
    )
    result = run_twice(model, "remove-noop-arithmetic")
    assert ops(result.model) == ["Add", "Neg"]
    assert stats(result) == {"kept_graph_output": 1, "removed_add": 1}
    assert [o.name for o in result.model.graph.output] == ["y", "z"]
    assert_same_outputs(model, result.model, {"x": np.array([-3, 0, 7, 2**40], np.int64)}, rtol=0, atol=0)


def test_noop_arithmetic_is_removed_inside_if_branches():
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    then_nodes = [
        helper.make_node("Constant", [], ["one_c"], value=one),
        helper.make_node("Mul", ["x", "one_c"], ["t1"]),
        helper.make_node("Relu", ["t1"], ["t_out"]),
    ]
    else_nodes = [helper.make_node("Neg", ["x"], ["e_out"])]
    model = if_model(then_nodes, else_nodes, "t_out", "e_out", [2, 3], [2, 3])
    result = run_twice(model, "remove-noop-arithmetic")
    assert "Mul" not in ops(result.model)
    assert_same_for_both_branches(model, result.model, np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3))


# -- cse ----------------------------------------------------------------------------------------


def test_duplicate_shape_chains_merge_in_cascade():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, S, 8] x) => (float[N, S, 2, 4] y, float[N, S, 2, 4] z) {
            s1 = Shape(x)
            i1 = Constant<value = int64 {0}>()
            g1 = Gather<axis = 0>(s1, i1)
            a1 = Constant<value = int64[1] {0}>()
            u1 = Unsqueeze(g1, a1)
            s2 = Shape(x)
            i2 = Constant<value = int64 {0}>()
            g2 = Gather<axis = 0>(s2, i2)
            a2 = Constant<value = int64[1] {0}>()
            u2 = Unsqueeze(g2, a2)
            rest = Constant<value = int64[3] {-1, 2, 4}>()
            shape1 = Concat<axis = 0>(u1, rest)
            shape2 = Concat<axis = 0>(u2, rest)
            f = Reshape(x, shape1)
            y = Relu(f)
            h = Reshape(x, shape2)
            z = Sigmoid(h)
        }
        """
    )
    result = run_twice(model, "cse")
    assert sorted(op_types(result.model)) == sorted(
        ["Shape", "Constant", "Gather", "Constant", "Unsqueeze", "Constant", "Concat", "Reshape", "Relu", "Sigmoid"]
    )
    assert stats(result)["nodes_merged"] == 7
    assert_same_outputs(model, result.model, random_inputs(model, shapes={"x": (2, 3, 8)}))


def test_equal_initializers_are_deduplicated_so_their_readers_merge():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 5)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"]),
            helper.make_node("MatMul", ["x", "w2"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
            helper.make_node("Reshape", ["x", "flat_shape"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 5]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [4]),
        ],
        initializer=[
            numpy_helper.from_array(w, "w1"),
            numpy_helper.from_array(w.copy(), "w2"),
            numpy_helper.from_array(np.array([4], np.int64), "flat_shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    result = run_twice(model, "cse")
    assert sorted(op_types(result.model)) == ["Add", "MatMul", "Reshape"]
    assert stats(result)["constants_deduplicated"] == 1
    assert_same_outputs(model, result.model)


def test_scalar_and_one_element_constants_with_the_same_bytes_stay_apart():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[3] y, float[1, 2, 3] z)
        <int64 idx = {0}, int64[1] axes = {0}> {
            y = Gather<axis = 0>(x, idx)
            z = Unsqueeze(x, axes)
        }
        """
    )
    result = run_twice(model, "cse")
    assert not result.records[0].changed
    assert sorted(i.name for i in result.model.graph.initializer) == ["axes", "idx"]


def test_attributes_must_match_exactly():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            a = LeakyRelu<alpha = 0.1>(x)
            b = LeakyRelu<alpha = 0.2>(x)
            c = LeakyRelu<alpha = 0.1>(x)
            t1 = Transpose<perm = [1, 0]>(x)
            t2 = Transpose(x)
            t3 = Transpose<perm = [1, 0]>(x)
            d = Add(a, b)
            e = Add(d, c)
            t = Add(t1, t2)
            u = Add(t, t3)
            ut = Transpose<perm = [1, 0]>(u)
            y = Add(e, ut)
        }
        """
    )
    result = run_twice(model, "cse")
    assert op_types(result.model).count("LeakyRelu") == 2
    assert op_types(result.model).count("Transpose") == 3  # perm missing vs [1, 0]: not compared by meaning
    assert stats(result)["nodes_merged"] == 2
    assert_same_outputs(model, result.model)


def test_identical_constant_nodes_merge():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            c1 = Constant<value = float[3] {1.0, 2.0, 3.0}>()
            c2 = Constant<value = float[3] {1.0, 2.0, 3.0}>()
            c3 = Constant<value = float[3] {1.0, 2.0, -3.0}>()
            a = Add(x, c1)
            b = Add(x, c2)
            c = Add(x, c3)
            d = Mul(a, b)
            y = Mul(d, c)
        }
        """
    )
    result = run_twice(model, "cse")
    assert op_types(result.model).count("Constant") == 2
    assert op_types(result.model).count("Add") == 2
    assert_same_outputs(model, result.model)


def test_two_graph_outputs_are_never_merged_but_one_output_is_kept():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y1, float[2, 3] y2, float[2, 3] y3) {
            y1 = Relu(x)
            y2 = Relu(x)
            a = Sigmoid(x)
            y3 = Sigmoid(x)
            b = Neg(a)
            c = Neg(y3)
            d = Add(b, c)
            e = Relu(d)
        }
        """
    )
    model.graph.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3]))
    result = run_twice(model, "cse")
    assert op_types(result.model).count("Relu") == 3  # y1, y2 and e
    assert op_types(result.model).count("Sigmoid") == 1
    assert op_types(result.model).count("Neg") == 1  # b and c merged once a became y3
    assert [o.name for o in result.model.graph.output] == ["y1", "y2", "y3", "e"]
    assert stats(result)["skipped_graph_outputs"] == 1
    assert_same_outputs(model, result.model)


def test_random_ops_are_never_merged():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            a = RandomNormalLike(x)
            b = RandomNormalLike(x)
            y = Sub(a, b)
        }
        """
    )
    result = run_twice(model, "cse", verify="structural")
    assert op_types(result.model).count("RandomNormalLike") == 2
    assert stats(result)["skipped_random"] == 1


def test_quantize_dequantize_nodes_and_their_constants_are_left_alone():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 3] y)
        <int8[4, 3] wq = {1, -2, 3, 4, 5, -6, 7, 8, 9, 10, 11, 12}, float s1 = {0.02}, float s2 = {0.02}> {
            w1 = DequantizeLinear(wq, s1)
            w2 = DequantizeLinear(wq, s2)
            a = MatMul(x, w1)
            b = MatMul(x, w2)
            y = Add(a, b)
        }
        """
    )
    result = run_twice(model, "cse")
    assert op_types(result.model).count("DequantizeLinear") == 2
    assert sorted(i.name for i in result.model.graph.initializer) == ["s1", "s2", "wq"]
    assert stats(result)["skipped_qdq"] == 1
    assert_same_outputs(model, result.model)


def test_custom_domain_nodes_are_never_merged():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (float[2, 3] x) => (float[2, 3] y) {
            a = com.microsoft.Gelu(x)
            b = com.microsoft.Gelu(x)
            y = Add(a, b)
        }
        """
    )
    result = run_twice(model, "cse")
    assert op_types(result.model).count("Gelu") == 2
    assert stats(result)["skipped_custom_domain"] == 1


def test_nodes_with_subgraphs_are_never_merged_but_bodies_are_simplified():
    body = lambda name: helper.make_graph(  # noqa: E731
        [
            helper.make_node("Relu", ["x"], [f"{name}_a"]),
            helper.make_node("Relu", ["x"], [f"{name}_b"]),
            helper.make_node("Add", [f"{name}_a", f"{name}_b"], [f"{name}_out"]),
        ],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("If", ["c"], ["y1"], then_branch=body("t1"), else_branch=body("e1")),
            helper.make_node("If", ["c"], ["y2"], then_branch=body("t2"), else_branch=body("e2")),
            helper.make_node("Add", ["y1", "y2"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    result = run_twice(model, "cse")
    assert op_types(result.model).count("If") == 2
    assert op_types(result.model).count("Relu") == 4  # one per branch
    assert stats(result)["skipped_subgraph"] == 1 and stats(result)["nodes_merged"] == 4
    assert_same_for_both_branches(model, result.model, np.array([-1.0, 2.0], np.float32))


# -- fold-shapes --------------------------------------------------------------------------------

RESHAPE_BY_SHAPE = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[{dims}] x) => (float[{out}] y) {{
        s = Shape(x)
        i0 = Constant<value = int64 {{0}}>()
        d0 = Gather<axis = 0>(s, i0)
        i1 = Constant<value = int64 {{1}}>()
        d1 = Gather<axis = 0>(s, i1)
        ax = Constant<value = int64[1] {{0}}>()
        u0 = Unsqueeze(d0, ax)
        u1 = Unsqueeze(d1, ax)
        rest = Constant<value = int64[2] {{2, 2}}>()
        shape = Concat<axis = 0>(u0, u1, rest)
        y = Reshape(x, shape)
    }}
"""


def test_static_shape_chain_folds_into_a_constant():
    model = parse_model(RESHAPE_BY_SHAPE.format(dims="2, 3, 4", out="2, 3, 2, 2"))
    result = run_twice(model, "fold-shapes")
    assert op_types(result.model) == ["Reshape"]
    assert stats(result)["shapes_folded"] == 1 and stats(result)["tensors_folded"] == 1
    assert "inputs_made_static" not in stats(result)
    assert_same_outputs(model, result.model)


def test_dynamic_input_without_given_shapes_is_left_dynamic():
    model = parse_model(RESHAPE_BY_SHAPE.format(dims="N, S, 4", out="N, S, 2, 2"))
    result = run_twice(model, "fold-shapes")
    assert not result.records[0].changed
    assert stats(result)["skipped_dynamic"] == 1
    assert input_shape(result.model) == ["N", "S", 4]


def test_given_input_shapes_are_folded_and_baked_into_the_inputs():
    model = parse_model(RESHAPE_BY_SHAPE.format(dims="N, S, 4", out="N, S, 2, 2"))
    ctx = PassContext(input_shapes={"x": (2, 5, 4)})
    result = run_twice(model, "fold-shapes", ctx=ctx)
    assert op_types(result.model) == ["Reshape"]
    assert stats(result)["inputs_made_static"] == 1
    assert input_shape(result.model) == [2, 5, 4]
    assert result.records[0].verification == "passed"
    assert_same_outputs(model, result.model, random_inputs(model, shapes={"x": (2, 5, 4)}))


def test_given_shapes_can_be_declined():
    model = parse_model(RESHAPE_BY_SHAPE.format(dims="N, S, 4", out="N, S, 2, 2"))
    ctx = PassContext(input_shapes={"x": (2, 5, 4)})
    result = run_twice(model, "fold-shapes(use_input_shapes=false)", ctx=ctx)
    assert not result.records[0].changed
    assert input_shape(result.model) == ["N", "S", 4]


@pytest.mark.parametrize("given,reference", [((2, 5), None), ((2, 5, 8), None), ((2, 5, 4), (3, 5, 4))])
def test_given_shapes_that_contradict_the_model_or_the_data_are_not_used(given, reference):
    model = parse_model(RESHAPE_BY_SHAPE.format(dims="N, S, 4", out="N, S, 2, 2"))
    ctx = PassContext(input_shapes={"x": given})
    if reference is not None:
        ctx.reference_inputs = {"x": np.zeros(reference, np.float32)}
    result = PassManager("fold-shapes", verify="structural").run(model, ctx)
    assert not result.records[0].changed
    assert stats(result)["skipped_input_shapes"] == 1
    assert input_shape(result.model) == ["N", "S", 4]


def test_given_shapes_are_not_baked_when_no_fold_needs_them():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 3, 4] x) => (float[N, 12] y) {
            s = Shape(x)
            i = Constant<value = int64[1] {2}>()
            d = Gather<axis = 0>(s, i)
            three = Constant<value = int64[1] {3}>()
            t = Mul(d, three)
            m1 = Constant<value = int64[1] {-1}>()
            shape = Concat<axis = 0>(m1, t)
            y = Reshape(x, shape)
        }
        """
    )
    result = run_twice(model, "fold-shapes", ctx=PassContext(input_shapes={"x": (2, 3, 4)}))
    assert op_types(result.model) == ["Reshape"]
    assert stats(result)["shape_reads_folded"] == 1 and "inputs_made_static" not in stats(result)
    assert input_shape(result.model) == ["N", 3, 4]
    for n in (1, 5):
        assert_same_outputs(model, result.model, random_inputs(model, shapes={"x": (n, 3, 4)}))


def test_static_dims_of_a_dynamic_shape_fold_and_shape_start_end_are_honoured():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 3, 4] x) => (int64[2] a, int64[1] b, int64[2] c, int64[1] d, int64 e) {
            a = Shape<start = 1>(x)
            b = Shape<start = -1>(x)
            s = Shape(x)
            one = Constant<value = int64[1] {1}>()
            big = Constant<value = int64[1] {100}>()
            c = Slice(s, one, big)
            n = Constant<value = int64[1] {0}>()
            d = Gather<axis = 0>(s, n)
            sz = Size(x)
            e = Mul(sz, sz)
        }
        """
    )
    result = run_twice(model, "fold-shapes")
    ops = op_types(result.model)
    assert ops.count("Shape") == 1 and "Gather" in ops and "Size" in ops  # N stays dynamic
    assert stats(result)["shapes_folded"] == 2 and stats(result)["shape_reads_folded"] == 1
    assert [o.name for o in result.model.graph.output] == ["a", "b", "c", "d", "e"]
    for n in (1, 6):
        assert_same_outputs(model, result.model, random_inputs(model, shapes={"x": (n, 3, 4)}), rtol=0, atol=0)


def test_shape_of_an_intermediate_tensor_folds_where_fold_constants_cannot():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 3, 4] x) => (float[6, 5] y)
        <float[4, 5] w = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0}> {
            m = MatMul(x, w)
            s = Shape(m)
            i = Constant<value = int64[1] {2}>()
            d = Gather<axis = 0>(s, i)
            m1 = Constant<value = int64[1] {-1}>()
            shape = Concat<axis = 0>(m1, d)
            y = Reshape(m, shape)
        }
        """
    )
    assert "Shape" in op_types(run_pass(model, "fold-constants").model)  # graphsurgeon lacks m's shape
    result = run_twice(model, "fold-shapes")
    assert op_types(result.model) == ["MatMul", "Reshape"]
    assert_same_outputs(model, result.model)


def test_large_shape_consumers_are_not_materialized():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[64, 64] x) => (float[64, 64] y) {
            s = Shape(x)
            c = ConstantOfShape<value = float[1] {0.5}>(s)
            y = Add(x, c)
        }
        """
    )
    result = run_twice(model, "fold-shapes")
    assert op_types(result.model) == ["ConstantOfShape", "Add"]
    assert sum(numpy_helper.to_array(t).size for t in result.model.graph.initializer) == 2
    assert_same_outputs(model, result.model)


def test_shapes_fold_inside_if_branches():
    ax = helper.make_tensor("ax", TensorProto.INT64, [1], [0])
    then_nodes = [
        helper.make_node("Shape", ["x"], ["ts"], start=1),
        helper.make_node("Constant", [], ["tm1"], value=helper.make_tensor("m1", TensorProto.INT64, [1], [-1])),
        helper.make_node("Concat", ["tm1", "ts"], ["tshape"], axis=0),
        helper.make_node("Reshape", ["x", "tshape"], ["t_out"]),
    ]
    else_nodes = [
        helper.make_node("Constant", [], ["eax"], value=ax),
        helper.make_node("Unsqueeze", ["x", "eax"], ["e1"]),
        helper.make_node("Shape", ["e1"], ["es"], start=1),
        helper.make_node("Reshape", ["e1", "es"], ["e_out"]),
    ]
    model = if_model(then_nodes, else_nodes, "t_out", "e_out", [1, 3], [1, 3], opset=17)
    result = run_twice(model, "fold-shapes")
    assert "Shape" not in op_types(result.model)
    assert_same_for_both_branches(model, result.model, np.array([[1.0, -2.0, 3.0]], np.float32))


def test_loop_carried_shapes_are_not_assumed_fixed():
    # y starts as [3] and doubles every iteration: nothing about its shape inside the body is static.
    body = helper.make_graph(
        [
            helper.make_node("Shape", ["y_in"], ["s"]),
            helper.make_node("ConstantOfShape", ["s"], ["zeros"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
            helper.make_node("Concat", ["y_in", "zeros"], ["y_cat"], axis=0),
            helper.make_node("Constant", [], ["ax"], value=helper.make_tensor("ax", TensorProto.INT64, [1], [0])),
            helper.make_node("Unsqueeze", ["y_cat", "ax"], ["y_u"]),
            helper.make_node("Squeeze", ["y_u", "ax"], ["y_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_in", TensorProto.FLOAT, None),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("y_out", TensorProto.FLOAT, None)],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
        "g",
        [helper.make_tensor_value_info("n", TensorProto.INT64, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["L"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    for spec in ("simplify-layout-ops", "fold-shapes", "cse", "remove-noop-arithmetic"):
        result = run_twice(model, spec)
        assert not result.records[0].changed, spec
    result = PassManager("fixpoint(simplify-layout-ops,remove-noop-arithmetic,cse,fold-shapes)").run(model)
    assert "Shape" in op_types(result.model)
    for n in (0, 1, 3):
        assert_same_outputs(model, result.model, {"n": np.array(n, np.int64), "x": np.array([1, -2, 3], np.float32)})


def _ort_dynamic_quantized_lstm(tmp_path):
    """An LSTM and a MatMul through ``onnxruntime.quantization.quantize_dynamic`` (LSTM ->
    ``com.microsoft`` ``DynamicQuantizeLSTM``; MatMul -> ``DynamicQuantizeLinear`` + ``MatMulInteger``),
    then re-annotated by onnx shape inference as shape tools do: it knows no ``com.microsoft``
    schema, so the contrib op's outputs get a value_info with an element type and no shape -- among
    them ``Y_h``, the LSTM's final hidden state, which is also a graph output (with its shape)."""
    pytest.importorskip("onnxruntime.quantization")
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    t, b, i, h = 5, 2, 4, 8
    weights = {
        "W": rng.normal(0, 0.5, (1, 4 * h, i)), "R": rng.normal(0, 0.5, (1, 4 * h, h)),
        "bias": rng.normal(0, 0.1, (1, 8 * h)), "Wm": rng.normal(0, 0.5, (h, 6)),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()] + [
        numpy_helper.from_array(np.array(v, np.int64), k)
        for k, v in {"axis1": [1], "zero": 0, "axis0": [0], "minus1": [-1]}.items()
    ]
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R", "bias"], ["Y", "Y_h"], hidden_size=h),
        helper.make_node("Squeeze", ["Y", "axis1"], ["ys"]),
        helper.make_node("MatMul", ["ys", "Wm"], ["z"]),
        helper.make_node("Shape", ["x"], ["s"]),  # static: what fold-shapes folds
        helper.make_node("Gather", ["s", "zero"], ["steps"]),
        helper.make_node("Unsqueeze", ["steps", "axis0"], ["steps1"]),
        helper.make_node("Concat", ["steps1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["z", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "lstm_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, b, i])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [t, b * 6]),
         helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, b, h])],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), tmp_path / "float.onnx")
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "Please consider to run pre-processing"
    try:
        quantize_dynamic(tmp_path / "float.onnx", tmp_path / "quant.onnx", weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().setLevel(level)
    model = onnx.load(tmp_path / "quant.onnx")
    assert {n.op_type for n in model.graph.node} >= {"DynamicQuantizeLSTM", "DynamicQuantizeLinear", "MatMulInteger"}
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    typed = {v.name for v in model.graph.value_info}
    for node in model.graph.node:
        if node.domain == "com.microsoft":
            model.graph.value_info.extend(
                helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output if o and o not in typed
            )
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _declared_io(model):
    return [(v.name, v.type.SerializeToString()) for v in list(model.graph.input) + list(model.graph.output)]


def test_fold_shapes_on_ort_dynamic_quantized_lstm_keeps_declared_output_shapes(tmp_path):
    # graphsurgeon's importer took Y_h's type from its value_info entry (element type, no shape)
    # instead of the graph output's own, so the exported model had an output without a shape:
    # "Field 'shape' of 'type' is required but missing". passes.graph_utils.import_graph keeps it.
    from optimizer.manager import graph_to_model
    from passes.graph_utils import import_graph
    from passes.simplify import FoldShapes

    model = _ort_dynamic_quantized_lstm(tmp_path)
    graph = import_graph(model)
    assert [t.shape for t in graph.outputs] == [[5, 12], [1, 2, 8]]
    result = FoldShapes().run(graph, PassContext())
    assert result.changed and result.stats["shapes_folded"] == 1
    optimized = graph_to_model(graph.cleanup().toposort(), model)
    onnx.checker.check_model(optimized, full_check=True)
    assert _declared_io(optimized) == _declared_io(model)
    assert "Shape" not in op_types(optimized) and "DynamicQuantizeLSTM" in op_types(optimized)
    for seed in range(3):
        assert_same_outputs(model, optimized, random_inputs(model, seed=seed))


@pytest.mark.parametrize("spec", ["fold-shapes", "default"])
def test_passes_on_ort_dynamic_quantized_lstm(tmp_path, spec):
    model = _ort_dynamic_quantized_lstm(tmp_path)
    result = PassManager(spec).run(model)
    assert not [(r.spec, r.error) for r in result.records if r.error or r.rolled_back]
    assert not [w for w in result.warnings if "rolled back" in w], result.warnings
    assert result.records[0].changed if spec == "fold-shapes" else any(r.changed for r in result.records)
    onnx.checker.check_model(result.model, full_check=True)
    assert _declared_io(result.model) == _declared_io(model)
    for seed in range(3):
        assert_same_outputs(model, result.model, random_inputs(model, seed=seed))


# -- all four together on the sample transformer ------------------------------------------------


def test_simplify_pipeline_on_the_transformer_sample():
    from helpers import SAMPLES

    from optimizer.io import load_model

    model, _ = load_model(SAMPLES / "transformer" / "model.onnx")
    spec = "fixpoint(cleanup,fold-constants,simplify-layout-ops,remove-noop-arithmetic,cse,fold-shapes)"
    dynamic = PassManager(spec).run(model)
    baked = PassManager(spec).run(model, PassContext(input_shapes={"tokens_embedded": (2, 16, 32)}))
    base = PassManager("fixpoint(cleanup,fold-constants)").run(model)
    assert len(dynamic.model.graph.node) < len(base.model.graph.node)
    assert len(baked.model.graph.node) < len(dynamic.model.graph.node)
    assert "Shape" not in op_types(baked.model) and op_types(dynamic.model).count("Shape") == 1
    assert input_shape(dynamic.model) == ["batch", "seq", 32]
    assert input_shape(baked.model) == [2, 16, 32]
    for batch, seq in ((1, 16), (3, 7)):
        assert_same_outputs(model, dynamic.model, random_inputs(model, shapes={"tokens_embedded": (batch, seq, 32)}))
    assert_same_outputs(model, baked.model, random_inputs(model, shapes={"tokens_embedded": (2, 16, 32)}))
