"""What pruning a group changes (passes/pruning/edits.py): every tensor of a group sliced
consistently, removed constant channels folded into biases exactly, dequantized weights and Q/DQ
scales sliced."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers import assert_same_outputs, random_inputs
from onnx import helper, numpy_helper
from pruning_models import Weights, assert_valid, groups_of, last_stats, make_model, vi, zoo_model, zoo_params

from optimizer import PassManager
from optimizer.stats import model_stats


# -- slicing -----------------------------------------------------------------------------------
def test_prune_channels_slices_every_tensor_of_a_group_consistently():
    model = zoo_model()
    result = PassManager("prune-channels(ratio=0.5,multiple=4,min_channels=4)").run(model)
    assert_valid(result.model)
    stats = last_stats(result)
    assert stats["groups_pruned"] == 3 and stats["blocked_graph_output"] == 1
    by_producer = {tuple(g["producers"]): g["kept"] for g in result.records[-1].details["groups"]}
    assert by_producer == {("conv_a", "conv_b"): 8, ("conv_c",): 4, ("conv_d",): 8}
    assert stats["params_before"] == zoo_params(16, 8, 16)
    assert stats["params_after"] == zoo_params(8, 4, 8) == model_stats(result.model).params
    assert stats["macs_after"] < stats["macs_before"]
    shapes = {t.name: t.dims for t in result.model.graph.initializer}
    dw = next(n for n in result.model.graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 12
    assert [shapes[i][1] if len(shapes[i]) > 1 else shapes[i][0] for i in dw.input[1:]] == [1, 12]
    fc = next(n for n in result.model.graph.node if n.name == "fc")
    assert list(shapes[fc.input[1]]) == [10, 8 * 16]  # 8 channels x 4x4 columns each


# -- exact removal of constant channels --------------------------------------------------------
def test_removing_zero_channels_is_exact_through_concat_depthwise_and_flatten():
    zero = {"ab": [1, 6, 9], "c": [2, 5], "d": [0, 7, 15]}
    model = zoo_model(zero)
    spec = "prune-channels(only_zero=true,multiple=1,min_channels=1)"
    result = PassManager(spec).run(model)
    removed = {tuple(g["producers"]): g["removed"] for g in result.records[-1].details["groups"]}
    assert removed == {("conv_a", "conv_b"): 3, ("conv_c",): 2, ("conv_d",): 3}
    assert_valid(result.model)
    assert model_stats(result.model).params == zoo_params(13, 6, 13)
    for seed in range(3):
        assert_same_outputs(model, result.model, random_inputs(model, seed=seed), rtol=1e-6, atol=1e-6)
    again = PassManager(spec).run(result.model)
    assert not again.records[-1].changed


def test_only_zero_keeps_constant_channels_a_padded_conv_reads():
    """A zero-weight channel after a BN with beta > 0 is a nonzero constant: removable only where
    its contribution folds exactly into the next layer's bias (1x1 Conv without pads, Gemm)."""
    w = Weights(3)
    w.add("w1", (8, 3, 3, 3)), w.add("b1", (8,))
    beta = np.random.default_rng(4).normal(scale=0.2, size=8)
    beta[[1, 4]] = [0.7, -0.7]
    bn = w.bn("bn1", 8, beta=beta)
    mean = w.get("bn1_m"); mean[[1, 4]] = 0; w.set("bn1_m", mean)
    w.add("w2", (8, 8, 3, 3)), w.add("b2", (8,))
    w.add("w3", (8, 8, 1, 1)), w.add("b3", (8,))
    w.add("w4", (8, 8, 1, 1)), w.add("b4", (8,))
    w.add("wfc", (5, 8)), w.add("bfc", (5,))
    for name in ("w1", "w3", "w4"):
        v = w.get(name); v[[1, 4]] = 0; w.set(name, v)
    for name in ("b1", "b3"):
        v = w.get(name); v[[1, 4]] = 0; w.set(name, v)
    b4 = w.get("b4"); b4[[1, 4]] = [0.5, -1.0]; w.set("b4", b4)  # zero weights: the channel is its bias
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", *bn], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),            # channel 1: 0.7*s > 0, channel 4: 0
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y1"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Conv", ["x3", "w3", "b3"], ["c3"], name="conv3"),
        helper.make_node("Add", ["c3", "one"], ["a3"]),      # channel 1, 4: constant 1
        helper.make_node("Conv", ["a3", "w2b", "b2"], ["y3"], name="conv_1x1"),
        helper.make_node("Conv", ["x3", "w4", "b4"], ["c4"], name="conv4"),
        helper.make_node("Relu", ["c4"], ["r4"]),            # channel 1: 0.5, channel 4: 0
        helper.make_node("GlobalAveragePool", ["r4"], ["g4"]),
        helper.make_node("Flatten", ["g4"], ["f4"]),
        helper.make_node("Gemm", ["f4", "wfc", "bfc"], ["y4"], transB=1, name="fc"),
    ]
    w.add("one", (1, 8, 1, 1), values=np.ones((1, 8, 1, 1)))
    w.add("w2b", (8, 8, 1, 1))
    model = make_model(nodes, [vi("x", [1, 3, 6, 6]), vi("x3", [1, 8, 6, 6])],
                   [vi("y1", [1, 8, 6, 6]), vi("y3", [1, 8, 6, 6]), vi("y4", [1, 5])], w.inits)
    result = PassManager("prune-channels(only_zero=true,multiple=1,min_channels=1)").run(model)
    removed = {tuple(g["producers"]): g["removed"] for g in result.records[-1].details["groups"]}
    assert removed == {("conv1",): 1, ("conv3",): 2, ("conv4",): 2}  # conv1 keeps its constant 0.7 channel
    assert last_stats(result)["layers_folded"] == 2
    assert_valid(result.model)
    for seed in range(3):
        assert_same_outputs(model, result.model, random_inputs(model, seed=seed), rtol=1e-6, atol=1e-6)


def test_folding_into_a_layer_without_bias_whose_own_channels_are_pruned():
    """conv2 gets a bias from the folded constant channel of conv1, then loses its own zero channels."""
    w = Weights(10)
    w.add("w1", (8, 3, 1, 1)), w.add("b1", (8,)), w.add("w2", (8, 8, 1, 1)), w.add("w3", (4, 8, 1, 1))
    v = w.get("w1"); v[2] = 0; w.set("w1", v)
    b = w.get("b1"); b[2] = 0.75; w.set("b1", b)  # channel 2 of conv1 is the constant 0.75
    v = w.get("w2"); v[[0, 5]] = 0; w.set("w2", v)  # channels 0, 5 of conv2 are 0 (no bias)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Conv", ["c2", "w3"], ["y"], name="conv3"),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])], w.inits)
    result = PassManager("prune-channels(only_zero=true,multiple=1,min_channels=1)").run(model)
    removed = {tuple(g["producers"]): g["removed"] for g in result.records[-1].details["groups"]}
    assert removed == {("conv1",): 1, ("conv2",): 2}
    assert_valid(result.model)
    assert_same_outputs(model, result.model, random_inputs(model), rtol=1e-6, atol=1e-6)


def materialized(path, zero_fraction=0.25, seed=0):
    """An onnx-wheel light model with seeded random weights instead of ConstantOfShape fills, and
    a fraction of every Conv's output channels zeroed (weights and bias)."""
    from optimizer.io import load_model
    from optimizer.graph import graph_to_model
    from passes.graph_utils import constant_values

    model = load_model(path)[0]
    rng = np.random.default_rng(seed)
    graph = gs.import_onnx(model)
    for node in list(graph.nodes):
        shape = constant_values(node.inputs[0]) if node.op == "ConstantOfShape" else None
        if shape is None:
            continue
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        const = gs.Constant(node.outputs[0].name + "_random", rng.normal(scale=fan_in ** -0.5, size=tuple(shape)).astype(np.float32))
        for reader in list(node.outputs[0].outputs):
            for i, t in enumerate(reader.inputs):
                if t is node.outputs[0]:
                    reader.inputs[i] = const
        node.outputs.clear()
    for k, node in enumerate(graph.nodes):
        if node.op == "BatchNormalization":  # positive scales and variances
            for i in (1, 4):
                node.inputs[i] = gs.Constant(f"bn{k}_{i}", rng.uniform(0.5, 1.5, node.inputs[i].shape).astype(np.float32))
        if node.op == "Conv" and isinstance(node.inputs[1], gs.Constant):
            weight = node.inputs[1].values.copy()
            zero = rng.choice(weight.shape[0], int(weight.shape[0] * zero_fraction), replace=False)
            weight[zero] = 0
            node.inputs[1] = gs.Constant(f"w{k}", weight)
            if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                bias = node.inputs[2].values.copy()
                bias[zero] = 0
                node.inputs[2] = gs.Constant(f"b{k}", bias)
    graph.cleanup().toposort()
    return graph_to_model(graph, model)


@pytest.mark.parametrize("name", ["light_squeezenet", "light_densenet121"])
def test_real_architectures_prune_and_zero_channels_stay_exact(name):
    """SqueezeNet (Concat of expand branches) and DenseNet (Concat chains, BN written as Mul/Add of
    Unsqueeze'd constants), with random weights: prunable, valid, and exact on zero channels."""
    from helpers import LIGHT_DIR

    model = materialized(LIGHT_DIR / f"{name}.onnx")
    pruned = PassManager("prune-channels(ratio=0.3)", verify="structural").run(model)
    stats = last_stats(pruned)
    assert stats["groups_pruned"] >= 0.9 * stats["groups"] - 1
    assert stats["params_after"] < 0.75 * stats["params_before"]
    assert_valid(pruned.model)
    exact = PassManager("prune-channels(only_zero=true,multiple=1,min_channels=1)", verify="structural").run(model)
    removed = last_stats(exact)["channels_removed"]
    assert removed == last_stats(exact)["removable_channels"]
    assert removed > 0.1 * sum(g["channels"] for g in exact.records[-1].details["groups"])
    assert_same_outputs(model, exact.model, random_inputs(model, seed=1), rtol=1e-5, atol=1e-6)


def test_constant_hidden_channels_fold_into_the_bias_add_after_a_matmul():
    """fc1 columns with zero weights are Gelu(bias): constants that fc2's Add(bias) absorbs exactly."""
    w = Weights(11)
    w.add("w1", (16, 32)), w.add("b1", (32,)), w.add("w2", (32, 16)), w.add("b2", (16,))
    v = w.get("w1"); v[:, [3, 17, 30]] = 0; w.set("w1", v)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Gelu", ["hb"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["b2", "o"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2, 5, 16])], [vi("y", [2, 5, 16])], w.inits, opset=20)
    result = PassManager("prune-channels(only_zero=true,multiple=1,min_channels=1)").run(model)
    assert result.records[-1].details["groups"][0]["removed"] == 3
    assert last_stats(result)["layers_folded"] == 1
    assert_valid(result.model)
    assert_same_outputs(model, result.model, random_inputs(model), rtol=1e-6, atol=1e-6)


# -- Q/DQ -------------------------------------------------------------------------------------
def test_dequantized_weights_and_activation_qdq_are_sliced():
    rng = np.random.default_rng(8)
    q1 = rng.integers(-100, 100, size=(16, 3, 3, 3)).astype(np.int8)
    q1[[3, 11]] = 0
    q2 = rng.integers(-100, 100, size=(8, 16, 1, 1)).astype(np.int8)
    inits = [
        numpy_helper.from_array(q1, "q1"), numpy_helper.from_array(rng.uniform(0.001, 0.01, 16).astype(np.float32), "s1"),
        numpy_helper.from_array(np.zeros(16, np.int8), "z1"),
        numpy_helper.from_array(q2, "q2"), numpy_helper.from_array(rng.uniform(0.001, 0.01, 8).astype(np.float32), "s2"),
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.int8), "xz"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["w1"], axis=0),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("QuantizeLinear", ["r1", "xs", "xz"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "xs", "xz"], ["rdq"]),
        helper.make_node("DequantizeLinear", ["q2", "s2"], ["w2"], axis=0),
        helper.make_node("Conv", ["rdq", "w2"], ["y"], name="conv2"),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", [1, 8, 6, 6])], inits, opset=13)
    assert not groups_of(model)[("conv1",)].blocked
    exact = PassManager("prune-channels(only_zero=true,multiple=1,min_channels=1)").run(model)
    assert exact.records[-1].details["groups"][0]["removed"] == 2
    assert_same_outputs(model, exact.model, random_inputs(model), rtol=1e-6, atol=1e-6)
    result = PassManager("prune-channels(ratio=0.5,multiple=4,min_channels=4)").run(model)
    assert_valid(result.model)
    assert last_stats(result)["params_after"] == model_stats(result.model).params  # replaced DQ nodes do not count
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    dq1 = next(n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == next(
        c.input[1] for c in result.model.graph.node if c.name == "conv1"))
    assert shapes[dq1.input[0]] == [8, 3, 3, 3] and shapes[dq1.input[1]] == [8] and shapes[dq1.input[2]] == [8]
    dq2 = next(n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == next(
        c.input[1] for c in result.model.graph.node if c.name == "conv2"))
    assert shapes[dq2.input[0]] == [8, 8, 1, 1] and shapes[dq2.input[1]] == [8]  # per output channel: kept
