"""prune-channels, sparsify-2to4, prune-magnitude: channel groups, exactness, validity, accuracy."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import SAMPLES, assert_same_outputs, random_inputs, run
from onnx import TensorProto, helper, numpy_helper

import passes.pruning  # noqa: F401  (registers the passes)
from optimizer import PassContext, PassManager
from optimizer.errors import PipelineError
from optimizer.runtime import OrtRunner, input_specs
from optimizer.stats import model_stats
from passes.graph_utils import count_macs, infer_tensor_types, model_metadata
from passes.pruning import (
    PRUNING_KEY,
    SPARSITY_KEY,
    PruneChannels,
    Sparsify2to4,
    find_channel_groups,
    is_2to4,
    kept_count,
    read_pruning_record,
)

DIGITS = SAMPLES / "digits_cnn"


# -- model building ---------------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


class Weights:
    """Seeded float32 initializers, with helpers to zero output channels."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.inits = []

    def add(self, name, shape, scale=0.3, values=None):
        if values is None:
            values = self.rng.normal(scale=scale, size=shape)
        self.inits.append(numpy_helper.from_array(np.asarray(values, np.float32), name))
        return name

    def bn(self, prefix, c, beta=None):
        self.add(f"{prefix}_g", (c,), values=self.rng.uniform(0.5, 1.5, c))
        self.add(f"{prefix}_b", (c,), values=self.rng.normal(scale=0.2, size=c) if beta is None else beta)
        self.add(f"{prefix}_m", (c,), values=self.rng.normal(scale=0.1, size=c))
        self.add(f"{prefix}_v", (c,), values=self.rng.uniform(0.5, 1.5, c))
        return [f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"]

    def get(self, name):
        return next(numpy_helper.to_array(t) for t in self.inits if t.name == name).copy()

    def set(self, name, values):
        for i, t in enumerate(self.inits):
            if t.name == name:
                self.inits[i] = numpy_helper.from_array(np.asarray(values, np.float32), name)


def zoo_model(zero=None):
    """Residual Add, per-channel Mul, Concat, depthwise conv, Flatten -> Gemm::

        x -> conv_a(16) -> BN -> Relu = ra ----------------------+
        ra -> conv_b(16) -> Mul(k[16]) -> Add(ra) -> Relu = s    |  group {conv_a, conv_b}: 16
        s -> conv_c(8) -> Relu = c                                  group {conv_c}: 8
        Concat(s, c) -> dw(24, depthwise, bias) -> Relu -> conv_d(16, 1x1) -> Relu
          -> MaxPool(2) -> Flatten -> Gemm(10) = y                  group {conv_d}: 16 (4x4 blocks)

    ``zero``: {group name: channels} whose weights and biases are made zero (and whose
    BN/affine leaves them at zero after the Relu), so removing them is exact.
    """
    zero = zero or {}
    w = Weights(1)
    w.add("wa", (16, 3, 3, 3)), w.add("ba", (16,))
    bn = w.bn("bna", 16)
    w.add("wb", (16, 16, 3, 3)), w.add("bb", (16,))
    w.add("k", (1, 16, 1, 1), values=np.random.default_rng(2).uniform(0.5, 1.5, (1, 16, 1, 1)))
    w.add("wc", (8, 16, 3, 3)), w.add("bc", (8,))
    w.add("wdw", (24, 1, 3, 3)), w.add("bdw", (24,))
    w.add("wd", (16, 24, 1, 1)), w.add("bd", (16,))
    w.add("wfc", (10, 256), scale=0.1), w.add("bfc", (10,))
    for c in zero.get("ab", []):
        for name in ("wa", "wb"):
            v = w.get(name); v[c] = 0; w.set(name, v)
        for name in ("ba", "bb"):
            v = w.get(name); v[c] = 0; w.set(name, v)
        beta, mean = w.get("bna_b"), w.get("bna_m")
        beta[c], mean[c] = -0.5, 0.0  # BN maps the zero channel to -0.5: Relu makes it 0
        w.set("bna_b", beta), w.set("bna_m", mean)
    for group, (wn, bn_) in (("c", ("wc", "bc")), ("d", ("wd", "bd"))):
        for c in zero.get(group, []):
            v = w.get(wn); v[c] = 0; w.set(wn, v)
            b = w.get(bn_); b[c] = -0.25; w.set(bn_, b)  # constant -0.25, Relu -> 0
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["ca"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("BatchNormalization", ["ca", *bn], ["bna"], name="bn_a"),
        helper.make_node("Relu", ["bna"], ["ra"]),
        helper.make_node("Conv", ["ra", "wb", "bb"], ["cb"], pads=[1, 1, 1, 1], name="conv_b"),
        helper.make_node("Mul", ["cb", "k"], ["mb"], name="scale_b"),
        helper.make_node("Add", ["mb", "ra"], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["s"]),
        helper.make_node("Conv", ["s", "wc", "bc"], ["cc"], pads=[1, 1, 1, 1], name="conv_c"),
        helper.make_node("Relu", ["cc"], ["c"]),
        helper.make_node("Concat", ["s", "c"], ["cat"], axis=1, name="concat"),
        helper.make_node("Conv", ["cat", "wdw", "bdw"], ["cdw"], pads=[1, 1, 1, 1], group=24, name="dw"),
        helper.make_node("Relu", ["cdw"], ["rdw"]),
        helper.make_node("Conv", ["rdw", "wd", "bd"], ["cd"], name="conv_d"),
        helper.make_node("Relu", ["cd"], ["rd"]),
        helper.make_node("MaxPool", ["rd"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wfc", "bfc"], ["y"], transB=1, name="fc"),
    ]
    return _model(nodes, [_vi("x", [2, 3, 8, 8])], [_vi("y", [2, 10])], w.inits)


def zoo_params(ab, c, d):
    """Parameter count of ``zoo_model`` keeping ab/c/d channels."""
    cat = ab + c
    return (
        ab * 27 + ab + 4 * ab          # conv_a + BN
        + ab * ab * 9 + ab + ab        # conv_b + k
        + c * ab * 9 + c               # conv_c
        + cat * 9 + cat                # depthwise
        + d * cat + d                  # conv_d
        + 10 * d * 16 + 10             # fc
    )


def _groups(model):
    return {tuple(g.producers): g for g in find_channel_groups(gs.import_onnx(model))}


def _stats(result):
    return result.records[-1].stats


def _valid(model):
    onnx.checker.check_model(model, full_check=True)
    outputs = run(model, random_inputs(model, seed=5))
    assert all(np.all(np.isfinite(v)) for v in outputs.values())


# -- channel groups ---------------------------------------------------------------------------
def test_groups_follow_residuals_concat_depthwise_and_flatten():
    groups = _groups(zoo_model())
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


def test_prune_channels_slices_every_tensor_of_a_group_consistently():
    model = zoo_model()
    result = PassManager("prune-channels(ratio=0.5,multiple=4,min_channels=4)").run(model)
    _valid(result.model)
    stats = _stats(result)
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


def test_removing_zero_channels_is_exact_through_concat_depthwise_and_flatten():
    zero = {"ab": [1, 6, 9], "c": [2, 5], "d": [0, 7, 15]}
    model = zoo_model(zero)
    spec = "prune-channels(only_zero=true,multiple=1,min_channels=1)"
    result = PassManager(spec).run(model)
    removed = {tuple(g["producers"]): g["removed"] for g in result.records[-1].details["groups"]}
    assert removed == {("conv_a", "conv_b"): 3, ("conv_c",): 2, ("conv_d",): 3}
    _valid(result.model)
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
    model = _model(nodes, [_vi("x", [1, 3, 6, 6]), _vi("x3", [1, 8, 6, 6])],
                   [_vi("y1", [1, 8, 6, 6]), _vi("y3", [1, 8, 6, 6]), _vi("y4", [1, 5])], w.inits)
    result = PassManager("prune-channels(only_zero=true,multiple=1,min_channels=1)").run(model)
    removed = {tuple(g["producers"]): g["removed"] for g in result.records[-1].details["groups"]}
    assert removed == {("conv1",): 1, ("conv3",): 2, ("conv4",): 2}  # conv1 keeps its constant 0.7 channel
    assert _stats(result)["layers_folded"] == 2
    _valid(result.model)
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
    model = _model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y", [1, 4, 4, 4])], w.inits)
    result = PassManager("prune-channels(only_zero=true,multiple=1,min_channels=1)").run(model)
    removed = {tuple(g["producers"]): g["removed"] for g in result.records[-1].details["groups"]}
    assert removed == {("conv1",): 1, ("conv2",): 2}
    _valid(result.model)
    assert_same_outputs(model, result.model, random_inputs(model), rtol=1e-6, atol=1e-6)


def materialized(path, zero_fraction=0.25, seed=0):
    """An onnx-wheel light model with seeded random weights instead of ConstantOfShape fills, and
    a fraction of every Conv's output channels zeroed (weights and bias)."""
    from optimizer.io import load_model
    from optimizer.manager import graph_to_model
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
    stats = _stats(pruned)
    assert stats["groups_pruned"] >= 0.9 * stats["groups"] - 1
    assert stats["params_after"] < 0.75 * stats["params_before"]
    _valid(pruned.model)
    exact = PassManager("prune-channels(only_zero=true,multiple=1,min_channels=1)", verify="structural").run(model)
    removed = _stats(exact)["channels_removed"]
    assert removed == _stats(exact)["removable_channels"]
    assert removed > 0.1 * sum(g["channels"] for g in exact.records[-1].details["groups"])
    assert_same_outputs(model, exact.model, random_inputs(model, seed=1), rtol=1e-5, atol=1e-6)


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
    outputs = [_vi("out1", [1, 8, 6, 6]), _vi("out2", [1, 6, 6, 8]), _vi("out3", [1, 8, 36]),
               _vi("out4", [1, 8, 6, 6]), _vi("out5", [1, 8, 6, 6]), _vi("out6", [1, 4, 6, 6])]
    return _model(nodes, [_vi("x", [1, 3, 6, 6])], outputs, inits)


def test_blocked_groups_are_counted_with_their_reason():
    model = blocked_model()
    groups = _groups(model)
    reasons = {p[0]: g.blocked for p, g in groups.items()}
    assert reasons == {
        "to_output": "graph_output", "to_transpose": "unsupported_transpose", "to_reshape": "unsupported_reshape",
        "to_grouped": "grouped_conv", "grouped": "grouped_conv", "to_softmax": "reduces_over_channels",
        "prunable": "", "reader": "graph_output",
    }
    result = PassManager("prune-channels(ratio=0.5,multiple=4,min_channels=4)").run(model)
    stats = _stats(result)
    assert stats["groups"] == 8 and stats["groups_blocked"] == 7 and stats["groups_pruned"] == 1
    assert stats["blocked_graph_output"] == 2 and stats["blocked_grouped_conv"] == 2
    assert stats["blocked_unsupported_transpose"] == stats["blocked_unsupported_reshape"] == 1
    assert stats["blocked_reduces_over_channels"] == 1
    _valid(result.model)


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
    model = _model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y", [1, 4, 4, 4]), _vi("b", [1, 8, 4, 4])], w.inits)
    groups = _groups(model)
    assert groups[("a", "b")].blocked == "graph_output"
    assert not PassManager("prune-channels(ratio=0.5,multiple=1,min_channels=1)").run(model).records[-1].changed


# -- other layouts: MatMul on 3-D activations, Q/DQ -------------------------------------------
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
    model = _model(nodes, [_vi("x", [2, 5, 16])], [_vi("y", [2, 5, 16])], w.inits, opset=20)
    groups = _groups(model)
    assert groups[("fc1",)].consumers == ["fc2"] and not groups[("fc1",)].blocked
    assert groups[("fc2",)].blocked == "graph_input_operand"  # the residual Add with the input
    result = PassManager("prune-channels(ratio=0.5,multiple=8,min_channels=8)").run(model)
    _valid(result.model)
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    fc2 = next(n for n in result.model.graph.node if n.name == "fc2")
    assert shapes[fc2.input[1]] == [16, 16]


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
    model = _model(nodes, [_vi("x", [2, 5, 16])], [_vi("y", [2, 5, 16])], w.inits, opset=20)
    result = PassManager("prune-channels(only_zero=true,multiple=1,min_channels=1)").run(model)
    assert result.records[-1].details["groups"][0]["removed"] == 3
    assert _stats(result)["layers_folded"] == 1
    _valid(result.model)
    assert_same_outputs(model, result.model, random_inputs(model), rtol=1e-6, atol=1e-6)


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
    model = _model(nodes, [_vi("x", [1, 3, 6, 6])], [_vi("y", [1, 8, 6, 6])], inits, opset=13)
    assert not _groups(model)[("conv1",)].blocked
    exact = PassManager("prune-channels(only_zero=true,multiple=1,min_channels=1)").run(model)
    assert exact.records[-1].details["groups"][0]["removed"] == 2
    assert_same_outputs(model, exact.model, random_inputs(model), rtol=1e-6, atol=1e-6)
    result = PassManager("prune-channels(ratio=0.5,multiple=4,min_channels=4)").run(model)
    _valid(result.model)
    assert _stats(result)["params_after"] == model_stats(result.model).params  # replaced DQ nodes do not count
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    dq1 = next(n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == next(
        c.input[1] for c in result.model.graph.node if c.name == "conv1"))
    assert shapes[dq1.input[0]] == [8, 3, 3, 3] and shapes[dq1.input[1]] == [8] and shapes[dq1.input[2]] == [8]
    dq2 = next(n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == next(
        c.input[1] for c in result.model.graph.node if c.name == "conv2"))
    assert shapes[dq2.input[0]] == [8, 8, 1, 1] and shapes[dq2.input[1]] == [8]  # per output channel: kept


# -- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("original,ratio,multiple,minimum,kept", [
    (64, 0.3, 8, 8, 48), (128, 0.3, 8, 8, 96), (16, 0.9, 8, 8, 8), (10, 0.5, 8, 8, 8),
    (6, 0.5, 8, 8, 6), (64, 0.0, 8, 8, 64), (13, 0.5, 1, 1, 7), (3, 0.99, 1, 1, 1),
])
def test_kept_count_rounds_up_to_a_multiple_and_never_removes_everything(original, ratio, multiple, minimum, kept):
    assert kept_count(original, ratio, multiple, minimum) == kept


def test_per_group_ratios_override_and_unknown_names_are_reported():
    model = zoo_model()
    result = PassManager("prune-channels(ratio=0,ratios=[conv_c:0.5,nope:0.5],multiple=1,min_channels=1)").run(model)
    details = result.records[-1].details
    assert [(g["producers"], g["kept"]) for g in details["groups"]] == [(["conv_c"], 4)]
    assert details["ratios_unmatched"] == ["nope"]
    with pytest.raises(PipelineError, match="ratio of 'conv_c' must be in"):
        PassManager("prune-channels(ratios=[conv_c:1.5])")
    with pytest.raises(PipelineError, match="layer:ratio"):
        PassManager("prune-channels(ratios=[conv_c])")


def test_rerunning_is_a_no_op_and_ratios_stay_relative_to_the_original():
    model = zoo_model()
    first = PassManager("prune-channels(ratio=0.25,multiple=1,min_channels=1)").run(model)
    graph = gs.import_onnx(first.model)
    assert read_pruning_record(graph) == {"conv_a": 16, "conv_b": 16, "conv_c": 8, "conv_d": 16}
    assert PRUNING_KEY in first.model.graph.doc_string
    assert not PassManager("prune-channels(ratio=0.25,multiple=1,min_channels=1)").run(first.model).records[-1].changed
    second = PassManager("prune-channels(ratio=0.5,multiple=1,min_channels=1)").run(first.model)
    kept = {tuple(g["producers"]): (g["kept"], g["original"]) for g in second.records[-1].details["groups"]}
    assert kept == {("conv_a", "conv_b"): (8, 16), ("conv_c",): (4, 8), ("conv_d",): (8, 16)}
    _valid(second.model)


def test_global_scope_prunes_groups_with_weak_channels_harder():
    model = zoo_model()
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # conv_c: half of its channels are 100x weaker than the rest; other groups are uniform
    wc = weights["wc"].copy()
    wc[:4] *= 0.01
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "wc"))
    model.graph.initializer.append(numpy_helper.from_array(wc, "wc"))
    result = PassManager("prune-channels(ratio=0.1,scope=global,multiple=1,min_channels=1)").run(model)
    removed = {tuple(g["producers"]): g["removed"] for g in result.records[-1].details["groups"]}
    assert removed.get(("conv_c",), 0) >= 4
    layer = PassManager("prune-channels(ratio=0.1,multiple=1,min_channels=1)").run(model)
    removed_layer = {tuple(g["producers"]): g["removed"] for g in layer.records[-1].details["groups"]}
    assert removed_layer == {("conv_a", "conv_b"): 1, ("conv_d",): 1}  # floor(8 * 0.1) = 0 for conv_c
    assert not PassManager("prune-channels(ratio=0.1,scope=global,multiple=1,min_channels=1)").run(result.model).records[-1].changed


def test_bn_gamma_importance_removes_the_channels_with_the_smallest_gamma():
    model = zoo_model()
    gamma = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "bna_g")).copy()
    gamma[[2, 5, 7, 12]] = 1e-3
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "bna_g"))
    model.graph.initializer.append(numpy_helper.from_array(gamma, "bna_g"))
    result = PassManager("prune-channels(importance=bn-gamma,ratio=0.25,multiple=1,min_channels=1)").run(model)
    bn_gamma = next(n for n in result.model.graph.node if n.op_type == "BatchNormalization").input[1]
    kept = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == bn_gamma))
    assert kept.size == 12 and kept.min() > 0.1
    assert _stats(result)["importance_fallback_l1"] == 3  # conv_b (tied to conv_a), conv_c, conv_d: no BN


# -- the sample model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from optimizer.io import load_model

    model = load_model(DIGITS / "model.onnx")[0]
    data = np.load(DIGITS / "eval.npz")
    return model, data["input"], data["labels"]


def _accuracy(model, x, labels):
    return float((OrtRunner(model).run({"input": x})["logits"].argmax(1) == labels).mean())


def test_digits_after_default_preset_loses_a_quarter_of_its_parameters(digits):
    model, x, labels = digits
    result = PassManager("default,prune-channels(ratio=0.3)").run(model)
    record = result.records[-1]
    assert record.name == "prune-channels" and record.verification == "passed"
    _valid(result.model)
    before, after = model_stats(model).params, model_stats(result.model).params
    assert after <= 0.75 * before
    assert record.stats["macs_after"] < 0.75 * record.stats["macs_before"]
    assert record.stats["groups_pruned"] >= 3 and record.stats["blocked_graph_output"] == 1
    assert all(g["kept"] % 8 == 0 for g in record.details["groups"])
    assert _accuracy(result.model, x, labels) > 0.1  # still a classifier; the budget search picks ratios


def test_pruned_and_sparse_digits_build_in_tensorrt_rtx(digits):
    from optimizer import tensorrt_rtx

    if not tensorrt_rtx.is_available():
        pytest.skip("tensorrt-rtx is not installed (the dev extra installs it)")
    model = digits[0]
    for spec in ("default,prune-channels(ratio=0.3)", "default,sparsify-2to4"):
        result = tensorrt_rtx.check_model(PassManager(spec, verify="off").run(model).model)
        assert result.ok and not result.unsupported and result.built, spec


def test_pruning_after_sparsify_2to4_reports_the_layers_it_made_dense_again(digits):
    result = PassManager("default,sparsify-2to4,prune-channels(ratio=0.3)", verify="structural").run(digits[0])
    assert result.records[-1].stats["layers_2to4_broken"] == 3
    assert "/res_conv1/Conv" in result.records[-1].details["layers_2to4_broken"]


def test_calibration_data_compensates_removed_channels(digits):
    model, x, labels = digits
    base = PassManager("default", verify="off").run(model).model
    specs = input_specs(base)

    def pruned(spec, with_data):
        from calibration.sources import open_source

        ctx = PassContext(calibration=open_source(DIGITS / "calib.npz", specs) if with_data else None)
        return PassManager(spec, verify="structural").run(base, ctx)

    plain = pruned("prune-channels(ratio=0.3)", with_data=False)
    compensated = pruned("prune-channels(ratio=0.3)", with_data=True)
    assert compensated.records[-1].stats["layers_compensated"] >= 3
    assert _accuracy(compensated.model, x, labels) > _accuracy(plain.model, x, labels) + 0.2
    ranked = pruned("prune-channels(ratio=0.2,importance=activation)", with_data=True)
    assert _accuracy(ranked.model, x, labels) > 0.95


# -- MACs -------------------------------------------------------------------------------------
def test_count_macs_counts_conv_and_gemm():
    model = zoo_model()
    graph = gs.import_onnx(model)
    shapes = {k: s for k, (s, _) in infer_tensor_types(graph).items() if s is not None}
    expected = 2 * 64 * (16 * 27 + 16 * 16 * 9 + 8 * 16 * 9 + 24 * 9 + 16 * 24) + 2 * 10 * 256
    assert count_macs(graph, shapes) == expected


# -- sparsify-2to4 ----------------------------------------------------------------------------
def sparse_model():
    w = Weights(9)
    w.add("w1", (64, 64, 3, 3)), w.add("w2", (64, 16, 3, 3)), w.add("w3", (128, 64)), w.add("w4", (64, 66, 1, 1))
    w.add("w5", (128, 64))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="big_conv"),
        helper.make_node("Conv", ["x16", "w2"], ["c2"], pads=[1, 1, 1, 1], name="small_conv"),
        helper.make_node("Conv", ["x66", "w4"], ["c4"], name="odd_conv"),
        helper.make_node("GlobalAveragePool", ["c1"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["fc"], transB=1, name="fc"),
        helper.make_node("MatMul", ["fc", "w5"], ["y"], name="mm"),
    ]
    return _model(nodes, [_vi("x", [1, 64, 4, 4]), _vi("x16", [1, 16, 4, 4]), _vi("x66", [1, 66, 4, 4])],
                  [_vi("y", [1, 64]), _vi("c2", [1, 64, 4, 4]), _vi("c4", [1, 64, 4, 4])], w.inits)


def test_sparsify_2to4_marks_eligible_layers_and_every_block_has_two_zeros():
    model = sparse_model()
    result = PassManager("sparsify-2to4").run(model)
    record = result.records[-1]
    assert record.details[SPARSITY_KEY] == ["big_conv", "fc", "mm"]
    assert record.stats["skipped_too_small"] == 1 and record.stats["skipped_reduction_not_multiple_of_4"] == 1
    _valid(result.model)
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    nodes = {n.name: n for n in result.model.graph.node}
    for layer, axis in (("big_conv", 1), ("fc", 1), ("mm", 0)):
        w = weights[nodes[layer].input[1]]
        blocks = np.moveaxis(w, axis, -1).reshape(-1, 4)
        assert np.all(np.count_nonzero(blocks, axis=1) <= 2), layer
        assert is_2to4(w, axis)
    assert np.count_nonzero(weights[nodes["small_conv"].input[1]] == 0) == 0
    assert not PassManager("sparsify-2to4").run(result.model).records[-1].changed


def test_sparsify_2to4_keeps_the_largest_magnitudes_and_records_metadata():
    graph = gs.import_onnx(sparse_model())
    result = Sparsify2to4().run(graph, PassContext())
    assert json.loads(model_metadata(graph)[SPARSITY_KEY]) == ["big_conv", "fc", "mm"]
    assert result.stats["layers_sparsified"] == 3
    original = numpy_helper.to_array(next(t for t in sparse_model().graph.initializer if t.name == "w5"))
    new = next(n for n in graph.nodes if n.name == "mm").inputs[1].values
    blocks_old, blocks_new = original.T.reshape(-1, 4), new.T.reshape(-1, 4)
    for old, kept in zip(blocks_old, blocks_new):
        assert set(np.flatnonzero(kept)) == set(np.argsort(-np.abs(old))[:2])


# -- prune-magnitude --------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_magnitude_reaches_the_target_sparsity_and_is_idempotent(scope):
    model = zoo_model()
    result = PassManager(f"prune-magnitude(sparsity=0.6,scope={scope})").run(model)
    stats = _stats(result)
    assert stats["sparsity_after"] >= 0.6 - 1e-3 and stats["sparsity_before"] == 0
    assert stats["compressed_bytes_after"] < stats["compressed_bytes_before"]
    _valid(result.model)
    assert model_stats(result.model).params == model_stats(model).params  # same size: zeros are stored
    layers = result.records[-1].details["layers"]
    if scope == "layer":
        assert all(entry["sparsity"] >= 0.59 for entry in layers)
    assert not PassManager(f"prune-magnitude(sparsity=0.6,scope={scope})").run(result.model).records[-1].changed


def test_prune_channels_options_are_validated():
    with pytest.raises(PipelineError):
        PassManager("prune-channels(ratio=1.0)")
    with pytest.raises(PipelineError):
        PassManager("prune-channels(importance=l3)")
    assert PruneChannels(ratios=["a:0.5"]).spec() == "prune-channels(ratios=[a:0.5])"
