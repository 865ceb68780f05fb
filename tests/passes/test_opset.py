"""``upgrade-opset``: differential tests (original vs upgraded in ONNX Runtime on the same seeded
inputs), its refusals, and the ``--int8`` path that makes INT8 weights per channel below opset 13."""

import json

import numpy as np
import onnx
import pytest
from helpers import SAMPLES, assert_same_outputs, op_types, random_inputs, run_pass
from onnx import TensorProto, helper, numpy_helper

from optimizer import PRESETS, PassManager, format_pipeline
from optimizer.cli import build_parser, main, pipeline_from_args

ZOO = SAMPLES / "zoo"


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def upgrade(model: onnx.ModelProto, spec: str = "upgrade-opset"):
    """Run the pass (numeric verification); return the result and its one record."""
    result = run_pass(model, spec)
    (record,) = result.records
    assert not record.rolled_back, record.error
    return result, record


def zoo_samples(name: str, n: int = 2) -> dict[str, np.ndarray]:
    data = np.load(ZOO / f"{name}.npz")
    return {k: data[k][:n] for k in data.files if k != "labels"}


def _init(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values), name)


# --------------------------------------------------------------------------- models
def signature_model() -> onnx.ModelProto:
    """Opset 11, with the ops whose signature changed by 13: Split/Squeeze/Unsqueeze/ReduceSum
    take their axes and sizes as inputs from 13, Clip and Resize change type constraints and
    inputs, BatchNormalization is the opset-9 form."""
    rng = np.random.default_rng(0)
    c = 4
    inits = [
        _init("gamma", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        _init("beta", rng.normal(size=c).astype(np.float32)),
        _init("mean", rng.normal(size=c).astype(np.float32)),
        _init("var", rng.uniform(0.5, 2.0, c).astype(np.float32)),
        _init("lo", np.array(-1.0, np.float32)),
        _init("hi", np.array(1.5, np.float32)),
        _init("roi", np.array([], np.float32)),
        _init("scales", np.array([1, 1, 2, 2], np.float32)),
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Clip", ["bn", "lo", "hi"], ["clipped"]),
        helper.make_node("Resize", ["clipped", "roi", "scales"], ["near"], mode="nearest"),
        helper.make_node("Resize", ["clipped", "roi", "scales"], ["lin"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Add", ["near", "lin"], ["up"]),
        helper.make_node("Split", ["up"], ["first", "rest"], axis=1, split=[1, 3]),
        helper.make_node("Unsqueeze", ["first"], ["u"], axes=[0, 3]),  # [1,1,1,1,12,12]
        helper.make_node("Squeeze", ["u"], ["s"], axes=[0, 2, 3]),  # [1,12,12]
        helper.make_node("ReduceSum", ["rest"], ["total"], axes=[1], keepdims=0),  # [1,12,12]
        helper.make_node("Add", ["s", "total"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "signatures", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12, 12]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 12, 12])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    return model


def if_model(opset: int = 11) -> onnx.ModelProto:
    """``if mean(x) > 0`` with opset-11 Unsqueeze/ReduceSum/Squeeze inside both branches."""

    def branch(tag: str, k: float) -> onnx.GraphProto:
        return helper.make_graph(
            [
                helper.make_node("Unsqueeze", ["x"], [f"{tag}_u"], axes=[0]),
                helper.make_node("ReduceSum", [f"{tag}_u"], [f"{tag}_r"], axes=[0], keepdims=1),
                helper.make_node("Squeeze", [f"{tag}_r"], [f"{tag}_s"], axes=[0]),
                helper.make_node("Mul", [f"{tag}_s", f"{tag}_k"], [f"{tag}_y"]),
            ],
            f"{tag}_branch", [], [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, [2, 3, 4])],
            initializer=[_init(f"{tag}_k", np.array([k], np.float32))],
        )

    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
            helper.make_node("Greater", ["m", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 2.0), else_branch=branch("else", -3.0)),
        ],
        "if_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
        initializer=[_init("zero", np.array(0.0, np.float32))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    return model


def custom_domain_model() -> onnx.ModelProto:
    """Opset 11 with an ONNX Runtime contrib op (``com.microsoft.Gelu``) between two opset-11 ops."""
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0]),
            helper.make_node("Gelu", ["u"], ["g"], domain="com.microsoft"),
            helper.make_node("Squeeze", ["g"], ["y"], axes=[0]),
        ],
        "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 11), helper.make_opsetid("com.microsoft", 1)], ir_version=7
    )
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- differential
def test_ops_whose_signature_changed_are_rewritten_and_compute_the_same():
    model = signature_model()
    result, record = upgrade(model)
    assert record.changed and record.stats == {"upgraded_from": 11} and record.verification == "passed"
    assert record.details == {"from": 11, "to": 13}
    new = result.model
    onnx.checker.check_model(new, full_check=True)
    assert opset_of(new) == 13
    nodes = {n.op_type: n for n in new.graph.node}
    for op in ("Split", "Squeeze", "Unsqueeze", "ReduceSum"):  # axes/split attributes became inputs
        assert not {a.name for a in nodes[op].attribute} & {"axes", "split"}, op
        assert len(nodes[op].input) == 2, op
    assert [i.name for i in new.graph.input] == ["x"] and [o.name for o in new.graph.output] == ["y", "total"]
    for seed in (0, 1, 2):  # 3x wider than [-1, 1): the Clip bounds cut somewhere
        inputs = {k: (3 * v).astype(v.dtype) for k, v in random_inputs(model, seed=seed).items()}
        assert_same_outputs(model, new, inputs)


@pytest.mark.parametrize("name,old", [("tiny_detector", 11), ("gru_text", 12), ("paddle_ocr_rec", 11)])
def test_zoo_models_below_13_upgrade_exactly(name, old):
    model = onnx.load(str(ZOO / f"{name}.onnx"))
    assert opset_of(model) == old
    result, record = upgrade(model)
    assert record.changed and record.stats == {"upgraded_from": old} and record.verification == "passed"
    assert opset_of(result.model) == 13
    onnx.checker.check_model(result.model, full_check=True)
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert {n.name for n in model.graph.node} <= {n.name for n in result.model.graph.node}  # names kept
    assert len(result.model.graph.value_info) == len(model.graph.value_info)  # no inferred annotations added
    samples = zoo_samples(name, 8)
    for i in (0, 7):  # one sample at a time: paddle_ocr_rec has a static batch of 1
        assert_same_outputs(model, result.model, {k: v[i : i + 1] for k, v in samples.items()}, rtol=0, atol=0)
    shapes = {k: (1, *v.shape[1:]) for k, v in samples.items()}
    assert_same_outputs(model, result.model, random_inputs(model, seed=3, shapes=shapes), rtol=0, atol=0)


def test_if_bodies_are_upgraded_and_both_branches_compute_the_same():
    model = if_model(11)
    result, record = upgrade(model)
    assert record.stats == {"upgraded_from": 11} and opset_of(result.model) == 13
    (if_node,) = [n for n in result.model.graph.node if n.op_type == "If"]
    for attr in if_node.attribute:
        body = {n.op_type: n for n in attr.g.node}
        assert all(len(body[op].input) == 2 for op in ("Unsqueeze", "ReduceSum", "Squeeze")), attr.name
    rng = np.random.default_rng(0)
    for shift in (1.0, -1.0):  # then-branch, else-branch
        x = (rng.normal(size=(2, 3, 4)) + shift).astype(np.float32)
        assert_same_outputs(model, result.model, {"x": x})


def test_custom_domain_imports_are_kept():
    model = custom_domain_model()
    result, record = upgrade(model)
    assert record.stats == {"upgraded_from": 11}
    domains = {o.domain: o.version for o in result.model.opset_import}
    assert domains == {"": 13, "com.microsoft": 1}
    assert "Gelu" in op_types(result.model)
    assert_same_outputs(model, result.model, random_inputs(model, seed=4))


def test_min_option_upgrades_further():
    model = onnx.load(str(ZOO / "if_branch.onnx"))  # opset 16, an If with Conv/BN branches
    result, record = upgrade(model, "upgrade-opset(min=17)")
    assert record.stats == {"upgraded_from": 16} and opset_of(result.model) == 17
    assert_same_outputs(model, result.model, zoo_samples("if_branch", 8))


# --------------------------------------------------------------------------- no-ops, idempotence
@pytest.mark.parametrize("name", ["if_branch", "mobilenet_v2_tiny"])  # opset 16, opset 13
def test_no_op_at_opset_13_and_newer_without_exporting(name, monkeypatch):
    import passes.opset

    def fail(*args, **kwargs):
        raise AssertionError("no conversion expected")

    monkeypatch.setattr(passes.opset, "convert", fail)
    monkeypatch.setattr(passes.opset.gs, "export_onnx", fail)
    model = onnx.load(str(ZOO / f"{name}.onnx"))
    result, record = upgrade(model)
    assert not record.changed and record.stats == {} and record.verification == "unchanged"
    assert opset_of(result.model) == opset_of(model)


@pytest.mark.parametrize("build", [signature_model, if_model, custom_domain_model])
def test_idempotent(build):
    once = upgrade(build())[0].model
    result, record = upgrade(once)
    assert not record.changed and record.stats == {}
    assert result.model.SerializeToString() == once.SerializeToString()


# --------------------------------------------------------------------------- refusals
def test_refuses_below_opset_7():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3)
    result = run_pass(model, "upgrade-opset", verify="structural")
    (record,) = result.records
    assert not record.changed and record.stats == {"skipped_opset_below_7": 1}
    assert opset_of(result.model) == 6


def test_converter_failure_leaves_the_graph_unchanged(monkeypatch):
    from onnx import version_converter

    def broken(model, target):
        raise RuntimeError("No Adapter For Current Version: Split 11 -> 13")

    monkeypatch.setattr(version_converter, "convert_version", broken)
    model = signature_model()
    result, record = upgrade(model)
    assert not record.changed and record.stats == {"skipped_converter_failed": 1}
    assert "No Adapter For Current Version" in record.details["reason"]
    assert opset_of(result.model) == 11 and op_types(result.model) == op_types(model)


def test_a_conversion_the_checker_rejects_is_refused(monkeypatch):
    from onnx import version_converter

    real = version_converter.convert_version

    def dangling(model, target):
        converted = real(model, target)
        converted.graph.node[-1].input[0] = "no_such_tensor"
        return converted

    monkeypatch.setattr(version_converter, "convert_version", dangling)
    result, record = upgrade(signature_model())
    assert not record.changed and record.stats == {"skipped_converter_failed": 1}
    assert "no_such_tensor" in record.details["reason"]
    assert opset_of(result.model) == 11


def test_model_local_functions_at_the_old_opset_are_refused():
    body = [helper.make_node("Unsqueeze", ["a"], ["t"], axes=[0]), helper.make_node("Squeeze", ["t"], ["b"], axes=[0])]
    function = helper.make_function("local", "Roundtrip", ["a"], ["b"], body, [helper.make_opsetid("", 11)])
    graph = helper.make_graph(
        [helper.make_node("Roundtrip", ["x"], ["y"], domain="local")], "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11), helper.make_opsetid("local", 1)],
                              ir_version=8, functions=[function])
    result, record = upgrade(model)
    assert not record.changed and record.stats == {"skipped_model_local_functions": 1}
    assert "Roundtrip" in record.details["reason"] and opset_of(result.model) == 11


@pytest.mark.parametrize("text", ["upgrade-opset(min=6)", "upgrade-opset(min=99)"])
def test_bad_min_is_a_pipeline_error(text):
    from optimizer import PipelineError

    with pytest.raises(PipelineError, match="min must be an opset between 7 and"):
        PassManager(text)


# --------------------------------------------------------------------------- wiring
def _pipeline(argv):
    return format_pipeline(pipeline_from_args(build_parser().parse_args(argv)))


def test_int8_flag_inserts_upgrade_right_before_quantize():
    assert _pipeline(["m.onnx", "--passes", "cleanup", "--int8"]) == "cleanup,upgrade-opset,smooth-quant,quantize-int8"
    text = _pipeline(["m.onnx", "--int8", "--fp16"])
    assert text == PRESETS["default"] + ",upgrade-opset,smooth-quant,quantize-int8,convert-fp16"
    assert _pipeline(["m.onnx", "--passes", "upgrade-opset(min=14),cleanup", "--int8"]).count("upgrade-opset") == 1
    assert "upgrade-opset" not in _pipeline(["m.onnx", "--fp16"])


@pytest.mark.parametrize("preset", ["int8", "best"])
def test_int8_presets_upgrade_before_quantizing(preset):
    names = [p.name for p in PassManager(preset).steps[1:]]
    assert names[:3] == ["upgrade-opset", "smooth-quant", "quantize-int8"]  # smooth-quant: lossless, before Q/DQ
    assert _pipeline(["m.onnx", "--preset", preset, "--int8"]) == PRESETS[preset]


# --------------------------------------------------------------------------- end to end
def _weight_dequantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    int8 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.INT8}
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8]


def _int8_run(name, tmp_path, capsys):
    out = tmp_path / f"{name}.int8.onnx"
    code = main([str(ZOO / f"{name}.onnx"), "-o", str(out), "--int8", "--calib", str(ZOO / f"{name}.npz"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    passes = {p["name"]: p for p in report["passes"]}
    return onnx.load(str(out)), report, passes, captured.err


@pytest.mark.parametrize("name", ["tiny_detector", "paddle_ocr_rec"])
def test_int8_upgrades_opset_11_and_quantizes_weights_per_channel(name, tmp_path, capsys):
    model, report, passes, _ = _int8_run(name, tmp_path, capsys)
    assert opset_of(model) == 13
    assert passes["upgrade-opset"]["changed"] and passes["upgrade-opset"]["stats"] == {"upgraded_from": 11}
    assert passes["upgrade-opset"]["verification"] == "passed"
    quantized = passes["quantize-int8"]
    assert quantized["changed"] and "skipped_per_tensor_weights_opset_below_13" not in quantized["stats"]
    weights = _weight_dequantizers(model)
    assert weights and all(any(a.name == "axis" for a in n.attribute) for n in weights)
    scales = {t.name: t for t in model.graph.initializer}
    assert any(len(scales[n.input[1]].dims) == 1 and scales[n.input[1]].dims[0] > 1 for n in weights)
    assert not report["rolled_back"]
    output = next(iter(report["accuracy"]["outputs"].values()))
    assert output["cosine"] > 0.98


def test_int8_falls_back_to_per_tensor_when_the_converter_fails(tmp_path, capsys, monkeypatch):
    from onnx import version_converter

    def broken(model, target):
        raise RuntimeError("No Adapter For Current Version")

    monkeypatch.setattr(version_converter, "convert_version", broken)
    model, report, passes, _ = _int8_run("tiny_detector", tmp_path, capsys)
    assert opset_of(model) == 11
    assert passes["upgrade-opset"]["stats"] == {"skipped_converter_failed": 1}
    assert passes["upgrade-opset"]["details"]["reason"] == "No Adapter For Current Version"
    assert passes["quantize-int8"]["stats"]["skipped_per_tensor_weights_opset_below_13"] > 0
    weights = _weight_dequantizers(model)
    assert weights and not any(any(a.name == "axis" for a in n.attribute) for n in weights)


def test_int8_falls_back_to_per_tensor_when_the_upgrade_is_rolled_back(tmp_path, capsys, monkeypatch):
    """A conversion that changes the numbers fails verification, is rolled back, and quantize-int8
    then sees the original opset."""
    import onnx_graphsurgeon as gs

    import passes.opset

    real = passes.opset.convert

    def off_by_ten_percent(graph, target):
        new = real(graph, target)
        conv = next(n for n in new.nodes if n.op == "Conv" and isinstance(n.inputs[1], gs.Constant))
        conv.inputs[1].values = conv.inputs[1].values * np.float32(1.1)
        return new

    monkeypatch.setattr(passes.opset, "convert", off_by_ten_percent)
    model, report, passes_, err = _int8_run("tiny_detector", tmp_path, capsys)
    assert opset_of(model) == 11
    assert [r["pass"] for r in report["rolled_back"]] == ["upgrade-opset"]
    assert "upgrade-opset" in err and "rolled back" in err
    assert passes_["quantize-int8"]["stats"]["skipped_per_tensor_weights_opset_below_13"] > 0
