"""ONNX Runtime on the CPU: the reference runtime for verification, evaluation and calibration."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from optimizer.emulation import emulate_bfloat16
from optimizer.errors import InputError
import optimizer.io as model_io

log = logging.getLogger(__name__)


def import_onnxruntime():
    """onnxruntime, with its C++ logger (which prints straight to stderr, even errors it also raises)
    silenced: its messages reach the user inside our one-line errors instead."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    return ort


class RuntimeFailure(InputError):
    """ONNX Runtime could not load or run a model."""


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype and shape (ints for static dims, str/None for dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    @property
    def is_dynamic(self) -> bool:
        return self.shape is None or any(not isinstance(d, int) for d in self.shape)


def _dims(value_type: onnx.TypeProto) -> tuple[int | str | None, ...] | None:
    tensor = value_type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (initializer-backed inputs of IR < 4 models excluded).

    A bfloat16 input is fed as float32 (numpy has no bfloat16; ``OrtRunner`` rounds it)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise InputError(f"input '{value.name}' is not a tensor (sequence/map/optional inputs are not supported)")
        elem = onnx.TensorProto.FLOAT if tensor.elem_type == onnx.TensorProto.BFLOAT16 else tensor.elem_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
        specs.append(InputSpec(value.name, dtype, _dims(value.type)))
    return specs


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


#: ONNX Runtime's results change in the last bits with its intra-op thread count (measured:
#: digits_cnn's activations differ between 1 thread and 2), so every run whose bits must not depend
#: on where it runs -- calibration, evaluation, search candidates, in-process or on any worker of a
#: cluster -- uses this many threads.
REPRODUCIBLE_THREADS = 1


class OrtRunner:
    """Runs a ``ModelProto`` in ONNX Runtime on the CPU.

    Graph optimizations are off by default so that what we verify is our graph, not ONNX
    Runtime's rewrite of it; ``optimize=True`` turns them on (for latency measurements).

    A model with bfloat16 compute runs on an emulated copy (``optimizer.emulation``: bf16 storage,
    float32 math, as on the GPU); ``model`` itself is not modified. Its bfloat16 inputs are fed and
    its bfloat16 outputs returned as float32 arrays holding bf16 values (ONNX Runtime's Python
    binding has no bfloat16); ``ml_dtypes.bfloat16`` feeds are accepted.
    """

    def __init__(self, model: onnx.ModelProto, *, optimize: bool = False, threads: int = 0):
        ort = import_onnxruntime()

        def options():
            options = ort.SessionOptions()
            options.graph_optimization_level = (
                ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            )
            options.log_severity_level = 4
            if threads:
                options.intra_op_num_threads = threads
            # Our runs are one-shot checks, not served latency: idle worker threads sleep instead of
            # spinning, which on shared cores cut session creation and runs by about 40 % (same outputs).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return options

        self.output_names = output_names(model)
        emulation = emulate_bfloat16(model)
        model = emulation.model
        self.float32_inputs = frozenset(emulation.float32_inputs)
        self._weights: list = []  # OrtValues the session reads large weights from: alive as long as it is
        self.session = self._session_with_weights_apart(ort, model, options) or self._session(ort, model, options)
        self.input_names = [i.name for i in self.session.get_inputs()]

    @staticmethod
    def _session(ort, model: onnx.ModelProto, options):
        """A session of the whole serialized model (through a file above protobuf's limit)."""
        try:
            if model_io.weights_nbytes(model) > model_io.EXTERNAL_DATA_THRESHOLD:
                with model_io.model_on_disk(model) as path:
                    return ort.InferenceSession(str(path), options(), providers=["CPUExecutionProvider"])
            return ort.InferenceSession(model.SerializeToString(), options(), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise RuntimeFailure(f"ONNX Runtime cannot load the model: {_first_line(exc)}") from None

    def _session_with_weights_apart(self, ort, model: onnx.ModelProto, options):
        """A session of ``model`` whose large weights ONNX Runtime reads from arrays handed over
        beside the graph (``add_external_initializers``) instead of from serialized bytes it parses
        and copies again: half the session time on a 28 MB or 55 MB model, the same outputs. None
        when there is nothing to hand over or ONNX Runtime refuses; the model is then loaded whole
        (and its own errors reported)."""
        try:
            stub, names, values = _weights_apart(ort, model)
            if not names or model_io.weights_nbytes(stub) > model_io.EXTERNAL_DATA_THRESHOLD:
                return None
            opts = options()
            opts.add_external_initializers(names, values)
            session = ort.InferenceSession(stub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several unrelated types; the whole model then loads
            log.debug("loading with the weights apart failed (%s); loading the whole model", _first_line(exc))
            return None
        self._weights = values
        return session

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on ``feeds`` (extra keys ignored); return outputs by name."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"no data for model input(s) {', '.join(missing)}; give them in --data or --shapes")
        feeds = {n: feeds[n] for n in self.input_names}
        for name in self.float32_inputs.intersection(feeds):
            feeds[name] = np.asarray(feeds[name], dtype=np.float32)
        try:
            values = self.session.run(self.output_names, feeds)
        except Exception as exc:
            raise RuntimeFailure(f"ONNX Runtime failed to run the model: {_first_line(exc)}") from None
        return dict(zip(self.output_names, values))


class Sessions:
    """The ONNX Runtime sessions of one run, shared by its stages (sample planning, verification,
    the float-noise probe, evaluation) so that a model is loaded once per use, not once per stage.

    Models are keyed by object identity: a model must not be modified after it ran here (``forget``
    it first). ``run(..., keep=True)`` also remembers the outputs (the last ``remembered`` runs of
    each of the ``models`` most recently remembered, kept after their sessions close: the original
    and the latest candidates), and a later ``run`` of that model on inputs equal in
    value (dtype, shape, every element) returns them instead of running again -- what a second
    run of the same session computes. At most ``keep`` sessions are open at a time, the least
    recently used closed before another loads: one during verification (the original's, then each
    candidate's), two while ``open_at_once(2)`` (evaluation compares two models batch by batch).
    """

    def __init__(self, keep: int = 1, remembered: int = 8, models: int = 3, threads: int = 0):
        self.keep, self.remembered, self.models = keep, remembered, models
        self.threads = threads  # ONNX Runtime intra-op threads of every session (0: its default)
        self._open: dict[int, tuple[onnx.ModelProto, OrtRunner]] = {}  # least recently used first
        self._memory: dict[int, tuple[onnx.ModelProto, list]] = {}  # id(model) -> (model, [(feeds, outputs)])
        self._aliases: dict[int, tuple[onnx.ModelProto, onnx.ModelProto]] = {}  # id(copy) -> (copy, model)
        self.loads = self.runs = self.reused = 0  # sessions created, runs made, runs answered from memory

    @contextlib.contextmanager
    def open_at_once(self, count: int):
        """Let ``count`` sessions stay open inside the ``with`` block."""
        before, self.keep = self.keep, max(self.keep, count)
        try:
            yield self
        finally:
            self.keep = before
            self._close(room=0)

    def alias(self, copy: onnx.ModelProto, model: onnx.ModelProto) -> None:
        """``copy`` is an unmodified copy of ``model``: it uses ``model``'s session and outputs."""
        self._aliases[id(copy)] = (copy, self._resolve(model))

    def forget(self, model: onnx.ModelProto) -> None:
        """Drop ``model``'s session and outputs (call before modifying a model that ran here)."""
        for table in (self._open, self._memory, self._aliases):
            table.pop(id(model), None)

    def runner(self, model: onnx.ModelProto) -> OrtRunner:
        """``model``'s session, loaded unless it is open."""
        model = self._resolve(model)
        entry = self._open.pop(id(model), None)
        if entry is None or entry[0] is not model:
            self._close(room=1)
            entry = (model, OrtRunner(model, threads=self.threads))
            self.loads += 1
        self._open[id(model)] = entry  # now the most recently used
        return entry[1]

    def run(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], keep: bool = False) -> dict[str, np.ndarray]:
        """``model``'s outputs on ``feeds`` (extra keys ignored), from memory when it ran on equal inputs."""
        model = self._resolve(model)
        feeds = {s.name: feeds[s.name] for s in input_specs(model) if s.name in feeds}
        entry = self._memory.pop(id(model), None)
        memory = entry[1] if entry is not None and entry[0] is model else []
        if memory:
            self._memory[id(model)] = (model, memory)  # now the most recently used
        for seen, outputs in memory:
            if _equal_feeds(seen, feeds):
                self.reused += 1
                return dict(outputs)
        outputs = self.runner(model).run(feeds)
        self.runs += 1
        if keep:
            memory.append((feeds, outputs))
            del memory[:-self.remembered]
            self._memory[id(model)] = (model, memory)
            for key in list(self._memory)[:-self.models]:
                del self._memory[key]
        return dict(outputs)

    def run_like(self, original: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict, keep: bool = False) -> dict:
        """``run_like`` through these sessions: feeds laid out for ``original``, outputs too."""
        to_inputs, to_outputs = io_adapter(original, candidate)
        return to_outputs(self.run(candidate, to_inputs(feeds), keep))

    def _resolve(self, model: onnx.ModelProto) -> onnx.ModelProto:
        alias = self._aliases.get(id(model))
        return alias[1] if alias is not None and alias[0] is model else model

    def _close(self, room: int) -> None:
        """Close the least recently used sessions until ``room`` more fit under ``keep``."""
        while self._open and len(self._open) > max(self.keep - room, 0):
            del self._open[next(iter(self._open))]


def _equal_feeds(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        y = b[name]
        if x is y:
            continue
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            return False
    return True


#: Element types whose weights are handed to ONNX Runtime as numpy arrays (``OrtRunner``).
_ARRAY_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
    onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL,
})
#: Weights with more elements than this are handed over apart from the graph.
APART_ELEMENTS = 1024


def _weights_apart(ort, model: onnx.ModelProto):
    """``(stub, names, values)``: ``model`` whose large main-graph weights (raw data of plain numeric
    types) are initializers without data, marked external (ONNX Runtime reads no file for them:
    ``values`` replace them), and those weights as ``OrtValue``s over numpy arrays."""
    from onnx import numpy_helper

    from optimizer.stats import copy_fields

    stub = onnx.ModelProto()
    copy_fields(model, stub, skip="graph")
    copy_fields(model.graph, stub.graph, skip="initializer")
    declared = {v.name for v in model.graph.input}  # IR < 4 initializers that are also inputs stay
    counts: dict[str, int] = {}
    for t in model.graph.initializer:
        counts[t.name] = counts.get(t.name, 0) + 1
    names, values = [], []
    for t in model.graph.initializer:
        if (t.data_type not in _ARRAY_TYPES or not t.HasField("raw_data") or t.name in declared
                or counts[t.name] > 1 or int(np.prod(t.dims, dtype=np.int64)) <= APART_ELEMENTS):
            stub.graph.initializer.append(t)
            continue
        array = np.ascontiguousarray(numpy_helper.to_array(t))
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        names.append(t.name)
        placeholder = stub.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                                 data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", "weights-handed-over-in-memory"), ("offset", "0"), ("length", str(array.nbytes))):
            placeholder.external_data.add(key=key, value=value)
    return stub, names, values


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:400]


def io_adapter(original: onnx.ModelProto, candidate: onnx.ModelProto):
    """``(to_inputs, to_outputs)`` mapping the original model's feeds to ``candidate``'s inputs and
    its outputs back, when a pass changed the I/O layout (``layout-nchw(io=nchw)`` records the
    permutations in the model's metadata); identities otherwise."""
    from optimizer.io_layout import io_layout, to_model_inputs, to_original_outputs

    if io_layout(original) == io_layout(candidate):
        return (lambda feeds: feeds), (lambda outputs: outputs)
    return (lambda feeds: to_model_inputs(candidate, feeds)), (lambda outputs: to_original_outputs(candidate, outputs))


def run_like(original: onnx.ModelProto, candidate: onnx.ModelProto, runner: OrtRunner, feeds: dict) -> dict:
    """Run ``candidate`` on feeds laid out for ``original``; outputs in ``original``'s layout."""
    to_inputs, to_outputs = io_adapter(original, candidate)
    return to_outputs(runner.run(to_inputs(feeds)))
