"""Range methods: a symmetric INT8 range (``amax``, scale = amax/127, zero point 0) per tensor.

Every method reads a tensor's ``TensorStats`` (collected by ``calibration.collect``):

* ``minmax``: the largest |x| seen.
* ``percentile``: the given percentile (default 99.99) of |x|, read from the histogram with linear
  interpolation inside the bin (ONNX Runtime's calibrator takes the bin's upper edge instead).
* ``entropy``: TensorRT's EntropyCalibrator2 search (see ``entropy_threshold``).
* ``mse``: the threshold whose fake-quantized values have the least mean squared error against
  the float values, computed exactly from the histogram assuming values spread evenly inside each
  bin (see ``mse_threshold``).
* ``auto``: runs the candidate methods and keeps, per tensor, the one whose fake-quantized sample
  (the stats' reservoir) has the best SQNR against the float sample.

A threshold is never above the tensor's observed max |x|. Every ``TensorRange`` carries the SQNR
of its fake-quantized reservoir sample (``None`` without a sample or with an all-zero one).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from calibration.collect import TensorStats
from optimizer.errors import InputError

INT8_MAX = 127
#: ``sqnr`` (alias ``auto`` at this level): per tensor, the candidate with the best SQNR on the
#: tensor's own sample. ``quantize-int8(method=auto)`` instead selects one method end to end.
METHODS = ("minmax", "percentile", "entropy", "mse", "sqnr", "auto")
AUTO_CANDIDATES = ("minmax", "percentile", "entropy", "mse")
DEFAULT_PERCENTILE = 99.99


@dataclass(frozen=True)
class TensorRange:
    """A symmetric INT8 range: values in ``[-amax, amax]`` map to ``[-127, 127]``, zero point 0.

    ``method`` names the method that chose ``amax`` (``auto`` records the method it picked);
    ``sqnr_db`` is the SQNR of the fake-quantized calibration sample, when known.
    """

    name: str
    amax: float
    method: str
    sqnr_db: float | None = None

    @property
    def scale(self) -> float:
        """The quantization step: ``amax / 127``."""
        return self.amax / INT8_MAX

    @property
    def zero_point(self) -> int:
        return 0


# ---------------------------------------------------------------------------------------------
# fake quantization and SQNR


def fake_quantize(x: np.ndarray, amax: float) -> np.ndarray:
    """Quantize to symmetric INT8 with scale ``amax/127`` (round half to even, as QuantizeLinear) and back."""
    x = np.asarray(x, dtype=np.float64)
    if amax <= 0.0:
        return np.zeros_like(x)
    scale = amax / INT8_MAX
    return np.clip(np.round(x / scale), -INT8_MAX, INT8_MAX) * scale


def sqnr_db(x: np.ndarray, amax: float) -> float | None:
    """Signal-to-quantization-noise ratio of ``x`` fake-quantized with ``amax``, in dB.

    ``None`` for an empty or all-zero ``x``; ``inf`` when quantization is exact.
    """
    x = np.asarray(x, dtype=np.float64)
    signal = float(np.sum(x * x))
    if x.size == 0 or signal == 0.0:
        return None
    noise = float(np.sum((x - fake_quantize(x, amax)) ** 2))
    return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)


# ---------------------------------------------------------------------------------------------
# thresholds from an |x| histogram (bins of equal width starting at 0)


def _last_nonzero(hist: np.ndarray) -> int:
    """One past the last non-empty bin (0 for an empty histogram)."""
    nonzero = np.flatnonzero(hist)
    return int(nonzero[-1]) + 1 if nonzero.size else 0


def percentile_threshold(hist: np.ndarray, bin_width: float, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The ``percentile`` of |x| from its histogram, interpolated linearly inside the bin."""
    if not 0.0 < percentile <= 100.0:
        raise InputError(f"percentile must be in (0, 100], got {percentile}")
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    target = total * percentile / 100.0
    cumulative = np.cumsum(hist)
    index = min(int(np.searchsorted(cumulative, target, side="left")), hist.size - 1)
    before = cumulative[index - 1] if index else 0.0
    fraction = (target - before) / hist[index] if hist[index] else 1.0
    return (index + min(max(fraction, 0.0), 1.0)) * bin_width


def entropy_threshold(
    hist: np.ndarray, bin_width: float, *, num_quantized_bins: int = 128, start_bin: int = 128, chunk: int = 64
) -> float:
    """TensorRT's EntropyCalibrator2 threshold: the clip point whose 128-level quantization loses least.

    Followed: the algorithm in NVIDIA's "8-bit Inference with TensorRT" (Migacz, GTC 2017, the
    description TensorRT documents for entropy calibration) as ONNX Runtime implements it in
    ``onnxruntime/quantization/calibrate.py`` (``HistogramCollector.get_entropy_threshold``,
    ``quant_utils.smooth_distribution``), on the one-sided |x| histogram TensorRT uses:

    for each candidate ``i`` in ``start_bin .. last non-empty bin`` (TensorRT: 128 .. 2048)
      P = bins[0:i], with all outlier counts (bins[i:]) added to P's last bin;
      Q = bins[0:i] (without outliers) merged into 128 levels, each level's count spread evenly
          over the level's bins where P is non-zero (zero where P is zero);
      KL(P || Q) of the normalized P and Q;
    threshold = i × bin width (the upper edge of the last bin kept) for the ``i`` with the least KL
    (the largest ``i`` on ties, as pytorch-quantization does).

    Details where descriptions differ, and what we chose:
    * level ``k`` holds bins ``j`` with ``floor(j * 128 / i) == k``, so levels differ by at most one
      bin (ONNX Runtime gives the remainder of ``i / 128`` to the last level);
    * Q's zeros under a non-zero P (a level emptied of everything but P's outliers) are smoothed
      like ``smooth_distribution`` (eps = 1e-4 counts), the mass taken proportionally from the
      non-zero bins so no bin can go negative;
    * the spike of exact zeros (ReLU outputs) is capped at the next bin's count, as NVIDIA's
      pytorch-quantization does (``calib/histogram.py``: ``bins[0] = bins[1]``) — only lowered,
      never raised — because it would otherwise dominate the divergence of level 0;
    * TensorRT's histogram spans exactly [0, amax]; ours grows by doubling (``calibration.collect``),
      so the data fills between half and all of its bins: the search runs at 1024–2048 bins over
      [0, amax] and its smallest candidate is between amax/16 and amax/8.
    """
    hist = np.asarray(hist, dtype=np.float64).copy()
    if hist.size > 1:
        hist[0] = min(hist[0], hist[1])
    last = _last_nonzero(hist)
    if last == 0:
        return 0.0
    if last <= start_bin:
        return last * bin_width
    levels_n = int(num_quantized_bins)
    outliers = np.concatenate([np.cumsum(hist[:last][::-1])[::-1], [0.0]])  # outliers[i] = sum(bins[i:])
    best_kl, best_i = math.inf, last
    for first in range(start_bin, last + 1, chunk):
        cands = np.arange(first, min(first + chunk, last + 1))
        rows = cands.size
        width = int(cands[-1])  # columns this chunk needs
        columns = np.arange(width)
        inside = columns[None, :] < cands[:, None]
        in_range = np.where(inside, hist[None, :width], 0.0)
        p = in_range.copy()
        p[np.arange(rows), cands - 1] += outliers[cands]
        levels = np.where(inside, (columns[None, :] * levels_n) // cands[:, None], levels_n)
        flat = (np.arange(rows)[:, None] * (levels_n + 1) + levels).ravel()
        size = rows * (levels_n + 1)
        level_sum = np.bincount(flat, weights=in_range.ravel(), minlength=size).reshape(rows, -1)
        p_nonzero = p != 0
        level_nonzero = np.bincount(flat, weights=p_nonzero.ravel(), minlength=size).reshape(rows, -1)
        per_bin = level_sum / np.maximum(level_nonzero, 1.0)
        q = np.where(p_nonzero, np.take_along_axis(per_bin, levels, axis=1), 0.0)
        # Smooth Q where P has mass and Q has none (ONNX Runtime's smooth_distribution, eps = 1e-4).
        holes = p_nonzero & (q == 0)
        q_mass = q.sum(axis=1, keepdims=True)
        eps = 1e-4
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(holes, eps, q * (1.0 - eps * holes.sum(axis=1, keepdims=True) / np.where(q_mass > 0, q_mass, 1.0)))
            p = p / p.sum(axis=1, keepdims=True)
            q = q / q.sum(axis=1, keepdims=True)
            terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / np.where(q > 0, q, 1.0)), 0.0)
        kl = terms.sum(axis=1)
        kl[q_mass[:, 0] == 0] = math.inf  # nothing inside the range: Q is undefined
        for i, value in zip(cands, kl):
            if value <= best_kl:
                best_kl, best_i = value, int(i)
    return best_i * bin_width


def mse_threshold(
    hist: np.ndarray, bin_width: float, *, start_bin: int = 1, coarse_steps: int = 128, chunk: int = 64
) -> float:
    """The threshold (a bin edge) minimizing the mean squared error of fake-quantized |x|.

    For threshold T (step s = T/127) the error of a value x is the rounding error (sawtooth of
    period s) when x <= T and the clipping error x - T above. Assuming the values of each bin
    spread evenly over it, a bin's error is the integral of that squared error over the bin,
    computed in closed form, so the search needs no sample and covers every value seen.
    Candidates: the edges of bins ``start_bin`` .. last non-empty bin (searched coarse to fine:
    ``coarse_steps`` evenly spaced edges, then every edge between the best one's neighbours).
    """
    hist = np.asarray(hist, dtype=np.float64)
    last = _last_nonzero(hist)
    if last == 0:
        return 0.0
    start = max(1, min(start_bin, last))
    counts = hist[:last]
    lower = np.arange(last) * bin_width
    upper = lower + bin_width

    def errors(indices: np.ndarray) -> np.ndarray:
        t = (indices * bin_width)[:, None]
        return (counts * (_squared_error_integral(upper, t) - _squared_error_integral(lower, t))).sum(axis=1)

    # Coarse to fine: every ``stride``-th edge, then every edge around the best coarse one. The
    # error is an integral over the distribution, smooth in T at this scale, so this finds the
    # same minimum as a full scan at a tenth of the cost.
    stride = max(1, (last - start + 1) // coarse_steps)
    coarse = np.arange(start, last + 1, stride)
    if coarse[-1] != last:
        coarse = np.append(coarse, last)
    best = int(coarse[int(np.argmin(_chunked(errors, coarse, chunk)))])
    fine = np.arange(max(start, best - stride), min(last, best + stride) + 1)
    return float(fine[int(np.argmin(_chunked(errors, fine, chunk)))] * bin_width)


def _chunked(function: Callable[[np.ndarray], np.ndarray], values: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([function(values[i : i + chunk]) for i in range(0, values.size, chunk)])


def _squared_error_integral(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """An antiderivative in x of (x - Q_t(x))^2 for symmetric INT8 quantization with threshold t."""
    s = t / INT8_MAX
    inner = np.minimum(x, t)
    u = inner / s + 0.5
    k = np.floor(u)
    r = (u - k) * s - s / 2.0  # rounding error at ``inner``, in [-s/2, s/2)
    rounding = k * s**3 / 12.0 + (r**3 + s**3 / 8.0) / 3.0
    return rounding + np.maximum(x - t, 0.0) ** 3 / 3.0


# ---------------------------------------------------------------------------------------------
# methods on TensorStats


def _finish(stats: TensorStats, amax: float, method: str) -> TensorRange:
    amax = float(min(max(amax, 0.0), stats.amax))
    sample = stats.sample if stats.sample is not None else np.zeros(0)
    return TensorRange(stats.name, amax, method, sqnr_db(sample, amax))


def minmax(stats: TensorStats) -> TensorRange:
    """amax = the largest |x| seen."""
    return _finish(stats, stats.amax, "minmax")


def percentile(stats: TensorStats, percentile: float = DEFAULT_PERCENTILE) -> TensorRange:
    """amax = the ``percentile`` of |x| (default 99.99), from the histogram."""
    return _finish(stats, percentile_threshold(stats.hist, stats.bin_width, percentile), "percentile")


def entropy(stats: TensorStats, *, num_quantized_bins: int = 128, start_bin: int = 128) -> TensorRange:
    """amax = TensorRT's EntropyCalibrator2 threshold (KL divergence search, see ``entropy_threshold``)."""
    threshold = entropy_threshold(
        stats.hist, stats.bin_width, num_quantized_bins=num_quantized_bins, start_bin=start_bin
    )
    return _finish(stats, threshold, "entropy")


def mse(stats: TensorStats, *, start_bin: int = 1) -> TensorRange:
    """amax = the threshold with the least mean squared quantization error (see ``mse_threshold``)."""
    return _finish(stats, mse_threshold(stats.hist, stats.bin_width, start_bin=start_bin), "mse")


def auto(
    stats: TensorStats, *, candidates: tuple[str, ...] = AUTO_CANDIDATES, percentile: float = DEFAULT_PERCENTILE
) -> TensorRange:
    """The candidate method's range with the best SQNR on the reservoir sample (first on ties)."""
    best: TensorRange | None = None
    for method in candidates:
        if method in ("auto", "sqnr") or method not in _METHODS:
            raise InputError(f"auto cannot use candidate method {method!r}; choose from {', '.join(AUTO_CANDIDATES)}")
        found = compute_range(stats, method, percentile=percentile)
        if best is None or _score(found) > _score(best):
            best = found
    assert best is not None, "auto needs at least one candidate method"
    return best


def _score(found: TensorRange) -> float:
    return -math.inf if found.sqnr_db is None else found.sqnr_db


_METHODS: dict[str, Callable[..., TensorRange]] = {
    "minmax": minmax,
    "percentile": percentile,
    "entropy": entropy,
    "mse": mse,
    "sqnr": auto,
    "auto": auto,
}


def check_method(method: str) -> str:
    """``method`` if it is known, else an ``InputError`` with a suggestion."""
    if method not in _METHODS:
        close = difflib.get_close_matches(method, METHODS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise InputError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)}){hint}")
    return method


def compute_range(stats: TensorStats, method: str = "entropy", *, percentile: float = DEFAULT_PERCENTILE) -> TensorRange:
    """The range of one tensor by ``method`` (one of ``METHODS``)."""
    check_method(method)
    if method in ("percentile", "sqnr", "auto"):
        return _METHODS[method](stats, percentile=percentile)
    return _METHODS[method](stats)


def compute_ranges(
    stats: Mapping[str, TensorStats], method: str = "entropy", *, percentile: float = DEFAULT_PERCENTILE
) -> dict[str, TensorRange]:
    """``{tensor name: TensorRange}`` for every collected tensor."""
    check_method(method)
    return {name: compute_range(s, method, percentile=percentile) for name, s in stats.items()}
