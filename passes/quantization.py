"""INT8 quantization with explicit Q/DQ nodes, placed the way TensorRT fuses them.

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
from typing import Callable, Literal

import numpy as np
import onnx_graphsurgeon as gs

from calibration.sources import batch_len
from optimizer.errors import InputError
from optimizer.pass_base import Pass, PassContext, PassResult, Tolerance
from optimizer.pass_base import register_pass
from passes.graph_utils import constant_values, is_default_domain, unique_name
from passes.match import producer

log = logging.getLogger(__name__)

INT8_MAX = 127
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


def quantize_weight(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8: per-channel (``axis``) or per-tensor scales; returns (int8 values, scales)."""
    w = weight.astype(np.float64)
    if axis is None:
        amax = np.asarray(np.abs(w).max())
        scale_b = np.maximum(amax, 1e-12) / INT8_MAX
        scale = np.asarray(scale_b, np.float32)
    else:
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=reduce_axes)
        scale = (np.maximum(amax, 1e-12) / INT8_MAX).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        scale_b = scale.astype(np.float64).reshape(shape)
    q = np.clip(np.round(w / scale_b), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def find_sites(graph: gs.Graph, opts: PlacementOptions) -> tuple[list[QuantSite], dict[str, int]]:
    """Walk the main graph with the handler table; subgraph bodies are left in float."""
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    sites: list[QuantSite] = []
    for node in graph.nodes:
        handler = HANDLERS.get(node.op)
        if handler is None or not is_default_domain(node):
            continue
        if any(p is not None and p.op in ("QuantizeLinear", "DequantizeLinear") for p in map(producer, node.inputs)):
            skip("already_quantized")
            continue
        sites.extend(handler(node, opts, skip))
    with_bodies = sum(1 for node in graph.nodes if any(True for _ in node.subgraphs()))
    if with_bodies:
        skipped["subgraphs_left_in_float"] = with_bodies
    return sites, skipped


@register_pass
@dataclass
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

    def __post_init__(self):
        if self.bias_correction not in ("auto", "on", "off"):
            raise ValueError(f"bias_correction must be auto, on or off; got {self.bias_correction!r}")
        if self.method not in METHOD_CHOICES:
            raise ValueError(f"method must be one of {', '.join(METHOD_CHOICES)}; got {self.method!r}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opset = int(graph.opset or ctx.opset or 0)
        if opset < 10:  # QuantizeLinear/DequantizeLinear exist from opset 10
            return PassResult(False, stats={"skipped_opset_below_10": 1})
        opts = PlacementOptions(self.min_weight_elements, self.pooling, self.residual)
        sites, skipped = find_sites(graph, opts)
        if opset < 13:  # per-channel DequantizeLinear (axis) exists from opset 13: per-tensor weights
            for site in sites:
                if site.kind == "weight" and site.axis is not None:
                    site.axis = None
                    skipped["per_tensor_weights_opset_below_13"] = skipped.get("per_tensor_weights_opset_below_13", 0) + 1
        excluded = set(self.exclude)
        if excluded:
            kept = [s for s in sites if s.node.name not in excluded]
            skipped["excluded"] = len({id(s.node) for s in sites if s.node.name in excluded})
            sites = kept
        if not sites:
            return PassResult(False, stats={f"skipped_{k}": v for k, v in skipped.items()})
        activations = sorted({s.node.inputs[s.index].name for s in sites if s.kind == "activation"})
        float_model = _graph_model(graph) if (self.method == "auto" or self.bias_correction == "auto") else None
        from passes.bias_correction import correction_targets  # it imports quantize_weight from here

        targets = correction_targets([s for s in sites if s.kind == "weight"]) if self.bias_correction != "off" else []
        candidates, calib_info = calibrate(graph, activations, ctx, self.method, self.percentile, self.range_cache)
        ranges = next(iter(candidates.values()))
        details: dict = {"calibration": calib_info, "tensors": {}, "weights": {}, "nodes": [], "layers": {}}
        qdq: dict[str, gs.Variable] = {}
        weights: dict[tuple[str, int | None], gs.Variable] = {}
        quantized_nodes: set[int] = set()
        for site in sites:
            tensor = site.node.inputs[site.index]
            layer = details["layers"].setdefault(site.node.name, {"op": site.node.op, "activations": [], "weight": None})
            if site.kind == "activation":
                layer["activations"].append(tensor.name)
            else:
                layer["weight"] = tensor.name
            if site.kind == "activation":
                if tensor.name not in ranges:
                    skipped["no_range"] = skipped.get("no_range", 0) + 1
                    continue
                if tensor.name not in qdq:
                    qdq[tensor.name] = _insert_qdq(graph, tensor, ranges[tensor.name]["scale"])
                    details["tensors"][tensor.name] = ranges[tensor.name]
                site.node.inputs[site.index] = qdq[tensor.name]
            else:
                key = (tensor.name, site.axis)
                if key not in weights:
                    weights[key], info = _dequantized_weight(graph, tensor, site.axis)
                    details["weights"][tensor.name] = info
                site.node.inputs[site.index] = weights[key]
            if id(site.node) not in quantized_nodes:
                quantized_nodes.add(id(site.node))
                details["nodes"].append(site.node.name)
        if len(candidates) > 1 and qdq:
            chosen, table, scored_on = select_method(graph, float_model, qdq, candidates, ctx)
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
            reselect = (lambda: select_method(graph, float_model, qdq, candidates, ctx)) if len(candidates) > 1 and qdq else None
            correction = self._correct_biases(graph, targets, float_model, ctx, skipped, reselect)
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
            **{f"skipped_{k}": v for k, v in sorted(skipped.items())},
        }
        return PassResult(changed=bool(quantized_nodes), stats=stats, details=details)


    def _correct_biases(self, graph: gs.Graph, targets, float_model, ctx: PassContext, skipped: dict,
                        reselect=None) -> dict:
        """Fold the mean shift weight quantization causes into the biases (``passes.bias_correction``);
        with ``bias_correction=auto`` keep it only if it scores better on the scoring samples --
        with ``reselect``, the corrected model's best calibration candidate against the uncorrected
        model's (``info["chosen"]`` names the candidate when the correction is kept)."""
        from calibration.collect import collect_channel_means
        from passes.bias_correction import apply_bias_correction, corrections_for, mean_tensors

        axes = mean_tensors(targets)
        model = float_model if float_model is not None else _graph_model(graph)
        source = _source_for(model, ctx, ctx.calibration)
        means = collect_channel_means(model, axes, source, max_samples=BIAS_SAMPLES).means
        corrections = corrections_for(targets, means, skipped, axes)
        if not corrections:
            return {"applied": 0, "kept": False}
        # apply_bias_correction may swap a node's bias for a new Constant or give a Constant only
        # that node reads a new array: keep both, to undo exactly
        saved = [(node, list(node.inputs)) for node in graph.nodes]
        saved_values = [(t, t.values) for _, inputs in saved for t in inputs if isinstance(t, gs.Constant)]
        before = score_model(_graph_model(graph), float_model, ctx) if self.bias_correction == "auto" else None
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
                after = score_model(_graph_model(graph), float_model, ctx)
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


def score_model(model, float_model, ctx: PassContext) -> tuple[float, float]:
    """``(score, output SQNR in dB)`` of ``model`` against ``float_model`` on the scoring samples:
    the task metric when given, else the argmax agreement of the first output (else the SQNR)."""
    from optimizer.metrics import compare_batches
    from optimizer.runtime import OrtRunner

    batches, _ = _scoring_batches(ctx, float_model)
    reference = [OrtRunner(float_model).run(b) for b in batches]
    runner = OrtRunner(model)
    outputs = [runner.run(b) for b in batches]
    return _score(compare_batches(reference, outputs), outputs, reference, batches, ctx)[:2]


def _score(metrics, outputs, reference, batches, ctx: PassContext) -> tuple[float, float, str]:
    metrics = [m for m in metrics if m.cosine is not None]
    sqnr = float(np.mean([_balanced(m) for m in metrics])) if metrics else 0.0
    score = _metric_score(ctx.metric, outputs, reference, batches) if ctx.metric is not None else None
    if score is not None:
        return score, sqnr, "metric"
    # no metric, or one that needs labels (the scoring samples have none): the report's headline
    # agreement (argmax of the first output), ties broken by SQNR
    first = metrics[0] if metrics else None
    if first is not None and first.argmax_agreement is not None:
        return 100.0 * first.argmax_agreement, sqnr, "argmax_agreement"
    return sqnr, sqnr, "sqnr_db"


def _balanced(m) -> float:
    """The output's scale-balanced SQNR (per slice of axis 1), else its plain SQNR."""
    return m.balanced_sqnr_db if m.balanced_sqnr_db is not None else m.sqnr_db


def _insert_qdq(graph: gs.Graph, tensor: gs.Tensor, scale: float) -> gs.Variable:
    base = tensor.name
    scale = max(float(scale), 1e-12)  # an all-zero tensor still needs a positive scale
    s = gs.Constant(unique_name(graph, f"{base}_scale"), np.asarray(scale, np.float32))
    zp = gs.Constant(unique_name(graph, f"{base}_zero_point"), np.asarray(0, np.int8))
    q_out = gs.Variable(unique_name(graph, f"{base}_quantized"), dtype=np.int8, shape=tensor.shape)
    dq_out = gs.Variable(unique_name(graph, f"{base}_dequantized"), dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", unique_name(graph, f"{base}_QuantizeLinear"), inputs=[tensor, s, zp], outputs=[q_out]))
    graph.nodes.append(gs.Node("DequantizeLinear", unique_name(graph, f"{base}_DequantizeLinear"), inputs=[q_out, s, zp], outputs=[dq_out]))
    return dq_out


def _dequantized_weight(graph: gs.Graph, tensor: gs.Tensor, axis: int | None) -> tuple[gs.Variable, dict]:
    weight = constant_values(tensor)
    q, scale = quantize_weight(weight, axis)
    base = tensor.name
    q_const = gs.Constant(unique_name(graph, f"{base}_int8"), q)
    s_const = gs.Constant(unique_name(graph, f"{base}_scale"), scale)
    out = gs.Variable(unique_name(graph, f"{base}_dequantized"), dtype=np.float32, shape=list(weight.shape))
    attrs = {"axis": axis} if axis is not None else {}
    # No zero point: it defaults to 0 of the input's type (int8), saving an initializer.
    graph.nodes.append(gs.Node("DequantizeLinear", unique_name(graph, f"{base}_DequantizeLinear"), attrs=attrs, inputs=[q_const, s_const], outputs=[out]))
    restored = q.astype(np.float64) * (scale.reshape([-1 if i == axis else 1 for i in range(weight.ndim)]) if axis is not None else scale)
    err = weight.astype(np.float64) - restored
    signal = float(np.sum(weight.astype(np.float64) ** 2))
    noise = float(np.sum(err**2))
    sqnr = 10 * np.log10(signal / noise) if noise > 0 and signal > 0 else float("inf")
    info = {"axis": axis, "channels": int(scale.size), "sqnr_db": round(float(sqnr), 2)}
    return out, info


#: ``method`` values of ``quantize-int8``; ``auto`` selects among ``AUTO_CANDIDATES`` end to end.
METHOD_CHOICES = ("auto", "minmax", "percentile", "entropy", "mse", "sqnr")
#: (label, range method, percentile) tried by ``method=auto``, in order (the first wins ties).
AUTO_CANDIDATES = (
    ("minmax", "minmax", None),
    ("percentile-99.9", "percentile", 99.9),
    ("percentile-99.99", "percentile", 99.99),
    ("percentile-99.999", "percentile", 99.999),
    ("entropy", "entropy", None),
    ("mse", "mse", None),
    ("sqnr", "sqnr", None),
)


def calibrate(graph: gs.Graph, tensors: list[str], ctx: PassContext, method: str, percentile: float, cache: str = ""):
    """Ranges for ``tensors`` on the context's calibration data (synthetic if none), or from a
    JSON range cache made for this graph structure.

    Returns ``({candidate label: {name: {"amax", "scale", "method", "sqnr_db"}}}, info)``: one
    candidate for a fixed method or a cache, every ``AUTO_CANDIDATES`` entry for ``auto`` --
    from one collection of statistics.
    """
    from pathlib import Path

    from calibration import collect
    from calibration import ranges as range_methods
    from calibration.cache import load_ranges, save_ranges

    model = _graph_model(graph)
    if cache and Path(cache).is_file():
        cached = load_ranges(cache, model)  # refuses a cache made for another graph structure
        if all(t in cached for t in tensors):
            result = {t: {"amax": float(cached[t].amax), "scale": float(cached[t].scale), "method": cached[t].method,
                          "sqnr_db": _round(cached[t].sqnr_db)} for t in tensors}
            info = {"source": f"range cache {cache}", "synthetic": False, "samples": 0, "method": "cache", "skipped": {}}
            return {"cache": result}, info
    source = _source_for(model, ctx, ctx.calibration)
    stats = collect.collect_statistics(model, tensors, source, progress=ctx.progress)
    plan = AUTO_CANDIDATES if method == "auto" else ((method, method, percentile),)
    candidates: dict[str, dict] = {}
    for label, range_method, pct in plan:
        result = {}
        for name, st in stats.items():
            r = range_methods.compute_range(st, range_method, percentile=pct if pct is not None else percentile)
            result[name] = {"amax": float(r.amax), "scale": float(r.scale), "method": label, "sqnr_db": _round(r.sqnr_db)}
        candidates[label] = result
    if cache and not stats.synthetic and method != "auto":
        save_ranges(cache, [range_methods.TensorRange(n, v["amax"], v["method"], v["sqnr_db"])
                            for n, v in candidates[method].items()], model)
    info = {
        "source": stats.source,
        "synthetic": bool(stats.synthetic),
        "samples": int(stats.samples),
        "method": method,
        "skipped": dict(stats.skipped),
    }
    missing = [t for t in tensors if t not in stats]
    if missing:
        log.info("no calibration statistics for %d tensor(s): %s", len(missing), ", ".join(missing[:5]))
    if not stats and tensors:
        raise InputError("calibration produced no ranges; check the calibration data")
    return candidates, info


def select_method(graph: gs.Graph, float_model, qdq: dict[str, gs.Variable], candidates: dict[str, dict], ctx: PassContext):
    """Score every candidate's scales end to end: the quantized model (scales swapped in) against
    the float model, mean output SQNR in dB, on the verification samples. Returns
    ``(chosen label, table, description of the samples)``."""
    import time

    import onnx
    from onnx import numpy_helper

    from optimizer.metrics import compare_batches
    from optimizer.runtime import OrtRunner

    batches, scored_on = _scoring_batches(ctx, float_model)
    reference = [OrtRunner(float_model).run(b) for b in batches]
    quantized = _graph_model(graph)
    scale_names = {name: _scale_constant(dq).name for name, dq in qdq.items()}
    index = {init.name: i for i, init in enumerate(quantized.graph.initializer)}
    table = []
    for label, ranges in candidates.items():
        start = time.perf_counter()
        model = onnx.ModelProto()
        model.CopyFrom(quantized)
        for tensor, init_name in scale_names.items():
            scale = np.asarray(max(float(ranges[tensor]["scale"]), 1e-12), np.float32)
            model.graph.initializer[index[init_name]].CopyFrom(numpy_helper.from_array(scale, init_name))
        runner = OrtRunner(model)
        outputs = [runner.run(b) for b in batches]
        metrics = [m for m in compare_batches(reference, outputs) if m.cosine is not None]
        score, sqnr, kind = _score(metrics, outputs, reference, batches, ctx)
        table.append({"method": label, "score": round(score, 3), "score_kind": kind, "sqnr_db": round(sqnr, 3),
                      "cosine": round(min((m.cosine for m in metrics), default=1.0), 6),
                      "time_s": round(time.perf_counter() - start, 4)})
    best = max(table, key=lambda row: (row["score"], row["sqnr_db"]))  # ties: output SQNR, then the earliest
    return best["method"], table, scored_on


def _metric_score(metric, outputs: list[dict], reference: list[dict], batches: list[dict]) -> float | None:
    """The task metric over the scoring batches (sample-weighted), or None if it needs labels."""
    sizes = [batch_len(b) for b in batches]
    try:
        return float(np.average([metric(o, r, None) for o, r in zip(outputs, reference)], weights=sizes))
    except InputError:
        return None


def _scoring_batches(ctx: PassContext, float_model):
    """The scoring (else verification) batches in the current model's layout, else the first
    calibration batch."""
    from optimizer.runtime import input_specs

    if ctx.score_batches or ctx.verify_batches:
        adapt = ctx.feed_adapter or (lambda feeds: feeds)
        batches = [adapt(b) for b in (ctx.score_batches or ctx.verify_batches)]
        n = sum(batch_len(b) for b in batches)
        return batches, f"{n} evaluation sample(s)" if ctx.score_batches else f"{n} verification sample(s)"
    source = _source_for(float_model, ctx, ctx.calibration)
    first = next(iter(source.batches(ctx.original_inputs or input_specs(float_model), 8)), None)
    if first is None:
        raise InputError("method=auto needs samples to score candidates on; give --calib or --data")
    return [first], "the first calibration batch" + (" (synthetic)" if source.synthetic else "")


def _scale_constant(dq_out: gs.Variable) -> gs.Constant:
    return dq_out.inputs[0].inputs[1]


def _set_scale(dq_out: gs.Variable, scale: float) -> None:
    _scale_constant(dq_out).values = np.asarray(max(float(scale), 1e-12), np.float32)


def _round(value):
    if value is None:
        return None
    value = float(value)
    return round(value, 2) if np.isfinite(value) else None


def observe_amax(graph: gs.Graph, tensors: list[str], ctx: PassContext) -> dict[str, float]:
    """Largest |value| of ``tensors`` on the calibration data (synthetic if the context has none)."""
    from calibration import collect

    model = _graph_model(graph)
    data = ctx.calibration
    if data is None and (ctx.verify_batches or ctx.reference_inputs is not None):
        data = dict(ctx.verify_batches[0] if ctx.verify_batches else ctx.reference_inputs)
    source = _source_for(model, ctx, data)
    # Without real data this is a smoke check on a few synthetic samples; keep it cheap.
    limit = None if ctx.calibration is not None else 4
    stats = collect.collect_statistics(model, tensors, source, progress=ctx.progress, max_samples=limit)
    return {name: float(st.amax) for name, st in stats.items()}


def _source_for(model, ctx: PassContext, data):
    """Calibration data for ``model``, read in the original model's layout and adapted to it."""
    from calibration.sources import AdaptedSource, open_source
    from optimizer.runtime import input_specs

    specs = ctx.original_inputs or input_specs(model)
    source = open_source(data, specs, shapes=ctx.input_shapes)
    if ctx.feed_adapter is not None and ctx.original_inputs is not None:
        source = AdaptedSource(source, ctx.original_inputs, ctx.feed_adapter)
    return source


def _graph_model(graph: gs.Graph):
    """An ONNX model of ``graph`` (a copy) for running in ONNX Runtime."""
    import onnx

    from optimizer.graph import graph_to_model

    template = onnx.ModelProto()
    template.ir_version = 10
    return graph_to_model(graph.copy(), template)


def _scale_of(graph_node: gs.Node) -> np.ndarray | None:
    return constant_values(graph_node.inputs[1]) if len(graph_node.inputs) > 1 else None


@register_pass
@dataclass
class LintQdq(Pass):
    """Report Q/DQ placements TensorRT cannot fuse; changes nothing.

    Findings (counted in the stats, listed in the report's details):

    - ``float_op_between_dq_and_layer``: a float op (Pad, Cast, Mul ...) sits between a
      DequantizeLinear and the Conv/Gemm/MatMul it feeds, so TensorRT runs that layer in float::

          DQ -> Pad -> Conv        (fold the Pad into the Conv, or move the Q/DQ below it)

    - ``partially_quantized_layer``: one input of a Conv/Gemm/MatMul is dequantized, the other not;
    - ``float_residual_input``: an Add joins a quantized Conv's output with a float tensor, so
      TensorRT cannot fuse the Add into the Conv;
    - ``concat_scale_mismatch``: Concat inputs come from DequantizeLinear nodes with different
      scales (TensorRT needs equal scales to keep the Concat in INT8);
    - ``qdq_pair_mismatch``: a QuantizeLinear feeds a DequantizeLinear with a different scale.
    """

    name = "lint-qdq"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        issues: list[dict] = []

        def report(kind: str, node: gs.Node, detail: str) -> None:
            issues.append({"kind": kind, "node": node.name, "op": node.op, "detail": detail})

        def is_dq(t: gs.Tensor) -> bool:
            p = producer(t)
            return p is not None and p.op == "DequantizeLinear"

        weighted = ("Conv", "ConvTranspose", "Gemm", "MatMul")
        for node in graph.nodes:
            if node.op in weighted and len(node.inputs) >= 2:
                flags = [is_dq(node.inputs[i]) for i in (0, 1)]
                if any(flags) and not all(flags):
                    report("partially_quantized_layer", node, f"inputs dequantized: {flags}")
                for i in (0, 1):
                    p = producer(node.inputs[i])
                    if p is not None and p.op not in ("DequantizeLinear",) and p.inputs and is_dq(p.inputs[0]):
                        report("float_op_between_dq_and_layer", node, f"{p.op} '{p.name}' between DequantizeLinear and input {i}")
            elif node.op == "Add" and len(node.inputs) == 2:
                producers = [producer(t) for t in node.inputs]
                for i, p in enumerate(producers):
                    other = node.inputs[1 - i]
                    if (
                        p is not None and p.op == "Conv" and p.inputs and is_dq(p.inputs[0])
                        and constant_values(other) is None and not is_dq(other)
                        and not (producers[1 - i] is not None and producers[1 - i].op == "Conv")
                    ):
                        report("float_residual_input", node, f"input {1 - i} ('{other.name}') is float")
                        break
            elif node.op == "Concat":
                scales = [_scale_of(producer(t)) for t in node.inputs if is_dq(t)]
                if len(scales) > 1 and any(s is None or not np.array_equal(s, scales[0]) for s in scales):
                    report("concat_scale_mismatch", node, "inputs dequantized with different scales")
            elif node.op == "DequantizeLinear":
                q = producer(node.inputs[0])
                if q is not None and q.op == "QuantizeLinear":
                    a, b = _scale_of(q), _scale_of(node)
                    if a is None or b is None or not np.array_equal(a, b):
                        report("qdq_pair_mismatch", node, f"scale differs from QuantizeLinear '{q.name}'")
        stats: dict[str, int | float] = {"issues": len(issues)}
        for issue in issues:
            stats[issue["kind"]] = stats.get(issue["kind"], 0) + 1
        return PassResult(False, stats=stats, details={"issues": issues})
