"""Graph <-> model (optimizer/graph.py): our single-copy export writes what graphsurgeon's writes."""

import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import SAMPLES

from optimizer.graph import export_model, import_graph
from optimizer.pass_base import PassContext
from optimizer.registry import get_pass_class

MODELS = sorted(SAMPLES.glob("*/model.onnx")) + sorted(SAMPLES.glob("zoo/*.onnx"))


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.parent.name if p.name == "model.onnx" else p.stem)
def test_export_model_writes_graphsurgeons_bytes(path):
    graph = import_graph(onnx.load(str(path)))
    assert export_model(graph).SerializeToString() == gs.export_onnx(graph).SerializeToString()
    # after passes that fold constants (numpy-valued constants, new nodes, removed ones) too
    for name in ("cleanup", "fold-constants", "fuse-conv-bn", "cse"):
        get_pass_class(name)().run(graph, PassContext())
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    assert export_model(graph).SerializeToString() == gs.export_onnx(graph).SerializeToString()
