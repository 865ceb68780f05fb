"""The report's precision section: read from the written model, so it is true whatever the passes did."""

import numpy as np
import onnx
from helpers import SAMPLES

from optimizer import PassContext, PassManager
from optimizer.precision_map import precision_summary


def _npz(path):
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def test_fp8_layers_and_float_reasons_and_bytes_per_type():
    folder = SAMPLES / "digits_cnn"
    model = onnx.load(str(folder / "model.onnx"))
    result = PassManager("upgrade-opset(min=19),quantize-fp8").run(model, PassContext(calibration=_npz(folder / "calib.npz")))
    summary = precision_summary(result.model, result.records)
    record = next(r for r in result.records if r.name == "quantize-fp8")
    layers = {layer["node"]: layer for layer in summary["layers"]}
    fp8 = [n for n, layer in layers.items() if layer["precision"] == "fp8"]
    assert fp8 and all(layers[n]["why"] == "quantized" for n in fp8)
    assert set(fp8) <= set(record.details["nodes"])
    for name, reason in record.details["float_layers"].items():  # every float layer says why
        if name in layers:
            assert layers[name]["precision"] == "fp32" and layers[name]["why"] == reason
    assert summary["counts"]["fp8"] == len(fp8)
    fp8_bytes = sum(int(np.prod(t.dims)) for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN)
    assert summary["bytes"]["fp8"] == fp8_bytes


def test_float_model_is_all_fp32():
    model = onnx.load(str(SAMPLES / "digits_cnn" / "model.onnx"))
    summary = precision_summary(model)
    assert set(summary["counts"]) == {"fp32"} and summary["counts"]["fp32"] == len(summary["layers"]) > 0
    assert set(summary["bytes"]) >= {"fp32"}


def test_a_precision_pass_that_changes_nothing_is_named_with_its_reasons():
    from optimizer.precision_map import precision_warnings

    model = onnx.load(str(SAMPLES / "digits_cnn" / "model.onnx"))  # opset 17: FP8 needs 19
    result = PassManager("quantize-fp8").run(model, PassContext(calibration=_npz(SAMPLES / "digits_cnn" / "calib.npz")))
    assert precision_warnings(result.records) == ["quantize-fp8 (--fp8) changed nothing: opset_below_19 (1)"]
    upgraded = PassManager("upgrade-opset(min=19),quantize-fp8").run(model, PassContext(calibration=_npz(SAMPLES / "digits_cnn" / "calib.npz")))
    assert precision_warnings(upgraded.records) == []
