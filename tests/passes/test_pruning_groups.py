"""Channel groups (passes/pruning/groups.py, with its handlers in layers.py and ops.py): what
prune-channels removes together, and the reasons a group is blocked."""

import numpy as np
from onnx import helper, numpy_helper
from helpers import assert_same_outputs, random_inputs
from pruning_models import Weights, assert_valid, groups_of, last_stats, make_model, vi, zoo_model

from optimizer import PassManager


# -- channel groups ---------------------------------------------------------------------------
def test_groups_follow_residuals_concat_depthwise_and_flatten():
    groups = groups_of(zoo_model())
    assert set(groups) == {("conv_a", "conv_b"), ("conv_c",), ("conv_d",), ("fc",)}
    ab = groups[("conv_a", "conv_b")]
    assert ab.channels == 16 and not ab.blocked
    assert ab.consumers == ["conv_b", "conv_c", "conv_d"]  # conv_d reads them through Concat and dw
    assert {"bna_g", "bna_b", "bna_m", "bna_v", "k", "wdw", "bdw"} <= set(ab.params)
    assert {"ra", "s", "cat", "cdw", "rdw"} <= set(ab.tensors)
    assert groups[("conv_c",)].consumers == ["conv_d"]
    d = groups[("conv_d",)]
    assert d.consumers == ["fc"] and "f" in d.tensors and not d.blocked
    assert groups[("fc",)].blocked == "graph_output"


# -- blocked groups ---------------------------------------------------------------------------
def blocked_model():
    """One group per blocking reason, plus one prunable group."""
    w = Weights(5)
    for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (8, 3, 3, 3)), ("w3", (8, 3, 3, 3)), ("w4", (8, 3, 3, 3)),
                        ("w5", (8, 3, 3, 3)), ("wg", (8, 4, 3, 3)), ("wok", (8, 3, 3, 3)), ("wok2", (4, 8, 1, 1))):
        w.add(name, shape)
    w.add("shape", (2,), values=[1, -1])
    inits = w.inits + [numpy_helper.from_array(np.array([1, 8, 36], np.int64), "shape3")]
    inits = [i for i in inits if i.name != "shape"]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["out1"], pads=[1, 1, 1, 1], name="to_output"),
        helper.make_node("Conv", ["x", "w2"], ["c2"], pads=[1, 1, 1, 1], name="to_transpose"),
        helper.make_node("Transpose", ["c2"], ["out2"], perm=[0, 2, 3, 1]),
        helper.make_node("Conv", ["x", "w3"], ["c3"], pads=[1, 1, 1, 1], name="to_reshape"),
        helper.make_node("Reshape", ["c3", "shape3"], ["out3"]),
        helper.make_node("Conv", ["x", "w4"], ["c4"], pads=[1, 1, 1, 1], name="to_grouped"),
        helper.make_node("Conv", ["c4", "wg"], ["out4"], pads=[1, 1, 1, 1], group=2, name="grouped"),
        helper.make_node("Conv", ["x", "w5"], ["c5"], pads=[1, 1, 1, 1], name="to_softmax"),
        helper.make_node("Softmax", ["c5"], ["out5"], axis=1),
        helper.make_node("Conv", ["x", "wok"], ["c6"], pads=[1, 1, 1, 1], name="prunable"),
        helper.make_node("Relu", ["c6"], ["r6"]),
        helper.make_node("Conv", ["r6", "wok2"], ["out6"], name="reader"),
    ]
    outputs = [vi("out1", [1, 8, 6, 6]), vi("out2", [1, 6, 6, 8]), vi("out3", [1, 8, 36]),
               vi("out4", [1, 8, 6, 6]), vi("out5", [1, 8, 6, 6]), vi("out6", [1, 4, 6, 6])]
    return make_model(nodes, [vi("x", [1, 3, 6, 6])], outputs, inits)


def test_blocked_groups_are_counted_with_their_reason():
    model = blocked_model()
    groups = groups_of(model)
    reasons = {p[0]: g.blocked for p, g in groups.items()}
    assert reasons == {
        "to_output": "graph_output", "to_transpose": "unsupported_transpose", "to_reshape": "unsupported_reshape",
        "to_grouped": "grouped_conv", "grouped": "grouped_conv", "to_softmax": "reduces_over_channels",
        "prunable": "", "reader": "graph_output",
    }
    result = PassManager("prune-channels(ratio=0.5,multiple=4,min_channels=4)").run(model)
    stats = last_stats(result)
    assert stats["groups"] == 8 and stats["groups_blocked"] == 7 and stats["groups_pruned"] == 1
    assert stats["blocked_graph_output"] == 2 and stats["blocked_grouped_conv"] == 2
    assert stats["blocked_unsupported_transpose"] == stats["blocked_unsupported_reshape"] == 1
    assert stats["blocked_reduces_over_channels"] == 1
    assert_valid(result.model)


def test_blocked_reasons_propagate_through_a_residual_union():
    """A residual Add ties a prunable branch to one that reaches a graph output: both are blocked."""
    w = Weights(6)
    w.add("w1", (8, 3, 1, 1)), w.add("w2", (8, 3, 1, 1)), w.add("w3", (4, 8, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="a"),
        helper.make_node("Conv", ["x", "w2"], ["b"], name="b"),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Conv", ["s", "w3"], ["y"], name="reader"),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4]), vi("b", [1, 8, 4, 4])], w.inits)
    groups = groups_of(model)
    assert groups[("a", "b")].blocked == "graph_output"
    assert not PassManager("prune-channels(ratio=0.5,multiple=1,min_channels=1)").run(model).records[-1].changed


# -- other layouts: MatMul on 3-D activations -----------------------------------------------
def test_transformer_mlp_hidden_channels_are_pruned_along_the_last_axis():
    w = Weights(7)
    w.add("w1", (16, 32)), w.add("b1", (32,)), w.add("w2", (32, 16)), w.add("b2", (16,))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Gelu", ["hb"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "b2"], ["ob"]),
        helper.make_node("Add", ["x", "ob"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2, 5, 16])], [vi("y", [2, 5, 16])], w.inits, opset=20)
    groups = groups_of(model)
    assert groups[("fc1",)].consumers == ["fc2"] and not groups[("fc1",)].blocked
    assert groups[("fc2",)].blocked == "graph_input_operand"  # the residual Add with the input
    result = PassManager("prune-channels(ratio=0.5,multiple=8,min_channels=8)").run(model)
    assert_valid(result.model)
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    fc2 = next(n for n in result.model.graph.node if n.name == "fc2")
    assert shapes[fc2.input[1]] == [16, 16]


# -- ops that read axes: reductions, Squeeze/Unsqueeze, Slice, Pad -----------------------------
def test_channels_pass_through_ops_that_read_axes():
    """ReduceMean over H, W (squeeze-and-excitation), Unsqueeze/Squeeze, Slice and Pad on spatial
    axes keep channels apart: one group from conv1 to conv2, pruned exactly on zero channels."""
    w = Weights(12)
    w.add("w1", (16, 3, 3, 3)), w.add("b1", (16,)), w.add("w2", (8, 16, 1, 1))
    v = w.get("w1"); v[[2, 9]] = 0; w.set("w1", v)
    b = w.get("b1"); b[[2, 9]] = 0; w.set("b1", b)
    inits = w.inits + [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (
        ("ax4", [4]), ("starts", [1]), ("ends", [7]), ("ax2", [2]), ("pads", [0, 0, 1, 0, 0, 0, 1, 0]))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("ReduceMean", ["r1"], ["m"], axes=[2, 3], keepdims=1),
        helper.make_node("Sigmoid", ["m"], ["s"]),
        helper.make_node("Mul", ["r1", "s"], ["se"]),
        helper.make_node("Unsqueeze", ["se", "ax4"], ["u"]),
        helper.make_node("Squeeze", ["u", "ax4"], ["q"]),
        helper.make_node("Slice", ["q", "starts", "ends", "ax2"], ["sl"]),
        helper.make_node("Pad", ["sl", "pads"], ["p"]),
        helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2"),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 8, 8, 8])], inits, opset=13)
    group = groups_of(model)[("conv1",)]
    assert not group.blocked and group.consumers == ["conv2"]
    result = PassManager("prune-channels(only_zero=true,multiple=1,min_channels=1)").run(model)
    assert result.records[-1].details["groups"][0]["removed"] == 2
    assert_valid(result.model)
    assert_same_outputs(model, result.model, random_inputs(model), rtol=1e-6, atol=1e-6)
