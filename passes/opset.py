"""Opset upgrade: raise a model's default-domain opset with onnx's version converter.

TensorRT's ONNX parser and INT8 per-channel weights (``DequantizeLinear`` with ``axis``) need
opset 13; exporters still write opset 10-12 (Paddle2ONNX, older torch and tf2onnx). The upgrade
rewrites only what the new opset spells differently (``Squeeze``/``Unsqueeze``/``ReduceSum``
axes and ``Split`` sizes become inputs, ``Clip`` bounds ...); the model computes the same thing,
which the manager's verification checks like for any other lossless pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.pass_base import register_pass

log = logging.getLogger(__name__)

#: The converter's adapters are trusted from here; older models are refused.
OLDEST_CONVERTIBLE = 7
#: The opset TensorRT's parser reads and per-channel Q/DQ needs.
PER_CHANNEL_QDQ_OPSET = 13
DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(graph: gs.Graph) -> int | None:
    """The graph's default-domain (``ai.onnx``) opset, None when it imports none."""
    domains = graph.__dict__.get("import_domains")  # graph.__dict__: gs treats unknown attributes as ops
    if domains:
        versions = [int(d.version) for d in domains if d.domain in DEFAULT_DOMAINS]
        return versions[0] if versions else None
    return int(graph.opset) if graph.opset else None


@register_pass
@dataclass(frozen=True)
class UpgradeOpset(Pass):
    """Upgrade the model's default-domain opset to ``min`` with onnx's version converter::

        opset 11: Unsqueeze(x, axes=[0]),  Split(x, split=[2, 2]),  ReduceSum(x, axes=[1])
        opset 13: Unsqueeze(x, [0]),       Split(x, [2, 2]),        ReduceSum(x, [1])

    The converter rewrites every op whose signature changed between the two opsets (attributes
    that became inputs, new type constraints), inside If/Loop/Scan bodies too; the result must
    pass the onnx checker and then the manager's numeric verification, as for any lossless pass.
    Node names, tensor names, graph inputs and outputs, custom-domain ops and their domain
    imports are kept. It is what makes INT8 weights per channel (``DequantizeLinear`` with
    ``axis`` exists from opset 13; below, ``quantize-int8`` can only quantize weights per tensor,
    which can cost most of a model's accuracy) and is what TensorRT's parser reads (opset 13+):
    ``--int8`` and the ``int8``/``best`` presets run it right before ``quantize-int8``.

    Does nothing (changed=false, no export) when the opset is already ``min`` or newer, or when
    the model imports no default-domain opset. Refuses, counted in the stats and leaving the
    graph unchanged: models below opset 7 (``skipped_opset_below_7``), models with model-local
    functions written at an older default-domain opset (``skipped_model_local_functions``: the
    converter leaves function bodies as they are), and models the converter cannot convert or
    whose conversion fails the onnx checker (``skipped_converter_failed``; the converter's message
    is in the report's details as ``reason``). A conversion that changes what the model computes
    fails verification and is rolled back. Stats: ``upgraded_from`` (the old opset).

    Options: ``min`` (13): the opset to upgrade to (7 .. the newest opset onnx knows).
    """

    name = "upgrade-opset"

    min: int = PER_CHANNEL_QDQ_OPSET

    def __post_init__(self):
        newest = onnx.defs.onnx_opset_version()
        if not (OLDEST_CONVERTIBLE <= int(self.min) <= newest):
            raise self.option_error(f"min must be an opset between {OLDEST_CONVERTIBLE} and {newest}; got {self.min!r}")
        self._normalize(min=int(self.min))

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        old = default_opset(graph)
        if old is None or old >= self.min:  # nothing to do: no export, no conversion
            return PassResult(False)
        if old < OLDEST_CONVERTIBLE:
            return PassResult(False, skipped={f"opset_below_{OLDEST_CONVERTIBLE}": 1},
                              details={"reason": f"opset {old} is older than {OLDEST_CONVERTIBLE}"})
        stale = [f.name for f in graph.functions if (default_opset(f) or self.min) < self.min]
        if stale:  # the converter leaves function bodies at their opset; ONNX Runtime rejects the mix
            return PassResult(False, skipped={"model_local_functions": len(stale)},
                              details={"reason": "the version converter does not convert model-local functions: "
                                                 + ", ".join(stale[:5])})
        try:
            upgraded = convert(graph, self.min)
        except Exception as exc:  # the converter's C++ errors, checker errors, protobuf limits
            reason = " ".join(str(exc).split())[:500] or type(exc).__name__
            log.info("upgrade-opset: opset %d -> %d failed: %s", old, self.min, reason)
            return PassResult(False, skipped={"converter_failed": 1},
                              details={"reason": reason, "from": old, "to": self.min})
        replace_graph(graph, upgraded)
        return PassResult(True, stats={"upgraded_from": old}, details={"from": old, "to": self.min})


def convert(graph: gs.Graph, target: int) -> gs.Graph:
    """``graph`` converted to opset ``target`` as a new graph; raises when the converter fails or
    its model does not pass the onnx checker. ``graph`` is not modified."""
    from onnx import version_converter

    from optimizer.io import pin_ir_version
    from passes.graph_utils import import_graph

    model = gs.export_onnx(graph)  # read-only (it only fills in missing domain imports)
    pin_ir_version(model, graph.ir_version)
    converted = version_converter.convert_version(model, target)
    pin_ir_version(converted, model.ir_version)
    got = next((o.version for o in converted.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if got != target:
        raise RuntimeError(f"the converter returned opset {got}, not {target}")
    _keep_value_info(model, converted)
    onnx.checker.check_model(converted)
    return import_graph(converted)


def _keep_value_info(original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    """The converter runs shape inference and writes what it inferred as ``value_info``; keep only
    the annotations the model had (as they were), so the upgrade changes nothing but the ops."""
    from optimizer.stats import iter_graphs

    before = {v.name: v for g in iter_graphs(original.graph) for v in g.value_info}
    for g in iter_graphs(converted.graph):
        kept = [before[v.name] for v in g.value_info if v.name in before]
        del g.value_info[:]
        g.value_info.extend(kept)


def replace_graph(graph: gs.Graph, new: gs.Graph) -> None:
    """Make ``graph`` (the object the manager holds) the converted ``new`` one, in place: nodes,
    inputs, outputs, opset, domain imports, model-local functions and every other attribute
    graphsurgeon keeps, so that ``gs.export_onnx(graph)`` writes the new opset. Caches of tensor
    names are dropped."""
    graph.__dict__.pop("_unique_names_cache", None)
    graph.__dict__.update(new.__dict__)
