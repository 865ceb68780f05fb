"""Channel groups (passes/pruning/groups.py, with its handlers in layers.py and ops.py): what
prune-channels removes together, and the reasons a group is blocked."""

import numpy as np
from onnx import helper, numpy_helper
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
