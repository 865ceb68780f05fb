#!/usr/bin/env python
"""Benchmark ``optimize --preset default`` (and, with ``--compare``, onnxslim and onnxoptimizer).

For every sample model (``sample_models/*/model.onnx``), every zoo model (``sample_models/zoo/*.onnx``
with its ``.npz``), the larger models of ``bench/build_large.py`` (``--large``: ``bench/large/``,
built on first use) and every ``light_*.onnx`` shipped in the installed onnx wheel, each tool runs as a separate child process; we record the child's
whole-process wall time (Python start-up and imports included) and peak RSS (``ru_maxrss`` of
that process, read by ``/usr/bin/time -f '%e %M'`` or, without it, by a small ``os.wait4``
trampoline), the output's node count (subgraphs included) and size on disk, and its largest
relative error against the original model in ONNX Runtime on the CPU.

    python bench/bench.py                      # ours only
    python bench/bench.py --compare            # ours, onnxslim, onnxoptimizer
    python bench/bench.py --models digits_cnn light_resnet50 --out /tmp/r.md
    python bench/bench.py --compare --large --repeat 3   # + the > 5 MB models; median of 3 alternated runs

Our packages are byte-compiled before anything is timed, as pip compiles the other tools' at install
(``precompile_ours``; ``--no-precompile`` to time a from-source run).

This script only measures and reports: it never asserts on times. It deliberately imports nothing
from ``optimizer``/``passes``/``calibration`` (those are what it measures, as a black box through
the CLI); it needs onnx, onnxruntime and numpy.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ scripts share measure.py
from measure import ChildRun, _measured, iter_graphs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO / "sample_models"
ZOO_DIR = SAMPLES_DIR / "zoo"
LARGE_DIR = REPO / "bench" / "large"  # built by bench/build_large.py (not in the repository)
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
EVAL_SAMPLES = 8  # samples of eval.npz used for the cross-tool error measurement
SEED = 1  # same seed as the optimizer's own synthetic evaluation inputs
MAX_RUNTIME_IR = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14

TOOLS = ("ours", "onnxslim", "onnxoptimizer")

ONNXOPTIMIZER_SNIPPET = (
    "import sys, onnx, onnxoptimizer\n"
    "m = onnxoptimizer.optimize(onnx.load(sys.argv[1]))\n"
    f"m.ir_version = min(m.ir_version, {MAX_RUNTIME_IR})\n"
    "onnx.save(m, sys.argv[2])\n"
)


# -- models ------------------------------------------------------------------------------------
@dataclass
class BenchModel:
    name: str
    path: Path
    data: Path | None = None


def discover_models(large: bool = False) -> list[BenchModel]:
    models = []
    for path in sorted(SAMPLES_DIR.glob("*/model.onnx")):
        data = path.parent / "eval.npz"
        models.append(BenchModel(path.parent.name, path, data if data.is_file() else None))
    for path in sorted(ZOO_DIR.glob("*.onnx")):
        data = path.with_suffix(".npz")
        models.append(BenchModel(path.stem, path, data if data.is_file() else None))
    if large:
        for path in sorted(LARGE_DIR.glob("*.onnx")):
            data = path.with_suffix(".npz")
            models.append(BenchModel(path.stem, path, data if data.is_file() else None))
    for path in sorted(LIGHT_DIR.glob("light_*.onnx")):
        models.append(BenchModel(path.stem, path))
    return models


def select_models(wanted: list[str] | None, large: bool = False) -> list[BenchModel]:
    models = discover_models(large)
    if not wanted:
        return models
    chosen = []
    for item in wanted:
        if item.endswith(".onnx") and Path(item).is_file():  # any model file, given by path
            path = Path(item).resolve()
            data = path.parent / "eval.npz"
            chosen.append(BenchModel(path.stem if path.name != "model.onnx" else path.parent.name, path,
                                     data if data.is_file() else None))
            continue
        hits = [m for m in models if m.name == item] or [m for m in models if item in m.name]
        if not hits:
            sys.exit(f"bench: no model matches {item!r}; known: {', '.join(m.name for m in models)}")
        chosen += [m for m in hits if m not in chosen]
    return chosen


# -- child processes ---------------------------------------------------------------------------
def run_child(cmd: list[str], workdir: Path, timeout: float) -> ChildRun:
    """Run ``cmd``; wall time from spawn to reap, peak RSS of the command itself.

    The command runs under ``/usr/bin/time -f '%e %M'`` (GNU time forks it and reads
    ``wait4``'s rusage), or under a tiny Python trampoline doing the same with ``os.wait4``.
    """
    out_path, err_path, usage_path = workdir / "stdout.txt", workdir / "stderr.txt", workdir / "rusage.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    usage_path.unlink(missing_ok=True)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(_measured(cmd, usage_path), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=REPO, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the wrapper and the command: they are alone in this session
            proc.wait()
            timed_out = True
        wall = time.perf_counter() - start
    peak_mb = None
    try:
        fields = usage_path.read_text().split()
        peak_mb = int(fields[-1]) / 1024.0  # KiB on Linux
    except (OSError, ValueError, IndexError):
        pass
    returncode = proc.returncode
    stderr = err_path.read_text(errors="replace")
    return ChildRun(returncode, wall, peak_mb, out_path.read_text(errors="replace"), stderr, timed_out)


def one_line(text: str, limit: int = 160) -> str:
    """The most telling line of a failure message (last non-empty line, usually the exception)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else "no output"
    line = line.replace("|", "\\|")
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- measuring outputs -------------------------------------------------------------------------
def count_nodes(model: onnx.ModelProto) -> int:
    return sum(len(g.node) for g in iter_graphs(model.graph))


def files_bytes(directory: Path) -> int:
    """Size of a tool's output: the model file plus any external-data files next to it."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in shape.dim]


def bench_inputs(model: onnx.ModelProto, data: Path | None) -> tuple[dict[str, np.ndarray], str]:
    """Deterministic feeds: the first samples of eval.npz, else seeded random with dynamic dims = 1.

    The random recipe is the optimizer's own synthetic one (floats uniform in [-1, 1), integers
    in {0, 1}, seed 1), so for models without data every tool is judged on the same inputs.
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if data is not None:
        with np.load(data, allow_pickle=False) as npz:
            feeds = {}
            for v in inputs:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
                feeds[v.name] = npz[v.name][:EVAL_SAMPLES].astype(dtype)
        return feeds, f"first {EVAL_SAMPLES} samples of {data.relative_to(REPO)}"
    rng = np.random.default_rng(SEED)
    feeds = {}
    for v in inputs:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
        shape = _dims(v)
        if np.issubdtype(dtype, np.floating):
            feeds[v.name] = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[v.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            feeds[v.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds, f"seeded random (seed {SEED}, dynamic dims = 1)"


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run on the CPU with ONNX Runtime's own graph rewrites off (we judge the file, not ORT)."""
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.ir_version = min(model.ir_version, MAX_RUNTIME_IR)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in model.graph.output]
    return session.run(outputs, {n: feeds[n] for n in names})


def _is_flat(output: np.ndarray) -> bool:
    """Whether an output holds one value everywhere (then error checks on it prove little)."""
    a = np.asarray(output)
    if a.size <= 1 or not np.issubdtype(a.dtype, np.number):
        return False
    a = a.astype(np.float64)
    return bool(np.ptp(a) <= 1e-6 * max(float(np.max(np.abs(a))), 1e-30))


def max_rel_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """max over outputs of max|a - b| / max|ref| (exact-match check for non-float outputs)."""
    worst = 0.0
    for ref, new in zip(reference, candidate, strict=True):
        ref, new = np.asarray(ref), np.asarray(new)
        if ref.shape != new.shape:
            raise ValueError(f"output shape changed {ref.shape} -> {new.shape}")
        if not np.issubdtype(ref.dtype, np.floating):
            worst = max(worst, 0.0 if np.array_equal(ref, new) else float("inf"))
            continue
        r, n = ref.astype(np.float64), new.astype(np.float64)
        diff = float(np.max(np.abs(r - n))) if r.size else 0.0
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


# -- one tool on one model ---------------------------------------------------------------------
@dataclass
class ToolResult:
    nodes: int | None = None
    bytes: int | None = None
    wall_s: float | None = None
    peak_mb: float | None = None
    max_rel: float | None = None
    bench_rel: float | None = None  # ours only: error re-measured with this script's inputs
    failed: str | None = None
    notes: list[str] = field(default_factory=list)


def tool_command(tool: str, model: BenchModel, out: Path) -> list[str]:
    py = sys.executable
    if tool == "ours":
        cmd = [py, "-m", "optimizer.cli", str(model.path), "-o", str(out), "--preset", "default", "--json"]
        return cmd + (["--data", str(model.data)] if model.data else [])
    if tool == "onnxslim":
        return [py, "-m", "onnxslim", str(model.path), str(out)]
    if tool == "onnxoptimizer":
        return [py, "-c", ONNXOPTIMIZER_SNIPPET, str(model.path), str(out)]
    raise ValueError(tool)


def run_tool(tool: str, model: BenchModel, scratch: Path, reference, feeds, timeout: float) -> ToolResult:
    workdir = scratch / model.name / tool
    outdir = workdir / "out"
    outdir.mkdir(parents=True)
    out = outdir / "out.onnx"
    child = run_child(tool_command(tool, model, out), workdir, timeout)
    result = ToolResult(wall_s=child.wall_s, peak_mb=child.peak_mb)
    if child.timed_out:
        result.failed = f"timed out after {timeout:.0f} s"
        return result

    if tool == "ours":
        try:
            report = json.loads(child.stdout)
        except json.JSONDecodeError:
            result.failed = f"exit {child.returncode}: {one_line(child.stderr or child.stdout)}"
            return result
        summary = report["summary"]
        result.nodes = summary["nodes"]["after"]
        result.bytes = summary["model_bytes"]["after"]
        accuracy = report.get("accuracy") or {}
        rels = [m["max_rel"] for m in (accuracy.get("outputs") or {}).values()]
        result.max_rel = max(rels) if rels else None
        if report["status"] != "ok" or child.returncode != 0:
            result.failed = f"{report['status']} (exit {child.returncode}): {one_line(report.get('error') or child.stderr)}"
            return result
    elif child.returncode != 0:
        result.failed = f"exit {child.returncode}: {one_line(child.stderr or child.stdout)}"
        return result

    if not out.is_file():
        result.failed = f"no output written: {one_line(child.stderr or child.stdout)}"
        return result
    try:
        optimized = onnx.load(str(out))
    except Exception as exc:  # a tool may write something onnx cannot parse
        result.failed = f"output does not load in onnx: {one_line(str(exc) or type(exc).__name__)}"
        return result
    if optimized.ir_version > MAX_RUNTIME_IR:
        result.notes.append(f"wrote IR version {optimized.ir_version} (clamped to {MAX_RUNTIME_IR} to run it)")
    if tool != "ours":
        result.nodes = count_nodes(optimized)
        result.bytes = files_bytes(outdir)
    if reference is None:
        return result
    try:
        rel = max_rel_error(reference, ort_run(optimized, feeds))
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        result.failed = f"output fails in onnxruntime: {one_line(str(exc) or type(exc).__name__)}"
        return result
    if tool == "ours":
        result.bench_rel = rel
        if result.max_rel is None:
            result.max_rel = rel
    else:
        result.max_rel = rel
    return result


# -- table -------------------------------------------------------------------------------------
def fmt_int(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def fmt_rel(value: float | None) -> str:
    if value is None:
        return "–"
    return "0" if value == 0 else f"{value:.2g}"


def fmt_float(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render(rows: list[tuple[BenchModel, dict, dict[str, ToolResult]]], tools: list[str], header: list[str],
           notes: list[str]) -> str:
    label = {"ours": "ours", "onnxslim": "onnxslim", "onnxoptimizer": "onnxoptimizer"}
    cols = ["model", "nodes before", "bytes before"]
    for t in tools:
        name = label[t]
        cols += [f"{name} nodes{' after' if t == 'ours' else ''}", f"{name} bytes", f"{name} wall s",
                 f"{name} peak MB", f"{name} max rel err"]
    lines = header + ["", "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for model, base, results in rows:
        cells = [f"`{model.name}`", fmt_int(base.get("nodes")), fmt_int(base.get("bytes"))]
        for t in tools:
            r = results.get(t)
            if r is None:
                cells += ["skipped"] + [""] * 4
            elif r.failed:
                # The run failed: keep time and memory (they are still measurements), say why.
                cells += [f"failed: {r.failed}", fmt_int(r.bytes) if r.bytes else "–",
                          fmt_float(r.wall_s, 2), fmt_float(r.peak_mb, 0), fmt_rel(r.max_rel)]
            else:
                cells += [fmt_int(r.nodes), fmt_int(r.bytes), fmt_float(r.wall_s, 2), fmt_float(r.peak_mb, 0),
                          fmt_rel(r.max_rel)]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def auto_notes(rows, tools: list[str]) -> list[str]:
    """Facts worth a second look: failures, models made bigger, node counts that went up."""
    notes = []
    for model, base, results in rows:
        for t in tools:
            r = results.get(t)
            if r is None:
                continue
            for n in r.notes:
                notes.append(f"`{model.name}` / {t}: {n}")
            if r.failed:
                continue
            if r.bytes is not None and base.get("bytes") and r.bytes > base["bytes"] * 1.01:
                notes.append(f"`{model.name}` / {t}: output is larger than the input "
                             f"({base['bytes']:,} → {r.bytes:,} bytes, ×{r.bytes / base['bytes']:.2f})")
            if r.nodes is not None and base.get("nodes") is not None and r.nodes > base["nodes"]:
                notes.append(f"`{model.name}` / {t}: more nodes than the input ({base['nodes']} → {r.nodes})")
            if t == "ours" and r.bench_rel is not None and r.max_rel is not None:
                hi, lo = max(r.bench_rel, r.max_rel), min(r.bench_rel, r.max_rel)
                if hi > 1e-5 and hi > 10 * max(lo, 1e-12):
                    notes.append(f"`{model.name}` / ours: report says max rel {fmt_rel(r.max_rel)}, "
                                 f"this script's inputs give {fmt_rel(r.bench_rel)}")
    return notes


def _median_result(runs: list[ToolResult]) -> ToolResult:
    """The first run's outputs (nodes, bytes, errors: the same every run) with median time and memory."""
    first = runs[0]
    walls = [r.wall_s for r in runs if r.wall_s is not None]
    peaks = [r.peak_mb for r in runs if r.peak_mb is not None]
    first.wall_s = float(np.median(walls)) if walls else None
    first.peak_mb = float(np.median(peaks)) if peaks else None
    return first


def comparison_notes(rows, tools: list[str]) -> list[str]:
    """Issue 16's acceptance, measured: nodes ours <= onnxslim's everywhere; wall time on > 5 MB models."""
    if "onnxslim" not in tools:
        return []
    more, ratios = [], []
    for model, base, results in rows:
        ours, slim = results.get("ours"), results.get("onnxslim")
        if not ours or not slim or ours.failed or slim.failed:
            continue
        if ours.nodes is not None and slim.nodes is not None and ours.nodes > slim.nodes:
            more.append(f"`{model.name}` ({ours.nodes} vs {slim.nodes})")
        if base.get("bytes", 0) > 5 * 2**20 and ours.wall_s and slim.wall_s:
            ratios.append(f"`{model.name}` {ours.wall_s / slim.wall_s:.2f}×")
    notes = ["ours has more nodes than onnxslim on: " + ", ".join(more) if more else
             "ours has at most as many nodes as onnxslim on every model compared"]
    if ratios:
        notes.append("wall time ours / onnxslim on the models above 5 MB: " + ", ".join(ratios))
    return notes


def precompile_ours() -> list[str]:
    """Byte-compile the packages ``python -m optimizer.cli`` imports, where they are imported from
    (this tree, or ``PYTHONPATH``'s): onnxslim and onnxoptimizer run from the bytecode ``pip
    install`` compiled, while an editable tree run with ``PYTHONDONTWRITEBYTECODE=1`` (as CI sets
    it) would recompile ~70 modules from source in every child (0.25 s of each run). Writes only
    ``__pycache__`` folders (git-ignored); returns the folders compiled."""
    import compileall

    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print('\\n'.join(str(u.find_spec(p).submodule_search_locations[0]) "
         "for p in ('optimizer', 'passes', 'calibration')))"],
        capture_output=True, text=True, cwd=tempfile.gettempdir(),
    )
    folders = [line for line in probe.stdout.splitlines() if line.strip()]
    for folder in folders:
        compileall.compile_dir(folder, quiet=1)
    return folders


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="model names (sample folder or light_* stem; substrings match) or .onnx paths")
    parser.add_argument("--out", default=str(REPO / "bench" / "results.md"), help="Markdown output file")
    parser.add_argument("--compare", action="store_true", help="also run onnxslim and onnxoptimizer")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a child is killed")
    parser.add_argument("--large", action="store_true",
                        help="also the > 5 MB models of bench/build_large.py (built into bench/large/ if missing)")
    parser.add_argument("--no-precompile", action="store_true",
                        help="do not byte-compile our packages first (see precompile_ours)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per tool and model, alternating the tools; wall time and peak RSS are medians")
    args = parser.parse_args(argv)

    if args.large and not any(LARGE_DIR.glob("*.onnx")):
        print("[bench] building the large models (bench/build_large.py) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(REPO / "bench" / "build_large.py")], check=True, cwd=REPO)
    models = select_models(args.models, args.large)
    compiled = [] if args.no_precompile else precompile_ours()
    tools = list(TOOLS) if args.compare else ["ours"]
    skipped_notes = []
    available = {}
    for t in tools:
        module = "optimizer" if t == "ours" else t
        available[t] = importlib.util.find_spec(module) is not None
        if not available[t]:
            skipped_notes.append(f"{t} is not importable in this Python; its columns are marked skipped "
                                 f"(`pip install -e '.[bench]'`)")

    command = shlex.join(["python", "bench/bench.py"] + (argv if argv is not None else sys.argv[1:]))
    versions = ", ".join(f"{d} {version_of(d)}" for d in
                         ("onnx-trt-optimizer", "onnx", "onnxruntime", "numpy", "onnxslim", "onnxoptimizer"))
    header = [
        "# Benchmark results",
        "",
        f"{_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} on {platform.platform()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}. "
        f"Reproduce from the repository root: `{command}`",
        "",
        f"Versions: {versions}.",
        "",
        (f"Median of {args.repeat} runs per cell, the tools alternated within each repetition. " if args.repeat > 1
         else "One run per cell. ") + "Wall time and peak RSS are for the whole child process (interpreter start-up and "
        "imports included). Nodes count subgraphs; bytes are the output's size on disk. ours: "
        "`python -m optimizer.cli MODEL -o OUT --preset default --json [--data eval.npz]`, nodes/bytes/error from "
        "its JSON report (error over all of eval.npz where it exists). onnxslim: `python -m onnxslim MODEL OUT`. "
        "onnxoptimizer: `onnxoptimizer.optimize(onnx.load(MODEL))` with default passes. "
        + ("Our packages were byte-compiled first, as pip compiles the other tools' at install "
           "(`--no-precompile` to measure without). " if compiled else "Our packages ran from source (`--no-precompile`). ")
        + "The other tools' error "
        f"is max over outputs of max|a−b| / max|ref| in ONNX Runtime CPU (graph optimizations off) on the first "
        f"{EVAL_SAMPLES} samples of eval.npz, or on seeded random inputs (dynamic dims = 1) for the light models.",
    ]

    rows = []
    flat: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        scratch = Path(tmp)
        for model in models:
            original = onnx.load(str(model.path))
            base = {"nodes": count_nodes(original), "bytes": model.path.stat().st_size}
            try:
                feeds, _source = bench_inputs(original, model.data)
                reference = ort_run(original, feeds)
                if all(_is_flat(r) for r in reference):
                    flat.append(model.name)
            except Exception as exc:
                feeds, reference = None, None
                skipped_notes.append(f"`{model.name}`: the original does not run in onnxruntime "
                                     f"({one_line(str(exc))}); errors not measured")
            runs: dict[str, list[ToolResult]] = {t: [] for t in tools if available[t]}
            for rep in range(max(args.repeat, 1)):
                order = list(runs)
                order = order[rep % len(order):] + order[:rep % len(order)] if order else order  # alternate
                for t in order:
                    print(f"[bench] {model.name}: {t} (run {rep + 1}) ...", file=sys.stderr, flush=True)
                    r = run_tool(t, model, scratch / f"r{rep}", reference, feeds, args.timeout)
                    runs[t].append(r)
                    status = f"failed: {r.failed}" if r.failed else f"{r.nodes} nodes, rel {fmt_rel(r.max_rel)}"
                    print(f"[bench]   {r.wall_s:.2f} s, {fmt_float(r.peak_mb, 0)} MB, {status}", file=sys.stderr,
                          flush=True)
            results = {t: _median_result(rs) for t, rs in runs.items()}
            rows.append((model, base, results))

    if flat:
        skipped_notes.append(
            "every output of " + ", ".join(f"`{n}`" for n in flat) + " is the same value in every element on these "
            "inputs (the light models' weights are ConstantOfShape fills), so a max rel err of 0 there is weak "
            "evidence of correctness; the sample models, run on real data, are the accuracy check"
        )
    text = render(rows, tools, header, comparison_notes(rows, tools) + skipped_notes + auto_notes(rows, tools))
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"[bench] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
