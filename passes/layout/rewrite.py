"""Applying what layout-nchw accepted: flipped nodes read and write the untransposed tensors,
their Transposes go, and one Transpose is added for each labeled tensor still read in its own
layout; with io=nchw the changed inputs and outputs are recorded in the model's metadata."""

from __future__ import annotations

import json

import onnx_graphsurgeon as gs

from passes.graph_utils import detach, unique_name
from passes.layout.analysis import Analyzer, _Analysis
from passes.layout.handlers import _Edits
from optimizer.io_layout import LAYOUT_INPUTS_KEY, LAYOUT_OUTPUTS_KEY
from passes.layout.perms import Perm, channel_first_perm, invert, transposed_shape
from passes.layout.transposes import LayoutGraph


def commit(analyzer: Analyzer, a: _Analysis) -> tuple[dict[str, int], dict, dict[str, str]]:
    """Rewrite the accepted regions of ``a``; returns (stats, details, model metadata)."""
    layout = analyzer.layout
    g = layout.graph
    edits = _Edits(g)
    plans = [(node, plan) for node, plan in a.plans.values() if analyzer.accepted(a, node)]
    transposes = [node for node in a.transposes.values() if analyzer.accepted(a, node)]
    labeled = [(o, a.labels[id(o)]) for node in transposes for o in node.outputs if id(o) in a.labels]
    labeled += [(o, a.labels[id(o)]) for node, _ in plans for o in node.outputs if id(o) in a.labels]
    need = {id(o): analyzer.needs_transpose(a, o) for o, _ in labeled}
    cancelled = {id(n.outputs[0]) for n in transposes if id(n.outputs[0]) in a.aliases}

    def real(t: gs.Tensor) -> gs.Tensor:
        """``t``, or the tensor it equals once its (cancelled) Transpose is gone."""
        while id(t) in cancelled:
            t = a.aliases[id(t)][0]
        return t

    # 1. flipped nodes read the untransposed tensors and write untransposed outputs
    for node, plan in plans:
        for i in plan.pre_inputs:
            label = a.labels.get(id(node.inputs[i]))
            if label is not None:
                node.inputs[i] = real(label.pre)
        if plan.edit is not None:
            plan.edit(node, edits)
        for j, o in enumerate(list(node.outputs)):
            label = a.labels.get(id(o))
            if label is not None:
                node.outputs[j] = label.pre
    # 2. Transposes go; those composing to the identity hand their readers the source tensor
    inputs_nchw: dict[str, dict] = {}
    for node in transposes:
        out = node.outputs[0]
        if id(node) in layout.virtual:
            new = layout.virtual[id(node)][1]
            inputs_nchw[new.name] = {"perm": list(channel_first_perm(len(new.shape))), "shape": list(new.shape)}
        if id(out) in a.aliases:
            pre = real(a.aliases[id(out)][0])
            if id(out) in layout.outputs:
                node.op, node.attrs = "Identity", {}  # keeps the output name; cleanup removes it
                node.inputs[0] = pre
                continue
            for consumer in list(out.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is out:
                        consumer.inputs[i] = pre
        detach(node)
    # 3. one Transpose for each labeled tensor still read in its own layout
    new_nodes: list[gs.Node] = []
    outputs_nchw: dict[str, dict] = {}
    made: dict[tuple[int, Perm], gs.Tensor] = {}  # one Transpose per (source, perm)
    for o, label in labeled:
        pre = real(label.pre)
        if need[id(o)]:
            twin = made.get((id(pre), label.perm))
            if twin is not None and id(o) not in layout.outputs:
                for consumer in list(o.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is o:
                            consumer.inputs[i] = twin
            else:
                new_nodes.append(gs.Node("Transpose", name=unique_name(g, f"{o.name}_transpose"),
                                         attrs={"perm": list(label.perm)}, inputs=[pre], outputs=[o]))
                made.setdefault((id(pre), label.perm), o)
        if id(o) in layout.outputs and analyzer.convertible_output(a, o):
            shape = transposed_shape(o.shape, invert(label.perm))
            outputs_nchw[o.name] = {"perm": list(invert(label.perm)), "shape": list(shape) if shape else None}
            new_nodes.extend(_expose_as_output(layout, o, pre, label.perm))
    g.nodes = [n for n in g.nodes if n.inputs or n.outputs] + new_nodes
    details, metadata = {}, {}
    for key, changed in ((LAYOUT_INPUTS_KEY, inputs_nchw), (LAYOUT_OUTPUTS_KEY, outputs_nchw)):
        if changed:
            perms = {name: entry["perm"] for name, entry in changed.items()}
            metadata[key] = json.dumps(perms, sort_keys=True)
            details[key] = changed
    g.toposort()
    stats = {
        "moved": len(plans),
        "constants_permuted": edits.constants,
        "inputs_nchw": len(inputs_nchw),
        "outputs_nchw": len(outputs_nchw),
    }
    return stats, details, metadata


def _expose_as_output(layout: LayoutGraph, o: gs.Tensor, pre: gs.Tensor, perm: Perm) -> list[gs.Node]:
    """Make the untransposed ``pre`` the graph output, under ``o``'s name (io=nchw)."""
    g = layout.graph
    name = o.name
    o.name = unique_name(g, f"{name}_channel_last")
    indices = [i for i, t in enumerate(g.outputs) if t is o]
    shape = transposed_shape(o.shape, invert(perm))
    local = len(pre.inputs) == 1 and any(n is pre.inputs[0] for n in g.nodes)
    if (
        isinstance(pre, gs.Variable)
        and local
        and not any(t is pre for t in g.inputs)
        and not any(t is pre for t in g.outputs)
    ):
        pre.name = name
        pre.dtype = pre.dtype if pre.dtype is not None else o.dtype
        pre.shape = pre.shape if pre.shape is not None else shape
        for i in indices:
            g.outputs[i] = pre
        return []
    out = gs.Variable(name, dtype=o.dtype, shape=shape)
    for i in indices:
        g.outputs[i] = out
    return [gs.Node("Identity", name=unique_name(g, f"{name}_identity"), inputs=[pre], outputs=[out])]
