"""What precision each layer of the written model runs in, why, and the bytes stored per type.

Read from the final model itself (so it is true whatever the passes did): a Conv, ConvTranspose,
Gemm or MatMul is ``int8``/``fp8`` when its activation comes through a DequantizeLinear of that
type, ``int4-weights`` when only its weight is an INT4 block-quantized DequantizeLinear, and
otherwise the float type it computes in (``fp16``, ``bf16``, ``fp32``). The reason a layer stayed in
float comes from the quantization passes' records (``details["float_layers"]``).
"""

from __future__ import annotations

from collections import Counter

import onnx
from onnx import TensorProto

from optimizer.events import skip_reasons
from optimizer.stats import stored_tensors, tensor_elements_and_bytes

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TYPE_NAMES = {
    TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16",
    TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.FLOAT8E4M3FN: "fp8",
    TensorProto.INT4: "int4", TensorProto.UINT4: "uint4", TensorProto.DOUBLE: "fp64",
    TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.BOOL: "bool",
}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {t.name: t.data_type for t in model.graph.initializer}
    for v in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if v.type.HasField("tensor_type"):
            types.setdefault(v.name, v.type.tensor_type.elem_type)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            types[node.output[0]] = node.attribute[0].t.data_type
        elif node.op_type == "Cast":
            types[node.output[0]] = next(a.i for a in node.attribute if a.name == "to")
    return types


def precision_summary(model: onnx.ModelProto, records=()) -> dict:
    """``{"layers": [{node, op, precision, why}], "counts": {precision: n}, "bytes": {type: n}}``."""
    from passes.inference_model import without_weights

    try:  # the weights' data is not needed for types: do not serialize it into inference
        inferred = onnx.shape_inference.infer_shapes(without_weights(model), strict_mode=False)
    except Exception:  # types are a report nicety: fall back to what the model declares
        inferred = model
    types = _elem_types(inferred)
    producers = {o: n for n in model.graph.node for o in n.output}
    reasons: dict[str, str] = {}
    for record in records:
        if not getattr(record, "rolled_back", False):
            reasons.update((record.details or {}).get("float_layers", {}))

    def dq_type(name: str) -> int | None:
        node = producers.get(name)
        return types.get(node.input[0]) if node is not None and node.op_type == "DequantizeLinear" else None

    layers = []
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        act, weight = dq_type(node.input[0]), dq_type(node.input[1])
        if act is not None:
            precision = TYPE_NAMES.get(act, str(act))
        elif weight in (TensorProto.INT4, TensorProto.UINT4):
            precision = "int4-weights"
        else:
            precision = TYPE_NAMES.get(types.get(node.output[0], 0), "unknown")
        why = "quantized" if act is not None or weight is not None else reasons.get(node.name, "")
        layers.append({"node": node.name, "op": node.op_type, "precision": precision, "why": why})
    stored: Counter = Counter()
    for t in stored_tensors(model):
        stored[TYPE_NAMES.get(t.data_type, str(t.data_type))] += tensor_elements_and_bytes(t)[1]
    return {"layers": layers, "counts": dict(Counter(layer["precision"] for layer in layers)),
            "bytes": dict(sorted(stored.items(), key=lambda kv: -kv[1]))}


def precision_warnings(records) -> list[str]:
    """One line per precision pass (``precision_flag``) that ran but changed nothing, with the
    reasons it counted, so that ``--fp8`` on a model it cannot touch does not pass silently."""
    from optimizer.errors import PipelineError
    from optimizer.registry import get_pass_class

    lines = []
    for record in records:
        try:
            cls = get_pass_class(record.name)  # loaded already: the pass ran
        except PipelineError:  # a pass registered for one run only
            cls = None
        flag = getattr(cls, "precision_flag", None)
        if not flag or record.changed or record.rolled_back:  # rolled back passes are reported as such
            continue
        reasons = ", ".join(f"{k} ({v})" for k, v in skip_reasons(record.stats).items())
        lines.append(f"{record.name} (--{flag}) changed nothing" + (f": {reasons}" if reasons else ""))
    return lines
