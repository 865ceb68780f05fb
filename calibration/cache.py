"""Range caches: our JSON cache and TensorRT's calibration cache (read and write).

**JSON range cache** (``save_ranges``/``load_ranges``)::

    {"schema": "onnx-trt-optimizer/ranges/v1", "model_fingerprint": "<sha256 hex>",
     "ranges": {"<tensor>": {"amax": 2.64, "scale": 0.0208, "method": "entropy", "sqnr_db": 38.2}, ...}}

It is tied to the model it was made for by a fingerprint: the SHA-256 of the graph *structure* —
for the main graph and every subgraph, in order, each node's op type, domain, name, inputs and
outputs, plus the graph's input and output names. Weights and attribute values are left out, so
hashing is cheap even for huge models and the cache survives weight-only edits (fine-tuning,
re-exporting the same architecture); it still names exactly the tensors its ranges belong to.
Loading a cache made for a model with a different structure is refused with a clear error.
Non-finite ``sqnr_db`` values are stored as ``null``.

**TensorRT calibration cache** (``write_trt_cache``/``read_trt_cache``), the text format
``IInt8Calibrator::writeCalibrationCache`` produces and ``trtexec --calib=<file>`` reads::

    TRT-8601-EntropyCalibration2
    input: 3c010a14
    conv1_out: 3caa54fc

The first line is ``TRT-<version>-<algorithm>``; each further line is ``<tensor>: <scale>`` with
the scale (``amax / 127``) as the big-endian IEEE-754 float32 bit pattern in hex
(``struct.pack(">f", scale).hex()``). The reader also accepts unpadded values (``0``,
``3caa54fc``) and tensor names containing ``:`` (the value follows the last colon).

Both writers are atomic (``optimizer.io.write_text_atomic``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from calibration.ranges import INT8_MAX, TensorRange
from optimizer.errors import InputError
from optimizer.io import write_text_atomic

RANGES_SCHEMA = "onnx-trt-optimizer/ranges/v1"
#: TensorRT 8.6.1, the version stamp most published caches carry; pass ``version=`` to match yours.
DEFAULT_TRT_VERSION = 8601
#: TensorRT's name for the calibrator algorithm, by our range method.
TRT_ALGORITHMS = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration"}
#: ... and back, for reading (TensorRT's legacy and first entropy calibrators included).
_METHOD_BY_ALGORITHM = {
    "EntropyCalibration2": "entropy",
    "EntropyCalibration": "entropy",
    "MinMaxCalibration": "minmax",
    "LegacyCalibration": "legacy",
}
_HEADER = re.compile(r"^TRT-(?P<version>\d+)-(?P<algorithm>[A-Za-z0-9_]+)$")
_HEX = re.compile(r"^[0-9a-fA-F]{1,8}$")

Ranges = Mapping[str, TensorRange] | Iterable[TensorRange]


def _as_list(ranges: Ranges) -> list[TensorRange]:
    return list(ranges.values()) if isinstance(ranges, Mapping) else list(ranges)


# ---------------------------------------------------------------------------------------------
# fingerprint and JSON cache


def model_fingerprint(model: onnx.ModelProto) -> str:
    """SHA-256 (hex) of the graph structure: node ops, domains, names, inputs, outputs; no weights."""
    digest = hashlib.sha256()

    def feed(graph: onnx.GraphProto, path: str) -> None:
        digest.update(json.dumps(["graph", path, [v.name for v in graph.input], [v.name for v in graph.output]]).encode())
        for index, node in enumerate(graph.node):
            digest.update(
                json.dumps([node.op_type, node.domain, node.name, list(node.input), list(node.output)]).encode()
            )
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    feed(attr.g, f"{path}/{index}.{attr.name}")
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for k, sub in enumerate(attr.graphs):
                        feed(sub, f"{path}/{index}.{attr.name}[{k}]")

    feed(model.graph, "")
    return digest.hexdigest()


def _fingerprint_of(model: onnx.ModelProto | str) -> str:
    return model if isinstance(model, str) else model_fingerprint(model)


def _finite_or_none(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def save_ranges(path: str | os.PathLike, ranges: Ranges, model_fingerprint: str | onnx.ModelProto) -> Path:
    """Write ``ranges`` as our JSON cache, tied to ``model_fingerprint`` (a fingerprint or the model)."""
    for r in _as_list(ranges):
        if not math.isfinite(r.amax) or r.amax < 0:
            raise InputError(f"tensor '{r.name}' has amax {r.amax}; expected a finite value >= 0")
    document = {
        "schema": RANGES_SCHEMA,
        "model_fingerprint": _fingerprint_of(model_fingerprint),
        "ranges": {
            r.name: {"amax": float(r.amax), "scale": float(r.scale), "method": r.method, "sqnr_db": _finite_or_none(r.sqnr_db)}
            for r in _as_list(ranges)
        },
    }
    return write_text_atomic(path, json.dumps(document, indent=1, allow_nan=False) + "\n")


def load_ranges(path: str | os.PathLike, model: onnx.ModelProto | str) -> dict[str, TensorRange]:
    """Read our JSON cache; refuse one made for a model with a different structure."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"range cache not found: {path}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable range cache: {exc}") from None
    if not isinstance(document, dict) or document.get("schema") != RANGES_SCHEMA:
        found = document.get("schema") if isinstance(document, dict) else type(document).__name__
        raise InputError(f"{path}: not a range cache of this tool (schema {found!r}, expected {RANGES_SCHEMA!r})")
    expected = _fingerprint_of(model)
    stored = document.get("model_fingerprint")
    if stored != expected:
        raise InputError(
            f"{path}: range cache was made for a different model (graph fingerprint {str(stored)[:12]}…, this "
            f"model's is {expected[:12]}…); delete it or calibrate again"
        )
    entries = document.get("ranges")
    if not isinstance(entries, dict):
        raise InputError(f"{path}: 'ranges' must be an object of tensor name → range")
    ranges = {}
    for name, entry in entries.items():
        try:
            amax = float(entry["amax"])
            method = str(entry["method"])
            sqnr = entry.get("sqnr_db")
            sqnr = None if sqnr is None else float(sqnr)
        except (TypeError, KeyError, ValueError) as exc:
            raise InputError(f"{path}: bad range for tensor '{name}': {exc!r}") from None
        if not math.isfinite(amax) or amax < 0:
            raise InputError(f"{path}: tensor '{name}' has amax {amax}; expected a finite value >= 0")
        ranges[name] = TensorRange(name, amax, method, sqnr)
    return ranges


# ---------------------------------------------------------------------------------------------
# TensorRT calibration cache


@dataclass
class TrtCalibrationCache:
    """A parsed TensorRT calibration cache: header fields and one range per tensor."""

    version: int
    algorithm: str
    ranges: dict[str, TensorRange] = field(default_factory=dict)


def scale_to_hex(scale: float) -> str:
    """A scale as TensorRT writes it: the big-endian float32 bit pattern, 8 hex digits."""
    return struct.pack(">f", scale).hex()


def hex_to_scale(text: str) -> float:
    """The float32 a cache value encodes; unpadded values (``0``, ``3caa54fc``) are zero-filled on the left."""
    text = text.strip()
    if not _HEX.match(text):
        raise ValueError(f"expected 1 to 8 hex digits, got {text!r}")
    return struct.unpack(">f", bytes.fromhex(text.zfill(8)))[0]


def trt_algorithm(ranges: Ranges) -> str:
    """The header algorithm for ``ranges``: ``MinMaxCalibration`` if every range is min-max, else
    ``EntropyCalibration2`` (what ``trtexec``'s calibrator expects; the scales are ours either way)."""
    methods = {r.method for r in _as_list(ranges)}
    return TRT_ALGORITHMS["minmax"] if methods == {"minmax"} else TRT_ALGORITHMS["entropy"]


def format_trt_cache(ranges: Ranges, *, version: int = DEFAULT_TRT_VERSION, algorithm: str | None = None) -> str:
    """The text of a TensorRT calibration cache for ``ranges``."""
    items = _as_list(ranges)
    algorithm = algorithm or trt_algorithm(items)
    if not re.fullmatch(r"[A-Za-z0-9_]+", algorithm):
        raise InputError(f"TensorRT calibration algorithm must be a single word, got {algorithm!r}")
    lines = [f"TRT-{int(version)}-{algorithm}"]
    for r in items:
        if not r.name or "\n" in r.name or "\r" in r.name:
            raise InputError(f"tensor name {r.name!r} cannot be written to a TensorRT calibration cache")
        if not math.isfinite(r.amax) or r.amax < 0:
            raise InputError(f"tensor '{r.name}' has amax {r.amax}; expected a finite value >= 0")
        lines.append(f"{r.name}: {scale_to_hex(r.scale)}")
    return "\n".join(lines) + "\n"


def write_trt_cache(
    path: str | os.PathLike, ranges: Ranges, *, version: int = DEFAULT_TRT_VERSION, algorithm: str | None = None
) -> Path:
    """Write a TensorRT calibration cache (``TRT-<version>-<algorithm>`` + ``name: <hex scale>`` lines)."""
    return write_text_atomic(path, format_trt_cache(ranges, version=version, algorithm=algorithm))


def parse_trt_cache(text: str, source: str = "<text>") -> TrtCalibrationCache:
    """Parse the text of a TensorRT calibration cache."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise InputError(f"{source}: empty TensorRT calibration cache")
    header = _HEADER.match(lines[0])
    if not header:
        raise InputError(f"{source}: first line {lines[0][:80]!r} is not a TensorRT calibration cache header (TRT-<version>-<algorithm>)")
    algorithm = header["algorithm"]
    method = _METHOD_BY_ALGORITHM.get(algorithm, algorithm)
    cache = TrtCalibrationCache(int(header["version"]), algorithm)
    for number, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(":")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"{source}: line {number}: expected '<tensor>: <hex scale>', got {line[:80]!r}")
        try:
            scale = hex_to_scale(value)
        except ValueError as exc:
            raise InputError(f"{source}: line {number} (tensor '{name}'): {exc}") from None
        if not math.isfinite(scale) or scale < 0:
            raise InputError(f"{source}: line {number} (tensor '{name}'): scale {scale} is not a finite value >= 0")
        cache.ranges[name] = TensorRange(name, scale * INT8_MAX + 0.0, method)  # + 0.0: no -0.0
    return cache


def read_trt_cache(path: str | os.PathLike) -> TrtCalibrationCache:
    """Read a TensorRT calibration cache file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"TensorRT calibration cache not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable TensorRT calibration cache: {exc}") from None
    return parse_trt_cache(text, str(path))
