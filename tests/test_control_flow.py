"""Models with If/Loop/Scan: passes recurse into bodies correctly or leave them alone."""

import numpy as np
from helpers import assert_same_outputs, op_types, run_pass
from onnx import TensorProto, helper, numpy_helper

from optimizer import PassManager


def _conv_bn_nodes(prefix, x, y):
    rng = np.random.default_rng(len(prefix))
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32), f"{prefix}_w"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), f"{prefix}_g"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), f"{prefix}_b"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), f"{prefix}_m"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), f"{prefix}_v"),
    ]
    nodes = [
        helper.make_node("Identity", [x], [f"{prefix}_xi"]),
        helper.make_node("Conv", [f"{prefix}_xi", f"{prefix}_w"], [f"{prefix}_c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", [f"{prefix}_c", f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y]),
    ]
    return nodes, inits


def test_if_branches_are_fused_and_still_correct():
    t_nodes, t_inits = _conv_bn_nodes("t", "x", "t_out")
    e_nodes, e_inits = _conv_bn_nodes("e", "x", "e_out")
    out = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 6, 6])  # noqa: E731
    then_g = helper.make_graph(t_nodes, "then", [], [out("t_out")], initializer=t_inits)
    else_g = helper.make_graph(e_nodes, "else", [], [out("e_out")], initializer=e_inits)
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
        "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [out("y")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    result = PassManager("default").run(model)
    ops = op_types(result.model)
    assert "BatchNormalization" not in ops and "Identity" not in ops and ops.count("Conv") == 2
    x = np.random.default_rng(0).normal(size=(1, 4, 6, 6)).astype(np.float32)
    for cond in (True, False):
        assert_same_outputs(model, result.model, {"c": np.array(cond), "x": x})


def test_loop_with_outer_scope_reads_survives_default_preset():
    # y = x; repeat n times: y = y + bias (bias read from the outer scope through an Identity)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["bias_outer"], ["bias_in"]),
            helper.make_node("Add", ["y_in", "bias_in"], ["y_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_in", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("y_out", TensorProto.FLOAT, [3])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["bias"], ["bias_outer"]),
            helper.make_node("Loop", ["n", "", "x"], ["y"], body=body),
        ],
        "g",
        [helper.make_tensor_value_info("n", TensorProto.INT64, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        initializer=[numpy_helper.from_array(np.array([0.5, -1.0, 2.0], np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    result = PassManager("default").run(model)
    assert "Loop" in op_types(result.model)
    for n in (0, 1, 4):
        assert_same_outputs(model, result.model, {"n": np.array(n, np.int64), "x": np.arange(3, dtype=np.float32)})


def test_scan_body_is_left_valid():
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_mid"]), helper.make_node("Identity", ["s_mid"], ["s_out"]),
         helper.make_node("Identity", ["s_mid"], ["scan_out"])],
        "body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, [2])],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], body=body, num_scan_inputs=1)],
        "g",
        [helper.make_tensor_value_info("s0", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("xs", TensorProto.FLOAT, [5, 2])],
        [helper.make_tensor_value_info("s_final", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("ys", TensorProto.FLOAT, [5, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    result = run_pass(model, "default")
    assert "Scan" in op_types(result.model)
    assert_same_outputs(model, result.model)
