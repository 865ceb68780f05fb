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
from optimizer.runtime import REPRODUCIBLE_THREADS, OrtRunner, Sessions, input_specs
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


def record_executor(report: Report, executor) -> None:
    """The report's ``executor``: its name, workers (for Ray the cluster's nodes and CPUs) and per
    stage tasks and times."""
    describe = getattr(executor, "describe", None)
    report.executor = describe() if callable(describe) else {"name": executor.name, "workers": executor.workers}


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
    from calibration.executor import InProcessExecutor, check_calib_batch_size

    start = time.perf_counter()
    calib_batch_size = check_calib_batch_size(calib_batch_size)
    executor = executor if executor is not None else InProcessExecutor()
    loaded_metric = load_metric(metric)
    original, source = load_model(model)
    input_warnings = validate_model(original, source.path)
    if lossy_finite_only is None:
        lossy_finite_only = max_accuracy_drop is not None
    specs = input_specs(original)
    given = _given_shapes(shapes, specs)
    # ONNX Runtime sessions and outputs shared by every stage below; one thread, as calibration and
    # evaluation shards use, so outputs (and metrics) do not depend on where they were computed
    sessions = Sessions(threads=REPRODUCIBLE_THREADS)
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
                      metric=loaded_metric[1] if loaded_metric else None, executor=executor,
                      calib_batch_size=calib_batch_size, sessions=sessions)
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
        record_executor(report, executor)
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
                                note=samples.note, batch_size=_evaluation_batch_size(prepared), metric=loaded_metric,
                                executor=executor, sessions=sessions)
            budget = _budget_to_fit(manager.steps, result.records, max_accuracy_drop)
            if budget is not None:
                accuracy = _fit_budget(budget, original, manager, ctx, samples, plan, result, accuracy, report,
                                       loaded_metric, static_shapes, executor)
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
    record_executor(report, executor)
    return OptimizeResult(result.model, report, plan)


#: A pass's accuracy floor is a default nobody asked for, so its cost stays bounded: ranking layers
#: one model each (fewer fallbacks: on the zoo's ViT 2 instead of 6) costs a quantize and a run
#: per layer (about 1.5 s per layer on a 55 MB BERT), so above this many layers they are ranked by
#: local SQNR instead, at no cost. An explicit --max-accuracy-drop always ranks one by one.
FLOOR_RANK_ALONE_MAX = 48


@dataclass(frozen=True)
class _Budget:
    """An accuracy budget to fit: the user's ``--max-accuracy-drop``, or a pass's accuracy floor."""

    drop: float
    floor_of: str = ""  # the pass whose accuracy floor this is; empty: the user's budget
    floor: float | None = None


def _budget_to_fit(steps, records, max_accuracy_drop: float | None) -> _Budget | None:
    """The user's budget if given; else the highest accuracy floor of a tunable pass that changed
    the model (e.g. quantize-fp8's ``min_cosine``), as a drop in cosine points; else None."""
    if max_accuracy_drop is not None:
        return _Budget(max_accuracy_drop)
    changed = {r.name for r in records if r.changed and not r.rolled_back}
    floors = [(p.accuracy_floor(), p.name) for p in iter_passes(steps)
              if type(p).tunable and p.name in changed and p.accuracy_floor() is not None]
    if not floors:
        return None
    floor, name = max(floors)
    return _Budget(100.0 * (1.0 - floor), floor_of=name, floor=floor)


def _fit_budget(budget: _Budget, original, manager, ctx, samples, plan, result, accuracy, report, loaded_metric,
                static_shapes: bool, executor=None):
    """Return layers to float until ``budget`` holds; update ``result`` and ``report``; the accuracy."""
    from optimizer.budget import fit_budget, floor_metric, metric_of

    measure = floor_metric if budget.floor_of else metric_of
    fitted = fit_budget(original, manager.steps, ctx, budget.drop, samples.evaluation, plan.shapes,
                        result, accuracy, metric=loaded_metric, executor=executor, measure=measure,
                        rank_alone_max=FLOOR_RANK_ALONE_MAX if budget.floor_of else None)
    result.model, result.records = fitted.model, fitted.records
    if not static_shapes:
        restore_dynamic_dims(original, result.model)
    report.passes = result.records
    report.optimized = model_stats(result.model)
    report.budget = {
        "max_accuracy_drop": round(budget.drop, 6),
        "metric": fitted.metric,
        "drop": round(fitted.drop, 4),
        "met": fitted.met,
        "fallbacks": [vars(f) for f in fitted.fallbacks],
        "sensitivity": {k: round(v, 4) for k, v in fitted.sensitivity.items()},
        "evaluations": fitted.evaluations,
        "ranking": fitted.ranking,
    }
    if budget.floor_of:
        report.budget["floor"] = {"pass": budget.floor_of, "min_cosine": budget.floor}
        if not fitted.met:
            report.warnings.append(
                f"{budget.floor_of}: output cosine {1 - fitted.drop / 100:.5f} stays below its accuracy floor "
                f"{budget.floor} even with every quantized layer in float (other lossy passes cost the rest)")
    elif not fitted.met:
        report.status = "accuracy_failed"
        report.error = (
            f"{fitted.metric} dropped {fitted.drop:.2f} points, more than --max-accuracy-drop "
            f"{budget.drop}, even with {len(fitted.fallbacks)} layer(s) in float"
        )
    return fitted.accuracy


@dataclass
class EvaluationInputs:
    """What ``optimize`` evaluates a model on (``plan_evaluation``): the samples, shapes, batch
    size and note, and the original model's outputs on them when they fit in memory."""

    source: object
    shapes: dict
    batch_size: int
    note: str
    reference: object = None  # optimizer.evaluate.ReferenceOutputs


def plan_evaluation(original: onnx.ModelProto, data=None, shapes=None, calibration=None) -> EvaluationInputs | None:
    """The evaluation ``optimize(original, ..., data=, shapes=, calibration=)`` runs at its end,
    planned once for searches that evaluate many candidates (None when it would not evaluate)."""
    from optimizer.evaluate import reference_outputs

    specs = input_specs(original)
    prepared = prepare(original, specs, _given_shapes(shapes, specs), data=data, calib=calibration)
    if prepared.samples is None or not prepared.loadable:
        return None
    samples, size = prepared.samples, _evaluation_batch_size(prepared)
    reference = reference_outputs(original, samples.evaluation, prepared.shapes.shapes, batch_size=size)
    return EvaluationInputs(samples.evaluation, prepared.shapes.shapes, size, samples.note, reference)


def _evaluation_batch_size(prepared) -> int:
    return 1 if prepared.batch_size == 1 else 32


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
