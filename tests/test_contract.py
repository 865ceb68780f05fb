"""Registry-wide contract: every pass, on every sample model and every onnx-wheel light model.

Each pass must: have help text and a unique kebab-case name, leave a valid model, keep outputs
equal to the original (within its tolerance), and be idempotent (a second run changes nothing).
"""

import onnx
import pytest
from helpers import LIGHT_MODELS, SAMPLE_MODELS, assert_same_outputs, random_inputs

from optimizer import PassManager, available_passes
from optimizer.io import load_model
from optimizer.stats import iter_graphs

MODELS = SAMPLE_MODELS + LIGHT_MODELS
MODEL_IDS = [p.parent.name if p.name == "model.onnx" else p.stem for p in MODELS]
PASSES = sorted(available_passes())


def test_models_are_present():
    assert len(SAMPLE_MODELS) >= 3, "run python sample_models/build.py"
    assert len(LIGHT_MODELS) >= 9, "the onnx wheel ships light_*.onnx models"


@pytest.mark.parametrize("name", PASSES)
def test_pass_has_help_and_stable_name(name):
    cls = available_passes()[name]
    assert cls.name == name
    assert len((cls.__doc__ or "").strip().splitlines()) >= 3, "the docstring is the user-facing help"


@pytest.fixture(scope="module")
def loaded():
    return {}


def _load(path, cache):
    if path not in cache:
        cache[path] = load_model(path)[0]
    return cache[path]


@pytest.mark.parametrize("name", PASSES)
@pytest.mark.parametrize("path", MODELS, ids=MODEL_IDS)
def test_pass_contract(path, name, loaded):
    model = _load(path, loaded)
    cls = available_passes()[name]
    first = PassManager(name, verify="numeric").run(model)
    onnx.checker.check_model(first.model, full_check=True)
    tol = cls.tolerance
    inputs = random_inputs(model, seed=7)
    if cls.lossy:  # judged by the pass's declared tolerance (cosine, finite outputs), on fresh inputs
        from optimizer.metrics import compare_outputs
        from optimizer.runtime import OrtRunner, run_like

        metrics = compare_outputs(OrtRunner(model).run(inputs), run_like(model, first.model, OrtRunner(first.model), inputs))
        assert all(m.within(tol) for m in metrics), [m.describe() for m in metrics]
    else:
        assert_same_outputs(model, first.model, inputs, rtol=tol.rtol, atol=tol.atol)
    second = PassManager(name, verify="structural").run(first.model)
    assert not second.records[0].changed, f"{name} is not idempotent on {path.name}: {second.records[0].stats}"
    assert not second.records[0].rolled_back, f"{name}'s second run on {path.name} failed: {second.records[0].error}"


@pytest.mark.parametrize("path", MODELS, ids=MODEL_IDS)
def test_default_preset_folds_every_conv_batchnorm(path, loaded):
    model = _load(path, loaded)
    result = PassManager("default", verify="numeric").run(model)
    assert not any(r.rolled_back for r in result.records)
    assert_same_outputs(model, result.model, random_inputs(model, seed=11))
    producers = {}
    for graph in iter_graphs(result.model.graph):
        for node in graph.node:
            for out in node.output:
                producers[out] = node.op_type
        for node in graph.node:
            if node.op_type == "BatchNormalization":
                assert producers.get(node.input[0]) != "Conv", f"BatchNormalization after Conv left in {path.name}"
    assert result.model.ByteSize() < 4 * model.ByteSize() + 100_000, "the default preset must not inflate models"


def test_default_preset_keeps_every_qdq_node():
    """A quantized model keeps all its QuantizeLinear/DequantizeLinear nodes through `default`."""
    import numpy as np
    from helpers import op_types
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w_q = numpy_helper.from_array(rng.integers(-127, 127, size=(8, 3, 3, 3)).astype(np.int8), "w_q")
    inits = [
        w_q,
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(8, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "bias"),
        numpy_helper.from_array(np.linspace(0.5, 2, 8).reshape(8, 1, 1).astype(np.float32), "k"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=0),
        helper.make_node("Identity", ["w"], ["w_id"]),
        helper.make_node("Conv", ["xdq", "w_id", "bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "k"], ["m"]),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    result = PassManager("default").run(model)
    ops = op_types(result.model)
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2
    assert "Identity" not in ops
    assert_same_outputs(model, result.model, random_inputs(model))


@pytest.mark.parametrize("name", PASSES)
def test_pass_options_are_frozen_and_replace_checks_them_again(name):
    """Options are checked once, in ``__post_init__``; a change goes through ``dataclasses.replace``."""
    import dataclasses

    cls = available_passes()[name]
    p = cls()
    assert dataclasses.is_dataclass(p) and cls.__dataclass_params__.frozen
    for f in dataclasses.fields(p):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(p, f.name, getattr(p, f.name))
    assert dataclasses.replace(p) == p and dataclasses.replace(p).spec() == p.spec()


@pytest.mark.parametrize("name,options", [
    ("prune-channels", {"ratio": 1.5}), ("prune-channels", {"ratios": ["conv1"]}),
    ("prune-magnitude", {"scope": "all"}), ("smooth-quant", {"alpha": 2.0}),
    ("quantize-int8", {"method": "magic"}), ("quantize-fp8", {"bias_correction": "maybe"}),
    ("quantize-int4", {"block_size": 96}), ("layout-nchw", {"io": "sideways"}),
    ("convert-bf16", {"exclude": "sub"}), ("upgrade-opset", {"min": 1}),
])
def test_option_checks_raise_one_error_type_naming_the_pass(name, options):
    """From Python, from text (the CLI) and through ``dataclasses.replace``: one ``OptionError``."""
    import dataclasses

    from optimizer.errors import OptionError
    from optimizer.pipeline import make_pass

    cls = available_passes()[name]
    for attempt in (lambda: cls(**options), lambda: make_pass(cls, options),
                    lambda: dataclasses.replace(cls(), **options)):
        with pytest.raises(OptionError, match=f"bad options for pass '{name}': ") as info:
            attempt()
        assert isinstance(info.value, ValueError) and info.value.exit_code == 2
