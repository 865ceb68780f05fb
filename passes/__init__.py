"""Built-in passes, one module per family or pass.

``BUILTIN_MODULES`` names the module that defines each built-in pass; the registry imports a
module the first time one of its passes is asked for (a run of the default pipeline imports only
the modules it uses), and ``load_all()`` imports them all (for listings and lookups by property).
Importing a module registers its passes. ``tests/optimizer/test_registry.py`` checks this table
against what the modules register.
"""

from __future__ import annotations

import importlib

#: pass name -> the module that defines (and registers) it.
BUILTIN_MODULES = {
    "cleanup": "passes.cleanup",
    "fold-constants": "passes.cleanup",
    "cse": "passes.cse",
    "fold-shapes": "passes.fold_shapes",
    "fuse-gelu": "passes.fuse_gelu",
    "fuse-layernorm": "passes.fuse_layernorm",
    "batchnorm-to-affine": "passes.fusion",
    "fuse-affine": "passes.fusion",
    "fuse-conv-bn": "passes.fusion",
    "fuse-gemm-transpose": "passes.fusion",
    "fuse-matmul-add": "passes.fusion",
    "fuse-pad": "passes.fusion",
    "layout-nchw": "passes.layout.nchw",
    "lint-qdq": "passes.lint_qdq",
    "upgrade-opset": "passes.opset",
    "convert-bf16": "passes.precision",
    "convert-fp16": "passes.precision",
    "prune-channels": "passes.pruning.channels",
    "prune-magnitude": "passes.pruning.sparsity",
    "sparsify-2to4": "passes.pruning.sparsity",
    "quantize-int8": "passes.quantization",
    "quantize-fp8": "passes.quantize_fp8",
    "quantize-int4": "passes.quantize_int4",
    "remove-noop-arithmetic": "passes.remove_noop_arithmetic",
    "simplify-layout-ops": "passes.simplify_layout_ops",
    "smooth-quant": "passes.smooth_quant",
}


def load(name: str) -> bool:
    """Import the module of built-in pass ``name``; whether ``name`` is a built-in pass."""
    module = BUILTIN_MODULES.get(name)
    if module is None:
        return False
    importlib.import_module(module)
    return True


def load_all() -> None:
    """Import every built-in pass module (registering every built-in pass)."""
    for module in dict.fromkeys(BUILTIN_MODULES.values()):
        importlib.import_module(module)
