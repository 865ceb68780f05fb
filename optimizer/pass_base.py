"""The pass contract: ``Pass``, ``PassResult``, ``PassContext`` and verification tolerances."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.errors import OptionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """How close a transformed model's outputs must stay to the reference's.

    A float output passes when ``max|new - ref| <= allowed`` and, if ``min_cosine`` is set, when the
    cosine similarity of the flattened outputs is at least ``min_cosine``. ``allowed`` is
    ``atol + rtol * max|ref|`` (error relative to the output's largest magnitude, so near-zero
    elements do not dominate); with ``noise_multiple`` it grows to that multiple of the model's own
    float noise on the same inputs (``optimizer.noise``), but never beyond
    ``ceiling_rel * max|ref|`` (or ``atol`` for an all-zero output). An infinite ``atol`` or ``rtol``
    means "no absolute bound" (scale-free measures only), never ``inf * 0``. Integer and boolean
    outputs must match exactly unless ``max_mismatch`` (or, with ``noise_multiple``, the noise's own
    mismatch) allows a fraction of elements to differ.
    """

    rtol: float = 1e-5
    atol: float = 1e-6
    min_cosine: float | None = None
    max_mismatch: float = 0.0
    noise_multiple: float | None = None
    ceiling_rel: float | None = None

    @property
    def absolute(self) -> bool:
        """Whether an absolute error bound applies at all."""
        return math.isfinite(self.atol) and math.isfinite(self.rtol)


#: Lossless passes: equal up to float rounding -- 10x the model's own float noise on the same
#: inputs (at least 1e-5 relative), never more than 1e-3 of the output's largest magnitude.
EXACT = Tolerance(noise_multiple=10.0, ceiling_rel=1e-3)


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, counts for the report, ``skipped``: the sites
    it refused by reason in words (``passes.skips.Skips``; reported as ``skipped_<reason>`` stats),
    optional structured ``details`` (JSON-serializable: per-tensor ranges, per-layer sensitivity
    ...), and ``metadata``: entries for the exported model's ``metadata_props`` (a graph has none),
    which the manager writes when it accepts the change and shows later passes in
    ``PassContext.model_metadata``."""

    changed: bool
    stats: dict[str, int | float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes share. Passes never read global state or the command line.

    ``input_shapes``: shapes a pass may bake into the model (only with ``--static-shapes``; empty
    otherwise, so dynamic dims stay dynamic).
    ``reference_inputs``: one batch of inputs for numeric checks a pass wants to run itself.
    ``verify_batches``: the batches per-pass verification runs on (``calibration.samples``);
    ``score_batches``: more of the same samples, for scoring search candidates.
    ``calibration``: a calibration data source (quantization passes).
    ``progress``: ``progress(description, total)`` returns a callable ``advance(n=1)``.
    ``executor``: where a pass's independent work runs (``calibration.executor``: calibration
    shards, search candidates); None runs it in-process. ``calib_batch_size``: samples calibration
    reads at a time (None: its default); neither changes a result.
    """

    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    reference_inputs: dict[str, np.ndarray] | None = None
    verify_batches: list[dict[str, np.ndarray]] | None = None
    #: Batches that score candidates in searches (``method=auto``): held-out or ``--data`` samples.
    score_batches: list[dict[str, np.ndarray]] | None = None
    calibration: Any = None
    precision: str = "fp32"
    progress: Callable[[str, int | None], Callable[..., None]] | None = None
    opset: int = 0
    #: Set by the manager: the original model's input specs, and how to map feeds laid out for the
    #: original model to the current one (identity unless a pass changed the I/O layout).
    original_inputs: list | None = None
    feed_adapter: Callable[[dict], dict] | None = None
    #: The user's task metric ``f(outputs, reference, labels) -> points`` (``--metric``), or None.
    metric: Callable[..., float] | None = None
    executor: Any = None  # a calibration.executor.Executor (the kernel does not import calibration)
    calib_batch_size: int | None = None
    #: Set by the manager before each pass: the model's ``metadata_props`` as that pass sees them
    #: (the input model's, updated by the ``PassResult.metadata`` of the passes before it).
    model_metadata: dict[str, str] = field(default_factory=dict)
    #: ONNX Runtime sessions shared by the run's stages (``optimizer.runtime.Sessions``), or None.
    sessions: Any = None

    def progress_bar(self, description: str, total: int | None = None) -> Callable[..., None]:
        """A progress callback; a no-op when nobody listens."""
        if self.progress is None:
            return lambda n=1: None
        return self.progress(description, total)


class Pass:
    """Base class of every pass.

    Subclasses are dataclasses: their fields are the pass options, so ``prune(ratio=0.3)`` in a text
    pipeline and ``Prune(ratio=0.3)`` in Python mean the same thing. The built-in passes are frozen
    (``@dataclass(frozen=True)``): options are checked once, in ``__post_init__``, and changed only
    through ``dataclasses.replace``, which checks them again. ``run`` mutates the graph in place and
    returns a ``PassResult``; the manager cleans up, sorts and verifies afterwards.
    """

    name: ClassVar[str] = ""
    lossy: ClassVar[bool] = False
    tolerance: ClassVar[Tolerance] = EXACT
    #: Op types the pass can act on: when the model (subgraphs included) holds none of them, the
    #: manager skips the pass without importing the graph. Empty: always run.
    requires_any_op: ClassVar[frozenset[str]] = frozenset()
    #: The pass reads ``ctx.calibration`` (ranges, activation statistics): the driver plans
    #: calibration samples for it and tells the user which ones it used.
    uses_calibration: ClassVar[bool] = False
    #: The pass quantizes activations with calibrated ranges: it takes ``method`` and
    #: ``range_cache`` options (``--calib-method``, ``--range-cache``) and its ``details["tensors"]``
    #: hold ``{tensor: {"amax", "scale", ...}}`` (a TensorRT calibration cache is written from them).
    calibrates_ranges: ClassVar[bool] = False
    #: How an accuracy budget may tune the pass: ``"exclude"`` (layers listed in its ``exclude``
    #: option stay in float; its ``details["layers"]`` name them) or ``"prune"`` (channel groups, its
    #: ``ratio``/``ratios`` options); empty: not tunable.
    tunable: ClassVar[str] = ""
    #: The pass can change the model's I/O layout through an ``io`` option (``--input-layout``).
    sets_io_layout: ClassVar[bool] = False
    #: The precision flag (``--int8``, ``--fp16``) that appends this pass, if any.
    precision_flag: ClassVar[str] = ""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def accuracy_floor(self) -> float | None:
        """The output cosine similarity (0..1) this pass's result is held to when the user sets no
        accuracy budget: the driver returns the pass's noisiest layers to float until every float
        output keeps it (``optimizer.budget``, tunable passes only). None: no floor."""
        return None

    def option_error(self, message: str) -> OptionError:
        """The error an option check in ``__post_init__`` raises: it names the pass, and the CLI
        prints it as one line and exits 2."""
        return OptionError(f"bad options for pass '{self.name}': {message}")

    def _normalize(self, **values: Any) -> None:
        """Store validated option values in their canonical form (``__post_init__`` of a frozen pass)."""
        for key, value in values.items():
            object.__setattr__(self, key, value)

    # -- options ---------------------------------------------------------------------------
    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        """The options this pass accepts (its dataclass fields)."""
        return list(dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []

    def options(self) -> dict[str, Any]:
        """Options that differ from their defaults, in declaration order."""
        out = {}
        for f in self.option_fields():
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
            )
            if value != default:
                out[f.name] = value
        return out

    def spec(self) -> str:
        """This pass as pipeline text, e.g. ``fold-constants(size_limit=1024)``."""
        return format_pass(self)

    def __str__(self) -> str:
        return self.spec()


# -- text form and registration (the contract every pass module builds on) --------------------
#: A bare word in pipeline text: anything else is quoted.
_WORD = re.compile(r"^[A-Za-z0-9_.:/+\-]+$")
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
#: Every registered pass by name; ``optimizer.registry`` adds the built-ins and plugins and looks
#: names up.
_REGISTRY: dict[str, type[Pass]] = {}


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    return text if _WORD.match(text) else '"' + text.replace('"', "'") + '"'


def format_pass(p: Pass) -> str:
    """One pass as text: ``name`` or ``name(key=value,...)``."""
    options = p.options()
    if not options:
        return p.name
    return f"{p.name}(" + ",".join(f"{k}={_format_value(v)}" for k, v in options.items()) + ")"


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available by ``cls.name`` in pipelines and on the command line."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"register_pass expects a Pass subclass, got {cls!r}")
    if not dataclasses.is_dataclass(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
    name = cls.name
    if not _NAME.match(name or ""):
        raise ValueError(f"pass {cls.__qualname__} needs a kebab-case `name` (e.g. 'fold-my-op'), got {name!r}")
    if name in ("fixpoint",):
        raise ValueError(f"'{name}' is reserved by the pipeline syntax")
    if not (cls.__doc__ or "").strip() or cls.__doc__.startswith(cls.__name__ + "("):
        raise ValueError(f"pass '{name}' needs a docstring: it is the pass's user-facing help")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass name '{name}' is already registered by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[name] = cls
    return cls
