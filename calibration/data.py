"""Data sources: ``.npz`` files, shapes given on the command line, and synthetic inputs.

Arrays are read with ``allow_pickle=False`` always: a data file must never be able to run code.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from optimizer.errors import InputError
from optimizer.runtime import InputSpec

log = logging.getLogger(__name__)

LABELS_KEY = "labels"


@dataclass(frozen=True)
class ShapeSpec:
    """A shape for one input; ``min``/``max`` are set for TensorRT optimization profiles."""

    opt: tuple[int, ...]
    min: tuple[int, ...] | None = None
    max: tuple[int, ...] | None = None


def parse_shapes(items: list[str] | str | None) -> dict[str, ShapeSpec]:
    """Parse ``name:1x3x224x224`` (or ``name:min/opt/max``) items, comma- or space-separated."""
    if not items:
        return {}
    if isinstance(items, str):
        items = [items]
    shapes: dict[str, ShapeSpec] = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, dims = part.rpartition(":")
            if not sep or not name or not dims:
                raise InputError(f"cannot read shape {part!r}; expected name:1x3x224x224 (or name:min/opt/max)")
            try:
                profile = [tuple(int(d) for d in s.split("x")) for s in dims.split("/")]
            except ValueError:
                raise InputError(f"cannot read shape {part!r}; dimensions must be integers joined by 'x'") from None
            if any(d <= 0 for s in profile for d in s):
                raise InputError(f"shape {part!r} has a dimension <= 0")
            if len(profile) == 1:
                shapes[name] = ShapeSpec(profile[0])
            elif len(profile) == 3:
                if len({len(s) for s in profile}) != 1:
                    raise InputError(f"shape {part!r}: min/opt/max must have the same rank")
                shapes[name] = ShapeSpec(profile[1], profile[0], profile[2])
            else:
                raise InputError(f"cannot read shape {part!r}; give one shape or min/opt/max")
    return shapes


def resolve_shape(
    spec: InputSpec, shapes: dict[str, ShapeSpec | tuple[int, ...]], warnings: list[str]
) -> tuple[int, ...]:
    """A concrete shape for ``spec``: the user's, else static dims with dynamic ones set to 1."""
    if spec.name in shapes:
        given = shapes[spec.name]
        given = given.opt if isinstance(given, ShapeSpec) else tuple(given)
        if spec.shape is not None:
            if len(given) != len(spec.shape):
                raise InputError(
                    f"--shapes gives input '{spec.name}' rank {len(given)}, the model expects rank {len(spec.shape)} "
                    f"({_fmt(spec.shape)})"
                )
            for got, want in zip(given, spec.shape):
                if isinstance(want, int) and got != want:
                    raise InputError(
                        f"--shapes gives input '{spec.name}' shape {_fmt(given)}, the model fixes it to {_fmt(spec.shape)}"
                    )
        return given
    if spec.shape is None:
        raise InputError(f"input '{spec.name}' has no shape in the model; give one with --shapes {spec.name}:1x...")
    if spec.is_dynamic:
        warnings.append(
            f"input '{spec.name}' has dynamic dims {_fmt(spec.shape)}; using 1 for each "
            f"(set them with --shapes {spec.name}:...)"
        )
    return tuple(d if isinstance(d, int) else 1 for d in spec.shape)


def _fmt(shape) -> str:
    return "x".join(str(d) if d is not None else "?" for d in shape)


def synthetic_inputs(
    specs: list[InputSpec], shapes: dict[str, ShapeSpec | tuple[int, ...]] | None = None, seed: int | list[int] = 0,
    warnings: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Deterministic inputs: floats uniform in [-1, 1), integers in {0, 1}, random booleans
    (``seed``: anything ``numpy.random.default_rng`` takes, e.g. ``[source seed, sample index]``)."""
    rng = np.random.default_rng(seed)
    warnings = warnings if warnings is not None else []
    feeds = {}
    for spec in specs:
        shape = resolve_shape(spec, shapes or {}, warnings)
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.uniform(-1.0, 1.0, size=shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif np.issubdtype(spec.dtype, np.integer):
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        else:
            raise InputError(f"cannot make synthetic data for input '{spec.name}' of type {spec.dtype}; give --data")
    return feeds


@dataclass
class ArrayData:
    """Samples by input name (first axis = samples) and optional labels, from an ``.npz`` file."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return min(a.shape[0] for a in self.arrays.values()) if self.arrays else 0

    def check(self, specs: list[InputSpec]) -> None:
        """Every model input present, ranks and static dims compatible, dtypes castable."""
        for spec in specs:
            if spec.name not in self.arrays:
                have = ", ".join(self.arrays) or "nothing"
                raise InputError(f"{self.source}: no array for model input '{spec.name}' (file has {have})")
            array = self.arrays[spec.name]
            if spec.shape is not None:
                if array.ndim != len(spec.shape):
                    raise InputError(
                        f"{self.source}: array '{spec.name}' has shape {array.shape}; the model expects "
                        f"rank {len(spec.shape)} ({_fmt(spec.shape)}) with samples on the first axis"
                    )
                for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
                    if axis > 0 and isinstance(want, int) and got != want:
                        raise InputError(
                            f"{self.source}: array '{spec.name}' has shape {array.shape}; the model expects {_fmt(spec.shape)}"
                        )
            if array.dtype != spec.dtype:
                if array.dtype.kind != spec.dtype.kind and not (array.dtype.kind in "iu" and spec.dtype.kind in "iu"):
                    raise InputError(
                        f"{self.source}: array '{spec.name}' is {array.dtype}, the model expects {spec.dtype}"
                    )
                self.arrays[spec.name] = array.astype(spec.dtype)
        lengths = {a.shape[0] for a in self.arrays.values()}
        if len(lengths) > 1:
            raise InputError(f"{self.source}: arrays have different sample counts {sorted(lengths)}")
        if self.labels is not None and self.labels.shape[0] != self.num_samples:
            raise InputError(f"{self.source}: {self.labels.shape[0]} labels for {self.num_samples} samples")

    def batches(self, specs: list[InputSpec], batch_size: int, limit: int | None = None) -> Iterator[tuple[dict, np.ndarray | None]]:
        """Yield ``(feeds, labels)`` batches; a static first dim fixes the batch size."""
        fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
        if fixed:
            batch_size = fixed.pop()
        total = self.num_samples if limit is None else min(limit, self.num_samples)
        usable = total - total % batch_size if fixed else total
        if usable < total:
            self.warnings.append(f"{total - usable} sample(s) dropped: the model's batch size is fixed to {batch_size}")
        for start in range(0, usable, batch_size):
            stop = min(start + batch_size, usable)
            feeds = {s.name: self.arrays[s.name][start:stop] for s in specs}
            labels = self.labels[start:stop] if self.labels is not None else None
            yield feeds, labels


def load_npz(path: str | Path) -> ArrayData:
    """Read arrays by input name (and optional ``labels``) from an ``.npz`` file, never unpickling."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise InputError(f"{path}: contains pickled objects; only plain numeric arrays are accepted") from None
        raise InputError(f"{path}: not a valid .npz file: {exc}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path}: not a valid .npz file: {exc}") from None
    labels = arrays.pop(LABELS_KEY, None)
    if labels is not None:
        labels = labels.reshape(labels.shape[0], -1)[:, 0] if labels.ndim > 1 else labels
    if not arrays:
        raise InputError(f"{path}: holds no input arrays")
    return ArrayData(arrays, labels, str(path))
