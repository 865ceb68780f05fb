"""Task metrics for ``optimize --metric examples/metrics.py:NAME`` (see README, "Task metrics").

Each is ``f(outputs, reference, labels) -> points`` (higher is better), called per batch: a mean
over the batch's samples. ``outputs`` and ``reference`` map output names to the optimized and the
original (FP32) model's outputs; ``labels`` is None unless ``--data`` has a ``labels`` array.
"""

from __future__ import annotations

import numpy as np

BLANK = 0  # the CTC blank index (PaddleOCR and most CRNNs use 0)


def _greedy_ctc(probs: np.ndarray) -> list[list[int]]:
    """Greedy CTC decoding of [batch, time, classes]: argmax, collapse repeats, drop blanks."""
    best = probs.argmax(axis=-1)
    decoded = []
    for row in best:
        keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != BLANK)
        decoded.append(row[keep].tolist())
    return decoded


def _edit_distance(a: list[int], b: list[int]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def ctc_char_accuracy(outputs, reference, labels) -> float:
    """Character accuracy (1 - edit distance / length, in %) of the optimized model's greedy CTC
    text against the FP32 model's text, for a recognizer with a [batch, time, classes] output."""
    name = next(iter(reference))
    got, want = _greedy_ctc(outputs[name]), _greedy_ctc(reference[name])
    scores = [100.0 * max(0.0, 1.0 - _edit_distance(g, w) / max(len(w), 1)) for g, w in zip(got, want)]
    return float(np.mean(scores))


def ctc_char_accuracy_time_major(outputs, reference, labels) -> float:
    """:func:`ctc_char_accuracy` for a time-major recognizer output [time, batch, classes] (a CRNN
    exported from ``nn.LSTM`` without ``batch_first``): the batch is on axis 1."""
    name = next(iter(reference))
    return ctc_char_accuracy({name: np.swapaxes(outputs[name], 0, 1)}, {name: np.swapaxes(reference[name], 0, 1)}, labels)


def _detections(pred: np.ndarray, threshold: float, iou: float, max_det: int = 300) -> list[tuple[np.ndarray, np.ndarray]]:
    """YOLOv8-style [batch, 4 + classes, anchors] (cx, cy, w, h, class scores) -> per image
    (boxes [k, 4] as x1 y1 x2 y2, classes [k]) after a score threshold, the ``max_det`` most
    confident boxes, and per-class NMS."""
    out = []
    for image in pred:
        boxes, scores = image[:4].T, image[4:].T
        cls, conf = scores.argmax(axis=1), scores.max(axis=1)
        order = np.argsort(-conf)[:max_det]
        order = order[conf[order] > threshold]
        xyxy = np.concatenate([boxes[order, :2] - boxes[order, 2:] / 2, boxes[order, :2] + boxes[order, 2:] / 2], axis=1)
        cls = cls[order]
        keep = np.ones(len(order), bool)
        for i in range(len(order)):  # greedy NMS, most confident first
            if keep[i]:
                overlap = _ious(xyxy[i], xyxy[i + 1:]) >= iou
                keep[i + 1:] &= ~(overlap & (cls[i + 1:] == cls[i]))
        out.append((xyxy[keep], cls[keep]))
    return out


def _ious(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    union = np.prod(box[2:] - box[:2]) + np.prod(boxes[:, 2:] - boxes[:, :2], axis=1) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(_ious(a, b[None])[0])


def detection_f1(outputs, reference, labels, threshold: float = 0.25, iou: float = 0.5) -> float:
    """Box F1 (%) of the optimized model's detections against the FP32 model's (same class,
    IoU >= 0.5, greedy matching), per image, for a YOLOv8-style [batch, 4 + classes, anchors] output."""
    name = next(iter(reference))
    scores = []
    for (got, got_cls), (want, want_cls) in zip(_detections(outputs[name], threshold, iou),
                                                 _detections(reference[name], threshold, iou)):
        if len(want) == 0 and len(got) == 0:
            scores.append(100.0)
            continue
        used, matched = set(), 0
        for box, c in zip(got, got_cls):
            best = max(((j, _iou(box, w)) for j, (w, wc) in enumerate(zip(want, want_cls)) if wc == c and j not in used),
                       key=lambda t: t[1], default=(None, 0.0))
            if best[0] is not None and best[1] >= iou:
                used.add(best[0])
                matched += 1
        scores.append(100.0 * 2 * matched / (len(got) + len(want)))
    return float(np.mean(scores))
