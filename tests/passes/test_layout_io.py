"""``layout-nchw(io=nchw)``: channel-last inputs and outputs become channel-first, recorded in the
model (optimizer/io_layout.py) so callers can feed and read it in the original layout."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from channel_last_models import TO_NCHW, Builder, residual_model, transposes, vi
from helpers import random_inputs, run
from onnx import helper

from optimizer.graph import graph_to_model
from optimizer.pass_base import PassContext
from optimizer.io_layout import LAYOUT_INPUTS_KEY, LAYOUT_OUTPUTS_KEY, io_layout, to_model_inputs, to_original_outputs
from passes.layout.nchw import LayoutNCHW


def _run_on_graph(model: onnx.ModelProto, **options):
    """Run the pass directly on a graph (as the manager does), returning (result, model, metadata)."""
    graph = gs.import_onnx(model)
    result = LayoutNCHW(**options).run(graph, PassContext())
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return result, graph_to_model(graph, model, result.metadata), result.metadata


# -- io=nchw -----------------------------------------------------------------------------------
def test_nchw_io_changes_inputs_and_outputs_and_records_them():
    model = residual_model()
    result, out, metadata = _run_on_graph(model, io="nchw")
    assert result.stats["inputs_nchw"] == 1 and result.stats["outputs_nchw"] == 1
    assert result.stats["transposes_after"] == 0
    assert json.loads(metadata[LAYOUT_INPUTS_KEY]) == {"x": TO_NCHW}
    assert json.loads(metadata[LAYOUT_OUTPUTS_KEY]) == {"y": TO_NCHW}
    assert result.details[LAYOUT_INPUTS_KEY]["x"] == {"perm": TO_NCHW, "shape": ["batch", 3, 8, 8]}
    assert io_layout(out) == ({"x": TO_NCHW}, {"y": TO_NCHW})
    dims = [d.dim_param or d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 8, 8]
    assert [o.name for o in out.graph.output] == ["y"]
    feeds = random_inputs(model, seed=2)
    got = to_original_outputs(out, run(out, to_model_inputs(out, feeds)))
    np.testing.assert_allclose(got["y"], run(model, feeds)["y"], rtol=1e-5, atol=1e-6)


def test_nchw_io_leaves_inputs_without_channel_last_evidence():
    """A second input that no Transpose reads keeps its layout (and no metadata mentions it)."""
    b = Builder(seed=6)
    h = b.nhwc_conv("x", 3, 4)
    b.nodes.append(helper.make_node("Add", [h, b.const(np.ones(4, np.float32))], ["y"]))
    b.nodes.append(helper.make_node("Relu", ["mask"], ["mask_out"]))
    model = b.model([vi("x", [1, 4, 4, 3]), vi("mask", [1, 4, 4, 2])], [vi("y", [1, 4, 4, 4]), vi("mask_out", [1, 4, 4, 2])])
    _, out, metadata = _run_on_graph(model, io="nchw")
    assert json.loads(metadata[LAYOUT_INPUTS_KEY]) == {"x": TO_NCHW}
    assert json.loads(metadata[LAYOUT_OUTPUTS_KEY]) == {"y": TO_NCHW}
    assert [d.dim_value for d in out.graph.input[1].type.tensor_type.shape.dim] == [1, 4, 4, 2]
    assert transposes(out) == []


def test_nchw_io_keeps_an_input_that_another_reader_needs_channel_last():
    """x is read by a Conv island and by a Reshape (no handler): converting x would leave a
    Transpose at the input anyway, so x stays NHWC; the output still becomes NCHW."""
    b = Builder(seed=7)
    h = b.nhwc_conv("x", 3, 4)
    b.nodes.append(helper.make_node("Relu", [h], ["y"]))
    b.nodes.append(helper.make_node("Reshape", ["x", b.const(np.array([1, -1], np.int64))], ["flat"]))
    model = b.model([vi("x", [1, 4, 4, 3])], [vi("y", [1, 4, 4, 4]), vi("flat", [1, 48])])
    _, out, metadata = _run_on_graph(model, io="nchw")
    assert LAYOUT_INPUTS_KEY not in metadata
    assert json.loads(metadata[LAYOUT_OUTPUTS_KEY]) == {"y": TO_NCHW}
    assert len(transposes(out)) == 1 and transposes(out)[0].input[0] == "x"
    feeds = random_inputs(model)
    got = to_original_outputs(out, run(out, to_model_inputs(out, feeds)))
    for k, v in run(model, feeds).items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6)
