"""Accuracy-regression checks for CI: bounds from a baseline report or explicit thresholds.

``check_regression`` optimizes a model (or takes an already optimized one), evaluates it against
the original, and compares the result with bounds:

- ``max_accuracy_drop``: points of the budget metric (task accuracy with labels, else argmax
  agreement, else cosine x 100) the optimized model may lose against the original; with a
  baseline report, the points it may lose against the baseline's optimized accuracy;
- ``min_cosine``: every output's cosine similarity with the original;
- ``min_compression``: original bytes / optimized bytes.

A baseline (a JSON report written by ``optimize --report``) supplies bounds that were not given
explicitly: its accuracy (minus ``max_accuracy_drop``, default 0), its cosines (minus 1e-4) and
its compression (minus 1 %). ``bisect=True`` finds the first pass of the pipeline that breaks an
accuracy bound by evaluating pipeline prefixes (binary search): one executor task per prefix, the
original's outputs on the evaluation samples computed once and shared with every task, the
binary search run in speculative rounds with the sequential result (``optimizer.speculative``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from optimizer.budget import metric_of
from optimizer.errors import InputError, PassError
from optimizer.evaluate import AccuracyReport, evaluate
from optimizer.report import Report

COSINE_SLACK = 1e-4
COMPRESSION_SLACK = 0.01


@dataclass
class Bound:
    """One checked quantity: its limit, the measured value, and whether it holds."""

    name: str
    limit: float
    value: float | None
    kind: str  # "min" (value >= limit) or "max" (value <= limit)
    source: str  # "explicit" or "baseline"

    @property
    def ok(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.limit if self.kind == "min" else self.value <= self.limit


@dataclass
class CheckResult:
    """All bounds, the run's report, and (with bisect) the first pass that breaks a bound."""

    bounds: list[Bound]
    report: Report | None
    first_bad_pass: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(b.ok for b in self.bounds)

    def diff(self) -> str:
        """A readable table of every bound; failures marked."""
        rows = [f"{'check':<34} {'bound':>14} {'measured':>14}  status", "-" * 72]
        for b in self.bounds:
            op = ">=" if b.kind == "min" else "<="
            value = "n/a" if b.value is None else f"{b.value:.6g}"
            rows.append(f"{b.name:<34} {op + ' ' + format(b.limit, '.6g'):>14} {value:>14}  {'ok' if b.ok else 'FAIL'} ({b.source})")
        rows += [f"error: {e}" for e in self.errors]
        if self.first_bad_pass:
            rows.append(f"first pass that breaks the bounds: {self.first_bad_pass}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "bounds": [{**vars(b), "ok": b.ok} for b in self.bounds],
            "first_bad_pass": self.first_bad_pass,
            "errors": list(self.errors),
        }


def load_baseline(path: str | os.PathLike) -> dict:
    """A baseline JSON report (as written by ``optimize --report x.json``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"baseline report not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"baseline {path} is not a JSON report: {exc}") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("onnx-trt-optimizer/report/"):
        raise InputError(f"baseline {path} is not a report written by optimize --report (no schema key)")
    return data


def make_bounds(
    accuracy: AccuracyReport | None,
    compression: float | None,
    baseline: dict | None,
    max_accuracy_drop: float | None,
    min_cosine: float | None,
    min_compression: float | None,
) -> list[Bound]:
    """Bounds from explicit thresholds, falling back to the baseline report's numbers."""
    bounds: list[Bound] = []
    metric, original, optimized = metric_of(accuracy) if accuracy else ("task_accuracy", None, None)
    base_acc = (baseline or {}).get("accuracy") or {}
    if max_accuracy_drop is not None and not base_acc:
        bounds.append(Bound(f"{metric} drop (points)", max_accuracy_drop, None if original is None else original - optimized, "max", "explicit"))
    elif base_acc:
        base_value = _baseline_metric(base_acc, metric)
        if base_value is not None:
            slack = max_accuracy_drop or 0.0
            bounds.append(Bound(f"{metric} (points)", base_value - slack, optimized, "min", "baseline"))
    outputs = {m.name: m for m in (accuracy.outputs if accuracy else [])}
    if min_cosine is not None:
        for name, m in outputs.items():
            if m.cosine is not None:
                bounds.append(Bound(f"cosine[{name}]", min_cosine, m.cosine, "min", "explicit"))
    elif base_acc:
        for name, m in (base_acc.get("outputs") or {}).items():
            if m.get("cosine") is not None:
                value = outputs[name].cosine if name in outputs else None
                bounds.append(Bound(f"cosine[{name}]", m["cosine"] - COSINE_SLACK, value, "min", "baseline"))
    if min_compression is not None:
        bounds.append(Bound("compression (bytes)", min_compression, compression, "min", "explicit"))
    elif baseline:
        base_comp = ((baseline.get("summary") or {}).get("compression") or {}).get("bytes")
        if base_comp:
            bounds.append(Bound("compression (bytes)", base_comp * (1 - COMPRESSION_SLACK), compression, "min", "baseline"))
    return bounds


def _baseline_metric(acc: dict, metric: str) -> float | None:
    if metric == "task_accuracy":
        return (acc.get("task") or {}).get("optimized")
    first = next(iter((acc.get("outputs") or {}).values()), None)
    if first is None:
        return None
    if metric == "argmax_agreement" and first.get("argmax_agreement") is not None:
        return 100.0 * first["argmax_agreement"]
    return 100.0 * first["cosine"] if first.get("cosine") is not None else None


def check_regression(
    model,
    pipeline: str | None = "default",
    *,
    optimized=None,
    data=None,
    shapes=None,
    calibration=None,
    baseline: str | os.PathLike | dict | None = None,
    max_accuracy_drop: float | None = None,
    min_cosine: float | None = None,
    min_compression: float | None = None,
    bisect: bool = False,
    metric=None,
    executor=None,
    calib_batch_size: int | None = None,
) -> CheckResult:
    """Optimize (or take ``optimized``), evaluate, and compare with the bounds (``metric``: a task
    metric, see ``optimizer.task_metrics``; the accuracy bound then applies to it). ``executor``:
    where calibration, evaluation and the bisection's prefixes run (in-process by default);
    ``calib_batch_size`` as for ``optimize``."""
    from optimizer.api import optimize
    from optimizer.io import load_model
    from optimizer.stats import model_stats

    base = load_baseline(baseline) if isinstance(baseline, (str, os.PathLike)) else baseline
    if base is None and max_accuracy_drop is None and min_cosine is None and min_compression is None:
        raise InputError("nothing to check: give --baseline or at least one of --max-accuracy-drop, --min-cosine, --min-compression")
    if base is not None and pipeline is None and optimized is None:
        pipeline = base.get("pipeline")
    if optimized is not None:
        from optimizer.validate import validate_model

        original, source = load_model(model)
        validate_model(original, source.path)
        candidate, candidate_source = load_model(optimized)
        validate_model(candidate, candidate_source.path)
        from calibration.data import load_npz, parse_shapes

        dataset = load_npz(data) if isinstance(data, (str, os.PathLike)) else data
        shape_specs = shapes if isinstance(shapes, dict) else parse_shapes(shapes)
        accuracy = evaluate(original, candidate, dataset, shape_specs, metric=metric, executor=executor)
        compression = model_stats(original).model_bytes / max(model_stats(candidate).model_bytes, 1)
        bounds = make_bounds(accuracy, compression, base, max_accuracy_drop, min_cosine, min_compression)
        return CheckResult(bounds, None)
    try:
        result = optimize(model, pipeline, data=data, shapes=shapes, calibration=calibration, verify="numeric",
                          lossy_finite_only=True, metric=metric, executor=executor, calib_batch_size=calib_batch_size)
    except PassError as exc:
        report = exc.report
        check = CheckResult([], report, errors=[str(exc)], first_bad_pass=exc.pass_name or None)
        return check
    report = result.report
    check = CheckResult(
        make_bounds(report.accuracy, report.compression_bytes, base, max_accuracy_drop, min_cosine, min_compression),
        report,
    )
    if not check.ok and bisect:
        check.first_bad_pass = _bisect(model, report.pipeline, data, shapes, calibration, base,
                                       (max_accuracy_drop, min_cosine), metric, executor)
    return check


def _bisect(model, pipeline: str, data, shapes, calibration, base, limits: tuple, metric=None, executor=None) -> str | None:
    """The first pass whose prefix breaks an accuracy bound (compression is not bisected): the
    smallest k whose k-pass prefix is bad, by binary search. Prefixes are executor tasks, evaluated
    ahead in rounds as wide as the executor (``speculative_search``): the walk is the sequential
    binary search, so the pass named is the one it names, for any number of workers -- chosen over
    a (W+1)-ary split, which can name another pass when the prefixes' badness is not monotone."""
    from calibration.executor import InProcessExecutor
    from calibration.shards import portable, ship_source
    from optimizer.api import plan_evaluation
    from optimizer.io import load_model
    from optimizer.pipeline import format_pass, iter_passes, parse_pipeline
    from optimizer.speculative import speculative_search

    passes = list(iter_passes(parse_pipeline(pipeline)))
    if not passes:
        return None
    executor = executor if executor is not None else InProcessExecutor()
    original, _ = load_model(model)
    data, calibration = portable(data), portable(calibration)
    evaluation = executor.share(plan_evaluation(original, data, shapes, calibration))  # its source, its reference
    shared = executor.share(original), ship_source(executor, data), ship_source(executor, calibration)

    def evaluate_all(ks: list[int]) -> list[bool]:
        items = [(*shared, shapes, passes[:k], evaluation, base, limits, metric) for k in ks]
        return executor.map(prefix_breaks, items, stage="bisect")

    def step(state):
        if state[0] == "full":  # the whole pipeline first: if it is fine, nothing to name
            return len(passes), ("search", 1, len(passes)), ("clean",)
        if state[0] == "search" and state[1] < state[2]:  # the smallest bad k is in [lo, hi]
            lo, hi = state[1], state[2]
            mid = (lo + hi) // 2
            return mid, ("search", lo, mid), ("search", mid + 1, hi)
        return None

    search = speculative_search(("full",), step, evaluate_all, bool, executor.workers)
    return format_pass(passes[search.state[1] - 1]) if search.state[0] == "search" else None


def prefix_breaks(model, data, calibration, shapes, passes: list, evaluation, base, limits: tuple, metric) -> bool:
    """A task: whether the pipeline prefix ``passes`` breaks an accuracy bound (a pass that fails
    counts as breaking one), evaluated as ``optimize`` evaluates, on the shared original outputs."""
    from calibration.shards import check_readable
    from optimizer.api import optimize

    for source in (data, calibration, evaluation.source if evaluation is not None else None):
        check_readable(source, "data")
    try:
        run = optimize(model, passes, data=data, shapes=shapes, calibration=calibration, verify="off", metric=metric,
                       evaluate_accuracy=False)
    except PassError:
        return True
    accuracy = None
    if evaluation is not None:
        accuracy = evaluate(model, run.model, evaluation.source, evaluation.shapes, batch_size=evaluation.batch_size,
                            note=evaluation.note, metric=metric, reference=evaluation.reference)
    bounds = make_bounds(accuracy, None, base, *limits, None)
    return not all(b.ok for b in bounds)
