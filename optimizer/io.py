"""Loading and saving ONNX models safely.

Loading refuses what could hurt the user: files that are not ONNX, truncated files, and
external-data locations that resolve outside the model's folder. Saving is atomic (temporary
file in the destination folder, then rename), never overwrites the input model, switches to
external data above protobuf's 2 GB limit, and pins an IR version ONNX Runtime can run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from optimizer.errors import InputError

log = logging.getLogger(__name__)

#: Highest IR version ONNX Runtime 1.31 reads; onnx 1.23 writes 14 unless told otherwise.
MAX_RUNTIME_IR_VERSION = 13
#: Protobuf cannot serialize a message over 2 GiB; above this we write external data.
PROTOBUF_LIMIT = 2**31 - 1
#: Leave headroom for graph structure beside the weights.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


@dataclass
class ModelSource:
    """Where a model came from: its path (if any) and the folder its external data lives in."""

    path: Path | None
    base_dir: Path | None
    file_bytes: int


def load_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, ModelSource]:
    """Load a model from a file or take a ``ModelProto``; raise ``InputError`` with one clear line."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        _check_structure(model, "<ModelProto>")
        return model, ModelSource(None, None, model.ByteSize() if not _has_external(model) else 0)
    path = Path(source)
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if path.is_dir():
        raise InputError(f"expected an ONNX model file, got a directory: {path}")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"model file is empty (0 bytes): {path}")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise InputError(f"not a valid ONNX model (truncated or not ONNX?): {path}: {_first_line(exc)}") from None
    _check_structure(model, str(path))
    base_dir = path.resolve().parent
    if _has_external(model):
        _check_external_locations(model, base_dir, path)
        size += sum(_external_length(t, base_dir) for t in _external_tensors(model))
        try:
            external_data_helper.load_external_data_for_model(model, str(base_dir))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read external data of {path}: {_first_line(exc)}") from None
    return model, ModelSource(path, base_dir, size)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _check_structure(model: onnx.ModelProto, where: str) -> None:
    """Protobuf happily parses many non-ONNX byte strings; reject what is not a usable model."""
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise InputError(f"not a valid ONNX model (no IR version or no graph; truncated or not ONNX?): {where}")
    if not model.graph.output:
        raise InputError(f"not a valid ONNX model (the graph has no outputs; truncated?): {where}")
    if not model.opset_import:
        raise InputError(f"not a valid ONNX model (no opset imports; truncated?): {where}")


def _external_tensors(model: onnx.ModelProto):
    return [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]


def _has_external(model: onnx.ModelProto) -> bool:
    return any(True for _ in _external_tensors(model))


def _location(tensor: onnx.TensorProto) -> str:
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return ""


def _external_length(tensor: onnx.TensorProto, base_dir: Path) -> int:
    values = {e.key: e.value for e in tensor.external_data}
    if "length" in values:
        return int(values["length"])
    return (base_dir / values.get("location", "")).stat().st_size


def _check_external_locations(model: onnx.ModelProto, base_dir: Path, path: Path) -> None:
    """Refuse external data that resolves outside the model's folder (path traversal, symlinks)."""
    for tensor in _external_tensors(model):
        location = _location(tensor)
        if not location:
            raise InputError(f"tensor '{tensor.name}' in {path} uses external data but names no location")
        target = (base_dir / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base_dir):
            raise InputError(
                f"refusing external data of tensor '{tensor.name}': location '{location}' "
                f"resolves outside the model's folder {base_dir}"
            )
        if not target.is_file():
            raise InputError(f"external data file of tensor '{tensor.name}' not found: {target}")


def required_ir_version(model: onnx.ModelProto) -> int:
    """Lowest IR version that supports the model's default-domain opset."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    for _release, ir_version, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return ir_version
    return onnx.IR_VERSION


def pin_ir_version(model: onnx.ModelProto, original_ir: int | None = None) -> None:
    """Set an IR version ONNX Runtime can run: keep the original where possible, never above 13."""
    wanted = original_ir if original_ir else model.ir_version
    wanted = max(wanted, required_ir_version(model))
    model.ir_version = min(wanted, MAX_RUNTIME_IR_VERSION)


def weights_nbytes(model: onnx.ModelProto) -> int:
    """Bytes held by initializers (including external data already loaded)."""
    total = 0
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += onnx.numpy_helper.to_array(tensor).nbytes if _has_payload(tensor) else 0
    return total


def _has_payload(tensor: onnx.TensorProto) -> bool:
    return bool(
        tensor.float_data or tensor.int32_data or tensor.int64_data or tensor.double_data
        or tensor.uint64_data or tensor.string_data
    )


def default_output_path(input_path: Path) -> Path:
    """``model.onnx`` → ``model.opt.onnx`` beside the input."""
    name = input_path.name
    stem = name[: -len(".onnx")] if name.endswith(".onnx") else name
    return input_path.with_name(f"{stem}.opt.onnx")


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    protect: tuple[Path, ...] = (),
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` atomically to ``path``; return the path.

    ``protect`` lists files that must never be overwritten (the input model and its external data).
    External data is used when asked for, or automatically when the model would exceed 2 GB.
    """
    path = Path(path)
    target = path.resolve()
    for protected in protect:
        if protected.exists() and target == protected.resolve():
            raise InputError(f"refusing to overwrite the input model {protected}; choose another output path (-o)")
    if not target.parent.is_dir():
        raise InputError(f"output folder does not exist: {target.parent}")
    if external_data is None:
        external_data = weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = f"{path.name}.data"
    if external_data:
        data_target = target.with_name(data_name)
        for protected in protect:
            if protected.exists() and data_target == protected.resolve():
                raise InputError(f"refusing to overwrite the input's external data {protected}")
    # The temporary files live in the destination folder so the final rename is atomic; they are
    # removed on any failure.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=target.parent) as scratch:
        tmp_model = Path(scratch) / path.name
        if external_data:
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            onnx.save_model(
                to_save,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            os.replace(Path(scratch) / data_name, target.with_name(data_name))
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, target)
    log.info("saved %s", target)
    return path


@contextlib.contextmanager
def model_on_disk(model: onnx.ModelProto):
    """Yield a path to ``model`` written in a private temporary folder (for >2 GB models)."""
    with tempfile.TemporaryDirectory(prefix="onnx-trt-optimizer-") as scratch:
        path = Path(scratch) / "model.onnx"
        save_model(model, path)
        yield path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically (temporary file in the same folder, then rename)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write a binary file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    if not path.resolve().parent.is_dir():
        raise InputError(f"output folder does not exist: {path.resolve().parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
