"""Concrete shapes for a model's dynamic inputs, resolved once per run, with where each came from.

Every consumer of samples (verification, evaluation, calibration, engine profiles) uses the one
``ShapePlan`` this module returns. For each input, in this order:

1. ``--shapes`` (the ``opt`` shape of a min/opt/max profile);
2. the arrays of ``--data``, then of ``--calib`` (the shape of one batch as it is fed);
3. the model's static dims;
4. hints in the model's metadata (``imgsz``/``image_size``/``input_size``, as Ultralytics and
   other exporters write them) for the height and width of image-like inputs;
5. a ``dim_param`` shared with a dim that is already known gets the same value;
6. defaults under which the *original* model runs: every remaining dim gets the first of the
   plausible sizes for its kind (batch: always 1; image height/width: 224, 320, ...; token sequences:
   16, 32, ...; audio signals: 1024, 4096, ...; anything else: 1, 2, 4, ...), and while the
   original fails to run, the next size of each kind is tried (a bounded, linear search).

If no candidate runs, the plan says so (``runs=False``, ``failure``) and numeric verification
falls back to structural checks with a one-line warning naming the ``--shapes`` to pass.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx

from calibration.data import ShapeSpec, _fmt, resolve_shape
from optimizer.errors import InputError
from optimizer.runtime import InputSpec

log = logging.getLogger(__name__)

#: A synthetic sample of one input may not exceed this many bytes (a larger static dim is refused).
MAX_SYNTHETIC_BYTES = 1 << 30
#: Searched sizes per kind of dim, in order. The first is the default.
CANDIDATES: dict[str, tuple[int, ...]] = {
    "batch": (1,),
    "spatial": (224, 320, 256, 416, 512, 640, 32, 64, 96, 128, 160, 1),
    "sequence": (16, 32, 64, 128, 256, 512, 8, 1),
    "signal": (1024, 4096, 16000, 512, 256, 2048, 8000, 1),
    "other": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
}
METADATA_SIZE_KEYS = ("imgsz", "img_size", "image_size", "input_size")


@dataclass(frozen=True)
class InputShape:
    """The shape one input is fed at, and where its dynamic dims came from."""

    name: str
    shape: tuple[int, ...]
    source: str  # --shapes | --data | --calib | model | metadata | shared dim | default | search
    declared: tuple[int | str | None, ...] | None = None

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "source": self.source, "declared": _fmt(self.declared) if self.declared else None}


@dataclass
class ShapePlan:
    """Shapes for every input; whether the original model runs at them (``runs``) and, if not, why."""

    inputs: dict[str, InputShape] = field(default_factory=dict)
    runs: bool = True
    failure: str = ""
    tried: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: s.shape for name, s in self.inputs.items()}

    def hint(self) -> str:
        """``--shapes`` arguments that would name every dynamic input."""
        return " ".join(
            f"--shapes {s.name}:{'x'.join(str(d) for d in s.shape)}"
            for s in self.inputs.values() if s.declared is None or any(not isinstance(d, int) for d in s.declared)
        )

    def to_dict(self) -> dict:
        return {
            "inputs": {name: s.to_dict() for name, s in self.inputs.items()},
            "original_runs": self.runs,
            "failure": self.failure,
            "candidates_tried": self.tried,
        }


def dim_kinds(spec: InputSpec) -> list[str]:
    """The kind of each dim of ``spec`` (``static`` for fixed dims), which picks its candidates."""
    shape = spec.shape or ()
    kinds = ["static" if isinstance(d, int) else "other" for d in shape]
    if not shape:
        return kinds
    if not isinstance(shape[0], int):
        kinds[0] = "batch"
    rank = len(shape)
    if rank == 4 and isinstance(shape[1], int) and shape[1] in (1, 2, 3, 4):  # NCHW image
        axes = (2, 3)
    elif rank == 4 and isinstance(shape[3], int) and shape[3] in (1, 3, 4):  # NHWC image
        axes = (1, 2)
    elif rank == 5 and isinstance(shape[1], int) and shape[1] in (1, 3, 4):  # NCDHW video/volume
        axes = (2, 3, 4)
    else:
        axes = ()
    for axis in axes:
        if kinds[axis] != "static":
            kinds[axis] = "spatial"
    if not axes and rank in (2, 3) and kinds[1] != "static":
        if rank == 2 and spec.dtype.kind == "f":
            kinds[1] = "signal"  # [batch, samples]: audio
        else:
            kinds[1] = "sequence"  # [batch, tokens] or [batch, time, features]
    return kinds


def metadata_size(model: onnx.ModelProto) -> tuple[int, int] | None:
    """(height, width) from exporter metadata such as Ultralytics' ``imgsz: [640, 640]``."""
    for prop in model.metadata_props:
        if prop.key.lower() not in METADATA_SIZE_KEYS:
            continue
        try:
            value = json.loads(prop.value)
        except ValueError:
            value = [int(v) for v in re.findall(r"\d+", prop.value)]
        values = [value] if isinstance(value, int) else list(value) if isinstance(value, list) else []
        if values and all(isinstance(v, int) and 0 < v <= 8192 for v in values):
            return (values[-2], values[-1]) if len(values) >= 2 else (values[0], values[0])
    return None


def check_sample_size(spec: InputSpec, shape: tuple[int, ...]) -> None:
    """Refuse a shape whose one synthetic sample would not fit a sane memory bound."""
    if any(d < 0 for d in shape):
        raise InputError(f"input '{spec.name}' has a negative dim ({_fmt(shape)}); give a real shape with --shapes {spec.name}:...")
    nbytes = int(np.prod(shape, dtype=np.float64) * np.dtype(spec.dtype).itemsize)
    if nbytes > MAX_SYNTHETIC_BYTES:
        raise InputError(
            f"input '{spec.name}' at shape {_fmt(shape)} needs {nbytes / 2**30:.3g} GiB for one sample; "
            f"give smaller dims with --shapes {spec.name}:... or real data with --data"
        )


def resolve_shapes(
    model: onnx.ModelProto,
    specs: list[InputSpec],
    given: Mapping[str, ShapeSpec] | None = None,
    observed: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
    try_run: Callable[[dict[str, tuple[int, ...]]], str | None] | None = None,
) -> ShapePlan:
    """The ``ShapePlan`` for ``model`` (see the module docstring).

    ``observed``: shapes seen in the user's data, ``{input: (shape of one batch, "--data"|"--calib")}``.
    ``try_run(shapes)``: runs the original model on synthetic inputs of those shapes and returns
    None, or why it failed; without it the first candidate is taken untested.
    """
    given = dict(given or {})
    observed = dict(observed or {})
    plan = ShapePlan()
    known: dict[str, int] = {}  # dim_param -> value
    fixed: dict[str, InputShape] = {}
    for spec in specs:
        if spec.name in given:
            shape = resolve_shape(spec, given, [])  # checks rank and static dims
            fixed[spec.name] = InputShape(spec.name, tuple(shape), "--shapes", spec.shape)
        elif spec.name in observed:
            shape, where = observed[spec.name]
            fixed[spec.name] = InputShape(spec.name, tuple(int(d) for d in shape), where, spec.shape)
        elif spec.shape is None:
            raise InputError(f"input '{spec.name}' has no shape in the model; give one with --shapes {spec.name}:1x...")
        elif not spec.is_dynamic:
            fixed[spec.name] = InputShape(spec.name, tuple(int(d) for d in spec.shape), "model", spec.shape)
        else:
            continue
        for d, value in zip(spec.shape or (), fixed[spec.name].shape):
            if isinstance(d, str) and d:
                known.setdefault(d, value)
    hw = metadata_size(model)
    # Open dims: (input, axis, kind, dim_param); the search fills them.
    partial: dict[str, list[int | None]] = {}
    sources: dict[str, str] = {}
    open_dims: list[tuple[str, int, str, str | None]] = []
    for spec in specs:
        if spec.name in fixed:
            continue
        dims: list[int | None] = []
        used = set()
        kinds = dim_kinds(spec)
        spatial_axes = [i for i, k in enumerate(kinds) if k == "spatial"]
        for axis, (d, kind) in enumerate(zip(spec.shape, kinds)):
            if isinstance(d, int):
                dims.append(d)
            elif isinstance(d, str) and d in known:
                dims.append(known[d])
                used.add("shared dim")
            elif hw is not None and kind == "spatial" and len(spatial_axes) == 2:
                dims.append(hw[spatial_axes.index(axis)])
                used.add("metadata")
            else:
                dims.append(None)
                open_dims.append((spec.name, axis, kind, d if isinstance(d, str) and d else None))
        partial[spec.name] = dims
        sources[spec.name] = "+".join(sorted(used)) if used else ""

    def candidate(level: int) -> dict[str, tuple[int, ...]]:
        shapes = {name: s.shape for name, s in fixed.items()}
        chosen: dict[str, int] = {}
        filled = {name: list(dims) for name, dims in partial.items()}
        for name, axis, kind, param in open_dims:
            options = CANDIDATES.get(kind, CANDIDATES["other"])
            value = chosen.get(param) if param else None
            if value is None:
                value = options[min(level, len(options) - 1)]
                if param:
                    chosen[param] = value
            filled[name][axis] = value
        shapes.update({name: tuple(int(d) for d in dims) for name, dims in filled.items()})
        return shapes

    levels = max((len(CANDIDATES.get(k, CANDIDATES["other"])) for _, _, k, _ in open_dims), default=1)
    spec_by_name = {s.name: s for s in specs}
    first_error = ""
    chosen_shapes: dict[str, tuple[int, ...]] | None = None
    for level in range(levels):
        shapes = candidate(level)
        try:
            for name, shape in shapes.items():
                if name not in observed:
                    check_sample_size(spec_by_name[name], shape)
        except InputError as exc:
            if level == 0 and not open_dims:
                raise
            first_error = first_error or str(exc)
            continue
        if try_run is None:
            chosen_shapes = shapes
            break
        plan.tried += 1
        error = try_run(shapes)
        if error is None:
            chosen_shapes = shapes
            break
        first_error = first_error or error
        if not open_dims:
            break  # nothing to search: the user's shapes (or the model's static ones) are what they are
    if chosen_shapes is None:
        plan.runs = False
        plan.failure = first_error
        chosen_shapes = candidate(0)
    for spec in specs:
        if spec.name in fixed:
            plan.inputs[spec.name] = fixed[spec.name]
            continue
        opened = any(n == spec.name for n, *_ in open_dims)
        how = "default" if plan.tried <= 1 else "search"
        label = "+".join(filter(None, [sources.get(spec.name, ""), how if opened else ""])) or "model"
        plan.inputs[spec.name] = InputShape(spec.name, chosen_shapes[spec.name], label, spec.shape)
    if any(kind != "batch" for _, _, kind, _ in open_dims):
        described = ", ".join(f"{s.name} {_fmt(s.shape)} ({s.source})" for s in plan.inputs.values() if s.name in partial)
        if plan.runs:
            plan.warnings.append(f"dynamic dims without data: using {described}; set them with --shapes")
    return plan


def observed_shapes(batch: Mapping[str, np.ndarray] | None, where: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{input: (shape, where)}`` of one batch of real data, for ``resolve_shapes``."""
    return {name: (tuple(np.shape(v)), where) for name, v in (batch or {}).items()}


def engine_profile(plan: ShapePlan, specs: list[InputSpec], max_batch: int = 8) -> dict[str, ShapeSpec]:
    """A TensorRT optimization profile from the plan: a dynamic batch dim spans 1 .. max(batch, ``max_batch``)
    around the resolved batch; every other dim is fixed at its resolved size (pass ``--shapes min/opt/max``
    for ranges)."""
    profile = {}
    for spec in specs:
        resolved = plan.inputs.get(spec.name)
        if resolved is None or not spec.is_dynamic:
            continue
        opt = resolved.shape
        low, high = list(opt), list(opt)
        if spec.shape and not isinstance(spec.shape[0], int) and opt:
            low[0], high[0] = 1, max(opt[0], max_batch)
        profile[spec.name] = ShapeSpec(tuple(opt), tuple(low), tuple(high))
    return profile


def runnable_shapes(model: onnx.ModelProto, given: Mapping[str, ShapeSpec] | None = None) -> ShapePlan:
    """``resolve_shapes`` with the original run in ONNX Runtime on synthetic inputs to prove each
    candidate; a model ONNX Runtime cannot load gives a plan with ``runs=False``."""
    from calibration.data import synthetic_inputs
    from optimizer.runtime import OrtRunner, RuntimeFailure, input_specs

    specs = input_specs(model)
    try:
        runner = OrtRunner(model)
    except RuntimeFailure as exc:
        plan = resolve_shapes(model, specs, given)
        plan.runs, plan.failure = False, str(exc)
        return plan

    def try_run(shapes: dict[str, tuple[int, ...]]) -> str | None:
        try:
            runner.run(synthetic_inputs(specs, shapes))
        except InputError as exc:
            return str(exc)
        return None

    return resolve_shapes(model, specs, given, try_run=try_run)
