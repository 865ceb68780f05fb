"""``sparsify-2to4`` (2:4 structured sparsity for TensorRT's sparse tensor cores) and
``prune-magnitude`` (unstructured magnitude pruning)."""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.pass_base import register_pass
from passes.graph_utils import constant_values, is_default_domain
from passes.graph_utils import FLOAT_TYPES
from passes.pruning.common import LAYER_OPS, UNBOUNDED, _label
from passes.pruning.edits import _pruned_name
from passes.skips import Skips

#: Model metadata key (``PassResult.metadata``).
SPARSITY_KEY = "sparsity.2to4"


# ============================================================================ 2:4 sparsity
def _reduction_axis(node: gs.Node, w: np.ndarray) -> int | None:
    """Axis of the weight that the layer sums over (input channels / K)."""
    if node.op == "Conv":
        return 1
    if node.op == "Gemm":
        return 1 if node.attrs.get("transB", 0) else 0
    if node.op == "MatMul" and w.ndim == 2:
        return 0
    return None


def _output_axis(node: gs.Node, w: np.ndarray) -> int:
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1


def sparsify_2to4(w: np.ndarray, axis: int) -> np.ndarray:
    """Keep the 2 largest magnitudes of every 4 consecutive values along ``axis`` (size % 4 == 0)."""
    moved = np.moveaxis(w, axis, -1)
    blocks = moved.reshape(-1, 4)
    order = np.argsort(-np.abs(blocks), axis=1, kind="stable")
    mask = np.zeros(blocks.shape, bool)
    np.put_along_axis(mask, order[:, :2], True, axis=1)
    pruned = np.where(mask, blocks, np.zeros((), w.dtype)).reshape(moved.shape)
    return np.ascontiguousarray(np.moveaxis(pruned, -1, axis))


def is_2to4(w: np.ndarray, axis: int) -> bool:
    """True when every 4 consecutive values along ``axis`` hold at most 2 nonzeros."""
    if w.shape[axis] % 4:
        return False
    blocks = np.moveaxis(w, axis, -1).reshape(-1, 4)
    return bool(np.all(np.count_nonzero(blocks, axis=1) <= 2))


@register_pass
@dataclass(frozen=True)
class Sparsify2to4(Pass):
    """2:4 structured sparsity for TensorRT's sparse tensor cores: in every 4 consecutive weights
    along the reduction axis, keep the 2 largest magnitudes and zero the others::

        Conv W[Cout, Cin, kh, kw]: blocks of 4 input channels, for each (Cout, kh, kw)
        Gemm/MatMul B[K, N] (or [N, K] with transB): blocks of 4 along K

    Eligible layers: Conv with ``group=1``, Gemm, and MatMul with a constant 2-D weight, whose
    weight is a float constant, whose reduction size (Cin or K) is a multiple of 4, and whose input
    and output channels are both at least ``min_channels`` (64). The layers made (or found) 2:4
    sparse are listed in the model metadata ``sparsity.2to4`` (a JSON list of node names) and in
    the details, so the engine build can enable sparsity.

    TensorRT uses sparse kernels only when the engine is built with sparsity enabled
    (``BuilderFlag.SPARSE_WEIGHTS``, ``trtexec --sparsity=enable``), on GPUs with sparse tensor cores
    (Ampere and newer), in FP16/INT8 precision, and only for layers where a sparse kernel is faster
    than the dense one: typically large layers (hundreds of channels; small ones gain nothing).
    The model keeps its size (the zeros are stored).

    Accuracy: zeroing half the weights without fine-tuning (e.g. NVIDIA ASP) costs accuracy;
    verification checks validity only. Measure it with ``--data``. Skipped layers are counted as
    ``skipped_<reason>``.
    """

    name = "sparsify-2to4"
    lossy = True
    tolerance = UNBOUNDED

    min_channels: int = 64
    exclude: list[str] = field(default_factory=list)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        skips = Skips()
        marked: list[str] = []
        layers: list[dict] = []
        done: dict[tuple[str, int], gs.Constant] = {}
        changed = 0
        for i, node in enumerate(graph.nodes):
            if node.op not in ("Conv", "Gemm", "MatMul") or not is_default_domain(node) or len(node.inputs) < 2:
                continue
            label = _label(node, i)
            reason = self._check(node, label)
            if reason:
                skips.add(reason)
                continue
            w_t = node.inputs[1]
            w = constant_values(w_t)
            axis = _reduction_axis(node, w)
            if is_2to4(w, axis):
                new_w = w
            else:
                key = (w_t.name, axis)
                if key not in done:
                    done[key] = gs.Constant(_pruned_name(graph, w_t.name, "sparse24"), sparsify_2to4(w, axis))
                node.inputs[1] = done[key]
                new_w = done[key].values
                changed += 1
            marked.append(label)
            layers.append({"layer": label, "weight": node.inputs[1].name, "shape": list(w.shape), "axis": axis,
                           "zeros": round(float(np.mean(new_w == 0)), 4)})
        stats = {"layers_2to4": len(marked), "layers_sparsified": changed}
        metadata = {SPARSITY_KEY: json.dumps(marked)} if marked else {}
        return PassResult(changed > 0, stats=stats, skipped=skips, details={SPARSITY_KEY: marked, "layers": layers},
                          metadata=metadata)

    def _check(self, node: gs.Node, label: str) -> str:
        if label in self.exclude:
            return "excluded"
        w = constant_values(node.inputs[1])
        if w is None:
            return "weight_not_constant"
        if w.dtype.type not in FLOAT_TYPES:
            return "weight_not_float"
        if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
            return "grouped_conv"
        axis = _reduction_axis(node, w)
        if axis is None or w.ndim < 2:
            return "weight_not_2d"
        if w.shape[axis] % 4:
            return "reduction_not_multiple_of_4"
        if min(w.shape[axis], w.shape[_output_axis(node, w)]) < self.min_channels:
            return "too_small"
        return ""


# ============================================================================ magnitude pruning
@register_pass
@dataclass(frozen=True)
class PruneMagnitude(Pass):
    """Unstructured magnitude pruning: zero the smallest-magnitude weights of Conv, ConvTranspose,
    Gemm and MatMul layers until a fraction ``sparsity`` (0.5) of them is zero::

        W = [0.9, -0.01, 0.3, 0.002]   --sparsity=0.5-->   [0.9, 0, 0.3, 0]

    ``scope`` layer (each weight tensor reaches ``sparsity``) | global (one magnitude threshold for
    all of them, so layers with small weights lose more). Only float constant weights; biases are
    kept. ``exclude`` lists layer names to leave dense.

    What it buys, honestly: the model file has the same size and dense kernels (TensorRT, ONNX
    Runtime) run at the same speed; zeros only pay off when the weights are compressed (zip, a
    sparse storage format) or run by a sparse kernel. The details report each layer's sparsity
    and ``compressed_bytes_before/after`` (zlib size of the pruned weights). For a speed-up on
    TensorRT use ``sparsify-2to4`` or ``prune-channels``. Accuracy: without fine-tuning it drops;
    verification checks validity only, so measure accuracy with ``--data``.
    """

    name = "prune-magnitude"
    lossy = True
    tolerance = UNBOUNDED

    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "layer"
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise self.option_error(f"sparsity must be in [0, 1); got {self.sparsity}")
        if self.scope not in ("layer", "global"):
            raise self.option_error(f"scope must be layer or global; got {self.scope!r}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        skips = Skips()
        weights: dict[str, tuple[np.ndarray, list[tuple[gs.Node, str]]]] = {}
        for i, node in enumerate(graph.nodes):
            if node.op not in LAYER_OPS or not is_default_domain(node) or len(node.inputs) < 2:
                continue
            label = _label(node, i)
            w = constant_values(node.inputs[1])
            reason = "excluded" if label in self.exclude else "weight_not_constant" if w is None else (
                "weight_not_float" if w.dtype.type not in FLOAT_TYPES else "")
            if reason:
                skips.add(reason)
                continue
            name = node.inputs[1].name
            weights.setdefault(name, (w, []))[1].append((node, label))
        if not weights:
            return PassResult(False, skipped=skips)
        masks = self._masks({name: w for name, (w, _) in weights.items()})
        total = sum(w.size for w, _ in weights.values())
        zeros_before = sum(int(np.count_nonzero(w == 0)) for w, _ in weights.values())
        layers, pruned, bytes_before, bytes_after = [], 0, 0, 0
        for name, (w, users) in weights.items():
            mask = masks.get(name)
            new_w = w if mask is None else np.where(mask, np.zeros((), w.dtype), w)
            newly = int(np.count_nonzero(new_w == 0) - np.count_nonzero(w == 0))
            if newly > 0:
                bytes_before += len(zlib.compress(w.tobytes(), 6))
                bytes_after += len(zlib.compress(new_w.tobytes(), 6))
                const = gs.Constant(_pruned_name(graph, name, "sparse"), np.ascontiguousarray(new_w))
                for node, _ in users:
                    node.inputs[1] = const
                pruned += newly
            layers.append({"layers": [label for _, label in users], "weight": name, "elements": int(w.size),
                           "sparsity": round(float(np.mean(new_w == 0)), 4)})
        stats = {
            "layers": sum(len(users) for _, users in weights.values()),
            "weights_pruned": pruned,
            "sparsity_before": round(zeros_before / total, 4),
            "sparsity_after": round((zeros_before + pruned) / total, 4),
            "compressed_bytes_before": bytes_before,
            "compressed_bytes_after": bytes_after,
        }
        return PassResult(pruned > 0, stats=stats, skipped=skips, details={"layers": layers})

    def _masks(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Which weights to zero: the smallest magnitudes, only where too few are zero already."""
        masks = {}
        if self.scope == "layer":
            for name, w in weights.items():
                k = math.floor(w.size * self.sparsity + 1e-9)
                if np.count_nonzero(w == 0) >= k or k == 0:
                    continue
                flat = np.abs(w.astype(np.float64)).reshape(-1)
                order = np.argsort(flat, kind="stable")[:k]
                mask = np.zeros(w.size, bool)
                mask[order] = True
                masks[name] = mask.reshape(w.shape)
            return masks
        names = list(weights)
        flat = np.concatenate([np.abs(weights[n].astype(np.float64)).reshape(-1) for n in names])
        k = math.floor(flat.size * self.sparsity + 1e-9)
        if k == 0 or np.count_nonzero(flat == 0) >= k:
            return masks
        chosen = np.zeros(flat.size, bool)
        chosen[np.argsort(flat, kind="stable")[:k]] = True
        offset = 0
        for n in names:
            size = weights[n].size
            masks[n] = chosen[offset:offset + size].reshape(weights[n].shape)
            offset += size
        return masks
