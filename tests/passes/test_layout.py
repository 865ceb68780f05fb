"""Differential tests for ``layout-nchw`` (passes/layout.py).

The channel-last graphs below are written the way tf2onnx writes them: every Conv/MaxPool sits
between ``Transpose(0,3,1,2)`` and ``Transpose(0,2,3,1)``, and everything else works on NHWC
tensors with channel-last constants. ``CHANNEL_LAST_MODELS`` is shared with ``bench/layout.py``.
"""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import SAMPLES, assert_same_outputs, op_types, random_inputs, run, run_pass
from onnx import TensorProto, helper, numpy_helper

from optimizer.io import load_model
from optimizer.manager import graph_to_model
from optimizer.pass_base import PassContext
from passes.graph_utils import model_metadata
from passes.layout import (
    LAYOUT_INPUTS_KEY,
    LAYOUT_OUTPUTS_KEY,
    LayoutNCHW,
    compose,
    invert,
    io_layout,
    to_model_inputs,
    to_original_outputs,
)

TO_NCHW = [0, 3, 1, 2]
TO_NHWC = [0, 2, 3, 1]
ACCEPTANCE = (
    "fixpoint(cleanup,fold-constants,layout-nchw{opts},fuse-conv-bn,fuse-affine,fuse-matmul-add,"
    "fuse-gemm-transpose,fuse-pad)"
)


# -- building channel-last graphs ----------------------------------------------------------------
class _Builder:
    """A tiny tf2onnx-style graph writer: NHWC tensors, NCHW only inside conv/pool islands."""

    def __init__(self, seed: int = 0, opset: int = 13):
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.opset = opset
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, values, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def nhwc_conv(self, x: str, cin: int, cout: int, bias: bool = True, k: int = 3) -> str:
        """Transpose -> Conv -> Transpose, as tf2onnx writes a Keras Conv2D."""
        w = self.const((self.rng.normal(size=(cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32), "kernel")
        inputs = [self.node("Transpose", [x], perm=TO_NCHW), w]
        if bias:
            inputs.append(self.const(self.rng.normal(size=cout).astype(np.float32) * 0.1, "bias"))
        y = self.node("Conv", inputs, pads=[k // 2] * 4, kernel_shape=[k, k])
        return self.node("Transpose", [y], perm=TO_NHWC)

    def channel_affine(self, x: str, c: int) -> str:
        """A Keras BatchNormalization in channel-last form: Mul([C]) then Add([C])."""
        s = self.const(self.rng.uniform(0.5, 1.5, c).astype(np.float32), "bn_scale")
        t = self.const(self.rng.normal(size=c).astype(np.float32) * 0.1, "bn_shift")
        return self.node("Add", [self.node("Mul", [x, s]), t])

    def model(self, inputs: list, outputs: list, name: str = "channel_last") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=10)
        onnx.checker.check_model(model, full_check=True)
        return model


def _vi(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def residual_model(size: int = 8, channels: int = 8, blocks: int = 1) -> onnx.ModelProto:
    """Conv blocks with channel-last BN, residual Adds, and an NHWC output."""
    b = _Builder(seed=1)
    r = b.node("Relu", [b.channel_affine(b.nhwc_conv("x", 3, channels), channels)])
    for i in range(blocks):
        r2 = b.channel_affine(b.nhwc_conv(r, channels, channels, bias=False), channels)
        s = b.node("Add", [r2, r])
        if i == blocks - 1:
            b.nodes.append(helper.make_node("Relu", [s], ["y"]))
        else:
            r = b.node("Relu", [s])
    return b.model([_vi("x", ["batch", size, size, 3])], [_vi("y", ["batch", size, size, channels])], "residual")


def concat_model() -> onnx.ModelProto:
    """Two branches (each with its own Transpose of the input) concatenated along channels."""
    b = _Builder(seed=2)
    a = b.node("Relu", [b.nhwc_conv("x", 4, 5)])
    c = b.node("Sigmoid", [b.nhwc_conv("x", 4, 3, k=1)])
    cat = b.node("Concat", [a, c], axis=3)
    biased = b.node("Add", [cat, b.const(np.linspace(-1, 1, 8).astype(np.float32), "cat_bias")])
    out = b.nhwc_conv(biased, 8, 6)
    b.nodes.append(helper.make_node("LeakyRelu", [out], ["y"], alpha=0.1))
    return b.model([_vi("x", [2, 6, 6, 4])], [_vi("y", [2, 6, 6, 6])], "concat")


def reduce_softmax_model() -> onnx.ModelProto:
    """Softmax over channels, channel-last mean/sum reductions, a rank-3 output."""
    b = _Builder(seed=3)
    h = b.channel_affine(b.nhwc_conv("x", 3, 6), 6)
    s = b.node("Softmax", [h], axis=-1)
    mean = b.node("ReduceMean", [s], axes=[1, 2], keepdims=1)  # [N,1,1,C]
    centered = b.node("Sub", [s, mean])
    h2 = b.nhwc_conv(centered, 6, 4)
    b.nodes.append(helper.make_node("ReduceSum", [b.node("Exp", [h2]), b.const(np.array([3], np.int64), "axes")],
                                    ["channel_sum"], keepdims=0))  # [N,H,W]
    b.nodes.append(helper.make_node("LogSoftmax", [h2], ["log_probs"], axis=3))
    return b.model(
        [_vi("x", [2, 5, 5, 3])],
        [_vi("channel_sum", [2, 5, 5]), _vi("log_probs", [2, 5, 5, 4])],
        "reduce_softmax",
    )


def qdq_model() -> onnx.ModelProto:
    """A per-channel (axis=3, channel-last) QuantizeLinear/DequantizeLinear pair between convs."""
    b = _Builder(seed=4)
    h = b.node("Relu", [b.channel_affine(b.nhwc_conv("x", 3, 6), 6)])
    scale = b.const(np.linspace(0.01, 0.03, 6).astype(np.float32), "q_scale")
    zero = b.const(np.zeros(6, np.int8), "q_zero")
    q = b.node("QuantizeLinear", [h, scale, zero], axis=3)
    dq = b.node("DequantizeLinear", [q, scale, zero], axis=3)
    out = b.nhwc_conv(dq, 6, 4)
    b.nodes.append(helper.make_node("Add", [out, b.const(np.full(4, 0.5, np.float32), "out_bias")], ["y"]))
    return b.model([_vi("x", [1, 6, 6, 3])], [_vi("y", [1, 6, 6, 4])], "qdq")


def pad_slice_resize_model() -> onnx.ModelProto:
    """Pad, Slice, Resize, Split, Gather and ArgMax on channel-last tensors."""
    b = _Builder(seed=5)
    h = b.nhwc_conv("x", 3, 6)
    padded = b.node("Pad", [h, b.const(np.array([0, 1, 2, 0, 0, 2, 1, 0], np.int64), "pads")], mode="reflect")
    sliced = b.node(
        "Slice",
        [padded, b.const(np.array([1, 0], np.int64)), b.const(np.array([7, 5], np.int64)),
         b.const(np.array([1, 2], np.int64)), b.const(np.array([1, 1], np.int64))],
    )  # [N,6,5,6]
    up = b.node("Resize", [sliced, "", b.const(np.array([1, 2, 2, 1], np.float32), "scales")], mode="nearest")
    left, right = b.node("Split", [up], n_out=2, axis=3)
    mixed = b.node("Max", [left, b.node("Neg", [right])])  # [N,12,10,3]
    picked = b.node("Gather", [up, b.const(np.array([5, 0, 2], np.int64), "channels")], axis=3)
    both = b.node("Concat", [mixed, picked], axis=-1)
    out = b.nhwc_conv(both, 6, 2)
    b.nodes.append(helper.make_node("ArgMax", [out], ["label"], axis=3, keepdims=0))
    b.nodes.append(helper.make_node("Identity", [out], ["y"]))
    return b.model([_vi("x", [1, 4, 3, 3])], [_vi("label", [1, 12, 10], TensorProto.INT64), _vi("y", [1, 12, 10, 2])],
                   "pad_slice_resize")


def sample_channel_last() -> onnx.ModelProto:
    return load_model(SAMPLES / "channel_last" / "model.onnx")[0]


CHANNEL_LAST_MODELS = {
    "sample_channel_last": sample_channel_last,
    "residual": residual_model,
    "concat": concat_model,
    "reduce_softmax": reduce_softmax_model,
    "qdq": qdq_model,
    "pad_slice_resize": pad_slice_resize_model,
}


# -- checks ------------------------------------------------------------------------------------
def transposes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Transpose"]


def boundary_transposes_only(model: onnx.ModelProto) -> None:
    """At most one Transpose per model input/output, and each one sits at that boundary."""
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n.op_type)
    seen_in, seen_out = [], []
    for t in transposes(model):
        if t.input[0] in inputs:
            seen_in.append(t.input[0])
        elif t.output[0] in outputs:
            seen_out.append(t.output[0])
        else:
            raise AssertionError(f"Transpose {t.name} ({t.input[0]} -> {t.output[0]}) is not at a model boundary")
    assert len(seen_in) == len(set(seen_in)) and len(seen_out) == len(set(seen_out)), "two Transposes at one boundary"


def no_foldable_channel_affine(model: onnx.ModelProto) -> None:
    """No Mul/Add/Sub/Div of a constant left right after a Conv (fuse-affine would fold it)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    constants = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    for n in model.graph.node:
        if n.op_type in ("Mul", "Add", "Sub", "Div") and any(i in constants for i in n.input):
            for i in n.input:
                src = producers.get(i)
                assert src is None or src.op_type != "Conv", f"{n.op_type} {n.name} after Conv {src.name} was not folded"


def _run_on_graph(model: onnx.ModelProto, **options):
    """Run the pass directly on a graph (as the manager does), returning (result, model, metadata)."""
    graph = gs.import_onnx(model)
    result = LayoutNCHW(**options).run(graph, PassContext())
    metadata = model_metadata(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = graph_to_model(graph, model)
    for key, value in metadata.items():
        out.metadata_props.add(key=key, value=value)
    return result, out, metadata


# -- acceptance --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CHANNEL_LAST_MODELS))
def test_acceptance_pipeline_keeps_io_layout(name):
    model = CHANNEL_LAST_MODELS[name]()
    result = run_pass(model, ACCEPTANCE.format(opts=""))
    out = result.model
    first = next(r for r in result.records if r.name == "layout-nchw")
    assert first.changed and first.stats["transposes_after"] < first.stats["transposes_before"]
    assert first.verification == "passed"
    boundary_transposes_only(out)
    no_foldable_channel_affine(out)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, out, random_inputs(model, seed=5), rtol=1e-5)
    # the last round changed nothing: the fixpoint converged, layout-nchw included
    last = [r for r in result.records if r.name == "layout-nchw"][-1]
    assert not last.changed


@pytest.mark.parametrize("name", list(CHANNEL_LAST_MODELS))
def test_acceptance_pipeline_with_nchw_io_has_no_transposes(name):
    model = CHANNEL_LAST_MODELS[name]()
    # numeric verification inside the manager feeds the original (NHWC) inputs: compare here instead
    result = run_pass(model, ACCEPTANCE.format(opts="(io=nchw)"), verify="structural")
    out = result.model
    first = next(r for r in result.records if r.name == "layout-nchw")
    assert first.stats["inputs_nchw"] == len(model.graph.input)
    assert transposes(out) == []
    no_foldable_channel_affine(out)
    in_perms = {k: v["perm"] for k, v in first.details.get(LAYOUT_INPUTS_KEY, {}).items()}
    out_perms = {k: v["perm"] for k, v in first.details.get(LAYOUT_OUTPUTS_KEY, {}).items()}
    for value in out.graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == first.details[LAYOUT_INPUTS_KEY][value.name]["shape"]
    feeds = random_inputs(model, seed=5)
    expected = run(model, feeds)
    got = run(out, {k: np.ascontiguousarray(np.transpose(v, in_perms.get(k, range(v.ndim)))) for k, v in feeds.items()})
    for key in expected:
        back = np.transpose(got[key], invert(tuple(out_perms[key]))) if key in out_perms else got[key]
        scale = float(np.max(np.abs(expected[key])))
        np.testing.assert_allclose(back, expected[key], rtol=0, atol=1e-6 + 1e-5 * scale, err_msg=key)


# -- the sample model, step by step --------------------------------------------------------------
def test_sample_model_keeps_one_input_transpose_and_folds_every_channel_op():
    model = sample_channel_last()
    result = run_pass(model, "layout-nchw")
    stats = result.records[0].stats
    assert (stats["transposes_before"], stats["transposes_after"]) == (8, 1)
    assert stats["moved"] == 10 and stats["constants_permuted"] == 5
    assert op_types(result.model).count("Transpose") == 1
    # channel-last [C] constants became [C,1,1]: what fuse-affine folds into the Conv before them
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    producers = {o: n for n in result.model.graph.node for o in n.output}
    for n in result.model.graph.node:
        if n.op_type == "Mul" and producers[n.input[0]].op_type == "Conv":
            assert shapes[n.input[1]] == [16, 1, 1]
    reduce = next(n for n in result.model.graph.node if n.op_type == "ReduceMean")
    assert list(next(a for a in reduce.attribute if a.name == "axes").ints) == [2, 3]
    fused = run_pass(result.model, "fuse-affine")
    assert fused.records[0].stats["folded"] == 5


def test_second_run_changes_nothing():
    for build in CHANNEL_LAST_MODELS.values():
        once = run_pass(build(), "layout-nchw").model
        again = run_pass(once, "layout-nchw")
        assert not again.records[0].changed, again.records[0].stats


# -- io=nchw -----------------------------------------------------------------------------------
def test_nchw_io_changes_inputs_and_outputs_and_records_them():
    model = residual_model()
    result, out, metadata = _run_on_graph(model, io="nchw")
    assert result.stats["inputs_nchw"] == 1 and result.stats["outputs_nchw"] == 1
    assert result.stats["transposes_after"] == 0
    assert json.loads(metadata[LAYOUT_INPUTS_KEY]) == {"x": TO_NCHW}
    assert json.loads(metadata[LAYOUT_OUTPUTS_KEY]) == {"y": TO_NCHW}
    assert result.details[LAYOUT_INPUTS_KEY]["x"] == {"perm": TO_NCHW, "shape": ["batch", 3, 8, 8]}
    assert io_layout(out) == ({"x": TO_NCHW}, {"y": TO_NCHW})
    dims = [d.dim_param or d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 8, 8]
    assert [o.name for o in out.graph.output] == ["y"]
    feeds = random_inputs(model, seed=2)
    got = to_original_outputs(out, run(out, to_model_inputs(out, feeds)))
    np.testing.assert_allclose(got["y"], run(model, feeds)["y"], rtol=1e-5, atol=1e-6)


def test_nchw_io_leaves_inputs_without_channel_last_evidence():
    """A second input that no Transpose reads keeps its layout (and no metadata mentions it)."""
    b = _Builder(seed=6)
    h = b.nhwc_conv("x", 3, 4)
    b.nodes.append(helper.make_node("Add", [h, b.const(np.ones(4, np.float32))], ["y"]))
    b.nodes.append(helper.make_node("Relu", ["mask"], ["mask_out"]))
    model = b.model([_vi("x", [1, 4, 4, 3]), _vi("mask", [1, 4, 4, 2])], [_vi("y", [1, 4, 4, 4]), _vi("mask_out", [1, 4, 4, 2])])
    _, out, metadata = _run_on_graph(model, io="nchw")
    assert json.loads(metadata[LAYOUT_INPUTS_KEY]) == {"x": TO_NCHW}
    assert json.loads(metadata[LAYOUT_OUTPUTS_KEY]) == {"y": TO_NCHW}
    assert [d.dim_value for d in out.graph.input[1].type.tensor_type.shape.dim] == [1, 4, 4, 2]
    assert transposes(out) == []


def test_nchw_io_keeps_an_input_that_another_reader_needs_channel_last():
    """x is read by a Conv island and by a Reshape (no handler): converting x would leave a
    Transpose at the input anyway, so x stays NHWC; the output still becomes NCHW."""
    b = _Builder(seed=7)
    h = b.nhwc_conv("x", 3, 4)
    b.nodes.append(helper.make_node("Relu", [h], ["y"]))
    b.nodes.append(helper.make_node("Reshape", ["x", b.const(np.array([1, -1], np.int64))], ["flat"]))
    model = b.model([_vi("x", [1, 4, 4, 3])], [_vi("y", [1, 4, 4, 4]), _vi("flat", [1, 48])])
    _, out, metadata = _run_on_graph(model, io="nchw")
    assert LAYOUT_INPUTS_KEY not in metadata
    assert json.loads(metadata[LAYOUT_OUTPUTS_KEY]) == {"y": TO_NCHW}
    assert len(transposes(out)) == 1 and transposes(out)[0].input[0] == "x"
    feeds = random_inputs(model)
    got = to_original_outputs(out, run(out, to_model_inputs(out, feeds)))
    for k, v in run(model, feeds).items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6)


def test_io_option_parses_from_pipeline_text():
    from optimizer.errors import PipelineError
    from optimizer.pipeline import parse_pipeline

    (p,) = parse_pipeline("layout-nchw(io=nchw)")
    assert p.io == "nchw" and p.spec() == "layout-nchw(io=nchw)"
    with pytest.raises(PipelineError):
        parse_pipeline("layout-nchw(io=nhwc)")


# -- refusals ----------------------------------------------------------------------------------
def _nchw_conv_then_transpose(*after):
    """NCHW input -> Conv -> Transpose(0,2,3,1) -> ``after`` ops -> output (channel-last)."""
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c"], ["t"], perm=TO_NHWC)]
    last = "t"
    for i, op in enumerate(after):
        nodes.append(helper.make_node(op, [last], [f"a{i}"]))
        last = f"a{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "g", [_vi("x", [1, 3, 5, 5])], [_vi("y", [1, 5, 5, 4])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)


def test_transpose_feeding_a_graph_output_keeps_its_layout():
    for model in (_nchw_conv_then_transpose(), _nchw_conv_then_transpose("Relu", "Sigmoid")):
        result = run_pass(model, "layout-nchw")
        assert not result.records[0].changed
        assert result.records[0].stats["transposes_after"] == 1


def test_op_without_handler_stops_the_transpose():
    """Transpose -> Relu -> Flatten: nothing cancels, so nothing moves (moving would not help)."""
    b = _Builder(seed=9)
    h = b.node("Relu", [b.nhwc_conv("x", 3, 4)])
    b.nodes.append(helper.make_node("Flatten", [h], ["y"]))
    model = b.model([_vi("x", [1, 4, 4, 3])], [_vi("y", [1, 64])])
    result = run_pass(model, "layout-nchw")
    assert not result.records[0].changed
    assert result.records[0].stats["skipped_no_handler"] >= 1


def test_op_without_handler_between_islands_keeps_both_transposes():
    """... -> Transpose -> LpNormalization (no handler) -> Transpose -> ...: the pair around
    LpNormalization stays; the rest of the graph is still optimized."""
    b = _Builder(seed=10)
    h = b.channel_affine(b.nhwc_conv("x", 3, 4), 4)
    n = b.node("LpNormalization", [h], axis=-1)
    out = b.node("Relu", [b.channel_affine(b.nhwc_conv(n, 4, 4), 4)])
    b.nodes.append(helper.make_node("Relu", [b.nhwc_conv(out, 4, 4)], ["y"]))
    model = b.model([_vi("x", [1, 4, 4, 3])], [_vi("y", [1, 4, 4, 4])])
    result = run_pass(model, "layout-nchw")
    stats = result.records[0].stats
    assert result.records[0].changed and stats["skipped_no_handler"] >= 1
    assert (stats["transposes_before"], stats["transposes_after"]) == (6, 4)  # input, 2 around Lp, output
    assert_same_outputs(model, result.model)
    lp = next(n for n in result.model.graph.node if n.op_type == "LpNormalization")
    producers = {o: n for n in result.model.graph.node for o in n.output}
    readers = [n for n in result.model.graph.node if lp.output[0] in n.input]
    assert producers[lp.input[0]].op_type == "Transpose" and [n.op_type for n in readers] == ["Transpose"]


def test_non_constant_operand_of_another_rank_stops_the_transpose():
    """Add(NHWC activation, bias[C] fed as a graph input): not a constant, so the Add cannot
    run in NCHW (the bias would broadcast along W); the Transposes around it stay."""
    b = _Builder(seed=11)
    h = b.node("Add", [b.nhwc_conv("x", 3, 4), "bias"])
    b.nodes.append(helper.make_node("Relu", [b.nhwc_conv(h, 4, 4)], ["y"]))
    model = b.model([_vi("x", [1, 4, 4, 3]), _vi("bias", [4])], [_vi("y", [1, 4, 4, 4])])
    result = run_pass(model, "layout-nchw")
    stats = result.records[0].stats
    assert stats["skipped_non_constant_operand"] == 1
    assert stats["transposes_after"] <= stats["transposes_before"]
    producers = {o: n for n in result.model.graph.node for o in n.output}
    add = next(n for n in result.model.graph.node if n.op_type == "Add")
    assert producers[add.input[0]].op_type == "Transpose"  # still channel-last
    assert_same_outputs(model, result.model)


def test_mismatched_permutations_are_not_mixed():
    """Add(Transpose(a, p1), Transpose(b, p2)) with p1 != p2 stays as it is."""
    nodes = [
        helper.make_node("Transpose", ["a"], ["ta"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["b"], ["tb"], perm=[0, 3, 2, 1]),
        helper.make_node("Add", ["ta", "tb"], ["s"]),
        helper.make_node("Transpose", ["s"], ["y"], perm=[0, 3, 1, 2]),
    ]
    graph = helper.make_graph(nodes, "g", [_vi("a", [1, 2, 3, 3]), _vi("b", [1, 2, 3, 3])], [_vi("y", [1, 2, 3, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    result = run_pass(model, "layout-nchw")
    assert not result.records[0].changed
    assert result.records[0].stats["skipped_perm_mismatch"] == 1


def test_never_adds_a_transpose_for_a_dead_end_branch():
    """Transpose read by Flatten (no handler) and by Relu -> output: moving it below the Relu
    would need a second Transpose; the pass leaves the graph alone."""
    model = _nchw_conv_then_transpose()
    model.graph.node.append(helper.make_node("Flatten", ["t"], ["flat"]))
    model.graph.node.append(helper.make_node("Relu", ["t"], ["r"]))
    model.graph.output.extend([_vi("flat", [1, 100]), _vi("r", [1, 5, 5, 4])])
    result = run_pass(model, "layout-nchw")
    assert not result.records[0].changed
    assert result.records[0].stats["transposes_after"] == 1


def test_dead_end_branch_is_pruned_while_the_rest_moves():
    """The residual model plus an NHWC side output read through a Flatten: the main path still
    loses its Transposes, and the side branch costs none."""
    model = residual_model()
    model.graph.node.append(helper.make_node("Flatten", ["y"], ["flat"]))
    model.graph.output.append(_vi("flat", ["batch", 512]))
    result = run_pass(model, "layout-nchw")
    stats = result.records[0].stats
    assert stats["transposes_after"] == 2
    assert_same_outputs(model, result.model)


def test_softmax_before_opset13_over_channels_is_refused():
    """Before opset 13 Softmax flattens the axes from ``axis`` on: channel-last axis 3 is not a
    tail of NCHW, so the Transposes around it stay."""
    b = _Builder(seed=12, opset=11)
    h = b.node("Softmax", [b.nhwc_conv("x", 3, 4)], axis=3)
    b.nodes.append(helper.make_node("Relu", [b.nhwc_conv(h, 4, 4)], ["y"]))
    model = b.model([_vi("x", [1, 4, 4, 3])], [_vi("y", [1, 4, 4, 4])])
    result = run_pass(model, "layout-nchw")
    assert result.records[0].stats["skipped_flattening_softmax_before_opset13"] == 1
    assert_same_outputs(model, result.model)


def test_transpose_read_inside_a_subgraph_stays():
    """A channel-last tensor read inside an If branch keeps its Transpose; the main graph moves."""
    b = _Builder(seed=13)
    h = b.node("Relu", [b.nhwc_conv("x", 3, 4)])
    out = b.nhwc_conv(h, 4, 4)
    then = helper.make_graph([helper.make_node("Sigmoid", [h], ["branch"])], "then", [], [_vi("branch", None)])
    other = helper.make_graph([helper.make_node("Neg", [h], ["branch2"])], "else", [], [_vi("branch2", None)])
    b.nodes.append(helper.make_node("If", ["cond"], ["side"], then_branch=then, else_branch=other))
    b.nodes.append(helper.make_node("Identity", [out], ["y"]))
    model = b.model([_vi("x", [1, 4, 4, 3]), _vi("cond", [], TensorProto.BOOL)],
                    [_vi("y", [1, 4, 4, 4]), _vi("side", [1, 4, 4, 4])])
    result = run_pass(model, "layout-nchw")
    feeds = random_inputs(model)
    for cond in (True, False):
        feeds["cond"] = np.array(cond)
        assert_same_outputs(model, result.model, feeds)
    stats = result.records[0].stats
    assert stats["transposes_after"] < stats["transposes_before"]


def test_nchw_graphs_are_left_unchanged():
    for name in ("digits_cnn", "transformer"):
        model = load_model(SAMPLES / name / "model.onnx")[0]
        result = run_pass(model, "layout-nchw")
        assert not result.records[0].changed


# -- handlers one by one -----------------------------------------------------------------------
def _island(build_middle, in_shape=(1, 4, 5, 3), cin=3, opset=13, out_shape=None, out_elem=TensorProto.FLOAT):
    """x(NHWC) -> Conv island -> ``build_middle(b, h)`` -> Conv island -> y: ``build_middle``
    returns (tensor, channels) in NHWC, or (output name, None) when it writes the output itself."""
    b = _Builder(seed=14, opset=opset)
    h = b.nhwc_conv("x", cin, 4)
    mid, channels = build_middle(b, h)
    if channels is not None:
        b.nodes.append(helper.make_node("Identity", [b.nhwc_conv(mid, channels, 2)], ["y"]))
    return b.model([_vi("x", list(in_shape))], [_vi("y", out_shape or [None] * 4, out_elem)])


HANDLER_CASES = {
    "unary_chain": lambda b, h: (b.node("Clip", [b.node("Tanh", [b.node("Elu", [h])]), b.const(np.array(-0.5, np.float32)),
                                                  b.const(np.array(0.5, np.float32))]), 4),
    "where": lambda b, h: (b.node("Where", [b.node("Greater", [h, b.const(np.zeros(4, np.float32))]), h,
                                            b.const(np.linspace(0, 1, 4).astype(np.float32))]), 4),
    "prelu": lambda b, h: (b.node("PRelu", [h, b.const(np.linspace(0.1, 0.4, 4).astype(np.float32))]), 4),
    "full_rank_constant": lambda b, h: (b.node("Mul", [h, b.const(b.rng.normal(size=(1, 4, 5, 4)).astype(np.float32))]), 4),
    "concat_constant": lambda b, h: (b.node("Concat", [h, b.const(np.ones((1, 4, 5, 2), np.float32))], axis=3), 6),
    "reduce_keepdims": lambda b, h: (b.node("Mul", [h, b.node("ReduceMax", [h], axes=[-1], keepdims=1)]), 4),
    "pad_constant": lambda b, h: (b.node("Pad", [h, b.const(np.array([0, 1, 0, 0, 0, 0, 1, 0], np.int64)),
                                                 b.const(np.array(0.5, np.float32))]), 4),
    "split_sizes": lambda b, h: (
        b.node("Concat", b.node("Split", [h, b.const(np.array([1, 3], np.int64))], n_out=2, axis=-1)[::-1], axis=3), 4
    ),
    "softmax_channels": lambda b, h: (b.node("Softmax", [h], axis=3), 4),
    "qdq_per_tensor": lambda b, h: (b.node("DequantizeLinear", [b.node("QuantizeLinear", [h, b.const(np.array(0.05, np.float32))]),
                                                                 b.const(np.array(0.05, np.float32))]), 4),
    "resize_sizes": lambda b, h: (b.node("Resize", [h, "", "", b.const(np.array([1, 8, 10, 4], np.int64))], mode="linear"), 4),
    "gather_rows": lambda b, h: (b.node("Gather", [h, b.const(np.array([3, 1], np.int64))], axis=1), 4),
}


@pytest.mark.parametrize("case", list(HANDLER_CASES))
def test_handler_moves_transposes_exactly(case):
    model = _island(HANDLER_CASES[case])
    result = run_pass(model, "layout-nchw")
    stats = result.records[0].stats
    assert result.records[0].changed, stats
    assert stats["transposes_after"] == 2, stats  # only the input's and the output's remain
    assert_same_outputs(model, result.model, random_inputs(model, seed=4), rtol=1e-6)


def test_reductions_that_drop_axes_leave_no_transpose():
    def middle(b, h):
        b.nodes.append(helper.make_node("ArgMin", [h], ["y"], axis=-1, keepdims=0))
        return "y", None

    model = _island(middle, out_shape=[1, 4, 5], out_elem=TensorProto.INT64)
    result = run_pass(model, "layout-nchw")
    assert result.records[0].stats["transposes_after"] == 1
    assert_same_outputs(model, result.model)

    def middle2(b, h):
        b.nodes.append(helper.make_node("ReduceMean", [b.node("Gather", [h, b.const(np.array(2, np.int64))], axis=2)],
                                        ["y"], axes=[1], keepdims=0))  # [N,H,C] -> [N,C]
        return "y", None

    model = _island(middle2, out_shape=[1, 4])
    result = run_pass(model, "layout-nchw")
    assert result.records[0].stats["transposes_after"] == 1
    assert_same_outputs(model, result.model)


def test_duplicate_transposes_of_one_tensor_merge():
    model = concat_model()  # both branches transpose x with the same perm
    result = run_pass(model, "layout-nchw")
    assert result.records[0].stats["merged"] == 1
    ins = [t for t in transposes(result.model) if t.input[0] == "x"]
    assert len(ins) == 1


def test_permutation_helpers():
    p = (0, 2, 3, 1)
    assert compose(p, invert(p)) == (0, 1, 2, 3)
    x = np.arange(24).reshape(1, 2, 3, 4)
    assert np.array_equal(np.transpose(np.transpose(x, p), (0, 3, 1, 2)), np.transpose(x, compose(p, (0, 3, 1, 2))))


# -- random channel-last graphs --------------------------------------------------------------------
def random_channel_last_model(seed: int) -> onnx.ModelProto:
    """A random tf2onnx-style graph: conv islands, elementwise ops with constants and with each
    other, concats, reductions, softmax, ops without a handler, and random outputs (fan-out
    everywhere). Spatial size is fixed (3x3 convs, pads 1) so any two tensors can meet."""
    b = _Builder(seed=seed)
    rng = np.random.default_rng(seed)
    pool = [("x", 3)]  # (NHWC tensor, channels)
    side_inputs = []
    for _ in range(int(rng.integers(4, 12))):
        x, c = pool[int(rng.integers(len(pool)))]
        kind = rng.choice(["conv", "conv", "unary", "const", "binary", "concat", "reduce", "softmax",
                           "pair", "input_bias", "flatten"])
        if kind == "conv":
            cout = int(rng.integers(2, 6))
            pool.append((b.nhwc_conv(x, c, cout), cout))
        elif kind == "unary":
            pool.append((b.node(str(rng.choice(["Relu", "Sigmoid", "Neg", "Abs"])), [x]), c))
        elif kind == "const":
            pool.append((b.node(str(rng.choice(["Mul", "Add", "Sub"])), [x, b.const(rng.normal(size=c).astype(np.float32))]), c))
        elif kind == "binary":
            same = [t for t, k in pool if k == c]
            pool.append((b.node(str(rng.choice(["Add", "Mul", "Max"])), [x, same[int(rng.integers(len(same)))]]), c))
        elif kind == "concat":
            y, d = pool[int(rng.integers(len(pool)))]
            pool.append((b.node("Concat", [x, y], axis=3), c + d))
        elif kind == "reduce":
            pool.append((b.node("Mul", [x, b.node("ReduceMean", [x], axes=[1, 2], keepdims=1)]), c))
        elif kind == "softmax":
            pool.append((b.node("Softmax", [x], axis=-1), c))
        elif kind == "pair":  # an explicit NCHW detour: Transpose -> Relu -> Transpose
            t = b.node("Relu", [b.node("Transpose", [x], perm=TO_NCHW)])
            pool.append((b.node("Transpose", [t], perm=TO_NHWC), c))
        elif kind == "input_bias":
            name = f"bias{len(side_inputs)}"
            side_inputs.append(_vi(name, [c]))
            pool.append((b.node("Add", [x, name]), c))
        else:
            flat = b.node("Flatten", [x])
            b.nodes.append(helper.make_node("Identity", [flat], [f"flat{len(b.nodes)}"]))
    outputs, names = [], set()
    picks = [pool[-1]] + [pool[int(i)] for i in rng.integers(len(pool), size=2)]
    for t, c in picks:
        if t != "x" and t not in names:
            names.add(t)
            outputs.append(_vi(t, [1, 4, 5, c]))
    for n in list(b.nodes):
        if n.op_type == "Identity" and n.output[0].startswith("flat"):
            outputs.append(_vi(n.output[0], [1, None]))
    return b.model([_vi("x", [1, 4, 5, 3])] + side_inputs, outputs, f"random{seed}")


@pytest.mark.parametrize("seed", range(40))
def test_random_channel_last_graphs(seed):
    model = random_channel_last_model(seed)
    before = len(transposes(model))
    result = run_pass(model, "layout-nchw")  # numeric verification inside
    record = result.records[0]
    assert len(transposes(result.model)) <= before
    assert not record.changed or record.stats["transposes_after"] < before
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, result.model, random_inputs(model, seed=seed))
    assert not run_pass(result.model, "layout-nchw").records[0].changed
    nchw = run_pass(model, "layout-nchw(io=nchw)", verify="structural")
    first = nchw.records[0]
    in_perms = {k: v["perm"] for k, v in first.details.get(LAYOUT_INPUTS_KEY, {}).items()}
    out_perms = {k: v["perm"] for k, v in first.details.get(LAYOUT_OUTPUTS_KEY, {}).items()}
    feeds = random_inputs(model, seed=seed)
    got = run(nchw.model, {k: np.transpose(v, in_perms[k]) if k in in_perms else v for k, v in feeds.items()})
    for key, ref in run(model, feeds).items():
        back = np.transpose(got[key], invert(tuple(out_perms[key]))) if key in out_perms else got[key]
        np.testing.assert_allclose(back, ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref)) + 1e-6), err_msg=key)


@pytest.mark.parametrize("io", ["keep", "nchw"])
@pytest.mark.parametrize("name", ["residual", "qdq", "pad_slice_resize"])
def test_tensorrt_rtx_builds_the_result(name, io):
    """What layout-nchw writes (NCHW islands, remapped Q/DQ axes, Pad/Resize/Slice) builds."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed (pip install tensorrt-rtx-cu12)")
    from optimizer.tensorrt_rtx import check_model

    opts = "(io=nchw)" if io == "nchw" else ""
    out = run_pass(CHANNEL_LAST_MODELS[name](), ACCEPTANCE.format(opts=opts), verify="structural").model
    result = check_model(out)
    assert result.parsed and result.built and not result.unsupported
