"""``layout-nchw``: channel-last (TensorFlow/Keras/TFLite-exported) graphs become NCHW."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import onnx_graphsurgeon as gs

from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.pass_base import register_pass
from passes.layout.analysis import Analyzer
from passes.layout.rewrite import commit
from passes.layout.transposes import LayoutGraph

log = logging.getLogger(__name__)


@register_pass
@dataclass(frozen=True)
class LayoutNCHW(Pass):
    """Make channel-last (TensorFlow/Keras/TFLite-exported) graphs NCHW by sinking Transposes
    through layout-agnostic ops until inverse pairs cancel::

        x -> Transpose(0,3,1,2) -> Conv -> Transpose(0,2,3,1) -> Mul([C]) -> Relu -> Transpose(0,3,1,2) -> Conv
        becomes
        x -> Transpose(0,3,1,2) -> Conv -> Mul([C,1,1]) -> Relu -> Conv

    A Transpose moves below an op that has a handler: unary elementwise ops and activations
    (Relu, Sigmoid, Clip, Cast, Dropout ...); broadcasting ops (Add, Mul, Where, PRelu ...) whose
    other inputs carry the same permutation or are constants (permuted here, so a channel-last [C]
    bias becomes [C,1,1] and ``fuse-affine`` folds it into the Conv); Concat, Split, Slice, Pad,
    Reduce*, Softmax/LogSoftmax/Hardmax, ArgMax/ArgMin, Gather (axes and pads remapped); Resize
    (roi/scales/sizes remapped); QuantizeLinear/DequantizeLinear (per-axis ``axis`` remapped).
    Two Transposes in a row merge; inverse ones cancel; Transposes of one tensor with one
    permutation become one. Every rewrite is a permutation: the numerics do not change.

    A region of connected moves is applied only if it lowers the number of Transposes (or keeps it,
    when the pass lowers it elsewhere: the Transposes then sink to the model boundary, so per-channel
    constants meet their Conv). A branch that would only add Transposes is not moved. Graphs with
    nothing to gain (already NCHW) are left unchanged. Stats: ``transposes_before``,
    ``transposes_after`` (Transpose nodes in the main graph), ``moved`` (nodes now running in the
    other layout), ``merged``, ``regions_rejected``, ``skipped_<reason>`` (where a Transpose stopped:
    ``no_handler``, ``non_constant_operand``, ``perm_mismatch`` ...). If/Loop/Scan bodies are not
    rewritten; a Transpose read inside one stays.

    Option ``io``: ``keep`` (default) keeps the model's inputs and outputs as they are (one
    Transpose at each channel-last boundary); ``nchw`` makes channel-last inputs and outputs
    channel-first themselves, removing the boundary Transposes. Only inputs/outputs whose
    Transposes then disappear change; the model records what changed in ``metadata_props``
    (``layout.inputs`` / ``layout.outputs``: JSON of name -> perm, new = transpose(old, perm))
    and the stats count them (``inputs_nchw``, ``outputs_nchw``).
    """

    name = "layout-nchw"
    requires_any_op = frozenset({"Transpose"})
    sets_io_layout = True
    io: Literal["keep", "nchw"] = "keep"

    def __post_init__(self):
        if self.io not in ("keep", "nchw"):
            raise self.option_error(f"io must be keep or nchw; got {self.io!r}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        layout = LayoutGraph(graph, self.io)
        before = layout.count_transposes()
        stats: dict[str, int | float] = {"transposes_before": before}
        if before == 0:
            stats["transposes_after"] = 0
            return PassResult(changed=False, stats=stats)
        graph.toposort()
        merged = layout.merge_duplicates()
        if self.io == "nchw":
            layout.add_virtual_inputs()
        analyzer = Analyzer(layout)
        analysis = analyzer.analyze()
        while analyzer.failed_inputs(analysis):
            for key in analyzer.failed_inputs(analysis):
                layout.drop_virtual_input(key)
            analysis = analyzer.analyze()
        stats["merged"] = merged
        stats["regions_rejected"] = analysis.rejected
        if analysis.gain + merged <= 0:
            stats["transposes_after"] = before
            return PassResult(changed=False, stats=stats, skipped=analysis.skips)
        counts, details, metadata = commit(analyzer, analysis)
        stats.update(counts)
        after = layout.count_transposes()
        stats["transposes_after"] = after
        if after >= before:  # a safety net: the cost model says this cannot happen
            log.warning("layout-nchw: the rewrite did not lower the Transpose count (%d -> %d); discarded", before, after)
            stats["transposes_after"] = before
            return PassResult(changed=False, stats=stats, skipped=analysis.skips)
        return PassResult(changed=True, stats=stats, skipped=analysis.skips, details=details, metadata=metadata)
