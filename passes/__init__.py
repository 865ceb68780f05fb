"""Built-in passes, one module per family or pass.

``BUILTIN_PASSES`` names each built-in pass and where it lives, in the form a plugin's entry point
uses (``name = "module:Class"``): ``optimizer.registry`` loads built-ins and plugins through the
same loader, and imports a built-in's module only when that pass is asked for.
"""

BUILTIN_PASSES: dict[str, str] = {
    "batchnorm-to-affine": "passes.fusion:BatchNormToAffine",
    "cleanup": "passes.cleanup:Cleanup",
    "convert-bf16": "passes.precision:ConvertBf16",
    "convert-fp16": "passes.precision:ConvertFp16",
    "cse": "passes.cse:CommonSubexpressionElimination",
    "fold-constants": "passes.cleanup:FoldConstants",
    "fold-shapes": "passes.fold_shapes:FoldShapes",
    "fuse-affine": "passes.fusion:FuseAffine",
    "fuse-conv-bn": "passes.fusion:FuseConvBatchNorm",
    "fuse-gelu": "passes.fuse_gelu:FuseGelu",
    "fuse-gemm-transpose": "passes.fusion:FuseGemmTranspose",
    "fuse-layernorm": "passes.fuse_layernorm:FuseLayerNorm",
    "fuse-matmul-add": "passes.fusion:FuseMatMulAdd",
    "fuse-pad": "passes.fusion:FusePad",
    "layout-nchw": "passes.layout.nchw:LayoutNCHW",
    "lint-qdq": "passes.lint_qdq:LintQdq",
    "prune-channels": "passes.pruning.channels:PruneChannels",
    "prune-magnitude": "passes.pruning.sparsity:PruneMagnitude",
    "quantize-fp8": "passes.quantize_fp8:QuantizeFp8",
    "quantize-int4": "passes.quantize_int4:QuantizeInt4",
    "quantize-int8": "passes.quantization:QuantizeInt8",
    "remove-noop-arithmetic": "passes.remove_noop_arithmetic:RemoveNoopArithmetic",
    "simplify-layout-ops": "passes.simplify_layout_ops:SimplifyLayoutOps",
    "smooth-quant": "passes.smooth_quant:SmoothQuant",
    "sparsify-2to4": "passes.pruning.sparsity:Sparsify2to4",
    "upgrade-opset": "passes.opset:UpgradeOpset",
}

__all__ = ["BUILTIN_PASSES"]
