"""Block INT4 arithmetic and AWQ-style input-channel scales for ``quantize-int4``: groups,
calibration statistics, alpha search.

For a group of layers that must share one scale vector s (they read the same activation, or share
a weight), the activations' per-channel mean |x| (m) and a bounded, deterministic sample of rows
X are collected on the calibration data (``calibration.channel_stats``, streamed); for alpha in
0, 0.1 ... 1, s = m^alpha normalized by sqrt(max(s) * min(s)), and the error is
``sum ||X W - (X / s) Q(diag(s) W)||^2`` over the group's layers. The alpha with the smallest error wins (alpha 0 -- round to nearest -- on ties).
``check_alphas`` then compares, end to end on calibration samples, the model with the searched
alphas against the model with alpha 0 everywhere, and the pass keeps the better one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import PassContext
from passes.graph_model import calibration_source, graph_model
from passes.graph_utils import UnionFind, constant_values

log = logging.getLogger(__name__)

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
#: Calibration samples the statistics are taken over, and rows kept per activation for the search.
AWQ_SAMPLES = 128
AWQ_ROWS = 512
#: Calibration samples the searched alphas are checked on end to end (``check_alphas``).
CHECK_SAMPLES = 32
#: Channels whose mean |x| is below this fraction of the largest are treated as having it
#: (a dead channel would otherwise get s = 0 and an infinite 1/s).
MIN_RELATIVE_MAGNITUDE = 1e-4


# -- block quantization -----------------------------------------------------------------------

INT4_MAX = 7  # symmetric: scale = amax / 7, values in -7..7 (of the type's -8..7)
INT4_MIN = -8


#: Per-block clipping ratios tried: the scale whose block has the least squared error is kept
#: (with 15 levels, clipping a block's rare largest values buys resolution for all the others).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def quantize_blocks(weight: np.ndarray, k_axis: int, block: int, clip: bool = True,
                    row_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block-wise INT4 of a 2-D ``weight`` along ``k_axis``: (int values in -8..7 as
    int8, float32 scales shaped like ``weight`` with ``k_axis`` divided by ``block``). The scale
    is ``r * amax / 7`` per block, ``r`` from ``CLIP_RATIOS`` minimizing the block's squared error
    (``clip=False``: r = 1, plain round-to-nearest). ``row_weights`` ([K], e.g. E[x_k^2] of the
    layer's input) weight each input channel's error, so the clip minimizes the output's error."""
    w = np.moveaxis(weight.astype(np.float64), k_axis, 0)  # [K, N]
    k, n = w.shape
    blocks = w.reshape(k // block, block, n)
    amax = np.maximum(np.abs(blocks).max(axis=1), 1e-12)  # [K/B, N]
    rw = np.ones((k // block, block, 1)) if row_weights is None else row_weights.astype(np.float64).reshape(k // block, block, 1)
    best_scale, best_err = None, None
    for ratio in CLIP_RATIOS if clip else (1.0,):
        scale = (amax * ratio / INT4_MAX).astype(np.float32)
        s64 = scale.astype(np.float64)[:, None, :]
        err = (rw * (np.clip(np.round(blocks / s64), INT4_MIN, INT4_MAX) * s64 - blocks) ** 2).sum(axis=1)
        if best_scale is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = np.where(better, scale, best_scale), np.minimum(err, best_err)
    q = np.clip(np.round(blocks / best_scale.astype(np.float64)[:, None, :]), INT4_MIN, INT4_MAX).astype(np.int8)
    return np.moveaxis(q.reshape(k, n), 0, k_axis), np.moveaxis(best_scale, 0, k_axis)


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, k_axis: int, block: int) -> np.ndarray:
    """What ``DequantizeLinear(axis=k_axis, block_size=block)`` computes, in float64."""
    return q.astype(np.float64) * np.repeat(scale.astype(np.float64), block, axis=k_axis)


# -- groups -----------------------------------------------------------------------------------


@dataclass(eq=False)
class Group:
    """Layers that share one scale vector: connected through shared inputs or shared weights."""

    layers: list = field(default_factory=list)  # passes.quantize_int4.Layer
    method: str = "rtn"
    alpha: float | None = None
    scales: np.ndarray | None = None  # float32 [K], only when alpha > 0
    search: dict | None = None
    mean_abs: np.ndarray | None = None  # [K] mean |x| of the inputs, when searched (weights the clip)

    def inputs(self) -> list[tuple[gs.Tensor, list[gs.Node]]]:
        """(activation tensor, the group's nodes reading it), in first-seen order."""
        out: dict[str, tuple[gs.Tensor, list[gs.Node]]] = {}
        for layer in self.layers:
            out.setdefault(layer.source.name, (layer.source, []))[1].append(layer.node)
        return list(out.values())

    def weights(self) -> list[tuple[gs.Tensor, list]]:
        """(weight tensor, the layers reading it), in first-seen order."""
        out: dict[str, tuple[gs.Tensor, list]] = {}
        for layer in self.layers:
            out.setdefault(layer.weight.name, (layer.weight, []))[1].append(layer)
        return list(out.values())


def plan_groups(layers: list) -> list[Group]:
    """Union the layers over shared activation inputs and shared weights."""
    sets = UnionFind()
    first: dict[tuple[str, str], int] = {}
    for i, layer in enumerate(layers):
        for key in (("x", layer.source.name), ("w", layer.weight.name)):
            if key in first:
                sets.union(first[key], i)
            else:
                first[key] = i
    groups: dict[int, Group] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(sets.find(i), Group()).layers.append(layer)
    return list(groups.values())


# -- the search -------------------------------------------------------------------------------


def scales_for(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s = m^alpha normalized by sqrt(max(s) * min(s)), as float32 (what the graph stores)."""
    m = np.maximum(mean_abs.astype(np.float64), MIN_RELATIVE_MAGNITUDE * float(mean_abs.max()))
    s = m**alpha
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def input_row_weights(mean_abs: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """Per input channel, the weight of its error in the layer's output: E|x_k / s_k|^2, with the
    mean |x| as the magnitude (what the statistics hold)."""
    m = mean_abs.astype(np.float64) / (scales.astype(np.float64) if scales is not None else 1.0)
    return np.maximum(m * m, 1e-12 * float(np.max(m * m)) if m.size else 0.0)


def _effective_error(w: np.ndarray, s: np.ndarray, block: int, mean_abs: np.ndarray | None = None) -> np.ndarray:
    """W - Q(diag(s) W) / s for a [K, N] weight: the error the quantized layer adds to x @ W."""
    s64 = s.astype(np.float64)[:, None]
    rows = input_row_weights(mean_abs, s) if mean_abs is not None else None
    q, scale = quantize_blocks(w * s64, 0, block, row_weights=rows)
    return w - dequantize_blocks(q, scale, 0, block) / s64


def search_group(group: Group, stats: dict) -> None:
    """Pick alpha for ``group`` on the sampled rows (sets method, alpha, scales, search)."""
    inputs = [t.name for t, _ in group.inputs()]
    missing = [n for n in inputs if n not in stats]
    nodes = [layer.node.name for layer in group.layers]
    if missing:
        group.search = {"layers": nodes, "inputs": inputs, "skipped": f"no statistics for {', '.join(missing)}"}
        return
    rows = sum(stats[n].rows for n in inputs)
    mean_abs = sum(stats[n].mean_abs * stats[n].rows for n in inputs) / max(rows, 1)
    if not np.isfinite(mean_abs).all() or float(mean_abs.max()) <= 0.0:
        group.search = {"layers": nodes, "inputs": inputs, "skipped": "activations are all zero"}
        return
    weights = {w.name: np.moveaxis(constant_values(w).astype(np.float64), readers[0].k_axis, 0)
               for w, readers in group.weights()}
    # float32 products (float64 sums): the errors only need ranking, and this is the search's cost
    pairs = [(stats[layer.source.name].sample.astype(np.float32), layer.weight.name) for layer in group.layers]
    block = group.layers[0].block

    def energy(x: np.ndarray, w: np.ndarray) -> float:
        return float(np.sum(np.square(x @ w.astype(np.float32)), dtype=np.float64))

    signal = sum(energy(x, weights[w]) for x, w in pairs)
    errors = {}
    for alpha in ALPHAS:
        s = scales_for(mean_abs, alpha)
        residual = {name: _effective_error(w, s, block, mean_abs) for name, w in weights.items()}
        errors[alpha] = sum(energy(x, residual[w]) for x, w in pairs)
    best = min(ALPHAS, key=lambda a: (errors[a], a))  # ties: the smaller alpha (0 = RTN, no Mul)

    def db(err: float) -> float | None:
        return round(10 * np.log10(signal / err), 2) if err > 0 and signal > 0 else None

    group.mean_abs = mean_abs
    group.method, group.alpha = "awq", best
    group.scales = scales_for(mean_abs, best) if best > 0 else None
    group.search = {"layers": nodes, "inputs": inputs, "alpha": best, "sample_rows": int(sum(x.shape[0] for x, _ in pairs)),
                    "sample_sqnr_db_rtn": db(errors[0.0]), "sample_sqnr_db": db(errors[best]),
                    "relative_error": {str(a): round(errors[a] / signal, 6) if signal > 0 else None for a in ALPHAS}}


def check_alphas(graph: gs.Graph, candidates: dict, ctx: PassContext) -> dict:
    """Which of ``candidates`` (``{label: () -> the quantized gs.Graph}``, ``"searched"`` first and
    ``"alpha_0"``) has the least output error against ``graph`` on the first ``CHECK_SAMPLES``
    calibration samples: the worst output's SQNR decides, ``"searched"`` only when strictly
    higher. The per-layer search cannot see how the model weighs its layers' output channels (in a
    transformer with outlier channels a few residual channels carry most of the output, see
    ``quantize-int4``'s docstring); this check does. The candidates' runs are tasks of the run's
    executor (in-process by default)."""
    from calibration.executor import InProcessExecutor
    from calibration.sources import batch_len
    from optimizer.metrics import compare_batches
    from optimizer.runtime import OrtRunner, input_specs
    from passes.quant_search import candidate_outputs

    reference_model = graph_model(graph)
    source = calibration_source(reference_model, ctx, ctx.calibration)
    batches, samples = [], 0
    for batch in source.batches(ctx.original_inputs or input_specs(reference_model), 8):
        batches.append(batch)
        samples += batch_len(batch)
        if samples >= CHECK_SAMPLES:
            break
    runner = OrtRunner(reference_model)
    reference = [runner.run(b) for b in batches]
    executor = ctx.executor if ctx.executor is not None else InProcessExecutor()
    batches_ref = executor.share(batches)
    items = [(executor.share(graph_model(build()).SerializeToString()), batches_ref, {}) for build in candidates.values()]
    sqnr = {}
    for label, (outputs, _) in zip(candidates, executor.map(candidate_outputs, items, stage="awq output check")):
        values = [m.sqnr_db for m in compare_batches(reference, outputs) if m.sqnr_db is not None]
        sqnr[label] = round(min(values), 3) if values else None
    searched, fallback = sqnr.get("searched"), sqnr.get("alpha_0")
    # no float output to judge (both None): the search's result stands
    kept = "alpha_0" if fallback is not None and (searched is None or fallback >= searched) else "searched"
    return {"samples": samples, "output_sqnr_db": sqnr, "kept": kept}


def collect_group_stats(graph: gs.Graph, groups: list[Group], ctx: PassContext, means: bool) -> tuple[dict | None, dict]:
    """Statistics of every group's inputs (``calibration.channel_stats``: mean |x| and a bounded row
    sample, streamed) and, with ``means``, their signed per-channel means (for bias correction):
    ``({name: ChannelStats}, {name: mean}), calibration details``; ``(None, {"fallback": why})``
    without real calibration data."""
    from calibration.channel_stats import collect_channel_stats
    from calibration.collect import collect_channel_means

    if ctx.calibration is None:
        return None, {"fallback": "no calibration data (--calib)"}
    model = graph_model(graph)
    source = calibration_source(model, ctx, ctx.calibration)
    if source.synthetic:
        return None, {"fallback": "synthetic calibration data", "source": source.description}
    tensors = list(dict.fromkeys(t.name for g in groups for t, _ in g.inputs()))
    stats = collect_channel_stats(model, tensors, source, AWQ_ROWS, ctx.progress, max_samples=AWQ_SAMPLES)
    signed = {}
    if means:  # a second pass: ChannelStats has no signed mean (yet)
        signed = collect_channel_means(model, {t: -1 for t in stats}, source, ctx.calib_batch_size,
                                       max_samples=AWQ_SAMPLES).means
    return (dict(stats), signed), {"source": stats.source, "samples": stats.samples, "max_rows": AWQ_ROWS,
                                   "tensors": len(stats), "skipped": dict(stats.skipped)}


