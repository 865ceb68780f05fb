"""Evaluation merged exactly (``optimizer.evaluate``): accumulators over parts of the data merge
into bit-for-bit the one-pass result, evaluation sharded over an executor's tasks equals one
process, and shared original outputs change nothing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import SAMPLES

from calibration.executor import InProcessExecutor
from optimizer.api import optimize
from optimizer.evaluate import evaluate, reference_outputs
from optimizer.metrics import ExactSum, OutputAccumulator
from optimizer.task_metrics import BUILTIN, MetricAccumulator

DIGITS = SAMPLES / "digits_cnn"


def test_exact_sums_do_not_depend_on_order_or_grouping():
    rng = np.random.default_rng(0)
    values = rng.normal(size=1000) * 10.0 ** rng.integers(-8, 8, size=1000)
    forward, backward = ExactSum(), ExactSum()
    for v in values:
        forward.add(v)
    parts = [ExactSum() for _ in range(7)]
    for i, v in enumerate(values[::-1]):
        parts[i % 7].add(v)
    for part in parts:
        backward.merge(part)
    assert forward.value() == backward.value() == float(np.float64(__import__("math").fsum(values)))
    assert forward.value(3) == backward.value(3)
    special = ExactSum()
    special.add(np.array([1.0, np.inf]))
    special.add(np.array([2.0, 1.0]))
    assert list(special.value()) == [3.0, np.inf]


def test_output_and_metric_accumulators_merge_into_the_one_pass_result():
    rng = np.random.default_rng(1)
    refs = [rng.normal(size=(4, 10)).astype(np.float32) * 10.0 ** rng.integers(-3, 3) for _ in range(12)]
    news = [r + rng.normal(scale=0.01, size=r.shape).astype(np.float32) for r in refs]
    one, metric_one = OutputAccumulator("y"), MetricAccumulator("cosine", BUILTIN["cosine"])
    for r, n in zip(refs, news):
        one.update(r, n)
        metric_one.update({"y": n}, {"y": r}, None, 4)
    parts = [(OutputAccumulator("y"), MetricAccumulator("cosine", BUILTIN["cosine"])) for _ in range(5)]
    for i, (r, n) in enumerate(zip(refs, news)):
        parts[(7 * i) % 5][0].update(r, n)
        parts[(7 * i) % 5][1].update({"y": n}, {"y": r}, None, 4)
    merged, metric_merged = parts[3]
    for acc, metric in parts[:3] + parts[4:]:
        merged.merge(acc)
        metric_merged.merge(metric)
    assert merged.result() == one.result()
    assert metric_merged.result() == metric_one.result()


def test_slices_of_changing_length_are_dropped_whatever_the_order():
    a, b = OutputAccumulator("y"), OutputAccumulator("y")
    x3, x4 = np.ones((2, 3), np.float32), np.ones((2, 4), np.float32)
    a.update(x3, x3 * 1.01)
    a.update(x4, x4 * 1.01)
    b.update(x4, x4 * 1.01)
    b.update(x3, x3 * 1.01)
    assert a.result() == b.result() and a.result().balanced_sqnr_db is None


@pytest.fixture(scope="module")
def int8_digits():
    result = optimize(DIGITS / "model.onnx", "int8", calibration=DIGITS / "calib.npz", evaluate_accuracy=False)
    return onnx.load(DIGITS / "model.onnx"), result.model


@pytest.mark.parametrize("batch_size", [1, 32, 7])
def test_sharded_evaluation_equals_one_process_bit_for_bit(int8_digits, batch_size):
    original, optimized = int8_digits
    single = evaluate(original, optimized, DIGITS / "eval.npz", batch_size=batch_size, metric="top1")
    executor = InProcessExecutor(workers=3)
    sharded = evaluate(original, optimized, DIGITS / "eval.npz", batch_size=batch_size, metric="top1", executor=executor)
    assert sharded.to_dict() == single.to_dict()
    assert single.samples == 450 and single.task is not None and single.metric is not None
    (stage,) = executor.stages
    assert stage.stage == "evaluation" and stage.tasks == 6


def test_shared_original_outputs_change_nothing(int8_digits):
    original, optimized = int8_digits
    reference = reference_outputs(original, DIGITS / "eval.npz")
    assert reference is not None and reference.batch_size == 32 and len(reference.outputs) == 15
    plain = evaluate(original, optimized, DIGITS / "eval.npz", metric="top1")
    shared = evaluate(original, optimized, DIGITS / "eval.npz", metric="top1", reference=reference)
    both = evaluate(original, optimized, DIGITS / "eval.npz", metric="top1", reference=reference,
                    executor=InProcessExecutor(workers=2))
    assert plain.to_dict() == shared.to_dict() == both.to_dict()
    assert reference_outputs(original, DIGITS / "eval.npz", max_bytes=1000) is None  # too large to keep


def test_a_dropped_shard_is_refused(int8_digits, monkeypatch):
    """The merged sample count must be the data's: a lost shard stops the run."""
    from optimizer import evaluate as module
    from optimizer.errors import InputError

    original, optimized = int8_digits
    real = module._shard_task

    def lossy(*args):
        tally = real(*args)
        if args[-2] == 0:  # the first shard loses its samples
            tally.samples = 0
        return tally

    monkeypatch.setattr(module, "_shard_task", lossy)
    with pytest.raises(InputError, match="saw .* sample"):
        evaluate(original, optimized, DIGITS / "eval.npz", executor=InProcessExecutor(workers=2))
