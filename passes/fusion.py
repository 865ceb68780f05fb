"""Layer fusion: fold normalization and per-channel affine ops into the layer before them, and
merge MatMul/Add/Transpose/Pad into Gemm, Conv and pooling nodes.

All folds go through ``fold_channel_affine``: make a weighted layer compute
``layer(x) * scale + shift`` per output channel by rewriting its weights and bias in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.pass_base import register_pass
from passes.graph_utils import (
    FLOAT_TYPES,
    constant_values,
    detach,
    evaluate_constant_expression,
    infer_tensor_types,
    is_constant_expression,
    is_default_domain,
    is_graph_output,
    iter_sites,
    only_consumer,
    unique_name,
)
from passes.match import producer
from passes.skips import Skips

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# -- the shared fold ---------------------------------------------------------------------------
def _output_channels(layer: gs.Node, weight_shape: tuple[int, ...]) -> int | None:
    if layer.op == "Conv":
        return weight_shape[0]
    if layer.op == "ConvTranspose":
        return weight_shape[1] * int(layer.attrs.get("group", 1))
    if layer.op == "Gemm":
        return weight_shape[0] if layer.attrs.get("transB", 0) else weight_shape[1]
    if layer.op == "MatMul" and len(weight_shape) == 2:
        return weight_shape[1]
    return None


def _weight_scale_shape(layer: gs.Node, weight_shape: tuple[int, ...], scale: np.ndarray) -> np.ndarray | None:
    """``scale`` (per output channel) laid out to multiply the weight elementwise."""
    rank = len(weight_shape)
    if layer.op == "Conv":
        return scale.reshape((-1,) + (1,) * (rank - 1))
    if layer.op == "ConvTranspose":
        group = int(layer.attrs.get("group", 1))
        cin, cout_g = weight_shape[0], weight_shape[1]
        per_group = scale.reshape(group, 1, cout_g)  # output channel o = g * cout_g + j
        full = np.broadcast_to(per_group, (group, cin // group, cout_g)).reshape(cin, cout_g)
        return full.reshape(full.shape + (1,) * (rank - 2))
    if layer.op == "Gemm":
        return scale.reshape(-1, 1) if layer.attrs.get("transB", 0) else scale.reshape(1, -1)
    if layer.op == "MatMul":
        return scale.reshape(1, -1)
    return None


def fold_channel_affine(
    g: gs.Graph, layer: gs.Node, scale: np.ndarray, shift: np.ndarray, out: gs.Tensor, dtype_hint: np.dtype
) -> str:
    """Make ``layer`` write ``out = layer(x) * scale + shift`` (per output channel).

    ``dtype_hint`` is the float type of the folded constants, used when the weight's own type is
    not recorded in the graph. Returns "" when done, else the reason it was skipped (nothing is changed then). Supports
    Conv, ConvTranspose, Gemm, and MatMul with a constant weight (which becomes a Gemm when a
    shift is needed): for MatMul the caller must have checked that its input is 2-D.
    """
    if len(layer.inputs) < 2:
        return "weight_not_constant_float"
    weight_t = layer.inputs[1]
    weight = constant_values(weight_t)
    generated = weight is None and layer.op in ("Conv", "Gemm") and is_constant_expression(weight_t) and (
        weight_t.shape is not None or layer.op == "Conv"
    )
    if weight is not None:
        if weight.dtype.type not in FLOAT_TYPES:
            return "weight_not_constant_float"
        w_shape, dtype = weight.shape, weight.dtype
    elif generated:
        dtype = np.dtype(weight_t.dtype) if weight_t.dtype is not None else np.dtype(dtype_hint)
        if dtype.type not in FLOAT_TYPES:
            return "weight_not_constant_float"
        rank = len(weight_t.shape) if weight_t.shape else 4
        w_shape = tuple(weight_t.shape) if weight_t.shape and all(isinstance(d, int) for d in weight_t.shape) else None
        if w_shape is None and layer.op != "Conv":
            return "weight_shape_unknown"
        w_shape = w_shape or (scale.shape[0],) + (1,) * (rank - 1)
    else:
        return "weight_not_constant_float"
    channels = _output_channels(layer, w_shape)
    if channels is None or channels != scale.shape[0]:
        return "channel_mismatch"
    if layer.op == "Gemm" and (layer.attrs.get("alpha", 1.0) == 0):
        return "gemm_alpha_zero"

    # bias: Conv/ConvTranspose input 2 (shape [C]); Gemm input C scaled by beta
    bias_index = 2
    has_bias = len(layer.inputs) > bias_index and layer.inputs[bias_index].name != ""
    beta = float(layer.attrs.get("beta", 1.0)) if layer.op == "Gemm" else 1.0
    if has_bias:
        bias = constant_values(layer.inputs[bias_index])
        if bias is None:
            return "bias_not_constant"
        bias = bias.astype(np.float64)
        if layer.op == "Gemm":
            if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, channels)) or (bias.ndim == 2 and bias.shape[0] != 1):
                return "gemm_bias_shape"
            bias = np.broadcast_to(bias.reshape(-1), (channels,)) * beta
        elif bias.reshape(-1).shape[0] != channels:
            return "channel_mismatch"
        bias = bias.reshape(-1)
    else:
        bias = np.zeros(channels, np.float64)
    new_bias = bias * scale + shift

    # -- rewrite (nothing above changed the graph) -------------------------------------------
    if weight is not None:
        layout = _weight_scale_shape(layer, w_shape, scale)
        new_w = (weight.astype(np.float64) * layout).astype(dtype)
        layer.inputs[1] = gs.Constant(unique_name(g, f"{weight_t.name}_fused"), new_w)
    else:
        # Weights generated at run time (ConstantOfShape ...): scale them with a Mul that runtimes
        # fold at load time, instead of materializing them here and inflating the model.
        layout = _weight_scale_shape(layer, w_shape, scale).astype(dtype)
        s_const = gs.Constant(unique_name(g, f"{layer.name or layer.op}_wscale"), layout)
        scaled = gs.Variable(unique_name(g, f"{weight_t.name}_fused"), dtype=dtype, shape=weight_t.shape)
        g.nodes.append(gs.Node("Mul", name=unique_name(g, f"{layer.name or layer.op}_fold_w"), inputs=[weight_t, s_const], outputs=[scaled]))
        layer.inputs[1] = scaled
    if layer.op == "MatMul":
        if np.any(new_bias != 0):
            layer.op = "Gemm"
            layer.attrs = {}
        else:
            layer.outputs[0] = out
            return ""
    if layer.op == "Gemm":
        layer.attrs["beta"] = 1.0
    b_const = gs.Constant(unique_name(g, f"{layer.name or layer.op}_bias_fused"), new_bias.astype(dtype))
    if has_bias:
        layer.inputs[bias_index] = b_const
    else:
        layer.inputs.append(b_const)
    layer.outputs[0] = out
    return ""


def _bn_scale_shift(bn: gs.Node, opset: int) -> tuple[np.ndarray, np.ndarray, np.dtype] | None:
    """Per-channel (scale, shift) of an inference BatchNormalization in float64, and the dtype of
    its parameters; None when they are not constant."""
    values = [evaluate_constant_expression(t, opset) for t in bn.inputs[1:5]]
    if any(v is None for v in values):
        return None
    gamma, beta, mean, var = (v.astype(np.float64).reshape(-1) for v in values)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale, values[0].dtype


def _bn_is_inference(g: gs.Graph, bn: gs.Node) -> bool:
    if len(bn.inputs) < 5 or bn.attrs.get("training_mode", 0) or bn.attrs.get("spatial", 1) == 0:
        return False
    return not any(t.outputs or is_graph_output(g, t) for t in bn.outputs[1:])


@register_pass
@dataclass(frozen=True)
class FuseConvBatchNorm(Pass):
    """Fold an inference-mode BatchNormalization into the weighted layer that feeds it::

        x -> Conv(W, b) -> BatchNormalization(gamma, beta, mean, var) -> y
        becomes
        x -> Conv(W * s, (b - mean) * s + beta) -> y        with s = gamma / sqrt(var + eps)

    The layer may be a Conv (plain, grouped, depthwise: ``s`` scales axis 0 of W), a
    ConvTranspose (``s`` scales axis 1, per group), a Gemm (columns of B, and its C), or a 2-D
    MatMul with a constant weight (which becomes a Gemm to carry the bias). A layer without bias
    gets one. Folding is done in float64 and cast back to the weight's type. Weights that the
    model generates at run time from constants (``ConstantOfShape`` ...) are scaled by a ``Mul``
    that runtimes fold at load time, rather than materialized here (which would inflate the model).

    Skipped (and counted in the stats): BN in training mode or with ``spatial=0``; a layer whose
    weight or bias is not a constant (e.g. behind a DequantizeLinear); a layer output read by
    another node or being a graph output; a channel count that does not match; non-float weights.
    BNs left over are turned into Mul+Add by ``batchnorm-to-affine``.
    """

    name = "fuse-conv-bn"
    requires_any_op = frozenset({"BatchNormalization"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return _rewrite_sites(graph, ("BatchNormalization",), self._fold, "folded")

    def _fold(self, g: gs.Graph, bn: gs.Node, info) -> str:
        if not _bn_is_inference(g, bn):
            return "training_mode"
        layer = producer(bn.inputs[0])
        if layer is None or layer.op not in WEIGHTED_OPS or not is_default_domain(layer):
            return "no_conv_producer"
        if not only_consumer(g, bn.inputs[0], bn):
            return "conv_output_shared"
        if layer.op == "MatMul" and (_rank(layer.inputs[0], info) != 2):
            return "matmul_not_2d"
        affine = _bn_scale_shift(bn, g.opset)
        if affine is None:
            return "bn_params_not_constant"
        y = bn.outputs[0]
        reason = fold_channel_affine(g, layer, affine[0], affine[1], y, affine[2])
        if not reason:
            bn.outputs.clear()
            bn.inputs.clear()
        return reason


@register_pass
@dataclass(frozen=True)
class BatchNormToAffine(Pass):
    """Rewrite an inference BatchNormalization with no foldable producer as a per-channel Mul+Add::

        x -> BatchNormalization(gamma, beta, mean, var) -> y
        becomes
        x -> Mul(s) -> Add(beta - mean * s) -> y       s = gamma / sqrt(var + eps), shape [C,1,...]

    TensorRT and ONNX Runtime fuse the pair into neighbouring layers, and ``fuse-affine`` folds it
    into a preceding weighted layer when one appears. Needs the input rank (from the model or
    shape inference); skipped otherwise, or in training mode.
    """

    name = "batchnorm-to-affine"
    requires_any_op = frozenset({"BatchNormalization"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        converted = 0
        skips = Skips()
        shapes = None
        for g, bn in iter_sites(graph, ("BatchNormalization",), min_inputs=1):
            if not _bn_is_inference(g, bn):
                skips.add("training_mode")
                continue
            x = bn.inputs[0]
            rank = len(x.shape) if x.shape is not None else None
            if rank is None:
                shapes = shapes if shapes is not None else infer_tensor_types(graph)
                known = shapes.get(x.name, (None, None))[0]
                rank = len(known) if known is not None else None
            if rank is None or rank < 2:
                skips.add("rank_unknown")
                continue
            affine = _bn_scale_shift(bn, g.opset)
            if affine is None:
                skips.add("bn_params_not_constant")
                continue
            dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(affine[2])
            layout = (-1,) + (1,) * (rank - 2)
            s = gs.Constant(unique_name(g, f"{bn.name or 'bn'}_scale"), affine[0].reshape(layout).astype(dtype))
            t = gs.Constant(unique_name(g, f"{bn.name or 'bn'}_shift"), affine[1].reshape(layout).astype(dtype))
            mid = gs.Variable(unique_name(g, f"{bn.name or 'bn'}_scaled"), dtype=dtype, shape=x.shape)
            y = bn.outputs[0]
            detach(bn)
            g.nodes.append(gs.Node("Mul", name=unique_name(g, f"{bn.name or 'bn'}_mul"), inputs=[x, s], outputs=[mid]))
            g.nodes.append(gs.Node("Add", name=unique_name(g, f"{bn.name or 'bn'}_add"), inputs=[mid, t], outputs=[y]))
            converted += 1
        return PassResult(changed=converted > 0, stats={"converted": converted}, skipped=skips)


def _layer_output_rank(layer: gs.Node, info) -> int | None:
    if layer.op in ("Conv", "ConvTranspose"):
        w = layer.inputs[1]
        if w.shape is not None:
            return len(w.shape)
        known = info().get(w.name, (None, None))[0]
        return len(known) if known is not None else None
    if layer.op in ("Gemm",):
        return 2
    out = layer.outputs[0]
    known = out.shape if out.shape is not None else info().get(out.name, (None, None))[0]
    return len(known) if known is not None else None


def _per_channel(c: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``c`` as a [channels] vector if it broadcasts along axis 1 of a rank-``rank`` output only."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).astype(np.float64)


class _LazyInfo:
    """Shape inference run at most once per pass, only when a site needs it."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.info = None

    def __call__(self):
        if self.info is None:
            self.info = infer_tensor_types(self.graph)
        return self.info

def _rewrite_sites(graph: gs.Graph, ops: tuple[str, ...], rewrite, counter: str, min_inputs: int = 1) -> PassResult:
    """Call ``rewrite(g, node, info)`` on every default-domain node of type ``ops`` (in the graph and
    its subgraphs); it returns "" when it rewrote the site, a skip reason, or None to ignore it."""
    done = 0
    skips = Skips()
    info = _LazyInfo(graph)
    for g, node in iter_sites(graph, ops, min_inputs):
        reason = rewrite(g, node, info)
        if reason is None:
            continue
        if reason:
            skips.add(reason)
        else:
            done += 1
    return PassResult(changed=done > 0, stats={counter: done}, skipped=skips)



@register_pass
@dataclass(frozen=True)
class FuseAffine(Pass):
    """Fold a per-output-channel constant Mul/Add/Sub/Div after a weighted layer into it::

        x -> Conv(W, b) -> Mul(c) -> y        becomes   x -> Conv(W * c, b * c) -> y
        x -> Conv(W, b) -> Add(c) -> y        becomes   x -> Conv(W, b + c) -> y
        (Sub(c): b - c;  Div(c): W / c, b / c)

    The layer may be Conv, ConvTranspose, Gemm, or a 2-D MatMul with a constant weight. ``c`` must
    be a constant that broadcasts along the output-channel axis only (shape [C,1,1], [1,C,1,1],
    scalar ... for Conv; [N] or [1,N] for Gemm), so the output shape cannot change. Only
    ``layer - c`` and ``layer / c`` (not ``c - layer``, ``c / layer``), and no division by zero.

    Skipped (and counted): a layer output read elsewhere or being a graph output, non-constant
    weights (e.g. Q/DQ), constants that broadcast along other axes, unknown ranks.
    """

    name = "fuse-affine"
    requires_any_op = frozenset({"Mul", "Add", "Sub", "Div"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return _rewrite_sites(graph, ("Mul", "Add", "Sub", "Div"), self._fold, "folded", min_inputs=2)

    def _fold(self, g: gs.Graph, node: gs.Node, info) -> str | None:
        order = (0, 1) if node.op in ("Mul", "Add") else (0,)
        for i in order:
            layer = producer(node.inputs[i])
            c = constant_values(node.inputs[1 - i])
            if layer is None or layer.op not in WEIGHTED_OPS or not is_default_domain(layer) or c is None:
                continue
            if not only_consumer(g, node.inputs[i], node):
                return "layer_output_shared"
            if c.dtype.type not in FLOAT_TYPES:
                return "constant_not_float"
            weight = constant_values(layer.inputs[1]) if len(layer.inputs) > 1 else None
            w_shape = weight.shape if weight is not None else layer.inputs[1].shape if len(layer.inputs) > 1 else None
            if not w_shape or not all(isinstance(d, int) for d in w_shape):
                return "weight_not_constant_float"
            channels = _output_channels(layer, tuple(w_shape))
            rank = _layer_output_rank(layer, info)
            if channels is None or rank is None:
                return "rank_unknown"
            if layer.op == "MatMul" and (rank != 2 or _rank(layer.inputs[0], info) != 2):
                return "matmul_not_2d"
            vector = _per_channel(c, rank, channels)
            if vector is None:
                return "not_per_channel"
            if node.op == "Mul":
                scale, shift = vector, np.zeros(channels)
            elif node.op == "Div":
                if np.any(vector == 0):
                    return "division_by_zero"
                scale, shift = 1.0 / vector, np.zeros(channels)
            elif node.op == "Add":
                scale, shift = np.ones(channels), vector
            else:
                scale, shift = np.ones(channels), -vector
            y = node.outputs[0]
            reason = fold_channel_affine(g, layer, scale, shift, y, c.dtype)
            if not reason:
                detach(node)
            return reason
        return None


def _rank(tensor: gs.Tensor, info) -> int | None:
    shape = tensor.shape if tensor.shape is not None else info().get(tensor.name, (None, None))[0]
    return len(shape) if shape is not None else None


@register_pass
@dataclass(frozen=True)
class FuseMatMulAdd(Pass):
    """Merge a 2-D MatMul and the Add of a bias into one Gemm::

        A[M,K] -> MatMul(B[K,N]) -> Add(bias) -> y        becomes     A -> Gemm(A, B, bias) -> y

    Only when both MatMul inputs are known to be 2-D (Gemm is 2-D only; batched MatMuls stay), the
    MatMul output has no other reader and is not a graph output, and the bias is a constant of
    shape [N], [1,N] or a scalar (so broadcasting cannot change the output shape).
    """

    name = "fuse-matmul-add"
    requires_any_op = frozenset({"MatMul"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        def rewrite(g, add, info):
            for i in (0, 1):
                mm = producer(add.inputs[i])
                if mm is not None and mm.op == "MatMul" and is_default_domain(mm):
                    return self._fuse(g, add, mm, add.inputs[i], add.inputs[1 - i], info)
            return None

        return _rewrite_sites(graph, ("Add",), rewrite, "fused", min_inputs=2)

    def _fuse(self, g, add, mm, mm_out, bias_t, info) -> str:
        if not only_consumer(g, mm_out, add):
            return "matmul_output_shared"
        if _rank(mm.inputs[0], info) != 2 or _rank(mm.inputs[1], info) != 2:
            return "not_2d"
        bias = constant_values(bias_t)
        if bias is None:
            return "bias_not_constant"
        b_shape = mm.inputs[1].shape if mm.inputs[1].shape is not None else info().get(mm.inputs[1].name, (None, None))[0]
        n = b_shape[1] if b_shape else None
        if not (bias.ndim == 0 or bias.shape in ((n,), (1, n), (1,), (1, 1))) or n is None:
            return "bias_shape"
        if bias.dtype.type not in FLOAT_TYPES:
            return "not_float"
        y = add.outputs[0]
        a, b = mm.inputs[0], mm.inputs[1]
        detach(add, mm)
        g.nodes.append(gs.Node("Gemm", name=mm.name or None, inputs=[a, b, bias_t], outputs=[y]))
        return ""


@register_pass
@dataclass(frozen=True)
class FuseGemmTranspose(Pass):
    """Absorb a 2-D Transpose feeding a Gemm (or a 2-D MatMul) into its ``transA``/``transB``::

        X -> Transpose(perm=[1,0]) -> Gemm(A, ., C)     becomes     Gemm(A, X, C, transB=1)

    A 2-D MatMul with a transposed input becomes a Gemm. Transposes of constant weights are
    folded by ``fold-constants``; this pass handles computed tensors. The Transpose output must
    have no other reader and not be a graph output.
    """

    name = "fuse-gemm-transpose"
    requires_any_op = frozenset({"Transpose"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        fused = 0
        skips = Skips()
        info = _LazyInfo(graph)
        for g, node in iter_sites(graph, ("Gemm", "MatMul"), min_inputs=2):
            for i, attr in ((0, "transA"), (1, "transB")):
                tr = producer(node.inputs[i])
                if tr is None or tr.op != "Transpose" or not is_default_domain(tr):
                    continue
                perm = list(tr.attrs.get("perm", [1, 0]))
                if perm != [1, 0] or _rank(tr.inputs[0], info) != 2:
                    skips.add("not_2d_transpose")
                    continue
                if node.op == "MatMul" and (_rank(node.inputs[1 - i], info) != 2):
                    skips.add("not_2d")
                    continue
                if not only_consumer(g, node.inputs[i], node):
                    skips.add("transpose_shared")
                    continue
                if node.op == "MatMul":
                    node.op = "Gemm"
                    node.attrs = {}
                node.attrs[attr] = 1 - int(node.attrs.get(attr, 0))
                node.inputs[i] = tr.inputs[0]
                fused += 1
        return PassResult(changed=fused > 0, stats={"fused": fused}, skipped=skips)


def _pad_amounts(pad: gs.Node, rank: int) -> np.ndarray | None:
    """Pads as [begin..., end...] for all axes, or None if not constant/zero-valued/constant mode."""
    mode = pad.attrs.get("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode != "constant":
        return None
    if "pads" in pad.attrs:  # opset < 11
        pads = np.asarray(pad.attrs["pads"], np.int64)
        value = float(pad.attrs.get("value", 0.0))
        axes = None
    else:
        pads = constant_values(pad.inputs[1]) if len(pad.inputs) > 1 else None
        if pads is None:
            return None
        value_t = pad.inputs[2] if len(pad.inputs) > 2 and pad.inputs[2].name else None
        value_arr = constant_values(value_t) if value_t is not None else np.zeros(1)
        if value_arr is None:
            return None
        value = float(np.asarray(value_arr).reshape(-1)[0]) if np.asarray(value_arr).size else 0.0
        axes_t = pad.inputs[3] if len(pad.inputs) > 3 and pad.inputs[3].name else None
        axes = constant_values(axes_t) if axes_t is not None else None
        if axes_t is not None and axes is None:
            return None
    if value != 0.0:
        return None
    pads = pads.astype(np.int64).reshape(-1)
    if axes is not None:
        full = np.zeros(2 * rank, np.int64)
        axes = [int(a) % rank for a in axes.reshape(-1)]
        for k, a in enumerate(axes):
            full[a] = pads[k]
            full[a + rank] = pads[k + len(axes)]
        pads = full
    return pads if pads.size == 2 * rank else None


@register_pass
@dataclass(frozen=True)
class FusePad(Pass):
    """Fold a zero, constant-mode Pad on spatial axes into the Conv or pooling node after it::

        x -> Pad(pads, value=0) -> Conv(pads=p) -> y      becomes     x -> Conv(pads=p + pads) -> y

    Conv: any zero Pad on spatial axes (not batch/channel), non-negative, ``auto_pad`` NOTSET.
    AveragePool: only if ``count_include_pad=1`` or its own pads are zero (then it is set to 1, so
    the padded zeros still count in the average). MaxPool: only when the padded tensor is known
    non-negative (produced by Relu), since MaxPool pads with -inf while Pad adds zeros. Pooling
    pads must stay smaller than the kernel (an ONNX rule). Skipped sites are counted.
    """

    name = "fuse-pad"
    requires_any_op = frozenset({"Pad"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        def rewrite(g, node, info):
            pad = producer(node.inputs[0])
            if pad is None or pad.op != "Pad" or not is_default_domain(pad):
                return None
            return self._fuse(g, node, pad, info)

        return _rewrite_sites(graph, ("Conv", "AveragePool", "MaxPool"), rewrite, "fused")

    def _fuse(self, g, node, pad, info) -> str:
        if not only_consumer(g, node.inputs[0], node):
            return "pad_output_shared"
        rank = _rank(pad.inputs[0], info)
        if rank is None or rank < 3:
            return "rank_unknown"
        pads = _pad_amounts(pad, rank)
        if pads is None:
            return "not_zero_constant_pad"
        begin, end = pads[:rank], pads[rank:]
        if np.any(pads < 0) or begin[0] or begin[1] or end[0] or end[1]:
            return "pads_not_spatial"
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        if auto_pad not in ("NOTSET", ""):
            return "auto_pad"
        spatial = rank - 2
        own = np.asarray(node.attrs.get("pads", [0] * (2 * spatial)), np.int64)
        if node.op == "AveragePool" and not node.attrs.get("count_include_pad", 0) and np.any(own):
            return "avgpool_excludes_pad"
        if node.attrs.get("ceil_mode", 0):
            return "ceil_mode"  # windows past the padded edge are counted differently
        new = own + np.concatenate([begin[2:], end[2:]])
        if node.op != "Conv":
            kernel = np.asarray(node.attrs.get("kernel_shape", []), np.int64)
            if kernel.size != spatial or np.any(new >= np.concatenate([kernel, kernel])):
                return "pool_pads_not_below_kernel"  # ONNX requires pool pads < kernel
        if node.op == "MaxPool":
            src = producer(pad.inputs[0])
            if src is None or src.op != "Relu":
                return "maxpool_input_not_nonnegative"
            if len(node.outputs) > 1 and node.outputs[1].outputs:
                return "maxpool_indices_used"
        node.attrs["pads"] = [int(v) for v in new]
        if node.op == "AveragePool":
            node.attrs["count_include_pad"] = 1
        node.inputs[0] = pad.inputs[0]
        return ""
