#!/usr/bin/env python
"""Benchmark bias correction for INT8 weights: output error vs FP32 with the correction off and on.

    python bench/bias_correction.py                       # -> bench/bias_correction_results.md
    python bench/bias_correction.py --models digits_cnn mobilenet_v2_tiny --out /tmp/bc.md

Models: the sample models (``sample_models/<m>/model.onnx``; calibration on ``calib.npz``,
evaluation on ``eval.npz``) and every zoo model with an ``.npz`` (``sample_models/zoo/<m>.onnx``;
calibration on the first half of the npz's samples, evaluation on the second half: 4 and 4).

Every model is first run through the ``default`` pipeline (``optimizer.api.optimize``), which
folds constant-expression weights (``Transpose(W)`` in exported transformers) and BatchNorms into
convolutions the way the ``int8`` preset does before quantizing; that float model ``F`` is the
FP32 reference of every number below. Two settings, each with the correction off and on:

* **weight-only**: a copy of ``F`` whose weights (the ones ``quantize-int8``'s placement
  ``find_sites`` picks, ``min_weight_elements=128`` as in the pass) are replaced by their INT8
  dequantized values (``quantize_weight``, per output channel), no activation Q/DQ. Isolates
  the weight error the correction targets.
* **full INT8**: ``optimize(F, "quantize-int8(method=minmax)", calibration=...)`` (the real pass,
  activations per tensor, verification off so nothing is rolled back); the correction is then
  applied to a copy, per quantized node, from the float weight of the same node in ``F`` (its
  ``Wq`` is recomputed and checked against the model's INT8 weight and scale) and channel means of
  the node's input in ``F``.

**INT8 act-aware** (experimental, not in the library): per node ``W·E[x] − Wq·E[QDQ(x)]``, i.e.
the weight term plus the mean error of quantizing the node's own input (``QDQ`` with the
quantized model's activation scale, applied to ``F``'s tensor), from two ``bias_shift`` calls.

The correction: ``collect_channel_means`` on ``F`` over the calibration half, ``bias_shift``
and ``apply_bias_correction`` (``passes/bias_correction.py``). Metrics on the evaluation
samples, over all float outputs: **SQNR** in dB (10·log10 of Σref² / Σ(out−ref)², pooled over
outputs), **cosine** (the smallest over outputs, each flattened), **bias** (the mean over
channels of |E[out − ref]| per channel — axis 1 of rank-4 outputs, the last axis otherwise —
relative to the output's RMS, averaged over outputs, in %). ``fixed`` is corrected / quantized
nodes — a MatMul without a constant bias Add after it, or a ConvTranspose, is not corrected.

A second table repeats the zoo models with an interleaved split (even samples calibrate, odd ones
evaluate): the zoo's ``.npz`` files are ordered (``if_branch``/``if_lstm``: positive-mean samples
first, negative-mean last), so the half split calibrates on another distribution than it evaluates.
Models with a fixed batch size run in chunks of it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import onnx_graphsurgeon as gs  # noqa: E402

from calibration.collect import collect_channel_means  # noqa: E402
from optimizer.api import optimize  # noqa: E402
from optimizer.runtime import OrtRunner  # noqa: E402
from passes.bias_correction import (  # noqa: E402
    CorrectionTarget,
    apply_bias_correction,
    bias_shift,
    correction_targets,
    corrections_for,
    dequantized_weight_values,
    input_channel_axis,
    mean_tensors,
)
from passes.graph_utils import constant_values, import_graph  # noqa: E402
from passes.quantization import PlacementOptions, find_sites  # noqa: E402

SAMPLES = REPO / "sample_models"


def datasets(names: list[str] | None, split: str = "halves"):
    """(name, model path, calibration feeds, evaluation feeds) for every benchmarked model."""
    found = []
    for path in sorted(SAMPLES.glob("*/model.onnx")):
        found.append((path.parent.name, path, path.parent / "calib.npz", path.parent / "eval.npz"))
    for path in sorted((SAMPLES / "zoo").glob("*.onnx")):
        if path.with_suffix(".npz").is_file():
            found.append((path.stem, path, path.with_suffix(".npz"), None))
    for name, path, calib, evaluation in found:
        if names and name not in names:
            continue
        model = onnx.load(path)
        inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
        with np.load(calib, allow_pickle=False) as z:
            c = {k: z[k] for k in z.files if k in inputs}
        if evaluation is None:  # zoo: first half calibrates, second half evaluates (or even/odd samples)
            if split == "interleave":
                c, e = {k: v[0::2] for k, v in c.items()}, {k: v[1::2] for k, v in c.items()}
            else:
                half = min(len(v) for v in c.values()) // 2
                c, e = {k: v[:half] for k, v in c.items()}, {k: v[half:] for k, v in c.items()}
        elif split == "interleave":
            continue  # sample models have their own eval.npz: the split changes nothing
        else:
            with np.load(evaluation, allow_pickle=False) as z:
                e = {k: z[k] for k in z.files if k in inputs}
        yield name, model, c, e


#: zoo models whose inputs the zoo's own generators (sample_models/zoo/build_zoo.py) can make more of
GENERATED = {
    "mobilenet_v2_tiny": lambda z, rng, n: {"input": z.image_batch(rng, (n, 3, 32, 32))},
    "tiny_detector": lambda z, rng, n: {"images": z.image_batch(rng, (n, 3, 48, 48))},
    "unet_tiny": lambda z, rng, n: {"image": z.image_batch(rng, (n, 3, 32, 32))},
    "norm_act": lambda z, rng, n: {"input": z.image_batch(rng, (n, 3, 16, 16))},
    "keras_nhwc": lambda z, rng, n: {"input_1": z.image_batch(rng, (n, 3, 16, 16)).transpose(0, 2, 3, 1).copy()},
    "yolo_dynamic": lambda z, rng, n: {"images": z.scene_batch(rng, n, 320, 320)},
    "vad_reflect": lambda z, rng, n: {"input": z.speech_like(rng, n, 1600)},
    "paddle_ocr_rec": lambda z, rng, n: {"x": z.text_lines(rng, n)},
}


def generated_datasets(names: list[str] | None, samples: int, seed: int = 1000):
    """Zoo models calibrated on ``samples`` new samples from the zoo's generators (needs torch to
    import build_zoo.py), evaluated on all 8 samples of their ``.npz``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_zoo", SAMPLES / "zoo" / "build_zoo.py")
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    for name, make in GENERATED.items():
        if names and name not in names:
            continue
        path = SAMPLES / "zoo" / f"{name}.onnx"
        model = onnx.load(path)
        with np.load(path.with_suffix(".npz"), allow_pickle=False) as z:
            evaluation = {k: z[k] for k in z.files}
        calib = {k: np.asarray(v, np.float32) for k, v in make(zoo, np.random.default_rng(seed), samples).items()}
        yield name, model, calib, {k: v for k, v in evaluation.items() if k in calib}


def _export(graph: gs.Graph) -> onnx.ModelProto:
    graph.cleanup()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = min(model.ir_version, 10)
    return model


def weight_only(model: onnx.ModelProto, calib, correct: bool):
    graph = import_graph(model)
    sites, _ = find_sites(graph, PlacementOptions(128, False, False))
    sites = [s for s in sites if s.kind == "weight"]
    if int(graph.opset or 0) < 13:
        for s in sites:
            s.axis = None  # as the pass does without per-channel DequantizeLinear
    skipped: dict[str, int] = {}
    corrections = []
    if correct:
        targets = correction_targets(sites, skipped)
        axes = mean_tensors(targets)
        if axes:
            means = collect_channel_means(model, axes, calib)
            corrections = corrections_for(targets, means.means, skipped, axes)
    for i, site in enumerate(sites):
        w = site.node.inputs[site.index]
        site.node.inputs[site.index] = gs.Constant(f"{w.name}__wq{i}", dequantized_weight_values(constant_values(w), site.axis))
    applied = apply_bias_correction(graph, corrections, skipped)
    return _export(graph), applied, len(sites), skipped


def full_int8(float_model: onnx.ModelProto, calib):
    """The quantize-int8 pass's output for ``float_model`` and a corrected copy of it."""
    result = optimize(float_model, "quantize-int8(method=minmax)", calibration=calib, verify="off", evaluate_accuracy=False)
    quantized = result.model
    graph = import_graph(quantized)
    float_nodes = {n.name: n for n in import_graph(float_model).nodes if n.name}
    targets, checked = [], 0
    for node in graph.nodes:
        if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        dq = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
        source = float_nodes.get(node.name)
        if dq is None or dq.op != "DequantizeLinear" or source is None:
            continue
        weight = constant_values(source.inputs[1])
        q, scale = constant_values(dq.inputs[0]), constant_values(dq.inputs[1])
        if weight is None or q is None or scale is None or weight.dtype != np.float32:
            continue
        axis = dq.attrs.get("axis", 1) if scale.size > 1 else None
        axis = axis % weight.ndim if axis is not None else None
        stored = q.astype(np.float32) * (scale.reshape([-1 if i == axis else 1 for i in range(q.ndim)]) if axis is not None else scale)
        if not np.array_equal(stored, dequantized_weight_values(weight, axis)):
            raise RuntimeError(f"{node.name}: the model's INT8 weight is not quantize_weight's")
        checked += 1
        try:
            channel_axis = input_channel_axis(node.op)
        except ValueError:
            continue
        if node.op == "MatMul" and weight.ndim != 2:
            continue
        targets.append(CorrectionTarget(node, weight, axis, source.inputs[0].name, channel_axis))
    skipped: dict[str, int] = {}
    axes = mean_tensors(targets)
    means = collect_channel_means(float_model, axes, calib) if axes else None
    corrections = corrections_for(targets, means.means if means else {}, skipped, axes)
    applied = apply_bias_correction(graph, corrections, skipped)
    aware = activation_aware(float_model, quantized, targets, axes, calib)
    return quantized, _export(graph), applied, checked, skipped, aware


def activation_aware(float_model, quantized, targets, axes, calib):
    """Experimental variant: per node ``W·E[x] - Wq·E[QDQ(x)]``, also folding in the mean error of
    the node's own input quantization (``x`` from ``float_model``, QDQ with the quantized model's
    activation scale): ``bias_shift(W, Wq, E[x_q]) + bias_shift(W, 0, E[x] - E[x_q])``."""
    if not targets:
        return quantized
    augmented = onnx.ModelProto()
    augmented.CopyFrom(float_model)
    qdq_of: dict[str, str] = {}
    for t in targets:
        dq = t.node.inputs[0].inputs[0] if t.node.inputs[0].inputs else None
        if dq is None or dq.op != "DequantizeLinear" or t.input_name in qdq_of:
            continue
        scale, zero = constant_values(dq.inputs[1]), constant_values(dq.inputs[2]) if len(dq.inputs) > 2 else np.asarray(0, np.int8)
        base = f"{t.input_name}__bc"
        augmented.graph.initializer.extend([onnx.numpy_helper.from_array(np.asarray(scale, np.float32), base + "_s"),
                                            onnx.numpy_helper.from_array(np.asarray(zero), base + "_z")])
        augmented.graph.node.extend([
            onnx.helper.make_node("QuantizeLinear", [t.input_name, base + "_s", base + "_z"], [base + "_q"]),
            onnx.helper.make_node("DequantizeLinear", [base + "_q", base + "_s", base + "_z"], [base + "_dq"]),
        ])
        qdq_of[t.input_name] = base + "_dq"
    tensors = dict(axes) | {qdq_of[n]: a for n, a in axes.items() if n in qdq_of}
    means = collect_channel_means(augmented, tensors, calib).means
    graph = import_graph(quantized)
    nodes = {n.name: n for n in graph.nodes}
    corrections = []
    for t in targets:
        m = means.get(t.input_name)
        mq = means.get(qdq_of.get(t.input_name, t.input_name), m)
        if m is None or axes.get(t.input_name) != t.channel_axis:
            continue
        wq = dequantized_weight_values(t.weight, t.axis)
        shift = bias_shift(t.node.op, t.weight, wq, mq, t.node.attrs) + bias_shift(t.node.op, t.weight, np.zeros_like(t.weight), m - mq, t.node.attrs)
        corrections.append((nodes[t.node.name], shift))
    apply_bias_correction(graph, corrections)
    return _export(graph)


def run_all(model: onnx.ModelProto, feeds: dict) -> dict:
    """Outputs over all samples; a model with a fixed batch size runs chunk by chunk."""
    runner = OrtRunner(model)
    fixed = {d.dim_value for i in model.graph.input if i.name in feeds for d in i.type.tensor_type.shape.dim[:1] if d.dim_value > 0}
    n = min(len(v) for v in feeds.values())
    size = fixed.pop() if len(fixed) == 1 else n
    parts = [runner.run({k: v[i:i + size] for k, v in feeds.items()}) for i in range(0, n - n % size, size)]
    return {k: np.concatenate([p[k] for p in parts]) if parts[0][k].ndim else parts[0][k] for k in parts[0]}


def metrics(reference: dict, outputs: dict) -> dict:
    signal = noise = 0.0
    cosines, biases = [], []
    for name, ref in reference.items():
        if ref.dtype.kind != "f" or ref.size == 0:
            continue
        r = ref.astype(np.float64)
        o = outputs[name].astype(np.float64)
        ok = np.isfinite(r) & np.isfinite(o)
        err = np.where(ok, o - r, 0.0)
        rr = np.where(ok, r, 0.0)
        signal += float(np.sum(rr**2))
        noise += float(np.sum(err**2))
        a, b = np.where(ok, o, 0.0).ravel(), rr.ravel()
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        cosines.append(float(a @ b / denom) if denom > 0 else 1.0)
        if r.ndim:
            axis = 1 if r.ndim == 4 else r.ndim - 1
            per_channel = err.mean(axis=tuple(i for i in range(r.ndim) if i != axis))
            rms = float(np.sqrt(np.mean(rr**2))) or 1.0
            biases.append(float(np.abs(per_channel).mean()) / rms * 100)
    sqnr = 10 * np.log10(signal / noise) if noise > 0 and signal > 0 else float("inf")
    return {"sqnr": sqnr, "cos": min(cosines) if cosines else float("nan"), "bias": float(np.mean(biases)) if biases else float("nan")}


def _fmt(value: float, digits: int = 1) -> str:
    if value == float("inf"):
        return "inf"
    return f"{value:.{digits}f}"


def _cos(value: float) -> str:
    return f"{value:.6f}"


def bench(names, split="halves", generated=0):
    rows = []
    for name, model, calib, evaluation in (generated_datasets(names, generated) if generated else datasets(names, split)):
        start = time.perf_counter()
        row = {"model": name, "calib": min(len(v) for v in calib.values()), "eval": min(len(v) for v in evaluation.values())}
        try:
            float_model = optimize(model, "default", data=evaluation, evaluate_accuracy=False).model
            reference = run_all(float_model, evaluation)
            plain, _, sites, _ = weight_only(float_model, calib, correct=False)
            fixed, applied, _, skipped = weight_only(float_model, calib, correct=True)
            row["wo_sites"], row["wo_fixed"], row["wo_skipped"] = sites, applied, skipped
            row["wo_off"] = metrics(reference, run_all(plain, evaluation))
            row["wo_on"] = metrics(reference, run_all(fixed, evaluation))
            quantized, corrected, applied8, checked, skipped8, aware = full_int8(float_model, calib)
            row["q_nodes"], row["q_fixed"] = checked, applied8
            if checked:
                row["q_off"] = metrics(reference, run_all(quantized, evaluation))
                row["q_on"] = metrics(reference, run_all(corrected, evaluation))
                row["q_aware"] = metrics(reference, run_all(aware, evaluation))
        except Exception as exc:  # a result, not a benchmark error
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        row["seconds"] = time.perf_counter() - start
        print(f"{name}: {row.get('error') or 'ok'} ({row['seconds']:.1f} s)", file=sys.stderr)
        rows.append(row)
    return rows


def table(rows) -> str:
    head = ("| model | calib/eval | weight-only fixed | WO SQNR dB off → on | WO cosine off → on | WO bias % off → on "
            "| INT8 fixed | INT8 SQNR dB off → on | INT8 cosine off → on | INT8 bias % off → on "
            "| INT8 act-aware: SQNR dB, bias % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"`{r['model']}`", f"{r['calib']}/{r['eval']}"]
        if "error" in r:
            lines.append("| " + " | ".join(cells + [f"failed: {r['error']}"] + [""] * 8) + " |")
            continue
        for prefix, fixed in (("wo", f"{r['wo_fixed']}/{r['wo_sites']}"), ("q", f"{r.get('q_fixed', 0)}/{r.get('q_nodes', 0)}")):
            off, on = r.get(f"{prefix}_off"), r.get(f"{prefix}_on")
            if off is None:
                cells += [fixed, "—", "—", "—"]
                continue
            cells += [
                fixed,
                f"{_fmt(off['sqnr'])} → {_fmt(on['sqnr'])}",
                f"{_cos(off['cos'])} → {_cos(on['cos'])}",
                f"{_fmt(off['bias'], 3)} → {_fmt(on['bias'], 3)}",
            ]
        aware = r.get("q_aware")
        cells.append(f"{_fmt(aware['sqnr'])}, {_fmt(aware['bias'], 3)}" if aware else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows) -> str:
    def deltas(prefix, variant="on"):
        out = []
        for r in rows:
            off, on = r.get(f"{prefix}_off"), r.get(f"{prefix}_{variant}")
            fixed = r.get("wo_fixed" if prefix == "wo" else "q_fixed", 0)
            if off and on and fixed and np.isfinite(off["sqnr"]) and np.isfinite(on["sqnr"]):
                out.append((r["model"], on["sqnr"] - off["sqnr"], off["bias"], on["bias"]))
        return out

    text = []
    for prefix, variant, label in (("wo", "on", "weight-only"), ("q", "on", "full INT8"), ("q", "aware", "full INT8, act-aware (experimental)")):
        d = deltas(prefix, variant)
        if not d:
            continue
        better = sum(1 for _, s, _, _ in d if s > 0.05)
        worse = [f"{m} ({s:+.2f} dB)" for m, s, _, _ in d if s < -0.05]
        text.append(
            f"- {label}: {len(d)} models with corrected nodes; SQNR better (> 0.05 dB) on {better}, median change "
            f"{np.median([s for _, s, _, _ in d]):+.2f} dB (range {min(s for _, s, _, _ in d):+.2f} … "
            f"{max(s for _, s, _, _ in d):+.2f}); bias error smaller on "
            f"{sum(1 for _, _, a, b in d if b < a)}/{len(d)}; worse (> 0.05 dB): {', '.join(worse) or 'none'}."
        )
    return "\n".join(text)


def header(argv) -> str:
    versions = ", ".join(f"{d} {importlib.metadata.version(d)}" for d in ("onnx", "onnxruntime", "numpy"))
    return (
        "# Bias correction benchmark\n\n"
        f"{_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} on {platform.platform()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {versions}.\n\n"
        f"Command: `python bench/bias_correction.py {shlex.join(argv)}`\n\n"
        "What is measured: see the docstring of `bench/bias_correction.py`. Reference: the FP32 model after the "
        "`default` pipeline. **WO** = weight-only INT8 (per-channel weights, float activations); **INT8** = the "
        "`quantize-int8(method=minmax)` pass's output (Q/DQ on activations and weights). off → on = without → with "
        "bias correction. bias % = mean over output channels of |E[out − ref]|, relative to the output RMS (channels: axis 1 "
        "of rank-4 outputs, else the last axis; `keras_nhwc`'s output is NHWC, so its column averages over rows and is ~0). "
        "Zoo models calibrate on 4 samples and evaluate on the other 4.\n\n"
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--models", nargs="*", help="model names (default: all)")
    parser.add_argument("--out", default=str(REPO / "bench" / "bias_correction_results.md"))
    parser.add_argument("--no-interleave", action="store_true", help="skip the second table (zoo, even/odd split)")
    parser.add_argument("--generated", type=int, default=64, metavar="N",
                        help="third table: zoo models calibrated on N generated samples (0: skip)")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    rows = bench(args.models)
    text = header(argv) + table(rows) + "\n\n" + summary(rows) + "\n"
    if not args.no_interleave:
        rows = bench(args.models, "interleave")
        if rows:
            text += (
                "\n## Zoo models, interleaved split\n\n"
                "The zoo's `.npz` files are not shuffled: `if_branch`/`if_lstm` put positive-mean samples first and "
                "negative-mean ones last (to drive both branches), so the first-half/second-half split above calibrates "
                "and evaluates on different distributions. Here the even samples calibrate and the odd ones evaluate.\n\n"
                + table(rows) + "\n\n" + summary(rows) + "\n"
            )
    if args.generated:
        try:
            rows = bench(args.models, generated=args.generated)
        except ImportError as exc:  # build_zoo.py needs torch
            print(f"generated calibration skipped: {exc}", file=sys.stderr)
            rows = []
        if rows:
            text += (
                f"\n## Zoo models, {args.generated} generated calibration samples\n\n"
                f"4 calibration samples make noisy channel means. Here the zoo's own data generators "
                f"(`sample_models/zoo/build_zoo.py`: `image_batch`, `scene_batch`, `speech_like`, `text_lines`; seed 1000, "
                f"not the seeds of the `.npz` files) make {args.generated} calibration samples, and all 8 samples of the "
                "`.npz` evaluate.\n\n" + table(rows) + "\n\n" + summary(rows) + "\n"
            )
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
