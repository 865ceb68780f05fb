"""Layer fusion: fold normalization and affine ops into the weights of the layer before them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.registry import register_pass
from passes.graph_utils import all_graphs, constant_values, is_default_domain, only_consumer, unique_name

FLOAT_TYPES = (np.float32, np.float16, np.float64)


def _bn_scale_shift(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (scale, shift) of an inference BatchNormalization, or None if not constant."""
    values = [constant_values(t) for t in bn.inputs[1:5]]
    if any(v is None for v in values):
        return None
    gamma, beta, mean, var = (v.astype(np.float64).reshape(-1) for v in values)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


@register_pass
@dataclass
class FuseConvBatchNorm(Pass):
    """Fold an inference-mode BatchNormalization into the Conv that feeds it::

        x -> Conv(W, b) -> BatchNormalization(gamma, beta, mean, var) -> y
        becomes
        x -> Conv(W * s, (b - mean) * s + beta) -> y        with s = gamma / sqrt(var + eps)

    ``s`` scales the Conv's output channels (axis 0 of W), so plain, grouped and depthwise
    convolutions fold the same way; a Conv without bias gets one. Folding is done in float64 and
    cast back to the weight's type.

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
        weight = constant_values(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if weight is None or weight.dtype.type not in FLOAT_TYPES:
            return "weight_not_constant_float"
        has_bias = len(conv.inputs) > 2 and conv.inputs[2].name != ""
        bias = constant_values(conv.inputs[2]) if has_bias else np.zeros(weight.shape[0], weight.dtype)
        if bias is None:
            return "bias_not_constant"
        affine = _bn_scale_shift(bn)
        if affine is None:
            return "bn_params_not_constant"
        scale, shift = affine
        if scale.shape[0] != weight.shape[0] or bias.reshape(-1).shape[0] != weight.shape[0]:
            return "channel_mismatch"
        new_w = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        new_b = bias.astype(np.float64).reshape(-1) * scale + shift
        w_const = gs.Constant(unique_name(g, f"{conv.inputs[1].name}_bn"), new_w.astype(weight.dtype))
        b_const = gs.Constant(unique_name(g, f"{conv.name or 'conv'}_bias_bn"), new_b.astype(weight.dtype))
        conv.inputs[1] = w_const
        if has_bias:
            conv.inputs[2] = b_const
        else:
            conv.inputs.append(b_const)
        y = bn.outputs[0]
        bn.outputs.clear()
        bn.inputs.clear()
        conv.outputs[0] = y
        return ""
