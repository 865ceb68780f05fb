"""quantize-fp8: E4M3 Q/DQ placed like INT8 minus TensorRT's FP8 kernel exclusions, on real data."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from helpers import SAMPLES
from onnx import TensorProto, helper, numpy_helper

from optimizer import PassContext, PassManager
from optimizer.metrics import compare_outputs
from optimizer.pipeline import PRESETS
from optimizer.runtime import OrtRunner
from passes.quant_formats import FP8, INT8, dequantize, quantize_weight
from passes.quantize_fp8 import fp8_layer_filter

RNG = np.random.default_rng(3)


def _npz(path):
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _fp8_initializers(model):
    return [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN]


@pytest.fixture(scope="module")
def digits():
    folder = SAMPLES / "digits_cnn"
    model = onnx.load(str(folder / "model.onnx"))
    calib = _npz(folder / "calib.npz")
    held_out = _npz(folder / "eval.npz")
    result = PassManager("upgrade-opset(min=19),quantize-fp8").run(model, PassContext(calibration=calib))
    return model, result, held_out


def test_fp8_model_is_valid_and_close_to_fp32_on_held_out_samples(digits):
    model, result, held_out = digits
    onnx.checker.check_model(result.model, full_check=True)
    record = next(r for r in result.records if r.name == "quantize-fp8")
    assert record.changed and not record.rolled_back
    feeds = {"input": held_out["input"][:64]}
    metrics = compare_outputs(OrtRunner(model).run(feeds), OrtRunner(result.model).run(feeds))
    assert min(m.cosine for m in metrics) >= 0.999, [m.describe() for m in metrics]
    assert all(m.argmax_agreement is None or m.argmax_agreement >= 0.98 for m in metrics)


def test_weights_and_zero_points_are_stored_as_float8(digits):
    _, result, _ = digits
    q = result.model
    fp8 = {i.name for i in _fp8_initializers(q)}
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    weight_dqs = [n for n in dqs if n.input[0] in fp8 and len(n.input) == 2]  # weights: no zero point
    assert weight_dqs and all(helper.get_attribute_value(a) == 0 for n in weight_dqs for a in n.attribute if a.name == "axis")
    for node in (n for n in q.graph.node if n.op_type == "QuantizeLinear"):
        assert node.input[2] in fp8, "activation Q/DQ must carry a float8e4m3fn zero point"
    record = next(r for r in result.records if r.name == "quantize-fp8")
    assert record.details["format"] == "fp8"
    assert all(layer["precision"] == "fp8" for layer in record.details["layers"].values())
    for info in record.details["tensors"].values():  # activation scales are amax / 448
        assert info["scale"] == pytest.approx(info["amax"] / 448.0)


def test_below_opset_19_nothing_changes():
    model = onnx.load(str(SAMPLES / "digits_cnn" / "model.onnx"))
    assert model.opset_import[0].version < 19
    result = PassManager("quantize-fp8").run(model, PassContext(calibration=_npz(SAMPLES / "digits_cnn" / "calib.npz")))
    record = result.records[0]
    assert not record.changed and record.stats.get("skipped_opset_below_19") == 1


def test_fp8_weight_rounding_is_relative_and_saturates():
    w = RNG.normal(size=(8, 32)).astype(np.float32) * np.logspace(-3, 1, 8, dtype=np.float32)[:, None]
    q, scale = quantize_weight(w, 0, FP8)
    assert q.dtype == ml_dtypes.float8_e4m3fn
    restored = dequantize(q, scale, 0)
    normal = np.abs(w) >= scale[:, None] * 2.0**-6  # E4M3 normals: relative error <= 2^-4
    rel = np.abs(restored - w)[normal] / np.abs(w)[normal]
    assert rel.max() <= 2.0**-4 + 1e-6
    assert np.abs(q.astype(np.float32)).max() == 448.0  # each channel's amax maps to 448
    # the same weight in INT8 loses small channels' values entirely where FP8 keeps them
    q8, s8 = quantize_weight(w, None, INT8)
    assert np.count_nonzero(q8[0]) < np.count_nonzero(quantize_weight(w, None, FP8)[0][0].astype(np.float32))


def _conv(weight_shape, group=1):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight_shape[1] * group, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(RNG.normal(size=weight_shape).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=[1, 1, 1, 1], name="conv")
    graph = helper.make_graph([node], "g", [x], [y], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=10)


@pytest.mark.parametrize(("shape", "group", "reason"), [
    ((32, 1, 3, 3), 32, "fp8_conv_channels_16_or_fewer"),  # depthwise
    ((8, 32, 3, 3), 1, "fp8_conv_channels_16_or_fewer"),
    ((32, 32, 3, 3), 1, None),
])
def test_tensorrt_fp8_kernel_rules(shape, group, reason):
    model = _conv(shape, group)
    calib = {"x": RNG.normal(size=(8, shape[1] * group, 8, 8)).astype(np.float32)}
    record = PassManager("quantize-fp8").run(model, PassContext(calibration=calib)).records[0]
    if reason is None:
        assert record.changed and record.stats["quantized_nodes"] == 1
    else:
        assert not record.changed and record.stats[f"skipped_{reason}"] == 1


def test_layer_filter_on_small_gemm():
    node = helper.make_node("MatMul", ["a", "b"], ["c"])
    import onnx_graphsurgeon as gs

    gnode = gs.Node("MatMul", inputs=[gs.Variable("a"), gs.Constant("b", np.zeros((64, 8), np.float32))])
    assert fp8_layer_filter(gnode, np.zeros((64, 8), np.float32)) == "fp8_gemm_dim_below_16"
    assert fp8_layer_filter(gnode, np.zeros((64, 64), np.float32)) is None
    assert node.op_type == "MatMul"


@pytest.mark.parametrize("options", ["method=entropy", "bias_correction=on"])
def test_int8_only_options_are_refused(options):
    from optimizer.errors import PipelineError

    with pytest.raises((PipelineError, ValueError)):
        PassManager(f"quantize-fp8({options})")


def test_attention_option_quantizes_activation_matmuls():
    folder = SAMPLES / "transformer"
    model = onnx.load(str(folder / "model.onnx"))
    calib = _npz(folder / "calib.npz")
    prefix = PRESETS["default"] + ",upgrade-opset(min=19),"  # the default pipeline folds the weights' Transposes
    plain = PassManager(prefix + "quantize-fp8").run(model, PassContext(calibration=calib))
    attn = PassManager(prefix + "quantize-fp8(attention=true)").run(model, PassContext(calibration=calib))
    before = next(r for r in plain.records if r.name == "quantize-fp8").stats
    after = next(r for r in attn.records if r.name == "quantize-fp8").stats
    assert before.get("skipped_matmul_without_constant_weight", 0) > 0
    assert after.get("skipped_matmul_without_constant_weight", 0) == 0
    assert after["quantized_nodes"] == before["quantized_nodes"] + before["skipped_matmul_without_constant_weight"]
    feeds = {k: v[:16] for k, v in calib.items()}
    metrics = compare_outputs(OrtRunner(model).run(feeds), OrtRunner(attn.model).run(feeds))
    assert min(m.cosine for m in metrics) >= 0.99


def test_tensorrt_rtx_builds_fp8_output(digits):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed (pip install tensorrt-rtx-cu12)")
    from optimizer.tensorrt_rtx import check_model

    checked = check_model(digits[1].model)
    assert checked.built, checked.errors
