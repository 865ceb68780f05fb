#!/usr/bin/env python
"""The accuracy budget on a recognizer whose INT8 loss is spread over many layers.

    python bench/budget.py                      # -> bench/budget_results.md
    python bench/budget.py --budget 0.5 --out /tmp/b.md

Builds (random init, BatchNorm statistics warmed on the data, no download) a PP-OCR-style text
recognizer: a MobileNet-like backbone of depthwise-separable convolution blocks (HardSwish), the
height collapsed to a sequence, two transformer encoder layers (d=192) and a CTC head over 97
classes, exported by TorchScript at opset 17 with a dynamic batch; 64 calibration and 64 evaluation
text lines from the zoo's ``text_lines`` recipe (disjoint seeds). Then, as child processes:

1. ``optimize M --int8 --calib calib.npz --data eval.npz --metric examples/metrics.py:ctc_char_accuracy``
   (plain INT8: its character-accuracy drop against FP32, compression, whole-process time);
2. the same with ``--max-accuracy-drop B`` (default 1 point).

The table gives, for both, the metric drop, compression, layers left in float, evaluations spent and
wall time, and the time ratio budget / plain (issue 11's bar: compression >= 3x in < 10x the plain
INT8 time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "sample_models" / "zoo"))


def build(folder: Path) -> Path:
    import torch
    from build_zoo import export_legacy, seed_all, text_lines, warm_batchnorm
    from torch import nn

    seed_all(11)

    def block(cin, cout, stride):
        return nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.Hardswish(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.Hardswish())

    class Recognizer(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.Hardswish())
            chans = [(32, 64, (2, 1)), (64, 96, 1), (96, 128, (2, 1)), (128, 160, 1), (160, 192, (2, 1)),
                     (192, 192, 1), (192, 192, (2, 1)), (192, 192, 1)]
            self.body = nn.Sequential(*[block(a, b, s) for a, b, s in chans])
            layer = nn.TransformerEncoderLayer(192, 4, 384, dropout=0.0, batch_first=True, activation="gelu")
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(192, 97)

        def forward(self, x):
            f = self.body(self.stem(x))                # [N, 192, 1 or 2, W/2]
            f = f.mean(dim=2).permute(0, 2, 1)         # [N, T, 192]
            return torch.softmax(self.head(self.encoder(f)), dim=-1)

    model = Recognizer()
    rng = np.random.default_rng(11)
    warm_batchnorm(model, lambda: (torch.from_numpy(text_lines(rng, 8)),))
    model.eval()
    np.savez(folder / "calib.npz", x=text_lines(np.random.default_rng(1), 64))
    np.savez(folder / "eval.npz", x=text_lines(np.random.default_rng(2), 64))
    path = folder / "recognizer.onnx"
    export_legacy(model, (torch.from_numpy(text_lines(rng, 2)),), path, 17, ["x"], ["probs"], {"x": {0: "batch"}, "probs": {0: "batch"}})
    return path


def run(model: Path, folder: Path, extra: list[str], tag: str) -> dict:
    out = folder / f"{tag}.onnx"
    cmd = ["optimize", str(model), "--int8", "--calib", str(folder / "calib.npz"), "--data", str(folder / "eval.npz"),
           "--metric", str(REPO / "examples" / "metrics.py") + ":ctc_char_accuracy", "-o", str(out), "--json", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    report = json.loads(proc.stdout)
    metric = report["accuracy"]["metric"] or {}
    budget = report.get("budget") or {}
    return {"tag": tag, "exit": proc.returncode, "wall_s": round(wall, 2),
            "metric_drop": round(float(metric.get("drop", budget.get("drop", 0.0))), 3),
            "metric": metric, "compression": report["summary"]["compression"]["bytes"],
            "fallbacks": len(budget.get("fallbacks", [])), "evaluations": budget.get("evaluations"),
            "met": budget.get("met"), "precision": report["precision"]["counts"], "bytes_in": model.stat().st_size}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--out", default=str(REPO / "bench" / "budget_results.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build(folder)
        plain = run(model, folder, [], "plain")
        tuned = run(model, folder, ["--max-accuracy-drop", str(args.budget)], "budget")
    for row in (plain, tuned):
        print(json.dumps(row))
    ratio = tuned["wall_s"] / plain["wall_s"]
    lines = [f"# The accuracy budget on a spread-loss recognizer ({plain['bytes_in']:,} bytes FP32)", "",
             f"`python bench/budget.py --budget {args.budget:g}`; metric: CTC character accuracy vs FP32 on 64 "
             "held-out text lines (`examples/metrics.py:ctc_char_accuracy`); calibration on 64 others.", "",
             "| run | exit | char-accuracy drop (points) | compression | layers in float / INT8 | evaluations | wall s |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for r in (plain, tuned):
        layers = f"{r['precision'].get('fp32', 0)} / {r['precision'].get('int8', 0)}"
        lines.append(f"| {r['tag']} | {r['exit']} | {r['metric_drop']} | {r['compression']:.2f}x | {layers} | "
                     f"{r['evaluations'] if r['evaluations'] is not None else ''} | {r['wall_s']} |")
    lines += ["", f"Budget run / plain INT8 run: **{ratio:.1f}x** the time; budget met: {tuned['met']}."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
