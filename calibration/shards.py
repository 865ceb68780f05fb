"""Calibration statistics over several tasks: the samples split into contiguous shards, one task
each, the per-shard ``CalibrationStatistics`` merged exactly (``calibration.collect``).

Every shard runs ONNX Runtime one sample at a time and keys its bounded sample by global sample
index, so the merged statistics -- and the ranges and model written from them -- are bit-identical
to one in-process pass, for any number of shards and any order of merging.

Data on workers (the rule): a source holding its arrays in memory (``.npz`` files, dicts of arrays,
synthetic data) travels to the tasks through the executor's ``share`` (Ray's object store, once for
all tasks); a source read from a folder (``.npy`` files, images) travels as its path and is
re-opened by each task, which therefore needs the folder at the same path (one machine, or a
shared filesystem). A task that cannot read it refuses with one line naming the path and the node.
"""

from __future__ import annotations

import logging
import math
import socket
from pathlib import Path

import onnx

from calibration.collect import CalibrationStatistics, collect_statistics
from calibration.executor import Executor
from calibration.sources import effective_batch_size, is_fixed_batch
from optimizer.errors import InputError
from optimizer.runtime import input_specs

log = logging.getLogger(__name__)

#: Shards per worker: a little more than one evens out uneven task times.
SHARDS_PER_WORKER = 2


def shard_bounds(total: int, shards: int, align: int = 1) -> list[tuple[int, int]]:
    """``shards`` contiguous ``[lo, hi)`` ranges covering ``range(total)``, boundaries on multiples
    of ``align`` (a model's fixed batch), none empty."""
    blocks = math.ceil(total / align)
    shards = max(1, min(shards, blocks))
    cuts = [min(total, (blocks * i // shards) * align) for i in range(shards + 1)]
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]


def source_paths(source) -> list[Path]:
    """The files or folders a source (or a path given as data) reads at run time (empty for
    in-memory sources)."""
    if isinstance(source, (str, Path)):
        return [Path(source)]
    inner = getattr(source, "source", None)
    if inner is not None:  # SliceSource / AdaptedSource wrap another source
        return source_paths(inner)
    folder = getattr(source, "folder", None)
    return [Path(folder)] if folder is not None else []


def check_readable(source, what: str = "calibration data") -> None:
    """Refuse in one line, naming the path and this node, when a task cannot read ``source``."""
    for path in source_paths(source):
        if not path.exists():
            raise InputError(f"{what} {path} is not readable on worker node {socket.gethostname()}: put it on a "
                             "filesystem every node mounts at the same path, or pass an .npz file (it travels in the object store)")


def portable(data):
    """``data`` as it best travels to tasks: a path to an ``.npz`` file becomes its arrays (which go
    through the object store); anything else is returned as is."""
    from calibration.data import load_npz

    if isinstance(data, (str, Path)) and Path(data).suffix.lower() == ".npz" and Path(data).is_file():
        return load_npz(data)
    return data


def ship_source(executor: Executor, source):
    """``source`` as tasks receive it (the rule in the module docstring): in-memory sources
    through ``executor.share``, sources read from files as they are (their paths)."""
    return source if source_paths(source) else executor.share(source)


def _shard_task(model_bytes: bytes, tensors: list[str], source, lo: int, hi: int, batch_size: int, num_bins: int,
                sample_size: int, seed: int) -> CalibrationStatistics:
    """One shard: statistics of samples ``[lo, hi)`` of ``source`` (runs on a worker)."""
    from calibration.samples import SliceSource

    check_readable(source)
    model = onnx.load_from_string(model_bytes)
    stats = collect_statistics(model, tensors, SliceSource(source, lo, hi), batch_size, num_bins,  # never fans out again
                               sample_size=sample_size, seed=seed, first_sample=lo)
    stats.source = ""
    stats.warnings = []
    if stats.samples != hi - lo:
        raise InputError(f"calibration shard [{lo}, {hi}) saw {stats.samples} sample(s), expected {hi - lo}")
    return stats


def collect_sharded(executor: Executor, model: onnx.ModelProto, tensors: list[str], source, batch_size: int,
                    num_bins: int, progress, *, sample_size: int, seed: int,
                    max_samples: int | None) -> CalibrationStatistics | None:
    """``collect_statistics`` over shards on ``executor``; None when the source cannot be split
    (unknown length, a model over 2 GB) -- the caller then collects in one pass."""
    specs = input_specs(model)
    size = effective_batch_size(specs, batch_size)
    try:
        total = int(source.num_samples)
        model_bytes = model.SerializeToString()
    except (TypeError, ValueError) as exc:
        log.info("calibration runs in one task: %s", exc)
        return None
    align = size if is_fixed_batch(specs) else 1
    total -= total % align
    if max_samples is not None:
        total = min(total, max_samples - max_samples % align)
    bounds = shard_bounds(total, executor.workers * SHARDS_PER_WORKER, align)
    if len(bounds) < 2:
        return None
    advance = progress("calibrating", total) if progress is not None else (lambda n=1: None)
    shared_model = executor.share(model_bytes)
    shared_source = ship_source(executor, source)
    items = [(shared_model, list(tensors), shared_source, lo, hi, batch_size, num_bins, sample_size, seed) for lo, hi in bounds]
    shards = executor.map(_shard_task, items, stage="calibration")
    result = shards[0]
    for shard in shards[1:]:
        result.merge(shard)
    advance(result.samples)
    if result.samples != total:  # every sample seen exactly once, or the run stops
        raise InputError(f"calibration over {len(bounds)} shard(s) saw {result.samples} sample(s), expected {total}")
    if result.samples == 0:
        raise InputError(f"{source.description}: no calibration samples")
    result.source = source.description
    result.synthetic = bool(source.synthetic)
    result.warnings = list(getattr(source, "warnings", []))
    if result.synthetic:
        result.warnings.append("calibrated on synthetic data: the ranges say nothing about real inputs")
    log.info("collected statistics for %d tensor(s) over %d sample(s) in %d shard(s) from %s", len(result),
             result.samples, len(bounds), result.source)
    return result


__all__ = ["SHARDS_PER_WORKER", "check_readable", "collect_sharded", "portable", "ship_source", "shard_bounds", "source_paths"]
