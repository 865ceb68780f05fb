"""Per-channel scale folding (passes/scale_folding.py): exact rewrites, refusals that change nothing."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import assert_same_outputs, run
from onnx import TensorProto, helper, numpy_helper

from calibration.collect import augment_model
from passes.scale_folding import fold_input_scales, insert_input_scale, plan_fold

C = 16
RNG = np.random.default_rng(0)


def _init(name, shape, scale=0.5, offset=0.0):
    return numpy_helper.from_array((offset + RNG.normal(0, scale, shape)).astype(np.float32), name)


def make_model(nodes, inits, outputs, x_shape=("N", 5, C)):
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    model = onnx.shape_inference.infer_shapes(model)  # declares the outputs' shapes
    del model.graph.value_info[:]  # intermediate shapes unknown, as in many exports
    onnx.checker.check_model(model, full_check=True)
    return model


def qkv_model(residual: bool = False):
    """x -> LayerNorm -> ln ─┬─> MatMul(wq) -> q    (and with ``residual``: ln -> Add(x) -> r)
                             ├─> MatMul(wk) -> k
                             └─> MatMul(wv) -> v"""
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1)]
    nodes += [helper.make_node("MatMul", ["ln", f"w{p}"], [p], name=f"mm_{p}") for p in "qkv"]
    inits = [_init("gamma", [C], 0.2, 1.0), _init("beta", [C], 0.1)] + [_init(f"w{p}", [C, 8]) for p in "qkv"]
    outputs = list("qkv")
    if residual:
        nodes.append(helper.make_node("Add", ["ln", "x"], ["r"], name="residual"))
        outputs.append("r")
    return make_model(nodes, inits, outputs)


def inputs(shape=(3, 5, C), seed=1):
    x = np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)
    x[..., 2] *= 30
    return {"x": x}


def scales(seed=2):
    return np.exp(np.random.default_rng(seed).uniform(-2, 2, C))


def graph_of(model):
    return gs.import_onnx(model)


def export(graph):
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def consumers_of(graph, name):
    tensor = graph.tensors()[name]
    return tensor, [n for n in tensor.outputs if n.op in ("MatMul", "Gemm")]


def fetch(model, feeds, names):
    return run(augment_model(model, names), feeds)


def test_layernorm_feeding_qkv_is_divided_and_the_weights_multiplied():
    model = qkv_model()
    graph = graph_of(model)
    tensor, consumers = consumers_of(graph, "ln")
    s = scales()
    assert fold_input_scales(graph, tensor, consumers, s) is None
    new = export(graph)
    feeds = inputs()
    assert_same_outputs(model, new, feeds, rtol=1e-5, atol=1e-6)
    before, after = fetch(model, feeds, ["ln"])["ln"], fetch(new, feeds, ["ln"])["ln"]
    np.testing.assert_allclose(after, before / s.astype(np.float32), rtol=1e-5, atol=1e-6)
    weights = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_allclose(weights["wq"], original["wq"] * s[:, None], rtol=1e-6)
    assert len(new.graph.node) == len(model.graph.node)  # folded: no node added


def test_matmul_with_bias_add_producer_and_gemm_consumers():
    """x -> MatMul(w1) -> Add(b1) -> h -> Gemm(w2, transB=1, C) / Gemm(w3)"""
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w1"], ["m"], name="fc1"),
        helper.make_node("Add", ["b1", "m"], ["h"], name="bias1"),
        helper.make_node("Gemm", ["h", "w2", "c2"], ["y"], name="fc2", transB=1),
        helper.make_node("Gemm", ["h", "w3"], ["z"], name="fc3", alpha=0.5),
    ]
    inits = [_init("w1", [C, C]), _init("b1", [C]), _init("w2", [6, C]), _init("c2", [6]), _init("w3", [C, 4]),
             numpy_helper.from_array(np.array([-1, C], np.int64), "shape")]
    model = make_model(nodes, inits, ["y", "z"])
    graph = graph_of(model)
    tensor, consumers = consumers_of(graph, "h")
    s = scales(3)
    assert fold_input_scales(graph, tensor, consumers, s) is None
    new = export(graph)
    feeds = inputs()
    assert_same_outputs(model, new, feeds)
    np.testing.assert_allclose(fetch(new, feeds, ["h"])["h"], fetch(model, feeds, ["h"])["h"] / s, rtol=1e-5, atol=1e-6)


def test_gemm_producer_with_transB_and_scalar_mul_producer():
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w1", "c1"], ["g"], name="fc1", transB=1, beta=0.5),
        helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2"),
        helper.make_node("Mul", ["k", "flat"], ["scaled"], name="mul"),
        helper.make_node("MatMul", ["scaled", "w3"], ["z"], name="fc3"),
    ]
    inits = [_init("w1", [C, C]), _init("c1", [1, C]), _init("w2", [C, 4]), _init("w3", [C, 4]),
             numpy_helper.from_array(np.array(1.5, np.float32), "k"),
             numpy_helper.from_array(np.array([-1, C], np.int64), "shape")]
    model = make_model(nodes, inits, ["y", "z"])
    graph = graph_of(model)
    for name, seed in (("g", 4), ("scaled", 5)):
        tensor, consumers = consumers_of(graph, name)
        assert fold_input_scales(graph, tensor, consumers, scales(seed)) is None, name
    new = export(graph)
    assert_same_outputs(model, new, inputs())
    k = next(t for t in new.graph.initializer if t.name == "k")
    assert list(k.dims) == [C]  # the scalar became one value per channel


def test_through_reshape_and_transpose_that_keep_the_last_axis():
    """LayerNorm -> Transpose(1,0,2) -> Reshape([-1, C]) -> Gemm"""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln"),
        helper.make_node("Transpose", ["ln"], ["t"], name="t", perm=[1, 0, 2]),
        helper.make_node("Reshape", ["t", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w"], ["y"], name="fc"),
    ]
    inits = [_init("gamma", [C], 0.2, 1.0), _init("beta", [C], 0.1), _init("w", [C, 4]),
             numpy_helper.from_array(np.array([-1, C], np.int64), "shape")]
    model = make_model(nodes, inits, ["y"])
    graph = graph_of(model)
    tensor, consumers = consumers_of(graph, "flat")
    # the Transpose output has no shape in the graph: the Reshape check needs it from shape inference
    assert plan_fold(graph, tensor, consumers) == "reshape_changes_channels"
    plan = plan_fold(graph, tensor, consumers, shapes={"t": (5, None, C)})
    assert plan.producer.op == "LayerNormalization" and [n.op for n in plan.through] == ["Transpose", "Reshape"]
    assert fold_input_scales(graph, tensor, consumers, scales(), shapes={"t": (5, None, C)}) is None
    assert_same_outputs(model, export(graph), inputs())


def _unchanged(model, graph, tensor, consumers, reason, **kw):
    before = export(graph_of(model)).SerializeToString()
    assert fold_input_scales(graph, tensor, consumers, scales(), **kw) == reason
    assert export(graph).SerializeToString() == before, "a refusal must change nothing"


def test_refusals_change_nothing():
    # activation function producer
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "w"], ["y"], name="fc"),
             helper.make_node("MatMul", ["x", "w2"], ["z"], name="fc_in")]
    model = make_model(nodes, [_init("w", [C, 4]), _init("w2", [C, 4])], ["y", "z"])
    graph = graph_of(model)
    _unchanged(model, graph, *consumers_of(graph, "r"), "producer_not_foldable")
    _unchanged(model, graph, *consumers_of(graph, "x"), "graph_input")
    # post-LN residual reads the LayerNorm output
    model = qkv_model(residual=True)
    graph = graph_of(model)
    _unchanged(model, graph, *consumers_of(graph, "ln"), "output_has_other_consumers")
    # a consumer weight shared with a node outside the group
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln"),
             helper.make_node("MatMul", ["ln", "w"], ["y"], name="fc"),
             helper.make_node("MatMul", ["x", "w"], ["z"], name="other")]
    model = make_model(nodes, [_init("gamma", [C]), _init("beta", [C]), _init("w", [C, 4])], ["y", "z"])
    graph = graph_of(model)
    _unchanged(model, graph, graph.tensors()["ln"], [n for n in graph.nodes if n.name == "fc"], "weight_shared")


def test_shared_producer_weight_and_layernorm_side_output_are_refused():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2"),
             helper.make_node("MatMul", ["x", "w1"], ["h2"], name="twin")]
    model = make_model(nodes, [_init("w1", [C, C]), _init("w2", [C, 4])], ["y", "h2"])
    graph = graph_of(model)
    tensor = graph.tensors()["h"]
    _unchanged(model, graph, tensor, list(tensor.outputs), "weight_shared")
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln", "mean"], name="ln"),
             helper.make_node("Reshape", ["mean", "shape"], ["m2"], name="r"),
             helper.make_node("Mul", ["x", "m2"], ["xm"], name="mul"),
             helper.make_node("MatMul", ["xm", "w"], ["y"], name="fc")]
    shape = numpy_helper.from_array(np.array([-1, 5, 1], np.int64), "shape")
    model = make_model(nodes, [_init("gamma", [C]), _init("beta", [C]), _init("w", [C, 4]), shape], ["y", "ln"])
    graph = graph_of(model)
    _unchanged(model, graph, *consumers_of(graph, "xm"), "producer_not_foldable")  # Mul of two activations


def test_reshape_that_mixes_channels_is_refused():
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln"),
             helper.make_node("Reshape", ["ln", "shape"], ["flat"], name="r"),
             helper.make_node("MatMul", ["flat", "w"], ["y"], name="fc")]
    shape = numpy_helper.from_array(np.array([-1, C // 2], np.int64), "shape")
    model = make_model(nodes, [_init("gamma", [C]), _init("beta", [C]), _init("w", [C // 2, 4]), shape], ["y"])
    graph = graph_of(model)
    tensor, consumers = consumers_of(graph, "flat")
    before = export(graph_of(model)).SerializeToString()
    assert fold_input_scales(graph, tensor, consumers, scales()[: C // 2], shapes={"ln": (None, 5, C)}) == "reshape_changes_channels"
    assert export(graph).SerializeToString() == before


def test_clone_producer_keeps_the_residual_exact():
    model = qkv_model(residual=True)
    graph = graph_of(model)
    tensor, consumers = consumers_of(graph, "ln")
    s = scales()
    assert fold_input_scales(graph, tensor, consumers, s, clone_producer=True) is None
    new = export(graph)
    assert [n.op_type for n in new.graph.node].count("LayerNormalization") == 2
    feeds = inputs()
    assert_same_outputs(model, new, feeds)
    gamma = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    assert np.array_equal(gamma["gamma"], numpy_helper.to_array(model.graph.initializer[0]))  # original untouched


def test_insert_input_scale_before_a_graph_input_consumer():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"), helper.make_node("Relu", ["x"], ["r"], name="relu")]
    model = make_model(nodes, [_init("w", [C, 4])], ["y", "r"])
    graph = graph_of(model)
    tensor, consumers = consumers_of(graph, "x")
    s = scales()
    assert insert_input_scale(graph, tensor, consumers, s) is None
    new = export(graph)
    assert sorted(n.op_type for n in new.graph.node) == ["MatMul", "Mul", "Relu"]
    assert_same_outputs(model, new, inputs())
    w = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}["w"]
    np.testing.assert_allclose(w, numpy_helper.to_array(model.graph.initializer[0]) * s[:, None], rtol=1e-6)


def test_bad_scales_raise():
    model = qkv_model()
    graph = graph_of(model)
    tensor, consumers = consumers_of(graph, "ln")
    for bad in (np.ones(C - 1), -np.ones(C), np.full(C, np.nan)):
        with pytest.raises(ValueError, match="scales"):
            fold_input_scales(graph, tensor, consumers, bad)
