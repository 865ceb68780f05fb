"""Built-in passes, one module per family or pass. Importing this package registers them."""

from passes import (  # noqa: F401
    cleanup,
    cse,
    fold_shapes,
    fuse_gelu,
    fuse_layernorm,
    fusion,
    lint_qdq,
    opset,
    precision,
    quantization,
    quantize_fp8,
    quantize_int4,
    remove_noop_arithmetic,
    simplify_layout_ops,
    smooth_quant,
)
from passes.layout import nchw  # noqa: F401
from passes.pruning import channels, sparsity  # noqa: F401

__all__ = [
    "cleanup",
    "cse",
    "fold_shapes",
    "fuse_gelu",
    "fuse_layernorm",
    "fusion",
    "layout",
    "lint_qdq",
    "opset",
    "precision",
    "pruning",
    "quantization",
    "quantize_fp8",
    "quantize_int4",
    "remove_noop_arithmetic",
    "simplify_layout_ops",
    "smooth_quant",
]
