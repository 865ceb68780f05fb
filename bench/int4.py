#!/usr/bin/env python
"""Benchmark INT4 weight-only quantization: ``quantize-int4`` (RTN, RTN + bias correction, AWQ) against
ONNX Runtime's ``MatMulNBitsQuantizer`` (block 128, symmetric; its ``MatMulNBits`` contrib op and its QDQ
form) on the zoo's five transformers, on the same held-out inputs.

    python bench/int4.py                                   # table on stdout
    python bench/int4.py --out bench/int4_results.md       # and written there
    python bench/int4.py --models hf_gpt2 --no-trt

Data: the zoo's ``.npz`` files hold only 8 samples, so calibration uses 64 fresh samples drawn as
the zoo builder draws them (``build_zoo.transformer_inputs``: Zipf token ids, BERT sentence pairs
with padding, photo-like 32x32 scenes for the ViT, log-mel spectrograms of speech-like audio for
the Whisper encoder, normal features; seed 1) and the outputs are judged on the zoo's 8 samples
plus 64 more from seed 2 (72 samples none of the tools saw).

Every model first gets what ``--int4`` runs before ``quantize-int4``: the ``default`` preset
(the legacy exports of ``hf_vit`` and ``hf_whisper_enc`` compute their weights' transposes at run
time until it folds them) and ``upgrade-opset(min=21)`` (INT4 DequantizeLinear needs it); that
model is the FP32 reference. Ours run in process through ``PassManager`` (verification off; the
time is the pass alone), ONNX Runtime's quantizer in process too. Columns: the MatMul/Gemm layers
holding INT4 weights, the serialized model bytes and the compression against the FP32 model, the
relative output error ``sum (y - y_ref)^2 / sum y_ref^2`` (worst output; every output in the detail
line), the smallest output cosine, seconds, and whether TensorRT-RTX parses and builds the model
ahead of time for SM89 (``optimizer.tensorrt_rtx.check_model``; ``--no-trt`` skips it), and for
AWQ the output check's verdict (the worst output's SQNR of the searched alphas and of alpha 0 on
the first 32 calibration samples, and which the pass kept; ``no output check`` skips it).

``ours (ORT's layers)`` quantizes exactly the layers ORT's quantizer does (it handles MatMul only, so
the Gemms of ``hf_gpt2`` and ``transformer_mha`` stay float there): a like-for-like comparison of the
quantizers. The zoo's layers are 32-100 wide, so ``min_weight_elements=0`` (our default, 4096, would
leave all of them float) and our block is K itself (32 or 64; ORT pads K up to its block of 128, the
same one scale per output channel).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optimizer import PassContext, PassManager  # noqa: E402
from optimizer.runtime import OrtRunner  # noqa: E402

ZOO = ROOT / "sample_models" / "zoo"
MODELS = ["hf_bert", "hf_gpt2", "hf_vit", "hf_whisper_enc", "transformer_mha"]
OURS = {
    "ours rtn (no data)": "method=rtn,bias_correction=false",
    "ours rtn + bias corr.": "method=rtn",
    "ours awq, no bias corr.": "bias_correction=false",
    "ours awq, no output check": "output_check=false",
    "ours awq (default)": "",
    "ours awq + embeddings": "embeddings=true",
}


# -- data (the zoo builder's recipes, other seeds) --------------------------------------------


def _zoo_builder():
    """``sample_models/zoo/build_zoo.py`` (its data recipes: the zoo's .npz inputs come from them)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sample_models" / "zoo"))
    import build_zoo

    return build_zoo


def samples(name, n, seed):
    return _zoo_builder().transformer_inputs(name, np.random.default_rng(seed), n)


# -- measuring --------------------------------------------------------------------------------


def int4_layers(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm/MatMulNBits nodes whose weight is INT4 (behind a DequantizeLinear, or packed)."""
    int4 = {t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)}
    dq_int4 = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4}
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMulNBits" or (n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in dq_int4):
            out.append(n.name)
    return out


def errors(reference: onnx.ModelProto, model: onnx.ModelProto, feeds) -> dict[str, tuple[float, float]]:
    ref = OrtRunner(reference).run(feeds)
    got = OrtRunner(model).run(feeds)
    out = {}
    for k in ref:
        a, b = ref[k].astype(np.float64).ravel(), got[k].astype(np.float64).ravel()
        out[k] = (float(np.sum((a - b) ** 2) / np.sum(a**2)), float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return out


def trt_builds(model: onnx.ModelProto) -> str:
    try:
        from optimizer.tensorrt_rtx import check_model
    except ImportError:
        return "n/a"
    try:
        result = check_model(model)
    except Exception as exc:  # a model TensorRT-RTX cannot take at all
        return f"error: {str(exc).splitlines()[0][:60]}"
    if result.built:
        return "builds"
    if result.unsupported:
        return "no: " + ", ".join(sorted({u.op_type for u in result.unsupported}))
    return "no: " + (result.errors[0][:60] if result.errors else "build failed")


def ort_nbits(model: onnx.ModelProto, qdq: bool) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    fmt = QuantFormat.QDQ if qdq else QuantFormat.QOperator
    config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, quant_format=fmt)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quantizer = MatMulNBitsQuantizer(copy, block_size=128, is_symmetric=True, quant_format=fmt, algo_config=config)
    quantizer.process()
    out = quantizer.model.model
    out.ir_version = min(out.ir_version, 10)
    return out


def check_note(details: dict) -> str:
    """The AWQ output check's verdict: ``searched 21.3 / alpha 0 24.0 dB -> alpha 0`` (worst output's SQNR)."""
    check = details.get("output_check")
    if not check:
        return ""
    db = check["output_sqnr_db"]
    return f"searched {db['searched']:.1f} / alpha 0 {db['alpha_0']:.1f} dB -> {check['kept'].replace('_', ' ')}"


def bench_model(name: str, trt: bool) -> list[dict]:
    original = onnx.load(str(ZOO / f"{name}.onnx"))
    fp32 = PassManager("default,upgrade-opset(min=21)").run(original).model
    calib = samples(name, 64, 1)
    zoo_npz = dict(np.load(ZOO / f"{name}.npz"))
    extra = samples(name, 64, 2)
    held = {k: np.concatenate([zoo_npz[k], extra[k]]) for k in zoo_npz}
    rows = [{"model": name, "tool": "fp32 (default preset, opset 21)", "model_obj": fp32, "time": 0.0}]
    for label, opts in OURS.items():
        spec = "quantize-int4(min_weight_elements=0" + (f",{opts}" if opts else "") + ")"
        start = time.perf_counter()
        run = PassManager(spec, verify="off").run(fp32, PassContext(calibration=calib))
        rows.append({"model": name, "tool": label, "model_obj": run.model, "time": time.perf_counter() - start, "spec": spec,
                     "check": check_note(run.records[-1].details)})
    for label, qdq in (("ORT MatMulNBits (block 128, sym)", False), ("ORT MatMulNBits, QDQ form", True)):
        start = time.perf_counter()
        try:
            quantized = ort_nbits(fp32, qdq)
        except Exception as exc:  # noqa: BLE001 - a failing tool is a result
            rows.append({"model": name, "tool": label, "failed": str(exc).splitlines()[0][:80]})
            continue
        rows.append({"model": name, "tool": label, "model_obj": quantized, "time": time.perf_counter() - start})
    ort_rows = [r for r in rows if r["tool"] == "ORT MatMulNBits, QDQ form" and "model_obj" in r]  # keeps node names
    if ort_rows:  # ours on exactly ORT's layers
        theirs = {n.removesuffix("_matmul_Q4") for n in int4_layers(ort_rows[0]["model_obj"])}  # ORT renames them
        others = [n.name for n in fp32.graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in theirs]
        spec = "quantize-int4(min_weight_elements=0,exclude=[" + ",".join(others) + "])"
        start = time.perf_counter()
        run = PassManager(spec, verify="off").run(fp32, PassContext(calibration=calib))
        rows.append({"model": name, "tool": "ours awq (ORT's layers)", "model_obj": run.model,
                     "time": time.perf_counter() - start, "spec": spec, "check": check_note(run.records[-1].details)})
    base_bytes = fp32.ByteSize()
    for row in rows:
        model = row.pop("model_obj", None)
        if model is None:
            continue
        errs = errors(fp32, model, held)
        row.update(layers=len(int4_layers(model)), bytes=model.ByteSize(), compression=base_bytes / model.ByteSize(),
                   rel_err=max(e for e, _ in errs.values()), cosine=min(c for _, c in errs.values()),
                   per_output={k: e for k, (e, _) in errs.items()}, trt=trt_builds(model) if trt else "skipped")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | tool | INT4 layers | bytes | compression | rel. error (worst output) | min cosine | s | TensorRT-RTX "
             "| AWQ output check (calibration samples) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['model']} | {r['tool']} | failed: {r['failed']} | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['tool']} | {r['layers']} | {r['bytes']:,} | {r['compression']:.2f}x | "
                     f"{r['rel_err']:.3e} | {r['cosine']:.6f} | {r['time']:.2f} | {r['trt']} | {r.get('check', '')} |")
    lines.append("")
    lines.append("Per-output relative errors:")
    lines.append("")
    for r in rows:
        if "per_output" in r and len(r["per_output"]) > 1:
            detail = ", ".join(f"{k} {v:.3e}" for k, v in r["per_output"].items())
            lines.append(f"- {r['model']} / {r['tool']}: {detail}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--no-trt", action="store_true", help="skip the TensorRT-RTX parse + build")
    args = parser.parse_args(argv)
    import logging

    import onnxruntime

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise
    rows = [row for name in args.models for row in bench_model(name, not args.no_trt)]
    header = (f"# INT4 weight-only quantization\n\n{_dt.date.today()}, {platform.machine()}, Python "
              f"{platform.python_version()}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}; "
              f"`python bench/int4.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n")
    text = header + table(rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
