"""Time ``optimize inspect`` on every sample and zoo model (target: < 2 s each) and print a table.

    python bench/inspect_time.py [--runs 3]

Wall time is the whole process (Python start-up and imports included), the best of ``--runs``;
``inspect s`` is the command's own ``time_s`` (loading, shape resolution, the three dry runs and
the TensorRT-RTX parser check).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 2.0


def models() -> list[Path]:
    samples = ROOT / "sample_models"
    return sorted(samples.glob("*/model.onnx")) + sorted((samples / "zoo").glob("*.onnx"))


def time_one(path: Path, runs: int) -> tuple[float, dict]:
    best, info = float("inf"), {}
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "optimizer.cli", "inspect", str(path), "--json"],
                              capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{path}: exit {proc.returncode}: {proc.stderr.strip()}")
        if wall < best:
            best, info = wall, json.loads(proc.stdout)
    return best, info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    print("| model | nodes | default → | INT8 layers | TensorRT-RTX | inspect s | wall s |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for path in models():
        wall, info = time_one(path, args.runs)
        name = path.parent.name if path.name == "model.onnx" else path.stem
        default = info["dry_run"]["default"]["nodes"]["after"]
        trt = info["tensorrt"]
        trt_text = ("parsed" if trt["parsed"] else "fails") + (f", {len(trt['unsupported'])} unsupported"
                                                               if trt["unsupported"] else "") if trt["available"] else "n/a"
        rows.append(wall)
        print(f"| {name} | {info['ops']['nodes']} | {default} | {info['int8']['quantized_layers']} | {trt_text} | "
              f"{info['time_s']:.2f} | {wall:.2f} |", flush=True)
    slow = sum(w >= TARGET_S for w in rows)
    print(f"\n{len(rows)} models, max wall {max(rows):.2f} s, median {sorted(rows)[len(rows) // 2]:.2f} s; "
          f"{slow} at or above the {TARGET_S:.0f} s target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
