"""Symbolic shape folding in ``fold-shapes`` (passes/symbolic_shapes.py): shape chains of dynamic
tensors become constant Reshape/Expand operands, dynamic dims stay dynamic, and the outputs agree
with the original at several values of every dynamic dim."""

import numpy as np
import onnx
import pytest
from helpers import SAMPLES, op_types, parse_model, run

from optimizer import PassManager
from passes.symbolic_shapes import expand_target, reshape_target, same_shape

ZOO = SAMPLES / "zoo"

# x[N,T,8] -> Reshape(x, Concat(Shape(x)[0], Shape(x)[1], 2, 4)): the target is [0, 0, 2, 4].
CHAIN = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[N,T,8] x) => (float[N,T,2,4] y, float[N,T,8] z) <int64 i0 = {0}, int64 i1 = {1}, int64[1] ax = {0}, int64[2] rest = {2,4}> {
    s = Shape(x)
    b = Gather<axis=0>(s, i0)
    t = Gather<axis=0>(s, i1)
    bu = Unsqueeze(b, ax)
    tu = Unsqueeze(t, ax)
    c = Concat<axis=0>(bu, tu, rest)
    y = Reshape(x, c)
    e = Expand(x, s)
    r = Relu(e)
    z = Identity(r)
}
"""


def _feeds(model, dims: dict[str, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dims[d.dim_param] for d in t.shape.dim]
        if t.elem_type == onnx.TensorProto.INT64:
            feeds[value.name] = rng.integers(0, 2 if "mask" in value.name or "type" in value.name else 100,
                                             size=shape).astype(np.int64)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _assert_close(original, optimized, dims):
    feeds = _feeds(original, dims)
    want, got = run(original, feeds), run(optimized, feeds)
    for name, ref in want.items():
        scale = max(float(np.abs(ref).max()), 1e-6)
        assert got[name].shape == ref.shape, (name, dims)
        assert float(np.abs(got[name] - ref).max()) / scale < 1e-4, (name, dims)


def test_chain_folds_to_a_constant_target_and_stays_dynamic():
    model = parse_model(CHAIN)
    result = PassManager("fold-shapes,cleanup").run(model)
    out = result.model
    assert "Shape" not in op_types(out) and "Concat" not in op_types(out) and "Expand" not in op_types(out)
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    target = next(i for i in out.graph.initializer if i.name == reshape.input[1])
    assert onnx.numpy_helper.to_array(target).tolist() == [0, 0, 2, 4]
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim[:2]] == ["N", "T"]
    stats = next(r.stats for r in result.records if r.name == "fold-shapes")
    assert stats["reshapes_folded"] == 1 and stats["noop_reshapes"] == 1  # Expand(x, Shape(x)) is x
    for dims in ({"N": 1, "T": 1}, {"N": 2, "T": 5}, {"N": 3, "T": 17}):
        _assert_close(model, out, dims)


def test_target_rules():
    assert reshape_target(("N", "T", 8), ("N", "T", 2, 4)) == [0, 0, 2, 4]
    assert reshape_target(("N", "T", 8), ("M", 16)) == [-1, 16]
    assert reshape_target(("N", "T", 8), ("unk", "unk2", 8)) is None  # two new symbols
    assert reshape_target(("N", "T", 8), ("N", "T", 8), allowzero=True) is None  # no 0 with allowzero, two -1
    assert reshape_target(("N", 4, 8), ("N", 32), allowzero=True) == [-1, 32]
    assert reshape_target(("N", 0, 8), ("N", 0)) is None  # static 0 would mean "copy"
    assert expand_target(("N", 1, 8), ("N", 4, 8)) == [1, 4, 1]
    assert expand_target(("N", "T"), ("N", "M")) is None
    assert same_shape(("N", "T"), ("unk", "T")) and not same_shape(("N", "T"), ("unk", "T"), reshape=False)
    assert not same_shape(("N", "T"), ("a", "b"))


DYNAMIC_ZOO = {
    "yolo_dynamic": [{"batch": 1, "height": 320, "width": 320}, {"batch": 2, "height": 256, "width": 384}],
    "hf_bert": [{"batch": 1, "sequence": 16}, {"batch": 2, "sequence": 7}, {"batch": 3, "sequence": 31}],
    "hf_gpt2": [{"batch": 1, "sequence": 16}, {"batch": 2, "sequence": 5}, {"batch": 3, "sequence": 24}],
    "hf_vit": [{"batch": 1, "height": 32, "width": 32}, {"batch": 3, "height": 32, "width": 32}],
    "crnn_ocr": [{"batch": 1}, {"batch": 2}, {"batch": 5}],
    "norm_act": [{"batch": 1}, {"batch": 4}],
    "tiny_detector": [{"batch": 1}, {"batch": 3}],
    "paddle_ocr_rec": [{"p2o.DynamicDimension.0": 320}, {"p2o.DynamicDimension.0": 160},
                       {"p2o.DynamicDimension.0": 480}],
    "vad_reflect": [{"batch": 1, "sequence": 1600}, {"batch": 2, "sequence": 800}, {"batch": 3, "sequence": 3200}],
}


@pytest.mark.parametrize("name", sorted(DYNAMIC_ZOO))
def test_default_pipeline_agrees_at_several_values_of_every_dynamic_dim(name):
    model = onnx.load(str(ZOO / f"{name}.onnx"))
    result = PassManager("default").run(model)
    assert not result.rolled_back, [(r.name, r.error) for r in result.rolled_back]
    declared = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    kept = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in result.model.graph.input}
    assert kept == declared  # dynamic dims stay dynamic
    for dims in DYNAMIC_ZOO[name]:
        _assert_close(model, result.model, dims)
