"""Block-wise INT4 weight-only quantization (round-to-nearest and AWQ-style scales) for TensorRT.

The output is what TensorRT builds for INT4 weight-only GEMMs (and what NVIDIA ModelOpt's ``int4``
/ ``int4_awq`` ONNX modes emit): each large constant MatMul/Gemm weight is stored as packed INT4
(two values per byte) behind ``DequantizeLinear(axis=<K axis>, block_size=B)`` -- one float32
scale per block of B consecutive input channels and output channel, symmetric, zero point 0 --
and the activations stay float. ONNX needs opset 21 for INT4 and blocked DequantizeLinear.

AWQ (activation-aware weight quantization, Lin et al. 2023) protects the input channels that carry
large activations: with per-channel activation magnitudes m (mean |x| on calibration data) and
s = m^alpha, ``x @ W == (x / s) @ (diag(s) W)``; quantizing ``diag(s) W`` instead of ``W`` gives
those channels finer steps. alpha is searched per group of layers on a bounded sample of
calibration rows (``passes/int4_awq.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from optimizer.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass
from passes.graph_utils import constant_values, is_default_domain, is_graph_output, unique_name
from passes.bias_correction import apply_bias_correction, bias_shift
from passes.int4_awq import (
    check_alphas,
    collect_group_stats,
    dequantize_blocks,
    input_row_weights,
    plan_groups,
    quantize_blocks,
    search_group,
)
from passes.scale_folding import apply_fold, insert_input_scale, plan_fold
from passes.match import producer
from passes.opset import default_opset
from passes.skips import Skips

log = logging.getLogger(__name__)

#: INT4 and DequantizeLinear's ``block_size`` exist from opset 21.
INT4_OPSET = 21
#: Block sizes tried, largest first, when K is not a multiple of the requested one.
BLOCK_CHOICES = (128, 64, 32)
METHODS = ("awq", "rtn")


@dataclass(eq=False)
class Layer:
    """A MatMul/Gemm whose constant weight will be quantized."""

    node: gs.Node
    weight: gs.Tensor
    k_axis: int  # axis of the reduction (input-channel) dim in the stored weight
    block: int
    source: gs.Tensor = None  # type: ignore[assignment]  # the activation input, as found

    def __post_init__(self):
        if self.source is None:
            self.source = self.node.inputs[0]


@dataclass(eq=False)
class Embedding:
    """A constant table read by Gather(axis=0) nodes only: quantized along its embedding axis."""

    table: gs.Tensor
    nodes: list[gs.Node]
    block: int


def pick_block(k: int, requested: int) -> int | None:
    """The largest of ``BLOCK_CHOICES`` not above ``requested`` that divides ``k``, else None."""
    return next((b for b in BLOCK_CHOICES if b <= requested and k % b == 0), None)


def int4_constant(name: str, q: np.ndarray) -> gs.Constant:
    """A gs.Constant exported as a packed INT4 initializer (ceil(n/2) bytes)."""
    # graphsurgeon cannot pack an ml_dtypes.int4 array itself; onnx's numpy_helper can
    return gs.Constant(name, LazyValues(onnx.numpy_helper.from_array(q.astype(ml_dtypes.int4), name)))


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float | None:
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - approx) ** 2))
    signal = float(np.sum(ref**2))
    if signal == 0.0:
        return None
    return round(10 * np.log10(signal / noise), 2) if noise > 0 else None


# -- finding layers ---------------------------------------------------------------------------


def _layer_of(node: gs.Node, min_elements: int, skip) -> tuple[gs.Tensor, int] | None:
    """(weight tensor, K axis) when ``node`` is a MatMul/Gemm with a float32 2-D constant weight."""
    if len(node.inputs) < 2:
        return None
    tensor = node.inputs[1]
    weight = constant_values(tensor)
    if weight is None:
        p = producer(tensor)
        if p is not None and p.op == "DequantizeLinear":
            skip("already_quantized")
        elif node.op == "MatMul":
            skip("matmul_without_constant_weight")  # attention scores, attn x V: stay float
        else:
            skip("weight_not_constant")
        return None
    if constant_values(node.inputs[0]) is not None:
        skip("constant_input")
        return None
    if weight.ndim != 2:
        skip("weight_not_2d")
        return None
    if weight.dtype != np.float32:
        skip("weight_not_float32")
        return None
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        skip("gemm_transA")
        return None
    if weight.size < min_elements:
        skip("tiny_layer")
        return None
    k_axis = 1 if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else 0
    return tensor, k_axis


def find_layers(graph: gs.Graph, block_size: int, min_elements: int, exclude: set[str], skipped: Skips) -> list[Layer]:
    """Quantizable MatMul/Gemm layers of the main graph (subgraph bodies stay float)."""
    skip = skipped.add

    candidates: list[Layer] = []
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or not is_default_domain(node):
            continue
        if node.name in exclude:
            skip("excluded")
            continue
        found = _layer_of(node, min_elements, skip)
        if found is None:
            continue
        tensor, k_axis = found
        k = int(constant_values(tensor).shape[k_axis])
        block = pick_block(k, block_size)
        if block is None:
            skip("k_not_multiple_of_32")
            continue
        candidates.append(Layer(node, tensor, k_axis, block))
    # a weight is quantized once for all its readers: they must all be candidates, reading it the same way
    by_weight: dict[str, list[Layer]] = {}
    for layer in candidates:
        by_weight.setdefault(layer.weight.name, []).append(layer)
    layers = []
    for name, group in by_weight.items():
        readers = {id(n) for n in group[0].weight.outputs}
        if readers != {id(layer.node) for layer in group} or is_graph_output(graph, group[0].weight):
            skip("weight_read_by_other_ops", len(group))
        elif len({layer.k_axis for layer in group}) > 1:
            skip("shared_weight_read_transposed", len(group))
        else:
            layers.extend(group)
    with_bodies = sum(1 for node in graph.nodes if any(True for _ in node.subgraphs()))
    if with_bodies:
        skip("subgraphs_left_in_float", with_bodies)
    return layers


def find_embeddings(graph: gs.Graph, block_size: int, min_elements: int, exclude: set[str],
                    skipped: Skips) -> list[Embedding]:
    """Constant float32 [V, D] tables read only by Gather(axis=0) nodes."""
    tables: dict[str, Embedding] = {}
    for node in graph.nodes:
        if node.op != "Gather" or not is_default_domain(node) or constant_values(node.inputs[0]) is None:
            continue
        if node.inputs[0].name not in tables:
            tables[node.inputs[0].name] = Embedding(node.inputs[0], [], 0)
        tables[node.inputs[0].name].nodes.append(node)
    found = []
    for emb in tables.values():
        table = constant_values(emb.table)
        reason = None
        if any(n.name in exclude for n in emb.nodes):
            reason = "excluded"
        elif any(int(n.attrs.get("axis", 0)) != 0 for n in emb.nodes):
            reason = "gather_axis_not_0"
        elif table.ndim != 2 or table.dtype != np.float32:
            reason = "table_not_2d_float32"
        elif table.size < min_elements:
            reason = "tiny_table"
        elif {id(n) for n in emb.table.outputs} != {id(n) for n in emb.nodes} or is_graph_output(graph, emb.table):
            reason = "table_read_by_other_ops"
        elif pick_block(table.shape[1], block_size) is None:
            reason = "embedding_dim_not_multiple_of_32"
        if reason is not None:
            skipped.add(f"embedding_{reason}")
            continue
        emb.block = pick_block(table.shape[1], block_size)
        found.append(emb)
    return found


# -- rewriting --------------------------------------------------------------------------------


def quantize_weight_tensor(graph: gs.Graph, tensor: gs.Tensor, readers: list[gs.Node], k_axis: int, block: int,
                           scales: np.ndarray | None = None, prescaled: bool = False,
                           mean_abs: np.ndarray | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Replace ``tensor`` (for ``readers``) by ``DequantizeLinear(int4, scale, axis, block_size)``.

    With AWQ ``scales`` (float32 [K]) the stored weight is ``diag(scales) W`` -- ``prescaled``:
    ``tensor`` already holds it (``passes.scale_folding`` scaled it) -- and the readers' input is
    divided by them. Returns (the weight's details, the float64 weight given to the quantizer,
    its dequantized values); the details' SQNR compares ``Q(diag(s) W) / s`` with ``W``."""
    weight = constant_values(tensor)
    shape = [1, 1]
    shape[k_axis] = -1
    rows = scales.astype(np.float64).reshape(shape) if scales is not None else None
    given = weight.astype(np.float64) * (rows if rows is not None and not prescaled else 1.0)
    # the per-block clip minimizes the output's error when the input's magnitudes are known
    row_weights = input_row_weights(mean_abs, scales) if mean_abs is not None else None
    q, scale = quantize_blocks(given, k_axis, block, row_weights=row_weights)
    base = tensor.name
    q_const = int4_constant(unique_name(graph, f"{base}_int4"), q)
    s_const = gs.Constant(unique_name(graph, f"{base}_int4_scale"), scale)
    out = gs.Variable(unique_name(graph, f"{base}_dequantized"), dtype=np.float32, shape=list(weight.shape))
    # no zero point: it defaults to 0 of the input's type, saving an initializer
    graph.nodes.append(gs.Node("DequantizeLinear", unique_name(graph, f"{base}_DequantizeLinear"),
                               attrs={"axis": k_axis, "block_size": block}, inputs=[q_const, s_const], outputs=[out]))
    for node in readers:
        node.inputs = [out if t is tensor else t for t in node.inputs]
    restored = dequantize_blocks(q, scale, k_axis, block)
    ref, eff = (given / rows, restored / rows) if rows is not None else (given, restored)
    info = {"shape": list(weight.shape), "axis": k_axis, "block_size": block, "sqnr_db": sqnr_db(ref, eff),
            "bytes_before": int(weight.nbytes), "bytes_after": int((q.size + 1) // 2 + scale.nbytes)}
    return info, given, restored


def apply_group_scales(graph: gs.Graph, inputs: list[tuple[gs.Tensor, list[gs.Node]]],
                       scales: np.ndarray) -> tuple[dict[str, str], bool]:
    """Divide the group's activations by ``scales``: ``({tensor: how}, whether the readers' weights
    were multiplied by them too)``. One input: folded into its producer (LayerNormalization,
    MatMul/Gemm, Mul, through Reshape/Transpose; ``passes.scale_folding``), else a ``Mul`` before
    the readers; several inputs sharing a weight: one ``Mul`` each, the weight scaled once here."""
    if len(inputs) == 1:
        tensor, readers = inputs[0]
        plan = plan_fold(graph, tensor, readers)
        if not isinstance(plan, str):
            apply_fold(graph, plan, scales)
            return {tensor.name: f"folded:{plan.producer.op}:{plan.producer.name}"}, True
        if insert_input_scale(graph, tensor, readers, scales) is None:
            return {tensor.name: "mul"}, True
    return {tensor.name: _divide_by_mul(graph, tensor, readers, scales) for tensor, readers in inputs}, False


def _divide_by_mul(graph: gs.Graph, tensor: gs.Tensor, readers: list[gs.Node], scales: np.ndarray) -> str:
    """``readers`` read ``Mul(tensor, 1 / scales)`` (their weights are left alone)."""
    inv = gs.Constant(unique_name(graph, f"{tensor.name}_awq_inv_scale"), (1.0 / scales).astype(np.float32))
    out = gs.Variable(unique_name(graph, f"{tensor.name}_awq_scaled"), dtype=tensor.dtype, shape=tensor.shape)
    graph.nodes.append(gs.Node("Mul", unique_name(graph, f"{tensor.name}_awq_Mul"), inputs=[tensor, inv], outputs=[out]))
    for node in readers:
        node.inputs = [out if t is tensor else t for t in node.inputs]
    return "mul"


def quantize_embedding(graph: gs.Graph, emb: Embedding) -> dict:
    """Blocks along the embedding axis (axis 1 of [V, D]): each gathered row dequantizes alone."""
    return quantize_weight_tensor(graph, emb.table, emb.nodes, 1, emb.block)[0]


def rewrite_layers(graph: gs.Graph, groups: list, means: dict, details: dict, skipped: Skips) -> dict[str, int]:
    """Apply every group's 1/s to its activations, quantize its weights (``details["weights"]``,
    ``["layers"]``, ``["groups"]`` filled) and, for the inputs in ``means``, fold the output mean
    shift into the biases. Returns the counts for the pass's stats."""
    counts = {"awq_folded_scales": 0, "awq_scaled_inputs": 0}
    applied: dict[str, str] = {}
    prescaled: set[int] = set()
    for group in groups:  # every activation first: a fold may edit a producer layer's weight
        if group.scales is not None:
            how, scaled = apply_group_scales(graph, group.inputs(), group.scales)
            applied.update(how)
            prescaled |= {id(group)} if scaled else set()
            for value in how.values():
                counts["awq_folded_scales" if value.startswith("folded:") else "awq_scaled_inputs"] += 1
    corrections = []
    for group in groups:
        for weight, readers in group.weights():
            info, given, restored = quantize_weight_tensor(graph, weight, [r.node for r in readers], readers[0].k_axis,
                                                           readers[0].block, group.scales, id(group) in prescaled,
                                                           group.mean_abs)
            details["weights"][weight.name] = info
            for r in (r for r in readers if r.source.name in means):  # the mean of what the layer now reads
                mean = means[r.source.name] / (group.scales if group.scales is not None else 1.0)
                corrections.append((r.node, bias_shift(r.node.op, given, restored, mean, r.node.attrs)))
        for layer in group.layers:
            details["layers"][layer.node.name] = {
                "op": layer.node.op, "weight": layer.weight.name, "activations": [],
                "block_size": layer.block, "method": group.method, "alpha": group.alpha,
                "scale_applied": applied.get(layer.source.name),
                "weight_sqnr_db": details["weights"][layer.weight.name]["sqnr_db"],
            }
        if group.search:
            details["groups"].append(group.search)
    if corrections:
        counts["bias_corrected"] = apply_bias_correction(graph, corrections, skipped)
    return counts


# -- the pass ---------------------------------------------------------------------------------


@register_pass
@dataclass(frozen=True)
class QuantizeInt4(Pass):
    """Block-wise INT4 weight-only quantization of MatMul/Gemm weights (TensorRT's INT4 GEMMs)::

        x -> MatMul(W [K, N]) -> y
        becomes
        x -> [Mul(1/s)] -> MatMul(DequantizeLinear(W_int4, scale [K/B, N], axis=0, block_size=B)) -> y

    - MatMul with a constant 2-D float32 weight B ([K, N]) and Gemm with a constant B (transB 0:
      axis 0; transB 1, [N, K]: axis 1; transA must be 0). Symmetric INT4 per block of B input
      channels (scale = r * amax / 7, zero point 0, r in 1.0 ... 0.75 chosen per block for the least
      squared error, weighted by each input channel's mean |x|^2 when calibration data exists:
      clipping a block's rare largest values buys resolution for the rest), stored packed two
      values per byte; activations,
      biases and scales stay float32. A weight read by several layers is quantized once.
    - ``block_size`` (32, 64, 128; default 128): when K is not a multiple of it, the largest of
      128/64/32 not above it that divides K is used (counted as ``block_size_reduced``); when none
      divides K the layer stays float (``skipped_k_not_multiple_of_32``). TensorRT-RTX also builds a
      last, partial block (K=100, block 32), but it is not used: it cannot be checked on a GPU here.
    - ``method``: ``awq`` (default) searches alpha in 0, 0.1 ... 1 for s = mean|x|^alpha on the
      calibration data (``--calib``; up to 128 samples, a bounded sample of 512 rows per input):
      the alpha whose quantized ``(x / s) @ Q(diag(s) W)`` is closest to ``x @ W`` on the sample.
      alpha 0 is round-to-nearest, so AWQ is never worse than RTN on the sample. Layers reading
      the same tensor (q/k/v, or a weight shared by two inputs) share one s, searched on their
      concatenated weights. 1/s is folded into the op producing the activation when it feeds only
      these layers (LayerNormalization's gamma and beta, a constant MatMul/Gemm's columns and bias, a
      constant Mul; through Reshape/Transpose: ``passes/scale_folding.py``), else applied by one
      ``Mul`` per input tensor. Without calibration data (or on synthetic data) AWQ falls back to
      RTN and the details say so. ``rtn``: round to nearest.
    - **Output check** (``awq``): the model with the searched alphas and the model with alpha 0
      everywhere (both with the activation-weighted clip and, when on, bias correction) run on the
      first 32 calibration samples; the searched alphas are kept only if the worst output's SQNR
      is higher, else every group is reset to alpha 0 (``awq_reset_by_output_check`` groups). Why:
      the per-layer error weighs all of a layer's output channels alike, while a transformer with
      outlier channels (LayerNorm gains of 20 on 2 of 64 channels, as trained models have) carries
      most of its output in those residual channels (96 % of the zoo Whisper encoder's output
      energy). There the searched scales lowered every layer's sample error yet raised the output
      error 1.2-3x (zoo Whisper encoder and ViT, without bias correction); the check sees it.
      The worst output decides, as verification checks every output. ``output_check=false``: the
      searched alphas as they are (the plain AWQ search).
    - ``bias_correction`` (true): with calibration data, each layer's output mean shift
      ``E[x] (W - Q(W))`` is added to its bias (Gemm's C, or the constant Add after a MatMul;
      ``passes/bias_correction.py``). Measured on the zoo's transformers it helps RTN and AWQ
      alike, and AWQ needs it where tokens are pooled (its per-token objective does not see the
      mean). ``method=rtn,bias_correction=false`` needs no data at all.
    - ``min_weight_elements`` (4096): smaller layers stay float (``tiny_layer``); ``exclude``:
      node names kept in float.
    - ``embeddings`` (false): also quantize constant [V, D] tables read only by Gather(axis=0),
      in blocks along D (RTN; TensorRT-RTX builds DequantizeLinear -> Gather with INT4 tables).
      Off by default: the embeddings ride the residual stream to the output (on the zoo's BERT
      the relative output error grows from 2e-6 to 8e-3).
    - MatMuls of two activations (attention), subgraph bodies and already quantized weights stay
      float. Below opset 21 (no INT4) the pass does nothing (``skipped_opset_below_21``): run
      ``upgrade-opset(min=21)`` first.

    Details: per layer the weight, block size, method, alpha, how 1/s was applied and the weight
    SQNR (of the effective weight ``Q(diag(s) W) / s`` against W); per AWQ group the sample SQNR
    of RTN and of the searched alpha (``searched_alpha`` when the output check reset it); the
    output check's samples, both candidates' output SQNR and which was kept. Verification: lossy,
    cosine >= 0.98 with the original.
    """

    name = "quantize-int4"
    lossy = True
    uses_calibration = True
    tunable = "exclude"
    precision_flag = "int4"
    tolerance = Tolerance(rtol=float("inf"), atol=float("inf"), min_cosine=0.98, max_mismatch=0.05)

    block_size: int = 128
    method: str = "awq"
    min_weight_elements: int = 4096
    exclude: list[str] = field(default_factory=list)
    embeddings: bool = False
    bias_correction: bool = True
    output_check: bool = True

    def __post_init__(self):
        if self.block_size not in BLOCK_CHOICES:
            raise self.option_error(f"block_size must be one of {', '.join(map(str, BLOCK_CHOICES))}; got {self.block_size!r}")
        if self.method not in METHODS:
            raise self.option_error(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not isinstance(self.min_weight_elements, int) or self.min_weight_elements < 0:
            raise self.option_error(f"min_weight_elements must be an integer >= 0; got {self.min_weight_elements!r}")

    def _output_check(self, graph: gs.Graph, groups: list, means: dict, ctx: PassContext) -> dict:
        """The searched alphas against alpha 0 everywhere, end to end (``int4_awq.check_alphas``); on
        a loss, the groups are reset to alpha 0 (the activation-weighted clip and bias correction stay)."""

        def candidate(searched: bool) -> gs.Graph:
            copy = graph.copy()  # shares the weights' arrays: the rewrite assigns new ones, never edits them
            twins = plan_groups(find_layers(copy, self.block_size, self.min_weight_elements, set(self.exclude), Skips()))
            for twin, group in zip(twins, groups, strict=True):
                assert [t.node.name for t in twin.layers] == [g.node.name for g in group.layers], "layers differ in the copy"
                twin.method, twin.mean_abs = group.method, group.mean_abs
                twin.alpha, twin.scales = (group.alpha, group.scales) if searched else (0.0, None)
            rewrite_layers(copy, twins, means, {"weights": {}, "layers": {}, "groups": []}, Skips())
            return copy.cleanup().toposort()

        verdict = check_alphas(graph, {"searched": lambda: candidate(True), "alpha_0": lambda: candidate(False)}, ctx)
        verdict["groups_reset"] = 0
        if verdict["kept"] == "alpha_0":
            for group in (g for g in groups if g.scales is not None):
                group.search["searched_alpha"], group.search["alpha"] = group.alpha, 0.0
                group.alpha, group.scales = 0.0, None
                verdict["groups_reset"] += 1
        return verdict

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opset = default_opset(graph) or ctx.opset or 0
        if opset < INT4_OPSET:
            return PassResult(False, skipped={f"opset_below_{INT4_OPSET}": 1})
        skipped = Skips()
        exclude = set(self.exclude)
        layers = find_layers(graph, self.block_size, self.min_weight_elements, exclude, skipped)
        embeddings = []
        if self.embeddings:
            embeddings = find_embeddings(graph, self.block_size, self.min_weight_elements, exclude, skipped)
        details: dict = {"method": self.method, "layers": {}, "weights": {}, "groups": [], "embeddings": {}}
        groups = plan_groups(layers)
        stats, means = None, {}
        if layers and (self.method == "awq" or self.bias_correction):
            collected, details["calibration"] = collect_group_stats(graph, groups, ctx, means=self.bias_correction)
            if collected is None:
                details["method"] = "rtn"
                details["calibration"]["fallback"] += ": awq and bias correction fell back to plain rtn"
                skipped.add("awq_fallback_to_rtn")
            else:
                stats, means = collected
        if stats is not None and self.method == "awq":
            for group in groups:
                search_group(group, stats)
        reset = 0
        if self.output_check and any(group.scales is not None for group in groups):
            details["output_check"] = self._output_check(graph, groups, means, ctx)
            reset = details["output_check"]["groups_reset"]
        counts = rewrite_layers(graph, groups, means, details, skipped)
        counts["awq_reset_by_output_check"] = reset
        for emb in embeddings:
            details["embeddings"][emb.table.name] = {**quantize_embedding(graph, emb), "nodes": [n.name for n in emb.nodes]}
        result_stats = {
            "quantized_layers": len(details["layers"]),
            "quantized_weights": len(details["weights"]),
            "quantized_embeddings": len(details["embeddings"]),
            **counts,
            "block_size_reduced": sum(1 for layer in layers if layer.block < self.block_size),
        }
        return PassResult(changed=bool(details["weights"] or details["embeddings"]), stats=result_stats, skipped=skipped,
                          details=details)
