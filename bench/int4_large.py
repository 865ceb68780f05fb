#!/usr/bin/env python
"""INT4 on a transformer whose weights are mostly MatMul weights: the compression and agreement a
user of ``--int4`` sees on an LLM-shaped model (the zoo's models are too small: their layers hold
1k-3k weights, below quantize-int4's ``min_weight_elements``).

    python bench/int4_large.py                     # -> bench/int4_large_results.md

Builds (random init, no download; biases perturbed like the zoo's ``perturb_hf``) a transformers
GPT-2 decoder (n_embd 384, 4 layers, vocab 256, no KV cache: 98 % of its weights are MatMul/Gemm weights), exports it with dynamic batch and
sequence (dynamo, opset 18), writes 64 calibration and 32 held-out Zipf-distributed token sequences,
then runs ``optimize M --int4 --calib calib.npz --data heldout.npz`` with ``method=awq`` (the default),
with ``--passes ... quantize-int4(method=rtn)`` and with AWQ at block sizes 64 and 32, as child processes, and reads the reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "sample_models" / "zoo"))


def build(folder: Path) -> Path:
    import torch
    from build_zoo import GPT2Logits, export_hf, perturb_hf, seed_all, zipf_ids
    from transformers import GPT2Config, GPT2LMHeadModel

    seed_all(41)
    config = GPT2Config(vocab_size=256, n_embd=384, n_layer=4, n_head=6, n_positions=64,
                        bos_token_id=1, eos_token_id=1, use_cache=False)
    model = GPT2Logits(perturb_hf(GPT2LMHeadModel(config))).eval()
    rng = np.random.default_rng(41)
    ids = zipf_ids(rng, (96, 32), 2, 256)
    np.savez(folder / "calib.npz", input_ids=ids[:64])
    np.savez(folder / "heldout.npz", input_ids=ids[64:])
    path = folder / "gpt2_384x4.onnx"
    export_hf(model, (torch.from_numpy(ids[:2]),), path, 18, ["input_ids"], ["logits"])
    return path


def run(model: Path, folder: Path, extra: list[str], tag: str) -> dict:
    out = folder / f"{tag}.onnx"
    cmd = ["optimize", str(model), "--calib", str(folder / "calib.npz"), "--data", str(folder / "heldout.npz"),
           "-o", str(out), "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    report = json.loads(proc.stdout)
    outputs = list(report["accuracy"]["outputs"].values())
    trt = subprocess.run(["optimize", "check-trt", str(out), "--build"], capture_output=True, text=True)
    return {"tag": tag, "exit": proc.returncode, "bytes_in": model.stat().st_size, "bytes_out": out.stat().st_size,
            "compression": report["summary"]["compression"]["bytes"], "cosine": outputs[0]["cosine"],
            "argmax": outputs[0]["argmax_agreement"], "precision": report["precision"]["counts"],
            "rolled_back": report["rolled_back"], "trt_rtx": "builds" if trt.returncode == 0 else trt.stdout[-200:],
            "time_s": report["summary"]["time_s"]}


def main() -> int:
    from_passes = "default,upgrade-opset(min=21),quantize-int4(method=rtn)"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build(folder)
        rows = [run(model, folder, ["--int4"], "awq"), run(model, folder, ["--passes", from_passes], "rtn"),
                run(model, folder, ["--passes", "default,upgrade-opset(min=21),quantize-int4(block_size=64)"], "awq, block 64"),
                run(model, folder, ["--passes", "default,upgrade-opset(min=21),quantize-int4(block_size=32)"], "awq, block 32")]
    lines = ["# INT4 on an LLM-shaped decoder (GPT-2, n_embd 384, 4 layers, vocab 256)", "",
             "`python bench/int4_large.py`; accuracy on 32 held-out sequences (`--data`), calibration on 64.", "",
             "| method | exit | file bytes | compression | cosine | argmax agree | layers | TensorRT-RTX | time s |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        print(json.dumps(r))
        lines.append(f"| {r['tag']} | {r['exit']} | {r['bytes_in']:,} → {r['bytes_out']:,} | {r['compression']:.2f}x | "
                     f"{r['cosine']:.6f} | {100 * r['argmax']:.1f} % | {r['precision']} | {r['trt_rtx']} | {r['time_s']} |")
    (REPO / "bench" / "int4_large_results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
