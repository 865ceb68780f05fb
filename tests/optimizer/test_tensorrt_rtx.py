"""TensorRT-RTX ahead-of-time checks: optimized sample models parse and build; bad input is reported.

No GPU is needed: TensorRT-RTX parses and builds serialized engines on the CPU. Engines are never
deserialized or run here.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto
from helpers import SAMPLE_MODELS

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed (pip install tensorrt-rtx-cu12)")

from optimizer import optimize  # noqa: E402
from optimizer.errors import InputError, OptimizerError  # noqa: E402
from optimizer.tensorrt_rtx import (  # noqa: E402
    TensorRTUnavailableError,
    TrtCheckResult,
    check_model,
    compute_capabilities,
    is_available,
)


def _custom_op_model() -> onnx.ModelProto:
    """Relu -> com.example::MyCustomOp -> Relu, with a dynamic batch dimension."""
    nodes = [
        oh.make_node("Relu", ["x"], ["a"], name="relu_in"),
        oh.make_node("MyCustomOp", ["a"], ["b"], name="my_custom", domain="com.example"),
        oh.make_node("Relu", ["b"], ["y"], name="relu_out"),
    ]
    graph = oh.make_graph(
        nodes,
        "custom",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return oh.make_model(
        graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.example", 1)], ir_version=10
    )


def test_available():
    assert is_available()
    assert "SM89" in compute_capabilities()


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=[p.parent.name for p in SAMPLE_MODELS])
def test_optimized_sample_model_builds(path, tmp_path):
    eval_data = path.parent / "eval.npz"
    res = optimize(path, "default", data=eval_data if eval_data.exists() else None)
    assert res.model is not None

    engine = tmp_path / "model.plan"
    result = check_model(res.model, save_engine=engine)

    assert isinstance(result, TrtCheckResult)
    assert result.parsed, result.errors
    assert result.unsupported == [], result.unsupported
    assert result.built, result.errors
    assert result.engine_bytes > 0
    assert result.errors == []
    assert result.ok
    assert result.compute_capability == "SM89"
    assert engine.stat().st_size == result.engine_bytes
    assert result.to_dict()["engine_bytes"] == result.engine_bytes


def test_sample_models_exist():
    assert {p.parent.name for p in SAMPLE_MODELS} >= {"digits_cnn", "channel_last", "transformer"}


def test_custom_op_is_reported_not_crashing():
    result = check_model(_custom_op_model())

    assert not result.built
    assert result.engine_bytes == 0
    assert not result.ok
    assert not result.parsed or result.unsupported
    names = [node.name for node in result.unsupported]
    assert names == ["my_custom"], result.unsupported
    node = result.unsupported[0]
    assert node.op_type == "MyCustomOp"
    assert node.domain == "com.example"
    assert node.reason
    assert any("my_custom" in e for e in result.errors), result.errors
    assert result.to_dict()["unsupported"][0]["name"] == "my_custom"


def test_custom_op_from_file_without_build(tmp_path):
    path = tmp_path / "custom.onnx"
    onnx.save_model(_custom_op_model(), path)
    result = check_model(path, build=False)
    assert [n.op_type for n in result.unsupported] == ["MyCustomOp"]
    assert result.build_time_s == 0.0


@pytest.mark.parametrize("bad", ["SM90X", "sm_999", "ampere", ""])
def test_bad_compute_capability_is_clear(bad):
    with pytest.raises(InputError) as info:
        check_model(_custom_op_model(), compute_capability=bad)
    message = str(info.value)
    assert "compute capability" in message
    assert "SM89" in message and "SM75" in message  # lists the valid ones


def test_compute_capability_spellings():
    sample = SAMPLE_MODELS[0]
    assert check_model(sample, build=False, compute_capability="sm_86").compute_capability == "SM86"
    assert check_model(sample, build=False, compute_capability="8.0").compute_capability == "SM80"


def test_dynamic_profile_and_external_data(tmp_path, monkeypatch):
    """A min/opt/max profile is honoured; a model with external data builds from a temp folder."""
    import optimizer.tensorrt_rtx as mod

    seen = []
    original = mod._model_for_trt
    monkeypatch.setattr(mod, "_model_for_trt", lambda model, on_disk: seen.append(on_disk) or original(model, on_disk))
    model = onnx.load(str(next(p for p in SAMPLE_MODELS if p.parent.name == "transformer")))
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location="ext.onnx.data", size_threshold=16,
    )
    assert (tmp_path / "ext.onnx.data").exists()
    profile = ((1, 1, 32), (2, 8, 32), (4, 16, 32))
    result = check_model(path, shapes={"tokens_embedded": profile}, workspace_mb=64)
    assert result.built, result.errors
    assert result.profile == {"tokens_embedded": [list(s) for s in profile]}
    assert seen == [True]  # parsed with parse_from_file from a private temp folder


def test_bad_shapes_are_input_errors():
    transformer = next(p for p in SAMPLE_MODELS if p.parent.name == "transformer")
    with pytest.raises(InputError, match="unknown input"):
        check_model(transformer, shapes={"nope": (1, 1, 32)})
    with pytest.raises(InputError, match="fixed dimension"):
        check_model(transformer, shapes={"tokens_embedded": (1, 1, 31)})


def test_missing_library_error(monkeypatch):
    import sys

    import optimizer.tensorrt_rtx as mod

    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # makes the import raise ImportError
    assert not mod.is_available()
    with pytest.raises(TensorRTUnavailableError, match="pip install tensorrt-rtx-cu12") as info:
        check_model(_custom_op_model())
    assert isinstance(info.value, OptimizerError)


@pytest.mark.parametrize("preset", ["fp16", "int8"])
@pytest.mark.parametrize("name", ["digits_cnn", "channel_last", "transformer"])
def test_sample_models_fp16_and_int8_outputs_build(name, preset):
    """CI proof that our explicit-precision outputs (FP16 types, INT8 Q/DQ) parse and build."""
    from optimizer import optimize

    folder = Path(__file__).resolve().parents[2] / "sample_models" / name
    result = optimize(folder / "model.onnx", preset, data=folder / "eval.npz",
                      calibration=folder / "calib.npz" if preset == "int8" else None)
    checked = check_model(result.model, build=True)
    assert checked.parsed and not checked.unsupported, checked.errors
    assert checked.built and checked.engine_bytes > 0
