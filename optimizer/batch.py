"""``optimize batch SOURCE -o OUTDIR [options]``: optimize a fleet of models, one task per model.

SOURCE is a folder of ``.onnx`` files (each optimized with the same options, the ones after
SOURCE) or a TOML manifest listing models with their own data, precision and options::

    [defaults]                 # optional: options every model gets
    args = ["--calib-method", "minmax"]

    [[model]]
    path = "resnet.onnx"       # relative paths are relative to the manifest
    calib = "resnet_calib.npz" # --calib
    data = "resnet_eval.npz"   # --data
    precision = "int8"         # --int8 (int8, fp8, fp16, int4, bf16)
    args = ["--max-accuracy-drop", "1"]
    name = "resnet-int8"       # output name (default: the file's stem)

Each model becomes ``OUTDIR/<name>.opt.onnx`` and ``OUTDIR/<name>.report.json``, exactly as
``optimize MODEL -o ... --report ...`` would write them; ``OUTDIR/summary.json`` and a table list
every model's status, exit code, size, accuracy and time. A failing model never stops the others;
the exit code is 1 when some model failed, else 0. With ``--workers N`` / ``--ray ADDRESS`` the
models run as Ray tasks (each model's own work then runs in-process in its task).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from optimizer.errors import InputError, OptimizerError

PRECISIONS = ("int8", "fp8", "fp16", "int4", "bf16")


@dataclass
class BatchItem:
    """One model of the fleet: its path, output name and ``optimize`` arguments."""

    path: str
    name: str
    args: list[str] = field(default_factory=list)


@dataclass
class BatchResult:
    """What one model's task reports back."""

    name: str
    model: str
    status: str  # ok | failed
    exit_code: int
    output: str | None = None
    report: str | None = None
    error: str = ""
    time_s: float = 0.0
    bytes_before: int | None = None
    bytes_after: int | None = None
    accuracy: float | None = None
    metric: str | None = None


def load_items(source: Path, shared: list[str]) -> list[BatchItem]:
    """The models of a folder (shared options) or of a TOML manifest (per-model options)."""
    if source.is_dir():
        models = sorted(p for p in source.iterdir() if p.suffix.lower() == ".onnx" and p.is_file())
        if not models:
            raise InputError(f"{source}: holds no .onnx files")
        return [BatchItem(str(p), p.stem, list(shared)) for p in models]
    if source.suffix.lower() != ".toml" or not source.is_file():
        raise InputError(f"{source}: expected a folder of .onnx files or a .toml manifest")
    import tomllib

    try:
        manifest = tomllib.loads(source.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{source}: not valid TOML: {exc}") from None
    defaults = manifest.get("defaults", {})
    entries = manifest.get("model", [])
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{source}: lists no models (add [[model]] tables with a path)")
    base = source.parent
    items, names = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "path" not in entry:
            raise InputError(f"{source}: model #{i + 1} has no path")
        unknown = set(entry) - {"path", "name", "calib", "data", "precision", "args"}
        if unknown:
            raise InputError(f"{source}: model #{i + 1} has unknown key(s) {', '.join(sorted(unknown))}")
        path = base / entry["path"]
        args = [str(a) for a in defaults.get("args", [])] + list(shared)
        for key in ("calib", "data"):
            if key in entry:
                args += [f"--{key}", str(base / entry[key])]
        if "precision" in entry:
            if entry["precision"] not in PRECISIONS:
                raise InputError(f"{source}: model #{i + 1}: precision must be one of {', '.join(PRECISIONS)}")
            args.append(f"--{entry['precision']}")
        args += [str(a) for a in entry.get("args", [])]
        name = str(entry.get("name") or path.stem)
        while name in names:
            name += f"-{i + 1}"
        names.add(name)
        items.append(BatchItem(str(path), name, args))
    return items


def run_item(item: BatchItem, outdir: str) -> BatchResult:
    """Optimize one model with the ``optimize`` command's own code path; never raises."""
    from optimizer.cli import main

    out = Path(outdir)
    output, report = out / f"{item.name}.opt.onnx", out / f"{item.name}.report.json"
    start = time.perf_counter()
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main([item.path, "-o", str(output), "--report", str(report), *item.args])
    except Exception as exc:  # a crash in one model must not stop the fleet
        code, stderr = 1, io.StringIO(f"optimize: internal error: {type(exc).__name__}: {exc}")
    result = BatchResult(item.name, item.path, "ok" if code == 0 else "failed", code, time_s=time.perf_counter() - start)
    errors = [line for line in stderr.getvalue().splitlines() if "error" in line]
    result.error = errors[-1] if errors else ("" if code == 0 else stderr.getvalue().strip()[-300:])
    if output.exists() and code == 0:
        result.output = str(output)
    if report.exists():
        result.report = str(report)
        data = json.loads(report.read_text())
        summary = data.get("summary", {}).get("model_bytes", {})
        result.bytes_before, result.bytes_after = summary.get("before"), summary.get("after")
        task = (data.get("accuracy") or {}).get("task") or {}
        if task:
            result.accuracy, result.metric = task.get("optimized"), task.get("metric")
    return result


def run_batch(items: list[BatchItem], outdir: Path, executor=None) -> list[BatchResult]:
    """One task per model on ``executor`` (in-process by default)."""
    from calibration.executor import InProcessExecutor

    outdir.mkdir(parents=True, exist_ok=True)
    executor = executor or InProcessExecutor()
    return executor.map(run_item, [(item, str(outdir)) for item in items], stage="batch")


def summary_table(results: list[BatchResult]) -> str:
    rows = [("model", "status", "exit", "MB before", "MB after", "accuracy", "time s", "error")]
    for r in results:
        mb = lambda b: f"{b / 1e6:.2f}" if b else "-"  # noqa: E731
        rows.append((r.name, r.status, str(r.exit_code), mb(r.bytes_before), mb(r.bytes_after),
                     f"{r.accuracy:.2f}" if r.accuracy is not None else "-", f"{r.time_s:.1f}", r.error[:80]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def batch_main(argv: list[str]) -> int:
    """``optimize batch``: exit 0 when every model was optimized, 1 when some failed, 2 for bad usage."""
    from optimizer.cli import add_scale_arguments, executor_from_args

    parser = argparse.ArgumentParser(prog="optimize batch",
                                     description="Optimize a fleet of models, one task per model: a folder of .onnx files "
                                                 "(shared options) or a TOML manifest (per-model data, precision, options).",
                                     epilog="Options after SOURCE that this command does not know are passed to every "
                                            "model's `optimize` run (e.g. --int8 --calib-method minmax).")
    parser.add_argument("source", help="a folder of .onnx files, or a .toml manifest")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the outputs and reports")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_scale_arguments(parser)
    try:
        args, shared = parser.parse_known_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    executor = None
    try:
        if args.calib_batch_size is not None:
            shared += ["--calib-batch-size", str(args.calib_batch_size)]
        items = load_items(Path(args.source), shared)
        executor = executor_from_args(args)
        start = time.perf_counter()
        results = run_batch(items, Path(args.output), executor)
        wall = time.perf_counter() - start
    except OptimizerError as exc:
        print(f"optimize: error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if executor is not None:
            executor.close()
    failed = [r for r in results if r.status != "ok"]
    summary = {"source": args.source, "output": args.output, "models": len(results), "failed": len(failed),
               "wall_s": round(wall, 3), "executor": executor.describe() if executor is not None else {"name": "in-process", "workers": 1},
               "results": [asdict(r) for r in results]}
    (Path(args.output) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(summary_table(results))
        print(f"{len(results) - len(failed)} of {len(results)} model(s) optimized in {wall:.1f} s; "
              f"summary: {Path(args.output) / 'summary.json'}")
    for r in failed:
        print(f"optimize batch: {r.name} failed: {r.error}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["BatchItem", "BatchResult", "batch_main", "load_items", "run_batch", "run_item"]
