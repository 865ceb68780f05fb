"""Differential tests for ``remove-noop-arithmetic`` (passes/remove_noop_arithmetic.py)."""

import numpy as np
import pytest
from helpers import assert_same_outputs, parse_model, random_inputs
from onnx import TensorProto, helper
from simplify_helpers import assert_same_for_both_branches, if_model, ops, run_twice, stats


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
