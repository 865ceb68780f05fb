"""Deterministically build the robustness "zoo": small, diverse ONNX models like real third-party ones.

Run from the repository root:

    python sample_models/zoo/build_zoo.py

Writes ``<name>.onnx`` and ``<name>.npz`` (8 realistic samples per model input, first axis =
samples; usable as ``--data`` and ``--calib``) next to this file, and prints a table of sizes and
op counts. Weights are random but seeded; BatchNorm layers get non-trivial running statistics
from a few forward passes in train mode on random data before ``eval()``.

Every model is saved with ``ir_version = 10``, passes ``onnx.checker.check_model(full_check=True)``
and is run with ONNX Runtime; torch-exported models are compared with torch (max |ort - torch|).
Each file is < 300 KB.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import random
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

HERE = Path(__file__).resolve().parent
IR_VERSION = 10
MAX_BYTES = 300 * 1024
SAMPLES = 8

warnings.filterwarnings("ignore")  # the legacy exporter is deprecated and says so loudly
logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes


# --------------------------------------------------------------------------- utilities
def seed_all(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


@torch.no_grad()
def warm_batchnorm(model: nn.Module, make_batch, steps: int = 5) -> nn.Module:
    """Give BatchNorm non-trivial running stats: forward passes in train mode, then eval()."""
    has_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_norm:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.5
        model.train()
        for _ in range(steps):
            model(*make_batch())
        # random affine params too, so the folded scale/shift are not ~identity
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def finalize(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """IR 10, full checker, save, re-check from disk, size limit."""
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{path.name} is {size} bytes (limit {MAX_BYTES})"
    return model


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def export_legacy(model, args, path: Path, opset: int, input_names, output_names, dynamic_axes) -> None:
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        torch.onnx.export(
            model, args, str(path), dynamo=False, do_constant_folding=False, opset_version=opset,
            input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
        )


def export_dynamo(model, args, path: Path, opset: int, input_names, output_names, dynamic_shapes) -> None:
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        program = torch.onnx.export(
            model, args, dynamo=True, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_shapes=dynamic_shapes, external_data=False,
        )
        program.save(str(path), external_data=False)


def check_against_torch(name: str, model: nn.Module, path: Path, feeds: dict[str, np.ndarray], tol: float = 1e-4) -> float:
    with torch.no_grad():
        ref = model(*[torch.from_numpy(v) for v in feeds.values()])
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    got = ort_run(path, feeds)
    worst = 0.0
    for r, g in zip(ref, got):
        r = r.numpy()
        assert r.shape == g.shape, (name, r.shape, g.shape)
        worst = max(worst, float(np.abs(r - g).max()))
    assert worst <= tol * max(1.0, max(float(np.abs(r.numpy()).max()) for r in ref)), (name, worst)
    return worst


def save_npz(path: Path, feeds: dict[str, np.ndarray]) -> None:
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in feeds.items()})


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    counts: collections.Counter = collections.Counter()

    def walk(graph):
        for node in graph.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            counts[f"fn:{node.op_type}"] += 1
    return counts


def image_batch(rng: np.random.Generator, shape) -> np.ndarray:
    """Image-like data: smooth (low-frequency) patterns, normalized like ImageNet inputs."""
    n, c, h, w = shape
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    out = np.empty(shape, np.float32)
    for i in range(n):
        for ch in range(c):
            fx, fy, ph = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.28)]
            base = np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
            out[i, ch] = 0.8 * base + 0.2 * rng.normal(size=(h, w))
    return out.astype(np.float32)


# --------------------------------------------------------------------------- 1. mobilenet_v2-style
def conv_bn_relu6(cin, cout, k=3, s=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [conv_bn_relu6(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetTiny(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu6(3, 16, 3, 2),
            InvertedResidual(16, 8, 1, 1),
            InvertedResidual(8, 16, 2, 4),
            InvertedResidual(16, 16, 1, 4),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            conv_bn_relu6(24, 64, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.classifier(self.dropout(torch.flatten(x, 1)))


def build_mobilenet(name="mobilenet_v2_tiny", opset=13):
    seed_all(1)
    model = warm_batchnorm(MobileNetTiny(), lambda: (torch.randn(8, 3, 32, 32),))
    feeds = {"input": image_batch(np.random.default_rng(1), (SAMPLES, 3, 32, 32))}
    path = HERE / f"{name}.onnx"
    export_legacy(model, (torch.from_numpy(feeds["input"][:1]),), path, opset, ["input"], ["logits"],
                  {"input": {0: "batch"}, "logits": {0: "batch"}})
    return name, model, path, feeds, f"legacy, opset {opset}"


# --------------------------------------------------------------------------- 2. tiny detector
class TinyDetector(nn.Module):
    """Backbone (3 levels) + FPN top-down (nearest Resize x2, Add, Concat) + YOLO-style heads and decoding."""

    def __init__(self, num_classes=3, num_anchors=2):
        super().__init__()
        self.na, self.nc = num_anchors, num_classes
        self.no = 5 + num_classes
        def cbr(cin, cout, s):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, s, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1))
        self.c1 = nn.Sequential(cbr(3, 8, 2), cbr(8, 16, 2))     # /4
        self.c2 = cbr(16, 24, 2)                                  # /8
        self.c3 = cbr(24, 32, 2)                                  # /16
        self.lat3 = nn.Conv2d(32, 16, 1)
        self.lat2 = nn.Conv2d(24, 16, 1)
        self.lat1 = nn.Conv2d(16, 16, 1)
        self.smooth2 = cbr(32, 16, 1)  # after Concat(lat2, up(p3))
        self.heads = nn.ModuleList([nn.Conv2d(16, self.na * self.no, 1) for _ in range(3)])
        self.register_buffer("anchors", torch.tensor([[[10.0, 13.0], [16.0, 30.0]],
                                                      [[30.0, 61.0], [62.0, 45.0]],
                                                      [[59.0, 119.0], [116.0, 90.0]]]))
        self.strides = (4, 8, 16)

    def _decode(self, p, i):
        b, _, h, w = p.shape
        # [b, na*no, h, w] -> [b, na, no, h, w] -> [b, na, h, w, no] -> [b, na*h*w, no]
        p = p.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous()
        ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(1, 1, h, w)
        xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(1, 1, h, w)
        grid = torch.stack((xs, ys), -1)  # [1,1,h,w,2]
        anchor = self.anchors[i].view(1, self.na, 1, 1, 2)
        xy = (torch.sigmoid(p[..., 0:2]) * 2.0 - 0.5 + grid) * self.strides[i]
        wh = torch.exp(p[..., 2:4].clamp(max=4.0)) * anchor
        conf = torch.sigmoid(p[..., 4:])
        out = torch.cat((xy, wh, conf), -1)
        return out.reshape(b, -1, self.no)

    def forward(self, x):
        f1 = self.c1(x)
        f2 = self.c2(f1)
        f3 = self.c3(f2)
        p3 = self.lat3(f3)
        p2 = self.smooth2(torch.cat([self.lat2(f2), F.interpolate(p3, scale_factor=2, mode="nearest")], 1))
        p1 = self.lat1(f1) + F.interpolate(p2, scale_factor=2, mode="nearest")
        outs = [self._decode(head(p), i) for i, (head, p) in enumerate(zip(self.heads, (p1, p2, p3)))]
        dets = torch.cat(outs, 1)
        boxes = dets[..., :4]
        scores = dets[..., 4:5] * dets[..., 5:]  # obj * cls
        return boxes, scores


def build_detector(name="tiny_detector", opset=11):
    seed_all(2)
    model = warm_batchnorm(TinyDetector(), lambda: (torch.randn(8, 3, 48, 48),))
    feeds = {"images": image_batch(np.random.default_rng(2), (SAMPLES, 3, 48, 48))}
    path = HERE / f"{name}.onnx"
    export_legacy(model, (torch.from_numpy(feeds["images"][:1]),), path, opset, ["images"], ["boxes", "scores"],
                  {"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}})
    return name, model, path, feeds, f"legacy, opset {opset}"


# --------------------------------------------------------------------------- 3. UNet (dynamo)
class UNetTiny(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.e1, self.e2, self.e3 = block(3, 8), block(8, 16), block(16, 24)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(24, 16, 2, stride=2)
        self.d2 = block(32, 16)
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.d1 = block(16, 8)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(self.pool(e1))
        e3 = self.e3(self.pool(e2))
        d2 = self.d2(torch.cat([self.up2(e3), e2], 1))
        d1 = self.d1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


def build_unet(name="unet_tiny", opset=18):
    seed_all(3)
    model = warm_batchnorm(UNetTiny(), lambda: (torch.randn(4, 3, 32, 32),))
    feeds = {"image": image_batch(np.random.default_rng(3), (SAMPLES, 3, 32, 32))}
    path = HERE / f"{name}.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    export_dynamo(model, (torch.from_numpy(feeds["image"][:2]),), path, opset, ["image"], ["mask_logits"],
                  {"x": {0: batch}})
    return name, model, path, feeds, f"dynamo, opset {opset}"


# --------------------------------------------------------------------------- 4. CRNN OCR
class CRNN(nn.Module):
    def __init__(self, num_chars=20, hidden=24):
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2, 2),             # 16x64
            nn.Conv2d(8, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2, 2),           # 8x32
            nn.Conv2d(16, 24, 3, 1, 1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d((2, 1), (2, 1)),  # 4x32
            nn.Conv2d(24, 24, (4, 1)), nn.BatchNorm2d(24), nn.ReLU(),                                 # 1x32
        )
        self.rnn = nn.LSTM(24, hidden, num_layers=1, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, num_chars)

    def forward(self, x):
        f = self.cnn(x)                  # [b, c, 1, w]
        b, c, h, w = f.shape
        seq = f.reshape(b, c * h, w).permute(2, 0, 1)  # [w, b, c] (time-major)
        out, _ = self.rnn(seq)
        logits = self.fc(out)            # [w, b, classes]
        return F.log_softmax(logits, dim=2)


def build_crnn(name="crnn_ocr", opset=14):
    seed_all(4)
    model = warm_batchnorm(CRNN(), lambda: (torch.randn(8, 1, 32, 64),))
    rng = np.random.default_rng(4)
    # text-line-like images: dark strokes (vertical bars of random widths) on a light background
    x = np.full((SAMPLES, 1, 32, 64), 0.9, np.float32)
    for i in range(SAMPLES):
        for _ in range(10):
            c0 = int(rng.integers(0, 60)); wdt = int(rng.integers(1, 4))
            r0 = int(rng.integers(4, 10)); r1 = int(rng.integers(22, 28))
            x[i, 0, r0:r1, c0:c0 + wdt] = rng.uniform(0.0, 0.3)
    x += rng.normal(0, 0.05, x.shape).astype(np.float32)
    feeds = {"image": ((x - 0.5) / 0.5).astype(np.float32)}
    path = HERE / f"{name}.onnx"
    export_legacy(model, (torch.from_numpy(feeds["image"][:1]),), path, opset, ["image"], ["log_probs"],
                  {"image": {0: "batch"}, "log_probs": {1: "batch"}})
    return name, model, path, feeds, f"legacy, opset {opset}"


# --------------------------------------------------------------------------- 5. GRU text classifier
VOCAB = 50


class GRUClassifier(nn.Module):
    def __init__(self, vocab=VOCAB, emb=16, hidden=24, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb, padding_idx=0)
        self.gru = nn.GRU(emb, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, tokens):
        e = self.embed(tokens)               # [b, s, emb]
        out, h = self.gru(e)                 # h: [1, b, hidden]
        pooled = out.mean(dim=1) + h[0]      # mean over time + last state
        return F.softmax(self.fc(torch.tanh(pooled)), dim=-1)


def build_gru(name="gru_text", opset=12):
    seed_all(5)
    model = GRUClassifier().eval()
    rng = np.random.default_rng(5)
    tokens = rng.integers(1, VOCAB, size=(SAMPLES, 12)).astype(np.int64)
    tokens[::3, 9:] = 0  # some padded sequences
    feeds = {"tokens": tokens}
    path = HERE / f"{name}.onnx"
    export_legacy(model, (torch.from_numpy(tokens[:2]),), path, opset, ["tokens"], ["probs"],
                  {"tokens": {0: "batch", 1: "seq"}, "probs": {0: "batch"}})
    return name, model, path, feeds, f"legacy, opset {opset}"


# --------------------------------------------------------------------------- 6a. If (scripted)
class GatedBranch(nn.Module):
    """`if x.mean() > 0:` picks one of two Conv-BN-ReLU branches (exports as ONNX If)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Sigmoid())
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        if bool(x.mean() > 0):
            y = self.a(y) + 1.0
        else:
            y = self.b(y) * 2.0
        return self.out(y)


def build_if(name="if_branch", opset=16):
    seed_all(6)
    model = GatedBranch()
    with torch.no_grad():  # warm both branches' BatchNorms
        model.train()
        for _ in range(5):
            y = model.stem(torch.randn(8, 3, 16, 16))
            model.a(y); model.b(y)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.3, 0.3)
    model.eval()
    scripted = torch.jit.script(model)
    rng = np.random.default_rng(6)
    x = image_batch(rng, (SAMPLES, 3, 16, 16))
    x[: SAMPLES // 2] += 0.5   # first half: mean > 0 (then-branch)
    x[SAMPLES // 2:] -= 0.5    # second half: mean < 0 (else-branch)
    feeds = {"x": x.astype(np.float32)}
    path = HERE / f"{name}.onnx"
    export_legacy(scripted, (torch.from_numpy(x[:1]),), path, opset, ["x"], ["y"],
                  {"x": {0: "batch"}, "y": {0: "batch"}})
    return name, model, path, feeds, f"legacy (torch.jit.script), opset {opset}"


# --------------------------------------------------------------------------- 6b. Loop (scripted)
class ScriptedRNN(nn.Module):
    """A hand-written Elman RNN: `for t in range(x.size(1))` exports as an ONNX Loop (dynamic trip count)."""

    def __init__(self, d_in=8, hidden=16):
        super().__init__()
        self.w_in = nn.Linear(d_in, hidden)
        self.w_h = nn.Parameter(torch.randn(hidden, hidden) * 0.3)
        self.out = nn.Linear(hidden, 2)
        self.hidden = hidden

    def forward(self, x):  # x: [b, t, d_in]
        h = torch.zeros(x.size(0), self.hidden)
        u = self.w_in(x)
        for t in range(x.size(1)):
            h = torch.tanh(torch.matmul(h, self.w_h) + u[:, t])
        return self.out(h)


def build_loop(name="loop_rnn", opset=13):
    seed_all(7)
    model = ScriptedRNN().eval()
    scripted = torch.jit.script(model)
    rng = np.random.default_rng(7)
    t = np.linspace(0, 1, 10, dtype=np.float32)
    x = np.stack([np.sin(2 * np.pi * rng.uniform(0.5, 2) * t[:, None] + rng.uniform(0, 6, 8)) for _ in range(SAMPLES)])
    feeds = {"x": x.astype(np.float32)}
    path = HERE / f"{name}.onnx"
    export_legacy(scripted, (torch.from_numpy(feeds["x"][:2]),), path, opset, ["x"], ["y"],
                  {"x": {0: "batch", 1: "time"}, "y": {0: "batch"}})
    return name, model, path, feeds, f"legacy (torch.jit.script), opset {opset}"


# --------------------------------------------------------------------------- 7. transformer (dynamo)
class TinyEncoder(nn.Module):
    def __init__(self, d=32, heads=4, ff=64, layers=2, classes=5):
        super().__init__()
        self.proj = nn.Linear(12, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(d), "attn": nn.MultiheadAttention(d, heads, batch_first=True),
                "ln2": nn.LayerNorm(d), "ff": nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))}))
        self.ln = nn.LayerNorm(d)
        self.cls = nn.Linear(d, classes)

    def forward(self, x):  # [b, s, 12]
        h = self.proj(x)
        for blk in self.blocks:
            y = blk["ln1"](h)
            h = h + blk["attn"](y, y, y, need_weights=False)[0]
            h = h + blk["ff"](blk["ln2"](h))
        h = self.ln(h)
        return self.cls(h.mean(dim=1)), h


def build_transformer(name="transformer_mha", opset=18):
    seed_all(8)
    model = TinyEncoder().eval()
    with torch.no_grad():  # non-trivial LayerNorm affine params
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.2, 0.2)
    rng = np.random.default_rng(8)
    feeds = {"features": rng.normal(size=(SAMPLES, 10, 12)).astype(np.float32)}
    path = HERE / f"{name}.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=2, max=128)
    export_dynamo(model, (torch.from_numpy(feeds["features"][:2]),), path, opset, ["features"],
                  ["logits", "hidden"], {"x": {0: batch, 1: seq}})
    return name, model, path, feeds, f"dynamo, opset {opset}"


# --------------------------------------------------------------------------- 8. GroupNorm/InstanceNorm/SiLU/HardSwish
class NormAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = self.c1(x)
        x = self.gn(x)
        x = x * torch.sigmoid(x)          # SiLU written out (Sigmoid*Mul)
        x = self.c2(x)
        x = F.silu(self.inorm(x))         # nn.SiLU
        x = F.hardswish(self.bn(self.c3(x)))
        return self.head(x)


def build_norms(name="norm_act", opset=17):
    seed_all(9)
    model = NormAct()
    with torch.no_grad():
        for m in (model.gn, model.inorm):
            m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.3, 0.3)
    model = warm_batchnorm(model, lambda: (torch.randn(8, 3, 16, 16),))
    feeds = {"input": image_batch(np.random.default_rng(9), (SAMPLES, 3, 16, 16))}
    path = HERE / f"{name}.onnx"
    export_legacy(model, (torch.from_numpy(feeds["input"][:1]),), path, opset, ["input"], ["features"],
                  {"input": {0: "batch"}, "features": {0: "batch"}})
    return name, model, path, feeds, f"legacy, opset {opset}"


# --------------------------------------------------------------------------- 9. Keras-like NHWC (onnx.helper)
def build_keras_nhwc(name="keras_nhwc", opset=13):
    """tf2onnx-style: NHWC input, Transpose->Conv->Transpose per layer, channel-last Mul/Add (BN),
    Concat on the last axis, Resize between transposes, Softmax on the last axis."""
    rng = np.random.default_rng(10)
    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def conv_nhwc(x, cin, cout, k, prefix, stride=1, act="Relu"):
        w = const(f"{prefix}/kernel", (rng.normal(size=(cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32))
        b = const(f"{prefix}/bias", rng.normal(0, 0.1, cout).astype(np.float32))
        nodes.append(helper.make_node("Transpose", [x], [f"{prefix}/nchw"], perm=[0, 3, 1, 2], name=f"{prefix}/tr_in"))
        nodes.append(helper.make_node("Conv", [f"{prefix}/nchw", w, b], [f"{prefix}/conv"], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4, name=f"{prefix}/Conv2D"))
        nodes.append(helper.make_node("Transpose", [f"{prefix}/conv"], [f"{prefix}/nhwc"], perm=[0, 2, 3, 1], name=f"{prefix}/tr_out"))
        # BatchNorm as channel-last Mul/Add (what tf2onnx emits for fused BN in inference graphs)
        s = const(f"{prefix}/bn/scale", rng.uniform(0.5, 1.5, cout).astype(np.float32))
        t = const(f"{prefix}/bn/shift", rng.uniform(-0.2, 0.2, cout).astype(np.float32))
        nodes.append(helper.make_node("Mul", [f"{prefix}/nhwc", s], [f"{prefix}/bn/mul"], name=f"{prefix}/bn/Mul"))
        nodes.append(helper.make_node("Add", [f"{prefix}/bn/mul", t], [f"{prefix}/bn/add"], name=f"{prefix}/bn/Add"))
        nodes.append(helper.make_node(act, [f"{prefix}/bn/add"], [f"{prefix}/out"], name=f"{prefix}/{act}"))
        return f"{prefix}/out"

    x0 = conv_nhwc("input_1", 3, 8, 3, "conv1")
    x1 = conv_nhwc(x0, 8, 16, 3, "conv2", stride=2)
    x2 = conv_nhwc(x1, 16, 16, 3, "conv3")
    # upsample x2 back to x0's size in NCHW between transposes (tf2onnx's ResizeNearestNeighbor)
    nodes.append(helper.make_node("Transpose", [x2], ["up/nchw"], perm=[0, 3, 1, 2], name="up/tr_in"))
    const("up/roi", np.array([], np.float32))
    const("up/scales", np.array([1, 1, 2, 2], np.float32))
    nodes.append(helper.make_node("Resize", ["up/nchw", "up/roi", "up/scales"], ["up/resized"], mode="nearest",
                                  coordinate_transformation_mode="asymmetric", nearest_mode="floor", name="up/Resize"))
    nodes.append(helper.make_node("Transpose", ["up/resized"], ["up/nhwc"], perm=[0, 2, 3, 1], name="up/tr_out"))
    nodes.append(helper.make_node("Concat", [x0, "up/nhwc"], ["concat"], axis=-1, name="concat"))  # 8+16 = 24
    x3 = conv_nhwc("concat", 24, 8, 1, "conv4", act="Relu")
    # residual in channel-last layout + per-channel gain
    nodes.append(helper.make_node("Add", [x3, x0], ["res"], name="res/Add"))
    g = const("res/gain", rng.uniform(0.8, 1.2, (1, 1, 1, 8)).astype(np.float32))
    nodes.append(helper.make_node("Mul", ["res", g], ["res/scaled"], name="res/Mul"))
    # 1x1 classifier per pixel: MatMul on the channel axis, bias, Softmax on the last axis
    w = const("cls/kernel", rng.normal(0, 0.4, (8, 5)).astype(np.float32))
    b = const("cls/bias", rng.normal(0, 0.1, 5).astype(np.float32))
    nodes.append(helper.make_node("MatMul", ["res/scaled", w], ["cls/mm"], name="cls/MatMul"))
    nodes.append(helper.make_node("Add", ["cls/mm", b], ["cls/logits"], name="cls/BiasAdd"))
    nodes.append(helper.make_node("Softmax", ["cls/logits"], ["probs"], axis=-1, name="cls/Softmax"))
    graph = helper.make_graph(
        nodes, "keras_nhwc",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["N", 16, 16, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 16, 16, 5])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tf2onnx-like")
    feeds = {"input_1": image_batch(np.random.default_rng(10), (SAMPLES, 3, 16, 16)).transpose(0, 2, 3, 1).copy()}
    path = HERE / f"{name}.onnx"
    finalize(model, path)
    return name, None, path, feeds, f"onnx.helper (tf2onnx-style NHWC), opset {opset}"


# --------------------------------------------------------------------------- 10. pre-quantized Q/DQ (onnx.helper)
def build_qdq(name="qdq_prequant", opset=13):
    """A graph from a quantization toolkit: activations Q->DQ (per-tensor uint8/int8), int8 weights
    with per-channel DequantizeLinear(axis=0) feeding Conv, a Gemm with per-channel (axis=0 on the
    transB weight) int8 weights."""
    rng = np.random.default_rng(11)
    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def qdq_act(x, scale, prefix, zp_type=np.int8):
        s = const(f"{prefix}/scale", np.array(scale, np.float32))
        z = const(f"{prefix}/zp", np.array(0, zp_type))
        nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{prefix}/q"], name=f"{prefix}/Q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}/q", s, z], [f"{prefix}/dq"], name=f"{prefix}/DQ"))
        return f"{prefix}/dq"

    def qweight(w, prefix, axis=0):
        amax = np.abs(w).reshape(w.shape[0], -1).max(1) if axis == 0 else np.abs(w).max(0)
        scale = (amax / 127.0).astype(np.float32)
        shape = [-1] + [1] * (w.ndim - 1) if axis == 0 else [1, -1]
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        const(f"{prefix}/w_int8", q)
        const(f"{prefix}/w_scale", scale)
        const(f"{prefix}/w_zp", np.zeros(scale.shape, np.int8))
        nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}/w_int8", f"{prefix}/w_scale", f"{prefix}/w_zp"],
                                      [f"{prefix}/w"], axis=axis, name=f"{prefix}/w_DQ"))
        return f"{prefix}/w"

    def conv(x, cin, cout, k, prefix, stride=1, act_scale=0.05):
        xq = qdq_act(x, act_scale, f"{prefix}/in")
        w = qweight((rng.normal(size=(cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32), prefix)
        b = const(f"{prefix}/bias", rng.normal(0, 0.05, cout).astype(np.float32))
        nodes.append(helper.make_node("Conv", [xq, w, b], [f"{prefix}/conv"], kernel_shape=[k, k], strides=[stride] * 2,
                                      pads=[k // 2] * 4, name=f"{prefix}/Conv"))
        nodes.append(helper.make_node("Relu", [f"{prefix}/conv"], [f"{prefix}/out"], name=f"{prefix}/Relu"))
        return f"{prefix}/out"

    x = conv("input", 3, 16, 3, "conv1", act_scale=2.5 / 127)
    x = conv(x, 16, 16, 3, "conv2", stride=2, act_scale=0.04)
    r = conv(x, 16, 16, 3, "conv3", act_scale=0.04)
    a = qdq_act(x, 0.04, "res/a")
    b = qdq_act(r, 0.04, "res/b")
    nodes.append(helper.make_node("Add", [a, b], ["res"], name="res/Add"))
    nodes.append(helper.make_node("GlobalAveragePool", ["res"], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1, name="flatten"))
    fq = qdq_act("flat", 0.02, "fc/in")
    w = qweight(rng.normal(0, 0.3, (10, 16)).astype(np.float32), "fc", axis=0)  # [N, K] with transB=1: axis 0 = output channel
    bias = const("fc/bias", rng.normal(0, 0.05, 10).astype(np.float32))
    nodes.append(helper.make_node("Gemm", [fq, w, bias], ["logits"], transB=1, name="fc/Gemm"))
    graph = helper.make_graph(
        nodes, "qdq_prequant",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qdq-toolkit-like")
    feeds = {"input": image_batch(np.random.default_rng(11), (SAMPLES, 3, 16, 16))}
    path = HERE / f"{name}.onnx"
    finalize(model, path)
    return name, None, path, feeds, f"onnx.helper (Q/DQ, per-channel int8 weights), opset {opset}"


# --------------------------------------------------------------------------- main
BUILDERS = [build_mobilenet, build_detector, build_unet, build_crnn, build_gru, build_if, build_loop,
            build_transformer, build_norms, build_keras_nhwc, build_qdq]


def main(only: list[str] | None = None) -> list[dict]:
    rows = []
    for builder in BUILDERS:
        if only and not any(o in builder.__name__ for o in only):
            continue
        name, torch_model, path, feeds, how = builder()
        model = finalize(onnx.load(str(path)), path) if torch_model is not None else onnx.load(str(path))
        outs = ort_run(path, feeds)
        assert all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f"), name
        diff = check_against_torch(name, torch_model, path, feeds) if torch_model is not None else None
        save_npz(HERE / f"{name}.npz", feeds)
        counts = op_counts(model)
        rows.append({"name": name, "how": how, "bytes": path.stat().st_size, "nodes": sum(counts.values()),
                     "functions": len(model.functions), "diff": diff, "ops": dict(sorted(counts.items()))})
        print(f"{name:18s} {path.stat().st_size:7d} B  {sum(counts.values()):4d} nodes  {how}"
              + (f"  max|ort-torch|={diff:.1e}" if diff is not None else ""))
        print("    " + ", ".join(f"{k}:{v}" for k, v in sorted(counts.items())))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:] or None)
