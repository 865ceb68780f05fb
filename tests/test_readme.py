"""The README's Python examples run as written (the API one on a copy of the digits sample, the
PyTorch one on its own module). Blocks are picked by content, so their order does not matter."""

import re
import shutil

import pytest
from helpers import ROOT, SAMPLES

from optimizer import available_passes
from optimizer.registry import _REGISTRY


def readme_block(containing: str) -> str:
    """The README's first Python block containing ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert found, f"the README has a Python example with {containing!r}"
    return found[0]


def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = readme_block("register_pass")
    shutil.copy(SAMPLES / "digits_cnn" / "model.onnx", tmp_path / "model.onnx")
    shutil.copy(SAMPLES / "digits_cnn" / "eval.npz", tmp_path / "eval.npz")
    monkeypatch.chdir(tmp_path)
    saved = dict(available_passes())
    try:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
        assert (tmp_path / "model.opt.onnx").exists() and (tmp_path / "out.onnx").exists()
        assert namespace["result"].report.accuracy.task.drop == 0.0
        assert [r.name for r in namespace["run"].records] == ["cleanup", "dedupe-relu", "fuse-conv-bn"]
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def test_readme_pytorch_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    block = readme_block("from_torch")
    assert len(block.strip().splitlines()) == 5, "the PyTorch example is five lines"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    report = namespace["result"].report
    assert report.status == "ok" and (tmp_path / "net.int8.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.int8.onnx"]  # nothing else written
    assert report.torch["exporter"] == "dynamo" and report.torch["exporter_agrees"]
    assert all(m["cosine"] >= 0.99 for m in report.torch["vs_optimized"].values())
    assert any(p.name == "quantize-int8" and p.changed for p in report.passes)
