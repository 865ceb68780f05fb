"""Bias correction: the per-channel shift INT8 weights cause, folded into biases; channel means."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import SAMPLES
from onnx import TensorProto, helper, numpy_helper

from calibration.collect import ChannelMeans, augment_model, collect_channel_means
from optimizer.runtime import OrtRunner
from passes.bias_correction import (
    apply_bias_correction,
    bias_shift,
    correction_targets,
    corrections_for,
    dequantized_weight_values,
    mean_tensors,
)
from passes.graph_utils import import_graph
from passes.quantization import PlacementOptions, find_sites, quantize_weight
from passes.skips import Skips


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _init(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


def _export(graph: gs.Graph) -> onnx.ModelProto:
    graph.cleanup()
    model = gs.export_onnx(graph)
    model.ir_version = 10
    return model


# ---------------------------------------------------------------------------------------------
# (a) bias_shift against brute force


def _conv_nchw(x: np.ndarray, w: np.ndarray, group: int) -> np.ndarray:
    """Plain float64 grouped convolution, stride 1, no padding (the brute-force reference)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // group
    out = np.zeros((n, o, h - kh + 1, wd - kw + 1))
    for g in range(group):
        xs = x[:, g * cg:(g + 1) * cg]
        windows = np.lib.stride_tricks.sliding_window_view(xs, (kh, kw), axis=(2, 3))  # n, cg, H', W', kh, kw
        out[:, g * og:(g + 1) * og] = np.einsum("nchwij,ocij->nohw", windows, w[g * og:(g + 1) * og])
    return out


@pytest.mark.parametrize(("in_ch", "out_ch", "group"), [(6, 4, 1), (6, 8, 2), (6, 12, 3), (5, 5, 5), (4, 8, 4)])
def test_conv_shift_matches_brute_force(in_ch, out_ch, group):
    """Dense, grouped and depthwise (incl. channel multiplier): E[W*x] - E[Wq*x] per output channel.

    x is constant over space within a sample (its per-channel mean is the same at every position),
    and pads=0, so the padding effect bias_shift ignores is zero and the match is exact.
    """
    rng = np.random.default_rng(in_ch * 100 + out_ch * 10 + group)
    w = rng.normal(0, 1, (out_ch, in_ch // group, 3, 2)).astype(np.float32)
    wq = dequantized_weight_values(w, 0)
    mu = rng.uniform(-3, 8, in_ch)
    x = (mu[None, :] + rng.normal(0, 2, (64, in_ch)))[:, :, None, None] * np.ones((1, 1, 7, 6))
    brute = (_conv_nchw(x, w.astype(np.float64), group) - _conv_nchw(x, wq.astype(np.float64), group)).mean(axis=(0, 2, 3))
    shift = bias_shift("Conv", w, wq, x.mean(axis=(0, 2, 3)), {"group": group})
    assert shift.shape == (out_ch,) and shift.dtype == np.float64
    np.testing.assert_allclose(shift, brute, rtol=1e-9, atol=1e-12)
    assert np.abs(shift).max() > 0


def test_conv_shift_matches_onnx_runtime_with_pads_zero():
    """The same through ONNX Runtime's Conv (float32), on inputs with a spatially constant mean."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 1, (8, 3, 3, 3)).astype(np.float32)
    wq = dequantized_weight_values(w, 0)
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], group=2), helper.make_node("Conv", ["x", "wq"], ["yq"], group=2)],
        [_vi("x", ["n", 6, 5, 5])], [_vi("y", ["n", 8, 3, 3]), _vi("yq", ["n", 8, 3, 3])],
        [_init("w", w), _init("wq", wq)],
    )
    mu = rng.uniform(1, 10, 6)
    x = ((mu[None, :] + rng.normal(0, 1, (32, 6)))[:, :, None, None] * np.ones((1, 1, 5, 5))).astype(np.float32)
    out = OrtRunner(model).run({"x": x})
    measured = (out["y"].astype(np.float64) - out["yq"]).mean(axis=(0, 2, 3))
    shift = bias_shift("Conv", w, wq, x.astype(np.float64).mean(axis=(0, 2, 3)), {"group": 2})
    np.testing.assert_allclose(shift, measured, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_shift_matches_brute_force(trans_b):
    rng = np.random.default_rng(trans_b)
    k, n = 24, 10
    w = rng.normal(0, 1, (n, k) if trans_b else (k, n)).astype(np.float32)
    axis = 0 if trans_b else 1  # the quantizer's per-output-channel axis
    wq = dequantized_weight_values(w, axis)
    x = rng.normal(0, 1, (200, k)) + rng.uniform(0, 5, k)
    alpha = 0.7
    wk, wqk = (w.T, wq.T) if trans_b else (w, wq)
    brute = (alpha * (x @ wk.astype(np.float64)) - alpha * (x @ wqk.astype(np.float64))).mean(axis=0)
    shift = bias_shift("Gemm", w, wq, x.mean(axis=0), {"transB": trans_b, "alpha": alpha, "beta": 2.0})
    np.testing.assert_allclose(shift, brute, rtol=1e-9, atol=1e-12)


def test_matmul_shift_matches_brute_force():
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (16, 12)).astype(np.float32)
    wq = dequantized_weight_values(w, 1)
    x = rng.normal(0, 1, (8, 5, 16)) + rng.uniform(-2, 6, 16)  # [batch, seq, K]
    brute = (x @ w.astype(np.float64) - x @ wq.astype(np.float64)).mean(axis=(0, 1))
    shift = bias_shift("MatMul", w, wq, x.mean(axis=(0, 1)), {})
    np.testing.assert_allclose(shift, brute, rtol=1e-9, atol=1e-12)


def test_bias_shift_refuses_what_it_cannot_compute():
    w = np.ones((4, 3, 1, 1), np.float32)
    with pytest.raises(ValueError, match="channels"):
        bias_shift("Conv", w, w, np.zeros(5), {})
    with pytest.raises(ValueError, match="transA"):
        bias_shift("Gemm", np.ones((3, 4), np.float32), np.ones((3, 4), np.float32), np.zeros(3), {"transA": 1})
    with pytest.raises(ValueError, match="2-D"):
        bias_shift("MatMul", np.ones((2, 3, 4), np.float32), np.ones((2, 3, 4), np.float32), np.zeros(3), {})
    with pytest.raises(ValueError, match="ConvTranspose"):
        bias_shift("ConvTranspose", w, w, np.zeros(3), {})


def test_dequantized_weight_is_what_dequantize_linear_computes():
    """Wq = quantize_weight's int8 * scale, bit for bit what ONNX Runtime's DequantizeLinear gives."""
    rng = np.random.default_rng(5)
    w = (rng.normal(0, 1, (6, 4, 3, 3)) * rng.uniform(0.01, 10, (6, 1, 1, 1))).astype(np.float32)
    for axis in (0, None):
        q, scale = quantize_weight(w, axis)
        attrs = {"axis": axis} if axis is not None else {}
        model = _model([helper.make_node("DequantizeLinear", ["q", "s"], ["y"], **attrs)], [], [_vi("y", list(w.shape))],
                       [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s")])
        ort = OrtRunner(model).run({})["y"]
        np.testing.assert_array_equal(dequantized_weight_values(w, axis), ort)


# ---------------------------------------------------------------------------------------------
# apply_bias_correction


def _shifted(model, corrected, feeds):
    a, b = OrtRunner(model).run(feeds), OrtRunner(corrected).run(feeds)
    return {k: b[k].astype(np.float64) - a[k] for k in a}


def test_conv_bias_is_created_or_updated_and_shared_biases_are_copied():
    rng = np.random.default_rng(0)
    inits = [_init("w1", rng.normal(size=(4, 3, 1, 1))), _init("w2", rng.normal(size=(4, 3, 1, 1))),
             _init("w3", rng.normal(size=(4, 3, 1, 1))), _init("b", [1, 2, 3, 4])]
    model = _model(
        [helper.make_node("Conv", ["x", "w1", "b"], ["y1"], name="c1"),
         helper.make_node("Conv", ["x", "w2", "b"], ["y2"], name="c2"),  # shares b with c1
         helper.make_node("Conv", ["x", "w3"], ["y3"], name="c3")],  # no bias
        [_vi("x", ["n", 3, 2, 2])], [_vi(f"y{i}", ["n", 4, 2, 2]) for i in (1, 2, 3)], inits,
    )
    graph = import_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    s1, s3 = np.array([0.5, -1, 2, 0.25]), np.array([1, 2, 3, 4.0])
    skipped = Skips()
    assert apply_bias_correction(graph, [(nodes["c1"], s1), (nodes["c3"], s3)], skipped) == 2
    assert skipped == {}
    corrected = _export(graph)
    onnx.checker.check_model(corrected, full_check=True)
    d = _shifted(model, corrected, {"x": rng.normal(size=(2, 3, 2, 2)).astype(np.float32)})
    np.testing.assert_allclose(d["y1"], np.broadcast_to(s1[None, :, None, None], d["y1"].shape), atol=1e-6)
    np.testing.assert_allclose(d["y2"], 0, atol=0)  # the shared bias was copied, c2 still reads the original
    np.testing.assert_allclose(d["y3"], np.broadcast_to(s3[None, :, None, None], d["y3"].shape), atol=1e-6)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[3]), [1, 2, 3, 4])  # input untouched
    c3 = next(n for n in corrected.graph.node if n.name == "c3")
    bias = next(t for t in corrected.graph.initializer if t.name == c3.input[2])
    assert numpy_helper.to_array(bias).dtype == np.float32


def test_gemm_bias_respects_beta_alpha_and_is_created_when_absent():
    rng = np.random.default_rng(1)
    inits = [_init("w1", rng.normal(size=(5, 3))), _init("c", rng.normal(size=(3,))),
             _init("w2", rng.normal(size=(3, 5))), _init("c_row", rng.normal(size=(1, 3))), _init("w3", rng.normal(size=(5, 3)))]
    model = _model(
        [helper.make_node("Gemm", ["x", "w1", "c"], ["y1"], name="g1", beta=0.5, alpha=2.0),
         helper.make_node("Gemm", ["x", "w2", "c_row"], ["y2"], name="g2", transB=1, beta=4.0),
         helper.make_node("Gemm", ["x", "w3"], ["y3"], name="g3", beta=0.25)],
        [_vi("x", [2, 5])], [_vi(f"y{i}", [2, 3]) for i in (1, 2, 3)], inits,
    )
    graph = import_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    shifts = {name: rng.normal(size=3) for name in nodes}
    assert apply_bias_correction(graph, [(nodes[k], v) for k, v in shifts.items()]) == 3
    corrected = _export(graph)
    onnx.checker.check_model(corrected, full_check=True)
    d = _shifted(model, corrected, {"x": rng.normal(size=(2, 5)).astype(np.float32)})
    for i, name in ((1, "g1"), (2, "g2"), (3, "g3")):
        np.testing.assert_allclose(d[f"y{i}"], np.broadcast_to(shifts[name], (2, 3)), atol=1e-5)


def test_gemm_with_beta_zero_or_an_unbroadcastable_c_is_skipped():
    rng = np.random.default_rng(2)
    model = _model(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g", beta=0.0)],
        [_vi("x", [2, 5])], [_vi("y", [2, 3])], [_init("w", rng.normal(size=(5, 3))), _init("c", np.ones(3))],
    )
    graph = import_graph(model)
    skipped = Skips()
    assert apply_bias_correction(graph, [(graph.nodes[0], np.ones(3))], skipped) == 0
    assert skipped == {"no_bias_to_correct": 1}
    # and NaN/inf shifts are never written
    assert apply_bias_correction(graph, [(graph.nodes[0], np.array([1, np.nan, 0]))], skipped) == 0
    assert skipped["nonfinite_bias_shift"] == 1


def _matmul_model(rng, extra_nodes=(), extra_outputs=(), bias=None, bias_first=False):
    bias = rng.normal(size=(4,)) if bias is None else bias
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["b", "m"] if bias_first else ["m", "b"], ["y"], name="add"), *extra_nodes]
    return _model(nodes, [_vi("x", ["n", 3, 6])], [_vi("y", ["n", 3, 4]), *extra_outputs],
                  [_init("w", rng.normal(size=(6, 4))), _init("b", bias)])


@pytest.mark.parametrize("bias_shape", [(4,), (1, 4), (3, 4), (1,), ()])
@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_bias_add_is_corrected(bias_shape, bias_first):
    rng = np.random.default_rng(3)
    model = _matmul_model(rng, bias=rng.normal(size=bias_shape), bias_first=bias_first)
    graph = import_graph(model)
    mm = next(n for n in graph.nodes if n.op == "MatMul")
    shift = rng.normal(size=4)
    assert apply_bias_correction(graph, [(mm, shift)]) == 1
    corrected = _export(graph)
    d = _shifted(model, corrected, {"x": rng.normal(size=(2, 3, 6)).astype(np.float32)})
    np.testing.assert_allclose(d["y"], np.broadcast_to(shift, (2, 3, 4)), atol=1e-5)


def test_matmul_without_a_bias_of_its_own_is_skipped():
    rng = np.random.default_rng(4)
    cases = {
        "no add": _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", ["n", 6])], [_vi("y", ["n", 4])],
                         [_init("w", rng.normal(size=(6, 4)))]),
        "output also read elsewhere": _matmul_model(rng, [helper.make_node("Relu", ["m"], ["r"])], [_vi("r", ["n", 3, 4])]),
        "output is a graph output": _matmul_model(rng, (), [_vi("m", ["n", 3, 4])]),
    }
    cases["non-constant addend"] = _model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "z"], ["y"])],
        [_vi("x", ["n", 6]), _vi("z", ["n", 4])], [_vi("y", ["n", 4])], [_init("w", rng.normal(size=(6, 4)))],
    )
    for what, model in cases.items():
        graph = import_graph(model)
        mm = next(n for n in graph.nodes if n.op == "MatMul")
        skipped = Skips()
        assert apply_bias_correction(graph, [(mm, np.ones(4))], skipped) == 0, what
        assert skipped == {"no_bias_to_correct": 1}, what


def test_shared_matmul_bias_is_copied():
    rng = np.random.default_rng(5)
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["m1"], name="mm1"), helper.make_node("Add", ["m1", "b"], ["y1"]),
         helper.make_node("MatMul", ["x", "w"], ["m2"], name="mm2"), helper.make_node("Add", ["m2", "b"], ["y2"])],
        [_vi("x", ["n", 6])], [_vi("y1", ["n", 4]), _vi("y2", ["n", 4])],
        [_init("w", rng.normal(size=(6, 4))), _init("b", rng.normal(size=4))],
    )
    graph = import_graph(model)
    mm1 = next(n for n in graph.nodes if n.name == "mm1")
    assert apply_bias_correction(graph, [(mm1, np.full(4, 3.0))]) == 1
    d = _shifted(model, _export(graph), {"x": rng.normal(size=(2, 6)).astype(np.float32)})
    np.testing.assert_allclose(d["y1"], 3.0, atol=1e-5)
    np.testing.assert_array_equal(d["y2"], 0)


def test_targets_from_quant_sites_and_axis_conflicts():
    """x feeds a Conv (channel axis 1) and a MatMul (last axis): one mean per tensor, so the MatMul
    is skipped; a ConvTranspose site is not supported; per-tensor (axis None) weights work."""
    rng = np.random.default_rng(6)
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("MatMul", ["x", "mw"], ["m"], name="mm"),
         helper.make_node("ConvTranspose", ["x", "tw"], ["t"], name="convt")],
        [_vi("x", ["n", 4, 4, 4])], [_vi("c", ["n", 2, 2, 2]), _vi("m", ["n", 4, 4, 3]), _vi("t", ["n", 2, 5, 5])],
        [_init("w", rng.normal(size=(2, 4, 3, 3))), _init("mw", rng.normal(size=(4, 3))), _init("tw", rng.normal(size=(4, 2, 2, 2)))],
    )
    graph = import_graph(model)
    sites, _ = find_sites(graph, PlacementOptions(1, False, False))
    sites = [s for s in sites if s.kind == "weight"]
    for s in sites:
        s.axis = None  # as below opset 13
    skipped = Skips()
    targets = correction_targets(sites, skipped)
    assert [t.node.name for t in targets] == ["conv", "mm"] and skipped == {"bias_correction_unsupported": 1}
    axes = mean_tensors(targets)
    assert axes == {"x": 1}
    x = rng.normal(2, 1, (8, 4, 4, 4)).astype(np.float32)
    means = collect_channel_means(model, axes, {"x": x})
    corrections = corrections_for(targets, means.means, skipped, axes)
    assert [n.name for n, _ in corrections] == ["conv"] and skipped["channel_axis_conflict"] == 1
    w = numpy_helper.to_array(model.graph.initializer[0])
    expected = bias_shift("Conv", w, dequantized_weight_values(w, None), x.astype(np.float64).mean(axis=(0, 2, 3)), {})
    np.testing.assert_allclose(corrections[0][1], expected, rtol=1e-12)
    assert corrections_for(targets, {}, skipped, axes) == [] and skipped["no_channel_mean"] == 1


# ---------------------------------------------------------------------------------------------
# (b) differential: weight-only INT8 with and without the correction, in ONNX Runtime


def weight_only_int8(model: onnx.ModelProto, calib, correct: bool, min_weight_elements: int = 1):
    """A copy of ``model`` with every weight the quantizer would quantize replaced by its
    dequantized INT8 values (weight-only fake quantization, no activation Q/DQ), and, with
    ``correct``, the bias correction applied from ``calib``'s channel means."""
    graph = import_graph(model)
    sites, _ = find_sites(graph, PlacementOptions(min_weight_elements, False, False))
    sites = [s for s in sites if s.kind == "weight"]
    skipped = Skips()
    corrections = []
    if correct:
        targets = correction_targets(sites, skipped)
        axes = mean_tensors(targets)
        means = collect_channel_means(model, axes, calib)
        corrections = corrections_for(targets, means.means, skipped, axes)
    for site in sites:
        weight = site.node.inputs[site.index]
        site.node.inputs[site.index] = gs.Constant(f"{weight.name}_wq_{id(site)}", dequantized_weight_values(weight.values, site.axis))
    applied = apply_bias_correction(graph, corrections, skipped)
    return _export(graph), applied, len(sites), skipped


def _errors(reference: dict, quantized: dict) -> tuple[float, float]:
    """(mean over channels of |E[y_q - y]|, MSE) over all outputs; channels: axis 1 of rank-4
    outputs, else the last axis."""
    bias, mse = [], []
    for name, ref in reference.items():
        err = quantized[name].astype(np.float64) - ref
        axis = 1 if err.ndim == 4 else err.ndim - 1
        bias.append(np.abs(err.mean(axis=tuple(i for i in range(err.ndim) if i != axis))).mean())
        mse.append(np.mean(err**2))
    return float(np.mean(bias)), float(np.mean(mse))


def big_mean_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> grouped Conv -> Relu -> depthwise Conv -> Relu -> 1x1 Conv, on inputs whose
    channels have large positive means (built with ``big_mean_data``)."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w1", rng.normal(0, 0.3, (16, 8, 3, 3))), _init("b1", rng.uniform(1, 3, 16)),
        _init("w2", rng.normal(0, 0.3, (16, 4, 3, 3))), _init("b2", rng.uniform(1, 3, 16)),
        _init("w3", rng.normal(0, 0.3, (16, 1, 3, 3))),  # depthwise, no bias
        _init("w4", rng.normal(0, 0.3, (8, 16, 1, 1))), _init("b4", rng.normal(0, 1, 8)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], group=4, name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], group=16, pads=[1, 1, 1, 1], name="dw3"),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Conv", ["r3", "w4", "b4"], ["y"], name="conv4"),
    ]
    return _model(nodes, [_vi("x", ["n", 8, 16, 16])], [_vi("y", ["n", 8, 12, 12])], inits)


def big_mean_data(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100)  # the per-channel means are fixed; the samples vary with seed
    mu = rng.uniform(5, 20, 8)
    x = mu[None, :, None, None] + np.random.default_rng(seed).normal(0, 2, (n, 8, 16, 16))
    return {"x": x.astype(np.float32)}


def _differential(model, calib, held_out):
    reference = OrtRunner(model).run(held_out)
    plain, applied_plain, sites, _ = weight_only_int8(model, calib, correct=False)
    corrected, applied, sites_c, skipped = weight_only_int8(model, calib, correct=True)
    assert applied_plain == 0 and sites == sites_c and applied == sites, skipped
    bias_plain, mse_plain = _errors(reference, OrtRunner(plain).run(held_out))
    bias_corr, mse_corr = _errors(reference, OrtRunner(corrected).run(held_out))
    print(f"bias error {bias_plain:.3g} -> {bias_corr:.3g} ({bias_plain / bias_corr:.2f}x), MSE {mse_plain:.3g} -> {mse_corr:.3g}")
    return bias_plain, bias_corr, mse_plain, mse_corr


def test_correction_removes_the_mean_error_on_large_mean_activations():
    model = big_mean_cnn()
    bias_plain, bias_corr, mse_plain, mse_corr = _differential(model, big_mean_data(64, seed=1), big_mean_data(64, seed=2))
    assert bias_corr * 5 <= bias_plain
    assert mse_corr <= mse_plain


def test_correction_on_digits_cnn_halves_the_mean_error():
    """digits_cnn (8x8 inputs, padded 3x3 convs: the border outputs the correction ignores are a
    large share here) on its calib.npz, measured on the held-out eval.npz."""
    folder = SAMPLES / "digits_cnn"
    model = onnx.load(folder / "model.onnx")
    calib = dict(np.load(folder / "calib.npz"))
    held_out = {k: v for k, v in np.load(folder / "eval.npz").items() if k in {i.name for i in model.graph.input}}
    bias_plain, bias_corr, mse_plain, mse_corr = _differential(model, calib, held_out)
    assert bias_corr * 1.8 <= bias_plain
    assert mse_corr <= mse_plain


# ---------------------------------------------------------------------------------------------
# (c) collect_channel_means


def _cnn_mlp():
    """x [n,3,5,5] -> Conv -> Relu -> Flatten -> MatMul, and a 3-D MatMul input z [n,4,6]."""
    rng = np.random.default_rng(0)
    return _model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("MatMul", ["f", "fw"], ["y"]),
         helper.make_node("MatMul", ["z", "zw"], ["yz"])],
        [_vi("x", ["n", 3, 5, 5]), _vi("z", ["n", 4, 6])], [_vi("y", ["n", 2]), _vi("yz", ["n", 4, 2])],
        [_init("w", rng.normal(size=(4, 3, 3, 3))), _init("fw", rng.normal(size=(36, 2))), _init("zw", rng.normal(size=(6, 2)))],
    )


def test_channel_means_are_exact_and_independent_of_the_batch_size():
    model = _cnn_mlp()
    rng = np.random.default_rng(1)
    data = {"x": (rng.normal(3, 2, (37, 3, 5, 5))).astype(np.float32), "z": rng.normal(-1, 1, (37, 4, 6)).astype(np.float32)}
    tensors = {"x": 1, "c": 1, "r": 1, "f": -1, "z": -1, "yz": 2}
    full = OrtRunner(augment_model(model, ["c", "r", "f"])).run(data)
    values = {**data, **full}
    results = {b: collect_channel_means(model, tensors, data, batch_size=b) for b in (1, 3, 16)}
    for b, result in results.items():
        assert isinstance(result, ChannelMeans) and result.samples == 37 and result.skipped == {}
        assert result.batches == -(-37 // b)
        assert list(result.means) == list(tensors)
        for name, axis in tensors.items():
            v = values[name].astype(np.float64)
            ax = axis % v.ndim
            expected = v.mean(axis=tuple(i for i in range(v.ndim) if i != ax))
            assert result.means[name].shape == (v.shape[ax],) and result.means[name].dtype == np.float64
            np.testing.assert_allclose(result.means[name], expected, rtol=1e-12, atol=1e-12, err_msg=f"{name} batch {b}")
            assert (result.counts[name] == v.size // v.shape[ax]).all()
    for name in tensors:
        np.testing.assert_allclose(results[1].means[name], results[16].means[name], rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(results[3].means[name], results[16].means[name], rtol=1e-13, atol=1e-14)


def test_channel_means_skip_what_they_cannot_reduce_and_honour_max_samples():
    model = _cnn_mlp()
    rng = np.random.default_rng(2)
    data = {"x": rng.normal(size=(20, 3, 5, 5)).astype(np.float32), "z": rng.normal(size=(20, 4, 6)).astype(np.float32)}
    result = collect_channel_means(model, {"w": 0, "nope": 1, "c": 1, "y": 4}, data, batch_size=6, max_samples=9)
    assert result.samples == 9 and list(result.means) == ["c"]
    assert set(result.skipped) == {"w", "nope", "y"} and "initializer" in result.skipped["w"]
    assert "out of range" in result.skipped["y"]
    c = OrtRunner(augment_model(model, ["c"])).run({k: v[:9] for k, v in data.items()})["c"].astype(np.float64)
    np.testing.assert_allclose(result.means["c"], c.mean(axis=(0, 2, 3)), rtol=1e-12)


def test_channel_means_leave_nonfinite_values_out():
    model = _cnn_mlp()
    x = np.ones((4, 3, 5, 5), np.float32)
    x[0, 1, 0, 0] = np.nan
    x[1, 2] = np.inf
    result = collect_channel_means(model, {"x": 1}, {"x": x, "z": np.zeros((4, 4, 6), np.float32)}, batch_size=2)
    np.testing.assert_array_equal(result.means["x"], [1, 1, 1])
    np.testing.assert_array_equal(result.counts["x"], [100, 99, 75])


def _peak_bytes(model, tensors, folder) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        collect_channel_means(model, tensors, str(folder), batch_size=16)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_channel_means_memory_does_not_grow_with_the_number_of_samples(tmp_path):
    rng = np.random.default_rng(0)
    model = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        [_vi("x", ["n", 256])], [_vi("y", ["n", 64])],
        [_init("w1", rng.normal(size=(256, 512))), _init("w2", rng.normal(size=(512, 64)))],
    )
    tensors = {"x": -1, "h": -1, "r": -1}
    folders = {}
    for n in (32, 512):
        folders[n] = tmp_path / str(n)
        folders[n].mkdir()
        np.save(folders[n] / "x.npy", rng.normal(size=(n, 256)).astype(np.float32))
    _peak_bytes(model, tensors, folders[32])  # warm-up
    small, large = _peak_bytes(model, tensors, folders[32]), _peak_bytes(model, tensors, folders[512])
    assert large <= 1.2 * small + 64 * 1024, (small, large)
    assert large < 512 * (256 + 512 + 512) * 4
