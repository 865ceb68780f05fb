"""Ahead-of-time TensorRT check with TensorRT-RTX: does the model parse, and does an engine build?

TensorRT-RTX (``pip install tensorrt-rtx-cu12``) parses ONNX and builds serialized engines for a
chosen GPU architecture on a machine without a GPU, so every optimized model can be proven to
build. Engines are never deserialized or run here (that needs a GPU).

The library is imported lazily: this module imports without ``tensorrt_rtx`` installed, and
``check_model`` then raises ``TensorRTUnavailableError`` with an install hint.

Python API::

    from optimizer.tensorrt_rtx import check_model, is_available

    result = check_model("model.opt.onnx", shapes={"input": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))})
    if result.unsupported:
        print([node.name for node in result.unsupported])
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import onnx
from onnx import external_data_helper

from optimizer.errors import InputError, TensorRTUnavailableError
from optimizer.io import EXTERNAL_DATA_THRESHOLD, load_model, save_model, weights_nbytes, write_bytes_atomic

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install tensorrt-rtx-cu12"
DEFAULT_COMPUTE_CAPABILITY = "SM89"

Shape = tuple[int, ...]
ShapeProfile = tuple[Shape, Shape, Shape]


@dataclass
class UnsupportedNode:
    """A node TensorRT-RTX cannot import, and why.

    ``index`` is the node's position in ``model.graph.node`` (-1 if the parser did not say).
    """

    name: str
    op_type: str
    reason: str
    index: int = -1
    domain: str = ""


@dataclass
class TrtCheckResult:
    """What TensorRT-RTX made of a model.

    ``parsed``: the ONNX parser imported the whole graph. ``unsupported``: nodes it cannot import
    (from ``supports_model_v2``). ``built``: a serialized engine was produced (``engine_bytes`` long,
    in ``build_time_s`` seconds) for ``compute_capability``. ``errors`` holds the parser's and the
    builder's error messages, ``warnings`` the builder's warnings.
    """

    parsed: bool
    built: bool
    unsupported: list[UnsupportedNode] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    engine_bytes: int = 0
    build_time_s: float = 0.0
    compute_capability: str = DEFAULT_COMPUTE_CAPABILITY
    warnings: list[str] = field(default_factory=list)
    engine_path: str | None = None
    profile: dict[str, list[list[int]]] = field(default_factory=dict)
    trt_version: str = ""

    @property
    def ok(self) -> bool:
        """Parsed with no unsupported node and no error (a failed build always records an error)."""
        return self.parsed and not self.unsupported and not self.errors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_available() -> bool:
    """True when ``tensorrt_rtx`` imports."""
    try:
        _import_trt()
    except TensorRTUnavailableError:
        return False
    return True


def _import_trt():
    try:
        import tensorrt_rtx as trt
    except (ImportError, OSError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TensorRTUnavailableError(
            f"TensorRT-RTX is not installed or cannot be loaded ({detail}); install it with: {INSTALL_HINT}"
        ) from None
    return trt


def compute_capabilities() -> list[str]:
    """Compute-capability names the installed TensorRT-RTX can build for, e.g. ``['SM75', ..., 'SM120']``."""
    return _valid_capabilities(_import_trt())


def _valid_capabilities(trt) -> list[str]:
    names = [name for name in trt.ComputeCapability.__members__ if re.fullmatch(r"SM\d+", name)]
    return sorted(names, key=lambda name: int(name[2:]))


def _resolve_compute_capability(trt, text: str) -> tuple[str, Any]:
    """``"SM89"``, ``"sm_89"``, ``"89"`` or ``"8.9"`` → (``"SM89"``, ``trt.ComputeCapability.SM89``)."""
    valid = _valid_capabilities(trt)
    norm = re.sub(r"[\s_.]", "", str(text)).upper()
    if norm.isdigit():
        norm = f"SM{norm}"
    if norm not in valid:
        raise InputError(
            f"unknown compute capability {text!r}; TensorRT-RTX {trt.__version__} builds for: {', '.join(valid)}"
        )
    return norm, trt.ComputeCapability.__members__[norm]


def _make_logger(trt):
    """A TensorRT logger that records errors and warnings instead of printing them."""

    class _RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg) -> None:  # called by TensorRT
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)
                log.debug("TensorRT-RTX error: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(msg)
                log.debug("TensorRT-RTX warning: %s", msg)

        def take_errors(self) -> list[str]:
            taken, self.errors = self.errors, []
            return taken

    return _RecordingLogger()


class _Session:
    """A builder, a network and a parser that must live and die together.

    The parser holds raw pointers into the network, and the network into the builder: freeing
    them in the wrong order crashes the process, so ``close`` drops them parser first.
    """

    def __init__(self, trt, logger) -> None:
        self.logger = logger
        self.builder = trt.Builder(logger)
        self.network = self.builder.create_network(0)
        self.parser = trt.OnnxParser(self.network, logger)

    def close(self) -> None:
        self.parser = None
        self.network = None
        self.builder = None


@contextlib.contextmanager
def _session(trt, logger) -> Iterator[_Session]:
    session = _Session(trt, logger)
    try:
        yield session
    finally:
        session.close()


# ---------------------------------------------------------------------------------------------
# Model preparation


def _tensors_with_external_data(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)
    ]


@contextlib.contextmanager
def _model_for_trt(model: onnx.ModelProto, on_disk: bool) -> Iterator[tuple[bytes, Path | None]]:
    """Yield (serialized model, path or None). With ``on_disk``, the model and its weights are
    written (external data) to a private temporary folder; the bytes are then the small graph file."""
    if not on_disk:
        yield model.SerializeToString(), None
        return
    with tempfile.TemporaryDirectory(prefix="onnx-trt-optimizer-trt-") as scratch:
        path = Path(scratch) / "model.onnx"
        save_model(model, path, external_data=True)
        yield path.read_bytes(), path


def _input_names(model: onnx.ModelProto) -> list[str]:
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def _normalize_shapes(shapes: Mapping[str, Any] | None, inputs: Sequence[str]) -> dict[str, ShapeProfile]:
    """``{name: shape}`` or ``{name: (min, opt, max)}`` (or ``calibration.data.ShapeSpec``) → profiles."""
    if not shapes:
        return {}
    unknown = [name for name in shapes if name not in inputs]
    if unknown:
        raise InputError(f"shapes name unknown input(s) {', '.join(unknown)}; model inputs: {', '.join(inputs)}")
    profiles: dict[str, ShapeProfile] = {}
    for name, spec in shapes.items():
        if hasattr(spec, "opt"):  # calibration.data.ShapeSpec
            opt = tuple(spec.opt)
            profile = (tuple(spec.min or opt), opt, tuple(spec.max or opt))
        else:
            try:
                items = list(spec)
                if items and all(_is_int(d) for d in items):
                    shape = tuple(int(d) for d in items)
                    profile = (shape, shape, shape)
                elif len(items) == 3:
                    profile = tuple(tuple(int(d) for d in s) for s in items)  # type: ignore[assignment]
                else:
                    raise ValueError
            except (TypeError, ValueError):
                raise InputError(
                    f"shape of input {name!r} must be a tuple of ints or (min, opt, max) tuples, got {spec!r}"
                ) from None
        low, opt, high = profile
        if len({len(low), len(opt), len(high)}) != 1:
            raise InputError(f"shape of input {name!r}: min/opt/max must have the same rank, got {profile}")
        if any(d <= 0 for s in profile for d in s):
            raise InputError(f"shape of input {name!r} has a dimension <= 0: {profile}")
        if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise InputError(f"shape of input {name!r}: need min <= opt <= max in every dimension, got {profile}")
        profiles[name] = profile
    return profiles


def _is_int(value: Any) -> bool:
    try:
        return int(value) == value and not isinstance(value, (tuple, list))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# The check


def check_model(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    build: bool = True,
    shapes: Mapping[str, Any] | None = None,
    compute_capability: str = DEFAULT_COMPUTE_CAPABILITY,
    save_engine: str | os.PathLike | None = None,
    workspace_mb: int | None = None,
) -> TrtCheckResult:
    """Parse ``model`` with TensorRT-RTX, list unsupported nodes, and (``build``) build an engine.

    ``shapes`` sets the optimization profile: ``{input: shape}`` or ``{input: (min, opt, max)}``.
    Dynamic dimensions of inputs it does not name get sizes under which the model runs in ONNX
    Runtime (``calibration.shapes``: a dynamic batch spans 1..8, other dims fixed), or 1 when
    ONNX Runtime cannot run it either. The engine is
    built for ``compute_capability`` (``"SM75"`` ... ``"SM120"``; see ``compute_capabilities()``)
    and, with ``save_engine``, written there atomically. ``workspace_mb`` caps the builder's
    workspace memory.

    Raises ``TensorRTUnavailableError`` without TensorRT-RTX and ``InputError`` for bad arguments;
    a model TensorRT cannot handle is reported in the result, not raised.
    """
    trt = _import_trt()
    cc_name, cc_value = _resolve_compute_capability(trt, compute_capability)
    if workspace_mb is not None and (not isinstance(workspace_mb, int) or workspace_mb <= 0):
        raise InputError(f"workspace_mb must be a positive integer, got {workspace_mb!r}")
    if save_engine is not None and not build:
        raise InputError("save_engine needs build=True")

    if isinstance(model, onnx.ModelProto) and _tensors_with_external_data(model):
        raise InputError(
            "the ModelProto references external data that is not loaded; pass the model's path, "
            "or load it with onnx.load(path) (which loads external data)"
        )
    proto, source = load_model(model)
    if save_engine is not None:
        _check_engine_target(Path(save_engine), source.path)
    profiles = _normalize_shapes(shapes, _input_names(proto))
    if build:
        profiles = _runnable_profiles(proto, profiles)
    # load_model has loaded any external data into memory; such a model (or one too big for
    # protobuf) goes back to disk, with external data, in a private temporary folder.
    weights = weights_nbytes(proto)
    file_size = source.path.stat().st_size if source.path is not None else None
    had_external = file_size is not None and (source.file_bytes > file_size or weights > file_size)
    on_disk = had_external or weights > EXTERNAL_DATA_THRESHOLD

    result = TrtCheckResult(parsed=False, built=False, compute_capability=cc_name, trt_version=trt.__version__)
    logger = _make_logger(trt)
    with _model_for_trt(proto, on_disk) as (data, path):
        support_errors = _find_unsupported(trt, logger, proto, data, path, result)
        with _session(trt, logger) as session:
            parser = session.parser
            if path is not None:
                result.parsed = bool(parser.parse_from_file(str(path)))
            else:
                result.parsed = bool(parser.parse(data))
            parse_errors = [_format_error(parser.get_error(i)) for i in range(parser.num_errors)]
            logged = logger.take_errors()
            result.errors += parse_errors or ([] if result.parsed else logged)
            result.errors += [e for e in support_errors if e not in result.errors]
            if result.parsed and build:
                errors_before = list(result.errors)
                _build(trt, session, result, cc_value, profiles, workspace_mb, save_engine)
                fixed = {n: (p[1], p[1], p[1]) for n, p in profiles.items()}
                if not result.built and fixed != profiles:
                    # Some layers (recurrent ones in FP16, seen with TensorRT-RTX) fail to build for a
                    # range of shapes and build for one: retry at the opt shapes, and say so.
                    failed = result.errors[len(errors_before):]
                    result.errors = errors_before
                    _build(trt, session, result, cc_value, fixed, workspace_mb, save_engine)
                    if result.built:
                        result.warnings.append(
                            "the engine was built for fixed shapes (the opt shapes): the dynamic profile failed: "
                            + " ".join(" ".join(failed).split())[:300]
                        )
                    else:
                        result.errors = errors_before + failed + result.errors[len(errors_before):]
    result.warnings = list(dict.fromkeys(result.warnings + logger.warnings))
    return result


def _find_unsupported(trt, logger, proto, data: bytes, path: Path | None, result: TrtCheckResult) -> list[str]:
    """Fill ``result.unsupported`` from ``supports_model_v2``; return its error messages.

    ``supports_model_v2`` imports the supported nodes into the network, so it gets a network of its
    own (parsing into a non-empty network fails). Nodes in no subgraph are the unsupported ones; when
    the model is not fully supported, TensorRT marks even the supported partitions as not supported.
    """
    nodes = proto.graph.node
    with _session(trt, logger) as session:
        parser = session.parser
        if path is not None:
            supported = bool(parser.supports_model_v2(data, str(path)))
        else:
            supported = bool(parser.supports_model_v2(data))
        covered: set[int] = set()
        for i in range(parser.num_subgraphs):
            covered.update(int(n) for n in parser.get_subgraph_nodes(i))
        # Copy everything out of the error objects while the parser that owns them is alive.
        errors = [
            (
                _safe_call(e, "node", -1),
                _safe_call(e, "node_name", ""),
                _safe_call(e, "node_operator", ""),
                _desc(e),
                _format_error(e),
            )
            for e in (parser.get_error(i) for i in range(parser.num_errors))
        ]
        logger.take_errors()
    reasons: dict[int, list[str]] = {}
    extra: list[UnsupportedNode] = []
    for index, name, op_type, desc, _ in errors:
        if 0 <= index < len(nodes):
            reasons.setdefault(index, []).append(desc)
        elif index >= 0 or name:
            # A node the parser names but the top-level graph does not hold (subgraph, function).
            extra.append(UnsupportedNode(name=name or f"<node {index}>", op_type=op_type, reason=desc, index=index))
    # With no node named and no subgraph found, the failure is model-level (errors say why):
    # blaming every node would mislead.
    if not supported and (covered or reasons):
        missing = set(range(len(nodes))) - covered
        for index in sorted(missing | set(reasons)):
            node = nodes[index]
            reason = "; ".join(dict.fromkeys(reasons.get(index, []))) or "not in any subgraph TensorRT-RTX supports"
            result.unsupported.append(
                UnsupportedNode(
                    name=node.name or f"<unnamed node {index}>",
                    op_type=node.op_type,
                    reason=reason,
                    index=index,
                    domain=node.domain,
                )
            )
    result.unsupported += extra
    return [message for *_, message in errors]


def _runnable_profiles(proto: onnx.ModelProto, profiles: dict[str, ShapeProfile]) -> dict[str, ShapeProfile]:
    """``profiles`` plus profiles for the dynamic inputs it leaves out, at sizes the model runs at
    (an engine built for 1x1 images fails where the model's upsampling needs more)."""
    from calibration.data import ShapeSpec
    from calibration.shapes import engine_profile, runnable_shapes
    from optimizer.runtime import input_specs

    specs = [s for s in input_specs(proto) if s.is_dynamic and s.name not in profiles]
    if not specs:
        return profiles
    plan = runnable_shapes(proto, {n: ShapeSpec(p[1]) for n, p in profiles.items()})
    if not plan.runs:
        return profiles
    extra = _normalize_shapes(engine_profile(plan, specs), _input_names(proto))
    return {**profiles, **extra}


def _build(trt, session: _Session, result: TrtCheckResult, cc_value, profiles, workspace_mb, save_engine) -> None:
    builder, network = session.builder, session.network
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(cc_value, 0)
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb * 2**20)

    profile_shapes: dict[str, ShapeProfile] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        dynamic = any(d < 0 for d in dims)
        if tensor.is_shape_tensor:
            if dynamic or tensor.name in profiles:
                result.errors.append(
                    f"input {tensor.name!r} is a shape tensor; check_model cannot build a profile for its values"
                )
                return
            continue
        if tensor.name in profiles:
            profile = profiles[tensor.name]
            if len(profile[1]) != len(dims):
                raise InputError(
                    f"shape of input {tensor.name!r} has rank {len(profile[1])}, the model's input has rank "
                    f"{len(dims)} {_fmt_dims(dims)}"
                )
            for axis, d in enumerate(dims):
                if d >= 0 and any(s[axis] != d for s in profile):
                    raise InputError(
                        f"shape of input {tensor.name!r} sets fixed dimension {axis} (= {d}) to "
                        f"{[s[axis] for s in profile]}; the model's input is {_fmt_dims(dims)}"
                    )
            profile_shapes[tensor.name] = profile
        elif dynamic:
            shape = tuple(1 if d < 0 else d for d in dims)
            profile_shapes[tensor.name] = (shape, shape, shape)
    if any(any(d < 0 for d in network.get_input(i).shape) for i in range(network.num_inputs)):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    result.profile = {name: [list(s) for s in p] for name, p in profile_shapes.items()}

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    result.build_time_s = time.perf_counter() - start
    result.errors += session.logger.take_errors()
    if plan is None or plan.nbytes == 0:
        if not result.errors:
            result.errors.append("TensorRT-RTX returned no engine (no error message)")
        return
    result.built = True
    result.engine_bytes = int(plan.nbytes)
    if save_engine is not None:
        result.engine_path = str(write_bytes_atomic(Path(save_engine), memoryview(plan)))
        log.info("saved TensorRT-RTX engine %s", save_engine)
    del plan, config


def _check_engine_target(path: Path, model_path: Path | None) -> None:
    target = path.resolve()
    if not target.parent.is_dir():
        raise InputError(f"engine output folder does not exist: {target.parent}")
    if target.is_dir():
        raise InputError(f"engine output path is a directory: {path}")
    if model_path is not None and target == model_path.resolve():
        raise InputError(f"refusing to overwrite the input model {model_path} with the engine")


def _safe_call(error, method: str, default):
    try:
        return getattr(error, method)()
    except Exception:  # noqa: BLE001 - older bindings lack some accessors
        return default


def _desc(error) -> str:
    return str(_safe_call(error, "desc", "") or error).strip()


def _format_error(error) -> str:
    """``node 3 'conv1' (Conv): <description>`` or just the description for model-level errors."""
    desc = _desc(error)
    index = _safe_call(error, "node", -1)
    name = _safe_call(error, "node_name", "")
    op = _safe_call(error, "node_operator", "")
    code = _safe_call(error, "code", None)
    code_text = f" [{getattr(code, 'name', code)}]" if code is not None else ""
    if index is not None and index >= 0:
        label = f"node {index}" + (f" {name!r}" if name else "") + (f" ({op})" if op else "")
        return f"{label}{code_text}: {desc}"
    return f"{desc}{code_text}" if code_text else desc


def _fmt_dims(dims: Sequence[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in dims) + "]"
