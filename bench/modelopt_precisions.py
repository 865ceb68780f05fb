#!/usr/bin/env python
"""FP8 and INT4 against NVIDIA ModelOpt's ONNX quantizer, on the same calibration data.

    MODELOPT_PYTHON=/path/to/modelopt-venv/bin/python python bench/modelopt_precisions.py
    # -> bench/modelopt_precisions_results.md

ModelOpt (``nvidia-modelopt[onnx]``) pins an older onnx, so it runs in its own environment (see
bench/README.md), as a child process: ``modelopt.onnx.quantization.quantize(M, quantize_mode="fp8",
calibration_method="max", high_precision_dtype="fp32")`` and, for INT4, ``quantize_mode="int4"``
with ``calibration_method`` ``awq_lite`` and ``rtn_dq`` (block 128). Ours: ``optimize M --fp8 --calib C``
and ``optimize M --int4 --calib C``. Both outputs are scored here the same way: ONNX Runtime on the
CPU (graph optimizations off) on the evaluation samples (ModelOpt gets a private copy of the
model: it rewrites its input file), the first output's cosine and argmax
agreement against the FP32 original, and the file compression.

Models: FP8 on the sample CNN and the zoo's CNNs and transformers (their .npz both calibrates and
evaluates, 8 samples: the same for both tools); INT4 on the LLM-shaped GPT-2 of bench/int4_large.py
(64 calibration, 32 held-out sequences).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
ZOO = REPO / "sample_models" / "zoo"
FP8_MODELS = ["digits_cnn", "mobilenet_v2_tiny", "yolo_dynamic", "unet_tiny", "hf_bert", "hf_gpt2", "hf_vit",
              "hf_whisper_enc", "transformer_mha"]

MODELOPT = r'''
import json, sys, numpy as np, onnx
from modelopt.onnx.quantization import quantize
model, out, calib, mode, method = sys.argv[1:6]
m = onnx.load(model, load_external_data=False)
inits = {t.name for t in m.graph.initializer}
dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in m.graph.input if v.name not in inits}
with np.load(calib, allow_pickle=False) as z:
    data = {n: z[n].astype(dt) for n, dt in dtypes.items()}
quantize(model, quantize_mode=mode, calibration_data=data, calibration_method=method, calibration_eps=["cpu"],
         high_precision_dtype="fp32", output_path=out, log_level="WARNING")
'''


def paths(name: str) -> tuple[Path, Path]:
    folder = REPO / "sample_models" / name
    if (folder / "model.onnx").is_file():
        return folder / "model.onnx", folder / "calib.npz"
    return ZOO / f"{name}.onnx", ZOO / f"{name}.npz"


def score(original: Path, candidate: Path, data: Path) -> dict:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    ref_s = ort.InferenceSession(str(original), opts, providers=["CPUExecutionProvider"])
    new_s = ort.InferenceSession(str(candidate), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in ref_s.get_inputs()]
    fixed = ref_s.get_inputs()[0].shape[0]
    with np.load(data, allow_pickle=False) as z:
        feeds = {n: z[n] for n in names}
    n = len(next(iter(feeds.values())))
    step = fixed if isinstance(fixed, int) else n
    dots = rr = nn = 0.0
    agree = rows = 0
    for lo in range(0, n, step):
        f = {k: v[lo:lo + step] for k, v in feeds.items()}
        r = ref_s.run(None, f)[0].astype(np.float64)
        c = new_s.run(None, f)[0].astype(np.float64)
        dots += float((r * c).sum()); rr += float((r * r).sum()); nn += float((c * c).sum())  # noqa: E702
        if r.ndim >= 2 and r.shape[-1] > 1:
            agree += int((r.reshape(-1, r.shape[-1]).argmax(-1) == c.reshape(-1, c.shape[-1]).argmax(-1)).sum())
            rows += r.reshape(-1, r.shape[-1]).shape[0]
    return {"cosine": round(dots / np.sqrt(rr * nn), 6) if rr and nn else None,
            "argmax": round(100.0 * agree / rows, 2) if rows else None,
            "compression": round(original.stat().st_size / candidate.stat().st_size, 2)}


def ours(model: Path, calib: Path, out: Path, flag: str, data: Path | None = None) -> dict:
    cmd = ["optimize", str(model), f"--{flag}", "--calib", str(calib), "-o", str(out), "--json"]
    if data is not None:
        cmd += ["--data", str(data)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return {"exit": proc.returncode, "s": round(time.perf_counter() - start, 1)}


def modelopt(python: str, model: Path, calib: Path, out: Path, mode: str, method: str, script: Path) -> dict:
    private = out.with_name(out.stem + ".input.onnx")  # ModelOpt writes value_info into its input file
    shutil.copyfile(model, private)
    model = private
    start = time.perf_counter()
    proc = subprocess.run([python, str(script), str(model), str(out), str(calib), mode, method], capture_output=True, text=True)
    row = {"exit": proc.returncode, "s": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0 or not out.is_file():
        row["error"] = " ".join((proc.stderr.strip().splitlines() or ["?"])[-1].split())[:140]
    return row


def trt(path: Path) -> str:
    proc = subprocess.run(["optimize", "check-trt", str(path), "--build"], capture_output=True, text=True)
    return "builds" if proc.returncode == 0 else "fails"


def main() -> int:
    python = os.environ.get("MODELOPT_PYTHON")
    if not python:
        print("set MODELOPT_PYTHON to an interpreter with nvidia-modelopt[onnx] (see bench/README.md)")
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        script = tmp / "modelopt_quantize.py"
        script.write_text(MODELOPT)
        for name in FP8_MODELS:
            model, calib = paths(name)
            for tool in ("ours", "modelopt"):
                out = tmp / f"{name}.{tool}.fp8.onnx"
                run = ours(model, calib, out, "fp8") if tool == "ours" else modelopt(python, model, calib, out, "fp8", "max", script)
                if out.is_file():
                    run.update(score(model, out, calib), trt=trt(out))
                rows.append({"model": name, "precision": "fp8", "tool": tool, **run})
                print(json.dumps(rows[-1]), flush=True)
        sys.path.insert(0, str(REPO / "bench"))
        from int4_large import build

        model = build(tmp)
        calib, held = tmp / "calib.npz", tmp / "heldout.npz"
        for tool, method in (("ours", "awq"), ("modelopt", "awq_lite"), ("modelopt", "rtn_dq")):
            out = tmp / f"gpt2.{tool}.{method}.onnx"
            run = ours(model, calib, out, "int4", held) if tool == "ours" else modelopt(python, model, calib, out, "int4", method, script)
            if out.is_file():
                run.update(score(model, out, held), trt=trt(out))
            rows.append({"model": "gpt2_384x4 (bench/int4_large.py)", "precision": f"int4 {method}", "tool": tool, **run})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["# FP8 and INT4: ours vs NVIDIA ModelOpt", "", "`MODELOPT_PYTHON=... python bench/modelopt_precisions.py`; "
             f"ModelOpt from `{python}`.", "",
             "| model | precision | tool | exit | cosine | argmax agree % | compression | TensorRT-RTX | s |",
             "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | {r['tool']} | {r['exit']} | failed: {r['error']} | | | | {r['s']} |")
            continue
        lines.append(f"| {r['model']} | {r['precision']} | {r['tool']} | {r['exit']} | {r.get('cosine')} | {r.get('argmax')} | "
                     f"{r.get('compression')}x | {r.get('trt', '')} | {r['s']} |")
    (REPO / "bench" / "modelopt_precisions_results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
