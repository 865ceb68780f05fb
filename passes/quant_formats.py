"""The number formats of the Q/DQ quantization passes: symmetric INT8 and FP8 (E4M3).

A format says how a float value maps to its stored type (the largest representable magnitude
``qmax``, rounding and saturation as ``QuantizeLinear`` does them), which opset first has the
format in ``QuantizeLinear``/``DequantizeLinear`` and which first has per-channel weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class QuantFormat:
    name: str
    #: largest magnitude the stored type represents: scale = amax / qmax
    qmax: float
    storage: type
    #: first opset whose QuantizeLinear/DequantizeLinear take this type
    min_opset: int
    #: first opset with per-channel (``axis``) DequantizeLinear for this type
    per_channel_opset: int

    def zero_point(self) -> np.ndarray:
        return np.zeros((), self.storage)

    def to_storage(self, scaled: np.ndarray) -> np.ndarray:
        """``x / scale`` -> the stored type, as QuantizeLinear does: INT8 rounds half to even and
        clips; FP8 saturates to +-448 and rounds to the nearest E4M3 value (ml_dtypes, RNE)."""
        clipped = np.clip(scaled, -self.qmax, self.qmax)
        if np.issubdtype(np.dtype(self.storage), np.integer):
            return np.round(clipped).astype(self.storage)
        return clipped.astype(np.float32).astype(self.storage)


INT8 = QuantFormat("int8", 127.0, np.int8, min_opset=10, per_channel_opset=13)
FP8 = QuantFormat("fp8", 448.0, ml_dtypes.float8_e4m3fn, min_opset=19, per_channel_opset=19)


def quantize_weight(weight: np.ndarray, axis: int | None, fmt: QuantFormat = INT8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of a weight to ``fmt``: per-channel (``axis``) or per-tensor scales
    (amax / qmax); returns (stored values, float32 scales)."""
    w = weight.astype(np.float64)
    if axis is None:
        amax = np.asarray(np.abs(w).max())
        scale_b = np.maximum(amax, 1e-12) / fmt.qmax
        scale = np.asarray(scale_b, np.float32)
    else:
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=reduce_axes)
        scale = (np.maximum(amax, 1e-12) / fmt.qmax).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        scale_b = scale.astype(np.float64).reshape(shape)
    return fmt.to_storage(w / scale_b), scale


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """``q * scale`` in float64, broadcasting per-channel scales along ``axis``."""
    values = q.astype(np.float64)
    if axis is None:
        return values * np.float64(scale)
    shape = [1] * q.ndim
    shape[axis] = -1
    return values * scale.astype(np.float64).reshape(shape)
