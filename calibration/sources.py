"""Calibration data sources: ``.npz``, a folder of ``.npy`` files, a folder of images, synthetic data.

Every source yields feeds batch by batch (``{input name: array}``, samples on the first axis) and
never holds more than one batch in memory, except ``.npz`` files, which numpy can only read whole
(use a folder of ``.npy`` files for large sets: those are memory-mapped).

Batch size: a model whose inputs fix the first dimension (e.g. ``1x3x224x224``) dictates the batch
size, and a last partial batch is dropped with a warning; a dynamic first dimension takes the
requested batch size, and the last batch may be smaller.

``.npy`` folder layouts (chosen automatically, in this order):

* **one file per input**: ``<input name>.npy`` for every model input, samples on axis 0, all with
  the same sample count. Characters other than letters, digits, ``.``, ``_`` and ``-`` in an input
  name may be written as ``_`` in the file name (``input:0`` → ``input_0.npy``).
* **per-sample files** (single-input models only): every ``.npy`` file is named
  ``<anything>_<n>.npy`` and holds one sample (the input's shape without the batch axis) or a chunk
  of samples (the input's full rank, samples on axis 0). Files are read in order of ``<anything>``,
  then of the number ``<n>`` (so ``x_2.npy`` comes before ``x_10.npy``).

Every ``.npy`` file is opened with ``np.load(path, allow_pickle=False, mmap_mode="r")``: a data
file can never run code, and memory stays flat however large the file is.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from calibration.data import ArrayData, ShapeSpec, _fmt, load_npz, resolve_shape
from optimizer.errors import InputError
from optimizer.runtime import InputSpec

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_SYNTHETIC_SAMPLES = 32
_PER_SAMPLE = re.compile(r"^(?P<stem>.*)_(?P<index>\d+)\.npy$", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

Feeds = dict[str, np.ndarray]


@runtime_checkable
class CalibrationSource(Protocol):
    """Where calibration samples come from.

    ``batches(specs, batch_size)`` yields feeds with samples on the first axis; ``num_samples`` is
    how many samples the source holds; ``description`` names it in reports; ``synthetic`` is true
    for made-up data (smoke runs), which reports must flag.
    """

    description: str
    synthetic: bool

    @property
    def num_samples(self) -> int: ...

    def batches(self, specs: list[InputSpec], batch_size: int) -> Iterator[Feeds]: ...


# ---------------------------------------------------------------------------------------------
# Batch planning shared by every source


def effective_batch_size(specs: list[InputSpec], requested: int) -> int:
    """The batch size to feed: the model's fixed first dimension if it has one, else ``requested``."""
    if not isinstance(requested, (int, np.integer)) or isinstance(requested, bool) or requested < 1:
        raise InputError(f"batch size must be a positive integer, got {requested!r}")
    fixed = {s.name: s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    sizes = set(fixed.values())
    if len(sizes) > 1:
        detail = ", ".join(f"'{n}': {b}" for n, b in fixed.items())
        raise InputError(f"the model's inputs fix different batch sizes ({detail}); cannot batch samples for it")
    if sizes:
        size = sizes.pop()
        if size != requested:
            log.info("the model fixes the batch size to %d; using it instead of %d", size, requested)
        return size
    return int(requested)


def batch_len(feeds: Feeds) -> int:
    """Samples in one batch: the first axis of its first array with one (1 if all are scalars)."""
    for value in feeds.values():
        if np.ndim(value):
            return int(np.shape(value)[0])
    return 1


def is_fixed_batch(specs: list[InputSpec]) -> bool:
    return any(s.shape and isinstance(s.shape[0], int) for s in specs)


def usable_samples(specs: list[InputSpec], batch_size: int, total: int, warnings: list[str], where: str) -> int:
    """How many of ``total`` samples can be fed: a fixed batch size drops the remainder (with a warning)."""
    size = effective_batch_size(specs, batch_size)
    if not is_fixed_batch(specs):
        return total
    usable = total - total % size
    if usable == 0 and total > 0:
        raise InputError(f"{where}: {total} sample(s), but the model's batch size is fixed to {size}")
    if usable < total:
        message = f"{where}: {total - usable} sample(s) dropped: the model's batch size is fixed to {size}"
        if message not in warnings:
            warnings.append(message)
    return usable


def check_array(where: str, name: str, shape: tuple[int, ...], dtype: np.dtype, spec: InputSpec, *, batched: bool = True) -> None:
    """Refuse arrays that cannot feed ``spec``: non-numeric dtypes, wrong rank, wrong static dims."""
    if dtype.kind not in "biuf":
        raise InputError(
            f"{where}: array for input '{name}' has dtype {dtype}; only plain numeric arrays are accepted"
        )
    if dtype.kind != spec.dtype.kind and not (dtype.kind in "biu" and spec.dtype.kind in "iu"):
        raise InputError(f"{where}: array for input '{name}' is {dtype}, the model expects {spec.dtype}")
    if spec.shape is None:
        return
    want = spec.shape if batched else spec.shape[1:]
    if len(shape) != len(want):
        raise InputError(
            f"{where}: array for input '{name}' has shape {tuple(shape)}; the model expects "
            f"rank {len(spec.shape)} ({_fmt(spec.shape)})" + (" with samples on the first axis" if batched else "")
        )
    for axis, (got, wanted) in enumerate(zip(shape, want)):
        if (axis > 0 or not batched) and isinstance(wanted, int) and got != wanted:
            raise InputError(
                f"{where}: array for input '{name}' has shape {tuple(shape)}; the model expects {_fmt(spec.shape)}"
            )


def _stack(pending: list[Feeds], specs: list[InputSpec]) -> Feeds:
    return {s.name: np.stack([sample[s.name] for sample in pending]).astype(s.dtype, copy=False) for s in specs}


def batch_samples(
    samples: Iterable[Feeds], specs: list[InputSpec], batch_size: int, limit: int, where: str
) -> Iterator[Feeds]:
    """Stack single samples into batches of ``batch_size`` (at most ``limit`` samples in all).

    With a dynamic batch dimension, a sample whose shape differs from the batch's closes the batch
    early (variable-size inputs then run in smaller batches); with a fixed one it is an error.
    """
    fixed = is_fixed_batch(specs)
    pending: list[Feeds] = []
    seen = 0
    for sample in samples:
        if seen >= limit:
            break
        if pending and any(sample[s.name].shape != pending[0][s.name].shape for s in specs):
            if fixed:
                shapes = {s.name: (pending[0][s.name].shape, sample[s.name].shape) for s in specs}
                raise InputError(f"{where}: samples have different shapes {shapes}; the model's batch size is fixed")
            yield _stack(pending, specs)
            pending = []
        pending.append(sample)
        seen += 1
        if len(pending) == batch_size:
            yield _stack(pending, specs)
            pending = []
    if pending:
        yield _stack(pending, specs)


# ---------------------------------------------------------------------------------------------
# .npz


@dataclass
class NpzSource:
    """Arrays by input name from an ``.npz`` file (or a dict of arrays); first axis = samples.

    Read with ``allow_pickle=False`` through ``calibration.data.load_npz``. numpy cannot memory-map
    ``.npz`` members, so the arrays are in memory; use a folder of ``.npy`` files for large sets.
    """

    data: ArrayData
    synthetic: bool = False
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_path(cls, path: str | Path) -> NpzSource:
        return cls(load_npz(path))

    @property
    def description(self) -> str:
        return self.data.source or "<arrays>"

    @property
    def num_samples(self) -> int:
        return self.data.num_samples

    def check(self, specs: list[InputSpec]) -> None:
        """Every model input present with a compatible shape and dtype."""
        for spec in specs:
            array = self.data.arrays.get(spec.name)
            if array is not None:
                check_array(self.description, spec.name, array.shape, array.dtype, spec)
        self.data.check(specs)

    def labelled_batches(self, specs: list[InputSpec], batch_size: int) -> Iterator[tuple[Feeds, np.ndarray | None]]:
        """``(feeds, labels)`` batches; labels are None when the file has none."""
        self.check(specs)
        size = effective_batch_size(specs, batch_size)
        usable = usable_samples(specs, batch_size, self.num_samples, self.warnings, self.description)
        for feeds, labels in self.data.batches(specs, size, limit=usable):
            yield {s.name: np.ascontiguousarray(feeds[s.name], dtype=s.dtype) for s in specs}, labels

    def batches(self, specs: list[InputSpec], batch_size: int) -> Iterator[Feeds]:
        for feeds, _labels in self.labelled_batches(specs, batch_size):
            yield feeds


# ---------------------------------------------------------------------------------------------
# folder of .npy files


def load_npy(path: Path) -> np.ndarray:
    """Memory-map one ``.npy`` file, never unpickling; a clear ``InputError`` for anything else."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        text = str(exc).lower()
        if "pickle" in text or "object" in text:
            raise InputError(
                f"{path}: holds Python objects (an object array); only plain numeric arrays are accepted"
            ) from None
        raise InputError(f"{path}: not a valid .npy file: {exc}") from None
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: not a valid .npy file: {exc}") from None
    if not isinstance(array, np.ndarray):
        raise InputError(f"{path}: not a .npy array file")
    if array.dtype.hasobject or array.dtype.kind not in "biuf":
        raise InputError(f"{path}: has dtype {array.dtype}; only plain numeric arrays are accepted")
    return array


def _first_dim(array: np.ndarray) -> int:
    return int(array.shape[0]) if array.ndim else 0


def _safe_name(name: str) -> str:
    return _UNSAFE.sub("_", name)


@dataclass
class NpyFolderSource:
    """A folder of ``.npy`` files, memory-mapped (layouts in the module docstring).

    ``layout`` is ``"per-input"`` (``files`` maps input names to files) or ``"per-sample"``
    (``files`` maps the single input's name to ``sample_files``, in reading order).
    """

    folder: Path
    layout: str
    files: dict[str, Path]
    sample_files: list[Path] = field(default_factory=list)
    synthetic: bool = False
    warnings: list[str] = field(default_factory=list)
    _counts: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def open(cls, path: str | Path, specs: list[InputSpec]) -> NpyFolderSource:
        """Pick the layout of ``path`` (a folder, or one ``.npy`` file for a single-input model)."""
        path = Path(path)
        if path.is_file():
            if len(specs) != 1:
                raise InputError(
                    f"{path}: one .npy file can only feed a single-input model; this model has inputs "
                    f"{', '.join(s.name for s in specs)} (use a folder with one <input>.npy per input)"
                )
            return cls(path.parent, "per-input", {specs[0].name: path})
        if not path.is_dir():
            raise InputError(f"calibration data not found: {path}")
        npy = sorted(p for p in path.iterdir() if p.suffix.lower() == ".npy" and p.is_file())
        if not npy:
            raise InputError(f"{path}: holds no .npy files")
        by_name = {p.name: p for p in npy}
        files: dict[str, Path] = {}
        for spec in specs:
            for candidate in (f"{spec.name}.npy", f"{_safe_name(spec.name)}.npy"):
                if candidate in by_name:
                    files[spec.name] = by_name[candidate]
                    break
        if len(files) == len(specs):
            return cls(path, "per-input", files)
        matches = [(_PER_SAMPLE.match(p.name), p) for p in npy]
        if len(specs) == 1 and all(m for m, _ in matches):
            ordered = [p for m, p in sorted(matches, key=lambda mp: (mp[0]["stem"], int(mp[0]["index"]), mp[1].name))]
            return cls(path, "per-sample", {specs[0].name: path}, ordered)
        missing = [s.name for s in specs if s.name not in files]
        hint = " or, for a single-input model, per-sample files named <name>_<n>.npy" if len(specs) == 1 else ""
        raise InputError(
            f"{path}: expected one <input>.npy per model input (missing: {', '.join(missing)}){hint}; "
            f"found {', '.join(p.name for p in npy[:5])}{' …' if len(npy) > 5 else ''}"
        )

    @property
    def description(self) -> str:
        return f"{self.folder} (.npy, {self.layout})"

    @property
    def num_samples(self) -> int:
        if self.layout == "per-input":
            counts = [_first_dim(load_npy(p)) for p in self.files.values()]
            return min(counts) if counts else 0
        return sum(self._sample_counts(None))

    def _sample_counts(self, spec: InputSpec | None) -> list[int]:
        """Samples in each per-sample file: 1 for a sample without batch axis, else its first dim."""
        if self._counts:
            return self._counts
        counts = []
        rank = len(spec.shape) if spec is not None and spec.shape is not None else None
        for path in self.sample_files:
            array = load_npy(path)
            if spec is not None:
                batched = rank is not None and array.ndim == rank
                if rank is not None and array.ndim not in (rank, rank - 1):
                    raise InputError(
                        f"{path}: shape {array.shape}; input '{spec.name}' expects one sample "
                        f"({_fmt(spec.shape[1:])}) or a chunk of samples ({_fmt(spec.shape)}) per file"
                    )
                check_array(str(path), spec.name, array.shape, array.dtype, spec, batched=batched)
            counts.append(array.shape[0] if rank is not None and array.ndim == rank else 1)
        if spec is not None:
            self._counts = counts
        return counts

    def check(self, specs: list[InputSpec]) -> None:
        """Every file numeric, with ranks and static dims the model accepts; equal sample counts."""
        if self.layout == "per-sample":
            self._sample_counts(specs[0])
            return
        counts = {}
        for spec in specs:
            array = load_npy(self.files[spec.name])
            check_array(str(self.files[spec.name]), spec.name, array.shape, array.dtype, spec)
            counts[spec.name] = array.shape[0]
        if len(set(counts.values())) > 1:
            raise InputError(f"{self.folder}: .npy files have different sample counts {counts}")

    def batches(self, specs: list[InputSpec], batch_size: int) -> Iterator[Feeds]:
        self.check(specs)
        size = effective_batch_size(specs, batch_size)
        usable = usable_samples(specs, batch_size, self.num_samples, self.warnings, self.description)
        if self.layout == "per-input":
            arrays = {s.name: load_npy(self.files[s.name]) for s in specs}
            for start in range(0, usable, size):
                stop = min(start + size, usable)
                # A copy of just this slice: the memory map itself costs no memory.
                yield {s.name: np.array(arrays[s.name][start:stop], dtype=s.dtype, order="C") for s in specs}
        else:
            yield from batch_samples(self._iter_samples(specs[0]), specs, size, usable, self.description)

    def _iter_samples(self, spec: InputSpec) -> Iterator[Feeds]:
        rank = len(spec.shape) if spec.shape is not None else None
        for path in self.sample_files:
            array = load_npy(path)
            if rank is not None and array.ndim == rank:
                for i in range(array.shape[0]):
                    yield {spec.name: np.array(array[i], dtype=spec.dtype)}
            else:
                yield {spec.name: np.array(array, dtype=spec.dtype)}


# ---------------------------------------------------------------------------------------------
# folder of images


@dataclass(frozen=True)
class ImageSpec:
    """How to turn an image file into a model input.

    Each image is converted to RGB (or grayscale for a 1-channel input), resized to ``size``
    (height, width) with bilinear filtering (aspect ratio not preserved, no crop), reordered to
    ``channel_order``, then ``x = (pixels * scale - mean) / std`` per channel, and laid out as
    ``NCHW`` or ``NHWC``. ``size=None`` takes the model's static height and width. ``mean`` and
    ``std`` have one value per channel, or one value for all.
    """

    size: tuple[int, int] | None = None
    layout: str = "NCHW"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"

    def __post_init__(self):
        if self.layout not in ("NCHW", "NHWC"):
            raise InputError(f"ImageSpec.layout must be 'NCHW' or 'NHWC', got {self.layout!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise InputError(f"ImageSpec.channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if self.size is not None and (len(self.size) != 2 or any(int(d) <= 0 for d in self.size)):
            raise InputError(f"ImageSpec.size must be (height, width) with positive values, got {self.size!r}")
        if any(float(s) == 0.0 for s in self.std):
            raise InputError(f"ImageSpec.std must not contain 0, got {self.std!r}")
        if not self.mean or not self.std:
            raise InputError("ImageSpec.mean and ImageSpec.std need at least one value")


def import_pillow():
    """Pillow's ``Image`` module, or an ``InputError`` with the install hint."""
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading calibration images needs Pillow, which is not installed: pip install pillow") from None
    return Image


@dataclass
class ImageFolderSource:
    """PNG/JPEG images under ``folder`` (sub-folders included, in sorted path order) for a single-input model."""

    folder: Path
    spec: ImageSpec
    files: list[Path]
    synthetic: bool = False
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, folder: str | Path, image_spec: ImageSpec | None = None) -> ImageFolderSource:
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"image folder not found: {folder}")
        files = find_images(folder)
        if not files:
            raise InputError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
        import_pillow()
        return cls(folder, image_spec or ImageSpec(), files)

    @property
    def description(self) -> str:
        return f"{self.folder} ({len(self.files)} images)"

    @property
    def num_samples(self) -> int:
        return len(self.files)

    def _geometry(self, specs: list[InputSpec]) -> tuple[InputSpec, int, tuple[int, int]]:
        """The single input, its channel count and the (height, width) to resize to."""
        if len(specs) != 1:
            raise InputError(
                f"{self.folder}: images can feed a single-input model only; this model has inputs "
                f"{', '.join(s.name for s in specs)} (use .npz or .npy data instead)"
            )
        spec = specs[0]
        if spec.shape is not None and len(spec.shape) != 4:
            raise InputError(
                f"{self.folder}: images need a rank-4 input ({self.spec.layout}); '{spec.name}' is {_fmt(spec.shape)}"
            )
        if spec.dtype.kind not in "fiu":
            raise InputError(f"{self.folder}: input '{spec.name}' is {spec.dtype}; images feed numeric inputs only")
        c_axis, h_axis, w_axis = (1, 2, 3) if self.spec.layout == "NCHW" else (3, 1, 2)
        dims = spec.shape or (None, None, None, None)
        channels = dims[c_axis] if isinstance(dims[c_axis], int) else 3
        if channels not in (1, 3):
            raise InputError(
                f"{self.folder}: input '{spec.name}' ({_fmt(spec.shape)}, {self.spec.layout}) has {channels} channels; "
                "images give 1 (grayscale) or 3 (RGB/BGR) — check ImageSpec.layout"
            )
        model_hw = (dims[h_axis], dims[w_axis])
        if self.spec.size is not None:
            size = (int(self.spec.size[0]), int(self.spec.size[1]))
            for got, want, what in zip(size, model_hw, ("height", "width")):
                if isinstance(want, int) and got != want:
                    raise InputError(
                        f"ImageSpec.size {size} does not match input '{spec.name}' {_fmt(spec.shape)} "
                        f"({self.spec.layout}): {what} must be {want}"
                    )
        elif all(isinstance(d, int) for d in model_hw):
            size = (int(model_hw[0]), int(model_hw[1]))
        else:
            raise InputError(
                f"input '{spec.name}' has dynamic height/width ({_fmt(spec.shape)}); give ImageSpec(size=(height, width))"
            )
        for values, what in ((self.spec.mean, "mean"), (self.spec.std, "std")):
            if len(values) not in (1, channels):
                raise InputError(f"ImageSpec.{what} has {len(values)} values; input '{spec.name}' has {channels} channels")
        return spec, channels, size

    def check(self, specs: list[InputSpec]) -> None:
        self._geometry(specs)

    def load(self, path: Path, channels: int, size: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        """One preprocessed image (no batch axis) in the model's layout and dtype."""
        Image = import_pillow()
        try:
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32)
        except Exception as exc:  # Pillow raises many types (UnidentifiedImageError, OSError, DecompressionBombError)
            raise InputError(f"{path}: cannot read image: {exc}") from None
        if channels == 1:
            pixels = pixels[..., None]
        elif self.spec.channel_order == "BGR":
            pixels = pixels[..., ::-1]
        mean = np.asarray(self.spec.mean, dtype=np.float32)
        std = np.asarray(self.spec.std, dtype=np.float32)
        x = (pixels * np.float32(self.spec.scale) - mean) / std
        if self.spec.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            return np.clip(np.rint(x), info.min, info.max).astype(dtype)
        return np.ascontiguousarray(x, dtype=dtype)

    def batches(self, specs: list[InputSpec], batch_size: int) -> Iterator[Feeds]:
        spec, channels, size = self._geometry(specs)
        batch = effective_batch_size(specs, batch_size)
        usable = usable_samples(specs, batch_size, self.num_samples, self.warnings, self.description)
        samples = ({spec.name: self.load(p, channels, size, spec.dtype)} for p in self.files)
        yield from batch_samples(samples, specs, batch, usable, self.description)


def find_images(folder: Path) -> list[Path]:
    """PNG/JPEG files under ``folder`` (hidden files and folders skipped), sorted by relative path."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


# ---------------------------------------------------------------------------------------------
# synthetic


@dataclass
class SyntheticSource:
    """Deterministic made-up inputs for smoke runs: floats uniform in [-1, 1), integers in {0, 1}.

    Flagged ``synthetic=True``: ranges calibrated on it say nothing about real data. Dynamic
    dimensions other than the batch come from ``shapes`` (as ``--shapes`` gives them) or default to 1
    with a warning. Sample ``i`` is drawn from its own generator, seeded ``(seed, i)``, so runs are
    reproducible and the samples do not depend on the batch size they are read in.
    """

    samples: int = DEFAULT_SYNTHETIC_SAMPLES
    shapes: dict[str, ShapeSpec | tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    synthetic: bool = True
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.samples < 1:
            raise InputError(f"synthetic calibration data needs at least 1 sample, got {self.samples}")

    @property
    def description(self) -> str:
        return f"synthetic ({self.samples} samples, uniform [-1, 1), seed {self.seed})"

    @property
    def num_samples(self) -> int:
        return self.samples

    def check(self, specs: list[InputSpec]) -> None:
        for spec in specs:
            resolve_shape(spec, self.shapes, [])

    def batches(self, specs: list[InputSpec], batch_size: int) -> Iterator[Feeds]:
        from calibration.data import synthetic_inputs

        size = effective_batch_size(specs, batch_size)
        usable = usable_samples(specs, batch_size, self.samples, self.warnings, self.description)
        base = {}
        for spec in specs:
            shape = resolve_shape(spec, self.shapes, self.warnings)
            base[spec.name] = shape
        # one sample at a time, at its resolved shape (batch 1; the model may fix another batch)
        one = [InputSpec(s.name, s.dtype, (1,) + tuple(base[s.name][1:]) if base[s.name] else ()) for s in specs]
        for start in range(0, usable, size):
            samples = [synthetic_inputs(one, seed=[self.seed, i]) for i in range(start, min(start + size, usable))]
            # a scalar input has no sample axis: the batch's first sample gives it
            yield {name: np.concatenate([x[name] for x in samples]) if base[name] else samples[0][name] for name in base}


# ---------------------------------------------------------------------------------------------
# dispatcher


def open_source(
    path_or_obj,
    specs: list[InputSpec],
    image_spec: ImageSpec | None = None,
    *,
    shapes: Mapping[str, ShapeSpec | tuple[int, ...]] | None = None,
    synthetic_samples: int = DEFAULT_SYNTHETIC_SAMPLES,
    seed: int = 0,
) -> CalibrationSource:
    """A checked calibration source for a model with inputs ``specs``.

    ``path_or_obj`` is a ``CalibrationSource`` (returned as is), ``ArrayData`` or a dict of arrays
    (like an ``.npz``), a path to an ``.npz`` file, a ``.npy`` file or a folder of ``.npy`` files, a
    folder of images (preprocessed with ``image_spec``), or ``None`` for synthetic data
    (``synthetic_samples`` samples, flagged ``synthetic=True``).
    """
    source: CalibrationSource
    if path_or_obj is None:
        source = SyntheticSource(synthetic_samples, dict(shapes or {}), seed)
    elif isinstance(path_or_obj, CalibrationSource):
        source = path_or_obj
    elif isinstance(path_or_obj, ArrayData):
        source = NpzSource(path_or_obj)
    elif isinstance(path_or_obj, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in path_or_obj.items()}
        for name, array in arrays.items():
            if array.dtype.hasobject:
                raise InputError(f"array '{name}' holds Python objects; only plain numeric arrays are accepted")
        source = NpzSource(ArrayData(arrays, None, "<arrays>"))
    elif isinstance(path_or_obj, (str, Path)):
        source = _open_path(Path(path_or_obj), specs, image_spec)
    else:
        raise InputError(
            f"cannot use {type(path_or_obj).__name__} as calibration data; give a path (.npz, .npy, a folder "
            "of .npy files or images), a dict of arrays, or a CalibrationSource"
        )
    if image_spec is not None and not isinstance(source, ImageFolderSource):
        raise InputError(f"an ImageSpec was given but {source.description} is not a folder of images")
    check = getattr(source, "check", None)
    if callable(check):
        check(specs)
    return source


def _open_path(path: Path, specs: list[InputSpec], image_spec: ImageSpec | None) -> CalibrationSource:
    if not path.exists():
        raise InputError(f"calibration data not found: {path}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return NpzSource.from_path(path)
        if suffix == ".npy":
            return NpyFolderSource.open(path, specs)
        raise InputError(f"{path}: unsupported calibration data; expected .npz, .npy, or a folder of .npy files or images")
    has_npy = any(p.suffix.lower() == ".npy" for p in path.iterdir())
    if has_npy and image_spec is None:
        return NpyFolderSource.open(path, specs)
    if find_images(path):
        return ImageFolderSource.open(path, image_spec)
    raise InputError(f"{path}: holds neither .npy files nor images ({', '.join(IMAGE_SUFFIXES)})")


@dataclass
class AdaptedSource:
    """A source whose batches are read in the original model's layout and then mapped with
    ``adapt`` (e.g. transposed to the NCHW inputs ``layout-nchw(io=nchw)`` gave the model)."""

    source: CalibrationSource
    original_specs: list[InputSpec]
    adapt: Callable[[Feeds], Feeds]

    @property
    def description(self) -> str:
        return self.source.description

    @property
    def synthetic(self) -> bool:
        return self.source.synthetic

    @property
    def num_samples(self) -> int:
        return self.source.num_samples

    def batches(self, specs: list[InputSpec], batch_size: int) -> Iterator[Feeds]:
        for feeds in self.source.batches(self.original_specs, batch_size):
            yield self.adapt(feeds)
