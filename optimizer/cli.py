"""The ``optimize`` command.

Exit codes: 0 success; 1 a pass failed verification or an accuracy bound was broken; 2 bad usage or
bad input. User mistakes get one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import sys
import textwrap
from pathlib import Path

from optimizer.errors import OptimizerError

log = logging.getLogger("optimizer")

EXAMPLES = """\
examples:
  optimize model.onnx                                  # default preset, writes model.opt.onnx
  optimize model.onnx -o out.onnx --passes "cleanup,fold-constants,fuse-conv-bn"
  optimize model.onnx --data eval.npz --report report.md
  optimize model.onnx --shapes input:1x3x224x224 --json
  optimize --list-passes
  optimize check model.onnx --preset int8 --calib calib.npz --data eval.npz --baseline base.json
  optimize check-trt model.opt.onnx
  optimize model.pt2 --int8 --calib calib.npz         # a torch.export program (torch.export.save)
  optimize inspect model.onnx --json                   # what is in the model, what the passes would do
  optimize model.onnx --int8 --calib calib.npz --workers 2   # calibration sharded on a local Ray cluster
  optimize batch models/ -o out/ --int8               # every .onnx in a folder (or a TOML manifest)
"""


def build_parser() -> argparse.ArgumentParser:
    from optimizer.pipeline import PRESETS

    parser = argparse.ArgumentParser(
        prog="optimize",
        description="Optimize an ONNX model for TensorRT and ONNX Runtime with verified passes.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", help="input ONNX model, or a torch.export program (.pt2) (never modified)")
    parser.add_argument("-o", "--output", help="output model (default: <model>.opt.onnx beside the input)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--passes", metavar="TEXT", help='pipeline text, e.g. "cleanup,fold-constants,fuse-conv-bn"')
    group.add_argument("--preset", choices=sorted(PRESETS), help="named pipeline (default: default)")
    parser.add_argument("--data", metavar="X.npz", help="evaluation data: arrays by input name, optional 'labels'")
    parser.add_argument(
        "--shapes", action="append", metavar="NAME:DIMS",
        help="shape for a dynamic input, e.g. input:1x3x224x224 (or name:min/opt/max); repeatable",
    )
    precision = parser.add_argument_group("precision (appended to the pipeline)")
    precision.add_argument("--int8", action="store_true", help="quantize to INT8 with explicit Q/DQ, per-channel weights")
    precision.add_argument("--fp16", action="store_true", help="convert to FP16 where safe")
    precision.add_argument("--fp8", action="store_true",
                           help="quantize to FP8 (E4M3) with explicit Q/DQ, per-channel weights (opset 19; Ada/Hopper/Blackwell)")
    precision.add_argument("--int4", action="store_true",
                           help="INT4 block-wise weight-only quantization of MatMul/Gemm weights (opset 21)")
    precision.add_argument("--bf16", action="store_true", help="convert to BF16 where the op allows it (float32's range)")
    precision.add_argument("--calib", metavar="DATA",
                           help="calibration data (.npz, .npy, a folder of .npy files or of images) for INT8 ranges, "
                                "FP16 activation ranges and pruning's bias compensation")
    precision.add_argument("--calib-method", default="auto",
                           choices=("auto", "minmax", "percentile", "entropy", "mse", "sqnr"),
                           help="range method for --int8/--fp8 (default auto: every method is tried and the one whose "
                                "model agrees best with the float model on held-out samples is kept)")
    precision.add_argument("--metric", metavar="NAME|module:function",
                           help="task metric in points, higher is better: top1, top5, argmax-agreement, cosine, sqnr, or "
                                "your function f(outputs, reference, labels) (used by the report, --calib-method auto "
                                "and --max-accuracy-drop)")
    precision.add_argument("--max-accuracy-drop", type=float, metavar="POINTS",
                           help="accuracy budget: fall back the most sensitive layers to float until the drop fits")
    precision.add_argument("--range-cache", metavar="FILE",
                           help="JSON range cache: reuse ranges without recalibrating (written when missing)")
    precision.add_argument("--calib-cache", metavar="FILE",
                           help="also write a TensorRT calibration cache (for implicit INT8 on TensorRT 10)")
    engine = parser.add_argument_group("TensorRT engine")
    engine.add_argument("--save-engine", metavar="FILE", help="build a serialized engine from the optimized model")
    engine.add_argument("--backend", choices=("tensorrt", "tensorrt-rtx"), default="tensorrt",
                        help="tensorrt (GPU, TensorRT 10/11) or tensorrt-rtx (ahead-of-time, no GPU needed)")
    engine.add_argument("--compute-capability", default="SM89", help="target GPU for --backend tensorrt-rtx (default SM89)")
    engine.add_argument("--weakly-typed", action="store_true",
                        help="TensorRT 10: weakly typed network with --fp16/--int8 builder flags instead of the model's types")
    engine.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache to load and update")
    engine.add_argument("--workspace", type=int, metavar="MB", help="builder workspace limit in MiB")
    engine.add_argument("--check-trt", action="store_true",
                        help="report, per node, whether TensorRT-RTX's ONNX parser supports the optimized model")
    add_scale_arguments(parser)
    parser.add_argument("--input-layout", choices=("keep", "nchw"), default="keep",
                        help="nchw: a channel-last model's inputs/outputs become NCHW (layout-nchw(io=nchw))")
    parser.add_argument("--verify", choices=("numeric", "structural", "off"), default="numeric",
                        help="check after every pass (default: numeric)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a pass fails verification (default: roll it back, warn, and go on)")
    parser.add_argument("--keep-going", action="store_true",
                        help="(the default now: a failing pass is rolled back; kept for old scripts)")
    parser.add_argument("--static-shapes", action="store_true",
                        help="bake the resolved input shapes into the model (so fold-shapes can fold them); "
                             "default: the optimized model keeps the original's dynamic dims")
    parser.add_argument("--no-eval", action="store_true", help="skip the accuracy evaluation at the end")
    parser.add_argument("--report", action="append", metavar="FILE", help="write the report (.json, .md or .html); repeatable")
    parser.add_argument("--json", action="store_true", help="print the JSON report on stdout and nothing else")
    parser.add_argument("--list-passes", action="store_true", help="list the passes with their help and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    return parser


def add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    """Issue 14: where independent work runs, and the calibration batch size."""
    scale = parser.add_argument_group("scale-out (the model written is identical either way)")
    scale.add_argument("--calib-batch-size", type=int, metavar="N",
                       help="calibration samples read at a time (default 16; changes speed and memory, never the ranges)")
    where = scale.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N", help="start a local Ray cluster of N workers for this run")
    where.add_argument("--ray", metavar="ADDRESS",
                       help="join a Ray cluster: host:port, or auto (RAY_ADDRESS, or one started with `ray start`)")


def executor_from_args(args: argparse.Namespace):
    """A ``RayExecutor`` for --workers/--ray, else None (in-process); ``InputError`` with the
    install hint when Ray is missing. The caller closes it."""
    from optimizer.errors import InputError

    if args.calib_batch_size is not None and args.calib_batch_size < 1:
        raise InputError(f"--calib-batch-size must be a positive integer, got {args.calib_batch_size}")
    if args.workers is None and args.ray is None:
        return None
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be a positive integer, got {args.workers}")
    from optimizer.ray_executor import RayExecutor

    return RayExecutor(address=args.ray, workers=args.workers)


def list_passes() -> str:
    from optimizer.pipeline import PRESETS
    from optimizer.registry import available_passes

    out = []
    for name, cls in available_passes().items():
        options = ", ".join(f"{f.name}={f.default!r}" for f in cls.option_fields() if f.default is not dataclasses.MISSING)
        out.append(f"{name}{' (lossy)' if cls.lossy else ''}" + (f"  [{options}]" if options else ""))
        out.append(textwrap.indent(inspect.cleandoc(cls.__doc__ or ""), "    "))
        out.append("")
    out.append("presets:")
    out += [f"  {k}: {v or '(empty)'}" for k, v in PRESETS.items()]
    return "\n".join(out)


def _progress_factory(enabled: bool):
    """Progress bars on stderr for long work; silent with --json or when not a terminal."""
    if not enabled:
        return None
    from rich.progress import Progress

    def factory(description: str, total: int | None):
        progress = Progress(transient=True)
        progress.start()
        task = progress.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            progress.advance(task, n)
            if total is not None and progress.tasks[0].completed >= total:
                progress.stop()

        return advance

    return factory


def build_check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimize check",
        description="Fail (exit 1) when an optimized model breaks accuracy/compression bounds.",
        epilog="examples:\n  optimize check model.onnx --preset int8 --calib calib.npz --data eval.npz "
        "--baseline tests/baselines/model.int8.json\n  optimize check model.onnx --optimized model.opt.onnx "
        "--data eval.npz --min-cosine 0.999\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="the original ONNX model")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--passes", metavar="TEXT", help="pipeline to run (default: the baseline's, else default)")
    source.add_argument("--preset", help="named pipeline")
    source.add_argument("--optimized", metavar="FILE", help="an already optimized model to check instead")
    parser.add_argument("--data", metavar="X.npz", help="evaluation data (with optional labels)")
    parser.add_argument("--calib", metavar="DATA", help="calibration data for quantization passes")
    parser.add_argument("--shapes", action="append", metavar="NAME:DIMS", help="shapes for dynamic inputs")
    parser.add_argument("--baseline", metavar="REPORT.json", help="a previous JSON report to compare with")
    parser.add_argument("--max-accuracy-drop", type=float, metavar="POINTS", help="points the metric may lose")
    parser.add_argument("--min-cosine", type=float, help="minimum cosine similarity of every output")
    parser.add_argument("--min-compression", type=float, help="minimum compression (original / optimized bytes)")
    parser.add_argument("--bisect", action="store_true", help="on failure, find the first pass that breaks a bound")
    parser.add_argument("--metric", metavar="NAME|module:function", help="task metric the accuracy bound applies to")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_scale_arguments(parser)
    return parser


def check_main(argv: list[str]) -> int:
    """``optimize check``: 0 when every bound holds, 1 when one breaks, 2 for bad input."""
    from optimizer.pipeline import PRESETS
    from optimizer.regression import check_regression

    parser = build_check_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    _quiet_graphsurgeon()
    pipeline = args.passes or (PRESETS[args.preset] if args.preset in PRESETS else args.preset)
    executor = None
    try:
        executor = executor_from_args(args)
        result = check_regression(
            args.model, pipeline, optimized=args.optimized, data=args.data, shapes=args.shapes,
            calibration=args.calib, baseline=args.baseline, max_accuracy_drop=args.max_accuracy_drop,
            min_cosine=args.min_cosine, min_compression=args.min_compression, bisect=args.bisect, metric=args.metric,
            executor=executor, calib_batch_size=args.calib_batch_size,
        )
    except OptimizerError as exc:
        print(f"optimize check: error: {exc}", file=sys.stderr)
        return 2 if exc.exit_code == 2 else 1
    finally:
        if executor is not None:
            executor.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.diff())
        print("PASS" if result.ok else "FAIL")
    return 0 if result.ok else 1


def check_trt_main(argv: list[str]) -> int:
    """``optimize check-trt``: per-node TensorRT-RTX parser support; exit 1 if a node is unsupported."""
    parser = argparse.ArgumentParser(prog="optimize check-trt", description=check_trt_main.__doc__)
    parser.add_argument("model")
    parser.add_argument("--shapes", action="append", metavar="NAME:DIMS")
    parser.add_argument("--compute-capability", default="SM89")
    parser.add_argument("--build", action="store_true", help="also build an engine (ahead of time, no GPU needed)")
    parser.add_argument("--json", action="store_true")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    from optimizer.tensorrt_rtx import check_model

    try:
        result = check_model(args.model, build=args.build, shapes=_shapes(args), compute_capability=args.compute_capability)
    except OptimizerError as exc:
        print(f"optimize check-trt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for node in result.unsupported:
            print(f"UNSUPPORTED {node.name} ({node.op_type}{'/' + node.domain if node.domain else ''}): {node.reason}")
        for error in result.errors:
            print(f"error: {error}")
        status = "parsed" if result.parsed else "failed to parse"
        built = f", engine built ({result.engine_bytes:,} bytes)" if result.built else ""
        print(f"{args.model}: {status}, {len(result.unsupported)} unsupported node(s){built}")
    return 0 if result.parsed and not result.unsupported and (result.built or not args.build) else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``optimize`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "check":
        return check_main(argv[1:])
    if argv and argv[0] == "check-trt":
        return check_trt_main(argv[1:])
    if argv and argv[0] == "inspect":
        from optimizer import inspect as model_inspect

        return model_inspect.inspect_main(argv[1:])
    if argv and argv[0] == "batch":
        from optimizer.batch import batch_main

        return batch_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage; normalise the code to 2
        return 0 if exc.code == 0 else 2
    # Warnings reach the user through the report (and one summary line for rollbacks), so the
    # library's log lines and numpy's RuntimeWarnings stay off stderr unless -v asks for them.
    logging.captureWarnings(True)
    logging.basicConfig(
        level=(logging.ERROR, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
        _quiet_graphsurgeon()
    if args.list_passes:
        print(list_passes())
        return 0
    if not args.model:
        parser.print_usage(sys.stderr)
        print("optimize: error: a model file is required (or --list-passes)", file=sys.stderr)
        return 2
    try:
        return _run_pt2(args) if str(args.model).lower().endswith(".pt2") else _run(args)
    except OptimizerError as exc:
        print(f"optimize: error: {exc}", file=sys.stderr)
        report = exc.report
        if report is not None:
            _emit_report(report, args)
        return exc.exit_code
    except KeyboardInterrupt:
        print("optimize: interrupted", file=sys.stderr)
        return 130


def _quiet_graphsurgeon() -> None:
    try:
        from onnx_graphsurgeon.logger import G_LOGGER

        G_LOGGER.severity = G_LOGGER.CRITICAL  # it prints to stdout, which --json owns
    except Exception:  # pragma: no cover - logger layout differs between versions
        pass


def pipeline_from_args(args: argparse.Namespace):
    """The pipeline: --passes or --preset, then the precision passes asked for by flags, with
    ``layout-nchw`` switched to NCHW inputs/outputs by ``--input-layout nchw``."""
    from optimizer.pipeline import PRECISION_STEPS, PRESETS, iter_passes, parse_pipeline

    base = args.passes if args.passes is not None else PRESETS[args.preset or "default"]
    present = list(iter_passes(parse_pipeline(base)))
    flags = {type(p).precision_flag for p in present}
    wanted = [flag for flag in PRECISION_STEPS if getattr(args, flag, False) and flag not in flags]
    names = {p.name for p in present}
    # a flag's steps that the pipeline already has (e.g. its own upgrade-opset) are not added twice
    extra = [q for flag in wanted for q in parse_pipeline(PRECISION_STEPS[flag]) if q.name not in names]
    steps = parse_pipeline(base) + extra
    if args.input_layout == "nchw" and not any(type(p).sets_io_layout for p in iter_passes(steps)):
        from optimizer.errors import PipelineError

        raise PipelineError("--input-layout nchw needs layout-nchw in the pipeline (it is in the default preset)")

    def override(p):
        """Flag overrides through ``dataclasses.replace``, so each pass's option checks run again."""
        changes = {}
        if type(p).calibrates_ranges:
            if args.int8 or args.fp8 or args.calib_method != "auto":
                changes["method"] = args.calib_method
            if args.range_cache:
                changes["range_cache"] = args.range_cache
        if type(p).sets_io_layout and args.input_layout == "nchw":
            changes["io"] = "nchw"
        return dataclasses.replace(p, **changes) if changes else p

    return map_passes(steps, override)


def map_passes(steps, function):
    """``steps`` with every pass replaced by ``function(pass)`` (fixed-point groups kept)."""
    from optimizer.pipeline import FixedPoint

    return [FixedPoint(map_passes(s.steps, function), s.max_iterations) if isinstance(s, FixedPoint) else function(s)
            for s in steps]


def _run(args: argparse.Namespace) -> int:
    from optimizer.api import default_output, optimize

    output = Path(args.output) if args.output else default_output(args.model)
    interactive = not args.json and sys.stderr.isatty()
    from optimizer.pipeline import iter_passes

    from optimizer.registry import available_passes

    steps = pipeline_from_args(args)
    passes = [type(p) for p in iter_passes(steps)]
    if args.calib_cache and not any(p.calibrates_ranges for p in passes):
        print("optimize: error: --calib-cache needs --int8 (or a pipeline with a pass that calibrates activation ranges)",
              file=sys.stderr)
        return 2
    if args.calib and not any(p.uses_calibration for p in passes):
        users = ", ".join(name for name, cls in available_passes().items() if cls.uses_calibration)
        print(f"optimize: error: --calib needs --int8, --fp8, --int4, --fp16 or a pipeline with a pass that calibrates ({users})",
              file=sys.stderr)
        return 2
    executor = executor_from_args(args)
    try:
        result = _optimize_with(optimize, executor, args, steps, output, interactive)
    finally:
        if executor is not None:
            executor.close()
    report = result.report
    args.resolved_shapes = result.shapes
    return _finish(args, report, result, output)


def _optimize_with(optimize, executor, args, steps, output, interactive):
    return optimize(
        args.model,
        steps,
        output=output,
        data=args.data,
        shapes=args.shapes,
        calibration=args.calib,
        verify=args.verify,
        strict=args.strict,
        static_shapes=args.static_shapes,
        evaluate_accuracy=not args.no_eval,
        max_accuracy_drop=args.max_accuracy_drop,
        progress=_progress_factory(interactive),
        metric=args.metric,
        executor=executor,
        calib_batch_size=args.calib_batch_size,
    )


def _finish(args: argparse.Namespace, report, result, output: Path) -> int:
    if getattr(args, "pt2", None) is not None:  # optimize model.pt2: the PyTorch comparison
        args.pt2.annotate(report, result.model, args.data)
    code = 1 if report.status == "accuracy_failed" else 0
    if report.rolled_back:
        undone = "; ".join(f"{r['pass']}: {r['why'][:160]}" for r in report.rolled_back[:3])
        more = f" (+{len(report.rolled_back) - 3} more)" if len(report.rolled_back) > 3 else ""
        print(f"optimize: warning: {len(report.rolled_back)} pass run(s) rolled back, the rest of the pipeline ran: "
              f"{undone}{more}", file=sys.stderr)
    if args.calib_cache:
        from optimizer.api import write_trt_calibration_cache

        write_trt_calibration_cache(report, args.calib_cache)
    if args.check_trt:
        from optimizer.tensorrt_rtx import check_model

        report.trt_check = check_model(output, build=False, shapes=_engine_shapes(args, output)).to_dict()
    if args.save_engine and code == 0:
        code = _build_engine(args, output, report)
    report.model_path = getattr(args, "source_model", None) or report.model_path
    _emit_report(report, args)
    if code == 2:
        print(f"optimize: error: {report.engine['error']}", file=sys.stderr)
    elif report.status == "accuracy_failed":
        print(f"optimize: error: {report.error}", file=sys.stderr)
    return code


def _run_pt2(args: argparse.Namespace) -> int:
    """``optimize model.pt2``: a ``torch.export.save`` program, exported to ONNX in a temporary
    folder (``optimizer.pytorch``), then the same run as for an ONNX model."""
    import tempfile

    from optimizer.pytorch import pt2_session

    source = Path(args.model)
    with tempfile.TemporaryDirectory(prefix="onnx-trt-optimizer-pt2-") as scratch:
        args.pt2 = pt2_session(source, Path(scratch))
        args.output = args.output or str(source.with_suffix(".opt.onnx"))
        args.model, args.source_model = str(args.pt2.exported.path), str(source)
        try:
            return _run(args)
        except OptimizerError as exc:
            if exc.report is not None:
                exc.report.model_path = str(source)
            raise


def _shapes(args: argparse.Namespace):
    from calibration.data import parse_shapes

    return parse_shapes(args.shapes) or None


def _engine_shapes(args: argparse.Namespace, onnx_path: Path):
    """The engine's profile: ``--shapes`` when given, else the shapes the run resolved (a dynamic
    batch spans 1..8, other dims fixed at their resolved size; ``calibration.shapes.engine_profile``)."""
    given = _shapes(args)
    plan = getattr(args, "resolved_shapes", None)
    if given or plan is None:
        return given
    import onnx

    from calibration.shapes import engine_profile
    from optimizer.runtime import input_specs

    return engine_profile(plan, input_specs(onnx.load(str(onnx_path), load_external_data=False))) or None


def _build_engine(args: argparse.Namespace, onnx_path: Path, report) -> int:
    """Build the engine after the ONNX model is saved; a missing TensorRT/GPU is exit code 2."""
    if args.backend == "tensorrt-rtx":
        from optimizer.tensorrt_rtx import check_model

        checked = check_model(
            onnx_path, build=True, shapes=_engine_shapes(args, onnx_path), compute_capability=args.compute_capability,
            save_engine=args.save_engine, workspace_mb=args.workspace,
        )
        report.engine = {"backend": "tensorrt-rtx", **checked.to_dict(), "ran": False,
                         "note": "TensorRT-RTX engines are built ahead of time; running them needs an RTX GPU"}
        if not checked.built:
            report.engine["error"] = "TensorRT-RTX could not build the engine: " + "; ".join(checked.errors[:3])
            report.status = "engine_failed"
            return 1
        return 0
    from optimizer.engine import EngineUnavailableError, build_engine

    import onnx

    metadata = {p.key for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    try:
        built = build_engine(
            onnx_path, args.save_engine, shapes=_engine_shapes(args, onnx_path), strongly_typed=not args.weakly_typed,
            sparsity="sparsity.2to4" in metadata,  # layers made 2:4-sparse by sparsify-2to4
            fp16=args.weakly_typed and args.fp16, int8=args.weakly_typed and args.int8,
            calibration_cache=args.calib_cache, timing_cache=args.timing_cache, workspace_mb=args.workspace,
        )
    except EngineUnavailableError as exc:
        report.engine = {"backend": "tensorrt", "error": str(exc)}
        return 2
    from optimizer.api import evaluate_engine

    plan = getattr(args, "resolved_shapes", None)
    report.engine = evaluate_engine(built, report, onnx_path, args.data, plan.shapes if plan is not None else _shapes(args))
    return 0


def _emit_report(report, args: argparse.Namespace) -> None:
    for path in args.report or []:
        report.save(path)
    if args.json:
        print(report.to_json())
    else:
        from rich.console import Console

        # A pipe or CI log has no terminal width: use a wide console so the table is not truncated.
        report.print_table(Console(highlight=False, width=None if sys.stdout.isatty() else 160))
        if report.output_path:
            print(f"wrote {report.output_path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
