"""Calibration candidates and end-to-end selection for the Q/DQ quantization passes.

``calibrate`` collects statistics once and computes the ranges of every candidate method;
``select_method`` scores each candidate's scales on the scoring samples (the task metric, else
the argmax agreement of the first output, ties broken by output SQNR) and keeps the best;
``score_model`` scores one model the same way. Shared by ``quantize-int8`` and ``quantize-fp8``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx_graphsurgeon as gs

from calibration.sources import batch_len
from optimizer.errors import InputError
from optimizer.pass_base import PassContext
from passes.graph_model import calibration_source, graph_model

log = logging.getLogger(__name__)


class Scoring:
    """The samples a pass scores its candidates on and the float model's outputs on them, computed
    once per pass run and shared by every score (method selection, bias correction, reselection)."""

    def __init__(self, float_model, ctx: PassContext):
        self.float_model = float_model
        self.ctx = ctx
        self._batches: list[dict] | None = None
        self._reference: list[dict] | None = None
        self.scored_on = ""

    @property
    def batches(self) -> list[dict]:
        if self._batches is None:
            self._batches, self.scored_on = _scoring_batches(self.ctx, self.float_model)
        return self._batches

    @property
    def reference(self) -> list[dict]:
        if self._reference is None:
            from optimizer.runtime import OrtRunner

            runner = OrtRunner(self.float_model)
            self._reference = [runner.run(b) for b in self.batches]
        return self._reference

    def score(self, outputs: list[dict]) -> tuple[float, float, str, list]:
        """``(score, output SQNR in dB, score kind, metrics)`` of a candidate's ``outputs``."""
        from optimizer.metrics import compare_batches

        metrics = [m for m in compare_batches(self.reference, outputs) if m.cosine is not None]
        return (*_score(metrics, outputs, self.reference, self.batches, self.ctx), metrics)


def score_model(model, scoring: Scoring) -> tuple[float, float]:
    """``(score, output SQNR in dB)`` of ``model`` against the float model on the scoring samples:
    the task metric when given, else the argmax agreement of the first output (else the SQNR)."""
    from optimizer.runtime import OrtRunner

    runner = OrtRunner(model)
    return scoring.score([runner.run(b) for b in scoring.batches])[:2]


def _score(metrics, outputs, reference, batches, ctx: PassContext) -> tuple[float, float, str]:
    metrics = [m for m in metrics if m.cosine is not None]
    sqnr = float(np.mean([_balanced(m) for m in metrics])) if metrics else 0.0
    score = _metric_score(ctx.metric, outputs, reference, batches) if ctx.metric is not None else None
    if score is not None:
        return score, sqnr, "metric"
    # no metric, or one that needs labels (the scoring samples have none): the report's headline
    # agreement (argmax of the first output), ties broken by SQNR
    first = metrics[0] if metrics else None
    if first is not None and first.argmax_agreement is not None:
        return 100.0 * first.argmax_agreement, sqnr, "argmax_agreement"
    return sqnr, sqnr, "sqnr_db"


def _balanced(m) -> float:
    """The output's scale-balanced SQNR (per slice of axis 1), else its plain SQNR."""
    return m.balanced_sqnr_db if m.balanced_sqnr_db is not None else m.sqnr_db


#: ``method`` values of ``quantize-int8``; ``auto`` selects among ``AUTO_CANDIDATES`` end to end.
METHOD_CHOICES = ("auto", "minmax", "percentile", "entropy", "mse", "sqnr")
#: (label, range method, percentile) tried by ``method=auto``, in order (the first wins ties).
AUTO_CANDIDATES = (
    ("minmax", "minmax", None),
    ("percentile-99.9", "percentile", 99.9),
    ("percentile-99.99", "percentile", 99.99),
    ("percentile-99.999", "percentile", 99.999),
    ("entropy", "entropy", None),
    ("mse", "mse", None),
    ("sqnr", "sqnr", None),
)


def calibrate(graph: gs.Graph, tensors: list[str], ctx: PassContext, method: str, percentile: float, cache: str = "",
              auto_candidates: tuple = AUTO_CANDIDATES, qmax: float = 127.0):
    """Ranges for ``tensors`` on the context's calibration data (synthetic if none), or from a
    JSON range cache made for this graph structure.

    Returns ``({candidate label: {name: {"amax", "scale", "method", "sqnr_db"}}}, info)``: one
    candidate for a fixed method or a cache, every ``auto_candidates`` entry for ``auto`` --
    from one collection of statistics. Scales are ``amax / qmax`` (127 for INT8, 448 for FP8 E4M3);
    ``sqnr_db`` is the INT8 fake-quantization SQNR of the calibration sample.
    """
    from pathlib import Path

    from calibration import collect
    from calibration import ranges as range_methods
    from calibration.cache import load_ranges, save_ranges

    model = graph_model(graph)
    if cache and Path(cache).is_file():
        cached = load_ranges(cache, model)  # refuses a cache made for another graph structure
        if all(t in cached for t in tensors):
            result = {t: {"amax": float(cached[t].amax), "scale": float(cached[t].amax) / qmax, "method": cached[t].method,
                          "sqnr_db": _round(cached[t].sqnr_db)} for t in tensors}
            info = {"source": f"range cache {cache}", "synthetic": False, "samples": 0, "method": "cache", "skipped": {}}
            return {"cache": result}, info
    source = calibration_source(model, ctx, ctx.calibration)
    stats = collect.collect_statistics(model, tensors, source, ctx.calib_batch_size, progress=ctx.progress,
                                       executor=ctx.executor)
    plan = auto_candidates if method == "auto" else ((method, method, percentile),)
    candidates: dict[str, dict] = {}
    for label, range_method, pct in plan:
        result = {}
        for name, st in stats.items():
            r = range_methods.compute_range(st, range_method, percentile=pct if pct is not None else percentile)
            result[name] = {"amax": float(r.amax), "scale": float(r.amax) / qmax, "method": label, "sqnr_db": _round(r.sqnr_db)}
        candidates[label] = result
    if cache and not stats.synthetic and method != "auto":
        save_ranges(cache, [range_methods.TensorRange(n, v["amax"], v["method"], v["sqnr_db"])
                            for n, v in candidates[method].items()], model)
    info = {
        "source": stats.source,
        "synthetic": bool(stats.synthetic),
        "samples": int(stats.samples),
        "method": method,
        "skipped": dict(stats.skipped),
    }
    missing = [t for t in tensors if t not in stats]
    if missing:
        log.info("no calibration statistics for %d tensor(s): %s", len(missing), ", ".join(missing[:5]))
    if not stats and tensors:
        raise InputError("calibration produced no ranges; check the calibration data")
    return candidates, info


def select_method(graph: gs.Graph, scoring: Scoring, qdq: dict[str, gs.Variable], candidates: dict[str, dict]):
    """Score every candidate's scales end to end: the quantized model (scales swapped in) against
    the float model on the scoring samples. The candidates' model runs are independent tasks of the
    run's executor (``PassContext.executor``; in-process by default), the model and the batches
    shared once; the scoring itself stays here. Returns ``(chosen label, table, description of the
    samples)``."""
    from calibration.executor import InProcessExecutor

    quantized = graph_model(graph)
    scale_names = {name: _scale_constant(dq).name for name, dq in qdq.items()}
    executor = scoring.ctx.executor if scoring.ctx.executor is not None else InProcessExecutor()
    batches = scoring.batches
    model_ref, batches_ref = executor.share(quantized.SerializeToString()), executor.share(batches)
    items = [(model_ref, batches_ref, {init: max(float(ranges[tensor]["scale"]), 1e-12) for tensor, init in scale_names.items()})
             for ranges in candidates.values()]
    runs = executor.map(candidate_outputs, items, stage="method selection")
    table = []
    for label, (outputs, seconds) in zip(candidates, runs):
        start = time.perf_counter()
        score, sqnr, kind, metrics = scoring.score(outputs)
        table.append({"method": label, "score": round(score, 3), "score_kind": kind, "sqnr_db": round(sqnr, 3),
                      "cosine": round(min((m.cosine for m in metrics), default=1.0), 6),
                      "time_s": round(seconds + time.perf_counter() - start, 4)})
    best = max(table, key=lambda row: (row["score"], row["sqnr_db"]))  # ties: output SQNR, then the earliest
    return best["method"], table, scoring.scored_on


def candidate_outputs(model_bytes: bytes, batches: list[dict], scales: dict[str, float]) -> tuple[list[dict], float]:
    """One candidate's outputs on ``batches``: the serialized quantized model with the scale
    initializers named in ``scales`` set; ``(outputs, seconds)``. A module-level function: it runs
    as an executor task (in-process, or on a Ray worker)."""
    import onnx
    from onnx import numpy_helper

    from optimizer.runtime import OrtRunner

    start = time.perf_counter()
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    for init in model.graph.initializer:
        if init.name in scales:
            init.CopyFrom(numpy_helper.from_array(np.asarray(scales[init.name], np.float32), init.name))
    runner = OrtRunner(model)
    return [runner.run(b) for b in batches], time.perf_counter() - start


def _metric_score(metric, outputs: list[dict], reference: list[dict], batches: list[dict]) -> float | None:
    """The task metric over the scoring batches (sample-weighted), or None if it needs labels."""
    sizes = [batch_len(b) for b in batches]
    try:
        return float(np.average([metric(o, r, None) for o, r in zip(outputs, reference)], weights=sizes))
    except InputError:
        return None


def _scoring_batches(ctx: PassContext, float_model):
    """The scoring (else verification) batches in the current model's layout, else the first
    calibration batch."""
    from optimizer.runtime import input_specs

    if ctx.score_batches or ctx.verify_batches:
        adapt = ctx.feed_adapter or (lambda feeds: feeds)
        batches = [adapt(b) for b in (ctx.score_batches or ctx.verify_batches)]
        n = sum(batch_len(b) for b in batches)
        return batches, f"{n} evaluation sample(s)" if ctx.score_batches else f"{n} verification sample(s)"
    source = calibration_source(float_model, ctx, ctx.calibration)
    first = next(iter(source.batches(ctx.original_inputs or input_specs(float_model), 8)), None)
    if first is None:
        raise InputError("method=auto needs samples to score candidates on; give --calib or --data")
    return [first], "the first calibration batch" + (" (synthetic)" if source.synthetic else "")


def _scale_constant(dq_out: gs.Variable) -> gs.Constant:
    return dq_out.inputs[0].inputs[1]


def _set_scale(dq_out: gs.Variable, scale: float) -> None:
    _scale_constant(dq_out).values = np.asarray(max(float(scale), 1e-12), np.float32)


def _round(value):
    if value is None:
        return None
    value = float(value)
    return round(value, 2) if np.isfinite(value) else None


def observe_amax(graph: gs.Graph, tensors: list[str], ctx: PassContext) -> dict[str, float]:
    """Largest |value| of ``tensors`` on the calibration data (synthetic if the context has none)."""
    from calibration import collect

    model = graph_model(graph)
    data = ctx.calibration
    if data is None and (ctx.verify_batches or ctx.reference_inputs is not None):
        data = dict(ctx.verify_batches[0] if ctx.verify_batches else ctx.reference_inputs)
    source = calibration_source(model, ctx, data)
    # Without real data this is a smoke check on a few synthetic samples; keep it cheap.
    limit = None if ctx.calibration is not None else 4
    stats = collect.collect_statistics(model, tensors, source, ctx.calib_batch_size, progress=ctx.progress,
                                       max_samples=limit, executor=ctx.executor)
    return {name: float(st.amax) for name, st in stats.items()}


