"""A pytest helper for users' CI: fail a test when an optimized model loses accuracy.

    from optimizer.testing import assert_no_regression

    def test_int8_model_keeps_accuracy():
        assert_no_regression("model.onnx", "int8", data="eval.npz", calibration="calib.npz",
                             baseline="tests/baselines/model.int8.json", max_accuracy_drop=0.5)
"""

from __future__ import annotations

from optimizer.regression import CheckResult, check_regression


def assert_no_regression(model, pipeline: str | None = "default", **kwargs) -> CheckResult:
    """Run ``check_regression`` (same arguments); raise ``AssertionError`` with the diff if a bound breaks."""
    result = check_regression(model, pipeline, **kwargs)
    if not result.ok:
        raise AssertionError("accuracy regression:\n" + result.diff())
    return result
