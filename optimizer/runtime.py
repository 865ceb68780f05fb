"""ONNX Runtime on the CPU: the reference runtime for verification, evaluation and calibration."""

from __future__ import annotations

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

        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.log_severity_level = 4
        if threads:
            options.intra_op_num_threads = threads
        self.output_names = output_names(model)
        emulation = emulate_bfloat16(model)
        model = emulation.model
        self.float32_inputs = frozenset(emulation.float32_inputs)
        try:
            if model_io.weights_nbytes(model) > model_io.EXTERNAL_DATA_THRESHOLD:
                with model_io.model_on_disk(model) as path:
                    self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            else:
                self.session = ort.InferenceSession(
                    model.SerializeToString(), options, providers=["CPUExecutionProvider"]
                )
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise RuntimeFailure(f"ONNX Runtime cannot load the model: {_first_line(exc)}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

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
