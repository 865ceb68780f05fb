#!/usr/bin/env python
"""Does SmoothQuant help INT8 (and FP8)? With and without ``smooth-quant`` on every zoo transformer and the sample transformer.

    python bench/smooth_quant.py                              # -> bench/smooth_quant_results.md
    python bench/smooth_quant.py --models hf_gpt2 --alphas 0.5 --methods minmax --out /tmp/sq.md

Models: the zoo's five transformers ``sample_models/zoo/{hf_bert,hf_gpt2,hf_vit,hf_whisper_enc,
transformer_mha}.onnx`` and the sample transformer ``sample_models/transformer/model.onnx``.
Pipelines, through ``optimizer.api.optimize`` with numeric verification (so ``smooth-quant`` is
checked as lossless on every model; a rolled-back pass is reported), for ``M`` in ``minmax``
(``quantize-int8(method=minmax,bias_correction=off)``: per-tensor max, SmoothQuant's own setting,
only the smoothing differs), ``auto`` (``quantize-int8``: method selection + bias correction, what
``--int8`` runs) and ``fp8`` (``quantize-fp8``), each ``Q`` after its ``U`` = ``upgrade-opset(min=13)``
(FP8: ``min=19``):

* ``no sq``:       ``default,U,Q``
* ``sq(a)``:       ``default,smooth-quant(alpha=a),U,Q`` -- the pass as ``--int8``
  runs it (``alpha=0.5``; no outlier gate: every foldable site smoothed)
* ``sq(a) gated``: the same with ``min_outlier_ratio=4`` (as ``--fp8`` runs it, and the pass's
  default until this benchmark): activations whose largest channel maximum is under 4x the
  median's are left alone

Scores, against the FP32 original, first output: **1 − cosine**, **argmax agreement** over the
last axis (%), **SQNR** (dB).

Data: ``npz`` -- the zoo model's 8-sample ``.npz`` calibrates and evaluates (``--data X.npz --calib
X.npz``); ``held-out`` (``--holdout N``, default 64) -- N samples from the zoo builder's own recipes
(``build_zoo.transformer_inputs``, seeds 0 and 1) calibrate and N others evaluate; ``split k``
(``--splits``, default 6, for ``--split-models``, default ``transformer_mha``): more such pairs
(seeds 2k and 2k+1), since on flat activations the differences are near the noise; for the sample
transformer its ``calib.npz`` (64) calibrates and ``eval.npz`` (32) evaluates.

The zoo's HF transformers are randomly initialized and then given the outlier channels trained
transformers have (``build_zoo.py`` ``perturb_hf``: LayerNorm weight and bias x20 on channels 3
and 17); ``transformer_mha`` and the sample transformer (built by hand) have none (max/median
per-channel max |x| about 2). The second table puts the outlier gate to the test: ``sq`` against
``sq gated`` differs only at the sites under the gate. ``--outliers`` adds a table on
**outlier variants** (the LayerNorm weight and bias of ``OUTLIER_CHANNELS`` multiplied again by
``--outlier-factor``; each variant is its own FP32 reference).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib.util
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from calibration.data import load_npz  # noqa: E402
from optimizer import optimize  # noqa: E402
from optimizer.runtime import OrtRunner  # noqa: E402

ZOO = REPO / "sample_models" / "zoo"
SAMPLE = "transformer"  # sample_models/transformer/
MODELS = ("hf_bert", "hf_gpt2", "hf_vit", "hf_whisper_enc", "transformer_mha", SAMPLE)
OUTLIER_CHANNELS = (3, 17)
#: the outlier gate put to the test (``smooth-quant``'s ``min_outlier_ratio``; ``--fp8`` runs it)
GATE = 4.0


QUANT = {"minmax": ("upgrade-opset(min=13)", "quantize-int8(method=minmax,bias_correction=off)"),
         "auto": ("upgrade-opset(min=13)", "quantize-int8"),
         "fp8": ("upgrade-opset(min=19)", "quantize-fp8")}


def pipelines(method: str, alphas: list[float]) -> dict[str, str]:
    up, quant = QUANT[method]
    out = {"no sq": f"default,{up},{quant}"}
    for a in alphas:
        out[f"sq({a:g})"] = f"default,smooth-quant(alpha={a:g}),{up},{quant}"
        out[f"sq({a:g}) gated"] = f"default,smooth-quant(alpha={a:g},min_outlier_ratio={GATE:g}),{up},{quant}"
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
def _zoo_builder():
    spec = importlib.util.spec_from_file_location("build_zoo", ZOO / "build_zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_zoo"] = module  # dataclasses in the module look themselves up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def generated(name: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` samples from the zoo builder's recipe for ``name``."""
    return _zoo_builder().transformer_inputs(name, np.random.default_rng((seed, len(name))), n)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    arrays = dict(load_npz(path).arrays)
    arrays.pop("labels", None)
    return arrays


def model_and_data(name: str, holdout: int, splits: int = 0) -> tuple[onnx.ModelProto, dict[str, tuple[dict, dict]]]:
    """The model and its ``{data label: (calibration, evaluation)}`` (``splits`` more held-out pairs)."""
    if name == SAMPLE:
        folder = REPO / "sample_models" / SAMPLE
        return onnx.load(str(folder / "model.onnx")), {"held-out": (_arrays(folder / "calib.npz"), _arrays(folder / "eval.npz"))}
    npz = _arrays(ZOO / f"{name}.npz")
    datasets = {"npz": (npz, npz)}
    if holdout:
        datasets["held-out"] = (generated(name, holdout, 0), generated(name, holdout, 1))
        for k in range(1, splits + 1):
            datasets[f"split {k}"] = (generated(name, holdout, 2 * k), generated(name, holdout, 2 * k + 1))
    return onnx.load(str(ZOO / f"{name}.onnx")), datasets


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
        row["site_ratios"] = sorted(s["activation_ratio_before"] for s in sites)
        row["ratio"] = (float(np.mean([s["activation_ratio_before"] for s in sites])),
                        float(np.mean([s["activation_ratio_after"] for s in sites]))) if sites else None
    return row


def table(title: str, results: dict, labels: list[str]) -> list[str]:
    lines = [f"### {title}", "", "| model | data | method | pipeline | 1 − cosine | argmax % | SQNR dB | ΔSQNR vs no sq | Δargmax vs no sq "
             "| smoothed sites | act. max/median before → after (mean) | s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for (model, data, method), rows in results.items():
        base = rows["no sq"]
        for label in labels:
            r = rows[label]
            ratio = f"{r['ratio'][0]:.2f} → {r['ratio'][1]:.2f}" if r.get("ratio") else ""
            delta = "" if label == "no sq" else f"{r['sqnr'] - base['sqnr']:+.2f}"
            delta_a = "" if label == "no sq" else f"{r['argmax'] - base['argmax']:+.2f}"
            note = f" (rolled back: {', '.join(r['rolled_back'])})" if r["rolled_back"] else ""
            lines.append(f"| {model} | {data} | {method} | {label}{note} | {1 - r['cosine']:.2e} | {r['argmax']:.2f} | {r['sqnr']:.2f} | "
                         f"{delta} | {delta_a} | {r.get('sites', '')} | {ratio} | {r['time_s']:.1f} |")
    return lines + [""]


def verdict(results: dict, labels: list[str]) -> list[str]:
    lines = []
    for (model, data, method), rows in results.items():
        base = rows["no sq"]
        better = [lab for lab in labels[1:] if rows[lab]["sqnr"] > base["sqnr"] and rows[lab]["argmax"] >= base["argmax"]]
        lines.append(f"- {model}, {data}, {method}: SmoothQuant beats no SmoothQuant (higher SQNR, argmax not lower) with "
                     f"{', '.join(better) if better else '**none**'}")
    return lines


def gate_table(results: dict, alphas: list[float]) -> list[str]:
    """Smoothing every site against the gate: what the sites under the gate add."""
    lines = [f"### The outlier gate (min_outlier_ratio={GATE:g}): every site − gated", "",
             "| model | data | method | alpha | sites smoothed gated / every | max/median of the sites under the gate "
             "| ΔSQNR dB | Δargmax % |", "|---|---|---|---:|---|---|---:|---:|"]
    for (model, data, method), rows in results.items():
        for a in alphas:
            gated, every = rows[f"sq({a:g}) gated"], rows[f"sq({a:g})"]
            under = [r for r in every.get("site_ratios", []) if r < GATE]
            lines.append(f"| {model} | {data} | {method} | {a:g} | {gated.get('sites', 0)} / {every.get('sites', 0)} | "
                         f"{', '.join(f'{r:.2f}' for r in under)} | {every['sqnr'] - gated['sqnr']:+.2f} | "
                         f"{every['argmax'] - gated['argmax']:+.2f} |")
    lines += ["", "Over the cells with sites under the gate, every site − gated:", ""]
    for method in dict.fromkeys(m for _, _, m in results):
        for a in alphas:
            cells = [(rows[f"sq({a:g})"], rows[f"sq({a:g}) gated"]) for (_, _, m), rows in results.items() if m == method
                     and any(r < GATE for r in rows[f"sq({a:g})"].get("site_ratios", []))]
            if cells:
                d_sqnr = np.array([e["sqnr"] - g["sqnr"] for e, g in cells])
                d_arg = np.array([e["argmax"] - g["argmax"] for e, g in cells])
                lines.append(f"- {method}, alpha {a:g}: {len(cells)} cells; ΔSQNR min {d_sqnr.min():+.2f}, median "
                             f"{np.median(d_sqnr):+.2f}, mean {d_sqnr.mean():+.2f}, max {d_sqnr.max():+.2f} dB, lower in "
                             f"{int((d_sqnr < 0).sum())}; Δargmax min {d_arg.min():+.2f}, max {d_arg.max():+.2f} %, lower in "
                             f"{int((d_arg < 0).sum())}")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--alphas", nargs="*", type=float, default=[0.5])
    ap.add_argument("--methods", nargs="*", default=list(QUANT), choices=list(QUANT))
    ap.add_argument("--splits", type=int, default=6, help="more held-out splits for --split-models")
    ap.add_argument("--split-models", nargs="*", default=["transformer_mha"])
    ap.add_argument("--outlier-factor", type=float, default=20.0)
    ap.add_argument("--holdout", type=int, default=64, help="held-out samples per zoo model (0: only the npz)")
    ap.add_argument("--outliers", action="store_true", help="also the outlier variants")
    ap.add_argument("--out", default=str(REPO / "bench" / "smooth_quant_results.md"))
    args = ap.parse_args()
    start = time.perf_counter()
    variants = [("models as built", False)] + ([] if not args.outliers else [
        (f"outlier variant (LayerNorm γ, β × {args.outlier_factor:g} on channels {', '.join(map(str, OUTLIER_CHANNELS))})", True)])
    out = ["# SmoothQuant + INT8 (and FP8) vs without SmoothQuant", "",
           f"{_dt.date.today()}, {platform.machine()} {platform.system()}, python {platform.python_version()}, "
           f"onnxruntime {__import__('onnxruntime').__version__}. Command: `python bench/smooth_quant.py {' '.join(sys.argv[1:])}`", "",
           "`npz`: calibration and evaluation on the zoo model's 8-sample `.npz`; `held-out`: calibration and evaluation on "
           "different samples (`split k`: more such pairs; see the script's docstring). Methods: `minmax` (INT8, per-tensor "
           "max, no bias correction), `auto` (INT8 as `--int8` runs it), `fp8`. `sq(a)`: the pass as `--int8` runs it "
           f"(no outlier gate); `sq(a) gated`: `min_outlier_ratio={GATE:g}` (as `--fp8` runs it).", ""]
    for title, outliers in variants:
        results: dict = {}
        labels: list[str] = []
        for name in args.models:
            base, datasets = model_and_data(name, args.holdout, args.splits if name in args.split_models else 0)
            model = with_outliers(base, args.outlier_factor) if outliers else base
            for data, (calib, feeds) in datasets.items():
                reference = OrtRunner(model).run(feeds)
                for method in args.methods:
                    specs = pipelines(method, args.alphas)
                    labels = list(specs)
                    key = (name, data, method)
                    results[key] = {label: run_one(model, calib, feeds, reference, p) for label, p in specs.items()}
                    for label, r in results[key].items():
                        print(f"{title[:12]:12s} {name:16s} {data:8s} {method:7s} {label:12s} 1-cos {1 - r['cosine']:.2e} "
                              f"argmax {r['argmax']:.2f} sqnr {r['sqnr']:.2f} sites {r.get('sites', '-')} "
                              f"ratios {r.get('site_ratios', '')} {r['rolled_back'] or ''}", flush=True)
        out += table(title, results, labels) + verdict(results, labels) + [""] + gate_table(results, args.alphas)
    out.append(f"Total {time.perf_counter() - start:.0f} s.")
    Path(args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
