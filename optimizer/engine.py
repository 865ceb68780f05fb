"""TensorRT engine build and run (GPU machines), imported lazily.

TensorRT 10/11 come from NVIDIA's package index (``pip install ".[tensorrt]"``) and need a GPU:
without one, TensorRT's ``Runtime`` crashes the process instead of raising. So before any
TensorRT object is created, ``gpu_unavailable_reason()`` checks for a usable CUDA device through
the driver library (ctypes: ``cuInit`` + ``cuDeviceGetCount``), and every entry point raises
``EngineUnavailableError`` (one line, exit code 2) when TensorRT or a GPU is missing.

The build uses Polygraphy's TensorRT loaders. Explicit precision in the ONNX (Q/DQ nodes, FP16
types) is the primary path: a strongly typed network, which is all TensorRT 11 supports. On
TensorRT 10 the weakly typed path is available too (``--fp16``/``--int8`` builder flags, INT8
from our TensorRT calibration cache).
"""

from __future__ import annotations

import ctypes
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from optimizer.errors import EngineUnavailableError

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install ".[tensorrt]" (TensorRT wheels come from NVIDIA\'s package index)'


def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports; 0 without a driver or device. Never raises."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return int(count.value)
        except (AttributeError, OSError):
            return 0
    return 0


def gpu_unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built/run here, or None when it can."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return f"TensorRT is not installed; install it with {INSTALL_HINT}"
    if cuda_device_count() == 0:
        return "no usable NVIDIA GPU (cuInit/cuDeviceGetCount found none); TensorRT needs one to build and run engines"
    return None


@dataclass
class EngineResult:
    """What the engine build (and optional run) produced."""

    path: str
    backend: str
    strongly_typed: bool
    build_time_s: float
    engine_bytes: int
    trt_version: str = ""
    flags: list[str] = field(default_factory=list)
    latency_ms: float | None = None  # median over runs
    accuracy: dict = field(default_factory=dict)  # "vs_onnxruntime" / "vs_original": per-output metrics

    def to_dict(self) -> dict:
        return asdict(self)


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    shapes: dict | None = None,
    strongly_typed: bool = True,
    fp16: bool = False,
    int8: bool = False,
    calibration_cache: str | os.PathLike | None = None,
    sparsity: bool = False,
    timing_cache: str | os.PathLike | None = None,
    workspace_mb: int | None = None,
) -> EngineResult:
    """Build and save a serialized TensorRT engine from an ONNX file (GPU required).

    ``shapes``: ``{input: ShapeSpec or (min, opt, max) or shape}`` for an optimization profile.
    ``fp16``/``int8`` are builder flags of the weakly typed path (TensorRT 10 only); with
    ``strongly_typed`` the precisions come from the model itself.
    """
    reason = gpu_unavailable_reason()
    if reason:
        raise EngineUnavailableError(f"cannot build a TensorRT engine: {reason}")
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile

    from optimizer.io import write_bytes_atomic

    if strongly_typed and (fp16 or int8):
        raise EngineUnavailableError("--fp16/--int8 builder flags apply to weakly typed networks; the model's own types are used when strongly typed")
    major = int(trt.__version__.split(".")[0])
    if not strongly_typed and major >= 11:
        raise EngineUnavailableError("TensorRT 11 builds strongly typed networks only; quantize the ONNX (Q/DQ, FP16) instead of builder flags")
    profiles = []
    if shapes:
        profile = Profile()
        for name, spec in shapes.items():
            lo, opt, hi = _profile_triplet(spec)
            profile.add(name, min=lo, opt=opt, max=hi)
        profiles.append(profile)
    calibrator = None
    if int8 and calibration_cache:
        from polygraphy.backend.trt import Calibrator

        calibrator = Calibrator(data_loader=[], cache=str(calibration_cache))  # cache only: no recalibration
    config = CreateConfig(
        fp16=fp16,
        int8=int8,
        calibrator=calibrator,
        sparse_weights=sparsity,
        profiles=profiles or None,
        load_timing_cache=str(timing_cache) if timing_cache and Path(timing_cache).exists() else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_mb << 20} if workspace_mb else None,
    )
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed or None)
    start = time.perf_counter()
    engine = EngineFromNetwork(network, config, save_timing_cache=str(timing_cache) if timing_cache else None)()
    build_time = time.perf_counter() - start
    plan = bytes(engine.serialize())
    write_bytes_atomic(engine_path, plan)
    flags = [f for f, on in (("fp16", fp16), ("int8", int8), ("sparsity", sparsity)) if on]
    return EngineResult(str(engine_path), "tensorrt", strongly_typed, build_time, len(plan), trt.__version__, flags)


def _profile_triplet(spec):
    if hasattr(spec, "opt"):
        opt = tuple(spec.opt)
        return tuple(spec.min or opt), opt, tuple(spec.max or opt)
    if len(spec) == 3 and all(isinstance(s, (tuple, list)) for s in spec):
        return tuple(spec[0]), tuple(spec[1]), tuple(spec[2])
    return tuple(spec), tuple(spec), tuple(spec)


def run_engine(engine_path: str | os.PathLike, batches, *, warmup: int = 5, runs: int = 50):
    """Run an engine on ``batches`` of feeds; return (outputs per batch, median latency in ms)."""
    reason = gpu_unavailable_reason()
    if reason:
        raise EngineUnavailableError(f"cannot run a TensorRT engine: {reason}")
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    outputs = []
    times = []
    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)))) as runner:
        first = None
        for feeds in batches:
            first = first or feeds
            outputs.append({k: np.asarray(v) for k, v in runner.infer(feeds).items()})
        if first is not None:
            for i in range(warmup + runs):
                runner.infer(first)
                if i >= warmup:
                    times.append(runner.last_inference_time() * 1000.0)
    return outputs, (statistics.median(times) if times else None)
