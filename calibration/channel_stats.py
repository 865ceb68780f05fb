"""Per-channel statistics of intermediate tensors (SmoothQuant, AWQ), streamed batch by batch.

For each requested tensor, channels are the entries of its **last axis** (the ``K`` axis a
MatMul/Gemm reduces over) and rows are everything else, i.e. the tensor flattened to ``[R, C]``.
``collect_channel_stats`` runs the model in ONNX Runtime on one batch at a time with the tensors as
extra outputs (``calibration.collect``'s ``plan_tensors`` / ``augment_model`` plumbing, through its
batch stream) and keeps, per tensor:

* ``amax`` ``[C]``: max |x| per channel;
* ``mean_abs`` ``[C]``: mean |x| per channel (float64 sums, accumulated one sample at a time, so
  the result is bit-identical for every batch size);
* ``sample`` ``[R', C]``: up to ``max_rows`` rows of the flattened tensor. Every row gets a key
  from a fixed hash of its global index (sample index and row within the sample, in order) and the
  ``max_rows`` smallest keys win; the kept rows are returned in data order. Which rows are kept
  therefore does not depend on how the samples were batched;
* ``rows``: the number of rows seen.

Memory depends on the batch size, the number of channels and ``max_rows``, never on the number of
samples. Rows holding NaN/inf values are left out of ``amax``/``mean_abs``/``sample`` (``nonfinite``
counts those values). Batch-size independence assumes the batch is the leading axis of the tensor
(``[B, S, C]``, or the ``[B*S, C]`` a Reshape before a Gemm produces); for a tensor whose rows do
not divide evenly by the batch's samples (no batch axis) a batch counts as one sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from calibration.collect import Progress, _stream, fold_batches, plan_tensors
from calibration.sources import CalibrationSource, open_source
from optimizer.errors import InputError
from optimizer.runtime import input_specs

log = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 512


@dataclass(eq=False)
class ChannelStats:
    """Per-channel statistics of one tensor over the last axis (see the module docstring)."""

    name: str
    amax: np.ndarray  # [C] float64
    mean_abs: np.ndarray  # [C] float64
    sample: np.ndarray  # [R', C] float32, R' <= max_rows, rows in data order
    rows: int
    nonfinite: int = 0

    @property
    def channels(self) -> int:
        return int(self.amax.size)


class ChannelStatistics(dict):
    """``{tensor name: ChannelStats}`` plus ``skipped`` (``{name: reason}``), ``samples``,
    ``batches``, ``source`` (the data's description) and ``synthetic``."""

    def __init__(self, stats: dict[str, ChannelStats] | None = None):
        super().__init__(stats or {})
        self.skipped: dict[str, str] = {}
        self.samples = 0
        self.batches = 0
        self.source = ""
        self.synthetic = False


def _row_keys(index: np.ndarray, seed: int) -> np.ndarray:
    """A fixed pseudo-random uint64 key per global row index (splitmix64; numpy has no stateless hash)."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (seed + 1)) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class _ChannelAccumulator:
    """Running per-channel amax / |x| sums and the bottom-k row sample of one tensor."""

    def __init__(self, name: str, max_rows: int, seed: int):
        self.name = name
        self.max_rows = max_rows
        self.seed = seed
        self.amax: np.ndarray | None = None
        self.sums: np.ndarray | None = None
        self.counts: np.ndarray | None = None
        self.rows = 0
        self.nonfinite = 0
        self._keys = np.zeros(0, np.uint64)
        self._index = np.zeros(0, np.int64)
        self._sample: np.ndarray | None = None

    def update(self, values: np.ndarray, samples: int) -> str | None:
        """Fold one batch of ``samples`` samples in; a reason when the tensor does not fit."""
        x = np.asarray(values)
        if x.ndim == 0:
            return "a scalar has no channel axis"
        channels = x.shape[-1]
        if self.amax is not None and channels != self.amax.size:
            return f"channel count changed between batches ({self.amax.size} -> {channels})"
        rows = x.reshape(-1, channels) if channels else np.zeros((0, 0), x.dtype)
        if self.amax is None:
            self.amax = np.zeros(channels, np.float64)
            self.sums = np.zeros(channels, np.float64)
            self.counts = np.zeros(channels, np.int64)
            self._sample = np.zeros((0, channels), np.float32)
        n = rows.shape[0]
        index = np.arange(self.rows, self.rows + n, dtype=np.int64)
        self.rows += n
        if n == 0 or channels == 0:
            return None
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            if not self.nonfinite:
                log.warning("tensor '%s' has NaN/inf values; those rows are left out of its channel statistics", self.name)
            self.nonfinite += int(np.count_nonzero(~np.isfinite(rows)))
        magnitude = np.abs(rows[finite]).astype(np.float64, copy=False)
        if magnitude.size:
            np.maximum(self.amax, magnitude.max(axis=0), out=self.amax)
        per_sample = samples if samples > 0 and n % samples == 0 else 1
        # Sums per sample, added in sample order: the same float64 additions for every batch size.
        blocks = np.abs(np.where(finite[:, None], rows, 0)).astype(np.float64).reshape(per_sample, n // per_sample, channels)
        for block_sum in blocks.sum(axis=1):
            self.sums += block_sum
        self.counts += int(np.count_nonzero(finite))
        del magnitude, blocks
        self._add_rows(rows[finite], index[finite])
        return None

    def _add_rows(self, rows: np.ndarray, index: np.ndarray) -> None:
        k = self.max_rows
        if k <= 0 or rows.shape[0] == 0:
            return
        keys = _row_keys(index, self.seed)
        if keys.size > k:  # only the batch's k smallest keys can enter
            keep = np.argpartition(keys, k - 1)[:k]
            keys, index, rows = keys[keep], index[keep], rows[keep]
        all_keys = np.concatenate([self._keys, keys])
        all_index = np.concatenate([self._index, index])
        all_rows = np.concatenate([self._sample, rows.astype(np.float32)])
        if all_keys.size > k:
            keep = np.argpartition(all_keys, k - 1)[:k]
            all_keys, all_index, all_rows = all_keys[keep], all_index[keep], all_rows[keep]
        self._keys, self._index, self._sample = all_keys, all_index, all_rows

    def result(self) -> ChannelStats:
        order = np.argsort(self._index, kind="stable")
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), 0.0)
        return ChannelStats(self.name, self.amax.copy(), mean, self._sample[order], self.rows, self.nonfinite)


def collect_channel_stats(
    model: onnx.ModelProto,
    tensors: list[str],
    source,
    max_rows: int = DEFAULT_MAX_ROWS,
    progress: Progress | None = None,
    *,
    batch_size: int = 16,
    max_samples: int | None = None,
    seed: int = 0,
) -> ChannelStatistics:
    """Per-last-axis-channel ``ChannelStats`` of ``tensors`` over ``source``, in one streamed run.

    ``source`` is a ``CalibrationSource`` or anything ``open_source`` accepts (an ``.npz`` path,
    ``{input: array}``). ``max_rows``: rows kept per tensor in ``sample`` (0: none). At most
    ``max_samples`` samples are used when given. Initializers, subgraph tensors, non-float tensors
    and scalars are skipped with a reason in the result's ``skipped``.
    """
    if max_rows < 0:
        raise InputError(f"max_rows must be >= 0, got {max_rows}")
    specs = input_specs(model)
    source = open_source(source, specs) if not isinstance(source, CalibrationSource) else source
    plan = plan_tensors(model, tensors)
    result = ChannelStatistics()
    result.skipped = dict(plan.skipped)
    result.source = source.description
    result.synthetic = bool(source.synthetic)
    for name, reason in plan.skipped.items():
        log.info("channel statistics skip tensor '%s': %s", name, reason)
    names = plan.from_feeds + plan.fetch
    acc = {name: _ChannelAccumulator(name, max_rows, seed + i) for i, name in enumerate(names)}

    fold_batches(_stream(model, plan, source, specs, batch_size, max_samples, progress, "channel statistics"), plan, acc,
                 result, source.description)
    for name in (t for t in dict.fromkeys(tensors) if t in acc):  # in the order asked for
        if acc[name].amax is None:
            result.skipped[name] = "no values"
            continue
        result[name] = acc[name].result()
    log.info("collected channel statistics for %d tensor(s) over %d sample(s) from %s", len(result), result.samples, result.source)
    return result


__all__ = ["ChannelStatistics", "ChannelStats", "DEFAULT_MAX_ROWS", "collect_channel_stats"]
