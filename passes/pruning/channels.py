"""``prune-channels``: structured channel pruning over channel groups.

Chooses which channels of each group to keep (importance: weight norms, BatchNorm gamma, or
activation statistics on the calibration data; per-layer or global ratios), compensates removed
channels with their mean, applies the edits, and records what was pruned in the model so a second
run knows the original channel counts.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.errors import InputError
from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.pass_base import register_pass
from passes.graph_utils import (
    constant_values,
    count_macs,
    infer_tensor_types,
)
from passes.pruning.common import UNBOUNDED
from passes.pruning.edits import apply_edits, fold_constants, fold_into_bias, weight_values
from passes.pruning.groups import ChannelAnalysis, ChannelGroup
from passes.pruning.maps import _Use
from passes.pruning.sparsity import is_2to4
from passes.skips import Skips

log = logging.getLogger(__name__)

#: Model metadata key (``PassResult.metadata``).
PRUNING_KEY = "pruning.channels"


# ============================================================================ bookkeeping
def _live_params(graph: gs.Graph) -> int:
    """Elements of the constants that live nodes read (initializers and Constant nodes); nodes a
    rewrite left unused (cleaned up later) do not count."""
    live: set[int] = set()
    stack = [t for t in graph.outputs]
    while stack:
        tensor = stack.pop()
        for node in tensor.inputs:
            if id(node) not in live:
                live.add(id(node))
                stack.extend(node.inputs)
    total, seen = 0, set()
    for node in graph.nodes:
        if id(node) not in live:
            continue
        for t in node.inputs:
            if isinstance(t, gs.Constant) and t.name not in seen:
                seen.add(t.name)
                total += int(np.prod(t.shape, dtype=np.int64))
        value = node.attrs.get("value") if node.op == "Constant" else None
        if isinstance(value, gs.Constant):
            total += int(np.prod(value.shape, dtype=np.int64))
    return total


def _shapes(types: dict) -> dict[str, tuple]:
    return {name: shape for name, (shape, _) in types.items() if shape is not None}


_RECORD_LINE = re.compile(rf"^{re.escape(PRUNING_KEY)}: (\{{.*\}})$", re.MULTILINE)


def read_pruning_record(graph: gs.Graph, metadata: dict[str, str] | None = None) -> dict[str, int]:
    """Original channel counts of the groups already pruned, by producer layer name: from the
    model's ``metadata`` (``PassContext.model_metadata``), else the graph's doc string."""
    text = (metadata or {}).get(PRUNING_KEY)
    if text is None:
        match = _RECORD_LINE.search(graph.doc_string or "")
        text = match.group(1) if match else None
    try:
        record = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {str(k): int(v) for k, v in record.items()} if isinstance(record, dict) else {}


def _write_pruning_record(graph: gs.Graph, record: dict[str, int]) -> dict[str, str]:
    """Record ``record`` in the graph's doc string; returns it as model metadata (``PassResult.metadata``)."""
    # Model metadata is the record's home; the graph's doc_string keeps a copy because it survives
    # every export, so a second run knows what was pruned (and from how many channels).
    text = json.dumps(dict(sorted(record.items())), sort_keys=True)
    doc = _RECORD_LINE.sub("", graph.doc_string or "").strip()
    graph.doc_string = (doc + "\n" if doc else "") + f"{PRUNING_KEY}: {text}"
    return {PRUNING_KEY: text}


def _parse_ratios(items: list[str]) -> dict[str, float]:
    ratios = {}
    for item in items:
        name, sep, value = str(item).rpartition(":")
        if not sep or not name:
            raise ValueError(f"ratios entries are 'layer:ratio' (e.g. conv1:0.5); got {item!r}")
        try:
            r = float(value)
        except ValueError:
            raise ValueError(f"ratio of '{name}' must be a number in [0, 1); got {value!r}") from None
        if not 0.0 <= r < 1.0:
            raise ValueError(f"ratio of '{name}' must be in [0, 1); got {r}")
        ratios[name] = r
    return ratios


def kept_count(original: int, ratio: float, multiple: int, min_channels: int) -> int:
    """Channels to keep out of ``original``: remove ``ratio`` of them, round the kept count up to a
    multiple of ``multiple``, never below ``min_channels`` and never all of them."""
    keep = original - math.floor(original * ratio + 1e-9)
    keep = int(math.ceil(keep / multiple) * multiple)
    return max(1, min(original, max(keep, min_channels)))


# ============================================================================ prune-channels
@register_pass
@dataclass(frozen=True)
class PruneChannels(Pass):
    """Structured channel pruning: remove whole output channels of Conv/ConvTranspose/Gemm/MatMul
    layers together with everything that reads or transforms them::

        x -> Conv_a(64) -> BN -> Relu -> Conv_b(in 64)       becomes
        x -> Conv_a(48) -> BN(48) -> Relu -> Conv_b(in 48)   (weights, bias, BN params sliced)

    Channels are pruned per *group* (see ``find_channel_groups``): a residual ``Add``/``Sum`` ties
    all its branches into one group; ``Concat`` maps each input's channels to a range of the output;
    depthwise convs are pruned along with their group (channel c in -> c out, ``group`` updated);
    per-channel ``Mul``/``Add``/BN/InstanceNorm/PRelu constants and per-channel Q/DQ scales are
    sliced; ``Flatten`` (or a Reshape that flattens) before a Gemm/MatMul maps a channel to its H*W
    rows; MatMul layers on [batch, tokens, features] prune features (the last axis). Blocked, and
    counted as ``blocked_<reason>``: graph outputs, Transpose, other Reshapes, ops that mix
    channels (Softmax/LayerNorm/reductions over them, LRN), grouped (non-depthwise) convs, weights
    that are not constants (or DequantizeLinear of constants), subgraphs, unknown ops.

    Options:

    - ``ratio`` (0.3): fraction of each group's channels to remove. ``multiple`` (8): the kept
      count is rounded *up* to a multiple, so TensorRT's kernels stay efficient; ``min_channels``
      (8): never keep fewer (and never remove all).
    - ``ratios``: per-group overrides ``[layer:ratio, ...]`` keyed by producer layer name, e.g.
      ``prune-channels(ratios=[conv1:0.5,conv3:0.25])``; a group with several producers takes the
      largest ratio named. Names that match no prunable group are listed in ``ratios_unmatched``.
    - ``scope``: layer (every group loses ``ratio``) | global (importances normalized per group and
      ranked across groups: ``ratio`` of all channels go, taken where they matter least).
    - ``importance``: l1 | l2 (norm of each output channel's weights) | bn-gamma (|gamma| of a
      BatchNormalization right after the layer; run it before ``fuse-conv-bn``) | activation
      (std of the channel on the calibration data x the norm of the weights reading it: the error
      its removal leaves once its mean is compensated). Without the needed BN or data it falls
      back to l1 (counted in ``importance_fallback_l1``).
    - ``compensate`` (true): with calibration data (``--calib``), the mean of every removed channel
      at each Conv/Gemm (or MatMul followed by ``Add(bias)``) that reads it is folded into that
      layer's bias, so the layer keeps its average output. Without calibration data nothing is compensated (details say so); the
      evaluation data is never used for this.
    - ``only_zero``: remove only channels whose removal is exact. A channel is constant when its
      producers' weights are all zero (it is then its bias); BN, activations, per-channel
      constants and depthwise convs map constants to constants. It may go when, at every layer
      reading it, the constant is 0, or that layer can absorb it into its bias exactly (a Conv
      without padding, a Gemm, a MatMul followed by ``Add(bias)``). A zero channel after a BN with beta != 0 feeding a padded conv
      stays. ``multiple``/``min_channels`` still apply: set them to 1 to remove every such channel.

    Ratios are relative to a group's channel count before any pruning: the model records what was
    pruned (metadata ``pruning.channels``, mirrored in the graph doc string), so running the pass
    again with the same options changes nothing, and a larger ratio prunes further. With
    ``scope=global`` a group is ranked once; later global runs leave it alone.

    Accuracy: pruning without fine-tuning changes the outputs by an amount that depends on the
    model and no fixed bound describes, so verification checks validity only (the model loads,
    runs, keeps its outputs' names, shapes and types). Measure accuracy with ``--data`` and choose
    ratios with the accuracy-budget search. Stats: ``params_before/after``, ``macs_before/after``
    (Conv/Gemm/MatMul, per sample), ``groups``, ``groups_pruned``, ``groups_blocked``,
    ``blocked_<reason>``, ``channels_removed``; details: every pruned group (producers, consumers,
    channels, kept, removed, original) and every blocked group with its reasons.
    """

    name = "prune-channels"
    lossy = True
    uses_calibration = True
    tunable = "prune"
    tolerance = UNBOUNDED

    importance: Literal["l1", "l2", "bn-gamma", "activation"] = "l1"
    ratio: float = 0.3
    scope: Literal["layer", "global"] = "layer"
    multiple: int = 8
    min_channels: int = 8
    ratios: list[str] = field(default_factory=list)
    only_zero: bool = False
    compensate: bool = True

    def __post_init__(self):
        if self.importance not in ("l1", "l2", "bn-gamma", "activation"):
            raise self.option_error(f"importance must be l1, l2, bn-gamma or activation; got {self.importance!r}")
        if self.scope not in ("layer", "global"):
            raise self.option_error(f"scope must be layer or global; got {self.scope!r}")
        if not 0.0 <= float(self.ratio) < 1.0:
            raise self.option_error(f"ratio must be in [0, 1); got {self.ratio}")
        if int(self.multiple) < 1 or int(self.min_channels) < 1:
            raise self.option_error("multiple and min_channels must be >= 1")
        try:
            _parse_ratios(self.ratios)
        except ValueError as exc:
            raise self.option_error(str(exc)) from None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        types = infer_tensor_types(graph, ctx.input_shapes)
        analysis = ChannelAnalysis(graph, types, track_constants=self.only_zero)
        groups = analysis.groups()
        stats: dict[str, int | float] = {"groups": len(groups)}
        blocked = [grp for grp in groups if grp.blocked]
        for grp in blocked:
            key = f"blocked_{grp.blocked}"
            stats[key] = stats.get(key, 0) + 1
        stats["groups_blocked"] = len(blocked)
        details: dict = {
            "blocked": [{"producers": g.producers, "channels": g.channels, "reason": g.blocked, "reasons": g.reasons} for g in blocked],
        }
        record = read_pruning_record(graph, ctx.model_metadata)
        activations = None
        if not self.only_zero and (self.compensate or self.importance == "activation"):
            if ctx.calibration is not None:
                try:
                    activations = channel_statistics(graph, sorted({u.tensor for u in analysis.uses}), analysis, ctx)
                    details["calibration_samples"] = activations.pop("__samples__", 0)
                except InputError as exc:  # data that does not fit, a model ONNX Runtime cannot run
                    log.warning("prune-channels: no activation statistics (%s); pruning without them", exc)
                    details["calibration"] = f"unusable: {exc}"
            else:
                details["calibration"] = "none: no compensation, activation importance falls back to l1"
        skips = Skips()
        plan, info = self._plan(analysis, [g for g in groups if not g.blocked], record, stats, details, skips,
                                activations)
        stats["groups_pruned"] = len(plan)
        if not plan:
            stats["channels_removed"] = 0
            return PassResult(False, stats=stats, details=details, skipped=skips)
        params_before = _live_params(graph)
        macs_before = count_macs(graph, _shapes(types))
        sparse_before = _sparse_consumers(analysis, plan)
        if self.only_zero:
            stats["layers_folded"] = fold_constants(analysis, graph, plan)
        elif self.compensate and activations is not None:
            means = {name: mean for name, (mean, _) in activations.items()}
            stats["layers_compensated"] = fold_into_bias(analysis, graph, plan, means, analysis.uses)
        apply_edits(analysis, graph, plan)
        broken = sorted(label for label, use in sparse_before.items()
                        if not is_2to4(weight_values(use.node.inputs[1]), use.weight_axis))
        if broken:
            # slicing input channels shifts the blocks of 4: prune first, then sparsify-2to4
            stats["layers_2to4_broken"] = len(broken)
            details["layers_2to4_broken"] = broken
            log.warning("prune-channels broke the 2:4 sparsity of %s; run sparsify-2to4 after prune-channels", ", ".join(broken))
        for grp in groups:
            # global scope decides every group it ranked once; layer scope only records what it pruned
            decided = self.scope == "global" and not grp.blocked and not self.only_zero
            if grp.root in plan or decided:
                for p in grp.producers:
                    record.setdefault(p, grp.channels)
        metadata = _write_pruning_record(graph, record)
        after = infer_tensor_types(graph, ctx.input_shapes)
        stats.update(
            channels_removed=sum(i["removed"] for i in info),
            params_before=params_before,
            params_after=_live_params(graph),
            macs_before=macs_before,
            macs_after=count_macs(graph, _shapes(after)),
        )
        details["groups"] = info
        return PassResult(True, stats=stats, details=details, skipped=skips, metadata=metadata)

    # -- choosing channels ---------------------------------------------------------------------
    def _plan(self, analysis: ChannelAnalysis, groups: list[ChannelGroup], record: dict[str, int], stats, details,
              skips: Skips, activations: dict | None = None):
        ratios = _parse_ratios(self.ratios)
        named = {p for g in groups for p in g.producers}
        unmatched = sorted(set(ratios) - named)
        if unmatched:
            details["ratios_unmatched"] = unmatched
            stats["ratios_unmatched"] = len(unmatched)
            log.warning("prune-channels: no prunable group is produced by %s", ", ".join(unmatched))
        plan: dict[int, np.ndarray] = {}
        info: list[dict] = []
        fallbacks = 0
        scores: dict[int, np.ndarray] = {}
        for grp in groups:
            if not self.only_zero:
                scores[grp.root], fell_back = self._importance(analysis, grp, activations)
                fallbacks += fell_back
        if self.importance in ("bn-gamma", "activation"):
            stats["importance_fallback_l1"] = fallbacks
        targets: dict[int, int] = {}
        pool: list[ChannelGroup] = []
        for grp in groups:
            original = max([record.get(p, 0) for p in grp.producers] + [grp.channels])
            explicit = [ratios[p] for p in grp.producers if p in ratios]
            if self.only_zero:
                removable = analysis.removable(grp.root)
                stats["removable_channels"] = stats.get("removable_channels", 0) + int(removable.sum())
                keep = kept_count(grp.channels, removable.sum() / grp.channels, self.multiple, self.min_channels)
                keep = max(keep, int((~removable).sum()))
                if keep < grp.channels:
                    # keep every channel that is not removable, then as few removable ones as rounding needs
                    order = np.lexsort((np.arange(grp.channels), removable))
                    targets[grp.root] = keep
                    scores[grp.root] = np.where(removable, 0.0, 1.0)
                    plan[grp.root] = np.sort(order[:keep])
                continue
            if explicit:
                targets[grp.root] = kept_count(original, max(explicit), self.multiple, self.min_channels)
            elif self.scope == "global":
                if any(p in record for p in grp.producers):
                    skips.add("already_pruned")
                    continue
                pool.append(grp)
            else:
                targets[grp.root] = kept_count(original, self.ratio, self.multiple, self.min_channels)
        if pool:
            targets.update(self._global_targets(pool, scores))
        for grp in groups:
            keep = targets.get(grp.root)
            if keep is None or keep >= grp.channels:
                continue
            if grp.root not in plan:
                order = np.lexsort((np.arange(grp.channels), -scores[grp.root]))
                plan[grp.root] = np.sort(order[:keep])
            info.append({
                "producers": grp.producers,
                "consumers": grp.consumers,
                "channels": grp.channels,
                "kept": int(plan[grp.root].size),
                "removed": int(grp.channels - plan[grp.root].size),
                "original": max([record.get(p, 0) for p in grp.producers] + [grp.channels]),
            })
        return plan, info

    def _global_targets(self, pool: list[ChannelGroup], scores: dict[int, np.ndarray]) -> dict[int, int]:
        entries = []
        for grp in pool:
            s = scores[grp.root]
            mean = float(s.mean()) if s.size else 0.0
            normalized = s / mean if mean > 0 else np.zeros_like(s)
            entries.extend((float(v), grp.root, c) for c, v in enumerate(normalized))
        entries.sort()
        budget = math.floor(len(entries) * self.ratio + 1e-9)
        removed: dict[int, int] = {}
        for _, root, _ in entries[:budget]:
            removed[root] = removed.get(root, 0) + 1
        targets = {}
        for grp in pool:
            n = removed.get(grp.root, 0)
            targets[grp.root] = kept_count(grp.channels, n / grp.channels, self.multiple, self.min_channels) if n else grp.channels
        return targets

    def _importance(self, analysis: ChannelAnalysis, grp: ChannelGroup, activations: dict | None) -> tuple[np.ndarray, int]:
        """Per-channel importance of a group: each producer's scores normalized by their mean, summed."""
        total = np.zeros(grp.channels)
        if self.importance == "activation" and activations is not None:
            scores = _activation_importance(analysis, grp.root, activations)
            if scores is not None:
                return scores, 0
        fallbacks = 0
        for i in analysis.members(grp.root):
            src = analysis.sources[i]
            node = src.producer
            if node is None:
                continue
            scores = None
            if self.importance == "bn-gamma":
                scores = _bn_gamma(analysis.graph, node)
                fallbacks += scores is None
            elif self.importance == "activation":
                fallbacks += 1
            if scores is None:
                w = weight_values(node.inputs[1])
                axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}.get(node.op, 0 if node.attrs.get("transB", 0) else 1)
                rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
                scores = np.abs(rows).sum(axis=1) if self.importance != "l2" else np.sqrt((rows * rows).sum(axis=1))
            mean = float(np.mean(scores)) if scores.size else 0.0
            total += scores / mean if mean > 0 else scores
        return total, fallbacks


def _sparse_consumers(analysis: ChannelAnalysis, plan: dict[int, np.ndarray]) -> dict[str, _Use]:
    """Layers whose input channels are about to be sliced and whose weights are 2:4 sparse now."""
    found = {}
    for use in analysis.uses:
        if analysis.touches(use.cmap, plan) and use.node.op in ("Conv", "Gemm", "MatMul"):
            w = weight_values(use.node.inputs[1])
            if w is not None and w.shape[use.weight_axis] % 4 == 0 and is_2to4(w, use.weight_axis):
                found[analysis.labels[id(use.node)]] = use
    return found


def _activation_importance(analysis: ChannelAnalysis, root: int, activations: dict) -> np.ndarray | None:
    """sum over consumers of std(channel at the consumer input) * ||consumer weights of the channel||:
    the error a removed channel leaves once its mean is compensated. None without measurements."""
    total = np.zeros(analysis.sources[root].channels)
    found = False
    for use in analysis.uses:
        if use.tensor not in activations:
            continue
        std = activations[use.tensor][1]
        rows = np.moveaxis(weight_values(use.node.inputs[1]), use.weight_axis, 0)
        norms = np.sqrt((rows.reshape(rows.shape[0], -1) ** 2).sum(axis=1))
        offset = 0
        for s in use.cmap.segments:
            span = s.length * s.block
            if analysis.find(s.source) == root:
                total += (std[offset:offset + span] * norms[offset:offset + span]).reshape(s.length, s.block).sum(axis=1)
                found = True
            offset += span
    return total if found else None


def channel_statistics(graph: gs.Graph, tensors: list[str], analysis: ChannelAnalysis, ctx: PassContext,
                       max_samples: int = 512) -> dict:
    """Per-position mean and std (along each tensor's channel axis) on the calibration data,
    streamed by ``calibration.collect.collect_channel_means`` (exact sums of values and squares:
    the same for any batch size, memory flat in the number of samples).

    Returns ``{tensor: (mean, std)}`` plus ``"__samples__"``. Tensors that cannot be measured are left out.
    """
    from calibration.collect import collect_channel_means
    from passes.graph_model import calibration_source, graph_model

    model = graph_model(graph)
    axes = {name: analysis.carry[name].axis for name in tensors}
    stats = collect_channel_means(model, axes, calibration_source(model, ctx, ctx.calibration), ctx.calib_batch_size,
                                  max_samples=max_samples, squares=True)
    result: dict = {"__samples__": stats.samples}
    for name, mean in stats.means.items():
        std = np.sqrt(np.maximum(stats.mean_squares[name] - mean * mean, 0.0))
        if np.all(np.isfinite(mean)) and np.all(np.isfinite(std)):
            result[name] = (mean, std)
    return result


def _bn_gamma(graph: gs.Graph, layer: gs.Node) -> np.ndarray | None:
    """|gamma| of the BatchNormalization reading ``layer``'s output, if there is one."""
    for reader in layer.outputs[0].outputs:
        if reader.op == "BatchNormalization" and reader.inputs[0] is layer.outputs[0]:
            gamma = constant_values(reader.inputs[1])
            if gamma is not None:
                return np.abs(gamma.astype(np.float64).reshape(-1))
    return None
