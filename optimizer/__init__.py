"""onnx-trt-optimizer: an inference-optimization compiler for ONNX models that targets TensorRT.

Python API::

    from optimizer import PassManager, optimize, load_model, save_model, register_pass, Pass, PassResult
"""

from __future__ import annotations

__version__ = "0.1.0"

from optimizer.api import OptimizeResult, optimize
from optimizer.errors import InputError, OptimizerError, PassError, PipelineError, VerificationError
from optimizer.io import load_model, save_model
from optimizer.manager import Hook, PassEvent, PassManager, PassRecord, RunResult
from optimizer.pass_base import EXACT, Pass, PassContext, PassResult, Tolerance
from optimizer.pipeline import PRESETS, FixedPoint, format_pipeline, parse_pipeline
from optimizer.registry import available_passes, get_pass_class, register_pass
from optimizer.report import Report

__all__ = [
    "EXACT",
    "PRESETS",
    "FixedPoint",
    "Hook",
    "InputError",
    "OptimizeResult",
    "OptimizerError",
    "Pass",
    "PassContext",
    "PassError",
    "PassEvent",
    "PassManager",
    "PassRecord",
    "PassResult",
    "PipelineError",
    "Report",
    "RunResult",
    "Tolerance",
    "VerificationError",
    "available_passes",
    "format_pipeline",
    "get_pass_class",
    "load_model",
    "optimize",
    "parse_pipeline",
    "register_pass",
    "save_model",
]
