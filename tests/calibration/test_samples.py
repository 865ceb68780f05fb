"""The one data path (calibration/samples.py): which samples verify, evaluate and calibrate."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import parse_model

from calibration.data import ArrayData
from calibration.samples import HOLDOUT_MIN, SliceSource, labelled_batches, plan_samples, prepare
from calibration.shapes import resolve_shapes
from calibration.sources import NpzSource
from optimizer.errors import InputError
from optimizer.runtime import input_specs

MODEL = """
<ir_version: 10, opset_import: ["" : 13]>
m (float[batch, 4] x) => (float[batch, 4] y) {
    y = Relu (x)
}
"""
BATCH1 = MODEL.replace("batch", "1")


def _source(n: int, labels: bool = False) -> NpzSource:
    x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    return NpzSource(ArrayData({"x": x}, np.arange(n) if labels else None, f"<{n} samples>"))


def _samples(batches) -> np.ndarray:
    return np.concatenate([b["x"] for b in batches]) if batches else np.zeros((0, 4), np.float32)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_slice_source_streams_exactly_its_samples(batch_size):
    model = parse_model(MODEL)
    specs = input_specs(model)
    source = SliceSource(_source(20, labels=True), 5, 13)
    got = list(labelled_batches(source, specs, batch_size))
    np.testing.assert_array_equal(_samples([f for f, _ in got]), _source(20).data.arrays["x"][5:13])
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in got]), np.arange(5, 13))
    assert source.num_samples == 8


def test_data_verifies_on_its_first_samples_and_evaluates_on_all():
    model = parse_model(MODEL)
    specs = input_specs(model)
    plan = resolve_shapes(model, specs)
    run = plan_samples(specs, plan, data=_source(50), calib=_source(40))
    assert run.origin == "data" and run.verify_samples == 8
    np.testing.assert_array_equal(_samples(run.verify), _source(50).data.arrays["x"][:8])
    assert run.evaluation.num_samples == 50 and run.calibration.num_samples == 40 and not run.synthetic


def test_calib_only_holds_out_samples_for_evaluation():
    model = parse_model(MODEL)
    specs = input_specs(model)
    plan = resolve_shapes(model, specs)
    run = plan_samples(specs, plan, calib=_source(HOLDOUT_MIN * 4))
    k = min(64, HOLDOUT_MIN)
    assert run.origin == "calib" and run.held_out == k
    assert run.calibration.num_samples == HOLDOUT_MIN * 4 - k and run.evaluation.num_samples == k
    evaluated = _samples(list(run.evaluation.batches(specs, 16)))
    calibrated = _samples(list(run.calibration.batches(specs, 16)))
    assert not set(map(tuple, evaluated)) & set(map(tuple, calibrated)), "held-out samples must not calibrate"
    np.testing.assert_array_equal(_samples(run.verify), evaluated[:8])


def test_small_calib_evaluates_on_all_of_it_and_says_so():
    model = parse_model(MODEL)
    specs = input_specs(model)
    run = plan_samples(specs, resolve_shapes(model, specs), calib=_source(16))
    assert run.held_out == 0 and run.evaluation.num_samples == 16 and run.calibration.num_samples == 16
    assert "also calibrate" in run.note


def test_no_data_is_synthetic_and_says_so():
    model = parse_model(MODEL)
    specs = input_specs(model)
    run = plan_samples(specs, resolve_shapes(model, specs))
    assert run.synthetic and run.evaluation.synthetic and run.calibration.synthetic
    assert "SYNTHETIC" in run.note


def test_static_batch_of_one_is_fed_one_sample_at_a_time():
    model = parse_model(BATCH1)
    specs = input_specs(model)
    prepared = prepare(model, specs, data=_source(5))
    assert all(b["x"].shape == (1, 4) for b in prepared.samples.verify) and len(prepared.samples.verify) == 5
    assert [f["x"].shape[0] for f in prepared.samples.evaluation.batches(specs, 32)] == [1] * 5


BAD_RESHAPE = """
<ir_version: 10, opset_import: ["" : 13]>
m (float[batch, 4] x) => (float[a, b] y) {
    s = Constant <value = int64[2] {3, 3}> ()
    y = Reshape (x, s)
}
"""


def test_original_failing_on_the_users_data_is_one_clear_error():
    model = parse_model(BAD_RESHAPE)
    with pytest.raises(InputError, match="does not run on the first samples"):
        prepare(model, input_specs(model), data=_source(8))
