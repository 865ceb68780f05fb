"""Running a pass's graph in ONNX Runtime: the graph as a model (a copy), and the calibration data
to feed it, read in the original model's layout and adapted to the current one."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from optimizer.graph import graph_to_model
from optimizer.pass_base import PassContext


def graph_model(graph: gs.Graph) -> onnx.ModelProto:
    """An ONNX model of ``graph`` (a copy) for running in ONNX Runtime."""
    template = onnx.ModelProto()
    template.ir_version = 10
    return graph_to_model(graph.copy(), template)


def calibration_source(model: onnx.ModelProto, ctx: PassContext, data):
    """Calibration data for ``model``, read in the original model's layout and adapted to it."""
    from calibration.sources import AdaptedSource, open_source
    from optimizer.runtime import input_specs

    specs = ctx.original_inputs or input_specs(model)
    source = open_source(data, specs, shapes=ctx.input_shapes)
    if ctx.feed_adapter is not None and ctx.original_inputs is not None:
        source = AdaptedSource(source, ctx.original_inputs, ctx.feed_adapter)
    return source
