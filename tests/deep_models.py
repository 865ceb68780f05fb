"""Deep, real-size test networks (a helper module: no tests here).

``efficientnet_like(path)`` writes an EfficientNet-B0-shaped CNN (the real B0 layout: 16 MBConv blocks
with squeeze-and-excitation, SiLU, BatchNorm, ~5.3 M parameters, 1000 classes, 224x224 input) to
ONNX, for tolerance tests that need a deep network with realistic numerics (BN folding, FP16).
``real_images(n)`` makes natural-looking, ImageNet-normalized input images for it.

Built with plain torch modules (no timm / torchvision); the weights are random but seeded, and
BatchNorm gets running statistics from forward passes over ``real_images`` so that every layer's
activations are roughly normalized in eval mode, as in a trained network.
"""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)

# EfficientNet-B0: (expand ratio, kernel, stride, output channels, repeats)
B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


def real_images(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """``n`` natural-looking RGB images [n, 3, size, size], float32, ImageNet-normalized.

    Each image is a colour-correlated 1/f ("pink") noise field, the power spectrum of natural
    images, under a smooth illumination gradient, with a few hard-edged objects (discs,
    rectangles) with their own shading and texture, plus mild sensor noise; pixel values are
    clipped to [0, 1] before normalization, so the statistics resemble ImageNet photos
    (mean ~0, std ~1 per channel, long-range correlations, sharp edges).
    """
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fx ** 2 + fy ** 2)
    radius[0, 0] = 1.0
    amplitude = 1.0 / radius ** 1.1
    amplitude[0, 0] = 0.0
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")

    def pink(channels: int) -> np.ndarray:
        phase = rng.uniform(0, 2 * np.pi, (channels,) + amplitude.shape)
        field = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(size, size))
        field -= field.mean(axis=(1, 2), keepdims=True)
        return field / (field.std(axis=(1, 2), keepdims=True) + 1e-12)

    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        # luminance + two colour-opponent fields, mixed to RGB: channels strongly correlated as in photos
        lum, rg, by = pink(3)
        base = rng.uniform(0.3, 0.6, 3)[:, None, None]
        rgb = np.stack([lum + 0.25 * rg + 0.1 * by, lum - 0.25 * rg + 0.1 * by, lum - 0.35 * by])
        img = base + 0.16 * rgb
        light = 0.8 + 0.4 * (np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy)
        img = img * light[None]
        for _ in range(int(rng.integers(2, 6))):
            colour = rng.uniform(0.05, 0.95, 3)[:, None, None]
            cy, cx = rng.uniform(0.15, 0.85, 2)
            ry, rx = rng.uniform(0.06, 0.3, 2)
            if rng.uniform() < 0.5:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            else:
                mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            shade = 1.0 - 0.35 * np.clip(((yy - cy) / ry + (xx - cx) / rx) / 2, -1, 1)  # lit from one side
            texture = 0.05 * pink(1)[0]
            img = np.where(mask[None], colour * shade[None] + texture[None], img)
        img = np.clip(img + rng.normal(0, 0.01, img.shape), 0.0, 1.0).astype(np.float32)
        out[i] = (img - IMAGENET_MEAN) / IMAGENET_STD
    return out


def _efficientnet_b0(num_classes: int = 1000):
    import torch
    from torch import nn

    class ConvBNAct(nn.Sequential):
        def __init__(self, cin, cout, k=1, s=1, groups=1, act=True):
            layers = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False),
                      nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)]
            if act:
                layers.append(nn.SiLU())
            super().__init__(*layers)

    class SqueezeExcite(nn.Module):
        def __init__(self, c, squeeze):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.reduce, self.expand = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
            self.act, self.gate = nn.SiLU(), nn.Sigmoid()

        def forward(self, x):
            return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))

    class MBConv(nn.Module):
        def __init__(self, cin, cout, expand, k, s):
            super().__init__()
            hidden = cin * expand
            layers = [ConvBNAct(cin, hidden, 1)] if expand != 1 else []
            layers += [ConvBNAct(hidden, hidden, k, s, groups=hidden),
                       SqueezeExcite(hidden, max(1, cin // 4)),
                       ConvBNAct(hidden, cout, 1, act=False)]
            self.block = nn.Sequential(*layers)
            self.residual = s == 1 and cin == cout

        def forward(self, x):
            y = self.block(x)
            return x + y if self.residual else y  # stochastic depth is identity in eval

    class EfficientNetB0(nn.Module):
        def __init__(self):
            super().__init__()
            blocks, cin = [ConvBNAct(3, 32, 3, 2)], 32
            for expand, k, s, cout, repeats in B0_STAGES:
                for r in range(repeats):
                    blocks.append(MBConv(cin, cout, expand, k, s if r == 0 else 1))
                    cin = cout
            blocks.append(ConvBNAct(cin, 1280, 1))
            self.features = nn.Sequential(*blocks)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    model = EfficientNetB0()
    for m in model.modules():  # torchvision's EfficientNet init
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.normal_(m.bias, 0, 0.05)
        elif isinstance(m, nn.Linear):  # wider than torchvision's U(+-1/sqrt(1000)): logits with a trained net's spread
            nn.init.normal_(m.weight, 0, 0.07)
            nn.init.normal_(m.bias, 0, 0.1)
    return model


def efficientnet_like(path: Path, seed: int = 0, warm_steps: int = 3, warm_batch: int = 3) -> Path:
    """Build the EfficientNet-B0-like network, export it to ONNX at ``path`` and return ``path``.

    Random (seeded) weights; BatchNorm gets non-trivial affine parameters (gamma ~ U(0.5, 1.5),
    beta ~ U(-0.3, 0.3), as ``warm_batchnorm`` in the zoo builder does) and then running statistics
    from ``warm_steps`` train-mode forward passes over ``real_images`` of ``warm_batch`` images.
    Two differences from the zoo's ``warm_batchnorm``, both needed in a network this deep: the
    affine parameters are drawn *before* the statistics, and the statistics are a plain average
    of the batches (``momentum=None`` after ``reset_running_stats``) rather than momentum 0.5 from
    the (0, 1) initial values. Otherwise the stale variance of 1 dominates the tiny true variances
    of the deep layers and the image signal dies out by the last stage (every image then gets the
    same logits). With this warm-up every BN output is ~N(beta, gamma^2) in eval mode, as in a
    trained net, and the logits differ per image. Exported with the TorchScript exporter, opset 13, no constant folding (every
    ``BatchNormalization`` stays in the graph), dynamic batch: input ``input`` [batch, 3, 224, 224]
    -> output ``logits`` [batch, 1000]. About 5.3 M parameters (~21 MB); ~8 s on CPU (one thread).
    """
    import torch
    from torch import nn

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _efficientnet_b0()
        with torch.no_grad():
            bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
            for m in bns:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.reset_running_stats()
                m.momentum = None  # cumulative average of the warm-up batches
            model.train()
            for step in range(warm_steps):
                model(torch.from_numpy(real_images(warm_batch, 224, seed=1000 + step)))
            for m in bns:
                m.momentum = 0.01
        model.eval()
        example = torch.from_numpy(real_images(1, 224, seed=999))
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), dynamo=False, do_constant_folding=False,
                              opset_version=13, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    import onnx

    model_proto = onnx.load(str(path))
    if model_proto.ir_version > 10:
        model_proto.ir_version = 10
        onnx.save_model(model_proto, str(path))
    return path
