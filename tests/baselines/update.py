"""Regenerate the committed accuracy baselines: ``python tests/baselines/update.py``.

Each baseline is the JSON report of one (sample model, pipeline) run; ``tests/optimizer/test_regression.py``
re-runs the same pipeline and fails when accuracy, cosine or compression falls below it. Update
them only when a change is *meant* to move these numbers, and say so in the commit message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

#: (sample model, preset): the pipelines our CI guards.
CASES = [
    ("digits_cnn", "default"),
    ("digits_cnn", "int8"),
    ("digits_cnn", "fp16"),
    ("channel_last", "default"),
    ("channel_last", "int8"),
    ("channel_last", "fp16"),
    ("transformer", "default"),
    ("transformer", "int8"),
    ("transformer", "fp16"),
]


def baseline_path(model: str, preset: str) -> Path:
    return Path(__file__).resolve().parent / f"{model}.{preset}.json"


def main() -> None:
    import os

    from optimizer import optimize

    os.chdir(ROOT)  # reports then hold repository-relative paths
    for model, preset in CASES:
        folder = Path("sample_models") / model
        result = optimize(folder / "model.onnx", preset, data=folder / "eval.npz",
                          calibration=folder / "calib.npz" if preset == "int8" else None)
        report = result.report.to_dict()
        report["summary"]["time_s"] = 0.0  # keep baselines free of run-to-run noise
        for p in report["passes"]:
            p["time_s"] = 0.0
        baseline_path(model, preset).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        acc = report["accuracy"]
        task = acc["task"]["optimized"] if acc["task"] else None
        print(f"{model:>13} {preset:>8}: task {task}, compression {report['summary']['compression']['bytes']}")


if __name__ == "__main__":
    main()
