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
    feeds = transformer_inputs(name, np.random.default_rng(8), SAMPLES)
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


# --------------------------------------------------------------------------- 11. YOLOv8-style detector (dynamic H/W)
class ConvBnSiLU(nn.Module):
    """Ultralytics ``Conv``: Conv2d(bias=False) -> BatchNorm2d -> SiLU."""

    def __init__(self, cin, cout, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2 = ConvBnSiLU(c, c, 3), ConvBnSiLU(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """cv1 -> chunk(2) (ONNX Split) -> n bottlenecks on the last chunk -> Concat of all -> cv2."""

    def __init__(self, cin, cout, n=1, shortcut=False):
        super().__init__()
        self.c = cout // 2
        self.cv1 = ConvBnSiLU(cin, 2 * self.c, 1)
        self.cv2 = ConvBnSiLU((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin, cout, k=5):
        super().__init__()
        c = cin // 2
        self.cv1, self.cv2 = ConvBnSiLU(cin, c, 1), ConvBnSiLU(c * 4, cout, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over 16 bins, then a fixed 1x1 Conv with arange weights."""

    def __init__(self, c1=16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float32).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class YOLOv8Tiny(nn.Module):
    """YOLOv8-n layout with narrow channels: backbone (C2f, SPPF), PAN neck (nn.Upsample + Concat),
    anchor-free decoupled head with DFL; output [batch, 4 + nc, anchors] (xywh in pixels, class scores)."""

    def __init__(self, nc=80, w=(8, 8, 16, 16, 24), head=(8, 8), reg_max=16):
        super().__init__()
        self.nc, self.reg_max, self.no = nc, reg_max, nc + 4 * reg_max
        self.stride = (8, 16, 32)
        self.b0 = ConvBnSiLU(3, w[0], 3, 2)                                   # P1/2
        self.b1 = nn.Sequential(ConvBnSiLU(w[0], w[1], 3, 2), C2f(w[1], w[1], 1, True))  # P2/4
        self.b2 = nn.Sequential(ConvBnSiLU(w[1], w[2], 3, 2), C2f(w[2], w[2], 1, True))  # P3/8
        self.b3 = nn.Sequential(ConvBnSiLU(w[2], w[3], 3, 2), C2f(w[3], w[3], 1, True))  # P4/16
        self.b4 = nn.Sequential(ConvBnSiLU(w[3], w[4], 3, 2), C2f(w[4], w[4], 1, True), SPPF(w[4], w[4]))  # P5/32
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n1 = C2f(w[4] + w[3], w[3], 1)          # P4 top-down
        self.n2 = C2f(w[3] + w[2], w[2], 1)          # P3 out
        self.d1 = ConvBnSiLU(w[2], w[2], 3, 2)
        self.n3 = C2f(w[2] + w[3], w[3], 1)          # P4 out
        self.d2 = ConvBnSiLU(w[3], w[3], 3, 2)
        self.n4 = C2f(w[3] + w[4], w[4], 1)          # P5 out
        ch = (w[2], w[3], w[4])
        c2, c3 = head  # YOLOv8 uses max(16, ch[0] // 4, 4 * reg_max) and max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(ConvBnSiLU(c, c2, 3), ConvBnSiLU(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for c in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(ConvBnSiLU(c, c3, 3), ConvBnSiLU(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for c in ch)
        self.dfl = DFL(reg_max)

    @staticmethod
    def make_anchors(feats, strides, offset=0.5):
        points, stride_t = [], []
        for f, s in zip(feats, strides):
            _, _, h, w = f.shape
            sx = torch.arange(end=w, dtype=torch.float32) + offset
            sy = torch.arange(end=h, dtype=torch.float32) + offset
            sy, sx = torch.meshgrid(sy, sx, indexing="ij")
            points.append(torch.stack((sx, sy), -1).view(-1, 2))
            stride_t.append(torch.full((h * w, 1), s, dtype=torch.float32))
        return torch.cat(points).transpose(0, 1), torch.cat(stride_t).transpose(0, 1)

    def forward(self, x):
        p2 = self.b1(self.b0(x))
        p3 = self.b2(p2)
        p4 = self.b3(p3)
        p5 = self.b4(p4)
        t4 = self.n1(torch.cat([self.up(p5), p4], 1))
        o3 = self.n2(torch.cat([self.up(t4), p3], 1))
        o4 = self.n3(torch.cat([self.d1(o3), t4], 1))
        o5 = self.n4(torch.cat([self.d2(o4), p5], 1))
        feats = [torch.cat((self.cv2[i](f), self.cv3[i](f)), 1) for i, f in enumerate((o3, o4, o5))]
        b = feats[0].shape[0]
        x_cat = torch.cat([f.view(b, self.no, -1) for f in feats], 2)
        anchors, strides = self.make_anchors(feats, self.stride)
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        x1y1, x2y2 = anchors.unsqueeze(0) - lt, anchors.unsqueeze(0) + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides
        return torch.cat((dbox, cls.sigmoid()), 1)


def scene_batch(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Photo-like scenes: a smooth two-colour background gradient with a few filled shapes (discs and
    rectangles) and sensor noise, ImageNet-normalized (so roughly zero-mean, unit-variance)."""
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    mean = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
        ang = rng.uniform(0, np.pi)
        t = (np.cos(ang) * xx / w + np.sin(ang) * yy / h)
        t = (t - t.min()) / (t.max() - t.min() + 1e-9)
        img = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
        for _ in range(int(rng.integers(3, 7))):
            colour = rng.uniform(0, 1, 3)[:, None, None]
            cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
            ry, rx = rng.uniform(0.05, 0.25) * h, rng.uniform(0.05, 0.25) * w
            if rng.uniform() < 0.5:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            else:
                mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            shade = 0.85 + 0.15 * np.sin(2 * np.pi * (yy - cy) / (4 * ry + 1))  # soft shading
            img = np.where(mask[None], colour * shade[None], img)
        img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
        out[i] = ((img - mean) / std).astype(np.float32)
    return out


def build_yolo(name="yolo_dynamic", opset=17):
    seed_all(12)
    model = warm_batchnorm(YOLOv8Tiny(), lambda: (torch.randn(4, 3, 128, 128),))
    with torch.no_grad():  # like a trained detector: most anchors score near 0 (class prior ~5 %)
        for branch in model.cv3:
            branch[-1].bias.fill_(-3.0)
    feeds = {"images": scene_batch(np.random.default_rng(12), SAMPLES, 320, 320)}
    path = HERE / f"{name}.onnx"
    export_legacy(model, (torch.from_numpy(feeds["images"][:1]),), path, opset, ["images"], ["output0"],
                  {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}})
    return name, model, path, feeds, f"legacy, opset {opset}"


# --------------------------------------------------------------------------- 12. Silero-VAD-style (reflect Pad + STFT conv + LSTM)
class STFTConv(nn.Module):
    """STFT as a strided Conv1d with a fixed windowed-DFT basis (real and imaginary rows), after
    ``F.pad(mode="reflect")``; returns the magnitude [b, n_fft // 2 + 1, frames]."""

    def __init__(self, n_fft=128, hop=64):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        bins = n_fft // 2 + 1
        n = torch.arange(n_fft, dtype=torch.float64)
        k = torch.arange(bins, dtype=torch.float64).unsqueeze(1)
        window = 0.5 - 0.5 * torch.cos(2 * torch.pi * n / n_fft)  # periodic Hann
        real = torch.cos(2 * torch.pi * k * n / n_fft) * window
        imag = -torch.sin(2 * torch.pi * k * n / n_fft) * window
        self.register_buffer("forward_basis_buffer", torch.cat([real, imag]).unsqueeze(1).float())

    def forward(self, x):  # [b, samples]
        pad = (self.n_fft - self.hop) // 2
        x = F.pad(x.unsqueeze(1), (pad, pad), mode="reflect")
        spec = F.conv1d(x, self.forward_basis_buffer, stride=self.hop)
        bins = self.n_fft // 2 + 1
        real, imag = spec[:, :bins], spec[:, bins:]
        return torch.sqrt(real ** 2 + imag ** 2)


class VADReflect(nn.Module):
    def __init__(self, n_fft=128, hop=64, hidden=32):
        super().__init__()
        self.stft = STFTConv(n_fft, hop)
        bins = n_fft // 2 + 1
        self.encoder = nn.Sequential(
            nn.Conv1d(bins, 32, 3, padding=1), nn.ReLU(),
            nn.Conv1d(32, 32, 3, padding=1), nn.ReLU(),
            nn.Conv1d(32, hidden, 3, padding=1), nn.ReLU(),
        )
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.decoder = nn.Linear(hidden, 1)

    def forward(self, x):  # [b, samples] -> speech probability per frame [b, frames]
        mag = self.stft(x)
        feats = self.encoder(torch.log(mag + 1e-3))          # [b, c, frames]
        out, _ = self.lstm(feats.transpose(1, 2))             # [b, frames, hidden]
        return torch.sigmoid(self.decoder(torch.relu(out))).squeeze(-1)


def speech_like(rng: np.random.Generator, n: int, length: int, sr: int = 16000) -> np.ndarray:
    """Synthetic speech-like audio: voiced segments (a pitch harmonic series with formant-like
    weights) under smooth syllable envelopes, unvoiced noise bursts, background noise."""
    t = np.arange(length) / sr
    out = np.empty((n, length), np.float32)
    for i in range(n):
        sig = np.zeros(length)
        f0 = rng.uniform(90, 240) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        formants = rng.uniform([300, 900, 2200], [900, 2000, 3200])
        for h in range(1, 16):
            fh = h * f0.mean()
            gain = sum(np.exp(-((fh - f) / 250.0) ** 2) for f in formants) + 0.05
            sig += gain / h ** 0.5 * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
        env = np.zeros(length)
        for _ in range(int(rng.integers(1, 4))):  # syllables
            c, w = rng.uniform(0, length), rng.uniform(0.1, 0.3) * length
            env += np.exp(-0.5 * ((np.arange(length) - c) / (w / 2.5)) ** 2)
        sig *= env
        burst = rng.normal(size=length) * np.exp(-0.5 * ((np.arange(length) - rng.uniform(0, length)) / (0.03 * length)) ** 2)
        sig = sig / (np.abs(sig).max() + 1e-9) * rng.uniform(0.2, 0.7) + 0.3 * burst * rng.uniform(0, 0.5)
        sig += rng.normal(0, rng.uniform(0.002, 0.02), length)
        out[i] = sig.astype(np.float32)
    return out


def build_vad(name="vad_reflect", opset=16):
    seed_all(13)
    model = VADReflect().eval()
    with torch.no_grad():  # "trained-looking" scales: default init shrinks the activations to a constant 0.5
        for mod in model.encoder:
            if isinstance(mod, nn.Conv1d):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                mod.bias.uniform_(-0.1, 0.1)
        for p in model.lstm.parameters():
            p.uniform_(-0.4, 0.4)
        nn.init.normal_(model.decoder.weight, 0, 1.5)
        model.decoder.bias.fill_(-0.3)
    feeds = {"input": speech_like(np.random.default_rng(13), SAMPLES, 1600)}
    path = HERE / f"{name}.onnx"
    export_legacy(model, (torch.from_numpy(feeds["input"][:2]),), path, opset, ["input"], ["output"],
                  {"input": {0: "batch", 1: "sequence"}, "output": {0: "batch", 1: "frames"}})
    return name, model, path, feeds, f"legacy, opset {opset}"


# --------------------------------------------------------------------------- 13. If with recurrent branches (scripted decoder)
class ScriptedRecurrentDecoder(nn.Module):
    """A scripted seq2seq-style decoder: ``if x.mean() > 0`` runs an LSTM (and, nested, either a
    second LSTM seeded with the first one's final state for long inputs or a residual of the final
    state for short ones), else a GRU from an explicit zero state; all of it exports as nested ONNX
    ``If``s whose branches hold ``LSTM``/``GRU`` and their ``Shape``/``ConstantOfShape`` initial states."""

    def __init__(self, d_in=12, hidden=24, vocab=16):
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Linear(d_in, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.lstm2 = nn.LSTM(hidden, hidden, batch_first=True)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.proj = nn.Linear(hidden, vocab)

    def forward(self, x):  # [b, t, d_in] -> [b, t, vocab]
        h = torch.tanh(self.embed(x))
        if bool(x.mean() > 0):
            y, (hn, cn) = self.lstm(h)
            if x.size(1) > 8:
                y, _ = self.lstm2(y, (hn, cn))
            else:
                y = y + hn.transpose(0, 1)
        else:
            h0 = torch.zeros(1, x.size(0), self.hidden)
            y, _ = self.gru(h, h0)
        return F.log_softmax(self.proj(y), dim=-1)


def build_if_lstm(name="if_lstm", opset=15):
    seed_all(14)
    model = ScriptedRecurrentDecoder().eval()
    scripted = torch.jit.script(model)
    rng = np.random.default_rng(14)
    t = np.linspace(0, 1, 12, dtype=np.float32)
    x = np.stack([np.sin(2 * np.pi * rng.uniform(0.5, 3, 12) * t[:, None] + rng.uniform(0, 6.28, 12))
                  + 0.1 * rng.normal(size=(12, 12)) for _ in range(SAMPLES)]).astype(np.float32)
    x[: SAMPLES // 2] += 0.5   # first half: mean > 0 (LSTM branch)
    x[SAMPLES // 2:] -= 0.5    # second half: mean < 0 (GRU branch)
    feeds = {"x": x}
    path = HERE / f"{name}.onnx"
    export_legacy(scripted, (torch.from_numpy(x[:2]),), path, opset, ["x"], ["log_probs"],
                  {"x": {0: "batch", 1: "time"}, "log_probs": {0: "batch", 1: "time"}})
    return name, model, path, feeds, f"legacy (torch.jit.script), opset {opset}"


# --------------------------------------------------------------------------- 14. Paddle2ONNX-style OCR recognizer
def hard_swish(x):
    return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0  # exports as Add, Clip(min, max inputs), Mul, Div


class PaddleConvBN(nn.Module):
    def __init__(self, cin, cout, k, stride=1, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x):
        x = self.bn(self.conv(x))
        return hard_swish(x) if self.act else x


class PaddleSE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(c, c // r, 1)
        self.conv2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.hardsigmoid(self.conv2(F.relu(self.conv1(self.pool(x)))))
        return x * s


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin, cout, stride, dw_size=3, use_se=False):
        super().__init__()
        self.dw = PaddleConvBN(cin, cin, dw_size, stride, groups=cin)
        self.se = PaddleSE(cin) if use_se else nn.Identity()
        self.pw = PaddleConvBN(cin, cout, 1)

    def forward(self, x):
        return self.pw(self.se(self.dw(x)))


class SVTRMixer(nn.Module):
    """One global-attention mixer block (SVTR neck): pre-LN attention + pre-LN MLP with swish."""

    def __init__(self, dim=64, heads=2, mlp=2):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp * dim), nn.Linear(mlp * dim, dim)
        self.scale = self.hd ** -0.5

    def forward(self, x):  # [1, T, dim] (batch fixed to 1 as in Paddle inference exports)
        dim = self.heads * self.hd
        qkv = self.qkv(self.norm1(x)).reshape(1, -1, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = F.softmax(q.matmul(k.permute(0, 1, 3, 2)), dim=-1)
        x = x + self.proj(attn.matmul(v).permute(0, 2, 1, 3).reshape(1, -1, dim))
        h = self.fc1(self.norm2(x))
        return x + self.fc2(h * torch.sigmoid(h))


class PaddleOCRRec(nn.Module):
    """PP-OCR-style CTC recognizer: PP-LCNet-like backbone (depthwise separable convs, SE,
    hard-swish), (2,1)-stride stages and pooling down to height 1, Im2Seq, an SVTR mixer, CTC head."""

    def __init__(self, num_classes=97):
        super().__init__()
        self.backbone = nn.Sequential(
            PaddleConvBN(3, 16, 3, 2),                        # 24 x W/2
            DepthwiseSeparable(16, 32, 1),
            DepthwiseSeparable(32, 48, 2),                    # 12 x W/4
            DepthwiseSeparable(48, 48, 1, use_se=True),
            DepthwiseSeparable(48, 64, (2, 1)),               # 6 x W/4
            nn.AvgPool2d((2, 1), (2, 1)),                     # 3 x W/4
            DepthwiseSeparable(64, 64, 1, dw_size=5, use_se=True),
            nn.MaxPool2d(2, 2),                               # 1 x W/8
        )
        self.mixer = SVTRMixer(64)
        self.norm = nn.LayerNorm(64, eps=1e-6)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        f = self.backbone(x)                     # [1, 64, 1, T]
        seq = f.squeeze(2).permute(0, 2, 1)      # Im2Seq: [1, T, 64]
        seq = self.norm(self.mixer(seq))
        return F.softmax(self.fc(seq), dim=2)


_PADDLE_OUT = {"Conv": "conv2d", "BatchNormalization": "batch_norm", "Add": "elementwise_add",
               "Mul": "elementwise_mul", "Div": "elementwise_div", "Sub": "elementwise_sub", "Clip": "clip",
               "Relu": "relu", "HardSigmoid": "hardsigmoid", "GlobalAveragePool": "pool2d", "MaxPool": "pool2d",
               "AveragePool": "pool2d", "MatMul": "matmul_v2", "Reshape": "reshape2", "Transpose": "transpose2",
               "Squeeze": "squeeze2", "Softmax": "softmax", "ReduceMean": "reduce_mean", "Pow": "pow",
               "Sqrt": "sqrt", "Sigmoid": "sigmoid", "Gather": "slice", "Constant": "p2o.helper.constant"}


def paddle2onnx_style(model: onnx.ModelProto, dynamic_width: str) -> onnx.ModelProto:
    """Make a torch export look like Paddle2ONNX output: ``p2o.<Op>.<n>`` node names, Paddle variable
    names (``conv2d_3.tmp_0``, ``batch_norm_3.w_0``, ``linear_1.w_0``, ...), Linear weights stored
    [in, out] (no Transpose node), the sequence head's weights as ``Constant`` nodes, and the input's
    width named ``p2o.DynamicDimension.0``."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    # 1) Linear weights: fold Transpose(initializer) (the torch exporter's W^T) into the initializer
    for n in list(g.node):
        if n.op_type == "Transpose" and n.input[0] in inits:
            w = numpy_helper.to_array(inits[n.input[0]]).T.copy()
            inits[n.input[0]].CopyFrom(numpy_helper.from_array(w, n.input[0]))
            for c in g.node:
                for i, x in enumerate(c.input):
                    if x == n.output[0]:
                        c.input[i] = n.input[0]
            g.node.remove(n)
    # 2) Cast(Constant) (the torch exporter's typed Clip bounds) -> a Constant of the cast value
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    for n in list(g.node):
        if n.op_type == "Cast" and n.input[0] in consts:
            value = numpy_helper.to_array(consts[n.input[0]].attribute[0].t)
            value = value.astype(helper.tensor_dtype_to_np_dtype(n.attribute[0].i))
            n.CopyFrom(helper.make_node("Constant", [], [n.output[0]], value=numpy_helper.from_array(value)))
    used = {x for n in g.node for x in n.input}
    for n in list(g.node):
        if n.op_type == "Constant" and n.output[0] not in used:
            g.node.remove(n)
    # 3) names
    renames: dict[str, str] = {}
    op_count: collections.Counter = collections.Counter()
    var_count: collections.Counter = collections.Counter()
    linear = 0
    for n in g.node:
        n.name = f"p2o.{n.op_type}.{op_count[n.op_type]}"
        op_count[n.op_type] += 1
        base = _PADDLE_OUT.get(n.op_type, n.op_type.lower())
        idx = var_count[base]
        var_count[base] += 1
        for j, o in enumerate(n.output):
            renames[o] = f"{base}.{idx}" if n.op_type == "Constant" else f"{base}_{idx}.tmp_{2 if base == 'batch_norm' else j}"
        params = [x for x in n.input if x in inits and x not in renames]
        if n.op_type == "Conv":
            for x, suffix in zip(params, ("w_0", "b_0")):
                renames[x] = f"conv2d_{idx}.{suffix}"
        elif n.op_type == "BatchNormalization":
            for x, suffix in zip(params, ("w_0", "b_0", "w_1", "w_2")):
                renames[x] = f"batch_norm_{idx}.{suffix}"
        elif n.op_type == "MatMul" and params:
            renames[params[0]] = f"linear_{linear}.w_0"
            bias_users = [c for c in g.node if c.op_type == "Add" and n.output[0] in c.input]
            for c in bias_users:
                for x in c.input:
                    if x in inits:
                        renames[x] = f"linear_{linear}.b_0"
            linear += 1
        elif n.op_type == "LayerNormalization":
            for x, suffix in zip(params, ("w_0", "b_0")):
                renames[x] = f"layer_norm_{idx}.{suffix}"
    for name, t in inits.items():
        if name not in renames:  # LayerNorm affine params (decomposed at opset 11) etc.
            renames[name] = f"create_parameter_{len([r for r in renames.values() if r.startswith('create_parameter')])}.w_0"
    for n in g.node:
        n.input[:] = [renames.get(x, x) for x in n.input]
        n.output[:] = [renames.get(x, x) for x in n.output]
    for t in g.initializer:
        t.name = renames.get(t.name, t.name)
    for v in g.output:
        v.name = renames.get(v.name, v.name)
    del g.value_info[:]
    # 4) the last Linear's weight and bias as Constant nodes (as some exporters write small weights)
    last = f"linear_{linear - 1}"
    moved = [t for t in g.initializer if t.name.startswith(last + ".")]
    for k, t in enumerate(moved):
        g.initializer.remove(t)
        g.node.insert(k, helper.make_node("Constant", [], [t.name], value=t, name=f"p2o.Constant.{op_count['Constant'] + k}"))
    # 5) dims
    g.input[0].type.tensor_type.shape.dim[3].dim_param = dynamic_width
    g.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    g.output[0].type.tensor_type.shape.dim[1].dim_param = "p2o.DynamicDimension.1"
    model.producer_name, model.producer_version = "PaddlePaddle", "2.6.0"
    return model


def text_lines(rng: np.random.Generator, n: int, h: int = 48, w: int = 320) -> np.ndarray:
    """Text-line crops: light paper (slight gradient and texture) with dark glyph-like strokes
    (vertical, horizontal and slanted bars, dots) in a text band, normalized to [-1, 1]."""
    out = np.empty((n, 3, h, w), np.float32)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for i in range(n):
        paper = rng.uniform(0.8, 0.95) + 0.05 * (xx / w) * rng.uniform(-1, 1) + rng.normal(0, 0.015, (h, w))
        img = np.repeat(paper[None], 3, 0) * rng.uniform(0.95, 1.0, (3, 1, 1))
        ink = rng.uniform(0.0, 0.25, 3)[:, None, None]
        top, bot = int(rng.integers(8, 14)), int(rng.integers(34, 40))
        x = int(rng.integers(4, 16))
        end = int(rng.integers(int(0.6 * w), w - 8))
        while x < end:
            gw = int(rng.integers(8, 16))  # one glyph
            mask = np.zeros((h, w), bool)
            for _ in range(int(rng.integers(2, 5))):
                kind = rng.integers(0, 4)
                t = int(rng.integers(2, 4))
                if kind == 0:    # vertical stem
                    c = x + int(rng.integers(0, gw - t + 1))
                    mask[top:bot, c:c + t] = True
                elif kind == 1:  # horizontal bar
                    r = int(rng.integers(top, bot - t))
                    mask[r:r + t, x:x + gw] = True
                elif kind == 2:  # slanted stroke
                    slope = rng.uniform(-0.4, 0.4)
                    mask |= (np.abs(xx - (x + gw / 2 + slope * (yy - (top + bot) / 2))) < t / 2) & (yy >= top) & (yy < bot) \
                        & (xx >= x) & (xx < x + gw)
                else:            # dot / bowl
                    cy, cx = rng.uniform(top, bot), x + gw / 2
                    mask |= ((yy - cy) ** 2 + (xx - cx) ** 2) < rng.uniform(4, 16)
            img = np.where(mask[None], ink + rng.normal(0, 0.03, (3, h, w)), img)
            x += gw + int(rng.integers(2, 6)) + (int(rng.integers(8, 16)) if rng.uniform() < 0.15 else 0)  # spaces
        img = np.clip(img, 0, 1)
        out[i] = ((img - 0.5) / 0.5).astype(np.float32)
    return out


def build_paddle_ocr(name="paddle_ocr_rec", opset=11):
    seed_all(15)
    model = PaddleOCRRec()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.2, 0.2)
        nn.init.normal_(model.fc.weight, 0, 0.5)  # peaky per-step class distributions, as a trained CTC head
    feeds = {"x": text_lines(np.random.default_rng(15), SAMPLES)}
    warm_rng = np.random.default_rng(150)
    model = warm_batchnorm(model, lambda: (torch.from_numpy(text_lines(warm_rng, 1)),))
    path = HERE / f"{name}.onnx"
    export_legacy(model, (torch.from_numpy(feeds["x"][:1]),), path, opset, ["x"], ["probs"],
                  {"x": {3: "width"}, "probs": {1: "T"}})
    onnx.save_model(paddle2onnx_style(onnx.load(str(path)), "p2o.DynamicDimension.0"), str(path))
    return name, model, path, feeds, f"legacy, opset {opset}, renamed to Paddle2ONNX style"


# --------------------------------------------------------------------------- 15. ONNX Runtime dynamic quantization (com.microsoft ops)
class KeywordSpotter(nn.Module):
    """Conv1d front end -> LSTM -> a dot-product attention pooling -> classifier (a keyword spotter)."""

    def __init__(self, feats=16, hidden=32, classes=6):
        super().__init__()
        self.conv = nn.Conv1d(feats, hidden, 3, padding=1)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.query, self.key = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.fc = nn.Linear(hidden, classes)
        self.scale = hidden ** -0.5

    def forward(self, x):  # [b, t, feats] -> [b, classes]
        h = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        y, _ = self.lstm(h)
        att = torch.softmax(self.query(y) @ self.key(y).transpose(1, 2) * self.scale, -1)
        return torch.softmax(self.fc((att @ y).mean(1)), -1)


def build_ort_dynquant(name="ort_dynquant", opset=13):
    """``onnxruntime.quantization.quantize_dynamic`` on a torch export: LSTM -> ``com.microsoft``
    ``DynamicQuantizeLSTM``, Linear -> ``DynamicQuantizeLinear`` + ``MatMulInteger``, Conv1d ->
    ``ConvInteger``. The stale float value_info is dropped and ONNX shape inference re-run (as a
    tool that re-annotates shapes does): it knows no ``com.microsoft`` schema, so those outputs and
    everything downstream of them get a value_info with an element type and no shape."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    seed_all(16)
    model = KeywordSpotter().eval()
    with torch.no_grad():
        nn.init.normal_(model.fc.weight, 0, 2.0)
    rng = np.random.default_rng(16)
    t = np.arange(20)[:, None] / 20.0
    x = np.stack([np.sin(2 * np.pi * (rng.uniform(0.3, 2.0, 16) * t + rng.uniform(0, 1, 16))) * rng.uniform(0.5, 2.0, 16)
                  + 0.2 * rng.normal(size=(20, 16)) for _ in range(SAMPLES)]).astype(np.float32)  # MFCC-like
    feeds = {"features": x}
    path = HERE / f"{name}.onnx"
    float_path = HERE / f"{name}.float.tmp.onnx"
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # the exporter's defaults (constant
            torch.onnx.export(  # folding on), so LSTM/Linear weights are initializers quantize_dynamic can quantize
                model, (torch.from_numpy(x[:2]),), str(float_path), dynamo=False, opset_version=opset,
                input_names=["features"], output_names=["probs"],
                dynamic_axes={"features": {0: "batch", 1: "time"}, "probs": {0: "batch"}})
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_dynamic's "Please consider to run pre-processing" warning
        try:
            quantize_dynamic(float_path, path, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
    finally:
        float_path.unlink(missing_ok=True)
    q = onnx.load(str(path))
    del q.graph.value_info[:]
    q = onnx.shape_inference.infer_shapes(q)
    typed = {v.name for v in q.graph.value_info}
    for n in q.graph.node:
        if n.domain == "com.microsoft":
            for o in n.output:
                if o and o not in typed:
                    q.graph.value_info.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, None))
    finalize(q, path)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort_run(path, feeds)[0]
    assert np.abs(ref - got).max() < 0.05 and (ref.argmax(1) == got.argmax(1)).mean() >= 0.75, (ref, got)
    return name, None, path, feeds, f"torch legacy opset {opset} + onnxruntime quantize_dynamic (QInt8)"


# --------------------------------------------------------------------------- 16. Hugging Face transformers (tiny configs, dynamo)
#: Hidden channels where trained transformers concentrate their activation outliers (BERT, OPT, ViT,
#: Whisper all show a few such channels, 10-100x the median: Bondarenko et al. 2021, Dettmers et al.
#: 2022, Sun et al. 2024); perturb_hf amplifies these LayerNorm channels so INT8 meets them here too.
OUTLIER_CHANNELS = (3, 17)
OUTLIER_FACTOR = 20.0


def perturb_hf(model: nn.Module) -> nn.Module:
    """Make a freshly initialized transformers model look trained: every (zero-initialized) bias gets
    N(0, 0.02) added, LayerNorm weights U(0.8, 1.2), and every LayerNorm's weight and bias on
    ``OUTLIER_CHANNELS`` multiplied by ``OUTLIER_FACTOR`` (the outlier channels of trained models)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.8, 1.2)
                channels = [c for c in OUTLIER_CHANNELS if c < m.weight.numel()]
                m.weight[channels] *= OUTLIER_FACTOR
                if m.bias is not None:
                    m.bias[channels] += 0.5  # a shifted outlier, as in trained models
                    m.bias[channels] *= OUTLIER_FACTOR
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def zipf_ids(rng: np.random.Generator, shape, low: int, high: int) -> np.ndarray:
    """Token ids with a Zipf-like frequency profile (a few very common ids, a long tail)."""
    ranks = np.minimum(rng.zipf(1.3, size=shape), high - low) - 1
    perm = np.random.default_rng(0).permutation(high - low)  # which ids are the common ones
    return (low + perm[ranks]).astype(np.int64)


def bert_rows(rng: np.random.Generator, n: int, seq: int = 16) -> dict[str, np.ndarray]:
    """BERT inputs: [CLS] Zipf word pieces [SEP] ([PAD]=0, [CLS]=2, [SEP]=3, words in [5, 100)),
    some rows padded, sentence pairs (token type 1 after the middle [SEP]) on odd rows."""
    cls, sep = 2, 3
    ids, mask, types = (np.zeros((n, seq), np.int64) for _ in range(3))
    for i in range(n):
        length = seq if i % 3 == 0 else int(rng.integers(7, seq))
        pair = i % 2 == 1
        words = zipf_ids(rng, length, 5, 100)
        row = [cls] + list(words[: length - (3 if pair else 2)])
        if pair:
            cut = 1 + (len(row) - 1) // 2
            row = row[:cut] + [sep] + row[cut:]
            types[i, cut + 1: length] = 1
        row.append(sep)
        ids[i, :length] = row
        mask[i, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def export_hf(model, args, path: Path, opset: int, input_names, output_names) -> None:
    """Dynamo export with dynamic batch/sequence on every input. The per-node
    ``pkg.torch.onnx.stack_trace`` metadata (absolute paths into site-packages, ~40% of the file) is
    dropped to stay under the size limit; the other exporter metadata is kept."""
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("sequence", min=2, max=64)
    export_dynamo(model, args, path, opset, input_names, output_names,
                  {k: {0: batch, 1: seq} for k in input_names})
    m = onnx.load(str(path))
    for n in m.graph.node:
        keep = [p for p in n.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del n.metadata_props[:]
        n.metadata_props.extend(keep)
    onnx.save_model(m, str(path))


class BertFeatures(nn.Module):
    """``last_hidden_state`` of a BertModel as one tensor (what optimum's feature-extraction export emits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


class GPT2Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def build_hf_bert(name="hf_bert", opset=18):
    from transformers import BertConfig, BertModel

    seed_all(17)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    model = BertFeatures(perturb_hf(BertModel(config, add_pooling_layer=False))).eval()
    feeds = transformer_inputs(name, np.random.default_rng(17), SAMPLES)
    path = HERE / f"{name}.onnx"
    export_hf(model, tuple(torch.from_numpy(feeds[k][:2]) for k in names), path, opset, names, ["last_hidden_state"])
    return name, model, path, feeds, f"transformers BertModel, dynamo, opset {opset}"


def build_hf_gpt2(name="hf_gpt2", opset=18):
    from transformers import GPT2Config, GPT2LMHeadModel

    seed_all(18)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=64,
                        bos_token_id=1, eos_token_id=1, use_cache=False)
    model = GPT2Logits(perturb_hf(GPT2LMHeadModel(config))).eval()
    feeds = transformer_inputs(name, np.random.default_rng(18), SAMPLES)
    path = HERE / f"{name}.onnx"
    export_hf(model, (torch.from_numpy(feeds["input_ids"][:2]),), path, opset, ["input_ids"], ["logits"])
    return name, model, path, feeds, f"transformers GPT2LMHeadModel (use_cache=False), dynamo, opset {opset}"


# --------------------------------------------------------------------------- 17. HF ViT and Whisper encoder (TorchScript, as optimum exports them)
class ViTLogits(nn.Module):
    """``logits`` of a ViTForImageClassification, with interpolated position embeddings so the
    traced graph accepts any image size (a multiple of the patch size)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values, interpolate_pos_encoding=True).logits


class WhisperEncoderFeatures(nn.Module):
    """``last_hidden_state`` of a WhisperEncoder (what optimum's encoder export emits)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features):
        return self.encoder(input_features=input_features).last_hidden_state


def whisper_log_mel(audio: np.ndarray, n_mels: int, n_fft: int = 400, hop: int = 160, sr: int = 16000) -> np.ndarray:
    """Whisper's log-mel features, in numpy (``transformers.audio_utils``, WhisperFeatureExtractor's recipe):
    power STFT (periodic Hann 400, hop 160 at 16 kHz), Slaney mel filters up to 8 kHz, log10, floored
    at max - 8, then (x + 4) / 4; the last STFT frame is dropped -> [n, n_mels, len // hop]."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    filters = mel_filter_bank(num_frequency_bins=1 + n_fft // 2, num_mel_filters=n_mels, min_frequency=0.0,
                              max_frequency=8000.0, sampling_rate=sr, norm="slaney", mel_scale="slaney")
    out = []
    for wave in audio:
        spec = spectrogram(wave, window_function(n_fft, "hann"), frame_length=n_fft, hop_length=hop, power=2.0,
                           mel_filters=filters, log_mel="log10")[:, :-1]
        spec = np.maximum(spec, spec.max() - 8.0)
        out.append((spec + 4.0) / 4.0)
    return np.stack(out).astype(np.float32)


def build_hf_vit(name="hf_vit", opset=17):
    """TorchScript export (optimum's exporter): the dynamo exporter silently specializes height and
    width to the example's 32x32, the legacy tracer keeps them dynamic (the interpolation's sizes
    come from ``Shape``). hidden 64 leaves room for an MLP of only 48 under the 300 KB limit."""
    from transformers import ViTConfig, ViTForImageClassification

    seed_all(19)
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48, num_labels=10)
    model = ViTLogits(perturb_hf(ViTForImageClassification(config))).eval()
    feeds = transformer_inputs(name, np.random.default_rng(19), SAMPLES)
    path = HERE / f"{name}.onnx"
    export_legacy(model, (torch.from_numpy(feeds["pixel_values"][:2]),), path, opset, ["pixel_values"], ["logits"],
                  {"pixel_values": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}})
    return name, model, path, feeds, f"transformers ViTForImageClassification (interpolate_pos_encoding), legacy, opset {opset}"


def build_hf_whisper_enc(name="hf_whisper_enc", opset=17):
    """The encoder only; frames are static: WhisperEncoder raises unless frames == 2 *
    max_source_positions and adds all its position embeddings (no slicing), so a dynamic frames axis
    would run at that one length only. d_model 64 fits 300 KB with 16 mel bins and an FFN of 48."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    seed_all(20)
    config = WhisperConfig(num_mel_bins=16, d_model=64, encoder_layers=2, encoder_attention_heads=2,
                           encoder_ffn_dim=48, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=48,
                           max_source_positions=50, max_target_positions=16, vocab_size=100,
                           pad_token_id=1, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1)
    encoder = perturb_hf(WhisperEncoder(config))
    with torch.no_grad():  # trained-looking scales: at init (std 0.02) the sinusoidal positions swamp the audio
        for mod in encoder.modules():  # and the output hardly depends on the input (0.4 % of its spread)
            if isinstance(mod, (nn.Conv1d, nn.Linear)):
                gain = 2.0 if isinstance(mod, nn.Conv1d) else 1.0
                nn.init.normal_(mod.weight, 0, gain * mod.weight[0].numel() ** -0.5)
    model = WhisperEncoderFeatures(encoder).eval()
    assert 2 * config.max_source_positions == WHISPER_FRAMES and config.num_mel_bins == WHISPER_MELS
    feeds = transformer_inputs(name, np.random.default_rng(20), SAMPLES)
    path = HERE / f"{name}.onnx"
    export_legacy(model, (torch.from_numpy(feeds["input_features"][:2]),), path, opset, ["input_features"],
                  ["last_hidden_state"], {"input_features": {0: "batch"}, "last_hidden_state": {0: "batch"}})
    return name, model, path, feeds, f"transformers WhisperEncoder, legacy, opset {opset}"


# --------------------------------------------------------------------------- the transformers' inputs
#: hf_whisper_enc's input: 100 frames (= 2 x max_source_positions: 1 s of 16 kHz audio at hop 160) of 16 mel bins.
WHISPER_FRAMES = 100
WHISPER_MELS = 16
TRANSFORMERS = ("hf_bert", "hf_gpt2", "hf_vit", "hf_whisper_enc", "transformer_mha")


def transformer_inputs(name: str, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``n`` inputs for one of the zoo's ``TRANSFORMERS``, drawn as its builder draws its ``.npz``
    (the builders call this with their seed; benchmarks and tests with other seeds)."""
    if name == "hf_bert":
        return bert_rows(rng, n)
    if name == "hf_gpt2":
        ids = zipf_ids(rng, (n, 16), 2, 100)
        ids[::4, 0] = 1  # some documents start with <|endoftext|>
        return {"input_ids": ids}
    if name == "hf_vit":
        return {"pixel_values": scene_batch(rng, n, 32, 32)}
    if name == "hf_whisper_enc":
        return {"input_features": whisper_log_mel(speech_like(rng, n, WHISPER_FRAMES * 160), WHISPER_MELS)}
    if name == "transformer_mha":
        return {"features": rng.normal(size=(n, 10, 12)).astype(np.float32)}
    raise ValueError(f"no input recipe for {name!r}; known: {', '.join(TRANSFORMERS)}")


# --------------------------------------------------------------------------- main
BUILDERS = [build_mobilenet, build_detector, build_unet, build_crnn, build_gru, build_if, build_loop,
            build_transformer, build_norms, build_keras_nhwc, build_qdq, build_yolo, build_vad, build_if_lstm,
            build_paddle_ocr, build_ort_dynquant, build_hf_bert, build_hf_gpt2, build_hf_vit, build_hf_whisper_enc]


def feed_chunks(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The samples in batches the model accepts: one batch, or one sample at a time for a fixed batch of 1."""
    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    fixed = {dims[k][0].dim_value for k in feeds if dims[k] and dims[k][0].HasField("dim_value")}
    if not fixed:
        return [feeds]
    step = fixed.pop()
    n = len(next(iter(feeds.values())))
    return [{k: v[i:i + step] for k, v in feeds.items()} for i in range(0, n, step)]


def main(only: list[str] | None = None) -> list[dict]:
    rows = []
    for builder in BUILDERS:
        if only and not any(o in builder.__name__ or o in builder.__defaults__[0] for o in only):
            continue
        name, torch_model, path, feeds, how = builder()
        model = finalize(onnx.load(str(path)), path) if torch_model is not None else onnx.load(str(path))
        diff = None
        for chunk in feed_chunks(model, feeds):
            outs = ort_run(path, chunk)
            assert all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f"), name
            if torch_model is not None:
                diff = max(diff or 0.0, check_against_torch(name, torch_model, path, chunk))
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
