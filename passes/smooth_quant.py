"""SmoothQuant: migrate activation outliers into the weights before INT8 (Xiao et al., 2022)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult, register_pass
from passes.graph_utils import is_default_domain
from passes.scale_folding import FoldPlan, apply_fold, plan_fold, weight_rows
from passes.skips import Skips

log = logging.getLogger(__name__)

#: Scales are clipped to this range (a channel that needs more is left mostly unsmoothed).
SCALE_RANGE = (1e-5, 1e5)
#: Channels whose scale is within this relative distance of 1 are left alone: after smoothing,
#: re-smoothing with the same alpha on the same data computes s = 1 up to float rounding, so a
#: second run is a no-op ("already_balanced") instead of a cascade of tiny rescalings.
BALANCED = 0.01
#: Calibration samples the activation maxima are taken over (the paper uses 512).
STAT_SAMPLES = 512


def smoothing_scales(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> tuple[np.ndarray, int]:
    """Per channel ``s = amax^alpha / wmax^(1-alpha)``, clipped to ``SCALE_RANGE``; channels with a
    zero (or non-finite) activation or weight maximum, and channels already balanced to within
    ``BALANCED``, get ``s = 1``. Returns ``(s, number of clipped channels)``."""
    a = np.asarray(amax, np.float64)
    w = np.asarray(wmax, np.float64)
    s = np.ones_like(a)
    valid = np.isfinite(a) & np.isfinite(w) & (a > 0) & (w > 0)
    with np.errstate(over="ignore", divide="ignore"):
        s[valid] = np.exp(alpha * np.log(a[valid]) - (1.0 - alpha) * np.log(w[valid]))
    clipped = int(np.count_nonzero((s < SCALE_RANGE[0]) | (s > SCALE_RANGE[1])))
    s = np.clip(s, *SCALE_RANGE)
    s[np.abs(np.log(s)) <= np.log1p(BALANCED)] = 1.0
    return s, clipped


def channel_ratio(amax: np.ndarray) -> float:
    """max / median of the per-channel maxima (1 = flat; large = outlier channels); channels that
    are all zero are left out (1.0 when every channel is)."""
    a = np.asarray(amax, np.float64)
    a = a[np.isfinite(a) & (a > 0)]
    return float(a.max() / np.median(a)) if a.size else 1.0


def find_groups(graph: gs.Graph) -> list[tuple[gs.Variable, list[gs.Node]]]:
    """MatMul/Gemm nodes with a constant 2-D float32 weight, grouped by the activation they read."""
    groups: dict[int, tuple[gs.Variable, list[gs.Node]]] = {}
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or not is_default_domain(node) or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if not isinstance(x, gs.Variable) or not isinstance(w, gs.Constant) or len(w.shape) != 2:
            continue
        if np.asarray(w.values).dtype != np.float32 or (node.op == "Gemm" and node.attrs.get("transA", 0)):
            continue
        groups.setdefault(id(x), (x, []))[1].append(node)
    return list(groups.values())


def _stacked(batches: list[dict]) -> dict:
    """The verification batches as one set of arrays (first axis = samples), if their shapes allow."""
    try:
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    except ValueError:  # batches of different shapes: the first one alone
        return dict(batches[0])


@register_pass
@dataclass(frozen=True)
class SmoothQuant(Pass):
    """SmoothQuant: flatten activation outlier channels before INT8 by moving them into the weights::

        LayerNorm(g, b) -> X -> MatMul(W)        becomes        LayerNorm(g/s, b/s) -> X/s -> MatMul(diag(s)·W)

    For every activation ``X`` read by MatMul/Gemm layers with constant float32 weights (Q, K and
    V projections reading one LayerNorm output form one group, with one ``s``), per input channel
    ``j``: ``s_j = max|X_j|^alpha / max|W_j,:|^(1-alpha)``, the weight maximum taken over all the
    group's weight rows ``j``. ``max|X_j|`` comes from the calibration data (at most 512 samples;
    the details say where from and whether it was synthetic); without calibration data the
    verification inputs are used (the details say so), and with neither the pass does nothing
    (``skipped_no_calibration_data``). ``s`` is clipped to
    [1e-5, 1e5]; channels whose activation or weight maximum is zero keep ``s = 1``.

    ``1/s`` is folded into the op producing ``X`` (``passes/scale_folding.py``): a
    LayerNormalization's scale and bias, a MatMul/Gemm's weight columns and bias (a bias ``Add``
    after a MatMul included), or a ``Mul`` by a constant, through Reshape/Transpose nodes that keep
    the last axis. So ``Y`` is unchanged up to float rounding (the pass is verified as lossless)
    while ``X/s`` has flatter channels, which per-tensor INT8 quantizes better; run it right before
    ``quantize-int8``. Refused groups are counted by reason (``skipped_producer_not_foldable``: an
    activation function, attention or a graph input produces ``X``; ``skipped_output_has_other_consumers``;
    ``skipped_weight_shared`` ...). With ``clone_producers`` (default) a LayerNorm or Mul whose output
    also feeds other nodes (a post-LN residual, as in BERT) is duplicated for the group instead.

    Idempotent: after smoothing, ``max|X'_j|^alpha = max|W'_j|^(1-alpha)``, so a second run on the
    same data computes ``s = 1`` (up to float rounding); channels within 1 % of 1 are left alone and
    a group with nothing left to move is counted as ``skipped_already_balanced``. A second run with
    another ``alpha`` gives what smoothing the original with that alpha gives (to within that 1 %).
    Channels whose ``s`` was clipped (counted in ``clipped_channels``) may move again on a second run.

    Options: ``alpha`` (0.5; 0 moves nothing into the activations, 1 everything into the weights),
    ``exclude`` (node names -- a consumer or the producer -- whose group is left alone),
    ``min_channels`` (16: narrower activations are skipped, ``skipped_too_few_channels``),
    ``clone_producers`` (true), ``min_outlier_ratio`` (0: every foldable site; with r > 0 an
    activation whose largest channel maximum is under r x the median channel's is left alone,
    ``skipped_no_outlier_channels``).

    The rule for ``min_outlier_ratio``: no gate before INT8 -- smoothing a flat activation did not
    cost INT8 accuracy beyond float noise and mostly gained a little; a gate of 4 before FP8, where
    it mostly cost. Evidence (``bench/smooth_quant_results.md``: alpha 0.5, first output vs FP32,
    on the zoo's 8 samples and on 64 held-out ones, 7 held-out splits for ``transformer_mha``; 13
    (model, data) cells have such sites): smoothing, on top of the outlier sites, the sites whose
    max/median is under 4 -- all 4 of ``transformer_mha`` (1.4-2.2), both of the sample transformer (1.2-1.3), 2
    of ``hf_vit``'s (2.2-3.6), 1 of ``hf_whisper_enc``'s (2.7) -- changed the output SQNR by
    -0.02 to +1.30 dB (median +0.21) under ``--int8``'s ranges (auto + bias correction), argmax
    agreement never lower; under per-tensor minmax ranges without bias correction (only the
    smoothing differs) by -0.04 to +1.50 dB (median +0.53), argmax lower in 4 cells (near-ties on
    saturated baselines: at most 2 of 64 samples, at +1.0 dB) and higher in 1. The losses are
    Whisper's one flat site (-0.04 to -0.01 dB). An ad-hoc sweep of 6 more ``transformer_mha``
    splits (numpy seeds 10-15, calibration drawn before evaluation) agreed under minmax (+0.01 to
    +0.90 dB) and found one auto split at -3.5 dB (auto's range choice, which moves results more
    than smoothing does). On outlier sites (mean max/median 18-240) smoothing gains +1.9 to +7.3
    dB. Before FP8 the same flat sites changed SQNR by -1.15 to +1.07 dB, lower in 9 of 13 cells
    (median -0.25): ``--fp8`` runs ``smooth-quant(min_outlier_ratio=4)``.

    Details, per site: producer, consumers, the activation's
    max/median channel ratio before and after, the weights' likewise, and the range of ``s``.
    """

    name = "smooth-quant"
    lossy = False
    uses_calibration = True
    requires_any_op = frozenset({"MatMul", "Gemm"})

    alpha: float = 0.5
    exclude: list[str] = field(default_factory=list)
    min_channels: int = 16
    clone_producers: bool = True
    min_outlier_ratio: float = 0.0

    def __post_init__(self):
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise self.option_error(f"alpha must be between 0 and 1, got {self.alpha}")
        if int(self.min_channels) < 1:
            raise self.option_error(f"min_channels must be >= 1, got {self.min_channels}")
        if float(self.min_outlier_ratio) < 0:
            raise self.option_error(f"min_outlier_ratio must be >= 0, got {self.min_outlier_ratio}")
        self._normalize(alpha=float(self.alpha))

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        skipped = Skips()
        refused: list[dict] = []

        def skip(reason: str, tensor: gs.Tensor | None = None, consumers: list[gs.Node] = ()) -> None:
            skipped.add(reason)
            if tensor is not None:
                refused.append({"tensor": tensor.name, "consumers": [c.name for c in consumers], "reason": reason})

        plans = self._plan(graph, skip)
        if not plans:
            return PassResult(False, skipped=skipped, details={"refused": refused})
        data, where = self._data(ctx)
        if data is None:
            skipped.add("no_calibration_data", len(plans))
            return PassResult(False, skipped=skipped, details={"statistics": "none: no calibration data or inputs",
                                                              "refused": refused})
        stats, info = _activation_maxima(graph, [p.tensor.name for p in plans], ctx, data, where)
        sites, clipped = [], 0
        # Downstream groups first: a group's consumer weight may be the producer weight of a later
        # group (MatMul -> MatMul); its columns must be final before its rows' maxima are taken, or
        # a second run would not find the first run's result balanced.
        for plan in reversed(plans):
            st = stats.get(plan.tensor.name)
            if st is None:
                skip("no_statistics", plan.tensor, plan.consumers)
                continue
            wmax = np.max([np.abs(weight_rows(c)).max(axis=1) for c in plan.consumers], axis=0)
            if st.amax.size != wmax.size:
                skip("channel_mismatch", plan.tensor, plan.consumers)
                continue
            if channel_ratio(st.amax) < self.min_outlier_ratio:  # flat channels: nothing to migrate
                skip("no_outlier_channels", plan.tensor, plan.consumers)
                continue
            s, n_clipped = smoothing_scales(st.amax, wmax, self.alpha)
            if np.all(s == 1.0):
                skip("already_balanced", plan.tensor, plan.consumers)
                continue
            apply_fold(graph, plan, s)
            clipped += n_clipped
            sites.insert(0, _site_details(plan, st.amax, wmax, s))
        stats_out = {
            "smoothed_sites": len(sites),
            "smoothed_layers": sum(len(site["consumers"]) for site in sites),
            "cloned_producers": sum(1 for site in sites if site["cloned"]),
            **({"clipped_channels": clipped} if clipped else {}),
        }
        return PassResult(bool(sites), stats=stats_out, skipped=skipped,
                          details={"alpha": self.alpha, "statistics": info, "sites": sites, "refused": refused})

    def _plan(self, graph: gs.Graph, skip) -> list[FoldPlan]:
        excluded = set(self.exclude)
        plans: list[FoldPlan] = []
        shapes = None
        for tensor, consumers in find_groups(graph):
            if excluded & {c.name for c in consumers}:
                skip("excluded", tensor, consumers)
                continue
            plan = plan_fold(graph, tensor, consumers, clone_producer=self.clone_producers, shapes=shapes)
            if plan == "reshape_changes_channels" and shapes is None:  # the graph lacks a shape: infer once
                from passes.graph_utils import infer_tensor_types

                shapes = {n: s for n, (s, _) in infer_tensor_types(graph).items() if s is not None}
                plan = plan_fold(graph, tensor, consumers, clone_producer=self.clone_producers, shapes=shapes)
            if isinstance(plan, str):
                skip(plan, tensor, consumers)
            elif plan.producer.name in excluded:
                skip("excluded", tensor, consumers)
            elif plan.channels < self.min_channels:
                skip("too_few_channels", tensor, consumers)
            else:
                plans.append(plan)
        return plans

    @staticmethod
    def _data(ctx: PassContext):
        if ctx.calibration is not None:
            return ctx.calibration, "calibration"
        batches = ctx.verify_batches or ([ctx.reference_inputs] if ctx.reference_inputs is not None else [])
        if batches:
            return _stacked(batches), "verification inputs (no calibration data)"
        return None, ""


def _activation_maxima(graph: gs.Graph, tensors: list[str], ctx: PassContext, data, where: str):
    """Per-channel statistics of ``tensors`` on ``data`` (in the original model's layout)."""
    from calibration.channel_stats import collect_channel_stats
    from passes.graph_model import calibration_source, graph_model

    model = graph_model(graph)
    source = calibration_source(model, ctx, data)
    stats = collect_channel_stats(model, tensors, source, max_rows=0, progress=ctx.progress, max_samples=STAT_SAMPLES)
    info = {"from": where, "source": stats.source, "samples": stats.samples, "synthetic": bool(stats.synthetic)}
    if stats.skipped:
        info["skipped"] = dict(stats.skipped)
    return stats, info


def _site_details(plan: FoldPlan, amax: np.ndarray, wmax: np.ndarray, s: np.ndarray) -> dict:
    return {
        "tensor": plan.tensor.name,
        "producer": plan.producer.name,
        "producer_op": plan.producer.op,
        "through": [n.op for n in plan.through],
        "consumers": [c.name for c in plan.consumers],
        "channels": int(s.size),
        "cloned": bool(plan.clone),
        "activation_ratio_before": round(channel_ratio(amax), 3),
        "activation_ratio_after": round(channel_ratio(amax / s), 3),
        "weight_ratio_before": round(channel_ratio(wmax), 3),
        "weight_ratio_after": round(channel_ratio(wmax * s), 3),
        "scale_min": float(s.min()),
        "scale_max": float(s.max()),
    }

