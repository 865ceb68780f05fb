"""The four simplification passes that share passes/simplify_utils.py, together: bfloat16 constants
and casts, and the whole family on the sample transformer."""

import pytest
from helpers import assert_same_outputs, op_types, random_inputs
from onnx import TensorProto, helper
from simplify_helpers import input_shape, run_twice, stats

from optimizer import PassManager
from optimizer.pass_base import PassContext


@pytest.mark.parametrize("spec", ["simplify-layout-ops", "remove-noop-arithmetic", "cse", "fold-shapes"])
def test_bfloat16_constants_and_casts_are_handled(spec):
    bf16_ones = helper.make_tensor("w", TensorProto.BFLOAT16, [3], [1.0, 1.0, 1.0])
    bf16_copy = helper.make_tensor("w2", TensorProto.BFLOAT16, [3], [1.0, 1.0, 1.0])
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BFLOAT16),
            helper.make_node("Cast", ["b"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["f"], ["b2"], to=TensorProto.BFLOAT16),
            helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["w2"], ["wf2"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["b2"], ["g"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["g", "wf"], ["h"]),
            helper.make_node("Mul", ["h", "wf2"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[bf16_ones, bf16_copy],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    result = run_twice(model, spec)
    if spec == "simplify-layout-ops":  # bf16 -> f32 -> bf16 is exact; f32 -> bf16 -> f32 is not
        assert stats(result)["cast_merged"] == 1 and stats(result)["removed_cast"] == 1
        assert stats(result)["skipped_lossy_cast"] == 2  # x -> bf16 -> f32, seen from two readers
    assert_same_outputs(model, result.model, rtol=0, atol=0)


# -- all four together on the sample transformer ------------------------------------------------
def test_simplify_pipeline_on_the_transformer_sample():
    from helpers import SAMPLES

    from optimizer.io import load_model

    model, _ = load_model(SAMPLES / "transformer" / "model.onnx")
    spec = "fixpoint(cleanup,fold-constants,simplify-layout-ops,remove-noop-arithmetic,cse,fold-shapes)"
    dynamic = PassManager(spec).run(model)
    baked = PassManager(spec).run(model, PassContext(input_shapes={"tokens_embedded": (2, 16, 32)}))
    base = PassManager("fixpoint(cleanup,fold-constants)").run(model)
    assert len(dynamic.model.graph.node) < len(base.model.graph.node)
    # symbolic shape folding (fold-shapes) leaves the dynamic model no larger than the baked one
    assert len(baked.model.graph.node) <= len(dynamic.model.graph.node)
    assert "Shape" not in op_types(baked.model) and op_types(dynamic.model).count("Shape") <= 1
    assert input_shape(dynamic.model) == ["batch", "seq", 32]
    assert input_shape(baked.model) == [2, 16, 32]
    for batch, seq in ((1, 16), (3, 7)):
        assert_same_outputs(model, dynamic.model, random_inputs(model, shapes={"tokens_embedded": (batch, seq, 32)}))
    assert_same_outputs(model, baked.model, random_inputs(model, shapes={"tokens_embedded": (2, 16, 32)}))
