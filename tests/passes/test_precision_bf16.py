"""convert-bf16: BF16 where ONNX allows it, float32 kept for reductions, Conv below opset 22, INT8.

ONNX Runtime's CPU provider has no BF16 kernels; every run here goes through the emulation in
``OrtRunner`` (tests/optimizer/test_emulation.py checks it against numpy).
"""

import numpy as np
import onnx
import pytest
from helpers import SAMPLE_MODELS, SAMPLES
from onnx import TensorProto, helper, numpy_helper

from optimizer import PassContext, PassManager
from optimizer.io import load_model
from optimizer.metrics import compare_outputs
from optimizer.runtime import OrtRunner
from optimizer.stats import iter_graphs
from passes.precision import ConvertBf16

BF16, FLOAT = TensorProto.BFLOAT16, TensorProto.FLOAT
MIN_COSINE = ConvertBf16.tolerance.min_cosine
vi = helper.make_tensor_value_info


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def _node_types(model):
    """Element type of each node's first output, from shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return {n.name: types.get(n.output[0]) for n in model.graph.node if n.name}


def _agree(original, converted, feeds):
    metrics = compare_outputs(OrtRunner(original).run(feeds), OrtRunner(converted).run(feeds))
    for m in metrics:
        assert m.mismatch == 0, m.describe()  # no NaN/Inf
        assert m.cosine is None or m.cosine >= MIN_COSINE, m.describe()
    return metrics


def _init(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=[p.parent.name for p in SAMPLE_MODELS])
def test_sample_models_bf16_agree_on_eval_data(path):
    model, _ = load_model(path)
    data = dict(np.load(path.parent / "eval.npz"))
    labels = data.pop("labels", None)
    result = PassManager("default,convert-bf16").run(model)
    assert not any(r.rolled_back for r in result.records)
    bf16 = result.model
    onnx.checker.check_model(bf16, full_check=True)
    assert [i.type.tensor_type.elem_type for i in bf16.graph.input] == [FLOAT]
    assert [o.type.tensor_type.elem_type for o in bf16.graph.output] == [FLOAT]
    assert result.records[-1].stats["bf16_nodes"] > 0
    assert any(t.data_type == BF16 for t in bf16.graph.initializer)
    for m in _agree(model, bf16, data):
        assert m.max_rel <= 5e-2
        if labels is not None:
            assert m.argmax_agreement >= 0.99
    again = PassManager("convert-bf16", verify="structural").run(bf16)
    assert not again.records[0].changed and not again.records[0].rolled_back, again.records[0].stats


@pytest.mark.parametrize("name,pipeline", [
    ("hf_bert", "convert-bf16"), ("transformer_mha", "convert-bf16"), ("mobilenet_v2_tiny", "convert-bf16"),
    ("crnn_ocr", "convert-bf16"), ("paddle_ocr_rec", "upgrade-opset,convert-bf16"),
])
def test_zoo_models_bf16_agree_on_their_samples(name, pipeline):
    model, _ = load_model(SAMPLES / "zoo" / f"{name}.onnx")
    data = dict(np.load(SAMPLES / "zoo" / f"{name}.npz"))
    result = PassManager(pipeline).run(model, PassContext())
    assert not any(r.rolled_back for r in result.records)
    assert result.records[-1].stats["bf16_nodes"] > 0
    batch = 1 if name == "paddle_ocr_rec" else len(next(iter(data.values())))  # paddle: static batch 1
    for start in range(0, len(next(iter(data.values()))), batch):
        feeds = {k: v[start:start + batch] for k, v in data.items() if k != "labels"}
        _agree(model, result.model, feeds)


def _conv_gemm_matmul(opset):
    rng = np.random.default_rng(0)
    inits = [_init("w", rng.normal(size=(4, 3, 3, 3)) / 3), _init("w2", rng.normal(size=(64, 16)) / 8),
             _init("b2", rng.normal(size=16)), _init("w3", rng.normal(size=(16, 8)) / 4)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["g"], name="gemm"),
        helper.make_node("MatMul", ["g", "w3"], ["y"], name="matmul"),
    ]
    return _model(nodes, [vi("x", FLOAT, ["n", 3, 4, 4])], [vi("y", FLOAT, ["n", 8])], inits, opset=opset)


def test_conv_stays_float32_while_matmul_and_gemm_become_bf16():
    model = _conv_gemm_matmul(opset=17)
    result = PassManager("convert-bf16").run(model)
    types = _node_types(result.model)
    assert types["conv"] == FLOAT  # ONNX's Conv has no bfloat16 before opset 22
    assert types["relu"] == types["flatten"] == types["gemm"] == types["matmul"] == BF16
    stats = result.records[0].stats
    assert stats["bf16_nodes"] == 4 and stats["fp32_no_bf16_in_schema"] == 1
    weights = {t.name: t.data_type for t in result.model.graph.initializer}
    assert weights["w"] == FLOAT and weights["w2_bf16"] == weights["w3_bf16"] == BF16
    _agree(model, result.model, {"x": np.random.default_rng(1).normal(size=(4, 3, 4, 4)).astype(np.float32)})


def test_conv_becomes_bf16_where_the_schema_allows_it():
    model = _conv_gemm_matmul(opset=22)
    result = PassManager("convert-bf16").run(model)
    assert result.records[0].stats["bf16_nodes"] == 5 and "fp32_no_bf16_in_schema" not in result.records[0].stats
    assert _node_types(result.model)["conv"] == BF16
    _agree(model, result.model, {"x": np.random.default_rng(1).normal(size=(4, 3, 4, 4)).astype(np.float32)})


def _keep_list_model():
    rng = np.random.default_rng(3)
    inits = [_init("w", rng.normal(size=(8, 8)) / 3), numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             _init("scale", np.ones(8)), _init("bias", np.zeros(8))]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
        helper.make_node("ReduceMean", ["m", "axes"], ["r"], name="reduce"),
        helper.make_node("Sub", ["m", "r"], ["d"], name="sub"),
        helper.make_node("Exp", ["d"], ["e"], name="exp"),
        helper.make_node("LayerNormalization", ["e", "scale", "bias"], ["y"], name="layernorm"),
    ]
    return _model(nodes, [vi("x", FLOAT, ["n", 8])], [vi("y", FLOAT, ["n", 8])], inits, opset=18)


def test_reductions_exp_and_normalizations_stay_float32():
    model = _keep_list_model()
    result = PassManager("convert-bf16").run(model)
    types = _node_types(result.model)
    assert types["matmul"] == types["sub"] == BF16
    assert types["reduce"] == types["exp"] == types["layernorm"] == FLOAT
    assert result.records[0].stats["fp32_kept_op"] == 3
    _agree(model, result.model, {"x": np.random.default_rng(4).normal(size=(6, 8)).astype(np.float32)})
    # keep_ops is the list: MatMul kept too, Reduce/Exp/LayerNorm are not BF16 ops at all then
    kept = PassManager("convert-bf16(keep_ops=[MatMul])").run(model)
    types = _node_types(kept.model)
    assert types["matmul"] == types["reduce"] == FLOAT and types["sub"] == BF16
    assert kept.records[0].stats["fp32_kept_op"] == 1 and kept.records[0].stats["fp32_op_not_bf16"] == 3


def test_excluded_nodes_stay_float32():
    model = _keep_list_model()
    result = PassManager("convert-bf16(exclude=[sub])").run(model)
    types = _node_types(result.model)
    assert types["matmul"] == BF16 and types["sub"] == FLOAT
    assert result.records[0].stats["fp32_excluded"] == 1


def test_option_types_are_checked():
    with pytest.raises(ValueError, match="exclude"):
        ConvertBf16(exclude="sub")


def _overflow_model():
    """Activations ~1e7 through MatMul/Add: beyond FP16's 65504, well inside BF16's range."""
    rng = np.random.default_rng(5)
    inits = [_init("w", rng.normal(size=(64, 64)) * 100), _init("b", rng.normal(size=64) * 1e5),
             _init("w2", rng.normal(size=(64, 32)) * 10)]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "b"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="matmul2"),
    ]
    return _model(nodes, [vi("x", FLOAT, ["n", 64])], [vi("y", FLOAT, ["n", 32])], inits)


def test_activations_that_overflow_fp16_run_in_bf16_end_to_end():
    model = _overflow_model()
    x = np.random.default_rng(6).uniform(-1e3, 1e3, size=(16, 64)).astype(np.float32)
    reference = OrtRunner(model).run({"x": x})["y"]
    assert np.abs(reference).max() > 1e6  # FP16 cannot hold these activations
    fp16 = PassManager("convert-fp16").run(model, PassContext(calibration={"x": x}))
    fp16_stats = fp16.records[0].stats
    assert fp16_stats.get("fp32_constant_out_of_range", 0) + fp16_stats.get("fp32_activation_out_of_range", 0) >= 3

    result = PassManager("convert-bf16").run(model)
    stats = result.records[0].stats
    assert stats["bf16_nodes"] == 4 and stats["fp32_nodes"] == 0
    assert set(_node_types(result.model).values()) == {BF16, FLOAT}  # BF16 nodes and the output Cast
    (metrics,) = _agree(model, result.model, {"x": x})
    assert np.isfinite(metrics.max_abs) and metrics.max_rel <= 2e-2 and metrics.cosine >= 0.9999


def test_idempotent_and_other_passes_read_bf16_models():
    model = _overflow_model()
    bf16 = PassManager("convert-bf16").run(model).model
    for spec in ("convert-bf16", "convert-fp16", "default"):
        again = PassManager(spec).run(bf16)
        assert not any(r.rolled_back for r in again.records), (spec, [r.error for r in again.records])
        assert not again.records[0].changed or spec == "default", (spec, again.records[0].stats)
        assert sum(t.data_type == BF16 for t in again.model.graph.initializer) == 3


def test_float_weights_take_half_the_bytes():
    model = _overflow_model()
    result = PassManager("convert-bf16").run(model)
    float_bytes = lambda m, t: sum(len(i.raw_data) or 4 * int(np.prod(i.dims)) for i in m.graph.initializer if i.data_type == t)  # noqa: E731
    assert float_bytes(result.model, FLOAT) == 0
    assert float_bytes(result.model, BF16) * 2 == float_bytes(model, FLOAT)
    assert len(result.model.SerializeToString()) < 0.55 * len(model.SerializeToString())


def test_int8_regions_stay_float32():
    rng = np.random.default_rng(7)
    inits = [_init("s", 0.05), numpy_helper.from_array(np.array(0, np.int8), "zp"), _init("w", rng.normal(size=(8, 8))),
             _init("b", rng.normal(size=8))]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="dq"),
        helper.make_node("MatMul", ["dq", "w"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "b"], ["y"], name="add"),
    ]
    model = _model(nodes, [vi("x", FLOAT, ["n", 8])], [vi("y", FLOAT, ["n", 8])], inits, opset=13)
    result = PassManager("convert-bf16").run(model)
    types = _node_types(result.model)
    assert types["matmul"] == FLOAT and types["add"] == BF16
    assert result.records[0].stats["fp32_int8_region"] == 1


def test_if_bodies_stay_float32():
    model, _ = load_model(SAMPLES / "zoo" / "if_branch.onnx")
    result = PassManager("convert-bf16").run(model)
    assert result.records[0].changed
    bodies = [g for g in iter_graphs(result.model.graph)][1:]
    assert bodies and all(t.data_type != BF16 for g in bodies for t in g.initializer)
    assert all(a.i != BF16 for g in bodies for n in g.node for a in n.attribute if a.name == "to")


def test_keep_io_types_false_makes_io_bf16():
    model = _conv_gemm_matmul(opset=17)
    result = PassManager("convert-bf16(keep_io_types=false)").run(model)
    assert result.model.graph.output[0].type.tensor_type.elem_type == BF16
    x = np.random.default_rng(8).normal(size=(2, 3, 4, 4)).astype(np.float32)
    out = OrtRunner(result.model).run({"x": x})["y"]
    assert out.dtype == np.float32  # exchanged as float32 (see OrtRunner)
    _agree(model, result.model, {"x": x})


@pytest.mark.parametrize("name", ["hf_bert", "transformer_mha"])
def test_bf16_transformer_parses_and_builds_with_tensorrt_rtx(name):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed (pip install tensorrt-rtx-cu12)")
    from optimizer.tensorrt_rtx import check_model

    model, _ = load_model(SAMPLES / "zoo" / f"{name}.onnx")
    result = PassManager("convert-bf16").run(model)
    assert result.records[0].stats["bf16_nodes"] > 50
    check = check_model(result.model)
    assert check.parsed and check.built and check.ok, (check.unsupported, check.errors)
    assert check.engine_bytes > 0


# -- every op convert-bf16 emits builds in TensorRT-RTX ----------------------------------------------
def _one_op_model(op, attrs=None, consts=(), shape=(1, 8, 8, 8), inputs=1):
    """x (float32) -> op(x, constants) -> y, at opset 22 (Conv/pooling take bfloat16 from 22)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    inits = [numpy_helper.from_array(v, n) for n, v in consts if v is not None]
    names = ["x"] * inputs + [n if v is not None else "" for n, v in consts]
    node = helper.make_node(op, names, ["y"], name=op.lower(), **(attrs or {}))
    graph = helper.make_graph([node], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)], ir_version=10)


def _f(*shape):
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


ONE_OP_CASES = {
    "Conv": dict(consts=[("w", _f(8, 8, 3, 3))], attrs={"pads": [1, 1, 1, 1]}),
    "MatMul": dict(consts=[("w", _f(8, 8))]),
    "Gemm": dict(shape=(4, 8), consts=[("w", _f(8, 8))]),
    **{op: dict(consts=[("c", _f(8))]) for op in ("Add", "Sub", "Mul", "Div", "Min", "Max", "PRelu")},
    **{op: {} for op in ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "Elu", "Selu", "Gelu", "Erf",
                         "Softsign", "Abs", "Neg", "Reciprocal", "GlobalAveragePool", "GlobalMaxPool")},
    "Clip": dict(consts=[("lo", np.array(-1, np.float32)), ("hi", np.array(1, np.float32))]),
    "Concat": dict(inputs=2, attrs={"axis": 1}),
    "MaxPool": dict(attrs={"kernel_shape": [2, 2]}),
    "AveragePool": dict(attrs={"kernel_shape": [2, 2]}),
    "Softmax": dict(attrs={"axis": -1}),
    "Resize": dict(consts=[("roi", None), ("scales", np.array([1, 1, 2, 2], np.float32))], attrs={"mode": "linear"}),
    "DepthToSpace": dict(attrs={"blocksize": 2}),
}


@pytest.mark.parametrize("op", sorted(ONE_OP_CASES))
def test_every_op_converted_to_bf16_builds_in_tensorrt_rtx(op):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed (pip install tensorrt-rtx-cu12)")
    from optimizer.tensorrt_rtx import check_model

    model = _one_op_model(op, **ONE_OP_CASES[op])
    result = PassManager("convert-bf16").run(model)
    record = result.records[0]
    assert not record.rolled_back, record.error
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    assert record.changed or op == "Concat", record.stats  # Concat of the input alone may stay float
    checked = check_model(result.model)
    assert checked.built, (op, checked.errors[:1], [u.reason for u in checked.unsupported][:1], types)


@pytest.mark.parametrize("op", ["HardSwish", "ConvTranspose"])
def test_ops_tensorrt_cannot_build_in_bf16_stay_float32(op):
    consts = [("w", _f(8, 8, 2, 2))] if op == "ConvTranspose" else []
    model = _one_op_model(op, consts=consts, attrs={"strides": [2, 2]} if op == "ConvTranspose" else None)
    record = PassManager("convert-bf16").run(model).records[0]
    assert not record.changed and record.stats.get("fp32_kept_op") == 1, record.stats
