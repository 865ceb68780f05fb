"""The op -> handler table of ``layout-nchw`` (passes/layout/handlers.py): each handler moves a
Transpose exactly, and refuses what it cannot prove."""

import numpy as np
import pytest
from channel_last_models import Builder, vi
from helpers import assert_same_outputs, random_inputs, run_pass
from onnx import TensorProto, helper


# -- handlers one by one -----------------------------------------------------------------------
def _island(build_middle, in_shape=(1, 4, 5, 3), cin=3, opset=13, out_shape=None, out_elem=TensorProto.FLOAT):
    """x(NHWC) -> Conv island -> ``build_middle(b, h)`` -> Conv island -> y: ``build_middle``
    returns (tensor, channels) in NHWC, or (output name, None) when it writes the output itself."""
    b = Builder(seed=14, opset=opset)
    h = b.nhwc_conv("x", cin, 4)
    mid, channels = build_middle(b, h)
    if channels is not None:
        b.nodes.append(helper.make_node("Identity", [b.nhwc_conv(mid, channels, 2)], ["y"]))
    return b.model([vi("x", list(in_shape))], [vi("y", out_shape or [None] * 4, out_elem)])


HANDLER_CASES = {
    "unary_chain": lambda b, h: (b.node("Clip", [b.node("Tanh", [b.node("Elu", [h])]), b.const(np.array(-0.5, np.float32)),
                                                  b.const(np.array(0.5, np.float32))]), 4),
    "where": lambda b, h: (b.node("Where", [b.node("Greater", [h, b.const(np.zeros(4, np.float32))]), h,
                                            b.const(np.linspace(0, 1, 4).astype(np.float32))]), 4),
    "prelu": lambda b, h: (b.node("PRelu", [h, b.const(np.linspace(0.1, 0.4, 4).astype(np.float32))]), 4),
    "full_rank_constant": lambda b, h: (b.node("Mul", [h, b.const(b.rng.normal(size=(1, 4, 5, 4)).astype(np.float32))]), 4),
    "concat_constant": lambda b, h: (b.node("Concat", [h, b.const(np.ones((1, 4, 5, 2), np.float32))], axis=3), 6),
    "reduce_keepdims": lambda b, h: (b.node("Mul", [h, b.node("ReduceMax", [h], axes=[-1], keepdims=1)]), 4),
    "pad_constant": lambda b, h: (b.node("Pad", [h, b.const(np.array([0, 1, 0, 0, 0, 0, 1, 0], np.int64)),
                                                 b.const(np.array(0.5, np.float32))]), 4),
    "split_sizes": lambda b, h: (
        b.node("Concat", b.node("Split", [h, b.const(np.array([1, 3], np.int64))], n_out=2, axis=-1)[::-1], axis=3), 4
    ),
    "softmax_channels": lambda b, h: (b.node("Softmax", [h], axis=3), 4),
    "qdq_per_tensor": lambda b, h: (b.node("DequantizeLinear", [b.node("QuantizeLinear", [h, b.const(np.array(0.05, np.float32))]),
                                                                 b.const(np.array(0.05, np.float32))]), 4),
    "resize_sizes": lambda b, h: (b.node("Resize", [h, "", "", b.const(np.array([1, 8, 10, 4], np.int64))], mode="linear"), 4),
    "gather_rows": lambda b, h: (b.node("Gather", [h, b.const(np.array([3, 1], np.int64))], axis=1), 4),
}


@pytest.mark.parametrize("case", list(HANDLER_CASES))
def test_handler_moves_transposes_exactly(case):
    model = _island(HANDLER_CASES[case])
    result = run_pass(model, "layout-nchw")
    stats = result.records[0].stats
    assert result.records[0].changed, stats
    assert stats["transposes_after"] == 2, stats  # only the input's and the output's remain
    assert_same_outputs(model, result.model, random_inputs(model, seed=4), rtol=1e-6)


def test_reductions_that_drop_axes_leave_no_transpose():
    def middle(b, h):
        b.nodes.append(helper.make_node("ArgMin", [h], ["y"], axis=-1, keepdims=0))
        return "y", None

    model = _island(middle, out_shape=[1, 4, 5], out_elem=TensorProto.INT64)
    result = run_pass(model, "layout-nchw")
    assert result.records[0].stats["transposes_after"] == 1
    assert_same_outputs(model, result.model)

    def middle2(b, h):
        b.nodes.append(helper.make_node("ReduceMean", [b.node("Gather", [h, b.const(np.array(2, np.int64))], axis=2)],
                                        ["y"], axes=[1], keepdims=0))  # [N,H,C] -> [N,C]
        return "y", None

    model = _island(middle2, out_shape=[1, 4])
    result = run_pass(model, "layout-nchw")
    assert result.records[0].stats["transposes_after"] == 1
    assert_same_outputs(model, result.model)


# -- refusals ----------------------------------------------------------------------------------
def test_non_constant_operand_of_another_rank_stops_the_transpose():
    """Add(NHWC activation, bias[C] fed as a graph input): not a constant, so the Add cannot
    run in NCHW (the bias would broadcast along W); the Transposes around it stay."""
    b = Builder(seed=11)
    h = b.node("Add", [b.nhwc_conv("x", 3, 4), "bias"])
    b.nodes.append(helper.make_node("Relu", [b.nhwc_conv(h, 4, 4)], ["y"]))
    model = b.model([vi("x", [1, 4, 4, 3]), vi("bias", [4])], [vi("y", [1, 4, 4, 4])])
    result = run_pass(model, "layout-nchw")
    stats = result.records[0].stats
    assert stats["skipped_non_constant_operand"] == 1
    assert stats["transposes_after"] <= stats["transposes_before"]
    producers = {o: n for n in result.model.graph.node for o in n.output}
    add = next(n for n in result.model.graph.node if n.op_type == "Add")
    assert producers[add.input[0]].op_type == "Transpose"  # still channel-last
    assert_same_outputs(model, result.model)


def test_mismatched_permutations_are_not_mixed():
    """Add(Transpose(a, p1), Transpose(b, p2)) with p1 != p2 stays as it is."""
    nodes = [
        helper.make_node("Transpose", ["a"], ["ta"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["b"], ["tb"], perm=[0, 3, 2, 1]),
        helper.make_node("Add", ["ta", "tb"], ["s"]),
        helper.make_node("Transpose", ["s"], ["y"], perm=[0, 3, 1, 2]),
    ]
    graph = helper.make_graph(nodes, "g", [vi("a", [1, 2, 3, 3]), vi("b", [1, 2, 3, 3])], [vi("y", [1, 2, 3, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    result = run_pass(model, "layout-nchw")
    assert not result.records[0].changed
    assert result.records[0].stats["skipped_perm_mismatch"] == 1


def test_softmax_before_opset13_over_channels_is_refused():
    """Before opset 13 Softmax flattens the axes from ``axis`` on: channel-last axis 3 is not a
    tail of NCHW, so the Transposes around it stay."""
    b = Builder(seed=12, opset=11)
    h = b.node("Softmax", [b.nhwc_conv("x", 3, 4)], axis=3)
    b.nodes.append(helper.make_node("Relu", [b.nhwc_conv(h, 4, 4)], ["y"]))
    model = b.model([vi("x", [1, 4, 4, 3])], [vi("y", [1, 4, 4, 4])])
    result = run_pass(model, "layout-nchw")
    assert result.records[0].stats["skipped_flattening_softmax_before_opset13"] == 1
    assert_same_outputs(model, result.model)
