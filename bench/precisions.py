#!/usr/bin/env python
"""Benchmark every precision flag on the sample and zoo models: agreement, compression, time, memory.

    python bench/precisions.py                               # -> bench/precision_results.md
    python bench/precisions.py --flags fp8 int4 --models hf_bert hf_gpt2 --out /tmp/p.md

For each model and flag (``--fp16``, ``--bf16``, ``--int8``, ``--fp8``, ``--int4``) this runs
``optimize M --<flag> --calib M.npz -o OUT --json`` as its own child process (whole-process wall time
and peak RSS, ``bench/measure.py``) and reads from the JSON report: the cosine (minimum over outputs)
and argmax agreement of the first output against the FP32 original, measured on calibration samples
held out of the statistics when there are 32 or more, else on the calibration samples themselves (the
report says which: the ``on`` column), the file compression (input bytes / output bytes), the layers
per precision and any pass rolled back. Then ``optimize check-trt OUT --build`` (another child)
says whether TensorRT-RTX parses it and builds an engine for SM89.

Models: ``sample_models/<m>/model.onnx`` with ``calib.npz`` and ``sample_models/zoo/<m>.onnx`` with its
``.npz`` (8 samples: accuracy there rests on the calibration samples, flagged ``calib`` in the table).
Like ``bench/quant.py`` it imports nothing from the project in-process: the CLI is measured as a user
runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ scripts share measure.py and bench.py
from bench import run_child  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FLAGS = ("fp16", "bf16", "int8", "fp8", "int4")


def models() -> list[tuple[str, Path, Path]]:
    found = [(d.name, d / "model.onnx", d / "calib.npz") for d in sorted((REPO / "sample_models").iterdir())
             if (d / "model.onnx").is_file() and (d / "calib.npz").is_file()]
    found += [(p.stem, p, p.with_suffix(".npz")) for p in sorted((REPO / "sample_models" / "zoo").glob("*.onnx"))]
    return found


def measure(name: str, model: Path, calib: Path, flag: str, work: Path, timeout: float) -> dict:
    out = work / f"{name}.{flag}.onnx"
    data = ["--data", str(calib)] if flag == "bf16" else ["--calib", str(calib)]  # convert-bf16 calibrates nothing
    cmd = ["optimize", str(model), f"--{flag}", *data, "-o", str(out), "--json"]
    run = run_child(cmd, work, timeout)
    row = {"model": name, "flag": flag, "exit": run.returncode, "wall_s": round(run.wall_s, 2),
           "peak_mb": round(run.peak_mb, 1) if run.peak_mb else None}
    try:
        report = json.loads(run.stdout)
    except json.JSONDecodeError:
        row["error"] = (run.stderr.strip().splitlines() or ["no report"])[-1][:160]
        return row
    outputs = list(((report.get("accuracy") or {}).get("outputs") or {}).values())
    cosines = [o["cosine"] for o in outputs if o.get("cosine") is not None]
    first = outputs[0] if outputs else {}
    accuracy = report.get("accuracy") or {}
    row.update(
        cosine=round(min(cosines), 6) if cosines else None,
        argmax=first.get("argmax_agreement"),
        on=("held-out" if "held out of the statistics" in (accuracy.get("note") or "") else "calib") + f" x{accuracy.get('samples', 0)}",
        compression=(report["summary"]["compression"] or {}).get("bytes"),
        layers=(report.get("precision") or {}).get("counts", {}),
        rolled_back=[r["pass"] for r in report.get("rolled_back", [])],
    )
    if out.is_file():
        trt = run_child(["optimize", "check-trt", str(out), "--build"], work, timeout)
        row["trt_rtx"] = "builds" if trt.returncode == 0 else "FAILS"
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["# Precisions on the sample and zoo models", "",
             "`python bench/precisions.py` (CPU, ONNX Runtime; TensorRT-RTX 1.7 builds for SM89).", "",
             "| model | flag | exit | cosine | argmax agree | on | compression | layers | TensorRT-RTX | wall s | peak MB | rolled back |",
             "|---|---|---:|---:|---:|---|---:|---|---|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['flag']} | {r['exit']} | failed: {r['error']} | | | | | | {r['wall_s']} | | |")
            continue
        argmax = f"{100 * r['argmax']:.1f} %" if r.get("argmax") is not None else ""
        layers = ", ".join(f"{k} {v}" for k, v in sorted(r["layers"].items()))
        comp = f"{r['compression']:.2f}x" if r.get("compression") else ""
        lines.append(f"| {r['model']} | {r['flag']} | {r['exit']} | {r['cosine']} | {argmax} | {r['on']} | {comp} | {layers} | "
                     f"{r.get('trt_rtx', '')} | {r['wall_s']} | {r['peak_mb']} | {', '.join(r['rolled_back'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--flags", nargs="*", default=list(FLAGS), choices=FLAGS)
    parser.add_argument("--models", nargs="*", help="model names (default: all sample and zoo models)")
    parser.add_argument("--out", default=str(REPO / "bench" / "precision_results.md"))
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, calib in models():
            if args.models and name not in args.models:
                continue
            for flag in args.flags:
                row = measure(name, model, calib, flag, Path(tmp), args.timeout)
                print(json.dumps(row), flush=True)
                rows.append(row)
    Path(args.out).write_text(markdown(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
