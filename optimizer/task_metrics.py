"""Task metrics: a score in points (higher is better) that evaluation, ``method=auto``, the
accuracy budget and ``optimize check`` use instead of raw output agreement.

A metric is a function ``metric(outputs, reference, labels) -> float``: ``outputs`` and
``reference`` map output names to one batch of the optimized and the original model's outputs,
``labels`` is the batch's labels (from ``labels`` in the ``--data`` file) or None. It is called per
batch; a run's score is the mean over batches weighted by their sample counts, so write metrics
that are means over samples (a per-sample F1 or character accuracy, not a corpus-level F1). The
original model's score is ``metric(reference, reference, labels)``.

Built-ins (``--metric NAME``): ``top1`` and ``top5`` (% of samples whose label is in the first
output's top-k, last axis), ``argmax-agreement`` (% of rows whose argmax matches the original's),
``cosine`` (100 x the cosine similarity of the first float output), ``sqnr`` (mean output SQNR in
dB over the float outputs). Your own: ``--metric module:function`` or ``--metric path/to/file.py:function``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from optimizer.errors import InputError
from optimizer.metrics import ExactSum

Outputs = dict[str, np.ndarray]
Metric = Callable[[Outputs, Outputs, "np.ndarray | None"], float]


def _first(outputs: Outputs) -> np.ndarray:
    return next(iter(outputs.values()))


def _topk(k: int) -> Metric:
    def topk(outputs: Outputs, reference: Outputs, labels) -> float:
        if labels is None:
            raise InputError(f"metric top{k} needs labels: add a 'labels' array to --data")
        logits = _first(outputs)
        rows = logits.reshape(len(labels), -1)
        best = np.argsort(-rows, axis=-1)[:, :k]
        return 100.0 * float(np.mean(np.any(best == np.asarray(labels).reshape(-1, 1), axis=-1)))

    topk.__name__ = f"top{k}"
    return topk


def argmax_agreement(outputs: Outputs, reference: Outputs, labels) -> float:
    """% of rows (last axis) whose argmax matches the original's, over the first output."""
    new, ref = _first(outputs), reference[next(iter(outputs))]
    if ref.ndim == 0 or ref.shape[-1] < 2:
        return 100.0 * float(np.mean(np.sign(new) == np.sign(ref)))
    return 100.0 * float(np.mean(np.argmax(new, axis=-1) == np.argmax(ref, axis=-1)))


def cosine(outputs: Outputs, reference: Outputs, labels) -> float:
    """100 x cosine similarity of the first float output."""
    name = next(n for n, v in reference.items() if v.dtype.kind == "f")
    a, b = outputs[name].astype(np.float64).ravel(), reference[name].astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 100.0 if na == nb else 0.0
    return 100.0 * float(a @ b / (na * nb))


def sqnr(outputs: Outputs, reference: Outputs, labels) -> float:
    """Mean output SQNR in dB over the float outputs (capped at 100 dB)."""
    scores = []
    for name, ref in reference.items():
        if ref.dtype.kind != "f":
            continue
        r = ref.astype(np.float64)
        err = float(np.sum((outputs[name].astype(np.float64) - r) ** 2))
        scores.append(100.0 if err <= 0 else min(100.0, 10 * np.log10(max(float(np.sum(r * r)), 1e-300) / err)))
    return float(np.mean(scores)) if scores else 100.0


BUILTIN: dict[str, Metric] = {
    "top1": _topk(1),
    "top5": _topk(5),
    "argmax-agreement": argmax_agreement,
    "cosine": cosine,
    "sqnr": sqnr,
}


def load_metric(spec: str | Metric | None) -> tuple[str, Metric] | None:
    """``(name, function)`` for a built-in name, ``module:function``, ``file.py:function`` or a callable."""
    if spec is None:
        return None
    if isinstance(spec, tuple) and len(spec) == 2 and callable(spec[1]):  # already loaded
        return spec
    if callable(spec):
        return getattr(spec, "__name__", "metric"), spec
    if spec in BUILTIN:
        return spec, BUILTIN[spec]
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"unknown metric {spec!r}: use one of {', '.join(BUILTIN)} or module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise InputError(f"--metric: no such file {path}")
            loader = importlib.util.spec_from_file_location(f"_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except InputError:
        raise
    except Exception as exc:  # the user's module: any import error becomes one line
        raise InputError(f"--metric: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise InputError(f"--metric: {module_name} has no function {attr!r}")
    return f"{module_name}:{attr}", function


@dataclass
class MetricScore:
    """A task metric's score for the original and the optimized model, in points."""

    name: str
    original: float
    optimized: float

    @property
    def drop(self) -> float:
        return self.original - self.optimized

    def to_dict(self) -> dict:
        return {"name": self.name, "original": self.original, "optimized": self.optimized, "drop": self.drop}


class MetricAccumulator:
    """Sample-weighted means of a metric over batches, for the original and the optimized model.
    The sums are exact, so accumulators over parts of the data ``merge`` into the one of all of it."""

    def __init__(self, name: str, function: Metric):
        self.name, self.function = name, function
        self.sum_original, self.sum_optimized = ExactSum(), ExactSum()
        self.samples = 0

    def update(self, outputs: Outputs, reference: Outputs, labels, samples: int) -> None:
        try:
            original = float(self.function(reference, reference, labels))
            optimized = float(self.function(outputs, reference, labels))
        except InputError:
            raise
        except Exception as exc:  # the user's function: its failure becomes one line
            raise InputError(f"metric {self.name} failed: {type(exc).__name__}: {exc}") from None
        self.sum_original.add(original * samples)
        self.sum_optimized.add(optimized * samples)
        self.samples += samples

    def merge(self, other: MetricAccumulator) -> None:
        """Fold in the accumulator of other batches (exact)."""
        self.sum_original.merge(other.sum_original)
        self.sum_optimized.merge(other.sum_optimized)
        self.samples += other.samples

    def result(self) -> MetricScore | None:
        if not self.samples:
            return None
        return MetricScore(self.name, float(self.sum_original.value(self.samples)), float(self.sum_optimized.value(self.samples)))
