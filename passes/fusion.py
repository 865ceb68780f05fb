"""Layer fusion: fold normalization and affine ops into the weights of the layer before them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.registry import register_pass
from passes.graph_utils import (
    all_graphs,
    constant_values,
    evaluate_constant_expression,
    is_constant_expression,
    is_default_domain,
    only_consumer,
    unique_name,
)

FLOAT_TYPES = (np.float32, np.float16, np.float64)


def _bn_scale_shift(bn: gs.Node, opset: int) -> tuple[np.ndarray, np.ndarray, np.dtype] | None:
    """Per-channel (scale, shift) in float64 and the parameters' dtype, or None if not constant."""
    values = [evaluate_constant_expression(t, opset) for t in bn.inputs[1:5]]
    if any(v is None for v in values):
        return None
    gamma, beta, mean, var = (v.astype(np.float64).reshape(-1) for v in values)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale, values[0].dtype


@register_pass
@dataclass
class FuseConvBatchNorm(Pass):
    """Fold an inference-mode BatchNormalization into the Conv that feeds it::

        x -> Conv(W, b) -> BatchNormalization(gamma, beta, mean, var) -> y
        becomes
        x -> Conv(W * s, (b - mean) * s + beta) -> y        with s = gamma / sqrt(var + eps)

    ``s`` scales the Conv's output channels (axis 0 of W), so plain, grouped and depthwise
    convolutions fold the same way; a Conv without bias gets one. Folding is done in float64 and
    cast back to the weight's type. Weights that the model generates at run time from constants
    (``ConstantOfShape`` ...) are scaled by a ``Mul`` that runtimes fold at load time, rather than
    materialized here (which would inflate the model).

    Skipped (and counted in the stats): BN in training mode or with ``spatial=0``; a Conv whose
    weight or bias is not a constant (e.g. behind a DequantizeLinear); a Conv output read by
    another node or being a graph output; a channel count that does not match; non-float weights.
    """

    name = "fuse-conv-bn"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        folded = 0
        skipped: dict[str, int] = {}

        def skip(reason: str) -> None:
            skipped[reason] = skipped.get(reason, 0) + 1

        for g in all_graphs(graph):
            for bn in list(g.nodes):
                if bn.op != "BatchNormalization" or not is_default_domain(bn):
                    continue
                reason = self._fold(g, bn)
                if reason:
                    skip(reason)
                else:
                    folded += 1
        stats: dict[str, int | float] = {"folded": folded}
        stats.update({f"skipped_{k}": v for k, v in sorted(skipped.items())})
        return PassResult(changed=folded > 0, stats=stats)

    def _fold(self, g: gs.Graph, bn: gs.Node) -> str:
        """Fold ``bn`` into its producer; return why not (empty string when folded)."""
        if len(bn.inputs) < 5 or len([t for t in bn.outputs if t.outputs or t in g.outputs]) > 1:
            return "training_mode"
        if bn.attrs.get("training_mode", 0) or bn.attrs.get("spatial", 1) == 0:
            return "training_mode"
        x = bn.inputs[0]
        if len(x.inputs) != 1 or x.inputs[0].op != "Conv" or not is_default_domain(x.inputs[0]):
            return "no_conv_producer"
        conv = x.inputs[0]
        if not only_consumer(g, x, bn):
            return "conv_output_shared"
        if len(conv.inputs) < 2:
            return "weight_not_constant_float"
        affine = _bn_scale_shift(bn, g.opset)
        if affine is None:
            return "bn_params_not_constant"
        scale, shift, param_dtype = affine
        has_bias = len(conv.inputs) > 2 and conv.inputs[2].name != ""
        weight = constant_values(conv.inputs[1])
        if weight is not None:
            if weight.dtype.type not in FLOAT_TYPES:
                return "weight_not_constant_float"
            if scale.shape[0] != weight.shape[0]:
                return "channel_mismatch"
            dtype = weight.dtype
            new_w = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
            conv.inputs[1] = gs.Constant(unique_name(g, f"{conv.inputs[1].name}_bn"), new_w.astype(dtype))
        elif is_constant_expression(conv.inputs[1]):
            # Weights generated at run time (ConstantOfShape ...): scale them with a Mul that runtimes
            # fold at load time, instead of materializing them here and inflating the model.
            w_tensor = conv.inputs[1]
            dtype = np.dtype(w_tensor.dtype) if w_tensor.dtype is not None else np.dtype(param_dtype)
            if dtype.type not in FLOAT_TYPES:
                return "weight_not_constant_float"
            rank = len(w_tensor.shape) if w_tensor.shape else len(conv.inputs[0].shape or []) or 4
            s_const = gs.Constant(unique_name(g, f"{bn.name or 'bn'}_scale"), scale.reshape((-1,) + (1,) * (rank - 1)).astype(dtype))
            scaled = gs.Variable(unique_name(g, f"{w_tensor.name}_bn"), dtype=dtype, shape=w_tensor.shape)
            g.nodes.append(gs.Node("Mul", name=unique_name(g, f"{bn.name or 'bn'}_fold_w"), inputs=[w_tensor, s_const], outputs=[scaled]))
            conv.inputs[1] = scaled
        else:
            return "weight_not_constant_float"
        bias = constant_values(conv.inputs[2]) if has_bias else np.zeros(scale.shape[0], dtype)
        if bias is not None:
            if bias.reshape(-1).shape[0] != scale.shape[0]:
                return "channel_mismatch"
            new_b = bias.astype(np.float64).reshape(-1) * scale + shift
            b_const = gs.Constant(unique_name(g, f"{conv.name or 'conv'}_bias_bn"), new_b.astype(dtype))
        elif is_constant_expression(conv.inputs[2]):
            b_tensor = conv.inputs[2]
            s_const = gs.Constant(unique_name(g, f"{bn.name or 'bn'}_bscale"), scale.astype(dtype))
            t_const = gs.Constant(unique_name(g, f"{bn.name or 'bn'}_shift"), shift.astype(dtype))
            scaled_b = gs.Variable(unique_name(g, f"{b_tensor.name}_bn_scaled"), dtype=dtype)
            b_const = gs.Variable(unique_name(g, f"{b_tensor.name}_bn"), dtype=dtype)
            g.nodes.append(gs.Node("Mul", inputs=[b_tensor, s_const], outputs=[scaled_b]))
            g.nodes.append(gs.Node("Add", inputs=[scaled_b, t_const], outputs=[b_const]))
        else:
            return "bias_not_constant"
        if has_bias:
            conv.inputs[2] = b_const
        else:
            conv.inputs.append(b_const)
        y = bn.outputs[0]
        bn.outputs.clear()
        bn.inputs.clear()
        conv.outputs[0] = y
        return ""
