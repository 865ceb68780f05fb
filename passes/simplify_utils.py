"""Helpers shared by the simplification passes (``simplify-layout-ops``,
``remove-noop-arithmetic``, ``cse``, ``fold-shapes``).

Every rewrite those passes make is exact (the optimized model computes bit-identical values, with
the one documented exception of ``x + 0`` turning ``-0.0`` into ``+0.0``). Static shapes come from
onnx shape inference; where a shape or type is not known statically, the site is skipped and
counted.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.pass_base import PassResult
from passes.graph_utils import InferredType, all_graphs, constant_values, fresh_name
from passes.skips import Skips

#: Safety bound on simplification rounds inside one run (each round only ever removes work).
_MAX_ROUNDS = 32


class _Names:
    """Fresh tensor names for one pass run (computing the used set once, not per name)."""

    def __init__(self, graph: gs.Graph):
        self.used = {t.name for g in all_graphs(graph) for t in g.tensors().values()}

    def new(self, base: str) -> str:
        return fresh_name(base, self.used)


def _shape(tensor: gs.Tensor, types: dict[str, InferredType]) -> tuple[int | None, ...] | None:
    """Dims of ``tensor`` (None for unknown ones), or None when even the rank is unknown."""
    if isinstance(tensor, gs.Constant):
        return tuple(int(d) for d in tensor.shape)
    entry = types.get(tensor.name)
    if entry is not None and entry[0] is not None:
        return entry[0]
    if tensor.shape is not None:
        return tuple(d if isinstance(d, int) and d >= 0 else None for d in tensor.shape)
    return None


def _static(shape: tuple[int | None, ...] | None) -> tuple[int, ...] | None:
    return shape if shape is not None and all(d is not None for d in shape) else None


def _position(tensors: list[gs.Tensor], tensor: gs.Tensor) -> int:
    """Index of ``tensor`` itself in ``tensors`` (``list.index`` would compare tensors by value)."""
    return next(i for i, t in enumerate(tensors) if t is tensor)


def _result(counts: Counter, changed: bool, skips: Skips | None = None) -> PassResult:
    """The nonzero counts as stats, and the sites refused by reason (``skips``)."""
    return PassResult(changed=changed, stats={k: int(v) for k, v in sorted(counts.items()) if v},
                      skipped={k: int(v) for k, v in sorted((skips or {}).items()) if v})


def _slice_inputs(node: gs.Node) -> list[np.ndarray | None] | None:
    """A Slice's starts, ends, axes, steps inputs (opset >= 10) as flat constants, None where
    omitted; None altogether if a given one is not constant."""
    values: list[np.ndarray | None] = []
    for i in range(1, 5):
        t = node.inputs[i] if i < len(node.inputs) else None
        if t is None or not t.name:
            values.append(None)
            continue
        value = constant_values(t)
        if value is None:
            return None
        values.append(value.reshape(-1))
    return values
