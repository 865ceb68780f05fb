"""Accuracy budgets: return layers to float until the accuracy drop fits.

``--max-accuracy-drop D`` bounds the loss, in points, of the metric in use: the task metric
(``--metric``) when given, else task accuracy when the evaluation data has labels, else argmax
agreement with the original (in %), else cosine similarity x 100. After the pipeline runs, if the
drop exceeds ``D``:

1. the pipeline is split at its first tunable lossy pass (``quantize-int8`` or
   ``prune-channels``): the part before it runs once;
2. quantization: layers are ranked by their local quantization noise (weight and input SQNR from
   the first run: no evaluation needed), and a bisection finds the smallest number ``k`` of the
   noisiest layers whose return to float meets the budget -- ``1 + log2(n)`` evaluations instead
   of one per layer, and it works when the loss is spread over many layers (where returning any
   single layer helps nothing); then up to ``REFINE_TRIALS`` of the least harmful fallbacks are
   tried back in INT8, one at a time, each kept if the budget still holds. Calibration runs once: every candidate reuses the first run's
   ranges through a range cache in a temporary folder.
3. pruning: per-group sensitivity (the tail re-run with only that group pruned), then groups are
   pruned least sensitive first while the drop still fits.

Every fallback is reported with its local noise, and the evaluations spent. Evaluation streams the
data, so memory stays flat.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from optimizer.evaluate import AccuracyReport, evaluate
from optimizer.hooks import check_structure
from optimizer.manager import PassManager, PassRecord
from optimizer.pass_base import PassContext
from optimizer.pipeline import FixedPoint, Step

log = logging.getLogger(__name__)

#: Evaluations the budget may spend after the bisection returning single fallbacks to INT8.
REFINE_TRIALS = 8



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
    evaluations: int = 0
    ranking: str = ""


def metric_of(report: AccuracyReport) -> tuple[str, float, float]:
    """(name, original value, optimized value) of the metric the budget applies to, in points."""
    if report.metric is not None:
        return f"metric {report.metric.name}", report.metric.original, report.metric.optimized
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
        if not isinstance(step, FixedPoint) and type(step).tunable:
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
    metric=None,
) -> BudgetResult:
    """Tune the tunable pass until the metric drop is within ``budget`` (see the module docstring)."""
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
    if type(tunable).tunable == "prune":
        return _fit_pruning(original, prefix, start_model, tail, ctx, budget, dataset, shapes, first_run, result, base,
                            metric)
    record = next((r for r in first_run.records if r.name == tunable.name and r.changed), None)
    if record is None:
        result.met = False
        return result
    with tempfile.TemporaryDirectory(prefix="budget-") as scratch:
        tuned = _reuse_ranges(tunable, record.details, start_model, Path(scratch))
        evaluations = 0
        order, noise, ranking = rank_layers(record.details), None, "local SQNR"
        if ctx.verify_batches:
            order, noise = rank_alone(start_model, tuned, tail[1:], record.details, ctx)
            ranking = "output SQNR with only that layer quantized"
        else:
            order, noise = order

        def run_tail(excluded: list[str]):
            nonlocal evaluations
            evaluations += 1
            run = PassManager([replace(tuned, exclude=list(tuned.exclude) + excluded), *tail[1:]],
                              verify="off").run(start_model, ctx)
            acc = evaluate(original, run.model, dataset, shapes, metric=metric)
            log.info("budget: %d layer(s) in float -> %s drop %.3f", len(excluded), name, base - metric_of(acc)[2])
            return run, acc, metric_of(acc)[2]

        # Bisection over k, the number of highest-noise layers returned to float: the smallest k
        # whose drop fits, in 1 + log2(n) evaluations (k = n first: if even that fails, stop).
        lo, hi = 0, len(order)
        best = run_tail(order)
        if base - best[2] <= budget:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                candidate = run_tail(order[:mid])
                if base - candidate[2] <= budget:
                    hi, best = mid, candidate
                else:
                    lo = mid
            # Refine: the ranking is an estimate, so try returning the least harmful fallbacks to
            # INT8 one by one (at most REFINE_TRIALS evaluations), keeping each that still fits.
            excluded = order[:hi]
            for node in list(reversed(excluded))[:REFINE_TRIALS] if len(excluded) > 1 else []:
                trial = [n for n in excluded if n != node]
                candidate = run_tail(trial)
                if base - candidate[2] <= budget:
                    excluded, best = trial, candidate
        else:
            excluded = order
    run, acc, m = best
    check_structure(run.model)
    result.model = run.model
    result.records = (prefix.records if prefix else []) + run.records
    result.accuracy = acc
    result.drop = base - m
    result.met = result.drop <= budget
    result.evaluations = evaluations
    result.sensitivity = {n: round(v, 3) for n, v in noise.items()}
    result.ranking = ranking
    result.fallbacks = [Fallback(n, tunable.name, round(noise[n], 3), f"noisiest by {ranking}")
                        for n in excluded] if result.met else []
    return result


def rank_alone(start_model: onnx.ModelProto, tunable, rest: list, details: dict, ctx: PassContext):
    """Quantized layers, most harmful first, by the output noise (dB below the signal, balanced over
    the slices of axis 1, on the verification samples) of the model with only that layer quantized: the error each layer adds
    by itself, downstream amplification included. Costs one quantize + run per layer, no evaluation."""
    from optimizer.metrics import compare_batches
    from optimizer.runtime import OrtRunner, run_like

    layers = list(details.get("layers", {}))
    batches = ctx.verify_batches or []
    reference = [run_like(start_model, start_model, OrtRunner(start_model), b) for b in batches]
    noise = {}
    for node in layers:
        others = [n for n in layers if n != node]
        run = PassManager([replace(tunable, exclude=list(tunable.exclude) + others), *rest], verify="off").run(start_model, ctx)
        runner = OrtRunner(run.model)
        outputs = [run_like(start_model, run.model, runner, b) for b in batches]
        metrics = [m for m in compare_batches(reference, outputs) if m.sqnr_db is not None]
        balanced = [m.balanced_sqnr_db if m.balanced_sqnr_db is not None else m.sqnr_db for m in metrics]
        noise[node] = -float(sum(balanced) / len(balanced)) if balanced else -100.0
    return sorted(layers, key=lambda n: noise[n], reverse=True), noise


def rank_layers(details: dict) -> tuple[list[str], dict[str, float]]:
    """Quantized layers, noisiest first, and each layer's local quantization noise in dB below the
    signal (-SQNR of weight and input noise combined: 10 log10(10^(-w/10) + 10^(-a/10))).

    Ranking by local noise costs no evaluation; one-at-a-time sensitivity costs one per layer and
    says nothing when the loss is spread over many layers (every single fallback helps ~0)."""
    tensors, weights = details.get("tensors", {}), details.get("weights", {})
    noise = {}
    for node, layer in details.get("layers", {}).items():
        parts = [tensors[a].get("sqnr_db") for a in layer.get("activations", []) if a in tensors]
        if layer.get("weight") in weights:
            parts.append(weights[layer["weight"]].get("sqnr_db"))
        powers = [10 ** (-float(p) / 10) for p in parts if p is not None]
        noise[node] = 10 * math.log10(sum(powers)) if powers else -100.0
    order = sorted(noise, key=lambda n: noise[n], reverse=True)
    return order, noise


def _reuse_ranges(tunable, details: dict, start_model: onnx.ModelProto, scratch: Path):
    """``tunable`` reading the first run's ranges from a range cache: calibrate once, never per candidate."""
    from calibration.cache import save_ranges
    from calibration.ranges import TensorRange
    from passes.graph_model import graph_model
    from passes.graph_utils import import_graph

    ranges = [TensorRange(n, float(v["amax"]), str(v["method"]), v.get("sqnr_db"))
              for n, v in details.get("tensors", {}).items()]
    if not ranges or not hasattr(tunable, "range_cache"):
        return tunable
    cache = scratch / "ranges.json"
    save_ranges(cache, ranges, graph_model(import_graph(start_model)))
    return replace(tunable, range_cache=str(cache))


def _fit_pruning(original, prefix, start_model, tail, ctx, budget, dataset, shapes, first_run, result, base, metric=None):
    """Choose which channel groups to prune (least sensitive first) so the drop fits the budget."""
    tunable = tail[0]
    record = next((r for r in first_run.records if r.name == tunable.name and r.changed), None)
    groups = [g["producers"][0] for g in (record.details.get("groups", []) if record else []) if g.get("producers")]

    def run_tail(chosen: list[str]):
        tuned = replace(tunable, ratio=0.0, ratios=[f"{g}:{tunable.ratio}" for g in chosen])
        run = PassManager([tuned, *tail[1:]], verify="off").run(start_model, ctx)
        acc = evaluate(original, run.model, dataset, shapes, metric=metric)
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
