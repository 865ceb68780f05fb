"""The accuracy budget's searches as executor tasks (``optimizer.budget``): the speculative rounds
take the sequential search's path, and a budget run on an executor of several workers writes the
same model and report as one in-process run."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
from helpers import SAMPLES

from calibration.executor import InProcessExecutor
from optimizer import optimize
from optimizer.budget import REFINE_TRIALS, _quantization_steps
from optimizer.speculative import speculative_search

DIGITS = SAMPLES / "digits_cnn"


def sequential_budget(order: list[str], fits) -> tuple[list[str], int]:
    """The budget's bisection and refinement one evaluation at a time (its old code)."""
    evaluations = 1
    if not fits(tuple(order)):
        return list(order), evaluations
    lo, hi = 0, len(order)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        evaluations += 1
        if fits(tuple(order[:mid])):
            hi = mid
        else:
            lo = mid
    excluded = order[:hi]
    for node in list(reversed(excluded))[:REFINE_TRIALS] if len(excluded) > 1 else []:
        trial = [n for n in excluded if n != node]
        evaluations += 1
        if fits(tuple(trial)):
            excluded = trial
    return excluded, evaluations


@pytest.mark.parametrize("width", [1, 2, 5])
def test_budget_rounds_keep_the_sequential_fallbacks(width):
    rng = random.Random(width)
    for n in (0, 1, 2, 5, 12, 30):
        order = [f"layer{i}" for i in range(n)]
        weights = {name: rng.random() for name in order}
        for threshold in (0.0, 0.5, 2.0, 100.0):
            def fits(excluded, threshold=threshold):  # not monotone in k: weights are random
                return sum(weights[e] for e in excluded) >= threshold

            expected, evaluations = sequential_budget(order, fits)
            search = speculative_search(("all",), _quantization_steps(order), lambda keys: [fits(k) for k in keys],
                                        bool, width)
            excluded = list(order) if search.state == ("stop",) else list(search.state[1])
            assert excluded == expected and len(search.path) == evaluations, (n, threshold)


def _digest(model) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


@pytest.mark.parametrize("pipeline, calib, budget", [
    ("default,quantize-int8(method=minmax)", "poor", 0.0),
    ("default,prune-channels(ratio=0.3)", "calib", 1.0),
])
def test_budget_on_three_workers_equals_the_in_process_run(pipeline, calib, budget):
    data = np.load(DIGITS / "calib.npz")
    # a deliberately poor calibration (4 samples) so INT8 costs accuracy
    calibration = {"input": data["input"][:4] * 0.1} if calib == "poor" else DIGITS / "calib.npz"
    runs = {}
    executor = InProcessExecutor(workers=3)
    for name, kwargs in (("one", {}), ("three", {"executor": executor})):
        runs[name] = optimize(DIGITS / "model.onnx", pipeline, data=DIGITS / "eval.npz", calibration=calibration,
                              max_accuracy_drop=budget, **kwargs)
    one, three = runs["one"], runs["three"]
    assert one.report.budget["met"] and one.report.budget["fallbacks"]
    assert _digest(one.model) == _digest(three.model)
    assert one.report.budget == three.report.budget
    assert one.report.accuracy.to_dict() == three.report.accuracy.to_dict()
    stages = {s.stage: s for s in executor.stages}
    assert "budget search" in stages
    assert ("layer ranking" if "int8" in pipeline else "group sensitivity") in stages
    assert max(s.tasks for s in executor.stages if s.stage == "budget search") > 1  # rounds, not single steps
