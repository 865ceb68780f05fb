"""Accuracy budgets: fall back the most sensitive layers until the accuracy drop fits.

``--max-accuracy-drop D`` bounds the loss, in points, of the metric in use: task accuracy when the
evaluation data has labels, else argmax agreement with the original (in %), else cosine
similarity x 100. After the pipeline runs, if the drop exceeds ``D``:

1. the pipeline is split at its first tunable lossy pass (``quantize-int8`` or
   ``prune-channels``): the part before it runs once;
2. per-layer sensitivity: quantization -- the tail is re-run with only that layer kept in float
   and the metric gain recorded; pruning -- the tail is re-run with only that channel group pruned
   and the metric loss recorded;
3. quantization: layers return to float, most sensitive first, until the drop fits; pruning:
   groups are pruned at the requested ratio, least sensitive first, while the drop still fits.

Every fallback is reported with its measured sensitivity. Evaluation streams the data, so memory
stays flat; the cost is one evaluation per quantized layer plus one per fallback step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import onnx

from optimizer.evaluate import AccuracyReport, evaluate
from optimizer.hooks import check_structure
from optimizer.manager import PassManager, PassRecord
from optimizer.pass_base import PassContext
from optimizer.pipeline import FixedPoint, Step

log = logging.getLogger(__name__)

TUNABLE = ("quantize-int8", "prune-channels")


@dataclass
class Fallback:
    """A layer kept in higher precision to meet the budget, and why."""

    node: str
    pass_name: str
    gain: float  # metric points recovered when this layer alone stays float
    reason: str = "accuracy budget"


@dataclass
class BudgetResult:
    model: onnx.ModelProto
    records: list[PassRecord]
    accuracy: AccuracyReport
    metric: str
    drop: float
    fallbacks: list[Fallback] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    met: bool = True


def metric_of(report: AccuracyReport) -> tuple[str, float, float]:
    """(name, original value, optimized value) of the metric the budget applies to, in points."""
    if report.task is not None:
        return "task_accuracy", report.task.original, report.task.optimized
    first = report.outputs[0] if report.outputs else None
    if first is not None and first.argmax_agreement is not None:
        return "argmax_agreement", 100.0, 100.0 * first.argmax_agreement
    cosine = first.cosine if first is not None and first.cosine is not None else 1.0
    return "cosine", 100.0, 100.0 * cosine


def split_at_tunable(steps: list[Step]) -> tuple[list[Step], list[Step]] | None:
    """(steps before the first tunable lossy pass, that pass and everything after), or None."""
    for i, step in enumerate(steps):
        if not isinstance(step, FixedPoint) and step.name in TUNABLE:
            return steps[:i], steps[i:]
    return None


def fit_budget(
    original: onnx.ModelProto,
    steps: list[Step],
    ctx: PassContext,
    budget: float,
    dataset,
    shapes,
    first_run,
    first_accuracy: AccuracyReport,
) -> BudgetResult:
    """Tune the tunable pass's ``exclude`` list until the metric drop is within ``budget``."""
    name, base, value = metric_of(first_accuracy)
    result = BudgetResult(first_run.model, first_run.records, first_accuracy, name, base - value)
    if base - value <= budget:
        return result
    split = split_at_tunable(steps)
    if split is None:
        result.met = False
        return result
    head, tail = split
    tunable = tail[0]
    prefix = PassManager(head, verify="off").run(original, ctx) if head else None
    start_model = prefix.model if prefix else original
    if tunable.name == "prune-channels":
        return _fit_pruning(original, prefix, start_model, tail, ctx, budget, dataset, shapes, first_run, result, base)
    quantized = next((r.details.get("nodes", []) for r in first_run.records if r.name == tunable.name and r.changed), [])

    def run_tail(excluded: list[str]):
        tuned = replace(tunable, exclude=list(tunable.exclude) + excluded)
        run = PassManager([tuned, *tail[1:]], verify="off").run(start_model, ctx)
        acc = evaluate(original, run.model, dataset, shapes)
        return run, acc, metric_of(acc)[2]

    for node in quantized:
        _, _, m = run_tail([node])
        result.sensitivity[node] = m - value
    order = sorted(quantized, key=lambda n: result.sensitivity[n], reverse=True)
    excluded: list[str] = []
    for node in order:
        excluded.append(node)
        run, acc, m = run_tail(excluded)
        log.info("budget: %d layer(s) in float -> %s %.3f (drop %.3f)", len(excluded), name, m, base - m)
        if base - m <= budget:
            break
    check_structure(run.model)
    result.model = run.model
    result.records = (prefix.records if prefix else []) + run.records
    result.accuracy = acc
    result.drop = base - m
    result.met = result.drop <= budget
    result.fallbacks = [Fallback(n, tunable.name, round(result.sensitivity[n], 4)) for n in excluded]
    return result


def _fit_pruning(original, prefix, start_model, tail, ctx, budget, dataset, shapes, first_run, result, base):
    """Choose which channel groups to prune (least sensitive first) so the drop fits the budget."""
    tunable = tail[0]
    record = next((r for r in first_run.records if r.name == tunable.name and r.changed), None)
    groups = [g["producers"][0] for g in (record.details.get("groups", []) if record else []) if g.get("producers")]

    def run_tail(chosen: list[str]):
        tuned = replace(tunable, ratio=0.0, ratios=[f"{g}:{tunable.ratio}" for g in chosen])
        run = PassManager([tuned, *tail[1:]], verify="off").run(start_model, ctx)
        acc = evaluate(original, run.model, dataset, shapes)
        return run, acc, metric_of(acc)[2]

    for group in groups:
        _, _, m = run_tail([group])
        result.sensitivity[group] = base - m  # points lost when only this group is pruned
    chosen: list[str] = []
    best = None
    for group in sorted(groups, key=lambda g: result.sensitivity[g]):
        run, acc, m = run_tail(chosen + [group])
        if base - m <= budget:
            chosen.append(group)
            best = (run, acc, m)
    if best is None:
        run, acc, m = run_tail([])
    else:
        run, acc, m = best
    check_structure(run.model)
    result.model = run.model
    result.records = (prefix.records if prefix else []) + run.records
    result.accuracy = acc
    result.drop = base - m
    result.met = result.drop <= budget
    result.fallbacks = [
        Fallback(g, tunable.name, round(-result.sensitivity[g], 4), "left unpruned: accuracy budget")
        for g in groups if g not in chosen
    ]
    return result
