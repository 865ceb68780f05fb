"""Accuracy-regression checks: `optimize check`, bisect, the pytest helper, and our own baselines."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import SAMPLES

from optimizer.cli import main
from optimizer.testing import assert_no_regression

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "baselines"))
from update import CASES, baseline_path  # noqa: E402

DIGITS = SAMPLES / "digits_cnn"


@pytest.mark.parametrize("model,preset", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_sample_models_do_not_regress_against_committed_baselines(model, preset):
    """Our CI: every guarded pipeline keeps the accuracy, cosine and compression of its baseline."""
    folder = SAMPLES / model
    assert_no_regression(
        folder / "model.onnx", preset, data=folder / "eval.npz",
        calibration=folder / "calib.npz" if preset == "int8" else None,
        baseline=baseline_path(model, preset),
    )


def test_check_passes_with_explicit_bounds(capsys):
    code = main(["check", str(DIGITS / "model.onnx"), "--preset", "int8", "--calib", str(DIGITS / "calib.npz"),
                 "--data", str(DIGITS / "eval.npz"), "--max-accuracy-drop", "0.5", "--min-cosine", "0.99",
                 "--min-compression", "3.0"])
    out = capsys.readouterr().out
    assert code == 0 and out.strip().endswith("PASS")


def test_damaged_calibration_fails_and_bisect_names_the_pass(tmp_path, capsys):
    data = np.load(DIGITS / "calib.npz")
    np.savez(tmp_path / "one.npz", input=data["input"][:1] * 0.05)  # one dim sample: ranges far too small
    code = main(["check", str(DIGITS / "model.onnx"), "--passes", "default,quantize-int8(method=minmax)",
                 "--calib", str(tmp_path / "one.npz"), "--data", str(DIGITS / "eval.npz"),
                 "--max-accuracy-drop", "0.5", "--bisect", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and not result["ok"]
    assert result["first_bad_pass"] == "quantize-int8(method=minmax)"
    assert any(not b["ok"] and b["name"].startswith("task_accuracy") for b in result["bounds"])


def test_baseline_report_round_trip(tmp_path, capsys):
    report = tmp_path / "base.json"
    assert main([str(DIGITS / "model.onnx"), "-o", str(tmp_path / "o.onnx"), "--data", str(DIGITS / "eval.npz"),
                 "--report", str(report), "--json"]) == 0
    capsys.readouterr()
    assert main(["check", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "eval.npz"), "--baseline", str(report)]) == 0
    assert main(["check", str(DIGITS / "model.onnx"), "--optimized", str(tmp_path / "o.onnx"),
                 "--data", str(DIGITS / "eval.npz"), "--baseline", str(report)]) == 0
    # a harmful model fails against the same baseline
    assert main(["check", str(DIGITS / "model.onnx"), "--passes", "default,quantize-int8(method=minmax)",
                 "--calib", str(DIGITS / "calib.npz"), "--data", str(DIGITS / "eval.npz"), "--baseline", str(report),
                 "--min-cosine", "0.99999999"]) == 1


@pytest.mark.parametrize("args,message", [
    (["--baseline", "missing.json"], "baseline report not found"),
    ([], "nothing to check"),
])
def test_check_bad_input_exits_2(args, message, capsys):
    code = main(["check", str(DIGITS / "model.onnx"), *args])
    assert code == 2 and message in capsys.readouterr().err


def test_pytest_helper_raises_with_a_readable_diff(tmp_path):
    data = np.load(DIGITS / "calib.npz")
    with pytest.raises(AssertionError, match="task_accuracy drop"):
        assert_no_regression(DIGITS / "model.onnx", "default,quantize-int8(method=minmax)",
                             data=DIGITS / "eval.npz", calibration={"input": data["input"][:1] * 0.05},
                             max_accuracy_drop=0.5)


def test_check_trt_reports_unsupported_nodes(tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed")
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("MyOp", ["a"], ["b"], domain="com.example", name="custom"),
         helper.make_node("Relu", ["b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)], ir_version=10)
    onnx.save(model, str(tmp_path / "c.onnx"))
    assert main(["check-trt", str(tmp_path / "c.onnx")]) == 1
    out = capsys.readouterr().out
    assert "UNSUPPORTED custom (MyOp/com.example)" in out
    assert main(["check-trt", str(DIGITS / "model.onnx"), "--build", "--shapes", "input:1x1x8x8"]) == 0


def test_bisect_in_rounds_names_the_pass_one_process_names(tmp_path, monkeypatch):
    """Prefixes run as executor tasks, three per round: the same pass as the one-at-a-time search,
    in fewer rounds, with the original's outputs computed once for all prefixes."""
    from calibration.executor import InProcessExecutor
    from optimizer import evaluate as evaluation
    from optimizer.regression import check_regression

    data = np.load(DIGITS / "calib.npz")
    np.savez(tmp_path / "one.npz", input=data["input"][:1] * 0.05)
    args = dict(calibration=str(tmp_path / "one.npz"), data=str(DIGITS / "eval.npz"), max_accuracy_drop=0.5, bisect=True)
    pipeline = "cleanup,fuse-conv-bn,quantize-int8(method=minmax),cleanup"
    one = InProcessExecutor()
    three = InProcessExecutor(workers=3)
    computed = []
    real = evaluation.reference_outputs
    monkeypatch.setattr(evaluation, "reference_outputs", lambda *a, **k: computed.append(1) or real(*a, **k))
    results = [check_regression(DIGITS / "model.onnx", pipeline, executor=e, **args) for e in (one, three)]
    assert [r.first_bad_pass for r in results] == ["quantize-int8(method=minmax)"] * 2
    rounds = [[s.tasks for s in e.stages if s.stage == "bisect"] for e in (one, three)]
    assert set(rounds[0]) == {1} and len(rounds[1]) < len(rounds[0]) and max(rounds[1]) > 1
    assert len(computed) == 2  # once per check, not once per prefix
