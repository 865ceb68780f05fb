"""Pruning in full pipelines: budget-driven ratios, and compression that multiplies with INT8."""

import math

import pytest
from helpers import SAMPLES

from optimizer import optimize

DIGITS = SAMPLES / "digits_cnn"


def test_ratio_03_shrinks_parameters_by_a_quarter_and_reports_accuracy():
    result = optimize(DIGITS / "model.onnx", "default,prune-channels(ratio=0.3)", data=DIGITS / "eval.npz")
    report = result.report
    assert report.optimized.params <= 0.75 * report.original.params
    assert report.accuracy.task is not None  # accuracy is measured and reported, whatever it is


def test_budget_keeps_accuracy_within_one_point():
    result = optimize(DIGITS / "model.onnx", "default,prune-channels(ratio=0.3)", data=DIGITS / "eval.npz",
                      calibration=DIGITS / "calib.npz", max_accuracy_drop=1.0)
    report = result.report
    assert report.budget["met"] and report.accuracy.task.drop <= 1.0
    assert report.optimized.params < report.original.params  # something was still pruned
    assert set(report.budget["sensitivity"]) >= {f["node"] for f in report.budget["fallbacks"]}


def test_prune_then_int8_compression_multiplies():
    result = optimize(DIGITS / "model.onnx", "default,prune-channels(ratio=0.3),quantize-int8",
                      data=DIGITS / "eval.npz", calibration=DIGITS / "calib.npz")
    report = result.report.to_dict()
    product = math.prod(p["compression_bytes"] for p in report["passes"] if p["changed"])
    assert report["summary"]["compression"]["bytes"] == pytest.approx(product, rel=1e-3)
    assert report["summary"]["compression"]["bytes"] > 5.0
