"""A pass's accuracy floor: quantize-fp8 holds every float output's cosine >= min_cosine when the
user sets no budget, by returning its noisiest layers to float (optimizer.api / optimizer.budget)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from optimizer import optimize
from optimizer.errors import PipelineError
from optimizer.pipeline import parse_pipeline
from tests.helpers import run

ZOO = Path(__file__).resolve().parents[2] / "sample_models" / "zoo"
FP8 = "default,upgrade-opset(min=19),quantize-fp8(method=minmax{})"

pytestmark = pytest.mark.xdist_group("accuracy_floor")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _fp8_nodes(model: onnx.ModelProto) -> int:
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    return sum(1 for init in model.graph.initializer if init.data_type == fp8 and len(init.dims) >= 2)


@pytest.fixture(scope="module")
def vit():
    data = dict(np.load(ZOO / "hf_vit.npz"))
    return onnx.load(ZOO / "hf_vit.onnx"), data


@pytest.fixture(scope="module")
def every_layer(vit):
    model, data = vit
    return optimize(model, FP8.format(",min_cosine=0"), data=data, calibration=data)


@pytest.fixture(scope="module")
def floored(vit):
    model, data = vit
    return optimize(model, FP8.format(""), data=data, calibration=data)


def test_without_floor_fp8_everywhere_loses_more_than_the_floor(every_layer):
    # the premise of the floor: E4M3 on every layer of this outlier-channel ViT costs > 0.1 % cosine
    assert every_layer.report.budget is None
    assert every_layer.report.accuracy.outputs[0].cosine < 0.999


def test_floor_returns_the_noisiest_layers_to_float_and_holds(vit, floored, every_layer):
    model, data = vit
    budget = floored.report.budget
    assert budget["floor"] == {"pass": "quantize-fp8", "min_cosine": 0.999}
    assert budget["met"] and budget["fallbacks"]
    assert all(f["pass_name"] == "quantize-fp8" for f in budget["fallbacks"])
    # the report's figure is true: recompute the cosine from both models on the same samples
    feeds = {k: v for k, v in data.items() if k in {i.name for i in model.graph.input}}
    ref, new = run(model, feeds), run(floored.model, feeds)
    cosine = min(_cosine(new[n], ref[n]) for n in ref)
    assert cosine >= 0.999
    assert floored.report.accuracy.outputs[0].cosine == pytest.approx(cosine, abs=1e-6)
    # only the fallbacks left FP8: every other layer is still quantized
    assert _fp8_nodes(floored.model) == _fp8_nodes(every_layer.model) - len(budget["fallbacks"])
    assert floored.report.status == "ok"


def test_user_budget_replaces_the_floor(vit):
    model, data = vit
    result = optimize(model, FP8.format(""), data=data, calibration=data, max_accuracy_drop=100.0)
    assert "floor" not in result.report.budget and result.report.budget["fallbacks"] == []


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_min_cosine_outside_0_1_is_refused(value):
    with pytest.raises((PipelineError, ValueError), match="min_cosine"):
        parse_pipeline(f"quantize-fp8(min_cosine={value})")
