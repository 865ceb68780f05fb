"""Evaluation: run the original and optimized models on the same data and measure agreement.

Every sum is exact (``optimizer.metrics.ExactSum``) and every run uses one ONNX Runtime thread
(``REPRODUCIBLE_THREADS``), so the metrics are a function of the batches alone: evaluation sharded
over an executor's tasks (``evaluate(..., executor=...)``: contiguous runs of batches, one task
each, ``Tally.merge``) gives bit-for-bit the metrics of one pass in one process. Searches that
evaluate many candidates on the same data compute the original's outputs once
(``reference_outputs``) and hand them to every evaluation.
"""

from __future__ import annotations

import contextlib

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from calibration.data import ShapeSpec
from calibration.sources import batch_len, effective_batch_size, usable_samples
from optimizer.errors import InputError
from optimizer.metrics import OutputAccumulator, OutputMetrics
from optimizer.runtime import REPRODUCIBLE_THREADS, InputSpec, OrtRunner, Sessions, input_specs, output_names, run_like
from optimizer.task_metrics import MetricAccumulator, MetricScore, load_metric

#: Original-model outputs a search keeps in memory to share with its candidates; above this it
#: lets every evaluation recompute them (streamed) instead.
REFERENCE_BYTES = 512 << 20


@dataclass
class TaskAccuracy:
    """Top-1 accuracy against labels (argmax over the last axis of the first output), in percent."""

    output: str
    original: float
    optimized: float

    @property
    def drop(self) -> float:
        """Accuracy points lost (negative: the optimized model is better)."""
        return self.original - self.optimized

    def to_dict(self) -> dict:
        return {"output": self.output, "original": self.original, "optimized": self.optimized, "drop": self.drop}


@dataclass
class AccuracyReport:
    """Agreement of the optimized model with the original on the user's (or synthetic) data."""

    data_source: str
    synthetic: bool
    samples: int
    outputs: list[OutputMetrics] = field(default_factory=list)
    task: TaskAccuracy | None = None
    warnings: list[str] = field(default_factory=list)
    note: str = ""  # which samples these are (held out of calibration, synthetic, ...)
    metric: MetricScore | None = None  # the task metric (--metric), when one is given

    def to_dict(self) -> dict:
        return {
            "data_source": self.data_source,
            "synthetic": self.synthetic,
            "samples": self.samples,
            "note": self.note,
            "outputs": {m.name: m.to_dict() for m in self.outputs},
            "task": self.task.to_dict() if self.task else None,
            "metric": self.metric.to_dict() if self.metric else None,
            "warnings": list(self.warnings),
        }


@dataclass
class ReferenceOutputs:
    """The original model's outputs on an evaluation source, batch by batch, at ``batch_size``
    (``reference_outputs``): computed once, shared by every candidate a search evaluates."""

    batch_size: int
    outputs: list[dict[str, np.ndarray]]


class Tally:
    """What evaluation accumulates over batches: per-output agreement, the task metric, top-1
    counts against labels, samples. ``merge`` folds in another shard's tally exactly."""

    def __init__(self, output_names: list[str], metric: tuple | None):
        self.outputs = {name: OutputAccumulator(name) for name in output_names}
        self.first = output_names[0]
        self.scorer = MetricAccumulator(*metric) if metric else None
        self.correct_ref = self.correct_new = self.labelled = self.samples = 0
        self.warnings: list[str] = []  # a shard's source warnings (``_shard_task``)

    def update(self, ref: dict, new: dict, labels, batch: int) -> None:
        for name, acc in self.outputs.items():
            acc.update(ref[name], new[name])
        if labels is not None and ref[self.first].ndim >= 2:
            rows = labels.shape[0]
            ref_top = np.argmax(ref[self.first].reshape(rows, -1), axis=-1)
            new_top = np.argmax(new[self.first].reshape(rows, -1), axis=-1)
            self.correct_ref += int(np.count_nonzero(ref_top == labels))
            self.correct_new += int(np.count_nonzero(new_top == labels))
            self.labelled += rows
        if self.scorer is not None:
            self.scorer.update(new, ref, labels, batch)
        self.samples += batch

    def merge(self, other: Tally) -> None:
        for name, acc in self.outputs.items():
            acc.merge(other.outputs[name])
        if self.scorer is not None:
            self.scorer.merge(other.scorer)
        self.correct_ref += other.correct_ref
        self.correct_new += other.correct_new
        self.labelled += other.labelled
        self.samples += other.samples

    def fill(self, report: AccuracyReport) -> None:
        report.samples = self.samples
        report.outputs = [acc.result() for acc in self.outputs.values()]
        if self.labelled:
            report.task = TaskAccuracy(self.first, 100.0 * self.correct_ref / self.labelled,
                                       100.0 * self.correct_new / self.labelled)
        if self.scorer is not None:
            report.metric = self.scorer.result()


def evaluate(
    original: onnx.ModelProto,
    optimized: onnx.ModelProto,
    data=None,
    shapes: dict[str, ShapeSpec | tuple[int, ...]] | None = None,
    *,
    batch_size: int = 32,
    progress: Callable[[str, int | None], Callable[..., None]] | None = None,
    note: str = "",
    metric=None,
    executor=None,
    reference: ReferenceOutputs | None = None,
    sessions: Sessions | None = None,
) -> AccuracyReport:
    """Stream ``data`` through both models batch by batch; memory does not grow with samples.

    ``data``: a ``CalibrationSource`` (see ``calibration.samples``), ``ArrayData``, a path, or None
    for synthetic inputs at ``shapes`` (flagged in the report). ``metric``: a task metric (a name,
    ``module:function`` or a callable; see ``optimizer.task_metrics``) scored on both models.
    ``executor``: shard the batches over its tasks (``calibration.executor.fans_out``; the merged
    metrics equal the one-process ones bit for bit). ``reference``: the original's outputs on
    ``data``, computed once (``reference_outputs``); used when they were batched as this run is.
    ``sessions``: the run's ONNX Runtime sessions (``optimizer.runtime.Sessions``, made with
    ``REPRODUCIBLE_THREADS``): in process, both models' sessions are reused, and so are their
    outputs on batches verification already ran.
    """
    from calibration.executor import fans_out

    source = _open(original, data, shapes)
    report = AccuracyReport(source.description, bool(source.synthetic), 0, warnings=getattr(source, "warnings", []))
    report.note = note
    # Batch by the optimized model's batch dims: passes may have fixed a dynamic one.
    batch_specs = _with_batch_dims(input_specs(original), input_specs(optimized))
    if reference is not None and reference.batch_size != effective_batch_size(batch_specs, batch_size):
        reference = None
    loaded = load_metric(metric)
    tally = None
    if fans_out(executor):
        tally = _evaluate_sharded(executor, original, optimized, source, batch_specs, batch_size, loaded, reference)
        if tally is not None and progress:
            progress("evaluating", source.num_samples)(tally.samples)
    if tally is None:
        advance = progress("evaluating", source.num_samples) if progress else None
        tally = _tally(original, optimized, source, batch_specs, batch_size, loaded,
                       reference.outputs if reference is not None else None, 0, None, advance, sessions)
    tally.fill(report)
    return report


def reference_outputs(original: onnx.ModelProto, data=None, shapes=None, *, batch_size: int = 32,
                      max_bytes: int = REFERENCE_BYTES) -> ReferenceOutputs | None:
    """The original model's outputs on ``data`` (as ``evaluate`` batches it for a candidate with
    the original's batch dims), or None when they exceed ``max_bytes``."""
    from calibration.samples import labelled_batches

    source = _open(original, data, shapes)
    specs = input_specs(original)
    runner = OrtRunner(original, threads=REPRODUCIBLE_THREADS)
    outputs, size = [], 0
    for feeds, _ in labelled_batches(source, specs, batch_size):
        outputs.append(runner.run(feeds))
        size += sum(v.nbytes for v in outputs[-1].values())
        if size > max_bytes:
            return None
    return ReferenceOutputs(effective_batch_size(specs, batch_size), outputs)


def _open(original: onnx.ModelProto, data, shapes):
    from calibration.samples import SYNTHETIC_EVAL_SAMPLES
    from calibration.sources import open_source

    return open_source(data, input_specs(original), shapes=shapes or {}, synthetic_samples=SYNTHETIC_EVAL_SAMPLES, seed=1)


def _tally(original, optimized, source, batch_specs, batch_size, metric, reference, first: int, stop: int | None,
           advance=None, sessions: Sessions | None = None) -> Tally:
    """The tally of batches ``[first, stop)`` of ``source`` (all from ``first`` when ``stop`` is None);
    the models run in ``sessions`` when given (both open at once), else in sessions of their own."""
    from calibration.samples import labelled_batches

    if sessions is None:
        ref_runner = None if reference is not None else OrtRunner(original, threads=REPRODUCIBLE_THREADS)
        new_runner = OrtRunner(optimized, threads=REPRODUCIBLE_THREADS)
        run_ref, run_new = (lambda f: ref_runner.run(f)), (lambda f: run_like(original, optimized, new_runner, f))
    else:
        run_ref, run_new = (lambda f: sessions.run(original, f)), (lambda f: sessions.run_like(original, optimized, f))
    tally = Tally(output_names(original), metric)
    with sessions.open_at_once(2) if sessions is not None else contextlib.nullcontext():
        for index, (feeds, labels) in enumerate(labelled_batches(source, batch_specs, batch_size)):
            if stop is not None and index >= stop:
                break
            if index < first:
                continue  # another shard's batch: read (the batches must be cut alike), not run
            ref = run_ref(feeds) if reference is None else reference[index - first]
            new = run_new(feeds)
            batch = batch_len(feeds)
            tally.update(ref, new, labels, batch)
            if advance:
                advance(batch)
    return tally


def _evaluate_sharded(executor, original, optimized, source, batch_specs, batch_size, metric,
                      reference: ReferenceOutputs | None) -> Tally | None:
    """``_tally`` over contiguous runs of batches, one executor task each, merged in order; None
    when the data cannot be split (unknown length, a model over 2 GB, too few batches)."""
    from calibration.shards import SHARDS_PER_WORKER, ship_source, shard_bounds

    try:
        size = effective_batch_size(batch_specs, batch_size)
        expected = usable_samples(batch_specs, batch_size, int(source.num_samples), [], source.description)
        models = executor.share(original.SerializeToString()), executor.share(optimized.SerializeToString())
    except (TypeError, ValueError):
        return None
    bounds = shard_bounds(math.ceil(expected / size), executor.workers * SHARDS_PER_WORKER)
    if len(bounds) < 2:
        return None
    # the last shard reads to the end: a source that closes batches early (variable shapes) has more
    stops = [hi for _, hi in bounds[:-1]] + [None]
    shipped = ship_source(executor, source)
    items = [(*models, shipped, batch_specs, batch_size, metric,
              executor.share(reference.outputs[lo:stop]) if reference is not None else None, lo, stop)
             for (lo, _), stop in zip(bounds, stops)]
    tallies = executor.map(_shard_task, items, stage="evaluation")
    tally = tallies[0]
    for other in tallies[1:]:
        tally.merge(other)
    # what reading left on the source in the tasks (e.g. samples a fixed batch drops), as one pass would
    warnings = getattr(source, "warnings", None)
    if warnings is not None:
        warnings += [w for w in dict.fromkeys(w for t in tallies for w in t.warnings) if w not in warnings]
    if tally.samples != expected:  # every sample evaluated exactly once, or the run stops
        raise InputError(f"evaluation over {len(bounds)} shard(s) saw {tally.samples} sample(s), expected {expected}")
    return tally


def _shard_task(original_bytes: bytes, optimized_bytes: bytes, source, batch_specs, batch_size, metric, reference,
                first: int, stop: int | None) -> Tally:
    """One evaluation shard (an executor task, in-process or on a worker)."""
    from calibration.shards import check_readable

    check_readable(source, "evaluation data")
    tally = _tally(onnx.load_from_string(original_bytes), onnx.load_from_string(optimized_bytes), source, batch_specs,
                   batch_size, metric, reference, first, stop)
    tally.warnings = list(getattr(source, "warnings", []))
    return tally


def compare_streams(reference: OrtRunner, batches: list[dict], outputs: list[dict]) -> list[OutputMetrics]:
    """Metrics of precomputed ``outputs`` (e.g. from TensorRT) against ``reference`` on ``batches``."""
    accumulators: dict[str, OutputAccumulator] = {}
    for feeds, got in zip(batches, outputs):
        ref = reference.run(feeds)
        for name, value in ref.items():
            if name in got:
                accumulators.setdefault(name, OutputAccumulator(name)).update(value, got[name])
    return [acc.result() for acc in accumulators.values()]


def _with_batch_dims(original: list[InputSpec], optimized: list[InputSpec]) -> list[InputSpec]:
    """The original input specs (the data's layout) with the optimized model's batch dims."""
    batch = {s.name: s.shape[0] for s in optimized if s.shape}
    return [
        InputSpec(s.name, s.dtype, (batch.get(s.name, s.shape[0]),) + tuple(s.shape[1:])) if s.shape else s
        for s in original
    ]
