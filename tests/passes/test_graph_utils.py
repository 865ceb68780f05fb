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


# -- constant expressions -------------------------------------------------------------------------
CONSTANT_EXPRESSION = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y) {
    shape = Constant<value = int64[2] {2, 3}>()
    ones = ConstantOfShape<value = float[1] {1.5}>(shape)
    start = Constant<value = float {0.0}>()
    limit = Constant<value = float {3.0}>()
    delta = Constant<value = float {1.0}>()
    r = Range(start, limit, delta)
    c = Mul(ones, r)
    y = Add(x, c)
}
"""


def test_constant_expressions_evaluate_in_onnxruntime_or_else_the_reference_evaluator(monkeypatch):
    import optimizer.runtime
    from passes.graph_utils import evaluate_constant_expression, evaluate_constant_expressions

    graph = gs.import_onnx(parse_model(CONSTANT_EXPRESSION))
    c = graph.tensors()["c"]
    expected = np.full((2, 3), 1.5, np.float32) * np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(evaluate_constant_expression(c, 17), expected)
    assert evaluate_constant_expression(c, 17, max_bytes=8) is None  # larger than allowed

    class NoRuntime:
        def __init__(self, *args, **kwargs):
            raise optimizer.runtime.RuntimeFailure("ONNX Runtime cannot load the model: no kernel")

    # several at once, in one session: the same values; a tensor that is not constant gives None
    tensors = graph.tensors()
    many = evaluate_constant_expressions([tensors["r"], c, tensors["y"], tensors["ones"]], 17)
    np.testing.assert_array_equal(many[0], np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(many[1], expected)
    assert many[2] is None
    np.testing.assert_array_equal(many[3], np.full((2, 3), 1.5, np.float32))

    monkeypatch.setattr(optimizer.runtime, "OrtRunner", NoRuntime)
    np.testing.assert_array_equal(evaluate_constant_expression(c, 17), expected)
    assert evaluate_constant_expression(graph.tensors()["y"], 17) is None  # reads the input x
    np.testing.assert_array_equal(evaluate_constant_expressions([c, tensors["r"]], 17)[0], expected)
