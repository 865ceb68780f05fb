#!/usr/bin/env python
"""Benchmark INT8 quantization: ``optimize --int8`` (every ``--calib-method``) against ONNX Runtime's
``quantize_static`` (QDQ, per channel, symmetric INT8, MinMax/Entropy/Percentile, with and without
``quant_pre_process``), on the same calibration data; plus our calibration memory scaling.

    python bench/quant.py                                  # -> bench/quant_results.md
    python bench/quant.py --models digits_cnn light_squeezenet --out /tmp/q.md
    python bench/quant.py --models digits_cnn --skip-memory --no-trt

Models: the three sample models (``sample_models/<m>/model.onnx`` with their ``calib.npz`` and
``eval.npz``) and, by default, three of the onnx wheel's ``light_*.onnx`` models (resnet50,
squeezenet, inception_v1; ``--models light_vgg19`` etc. picks others). The light models ship no data:
they get seeded synthetic calibration (32 samples) and evaluation (8 samples) inputs, and their
weights are constant fills (``ConstantOfShape``), so their outputs are near-uniform and accuracy
there is not meaningful (only "does it quantize, load, run, parse in TensorRT").

Every tool run is its own child process, measured like ``bench/bench.py`` does (whole-process wall
time and peak RSS via ``/usr/bin/time -f '%e %M'``). Each run gets a private copy of the FP32 model
(and of its data) in a temporary folder and writes its output there; the copy's SHA-256 is checked
afterwards (did the tool rewrite its input?) and new files beside the input or in the child's
working directory are listed. The repository's files are only read (and snapshotted at start).

For every output model: does it load and run in ONNX Runtime on the CPU (graph optimizations off,
as the optimizer evaluates; and again with all of ORT's optimizations, i.e. its INT8 kernels),
accuracy against the FP32 model on the eval data (top-1 against ``labels`` where present, argmax
agreement and cosine of the first output), weight compression (bytes of initializers and
Constant-node tensors, FP32 original / output), Q/DQ node counts, and whether TensorRT-RTX's ONNX
parser accepts it (``optimizer.tensorrt_rtx.check_model(path, build=False)`` in a child process).

This script imports nothing from ``optimizer``/``passes``/``calibration`` in-process: those are
measured as a black box through the CLI (and the TensorRT check through ``python -c``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
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
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO / "sample_models"
SAMPLE_MODELS = ("digits_cnn", "channel_last", "transformer")
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
DEFAULT_LIGHT = ("light_resnet50", "light_squeezenet", "light_inception_v1")
OUR_METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
SYNTH_CALIB_SAMPLES = 32
SYNTH_EVAL_SAMPLES = 8
CALIB_SEED, EVAL_SEED = 0, 1
MEM_SMALL, MEM_LARGE = 32, 512
MEM_REPEATS = 3
MAX_RUNTIME_IR = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14
ORT_BATCH = 16  # calibration batch for ORT when the model's batch dimension is dynamic

# The ONNX Runtime side, run as its own process (written to the scratch folder as a script).
ORT_SCRIPT = r'''
import argparse, json, sys, traceback
import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

p = argparse.ArgumentParser()
p.add_argument("model"); p.add_argument("out"); p.add_argument("calib")
p.add_argument("--method", required=True); p.add_argument("--preprocess", metavar="PRE_PATH")
p.add_argument("--batch", type=int, default=16)
p.add_argument("--no-bias-quant", action="store_true", help="extra_options QuantizeBias=False")
a = p.parse_args()


class NpzReader(CalibrationDataReader):
    """The same calibration arrays the optimizer gets, fed batch by batch."""

    def __init__(self, path, model_path, batch):
        m = onnx.load(model_path, load_external_data=False)
        inits = {t.name for t in m.graph.initializer}
        self.inputs = {}
        for v in m.graph.input:
            if v.name in inits:
                continue
            dims = v.type.tensor_type.shape.dim
            fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
            self.inputs[v.name] = (onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type), fixed)
        fixed = {f for _, f in self.inputs.values() if f}
        self.batch = fixed.pop() if fixed else batch
        with np.load(path, allow_pickle=False) as z:
            self.data = {n: z[n].astype(dt) for n, (dt, _) in self.inputs.items()}
        self.n = min(len(x) for x in self.data.values())
        self.n -= self.n % self.batch
        self.rewind()

    def get_next(self):
        if self.i >= self.n:
            return None
        feed = {k: v[self.i:self.i + self.batch] for k, v in self.data.items()}
        self.i += self.batch
        return feed

    def rewind(self):
        self.i = 0


def real_inputs(path):
    m = onnx.load(path, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    return [v.name for v in m.graph.input if v.name not in inits], opset


notes = []
stage = "pre-process"
try:
    src = a.model
    if a.preprocess:
        quant_pre_process(a.model, a.preprocess)
        src = a.preprocess
        (before, op0), (after, op1) = real_inputs(a.model), real_inputs(src)
        extra = [n for n in after if n not in before]
        if extra:
            notes.append(f"quant_pre_process left {len(extra)} graph input(s) without their initializer, so they "
                         f"became required inputs: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
        if op0 != op1:
            notes.append(f"quant_pre_process changed the default-domain opset {op0} -> {op1}")
    stage = "quantize_static"
    quantize_static(
        src, a.out, NpzReader(a.calib, a.model, a.batch), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, a.method),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                       **({"QuantizeBias": False} if a.no_bias_quant else {})},
    )
except Exception as exc:
    traceback.print_exc()
    msg = " ".join(str(exc).split()) or type(exc).__name__
    print(json.dumps({"failed_stage": stage, "error": f"{type(exc).__name__}: {msg}", "notes": notes}))
    sys.exit(3)
print(json.dumps({"failed_stage": None, "notes": notes}))
'''

TRT_CHECK = (
    "import json, sys\n"
    "from optimizer.tensorrt_rtx import check_model\n"
    "r = check_model(sys.argv[1], build=False)\n"
    "print(json.dumps({'parsed': r.parsed, 'ok': r.ok, 'version': r.trt_version,\n"
    "  'unsupported': [[u.op_type, u.name, u.reason] for u in r.unsupported], 'errors': r.errors[:5]}))\n"
)


# -- child processes (same measurement as bench/bench.py) --------------------------------------
def run_child(cmd: list[str], logdir: Path, cwd: Path, timeout: float) -> ChildRun:
    """Run ``cmd`` in ``cwd``; wall time from spawn to reap, peak RSS of the command itself."""
    logdir.mkdir(parents=True, exist_ok=True)
    out_path, err_path, usage_path = logdir / "stdout.txt", logdir / "stderr.txt", logdir / "rusage.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    usage_path.unlink(missing_ok=True)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(_measured(cmd, usage_path), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            timed_out = True
        wall = time.perf_counter() - start
    peak_mb = None
    try:
        peak_mb = int(usage_path.read_text().split()[-1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return ChildRun(proc.returncode, wall, peak_mb, out_path.read_text(errors="replace"),
                    err_path.read_text(errors="replace"), timed_out)


def one_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else "no output"
    line = line.replace("|", "\\|")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def last_json(text: str) -> dict | None:
    """The JSON object a child printed: all of stdout (ours, pretty-printed), else its last JSON line."""
    try:
        whole = json.loads(text)
        if isinstance(whole, dict):
            return whole
    except json.JSONDecodeError:
        pass
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def trt_reason(text: str, limit: int = 300) -> str:
    """TensorRT-RTX's message without the CUDA-driver noise a GPU-less machine adds to every error."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and "cudaError" not in ln]
    line = lines[-1] if lines else (text or "").strip()
    if len(lines) > 1 and lines[0].startswith("node "):  # "node 3 'name' (Op) [KIND]: ..." + the reason
        line = lines[0].split(": ", 1)[0] + ": " + line
    line = line.replace("|", "\\|")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")} if directory.is_dir() else set()


# -- models and data ---------------------------------------------------------------------------
@dataclass
class Model:
    name: str
    path: Path  # the snapshot in the scratch folder
    calib: Path
    eval: Path
    synthetic: bool
    labels: bool


def graph_inputs(model: onnx.ModelProto) -> list[tuple[str, np.dtype, list[int | None]]]:
    inits = {t.name for t in model.graph.initializer}
    out = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in v.type.tensor_type.shape.dim]
        out.append((v.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)), dims))
    return out


def synthetic_npz(model: onnx.ModelProto, path: Path, samples: int, seed: int) -> None:
    """Seeded inputs, samples on axis 0 (the model's batch axis; other dynamic dims = 1).

    Floats uniform in [-1, 1) (the optimizer's own synthetic recipe), integers in {0, 1}.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, dtype, dims in graph_inputs(model):
        shape = [samples] + [d or 1 for d in dims[1:]]
        if np.issubdtype(dtype, np.floating):
            arrays[name] = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
        else:
            arrays[name] = rng.integers(0, 2, size=shape).astype(dtype)
    np.savez(path, **arrays)


def select_models(wanted: list[str] | None) -> list[tuple[str, Path, Path | None]]:
    """(name, original path, sample folder or None) for every requested model."""
    known = [(m, SAMPLES_DIR / m / "model.onnx", SAMPLES_DIR / m) for m in SAMPLE_MODELS]
    light = [(p.stem, p, None) for p in sorted(LIGHT_DIR.glob("light_*.onnx"))]
    if not wanted:
        return known + [x for x in light if x[0] in DEFAULT_LIGHT]
    chosen = []
    for item in wanted:
        hits = [x for x in known + light if x[0] == item] or [x for x in known + light if item in x[0]]
        if not hits:
            sys.exit(f"quant bench: no model matches {item!r}; known: {', '.join(x[0] for x in known + light)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def snapshot(name: str, original: Path, folder: Path | None, scratch: Path) -> Model:
    """Copy the model and its data (or make seeded synthetic data) into the scratch folder."""
    dest = scratch / name / "fp32"
    dest.mkdir(parents=True)
    shutil.copy2(original, dest / "model.onnx")
    model = onnx.load(str(dest / "model.onnx"))
    if folder is not None and (folder / "calib.npz").is_file() and (folder / "eval.npz").is_file():
        shutil.copy2(folder / "calib.npz", dest / "calib.npz")
        shutil.copy2(folder / "eval.npz", dest / "eval.npz")
        with np.load(dest / "eval.npz", allow_pickle=False) as z:
            labels = "labels" in z.files
        return Model(name, dest / "model.onnx", dest / "calib.npz", dest / "eval.npz", False, labels)
    synthetic_npz(model, dest / "calib.npz", SYNTH_CALIB_SAMPLES, CALIB_SEED)
    synthetic_npz(model, dest / "eval.npz", SYNTH_EVAL_SAMPLES, EVAL_SEED)
    return Model(name, dest / "model.onnx", dest / "calib.npz", dest / "eval.npz", True, False)


# -- measuring an output model -----------------------------------------------------------------
def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer and Constant-node tensor, subgraphs included."""
    total = 0
    for g in iter_graphs(model.graph):
        tensors = list(g.initializer)
        for node in g.node:
            if node.op_type == "Constant":
                tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
        for t in tensors:
            total += numpy_helper.to_array(t).nbytes
    return total


def qdq_counts(model: onnx.ModelProto) -> tuple[int, int, int]:
    """(QuantizeLinear, DequantizeLinear, DequantizeLinear of INT32 tensors e.g. quantized biases)."""
    q = dq = dq32 = 0
    for g in iter_graphs(model.graph):
        int32 = {t.name for t in g.initializer if t.data_type == onnx.TensorProto.INT32}
        for node in g.node:
            if node.op_type == "QuantizeLinear":
                q += 1
            elif node.op_type == "DequantizeLinear":
                dq += 1
                dq32 += bool(node.input and node.input[0] in int32)
    return q, dq, dq32


def ort_session(model: onnx.ModelProto, optimized: bool):
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.ir_version = min(model.ir_version, MAX_RUNTIME_IR)
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_eval(model: onnx.ModelProto, data: dict[str, np.ndarray], optimized: bool) -> np.ndarray:
    """First output over all eval samples, batched by the model's fixed batch size (else 64)."""
    session = ort_session(model, optimized)
    inputs = session.get_inputs()
    fixed = {i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0}
    n = min(len(data[i.name]) for i in inputs)
    batch = fixed.pop() if fixed else max(1, min(64, n))
    n -= n % batch
    first = session.get_outputs()[0].name
    outs = []
    for s in range(0, n, batch):
        feed = {i.name: data[i.name][s:s + batch] for i in inputs}
        outs.append(session.run([first], feed)[0])
    return np.concatenate(outs, axis=0)


def metrics(reference: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> dict:
    r, o = reference.astype(np.float64), out.astype(np.float64)
    if r.shape != o.shape:
        raise ValueError(f"first output's shape changed {r.shape} -> {o.shape}")
    denom = np.linalg.norm(r) * np.linalg.norm(o)
    cos = float(np.dot(r.ravel(), o.ravel()) / denom) if denom > 0 else (1.0 if np.array_equal(r, o) else 0.0)
    # argmax over the class axis: the last non-singleton axis (squeezenet's output is [1,1000,1,1]).
    rr, oo = r.reshape(r.shape[0], -1) if r.ndim == 4 else r, o.reshape(o.shape[0], -1) if o.ndim == 4 else o
    agree = float(np.mean(np.argmax(rr, -1) == np.argmax(oo, -1)) * 100)
    result = {"cosine": cos, "agree": agree, "top1": None, "zero": not np.any(o) and np.any(r)}
    if labels is not None:
        result["top1"] = float(np.mean(np.argmax(oo, -1) == labels[: len(oo)]) * 100)
    return result


def trt_check(path: Path, logdir: Path, timeout: float) -> dict:
    child = run_child([sys.executable, "-c", TRT_CHECK, str(path)], logdir, REPO, timeout)
    data = last_json(child.stdout)
    if data is None:
        return {"error": f"check crashed (exit {child.returncode}): {one_line(child.stderr)}"}
    return data


# -- one tool run ------------------------------------------------------------------------------
@dataclass
class Run:
    tool: str  # "ours" / "onnxruntime" / "fp32"
    method: str
    label: str
    wall_s: float | None = None
    peak_mb: float | None = None
    failed: str | None = None
    ort: str = "–"  # "yes" / "no: ..."
    top1: float | None = None
    agree: float | None = None
    cosine: float | None = None
    opt_metric: float | None = None  # top1 (or agree) with ORT's graph optimizations on
    ratio: float | None = None
    q: int | None = None
    dq: int | None = None
    dq32: int | None = None
    trt: str = "–"
    notes: list[str] = field(default_factory=list)
    input_rewritten: bool | None = None
    stray: list[str] = field(default_factory=list)


def our_command(model: Model, inp: Path, out: Path, method: str) -> list[str]:
    return [sys.executable, "-m", "optimizer.cli", str(inp), "-o", str(out), "--int8", "--calib-method", method,
            "--calib", str(model.calib), "--data", str(model.eval), "--json"]


def ort_command(script: Path, model: Model, inp: Path, out: Path, method: str, pre: Path | None,
                no_bias_quant: bool = False) -> list[str]:
    cmd = [sys.executable, str(script), str(inp), str(out), str(model.calib), "--method", method,
           "--batch", str(ORT_BATCH)]
    return cmd + (["--preprocess", str(pre)] if pre else []) + (["--no-bias-quant"] if no_bias_quant else [])


def execute(run: Run, model: Model, workdir: Path, cmd_for, timeout: float) -> Path | None:
    """Run one tool on a private copy of the model; returns the output path (None on failure)."""
    indir, outdir, cwd = workdir / "in", workdir / "out", workdir / "cwd"
    for d in (indir, outdir, cwd):
        d.mkdir(parents=True)
    inp = indir / "model.onnx"
    shutil.copy2(model.path, inp)
    before_hash, before_mtime = sha256(inp), inp.stat().st_mtime_ns
    before_in = listing(indir)
    out = outdir / "model.onnx"
    child = run_child(cmd_for(inp, out), workdir / "log", cwd, timeout)
    run.wall_s, run.peak_mb = child.wall_s, child.peak_mb
    run.input_rewritten = sha256(inp) != before_hash or inp.stat().st_mtime_ns != before_mtime
    if run.input_rewritten:
        run.notes.append("REWROTE ITS INPUT FILE (hash or mtime changed)")
    stray = sorted((listing(indir) - before_in) | listing(cwd))
    stray = [s for s in stray if not s.endswith("preprocessed.onnx")]
    if stray:
        run.stray = stray
        run.notes.append("wrote files beside its input / in its working directory: " + ", ".join(stray[:6]))
    if child.timed_out:
        run.failed = f"timed out after {timeout:.0f} s"
        return None
    report = last_json(child.stdout)
    if run.tool == "ours":
        if report is None:
            run.failed = f"exit {child.returncode}: {one_line(child.stderr or child.stdout)}"
            return None
        quant = [p for p in report.get("passes", []) if p.get("name") == "quantize-int8"]
        if quant:
            stats = quant[-1].get("stats") or {}
            skipped = ", ".join(f"{k[len('skipped_'):]} {v}" for k, v in stats.items() if k.startswith("skipped_"))
            run.notes.append("quantize-int8: quantized nodes {}, activations {}, weights {}{}".format(
                stats.get("quantized_nodes", 0), stats.get("quantized_activations", 0),
                stats.get("quantized_weights", 0), f"; skipped: {skipped}" if skipped else ""))
            calib = ((quant[-1].get("details") or {}).get("calibration") or {})
            if calib.get("synthetic"):
                run.notes.append("calibrated on SYNTHETIC data (the --calib file was not used)")
        if report.get("status") != "ok" or child.returncode != 0:
            run.failed = f"{report.get('status')} (exit {child.returncode}): {one_line(report.get('error') or child.stderr)}"
            return None
    else:
        run.notes += (report or {}).get("notes") or []
    if run.tool != "ours" and child.returncode != 0:
        if report and report.get("failed_stage"):
            run.failed = f"{report['failed_stage']} raised {one_line(report['error'], 120)}"
        else:
            run.failed = f"exit {child.returncode}: {one_line(child.stderr or child.stdout)}"
        return None
    if not out.is_file():
        run.failed = f"no output written: {one_line(child.stderr or child.stdout)}"
        return None
    return out


def assess(run: Run, out: Path, model: Model, fp32: onnx.ModelProto, reference: np.ndarray,
           data: dict[str, np.ndarray], labels: np.ndarray | None, scratch_log: Path, timeout: float,
           with_trt: bool) -> None:
    try:
        proto = onnx.load(str(out))
    except Exception as exc:
        run.failed = f"output does not load in onnx: {one_line(str(exc))}"
        return
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        run.notes.append(f"onnx.checker (full_check) rejects the output: {one_line(str(exc), 160)}")
    ops = [next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None) for m in (fp32, proto)]
    if ops[0] != ops[1]:
        run.notes.append(f"output's default-domain opset is {ops[1]} (input: {ops[0]})")
    if proto.ir_version > MAX_RUNTIME_IR:
        run.notes.append(f"wrote IR version {proto.ir_version}")
    run.q, run.dq, run.dq32 = qdq_counts(proto)
    out_bytes = weight_bytes(proto)
    run.ratio = weight_bytes(fp32) / out_bytes if out_bytes else None
    try:
        m = metrics(reference, run_eval(proto, data, optimized=False), labels)
        run.top1, run.agree, run.cosine = m["top1"], m["agree"], m["cosine"]
        run.ort = "yes"
        if m["zero"]:
            run.notes.append("the first output is ALL ZEROS on the eval data (argmax agreement is then meaningless)")
    except Exception as exc:
        run.ort = "no"
        run.notes.append(f"ONNX Runtime (optimizations off) fails: {one_line(str(exc), 160)}")
    try:
        m2 = metrics(reference, run_eval(proto, data, optimized=True), labels)
        run.opt_metric = m2["top1"] if labels is not None else m2["agree"]
        if run.ort == "no":
            run.ort = "opt-all only"
    except Exception as exc:
        run.ort = "no" if run.ort == "no" else "no-opt only"
        run.notes.append(f"ONNX Runtime (all optimizations) fails: {one_line(str(exc), 160)}")
    if with_trt:
        t = trt_check(out, scratch_log, timeout)
        if "error" in t:
            run.trt = "check failed"
            run.notes.append(f"TensorRT-RTX check: {t['error']}")
        elif t["ok"]:
            run.trt = "yes"
        else:
            ops = sorted({u[0] for u in t["unsupported"]})
            run.trt = "no" + (f" ({len(t['unsupported'])} unsupported: {', '.join(ops)})" if ops else " (parse error)")
            first = (t["errors"] or [""])[0] or (t["unsupported"][0][2] if t["unsupported"] else "")
            run.notes.append(f"TensorRT-RTX: {trt_reason(first)}")


# -- memory scaling ----------------------------------------------------------------------------
def memory_scaling(scratch: Path, timeout: float) -> tuple[list[str], dict]:
    """Peak RSS of ``optimize digits_cnn --int8 --calib X`` with 32 vs 512 calibration samples."""
    folder = scratch / "memory"
    folder.mkdir()
    shutil.copy2(SAMPLES_DIR / "digits_cnn" / "model.onnx", folder / "model.onnx")
    with np.load(SAMPLES_DIR / "digits_cnn" / "calib.npz", allow_pickle=False) as z:
        x = z["input"].astype(np.float32)
    np.savez(folder / f"calib_{MEM_SMALL}.npz", input=x[:MEM_SMALL])
    reps = -(-MEM_LARGE // len(x))
    rng = np.random.default_rng(CALIB_SEED)
    big = np.concatenate([x] * reps)[:MEM_LARGE]
    big = big + rng.normal(0.0, 0.02, size=big.shape).astype(np.float32) * (np.arange(len(big)) >= len(x)).reshape(-1, 1, 1, 1)
    big = np.clip(big, 0.0, 1.0).astype(np.float32)  # the images are scaled to [0, 1]
    np.savez(folder / f"calib_{MEM_LARGE}.npz", input=big)
    results: dict[int, list[tuple[float, float | None, str]]] = {MEM_SMALL: [], MEM_LARGE: []}
    for rep in range(MEM_REPEATS):
        for n in (MEM_SMALL, MEM_LARGE):
            cmd = [sys.executable, "-m", "optimizer.cli", str(folder / "model.onnx"), "-o",
                   str(folder / f"out_{n}_{rep}.onnx"), "--int8", "--calib", str(folder / f"calib_{n}.npz"), "--json"]
            print(f"[quant] memory: {n} calibration samples, run {rep + 1}/{MEM_REPEATS} ...", file=sys.stderr, flush=True)
            child = run_child(cmd, folder / f"log_{n}_{rep}", folder, timeout)
            rep_json = last_json(child.stdout) or {}
            quant = [p for p in rep_json.get("passes", []) if p.get("name") == "quantize-int8"]
            samples = ((quant[-1].get("details") or {}).get("calibration") or {}).get("samples") if quant else None
            status = "ok" if child.returncode == 0 and rep_json.get("status") == "ok" else \
                f"failed (exit {child.returncode}): {one_line(child.stderr)}"
            results[n].append((child.wall_s, child.peak_mb, status, samples))
    med = {n: statistics.median([r[1] for r in rs if r[1] is not None] or [float("nan")]) for n, rs in results.items()}
    ratio = med[MEM_LARGE] / med[MEM_SMALL] if med[MEM_SMALL] else float("nan")
    lines = [
        "## Calibration memory scaling (`digits_cnn`)",
        "",
        f"`python -m optimizer.cli sample_models/digits_cnn/model.onnx -o OUT --int8 --calib X --json` (default "
        f"method: entropy) with X = the first {MEM_SMALL} images of `calib.npz`, or {MEM_LARGE} images (the 128 "
        f"calibration images tiled ×{reps}, the copies with seeded N(0, 0.02) noise, clipped to [0, 1]). "
        f"{MEM_REPEATS} runs each, alternating; peak RSS of the whole process.",
        "",
        "| calibration samples | samples used (report) | peak MB per run | median peak MB | median wall s | status |",
        "|---:|---:|---|---:|---:|---|",
    ]
    for n, rs in results.items():
        used = ", ".join(sorted({str(r[3]) for r in rs}))
        lines.append(f"| {n} | {used} | {' / '.join(f'{r[1]:.1f}' if r[1] else '–' for r in rs)} | {med[n]:.1f} | "
                     f"{statistics.median([r[0] for r in rs]):.2f} | {'; '.join(sorted({r[2] for r in rs}))} |")
    verdict = "meets" if ratio <= 1.2 else "MISSES"
    lines += ["", f"Peak RSS ratio {MEM_LARGE} / {MEM_SMALL} samples: **{ratio:.3f}** ({verdict} the goal ≤ 1.2).", ""]
    return lines, {"ratio": ratio, "median_mb": med}


# -- rendering ---------------------------------------------------------------------------------
def fmt(v, digits=2, suffix=""):
    return "–" if v is None else f"{v:.{digits}f}{suffix}"


def render_model(model: Model, runs: list[Run], with_trt: bool) -> list[str]:
    data_note = ("seeded synthetic data: calibration 32 samples (seed 0), evaluation 8 samples (seed 1); the weights "
                 "are constant fills, so outputs are near-uniform and the accuracy columns are NOT meaningful"
                 if model.synthetic else
                 "`calib.npz` for calibration, all of `eval.npz` for evaluation"
                 + (" (top-1 against its labels)" if model.labels else " (no labels: argmax agreement and cosine vs FP32)"))
    metric = "top-1 %" if model.labels else "argmax agree %"
    lines = [f"### `{model.name}`", "", f"Data: {data_note}.", "",
             f"| tool / method | wall s | peak MB | runs in ORT | top-1 % | argmax agree % | cosine | "
             f"{metric} (ORT opt-all) | weight ratio | Q / DQ (int32 DQ) | TRT-RTX parse |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in runs:
        if r.failed:
            lines.append(f"| {r.label} | {fmt(r.wall_s)} | {fmt(r.peak_mb, 0)} | failed: {r.failed} | | | | | | | |")
            continue
        qdq = "–" if r.q is None else f"{r.q} / {r.dq}" + (f" ({r.dq32})" if r.dq32 else "")
        cos = "–" if r.cosine is None else (f"{r.cosine:.6f}" if r.cosine > 0.9999 else f"{r.cosine:.4f}")
        lines.append(
            f"| {r.label} | {fmt(r.wall_s)} | {fmt(r.peak_mb, 0)} | {r.ort} | {fmt(r.top1)} | {fmt(r.agree, 1)} | "
            f"{cos} | {fmt(r.opt_metric)} | {fmt(r.ratio, 2, '×')} | {qdq} | {r.trt if with_trt else 'not run'} |")
    grouped: dict[str, list[str]] = {}  # the same note on several runs is listed once
    for r in runs:
        for n in r.notes:
            grouped.setdefault(n, []).append(r.label)
    notes = [f"- {', '.join(labels)}: {n}" for n, labels in grouped.items()]
    best = best_run(model, runs)
    if best and not model.synthetic:
        lines += ["", f"Best accuracy among outputs that run in ORT{' and parse in TensorRT-RTX' if with_trt else ''}: "
                      f"**{best.label}** ({best_key_text(model, best)})."]
    if notes:
        lines += ["", "Notes:", ""] + notes
    return lines + [""]


def best_run(model: Model, runs: list[Run]) -> Run | None:
    ok = [r for r in runs if r.tool != "fp32" and not r.failed and r.ort == "yes" and r.trt in ("yes", "not run", "–")]
    if not ok:
        return None
    return max(ok, key=lambda r: ((r.top1 if model.labels else r.agree) or 0.0, r.cosine or 0.0))


def best_key_text(model: Model, r: Run) -> str:
    return (f"top-1 {r.top1:.2f} %, " if model.labels else f"agreement {r.agree:.1f} %, ") + f"cosine {r.cosine:.5f}"


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def code_fingerprint() -> str:
    """SHA-256 over the optimizer's sources (others may edit them while the benchmark runs)."""
    h = hashlib.sha256()
    for pkg in ("optimizer", "passes", "calibration"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def git_state() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.SubprocessError):
        return "git state unknown"
    if not commit:
        return "git state unknown"
    return f"commit {commit}" + (f" + uncommitted changes to {', '.join(dirty[:8])}" if dirty else " (clean)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# -- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="sample folder names or light_* stems (substrings match); default: the 3 sample "
                             "models and light_resnet50, light_squeezenet, light_inception_v1")
    parser.add_argument("--out", default=str(REPO / "bench" / "quant_results.md"), help="Markdown output file")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a child is killed")
    parser.add_argument("--skip-memory", action="store_true", help="skip the calibration memory-scaling runs")
    parser.add_argument("--no-trt", action="store_true", help="skip the TensorRT-RTX parse checks")
    parser.add_argument("--keep", metavar="DIR", help="keep every output model and log under DIR")
    args = parser.parse_args(argv)
    with_trt = not args.no_trt

    chosen = select_models(args.models)
    command = shlex.join(["python", "bench/quant.py"] + (argv if argv is not None else sys.argv[1:]))
    versions = ", ".join(f"{d} {version_of(d)}" for d in
                         ("onnx-trt-optimizer", "onnx", "onnxruntime", "numpy", "tensorrt_rtx_cu12"))
    header = [
        "# INT8 quantization benchmark",
        "",
        f"{_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} on {platform.platform()}, "
        f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
        f"Reproduce from the repository root: `{command}`",
        "",
        f"Versions: {versions}. Code: {git_state()}.",
        "",
        "One run per cell; wall time and peak RSS are for the whole child process (interpreter start-up, imports, "
        "and for ours the default preset, per-pass numeric verification and the final evaluation). Rows:",
        "",
        "- **ours / M**: `optimize MODEL -o OUT --int8 --calib-method M --calib calib.npz --data eval.npz --json` "
        "(run as `python -m optimizer.cli`; pipeline = default preset + `quantize-int8(method=M)`).",
        "- **ORT / M**: `onnxruntime.quantization.quantize_static(MODEL, OUT, reader, quant_format=QDQ, "
        "per_channel=True, activation_type=weight_type=QInt8, calibrate_method=M, "
        "extra_options={ActivationSymmetric: True, WeightSymmetric: True})`, the reader feeding the same "
        f"calibration arrays (batches of the model's fixed batch size, else {ORT_BATCH}); **+pre** first runs "
        "`onnxruntime.quantization.shape_inference.quant_pre_process(MODEL, PRE)` and quantizes PRE (both steps in "
        "the one measured process). ORT's defaults otherwise (e.g. Percentile = 99.999; ours uses 99.99). "
        "**QuantizeBias=False** rows add that extra option (biases stay float instead of INT32 behind a "
        "DequantizeLinear, which TensorRT does not accept).",
        "",
        "Columns: **runs in ORT**: loads and runs on the CPU with graph optimizations off (`yes`; the accuracy "
        "columns use this, i.e. the file's own Q/DQ semantics) — `opt-all only`/`no-opt only` if just one of the two "
        "modes works. **top-1 %** against `labels`; **argmax agree %** and **cosine** (over the whole first output) "
        "against the FP32 model on the same inputs; **(ORT opt-all)**: the same metric with all of ORT's graph "
        "optimizations on (its fused INT8 kernels). **weight ratio**: bytes of initializers + Constant-node tensors, "
        "FP32 original / output (>1 = smaller). **Q / DQ**: QuantizeLinear / DequantizeLinear node counts, in "
        "parentheses DequantizeLinear nodes of INT32 tensors (quantized biases). **TRT-RTX parse**: "
        "`optimizer.tensorrt_rtx.check_model(path, build=False)` in a child process — parsed with no unsupported "
        "node and no error.",
        "",
        "Every run gets a private copy of the FP32 model in a temporary folder; its SHA-256 and mtime are compared "
        "after the run (a changed input is flagged in the notes, as are new files written beside the input or in "
        "the child's working directory).",
        "",
    ]
    body: list[str] = []
    summary: list[str] = []
    rewrites: list[str] = []
    originals = {name: sha256(path) for name, path, _ in chosen}
    code_before = code_fingerprint()

    scratch_ctx = tempfile.TemporaryDirectory(prefix="quantbench-")
    scratch = Path(args.keep).resolve() if args.keep else Path(scratch_ctx.name)
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        script = scratch / "ort_quant.py"
        script.write_text(ORT_SCRIPT)
        for name, original, folder in chosen:
            model = snapshot(name, original, folder, scratch)
            fp32 = onnx.load(str(model.path))
            with np.load(model.eval, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files if k != "labels"}
                labels = z["labels"] if "labels" in z.files else None
            for vname, dtype, _ in graph_inputs(fp32):
                data[vname] = data[vname].astype(dtype)
            reference = run_eval(fp32, data, optimized=False)
            base = Run("fp32", "", "FP32 original", ort="yes")
            base.q, base.dq, base.dq32 = qdq_counts(fp32)
            base.ratio = 1.0
            m = metrics(reference, reference, labels)
            base.top1, base.agree, base.cosine = m["top1"], m["agree"], m["cosine"]
            m2 = metrics(reference, run_eval(fp32, data, optimized=True), labels)
            base.opt_metric = m2["top1"] if labels is not None else m2["agree"]
            if with_trt:
                t = trt_check(model.path, scratch / name / "fp32" / "trt", args.timeout)
                base.trt = "yes" if t.get("ok") else "no"
                if not t.get("ok"):
                    base.notes.append(f"TensorRT-RTX: {trt_reason(str((t.get('errors') or [t.get('error')])[0]))}")
            runs = [base]
            plans = [("ours", mth, f"ours / {mth}", None, False) for mth in OUR_METHODS]
            plans += [("onnxruntime", mth, f"ORT / {mth}", False, False) for mth in ORT_METHODS]
            plans += [("onnxruntime", mth, f"ORT+pre / {mth}", True, False) for mth in ORT_METHODS]
            # ORT's TensorRT-oriented variant: biases left in float (INT32 DequantizeLinear is not TensorRT's).
            plans += [("onnxruntime", "MinMax", "ORT / MinMax, QuantizeBias=False", False, True),
                      ("onnxruntime", "MinMax", "ORT+pre / MinMax, QuantizeBias=False", True, True)]
            for tool, method, label, pre, no_bias in plans:
                run = Run(tool, method, label)
                workdir = scratch / name / label.replace(" / ", "_").replace("+", "_").replace(", QuantizeBias=False", "_nobias")
                print(f"[quant] {name}: {label} ...", file=sys.stderr, flush=True)
                if tool == "ours":
                    cmd_for = lambda i, o, mth=method, md=model: our_command(md, i, o, mth)
                else:
                    pre_path = (workdir / "out" / "preprocessed.onnx") if pre else None
                    cmd_for = lambda i, o, mth=method, pp=pre_path, md=model, nb=no_bias: ort_command(
                        script, md, i, o, mth, pp, nb)
                out = execute(run, model, workdir, cmd_for, args.timeout)
                if out is not None:
                    assess(run, out, model, fp32, reference, data, labels, workdir / "trt", args.timeout, with_trt)
                if run.input_rewritten:
                    rewrites.append(f"`{name}` / {label}")
                status = f"failed: {run.failed}" if run.failed else (
                    f"ort={run.ort} top1={fmt(run.top1)} agree={fmt(run.agree, 1)} cos={fmt(run.cosine, 5)} "
                    f"ratio={fmt(run.ratio)} q/dq={run.q}/{run.dq} trt={run.trt}")
                print(f"[quant]   {fmt(run.wall_s)} s, {fmt(run.peak_mb, 0)} MB, {status}", file=sys.stderr, flush=True)
                runs.append(run)
            section = render_model(model, runs, with_trt)
            print("\n".join(section), flush=True)
            body += section
            best = best_run(model, runs)
            if best and not model.synthetic:
                summary.append(f"- `{name}`: {best.label} ({best_key_text(model, best)})")
        changed = [n for n, p in ((n, p) for n, p, _ in chosen) if sha256(p) != originals[n]]
        memory_lines: list[str] = []
        if not args.skip_memory:
            memory_lines, _mem = memory_scaling(scratch, args.timeout)
            print("\n".join(memory_lines), flush=True)
    finally:
        scratch_ctx.cleanup()

    tail = ["## Summary", ""]
    tail += (["Best accuracy per model with real data (outputs that run in ORT"
              + (" and parse in TensorRT-RTX" if with_trt else "") + "):", ""] + summary + [""]) if summary else []
    tail.append("In-place rewrites of the input model: " + (", ".join(rewrites) if rewrites else "none detected") + ".")
    if changed:
        tail.append("Repository models that changed during the run (another process edited them; every tool used "
                    "the snapshot taken at start): " + ", ".join(f"`{c}`" for c in changed) + ".")
    if code_fingerprint() != code_before:
        tail.append("WARNING: the optimizer's sources (optimizer/, passes/, calibration/) changed while this "
                    "benchmark ran (concurrent edits): the `ours` rows may come from different code versions. "
                    "Rerun for a consistent table.")
    tail.append("")
    text = "\n".join(header + ["## Results per model", ""] + body + memory_lines + tail)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n".join(tail))
    print(f"[quant] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
