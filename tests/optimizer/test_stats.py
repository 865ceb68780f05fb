"""Tests for ``optimizer/stats.py``: the serialized size is protobuf's, computed without encoding the model."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.stats import model_stats, serialized_size

REPO = Path(__file__).resolve().parents[2]
MODELS = sorted(REPO.glob("sample_models/*/model.onnx")) + sorted(REPO.glob("sample_models/zoo/*.onnx"))


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.parent.name if p.name == "model.onnx" else p.stem)
def test_serialized_size_is_protobufs_on_every_sample_and_zoo_model(path):
    model = onnx.load(str(path))
    assert serialized_size(model) == model.ByteSize() == model_stats(model).model_bytes


@pytest.mark.parametrize("elements", [0, 1, 31, 32, 4095, 4096, 2**19, 2**21])
def test_serialized_size_across_length_prefix_widths(elements):
    # Initializers whose encoded lengths straddle the 1-, 2-, 3- and 4-byte varint boundaries, a
    # subgraph with its own initializer, metadata, a local function and a second opset.
    rng = np.random.default_rng(elements)
    weight = numpy_helper.from_array(rng.standard_normal(elements).astype(np.float32), "w")
    typed = helper.make_tensor("t", TensorProto.INT64, [3], [1, -2, 3])  # int64_data, no raw_data
    branch = helper.make_graph([helper.make_node("Identity", ["k"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])],
                               [numpy_helper.from_array(np.ones(1, np.float32), "k")])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
         helper.make_node("Identity", ["w"], ["z"])],
        "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]), helper.make_tensor_value_info("z", TensorProto.FLOAT, [elements])],
        [weight, typed], doc_string="d" * 200,
    )
    function = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                    [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[function], producer_name="p" * 300)
    helper.set_model_props(model, {"key": "v" * 1000})
    assert serialized_size(model) == model.ByteSize()
    assert serialized_size(onnx.ModelProto()) == 0
