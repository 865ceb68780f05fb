"""Helpers shared by passes (passes/graph_utils.py)."""

import numpy as np
import onnx_graphsurgeon as gs
from helpers import parse_model
from pruning_models import zoo_model

from passes.graph_utils import count_macs, infer_static_shapes, infer_tensor_types


# -- MACs -------------------------------------------------------------------------------------
def test_count_macs_counts_conv_and_gemm():
    model = zoo_model()
    graph = gs.import_onnx(model)
    shapes = {k: s for k, (s, _) in infer_tensor_types(graph).items() if s is not None}
    expected = 2 * 64 * (16 * 27 + 16 * 16 * 9 + 8 * 16 * 9 + 24 * 9 + 16 * 24) + 2 * 10 * 256
    assert count_macs(graph, shapes) == expected


# -- shape helpers ------------------------------------------------------------------------------
def test_inferred_shapes_use_given_input_shapes_without_changing_the_graph():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] y) {
            y = Relu(x)
        }
        """
    )
    graph = gs.import_onnx(model)
    assert infer_tensor_types(graph)["y"][0] == (None, 3)
    assert "y" not in infer_static_shapes(graph)
    assert infer_static_shapes(graph, {"x": (5, 3)})["y"] == ((5, 3), np.dtype(np.float32))
    assert graph.inputs[0].shape == ["N", 3]


def test_union_find_roots_are_the_smallest_key_whatever_the_union_order():
    from passes.graph_utils import UnionFind

    for order in ([(1, 2), (3, 4), (2, 4)], [(4, 2), (2, 3), (1, 4)], [(3, 1), (4, 3), (2, 1)]):
        sets = UnionFind()
        for a, b in order:
            sets.union(a, b)
        assert {sets.find(k) for k in (1, 2, 3, 4)} == {1}
    sets = UnionFind()
    assert sets.union(5, 7) == (5, 7) and sets.union(7, 5) is None
    assert sets.find(9) == 9  # an unseen key is its own set
