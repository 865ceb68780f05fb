"""FP16 and BF16 conversion with float32 kept where the lower precision is unsafe.

``convert-fp16`` and ``convert-bf16`` share one implementation (``_LowerPrecision``); they differ
in which ops their type can run (BF16: ONNX's schema at the model's opset) and in FP16's range
checks.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from optimizer.pass_base import Pass, PassContext, PassResult, Tolerance
from optimizer.pass_base import register_pass
from passes.graph_utils import constant_values, infer_tensor_types, is_default_domain, is_graph_output, unique_name

log = logging.getLogger(__name__)

FP16_MAX = 65504.0

#: Ops that run in FP16 (and in BF16 when their schema allows it), with the input positions that
#: carry the floating-point data (None: every float input). Everything else (reductions,
#: normalizations, Pow/Exp/Log, Q/DQ, control flow, custom ops ...) stays in float32, with Casts
#: at the boundary.
LOW_PRECISION_OPS: dict[str, tuple[int, ...] | None] = {
    **{op: None for op in (
        "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Min", "Max", "Sum",
        "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
        "Gelu", "Erf", "Softsign", "Abs", "Neg", "Sqrt", "Reciprocal", "Clip", "Concat",
        "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Softmax", "Identity",
        "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
    )},
    **{op: (0,) for op in (
        "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "Split",
        "Expand", "Tile", "Resize", "DepthToSpace", "SpaceToDepth", "Shape", "Size",
    )},
    "Pad": (0, 2),
    "Where": (1, 2),
}

#: Kept in float32 by default: reductions and normalizations accumulate, Pow/Exp overflow.
DEFAULT_KEEP_FP32 = (
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceProd",
    "LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
    "LpNormalization", "Pow", "Exp", "Log", "CumSum",
    # Recurrent layers: their state accumulates rounding over every step, and TensorRT-RTX fails to
    # build FP16 LSTM/GRU for sequences longer than 1 (Myelin reshape error; FP32 builds).
    "LSTM", "GRU", "RNN",
)


def _np_dtype(dtype) -> np.dtype:
    """A tensor's numpy dtype; graphsurgeon keeps types numpy lacks (bfloat16) as ONNX enums."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(dtype) if isinstance(dtype, int) else dtype)


def _float_inputs(node: gs.Node, spec: tuple[int, ...] | None) -> list[int]:
    indices = range(len(node.inputs)) if spec is None else [i for i in spec if i < len(node.inputs)]
    return [i for i in indices if node.inputs[i].name]


class _LowerPrecision(Pass):
    """What convert-fp16 and convert-bf16 share: pick the nodes that run in ``target``, convert
    their float32 constants, insert Casts wherever precision changes. Subclasses are dataclasses
    with the options ``keep_io_types``, ``keep_ops`` and ``exclude``, and say which nodes their
    type cannot run (``_op_support``) or whose values it cannot hold (``_value_range``)."""

    lossy = True
    #: The lower float type, and its short name in stats keys and tensor names (``fp16_nodes``).
    target: ClassVar[np.dtype]
    label: ClassVar[str]

    def _op_support(self, graph: gs.Graph, node: gs.Node, dtype_of: Callable) -> str:
        """Why ``node``'s op cannot run in ``target`` ("" when it can)."""
        if not is_default_domain(node) or node.op not in LOW_PRECISION_OPS:
            return f"op_not_{self.label}"
        return ""

    def _measure(self, graph: gs.Graph, ctx: PassContext, tensors: list[str]) -> dict[str, float]:
        """Largest |value| of float32 tensors, for ``_value_range`` (nothing by default)."""
        return {}

    def _value_range(self, node: gs.Node, amax: dict[str, float]) -> str:
        """Why ``node``'s values do not fit ``target`` ("" when they do)."""
        return ""

    def _details(self) -> dict:
        return {}

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        info = infer_tensor_types(graph)

        def dtype_of(t: gs.Tensor):
            if isinstance(t, gs.Constant):
                return np.asarray(t.values).dtype
            if t.dtype is not None:
                return _np_dtype(t.dtype)
            return info.get(t.name, (None, None))[1]

        amax = self._measure(graph, ctx, [t.name for n in graph.nodes for t in n.outputs if dtype_of(t) == np.float32])
        keep = set(self.keep_ops)
        reasons: dict[str, int] = {}
        int8_region = _int8_region(graph)
        feeds_recurrent = _recurrent_feeders(graph)

        def reason_fp32(node: gs.Node) -> str:
            if node.op in keep:
                return "kept_op"
            why = self._op_support(graph, node, dtype_of)
            if why:
                return why
            if node.name in self.exclude:
                return "excluded"
            if id(node) in int8_region:
                return "int8_region"  # rounding upstream of a QuantizeLinear would shift INT8 steps
            why = self._value_range(node, amax)
            if why:
                return why
            if id(node) in feeds_recurrent:
                return "feeds_recurrent"
            return ""

        low_nodes: set[int] = set()
        for node in graph.nodes:
            why = reason_fp32(node)
            has_float = any(dtype_of(node.inputs[i]) == np.float32 for i in _float_inputs(node, LOW_PRECISION_OPS.get(node.op)))
            if why:
                if has_float or any(dtype_of(t) == np.float32 for t in node.outputs):
                    reasons[why] = reasons.get(why, 0) + 1
                continue
            if has_float:
                low_nodes.add(id(node))
        if not low_nodes:
            return PassResult(False, stats={f"{self.label}_nodes": 0, **{f"fp32_{k}": v for k, v in reasons.items()}})

        casts = _Casts(graph, self.label)
        converted_constants = 0
        # 1. inputs of low-precision nodes: float32 data is converted (constants) or cast (tensors)
        for node in graph.nodes:
            if id(node) not in low_nodes:
                continue
            for i in _float_inputs(node, LOW_PRECISION_OPS[node.op]):
                t = node.inputs[i]
                if dtype_of(t) != np.float32:
                    continue
                if isinstance(t, gs.Constant):
                    node.inputs[i] = casts.constant(t, self.target)
                    converted_constants += 1
                elif not _produced_by(t, low_nodes):
                    node.inputs[i] = casts.cast(t, self.target)
        # 2. their float outputs take the target type; float32 readers get a Cast back
        for node in list(graph.nodes):
            if id(node) not in low_nodes:
                continue
            for t in node.outputs:
                if dtype_of(t) != np.float32:
                    continue
                t.dtype = self.target
                for reader in list(t.outputs):
                    if id(reader) in low_nodes and any(reader.inputs[i] is t for i in _float_inputs(reader, LOW_PRECISION_OPS[reader.op])):
                        continue
                    back = casts.cast(t, np.float32)
                    for i, inp in enumerate(reader.inputs):
                        if inp is t:
                            reader.inputs[i] = back
                if is_graph_output(graph, t) and self.keep_io_types:
                    _cast_graph_output(graph, t, self.target, self.label)
        stats = {
            f"{self.label}_nodes": len(low_nodes),
            "fp32_nodes": sum(reasons.values()),
            "casts_inserted": casts.count,
            "constants_converted": converted_constants,
            **{f"fp32_{k}": v for k, v in sorted(reasons.items())},
        }
        return PassResult(True, stats=stats, details={"fp32_reasons": reasons, **self._details()})


@register_pass
@dataclass(frozen=True)
class ConvertFp16(_LowerPrecision):
    """Run the model in FP16 where that is safe, keeping float32 where it is not::

        x(f32) -> Cast(f16) -> Conv(W f16) -> Relu -> ... -> ReduceMean(f32 via Cast) -> Cast(f32) -> y(f32)

    A node runs in FP16 when its op is in the FP16 list (convolutions, matrix products,
    elementwise ops, activations, pooling, data movement) and none of these hold:
    - its op is a reduction or normalization, or Pow/Exp/Log (option ``keep_ops``);
    - it reads a constant with values beyond +-65504 (FP16's range);
    - one of its float outputs exceeds ``max_activation`` (default 512, as NVIDIA's AutoCast) in
      magnitude on the calibration data (or on the verification inputs when there is none);
    - it is in an INT8 region: it reads a DequantizeLinear output, or a QuantizeLinear is reachable
      from it through float ops (FP16 rounding there would move values across INT8 steps, and a
      Cast between Q/DQ and a layer would stop TensorRT fusing them); so after ``quantize-int8``
      FP16 covers what stayed float;
    - its name is listed in ``exclude``; it lives in an If/Loop/Scan body (left in float32).
    Float32 constants read only by FP16 nodes are stored in FP16 (half the bytes). Casts are
    inserted wherever precision changes; graph inputs and outputs keep their types unless
    ``keep_io_types=false``. NaN/Inf in the outputs fail verification.

    Verification: lossy, scale-free: cosine >= 0.999 per output and no NaN/Inf that the original lacks.
    """

    name = "convert-fp16"
    uses_calibration = True
    precision_flag = "fp16"
    # Scale-free: FP16 rounding grows with the logits' magnitude, so an absolute bound would reject
    # correct conversions of deep networks (and accept broken ones of shallow ones).
    tolerance = Tolerance(rtol=float("inf"), atol=float("inf"), min_cosine=0.999)
    target = np.dtype(np.float16)
    label = "fp16"

    max_activation: float = 512.0
    keep_io_types: bool = True
    keep_ops: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_FP32))
    exclude: list[str] = field(default_factory=list)

    def _measure(self, graph: gs.Graph, ctx: PassContext, tensors: list[str]) -> dict[str, float]:
        return _activation_ranges(graph, ctx, tensors)

    def _value_range(self, node: gs.Node, amax: dict[str, float]) -> str:
        for i in _float_inputs(node, LOW_PRECISION_OPS[node.op]):
            values = constant_values(node.inputs[i])
            if values is not None and values.dtype == np.float32 and values.size and np.abs(values).max() > FP16_MAX:
                return "constant_out_of_range"
        for t in node.outputs:
            if amax.get(t.name, 0.0) > self.max_activation:
                return "activation_out_of_range"
        return ""

    def _details(self) -> dict:
        return {"max_activation": self.max_activation}


#: Ops TensorRT cannot build in BF16 although ONNX allows it (measured with TensorRT-RTX 1.7 for
#: SM89, one model per op of ``LOW_PRECISION_OPS``: tests/passes/test_precision_bf16.py): HardSwish
#: takes only FLOAT, HALF or INT8 inputs; a BF16 ConvTranspose fails in Myelin's type inference.
#: They stay float32 under convert-bf16.
TENSORRT_NO_BF16 = ("HardSwish", "ConvTranspose")

@register_pass
@dataclass(frozen=True)
class ConvertBf16(_LowerPrecision):
    """Run the model in BF16 where that is safe, keeping float32 where it is not::

        x(f32) -> Cast(bf16) -> MatMul(W bf16) -> Add -> Relu -> ... -> ReduceMean(f32 via Cast) -> Cast(f32) -> y(f32)

    BF16 has float32's exponent range (to ~3.4e38) with 8 mantissa bits, so it suits models whose
    activations overflow FP16 (TensorRT on Ampere and newer). The same rules as ``convert-fp16``
    choose the nodes, without FP16's range checks: no constant is too large and no activation
    range is measured (no calibration data needed). A node runs in BF16 when its op is in the
    FP16 list, ONNX's schema for that op at the model's opset accepts ``tensor(bfloat16)`` for its
    float inputs (MatMul, Gemm, Add, Mul, Relu, Softmax from opset 13, LeakyRelu/PRelu from 16;
    Conv, ConvTranspose and the pooling ops only from opset 22, so below that they stay float32
    -- run ``upgrade-opset`` first on models older than opset 13), and none of these hold:
    - its op is a reduction or normalization, Pow/Exp/Log, or a recurrent layer, or one TensorRT
      cannot build in BF16 (HardSwish, ConvTranspose) (``keep_ops``);
    - it is in an INT8 region: it reads a DequantizeLinear output, or a QuantizeLinear is reachable
      from it through float ops (so after ``quantize-int8`` BF16 covers what stayed float);
    - its name is listed in ``exclude``; it lives in an If/Loop/Scan body (left in float32).
    Float32 constants read only by BF16 nodes are stored in BF16 (half the bytes). Casts are
    inserted wherever precision changes; graph inputs and outputs keep their types unless
    ``keep_io_types=false``. Nodes kept in float32 are counted by reason (``fp32_<reason>``).
    ONNX Runtime's CPU provider has no BF16 kernels: verification runs the model emulated (bf16
    storage, float32 math, as TensorRT; ``optimizer.emulation``).

    Verification: lossy, scale-free: cosine >= 0.995 per output and no NaN/Inf that the original lacks.
    """

    name = "convert-bf16"
    precision_flag = "bf16"
    # Scale-free, as FP16. BF16 rounds each stored value by up to 2^-9 relative, 4x FP16's 2^-11,
    # so 1 - cosine grows ~16x: the worst correct conversion measured on the sample and zoo models
    # (eval data and random inputs, opset upgraded) has cosine 0.99967 (paddle_ocr_rec; FP16 there:
    # 0.999999). 0.995 leaves 15x that margin and still rejects a broken rewrite.
    tolerance = Tolerance(rtol=float("inf"), atol=float("inf"), min_cosine=0.995)
    target = np.dtype(ml_dtypes.bfloat16)
    label = "bf16"

    keep_io_types: bool = True
    keep_ops: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_FP32) + list(TENSORRT_NO_BF16))
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):
        for option in ("keep_ops", "exclude"):
            value = getattr(self, option)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise self.option_error(f"{option} must be a list of names, got {value!r}")
            self._normalize(**{option: list(value)})

    def _op_support(self, graph: gs.Graph, node: gs.Node, dtype_of: Callable) -> str:
        why = super()._op_support(graph, node, dtype_of)
        if why:
            return why
        inputs = tuple(i for i in _float_inputs(node, LOW_PRECISION_OPS[node.op]) if dtype_of(node.inputs[i]) == np.float32)
        return "" if accepts_bfloat16(node.op, graph.opset or 0, inputs) else "no_bf16_in_schema"


@functools.lru_cache(maxsize=None)
def accepts_bfloat16(op: str, opset: int, inputs: tuple[int, ...]) -> bool:
    """Whether ONNX's schema of ``op`` at ``opset`` allows ``tensor(bfloat16)`` for the type
    parameter of each input position in ``inputs`` that takes float32."""
    try:
        schema = onnx.defs.get_schema(op, opset)
    except onnx.defs.SchemaError:
        return False
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    for i in inputs:
        if not schema.inputs:
            return False
        formal = schema.inputs[min(i, len(schema.inputs) - 1)]  # variadic: the last one repeats
        types = allowed.get(formal.type_str, {formal.type_str})
        if "tensor(float)" in types and "tensor(bfloat16)" not in types:
            return False
    return True


RECURRENT_OPS = ("LSTM", "GRU", "RNN")
#: Ops that only move or look up data, and cheap unary activations; kept in FP32 when they only
#: feed recurrent layers, so the Cast to FP32 sits after a compute op (Conv, Gemm ...).
DATA_MOVEMENT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Gather",
                     "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "Elu")


def _recurrent_feeders(graph: gs.Graph) -> set[int]:
    """Data-movement nodes (an embedding Gather, the batch-first Transpose, the activation before
    them) whose outputs only reach recurrent layers through other such nodes. Converting them gains
    little (a Cast back follows), and TensorRT-RTX fails to build a Cast that reaches an LSTM/GRU
    through data movement only (Gather/Relu -> Cast -> Transpose -> GRU: Myelin reshape error)."""
    marked: set[int] = set()
    for node in reversed(graph.nodes):  # graph.nodes is topologically sorted: readers come later
        readers = [r for t in node.outputs for r in t.outputs]
        data = [r for r in readers if r.op not in ("Shape", "Size")]  # Shape/Size are dtype-blind
        if node.op in DATA_MOVEMENT_OPS and readers and all(r.op in RECURRENT_OPS or id(r) in marked for r in data):
            marked.add(id(node))
    return marked


def _int8_region(graph: gs.Graph) -> set[int]:
    """Nodes that read a DequantizeLinear output or from which a QuantizeLinear is reachable."""
    region: set[int] = set()
    stack = [t.inputs[0] for n in graph.nodes if n.op == "QuantizeLinear" for t in n.inputs[:1] if len(t.inputs) == 1]
    while stack:
        node = stack.pop()
        if id(node) in region or node.op in ("QuantizeLinear", "DequantizeLinear"):
            continue
        region.add(id(node))
        stack.extend(t.inputs[0] for t in node.inputs if len(t.inputs) == 1)
    for node in graph.nodes:
        if any(len(t.inputs) == 1 and t.inputs[0].op == "DequantizeLinear" for t in node.inputs):
            region.add(id(node))
    return region


def _produced_by(t: gs.Tensor, nodes: set[int]) -> bool:
    return len(t.inputs) == 1 and id(t.inputs[0]) in nodes


class _Casts:
    """Shares one Cast per (tensor, type) and one low-precision copy per constant."""

    def __init__(self, graph: gs.Graph, label: str):
        self.graph = graph
        self.label = label
        self.cache: dict[tuple[int, str], gs.Tensor] = {}
        self.count = 0

    def cast(self, t: gs.Tensor, dtype) -> gs.Variable:
        key = (id(t), np.dtype(dtype).name)
        if key not in self.cache:
            out = gs.Variable(unique_name(self.graph, f"{t.name}_{np.dtype(dtype).name}"), dtype=dtype, shape=t.shape)
            to = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            self.graph.nodes.append(gs.Node("Cast", unique_name(self.graph, f"{t.name}_Cast"), {"to": to}, [t], [out]))
            self.cache[key] = out
            self.count += 1
        return self.cache[key]

    def constant(self, t: gs.Constant, dtype) -> gs.Constant:
        key = (id(t), f"const_{np.dtype(dtype).name}")
        if key not in self.cache:
            values = np.asarray(t.values).astype(dtype)
            self.cache[key] = gs.Constant(unique_name(self.graph, f"{t.name}_{self.label}"), values)
        return self.cache[key]


def _cast_graph_output(graph: gs.Graph, t: gs.Tensor, dtype, label: str) -> None:
    """Keep a graph output float32: the low-precision value gets a new name, a Cast writes the output."""
    internal = gs.Variable(unique_name(graph, f"{t.name}_{label}"), dtype=dtype, shape=t.shape)
    producer = t.inputs[0]
    producer.outputs[producer.outputs.index(t)] = internal
    for reader in list(t.outputs):
        for i, inp in enumerate(reader.inputs):
            if inp is t:
                reader.inputs[i] = internal
    t.dtype = np.float32
    graph.nodes.append(gs.Node("Cast", unique_name(graph, f"{t.name}_Cast"), {"to": 1}, [internal], [t]))


def _activation_ranges(graph: gs.Graph, ctx: PassContext, tensors: list[str]) -> dict[str, float]:
    """Largest |value| of each tensor on the calibration data, or on the verification inputs."""
    if not tensors:
        return {}
    try:
        from passes.quant_search import observe_amax

        return observe_amax(graph, tensors, ctx)
    except Exception as exc:  # a model ONNX Runtime cannot run: fall back to static rules only
        log.warning("could not measure activation ranges for FP16 (%s); using static rules only", exc)
        return {}
