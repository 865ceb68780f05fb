"""BF16 emulation: ONNX Runtime's CPU provider runs bfloat16 models through ``OrtRunner``.

References are numpy computations on bf16-rounded operands in float32, each op's result rounded
to bf16 (bf16 storage, float32 math -- what TensorRT does on the GPU).
"""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.emulation import NATIVE_BF16_OPS, emulate_bfloat16, has_bfloat16
from optimizer.runtime import OrtRunner, input_specs

BF16, FLOAT = TensorProto.BFLOAT16, TensorProto.FLOAT
vi = helper.make_tensor_value_info


def bf16(x) -> np.ndarray:
    """``x`` rounded to bfloat16 (round to nearest even), as float32."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _bf16_const(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32).astype(ml_dtypes.bfloat16), name)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    for out, inferred in zip(model.graph.output, onnx.shape_inference.infer_shapes(model).graph.output):
        out.CopyFrom(inferred)  # outputs declared without a shape get the inferred one
    onnx.checker.check_model(model, full_check=True)
    return model


def _compute_model(rng):
    """x(f32) -> Cast(bf16) -> MatMul(W) -> Add(b) -> Relu -> Gemm(W2, c) -> Softmax -> Cast(f32)."""
    w, b = rng.normal(size=(16, 32)), rng.normal(size=32)
    w2, c = rng.normal(size=(32, 8)) / 4, rng.normal(size=8)
    inits = [_bf16_const("w", w), _bf16_const("b", b), _bf16_const("w2", w2), _bf16_const("c", c)]
    nodes = [
        helper.make_node("Cast", ["x"], ["xb"], to=BF16),
        helper.make_node("MatMul", ["xb", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "c"], ["g"]),
        helper.make_node("Softmax", ["g"], ["s"], axis=-1),
        helper.make_node("Cast", ["s"], ["y"], to=FLOAT),
        helper.make_node("Cast", ["g"], ["logits"], to=FLOAT),
    ]
    model = _model(nodes, [vi("x", FLOAT, ["n", 16])], [vi("y", FLOAT, ["n", 8]), vi("logits", FLOAT, ["n", 8])], inits)
    return model, (w, b, w2, c)


def _reference(x, w, b, w2, c, round_each=bf16):
    m = round_each(round_each(x) @ round_each(w))
    a = round_each(m + round_each(b))
    r = round_each(np.maximum(a, 0))
    g = round_each(r @ round_each(w2) + round_each(c))
    e = np.exp(g - g.max(-1, keepdims=True))
    return round_each(e / e.sum(-1, keepdims=True)), g


def test_bf16_compute_model_matches_numpy_reference():
    rng = np.random.default_rng(0)
    model, (w, b, w2, c) = _compute_model(rng)
    before = model.SerializeToString()
    x = rng.normal(size=(64, 16)).astype(np.float32) * 3
    out = OrtRunner(model).run({"x": x})
    assert model.SerializeToString() == before, "the caller's model must not be modified"
    y_ref, g_ref = _reference(x, w, b, w2, c)
    # Accumulation order differs from numpy's: a result may round to the neighbouring bf16 value.
    ulp = 2.0 ** -7
    np.testing.assert_allclose(out["logits"], g_ref, rtol=ulp, atol=ulp * np.abs(g_ref).max() * 2 ** -4)
    np.testing.assert_allclose(out["y"], y_ref, rtol=ulp, atol=1e-6)
    assert np.mean(out["logits"] == g_ref) > 0.9
    # and it is BF16: every output value is a bf16 number, and float32 math alone differs
    assert np.array_equal(bf16(out["logits"]), out["logits"])
    _, g_fp32 = _reference(x, w, b, w2, c, round_each=lambda v: np.asarray(v, np.float32))
    assert np.abs(out["logits"] - g_fp32).max() > 10 * np.abs(out["logits"] - g_ref).max()


def test_emulated_copy_wraps_compute_ops_only():
    model, _ = _compute_model(np.random.default_rng(1))
    emulation = emulate_bfloat16(model)
    assert emulation.model is not model and emulation.wrapped_nodes == 5  # MatMul Add Relu Gemm Softmax
    ops = [n.op_type for n in emulation.model.graph.node]
    assert ops.count("Cast") == 3 + 9 + 5  # the model's, one to float32 per bf16 operand, one back per op


def test_model_without_bf16_is_used_as_is():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = _model(nodes, [vi("x", FLOAT, [2])], [vi("y", FLOAT, [2])])
    assert not has_bfloat16(model)
    emulation = emulate_bfloat16(model)
    assert emulation.model is model and not emulation.emulated


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _native_case(op, opset):
    """Nodes reading bf16 ``xb`` (shape [2, 3, 4]) and writing bf16 ``yb`` through ``op``, their
    initializers, and the numpy function of ``xb`` they compute."""
    node = lambda *inputs, **attrs: helper.make_node(op, ["xb", *inputs], ["yb"], **attrs)  # noqa: E731
    if op == "Identity":
        return [node()], [], lambda a: a
    if op == "Transpose":
        return [node(perm=[2, 1, 0])], [], lambda a: a.transpose(2, 1, 0)
    if op == "Concat":
        return [node("xb", axis=1)], [], lambda a: np.concatenate([a, a], 1)
    if op == "Reshape":
        return [node("s")], [_i64("s", [4, 6])], lambda a: a.reshape(4, 6)
    if op == "Flatten":
        return [node()], [], lambda a: a.reshape(2, 12)
    if op == "Squeeze":
        return [node("ax")], [_i64("ax", [0])], lambda a: a[0]  # run on a [1, 3, 4] input
    if op == "Unsqueeze":
        return [node("ax")], [_i64("ax", [0])], lambda a: a[None]
    if op == "Slice":
        return [node("st", "en")], [_i64("st", [1]), _i64("en", [3])], lambda a: a[1:3]
    if op == "Gather":
        return [node("ix")], [_i64("ix", [1, 0])], lambda a: a[[1, 0]]
    if op == "GatherElements":
        return [node("ix", axis=0)], [_i64("ix", np.zeros((1, 3, 4)))], lambda a: a[:1]
    if op == "Split":
        attrs = {"num_outputs": 2} if opset >= 18 else {}
        return [helper.make_node("Split", ["xb"], ["yb", "rest"], axis=0, **attrs)], [], lambda a: a[:1]
    if op == "Shape":  # the shape, cast to bf16
        nodes = [helper.make_node("Shape", ["xb"], ["sh"]), helper.make_node("Cast", ["sh"], ["yb"], to=BF16)]
        return nodes, [], lambda a: np.array(a.shape, np.float32)
    if op == "Cast":  # bf16 -> float16 -> bf16
        nodes = [helper.make_node("Cast", ["xb"], ["h"], to=TensorProto.FLOAT16), helper.make_node("Cast", ["h"], ["yb"], to=BF16)]
        return nodes, [], lambda a: a
    if op == "CastLike":  # the float32 input, cast like the bf16 tensor
        return [helper.make_node("CastLike", ["x", "xb"], ["yb"])], [], lambda a: a
    if op == "Constant":
        k = helper.make_node("Constant", [], ["k"], value=_bf16_const("k", np.full((2, 3, 4), 0.5)))
        concat = helper.make_node("Concat", ["xb", "k"], ["yb"], axis=0)
        return [k, concat], [], lambda a: np.concatenate([a, np.full_like(a, 0.5)])
    assert op == "ConstantOfShape", op
    nodes = [helper.make_node("Shape", ["xb"], ["sh"]),
             helper.make_node("ConstantOfShape", ["sh"], ["k"], value=_bf16_const("v", [2.0])),
             helper.make_node("Concat", ["xb", "k"], ["yb"], axis=0)]
    return nodes, [], lambda a: np.concatenate([a, np.full_like(a, 2.0)])


@pytest.mark.parametrize("opset", [13, 17, 21])
@pytest.mark.parametrize("op", sorted(NATIVE_BF16_OPS))
def test_native_bf16_ops_run_in_onnxruntime_without_casts(op, opset):
    if (op, opset) in {("CastLike", 13), ("ConstantOfShape", 13), ("ConstantOfShape", 17)}:
        pytest.skip(f"no bfloat16 {op} in ONNX at opset {opset}")
    nodes, inits, fn = _native_case(op, opset)
    shape = [1, 3, 4] if op == "Squeeze" else [2, 3, 4]
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=BF16), *nodes, helper.make_node("Cast", ["yb"], ["y"], to=FLOAT)]
    model = _model(nodes, [vi("x", FLOAT, shape)], [vi("y", FLOAT, None)], inits, opset=opset)
    emulation = emulate_bfloat16(model)
    assert emulation.wrapped_nodes == 0  # the op really runs in bf16 in ONNX Runtime
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(OrtRunner(model).run({"x": x})["y"], fn(bf16(x)))


#: op -> (its inputs after the bf16 tensor ``xb`` of shape [2, 3], initializers, numpy function)
WRAPPED_CASES = {
    "Expand": (["s"], [_i64("s", [2, 2, 3])], lambda a: np.broadcast_to(a, (2, 2, 3))),
    "Tile": (["r"], [_i64("r", [1, 2])], lambda a: np.tile(a, (1, 2))),
    "Pad": (["p", "v"], [_i64("p", [0, 1, 0, 1]), _bf16_const("v", 1.5)], lambda a: np.pad(a, ((0, 0), (1, 1)), constant_values=1.5)),
    "Max": (["xb"], [], lambda a: a),
    "Sqrt": ([], [], lambda a: bf16(np.sqrt(a))),
}


@pytest.mark.parametrize("op", [*WRAPPED_CASES, "Where"])
def test_ops_without_cpu_bf16_kernels_are_wrapped_and_exact(op):
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=BF16)]
    if op == "Where":  # Where(xb != 0, xb, xb)
        nodes.append(helper.make_node("Cast", ["xb"], ["cond"], to=TensorProto.BOOL))
        inputs, inits, fn = ["cond", "xb", "xb"], [], lambda a: a
    else:
        extra, inits, fn = WRAPPED_CASES[op]
        inputs = ["xb", *extra]
    nodes += [helper.make_node(op, inputs, ["yb"]), helper.make_node("Cast", ["yb"], ["y"], to=FLOAT)]
    model = _model(nodes, [vi("x", FLOAT, [2, 3])], [vi("y", FLOAT, None)], inits, opset=18)
    assert emulate_bfloat16(model).wrapped_nodes == 1
    x = np.random.default_rng(0).uniform(0.1, 4, size=(2, 3)).astype(np.float32)
    np.testing.assert_array_equal(OrtRunner(model).run({"x": x})["y"], fn(bf16(x)))


def test_bf16_graph_inputs_and_outputs_are_exchanged_as_float32():
    nodes = [helper.make_node("Mul", ["x", "k"], ["y"]), helper.make_node("Identity", ["x"], ["x_copy"])]
    model = _model(nodes, [vi("x", BF16, ["n", 4])], [vi("y", BF16, ["n", 4]), vi("x_copy", BF16, ["n", 4])], [_bf16_const("k", 3.0)])
    assert [s.dtype for s in input_specs(model)] == [np.float32]
    runner = OrtRunner(model)
    x = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    for feed in (x, x.astype(ml_dtypes.bfloat16)):  # a float32 feed is rounded like a bf16 input
        out = runner.run({"x": feed})
        assert out["y"].dtype == np.float32
        np.testing.assert_array_equal(out["y"], bf16(bf16(x) * 3))
        np.testing.assert_array_equal(out["x_copy"], bf16(x))


def test_if_bodies_are_emulated():
    then_body = helper.make_graph([helper.make_node("Add", ["xb", "xb"], ["t"])], "then", [], [vi("t", BF16, None)])
    else_body = helper.make_graph([helper.make_node("Neg", ["xb"], ["e"])], "else", [], [vi("e", BF16, None)])
    nodes = [
        helper.make_node("Cast", ["x"], ["xb"], to=BF16),
        helper.make_node("If", ["c"], ["yb"], then_branch=then_body, else_branch=else_body),
        helper.make_node("Cast", ["yb"], ["y"], to=FLOAT),
    ]
    model = _model(nodes, [vi("x", FLOAT, [3]), vi("c", TensorProto.BOOL, [])], [vi("y", FLOAT, [3])])
    runner = OrtRunner(model)
    x = np.array([1.0, 2.5, 1 / 3], np.float32)
    np.testing.assert_array_equal(runner.run({"x": x, "c": np.array(True)})["y"], bf16(bf16(x) * 2))
    np.testing.assert_array_equal(runner.run({"x": x, "c": np.array(False)})["y"], -bf16(x))
