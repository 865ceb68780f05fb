#!/usr/bin/env python
"""Does SmoothQuant help INT8? INT8 with and without ``smooth-quant`` on the zoo transformers.

    python bench/smooth_quant.py                              # -> bench/smooth_quant_results.md
    python bench/smooth_quant.py --models hf_gpt2 --alphas 0.5 --methods minmax --out /tmp/sq.md

Models: ``sample_models/zoo/{hf_bert,hf_gpt2,transformer_mha}.onnx`` with their ``.npz`` (8 samples
each), which both calibrate and evaluate (as ``--data X.npz --calib X.npz`` would). Pipelines,
through ``optimizer.api.optimize`` with numeric verification (so ``smooth-quant`` is checked as
lossless on every model; a rolled-back pass is reported):

* ``int8``:     ``default,upgrade-opset(min=13),quantize-int8(method=M)``
* ``sq(a)``:    ``default,smooth-quant(alpha=a),upgrade-opset(min=13),quantize-int8(method=M)``

for ``M`` in ``minmax`` (per-tensor max, SmoothQuant's own setting; ``bias_correction=off`` so
only the smoothing differs) and ``auto`` (the pass's default: method selection + bias
correction). Scores, against the FP32 original, first output: **1 − cosine**, **argmax
agreement** over the last axis (%), **SQNR** (dB).

Data: ``npz`` -- the model's 8-sample ``.npz`` calibrates and evaluates (``--data X.npz --calib
X.npz``); ``held-out`` (``--holdout N``, default 64) -- N samples from the zoo builder's own
generators calibrate and N others evaluate (BERT rows as ``bench/quant.py`` builds them, GPT-2
Zipf ids in [2, 100) at sequence 16, ``transformer_mha`` N(0, 1) features at sequence 10).

The zoo's HF transformers are randomly initialized and then given the outlier channels trained
transformers have (``build_zoo.py`` ``perturb_hf``: LayerNorm weight and bias x20 on channels 3
and 17); ``transformer_mha`` (built by hand) has none (max/median per-channel |x| about 2).
``--outliers`` adds a second table on **outlier variants**: the same models with the LayerNorm
weight (and bias) of a fixed set of channels multiplied again by ``--outlier-factor`` in every
LayerNormalization; each variant is its own FP32 reference. ``smooth-quant`` runs with its
default outlier gate (``min_outlier_ratio=4``): an activation without outlier channels is left
alone, so on ``transformer_mha`` as built the ``sq`` rows equal ``int8``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import importlib.util  # noqa: E402

from calibration.data import load_npz  # noqa: E402
from optimizer import optimize  # noqa: E402
from optimizer.runtime import OrtRunner  # noqa: E402

ZOO = REPO / "sample_models" / "zoo"
MODELS = ("hf_bert", "hf_gpt2", "transformer_mha")
OUTLIER_CHANNELS = (3, 17)


def pipelines(method: str, alphas: list[float]) -> dict[str, str]:
    quant = "quantize-int8(method=minmax,bias_correction=off)" if method == "minmax" else "quantize-int8"
    out = {"int8": f"default,upgrade-opset(min=13),{quant}"}
    for a in alphas:
        out[f"sq({a:g})"] = f"default,smooth-quant(alpha={a:g}),upgrade-opset(min=13),{quant}"
    return out


def with_outliers(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """A copy whose LayerNormalization weights and biases are ``factor`` x larger on ``OUTLIER_CHANNELS``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    done = set()
    for node in out.graph.node:
        if node.op_type != "LayerNormalization":
            continue
        for name in node.input[1:3]:
            if name in inits and name not in done:
                values = numpy_helper.to_array(inits[name]).copy()
                channels = [c for c in OUTLIER_CHANNELS if c < values.shape[-1]]
                values[..., channels] *= factor
                inits[name].CopyFrom(numpy_helper.from_array(values.astype(np.float32), name))
                done.add(name)
    if not done:
        raise SystemExit("no LayerNormalization weights found to perturb")
    return out


@functools.lru_cache(maxsize=None)
def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses in the module look themselves up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def generated(name: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` samples from the zoo builder's recipe for ``name`` (see the docstring)."""
    rng = np.random.default_rng((seed, len(name)))
    if name == "hf_bert":
        return _module(REPO / "bench" / "quant.py", "bench_quant").bert_rows(rng, n)
    if name == "hf_gpt2":
        return {"input_ids": _module(ZOO / "build_zoo.py", "build_zoo").zipf_ids(rng, (n, 16), 2, 100)}
    if name == "transformer_mha":
        return {"features": rng.normal(size=(n, 10, 12)).astype(np.float32)}
    raise SystemExit(f"no generator for {name}")


def scores(reference: dict, candidate: dict) -> dict:
    name = next(iter(reference))
    ref = reference[name].astype(np.float64)
    new = candidate[name].astype(np.float64)
    cos = float(ref.ravel() @ new.ravel() / (np.linalg.norm(ref) * np.linalg.norm(new) or 1.0))
    agree = float(np.mean(np.argmax(ref, axis=-1) == np.argmax(new, axis=-1)))
    err = float(np.sum((new - ref) ** 2))
    sqnr = 10 * np.log10(float(np.sum(ref ** 2)) / err) if err > 0 else float("inf")
    return {"cosine": cos, "argmax": 100 * agree, "sqnr": sqnr}


def run_one(model: onnx.ModelProto, calib: dict, feeds: dict, reference: dict, pipeline: str) -> dict:
    start = time.perf_counter()
    result = optimize(model, pipeline, data=feeds, calibration=calib, evaluate_accuracy=False)
    row = scores(reference, OrtRunner(result.model).run(feeds))
    row["time_s"] = time.perf_counter() - start
    row["rolled_back"] = [r.spec for r in result.report.passes if r.rolled_back]
    sq = next((r for r in result.report.passes if r.name == "smooth-quant"), None)
    if sq is not None:
        sites = sq.details.get("sites", [])
        row["sites"] = len(sites)
        row["ratio"] = (float(np.mean([s["activation_ratio_before"] for s in sites])),
                        float(np.mean([s["activation_ratio_after"] for s in sites]))) if sites else None
        row["sq_verification"] = sq.verification_detail
    return row


def table(title: str, results: dict, labels: list[str]) -> list[str]:
    lines = [f"### {title}", "", "| model | data | method | pipeline | 1 − cosine | argmax % | SQNR dB | ΔSQNR vs int8 | Δargmax vs int8 "
             "| smoothed sites | act. max/median before → after | s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for (model, data, method), rows in results.items():
        base = rows["int8"]
        for label in labels:
            r = rows[label]
            ratio = f"{r['ratio'][0]:.2f} → {r['ratio'][1]:.2f}" if r.get("ratio") else ""
            delta = "" if label == "int8" else f"{r['sqnr'] - base['sqnr']:+.2f}"
            delta_a = "" if label == "int8" else f"{r['argmax'] - base['argmax']:+.2f}"
            note = f" (rolled back: {', '.join(r['rolled_back'])})" if r["rolled_back"] else ""
            lines.append(f"| {model} | {data} | {method} | {label}{note} | {1 - r['cosine']:.2e} | {r['argmax']:.2f} | {r['sqnr']:.2f} | "
                         f"{delta} | {delta_a} | {r.get('sites', '')} | {ratio} | {r['time_s']:.1f} |")
    return lines + [""]


def verdict(results: dict, labels: list[str]) -> list[str]:
    lines = []
    for (model, data, method), rows in results.items():
        base = rows["int8"]
        better = [lab for lab in labels[1:] if rows[lab]["cosine"] > base["cosine"] and rows[lab]["argmax"] >= base["argmax"]]
        lines.append(f"- {model}, {data}, {method}: SmoothQuant + INT8 beats INT8 alone (higher cosine, argmax not lower) with "
                     f"{', '.join(better) if better else '**no alpha**'}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--alphas", nargs="*", type=float, default=[0.5, 0.75, 0.8])
    ap.add_argument("--methods", nargs="*", default=["minmax", "auto"])
    ap.add_argument("--outlier-factor", type=float, default=20.0)
    ap.add_argument("--holdout", type=int, default=64, help="held-out samples per model (0: only the npz)")
    ap.add_argument("--no-outliers", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "smooth_quant_results.md"))
    args = ap.parse_args()
    start = time.perf_counter()
    variants = [("zoo model as built", False)] + ([] if args.no_outliers else [
        (f"outlier variant (LayerNorm γ, β × {args.outlier_factor:g} on channels {', '.join(map(str, OUTLIER_CHANNELS))})", True)])
    out = ["# SmoothQuant + INT8 vs INT8 alone", "",
           f"{_dt.date.today()}, {platform.machine()} {platform.system()}, python {platform.python_version()}, "
           f"onnxruntime {__import__('onnxruntime').__version__}. Command: `python bench/smooth_quant.py {' '.join(sys.argv[1:])}`", "",
           "`npz`: calibration and evaluation on the model's 8-sample `.npz`; `held-out`: calibration and evaluation on "
           "different generated samples (see the script's docstring).", ""]
    for title, outliers in variants:
        results: dict = {}
        labels: list[str] = []
        for name in args.models:
            base = onnx.load(str(ZOO / f"{name}.onnx"))
            model = with_outliers(base, args.outlier_factor) if outliers else base
            npz = dict(load_npz(ZOO / f"{name}.npz").arrays)
            npz.pop("labels", None)
            datasets = {"npz": (npz, npz)}
            if args.holdout:
                datasets["held-out"] = (generated(name, args.holdout, 0), generated(name, args.holdout, 1))
            for data, (calib, feeds) in datasets.items():
                reference = OrtRunner(model).run(feeds)
                for method in args.methods:
                    specs = pipelines(method, args.alphas)
                    labels = list(specs)
                    key = (name, data, method)
                    results[key] = {label: run_one(model, calib, feeds, reference, p) for label, p in specs.items()}
                    for label, r in results[key].items():
                        print(f"{title[:12]:12s} {name:16s} {data:8s} {method:7s} {label:8s} 1-cos {1 - r['cosine']:.2e} "
                              f"argmax {r['argmax']:.2f} sqnr {r['sqnr']:.2f} sites {r.get('sites', '-')} ratio {r.get('ratio')} "
                              f"{r['rolled_back'] or ''}", flush=True)
        out += table(title, results, labels) + verdict(results, labels) + [""]
    out.append(f"Total {time.perf_counter() - start:.0f} s.")
    Path(args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
