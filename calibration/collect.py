"""Streaming statistics of intermediate tensors, collected with ONNX Runtime batch by batch.

The model is copied and the requested tensors are added as graph outputs; ONNX Runtime runs it
(graph optimizations off, as everywhere in this project) on the samples of one batch at a time, and
each tensor's ``TensorStats`` is updated and the batch dropped. Memory therefore depends on the
batch size and the number of tensors, never on the number of samples.

**The result depends only on the samples, never on how they were batched or sharded.** ONNX
Runtime's kernels are not batch-invariant (measured: 17 of digits_cnn's 20 activations differ in
the last bits between batch 1 and batch 32), so ONNX Runtime runs **one sample at a time** (or the
model's fixed batch, which no batch size changes), on one thread (``CALIB_ORT_THREADS``: the thread
count changes the bits too), and only reading and folding in are batched (``calib_batch_size``). Every statistic is then an exact, order-independent function of the set of
per-sample values, and ``merge`` combines shards exactly:

* ``min``/``max``/``amax`` (max |x|), element ``count`` and ``nonfinite`` (NaN/inf, left out of
  everything else);
* a histogram of |x| with ``num_bins`` (a power of two) bins over ``[0, hist_range)``, where
  ``hist_range`` is on a canonical grid: the smallest power of two above the max |x| seen
  (``canonical_range``). When the data outgrows it the range doubles and bins merge pairwise (bin
  ``2j`` and ``2j+1`` become bin ``j``), an exact re-binning because the doubled range's edges are
  every other old edge; a value's bin ``floor(|x| * num_bins / hist_range)`` is computed exactly
  (a power-of-two factor). So a histogram equals the one computed over all values at once, and the
  data always spans more than half the bins (``hist_range / 2 <= amax < hist_range``);
* a bounded uniform sample of at most ``sample_size`` values for the methods that measure
  quantization error on real values (``auto``'s SQNR): every value gets a key from a fixed hash of
  its global position (sample index, element index within the sample; splitmix64) and the
  ``sample_size`` smallest keys win, kept in key order (so sums over the sample are bit-identical
  too). As in ``calibration.channel_stats``, which values are kept does not depend on batching.

Tensors produced inside subgraphs (If/Loop/Scan bodies), initializers, non-float tensors and names
the model does not have are skipped; ``CalibrationStatistics.skipped`` says why for each. Given an
executor that fans out (``calibration.executor.fans_out``), ``collect_statistics`` shards the
samples across its tasks (``calibration.shards``) and merges their statistics.
"""

from __future__ import annotations

import logging
import math
import zlib
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
from optimizer.metrics import EXACT_SHIFT, exact_quotient
from optimizer.runtime import REPRODUCIBLE_THREADS, OrtRunner, input_specs

log = logging.getLogger(__name__)

DEFAULT_NUM_BINS = 2048
DEFAULT_SAMPLE_SIZE = 4096
#: ONNX Runtime's results depend on its intra-op thread count too, so statistics sessions always use
#: one thread (``REPRODUCIBLE_THREADS``): the same bits on a laptop, a 2-core CI machine and every
#: worker of a cluster.
CALIB_ORT_THREADS = REPRODUCIBLE_THREADS
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}

Progress = Callable[[str, "int | None"], Callable[..., None]]


@dataclass(eq=False)
class TensorStats:
    """Running statistics of one tensor's values (see the module docstring for the histogram and
    the sample). ``merge`` folds in the statistics of other samples exactly."""

    name: str
    num_bins: int = DEFAULT_NUM_BINS
    sample_size: int = DEFAULT_SAMPLE_SIZE
    seed: int = 0
    count: int = 0
    nonfinite: int = 0
    min: float = float("inf")
    max: float = float("-inf")
    amax: float = 0.0
    hist_range: float = 0.0
    hist: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    sample: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _keys: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _next_sample: int = field(default=0, repr=False)  # sample index for updates that give none

    def __post_init__(self):
        if self.num_bins < 2 or self.num_bins & (self.num_bins - 1):
            raise InputError(f"num_bins must be a power of two >= 2 (the histogram grows by merging bin pairs on a "
                             f"power-of-two grid), got {self.num_bins}")
        if self.sample_size < 0:
            raise InputError(f"sample_size must be >= 0, got {self.sample_size}")
        if not isinstance(self.seed, (int, np.integer)):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if self.hist is None:
            self.hist = np.zeros(self.num_bins, dtype=np.int64)
        if self.sample is None:
            self.sample = np.zeros(0, dtype=np.float32)
        if self._keys is None:
            self._keys = np.zeros(0, dtype=np.uint64)

    @classmethod
    def from_array(cls, name: str, values: np.ndarray, **options) -> TensorStats:
        """Statistics of one array, taken as one sample (tests, weights)."""
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

    def update(self, values: np.ndarray, first_sample: int | None = None, samples: int = 1) -> None:
        """Fold in ``values``: ``samples`` samples' values, sample-major (the batch axis first),
        whose first sample has global index ``first_sample`` (default: after the previous update).
        Nothing of the batch is kept but the bounded sample."""
        x = np.asarray(values)
        if x.dtype.kind != "f" or x.dtype.itemsize < 4:
            x = x.astype(np.float32)
        x = x.reshape(-1)
        first = self._next_sample if first_sample is None else int(first_sample)
        if samples < 1 or x.size % samples:  # no batch axis: the whole batch counts as one sample
            samples = 1
        self._next_sample = max(self._next_sample, first + samples)
        if x.size == 0:
            return
        position = None
        finite = np.isfinite(x)
        if not finite.all():
            bad = int(x.size - np.count_nonzero(finite))
            if not self.nonfinite:
                log.warning("tensor '%s' has NaN/inf values; they are left out of its statistics", self.name)
            self.nonfinite += bad
            position = _positions(x.size, first, samples)[finite] if self.sample_size else None
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
        if self.sample_size:
            if position is None:
                position = _positions(x.size, first, samples)
            self._add_to_sample(x, _position_keys(position, self._seed_key()))
        self.count += int(x.size)

    def _seed_key(self) -> int:
        # per tensor: the sample of one tensor does not depend on which others were collected
        return (int(self.seed) * 0x9E3779B97F4A7C15 + zlib.crc32(self.name.encode())) & _MASK64

    def _grow_to(self, hist_range: float) -> None:
        """Double the range up to ``hist_range``, merging bin pairs: an exact re-binning."""
        if self.hist_range == 0.0:
            self.hist_range = hist_range
            return
        while self.hist_range < hist_range:
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.concatenate([merged, np.zeros(self.num_bins - merged.size, dtype=np.int64)])
            self.hist_range *= 2.0

    def _add_to_histogram(self, magnitude: np.ndarray, batch_amax: float) -> None:
        if batch_amax == 0.0:  # only zeros: they belong in bin 0 whatever the range becomes
            self.hist[0] += magnitude.size
            return
        self._grow_to(canonical_range(batch_amax))
        # Hand-written, not np.histogram: its last bin is closed, which would break exact
        # re-binning. num_bins / hist_range is a power of two, so the product is exact.
        index = (magnitude.astype(np.float64) * (self.num_bins / self.hist_range)).astype(np.int64)
        self.hist += np.bincount(index, minlength=self.num_bins)

    def _add_to_sample(self, x: np.ndarray, keys: np.ndarray) -> None:
        k = self.sample_size
        if keys.size > k:  # only the batch's k smallest keys can enter
            keep = np.argpartition(keys, k - 1)[:k]
            keys, x = keys[keep], x[keep]
        self._keep_smallest(np.concatenate([self._keys, keys]), np.concatenate([self.sample, x.astype(np.float32)]))

    def _keep_smallest(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Keep the ``sample_size`` smallest keys, sorted by key: a canonical order, so sums over
        the sample (SQNR) are bit-identical however the values arrived."""
        order = np.argsort(keys, kind="stable")[: self.sample_size]
        self._keys, self.sample = keys[order], values[order]

    def merge(self, other: TensorStats) -> TensorStats:
        """Fold in the statistics of other samples of the same tensor (another shard): exact, and
        the result is the same in any order of merging."""
        if (other.name, other.num_bins, other.sample_size, other.seed) != (self.name, self.num_bins, self.sample_size, self.seed):
            raise InputError(f"cannot merge statistics of '{other.name}' (bins {other.num_bins}, sample {other.sample_size}, "
                             f"seed {other.seed}) into '{self.name}' (bins {self.num_bins}, sample {self.sample_size}, seed {self.seed})")
        if other.hist_range > self.hist_range:
            self._grow_to(other.hist_range)
        theirs = other.hist
        if other.hist_range and other.hist_range < self.hist_range:
            copy = TensorStats(other.name, other.num_bins, 0, hist=other.hist.copy(), hist_range=other.hist_range)
            copy._grow_to(self.hist_range)
            theirs = copy.hist
        self.hist = self.hist + theirs
        self.count += other.count
        self.nonfinite += other.nonfinite
        self.min, self.max, self.amax = min(self.min, other.min), max(self.max, other.max), max(self.amax, other.amax)
        self._next_sample = max(self._next_sample, other._next_sample)
        if self.sample_size:
            self._keep_smallest(np.concatenate([self._keys, other._keys]), np.concatenate([self.sample, other.sample]))
        return self


def canonical_range(amax: float) -> float:
    """The histogram range for data whose max |x| is ``amax``: the smallest power of two above it,
    so every histogram of a tensor lies on one grid and any two merge exactly."""
    mantissa, exponent = math.frexp(amax)  # amax = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return math.ldexp(1.0, exponent)


_MASK64 = 0xFFFFFFFFFFFFFFFF


def _positions(size: int, first_sample: int, samples: int) -> np.ndarray:
    """Global positions ``sample index << 32 | element index`` of a sample-major batch (unique
    while a sample holds fewer than 2**32 elements)."""
    per_sample = size // samples
    element = np.arange(size, dtype=np.uint64)
    sample = element // np.uint64(per_sample) + np.uint64(first_sample)
    return (sample << np.uint64(32)) | (element % np.uint64(per_sample))


def _position_keys(position: np.ndarray, seed_key: int) -> np.ndarray:
    """A fixed pseudo-random uint64 key per position (splitmix64, a bijection: keys never tie;
    numpy has no stateless hash)."""
    with np.errstate(over="ignore"):
        z = position ^ np.uint64(seed_key)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class CalibrationStatistics(dict):
    """``{tensor name: TensorStats}`` plus what the run skipped and saw.

    ``skipped``: ``{tensor name: reason}``; ``samples``/``batches``: how much data went through;
    ``source``: the data's description; ``synthetic``: true for made-up data; ``warnings``;
    ``shards``: how many tasks collected it (1 without an executor).
    """

    def __init__(self, stats: dict[str, TensorStats] | None = None):
        super().__init__(stats or {})
        self.skipped: dict[str, str] = {}
        self.samples = 0
        self.batches = 0
        self.source = ""
        self.synthetic = False
        self.warnings: list[str] = []
        self.shards = 1

    def merge(self, other: CalibrationStatistics) -> CalibrationStatistics:
        """Fold in the statistics of other samples (another shard): exact and order-independent.
        Tensor order stays that of the first shard that has each tensor."""
        for name, stats in other.items():
            if name in self:
                self[name].merge(stats)
            elif name not in self.skipped:
                self[name] = TensorStats(stats.name, stats.num_bins, stats.sample_size, stats.seed).merge(stats)
        for name, reason in other.skipped.items():
            self.skipped.setdefault(name, reason)
            self.pop(name, None)  # skipped anywhere (a non-float value at run time): skipped
        self.samples += other.samples
        self.batches += other.batches
        self.shards += other.shards
        self.synthetic = self.synthetic or other.synthetic
        self.source = self.source or other.source
        self.warnings += [w for w in other.warnings if w not in self.warnings]
        return self


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
    batch_size: int | None = None,
    num_bins: int = DEFAULT_NUM_BINS,
    progress: Progress | None = None,
    *,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    max_samples: int | None = None,
    first_sample: int = 0,
    executor=None,
) -> CalibrationStatistics:
    """Run ``model`` on ``source`` and collect ``TensorStats`` for ``tensors``.

    ``source`` is a ``CalibrationSource`` or anything ``open_source`` accepts. ``batch_size``:
    samples read and folded in at a time (default ``DEFAULT_CALIB_BATCH_SIZE``); it changes
    speed and memory, never a statistic. ``progress`` is ``progress(description, total)`` returning
    ``advance(n)``, as in ``PassContext``. At most ``max_samples`` samples are used when given.
    ``first_sample`` is the global index of the source's first sample (a shard's offset). With an
    ``executor`` that fans out the samples are sharded across its tasks and merged exactly.
    Skipped tensors are in the result's ``skipped``.
    """
    from calibration.executor import DEFAULT_CALIB_BATCH_SIZE, fans_out

    batch_size = DEFAULT_CALIB_BATCH_SIZE if batch_size is None else batch_size
    specs = input_specs(model)
    source = open_source(source, specs) if not isinstance(source, CalibrationSource) else source
    if fans_out(executor) and first_sample == 0:
        from calibration.shards import collect_sharded

        sharded = collect_sharded(executor, model, tensors, source, batch_size, num_bins, progress,
                                  sample_size=sample_size, seed=seed, max_samples=max_samples)
        if sharded is not None:
            return sharded
    plan = plan_tensors(model, tensors)
    for name, reason in plan.skipped.items():
        log.info("calibration skips tensor '%s': %s", name, reason)
    result = CalibrationStatistics()
    result.skipped = dict(plan.skipped)
    result.source = source.description
    result.synthetic = bool(source.synthetic)
    names = plan.from_feeds + plan.fetch
    for name in names:
        result[name] = TensorStats(name, num_bins, sample_size, seed=seed)

    for feeds, outputs, n, first in _stream_at(model, plan, source, specs, batch_size, max_samples, progress,
                                               "calibrating", first_sample):
        for name in plan.from_feeds:
            result[name].update(feeds[name], first, n)
        for name in plan.fetch:
            if name not in result:
                continue
            value = outputs.pop(name)
            parts = value if isinstance(value, list) else [value]  # a list: one array per sample
            if parts[0].dtype.kind != "f":
                result.skipped[name] = f"not a floating-point tensor ({parts[0].dtype})"
                del result[name]
                continue
            if isinstance(value, list):
                for i, part in enumerate(parts):
                    result[name].update(part, first + i, 1)
            else:
                result[name].update(value, first, n)
            del value, parts
        del outputs, feeds
        result.samples += n
        result.batches += 1
    if result.samples == 0 and first_sample == 0:
        raise InputError(f"{source.description}: no calibration samples")
    result.warnings = list(getattr(source, "warnings", []))
    if result.synthetic:
        result.warnings.append("calibrated on synthetic data: the ranges say nothing about real inputs")
    log.info("collected statistics for %d tensor(s) over %d sample(s) from %s", len(result), result.samples, result.source)
    return result


def _stream(model, plan, source, specs, batch_size: int, max_samples: int | None, progress, label: str):
    """``(feeds, fetched outputs, samples)`` per batch of ``source`` (see ``_stream_at``); a batch
    with a scalar or ragged output comes one sample at a time, every output an array."""
    for feeds, outputs, n, _first in _stream_at(model, plan, source, specs, batch_size, max_samples, progress, label):
        if not any(isinstance(v, list) for v in outputs.values()):
            yield feeds, outputs, n
            continue
        for i in range(n):
            single = {k: (v[i:i + 1] if np.ndim(v) else v) for k, v in feeds.items()}
            yield single, {k: (v[i] if isinstance(v, list) else v[_sample_rows(v, n, i)]) for k, v in outputs.items()}, 1


def fold_batches(stream, plan, accumulators: dict, result, description: str) -> None:
    """Feed every batch of ``stream`` (``_stream``'s triples) into ``accumulators`` (name -> an
    object whose ``update(values, samples)`` returns None or why it refuses the tensor); a refused
    or non-float tensor is dropped with its reason in ``result.skipped``; ``result.samples`` and
    ``result.batches`` count what was seen. Raises when the source had no samples."""
    for feeds, outputs, n in stream:
        for name in list(accumulators):
            value = feeds[name] if name in plan.from_feeds else outputs.pop(name)
            reason = (f"not a floating-point tensor ({value.dtype})" if value.dtype.kind != "f"
                      else accumulators[name].update(value, n))
            if reason is not None:
                result.skipped[name] = reason
                del accumulators[name]
            del value
        del outputs, feeds
        result.samples += n
        result.batches += 1
    if result.samples == 0:
        raise InputError(f"{description}: no calibration samples")


def _stream_at(model, plan, source, specs, batch_size: int, max_samples: int | None, progress, label: str,
               first_sample: int = 0):
    """``(feeds, fetched outputs, samples, global index of the first sample)`` per batch of
    ``source`` (at most ``max_samples`` samples; a fixed batch size is never cut), with
    ``plan.fetch`` run as extra model outputs. ONNX Runtime runs one sample at a time (the
    model's fixed batch, if it has one) and the outputs are concatenated on axis 0: its kernels
    are not batch-invariant, so this keeps every value independent of ``batch_size``."""
    runner = None
    if plan.fetch:
        runner = OrtRunner(augment_model(model, plan.fetch, plan.types), threads=CALIB_ORT_THREADS)
        runner.output_names = list(plan.fetch)  # fetch only what we measure
    size = effective_batch_size(specs, batch_size)
    fixed = is_fixed_batch(specs)
    total = source.num_samples
    if fixed:
        total -= total % size
    if max_samples is not None:
        total = min(total, max_samples)
    advance = progress(label, total) if progress is not None else (lambda n=1: None)
    seen = 0
    for feeds in source.batches(specs, batch_size):
        n = batch_len(feeds)
        if max_samples is not None and seen + n > max_samples:
            keep = max_samples - seen
            if keep <= 0 or fixed:
                break
            feeds = {k: v[:keep] for k, v in feeds.items()}
            n = keep
        if runner is None:
            yield feeds, {}, n, first_sample + seen
        elif fixed or n == 1:
            yield feeds, runner.run(feeds), n, first_sample + seen
        else:
            outputs = [runner.run({k: (v[i:i + 1] if np.ndim(v) else v) for k, v in feeds.items()}) for i in range(n)]
            yield feeds, _concatenate(outputs), n, first_sample + seen
            del outputs
        seen += n
        advance(n)


def _concatenate(outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Per-sample outputs joined on axis 0; a scalar or ragged tensor stays a list of per-sample arrays."""
    joined: dict[str, np.ndarray | list[np.ndarray]] = {}
    for name in outputs[0]:
        parts = [o[name] for o in outputs]
        ragged = parts[0].ndim == 0 or any(p.shape != parts[0].shape for p in parts)  # equal shapes: rows split evenly
        joined[name] = parts if ragged else np.concatenate(parts, axis=0)
    return joined


def _sample_rows(value: np.ndarray, n: int, i: int) -> slice:
    """Sample ``i``'s rows of an axis-0 concatenation of ``n`` equal per-sample outputs."""
    rows = value.shape[0] // n
    return slice(i * rows, (i + 1) * rows)


# ---------------------------------------------------------------------------------------------
# per-channel means (bias correction)


@dataclass
class ChannelMeans:
    """Per-channel means of tensors over calibration data (``collect_channel_means``).

    ``means``: ``{tensor name: float64 array [channels]}``, the mean over every axis but the
    channel axis, over all samples; ``samples``/``batches``: how much data went through;
    ``counts``: ``{tensor name: finite values per channel}``; ``skipped``: ``{tensor name: reason}``;
    ``source``/``synthetic``: as in ``CalibrationStatistics``. ``mean_squares`` (with
    ``squares=True``): the per-channel means of the squared values, for variances.
    """

    means: dict[str, np.ndarray] = field(default_factory=dict)
    mean_squares: dict[str, np.ndarray] = field(default_factory=dict)
    samples: int = 0
    batches: int = 0
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    source: str = ""
    synthetic: bool = False


def _exact_sums(values: np.ndarray) -> list[int]:
    """``values`` ``[rows, C]`` float64 summed over rows exactly, per column, as integers scaled by
    ``2**EXACT_SHIFT`` (``optimizer.metrics.exact_integers``). Summed one column at a time from a
    generator, so the ~150-byte shifted integers never exist all at once (memory stays that of
    ``values``)."""
    mantissa, exponent = np.frexp(values)
    integers = (mantissa * 2.0**53).astype(np.int64)  # exact: 53-bit mantissas
    shifts = exponent.astype(np.int64) - 53 + EXACT_SHIFT  # frexp exponents are >= -1073: shifts >= 4
    return [sum(m << s for m, s in zip(col_m, col_s)) for col_m, col_s in zip(integers.T.tolist(), shifts.T.tolist())]


class _ChannelSum:
    """Exact running per-channel sums (of per-sample float64 sums) and finite-value counts; with
    ``squares``, of the squared values too."""

    def __init__(self, name: str, axis: int, squares: bool = False):
        self.name = name
        self.axis = axis
        self.sums: list[int] | None = None
        self.squares: list[int] | None = [] if squares else None
        self.counts: np.ndarray | None = None
        self.nonfinite = 0

    def update(self, values: np.ndarray, samples: int = 1) -> str | None:
        """Fold one batch of ``samples`` samples in; a reason when the tensor cannot be reduced on its axis."""
        x = np.asarray(values)
        if x.ndim == 0:
            return "a scalar has no channel axis"
        axis = self.axis + x.ndim if self.axis < 0 else self.axis
        if not 0 <= axis < x.ndim:
            return f"channel axis {self.axis} out of range for a rank-{x.ndim} tensor"
        channels = x.shape[axis]
        if self.sums is not None and channels != len(self.sums):
            return f"channel count changed between batches ({len(self.sums)} -> {channels})"
        finite = np.isfinite(x)
        if not finite.all():
            if not self.nonfinite:
                log.warning("tensor '%s' has NaN/inf values; they are left out of its channel means", self.name)
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            x = np.where(finite, x, 0)
        others = tuple(i for i in range(x.ndim) if i != axis)
        counts = np.count_nonzero(finite, axis=others).astype(np.int64)
        # One float64 sum per sample, each over a contiguous block of the same shape and strides
        # whatever the batch (so numpy adds in the same order), then exact sums over samples.
        # Without a batch axis (axis 0, or rows not divisible by samples) the batch is one block.
        if axis == 0 or x.shape[0] % max(samples, 1):
            samples = 1
        blocks = np.ascontiguousarray(x).reshape((samples, x.shape[0] // samples) + x.shape[1:])
        inner = tuple(i for i in range(blocks.ndim - 1) if i != axis)
        sums = _exact_sums(np.stack([np.sum(block, axis=inner, dtype=np.float64) for block in blocks]))
        if self.squares is not None:
            squares = _exact_sums(np.stack([np.sum(np.square(block, dtype=np.float64), axis=inner) for block in blocks]))
            self.squares = squares if self.sums is None else [a + b for a, b in zip(self.squares, squares)]
        if self.sums is None:
            self.sums, self.counts = sums, counts
        else:
            self.sums = [a + b for a, b in zip(self.sums, sums)]
            self.counts = self.counts + counts
        return None

    def merge(self, other: _ChannelSum) -> None:
        """Fold in another shard's sums (exact)."""
        if other.sums is None:
            return
        if self.squares is not None:
            self.squares = (list(other.squares) if self.sums is None
                            else [a + b for a, b in zip(self.squares, other.squares)])
        if self.sums is None:
            self.sums, self.counts = list(other.sums), other.counts.copy()
        else:
            self.sums = [a + b for a, b in zip(self.sums, other.sums)]
            self.counts = self.counts + other.counts
        self.nonfinite += other.nonfinite

    def mean(self) -> np.ndarray:
        # int / int is correctly rounded in Python: the mean of the exact sum
        return self._quotients(self.sums)

    def mean_square(self) -> np.ndarray:
        return self._quotients(self.squares)

    def _quotients(self, sums: list[int]) -> np.ndarray:
        return np.array([exact_quotient(s, c) if c else np.nan for s, c in zip(sums, self.counts)], np.float64)


def collect_channel_means(
    model: onnx.ModelProto,
    tensors: dict[str, int],
    source,
    batch_size: int | None = None,
    max_samples: int | None = None,
    progress: Progress | None = None,
    squares: bool = False,
) -> ChannelMeans:
    """Per-channel means of ``tensors`` (``{name: channel axis}``) over ``source``, in one run
    (with ``squares``, the means of the squared values too: ``ChannelMeans.mean_squares``).

    The axis is 1 for Conv inputs (NCHW) and -1 (the last) for MatMul/Gemm inputs; negative axes
    count from the end. ``model`` runs in ONNX Runtime batch by batch with the tensors fetched as
    extra outputs (``augment_model``, one sample at a time as in ``collect_statistics``); graph
    inputs are read from the feeds. Each tensor keeps exact sums (of per-sample float64 sums) and
    counts per channel, so memory does not depend on the number of samples and the means are
    bit-identical for every ``batch_size`` (default ``DEFAULT_CALIB_BATCH_SIZE``) and merge
    exactly (``_ChannelSum.merge``). NaN/inf values are left
    out (``counts`` says how many values each channel's mean has). Initializers, subgraph tensors,
    non-float tensors, and tensors whose rank or channel count does not fit ``axis`` are skipped
    with a reason in ``skipped``. ``source`` is anything ``collect_statistics`` accepts.
    """
    from calibration.executor import DEFAULT_CALIB_BATCH_SIZE

    batch_size = DEFAULT_CALIB_BATCH_SIZE if batch_size is None else batch_size
    specs = input_specs(model)
    source = open_source(source, specs) if not isinstance(source, CalibrationSource) else source
    plan = plan_tensors(model, tensors)
    result = ChannelMeans(skipped=dict(plan.skipped), source=source.description, synthetic=bool(source.synthetic))
    for name, reason in plan.skipped.items():
        log.info("channel means skip tensor '%s': %s", name, reason)
    names = plan.from_feeds + plan.fetch
    sums = {name: _ChannelSum(name, int(tensors[name]), squares) for name in names}

    fold_batches(_stream(model, plan, source, specs, batch_size, max_samples, progress, "channel means"), plan, sums, result,
                 source.description)
    for name in (n for n in dict.fromkeys(tensors) if n in sums):  # in the order asked for
        acc = sums[name]
        if acc.sums is None:
            result.skipped[name] = "no values"
            continue
        result.means[name] = acc.mean()
        result.counts[name] = acc.counts
        if squares:
            result.mean_squares[name] = acc.mean_square()
    log.info("collected channel means for %d tensor(s) over %d sample(s) from %s", len(result.means), result.samples, result.source)
    return result
