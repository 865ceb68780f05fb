"""sparsify-2to4 and prune-magnitude (passes/pruning/sparsity.py)."""

import json

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper
from pruning_models import Weights, assert_valid, last_stats, make_model, vi, zoo_model

from optimizer import PassContext, PassManager
from optimizer.stats import model_stats
from passes.pruning.sparsity import SPARSITY_KEY, Sparsify2to4, is_2to4


# -- sparsify-2to4 ----------------------------------------------------------------------------
def sparse_model():
    w = Weights(9)
    w.add("w1", (64, 64, 3, 3)), w.add("w2", (64, 16, 3, 3)), w.add("w3", (128, 64)), w.add("w4", (64, 66, 1, 1))
    w.add("w5", (128, 64))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="big_conv"),
        helper.make_node("Conv", ["x16", "w2"], ["c2"], pads=[1, 1, 1, 1], name="small_conv"),
        helper.make_node("Conv", ["x66", "w4"], ["c4"], name="odd_conv"),
        helper.make_node("GlobalAveragePool", ["c1"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["fc"], transB=1, name="fc"),
        helper.make_node("MatMul", ["fc", "w5"], ["y"], name="mm"),
    ]
    return make_model(nodes, [vi("x", [1, 64, 4, 4]), vi("x16", [1, 16, 4, 4]), vi("x66", [1, 66, 4, 4])],
                  [vi("y", [1, 64]), vi("c2", [1, 64, 4, 4]), vi("c4", [1, 64, 4, 4])], w.inits)


def test_sparsify_2to4_marks_eligible_layers_and_every_block_has_two_zeros():
    model = sparse_model()
    result = PassManager("sparsify-2to4").run(model)
    record = result.records[-1]
    assert record.details[SPARSITY_KEY] == ["big_conv", "fc", "mm"]
    assert record.stats["skipped_too_small"] == 1 and record.stats["skipped_reduction_not_multiple_of_4"] == 1
    assert_valid(result.model)
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    nodes = {n.name: n for n in result.model.graph.node}
    for layer, axis in (("big_conv", 1), ("fc", 1), ("mm", 0)):
        w = weights[nodes[layer].input[1]]
        blocks = np.moveaxis(w, axis, -1).reshape(-1, 4)
        assert np.all(np.count_nonzero(blocks, axis=1) <= 2), layer
        assert is_2to4(w, axis)
    assert np.count_nonzero(weights[nodes["small_conv"].input[1]] == 0) == 0
    assert not PassManager("sparsify-2to4").run(result.model).records[-1].changed


def test_sparsify_2to4_keeps_the_largest_magnitudes_and_records_metadata():
    graph = gs.import_onnx(sparse_model())
    result = Sparsify2to4().run(graph, PassContext())
    assert json.loads(result.metadata[SPARSITY_KEY]) == ["big_conv", "fc", "mm"]
    assert result.stats["layers_sparsified"] == 3
    original = numpy_helper.to_array(next(t for t in sparse_model().graph.initializer if t.name == "w5"))
    new = next(n for n in graph.nodes if n.name == "mm").inputs[1].values
    blocks_old, blocks_new = original.T.reshape(-1, 4), new.T.reshape(-1, 4)
    for old, kept in zip(blocks_old, blocks_new):
        assert set(np.flatnonzero(kept)) == set(np.argsort(-np.abs(old))[:2])


# -- prune-magnitude --------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_magnitude_reaches_the_target_sparsity_and_is_idempotent(scope):
    model = zoo_model()
    result = PassManager(f"prune-magnitude(sparsity=0.6,scope={scope})").run(model)
    stats = last_stats(result)
    assert stats["sparsity_after"] >= 0.6 - 1e-3 and stats["sparsity_before"] == 0
    assert stats["compressed_bytes_after"] < stats["compressed_bytes_before"]
    assert_valid(result.model)
    assert model_stats(result.model).params == model_stats(model).params  # same size: zeros are stored
    layers = result.records[-1].details["layers"]
    if scope == "layer":
        assert all(entry["sparsity"] >= 0.59 for entry in layers)
    assert not PassManager(f"prune-magnitude(sparsity=0.6,scope={scope})").run(result.model).records[-1].changed
