"""The whole job in one call: load, run the pipeline with verification, evaluate, save, report."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from calibration.data import ArrayData, ShapeSpec, load_npz, parse_shapes, synthetic_inputs
from optimizer.errors import PassError
from optimizer.evaluate import evaluate
from optimizer.io import default_output_path, load_model, save_model
from optimizer.manager import Hook, PassManager, VerifyMode
from optimizer.pass_base import PassContext
from optimizer.pipeline import Step
from optimizer.report import Report
from optimizer.runtime import OrtRunner, RuntimeFailure, input_specs
from optimizer.stats import model_stats

#: Samples of the user's data used for per-pass numeric verification (evaluation uses them all).
VERIFY_SAMPLES = 8


@dataclass
class OptimizeResult:
    """The optimized model (None if the pipeline failed) and the run's report."""

    model: onnx.ModelProto | None
    report: Report


def optimize(
    model: str | os.PathLike | onnx.ModelProto,
    pipeline: str | Step | list = "default",
    *,
    output: str | os.PathLike | None = None,
    data: str | os.PathLike | ArrayData | None = None,
    shapes: str | list[str] | dict[str, ShapeSpec] | None = None,
    calibration=None,
    verify: VerifyMode = "numeric",
    keep_going: bool = False,
    evaluate_accuracy: bool = True,
    max_accuracy_drop: float | None = None,
    lossy_finite_only: bool | None = None,
    hooks: list[Hook] | None = None,
    progress: Callable[[str, int | None], Callable[..., None]] | None = None,
) -> OptimizeResult:
    """Optimize ``model`` with ``pipeline``; save to ``output`` when given (never over the input).

    ``calibration``: data for quantization passes (a path to .npz/.npy/a folder, or a
    ``calibration.sources.CalibrationSource``). ``max_accuracy_drop``: an accuracy budget in points
    (see ``optimizer.budget``); layers fall back to float until it holds, else the report's status
    is ``accuracy_failed``. Raises ``InputError``/``PipelineError`` for bad input. A pass that fails
    verification raises ``PassError`` unless ``keep_going`` (then it is rolled back).
    ``lossy_finite_only``: verify lossy passes only for finite outputs (default: when a budget is set).
    """
    start = time.perf_counter()
    original, source = load_model(model)
    if lossy_finite_only is None:
        lossy_finite_only = max_accuracy_drop is not None
    manager = PassManager(pipeline, verify=verify, keep_going=keep_going, hooks=hooks, lossy_finite_only=lossy_finite_only)
    shape_specs = shapes if isinstance(shapes, dict) else parse_shapes(shapes)
    dataset = load_npz(data) if isinstance(data, (str, os.PathLike)) else data
    specs = input_specs(original)
    unknown = [n for n in shape_specs if n not in {s.name for s in specs}]
    if unknown:
        from optimizer.errors import InputError

        raise InputError(
            f"--shapes names unknown input(s) {', '.join(unknown)}; model inputs: {', '.join(s.name for s in specs)}"
        )
    # Shapes given as a min/opt/max profile stay dynamic: passes may fold only fixed shapes.
    fixed = {n: s.opt for n, s in shape_specs.items() if s.min is None and s.max is None}
    ctx = PassContext(input_shapes=fixed, progress=progress)
    if dataset is None and len(fixed) < len(shape_specs):
        ctx.reference_inputs = synthetic_inputs(specs, shape_specs)
    if calibration is not None:
        from calibration.sources import open_source

        ctx.calibration = open_source(calibration, specs, shapes=ctx.input_shapes)
    if dataset is not None:
        dataset.check(specs)
        first = next(dataset.batches(specs, VERIFY_SAMPLES, limit=VERIFY_SAMPLES), None)
        ctx.reference_inputs = first[0] if first else None
    opset = next((o.version for o in original.opset_import if o.domain in ("", "ai.onnx")), 0)
    report = Report(
        model_path=str(source.path) if source.path else "<ModelProto>",
        pipeline=manager.pipeline_text,
        verify=verify,
        original=model_stats(original),
        opset=opset,
        ir_version=original.ir_version,
    )
    try:
        result = manager.run(original, ctx)
    except PassError as exc:
        report.status = "verification_failed"
        report.error = str(exc)
        report.passes = getattr(exc, "records", [])
        report.total_time_s = time.perf_counter() - start
        exc.report = report
        raise
    report.passes = result.records
    report.warnings = list(result.warnings)
    removed = [s.name for s in specs if s.name not in {i.name for i in input_specs(result.model)}]
    if removed:
        report.warnings.append(
            f"model inputs removed: {', '.join(removed)} (unused, or initializers that were also listed as inputs "
            "and are now constants); pass cleanup(remove_unused_inputs=false) to keep unused ones"
        )
    report.optimized = model_stats(result.model)
    if evaluate_accuracy:
        try:
            OrtRunner(original)
        except RuntimeFailure as exc:  # e.g. a custom op ONNX Runtime lacks: nothing to compare against
            report.warnings.append(f"accuracy not measured: the original model does not run in ONNX Runtime ({exc})")
        else:
            accuracy = evaluate(original, result.model, dataset, shape_specs, progress=progress)
            if max_accuracy_drop is not None:
                from optimizer.budget import fit_budget

                fitted = fit_budget(original, manager.steps, ctx, max_accuracy_drop, dataset, shape_specs, result, accuracy)
                result.model, result.records, accuracy = fitted.model, fitted.records, fitted.accuracy
                report.passes = result.records
                report.optimized = model_stats(result.model)
                report.budget = {
                    "max_accuracy_drop": max_accuracy_drop,
                    "metric": fitted.metric,
                    "drop": round(fitted.drop, 4),
                    "met": fitted.met,
                    "fallbacks": [vars(f) for f in fitted.fallbacks],
                    "sensitivity": {k: round(v, 4) for k, v in fitted.sensitivity.items()},
                }
                if not fitted.met:
                    report.status = "accuracy_failed"
                    report.error = (
                        f"{fitted.metric} dropped {fitted.drop:.2f} points, more than --max-accuracy-drop "
                        f"{max_accuracy_drop}, even with {len(fitted.fallbacks)} layer(s) in float"
                    )
            report.accuracy = accuracy
            report.warnings += [w for w in accuracy.warnings if w not in report.warnings]
    if output is not None:
        protect = (source.path,) if source.path else ()
        report.output_path = str(save_model(result.model, output, protect=protect))
    report.total_time_s = time.perf_counter() - start
    return OptimizeResult(result.model, report)


def default_output(model_path: str | os.PathLike) -> Path:
    """Where ``optimize model.onnx`` writes when no ``-o`` is given."""
    return default_output_path(Path(model_path))


def write_trt_calibration_cache(report: Report, path: str | os.PathLike) -> Path:
    """Write the activation scales chosen by ``quantize-int8`` as a TensorRT calibration cache."""
    from calibration.cache import write_trt_cache
    from calibration.ranges import TensorRange
    from optimizer.errors import InputError

    ranges: dict[str, TensorRange] = {}
    for record in report.passes:
        if record.name == "quantize-int8" and record.changed and not record.rolled_back:
            for name, info in record.details.get("tensors", {}).items():
                ranges[name] = TensorRange(name, float(info["amax"]), str(info["method"]))
    if not ranges:
        raise InputError("--calib-cache: the pipeline quantized no activations, so there is no cache to write")
    return write_trt_cache(path, ranges)


def evaluate_engine(built, report: Report, onnx_path, data, shapes) -> dict:
    """Run a built TensorRT engine; compare with ONNX Runtime (optimized model) and the original."""
    from optimizer.engine import run_engine
    from optimizer.evaluate import compare_streams

    original, _ = load_model(report.model_path)
    optimized, _ = load_model(onnx_path)
    dataset = load_npz(data) if isinstance(data, (str, os.PathLike)) else data
    specs = input_specs(optimized)
    if dataset is not None:
        dataset.check(specs)
        batches = [feeds for feeds, _ in dataset.batches(specs, 32)]
    else:
        from calibration.data import synthetic_inputs

        batches = [synthetic_inputs(specs, shapes or {}, seed=1)]
    outputs, latency = run_engine(built.path, batches)
    info = built.to_dict()
    info["latency_ms"] = latency
    info["accuracy"] = {
        "vs_onnxruntime": {m.name: m.to_dict() for m in compare_streams(OrtRunner(optimized), batches, outputs)},
        "vs_original": {m.name: m.to_dict() for m in compare_streams(OrtRunner(original), batches, outputs)},
    }
    return info
