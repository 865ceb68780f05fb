#!/usr/bin/env python
"""Benchmark INT8 quantization: ``optimize --int8`` (every ``--calib-method``, and ``auto`` with bias
correction off) against ONNX Runtime's ``quantize_static`` and NVIDIA ModelOpt's ONNX quantizer, on the
same calibration data, scored with each model's task metric; plus our calibration memory scaling.

    python bench/quant.py                                  # -> bench/quant_results.md
    python bench/quant.py --models digits_cnn yolo_dynamic --out /tmp/q.md
    python bench/quant.py --models crnn_ocr --skip-memory --no-trt --keep /tmp/qrun
    MODELOPT_PYTHON=.venv-modelopt/bin/python python bench/quant.py   # with ModelOpt (see bench/README.md)

Models (default): the three sample models (``sample_models/<m>/model.onnx`` with their ``calib.npz`` and
``eval.npz``) and seven zoo models (``sample_models/zoo/<m>.onnx``): ``yolo_dynamic`` (metric
``examples/metrics.py:detection_f1``), ``paddle_ocr_rec`` (``ctc_char_accuracy``), ``crnn_ocr``
(``ctc_char_accuracy_time_major``), ``tiny_detector`` (``bench/quant_metrics.py:tiny_detector_f1``),
``mobilenet_v2_tiny`` (argmax agreement), ``hf_bert`` (cosine), ``transformer_mha`` (argmax agreement).
The zoo's ``.npz`` files hold only 8 samples, so the zoo models get fresh seeded samples from the zoo
builder's own generators (``sample_models/zoo/build_zoo.py``: ``scene_batch``, ``text_lines``,
``image_batch``, ``zipf_ids``; the CRNN, BERT and MHA recipes are inline in the builder and are copied
here): 32 calibration + 32 evaluation samples (disjoint seeds) and 32 more ("unseen") that only this
script evaluates on (``yolo_dynamic``: 16 + 16 + 16 at 3x320x320, the slowest model). ``--zoo-npz`` uses the 8 npz samples for calibration and evaluation instead.
``light_*`` models of the onnx wheel can be picked with ``--models`` (seeded synthetic data; their
weights are constant fills, so accuracy there means nothing).

Every tool run is its own child process, measured like ``bench/bench.py`` does (whole-process wall time
and peak RSS via ``/usr/bin/time -f '%e %M'``, see ``bench/measure.py``). Each run gets a private copy of
the FP32 model in a temporary folder and writes its output there; the copy's SHA-256 and mtime are
checked afterwards (did the tool rewrite its input?) and new files beside the input or in the child's
working directory are listed.

For every output model: the task metric (for ours from the JSON report, ``accuracy.metric``; for the
other tools computed here, by running the original and the output in ONNX Runtime on the CPU with graph
optimizations off and calling the same metric function; the same computation is repeated for our
outputs as a cross-check), file compression (input file bytes / output file bytes), weight ratio,
top-1 / argmax agreement / cosine of the first output, the metric with all of ORT's optimizations
(its INT8 kernels), Q/DQ node counts, and whether TensorRT-RTX parses and builds it
(``optimize check-trt OUT --build`` in a child process, exit code 0).

This script imports nothing from ``optimizer``/``passes``/``calibration`` in-process: those are measured
as a black box through the CLI. ONNX Runtime's and ModelOpt's quantizers run in child processes too.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
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
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ scripts share measure.py
import quant_metrics  # noqa: E402
from measure import ChildRun, _measured, iter_graphs  # noqa: E402
from onnx import numpy_helper  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO / "sample_models"
ZOO_DIR = SAMPLES_DIR / "zoo"
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
#: model -> the ``--metric`` we pass to ``optimize`` (paths are made absolute: children run elsewhere)
SAMPLE_MODELS = {"digits_cnn": "top1", "channel_last": "top1", "transformer": "argmax-agreement"}
ZOO_MODELS = {
    "yolo_dynamic": "examples/metrics.py:detection_f1",
    "paddle_ocr_rec": "examples/metrics.py:ctc_char_accuracy",
    "crnn_ocr": "examples/metrics.py:ctc_char_accuracy_time_major",
    "tiny_detector": "bench/quant_metrics.py:tiny_detector_f1",
    "mobilenet_v2_tiny": "argmax-agreement",
    "hf_bert": "cosine",
    "transformer_mha": "argmax-agreement",
}
LIGHT_METRIC = "argmax-agreement"
OUR_METHODS = ("auto", "minmax", "percentile", "entropy", "mse", "sqnr")
FIXED_METHODS = OUR_METHODS[1:]
BC_OFF = "auto, bias_correction=off"
BC_ON = "auto, bias_correction=on"
BC_MODES = {BC_OFF: "off", BC_ON: "on"}
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
MODELOPT_METHODS = ("max", "entropy")
ZOO_SAMPLES = 32  # calibration, evaluation and unseen samples each, per zoo model
YOLO_SAMPLES = 16  # yolo_dynamic (3x320x320, the slowest model by far) gets fewer, to keep the run near 15 min
SYNTH_CALIB_SAMPLES, SYNTH_EVAL_SAMPLES = 32, 8
CALIB_SEED, EVAL_SEED, UNSEEN_SEED = 0, 1, 2
EVAL_BATCH = 32  # the optimizer evaluates in batches of 32 (1 for a model with a fixed batch of 1)
MEM_SMALL, MEM_LARGE = 32, 512
MEM_REPEATS = 3
MAX_RUNTIME_IR = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14
ORT_BATCH = 16  # calibration batch for ORT when the model's batch dimension is dynamic
WITHIN = 0.5  # points: "auto is within 0.5 points of the best fixed method"

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
p.add_argument("--min-opset", type=int, default=0, help="upgrade a model below this opset first (onnx version_converter)")
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


def short(exc):
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"


notes = []
stage = "opset upgrade"
try:
    src = a.model
    _, opset = real_inputs(a.model)
    if a.min_opset and opset is not None and opset < a.min_opset:
        # per-channel DequantizeLinear (axis) needs opset 13: ORT leaves the opset as it is and writes an invalid
        # graph, so the model is upgraded first, as optimize --int8 does with upgrade-opset
        from onnx import version_converter
        upgraded = a.out[:-len(".onnx")] + f".opset{a.min_opset}.onnx"
        onnx.save(version_converter.convert_version(onnx.load(a.model), a.min_opset), upgraded)
        src = upgraded
        notes.append(f"opset {opset} upgraded to {a.min_opset} first (onnx.version_converter): per-channel "
                     "DequantizeLinear needs 13, and ORT keeps the model's opset")
    stage = "pre-process"
    if a.preprocess:
        # ORT's recommended first step; "if needed" fallbacks: without its symbolic shape inference
        # (fails on some dynamic models), then without pre-processing at all.
        start = src
        try:
            quant_pre_process(start, a.preprocess)
            src = a.preprocess
        except Exception as exc:
            try:
                quant_pre_process(start, a.preprocess, skip_symbolic_shape=True)
                src = a.preprocess
                notes.append(f"quant_pre_process failed ({short(exc)}); pre-processed with skip_symbolic_shape=True")
            except Exception as exc2:
                notes.append(f"quant_pre_process failed ({short(exc)}; with skip_symbolic_shape=True: {short(exc2)}); "
                             "quantized without pre-processing")
        if src == a.preprocess:
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

# NVIDIA ModelOpt's ONNX PTQ, run by the ModelOpt interpreter (its own environment: see bench/README.md).
MODELOPT_SCRIPT = r'''
import argparse, json, sys, traceback
import numpy as np
import onnx

p = argparse.ArgumentParser()
p.add_argument("model"); p.add_argument("out"); p.add_argument("calib"); p.add_argument("--method", required=True)
a = p.parse_args()
stage = "import"
try:
    from modelopt.onnx.quantization import quantize
    stage = "quantize"
    m = onnx.load(a.model, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
              for v in m.graph.input if v.name not in inits}
    with np.load(a.calib, allow_pickle=False) as z:
        data = {n: z[n].astype(dt) for n, dt in dtypes.items()}
    quantize(a.model, quantize_mode="int8", calibration_data=data, calibration_method=a.method,
             calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=a.out, log_level="WARNING")
except Exception as exc:
    traceback.print_exc()
    msg = " ".join(str(exc).split()) or type(exc).__name__
    print(json.dumps({"failed_stage": stage, "error": f"{type(exc).__name__}: {msg}", "notes": []}))
    sys.exit(3)
print(json.dumps({"failed_stage": None, "notes": []}))
'''


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
    kind: str  # "sample" / "zoo" / "light"
    path: Path  # the snapshot in the scratch folder
    calib: Path
    eval: Path
    unseen: Path | None  # extra evaluation samples only this script uses (zoo models)
    metric_cli: str  # what --metric gets (absolute path for a file metric)
    metric_name: str  # short name for the tables
    data_note: str
    synthetic: bool = False
    labels: bool = False

    def metric_fn(self):
        return quant_metrics.BY_CLI_NAME[self.metric_name]


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


_ZOO_BUILDER = None


def zoo_builder():
    """``sample_models/zoo/build_zoo.py`` as a module (it imports torch; only its data generators are used)."""
    global _ZOO_BUILDER
    if _ZOO_BUILDER is None:
        spec = importlib.util.spec_from_file_location("build_zoo", ZOO_DIR / "build_zoo.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        _ZOO_BUILDER = module
    return _ZOO_BUILDER


def crnn_lines(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``build_crnn``'s text-line recipe (inline in the builder): dark vertical strokes on light paper."""
    x = np.full((n, 1, 32, 64), 0.9, np.float32)
    for i in range(n):
        for _ in range(10):
            c0 = int(rng.integers(0, 60)); wdt = int(rng.integers(1, 4))  # noqa: E702
            r0 = int(rng.integers(4, 10)); r1 = int(rng.integers(22, 28))  # noqa: E702
            x[i, 0, r0:r1, c0:c0 + wdt] = rng.uniform(0.0, 0.3)
    x += rng.normal(0, 0.05, x.shape).astype(np.float32)
    return {"image": ((x - 0.5) / 0.5).astype(np.float32)}


def zoo_generators() -> dict:
    bz = zoo_builder()
    return {
        "yolo_dynamic": lambda r, n: {"images": bz.scene_batch(r, n, 320, 320)},
        "paddle_ocr_rec": lambda r, n: {"x": bz.text_lines(r, n)},
        "crnn_ocr": crnn_lines,
        "tiny_detector": lambda r, n: {"images": bz.image_batch(r, (n, 3, 48, 48))},
        "mobilenet_v2_tiny": lambda r, n: {"input": bz.image_batch(r, (n, 3, 32, 32))},
        "hf_bert": bz.bert_rows,
        "transformer_mha": lambda r, n: {"features": r.normal(size=(n, 10, 12)).astype(np.float32)},
    }


ZOO_DATA_NOTES = {
    "yolo_dynamic": "`scene_batch(rng, n, 320, 320)` (photo-like scenes, ImageNet-normalized)",
    "paddle_ocr_rec": "`text_lines(rng, n)` (3×48×320 text lines in [-1, 1]; batch fixed to 1)",
    "crnn_ocr": "`build_crnn`'s stroke recipe (copied: it is inline in the builder), 1×32×64",
    "tiny_detector": "`image_batch(rng, (n, 3, 48, 48))` (smooth patterns + noise)",
    "mobilenet_v2_tiny": "`image_batch(rng, (n, 3, 32, 32))`",
    "hf_bert": "`build_hf_bert`'s row recipe (copied) with `zipf_ids`, sequence 16, padding on most rows",
    "transformer_mha": "`rng.normal(size=(n, 10, 12))` (the builder's recipe)",
}


def zoo_seed(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng((seed, zlib.crc32(name.encode())))


def select_models(wanted: list[str] | None) -> list[tuple[str, str, Path]]:
    """(name, kind, original path) for every requested model."""
    known = [(m, "sample", SAMPLES_DIR / m / "model.onnx") for m in SAMPLE_MODELS]
    known += [(m, "zoo", ZOO_DIR / f"{m}.onnx") for m in ZOO_MODELS]
    light = [(p.stem, "light", p) for p in sorted(LIGHT_DIR.glob("light_*.onnx"))]
    if not wanted:
        return known
    chosen = []
    for item in wanted:
        hits = [x for x in known + light if x[0] == item] or [x for x in known + light if item in x[0]]
        if not hits:
            sys.exit(f"quant bench: no model matches {item!r}; known: {', '.join(x[0] for x in known + light)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def metric_argument(spec: str) -> str:
    """A file metric as an absolute ``path.py:function`` (the children run in their own folders)."""
    path, sep, fn = spec.rpartition(":")
    return f"{REPO / path}:{fn}" if sep and path.endswith(".py") else spec


def snapshot(name: str, kind: str, original: Path, scratch: Path, zoo_npz: bool, zoo_samples: int) -> Model:
    """Copy the model and its data (or generate seeded data) into the scratch folder."""
    dest = scratch / name / "fp32"
    dest.mkdir(parents=True)
    shutil.copy2(original, dest / "model.onnx")
    calib, evals = dest / "calib.npz", dest / "eval.npz"
    if kind == "sample":
        folder = original.parent
        shutil.copy2(folder / "calib.npz", calib)
        shutil.copy2(folder / "eval.npz", evals)
        with np.load(evals, allow_pickle=False) as z:
            labels = "labels" in z.files
            n_eval = len(z[z.files[0]])
        with np.load(calib, allow_pickle=False) as z:
            n_calib = len(z[z.files[0]])
        spec = SAMPLE_MODELS[name]
        note = (f"`calib.npz` ({n_calib} samples) for calibration, all of `eval.npz` ({n_eval}) for evaluation"
                + (" (top-1 against its labels)" if labels else " (no labels)"))
        return Model(name, kind, dest / "model.onnx", calib, evals, None, metric_argument(spec), spec, note,
                     labels=labels)
    if kind == "zoo":
        spec = ZOO_MODELS[name]
        if zoo_npz:
            shutil.copy2(ZOO_DIR / f"{name}.npz", calib)
            shutil.copy2(ZOO_DIR / f"{name}.npz", evals)
            note = (f"the zoo's `{name}.npz` (8 samples) for calibration AND evaluation (the same 8 samples: "
                    "`--zoo-npz`)")
            return Model(name, kind, dest / "model.onnx", calib, evals, None, metric_argument(spec), spec, note)
        gen = zoo_generators()[name]
        unseen = dest / "unseen.npz"
        for path, seed in ((calib, CALIB_SEED), (evals, EVAL_SEED), (unseen, UNSEEN_SEED)):
            np.savez(path, **gen(zoo_seed(seed, name), zoo_samples))
        note = (f"generated with `build_zoo.py`'s {ZOO_DATA_NOTES[name]}: {zoo_samples} calibration samples "
                f"(rng seed ({CALIB_SEED}, crc32(name))), {zoo_samples} evaluation samples (seed ({EVAL_SEED}, …); "
                f"`--data`), and {zoo_samples} unseen samples (seed ({UNSEEN_SEED}, …)) that only the benchmark "
                "evaluates on")
        return Model(name, kind, dest / "model.onnx", calib, evals, unseen, metric_argument(spec), spec, note)
    model = onnx.load(str(dest / "model.onnx"))
    synthetic_npz(model, calib, SYNTH_CALIB_SAMPLES, CALIB_SEED)
    synthetic_npz(model, evals, SYNTH_EVAL_SAMPLES, EVAL_SEED)
    note = (f"seeded synthetic data: calibration {SYNTH_CALIB_SAMPLES} samples (seed {CALIB_SEED}), evaluation "
            f"{SYNTH_EVAL_SAMPLES} samples (seed {EVAL_SEED}); the weights are constant fills, so outputs are "
            "near-uniform and the accuracy columns are NOT meaningful")
    return Model(name, kind, dest / "model.onnx", calib, evals, None, LIGHT_METRIC, LIGHT_METRIC, note, synthetic=True)


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


def structure_key(model: onnx.ModelProto) -> str:
    """SHA-256 of the model with every tensor's values dropped (names, dtypes and shapes kept): outputs
    that differ only in scales or weight values share one TensorRT-RTX check."""
    m = onnx.ModelProto.FromString(model.SerializeToString())

    def strip(t: onnx.TensorProto) -> None:
        keep = (t.name, t.data_type, list(t.dims))
        t.Clear()
        t.name, t.data_type = keep[0], keep[1]
        t.dims.extend(keep[2])

    for g in iter_graphs(m.graph):
        for t in g.initializer:
            strip(t)
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    strip(a.t)
    return hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest()


def ort_session(model: onnx.ModelProto, optimized: bool):
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.ir_version = min(model.ir_version, MAX_RUNTIME_IR)
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@dataclass
class EvalData:
    """Evaluation batches as the optimizer forms them: 32 samples (the model's fixed batch if it has one)."""

    batches: list[dict[str, np.ndarray]]
    labels: list[np.ndarray | None]
    sizes: list[int]


def eval_data(fp32: onnx.ModelProto, path: Path) -> EvalData:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    labels = arrays.pop("labels", None)
    specs = graph_inputs(fp32)
    fixed = {dims[0] for _, _, dims in specs if dims and dims[0]}
    batch = fixed.pop() if fixed else EVAL_BATCH
    n = min(len(arrays[name]) for name, _, _ in specs)
    batches, labs, sizes = [], [], []
    for s in range(0, n, batch):
        feed = {name: arrays[name][s:s + batch].astype(dtype) for name, dtype, _ in specs}
        size = next(iter(feed.values())).shape[0]
        if fixed and size != batch:
            break
        batches.append(feed)
        labs.append(None if labels is None else labels[s:s + batch])
        sizes.append(size)
    return EvalData(batches, labs, sizes)


def run_model(model: onnx.ModelProto, data: EvalData, optimized: bool, names: list[str]) -> list[dict[str, np.ndarray]]:
    """Every output, per batch, keyed by the FP32 model's output names (matched by name, else by position)."""
    session = ort_session(model, optimized)
    own = [o.name for o in session.get_outputs()]
    order = [n if n in own else own[i] for i, n in enumerate(names)]
    wanted = [i.name for i in session.get_inputs()]
    out = []
    for feed in data.batches:
        values = session.run(order, {k: v for k, v in feed.items() if k in wanted})
        out.append(dict(zip(names, values)))
    return out


def metric_score(fn, outputs: list[dict], reference: list[dict], data: EvalData) -> float:
    """The metric per batch, averaged with sample weights (the optimizer's MetricAccumulator)."""
    scores = [fn(o, r, lab) for o, r, lab in zip(outputs, reference, data.labels)]
    return float(np.average(scores, weights=data.sizes))


def first_output(per_batch: list[dict], name: str) -> np.ndarray:
    parts = [b[name] for b in per_batch]
    try:
        return np.concatenate(parts, axis=0)
    except ValueError:  # a time-major output: batch on axis 1
        return np.concatenate(parts, axis=1)


def output_metrics(reference: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> dict:
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
    """``optimize check-trt PATH --build --json`` in a child: exit code 0 = parsed, no unsupported node, built."""
    child = run_child([sys.executable, "-m", "optimizer.cli", "check-trt", str(path), "--build", "--json"],
                      logdir, REPO, timeout)
    data = last_json(child.stdout) or {}
    if child.timed_out:
        return {"ok": False, "cell": f"check timed out after {timeout:.0f} s", "note": None}
    if child.returncode == 0:
        return {"ok": True, "cell": "yes", "note": None}
    if not data:
        return {"ok": False, "cell": "check failed", "note": f"check-trt exit {child.returncode}: {one_line(child.stderr)}"}
    unsupported = data.get("unsupported") or []
    errors = data.get("errors") or []
    first = errors[0] if errors else ((unsupported[0].get("reason") if isinstance(unsupported[0], dict) else str(unsupported[0]))
                                      if unsupported else one_line(child.stderr))
    if not data.get("parsed"):
        cell = "no (parse error)"
    elif unsupported:
        ops = sorted({(u.get("op_type") if isinstance(u, dict) else "?") for u in unsupported})
        cell = f"no ({len(unsupported)} unsupported: {', '.join(map(str, ops))})"
    else:
        cell = "parses, build fails"
    return {"ok": False, "cell": cell, "note": f"TensorRT-RTX: {trt_reason(str(first))}"}


# -- one tool run ------------------------------------------------------------------------------
@dataclass
class Run:
    tool: str  # "ours" / "onnxruntime" / "modelopt" / "fp32"
    method: str
    label: str
    wall_s: float | None = None
    peak_mb: float | None = None
    failed: str | None = None
    skipped: str | None = None
    ort: str = "–"  # "yes" / "no: ..."
    metric_fp32: float | None = None  # the metric of the original (for ours: the report's)
    metric: float | None = None  # the metric of the output (for ours: the report's)
    bench_metric: float | None = None  # the metric as this script computes it (ORT, optimizations off)
    unseen_metric: float | None = None  # on the unseen samples (zoo)
    opt_metric: float | None = None  # the metric with ORT's graph optimizations on
    top1: float | None = None
    agree: float | None = None
    cosine: float | None = None
    ratio: float | None = None  # weight bytes, FP32 / output
    compression: float | None = None  # file bytes, input / output
    q: int | None = None
    dq: int | None = None
    dq32: int | None = None
    trt: str = "–"
    trt_ok: bool | None = None
    chosen: str | None = None  # auto's choice (ours)
    rolled_back: bool = False  # ours: quantize-int8 was rolled back, the output is float
    bias: dict | None = None  # the report's bias-correction details (ours)
    notes: list[str] = field(default_factory=list)
    input_rewritten: bool | None = None
    stray: list[str] = field(default_factory=list)

    @property
    def drop(self) -> float | None:
        return None if self.metric is None or self.metric_fp32 is None else self.metric_fp32 - self.metric


def our_command(model: Model, inp: Path, out: Path, method: str) -> list[str]:
    """``optimize --int8`` = default preset + upgrade-opset(min=13) + quantize-int8(method=M) (cli.pipeline_from_args);
    the bias-correction-off row spells that pipeline out with the option set."""
    base = [sys.executable, "-m", "optimizer.cli", str(inp), "-o", str(out)]
    tail = ["--calib", str(model.calib), "--data", str(model.eval), "--metric", model.metric_cli, "--json"]
    if method in BC_MODES:
        return base + ["--passes", f"default,upgrade-opset(min=13),quantize-int8(method=auto,bias_correction={BC_MODES[method]})"] + tail
    return base + ["--int8", "--calib-method", method] + tail


def ort_command(script: Path, model: Model, inp: Path, out: Path, method: str, pre: Path | None,
                no_bias_quant: bool = False) -> list[str]:
    cmd = [sys.executable, str(script), str(inp), str(out), str(model.calib), "--method", method,
           "--batch", str(ORT_BATCH), "--min-opset", "13"]
    return cmd + (["--preprocess", str(pre)] if pre else []) + (["--no-bias-quant"] if no_bias_quant else [])


def modelopt_command(python: str, script: Path, model: Model, inp: Path, out: Path, method: str) -> list[str]:
    return [python, str(script), str(inp), str(out), str(model.calib), "--method", method]


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
        run.notes.append("REWROTE ITS INPUT FILE (hash or mtime changed)" + rewrite_detail(model.path, inp))
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
            details = quant[-1].get("details") or {}
            skipped = ", ".join(f"{k[len('skipped_'):]} {v}" for k, v in stats.items() if k.startswith("skipped_"))
            run.notes.append("quantize-int8: quantized nodes {}, activations {}, weights {}{}".format(
                stats.get("quantized_nodes", 0), stats.get("quantized_activations", 0),
                stats.get("quantized_weights", 0), f"; skipped: {skipped}" if skipped else ""))
            calib = details.get("calibration") or {}
            if calib.get("synthetic"):
                run.notes.append("calibrated on SYNTHETIC data (the --calib file was not used)")
            selection = details.get("method_selection") or {}
            run.chosen = selection.get("chosen")
            run.bias = details.get("bias_correction")
            if quant[-1].get("rolled_back"):
                run.rolled_back = True
                run.notes.append(f"quantize-int8 was ROLLED BACK ({quant[-1].get('verification')}: "
                                 f"{one_line(quant[-1].get('error') or quant[-1].get('verification_detail'), 160)})")
        else:
            run.notes.append("no quantize-int8 pass in the report")
        if report.get("status") != "ok" or child.returncode != 0:
            run.failed = f"{report.get('status')} (exit {child.returncode}): {one_line(report.get('error') or child.stderr)}"
            return None
        metric = (report.get("accuracy") or {}).get("metric") or {}
        run.metric_fp32, run.metric = metric.get("original"), metric.get("optimized")
        if run.metric is None:
            run.notes.append("the report has no accuracy.metric")
    else:
        run.notes += (report or {}).get("notes") or []
    if run.tool != "ours" and child.returncode != 0:
        if report and report.get("failed_stage"):
            run.failed = f"{report['failed_stage']} raised {one_line(report['error'], 160)}"
        else:
            run.failed = f"exit {child.returncode}: {one_line(child.stderr or child.stdout)}"
        return None
    if not out.is_file():
        run.failed = f"no output written: {one_line(child.stderr or child.stdout)}"
        return None
    return out


def rewrite_detail(original: Path, rewritten: Path) -> str:
    """What an in-place rewrite changed, if it is only annotations."""
    try:
        a, b = onnx.load(str(original)), onnx.load(str(rewritten))
    except Exception:
        return ": it no longer loads"
    counts = (len(a.graph.value_info), len(b.graph.value_info))
    for m in (a, b):
        del m.graph.value_info[:]
    if a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True):
        return (f": only its value_info was rewritten (shape inference; {counts[0]} → {counts[1]} entries), "
                "the graph is the same")
    return ": the graph changed"


@dataclass
class Reference:
    fp32: onnx.ModelProto
    names: list[str]
    data: EvalData
    outputs: list[dict]
    unseen: EvalData | None
    unseen_outputs: list[dict] | None
    trt_cache: dict = field(default_factory=dict)  # structure key -> (result, label of the run checked)


def assess(run: Run, out: Path, model: Model, ref: Reference, scratch_log: Path, timeout: float, with_trt: bool) -> None:
    try:
        proto = onnx.load(str(out))
    except Exception as exc:
        run.failed = f"output does not load in onnx: {one_line(str(exc))}"
        return
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        run.notes.append(f"onnx.checker (full_check) rejects the output: {one_line(str(exc), 160)}")
    ops = [next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None) for m in (ref.fp32, proto)]
    if ops[0] != ops[1]:
        run.notes.append(f"output's default-domain opset is {ops[1]} (input: {ops[0]})")
    if proto.ir_version > MAX_RUNTIME_IR:
        run.notes.append(f"wrote IR version {proto.ir_version}")
    run.q, run.dq, run.dq32 = qdq_counts(proto)
    out_bytes = weight_bytes(proto)
    run.ratio = weight_bytes(ref.fp32) / out_bytes if out_bytes else None
    run.compression = model.path.stat().st_size / out.stat().st_size
    fn = model.metric_fn()
    first = ref.names[0]
    try:
        outs = run_model(proto, ref.data, optimized=False, names=ref.names)
        run.bench_metric = metric_score(fn, outs, ref.outputs, ref.data)
        labels = np.concatenate(ref.data.labels) if model.labels else None
        m = output_metrics(first_output(ref.outputs, first), first_output(outs, first), labels)
        run.top1, run.agree, run.cosine = m["top1"], m["agree"], m["cosine"]
        run.ort = "yes"
        if m["zero"]:
            run.notes.append("the first output is ALL ZEROS on the eval data")
        if ref.unseen is not None:
            run.unseen_metric = metric_score(fn, run_model(proto, ref.unseen, False, ref.names), ref.unseen_outputs,
                                             ref.unseen)
    except Exception as exc:
        run.ort = "no"
        run.notes.append(f"ONNX Runtime (optimizations off) fails: {one_line(str(exc), 160)}")
    if run.tool != "ours":
        run.metric = run.bench_metric
        run.metric_fp32 = ref_metric(model, ref)
    elif run.metric is not None and run.bench_metric is not None and abs(run.metric - run.bench_metric) > 0.01:
        run.notes.append(f"the report's metric {run.metric:.3f} differs from this script's {run.bench_metric:.3f}")
    try:
        run.opt_metric = metric_score(fn, run_model(proto, ref.data, optimized=True, names=ref.names), ref.outputs,
                                      ref.data)
        if run.ort == "no":
            run.ort = "opt-all only"
    except Exception as exc:
        run.ort = "no" if run.ort == "no" else "no-opt only"
        run.notes.append(f"ONNX Runtime (all optimizations) fails: {one_line(str(exc), 160)}")
    if with_trt:
        key = structure_key(proto)
        if key not in ref.trt_cache:
            ref.trt_cache[key] = trt_check(out, scratch_log, timeout)
        t = ref.trt_cache[key]
        run.trt, run.trt_ok = t["cell"], t["ok"]
        if t["note"]:
            run.notes.append(t["note"])


def ref_metric(model: Model, ref: Reference) -> float:
    return metric_score(model.metric_fn(), ref.outputs, ref.outputs, ref.data)


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
    results: dict[int, list[tuple]] = {MEM_SMALL: [], MEM_LARGE: []}
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
        f"method: auto) with X = the first {MEM_SMALL} images of `calib.npz`, or {MEM_LARGE} images (the 128 "
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


def fmt_metric(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def fmt_cos(c) -> str:
    return "–" if c is None else (f"{c:.6f}" if c > 0.9999 else f"{c:.4f}")


def render_model(model: Model, runs: list[Run], with_trt: bool) -> list[str]:
    unseen = model.unseen is not None
    lines = [f"### `{model.name}` — metric `{model.metric_name}`", "", f"Data: {model.data_note}.", "",
             "| tool / method | wall s | peak MB | metric FP32 | metric INT8 | drop | "
             + ("unseen INT8 | " if unseen else "") + "ORT opt-all | file compression | weight ratio | "
             "top-1 % | argmax agree % | cosine | Q / DQ (int32 DQ) | TRT-RTX parse + build |",
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if unseen else "") + "---:|---:|---:|---:|---:|---:|---|---|"]
    for r in runs:
        if r.failed or r.skipped:
            cells = 13 if unseen else 12
            what = f"failed: {r.failed}" if r.failed else f"skipped: {r.skipped}"
            lines.append(f"| {r.label} | {fmt(r.wall_s)} | {fmt(r.peak_mb, 0)} | {what} |" + " |" * (cells - 3))
            continue
        qdq = "–" if r.q is None else f"{r.q} / {r.dq}" + (f" ({r.dq32})" if r.dq32 else "")
        label = r.label + (f" → {r.chosen}" if r.chosen else "") + (" (ROLLED BACK: float output)" if r.rolled_back else "")
        lines.append(
            f"| {label} | {fmt(r.wall_s)} | {fmt(r.peak_mb, 0)} | {fmt_metric(r.metric_fp32)} | {fmt_metric(r.metric)} | "
            f"{fmt(r.drop)} | " + (f"{fmt_metric(r.unseen_metric)} | " if unseen else "")
            + f"{fmt_metric(r.opt_metric)} | {fmt(r.compression, 2, '×')} | {fmt(r.ratio, 2, '×')} | {fmt(r.top1)} | "
            f"{fmt(r.agree, 1)} | {fmt_cos(r.cosine)} | {qdq} | {r.trt if with_trt else 'not run'} |")
    grouped: dict[str, list[str]] = {}  # the same note on several runs is listed once
    for r in runs:
        for n in r.notes:
            grouped.setdefault(n, []).append(r.label)
    notes = [f"- {', '.join(labels)}: {n}" for n, labels in grouped.items()]
    if notes:
        lines += ["", "Notes:", ""] + notes
    return lines + [""]


def ok_runs(runs: list[Run], tool: str) -> list[Run]:
    return [r for r in runs if r.tool == tool and not r.failed and not r.skipped and r.metric is not None]


def best_of(runs: list[Run]) -> Run | None:
    return max(runs, key=lambda r: (r.metric, r.cosine or 0.0)) if runs else None


def auto_verdict(runs: list[Run]) -> dict | None:
    """auto (bias_correction=auto) vs the best fixed method, on the report's metric."""
    auto = next((r for r in ok_runs(runs, "ours") if r.method == "auto"), None)
    fixed = [r for r in ok_runs(runs, "ours") if r.method in FIXED_METHODS and not r.rolled_back]
    if auto is None or not fixed:
        return None
    best = best_of(fixed)
    rolled = [r.method for r in ok_runs(runs, "ours") if r.method in FIXED_METHODS and r.rolled_back]
    return {"auto": auto, "best": best, "gap": best.metric - auto.metric, "within": auto.metric >= best.metric - WITHIN,
            "rolled": rolled}


def drop_text(r: Run | None, with_method: bool = False) -> str:
    if r is None:
        return "–"
    method = f" ({r.method})" if with_method else ""
    return f"{r.metric:.2f}{method}" + (f" (−{r.drop:.2f})" if r.drop and r.drop > 0.005 else "")


def trt_count(runs: list[Run]) -> str:
    checked = [r for r in runs if r.trt_ok is not None]
    return f"{sum(r.trt_ok for r in checked)}/{len(checked)}" if checked else "–"


def compact_table(results: list[tuple[Model, list[Run]]], with_trt: bool, modelopt_note: str | None) -> list[str]:
    lines = ["| model, metric | FP32 | ours `auto` | ours best fixed | ORT best | ModelOpt best | file compression ours / ORT / MO "
             "| wall s ours / ORT / MO | peak MB ours / ORT / MO | TRT-RTX builds ours / ORT / MO |",
             "|---|---:|---:|---:|---:|---:|---|---|---|---|"]
    for model, runs in results:
        fp32 = next((r for r in runs if r.tool == "fp32"), None)
        verdict = auto_verdict(runs)
        auto = verdict["auto"] if verdict else None
        best_fixed = verdict["best"] if verdict else None
        ort = best_of([r for r in ok_runs(runs, "onnxruntime") if "QuantizeBias" not in r.label])
        mo = best_of(ok_runs(runs, "modelopt"))
        ours_all = [r for r in runs if r.tool == "ours"]
        ort_all = [r for r in runs if r.tool == "onnxruntime" and "QuantizeBias" not in r.label]
        mo_all = [r for r in runs if r.tool == "modelopt"]
        if mo is None and mo_all and all(r.failed for r in mo_all):
            mo_cell = "failed"
        elif mo is None:
            mo_cell = "skipped" if modelopt_note else "–"
        else:
            mo_cell = drop_text(mo, True)
        if ort is None and ort_all:
            ort_cell = "failed"
        else:
            ort_cell = drop_text(ort, True)
        trio = lambda f, d=2, s="": " / ".join(fmt(f(x), d, s) if x else "–" for x in (auto, ort, mo))  # noqa: E731
        lines.append(
            f"| {model.name}, {model.metric_name.split(':')[-1]} | {fmt_metric(fp32.metric_fp32 if fp32 else None)} | "
            f"{drop_text(auto)}{' → ' + auto.chosen if auto and auto.chosen else ''} | {drop_text(best_fixed, True)} | "
            f"{ort_cell} | {mo_cell} | {trio(lambda x: x.compression, 2, '×')} | {trio(lambda x: x.wall_s, 1)} | "
            f"{trio(lambda x: x.peak_mb, 0)} | "
            + (f"{trt_count(ours_all)} / {trt_count(ort_all)} / {trt_count(mo_all)}" if with_trt else "not run") + " |")
    return lines


def auto_table(results: list[tuple[Model, list[Run]]]) -> list[str]:
    lines = ["| model | metric | `auto` (its choice) | best fixed method | gap | auto within 0.5 points? | "
             "`auto` on unseen samples | best fixed on unseen | fixed methods rolled back (float output, excluded) |",
             "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for model, runs in results:
        v = auto_verdict(runs)
        if v is None:
            lines.append(f"| {model.name} | {model.metric_name} | – | – | – | n/a (a run failed) | – | – | – |")
            continue
        fixed = [r for r in ok_runs(runs, "ours")
                 if r.method in FIXED_METHODS and r.unseen_metric is not None and not r.rolled_back]
        unseen_best = max(fixed, key=lambda r: r.unseen_metric) if fixed else None
        lines.append(
            f"| {model.name} | {model.metric_name.split(':')[-1]} | {v['auto'].metric:.2f} ({v['auto'].chosen or '?'}) | "
            f"{v['best'].metric:.2f} ({v['best'].method}) | {v['gap']:+.2f} | {'**yes**' if v['within'] else '**NO**'} | "
            f"{fmt(v['auto'].unseen_metric)} | "
            + (f"{unseen_best.unseen_metric:.2f} ({unseen_best.method})" if unseen_best else "–")
            + f" | {', '.join(v['rolled']) or 'none'} |")
    return lines


def bias_table(results: list[tuple[Model, list[Run]]]) -> list[str]:
    lines = ["| model | off | on (forced) | on − off | unseen: off / on | `auto` (default: bias_correction=auto) | "
             "auto's in-pass test: corrected layers, score on / off | kept? | helps? |",
             "|---|---:|---:|---:|---|---:|---|---|---|"]
    for model, runs in results:
        ours = ok_runs(runs, "ours")
        auto = next((r for r in ours if r.method == "auto"), None)
        off = next((r for r in ours if r.method == BC_OFF), None)
        on = next((r for r in ours if r.method == BC_ON), None)
        if off is None or on is None:
            lines.append(f"| {model.name} | {drop_text(off)} | {drop_text(on)} | – | – | {drop_text(auto)} | – | – | – |")
            continue
        b = (auto.bias if auto else None) or {}
        inpass = (f"{b.get('applied', 0)}, {fmt(b.get('score_on'), 3)} / {fmt(b.get('score_off'), 3)}"
                  if b else "no correction (nothing to correct, or synthetic data)")
        kept = ("yes" if b.get("kept") else "no (undone)") if b else "–"
        diff = on.metric - off.metric
        unseen_diff = (on.unseen_metric - off.unseen_metric) if on.unseen_metric is not None and \
            off.unseen_metric is not None else None
        ref = unseen_diff if unseen_diff is not None else diff
        helps = "hurts" if ref < -0.005 else ("helps" if ref > 0.005 else "no change")
        if on.chosen != off.chosen:
            helps += f" (auto chose {off.chosen} off, {on.chosen} on)"
        lines.append(f"| {model.name} | {off.metric:.2f} | {on.metric:.2f} | {diff:+.2f} | "
                     f"{fmt(off.unseen_metric)} / {fmt(on.unseen_metric)} | "
                     f"{drop_text(auto)}{' → ' + auto.chosen if auto and auto.chosen else ''} | {inpass} | {kept} | "
                     f"{helps} |")
    return lines


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
    def git(*a):  # not stripped: a porcelain line starts with a space (" M path")
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines() if ln.strip()]
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("QUANT_BENCH_CODE", "git state unknown")
    if not commit:
        return os.environ.get("QUANT_BENCH_CODE", "git state unknown")
    return f"commit {commit}" + (f" + uncommitted changes to {', '.join(dirty[:8])}" if dirty else " (clean)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def find_modelopt(explicit: str | None) -> tuple[str | None, str]:
    """(interpreter, description): ``--modelopt-python``, else ``$MODELOPT_PYTHON``, else this interpreter if it
    has ModelOpt. Its version is read in a child (nothing of it is imported here)."""
    candidates = [c for c in (explicit, os.environ.get("MODELOPT_PYTHON")) if c]
    if importlib.util.find_spec("modelopt") is not None:
        candidates.append(sys.executable)
    if not candidates:
        return None, ("not installed: `pip install \"nvidia-modelopt[onnx]\"` would downgrade onnx to 1.21 and install "
                      "onnxruntime-gpu over onnxruntime, so it lives in its own venv (bench/README.md) — pass "
                      "--modelopt-python or set MODELOPT_PYTHON")
    probe = ("import importlib.metadata as m; print(m.version('nvidia-modelopt'), m.version('onnx'), "
             "m.version('onnxruntime-gpu') if any(d.metadata['Name'] == 'onnxruntime-gpu' for d in m.distributions()) "
             "else m.version('onnxruntime'))")
    for python in candidates:
        try:
            out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"cannot run {python}: {exc}"
        if out.returncode == 0:
            mo, ox, rt = out.stdout.split()
            return python, f"nvidia-modelopt {mo} (its environment: onnx {ox}, onnxruntime {rt}; `{python}`)"
    return None, f"{candidates[0]} has no nvidia-modelopt"


# -- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="sample, zoo or light_* model names (substrings match); default: the 3 sample models "
                             f"and {', '.join(ZOO_MODELS)}")
    parser.add_argument("--out", default=str(REPO / "bench" / "quant_results.md"), help="Markdown output file")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a child is killed")
    parser.add_argument("--skip-memory", action="store_true", help="skip the calibration memory-scaling runs")
    parser.add_argument("--no-trt", action="store_true", help="skip the TensorRT-RTX parse + build checks")
    parser.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's quantizer")
    parser.add_argument("--modelopt-python", metavar="PYTHON",
                        help="interpreter with nvidia-modelopt[onnx] (default: $MODELOPT_PYTHON)")
    parser.add_argument("--no-modelopt", action="store_true", help="skip ModelOpt even if it is available")
    parser.add_argument("--zoo-samples", type=int, default=ZOO_SAMPLES,
                        help=f"generated calibration / evaluation / unseen samples per zoo model (default {ZOO_SAMPLES})")
    parser.add_argument("--yolo-samples", type=int, default=YOLO_SAMPLES,
                        help=f"the same for yolo_dynamic (default {YOLO_SAMPLES}: at 3x320x320 it dominates the run time)")
    parser.add_argument("--zoo-npz", action="store_true",
                        help="zoo models: calibrate and evaluate on the zoo's 8-sample .npz instead of generated data")
    parser.add_argument("--keep", metavar="DIR", help="keep every output model and log under DIR")
    args = parser.parse_args(argv)
    with_trt = not args.no_trt
    started = time.perf_counter()
    load_start = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"

    chosen = select_models(args.models)
    modelopt_python, modelopt_desc = (None, "skipped (--no-modelopt)") if args.no_modelopt else find_modelopt(
        args.modelopt_python)
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
        f"Versions: {versions}. ModelOpt: {modelopt_desc}. Code: {git_state()}.",
        "",
        "One run per cell; wall time and peak RSS are for the whole child process (interpreter start-up, imports, "
        "and for ours the default preset, per-pass numeric verification, `auto`'s candidate scoring and the final "
        "evaluation). Rows:",
        "",
        "- **ours / M**: `optimize MODEL -o OUT --int8 --calib-method M --calib calib.npz --data eval.npz --metric X "
        "--json` (run as `python -m optimizer.cli`; pipeline = default preset + `upgrade-opset(min=13)` + "
        "`quantize-int8(method=M)`, bias correction `auto`: applied, and kept only if it scores better on the "
        "`--data` samples). **ours / auto, bias_correction=off|on**: the same with "
        "`--passes \"default,upgrade-opset(min=13),quantize-int8(method=auto,bias_correction=off|on)\"`. "
        "`→ M` after `auto` names the method it chose. The metric is the report's `accuracy.metric` "
        "(original / optimized).",
        "- **ORT / M**: `onnxruntime.quantization.quantize_static(MODEL, OUT, reader, quant_format=QDQ, "
        "per_channel=True, activation_type=weight_type=QInt8, calibrate_method=M, "
        "extra_options={ActivationSymmetric: True, WeightSymmetric: True})`, the reader feeding the same "
        f"calibration arrays (batches of the model's fixed batch size, else {ORT_BATCH}); **+pre** first runs "
        "`onnxruntime.quantization.shape_inference.quant_pre_process(MODEL, PRE)` and quantizes PRE (both steps in "
        "the one measured process); if it raises, it is retried with `skip_symbolic_shape=True`, then skipped "
        "(each noted). A model below opset 13 is first upgraded to 13 with `onnx.version_converter` in the same "
        "process (noted): ORT keeps the opset, and its per-channel DequantizeLinear (`axis`) is invalid below 13. ORT's defaults otherwise (e.g. Percentile = 99.999; ours uses 99.99). Zoo models get the "
        "+pre rows; the sample models also the plain rows and two **QuantizeBias=False** rows (biases stay float "
        "instead of INT32 behind a DequantizeLinear, which TensorRT does not accept). The metric is computed by this "
        "script (below).",
        "- **ModelOpt / M**: `modelopt.onnx.quantization.quantize(MODEL, quantize_mode=\"int8\", "
        "calibration_data={input: array}, calibration_method=M, calibration_eps=[\"cpu\"], "
        "high_precision_dtype=\"fp32\", output_path=OUT)` (the whole calibration set as one array per input; "
        "fp32 so the float parts stay FP32 like ours; ModelOpt's default, fp16, would also convert them), in "
        "ModelOpt's own environment.",
        "",
        "Columns: **metric FP32 / INT8 / drop**: the task metric in points (higher is better) of the original and "
        "the output on the evaluation samples; for ours from the JSON report, for the other tools computed here the "
        "same way the optimizer does (both models in ONNX Runtime on the CPU with graph optimizations off, batches of "
        "32 — 1 for a fixed batch of 1 —, `bench/quant_metrics.py`'s copy of the metric, sample-weighted mean over "
        "batches); this script also recomputes ours and notes any difference > 0.01. **unseen INT8** (zoo): the "
        "same metric on samples neither the tool nor `auto`'s selection saw. **ORT opt-all**: the metric with all of "
        "ORT's graph optimizations (its fused INT8 kernels). **file compression**: input file bytes / output file "
        "bytes. **weight ratio**: bytes of initializers + Constant-node tensors, FP32 / output. **top-1 %** against "
        "`labels`; **argmax agree %** (last axis) and **cosine** over the whole first output against FP32. **Q / DQ**: "
        "QuantizeLinear / DequantizeLinear counts, in parentheses DequantizeLinear nodes of INT32 tensors (quantized "
        "biases). **TRT-RTX parse + build**: `optimize check-trt OUT --build` in a child process (ahead-of-time "
        "build, SM89, no GPU needed), `yes` = exit code 0 (parsed, no unsupported node, engine built); checked once "
        "per distinct graph structure (outputs that differ only in constant values share the result).",
        "",
        "`auto` (and bias correction `auto`) score their candidates on the `--data` samples, which are also the "
        "samples the metric is reported on: on the zoo models the **unseen** column shows the same choice on samples "
        "nobody tuned on.",
        "",
        "Every run gets a private copy of the FP32 model in a temporary folder; its SHA-256 and mtime are compared "
        "after the run (a changed input is flagged in the notes, as are new files written beside the input or in "
        "the child's working directory).",
        "",
    ]
    results: list[tuple[Model, list[Run]]] = []
    body: list[str] = []
    rewrites: list[str] = []
    originals = {name: sha256(path) for name, _, path in chosen}
    code_before = code_fingerprint()

    scratch_ctx = tempfile.TemporaryDirectory(prefix="quantbench-")
    scratch = Path(args.keep).resolve() if args.keep else Path(scratch_ctx.name)
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        ort_script, mo_script = scratch / "ort_quant.py", scratch / "modelopt_quant.py"
        ort_script.write_text(ORT_SCRIPT)
        mo_script.write_text(MODELOPT_SCRIPT)
        for name, kind, original in chosen:
            print(f"[quant] {name}: preparing data ...", file=sys.stderr, flush=True)
            model = snapshot(name, kind, original, scratch, args.zoo_npz,
                             args.yolo_samples if name == "yolo_dynamic" else args.zoo_samples)
            fp32 = onnx.load(str(model.path))
            names = [o.name for o in fp32.graph.output]
            data = eval_data(fp32, model.eval)
            unseen = eval_data(fp32, model.unseen) if model.unseen else None
            ref = Reference(fp32, names, data, run_model(fp32, data, False, names), unseen,
                            run_model(fp32, unseen, False, names) if unseen else None)
            base = Run("fp32", "", "FP32 original", ort="yes", ratio=1.0, compression=1.0)
            base.q, base.dq, base.dq32 = qdq_counts(fp32)
            base.metric_fp32 = base.metric = base.bench_metric = ref_metric(model, ref)
            if unseen:
                base.unseen_metric = metric_score(model.metric_fn(), ref.unseen_outputs, ref.unseen_outputs, unseen)
            labels = np.concatenate(data.labels) if model.labels else None
            m = output_metrics(first_output(ref.outputs, names[0]), first_output(ref.outputs, names[0]), labels)
            base.top1, base.agree, base.cosine = m["top1"], m["agree"], m["cosine"]
            base.opt_metric = metric_score(model.metric_fn(), run_model(fp32, data, True, names), ref.outputs, data)
            if with_trt:
                t = trt_check(model.path, scratch / name / "fp32" / "trt", args.timeout)
                ref.trt_cache[structure_key(fp32)] = t
                base.trt, base.trt_ok = t["cell"], None  # the original is not counted in "builds" totals
                if t["note"]:
                    base.notes.append(t["note"])
            runs = [base]
            plans = [("ours", mth, f"ours / {mth}", None, False) for mth in OUR_METHODS]
            plans += [("ours", mode, f"ours / {mode}", None, False) for mode in (BC_OFF, BC_ON)]
            if not args.no_ort:
                if kind != "zoo":
                    plans += [("onnxruntime", mth, f"ORT / {mth}", False, False) for mth in ORT_METHODS]
                plans += [("onnxruntime", mth, f"ORT+pre / {mth}", True, False) for mth in ORT_METHODS]
                if kind != "zoo":  # ORT's TensorRT-oriented variant: biases left in float
                    plans += [("onnxruntime", "MinMax", "ORT / MinMax, QuantizeBias=False", False, True),
                              ("onnxruntime", "MinMax", "ORT+pre / MinMax, QuantizeBias=False", True, True)]
            plans += [("modelopt", mth, f"ModelOpt / {mth}", None, False) for mth in MODELOPT_METHODS]
            for tool, method, label, pre, no_bias in plans:
                run = Run(tool, method, label)
                if tool == "modelopt" and modelopt_python is None:
                    run.skipped = modelopt_desc
                    runs.append(run)
                    continue
                slug = (label.replace(" / ", "_").replace("+", "_").replace(", QuantizeBias=False", "_nobias")
                        .replace(", bias_correction=", "_bc"))
                workdir = scratch / name / slug
                print(f"[quant] {name}: {label} ...", file=sys.stderr, flush=True)
                if tool == "ours":
                    cmd_for = lambda i, o, mth=method, md=model: our_command(md, i, o, mth)
                elif tool == "modelopt":
                    cmd_for = lambda i, o, mth=method, md=model: modelopt_command(modelopt_python, mo_script, md, i, o, mth)
                else:
                    pre_path = (workdir / "out" / "preprocessed.onnx") if pre else None
                    cmd_for = lambda i, o, mth=method, pp=pre_path, md=model, nb=no_bias: ort_command(
                        ort_script, md, i, o, mth, pp, nb)
                out = execute(run, model, workdir, cmd_for, args.timeout)
                if out is not None:
                    assess(run, out, model, ref, workdir / "trt", args.timeout, with_trt)
                if run.input_rewritten:
                    rewrites.append(f"`{name}` / {label}")
                status = f"failed: {run.failed}" if run.failed else (
                    f"metric={fmt(run.metric)} (fp32 {fmt(run.metric_fp32)}, bench {fmt(run.bench_metric)}, "
                    f"unseen {fmt(run.unseen_metric)}) chosen={run.chosen} compression={fmt(run.compression)} "
                    f"ort={run.ort} trt={run.trt}")
                print(f"[quant]   {fmt(run.wall_s)} s, {fmt(run.peak_mb, 0)} MB, {status}", file=sys.stderr, flush=True)
                runs.append(run)
            section = render_model(model, runs, with_trt)
            print("\n".join(section), flush=True)
            body += section
            results.append((model, runs))
        changed = [n for n, _, p in chosen if sha256(p) != originals[n]]
        memory_lines: list[str] = []
        if not args.skip_memory:
            memory_lines, _mem = memory_scaling(scratch, args.timeout)
            print("\n".join(memory_lines), flush=True)
    finally:
        scratch_ctx.cleanup()

    elapsed = time.perf_counter() - started
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    header.insert(6, f"Whole benchmark: {elapsed / 60:.1f} min. Load average at the start {load_start}, at the end {load} "
                     f"(1 / 5 / 15 min; other jobs shared the {os.cpu_count()} cores, so times are indicative).")
    header.insert(7, "")
    zoo_used = [m for m, _ in results if m.kind == "zoo"]
    summary = ["## Summary", ""]
    summary += ["Best of each tool per model (metric in points; `(−x)` = drop vs FP32). ORT best = the best "
                "`quantize_static` row (QuantizeBias=False rows excluded); compression, time and memory are those of "
                "ours `auto`, the best ORT row and the best ModelOpt row; TRT-RTX builds = outputs that parse and "
                "build / outputs checked.", ""]
    if zoo_used:
        summary += [f"Zoo models: {args.zoo_samples} generated calibration + {args.zoo_samples} evaluation (+ "
                    f"{args.zoo_samples} unseen) samples each, `yolo_dynamic` {args.yolo_samples} + {args.yolo_samples} "
                    f"(+ {args.yolo_samples}) at 3×320×320" if not args.zoo_npz else
                    "Zoo models: the 8 `.npz` samples for calibration and evaluation", ""]
    summary += compact_table(results, with_trt, modelopt_python is None and modelopt_desc) + [""]
    if modelopt_python is None:
        summary += [f"ModelOpt: {modelopt_desc}.", ""]
    summary += ["### `auto` vs the best fixed method", "",
                f"Goal: `auto` within {WITHIN} points of the best fixed method (minmax, percentile, entropy, mse, sqnr) "
                "on the report's metric.", ""] + auto_table(results) + [""]
    summary += ["### Bias correction on / off (`--calib-method auto`)", "",
                "**off** / **on**: `quantize-int8(method=auto,bias_correction=off|on)` — never / always applied; the "
                "metric on the evaluation (`--data`) samples, and on the unseen ones (zoo). The default, "
                "`bias_correction=auto`, applies it, scores the model with and without it on the `--data` samples "
                "(the task metric, ties by output SQNR) and keeps it only if it scores better: its in-pass scores "
                "(`details.bias_correction`: `score_on` / `score_off`) and decision are listed. **helps?** compares on "
                "vs off on the unseen samples where there are some, else on the evaluation samples.", ""]
    summary += bias_table(results) + [""]
    tail = ["## Checks", ""]
    tail.append("In-place rewrites of the input model: " + (", ".join(rewrites) if rewrites else "none detected") + ".")
    if changed:
        tail.append("Repository models that changed during the run (another process edited them; every tool used "
                    "the snapshot taken at start): " + ", ".join(f"`{c}`" for c in changed) + ".")
    if code_fingerprint() != code_before:
        tail.append("WARNING: the optimizer's sources (optimizer/, passes/, calibration/) changed while this "
                    "benchmark ran (concurrent edits): the `ours` rows may come from different code versions. "
                    "Rerun for a consistent table.")
    tail.append("")
    text = "\n".join(header + summary + ["## Results per model", ""] + body + memory_lines + tail)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n".join(summary + tail))
    print(f"[quant] wrote {out} ({elapsed / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
