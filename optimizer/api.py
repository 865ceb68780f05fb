"""The whole job in one call: load, run the pipeline with verification, evaluate, save, report."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from calibration.data import ShapeSpec, parse_shapes
from calibration.samples import prepare
from calibration.shapes import ShapePlan
from optimizer.errors import InputError, PassError
from optimizer.evaluate import evaluate
from optimizer.interface import restore_dynamic_dims
from optimizer.io import default_output_path, load_model, save_model
from optimizer.manager import Hook, PassManager, VerifyMode
from optimizer.pass_base import PassContext
from optimizer.pipeline import Step, iter_passes
from optimizer.report import Report
from optimizer.runtime import OrtRunner, Sessions, input_specs
from optimizer.stats import model_stats
from optimizer.task_metrics import load_metric
from optimizer.validate import validate_model

log = logging.getLogger(__name__)


@dataclass
class OptimizeResult:
    """The optimized model (None if the pipeline failed), the run's report, and the shapes it used."""

    model: onnx.ModelProto | None
    report: Report
    shapes: ShapePlan | None = None


def _with_run_settings(function):
    """Issue 14: run ``optimize`` with the ``executor`` and ``calib_batch_size`` it was given
    installed (``calibration.executor.run_settings``), and record the executor in the report."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, executor=None, calib_batch_size=None, **kwargs):
        from calibration.executor import run_settings

        with run_settings(executor, calib_batch_size) as settings:
            try:
                result = function(*args, **kwargs)
            except PassError as exc:
                if executor is not None and exc.report is not None:
                    record_executor(exc.report, settings.executor)
                raise
        if executor is not None:
            record_executor(result.report, settings.executor)
        return result

    return wrapper


def record_executor(report: Report, executor) -> None:
    """The executor, its workers and per-stage tasks and times, under ``samples.executor``."""
    describe = getattr(executor, "describe", None)
    info = describe() if callable(describe) else {"executor": executor.name, "workers": executor.workers}
    report.samples = dict(report.samples or {}, executor=info)


@_with_run_settings
def optimize(
    model: str | os.PathLike | onnx.ModelProto,
    pipeline: str | Step | list = "default",
    *,
    output: str | os.PathLike | None = None,
    data=None,
    shapes: str | list[str] | dict[str, ShapeSpec] | None = None,
    calibration=None,
    verify: VerifyMode = "numeric",
    strict: bool = False,
    keep_going: bool | None = None,
    static_shapes: bool = False,
    evaluate_accuracy: bool = True,
    max_accuracy_drop: float | None = None,
    lossy_finite_only: bool | None = None,
    hooks: list[Hook] | None = None,
    progress: Callable[[str, int | None], Callable[..., None]] | None = None,
    metric=None,
    executor=None,
    calib_batch_size: int | None = None,
) -> OptimizeResult:
    """Optimize ``model`` with ``pipeline``; save to ``output`` when given (never over the input).

    A recipe of named steps: load and validate; resolve shapes and plan the samples once
    (``calibration.samples``); run the verified pipeline (a failing pass is rolled back, or raises
    ``PassError`` with ``strict``); keep the original's dynamic dims (unless ``static_shapes``);
    evaluate on the planned samples; fit the accuracy budget; save; report.

    ``data``: evaluation samples (a path to .npz/.npy/a folder, ``ArrayData`` or a
    ``CalibrationSource``). ``calibration``: data for quantization passes (same kinds).
    ``shapes``: values for dynamic dims (``name:1x3x224x224`` or ``name:min/opt/max``); they set
    what verification, calibration and evaluation feed and do not change the model's interface
    unless ``static_shapes``. ``max_accuracy_drop``: an accuracy budget in points (see
    ``optimizer.budget``). ``lossy_finite_only``: verify lossy passes only for finite outputs
    (default: when a budget is set). ``metric``: a task metric (built-in name, ``module:function``
    or a callable ``f(outputs, reference, labels) -> points``; ``optimizer.task_metrics``) used by
    the evaluation, ``method=auto`` and the budget. ``executor``: where independent work runs
    (``calibration.executor``; e.g. ``optimizer.ray_executor.RayExecutor(workers=2)``), default
    in-process; ``calib_batch_size``: samples calibration reads at a time (default 16). Neither
    changes the model written. Raises ``InputError``/``PipelineError`` for bad input.
    """
    start = time.perf_counter()
    loaded_metric = load_metric(metric)
    original, source = load_model(model)
    input_warnings = validate_model(original, source.path)
    if lossy_finite_only is None:
        lossy_finite_only = max_accuracy_drop is not None
    specs = input_specs(original)
    given = _given_shapes(shapes, specs)
    sessions = Sessions()  # ONNX Runtime sessions and outputs shared by every stage below
    prepared = prepare(original, specs, given, data=data, calib=calibration, sessions=sessions)
    plan, samples = prepared.shapes, prepared.samples
    if samples is None and verify == "numeric":
        verify_used: VerifyMode = "structural"
        if prepared.loadable:
            input_warnings.append(
                f"numeric verification unavailable: the original model does not run at any shape tried ({plan.failure}); "
                f"checking structure only. Pass {plan.hint()} (or --data) to verify numerically"
            )
        else:
            input_warnings.append(f"numeric verification unavailable, checking structure only: {plan.failure}")
    else:
        verify_used = verify
        input_warnings += plan.warnings
    # lazy_noise: the float-noise probe runs only when a check fails the bound without it (same verdicts)
    manager = PassManager(pipeline, verify=verify_used, strict=strict, keep_going=keep_going, hooks=hooks,
                          lossy_finite_only=lossy_finite_only, lazy_noise=True)
    ctx = PassContext(input_shapes=dict(plan.shapes) if static_shapes else {}, progress=progress,
                      metric=loaded_metric[1] if loaded_metric else None, sessions=sessions)
    calibrates = any(type(p).uses_calibration for p in iter_passes(manager.steps))
    if samples is not None:
        ctx.verify_batches = samples.verify
        ctx.reference_inputs = samples.verify[0] if samples.verify else None
        ctx.calibration = samples.calibration
        if calibrates:
            ctx.score_batches = samples.score_batches(specs, prepared.batch_size)
            input_warnings += [w for w in samples.warnings if w not in input_warnings]
    elif calibration is not None:
        from calibration.sources import open_source

        ctx.calibration = open_source(calibration, specs)
    opset = next((o.version for o in original.opset_import if o.domain in ("", "ai.onnx")), 0)
    original_stats = model_stats(original)
    report = Report(
        model_path=str(source.path) if source.path else "<ModelProto>",
        pipeline=manager.pipeline_text,
        verify=verify_used,
        original=original_stats,
        opset=opset,
        ir_version=original.ir_version,
    )
    report.inputs = plan.to_dict()
    report.samples = samples.to_dict(calibrates) if samples is not None else None
    try:
        result = manager.run(original, ctx, stats=original_stats)
    except PassError as exc:
        report.status = "verification_failed"
        report.error = str(exc)
        report.passes = exc.records
        report.warnings = input_warnings
        report.total_time_s = time.perf_counter() - start
        exc.report = report
        raise
    report.passes = result.records
    report.verification = result.verification
    report.time_breakdown = result.timing  # issue 16: where the manager's time went
    report.warnings = input_warnings + [w for w in result.warnings if w not in input_warnings]
    restored: list[str] = []
    if static_shapes:
        report.warnings.append("--static-shapes: inputs may be fixed to " + ", ".join(
            f"{n} {'x'.join(map(str, s))}" for n, s in plan.shapes.items()))
    else:
        restored = restore_dynamic_dims(original, result.model)
        if restored:
            sessions.forget(result.model)  # evaluation loads the model as it is written
            log.info("restored the original's dynamic dims of %s", ", ".join(restored))
    removed = [s.name for s in specs if s.name not in {i.name for i in input_specs(result.model)}]
    if removed:
        report.warnings.append(
            f"model inputs removed: {', '.join(removed)} (unused, or initializers that were also listed as inputs "
            "and are now constants); pass cleanup(remove_unused_inputs=false) to keep unused ones"
        )
    report.optimized = result.stats if result.stats is not None and not restored else model_stats(result.model)
    if evaluate_accuracy:
        if not prepared.loadable:  # e.g. a custom op ONNX Runtime lacks: nothing to compare against
            report.warnings.append(f"accuracy not measured: the original model does not run in ONNX Runtime ({plan.failure})")
        elif samples is None:
            report.warnings.append(f"accuracy not measured: the original model runs at no shape tried; pass {plan.hint()}")
        else:
            accuracy = evaluate(original, result.model, samples.evaluation, plan.shapes, progress=progress,
                                note=samples.note, batch_size=1 if prepared.batch_size == 1 else 32, metric=loaded_metric,
                                sessions=sessions)
            if max_accuracy_drop is not None:
                from optimizer.budget import fit_budget

                fitted = fit_budget(original, manager.steps, ctx, max_accuracy_drop, samples.evaluation, plan.shapes,
                                    result, accuracy, metric=loaded_metric)
                result.model, result.records, accuracy = fitted.model, fitted.records, fitted.accuracy
                if not static_shapes:
                    restore_dynamic_dims(original, result.model)
                report.passes = result.records
                report.optimized = model_stats(result.model)
                report.budget = {
                    "max_accuracy_drop": max_accuracy_drop,
                    "metric": fitted.metric,
                    "drop": round(fitted.drop, 4),
                    "met": fitted.met,
                    "fallbacks": [vars(f) for f in fitted.fallbacks],
                    "sensitivity": {k: round(v, 4) for k, v in fitted.sensitivity.items()},
                    "evaluations": fitted.evaluations,
                    "ranking": fitted.ranking,
                }
                if not fitted.met:
                    report.status = "accuracy_failed"
                    report.error = (
                        f"{fitted.metric} dropped {fitted.drop:.2f} points, more than --max-accuracy-drop "
                        f"{max_accuracy_drop}, even with {len(fitted.fallbacks)} layer(s) in float"
                    )
            report.accuracy = accuracy
            report.warnings += [w for w in accuracy.warnings if w not in report.warnings]
            if accuracy.synthetic:
                report.warnings.append(
                    "accuracy figures rest on SYNTHETIC inputs (no --data or --calib given): they say nothing about real accuracy"
                )
    from optimizer.precision_map import precision_summary, precision_warnings

    report.precision = precision_summary(result.model, result.records)
    report.warnings += [w for w in precision_warnings(result.records) if w not in report.warnings]
    rolled = [r for r in result.records if r.rolled_back]
    if rolled:
        report.rolled_back = [{"pass": r.spec, "iteration": r.iteration, "why": r.error} for r in rolled]
    if output is not None:
        protect = (source.path,) if source.path else ()
        report.output_path = str(save_model(result.model, output, protect=protect))
    if report.time_breakdown is not None:  # the whole run's ONNX Runtime work, shared by its stages
        report.time_breakdown["onnxruntime"] = {"sessions": sessions.loads, "runs": sessions.runs,
                                                "runs_reused": sessions.reused}
    report.total_time_s = time.perf_counter() - start
    return OptimizeResult(result.model, report, plan)


def _given_shapes(shapes, specs) -> dict[str, ShapeSpec]:
    given = shapes if isinstance(shapes, dict) else parse_shapes(shapes)
    unknown = [n for n in given if n not in {s.name for s in specs}]
    if unknown:
        raise InputError(
            f"--shapes names unknown input(s) {', '.join(unknown)}; model inputs: {', '.join(s.name for s in specs)}"
        )
    return given


def default_output(model_path: str | os.PathLike) -> Path:
    """Where ``optimize model.onnx`` writes when no ``-o`` is given."""
    return default_output_path(Path(model_path))


def write_trt_calibration_cache(report: Report, path: str | os.PathLike) -> Path:
    """Write the activation scales chosen by ``quantize-int8`` as a TensorRT calibration cache."""
    from calibration.cache import write_trt_cache
    from calibration.ranges import TensorRange
    from optimizer.errors import InputError

    ranges: dict[str, TensorRange] = {}
    from optimizer.registry import available_passes

    calibrating = {name for name, cls in available_passes().items() if cls.calibrates_ranges}
    for record in report.passes:
        # TensorRT's calibration cache holds INT8 scales only (FP8 ranges are explicit Q/DQ)
        if record.name in calibrating and record.changed and not record.rolled_back and record.details.get("format", "int8") == "int8":
            for name, info in record.details.get("tensors", {}).items():
                ranges[name] = TensorRange(name, float(info["amax"]), str(info["method"]))
    if not ranges:
        raise InputError("--calib-cache: the pipeline quantized no activations, so there is no cache to write")
    # The header names the calibrator that reads the cache, not how the scales were chosen: our
    # engine builder's calibrator (Polygraphy's default) is IInt8EntropyCalibrator2.
    return write_trt_cache(path, ranges, algorithm="EntropyCalibration2")


def evaluate_engine(built, report: Report, onnx_path, data, shapes) -> dict:
    """Run a built TensorRT engine; compare with ONNX Runtime (optimized model) and the original."""
    from optimizer.engine import run_engine
    from optimizer.evaluate import compare_streams

    original, _ = load_model(report.model_path)
    optimized, _ = load_model(onnx_path)
    from calibration.sources import open_source

    specs = input_specs(optimized)
    source = open_source(data, specs, shapes=shapes or {}, synthetic_samples=8, seed=1)
    batches = list(source.batches(specs, 32))
    outputs, latency = run_engine(built.path, batches)
    info = built.to_dict()
    info["latency_ms"] = latency
    info["accuracy"] = {
        "vs_onnxruntime": {m.name: m.to_dict() for m in compare_streams(OrtRunner(optimized), batches, outputs)},
        "vs_original": {m.name: m.to_dict() for m in compare_streams(OrtRunner(original), batches, outputs)},
    }
    return info
