"""Batched verification (optimizer/manager.py): lossless passes share a graph and one check per
group; a failing group is replayed pass by pass, so a broken pass is still named and is the only
one rolled back -- and the result is the one per-pass verification gives."""

from dataclasses import dataclass

import onnx
import pytest
from helpers import SAMPLES, op_types, parse_model, random_inputs, run

from optimizer import Pass, PassError, PassManager, PassResult, VerificationError, available_passes, register_pass
from optimizer.registry import _REGISTRY

ZOO = SAMPLES / "zoo"

# Relu(Identity) and a duplicate Sigmoid give cleanup and cse something to do around the broken pass.
MODEL = """
<ir_version: 10, opset_import: ["" : 13]>
g (float[2,4] x) => (float[2,4] y, float[2,4] z, float[2,4] w) {
    a = Identity(x)
    b = Relu(a)
    y = Identity(b)
    z = Sigmoid(x)
    s2 = Sigmoid(x)
    w = Add(z, s2)
}
"""


@dataclass
class SabotageOnce(Pass):
    """Turns the first Sigmoid into Tanh: changes what the model computes."""

    name = "test-batch-sabotage"

    def run(self, graph, ctx):
        for n in graph.nodes:
            if n.op == "Sigmoid":
                n.op = "Tanh"
                return PassResult(changed=True)
        return PassResult(changed=False)


@dataclass
class HalfThenCrash(Pass):
    """Edits the graph, then raises: the shared graph is left half-rewritten."""

    name = "test-batch-half-crash"

    def run(self, graph, ctx):
        for n in graph.nodes:
            if n.op == "Relu":
                n.op = "Sigmoid"
        raise RuntimeError("half done")


@pytest.fixture(autouse=True)
def test_passes():
    saved = dict(available_passes())
    for cls in (SabotageOnce, HalfThenCrash):
        register_pass(cls)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def _changed_passes(result):
    return [(r.name, r.iteration) for r in result.records if r.changed]


@pytest.mark.parametrize("broken", ["test-batch-sabotage", "test-batch-half-crash"])
def test_broken_pass_in_the_middle_of_a_round_is_the_only_one_rolled_back(broken):
    model = parse_model(MODEL)
    pipeline = f"fixpoint(cleanup,{broken},cse)"
    batched = PassManager(pipeline).run(model)
    rolled = [r for r in batched.records if r.rolled_back]
    assert rolled and {r.name for r in rolled} == {broken}, [(r.name, r.rolled_back) for r in batched.records]
    assert all(not r.rolled_back for r in batched.records if r.name != broken)
    assert batched.timing["replayed_groups"] and batched.timing["replayed_groups"][0]["reason"]
    # cleanup and cse still applied; the broken pass's edit is not in the model
    ops = op_types(batched.model)
    assert "Tanh" not in ops and ops.count("Sigmoid") == 1 and "Identity" not in ops[:-1]
    feeds = random_inputs(model)
    want, got = run(model, feeds), run(batched.model, feeds)
    for name in want:
        assert abs(want[name] - got[name]).max() <= 1e-6 * max(1.0, abs(want[name]).max())
    # exactly what verifying every pass on its own gives
    single = PassManager(pipeline, batch=False).run(model)
    assert [(r.name, r.iteration, r.changed, r.rolled_back) for r in batched.records] == \
        [(r.name, r.iteration, r.changed, r.rolled_back) for r in single.records]
    assert batched.model.SerializeToString() == single.model.SerializeToString()


def test_strict_names_the_broken_pass_and_the_passes_before_it():
    with pytest.raises(VerificationError) as info:
        PassManager("fixpoint(cleanup,test-batch-sabotage,cse)", strict=True).run(parse_model(MODEL))
    assert info.value.pass_name == "test-batch-sabotage"
    assert "passes before it: cleanup" in str(info.value) and "diverges" in str(info.value)
    with pytest.raises(PassError, match="pass 'test-batch-half-crash' failed: half done"):
        PassManager("cleanup,test-batch-half-crash,cse", strict=True).run(parse_model(MODEL))


def test_a_clean_group_is_verified_once():
    result = PassManager("fixpoint(cleanup,cse,fold-constants)").run(parse_model(MODEL))
    stages = result.timing["stages"]
    changed = [r for r in result.records if r.changed]
    assert len(changed) >= 2 and all(r.verification == "passed" for r in changed)
    assert stages["sessions"]["calls"] == 2  # the original once, the group's model once
    assert stages["import"]["calls"] == 1 and stages["export"]["calls"] == 1
    assert result.timing["replayed_groups"] == []
    # per-pass counts are on the graph; the last change is exact
    assert changed[-1].after.nodes == len(result.model.graph.node)


@pytest.mark.parametrize("path", [SAMPLES / "digits_cnn" / "model.onnx", SAMPLES / "transformer" / "model.onnx",
                                  ZOO / "hf_bert.onnx", ZOO / "if_lstm.onnx", ZOO / "keras_nhwc.onnx"],
                         ids=lambda p: p.stem if p.stem != "model" else p.parent.name)
def test_batched_default_pipeline_gives_the_per_pass_result(path):
    model = onnx.load(str(path))
    batched = PassManager("default").run(model)
    single = PassManager("default", batch=False).run(model)
    assert _changed_passes(batched) == _changed_passes(single)
    assert not batched.rolled_back and not single.rolled_back
    assert batched.model.SerializeToString() == single.model.SerializeToString()
    assert batched.timing["stages"]["sessions"]["calls"] <= single.timing["stages"]["sessions"]["calls"]


@dataclass
class NarrowWeight(Pass):
    """Replaces the large MatMul weight by one with half the columns: the output shape is wrong."""

    name = "test-batch-narrow-weight"

    def run(self, graph, ctx):
        import numpy as np
        import onnx_graphsurgeon as gs

        for n in graph.nodes:
            if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant) and n.inputs[1].shape[1] == 64:
                n.inputs[1] = gs.Constant("w_narrow", np.ones((64, 32), np.float32))
                return PassResult(changed=True)
        return PassResult(changed=False)


def test_weights_are_not_reserialized_for_the_checker_but_a_broken_graph_is_still_caught():
    # 64x64 weights: above passes.inference_model.LIGHT_ELEMENTS, so the checker sees them as typed inputs
    import numpy as np
    from onnx import helper, numpy_helper

    from passes.inference_model import without_weights

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10
    light = without_weights(model)
    assert not light.graph.initializer and [i.name for i in light.graph.input] == ["x", "w"]
    onnx.checker.check_model(light, full_check=True)
    register_pass(NarrowWeight)
    result = PassManager("cleanup,test-batch-narrow-weight").run(model)
    record = next(r for r in result.records if r.name == "test-batch-narrow-weight")
    assert record.rolled_back and record.verification == "failed", record
    assert result.model.graph.initializer[0].dims == [64, 64]


@dataclass
class ScaleWeight(Pass):
    """Scales the first Conv/MatMul/Gemm weight by 1.5: a wrong rewrite on any such model."""

    name = "test-batch-scale-weight"

    def run(self, graph, ctx):
        import numpy as np
        import onnx_graphsurgeon as gs

        for n in graph.nodes:
            if n.op in ("Conv", "MatMul", "Gemm") and isinstance(n.inputs[1], gs.Constant):
                w = n.inputs[1]
                n.inputs[1] = gs.Constant(w.name + "_scaled", (np.asarray(w.values) * 1.5).astype(w.values.dtype))
                return PassResult(changed=True)
        return PassResult(changed=False)


@pytest.mark.parametrize("path", [SAMPLES / "digits_cnn" / "model.onnx", ZOO / "hf_bert.onnx"],
                         ids=["digits_cnn", "hf_bert"])
def test_lazy_noise_gives_the_same_verdicts(path):
    register_pass(ScaleWeight)
    model = onnx.load(str(path))
    eager = PassManager("default,test-batch-scale-weight").run(model)
    lazy = PassManager("default,test-batch-scale-weight", lazy_noise=True).run(model)
    assert [r.name for r in lazy.rolled_back] == ["test-batch-scale-weight"]
    assert [(r.name, r.changed, r.rolled_back) for r in lazy.records] == \
        [(r.name, r.changed, r.rolled_back) for r in eager.records]
    assert lazy.model.SerializeToString() == eager.model.SerializeToString()
    assert "max_abs" in eager.verification["noise"] and "max_abs" in lazy.verification["noise"]  # measured when needed
    clean = PassManager("cleanup", lazy_noise=True).run(model)
    assert clean.verification["noise"]["measured"] is False and "noise" not in clean.timing["stages"]
