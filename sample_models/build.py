"""Deterministically regenerate the sample ONNX models used by the tests.

Run from the repository root:

    python sample_models/build.py

Writes (relative to this file's folder):

* digits_cnn/{model.onnx,calib.npz,eval.npz}     - NCHW CNN with Conv->BatchNormalization,
  a residual block and a depthwise conv, trained on sklearn's digits, exported by
  the legacy torch exporter (opset 17, no constant folding).
* channel_last/{model.onnx,calib.npz,eval.npz}   - tf2onnx-style NHWC graph
  (Transpose/Conv/Transpose, BN as channel-last Mul/Add, ReduceMean GAP,
  MatMul/Add/Softmax) built with onnx.helper (opset 13) from a torch CNN trained
  on the same data.
* transformer/{model.onnx,calib.npz,eval.npz}    - one encoder block with hand-written
  LayerNorm / erf-GELU / 2-head self-attention, random seeded weights, exported
  by the legacy torch exporter (opset 20).

Every model is saved with ir_version 10, passes onnx.checker.check_model(full_check=True)
and is run with onnxruntime (CPU).
"""

from __future__ import annotations

import collections
import math
import os
import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
IR_VERSION = 10
SEED = 0
MAX_BYTES = 1 << 20  # 1 MiB
TRANSFORMER_OPSET = 20  # Gelu exists from opset 20; torch's legacy exporter goes up to 20

warnings.filterwarnings("ignore")  # the legacy exporter is deprecated and says so loudly


# --------------------------------------------------------------------------- utilities
def set_determinism(seed: int = SEED) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def load_digits_split():
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)  # [N, 8, 8] in [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_tr, x_te, y_tr, y_te


def finalize_and_save(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Force IR 10, run the full checker, save, and re-check the saved file."""
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return model


def ort_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def op_counts(path: Path) -> collections.Counter:
    m = onnx.load(str(path))
    return collections.Counter(n.op_type for n in m.graph.node)


def train_classifier(model: nn.Module, x_tr: np.ndarray, y_tr: np.ndarray, epochs: int,
                     lr: float = 3e-3, batch_size: int = 32, seed: int = SEED) -> None:
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    n = xt.shape[0]
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if idx.numel() < 2:  # BatchNorm needs > 1 sample in train mode
                continue
            opt.zero_grad()
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def torch_predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(x)).numpy()


# --------------------------------------------------------------------------- 1. digits_cnn
class DigitsCNN(nn.Module):
    # Channels are wide enough (64/64/128) that per-channel INT8 weight quantization pays off:
    # the big convs have Cin*k*k = 576 weights per output channel, so the 8 bytes of float32
    # scale + bias per output channel are small next to them (~3.9x weight compression).
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.res_conv1 = nn.Conv2d(64, 64, 3, padding=1)
        self.res_bn1 = nn.BatchNorm2d(64)
        self.res_conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.res_bn2 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1, groups=128, bias=False),
                                nn.BatchNorm2d(128), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = self.stem(x)
        r = F.relu(self.res_bn1(self.res_conv1(x)))
        r = self.res_bn2(self.res_conv2(r))
        x = F.relu(r + x)
        x = self.pool(x)
        x = self.conv3(x)
        x = self.dw(x)
        return self.fc(self.flatten(self.gap(x)))


def build_digits_cnn(data) -> dict:
    set_determinism(SEED)
    out_dir = HERE / "digits_cnn"
    out_dir.mkdir(parents=True, exist_ok=True)
    x_tr, x_te, y_tr, y_te = data
    x_tr = x_tr[:, None]  # [N,1,8,8]
    x_te = x_te[:, None]

    model = DigitsCNN()
    train_classifier(model, x_tr, y_tr, epochs=20)  # the wide net converges fast; keeps the build quick
    torch_logits = torch_predict(model, x_te)
    torch_acc = float((torch_logits.argmax(1) == y_te).mean())

    path = out_dir / "model.onnx"
    torch.onnx.export(
        model.eval(), (torch.from_numpy(x_te[:1]),), str(path), dynamo=False,
        do_constant_folding=False, opset_version=17, input_names=["input"],
        output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    finalize_and_save(onnx.load(str(path)), path)

    counts = op_counts(path)
    assert counts["BatchNormalization"] == 5, counts
    assert counts["Conv"] == 5 and counts["GlobalAveragePool"] == 1 and counts["Gemm"] == 1, counts

    sess = ort_session(path)
    ort_logits = sess.run(None, {"input": x_te})[0]
    ort_acc = float((ort_logits.argmax(1) == y_te).mean())
    assert np.allclose(ort_logits, torch_logits, atol=1e-4), np.abs(ort_logits - torch_logits).max()
    assert ort_acc == torch_acc, (ort_acc, torch_acc)
    assert ort_acc >= 0.95, ort_acc

    np.savez(out_dir / "calib.npz", input=np.ascontiguousarray(x_tr[:128], dtype=np.float32))
    np.savez(out_dir / "eval.npz", input=np.ascontiguousarray(x_te, dtype=np.float32),
             labels=y_te.astype(np.int64))
    return {"name": "digits_cnn", "torch_acc": torch_acc, "ort_acc": ort_acc, "opset": 17,
            "max_abs_diff": float(np.abs(ort_logits - torch_logits).max()), "ops": counts}


# --------------------------------------------------------------------------- 2. channel_last
class ChannelLastCNN(nn.Module):
    """Torch reference for the tf2onnx-style graph. Takes NHWC input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def logits(self, x_nhwc):
        x = x_nhwc.permute(0, 3, 1, 2)
        a = F.relu(self.bn1(self.conv1(x)))
        b = F.relu(self.bn2(self.conv2(a)) + a)
        b = F.max_pool2d(b, 2)
        c = F.relu(self.conv3(b))
        return self.fc(c.mean(dim=(2, 3)))

    def forward(self, x_nhwc):  # training uses logits
        return self.logits(x_nhwc)


def _bn_scale_shift(bn: nn.BatchNorm2d):
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() - bn.running_mean * scale
    return scale.numpy().astype(np.float32), shift.numpy().astype(np.float32)


def _make_channel_last_onnx(m: ChannelLastCNN) -> onnx.ModelProto:
    def t(x):
        return x.detach().numpy().astype(np.float32)

    s1, b1 = _bn_scale_shift(m.bn1)
    s2, b2 = _bn_scale_shift(m.bn2)
    inits = [
        numpy_helper.from_array(t(m.conv1.weight), "conv1/kernel"),
        numpy_helper.from_array(t(m.conv1.bias), "conv1/bias"),
        numpy_helper.from_array(s1, "bn1/scale"),
        numpy_helper.from_array(b1, "bn1/shift"),
        numpy_helper.from_array(t(m.conv2.weight), "conv2/kernel"),
        numpy_helper.from_array(t(m.conv2.bias), "conv2/bias"),
        numpy_helper.from_array(s2, "bn2/scale"),
        numpy_helper.from_array(b2, "bn2/shift"),
        numpy_helper.from_array(t(m.conv3.weight), "conv3/kernel"),
        numpy_helper.from_array(t(m.conv3.bias), "conv3/bias"),
        numpy_helper.from_array(np.ascontiguousarray(t(m.fc.weight).T), "dense/kernel"),
        numpy_helper.from_array(t(m.fc.bias), "dense/bias"),
    ]
    to_nchw = [0, 3, 1, 2]
    to_nhwc = [0, 2, 3, 1]
    conv_attrs = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1)
    N = helper.make_node
    nodes = [
        # block 1: conv (with bias) + channel-last BN (Mul/Add) + Relu
        N("Transpose", ["input"], ["conv1/in_nchw"], name="conv1/transpose_in", perm=to_nchw),
        N("Conv", ["conv1/in_nchw", "conv1/kernel", "conv1/bias"], ["conv1/out_nchw"], name="conv1/Conv2D", **conv_attrs),
        N("Transpose", ["conv1/out_nchw"], ["conv1/out"], name="conv1/transpose_out", perm=to_nhwc),
        N("Mul", ["conv1/out", "bn1/scale"], ["bn1/mul"], name="bn1/mul"),
        N("Add", ["bn1/mul", "bn1/shift"], ["bn1/out"], name="bn1/add"),
        N("Relu", ["bn1/out"], ["relu1"], name="relu1"),
        # block 2: conv + BN + residual add + Relu
        N("Transpose", ["relu1"], ["conv2/in_nchw"], name="conv2/transpose_in", perm=to_nchw),
        N("Conv", ["conv2/in_nchw", "conv2/kernel", "conv2/bias"], ["conv2/out_nchw"], name="conv2/Conv2D", **conv_attrs),
        N("Transpose", ["conv2/out_nchw"], ["conv2/out"], name="conv2/transpose_out", perm=to_nhwc),
        N("Mul", ["conv2/out", "bn2/scale"], ["bn2/mul"], name="bn2/mul"),
        N("Add", ["bn2/mul", "bn2/shift"], ["bn2/out"], name="bn2/add"),
        N("Add", ["bn2/out", "relu1"], ["res/add"], name="res/add"),
        N("Relu", ["res/add"], ["relu2"], name="relu2"),
        # max pool in NCHW, wrapped in transposes
        N("Transpose", ["relu2"], ["pool/in_nchw"], name="pool/transpose_in", perm=to_nchw),
        N("MaxPool", ["pool/in_nchw"], ["pool/out_nchw"], name="pool/MaxPool", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0]),
        N("Transpose", ["pool/out_nchw"], ["pool/out"], name="pool/transpose_out", perm=to_nhwc),
        # block 3: conv without bias input, bias added channel-last
        N("Transpose", ["pool/out"], ["conv3/in_nchw"], name="conv3/transpose_in", perm=to_nchw),
        N("Conv", ["conv3/in_nchw", "conv3/kernel"], ["conv3/out_nchw"], name="conv3/Conv2D", **conv_attrs),
        N("Transpose", ["conv3/out_nchw"], ["conv3/out"], name="conv3/transpose_out", perm=to_nhwc),
        N("Add", ["conv3/out", "conv3/bias"], ["conv3/biased"], name="conv3/BiasAdd"),
        N("Relu", ["conv3/biased"], ["relu3"], name="relu3"),
        # channel-last global average pooling + dense + softmax
        N("ReduceMean", ["relu3"], ["gap"], name="gap/Mean", axes=[1, 2], keepdims=0),
        N("MatMul", ["gap", "dense/kernel"], ["dense/matmul"], name="dense/MatMul"),
        N("Add", ["dense/matmul", "dense/bias"], ["logits"], name="dense/BiasAdd"),
        N("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "channel_last_cnn",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8, 8, 1])],
        outputs=[helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="sample_models/build.py (tf2onnx-style)")
    model.ir_version = IR_VERSION
    return model


def build_channel_last(data) -> dict:
    set_determinism(SEED + 1)
    out_dir = HERE / "channel_last"
    out_dir.mkdir(parents=True, exist_ok=True)
    x_tr, x_te, y_tr, y_te = data
    x_tr = np.ascontiguousarray(x_tr[..., None])  # NHWC [N,8,8,1]
    x_te = np.ascontiguousarray(x_te[..., None])

    model = ChannelLastCNN()
    train_classifier(model, x_tr, y_tr, epochs=40)
    with torch.no_grad():
        torch_probs = torch.softmax(model.eval().logits(torch.from_numpy(x_te)), dim=-1).numpy()
    torch_acc = float((torch_probs.argmax(1) == y_te).mean())

    path = out_dir / "model.onnx"
    finalize_and_save(_make_channel_last_onnx(model), path)

    sess = ort_session(path)
    ort_probs = sess.run(None, {"input": x_te})[0]
    ort_acc = float((ort_probs.argmax(1) == y_te).mean())
    assert np.allclose(ort_probs, torch_probs, atol=1e-4), np.abs(ort_probs - torch_probs).max()
    assert ort_acc == torch_acc, (ort_acc, torch_acc)
    assert ort_acc >= 0.95, ort_acc

    np.savez(out_dir / "calib.npz", input=np.ascontiguousarray(x_tr[:128], dtype=np.float32))
    np.savez(out_dir / "eval.npz", input=np.ascontiguousarray(x_te, dtype=np.float32),
             labels=y_te.astype(np.int64))
    return {"name": "channel_last", "torch_acc": torch_acc, "ort_acc": ort_acc, "opset": 13,
            "max_abs_diff": float(np.abs(ort_probs - torch_probs).max()), "ops": op_counts(path)}


# --------------------------------------------------------------------------- 3. transformer
class HandLayerNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d))
        self.beta = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.gamma + self.beta


def hand_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class EncoderBlock(nn.Module):
    def __init__(self, d: int = 32, heads: int = 2, d_ff: int = 64) -> None:
        super().__init__()
        self.d, self.h, self.dk = d, heads, d // heads
        self.ln1 = HandLayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = HandLayerNorm(d)
        self.fc1 = nn.Linear(d, d_ff)
        self.fc2 = nn.Linear(d_ff, d)

    def _heads(self, t, b, s):  # [B,S,D] -> [B,H,S,dk]
        return t.reshape(b, s, self.h, self.dk).transpose(1, 2)

    def forward(self, x):
        b, s = x.shape[0], x.shape[1]
        y = self.ln1(x)
        q = self._heads(self.q(y), b, s)
        k = self._heads(self.k(y), b, s)
        v = self._heads(self.v(y), b, s)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.dk)
        attn = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(attn, v).transpose(1, 2).reshape(b, s, self.d)
        x = x + self.o(ctx)
        y = self.ln2(x)
        return x + self.fc2(hand_gelu(self.fc1(y)))


def build_transformer() -> dict:
    set_determinism(SEED + 2)
    out_dir = HERE / "transformer"
    out_dir.mkdir(parents=True, exist_ok=True)
    model = EncoderBlock()
    with torch.no_grad():  # non-trivial LayerNorm affine params
        for ln in (model.ln1, model.ln2):
            ln.gamma.copy_(1.0 + 0.1 * torch.randn(ln.gamma.shape))
            ln.beta.copy_(0.1 * torch.randn(ln.beta.shape))
    model.eval()

    rng = np.random.default_rng(SEED + 2)
    x_eval = rng.standard_normal((32, 16, 32)).astype(np.float32)
    x_calib = rng.standard_normal((64, 16, 32)).astype(np.float32)

    path = out_dir / "model.onnx"
    # Opset 20 (the legacy exporter's highest) so that the hand-written LayerNorm and GELU can be
    # fused into native LayerNormalization (opset 17) and Gelu (opset 20) nodes.
    opset_used = TRANSFORMER_OPSET
    torch.onnx.export(
        model, (torch.from_numpy(x_eval[:1]),), str(path), dynamo=False,
        do_constant_folding=False, opset_version=opset_used,
        input_names=["tokens_embedded"], output_names=["hidden"],
        dynamic_axes={"tokens_embedded": {0: "batch", 1: "seq"}, "hidden": {0: "batch", 1: "seq"}},
    )
    finalize_and_save(onnx.load(str(path)), path)

    counts = op_counts(path)
    for op in ("ReduceMean", "Pow", "Sqrt", "Erf", "Softmax", "MatMul", "Div"):
        assert counts[op] > 0, (op, counts)

    torch_out = torch_predict(model, x_eval)
    sess = ort_session(path)
    ort_out = sess.run(None, {"tokens_embedded": x_eval})[0]
    diff = float(np.abs(ort_out - torch_out).max())
    assert np.allclose(ort_out, torch_out, atol=1e-4), diff
    # dynamic seq length works too
    short = x_eval[:3, :7]
    assert np.allclose(sess.run(None, {"tokens_embedded": short})[0], torch_predict(model, short), atol=1e-4)

    np.savez(out_dir / "eval.npz", tokens_embedded=x_eval)
    np.savez(out_dir / "calib.npz", tokens_embedded=x_calib)
    return {"name": "transformer", "torch_acc": None, "ort_acc": None, "opset": opset_used,
            "max_abs_diff": diff, "ops": counts}


# --------------------------------------------------------------------------- main
def main() -> None:
    data = load_digits_split()
    results = [build_digits_cnn(data), build_channel_last(data), build_transformer()]

    print("\n== sample models ==")
    for r in results:
        acc = "n/a (random weights)" if r["ort_acc"] is None else \
            f"torch {r['torch_acc']:.4f} / onnxruntime {r['ort_acc']:.4f}"
        print(f"{r['name']}: opset {r['opset']}, accuracy {acc}, max |ort - torch| = {r['max_abs_diff']:.2e}")
        print(f"  ops: {dict(sorted(r['ops'].items()))}")
    print("\n== files ==")
    for name in ("digits_cnn", "channel_last", "transformer"):
        for f in sorted((HERE / name).iterdir()):
            size = f.stat().st_size
            assert size < MAX_BYTES, (f, size)
            print(f"  {f.relative_to(HERE)}: {size} bytes")
    for name in ("digits_cnn", "channel_last", "transformer"):
        for f in sorted((HERE / name).glob("*.npz")):
            with np.load(f) as z:
                print(f"  {f.relative_to(HERE)}: " + ", ".join(f"{k} {z[k].dtype} {list(z[k].shape)}" for k in z.files))


if __name__ == "__main__":
    main()
