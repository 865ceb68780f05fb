"""Engine builds: TensorRT (GPU only; skipped with a reason here) and TensorRT-RTX (no GPU needed)."""

import json
import shutil

import pytest
from helpers import SAMPLES

from optimizer.cli import main
from optimizer.engine import cuda_device_count, gpu_unavailable_reason

DIGITS = SAMPLES / "digits_cnn"
NO_GPU = gpu_unavailable_reason()


@pytest.fixture
def workdir(tmp_path):
    shutil.copy(DIGITS / "model.onnx", tmp_path / "model.onnx")
    return tmp_path


def test_gpu_probe_never_raises():
    assert cuda_device_count() >= 0


@pytest.mark.skipif(NO_GPU is None, reason="this machine has TensorRT and a GPU")
def test_save_engine_without_gpu_exits_2_after_writing_model_and_report(workdir, capsys):
    code = main([str(workdir / "model.onnx"), "--save-engine", str(workdir / "m.engine"),
                 "--report", str(workdir / "r.json")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("optimize: error")]
    assert len(lines) == 1 and "TensorRT" in lines[0]
    assert (workdir / "model.opt.onnx").exists()
    report = json.loads((workdir / "r.json").read_text())
    assert report["engine"]["error"] and not (workdir / "m.engine").exists()


def test_tensorrt_rtx_backend_builds_ahead_of_time(workdir, capsys):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed")
    code = main([str(workdir / "model.onnx"), "--backend", "tensorrt-rtx", "--save-engine", str(workdir / "m.engine"),
                 "--shapes", "input:1x1x8x8/8x1x8x8/32x1x8x8", "--check-trt", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["engine"]["built"] is True and (workdir / "m.engine").stat().st_size == report["engine"]["engine_bytes"]
    assert report["trt_check"]["parsed"] is True and report["trt_check"]["unsupported"] == []


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU is not None, reason=f"needs TensorRT and an NVIDIA GPU: {NO_GPU}")
@pytest.mark.parametrize("precision", ["", "--fp16", "--bf16", "--int8", "--fp8", "--int4"])
def test_tensorrt_engine_builds_runs_and_matches(workdir, capsys, precision):  # pragma: no cover - GPU machines only
    """Every precision's output builds in TensorRT 10/11 (strongly typed) and the engine agrees with
    ONNX Runtime running the same optimized model (FP8 needs an Ada/Hopper/Blackwell GPU)."""
    calibrates = precision not in ("", "--bf16")  # convert-bf16 reads no calibration data
    flags = ([precision] if precision else []) + (["--calib", str(DIGITS / "calib.npz")] if calibrates else [])
    code = main([str(workdir / "model.onnx"), "--data", str(DIGITS / "eval.npz"), "--save-engine",
                 str(workdir / "m.engine"), "--shapes", "input:1x1x8x8/32x1x8x8/64x1x8x8", "--json", *flags])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["engine"]["latency_ms"] > 0
    for metrics in report["engine"]["accuracy"]["vs_onnxruntime"].values():
        assert metrics["cosine"] > (0.999 if not precision else 0.995)
