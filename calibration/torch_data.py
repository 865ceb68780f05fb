"""PyTorch data as a ``CalibrationSource``: a ``DataLoader`` or any iterable of tensors, tuples or dicts.

This module never imports torch: tensors are recognised by their ``detach`` method and converted
with ``.detach().cpu().numpy()``, one item at a time. Items may be:

* a tensor (or array) -- the model's only input;
* a tuple/list -- the model's inputs in order; one extra trailing element is taken as labels
  (``TensorDataset(x, y)`` in a ``DataLoader`` yields ``[x, y]``);
* a dict -- inputs by name; a ``labels`` (or ``label``) entry is taken as labels.

An item whose arrays have the model input's rank is a batch (samples on the first axis, as a
``DataLoader`` yields); one rank lower is a single sample. Items are re-batched to the batch size
each consumer asks for (a model with a fixed first dim dictates it), so the batches equal those of
an ``.npz`` file holding the same samples.

Streaming: a re-iterable object (a ``DataLoader``, a list, a ``Dataset``) is read again on every
pass and never held in memory; ``num_samples`` costs one counting pass (cached) unless ``count`` is
given. A one-shot iterator (a generator) can only be read once, so its items are kept in a list.
Telling a single sample from a batch needs the model's input ranks: give ``specs`` (``from_torch``
does) or call ``check(specs)`` first; without them every item counts as a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from calibration.data import _fmt
from calibration.sources import Feeds, check_array, effective_batch_size, is_fixed_batch
from optimizer.errors import InputError
from optimizer.runtime import InputSpec

log = logging.getLogger(__name__)

LABEL_KEYS = ("labels", "label")


def is_torch_data(obj) -> bool:
    """Whether ``obj`` is PyTorch data this module should adapt: a ``DataLoader``/``Dataset``-like
    iterable, a tensor, or a dict/sequence holding tensors (paths, arrays and sources are not)."""
    from pathlib import Path

    from calibration.data import ArrayData

    if obj is None or isinstance(obj, (str, bytes, Path, ArrayData, np.ndarray)):
        return False
    if hasattr(obj, "batches") and hasattr(obj, "num_samples"):  # already a CalibrationSource
        return False
    if _is_tensor(obj):
        return True
    if isinstance(obj, Mapping):
        return any(_is_tensor(v) for v in obj.values())
    return isinstance(obj, Iterable)


def _is_tensor(value) -> bool:
    return hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy")


def to_numpy(value, where: str = "torch data") -> np.ndarray:
    """A tensor (``.detach().cpu().numpy()``), array or number as a plain numeric numpy array."""
    if _is_tensor(value):
        tensor = value.detach().cpu()
        if str(getattr(tensor, "dtype", "")) == "torch.bfloat16":  # numpy has no bfloat16
            tensor = tensor.float()
        array = tensor.numpy()
    else:
        array = np.asarray(value)
    if array.dtype.hasobject or array.dtype.kind not in "biuf":
        raise InputError(f"{where}: an item of dtype {array.dtype}; only numeric tensors are accepted")
    return array


@dataclass
class TorchDataSource:
    """A PyTorch ``DataLoader`` or an iterable of tensors/tuples/dicts (see the module docstring).

    ``input_names`` are the model inputs in the order a tuple item lists them (the ``forward``
    arguments). ``num_samples``, when given, saves the counting pass.
    """

    data: object
    input_names: list[str]
    name: str = ""
    synthetic: bool = False
    warnings: list[str] = field(default_factory=list)
    count: int | None = None
    specs: list[InputSpec] | None = None

    def __post_init__(self):
        if _is_tensor(self.data) or (isinstance(self.data, Mapping) and any(_is_tensor(v) for v in self.data.values())):
            self.data = [self.data]  # one batch
        if not isinstance(self.data, Iterable):
            raise InputError(f"cannot use {type(self.data).__name__} as data: give a DataLoader or an iterable of tensors")
        kind = type(self.data).__name__
        if self.one_shot:  # a generator: every consumer reads the data again, so keep its items
            self.data = list(self.data)
        self.name = f"{kind}: {self.name}" if self.name and self.name != kind else kind
        sampler = getattr(self.data, "sampler", None)
        if sampler is not None and type(sampler).__name__ == "RandomSampler":
            self.warnings.append(
                f"the {self.name} shuffles (shuffle=True): every pass reads the samples in another order, so "
                "held-out and verification samples differ from pass to pass; use shuffle=False"
            )

    @property
    def description(self) -> str:
        return f"<torch {self.name}>"

    @property
    def one_shot(self) -> bool:
        """A generator or iterator: readable once (a DataLoader, list or Dataset is re-iterable)."""
        return hasattr(self.data, "__next__")

    @property
    def num_samples(self) -> int:
        if self.count is not None:
            return self.count
        count = sum(_batch_len(feeds) for feeds, _ in self._items(self.specs))
        if self.specs is not None:  # without specs a single sample is not told from a batch: count again later
            self.count = count
        return count

    # -- reading -------------------------------------------------------------------------------
    def _items(self, specs: list[InputSpec] | None) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Every item as ``(arrays by input name, labels or None)``, each with a batch axis."""
        for index, item in enumerate(self.data):
            yield self._convert(item, specs, index)

    def _convert(self, item, specs, index: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        where = f"{self.description} item {index}"
        labels = None
        if isinstance(item, Mapping):
            arrays = {}
            for key, value in item.items():
                if str(key) in LABEL_KEYS and str(key) not in self.input_names:
                    labels = to_numpy(value, where)
                elif str(key) in self.input_names:
                    arrays[str(key)] = to_numpy(value, where)
            missing = [n for n in self.input_names if n not in arrays]
            if missing:
                raise InputError(f"{where}: no entry for input(s) {', '.join(missing)}; its keys: "
                                 f"{', '.join(map(str, item))}")
        elif isinstance(item, (tuple, list)):
            n = len(self.input_names)
            if len(item) not in (n, n + 1):
                raise InputError(
                    f"{where}: a {type(item).__name__} of {len(item)} element(s); the model has {n} input(s) "
                    f"({', '.join(self.input_names)}), optionally followed by labels"
                )
            arrays = {name: to_numpy(value, where) for name, value in zip(self.input_names, item)}
            if len(item) == n + 1:
                labels = to_numpy(item[-1], where)
        else:
            if len(self.input_names) != 1:
                raise InputError(
                    f"{where}: a single tensor, but the model has inputs {', '.join(self.input_names)}; "
                    "yield a tuple or a dict"
                )
            arrays = {self.input_names[0]: to_numpy(item, where)}
        by_name = {s.name: s for s in specs or []}
        for name, array in arrays.items():
            spec = by_name.get(name)
            if spec is not None and spec.shape is not None and array.ndim == len(spec.shape) - 1:
                arrays[name] = array[None]  # one sample without a batch axis
        sizes = {a.shape[0] if a.ndim else 1 for a in arrays.values()}
        if len(sizes) > 1 or any(a.ndim == 0 for a in arrays.values()):
            raise InputError(f"{where}: inputs with different sample counts "
                             f"{ {k: tuple(v.shape) for k, v in arrays.items()} }")
        if labels is not None:
            labels = labels.reshape(-1) if labels.ndim == 0 else labels
            if labels.shape[0] != next(iter(sizes)):
                labels = None  # not per-sample labels: ignore them
        return arrays, labels

    def check(self, specs: list[InputSpec]) -> None:
        """The first item feeds the model: every input present, numeric, with matching rank and dims."""
        if self.specs is None:
            self.specs = list(specs)
        first = next(iter(self._items(specs)), None)
        if first is None:
            raise InputError(f"{self.description}: holds no samples")
        arrays, _ = first
        for spec in specs:
            if spec.name not in arrays:
                raise InputError(f"{self.description}: no data for model input '{spec.name}'")
            check_array(self.description, spec.name, arrays[spec.name].shape, arrays[spec.name].dtype, spec)

    def labelled_batches(self, specs: list[InputSpec], batch_size: int) -> Iterator[tuple[Feeds, np.ndarray | None]]:
        """Batches of exactly ``batch_size`` samples (the last may be smaller unless the batch is
        fixed, when it is dropped with a warning), whatever size the items have."""
        size = effective_batch_size(specs, batch_size)
        fixed = is_fixed_batch(specs)
        pending: list[tuple[Feeds, np.ndarray | None]] = []
        count = 0

        def flush(n: int) -> tuple[Feeds, np.ndarray | None]:
            nonlocal pending, count
            feeds = {s.name: np.concatenate([p[0][s.name] for p in pending]) for s in specs}
            has_labels = all(p[1] is not None for p in pending)
            labels = np.concatenate([p[1] for p in pending]) if has_labels and pending else None
            out = ({s.name: np.ascontiguousarray(feeds[s.name][:n], dtype=s.dtype) for s in specs},
                   labels[:n] if labels is not None else None)
            rest = ({s.name: feeds[s.name][n:] for s in specs}, labels[n:] if labels is not None else None)
            pending = [rest] if _batch_len(rest[0]) else []
            count = _batch_len(rest[0]) if pending else 0
            return out

        for index, (arrays, labels) in enumerate(self._items(specs)):
            for spec in specs:
                if spec.name not in arrays:
                    raise InputError(f"{self.description}: no data for model input '{spec.name}'")
                check_array(f"{self.description} item {index}", spec.name, arrays[spec.name].shape,
                            arrays[spec.name].dtype, spec)
            item = ({s.name: arrays[s.name] for s in specs}, labels)
            if pending and any(item[0][s.name].shape[1:] != pending[0][0][s.name].shape[1:] for s in specs):
                if fixed:
                    raise InputError(f"{self.description}: samples have different shapes; the model's batch size "
                                     f"is fixed to {size} ({_fmt(specs[0].shape)})")
                yield flush(count)  # a new shape starts a new batch
            pending.append(item)
            count += _batch_len(item[0])
            while count >= size:
                yield flush(size)
        if pending and count:
            if fixed:
                message = f"{self.description}: {count} sample(s) dropped: the model's batch size is fixed to {size}"
                if message not in self.warnings:
                    self.warnings.append(message)
            else:
                yield flush(count)

    def batches(self, specs: list[InputSpec], batch_size: int) -> Iterator[Feeds]:
        for feeds, _labels in self.labelled_batches(specs, batch_size):
            yield feeds


def _batch_len(feeds: dict[str, np.ndarray]) -> int:
    for value in feeds.values():
        return int(value.shape[0]) if np.ndim(value) else 1
    return 0


def adapt(data, input_names: list[str], *, name: str = "", num_samples: int | None = None,
          specs: list[InputSpec] | None = None):
    """``data`` as a ``CalibrationSource`` when it is PyTorch data (else returned unchanged): a dict
    of tensors becomes a dict of arrays (like an ``.npz``), anything else iterable a ``TorchDataSource``."""
    if not is_torch_data(data):
        return data
    if isinstance(data, Mapping) and not any(str(k) in LABEL_KEYS for k in data) and all(
        _is_tensor(v) or isinstance(v, np.ndarray) for v in data.values()
    ):
        return {str(k): to_numpy(v, "torch data") for k, v in data.items()}
    return TorchDataSource(data, list(input_names), name=name, count=num_samples, specs=specs)
