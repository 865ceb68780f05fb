"""Task metrics the INT8 benchmark (``bench/quant.py``) scores every tool's output with.

Each is ``f(outputs, reference, labels) -> points`` (higher is better), the signature of
``optimize --metric`` (see ``optimizer/task_metrics.py``), called per batch and averaged with
sample weights, as the optimizer's evaluation does.

``top1``, ``argmax_agreement`` and ``cosine`` mirror the optimizer's built-ins of the same names
(``--metric top1`` / ``argmax-agreement`` / ``cosine``): the benchmark imports nothing from the
package it measures, so it carries its own copy, and it recomputes the metric for our outputs too
so a drift between the two would show. The OCR and detector metrics are the ones in
``examples/metrics.py``; ``tiny_detector_f1`` adapts ``detection_f1`` to the zoo's tiny detector.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "metrics.py"
_spec = importlib.util.spec_from_file_location("_example_metrics", _EXAMPLES)
examples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(examples)  # type: ignore[union-attr]

ctc_char_accuracy = examples.ctc_char_accuracy
ctc_char_accuracy_time_major = examples.ctc_char_accuracy_time_major
detection_f1 = examples.detection_f1


def _first(outputs):
    return next(iter(outputs.values()))


def top1(outputs, reference, labels) -> float:
    """% of samples whose label is the first output's argmax (the built-in ``top1``)."""
    if labels is None:
        raise ValueError("top1 needs labels")
    rows = _first(outputs).reshape(len(labels), -1)
    return 100.0 * float(np.mean(np.argmax(rows, axis=-1) == np.asarray(labels).reshape(-1)))


def argmax_agreement(outputs, reference, labels) -> float:
    """% of rows (last axis) whose argmax matches the original's (the built-in ``argmax-agreement``)."""
    new, ref = _first(outputs), reference[next(iter(outputs))]
    if ref.ndim == 0 or ref.shape[-1] < 2:
        return 100.0 * float(np.mean(np.sign(new) == np.sign(ref)))
    return 100.0 * float(np.mean(np.argmax(new, axis=-1) == np.argmax(ref, axis=-1)))


def cosine(outputs, reference, labels) -> float:
    """100 x the cosine similarity of the first float output (the built-in ``cosine``)."""
    name = next(n for n, v in reference.items() if v.dtype.kind == "f")
    a, b = outputs[name].astype(np.float64).ravel(), reference[name].astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 100.0 if na == nb else 0.0
    return 100.0 * float(a @ b / (na * nb))


TINY_DETECTOR_THRESHOLD = 0.3


def tiny_detector_f1(outputs, reference, labels) -> float:
    """``detection_f1`` for the zoo's ``tiny_detector`` (``boxes`` [batch, 378, 4] as cx, cy, w, h and
    ``scores`` [batch, 378, 3] = objectness x class): both are joined into the YOLOv8 layout
    [batch, 4 + classes, anchors]. Its weights are random, so scores sit around 0.24 +- 0.05 and
    the example's 0.25 threshold keeps ~160 boxes per image; 0.3 keeps 25-85 (the most confident)."""

    def joined(out):
        boxes, scores = out["boxes"], out["scores"]
        return {"pred": np.concatenate([boxes, scores], axis=-1).transpose(0, 2, 1)}

    return detection_f1(joined(outputs), joined(reference), labels, threshold=TINY_DETECTOR_THRESHOLD)


#: bench-side function for each ``--metric`` the benchmark passes to ``optimize``
BY_CLI_NAME = {
    "top1": top1,
    "argmax-agreement": argmax_agreement,
    "cosine": cosine,
    "examples/metrics.py:ctc_char_accuracy": ctc_char_accuracy,
    "examples/metrics.py:ctc_char_accuracy_time_major": ctc_char_accuracy_time_major,
    "examples/metrics.py:detection_f1": detection_f1,
    "bench/quant_metrics.py:tiny_detector_f1": tiny_detector_f1,
}
