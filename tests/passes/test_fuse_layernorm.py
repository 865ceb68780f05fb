"""Differential tests for ``fuse-layernorm`` (passes/fuse_layernorm.py).

Every accepted variant is compared with the original in ONNX Runtime (scale-relative rtol 1e-5,
atol 1e-6 for float32, the registry's EXACT tolerance; 5e-3 for float16); every refusal checks
that the pattern is left intact and that the reason is counted.
"""

from collections import Counter

import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import assert_same_outputs, op_types, random_inputs
from onnx import numpy_helper
from pattern_models import LN_OPS, build, fuse


# --------------------------------------------------------------------------- LayerNorm models


def layernorm_model(
    opset=17, axes=(-1,), axes2=None, shape=(2, 4, 8), in_shape=None, dtype=np.float32, div="div",
    square="pow", exponent=2.0, gamma="mul", beta="add", gamma_shape=None, swap=False, eps_init=False,
    keepdims=1, keepdims2=None, extra_output=None, extra_reader=None, sub_input="x", residual=False,
):
    """A hand-written LayerNorm; the options produce the variants and the broken patterns."""
    t = {np.float32: "float", np.float16: "float", np.float64: "double"}[dtype]
    float16, dtype = dtype == np.float16, (np.float32 if dtype == np.float16 else dtype)
    # "?": x = Reshape(inp, shp) with shp of unknown length, so even the rank is unknown;
    # "inferred": x = Neg(inp) has no value_info, the pass must ask shape inference
    unknown, inferred = in_shape == "?", in_shape == "inferred"
    in_dims = shape if in_shape is None or unknown or inferred else in_shape
    dims = "[" + ",".join(str(d) for d in in_dims) + "]"
    rng = np.random.default_rng(0)
    norm = shape[len(shape) - len(axes):] if max(axes) < 0 else shape[min(axes):]
    inits = {}
    lines = []

    def reduce(out, inp, ax, kd):
        if opset >= 18:
            lines.append(f"{out}_axes = Constant<value = int64[{len(ax)}] {{{', '.join(map(str, ax))}}}>()")
            lines.append(f"{out} = ReduceMean<keepdims={kd}>({inp}, {out}_axes)")
        else:
            lines.append(f"{out} = ReduceMean<axes=[{', '.join(map(str, ax))}], keepdims={kd}>({inp})")

    def binary(op, out, a, b):
        lines.append(f"{out} = {op}({b}, {a})" if swap else f"{out} = {op}({a}, {b})")

    if unknown:
        lines.append("x = Reshape(inp, shp)")
    elif inferred:
        lines.append("x = Neg(inp)")
    reduce("mean", "x", axes, keepdims)
    lines.append(f"d = Sub({sub_input}, mean)")
    if square == "pow":
        lines.append(f"two = Constant<value = {t} {{{exponent}}}>()")
        lines.append("sq = Pow(d, two)")
    else:
        lines.append("sq = Mul(d, d)")
    reduce("var", "sq", axes if axes2 is None else axes2, keepdims if keepdims2 is None else keepdims2)
    if eps_init:
        inits["eps"] = np.array([1e-5], dtype)
    else:
        lines.append(f"eps = Constant<value = {t} {{1e-5}}>()")
    binary("Add", "ve", "var", "eps")
    lines.append("std = Sqrt(ve)")
    if div == "div":
        lines.append("n = Div(d, std)")
    else:
        lines.append("r = Reciprocal(std)")
        binary("Mul", "n", "d", "r")
    last = "n"
    if gamma == "mul":
        inits["gamma"] = rng.uniform(0.5, 1.5, gamma_shape or norm).astype(dtype)
        binary("Mul", "gn", last, "gamma")
        last = "gn"
    elif gamma == "const_node":
        values = ", ".join(str(v) for v in rng.uniform(0.5, 1.5, int(np.prod(norm))).astype(np.float32))
        lines.append(f"gamma = Constant<value = {t}[{','.join(map(str, norm))}] {{{values}}}>()")
        binary("Mul", "gn", last, "gamma")
        last = "gn"
    if beta == "add":
        inits["beta"] = rng.normal(size=norm).astype(dtype)
        binary("Add", "bn", last, "beta")
        last = "bn"
    if residual:  # a non-constant Add after the normalization is not a beta
        binary("Add", "res", last, "x")
        last = "res"
    lines.append(f"y = {'Neg' if unknown or inferred else 'Identity'}({last})")  # cleanup renames ``last`` to y
    outputs = [f"{t}{dims} y"]
    if extra_output:
        outputs.append(f"{t}[1] {extra_output}")
    if extra_reader:
        lines.append(f"side = Neg({extra_reader})")
        outputs.append(f"{t}[1] side")
    inputs = f"{t}{dims} inp, int64[r] shp" if unknown else f"{t}{dims} {'inp' if inferred else 'x'}"
    if sub_input != "x":
        inputs += f", {t}{dims} {sub_input}"
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
ln ({inputs}) => ({", ".join(outputs)}) {{
  {chr(10).join(lines)}
}}"""
    return build(text, inits, float16=float16)


def ln_inputs(model, seed=3):
    """Seeded inputs; ``shp`` (the unknown-rank models' Reshape target) gets the real shape."""
    feeds = random_inputs(model, seed=seed)
    if "shp" in feeds:
        feeds["shp"] = np.array([2, 4, 8], np.int64)
    return feeds


LN_VARIANTS = {
    "div-opset17": {},
    "axes-input-opset18": {"opset": 18},
    "opset20": {"opset": 20},
    "reciprocal": {"div": "reciprocal"},
    "reciprocal-swapped": {"div": "reciprocal", "swap": True},
    "operands-swapped": {"swap": True},
    "mul-square": {"square": "mul"},
    "no-affine": {"gamma": None, "beta": None},
    "gamma-only": {"beta": None},
    "beta-only": {"gamma": None},
    "gamma-constant-node": {"gamma": "const_node"},
    "eps-initializer": {"eps_init": True},
    "gamma-leading-ones": {"gamma_shape": (1, 1, 8)},
    "gamma-scalar": {"gamma_shape": (1,)},
    "axes-last-two": {"axes": (-2, -1)},
    "axes-last-two-opset18": {"axes": (-1, -2), "opset": 18},
    "axes-positive": {"axes": (2,)},
    "axes-positive-last-two": {"axes": (1, 2)},
    "dynamic-batch": {"in_shape": ("batch", "seq", 8)},
    "unknown-shape": {"in_shape": "?", "beta": None},
    "unknown-shape-no-affine": {"in_shape": "?", "gamma": None, "beta": None},
    "inferred-rank-positive-axes": {"in_shape": "inferred", "axes": (2,), "gamma_shape": (1, 8)},
}


@pytest.mark.parametrize("kwargs", LN_VARIANTS.values(), ids=LN_VARIANTS.keys())
def test_layernorm_variants_fuse(kwargs):
    model = layernorm_model(**kwargs)
    # the manager's synthetic inputs cannot fill the unknown-rank models' Reshape target
    result, stats = fuse(model, verify="structural" if kwargs.get("in_shape") == "?" else "numeric")
    assert stats["fused"] == 1, stats
    ops = op_types(result.model)
    assert ops.count("LayerNormalization") == 1 and not LN_OPS & set(ops), ops
    assert not {"Mul", "Add"} & set(ops), f"gamma/beta not absorbed: {ops}"
    assert result.records[-1].verification == "passed"
    assert_same_outputs(model, result.model, ln_inputs(model))
    (ln,) = [n for n in result.model.graph.node if n.op_type == "LayerNormalization"]
    axis = onnx.helper.get_attribute_value(next(a for a in ln.attribute if a.name == "axis"))
    assert axis == -len(kwargs.get("axes", (-1,)))
    assert len(ln.input) == (3 if kwargs.get("beta", "add") else 2)


def test_layernorm_scale_gets_the_normalized_shape():
    model = layernorm_model(gamma_shape=(1, 1, 8), axes=(-1,))
    result, _ = fuse(model)
    (ln,) = [n for n in result.model.graph.node if n.op_type == "LayerNormalization"]
    scale = next(i for i in result.model.graph.initializer if i.name == ln.input[1])
    assert list(scale.dims) == [8]
    model = layernorm_model(gamma=None, beta=None, axes=(-2, -1))
    result, _ = fuse(model)
    (ln,) = [n for n in result.model.graph.node if n.op_type == "LayerNormalization"]
    scale = next(i for i in result.model.graph.initializer if i.name == ln.input[1])
    assert list(scale.dims) == [4, 8] and np.all(numpy_helper.to_array(scale) == 1)
    model = layernorm_model(in_shape="inferred", gamma=None)  # the normalized shape from shape inference
    result, _ = fuse(model)
    (ln,) = [n for n in result.model.graph.node if n.op_type == "LayerNormalization"]
    scale = next(i for i in result.model.graph.initializer if i.name == ln.input[1])
    assert list(scale.dims) == [8]


def test_float16_layernorm_fuses_within_half_precision():
    model = layernorm_model(dtype=np.float16)
    result, stats = fuse(model, verify="structural")
    assert stats["fused"] == 1
    assert "LayerNormalization" in op_types(result.model)
    assert_same_outputs(model, result.model, random_inputs(model, seed=3), rtol=5e-3, atol=5e-3)


LN_REFUSALS = {
    "opset16": ({"opset": 16}, "skipped_opset"),
    "axes-not-last": ({"axes": (1,)}, "skipped_axes"),
    "axes-not-contiguous": ({"axes": (0, 2)}, "skipped_axes"),
    "axes-differ": ({"axes": (-1,), "axes2": (-2,)}, "skipped_axes"),
    "positive-axes-unknown-rank": ({"axes": (2,), "in_shape": "?", "gamma": None, "beta": None}, "skipped_axes"),
    "keepdims0": ({"shape": (8, 8), "keepdims": 0, "gamma": None, "beta": None}, "skipped_keepdims"),
    "keepdims0-second": ({"shape": (8, 8), "keepdims2": 0, "gamma": None, "beta": None}, "skipped_keepdims"),
    "exponent3": ({"exponent": 3.0}, "skipped_exponent"),
    "sub-reads-other-tensor": ({"sub_input": "x2"}, "skipped_mismatched_input"),
    "float64": ({"dtype": np.float64}, "skipped_dtype"),
    "centered-is-output": ({"extra_output": "d"}, "skipped_intermediate_shared"),
    "variance-is-output": ({"extra_output": "var"}, "skipped_intermediate_shared"),
    "std-read-elsewhere": ({"extra_reader": "std"}, "skipped_intermediate_shared"),
    "mean-read-elsewhere": ({"extra_reader": "mean"}, "skipped_intermediate_shared"),
}


@pytest.mark.parametrize("kwargs,reason", LN_REFUSALS.values(), ids=LN_REFUSALS.keys())
def test_layernorm_refusals_leave_the_pattern_and_count(kwargs, reason):
    model = layernorm_model(**kwargs)
    numeric = kwargs.get("dtype") != np.float64 and kwargs.get("in_shape") != "?"
    result, stats = fuse(model, verify="numeric" if numeric else "structural")
    assert stats["fused"] == 0 and stats.get(reason) == 1, stats
    assert "LayerNormalization" not in op_types(result.model)
    assert Counter(op_types(result.model))["ReduceMean"] == 2


def test_epsilon_must_be_constant():
    model = layernorm_model()
    graph = model.graph
    for node in graph.node:
        if node.output[0] == "eps":
            graph.node.remove(node)
            break
    graph.input.append(onnx.helper.make_tensor_value_info("eps", onnx.TensorProto.FLOAT, []))
    onnx.checker.check_model(model, full_check=True)
    _, stats = fuse(model)
    assert stats["fused"] == 0 and stats["skipped_epsilon"] == 1


@pytest.mark.parametrize("kwargs,left", [
    ({"gamma_shape": (4, 1)}, "Mul"),  # gamma varies along a non-normalized axis
    ({"beta": None, "residual": True}, "Add"),  # Add(x) after Mul(gamma) is a residual, not a beta
    ({"beta": None, "extra_reader": "gn"}, None),  # Mul(gamma) output read twice: still absorbed
    ({"extra_reader": "n"}, "Mul"),  # the normalized tensor is read elsewhere: gamma stays outside
])
def test_affine_that_cannot_be_absorbed_stays_after_the_fused_node(kwargs, left):
    model = layernorm_model(**kwargs)
    result, stats = fuse(model)
    assert stats["fused"] == 1, stats
    ops = op_types(result.model)
    assert "LayerNormalization" in ops and not LN_OPS & set(ops)
    if left:
        assert left in ops
    assert_same_outputs(model, result.model, random_inputs(model, seed=3))


def test_layernorm_is_idempotent_and_leaves_other_divs():
    model = layernorm_model()
    result, _ = fuse(model)
    again, stats = fuse(result.model)
    assert not again.records[-1].changed and stats.get("fused", 0) == 0  # skipped: no ReduceMean left
