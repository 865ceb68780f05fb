"""Helpers for the tests of the simplification passes (``simplify-layout-ops``,
``remove-noop-arithmetic``, ``cse``, ``fold-shapes``); no tests here."""

import numpy as np
import onnx
from helpers import assert_same_outputs, op_types
from onnx import TensorProto, helper

from optimizer import PassManager


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
