"""Small models for the pruning tests (a helper module: no tests here).

``zoo_model`` has one of each structure channel groups follow (residual Add, per-channel Mul,
Concat, depthwise conv, Flatten -> Gemm); ``Weights`` writes seeded initializers and zeroes
channels.
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from helpers import random_inputs, run
from onnx import TensorProto, helper, numpy_helper

from passes.pruning.groups import find_channel_groups


# -- model building ---------------------------------------------------------------------------
def make_model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


class Weights:
    """Seeded float32 initializers, with helpers to zero output channels."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.inits = []

    def add(self, name, shape, scale=0.3, values=None):
        if values is None:
            values = self.rng.normal(scale=scale, size=shape)
        self.inits.append(numpy_helper.from_array(np.asarray(values, np.float32), name))
        return name

    def bn(self, prefix, c, beta=None):
        self.add(f"{prefix}_g", (c,), values=self.rng.uniform(0.5, 1.5, c))
        self.add(f"{prefix}_b", (c,), values=self.rng.normal(scale=0.2, size=c) if beta is None else beta)
        self.add(f"{prefix}_m", (c,), values=self.rng.normal(scale=0.1, size=c))
        self.add(f"{prefix}_v", (c,), values=self.rng.uniform(0.5, 1.5, c))
        return [f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"]

    def get(self, name):
        return next(numpy_helper.to_array(t) for t in self.inits if t.name == name).copy()

    def set(self, name, values):
        for i, t in enumerate(self.inits):
            if t.name == name:
                self.inits[i] = numpy_helper.from_array(np.asarray(values, np.float32), name)


def zoo_model(zero=None):
    """Residual Add, per-channel Mul, Concat, depthwise conv, Flatten -> Gemm::

        x -> conv_a(16) -> BN -> Relu = ra ----------------------+
        ra -> conv_b(16) -> Mul(k[16]) -> Add(ra) -> Relu = s    |  group {conv_a, conv_b}: 16
        s -> conv_c(8) -> Relu = c                                  group {conv_c}: 8
        Concat(s, c) -> dw(24, depthwise, bias) -> Relu -> conv_d(16, 1x1) -> Relu
          -> MaxPool(2) -> Flatten -> Gemm(10) = y                  group {conv_d}: 16 (4x4 blocks)

    ``zero``: {group name: channels} whose weights and biases are made zero (and whose
    BN/affine leaves them at zero after the Relu), so removing them is exact.
    """
    zero = zero or {}
    w = Weights(1)
    w.add("wa", (16, 3, 3, 3)), w.add("ba", (16,))
    bn = w.bn("bna", 16)
    w.add("wb", (16, 16, 3, 3)), w.add("bb", (16,))
    w.add("k", (1, 16, 1, 1), values=np.random.default_rng(2).uniform(0.5, 1.5, (1, 16, 1, 1)))
    w.add("wc", (8, 16, 3, 3)), w.add("bc", (8,))
    w.add("wdw", (24, 1, 3, 3)), w.add("bdw", (24,))
    w.add("wd", (16, 24, 1, 1)), w.add("bd", (16,))
    w.add("wfc", (10, 256), scale=0.1), w.add("bfc", (10,))
    for c in zero.get("ab", []):
        for name in ("wa", "wb"):
            v = w.get(name); v[c] = 0; w.set(name, v)
        for name in ("ba", "bb"):
            v = w.get(name); v[c] = 0; w.set(name, v)
        beta, mean = w.get("bna_b"), w.get("bna_m")
        beta[c], mean[c] = -0.5, 0.0  # BN maps the zero channel to -0.5: Relu makes it 0
        w.set("bna_b", beta), w.set("bna_m", mean)
    for group, (wn, bn_) in (("c", ("wc", "bc")), ("d", ("wd", "bd"))):
        for c in zero.get(group, []):
            v = w.get(wn); v[c] = 0; w.set(wn, v)
            b = w.get(bn_); b[c] = -0.25; w.set(bn_, b)  # constant -0.25, Relu -> 0
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["ca"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("BatchNormalization", ["ca", *bn], ["bna"], name="bn_a"),
        helper.make_node("Relu", ["bna"], ["ra"]),
        helper.make_node("Conv", ["ra", "wb", "bb"], ["cb"], pads=[1, 1, 1, 1], name="conv_b"),
        helper.make_node("Mul", ["cb", "k"], ["mb"], name="scale_b"),
        helper.make_node("Add", ["mb", "ra"], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["s"]),
        helper.make_node("Conv", ["s", "wc", "bc"], ["cc"], pads=[1, 1, 1, 1], name="conv_c"),
        helper.make_node("Relu", ["cc"], ["c"]),
        helper.make_node("Concat", ["s", "c"], ["cat"], axis=1, name="concat"),
        helper.make_node("Conv", ["cat", "wdw", "bdw"], ["cdw"], pads=[1, 1, 1, 1], group=24, name="dw"),
        helper.make_node("Relu", ["cdw"], ["rdw"]),
        helper.make_node("Conv", ["rdw", "wd", "bd"], ["cd"], name="conv_d"),
        helper.make_node("Relu", ["cd"], ["rd"]),
        helper.make_node("MaxPool", ["rd"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wfc", "bfc"], ["y"], transB=1, name="fc"),
    ]
    return make_model(nodes, [vi("x", [2, 3, 8, 8])], [vi("y", [2, 10])], w.inits)


def zoo_params(ab, c, d):
    """Parameter count of ``zoo_model`` keeping ab/c/d channels."""
    cat = ab + c
    return (
        ab * 27 + ab + 4 * ab          # conv_a + BN
        + ab * ab * 9 + ab + ab        # conv_b + k
        + c * ab * 9 + c               # conv_c
        + cat * 9 + cat                # depthwise
        + d * cat + d                  # conv_d
        + 10 * d * 16 + 10             # fc
    )


def groups_of(model):
    return {tuple(g.producers): g for g in find_channel_groups(gs.import_onnx(model))}


def last_stats(result):
    return result.records[-1].stats


def assert_valid(model):
    onnx.checker.check_model(model, full_check=True)
    outputs = run(model, random_inputs(model, seed=5))
    assert all(np.all(np.isfinite(v)) for v in outputs.values())
