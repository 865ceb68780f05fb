"""The cost model of ``layout-nchw`` (passes/layout/analysis.py): regions move only when they lower
the Transpose count; dead ends, ops without a handler and subgraph readers keep their Transposes."""

import numpy as np
from channel_last_models import TO_NHWC, Builder, residual_model, vi
from helpers import assert_same_outputs, random_inputs, run_pass
from onnx import TensorProto, helper, numpy_helper


# -- refusals ----------------------------------------------------------------------------------
def _nchw_conv_then_transpose(*after):
    """NCHW input -> Conv -> Transpose(0,2,3,1) -> ``after`` ops -> output (channel-last)."""
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c"], ["t"], perm=TO_NHWC)]
    last = "t"
    for i, op in enumerate(after):
        nodes.append(helper.make_node(op, [last], [f"a{i}"]))
        last = f"a{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "g", [vi("x", [1, 3, 5, 5])], [vi("y", [1, 5, 5, 4])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)


def test_transpose_feeding_a_graph_output_keeps_its_layout():
    for model in (_nchw_conv_then_transpose(), _nchw_conv_then_transpose("Relu", "Sigmoid")):
        result = run_pass(model, "layout-nchw")
        assert not result.records[0].changed
        assert result.records[0].stats["transposes_after"] == 1


def test_op_without_handler_stops_the_transpose():
    """Transpose -> Relu -> Flatten: nothing cancels, so nothing moves (moving would not help)."""
    b = Builder(seed=9)
    h = b.node("Relu", [b.nhwc_conv("x", 3, 4)])
    b.nodes.append(helper.make_node("Flatten", [h], ["y"]))
    model = b.model([vi("x", [1, 4, 4, 3])], [vi("y", [1, 64])])
    result = run_pass(model, "layout-nchw")
    assert not result.records[0].changed
    assert result.records[0].stats["skipped_no_handler"] >= 1


def test_op_without_handler_between_islands_keeps_both_transposes():
    """... -> Transpose -> LpNormalization (no handler) -> Transpose -> ...: the pair around
    LpNormalization stays; the rest of the graph is still optimized."""
    b = Builder(seed=10)
    h = b.channel_affine(b.nhwc_conv("x", 3, 4), 4)
    n = b.node("LpNormalization", [h], axis=-1)
    out = b.node("Relu", [b.channel_affine(b.nhwc_conv(n, 4, 4), 4)])
    b.nodes.append(helper.make_node("Relu", [b.nhwc_conv(out, 4, 4)], ["y"]))
    model = b.model([vi("x", [1, 4, 4, 3])], [vi("y", [1, 4, 4, 4])])
    result = run_pass(model, "layout-nchw")
    stats = result.records[0].stats
    assert result.records[0].changed and stats["skipped_no_handler"] >= 1
    assert (stats["transposes_before"], stats["transposes_after"]) == (6, 4)  # input, 2 around Lp, output
    assert_same_outputs(model, result.model)
    lp = next(n for n in result.model.graph.node if n.op_type == "LpNormalization")
    producers = {o: n for n in result.model.graph.node for o in n.output}
    readers = [n for n in result.model.graph.node if lp.output[0] in n.input]
    assert producers[lp.input[0]].op_type == "Transpose" and [n.op_type for n in readers] == ["Transpose"]


def test_never_adds_a_transpose_for_a_dead_end_branch():
    """Transpose read by Flatten (no handler) and by Relu -> output: moving it below the Relu
    would need a second Transpose; the pass leaves the graph alone."""
    model = _nchw_conv_then_transpose()
    model.graph.node.append(helper.make_node("Flatten", ["t"], ["flat"]))
    model.graph.node.append(helper.make_node("Relu", ["t"], ["r"]))
    model.graph.output.extend([vi("flat", [1, 100]), vi("r", [1, 5, 5, 4])])
    result = run_pass(model, "layout-nchw")
    assert not result.records[0].changed
    assert result.records[0].stats["transposes_after"] == 1


def test_dead_end_branch_is_pruned_while_the_rest_moves():
    """The residual model plus an NHWC side output read through a Flatten: the main path still
    loses its Transposes, and the side branch costs none."""
    model = residual_model()
    model.graph.node.append(helper.make_node("Flatten", ["y"], ["flat"]))
    model.graph.output.append(vi("flat", ["batch", 512]))
    result = run_pass(model, "layout-nchw")
    stats = result.records[0].stats
    assert stats["transposes_after"] == 2
    assert_same_outputs(model, result.model)


def test_transpose_read_inside_a_subgraph_stays():
    """A channel-last tensor read inside an If branch keeps its Transpose; the main graph moves."""
    b = Builder(seed=13)
    h = b.node("Relu", [b.nhwc_conv("x", 3, 4)])
    out = b.nhwc_conv(h, 4, 4)
    then = helper.make_graph([helper.make_node("Sigmoid", [h], ["branch"])], "then", [], [vi("branch", None)])
    other = helper.make_graph([helper.make_node("Neg", [h], ["branch2"])], "else", [], [vi("branch2", None)])
    b.nodes.append(helper.make_node("If", ["cond"], ["side"], then_branch=then, else_branch=other))
    b.nodes.append(helper.make_node("Identity", [out], ["y"]))
    model = b.model([vi("x", [1, 4, 4, 3]), vi("cond", [], TensorProto.BOOL)],
                    [vi("y", [1, 4, 4, 4]), vi("side", [1, 4, 4, 4])])
    result = run_pass(model, "layout-nchw")
    feeds = random_inputs(model)
    for cond in (True, False):
        feeds["cond"] = np.array(cond)
        assert_same_outputs(model, result.model, feeds)
    stats = result.records[0].stats
    assert stats["transposes_after"] < stats["transposes_before"]
