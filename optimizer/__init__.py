"""onnx-trt-optimizer: an inference-optimization compiler for ONNX models that targets TensorRT.

Python API (names load lazily, so ``import optimizer`` stays cheap and cycle-free)::

    from optimizer import optimize, PassManager, Pass, PassResult, register_pass, load_model, save_model
    from optimizer import from_torch  # PyTorch module -> ONNX -> the same pipeline (needs torch)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "optimize": "api",
    "OptimizeResult": "api",
    "from_torch": "pytorch",
    "InputError": "errors",
    "OptimizerError": "errors",
    "PassError": "errors",
    "PipelineError": "errors",
    "VerificationError": "errors",
    "load_model": "io",
    "save_model": "io",
    "Hook": "manager",
    "PassEvent": "manager",
    "PassManager": "manager",
    "PassRecord": "manager",
    "RunResult": "manager",
    "EXACT": "pass_base",
    "Pass": "pass_base",
    "PassContext": "pass_base",
    "PassResult": "pass_base",
    "Tolerance": "pass_base",
    "PRESETS": "pipeline",
    "FixedPoint": "pipeline",
    "format_pipeline": "pipeline",
    "parse_pipeline": "pipeline",
    "available_passes": "registry",
    "get_pass_class": "registry",
    "register_pass": "registry",
    "Report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optimizer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"optimizer.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
