#!/usr/bin/env python
"""Build the larger (> 5 MB) benchmark models of issue 16 into ``bench/large/`` (not the zoo).

    python bench/build_large.py            # -> bench/large/{cnn_lstm_ocr,bert_encoder}.onnx + .npz

Random-init PyTorch models with dynamic dims, exported with ``torch.onnx.export``: a CNN+LSTM
OCR recognizer (dynamic batch and width) and a BERT-style encoder (transformers, dynamic batch
and sequence). Seeded; IR version pinned to 10 for ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

OUT = Path(__file__).resolve().parent / "large"


class CnnLstm(torch.nn.Module):
    def __init__(self, classes: int = 96):
        super().__init__()
        chans = [1, 64, 128, 256, 256, 384]
        layers = []
        for i in range(len(chans) - 1):
            layers += [torch.nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), torch.nn.BatchNorm2d(chans[i + 1]),
                       torch.nn.ReLU()]
            if i < 3:
                layers.append(torch.nn.MaxPool2d(2))
        self.cnn = torch.nn.Sequential(*layers)
        self.rnn = torch.nn.LSTM(384 * 4, 256, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = torch.nn.Linear(512, classes)

    def forward(self, image):
        f = self.cnn(image)  # [B, C, 4, W/8]
        b, c, h, w = f.shape
        f = f.permute(0, 3, 1, 2).reshape(b, w, c * h)
        y, _ = self.rnn(f)
        return self.fc(y).log_softmax(-1)


def _save(model: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray]) -> None:
    model.ir_version = 10
    OUT.mkdir(exist_ok=True)
    onnx.save(model, str(OUT / f"{name}.onnx"))
    np.savez(OUT / f"{name}.npz", **feeds)
    print(name, (OUT / f"{name}.onnx").stat().st_size // 1024, "KiB")


def _export(module, args, names, dynamic, path: Path) -> onnx.ModelProto:
    torch.onnx.export(module, args, str(path), input_names=names, dynamic_axes=dynamic, opset_version=17,
                      dynamo=False)
    return onnx.load(str(path))


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    OUT.mkdir(exist_ok=True)
    ocr = CnnLstm().eval()
    image = torch.randn(2, 1, 32, 128)
    model = _export(ocr, (image,), ["image"], {"image": {0: "batch", 3: "width"}}, OUT / "cnn_lstm_ocr.onnx")
    _save(model, "cnn_lstm_ocr", {"image": rng.standard_normal((4, 1, 32, 128)).astype(np.float32)})

    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=8000, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                        intermediate_size=1536, max_position_embeddings=256)
    class Encoder(torch.nn.Module):  # positional (ids, mask) -> last hidden state
        def __init__(self):
            super().__init__()
            self.bert = BertModel(config).eval()

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    bert = Encoder().eval()
    ids = torch.randint(0, 8000, (2, 24))
    mask = torch.ones_like(ids)
    dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    model = _export(bert, (ids, mask), ["input_ids", "attention_mask"], dyn, OUT / "bert_encoder.onnx")
    _save(model, "bert_encoder", {"input_ids": rng.integers(0, 8000, (4, 24)).astype(np.int64),
                                  "attention_mask": np.ones((4, 24), np.int64)})


if __name__ == "__main__":
    main()
