"""Differential tests for ``layout-nchw`` (passes/layout/nchw.py) on whole channel-last graphs:
the acceptance pipeline, the sample model, idempotence, random graphs, TensorRT-RTX builds."""

import numpy as np
import onnx
import pytest
from channel_last_models import (
    CHANNEL_LAST_MODELS,
    TO_NCHW,
    TO_NHWC,
    Builder,
    sample_channel_last,
    transposes,
    vi,
)
from helpers import SAMPLES, assert_same_outputs, op_types, random_inputs, run, run_pass
from onnx import helper

from optimizer.io import load_model
from optimizer.io_layout import LAYOUT_INPUTS_KEY, LAYOUT_OUTPUTS_KEY
from passes.layout.perms import invert

ACCEPTANCE = (
    "fixpoint(cleanup,fold-constants,layout-nchw{opts},fuse-conv-bn,fuse-affine,fuse-matmul-add,"
    "fuse-gemm-transpose,fuse-pad)"
)


# -- checks ------------------------------------------------------------------------------------
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


def test_io_option_parses_from_pipeline_text():
    from optimizer.errors import PipelineError
    from optimizer.pipeline import parse_pipeline

    (p,) = parse_pipeline("layout-nchw(io=nchw)")
    assert p.io == "nchw" and p.spec() == "layout-nchw(io=nchw)"
    with pytest.raises(PipelineError):
        parse_pipeline("layout-nchw(io=nhwc)")


def test_nchw_graphs_are_left_unchanged():
    for name in ("digits_cnn", "transformer"):
        model = load_model(SAMPLES / name / "model.onnx")[0]
        result = run_pass(model, "layout-nchw")
        assert not result.records[0].changed


# -- random channel-last graphs --------------------------------------------------------------------
def random_channel_last_model(seed: int) -> onnx.ModelProto:
    """A random tf2onnx-style graph: conv islands, elementwise ops with constants and with each
    other, concats, reductions, softmax, ops without a handler, and random outputs (fan-out
    everywhere). Spatial size is fixed (3x3 convs, pads 1) so any two tensors can meet."""
    b = Builder(seed=seed)
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
            side_inputs.append(vi(name, [c]))
            pool.append((b.node("Add", [x, name]), c))
        else:
            flat = b.node("Flatten", [x])
            b.nodes.append(helper.make_node("Identity", [flat], [f"flat{len(b.nodes)}"]))
    outputs, names = [], set()
    picks = [pool[-1]] + [pool[int(i)] for i in rng.integers(len(pool), size=2)]
    for t, c in picks:
        if t != "x" and t not in names:
            names.add(t)
            outputs.append(vi(t, [1, 4, 5, c]))
    for n in list(b.nodes):
        if n.op_type == "Identity" and n.output[0].startswith("flat"):
            outputs.append(vi(n.output[0], [1, None]))
    return b.model([vi("x", [1, 4, 5, 3])] + side_inputs, outputs, f"random{seed}")


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
