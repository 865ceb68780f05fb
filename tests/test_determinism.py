"""Issue 14: calibration batch size and sharding never change the model written.

``optimize M --int8 --calib C`` writes byte-identical models for ``--calib-batch-size`` 1, 7 and 32
and for calibration sharded over several tasks (an in-process executor with 3 workers shards
exactly as Ray does), on the sample models and a few zoo models."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from calibration.executor import InProcessExecutor
from optimizer.api import optimize
from optimizer.cli import main

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    ("sample_models/digits_cnn/model.onnx", "sample_models/digits_cnn/calib.npz"),
    ("sample_models/channel_last/model.onnx", "sample_models/channel_last/calib.npz"),
    ("sample_models/transformer/model.onnx", "sample_models/transformer/calib.npz"),
    ("sample_models/zoo/mobilenet_v2_tiny.onnx", "sample_models/zoo/mobilenet_v2_tiny.npz"),
    ("sample_models/zoo/hf_bert.onnx", "sample_models/zoo/hf_bert.npz"),
]


@pytest.mark.parametrize("model, calib", CASES, ids=[Path(m).stem if "zoo" in m else Path(m).parent.name for m, _ in CASES])
def test_int8_model_is_byte_identical_for_every_calib_batch_size_and_sharding(tmp_path, model, calib):
    digests = {}
    for size in ("default", 1, 7, 32):
        out = tmp_path / f"{size}.onnx"
        extra = [] if size == "default" else ["--calib-batch-size", str(size)]
        assert main([str(ROOT / model), "--int8", "--calib", str(ROOT / calib), "--no-eval", "-o", str(out)] + extra) == 0
        digests[size] = hashlib.sha256(out.read_bytes()).hexdigest()
    executor = InProcessExecutor(workers=3)
    sharded = optimize(ROOT / model, "int8", calibration=ROOT / calib, evaluate_accuracy=False,
                       output=tmp_path / "sharded.onnx", executor=executor, calib_batch_size=5)
    digests["sharded"] = hashlib.sha256((tmp_path / "sharded.onnx").read_bytes()).hexdigest()
    assert len(set(digests.values())) == 1, digests
    stage = executor.stages[0]
    assert stage.stage == "calibration" and stage.tasks >= 2
    assert sharded.report.executor["stages"][0]["tasks"] == stage.tasks


def test_synthetic_calibration_does_not_depend_on_the_batch_size(tmp_path):
    """Without --calib the samples are synthetic, drawn per sample: the batch size changes nothing."""
    digests = set()
    for size in (1, 7, 32):
        out = tmp_path / f"{size}.onnx"
        assert main([str(ROOT / CASES[0][0]), "--int8", "--no-eval", "-o", str(out), "--calib-batch-size", str(size)]) == 0
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
