"""ONNX Runtime sessions shared by a run's stages (optimizer/runtime.py: ``Sessions``)."""

import numpy as np
import onnx
import pytest
from helpers import SAMPLES, parse_model

import optimizer.runtime as runtime
from optimizer import emulation
from optimizer import optimize
from optimizer.runtime import OrtRunner, Sessions
from optimizer.stats import model_stats

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


def test_one_session_open_at_a_time_unless_asked_and_outputs_outlive_it():
    original, a, b = parse_model(RELU), parse_model(RELU), parse_model(RELU)
    sessions = Sessions()
    x = np.ones((1, 4), np.float32)
    sessions.run(original, {"x": x}, keep=True)
    runner = sessions.runner(original)
    sessions.runner(a)  # closes the original's session first: one model's weights in memory at a time
    sessions.run(original, {"x": x})  # from memory: no session needed
    assert sessions.loads == 2 and sessions.reused == 1
    with sessions.open_at_once(2):
        sessions.runner(original)
        sessions.runner(b)
        first = sessions.runner(original)
        assert sessions.loads == 4 and sessions.runner(b) is not None and sessions.loads == 4
    assert first is not runner  # reloaded once it had been closed
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    sessions.alias(copy, original)
    assert sessions.run(copy, {"x": x}) is not None and sessions.reused == 2  # the copy's outputs are the original's
    sessions.forget(original)
    sessions.run(original, {"x": x})
    assert sessions.runs == 2


def test_optimize_loads_the_original_and_the_result_once_each(monkeypatch):
    loads = []

    class Counting(OrtRunner):
        def __init__(self, model, **kwargs):
            loads.append(model)
            super().__init__(model, **kwargs)

    monkeypatch.setattr(runtime, "OrtRunner", Counting)
    result = optimize(SAMPLES / "digits_cnn" / "model.onnx", data=SAMPLES / "digits_cnn" / "eval.npz")
    assert result.report.status == "ok" and result.report.accuracy.samples > 8
    # sample planning and verification's reference share the original's session; the evaluation runs
    # the original again (eval.npz has more samples than verification) and the verified result
    # (the written model) in the session verification left open
    assert len(loads) == 3
    assert max(m.max_rel for m in result.report.accuracy.outputs) < 1e-4
    # sizes counted once per model are still those of the input and of the model returned
    assert result.report.original == model_stats(onnx.load(str(SAMPLES / "digits_cnn" / "model.onnx")))
    assert result.report.optimized == model_stats(result.model)


# -- large weights handed to ONNX Runtime as arrays -------------------------------------------------
MODELS = sorted(SAMPLES.glob("*/model.onnx")) + sorted(SAMPLES.glob("zoo/*.onnx"))


def _whole_model_outputs(model, feeds, optimize):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {i.name: feeds[i.name] for i in session.get_inputs()})))


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.parent.name if p.name == "model.onnx" else p.stem)
def test_weights_handed_over_apart_give_the_outputs_of_the_whole_model(path):
    model = onnx.load(str(path))
    if emulation.has_bfloat16(model):
        pytest.skip("bf16 models run on an emulated copy")
    data_path = path.with_name("eval.npz") if path.name == "model.onnx" else path.with_suffix(".npz")
    data = dict(np.load(data_path))
    dynamic_batch = {s.name for s in runtime.input_specs(model) if s.shape and not isinstance(s.shape[0], int)}
    feeds = {n: data[n][:2] if n in dynamic_batch else data[n][:1] for n in dynamic_batch | {
        s.name for s in runtime.input_specs(model)}}  # two samples (one where the batch is static)
    for optimize in (False, True):
        runner = OrtRunner(model, optimize=optimize)
        expected = _whole_model_outputs(model, feeds, optimize)
        got = runner.run(feeds)
        assert got.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name} (optimize={optimize})")
    big = [t for t in model.graph.initializer if np.prod(t.dims) > runtime.APART_ELEMENTS and t.HasField("raw_data")]
    assert bool(runner._weights) == bool(big)


def test_a_model_onnx_runtime_refuses_with_weights_apart_is_loaded_whole(monkeypatch):
    model = onnx.load(str(SAMPLES / "digits_cnn" / "model.onnx"))
    import onnxruntime as ort

    def refuse(self, names, values):
        raise RuntimeError("no external initializers here")

    monkeypatch.setattr(ort.SessionOptions, "add_external_initializers", refuse)
    runner = OrtRunner(model)
    assert runner._weights == []
    x = np.zeros((1, 1, 8, 8), np.float32)
    np.testing.assert_array_equal(runner.run({"input": x})["logits"], _whole_model_outputs(model, {"input": x}, False)["logits"])


def test_a_weight_with_too_few_bytes_is_refused_with_onnx_runtimes_words():
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    w.raw_data = w.raw_data[:-4]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    with pytest.raises(runtime.RuntimeFailure, match="ONNX Runtime cannot load the model"):
        OrtRunner(model)


def test_outputs_are_remembered_for_the_few_models_used_last():
    models = [parse_model(RELU) for _ in range(4)]
    sessions = Sessions(models=2)
    x = np.ones((1, 4), np.float32)
    for m in models[:3]:
        sessions.run(m, {"x": x}, keep=True)
    sessions.run(models[2], {"x": x})
    sessions.run(models[1], {"x": x})
    assert sessions.reused == 2
    sessions.run(models[0], {"x": x})  # forgotten: the two used last are models[1] and models[2]
    assert sessions.reused == 2 and sessions.runs == 4
