"""Streaming statistics of intermediate tensors, collected with ONNX Runtime batch by batch.

The model is copied and the requested tensors are added as graph outputs; ONNX Runtime runs it
(graph optimizations off, as everywhere in this project) on one batch at a time, and each tensor's
``TensorStats`` is updated and the batch dropped. Memory therefore depends on the batch size and
the number of tensors, never on the number of samples:

* running ``min``/``max`` and ``amax`` (max |x|), element ``count`` and ``nonfinite`` (NaN/inf,
  left out of everything else);
* a histogram of |x| with ``num_bins`` bins over ``[0, hist_range]``. The first batch with a
  non-zero value sets ``hist_range`` to its max |x|. When a later batch exceeds the range, the range
  is doubled until it fits, and each doubling merges the existing bins pairwise (bin ``2j`` and
  ``2j+1`` become bin ``j``) and appends empty bins above: the old counts are re-binned exactly,
  because the doubled range's bin edges are every other old edge. Hence ``num_bins`` must be even,
  and the data always spans more than half the bins (``amax > hist_range / 2``);
* a uniform random sample (reservoir) of at most ``sample_size`` values, seeded, for the methods
  that measure quantization error on real values (``auto``'s SQNR). It is a bottom-k sample: every
  value gets an independent uniform key and the ``sample_size`` smallest keys win. Per batch only
  ``min(batch, sample_size)`` values can enter, so we draw which ones (a uniform subset) and their
  keys (the smallest order statistics of the batch's uniforms, drawn exactly from exponential
  spacings), never a key per element: the cost is independent of the batch's size.

Tensors produced inside subgraphs (If/Loop/Scan bodies), initializers, non-float tensors and names
the model does not have are skipped; ``CalibrationStatistics.skipped`` says why for each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from calibration.sources import (
    CalibrationSource,
    batch_len,
    effective_batch_size,
    is_fixed_batch,
    open_source,
)
from optimizer.errors import InputError
from optimizer.runtime import OrtRunner, input_specs

log = logging.getLogger(__name__)

DEFAULT_NUM_BINS = 2048
DEFAULT_SAMPLE_SIZE = 4096
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}

Progress = Callable[[str, "int | None"], Callable[..., None]]


@dataclass(eq=False)
class TensorStats:
    """Running statistics of one tensor's values (see the module docstring for the histogram)."""

    name: str
    num_bins: int = DEFAULT_NUM_BINS
    sample_size: int = DEFAULT_SAMPLE_SIZE
    seed: int | tuple[int, ...] = 0
    count: int = 0
    nonfinite: int = 0
    min: float = float("inf")
    max: float = float("-inf")
    amax: float = 0.0
    hist_range: float = 0.0
    hist: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    sample: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _keys: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _rng: np.random.Generator = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self):
        if self.num_bins < 2 or self.num_bins % 2:
            raise InputError(f"num_bins must be an even number >= 2 (the histogram grows by merging bin pairs), got {self.num_bins}")
        if self.sample_size < 0:
            raise InputError(f"sample_size must be >= 0, got {self.sample_size}")
        if self.hist is None:
            self.hist = np.zeros(self.num_bins, dtype=np.int64)
        if self.sample is None:
            self.sample = np.zeros(0, dtype=np.float32)
        if self._keys is None:
            self._keys = np.zeros(0, dtype=np.float64)
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)

    @classmethod
    def from_array(cls, name: str, values: np.ndarray, **options) -> TensorStats:
        """Statistics of one array (tests, weights)."""
        stats = cls(name, **options)
        stats.update(values)
        return stats

    @property
    def bin_width(self) -> float:
        return self.hist_range / self.num_bins

    @property
    def edges(self) -> np.ndarray:
        """The ``num_bins + 1`` bin edges of the |x| histogram."""
        return np.linspace(0.0, self.hist_range, self.num_bins + 1)

    def update(self, values: np.ndarray) -> None:
        """Fold one batch of values into the statistics; nothing of the batch is kept but the sample."""
        x = np.asarray(values)
        if x.dtype.kind != "f" or x.dtype.itemsize < 4:
            x = x.astype(np.float32)
        x = x.reshape(-1)
        if x.size == 0:
            return
        finite = np.isfinite(x)
        if not finite.all():
            bad = int(x.size - np.count_nonzero(finite))
            if not self.nonfinite:
                log.warning("tensor '%s' has NaN/inf values; they are left out of its statistics", self.name)
            self.nonfinite += bad
            x = x[finite]
            if x.size == 0:
                return
        del finite
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        magnitude = np.abs(x)
        batch_amax = float(magnitude.max())
        self.amax = max(self.amax, batch_amax)
        self._add_to_histogram(magnitude, batch_amax)
        del magnitude
        self._add_to_sample(x)
        self.count += int(x.size)

    def _add_to_histogram(self, magnitude: np.ndarray, batch_amax: float) -> None:
        if self.hist_range == 0.0:
            if batch_amax == 0.0:  # all zeros so far: they belong in bin 0 whatever the range becomes
                self.hist[0] += magnitude.size
                return
            self.hist_range = batch_amax
        while batch_amax > self.hist_range:
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.concatenate([merged, np.zeros(self.num_bins - merged.size, dtype=np.int64)])
            self.hist_range *= 2.0
        # np.histogram bins uniform ranges in blocks, so its temporaries stay small.
        counts, _ = np.histogram(magnitude, bins=self.num_bins, range=(0.0, self.hist_range))
        self.hist += counts

    def _add_to_sample(self, x: np.ndarray) -> None:
        k = self.sample_size
        if k == 0:
            return
        n = x.size
        m = min(n, k)
        rng = self._rng
        # The m smallest of n iid U(0,1) keys, ascending: S_j / (S_m + Gamma(n + 1 - m)) with
        # S_j the partial sums of m Exp(1) draws; they sit on a uniform random m-subset of positions.
        spacings = np.cumsum(rng.standard_exponential(m))
        keys = spacings / (spacings[-1] + rng.standard_gamma(n + 1 - m))
        positions = rng.choice(n, size=m, replace=False) if m < n else rng.permutation(n)
        values = x[positions].astype(np.float32)
        all_keys = np.concatenate([self._keys, keys])
        all_values = np.concatenate([self.sample, values])
        if all_keys.size > k:
            keep = np.argpartition(all_keys, k - 1)[:k]
            all_keys, all_values = all_keys[keep], all_values[keep]
        self._keys, self.sample = all_keys, all_values


class CalibrationStatistics(dict):
    """``{tensor name: TensorStats}`` plus what the run skipped and saw.

    ``skipped``: ``{tensor name: reason}``; ``samples``/``batches``: how much data went through;
    ``source``: the data's description; ``synthetic``: true for made-up data; ``warnings``.
    """

    def __init__(self, stats: dict[str, TensorStats] | None = None):
        super().__init__(stats or {})
        self.skipped: dict[str, str] = {}
        self.samples = 0
        self.batches = 0
        self.source = ""
        self.synthetic = False
        self.warnings: list[str] = []


def _graph_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def _subgraph_names(graph: onnx.GraphProto) -> set[str]:
    """Names defined inside subgraphs (If/Loop/Scan bodies), at any depth."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                names |= _graph_names(sub) | _subgraph_names(sub)
    return names


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of main-graph values, from shape inference where it works."""
    graph = model.graph
    try:
        graph = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception as exc:  # >2 GB models, custom ops, invalid models: fall back to declared types
        log.debug("shape inference failed (%s); using declared types only", exc)
    types = {}
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


@dataclass
class _Plan:
    fetch: list[str]  # run as graph outputs
    from_feeds: list[str]  # graph inputs: read from the feeds
    skipped: dict[str, str]
    types: dict[str, int]  # element types known before running


def plan_tensors(model: onnx.ModelProto, tensors: Iterable[str]) -> _Plan:
    """Sort the requested tensors into fetchable ones, graph inputs and skipped ones (with reasons)."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = {v.name for v in graph.input} - initializers
    produced = {o for node in graph.node for o in node.output if o}
    inside = _subgraph_names(graph) - produced - inputs
    types = _elem_types(model)
    plan = _Plan([], [], {}, types)
    for name in dict.fromkeys(tensors):
        if name in initializers and name not in produced:
            plan.skipped[name] = "an initializer (a weight, not an activation): quantize it from its values"
        elif name in inside:
            plan.skipped[name] = "produced inside a subgraph (If/Loop/Scan body); ONNX Runtime cannot expose it as an output"
        elif name not in produced and name not in inputs:
            plan.skipped[name] = "no tensor of that name in the model's main graph"
        elif name in types and types[name] not in _FLOAT_TYPES:
            plan.skipped[name] = f"not a floating-point tensor ({onnx.TensorProto.DataType.Name(types[name])})"
        elif name in inputs:
            plan.from_feeds.append(name)
        else:
            plan.fetch.append(name)
    return plan


def augment_model(model: onnx.ModelProto, names: list[str], types: dict[str, int] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with ``names`` added as graph outputs (type only, so no shape can conflict)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    types = _elem_types(model) if types is None else types
    for name in names:
        if name in existing:
            continue
        value = onnx.ValueInfoProto(name=name)
        if name in types:
            value.type.tensor_type.elem_type = types[name]
        augmented.graph.output.append(value)
    return augmented


def collect_statistics(
    model: onnx.ModelProto,
    tensors: list[str],
    source,
    batch_size: int = 16,
    num_bins: int = DEFAULT_NUM_BINS,
    progress: Progress | None = None,
    *,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    max_samples: int | None = None,
) -> CalibrationStatistics:
    """Run ``model`` on ``source`` batch by batch and collect ``TensorStats`` for ``tensors``.

    ``source`` is a ``CalibrationSource`` or anything ``open_source`` accepts. ``progress`` is
    ``progress(description, total)`` returning ``advance(n)``, as in ``PassContext``. At most
    ``max_samples`` samples are used when given. Skipped tensors are in the result's ``skipped``.
    """
    specs = input_specs(model)
    source = open_source(source, specs) if not isinstance(source, CalibrationSource) else source
    plan = plan_tensors(model, tensors)
    for name, reason in plan.skipped.items():
        log.info("calibration skips tensor '%s': %s", name, reason)
    result = CalibrationStatistics()
    result.skipped = dict(plan.skipped)
    result.source = source.description
    result.synthetic = bool(source.synthetic)
    names = plan.from_feeds + plan.fetch
    for index, name in enumerate(names):
        result[name] = TensorStats(name, num_bins, sample_size, seed=(seed, index))

    for feeds, outputs, n in _stream(model, plan, source, specs, batch_size, max_samples, progress, "calibrating"):
        for name in plan.from_feeds:
            result[name].update(feeds[name])
        for name in plan.fetch:
            if name not in result:
                continue
            value = outputs.pop(name)
            if value.dtype.kind != "f":
                result.skipped[name] = f"not a floating-point tensor ({value.dtype})"
                del result[name]
                continue
            result[name].update(value)
            del value
        del outputs, feeds
        result.samples += n
        result.batches += 1
    if result.samples == 0:
        raise InputError(f"{source.description}: no calibration samples")
    result.warnings = list(getattr(source, "warnings", []))
    if result.synthetic:
        result.warnings.append("calibrated on synthetic data: the ranges say nothing about real inputs")
    log.info("collected statistics for %d tensor(s) over %d sample(s) from %s", len(result), result.samples, result.source)
    return result


def _stream(model, plan, source, specs, batch_size: int, max_samples: int | None, progress, label: str):
    """``(feeds, fetched outputs, samples)`` per batch of ``source`` (at most ``max_samples``
    samples; a fixed batch size is never cut), with ``plan.fetch`` run as extra model outputs."""
    runner = None
    if plan.fetch:
        runner = OrtRunner(augment_model(model, plan.fetch, plan.types))
        runner.output_names = list(plan.fetch)  # fetch only what we measure
    size = effective_batch_size(specs, batch_size)
    total = source.num_samples
    if is_fixed_batch(specs):
        total -= total % size
    if max_samples is not None:
        total = min(total, max_samples)
    advance = progress(label, total) if progress is not None else (lambda n=1: None)
    seen = 0
    for feeds in source.batches(specs, batch_size):
        n = batch_len(feeds)
        if max_samples is not None and seen + n > max_samples:
            keep = max_samples - seen
            if keep <= 0 or is_fixed_batch(specs):
                break
            feeds = {k: v[:keep] for k, v in feeds.items()}
            n = keep
        outputs = runner.run(feeds) if runner is not None else {}
        yield feeds, outputs, n
        seen += n
        advance(n)


# ---------------------------------------------------------------------------------------------
# per-channel means (bias correction)


@dataclass
class ChannelMeans:
    """Per-channel means of tensors over calibration data (``collect_channel_means``).

    ``means``: ``{tensor name: float64 array [channels]}``, the mean over every axis but the
    channel axis, over all samples; ``samples``/``batches``: how much data went through;
    ``counts``: ``{tensor name: finite values per channel}``; ``skipped``: ``{tensor name: reason}``;
    ``source``/``synthetic``: as in ``CalibrationStatistics``.
    """

    means: dict[str, np.ndarray] = field(default_factory=dict)
    samples: int = 0
    batches: int = 0
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    source: str = ""
    synthetic: bool = False


class _ChannelSum:
    """Running float64 per-channel sums and finite-value counts of one tensor."""

    def __init__(self, name: str, axis: int):
        self.name = name
        self.axis = axis
        self.sums: np.ndarray | None = None
        self.counts: np.ndarray | None = None
        self.nonfinite = 0

    def update(self, values: np.ndarray) -> str | None:
        """Fold one batch in; returns a reason when the tensor cannot be reduced on its axis."""
        x = np.asarray(values)
        if x.ndim == 0:
            return "a scalar has no channel axis"
        axis = self.axis + x.ndim if self.axis < 0 else self.axis
        if not 0 <= axis < x.ndim:
            return f"channel axis {self.axis} out of range for a rank-{x.ndim} tensor"
        channels = x.shape[axis]
        if self.sums is not None and channels != self.sums.size:
            return f"channel count changed between batches ({self.sums.size} -> {channels})"
        others = tuple(i for i in range(x.ndim) if i != axis)
        per_channel = x.size // channels if channels else 0
        finite = np.isfinite(x)
        if finite.all():
            # dtype=float64 sums in float64 without a float64 copy of the batch
            sums = np.sum(x, axis=others, dtype=np.float64)
            counts = np.full(channels, per_channel, dtype=np.int64)
        else:
            if not self.nonfinite:
                log.warning("tensor '%s' has NaN/inf values; they are left out of its channel means", self.name)
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            sums = np.sum(np.where(finite, x, 0), axis=others, dtype=np.float64)
            counts = np.count_nonzero(finite, axis=others).astype(np.int64)
        if self.sums is None:
            self.sums, self.counts = sums, counts
        else:
            self.sums += sums
            self.counts += counts
        return None

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan)


def collect_channel_means(
    model: onnx.ModelProto,
    tensors: dict[str, int],
    source,
    batch_size: int = 16,
    max_samples: int | None = None,
    progress: Progress | None = None,
) -> ChannelMeans:
    """Per-channel means of ``tensors`` (``{name: channel axis}``) over ``source``, in one run.

    The axis is 1 for Conv inputs (NCHW) and -1 (the last) for MatMul/Gemm inputs; negative axes
    count from the end. ``model`` runs in ONNX Runtime batch by batch with the tensors fetched as
    extra outputs (``augment_model``); graph inputs are read from the feeds. Each tensor keeps
    float64 sums and counts per channel, so memory does not depend on the number of samples and
    the means do not depend on the batch size (up to float64 rounding). NaN/inf values are left
    out (``counts`` says how many values each channel's mean has). Initializers, subgraph tensors,
    non-float tensors, and tensors whose rank or channel count does not fit ``axis`` are skipped
    with a reason in ``skipped``. ``source`` is anything ``collect_statistics`` accepts.
    """
    specs = input_specs(model)
    source = open_source(source, specs) if not isinstance(source, CalibrationSource) else source
    plan = plan_tensors(model, tensors)
    result = ChannelMeans(skipped=dict(plan.skipped), source=source.description, synthetic=bool(source.synthetic))
    for name, reason in plan.skipped.items():
        log.info("channel means skip tensor '%s': %s", name, reason)
    names = plan.from_feeds + plan.fetch
    sums = {name: _ChannelSum(name, int(tensors[name])) for name in names}

    for feeds, outputs, n in _stream(model, plan, source, specs, batch_size, max_samples, progress, "channel means"):
        for name in list(sums):
            value = feeds[name] if name in plan.from_feeds else outputs.pop(name)
            reason = f"not a floating-point tensor ({value.dtype})" if value.dtype.kind != "f" else sums[name].update(value)
            if reason is not None:
                result.skipped[name] = reason
                del sums[name]
            del value
        del outputs, feeds
        result.samples += n
        result.batches += 1
    if result.samples == 0:
        raise InputError(f"{source.description}: no calibration samples")
    for name in (n for n in dict.fromkeys(tensors) if n in sums):  # in the order asked for
        acc = sums[name]
        if acc.sums is None:
            result.skipped[name] = "no values"
            continue
        result.means[name] = acc.mean()
        result.counts[name] = acc.counts
    log.info("collected channel means for %d tensor(s) over %d sample(s) from %s", len(result.means), result.samples, result.source)
    return result
