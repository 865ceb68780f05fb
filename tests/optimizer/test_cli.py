"""The ``optimize`` command: happy paths, reports, exit codes, one-line errors, inputs untouched."""

import hashlib
import json
import shutil
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from helpers import SAMPLES, assert_same_outputs

from optimizer import PRESETS, Pass, PassResult, available_passes, register_pass
from optimizer.cli import main
from optimizer.registry import _REGISTRY

DIGITS = SAMPLES / "digits_cnn"


@pytest.fixture
def workdir(tmp_path):
    shutil.copy(DIGITS / "model.onnx", tmp_path / "model.onnx")
    shutil.copy(DIGITS / "eval.npz", tmp_path / "eval.npz")
    return tmp_path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_optimize_writes_model_and_reports(workdir, capsys):
    model = workdir / "model.onnx"
    before = digest(model)
    code = main([str(model), "--data", str(workdir / "eval.npz"), "--report", str(workdir / "r.json"),
                 "--report", str(workdir / "r.md")])
    out = capsys.readouterr().out
    assert code == 0
    assert digest(model) == before
    optimized = workdir / "model.opt.onnx"
    assert optimized.exists()
    assert "task accuracy" in out and "compression" in out
    report = json.loads((workdir / "r.json").read_text())
    assert report["schema"] == "onnx-trt-optimizer/report/v1"
    assert report["status"] == "ok"
    assert report["pipeline"] == PRESETS["default"]
    assert report["summary"]["nodes"] == {"before": 20, "after": 15}
    assert report["summary"]["compression"]["bytes"] > 1.0
    assert report["accuracy"]["samples"] == 450
    assert report["accuracy"]["task"]["drop"] == pytest.approx(0.0, abs=1e-9)
    assert report["accuracy"]["task"]["original"] >= 95.0
    fused = [p for p in report["passes"] if p["name"] == "fuse-conv-bn" and p["changed"]]
    assert fused and fused[0]["stats"]["folded"] == 5 and fused[0]["verification"] == "passed"
    assert "# Optimization report" in (workdir / "r.md").read_text()
    data = np.load(workdir / "eval.npz")
    assert_same_outputs(onnx.load(str(model)), onnx.load(str(optimized)), {"input": data["input"][:64]})


def test_json_flag_prints_only_json(workdir, capsys):
    code = main([str(workdir / "model.onnx"), "-o", str(workdir / "o.onnx"), "--json", "--passes", "cleanup"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline"] == "cleanup" and report["output"]["path"].endswith("o.onnx")


def test_shapes_set_dynamic_dims(workdir, capsys):
    code = main([str(workdir / "model.onnx"), "-o", str(workdir / "o.onnx"), "--json", "--shapes", "input:4x1x8x8"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"]["synthetic"] is True
    assert not any("dynamic dims" in w for w in report["warnings"])


def test_list_passes_prints_help(capsys):
    assert main(["--list-passes"]) == 0
    out = capsys.readouterr().out
    for name, cls in available_passes().items():
        assert name in out
        assert cls.__doc__.strip().splitlines()[0] in out
    assert "default: fixpoint(" in out


def _bad_external(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    sub = tmp_path / "sub"
    sub.mkdir()
    onnx.save(model, str(sub / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    proto = onnx.load(str(sub / "m.onnx"), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"  # onnx refuses to write this; an attacker's file would have it
    (sub / "m.onnx").write_bytes(proto.SerializeToString())
    return sub / "m.onnx"


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "model file not found"),
        ("empty", "empty"),
        ("truncated", "not a valid ONNX model"),
        ("not-onnx", "not a valid ONNX model"),
        ("external-outside", "outside the model's folder"),
        ("unknown-pass", "unknown pass 'fuse-conv-nb'; did you mean 'fuse-conv-bn'"),
        ("bad-option", "has no option 'ratio'"),
        ("bad-option-value", "bad options for pass 'prune-channels': ratio must be in [0, 1); got 1.5"),
        ("bad-shapes", "cannot read shape"),
        ("unknown-shape-input", "--shapes names unknown input"),
        ("wrong-static-shape", "the model fixes it to batchx1x8x8"),
        ("overwrite-input", "refusing to overwrite the input model"),
        ("pickled-data", "pickled objects"),
        ("data-missing-input", "no array for model input 'input'"),
        ("bad-report-format", "unknown report format"),
        ("no-model", "a model file is required"),
        ("bad-verify", ""),
    ],
)
def test_bad_input_one_line_exit_2_input_unchanged(workdir, capsys, case, message):
    model = workdir / "model.onnx"
    args = [str(model), "-o", str(workdir / "out.onnx")]
    if case == "missing":
        args[0] = str(workdir / "nope.onnx")
    elif case == "empty":
        model.write_bytes(b"")
    elif case == "truncated":
        model.write_bytes((DIGITS / "model.onnx").read_bytes()[:5000])
    elif case == "not-onnx":
        model.write_bytes(b"PK\x03\x04 definitely a zip, not onnx" * 50)
    elif case == "external-outside":
        (workdir / "secret.bin").write_bytes(np.ones(16, np.float32).tobytes())
        model = _bad_external(workdir)
        args[0] = str(model)
    elif case == "unknown-pass":
        args += ["--passes", "cleanup,fuse-conv-nb"]
    elif case == "bad-option":
        args += ["--passes", "cleanup(ratio=0.3)"]
    elif case == "bad-option-value":
        args += ["--passes", "cleanup,prune-channels(ratio=1.5)"]
    elif case == "bad-shapes":
        args += ["--shapes", "input:1xthree"]
    elif case == "unknown-shape-input":
        args += ["--shapes", "images:1x1x8x8"]
    elif case == "wrong-static-shape":
        args += ["--shapes", "input:1x3x8x8"]
    elif case == "overwrite-input":
        args[2] = str(model)
    elif case == "pickled-data":
        np.save(workdir / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        import zipfile

        with zipfile.ZipFile(workdir / "obj.npz", "w") as z:
            z.write(workdir / "obj.npy", "input.npy")
        args += ["--data", str(workdir / "obj.npz")]
    elif case == "data-missing-input":
        np.savez(workdir / "wrong.npz", images=np.zeros((2, 1, 8, 8), np.float32))
        args += ["--data", str(workdir / "wrong.npz")]
    elif case == "bad-report-format":
        args += ["--report", str(workdir / "r.txt"), "--passes", "cleanup"]
    elif case == "no-model":
        args = []
    elif case == "bad-verify":
        args += ["--verify", "sometimes"]
    before = digest(model) if model.exists() else None
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    if message:
        lines = [line for line in err.strip().splitlines() if line.startswith("optimize: error")]
        assert len(lines) == 1 and message in lines[0], err
        assert "Traceback" not in err
    if before is not None:
        assert digest(model) == before
    if case != "bad-report-format":
        assert not (workdir / "out.onnx").exists()


@pytest.fixture
def sabotage_pass():
    saved = dict(available_passes())

    @register_pass
    @dataclass
    class FlipRelu(Pass):
        """Turns Relu into Sigmoid (wrong on purpose)."""

        name = "test-flip-relu"

        def run(self, graph, ctx):
            nodes = [n for n in graph.nodes if n.op == "Relu"]
            for n in nodes:
                n.op = "Sigmoid"
            return PassResult(changed=bool(nodes))

    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_strict_verification_failure_exits_1_and_writes_no_model(workdir, capsys, sabotage_pass):
    code = main([str(workdir / "model.onnx"), "--passes", "cleanup,test-flip-relu", "--strict",
                 "--report", str(workdir / "r.json")])
    err = capsys.readouterr().err
    assert code == 1
    assert "pass 'test-flip-relu' failed" in err and "output 'logits' diverges" in err
    assert not (workdir / "model.opt.onnx").exists()
    report = json.loads((workdir / "r.json").read_text())
    assert report["status"] == "verification_failed"


@pytest.mark.parametrize("flags", [[], ["--keep-going"]], ids=["default", "keep-going"])
def test_failing_pass_is_rolled_back_named_and_exits_0(workdir, capfd, sabotage_pass, flags):
    code = main([str(workdir / "model.onnx"), "--passes", "test-flip-relu,fuse-conv-bn", "--json", *flags])
    captured = capfd.readouterr()
    report = json.loads(captured.out)
    assert code == 0
    assert (workdir / "model.opt.onnx").is_file()
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err_lines) == 1 and "rolled back" in err_lines[0] and "test-flip-relu" in err_lines[0], captured.err
    assert report["rolled_back"][0]["pass"] == "test-flip-relu" and "diverges" in report["rolled_back"][0]["why"]
    assert report["passes"][0]["rolled_back"] is True
    assert report["summary"]["nodes"]["after"] == 15
    assert report["accuracy"]["outputs"]["logits"]["max_rel"] < 1e-5


def test_custom_domain_op_is_kept_and_reported(tmp_path, capsys):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("MyOp", ["a"], ["b"], domain="com.example"),
         helper.make_node("Relu", ["b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)], ir_version=10)
    onnx.save(model, str(tmp_path / "custom.onnx"))
    code = main([str(tmp_path / "custom.onnx"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    optimized = onnx.load(str(tmp_path / "custom.opt.onnx"))
    assert [n.op_type for n in optimized.graph.node] == ["MyOp", "Relu"]
    assert optimized.graph.node[0].domain == "com.example"
    assert any("numeric verification unavailable" in w for w in report["warnings"])
    assert report["accuracy"] is None


def test_int8_writes_trt_calibration_cache_and_reuses_range_cache(workdir, capsys):
    calib = str(DIGITS / "calib.npz")
    args = [str(workdir / "model.onnx"), "-o", str(workdir / "q.onnx"), "--int8", "--calib", calib,
            "--range-cache", str(workdir / "ranges.json"), "--calib-cache", str(workdir / "trt.cache"), "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    lines = (workdir / "trt.cache").read_text().splitlines()
    assert lines[0].startswith("TRT-") and lines[0].endswith("EntropyCalibration2")
    assert all(len(line.rsplit(": ", 1)[1]) == 8 for line in lines[1:]) and len(lines) > 2
    assert (workdir / "ranges.json").exists()
    assert main(args) == 0  # second run: ranges come from the cache, same model
    second = json.loads(capsys.readouterr().out)
    q1 = next(p for p in first["passes"] if p["name"] == "quantize-int8")["details"]
    q2 = next(p for p in second["passes"] if p["name"] == "quantize-int8")["details"]
    assert q2["calibration"]["source"].startswith("range cache")
    assert q1["tensors"] == q2["tensors"]
