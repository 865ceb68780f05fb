"""The pass manager: verification after each pass, rollback, fixed points, hooks."""

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers import op_types, parse_model

from optimizer import Hook, Pass, PassError, PassManager, PassResult, VerificationError, available_passes, register_pass
from optimizer.registry import _REGISTRY

MODEL = """
<ir_version: 10, opset_import: ["" : 13]>
g (float[2,4] x) => (float[2,4] y, float[2,4] z) {
    a = Relu(x)
    y = Identity(a)
    z = Sigmoid(x)
}
"""


@dataclass
class Sabotage(Pass):
    """Turns every Sigmoid into Tanh: a pass that changes what the model computes."""

    name = "test-sabotage"

    def run(self, graph, ctx):
        hits = [n for n in graph.nodes if n.op == "Sigmoid"]
        for n in hits:
            n.op = "Tanh"
        return PassResult(changed=bool(hits), stats={"hits": len(hits)})


@dataclass
class Crash(Pass):
    """Raises."""

    name = "test-crash"

    def run(self, graph, ctx):
        raise RuntimeError("boom")


@dataclass
class Breaker(Pass):
    """Makes the graph invalid (dangling input)."""

    name = "test-breaker"

    def run(self, graph, ctx):
        node = graph.nodes[0]
        node.inputs[0] = gs.Variable("nowhere", dtype=np.float32)
        return PassResult(changed=True)


@pytest.fixture(autouse=True)
def test_passes():
    saved = dict(available_passes())
    for cls in (Sabotage, Crash, Breaker):
        register_pass(cls)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_numeric_verification_names_pass_and_diverging_output():
    with pytest.raises(VerificationError) as info:
        PassManager("cleanup,test-sabotage", strict=True).run(parse_model(MODEL))
    err = info.value
    assert err.pass_name == "test-sabotage"
    assert err.output_name == "z"
    assert "output 'z' diverges" in str(err) and "passes before it: cleanup" in str(err)


def test_structural_verification_catches_invalid_graph():
    with pytest.raises(VerificationError, match="no longer valid"):
        PassManager("test-breaker", verify="structural", strict=True).run(parse_model(MODEL))


def test_exception_in_pass_names_it():
    with pytest.raises(PassError, match="pass 'test-crash' failed: boom"):
        PassManager("cleanup,test-crash", strict=True).run(parse_model(MODEL))


@pytest.mark.parametrize("options", [{}, {"keep_going": True}], ids=["default", "keep_going"])
def test_failing_passes_roll_back_by_default_and_the_pipeline_continues(options):
    model = parse_model(MODEL)
    result = PassManager("test-sabotage,test-crash,cleanup", **options).run(model)
    names = [r.name for r in result.records]
    assert names == ["test-sabotage", "test-crash", "cleanup"]
    assert result.records[0].rolled_back and result.records[0].verification == "failed"
    assert result.records[1].rolled_back and "boom" in result.records[1].error
    assert op_types(result.model) == ["Relu", "Sigmoid"]  # sabotage undone, cleanup applied
    assert any("rolled back" in w for w in result.warnings)


def test_verify_off_lets_a_wrong_pass_through():
    result = PassManager("test-sabotage", verify="off").run(parse_model(MODEL))
    assert "Tanh" in op_types(result.model)


def test_fixed_point_repeats_until_nothing_changes():
    @register_pass
    @dataclass
    class PeelOne(Pass):
        """Removes one Neg per run."""

        name = "test-peel-one"

        def run(self, graph, ctx):
            for n in graph.nodes:
                if n.op == "Neg":
                    n.op = "Identity"
                    return PassResult(changed=True)
            return PassResult(changed=False)

    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 13]>
        g (float[3] x) => (float[3] y) {
            a = Neg(x)
            b = Neg(a)
            c = Neg(b)
            d = Neg(c)
            y = Relu(d)
        }
        """
    )
    result = PassManager("fixpoint(test-peel-one,cleanup)", verify="structural").run(model)
    assert op_types(result.model) == ["Relu"]
    peel_iterations = [r.iteration for r in result.records if r.name == "test-peel-one"]
    assert peel_iterations == [0, 1, 2, 3, 4]


def test_hooks_see_every_pass_and_records_carry_stats():
    seen = []

    class Recorder(Hook):
        def before_pass(self, event):
            seen.append(("before", event.pass_.name))

        def after_pass(self, event):
            seen.append(("after", event.pass_.name, event.after is not None))

    result = PassManager("cleanup,fuse-conv-bn", hooks=[Recorder()]).run(parse_model(MODEL))
    assert seen == [("before", "cleanup"), ("after", "cleanup", True), ("before", "fuse-conv-bn"), ("after", "fuse-conv-bn", False)]
    rec = result.records[0]
    assert rec.before.nodes == 3 and rec.after.nodes == 2 and rec.time_s > 0
    assert rec.verification == "passed" and result.records[1].verification == "unchanged"


def test_input_model_is_not_mutated():
    model = parse_model(MODEL)
    snapshot = model.SerializeToString()
    PassManager("default").run(model)
    assert model.SerializeToString() == snapshot


def test_ir_version_is_pinned_for_onnx_runtime():
    model = parse_model(MODEL, ir_version=10)
    result = PassManager("cleanup").run(model)
    assert result.model.ir_version == 10


@dataclass
class Tag(Pass):
    """Renames the Relu (a lossless change) and asks for ``tag = <count>`` in the model metadata,
    counting up from what earlier passes (or the input model) recorded."""

    name = "test-tag"

    def run(self, graph, ctx):
        count = int(ctx.model_metadata.get("tag", "0")) + 1
        node = next(n for n in graph.nodes if n.op == "Relu")
        node.name = f"relu_{count}"
        return PassResult(changed=True, metadata={"tag": str(count)})


@pytest.mark.parametrize("batch", [True, False])
def test_pass_metadata_reaches_the_model_and_the_passes_after_it(batch):
    register_pass(Tag)
    model = parse_model(MODEL)
    model.metadata_props.add(key="tag", value="5")
    model.metadata_props.add(key="kept", value="yes")
    result = PassManager("test-tag,cleanup,test-tag", batch=batch).run(model)
    props = {p.key: p.value for p in result.model.metadata_props}
    assert props == {"tag": "7", "kept": "yes"}
    assert [n.name for n in result.model.graph.node if n.op_type == "Relu"] == ["relu_7"]
    assert [p.key for p in result.model.metadata_props].count("tag") == 1


@pytest.mark.parametrize("batch", [True, False])
def test_a_rolled_back_pass_leaves_no_metadata(batch):
    @dataclass
    class TagAndBreak(Sabotage):
        """Changes what the model computes and asks for metadata: rolled back, metadata too."""

        name = "test-tag-and-break"

        def run(self, graph, ctx):
            result = super().run(graph, ctx)
            result.metadata = {"broken": "yes"}
            return result

    register_pass(TagAndBreak)
    result = PassManager("test-tag-and-break,cleanup", batch=batch).run(parse_model(MODEL))
    assert result.rolled_back and result.rolled_back[0].name == "test-tag-and-break"
    assert "broken" not in {p.key for p in result.model.metadata_props}
