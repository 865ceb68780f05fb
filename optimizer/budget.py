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

Every candidate (a layer ranked alone, a group's sensitivity, a bisection or refinement step) is
one task of the run's executor (``calibration.executor``): the start model, the context, the
evaluation data and the original's outputs on it (computed once) are shared with every task. The
sequential steps run in parallel rounds with the sequential result (``optimizer.speculative``);
``evaluations`` counts the candidates on that path, so it does not depend on the executor either.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import onnx

from optimizer.evaluate import AccuracyReport, evaluate, reference_outputs
from optimizer.hooks import check_structure
from optimizer.manager import PassManager, PassRecord
from optimizer.pass_base import PassContext
from optimizer.pipeline import FixedPoint, Step
from optimizer.speculative import speculative_search

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


def floor_metric(report: AccuracyReport) -> tuple[str, float, float]:
    """(name, 100, 100 x the smallest output cosine): what a pass's accuracy floor holds."""
    cosines = [o.cosine for o in report.outputs if o.cosine is not None]
    return "min output cosine", 100.0, 100.0 * (min(cosines) if cosines else 1.0)


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
    executor=None,
    measure: Callable[[AccuracyReport], tuple[str, float, float]] | None = None,
    rank_alone_max: int | None = None,
) -> BudgetResult:
    """Tune the tunable pass until the metric drop is within ``budget`` (see the module docstring);
    candidates run on ``executor`` (in-process by default). ``measure``: which figure of an
    evaluation the budget applies to (``metric_of``, or ``floor_metric`` for a pass's accuracy floor).
    ``rank_alone_max``: rank layers one model each (``rank_alone``) only up to that many layers, else
    by local SQNR (free); None: always when there are verification samples."""
    from calibration.executor import InProcessExecutor

    executor = executor if executor is not None else InProcessExecutor()
    measure = measure or metric_of
    name, base, value = measure(first_accuracy)
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
    record = next((r for r in first_run.records if r.name == tunable.name and r.changed), None)
    if type(tunable).tunable == "prune":
        candidates = Candidates(executor, original, start_model, tail[1:], ctx, dataset, shapes, metric)
        return _fit_pruning(candidates, prefix, tunable, record, budget, result, base)
    if record is None:
        result.met = False
        return result
    with tempfile.TemporaryDirectory(prefix="budget-") as scratch:
        tuned, cache_json = _reuse_ranges(tunable, record.details, start_model, Path(scratch))
        candidates = Candidates(executor, original, start_model, tail[1:], ctx, dataset, shapes, metric, cache_json)
        order, noise = rank_layers(record.details)
        ranking = "local SQNR"
        if ctx.verify_batches and (rank_alone_max is None or len(order) <= rank_alone_max):
            order, noise = rank_alone(tuned, record.details, ctx, candidates)
            ranking = "output SQNR with only that layer quantized"

        def variant(excluded) -> object:
            return replace(tuned, exclude=list(tuned.exclude) + list(excluded))

        def fits(acc: AccuracyReport) -> bool:
            return base - measure(acc)[2] <= budget

        def evaluate_all(keys: list[tuple]) -> list[AccuracyReport]:
            reports = candidates.accuracy([variant(k) for k in keys], stage="budget search")
            for key, acc in zip(keys, reports):
                log.info("budget: %d layer(s) in float -> %s drop %.3f", len(key), name, base - measure(acc)[2])
            return reports

        search = speculative_search(("all",), _quantization_steps(order), evaluate_all, fits, executor.workers)
        excluded = list(order) if search.state == ("stop",) else list(search.state[1])
        run = PassManager([variant(excluded), *tail[1:]], verify="off").run(start_model, ctx)
        acc = search.values[tuple(excluded)]
    check_structure(run.model)
    result.model = run.model
    result.records = (prefix.records if prefix else []) + run.records
    result.accuracy = acc
    result.drop = base - measure(acc)[2]
    result.met = result.drop <= budget
    result.evaluations = len(search.path)
    result.sensitivity = {n: round(v, 3) for n, v in noise.items()}
    result.ranking = ranking
    result.fallbacks = [Fallback(n, tunable.name, round(noise[n], 3), f"noisiest by {ranking}")
                        for n in excluded] if result.met else []
    return result


def _quantization_steps(order: list[str]):
    """The budget's search over which layers stay float, as ``speculative_search`` steps.

    ``("all",)``: every ranked layer in float -- if even that misses the budget, stop. Then a
    bisection over k, the number of noisiest layers returned to float: the smallest k whose drop
    fits, in 1 + log2(n) evaluations (``("bisect", lo, hi)``: k = hi fits, k = lo does not or is
    0). Then a refinement: the ranking is an estimate, so the least harmful fallbacks are tried
    back in INT8 one by one (at most ``REFINE_TRIALS``), each kept if the budget still holds
    (``("refine", excluded, trials, i)``). The final state's ``excluded`` always fits."""

    def bisect(lo: int, hi: int) -> tuple:
        if hi - lo > 1:
            return ("bisect", lo, hi)
        # a finished bisection starts the refinement
        excluded = tuple(order[:hi])
        return ("refine", excluded, tuple(reversed(excluded))[:REFINE_TRIALS] if len(excluded) > 1 else (), 0)

    def step(state):
        if state[0] == "all":
            return tuple(order), bisect(0, len(order)), ("stop",)
        if state[0] == "bisect":
            lo, hi = state[1], state[2]
            mid = (lo + hi) // 2
            return tuple(order[:mid]), bisect(lo, mid), bisect(mid, hi)
        if state[0] == "refine":
            _, excluded, trials, i = state
            if i >= len(trials):
                return None
            trial = tuple(n for n in excluded if n != trials[i])
            return trial, ("refine", trial, trials, i + 1), ("refine", excluded, trials, i + 1)
        return None  # "stop"

    return step


class Candidates:
    """Candidate tails as executor tasks: each task runs the tail with one variant of the tunable
    pass on the shared start model, then measures it -- against the original on the evaluation data
    (``accuracy``; the original's outputs computed once) or against the start model on the
    verification batches (``noise``). ``cache_json``: the first run's range cache, rewritten in
    every task's own temporary folder (so a worker never reads the driver's files)."""

    def __init__(self, executor, original, start_model, rest: list, ctx: PassContext, dataset, shapes, metric,
                 cache_json: str | None = None):
        self.executor, self.rest, self.shapes, self.metric, self.cache_json = executor, list(rest), shapes, metric, cache_json
        self.start_model, self.local_ctx = start_model, ctx
        self.start = executor.share(start_model)
        self.ctx = executor.share(replace(ctx, progress=None, feed_adapter=None, executor=None, sessions=None))  # tasks never fan out; sessions stay here
        self._original, self._dataset = original, dataset
        self._evaluation: tuple | None = None

    def _evaluation_inputs(self) -> tuple:
        """The original, the data and the original's outputs on it, shared once (on first use)."""
        from calibration.shards import ship_source

        if self._evaluation is None:
            reference = reference_outputs(self._original, self._dataset, self.shapes)
            self._evaluation = (self.executor.share(self._original), ship_source(self.executor, self._dataset),
                                self.executor.share(reference))
        return self._evaluation

    def accuracy(self, variants: list, *, stage: str) -> list[AccuracyReport]:
        original, dataset, reference = self._evaluation_inputs()
        items = [(self.start, [v, *self.rest], self.ctx, self.cache_json, original, dataset, self.shapes, self.metric,
                  reference) for v in variants]
        return self.executor.map(tail_accuracy, items, stage=stage)

    def noise(self, variants: list, batches: list[dict]) -> list[float]:
        from optimizer.runtime import REPRODUCIBLE_THREADS, OrtRunner, run_like

        runner = OrtRunner(self.start_model, threads=REPRODUCIBLE_THREADS)
        reference = self.executor.share([run_like(self.start_model, self.start_model, runner, b) for b in batches])
        shared_batches = self.executor.share(batches)
        items = [(self.start, [v, *self.rest], self.ctx, self.cache_json, shared_batches, reference) for v in variants]
        return self.executor.map(tail_noise, items, stage="layer ranking")


def _run_tail(start_model, steps: list, ctx: PassContext, cache_json: str | None):
    """One candidate tail on ``start_model`` (in a task, with the range cache written locally)."""
    from calibration.shards import check_readable

    if ctx.calibration is not None:
        check_readable(ctx.calibration)
    with tempfile.TemporaryDirectory(prefix="budget-task-") as scratch:
        if cache_json is not None:
            cache = Path(scratch) / "ranges.json"
            cache.write_text(cache_json)
            steps = [replace(steps[0], range_cache=str(cache)), *steps[1:]]
        return PassManager(steps, verify="off").run(start_model, ctx)


def tail_accuracy(start_model, steps: list, ctx: PassContext, cache_json, original, dataset, shapes, metric,
                  reference) -> AccuracyReport:
    """A task: run a candidate tail and evaluate it against the original."""
    from calibration.shards import check_readable

    check_readable(dataset, "evaluation data")
    run = _run_tail(start_model, steps, ctx, cache_json)
    return evaluate(original, run.model, dataset, shapes, metric=metric, reference=reference)


def tail_noise(start_model, steps: list, ctx: PassContext, cache_json, batches: list[dict], reference: list[dict]) -> float:
    """A task: the output noise (dB below the signal, balanced over the slices of axis 1) of a
    candidate tail against the start model's outputs on ``batches``."""
    from optimizer.metrics import compare_batches
    from optimizer.runtime import REPRODUCIBLE_THREADS, OrtRunner, run_like

    run = _run_tail(start_model, steps, ctx, cache_json)
    runner = OrtRunner(run.model, threads=REPRODUCIBLE_THREADS)
    outputs = [run_like(start_model, run.model, runner, b) for b in batches]
    metrics = [m for m in compare_batches(reference, outputs) if m.sqnr_db is not None]
    balanced = [m.balanced_sqnr_db if m.balanced_sqnr_db is not None else m.sqnr_db for m in metrics]
    return -float(sum(balanced) / len(balanced)) if balanced else -100.0


def rank_alone(tunable, details: dict, ctx: PassContext, candidates: Candidates):
    """Quantized layers, most harmful first, by the output noise (dB below the signal, balanced over
    the slices of axis 1, on the verification samples) of the model with only that layer quantized: the error each layer adds
    by itself, downstream amplification included. Costs one quantize + run per layer (one task
    each), no evaluation."""
    layers = list(details.get("layers", {}))
    variants = [replace(tunable, exclude=list(tunable.exclude) + [n for n in layers if n != node]) for node in layers]
    noise = dict(zip(layers, candidates.noise(variants, ctx.verify_batches or [])))
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
    """``(tunable reading the first run's ranges from a range cache, the cache's text)``: calibrate
    once, never per candidate (``(tunable, None)`` when there is nothing to reuse)."""
    from calibration.cache import save_ranges
    from calibration.ranges import TensorRange
    from passes.graph_model import graph_model
    from passes.graph_utils import import_graph

    ranges = [TensorRange(n, float(v["amax"]), str(v["method"]), v.get("sqnr_db"))
              for n, v in details.get("tensors", {}).items()]
    if not ranges or not hasattr(tunable, "range_cache"):
        return tunable, None
    cache = scratch / "ranges.json"
    save_ranges(cache, ranges, graph_model(import_graph(start_model)))
    return replace(tunable, range_cache=str(cache)), cache.read_text()


def _fit_pruning(candidates: Candidates, prefix, tunable, record, budget, result, base):
    """Choose which channel groups to prune (least sensitive first) so the drop fits the budget:
    one task per group for its sensitivity, then the greedy choice in speculative rounds."""
    groups = [g["producers"][0] for g in (record.details.get("groups", []) if record else []) if g.get("producers")]

    def variant(chosen) -> object:
        return replace(tunable, ratio=0.0, ratios=[f"{g}:{tunable.ratio}" for g in chosen])

    def evaluate_all(keys: list[tuple]) -> list[AccuracyReport]:
        return candidates.accuracy([variant(k) for k in keys], stage="budget search")

    alone = dict(zip([(g,) for g in groups], candidates.accuracy([variant([g]) for g in groups], stage="group sensitivity")))
    for group in groups:
        result.sensitivity[group] = base - metric_of(alone[(group,)])[2]  # points lost when only this group is pruned
    order = sorted(groups, key=lambda g: result.sensitivity[g])

    def step(state):
        chosen, i = state
        if i >= len(order):
            return None
        key = chosen + (order[i],)
        return key, (key, i + 1), (chosen, i + 1)

    def fits(acc: AccuracyReport) -> bool:
        return base - metric_of(acc)[2] <= budget

    # a group's sensitivity run is the greedy step that tries that group first: known already
    search = speculative_search(((), 0), step, evaluate_all, fits, candidates.executor.workers, known=alone)
    chosen = list(search.state[0])
    if not chosen:  # nothing fits: the tunable pass prunes nothing
        search.values[()] = evaluate_all([()])[0]
    run = PassManager([variant(chosen), *candidates.rest], verify="off").run(candidates.start_model, candidates.local_ctx)
    acc = search.values[tuple(chosen)]
    check_structure(run.model)
    result.model = run.model
    result.records = (prefix.records if prefix else []) + run.records
    result.accuracy = acc
    result.drop = base - metric_of(acc)[2]
    result.met = result.drop <= budget
    result.fallbacks = [
        Fallback(g, tunable.name, round(-result.sensitivity[g], 4), "left unpruned: accuracy budget")
        for g in groups if g not in chosen
    ]
    return result
