"""ONNX Runtime sessions shared by a run's stages (optimizer/runtime.py: ``Sessions``)."""

import numpy as np
import onnx
from helpers import SAMPLES, parse_model

import optimizer.runtime as runtime
from optimizer import optimize
from optimizer.runtime import OrtRunner, Sessions

RELU = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
    y = Relu(x)
}
"""


def test_one_session_per_model_and_outputs_reused_only_for_equal_inputs():
    model = parse_model(RELU)
    sessions = Sessions()
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    first = sessions.run(model, {"x": x, "unused": x}, keep=True)
    again = sessions.run(model, {"x": x.copy()})  # equal in value: the remembered outputs
    other = sessions.run(model, {"x": -x})  # other values: a real run
    assert (sessions.loads, sessions.runs, sessions.reused) == (1, 2, 1)
    np.testing.assert_array_equal(again["y"], first["y"])
    np.testing.assert_array_equal(other["y"], np.maximum(-x, 0))
    sessions.run(model, {"x": -x})  # not kept: runs again
    sessions.run(model, {"x": x[:, ::-1].copy()})  # the same values in another order
    assert sessions.runs == 4 and sessions.reused == 1


def test_pinned_models_stay_and_candidates_come_and_go():
    original, a, b = parse_model(RELU), parse_model(RELU), parse_model(RELU)
    sessions = Sessions(keep=1)
    sessions.pin(original)
    runner = sessions.runner(original)
    sessions.runner(a)
    sessions.runner(b)  # evicts a, not the pinned original
    assert sessions.runner(original) is runner and sessions.loads == 3
    sessions.runner(a)
    assert sessions.loads == 4
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    sessions.alias(copy, original)
    assert sessions.runner(copy) is runner
    sessions.forget(original)
    assert sessions.runner(original) is not runner


def test_optimize_loads_the_original_and_the_result_once_each(monkeypatch):
    loads = []

    class Counting(OrtRunner):
        def __init__(self, model, **kwargs):
            loads.append(model)
            super().__init__(model, **kwargs)

    monkeypatch.setattr(runtime, "OrtRunner", Counting)
    result = optimize(SAMPLES / "digits_cnn" / "model.onnx", data=SAMPLES / "digits_cnn" / "eval.npz")
    assert result.report.status == "ok" and result.report.accuracy.samples > 8
    # sample planning, verification's reference and the evaluation share the original's session;
    # the verified group's model is the written one, so the evaluation reuses its session too
    assert len(loads) == 2
    assert max(m.max_rel for m in result.report.accuracy.outputs) < 1e-4
