"""Evaluation: run the original and optimized models on the same data and measure agreement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from calibration.data import ShapeSpec
from calibration.sources import batch_len
from optimizer.metrics import OutputAccumulator, OutputMetrics
from optimizer.runtime import InputSpec, OrtRunner, Sessions, input_specs, output_names
from optimizer.task_metrics import MetricAccumulator, MetricScore, load_metric


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
    sessions: Sessions | None = None,
) -> AccuracyReport:
    """Stream ``data`` through both models batch by batch; memory does not grow with samples.

    ``data``: a ``CalibrationSource`` (see ``calibration.samples``), ``ArrayData``, a path, or None
    for synthetic inputs at ``shapes`` (flagged in the report). ``metric``: a task metric (a name,
    ``module:function`` or a callable; see ``optimizer.task_metrics``) scored on both models.
    ``sessions``: the run's ONNX Runtime sessions (``optimizer.runtime.Sessions``): both models'
    sessions are reused, and so are their outputs on batches verification already ran.
    """
    from calibration.samples import SYNTHETIC_EVAL_SAMPLES, labelled_batches
    from calibration.sources import open_source

    specs = input_specs(original)
    source = open_source(data, specs, shapes=shapes or {}, synthetic_samples=SYNTHETIC_EVAL_SAMPLES, seed=1)
    sessions = sessions if sessions is not None else Sessions()
    names = output_names(original)
    report = AccuracyReport(source.description, bool(source.synthetic), 0, warnings=getattr(source, "warnings", []))
    report.note = note
    # Batch by the optimized model's batch dims: passes may have fixed a dynamic one.
    batches = labelled_batches(source, _with_batch_dims(specs, input_specs(optimized)), batch_size)
    accumulators = {name: OutputAccumulator(name) for name in names}
    first = names[0]
    loaded = load_metric(metric)
    scorer = MetricAccumulator(*loaded) if loaded else None
    correct_ref = correct_new = labelled = 0
    advance = progress("evaluating", source.num_samples) if progress else None
    for feeds, labels in _open_both(sessions, batches):
        ref = sessions.run(original, feeds)
        new = sessions.run_like(original, optimized, feeds)
        for name, acc in accumulators.items():
            acc.update(ref[name], new[name])
        if labels is not None and ref[first].ndim >= 2:
            rows = labels.shape[0]
            ref_top = np.argmax(ref[first].reshape(rows, -1), axis=-1)
            new_top = np.argmax(new[first].reshape(rows, -1), axis=-1)
            correct_ref += int(np.count_nonzero(ref_top == labels))
            correct_new += int(np.count_nonzero(new_top == labels))
            labelled += rows
        batch = batch_len(feeds)
        if scorer is not None:
            scorer.update(new, ref, labels, batch)
        report.samples += batch
        if advance:
            advance(batch)
    report.outputs = [acc.result() for acc in accumulators.values()]
    if labelled:
        report.task = TaskAccuracy(first, 100.0 * correct_ref / labelled, 100.0 * correct_new / labelled)
    if scorer is not None:
        report.metric = scorer.result()
    return report


def _open_both(sessions: Sessions, batches):
    """``batches``, with room for both models' sessions while they are read (batch by batch, each
    model runs in turn)."""
    with sessions.open_at_once(2):
        yield from batches


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
