"""FP8 (E4M3) quantization with explicit Q/DQ nodes, for TensorRT on Ada, Hopper and Blackwell."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Tolerance, register_pass
from passes.quant_formats import FP8, QuantFormat
from passes.quantization import PlacementOptions, QuantizeInt8

#: (label, range method, percentile) tried by ``method=auto``. FP8's step grows with the value, so
#: clipping outliers buys little resolution: max calibration is the common choice (ModelOpt's
#: default); light percentile clipping is tried beside it. Entropy, mse and sqnr model the INT8
#: grid and are not offered.
FP8_CANDIDATES = (
    ("minmax", "minmax", None),
    ("percentile-99.999", "percentile", 99.999),
    ("percentile-99.99", "percentile", 99.99),
)

#: TensorRT's FP8 kernels (the rules NVIDIA ModelOpt applies): a Conv needs more than 16 input
#: channels per group and more than 16 output channels, and filters smaller than 32; a MatMul/Gemm
#: needs K and N of at least 16. Smaller layers, depthwise convolutions among them, gain nothing
#: from FP8 and stay in float (they also carry most of FP8's error on mobile CNNs: measured).
MIN_CONV_CHANNELS = 16
MAX_CONV_KERNEL = 32
MIN_GEMM_DIM = 16


def fp8_layer_filter(node: gs.Node, weight: np.ndarray) -> str | None:
    """Why TensorRT would not run ``node`` in FP8 (a skip reason), or None."""
    if node.op in ("Conv", "ConvTranspose") and weight.ndim >= 3:
        out_ch, in_ch = (weight.shape[0], weight.shape[1]) if node.op == "Conv" else (weight.shape[1], weight.shape[0])
        if min(out_ch, in_ch) <= MIN_CONV_CHANNELS:
            return "fp8_conv_channels_16_or_fewer"
        if max(weight.shape[2:]) >= MAX_CONV_KERNEL:
            return "fp8_conv_kernel_32_or_more"
    elif node.op in ("MatMul", "Gemm") and weight.ndim >= 2 and min(weight.shape[-2:]) < MIN_GEMM_DIM:
        return "fp8_gemm_dim_below_16"
    return None


@register_pass
@dataclass(frozen=True)
class QuantizeFp8(QuantizeInt8):
    """Insert FP8 (E4M3) Q/DQ nodes where TensorRT runs layers in FP8 (needs opset 19)::

        x -> QuantizeLinear(s_x, fp8) -> DequantizeLinear -> Conv(DequantizeLinear(W_fp8, s_w, axis=0)) -> y

    Placement is quantize-int8's (the inputs of Conv, ConvTranspose, Gemm and MatMul with a
    constant weight, residual Adds beside a Conv; everything else stays float), minus the layers
    TensorRT has no FP8 kernels for, as NVIDIA ModelOpt excludes them: Convs with 16 or fewer input
    channels per group or output channels (depthwise convolutions among them) or filters of 32 or
    more, and MatMul/Gemm with K or N below 16 -- counted as skipped with the reason. Activations are
    per tensor with scale amax/448 from calibration; weights are stored as float8e4m3fn, per output
    channel, scale amax/448. QuantizeLinear saturates to +-448 and rounds to the nearest E4M3 value.
    With ``attention=true`` the two activation MatMuls of attention (Q.K^T and softmax.V) are
    quantized too, which TensorRT's fused FP8 attention takes; off by default.

    Calibration method (``method``): ``auto`` (default) scores minmax and percentile 99.999/99.99
    end to end like quantize-int8's auto (one collection of statistics); or a fixed ``minmax`` or
    ``percentile``. No bias correction: E4M3 rounding is relative and unbiased, so weights show no
    mean shift worth folding. Below opset 19 the pass does nothing (``--fp8`` runs
    ``upgrade-opset(min=19)`` first). Options otherwise as quantize-int8: ``percentile``,
    ``min_weight_elements``, ``residual``, ``pooling``, ``exclude``, ``range_cache``.

    Accuracy floor (``min_cosine``, default 0.999): E4M3 keeps 3 mantissa bits, so every quantized
    layer adds about 30 dB of noise and deep transformers lose more than 0.1 % output cosine when
    all of them run in FP8 (the zoo's GPT-2, ViT and Whisper encoders: 0.9968-0.9985). When no
    ``--max-accuracy-drop`` is given, the driver returns the noisiest layers to float until every
    float output keeps cosine >= ``min_cosine`` on the evaluation samples, and reports each with its
    reason; ``min_cosine=0`` quantizes every eligible layer.

    Verification: lossy; outputs must keep cosine similarity >= 0.99 with the original.
    """

    name = "quantize-fp8"
    precision_flag = "fp8"
    tolerance = Tolerance(rtol=float("inf"), atol=float("inf"), min_cosine=0.99, max_mismatch=0.05)

    bias_correction: str = "off"
    attention: bool = False
    min_cosine: float = 0.999

    number_format: ClassVar[QuantFormat] = FP8
    method_choices: ClassVar[tuple[str, ...]] = ("auto", "minmax", "percentile")
    auto_candidates: ClassVar[tuple] = FP8_CANDIDATES
    bias_correction_choices: ClassVar[tuple[str, ...]] = ("off",)

    def placement(self) -> PlacementOptions:
        return PlacementOptions(self.min_weight_elements, self.pooling, self.residual,
                                quantize_attention=self.attention, layer_filter=fp8_layer_filter)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be within [0, 1] (0: no floor); got {self.min_cosine!r}")

    def accuracy_floor(self) -> float | None:
        return self.min_cosine if self.min_cosine > 0 else None
