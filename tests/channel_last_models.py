"""Channel-last graphs for the layout-nchw tests (a helper module: no tests here).

The graphs are written the way tf2onnx writes them: every Conv/MaxPool sits between
``Transpose(0,3,1,2)`` and ``Transpose(0,2,3,1)``, and everything else works on NHWC tensors with
channel-last constants. ``CHANNEL_LAST_MODELS`` is shared with ``bench/layout.py``.
"""

import numpy as np
import onnx
from helpers import SAMPLES
from onnx import TensorProto, helper, numpy_helper

from optimizer.io import load_model

TO_NCHW = [0, 3, 1, 2]
TO_NHWC = [0, 2, 3, 1]


# -- building channel-last graphs ----------------------------------------------------------------
class Builder:
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


def vi(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def residual_model(size: int = 8, channels: int = 8, blocks: int = 1) -> onnx.ModelProto:
    """Conv blocks with channel-last BN, residual Adds, and an NHWC output."""
    b = Builder(seed=1)
    r = b.node("Relu", [b.channel_affine(b.nhwc_conv("x", 3, channels), channels)])
    for i in range(blocks):
        r2 = b.channel_affine(b.nhwc_conv(r, channels, channels, bias=False), channels)
        s = b.node("Add", [r2, r])
        if i == blocks - 1:
            b.nodes.append(helper.make_node("Relu", [s], ["y"]))
        else:
            r = b.node("Relu", [s])
    return b.model([vi("x", ["batch", size, size, 3])], [vi("y", ["batch", size, size, channels])], "residual")


def concat_model() -> onnx.ModelProto:
    """Two branches (each with its own Transpose of the input) concatenated along channels."""
    b = Builder(seed=2)
    a = b.node("Relu", [b.nhwc_conv("x", 4, 5)])
    c = b.node("Sigmoid", [b.nhwc_conv("x", 4, 3, k=1)])
    cat = b.node("Concat", [a, c], axis=3)
    biased = b.node("Add", [cat, b.const(np.linspace(-1, 1, 8).astype(np.float32), "cat_bias")])
    out = b.nhwc_conv(biased, 8, 6)
    b.nodes.append(helper.make_node("LeakyRelu", [out], ["y"], alpha=0.1))
    return b.model([vi("x", [2, 6, 6, 4])], [vi("y", [2, 6, 6, 6])], "concat")


def reduce_softmax_model() -> onnx.ModelProto:
    """Softmax over channels, channel-last mean/sum reductions, a rank-3 output."""
    b = Builder(seed=3)
    h = b.channel_affine(b.nhwc_conv("x", 3, 6), 6)
    s = b.node("Softmax", [h], axis=-1)
    mean = b.node("ReduceMean", [s], axes=[1, 2], keepdims=1)  # [N,1,1,C]
    centered = b.node("Sub", [s, mean])
    h2 = b.nhwc_conv(centered, 6, 4)
    b.nodes.append(helper.make_node("ReduceSum", [b.node("Exp", [h2]), b.const(np.array([3], np.int64), "axes")],
                                    ["channel_sum"], keepdims=0))  # [N,H,W]
    b.nodes.append(helper.make_node("LogSoftmax", [h2], ["log_probs"], axis=3))
    return b.model(
        [vi("x", [2, 5, 5, 3])],
        [vi("channel_sum", [2, 5, 5]), vi("log_probs", [2, 5, 5, 4])],
        "reduce_softmax",
    )


def qdq_model() -> onnx.ModelProto:
    """A per-channel (axis=3, channel-last) QuantizeLinear/DequantizeLinear pair between convs."""
    b = Builder(seed=4)
    h = b.node("Relu", [b.channel_affine(b.nhwc_conv("x", 3, 6), 6)])
    scale = b.const(np.linspace(0.01, 0.03, 6).astype(np.float32), "q_scale")
    zero = b.const(np.zeros(6, np.int8), "q_zero")
    q = b.node("QuantizeLinear", [h, scale, zero], axis=3)
    dq = b.node("DequantizeLinear", [q, scale, zero], axis=3)
    out = b.nhwc_conv(dq, 6, 4)
    b.nodes.append(helper.make_node("Add", [out, b.const(np.full(4, 0.5, np.float32), "out_bias")], ["y"]))
    return b.model([vi("x", [1, 6, 6, 3])], [vi("y", [1, 6, 6, 4])], "qdq")


def pad_slice_resize_model() -> onnx.ModelProto:
    """Pad, Slice, Resize, Split, Gather and ArgMax on channel-last tensors."""
    b = Builder(seed=5)
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
    return b.model([vi("x", [1, 4, 3, 3])], [vi("label", [1, 12, 10], TensorProto.INT64), vi("y", [1, 12, 10, 2])],
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
