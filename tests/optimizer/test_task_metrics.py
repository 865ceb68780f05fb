"""Task metrics (optimizer/task_metrics.py): built-ins, the user's own functions, and their use by
the report, ``optimize check`` and the CLI's one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import SAMPLES

from optimizer.cli import main
from optimizer.errors import InputError
from optimizer.task_metrics import BUILTIN, MetricAccumulator, load_metric

DIGITS = SAMPLES / "digits_cnn"


def test_builtins_on_known_values():
    ref = {"y": np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)}
    new = {"y": np.array([[0.2, 0.8], [0.3, 0.7]], np.float32)}
    labels = np.array([1, 0])
    assert BUILTIN["top1"](ref, ref, labels) == 100.0 and BUILTIN["top1"](new, ref, labels) == 50.0
    assert BUILTIN["top5"](new, ref, labels) == 100.0
    assert BUILTIN["argmax-agreement"](new, ref, None) == 50.0
    assert BUILTIN["cosine"](ref, ref, None) == pytest.approx(100.0)
    assert BUILTIN["sqnr"](ref, ref, None) == 100.0 and BUILTIN["sqnr"](new, ref, None) < 20
    with pytest.raises(InputError, match="needs labels"):
        BUILTIN["top1"](new, ref, None)


def test_accumulator_weights_batches_by_samples():
    acc = MetricAccumulator("argmax-agreement", BUILTIN["argmax-agreement"])
    ref = {"y": np.eye(3, dtype=np.float32)}
    acc.update({"y": np.eye(3, dtype=np.float32)}, ref, None, 3)  # 100
    acc.update({"y": np.eye(3, dtype=np.float32)[:1][:, ::-1]}, {"y": np.eye(3, dtype=np.float32)[:1]}, None, 1)  # 0
    score = acc.result()
    assert score.original == 100.0 and score.optimized == pytest.approx(75.0) and score.drop == pytest.approx(25.0)


def test_user_metric_from_a_file_and_a_module(tmp_path, monkeypatch):
    path = tmp_path / "my_metrics.py"
    path.write_text("def halves(outputs, reference, labels):\n    return 50.0\n")
    name, function = load_metric(f"{path}:halves")
    assert function({}, {}, None) == 50.0 and name.endswith(":halves")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_metric("my_metrics:halves")[1]({}, {}, None) == 50.0
    for bad, message in [("nope", "unknown metric"), (f"{path}:missing", "no function"),
                         ("no_such_module_xyz:f", "cannot import"), ("missing.py:f", "no such file")]:
        with pytest.raises(InputError, match=message):
            load_metric(bad)


def test_metric_in_the_report_and_a_bad_metric_is_one_line(tmp_path, capsys):
    code = main([str(DIGITS / "model.onnx"), "-o", str(tmp_path / "o.onnx"), "--int8", "--calib",
                 str(DIGITS / "calib.npz"), "--data", str(DIGITS / "eval.npz"), "--metric", "top1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    metric = report["accuracy"]["metric"]
    assert metric["name"] == "top1" and metric["original"] == pytest.approx(report["accuracy"]["task"]["original"])
    assert metric["optimized"] == pytest.approx(report["accuracy"]["task"]["optimized"])
    code = main([str(DIGITS / "model.onnx"), "-o", str(tmp_path / "o2.onnx"), "--metric", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown metric" in err
    assert not (tmp_path / "o2.onnx").exists()


def test_budget_uses_the_metric(tmp_path):
    from optimizer import optimize

    data = np.load(DIGITS / "calib.npz")
    calib = {"input": data["input"][:4] * 0.1}  # a poor calibration so INT8 costs accuracy
    result = optimize(DIGITS / "model.onnx", "default,quantize-int8(method=minmax)", data=DIGITS / "eval.npz",
                      calibration=calib, max_accuracy_drop=0.0, metric="argmax-agreement")
    budget = result.report.budget
    assert budget["metric"] == "metric argmax-agreement"
    assert budget["met"] == (budget["drop"] <= 0.0)
    assert result.report.accuracy.metric.drop == pytest.approx(budget["drop"], abs=1e-9)


def _examples():
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("example_metrics", ROOT / "examples" / "metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_metrics_on_zoo_outputs():
    from helpers import run

    import onnx

    examples = _examples()
    zoo = SAMPLES / "zoo"
    for name, metric in (("yolo_dynamic", examples.detection_f1), ("paddle_ocr_rec", examples.ctc_char_accuracy)):
        model = onnx.load(str(zoo / f"{name}.onnx"))
        with np.load(zoo / f"{name}.npz") as npz:
            feeds = {k: npz[k][:1] for k in npz.files}
        ref = run(model, feeds)
        assert metric(ref, ref, None) == 100.0, name
        key = next(iter(ref))
        noisy = {key: np.roll(ref[key], 1, axis=1)}  # box coordinates mix with scores / the text rotates
        assert 0.0 <= metric(noisy, ref, None) < 100.0, name


def test_readme_user_metric_snippet_runs(tmp_path):
    import re

    from helpers import ROOT

    text = (ROOT / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```text\n(.*?)```", text, flags=re.S) if "def top1_vs_fp32" in b)
    path = tmp_path / "my_metric.py"
    path.write_text(snippet)
    _, function = load_metric(f"{path}:top1_vs_fp32")
    ref = {"y": np.eye(4, dtype=np.float32)}
    assert function(ref, ref, None) == 100.0
    assert function({"y": np.eye(4, dtype=np.float32)[::-1]}, ref, None) == 0.0


def test_optimize_check_applies_the_bound_to_the_metric(capsys):
    code = main(["check", str(DIGITS / "model.onnx"), "--preset", "int8", "--calib", str(DIGITS / "calib.npz"),
                 "--data", str(DIGITS / "eval.npz"), "--max-accuracy-drop", "1.0", "--metric", "argmax-agreement",
                 "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["ok"]
    assert any("argmax-agreement" in b["name"] for b in result["bounds"]), result["bounds"]
