"""INT8 (and, through ``passes.quantize_fp8``, FP8) quantization with explicit Q/DQ nodes,
placed the way TensorRT fuses them.

The output is the form TensorRT 10/11 builds directly (strongly typed, explicit precision) and
ONNX Runtime runs on the CPU: weights stored as INT8 initializers behind ``DequantizeLinear``
(per output channel), activations wrapped in ``QuantizeLinear -> DequantizeLinear`` pairs (per
tensor, symmetric, zero point 0) with scales from calibration.

Placement is an op -> handler table (``HANDLERS``): each handler says which inputs of a node to
quantize. Everything without a handler stays in float, which is how LayerNormalization, Softmax,
Gelu and the attention score path keep their precision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult, Tolerance
from optimizer.pass_base import register_pass
from passes.bias_correction import apply_bias_correction, correction_targets, corrections_for, mean_tensors
from passes.graph_utils import constant_values, is_default_domain, unique_name
from passes.match import producer
from passes.quant_formats import INT8, QuantFormat, dequantize, quantize_weight
from passes.skips import Skips
from passes.graph_model import calibration_source, graph_model
from passes.quant_search import (
    AUTO_CANDIDATES,
    METHOD_CHOICES,
    Scoring,
    _set_scale,
    calibrate,
    score_model,
    select_method,
)

log = logging.getLogger(__name__)

__all__ = ["AUTO_CANDIDATES", "HANDLERS", "PlacementOptions", "QuantizeInt8", "find_sites", "quantize_weight"]
#: Calibration samples the bias correction's per-channel means are taken over (means converge fast).
BIAS_SAMPLES = 128


@dataclass
class QuantSite:
    """One node input to quantize: ``kind`` is "weight" (constant, per channel) or "activation"."""

    node: gs.Node
    index: int
    kind: Literal["weight", "activation"]
    axis: int | None = None  # per-channel axis for weights


@dataclass
class PlacementOptions:
    min_weight_elements: int
    quantize_pooling: bool
    quantize_residual: bool
    #: both inputs of MatMuls of two activations (attention's Q.K^T and P.V): FP8 only
    quantize_attention: bool = False
    #: ``(node, weight) -> reason or None``: a format's own rule for layers it cannot run (FP8)
    layer_filter: Callable[[gs.Node, np.ndarray], str | None] | None = None


def _weight_axis(node: gs.Node, weight: np.ndarray) -> int | None:
    """Axis of the output channels in the weight tensor (for per-channel scales)."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1 if int(node.attrs.get("group", 1)) == 1 else None  # grouped: per-tensor
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul":
        return weight.ndim - 1 if weight.ndim >= 2 else None
    return None


def _weighted(node: gs.Node, opts: PlacementOptions, skip: Callable[[str], None]) -> list[QuantSite]:
    """Conv/ConvTranspose/Gemm/MatMul: both inputs; the weight per output channel."""
    if len(node.inputs) < 2:
        return []
    weight = constant_values(node.inputs[1])
    if weight is None:
        if node.op == "MatMul" and opts.quantize_attention:
            return [QuantSite(node, 0, "activation"), QuantSite(node, 1, "activation")]
        if node.op == "MatMul":
            skip("matmul_without_constant_weight")  # attention scores, attn x V: kept in float
        else:
            skip("weight_not_constant")
        return []
    if weight.dtype != np.float32:
        skip("weight_not_float32")
        return []
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        skip("gemm_transA")
        return []
    if weight.size < opts.min_weight_elements:
        skip("tiny_layer")
        return []
    if constant_values(node.inputs[0]) is not None:
        skip("constant_input")
        return []
    reason = opts.layer_filter(node, weight) if opts.layer_filter is not None else None
    if reason is not None:
        skip(reason)
        return []
    return [QuantSite(node, 0, "activation"), QuantSite(node, 1, "weight", _weight_axis(node, weight))]


def _residual_add(node: gs.Node, opts: PlacementOptions, skip: Callable[[str], None]) -> list[QuantSite]:
    """Add(conv_out, residual): quantize the residual input so TensorRT can fuse Conv+Add."""
    if not opts.quantize_residual or len(node.inputs) != 2:
        return []
    if any(constant_values(t) is not None for t in node.inputs):
        return []
    producers = [producer(t) for t in node.inputs]
    conv_side = [i for i, p in enumerate(producers) if p is not None and p.op == "Conv" and is_default_domain(p)]
    if not conv_side:
        return []
    other = 1 - conv_side[0]
    return [QuantSite(node, other, "activation")]


def _pooling(node: gs.Node, opts: PlacementOptions, skip: Callable[[str], None]) -> list[QuantSite]:
    """AveragePool/GlobalAveragePool do not commute with quantization: optional Q/DQ on the input."""
    return [QuantSite(node, 0, "activation")] if opts.quantize_pooling else []


#: op type -> handler returning the inputs to quantize. MaxPool, Relu, Reshape, Transpose, Concat
#: ... have no handler: TensorRT propagates Q/DQ through them. LayerNormalization, Softmax, Gelu
#: and MatMuls without constant weights have none either, so they stay in float.
HANDLERS: dict[str, Callable[[gs.Node, PlacementOptions, Callable[[str], None]], list[QuantSite]]] = {
    "Conv": _weighted,
    "ConvTranspose": _weighted,
    "Gemm": _weighted,
    "MatMul": _weighted,
    "Add": _residual_add,
    "AveragePool": _pooling,
    "GlobalAveragePool": _pooling,
}


def find_sites(graph: gs.Graph, opts: PlacementOptions,
               reasons: dict[str, str] | None = None) -> tuple[list[QuantSite], Skips]:
    """Walk the main graph with the handler table; subgraph bodies are left in float.
    ``reasons`` (when given) receives, per node left in float by a handler, the reason."""
    skipped = Skips()
    node_name = ""  # the node the handlers are looking at (read by skip)

    def skip(reason: str) -> None:
        skipped.add(reason)
        if reasons is not None and node_name:
            reasons[node_name] = reason

    sites: list[QuantSite] = []
    for node in graph.nodes:
        handler = HANDLERS.get(node.op)
        if handler is None or not is_default_domain(node):
            continue
        node_name = node.name
        if any(p is not None and p.op in ("QuantizeLinear", "DequantizeLinear") for p in map(producer, node.inputs)):
            skip("already_quantized")
            continue
        sites.extend(handler(node, opts, skip))
    with_bodies = sum(1 for node in graph.nodes if any(True for _ in node.subgraphs()))
    if with_bodies:
        skipped.add("subgraphs_left_in_float", with_bodies)
    return sites, skipped


@register_pass
@dataclass(frozen=True)
class QuantizeInt8(Pass):
    """Insert INT8 Q/DQ nodes following TensorRT's placement recommendations::

        x -> Conv(W) -> y
        becomes
        x -> QuantizeLinear(s_x) -> DequantizeLinear(s_x) -> Conv(DequantizeLinear(W_int8, s_w, axis=0)) -> y

    - Conv, ConvTranspose, Gemm, MatMul with a constant weight: the activation input per tensor
      (scale from calibration), the weight per output channel (axis 0 for Conv, 1 for
      ConvTranspose and for Gemm/MatMul [K,N] weights), symmetric, zero point 0, stored as INT8.
      Outputs are not quantized. Below opset 13 (no per-channel DequantizeLinear) weights are
      quantized per tensor; below opset 10 (no Q/DQ ops) the pass does nothing.
    - Add with a Conv on one side (a residual block): the other input is quantized so TensorRT
      can fuse Conv+Add (option ``residual``).
    - AveragePool/GlobalAveragePool inputs only with ``pooling=true``.
    - Everything else stays float: MaxPool/Relu/Reshape/Transpose/Concat (TensorRT propagates
      Q/DQ through them; Concat inputs share the one Q/DQ on its output), LayerNormalization,
      Softmax, Gelu, and MatMuls of two activations (attention scores).
    - Tiny layers (weights with fewer than ``min_weight_elements`` values) stay float: Q/DQ costs
      more than INT8 saves there. If/Loop/Scan bodies are left in float.

    Calibration method (``method``): ``auto`` (the default) chooses end to end. Statistics are
    collected once (running min/max, the |x| histogram, a bounded sample); ranges are computed for
    every candidate -- minmax, percentile at 99.9/99.99/99.999, entropy (TensorRT's
    EntropyCalibrator2), mse, and per-tensor best SQNR (``sqnr``) -- and each candidate model is
    scored by its agreement with the float model (mean output SQNR in dB) on the verification
    samples (held out of the statistics when the calibration set is large enough, or ``--data``)
    by the task metric when one is given, else by the argmax agreement of the first output (the
    report's headline figure), ties broken by output SQNR; the best is kept and the table (method, score, time) is in the report's details. A fixed
    method (minmax, percentile, entropy, mse, sqnr) skips the selection.

    Options: ``method`` (auto, minmax, percentile, entropy, mse, sqnr), ``percentile`` (99.99, for
    ``method=percentile``), ``min_weight_elements`` (128), ``residual``
    (true), ``pooling`` (false), ``exclude`` (node names to keep in float; the mixed-precision
    search fills it), ``range_cache`` (a JSON file: ranges are read from it when it was made for
    this graph structure, else calibrated and written to it). Needs calibration data in the context (``--calib``); without it, synthetic
    data is used and the report says so.

    Verification: lossy; outputs must keep cosine similarity >= 0.98 with the original.
    """

    name = "quantize-int8"
    lossy = True
    uses_calibration = True
    calibrates_ranges = True
    tunable = "exclude"
    precision_flag = "int8"
    tolerance = Tolerance(rtol=float("inf"), atol=float("inf"), min_cosine=0.98, max_mismatch=0.05)

    method: str = "auto"
    percentile: float = 99.99
    min_weight_elements: int = 128
    residual: bool = True
    pooling: bool = False
    exclude: list[str] = field(default_factory=list)
    range_cache: str = ""
    bias_correction: str = "auto"

    #: the stored number format (``passes.quant_formats``)
    number_format: ClassVar[QuantFormat] = INT8
    #: the ``method`` values, and the (label, range method, percentile) candidates ``auto`` tries
    method_choices: ClassVar[tuple[str, ...]] = METHOD_CHOICES
    auto_candidates: ClassVar[tuple] = AUTO_CANDIDATES
    bias_correction_choices: ClassVar[tuple[str, ...]] = ("auto", "on", "off")

    def __post_init__(self):
        if self.bias_correction not in self.bias_correction_choices:
            raise self.option_error(f"bias_correction must be {' or '.join(self.bias_correction_choices)}; got {self.bias_correction!r}")
        if self.method not in self.method_choices:
            raise self.option_error(f"method must be one of {', '.join(self.method_choices)}; got {self.method!r}")

    def placement(self) -> PlacementOptions:
        return PlacementOptions(self.min_weight_elements, self.pooling, self.residual)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        fmt = self.number_format
        opset = int(graph.opset or ctx.opset or 0)
        if opset < fmt.min_opset:  # the opset whose QuantizeLinear/DequantizeLinear take this type
            return PassResult(False, skipped={f"opset_below_{fmt.min_opset}": 1})
        float_reasons: dict[str, str] = {}
        sites, skipped = find_sites(graph, self.placement(), float_reasons)
        if opset < fmt.per_channel_opset:  # no per-channel DequantizeLinear (axis) yet: per-tensor weights
            reason = f"per_tensor_weights_opset_below_{fmt.per_channel_opset}"
            for site in sites:
                if site.kind == "weight" and site.axis is not None:
                    site.axis = None
                    skipped.add(reason)
        excluded = set(self.exclude)
        if excluded:
            kept = [s for s in sites if s.node.name not in excluded]
            skipped.add("excluded", len({id(s.node) for s in sites if s.node.name in excluded}))
            float_reasons.update({s.node.name: "excluded" for s in sites if s.node.name in excluded})
            sites = kept
        if not sites:
            return PassResult(False, skipped=skipped)
        activations = sorted({s.node.inputs[s.index].name for s in sites if s.kind == "activation"})
        float_model = graph_model(graph) if (self.method == "auto" or self.bias_correction == "auto") else None
        scoring = Scoring(float_model, ctx) if float_model is not None else None  # reference outputs: once
        targets = correction_targets([s for s in sites if s.kind == "weight"]) if self.bias_correction != "off" else []
        candidates, calib_info = calibrate(graph, activations, ctx, self.method, self.percentile, self.range_cache,
                                           self.auto_candidates, fmt.qmax)
        ranges = next(iter(candidates.values()))
        details: dict = {"format": fmt.name, "calibration": calib_info, "tensors": {}, "weights": {}, "nodes": [], "layers": {},
                         "float_layers": float_reasons}
        qdq: dict[str, gs.Variable] = {}
        weights: dict[tuple[str, int | None], gs.Variable] = {}
        quantized_nodes: set[int] = set()
        for site in sites:
            tensor = site.node.inputs[site.index]
            layer = details["layers"].setdefault(site.node.name, {"op": site.node.op, "precision": fmt.name,
                                                                       "activations": [], "weight": None})
            if site.kind == "activation":
                layer["activations"].append(tensor.name)
            else:
                layer["weight"] = tensor.name
            if site.kind == "activation":
                if tensor.name not in ranges:
                    skipped.add("no_range")
                    continue
                if tensor.name not in qdq:
                    qdq[tensor.name] = _insert_qdq(graph, tensor, ranges[tensor.name]["scale"], fmt)
                    details["tensors"][tensor.name] = ranges[tensor.name]
                site.node.inputs[site.index] = qdq[tensor.name]
            else:
                key = (tensor.name, site.axis)
                if key not in weights:
                    weights[key], info = _dequantized_weight(graph, tensor, site.axis, fmt)
                    details["weights"][tensor.name] = info
                site.node.inputs[site.index] = weights[key]
            if id(site.node) not in quantized_nodes:
                quantized_nodes.add(id(site.node))
                details["nodes"].append(site.node.name)
        if len(candidates) > 1 and qdq:
            chosen, table, scored_on = select_method(graph, scoring, qdq, candidates)
            ranges = candidates[chosen]
            for name in details["tensors"]:
                details["tensors"][name] = ranges[name]
                _set_scale(qdq[name], ranges[name]["scale"])
            details["method_selection"] = {"chosen": chosen, "candidates": table, "scored_on": scored_on}
            calib_info["method"] = f"auto: {chosen}"
            if self.range_cache and not calib_info.get("synthetic"):  # the chosen ranges, for reuse
                from calibration.cache import save_ranges
                from calibration.ranges import TensorRange

                save_ranges(self.range_cache, [TensorRange(n, v["amax"], v["method"], v["sqnr_db"])
                                               for n, v in ranges.items()], float_model)
        if targets and not calib_info.get("synthetic"):
            # With several candidates, the corrected model's best method may differ from the
            # uncorrected one's: the (method, correction) pair is chosen jointly.
            reselect = (lambda: select_method(graph, scoring, qdq, candidates)) if len(candidates) > 1 and qdq else None
            correction = self._correct_biases(graph, targets, float_model, scoring, ctx, skipped, reselect)
            details["bias_correction"] = correction
            if correction.get("chosen") and correction["chosen"] != details["method_selection"]["chosen"]:
                chosen = correction["chosen"]
                ranges = candidates[chosen]
                for name in details["tensors"]:
                    details["tensors"][name] = ranges[name]
                    _set_scale(qdq[name], ranges[name]["scale"])
                details["method_selection"]["chosen"] = chosen
                calib_info["method"] = f"auto: {chosen} (with bias correction)"
        stats = {
            "quantized_nodes": len(quantized_nodes),
            "quantized_activations": len(qdq),
            "quantized_weights": len(weights),
        }
        return PassResult(changed=bool(quantized_nodes), stats=stats, skipped=skipped, details=details)


    def _correct_biases(self, graph: gs.Graph, targets, float_model, scoring, ctx: PassContext, skipped: Skips,
                        reselect=None) -> dict:
        """Fold the mean shift weight quantization causes into the biases (``passes.bias_correction``);
        with ``bias_correction=auto`` keep it only if it scores better on the scoring samples --
        with ``reselect``, the corrected model's best calibration candidate against the uncorrected
        model's (``info["chosen"]`` names the candidate when the correction is kept)."""
        from calibration.collect import collect_channel_means

        axes = mean_tensors(targets)
        model = float_model if float_model is not None else graph_model(graph)
        source = calibration_source(model, ctx, ctx.calibration)
        means = collect_channel_means(model, axes, source, ctx.calib_batch_size, max_samples=BIAS_SAMPLES).means
        corrections = corrections_for(targets, means, skipped, axes)
        if not corrections:
            return {"applied": 0, "kept": False}
        # apply_bias_correction may swap a node's bias for a new Constant or give a Constant only
        # that node reads a new array: keep both, to undo exactly
        saved = [(node, list(node.inputs)) for node in graph.nodes]
        saved_values = [(t, t.values) for _, inputs in saved for t in inputs if isinstance(t, gs.Constant)]
        before = score_model(graph_model(graph), scoring) if self.bias_correction == "auto" else None
        applied = apply_bias_correction(graph, corrections, skipped)
        info = {"applied": applied, "kept": True, "mode": self.bias_correction}
        if before is not None and applied:
            if reselect is not None:
                chosen, table, _ = reselect()
                row = next(r for r in table if r["method"] == chosen)
                after = (row["score"], row["sqnr_db"])
                before = (round(before[0], 3), round(before[1], 3))  # the table's rounding
                info.update(chosen=chosen, candidates_on=table)
            else:
                after = score_model(graph_model(graph), scoring)
            info.update(score_off=round(before[0], 3), score_on=round(after[0], 3),
                        sqnr_off=round(before[1], 3), sqnr_on=round(after[1], 3))
            if after <= before:  # no measurable gain: undo
                for node, inputs in saved:
                    node.inputs = inputs
                for constant, values in saved_values:
                    constant.values = values
                info["kept"] = False
                info.pop("chosen", None)
        return info


def _insert_qdq(graph: gs.Graph, tensor: gs.Tensor, scale: float, fmt: QuantFormat) -> gs.Variable:
    base = tensor.name
    scale = max(float(scale), 1e-12)  # an all-zero tensor still needs a positive scale
    s = gs.Constant(unique_name(graph, f"{base}_scale"), np.asarray(scale, np.float32))
    zp = gs.Constant(unique_name(graph, f"{base}_zero_point"), fmt.zero_point())
    q_out = gs.Variable(unique_name(graph, f"{base}_quantized"), dtype=fmt.storage, shape=tensor.shape)
    dq_out = gs.Variable(unique_name(graph, f"{base}_dequantized"), dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", unique_name(graph, f"{base}_QuantizeLinear"), inputs=[tensor, s, zp], outputs=[q_out]))
    graph.nodes.append(gs.Node("DequantizeLinear", unique_name(graph, f"{base}_DequantizeLinear"), inputs=[q_out, s, zp], outputs=[dq_out]))
    return dq_out


def _dequantized_weight(graph: gs.Graph, tensor: gs.Tensor, axis: int | None, fmt: QuantFormat) -> tuple[gs.Variable, dict]:
    weight = constant_values(tensor)
    q, scale = quantize_weight(weight, axis, fmt)
    base = tensor.name
    q_const = gs.Constant(unique_name(graph, f"{base}_{fmt.name}"), q)
    s_const = gs.Constant(unique_name(graph, f"{base}_scale"), scale)
    out = gs.Variable(unique_name(graph, f"{base}_dequantized"), dtype=np.float32, shape=list(weight.shape))
    attrs = {"axis": axis} if axis is not None else {}
    # No zero point: it defaults to 0 of the input's type (int8, float8e4m3fn), saving an initializer.
    graph.nodes.append(gs.Node("DequantizeLinear", unique_name(graph, f"{base}_DequantizeLinear"), attrs=attrs, inputs=[q_const, s_const], outputs=[out]))
    restored = dequantize(q, scale, axis)
    err = weight.astype(np.float64) - restored
    signal = float(np.sum(weight.astype(np.float64) ** 2))
    noise = float(np.sum(err**2))
    sqnr = 10 * np.log10(signal / noise) if noise > 0 and signal > 0 else float("inf")
    info = {"axis": axis, "channels": int(scale.size), "sqnr_db": round(float(sqnr), 2)}
    return out, info


