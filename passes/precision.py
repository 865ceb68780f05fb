"""FP16 conversion with float32 kept where FP16 is unsafe."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult, Tolerance
from optimizer.pass_base import register_pass
from passes.graph_utils import constant_values, infer_tensor_types, is_default_domain, is_graph_output, unique_name

log = logging.getLogger(__name__)

FP16_MAX = 65504.0

#: Ops that run in FP16, with the input positions that carry the floating-point data (None: every
#: float input). Everything else (reductions, normalizations, Pow/Exp/Log, Q/DQ, control flow,
#: custom ops ...) stays in float32, with Casts at the boundary.
FP16_OPS: dict[str, tuple[int, ...] | None] = {
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


def _float_inputs(node: gs.Node, spec: tuple[int, ...] | None) -> list[int]:
    indices = range(len(node.inputs)) if spec is None else [i for i in spec if i < len(node.inputs)]
    return [i for i in indices if node.inputs[i].name]


@register_pass
@dataclass
class ConvertFp16(Pass):
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
    lossy = True
    uses_calibration = True
    precision_flag = "fp16"
    # Scale-free: FP16 rounding grows with the logits' magnitude, so an absolute bound would reject
    # correct conversions of deep networks (and accept broken ones of shallow ones).
    tolerance = Tolerance(rtol=float("inf"), atol=float("inf"), min_cosine=0.999)

    max_activation: float = 512.0
    keep_io_types: bool = True
    keep_ops: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_FP32))
    exclude: list[str] = field(default_factory=list)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        info = infer_tensor_types(graph)

        def dtype_of(t: gs.Tensor):
            if isinstance(t, gs.Constant):
                return np.asarray(t.values).dtype
            if t.dtype is not None:
                return np.dtype(t.dtype)
            return info.get(t.name, (None, None))[1]

        amax = _activation_ranges(graph, ctx, [t.name for n in graph.nodes for t in n.outputs if dtype_of(t) == np.float32])
        keep = set(self.keep_ops)
        reasons: dict[str, int] = {}
        int8_region = _int8_region(graph)
        feeds_recurrent = _recurrent_feeders(graph)

        def reason_fp32(node: gs.Node) -> str:
            if node.op in keep:
                return "kept_op"
            if not is_default_domain(node) or node.op not in FP16_OPS:
                return "op_not_fp16"
            if node.name in self.exclude:
                return "excluded"
            if id(node) in int8_region:
                return "int8_region"  # FP16 rounding upstream of a QuantizeLinear would shift INT8 steps
            for i in _float_inputs(node, FP16_OPS[node.op]):
                values = constant_values(node.inputs[i])
                if values is not None and values.dtype == np.float32 and values.size and np.abs(values).max() > FP16_MAX:
                    return "constant_out_of_range"
            for t in node.outputs:
                if amax.get(t.name, 0.0) > self.max_activation:
                    return "activation_out_of_range"
            if id(node) in feeds_recurrent:
                return "feeds_recurrent"
            return ""

        fp16_nodes: set[int] = set()
        for node in graph.nodes:
            why = reason_fp32(node)
            has_float = any(dtype_of(node.inputs[i]) == np.float32 for i in _float_inputs(node, FP16_OPS.get(node.op)))
            if why:
                if has_float or any(dtype_of(t) == np.float32 for t in node.outputs):
                    reasons[why] = reasons.get(why, 0) + 1
                continue
            if has_float:
                fp16_nodes.add(id(node))
        if not fp16_nodes:
            return PassResult(False, stats={"fp16_nodes": 0, **{f"fp32_{k}": v for k, v in reasons.items()}})

        casts = _Casts(graph)
        converted_constants = 0
        # 1. inputs of FP16 nodes: float32 data becomes float16 (constants converted, tensors cast)
        for node in graph.nodes:
            if id(node) not in fp16_nodes:
                continue
            for i in _float_inputs(node, FP16_OPS[node.op]):
                t = node.inputs[i]
                if dtype_of(t) != np.float32:
                    continue
                if isinstance(t, gs.Constant):
                    node.inputs[i] = casts.constant_fp16(t)
                    converted_constants += 1
                elif not _produced_by(t, fp16_nodes):
                    node.inputs[i] = casts.cast(t, np.float16)
        # 2. float outputs of FP16 nodes become float16; float32 readers get a Cast back
        for node in list(graph.nodes):
            if id(node) not in fp16_nodes:
                continue
            for t in node.outputs:
                if dtype_of(t) != np.float32:
                    continue
                t.dtype = np.float16
                for reader in list(t.outputs):
                    if id(reader) in fp16_nodes and any(reader.inputs[i] is t for i in _float_inputs(reader, FP16_OPS[reader.op])):
                        continue
                    back = casts.cast(t, np.float32)
                    for i, inp in enumerate(reader.inputs):
                        if inp is t:
                            reader.inputs[i] = back
                if is_graph_output(graph, t) and self.keep_io_types:
                    _cast_graph_output(graph, t)
        stats = {
            "fp16_nodes": len(fp16_nodes),
            "fp32_nodes": sum(reasons.values()),
            "casts_inserted": casts.count,
            "constants_converted": converted_constants,
            **{f"fp32_{k}": v for k, v in sorted(reasons.items())},
        }
        details = {"fp32_reasons": reasons, "max_activation": self.max_activation}
        return PassResult(True, stats=stats, details=details)


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
    """Shares one Cast per (tensor, type) and one FP16 copy per constant."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.cache: dict[tuple[int, str], gs.Tensor] = {}
        self.count = 0

    def cast(self, t: gs.Tensor, dtype) -> gs.Variable:
        key = (id(t), np.dtype(dtype).name)
        if key not in self.cache:
            out = gs.Variable(unique_name(self.graph, f"{t.name}_{np.dtype(dtype).name}"), dtype=dtype, shape=t.shape)
            to = 10 if np.dtype(dtype) == np.float16 else 1
            self.graph.nodes.append(gs.Node("Cast", unique_name(self.graph, f"{t.name}_Cast"), {"to": to}, [t], [out]))
            self.cache[key] = out
            self.count += 1
        return self.cache[key]

    def constant_fp16(self, t: gs.Constant) -> gs.Constant:
        key = (id(t), "const16")
        if key not in self.cache:
            values = np.asarray(t.values).astype(np.float16)
            self.cache[key] = gs.Constant(unique_name(self.graph, f"{t.name}_fp16"), values)
        return self.cache[key]


def _cast_graph_output(graph: gs.Graph, t: gs.Tensor) -> None:
    """Keep a graph output float32: the FP16 value gets a new name, a Cast writes the output."""
    internal = gs.Variable(unique_name(graph, f"{t.name}_fp16"), dtype=np.float16, shape=t.shape)
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
        from passes.quantization import observe_amax

        return observe_amax(graph, tensors, ctx)
    except Exception as exc:  # a model ONNX Runtime cannot run: fall back to static rules only
        log.warning("could not measure activation ranges for FP16 (%s); using static rules only", exc)
        return {}
