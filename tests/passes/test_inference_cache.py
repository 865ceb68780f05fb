"""Shape inference remembered per graph state (passes/inference_cache.py): answers are reused only
while the graph is unchanged, and every kind of edit a pass makes is noticed."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers import SAMPLES, parse_model

from optimizer.graph import import_graph
from passes.graph_utils import infer_tensor_types
from passes.inference_cache import fingerprint, remembered
from passes.inference_model import infer

MODEL = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[N, 6] x) => (float[N, 2, 3] y) {
    shape = Constant<value = int64[3] {-1, 2, 3}>()
    r = Reshape(x, shape)
    y = Relu(r)
}
"""


def _counting(graph, kind="types", shapes=None):
    calls = []

    def compute():
        calls.append(1)
        return {"answer": len(calls)}

    return lambda: remembered(graph, kind, shapes, compute), calls


def test_an_unchanged_graph_is_answered_from_memory():
    graph = gs.import_onnx(parse_model(MODEL))
    ask, calls = _counting(graph)
    first, second = ask(), ask()
    assert first == second and len(calls) == 1
    second["answer"] = 99  # callers get copies: memory is not theirs to change
    assert ask() == {"answer": 1}
    assert remembered(graph, "types", {"x": (2, 6)}, lambda: "other") == "other"  # input shapes are in the key
    assert remembered(graph, "symbols", None, lambda: "symbols") == "symbols"  # and so is the kind


def _edits():
    def rename(g):
        yield  # nothing to set up
        g.tensors()["r"].name = "r2"

    def attribute(g):
        yield  # nothing to set up
        next(n for n in g.nodes if n.op == "Relu").attrs["extra"] = 1

    def replace_constant(g):
        yield  # nothing to set up
        const = next(n for n in g.nodes if n.op == "Constant")
        const.attrs["value"] = gs.Constant("v", np.array([-1, 3, 2], np.int64))

    def write_into_constant(g):
        const = next(n for n in g.nodes if n.op == "Constant")
        const.attrs["value"] = gs.Constant("v", np.array([-1, 2, 3], np.int64))
        yield  # the state fingerprinted first; then the edit in place
        const.attrs["value"].values[1:] = [3, 2]

    def variable_shape(g):
        yield  # nothing to set up
        g.tensors()["r"].shape = ["N", 2, 3]

    def input_shape(g):
        yield  # nothing to set up
        g.inputs[0].shape = [4, 6]

    def new_node(g):
        yield  # nothing to set up
        y = g.outputs[0]
        z = gs.Variable("z", np.float32)
        g.nodes.append(gs.Node("Neg", inputs=[y], outputs=[z]))
        g.outputs = [z]

    def rewire(g):
        yield  # nothing to set up
        relu = next(n for n in g.nodes if n.op == "Relu")
        relu.inputs[0] = g.inputs[0]

    def opset(g):
        yield  # nothing to set up
        g.opset = 18

    return [rename, attribute, replace_constant, write_into_constant, variable_shape, input_shape, new_node, rewire, opset]


@pytest.mark.parametrize("edit", _edits(), ids=lambda f: f.__name__)
def test_every_edit_changes_the_fingerprint(edit):
    graph = gs.import_onnx(parse_model(MODEL))
    steps = edit(graph)
    next(steps)  # set up
    ask, calls = _counting(graph)
    ask()
    before = fingerprint(graph)
    next(steps, None)  # the edit
    assert fingerprint(graph) != before
    ask()
    assert len(calls) == 2


@pytest.mark.parametrize("name", ["digits_cnn/model.onnx", "zoo/hf_bert.onnx", "zoo/if_lstm.onnx"])
def test_remembered_inference_equals_fresh_inference(name):
    import onnx

    graph = import_graph(onnx.load(str(SAMPLES / name)))
    types, symbols = infer_tensor_types(graph), infer(graph)
    assert infer_tensor_types(graph) == types and infer(graph) == symbols  # from memory
    fresh = import_graph(onnx.load(str(SAMPLES / name)))
    assert infer_tensor_types(fresh) == types and infer(fresh) == symbols  # computed again
