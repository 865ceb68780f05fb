"""Differential tests for ``cse`` (passes/cse.py)."""

import numpy as np
from helpers import assert_same_outputs, op_types, parse_model, random_inputs
from onnx import TensorProto, helper, numpy_helper
from simplify_helpers import assert_same_for_both_branches, run_twice, stats

from optimizer import PassManager


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


def test_weight_dequantizers_with_value_equal_scales_merge_but_their_constants_stay():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 3] y, float[2, 4] z)
        <int8[4, 3] wq = {1, -2, 3, 4, 5, -6, 7, 8, 9, 10, 11, 12}, float s1 = {0.02}, float s2 = {0.02},
         float s3 = {0.02}> {
            w1 = DequantizeLinear(wq, s1)
            w2 = DequantizeLinear(wq, s2)
            a = MatMul(x, w1)
            b = MatMul(x, w2)
            y = Add(a, b)
            z = Mul(x, s3)
        }
        """
    )
    result = run_twice(model, "cse")
    assert op_types(result.model).count("DequantizeLinear") == 1
    assert op_types(result.model).count("MatMul") == 1  # its readers became identical too
    # s3 equals s1 but feeds no Q/DQ: it is not merged into the quantizer's constant
    assert sorted(i.name for i in result.model.graph.initializer) == ["s1", "s3", "wq"]
    assert stats(result)["skipped_qdq"] == 1
    assert_same_outputs(model, result.model)


QDQ_TWINS = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[2, 8] x) => (float[2, 8] y)
<float sa = {0.04}, int8 za = {0}, float sb = {SB}, ZB_TYPE zb = {0}> {
    qa = QuantizeLinear(x, sa, za)
    da = DequantizeLinear(qa, sa, za)
    qb = QuantizeLinear(x, sb, zb)
    db = DequantizeLinear(qb, sb, zb)
    ra = Relu(da)
    rb = Sigmoid(db)
    y = Add(ra, rb)
}
"""


def test_value_equal_quantize_dequantize_pairs_of_one_tensor_merge():
    # A residual branch quantized twice with the same parameters (the zoo's qdq_prequant): one pair remains.
    model = parse_model(QDQ_TWINS.replace("SB", "0.04").replace("ZB_TYPE", "int8"))
    result = run_twice(model, "cse")
    assert op_types(result.model).count("QuantizeLinear") == 1
    assert op_types(result.model).count("DequantizeLinear") == 1
    assert stats(result)["nodes_merged"] == 2
    rng = np.random.default_rng(0)
    for scale in (0.1, 3.0, 10.0):  # inputs inside, around and far beyond the int8 range
        assert_same_outputs(model, result.model, {"x": (rng.standard_normal((2, 8)) * scale).astype(np.float32)},
                            rtol=0, atol=0)


def test_quantize_dequantize_pairs_with_other_parameters_stay_apart():
    for sb, zb_type in (("0.05", "int8"), ("0.04", "uint8")):  # another scale; another zero-point type
        model = parse_model(QDQ_TWINS.replace("SB", sb).replace("ZB_TYPE", zb_type))
        result = PassManager("cse").run(model)
        assert op_types(result.model).count("QuantizeLinear") == 2, (sb, zb_type)
        assert op_types(result.model).count("DequantizeLinear") == 2, (sb, zb_type)
        assert_same_outputs(model, result.model, random_inputs(model))


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
